"""``mf eval`` end to end: from a run (JSON beside it, scalars in its TensorBoard) and from an exported folder."""

import json
import random
import sys
from pathlib import Path

import pytest
import torch
from cli_support import run, scalars, tiny_run_args, write_corpus
from eval_support import TASKS, read_jsonl

from mf_lightning.cli import main
from mf_lightning.config import ModelConfig
from mf_lightning.data.tokenizers import ByteTokenizer, save_tokenizer
from mf_lightning.eval.report import task_tag
from mf_lightning.lit.run_folders import EVAL
from mf_lightning.models import build_model
from mf_lightning.models.base import DecoderLM

pytest.importorskip("lm_eval", reason="needs the eval extra: pip install 'mf_lightning[eval]'")

LOCAL = ["--include_path", str(TASKS), "--device", "cpu"]


def fact_stream(tokenizer: ByteTokenizer, count: int) -> torch.Tensor:
    """The toy task's right answers as text, "<subject> is <colour>. ", ``count`` facts in random order."""
    facts = [f"{row['subject']} is {row['choices'][row['answer']]}. " for row in read_jsonl(TASKS / "toy_choice.jsonl")]
    rng = random.Random(0)
    return torch.tensor([token for _ in range(count) for token in tokenizer.encode(rng.choice(facts))])


