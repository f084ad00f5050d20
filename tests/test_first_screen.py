"""The first screen of ``mf fit``: progress in optimizer steps of max_steps and tokens, and real FLOPs per step."""

from __future__ import annotations

import re

from cli_support import run, tiny_run_args, write_corpus
from lightning.pytorch.utilities.model_summary import get_human_readable_count

from mf_lightning.callbacks import first_screen

STEPS, ACCUMULATE, BATCH, SEQ_LEN = 4, 2, 4, 32


def test_fit_shows_steps_tokens_and_flops_per_step(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(first_screen, "on_terminal", lambda: True)  # the bar, as on a terminal
    corpus = write_corpus(tmp_path / "corpus")
    cli = run(
        "fit",
        tiny_run_args(
            tmp_path,
            corpus,
            max_steps=STEPS,
            **{
                "trainer.enable_progress_bar": True,
                "trainer.accumulate_grad_batches": ACCUMULATE,
                "validation.every_n_steps": STEPS,
            },
        ),
    )
    screen = capsys.readouterr().out
    tokens = STEPS * ACCUMULATE * BATCH * SEQ_LEN
    assert f"Step {STEPS}/{STEPS} · {get_human_readable_count(tokens)} tokens" in screen, screen
    assert not re.search(r"Epoch \d+/-", screen)
    module = cli.model
    flops = module.network.flops_per_token(SEQ_LEN) * SEQ_LEN * BATCH * ACCUMULATE
    assert module.flops_per_batch * ACCUMULATE == flops
    assert f"Training FLOPs per optimizer step: {get_human_readable_count(flops)}\n" in screen
    assert "Total FLOPs" not in screen


def test_disabled_summary_and_bar_print_neither(tmp_path, capsys) -> None:
    corpus = write_corpus(tmp_path / "corpus")
    run("fit", tiny_run_args(tmp_path, corpus, max_steps=1, **{"trainer.enable_model_summary": False}))
    screen = capsys.readouterr().out
    assert "FLOPs" not in screen and "Step 1/1" not in screen and "Total params" not in screen
