"""Pythia in, not only out: a GPT-NeoX folder written by transformers (a Pythia checkpoint; here a random one made
in the test, no download) initialises the baseline (``--model.init_from``) and is scored and continued by
``mf eval`` / ``mf generate --model_dir``; a folder of another architecture, vocabulary or shape is one error."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import torch
from cli_support import run, tiny_run_args, write_corpus

from mf_lightning.cli import main as mf_main
from mf_lightning.data.tokenizers import ByteTokenizer, save_tokenizer
from mf_lightning.lit.loading import load_for_inference
from mf_lightning.lit.module import LanguageModel
from mf_lightning.models.architectures import Transformer
from mf_lightning.models.gpt_neox import from_gpt_neox_state

transformers = pytest.importorskip("transformers")
PADDED_VOCAB = 264
"""Larger than the byte tokenizer's 257 ids, as Pythia pads the GPT-NeoX tokenizer's 50277 to 50304."""


def gpt_neox_folder(folder: Path, **overrides: object) -> transformers.GPTNeoXForCausalLM:
    """A random Pythia-shaped GPT-NeoX model the size of the ``debug`` preset, saved by transformers with a tokenizer."""
    values = {
        "vocab_size": PADDED_VOCAB,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 256,
        "rotary_pct": 0.25,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
        "eos_token_id": 256,
        "bos_token_id": 256,
    }
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**{**values, **overrides}))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
        model.get_output_embeddings().weight.mul_(40)
    model.eval().save_pretrained(folder)
    save_tokenizer(ByteTokenizer(), folder)
    return model


def test_mf_loads_a_transformers_gpt_neox_folder_with_its_logits_and_greedy_output(tmp_path: Path) -> None:
    theirs = gpt_neox_folder(tmp_path)
    model, tokenizer = load_for_inference(model_dir=tmp_path)
    assert isinstance(model, Transformer) and isinstance(tokenizer, ByteTokenizer)
    assert model.config.vocab_size == PADDED_VOCAB
    tokens = torch.randint(0, 257, (2, 30))
    with torch.no_grad():
        expected, got = theirs(tokens).logits, model(tokens)[0]
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5
    prompt = "memory "
    ids = torch.tensor([tokenizer.encode(prompt)])
    continuation = theirs.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=256, pad_token_id=256)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        mf_main(["generate", prompt, "--model_dir", str(tmp_path), "--temperature", "0", "--max_new_tokens", "10"])
    assert stdout.getvalue().rstrip("\n").endswith(tokenizer.decode(continuation[0, ids.shape[1] :].tolist()))


def test_init_from_starts_the_baseline_from_the_folder_weights(tmp_path: Path) -> None:
    theirs = gpt_neox_folder(tmp_path)
    module = LanguageModel(arch="transformer", preset="debug", vocab_size=257, init_from=str(tmp_path))
    module.configure_model()
    assert module.config.vocab_size == PADDED_VOCAB
    expected = from_gpt_neox_state(theirs.state_dict(), module.config, tmp_path)
    state = module.network.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[key], expected[key]) for key in state)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_hidden_layers": 3}, r"holds another model than the run's: n_layer=3 in the folder, 2 in the run"),
        ({"vocab_size": 200}, r"vocab_size=200 in the folder, 257 in the run"),
        ({"use_parallel_residual": False}, r"has use_parallel_residual=False; the baseline computes Pythia's"),
        ({"model_type": "llama"}, r"describes a 'llama' model, not GPT-NeoX"),
    ],
)
def test_a_folder_of_another_architecture_vocabulary_or_shape_is_one_error_line(
    change: dict, message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "pythia"
    gpt_neox_folder(folder, **{k: v for k, v in change.items() if k != "model_type"})
    if "model_type" in change:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **change}))
    corpus = write_corpus(tmp_path / "corpus")
    args = tiny_run_args(tmp_path / "run", corpus, **{"model.arch": "transformer", "model.init_from": folder})
    with pytest.raises(SystemExit) as exit_info:
        run("fit", args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("mf: error:")]
    assert re.search(message, line), line
