"""The local tasks through lm-evaluation-harness: its numbers equal ones computed from the model's logits."""

import os
import socket

import datasets
import huggingface_hub.constants
import pytest
from eval_support import TASKS, bits_per_byte, direct_logprob, read_jsonl

pytest.importorskip("lm_eval", reason="needs the eval extra: pip install 'mf_lightning[eval]'")

from mf_lightning.eval import harness
from mf_lightning.eval.harness import evaluate


def test_local_tasks_give_the_accuracy_and_perplexity_of_the_logits(long_model, tokenizer, in_repo) -> None:
    model = long_model
    results = evaluate(model, tokenizer, ["mf_toy_choice", "mf_toy_perplexity"], batch_size=4, include_path=[TASKS])
    questions = read_jsonl(TASKS / "toy_choice.jsonl")
    correct = 0
    for question in questions:
        context = [tokenizer.eos_id, *tokenizer.encode(question["subject"] + " is")]
        scores = [
            direct_logprob(model, context + tokenizer.encode(" " + choice), len(context))[0]
            for choice in question["choices"]
        ]
        correct += scores.index(max(scores)) == question["answer"]
    assert results["results"]["mf_toy_choice"]["acc,none"] == pytest.approx(correct / len(questions))
    texts = [row["text"] for row in read_jsonl(TASKS / "toy_documents.jsonl")]
    logprob = sum(direct_logprob(model, [tokenizer.eos_id, *tokenizer.encode(text)], 1)[0] for text in texts)
    expected = bits_per_byte(logprob, "".join(texts))
    assert results["results"]["mf_toy_perplexity"]["bits_per_byte,none"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow  # indexes the whole lm-eval task library (about a minute)
def test_unknown_task_is_one_clear_error(model, tokenizer, in_repo) -> None:
    with pytest.raises(ValueError, match=r"unknown task\(s\) no_such_task: .* nor defined in .*tasks"):
        evaluate(model, tokenizer, ["mf_toy_choice", "no_such_task"], include_path=[TASKS])


def test_task_data_that_cannot_be_downloaded_is_one_clear_error(model, tokenizer, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "hub_task.yaml").write_text(
        "task: mf_hub_task\ndataset_path: nobody/no-such-dataset\noutput_type: multiple_choice\ntest_split: test\n"
        "doc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: answer\n"
    )
    with pytest.raises(FileNotFoundError, match="mf_hub_task could not be fetched .* run with network access first"):
        evaluate(model, tokenizer, ["mf_hub_task"], include_path=[tmp_path])


def test_include_path_must_be_a_folder(model, tokenizer, tmp_path) -> None:
    with pytest.raises(NotADirectoryError, match="--include_path .*missing is not a folder"):
        evaluate(model, tokenizer, ["mf_toy_choice"], include_path=[tmp_path / "missing"])


def offline_settings() -> tuple[bool, bool, str | None]:
    return huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")


@pytest.mark.parametrize("reachable", [False, True])
def test_an_unreachable_hub_runs_the_tasks_offline_at_once(reachable, model, tokenizer, monkeypatch) -> None:
    listening = socket.create_server(("127.0.0.1", 0))
    port = listening.getsockname()[1]
    if not reachable:
        listening.close()  # nothing listens there: the connection is refused
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    seen = []

    def fetching(*args, **kwargs):
        seen.append(offline_settings())
        raise ConnectionError("Couldn't reach 'nobody/no-such-dataset' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(harness, "simple_evaluate", fetching)
    try:
        with pytest.raises(FileNotFoundError, match="mf_toy_choice could not be fetched"):
            evaluate(model, tokenizer, ["mf_toy_choice"], include_path=[TASKS])
    finally:
        listening.close()
    assert seen == [(True, True, "1")] if not reachable else [(False, False, None)]
    assert offline_settings() == (False, False, None)  # restored
