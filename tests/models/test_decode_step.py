"""One process decoding several models: every model's steps run through the compiled step, none falls back to eager.

Decoding a model, then another of other widths, once made dynamo turn the widths into symbols (automatic
dynamic shapes), which torch could not stamp out for the next block (``InternalTorchDynamoError: KeyError``):
the second model and every later one decoded eagerly, after one warning.
"""

import warnings
from collections.abc import Callable

import pytest
import torch
from torch._dynamo.utils import counters

from mf_lightning.config import ModelConfig
from mf_lightning.models import build_model, decode_step
from mf_lightning.models.decode_step import StaticDecoder

SHAPES = [  # both architectures, three depths, three widths and two head counts
    {"arch": "memoryformer", "n_layer": 2, "n_embd": 64, "n_head": 2},
    {"arch": "transformer", "n_layer": 3, "n_embd": 64, "n_head": 4},
    {"arch": "memoryformer", "n_layer": 4, "n_embd": 96, "n_head": 2},
]


def models() -> list[torch.nn.Module]:
    """The models of ``SHAPES``, then the first one again: decoded again after the others."""
    torch.manual_seed(0)
    built = [build_model(ModelConfig.from_preset("debug", **shape)).eval() for shape in SHAPES]
    return [*built, built[0]]


def decode_logits(model: torch.nn.Module, prompt: torch.Tensor, tokens: torch.Tensor, compile: bool) -> torch.Tensor:
    """Logits ``[B, steps + 1, vocab]``: after the prompt, then after each of ``tokens [B, steps]`` fed in turn."""
    decoder = StaticDecoder(model, prompt.shape[1] + tokens.shape[1] + 1, compile)
    with torch.no_grad():
        logits = [decoder.prefill(prompt)] + [decoder.step(token) for token in tokens.unbind(1)]
    return torch.stack(logits, dim=1)


def counting_backend(runs: list[int]) -> Callable[..., object]:
    """A dynamo backend running the traced graph as it is and counting its calls in ``runs[0]``: steps that dynamo
    ran eagerly instead (a failed compile, the recompile limit) are not counted."""

    def backend(graph: torch.fx.GraphModule, inputs: list) -> Callable[..., object]:
        def run(*args: object) -> object:
            runs[0] += 1
            return graph.forward(*args)

        return run

    return backend


@pytest.fixture
def fresh_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    """No graph, automatic-dynamic record or compile failure left by earlier tests."""
    torch.compiler.reset()
    counters.clear()
    monkeypatch.setattr(decode_step, "compile_failure", None)


def test_every_step_of_every_model_runs_the_compiled_graph(fresh_compiler, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = [0]
    monkeypatch.setattr(
        decode_step, "compiled_decode_step", decode_step.compile_decode_step(backend=counting_backend(runs))
    )
    prompt, tokens = torch.randint(0, 257, (1, 4)), torch.randint(0, 257, (1, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the warning of a compile that fell back to eager
        for model in models():
            before = runs[0]
            compiled = decode_logits(model, prompt, tokens, compile=True)
            assert runs[0] - before == tokens.shape[1], f"{model.config.arch} of {model.config.n_layer} layers"
            torch.testing.assert_close(compiled, decode_logits(model, prompt, tokens, compile=False))
    assert decode_step.compile_failure is None


@pytest.mark.slow
def test_models_of_both_architectures_and_three_depths_compile_with_inductor_in_one_process(fresh_compiler) -> None:
    prompt = torch.randint(0, 257, (1, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for model in models():
            compiled = model.generate(prompt, 6, temperature=0)
            assert decode_step.compile_failure is None
            torch.testing.assert_close(compiled, model.generate(prompt, 6, temperature=0, compile=False))
    assert counters["frames"]["ok"] == len(SHAPES), "one graph per model shape; the first model's graph is reused"
