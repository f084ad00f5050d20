"""``configs/fsdp_base.yaml`` scaled down to 2 CPU processes (FSDP2 over gloo) against one process.

Five runs of the same config and global batch, each 4 steps with sharded checkpoints at steps 2 and 4:
``one`` (FSDP on 1 process), ``two`` (FSDP on 2 ranks), ``resumed`` (2 ranks from ``two``'s step 2),
``two_to_one`` (one process without FSDP from ``two``'s step 2) and ``one_to_two`` (2 ranks from
``one``'s step 2, saving single files: ``save_distributed_checkpoint: false``). Comparisons across
process counts assert only what holds whatever the order of float summation: first-step gradients,
validation losses, and weights within what Adam can move them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_support import REPO, scalars

from mf_lightning.cli import main
from mf_lightning.lit import LanguageModel
from mf_lightning.lit.checkpoint_digests import DIGESTS_SUFFIX
from mf_lightning.lit.checkpoints import read_checkpoint
from mf_lightning.lit.distributed_checkpoint import INDEX_NAME, METADATA_NAME
from mf_lightning.models import load_pretrained

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess, pytest.mark.timeout(900)]  # five runs in one fixture

CONFIG = REPO / "configs" / "fsdp_base.yaml"
STEPS = 4
LR = 9.0e-4  # configs/fsdp_base.yaml's model.lr
ADAM_EPS = 1e-8
SCALED_DOWN = {  # the overrides the config's header names, plus a tiny batch and step count
    "model.preset": "debug",
    "trainer.accelerator": "cpu",
    "trainer.precision": "32-true",
    "data.source": "demo",
    "data.tokenizer": "byte",
    "data.seq_len": 32,
    "data.num_workers": 0,
    "data.val_windows": 5,  # odd: 2 ranks get 3 windows each, one of them filler
    "trainer.max_steps": STEPS,
    "trainer.accumulate_grad_batches": 1,
    "validation.every_n_steps": 2,
    "trainer.log_every_n_steps": 1,
    "trainer.enable_progress_bar": False,
    "bucket_usage.log_every_n_steps": 2,
    "bucket_usage.image_every_n_steps": 2,
    "gradient_coverage.log_every_n_steps": 2,
    "checkpoint.every_n_train_steps": 2,
    "checkpoint.save_top_k": -1,
    "checkpoint.monitor": "null",
    "checkpoint.filename": "step-{step}",
}
LOSS_RTOL = 1e-5
"""One process and 2 FSDP ranks see the same global batch; only float summation order differs
(gradients reduce-scattered instead of summed in one place): measured 2e-7 relative after 4 steps."""
GRADIENT_ATOL = 1e-5
"""First-step gradients of 1 and 2 processes: the same sums in another order (measured ~1e-9)."""


def subprocess_env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }


def mf(subcommand: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m mf_lightning <subcommand> <args>`` in a subprocess; fails the test on a non-zero exit."""
    result = subprocess.run(
        [sys.executable, "-m", "mf_lightning", subcommand, *args],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def fit(root: Path, cache: Path, devices: int, *extra: str, sharded: bool = True) -> None:
    """``mf fit`` of the scaled-down config on ``devices`` CPU processes, global batch 4; without
    ``sharded`` one process with Lightning's default strategy (no FSDP)."""
    settings = {
        **SCALED_DOWN,
        "trainer.default_root_dir": root,
        "data.cache_dir": cache,
        "trainer.devices": devices,
        "data.batch_size": 4 // devices,
    }
    if not sharded:
        settings["trainer.strategy"] = "auto"
    args = ["--config", str(CONFIG)]
    for key, value in settings.items():
        args += [f"--{key}", str(value)]
    mf(
        "fit",
        *args,
        "--trainer.callbacks+=fsdp_probe.ShardReport",
        "--trainer.callbacks.folder",
        str(root / "shards"),
        *extra,
    )


def step2(run: Path) -> Path:
    return run / "checkpoints" / "step-step=2.ckpt"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("fsdp")
    paths = {name: base / name for name in ("one", "two", "resumed", "two_to_one", "one_to_two")}
    cache = base / "cache"
    fit(paths["one"], cache, 1)
    fit(paths["two"], cache, 2)
    fit(paths["resumed"], cache, 2, "--ckpt_path", str(step2(paths["two"])))
    fit(paths["two_to_one"], cache, 1, "--ckpt_path", str(step2(paths["two"])), sharded=False)
    fit(
        paths["one_to_two"],
        cache,
        2,
        "--ckpt_path",
        str(step2(paths["one"])),
        "--trainer.strategy.init_args.save_distributed_checkpoint",
        "false",
    )  # the single-file option
    return paths


def shard_reports(run: Path) -> list[dict[str, int]]:
    return [json.loads((run / "shards" / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(checkpoint)["state_dict"]


def test_each_rank_holds_half_of_the_weights_and_optimizer_state(runs):
    for run in ("two", "resumed", "one_to_two"):
        reports = shard_reports(runs[run])
        for kind in ("parameters", "optimizer_state"):
            total = reports[0][kind]
            assert total == reports[1][kind] > 0
            assert sum(report[f"local_{kind}"] for report in reports) == total
            assert all(0.45 < report[f"local_{kind}"] / total < 0.55 for report in reports), (run, kind, reports)
    one = json.loads((runs["one"] / "shards" / "rank0.json").read_text())
    assert one["local_parameters"] == one["parameters"] == reports[0]["parameters"]


def test_memory_layers_see_gathered_plain_tables_inside_forward(runs):
    for report in shard_reports(runs["two"]):
        assert report["forwards"] > 0
        assert report["forwards_with_dtensor_tables"] == 0


def test_checkpoints_are_folders_of_one_shard_per_rank(runs):
    """Nothing is gathered: each rank writes about half of the tensors, and the digests of its own shard;
    no staging folder is left behind."""
    for name in ("step-step=2.ckpt", "step-step=4.ckpt", "last.ckpt"):
        folder = runs["two"] / "checkpoints" / name
        shards = ["__0_0.distcp", "__1_0.distcp"]
        assert sorted(path.name for path in folder.iterdir()) == sorted(
            [INDEX_NAME, METADATA_NAME, *shards, *(shard + DIGESTS_SUFFIX for shard in shards)]
        )
        sizes = [(folder / f"__{rank}_0.distcp").stat().st_size for rank in (0, 1)]
        assert all(0.4 < size / sum(sizes) < 0.6 for size in sizes), sizes
    assert sorted(path.name for path in (runs["two"] / "checkpoints").iterdir()) == [
        "last.ckpt",
        "step-step=2.ckpt",
        "step-step=4.ckpt",
    ]


def test_two_ranks_train_like_one_process(runs):
    """First-step gradients, validation losses after 2 and 4 steps (each window counted once, though 5
    windows do not split evenly over 2 ranks), and the final weights: an element Adam moves by at most
    about ``lr`` per step may differ by a small part of ``lr x steps``, where its first gradient is clearly
    above Adam's eps (below it, the update's size is set by eps and the order of summation)."""
    one_gradients = torch.load(runs["one"] / "shards" / "first_gradients.pt")
    two_gradients = torch.load(runs["two"] / "shards" / "first_gradients.pt")
    assert one_gradients.keys() == two_gradients.keys()
    for name in one_gradients:
        torch.testing.assert_close(two_gradients[name], one_gradients[name], rtol=0, atol=GRADIENT_ATOL, msg=name)
    one, two = scalars(runs["one"] / "tensorboard"), scalars(runs["two"] / "tensorboard")
    assert [step for step, _ in two["loss/train"]] == [0, 1, 2, 3]
    assert [s for s, _ in one["loss/val"]] == [s for s, _ in two["loss/val"]] == [1, 3]
    for (step, a), (_, b) in zip(one["loss/val"], two["loss/val"]):
        assert b == pytest.approx(a, rel=LOSS_RTOL), step
    one_weights, two_weights = (weights(runs[run] / "checkpoints" / "last.ckpt") for run in ("one", "two"))
    for name, gradient in one_gradients.items():
        difference = (one_weights[name] - two_weights[name]).abs()
        clear = gradient.abs() > 100 * ADAM_EPS
        assert float(torch.where(clear, difference, 0).max()) <= 0.01 * LR * STEPS, name
        assert float(difference.max()) <= 2 * LR * STEPS, name


def test_monitors_give_the_numbers_of_one_process(runs):
    one, two = scalars(runs["one"] / "tensorboard"), scalars(runs["two"] / "tensorboard")
    tags = [tag for tag in one if tag.startswith("memory_")]
    assert "memory_usage/used_fraction" in tags and "memory_grad_summary/table_row_coverage" in tags
    for tag in tags:
        logged_at = [0, 2] if tag.startswith("memory_grad") else [2, 4]
        assert [s for s, _ in two[tag]] == [s for s, _ in one[tag]] == logged_at, tag
        for (step, a), (_, b) in zip(one[tag], two[tag]):
            assert b == pytest.approx(a, rel=1e-4, abs=1e-9), (tag, step)


def test_resume_from_a_sharded_checkpoint_continues_exactly(runs):
    whole, resumed = scalars(runs["two"] / "tensorboard"), scalars(runs["resumed"] / "tensorboard")
    resumed_losses = dict(resumed["loss/train"])
    assert sorted(resumed_losses) == [2, 3]
    assert resumed_losses == {step: loss for step, loss in whole["loss/train"] if step in resumed_losses}
    assert dict(resumed["loss/val"])[3] == dict(whole["loss/val"])[3]
    final, resumed_final = (weights(runs[run] / "checkpoints" / "last.ckpt") for run in ("two", "resumed"))
    assert all(torch.equal(resumed_final[key], final[key]) for key in final)


@pytest.mark.parametrize(("run", "uninterrupted"), [("two_to_one", "two"), ("one_to_two", "one")])
def test_a_sharded_checkpoint_resumes_on_another_number_of_processes(runs, run, uninterrupted):
    """2 ranks -> one process without FSDP, and 1 FSDP process -> 2 ranks: the resumed run validates
    at step 4 like the run that went on uninterrupted (weights and Adam moments both restored: fresh
    moments would move every weight by a full ``lr`` at step 3)."""
    resumed, whole = scalars(runs[run] / "tensorboard"), scalars(runs[uninterrupted] / "tensorboard")
    assert [step for step, _ in resumed["loss/val"]] == [3]
    assert dict(resumed["loss/val"])[3] == pytest.approx(dict(whole["loss/val"])[3], rel=LOSS_RTOL)
    assert read_checkpoint(runs[run] / "checkpoints" / "last.ckpt")["global_step"] == STEPS


def test_the_single_file_option_gathers_a_checkpoint_that_resumes_sharded(runs):
    """``save_distributed_checkpoint: false`` (``one_to_two``): one ``.ckpt`` file with the whole state."""
    path = runs["one_to_two"] / "checkpoints" / "last.ckpt"
    assert path.is_file()
    checkpoint = read_checkpoint(path)
    assert checkpoint["state_dict"].keys() == weights(runs["two"] / "checkpoints" / "last.ckpt").keys()
    assert sum(len(state["state"]) for state in checkpoint["optimizer_states"]) == len(checkpoint["state_dict"])


def test_a_sharded_checkpoint_of_another_model_is_refused_before_loading(runs, tmp_path):
    """FSDP on one process, resuming ``two``'s folder with another model config: one error naming both."""
    args = ["--config", str(CONFIG)]
    for key, value in {
        **SCALED_DOWN,
        "trainer.devices": 1,
        "data.batch_size": 4,
        "trainer.default_root_dir": tmp_path,
        "data.cache_dir": runs["one"].parent / "cache",
        "model.overrides": "{code_bits: 4}",
    }.items():
        args += [f"--{key}", str(value)]
    result = subprocess.run(
        [sys.executable, "-m", "mf_lightning", "fit", *args, "--ckpt_path", str(step2(runs["two"]))],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2
    assert "holds another model: code_bits=" in result.stderr and "Traceback" not in result.stderr


def test_sharded_checkpoint_exports_loads_and_generates_on_one_process(runs, tmp_path, capsys):
    checkpoint = runs["two"] / "checkpoints" / "last.ckpt"
    main(["export", "--ckpt_path", str(checkpoint), "--out", str(tmp_path / "export")])
    assert "exported the model of" in capsys.readouterr().out
    exported = load_pretrained(tmp_path / "export").state_dict()
    saved = {key.removeprefix("model."): value for key, value in weights(checkpoint).items()}
    assert exported.keys() == saved.keys()
    assert all(torch.equal(exported[key], saved[key]) for key in saved)
    loaded = LanguageModel.load_from_checkpoint(checkpoint, map_location="cpu").network.state_dict()
    assert all(torch.equal(loaded[key], saved[key]) for key in saved)
    generate = ["--max_new_tokens", "8", "--temperature", "0", "Once upon a time"]
    main(["generate", "--config", str(runs["two"] / "tensorboard" / "config.yaml"), "--ckpt_path", "last", *generate])
    from_run = capsys.readouterr().out
    main(["generate", "--model_dir", str(tmp_path / "export"), *generate])
    assert capsys.readouterr().out == from_run != ""


def test_mf_eval_reads_a_sharded_checkpoint(runs, monkeypatch, capsys):
    pytest.importorskip("lm_eval", reason="needs the eval extra: pip install 'mf_lightning[eval]'")
    monkeypatch.chdir(REPO)
    config = runs["two"] / "tensorboard" / "config.yaml"
    main(
        [
            "eval",
            "--config",
            str(config),
            "--ckpt_path",
            "last",
            "--tasks",
            "mf_toy_perplexity",
            "--limit",
            "2",
            "--include_path",
            str(REPO / "tests" / "eval" / "tasks"),
            "--device",
            "cpu",
        ]
    )
    assert "| mf_toy_perplexity | bits_per_byte |" in capsys.readouterr().out
    assert (runs["two"] / "eval" / f"last-step{STEPS}.json").is_file()


def test_predict_on_two_ranks_generates_every_prompt_once(runs, tmp_path):
    """Three prompts over 2 FSDP ranks (one rank decodes two, the other one, each as long as it needs):
    greedy completions equal those of the checkpoint loaded in one process."""
    prompts = ["Once upon a time", "The memory layer", "A"]
    config = runs["two"] / "tensorboard" / "config.yaml"
    checkpoint = runs["two"] / "checkpoints" / "last.ckpt"
    mf(
        "predict",
        "--config",
        str(config),
        "--ckpt_path",
        str(checkpoint),
        "--trainer.default_root_dir",
        str(tmp_path),
        "--data.prompts",
        json.dumps(prompts),
        "--model.max_new_tokens",
        "8",
        "--model.temperature",
        "0",
    )
    written = [tmp_path / "predict" / f"predictions.rank{rank}.jsonl" for rank in (0, 1)]
    lines = [json.loads(line) for path in written for line in path.read_text().splitlines()]
    assert sorted(line["prompt"] for line in lines) == sorted(prompts)
    from mf_lightning.cli import read_config
    from mf_lightning.lit.loading import load_for_inference
    from mf_lightning.lit.run_folders import run_folders

    model, tokenizer = load_for_inference(run_folders(read_config([config]), config), "last")
    for line in lines:
        ids = torch.tensor([[tokenizer.eos_id, *tokenizer.encode(line["prompt"])]])
        completion = model.generate(ids, 8, temperature=0.0, eos_id=tokenizer.eos_id)[0, ids.shape[1] :].tolist()
        if tokenizer.eos_id in completion:
            completion = completion[: completion.index(tokenizer.eos_id)]
        assert line["completion"] == tokenizer.decode(completion), line


def test_validate_on_two_ranks_reads_a_sharded_checkpoint(runs, tmp_path):
    """``mf validate`` under FSDP from the step-4 folder gives the loss the run logged there (same ranks,
    same order of summation)."""
    config, checkpoint = runs["two"] / "tensorboard" / "config.yaml", runs["two"] / "checkpoints" / "last.ckpt"
    mf("validate", "--config", str(config), "--ckpt_path", str(checkpoint), "--trainer.default_root_dir", str(tmp_path))
    assert scalars(tmp_path / "validate")["loss/val"][0][1] == dict(scalars(runs["two"] / "tensorboard")["loss/val"])[3]