def train_on_facts(model: DecoderLM, tokenizer: ByteTokenizer, steps: int) -> DecoderLM:
    """A few AdamW steps on random 32-token windows of the facts (seconds on a CPU)."""
    data = fact_stream(tokenizer, 3000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 33, (16,), generator=generator)
        _, loss = model(
            torch.stack([data[s : s + 32] for s in starts]), torch.stack([data[s + 1 : s + 33] for s in starts])
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def save_model_folder(model: DecoderLM, folder: Path) -> Path:
    """The folder mf export writes: model files and the tokenizer."""
    model.save_pretrained(folder)
    save_tokenizer(ByteTokenizer(), folder)
    return folder


def small_model() -> DecoderLM:
    torch.manual_seed(0)
    return build_model(ModelConfig.from_preset("debug", arch="memoryformer", max_seq_len=64))


@pytest.mark.slow
def test_a_trained_model_scores_above_chance_from_its_folder(tmp_path, in_repo, capsys) -> None:
    untrained = save_model_folder(small_model(), tmp_path / "untrained")
    trained = save_model_folder(train_on_facts(small_model(), ByteTokenizer(), 100), tmp_path / "trained")
    accuracy = {}
    for name, folder in (("untrained", untrained), ("trained", trained)):
        output = tmp_path / f"{name}.json"
        main(["eval", "--model_dir", str(folder), "--tasks", "mf_toy_choice", "--output_path", str(output), *LOCAL])
        assert "| mf_toy_choice | acc |" in capsys.readouterr().out
        accuracy[name] = json.loads(output.read_text())["results"]["mf_toy_choice"]["acc,none"]
    assert accuracy["trained"] >= 0.75 > accuracy["untrained"]  # chance: 0.25 (4 choices); 6 of 8 right


@pytest.mark.slow
def test_mf_eval_of_a_run_logs_to_its_tensorboard_and_matches_its_export(tmp_path, in_repo, capsys) -> None:
    root = tmp_path / "run"
    run("fit", tiny_run_args(root, write_corpus(tmp_path / "corpus"), max_steps=3))
    config = root / "tensorboard" / "config.yaml"
    tasks = ["--tasks", "mf_toy_choice,mf_toy_perplexity"]
    training_events = sorted((root / "tensorboard").glob("events.*"))
    main(["eval", "--config", str(config), "--ckpt_path", "last", *tasks, "--limit", "4", *LOCAL])
    assert sorted((root / "tensorboard").glob("events.*")) == training_events  # beside the training, not in it
    out = capsys.readouterr().out
    assert "| mf_toy_perplexity | bits_per_byte |" in out and "| **average** (1 tasks) | acc |" in out
    from_run = json.loads((root / "eval" / "last-step3.json").read_text())["results"]
    logged = scalars(root / EVAL)
    assert logged[task_tag("mf_toy_choice", "acc")] == [(3, pytest.approx(from_run["mf_toy_choice"]["acc,none"]))]
    assert logged[task_tag("mf_toy_perplexity", "bits_per_byte")][0][1] == pytest.approx(
        from_run["mf_toy_perplexity"]["bits_per_byte,none"]
    )
    main(["export", "--ckpt_path", str(root / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "exported")])
    output = tmp_path / "exported.json"
    main(
        [
            "eval",
            "--model_dir",
            str(tmp_path / "exported"),
            *tasks,
            "--limit",
            "4",
            "--output_path",
            str(output),
            *LOCAL,
        ]
    )
    assert json.loads(output.read_text())["results"] == from_run


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model_dir", "m", "--config", "c.yaml"], "give either --model_dir, or --config with --ckpt_path, not both"),
        ([], "give --model_dir DIR, or --config RUN_CONFIG"),
        (["--model_dir", "m", "--tasks", " , "], "--tasks needs at least one task name"),
        (["--model_dir", "m", "--limit", "0"], "--limit must be > 0"),
        (["--model_dir", "m", "--batch_size", "0"], "--batch_size must be >= 1, got 0"),
        (["--model_dir", "m", "--num_fewshot", "-1"], "--num_fewshot must be >= 0, got -1"),
        (["--model_dir", "m", "--device", "gpu0"], "--device 'gpu0' is not a torch device"),
        (["--compare", "missing.json"], "results file missing.json does not exist"),
        (["--model_dir", "m", "--output_path", "m/eval/x.json"], "--output_path m/eval/x.json is inside --model_dir m"),
    ],
)
def test_bad_arguments_are_one_usage_error(args, message, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_the_results_of_a_model_folder_go_beside_the_working_directory_not_into_it(tmp_path, in_repo, capsys):
    folder = save_model_folder(small_model(), tmp_path / f"model-{tmp_path.name}")
    before = {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}
    results = in_repo / "eval" / f"{folder.name}.json"
    try:
        main(["eval", "--model_dir", str(folder), "--tasks", "mf_toy_choice", "--limit", "2", *LOCAL])
        assert f"results: {Path('eval') / results.name}" in capsys.readouterr().out
        assert "mf_toy_choice" in json.loads(results.read_text())["results"]
    finally:
        results.unlink(missing_ok=True)
        if results.parent.is_dir() and not any(results.parent.iterdir()):
            results.parent.rmdir()
    assert {path.name: path.stat().st_mtime_ns for path in folder.iterdir()} == before


def test_missing_model_folder_is_one_error_line(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["eval", "--model_dir", str(tmp_path / "nothing"), *LOCAL])
    assert capsys.readouterr().err.startswith("mf: error: ")


def test_without_lm_eval_mf_eval_names_the_extra(tmp_path, monkeypatch, capsys) -> None:
    for name in [name for name in sys.modules if name == "lm_eval" or name.startswith("lm_eval.")] + ["lm_eval"]:
        monkeypatch.setitem(sys.modules, name, None)  # what `import lm_eval...` sees when it is not installed
    for name in [
        name for name in sys.modules if name.startswith("mf_lightning.eval.") and name != "mf_lightning.eval.cli"
    ]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr().err
        == "mf: error: mf eval needs lm-eval, the optional extra: pip install 'mf_lightning[eval]'\n"
    )


def test_a_run_that_logs_elsewhere_gets_its_scores_as_json_only(tmp_path, capsys) -> None:
    """The run's logs follow its logger: a CSV-logged run gets no TensorBoard folder made for it."""
    from mf_lightning.eval.cli import save_run_results
    from mf_lightning.lit.run_folders import RunFolders

    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir()
    torch.save({"global_step": 7}, checkpoint)
    folders = RunFolders(tmp_path, checkpoint.parent, tmp_path / "lightning_logs" / "version_0", "CSVLogger")
    save_run_results({"results": {}}, [], checkpoint, folders, None)
    out = capsys.readouterr().out
    assert f"results: {tmp_path / 'eval' / 'last-step7.json'}" in out
    assert "not logged to TensorBoard: the run logs with CSVLogger, not TensorBoardLogger" in out
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoints", "eval"]
