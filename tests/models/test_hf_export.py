"""``mf export`` folders load in Hugging Face tools: transformers (the baseline natively as GPT-NeoX, MemoryFormer
through its modeling file), AutoTokenizer for every tokenizer we train, and lm-eval's own ``hf`` model type."""

from __future__ import annotations

import ast
import contextlib
import io
import math
from pathlib import Path

import pytest
import torch

from mf_lightning.cli import main as mf_main
from mf_lightning.config import ModelConfig
from mf_lightning.data.tokenizers import ByteTokenizer, save_tokenizer, train_bpe
from mf_lightning.lit.loading import load_for_inference
from mf_lightning.models.architectures import build_model
from mf_lightning.models.hf_export import MODELING_SOURCE, save_hf_folder

transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[2]
RELATIVE_ERROR = 1e-5
TEXT = "the cat sat on the mat. the dog sat on the log. " * 20


def exported(arch: str, folder: Path, tokenizer=None) -> torch.nn.Module:
    """A random model with peaked logits (no near-ties for greedy decoding to break), exported into ``folder``."""
    tokenizer = tokenizer or ByteTokenizer()
    torch.manual_seed(0)
    config = ModelConfig.from_preset("debug", arch=arch, vocab_size=tokenizer.vocab_size, n_layer=2)
    model = build_model(config).eval()
    with torch.no_grad():
        model.head.weight.mul_(40)
    save_hf_folder(model, folder, tokenizer.eos_id, tokenizer.eos_id)
    save_tokenizer(tokenizer, folder)
    return model


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("arch", ["transformer", "memoryformer"])
def test_transformers_loads_the_export_with_our_logits(arch: str, tmp_path: Path) -> None:
    ours = exported(arch, tmp_path)
    remote = arch == "memoryformer"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=remote).float().eval()
    expected_class = "MemoryFormerForCausalLM" if remote else "GPTNeoXForCausalLM"
    assert type(theirs).__name__ == expected_class
    if not remote:
        assert isinstance(theirs, transformers.GPTNeoXForCausalLM)
    tokens = torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert relative_error(theirs(tokens).logits, ours(tokens)[0]) < RELATIVE_ERROR
    # mf reads its own export back, digests checked
    again, tokenizer = load_for_inference(model_dir=tmp_path)
    assert isinstance(tokenizer, ByteTokenizer)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))


@pytest.mark.parametrize("arch", ["transformer", "memoryformer"])
def test_hf_greedy_generate_equals_mf_generate_at_temperature_0(arch: str, tmp_path: Path) -> None:
    exported(arch, tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).float().eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    prompt = "the cat "
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    hf_text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        mf_main(["generate", prompt, "--model_dir", str(tmp_path), "--temperature", "0", "--max_new_tokens", "12"])
    assert hf_text and stdout.getvalue().rstrip("\n").endswith(hf_text)


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_auto_tokenizer_loads_every_tokenizer_we_train(kind: str, tmp_path: Path) -> None:
    ours = ByteTokenizer() if kind == "byte" else train_bpe([TEXT], 270)
    save_tokenizer(ours, tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "the cät sat, naïvely 😀\n"
    assert theirs(text, add_special_tokens=False).input_ids == ours.encode(text)
    assert theirs.decode(ours.encode(text)) == text
    assert theirs.eos_token_id == ours.eos_id


def test_the_modeling_file_imports_only_torch_and_transformers() -> None:
    tree = ast.parse(MODELING_SOURCE.read_text())
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {
        node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 0
    }
    assert imported <= {"__future__", "typing", "torch", "transformers"}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["transformer", "memoryformer"])
def test_lm_eval_hf_model_type_scores_the_export_as_mf_eval_does(
    arch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm_eval = pytest.importorskip("lm_eval.evaluator")
    from lm_eval.tasks import TaskManager

    from mf_lightning.eval.harness import evaluate

    exported(arch, tmp_path / "model")
    monkeypatch.chdir(REPO)  # the task files name their data relative to the repository root
    tasks = ["mf_toy_choice", "mf_toy_perplexity"]
    theirs = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={tmp_path / 'model'},trust_remote_code=True,dtype=float32",
        tasks=tasks,
        task_manager=TaskManager(include_path=str(REPO / "tests" / "eval" / "tasks")),
        batch_size=1,
        device="cpu",
    )["results"]
    model, tokenizer = load_for_inference(model_dir=tmp_path / "model")
    ours = evaluate(model, tokenizer, tasks, include_path=[REPO / "tests" / "eval" / "tasks"])["results"]
    assert theirs["mf_toy_choice"]["acc,none"] == ours["mf_toy_choice"]["acc,none"]
    for metric in ("word_perplexity,none", "byte_perplexity,none"):
        assert math.isclose(theirs["mf_toy_perplexity"][metric], ours["mf_toy_perplexity"][metric], rel_tol=1e-4)
