"""``mf`` end to end: fit, resume, validate/test/predict from checkpoints, configs, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from cli_support import REPO, run, scalars, state_of, tiny_run_args, write_corpus

from mf_lightning.cli import main
from mf_lightning.lit import LanguageModel


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """One short fit shared by the tests below: (run root, corpus folder)."""
    root = tmp_path_factory.mktemp("run")
    corpus = write_corpus(root / "corpus")
    run("fit", tiny_run_args(root, corpus))
    return root, corpus


def test_fit_writes_tensorboard_logs_config_and_checkpoints(trained):
    root, _ = trained
    logged = scalars(root / "tensorboard")
    assert [step for step, _ in logged["loss/train"]][-1] >= 5
    for tag in (
        "loss/val",
        "val/ppl",
        "val/bpb",
        "lr-AdamW/tables",
        "memory_usage/used_fraction",
        "memory_grad_summary/table_row_coverage",
    ):
        assert tag in logged, f"{tag} missing from {sorted(logged)}"
    val_loss, ppl = logged["loss/val"][-1][1], logged["val/ppl"][-1][1]
    assert ppl == pytest.approx(float(torch.exp(torch.tensor(val_loss))), rel=1e-4)
    assert (root / "tensorboard" / "config.yaml").is_file()
    assert (root / "checkpoints" / "last.ckpt").is_file()
    assert list((root / "checkpoints").glob("best-step=*.ckpt"))


def test_training_reduces_the_loss(trained):
    losses = [value for _, value in scalars(trained[0] / "tensorboard")["loss/train"]]
    assert losses[-1] < losses[0]


def test_checkpoint_rebuilds_the_model_alone(trained):
    root, _ = trained
    module = LanguageModel.load_from_checkpoint(root / "checkpoints" / "last.ckpt", map_location="cpu")
    assert module.config.vocab_size == 257 and module.config.max_seq_len == 64
    weights = state_of(root / "checkpoints" / "last.ckpt")
    assert all(torch.equal(module.state_dict()[k], v) for k, v in weights.items())


def test_validate_test_and_predict_from_checkpoint(trained, tmp_path):
    root, corpus = trained
    args = tiny_run_args(root, corpus) + ["--ckpt_path", "last"]
    validated = run("validate", args).trainer.callback_metrics
    assert {"loss/val", "val/ppl", "val/bpb"} <= set(validated)
    tested = run("test", args).trainer.callback_metrics
    assert {"loss/test", "test/ppl", "test/bpb"} <= set(tested)
    assert float(tested["loss/test"]) != pytest.approx(
        float(validated["loss/val"]), rel=1e-3
    )  # held-out documents of its own
    output = tmp_path / "completions.jsonl"
    run(
        "predict",
        args
        + [
            "--model.max_new_tokens",
            "8",
            "--data.prompts",
            "[the memory, attention]",
            "--trainer.callbacks+=mf_lightning.lit.predictions.CompletionWriter",
            "--trainer.callbacks.output_path",
            str(output),
        ],
    )
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["prompt"] for line in lines] == ["the memory", "attention"]
    assert all(isinstance(line["completion"], str) for line in lines)


def test_optimizer_and_scheduler_are_injected_from_the_command_line(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    cli = run(
        "fit",
        tiny_run_args(tmp_path, corpus, max_steps=2)
        + [
            "--model.optimizer",
            "torch.optim.SGD",
            "--model.optimizer.lr",
            "0.05",
            "--model.scheduler",
            "torch.optim.lr_scheduler.ConstantLR",
            "--model.scheduler.factor",
            "0.5",
        ],
    )
    optimizer = cli.trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.SGD)
    assert [g["name"] for g in optimizer.param_groups] == ["tables", "decay", "no_decay"]
    assert isinstance(cli.trainer.lr_scheduler_configs[0].scheduler, torch.optim.lr_scheduler.ConstantLR)


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    """A run restarted from its step-4 checkpoint ends with the same weights and losses as one that never stopped."""
    corpus = write_corpus(tmp_path / "corpus")
    keep_all = [
        "--checkpoint.every_n_train_steps",
        "4",
        "--checkpoint.save_top_k",
        "-1",
        "--checkpoint.monitor",
        "null",
        "--checkpoint.filename",
        "step-{step}",
    ]
    whole = tmp_path / "whole"
    run("fit", tiny_run_args(whole, corpus, max_steps=8) + keep_all)
    resumed = tmp_path / "resumed"
    run(
        "fit",
        tiny_run_args(resumed, corpus, max_steps=8)
        + keep_all
        + ["--ckpt_path", str(whole / "checkpoints" / "step-step=4.ckpt")],
    )
    first, second = state_of(whole / "checkpoints" / "last.ckpt"), state_of(resumed / "checkpoints" / "last.ckpt")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    whole_losses = dict(scalars(whole / "tensorboard")["loss/train"])
    resumed_losses = dict(scalars(resumed / "tensorboard")["loss/train"])
    assert min(resumed_losses) == 4
    assert {s: whole_losses[s] for s in resumed_losses} == resumed_losses


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["preset"] in {"debug", "tiny", "small", "base"}
    assert printed["trainer"]["default_root_dir"].startswith("runs/")


def test_efficiency_tool_is_an_mf_subcommand(capsys):
    main(["efficiency"])
    assert "Transformer / MemoryFormer" in capsys.readouterr().out


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model.preset": "huge"}, "unknown preset 'huge'; valid: debug, tiny, small, base"),
        ({"model.overrides": "{code_bits: 6, max_seq_len: 64}"}, "n_embd=64 is not divisible by code_bits=6"),
        ({"data.source": "/nonexistent/corpus"}, "source '/nonexistent/corpus' does not exist"),
        ({"data.tokenizer": "bpe:100"}, "bpe:100"),
        (
            {"model.overrides": "{vocab_size: 50000, max_seq_len: 64}"},
            "disagrees with the tokenizer's vocabulary of 257",
        ),
        ({"data.seq_len": 128}, "data.seq_len=128 exceeds the model's max_seq_len=64"),
        ({"progress.log_every_s": -1}, "progress.log_every_s must be a number of seconds >= 0, got -1.0"),
    ],
)
def test_bad_configs_fail_with_one_clear_line(overrides, message, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    with pytest.raises(SystemExit) as exit_info:
        run("fit", tiny_run_args(tmp_path, corpus, **overrides))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_empty_corpus_is_a_clear_error(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "empty.txt").write_text("")
    with pytest.raises(SystemExit):
        run("fit", tiny_run_args(tmp_path, corpus))
    assert "empty.txt is empty" in capsys.readouterr().err


def test_unknown_yaml_key_names_the_key(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  presett: debug\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config)])
    assert exit_info.value.code == 2
    assert "presett" in capsys.readouterr().err


@pytest.mark.slow
def test_mf_console_command_exits_with_status_zero(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    command = [str(Path(sys.executable).parent / "mf"), "validate", *tiny_run_args(tmp_path, corpus)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MFCLI" not in result.stderr


def test_help_lists_every_subcommand_with_one_line(capsys):
    from lightning.pytorch.cli import LightningCLI

    from mf_lightning.cli import TOOLS
    from mf_lightning.commands import SUBCOMMANDS

    assert set(SUBCOMMANDS) == set(LightningCLI.subcommands()) | set(TOOLS)
    for flag in ([], ["--help"], ["-h"]):
        assert main(flag) is None
        listed = capsys.readouterr().out.split("subcommands:\n", 1)[1].splitlines()
        assert [line.split()[0] for line in listed] == list(SUBCOMMANDS)
        assert all(len(line.split()) > 1 for line in listed)


def test_an_unknown_subcommand_names_the_valid_ones(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fitt", "--config", "configs/quickstart.yaml"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert (
        error.startswith("mf: error: unknown subcommand 'fitt'; choose from fit, validate,") and "efficiency" in error
    )


def test_main_with_args_leaves_the_process_argv_alone(tmp_path, monkeypatch):
    """A notebook or a script calls ``main(args)`` while its own ``sys.argv`` holds other words: they are
    neither parsed nor replaced, and LightningCLI's warning about both being given is not shown."""
    import warnings

    process_argv = ["kernel.py", "--some-kernel-flag"]
    monkeypatch.setattr(sys, "argv", process_argv)
    seen = []

    def record(*args, **kwargs):
        seen.append(list(sys.argv))

    monkeypatch.setattr(LanguageModel, "on_fit_start", record)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["fit", *tiny_run_args(tmp_path / "run", write_corpus(tmp_path / "corpus"), max_steps=1)])
    assert seen == [process_argv] and sys.argv is process_argv
    assert not [w for w in caught if "args parameter" in str(w.message)]
