"""Where ``mf validate/test/predict`` write: beside the run, leaving its saved config and training curves alone."""

from __future__ import annotations

import pytest
import yaml
from cli_support import run, scalars, tiny_run_args, write_corpus

from mf_lightning.cli import main, read_config


@pytest.mark.slow
def test_evaluating_a_run_leaves_its_config_and_curves_and_the_config_resumes(tmp_path):
    root = tmp_path / "run"
    corpus = write_corpus(tmp_path / "corpus")
    run("fit", tiny_run_args(root, corpus))
    saved = root / "tensorboard" / "config.yaml"
    config_text = saved.read_text()
    events = sorted((root / "tensorboard").glob("events.out.tfevents.*"))
    curves = scalars(root / "tensorboard")
    args = tiny_run_args(root, corpus) + ["--ckpt_path", "last"]
    for subcommand in ("validate", "test", "predict"):
        run(
            subcommand,
            args + (["--model.max_new_tokens", "4", "--data.prompts", "[the memory]"] * (subcommand == "predict")),
        )

    assert saved.read_text() == config_text
    assert set(yaml.safe_load(config_text)) == set(read_config([saved]).as_dict()) - {"config"}  # fit's keys only
    assert sorted((root / "tensorboard").glob("events.out.tfevents.*")) == events
    assert scalars(root / "tensorboard") == curves
    assert 0 not in [step for step, _ in curves["loss/val"]]
    last_step = curves["loss/val"][-1][0]  # the validation that saved last.ckpt
    assert [step for step, _ in curves["loss/val"]] == [2, 5]  # after optimizer steps 3 and 6
    assert [step for step, _ in scalars(root / "validate")["loss/val"]] == [last_step]  # the checkpoint's step
    assert [step for step, _ in scalars(root / "test")["loss/test"]] == [last_step]
    assert (root / "predict" / "predictions.jsonl").is_file()

    main(["fit", "--config", str(saved), "--ckpt_path", "last", "--trainer.max_steps", "8"])
    assert [step for step, _ in scalars(root / "tensorboard")["loss/train"]][-1] == 7
