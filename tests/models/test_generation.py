"""Generation: KV cache against recomputation, the compiled step against the eager one, sampling filters, EOS
handling, argument checks."""

import math
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

from mf_lightning.config import ModelConfig
from mf_lightning.models import build_model, decode_step
from mf_lightning.models.decode_step import StaticDecoder
from mf_lightning.models.generation import sample, stream, top_p_filter

ARCHS = ["memoryformer", "transformer"]


def debug_model(arch: str = "memoryformer") -> torch.nn.Module:
    return build_model(ModelConfig.from_preset("debug", arch=arch))


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_with_cache_equals_without(arch: str) -> None:
    model, prompt = debug_model(arch), torch.randint(0, 257, (2, 5))
    cached = model.generate(prompt, 12, temperature=0)
    recomputed = model.generate(prompt, 12, temperature=0, use_cache=False)
    assert cached.shape == (2, 17)
    torch.testing.assert_close(cached, recomputed, rtol=0, atol=0)
    torch.testing.assert_close(cached[:, :5], prompt)


def test_greedy_follows_the_argmax_of_forward() -> None:
    model, prompt = debug_model().eval(), torch.randint(0, 257, (1, 4))
    tokens = model.generate(prompt, 3, temperature=0)
    for step in range(3):
        logits = model(tokens[:, : 4 + step])[0]
        assert tokens[0, 4 + step] == logits[0, -1].argmax()


@pytest.mark.parametrize("arch", ARCHS)
def test_sampling_is_reproducible_with_a_generator(arch: str) -> None:
    model, prompt = debug_model(arch), torch.randint(0, 257, (2, 3))

    def run(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return model.generate(prompt, 10, temperature=1.5, top_k=50, top_p=0.9, generator=generator)

    torch.testing.assert_close(run(1), run(1), rtol=0, atol=0)
    assert not torch.equal(run(1), run(2))


def test_top_k_one_is_greedy() -> None:
    model, prompt = debug_model(), torch.randint(0, 257, (2, 3))
    sampled = model.generate(prompt, 6, temperature=2.0, top_k=1, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sampled, model.generate(prompt, 6, temperature=0), rtol=0, atol=0)


def test_top_k_samples_only_the_k_most_likely() -> None:
    logits = torch.randn(4, 50)
    allowed = logits.topk(5, dim=-1).indices
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        token = sample(logits, temperature=1.0, top_k=5, generator=generator)
        assert (allowed == token[:, None]).any(dim=-1).all()


def test_top_p_keeps_the_smallest_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.05, 0.3, 0.15]]))
    kept = torch.isfinite(top_p_filter(logits, 0.8))
    torch.testing.assert_close(kept, torch.tensor([[True, False, True, False]]))
    assert torch.isfinite(top_p_filter(logits, 0.81)).sum() == 3
    assert torch.isfinite(top_p_filter(logits, 0.01)).sum() == 1


def test_generation_stops_and_pads_after_eos() -> None:
    model = debug_model()
    prompt = torch.randint(0, 257, (2, 4))
    free = model.generate(prompt, 6, temperature=0)
    assert free[0, 4] != free[1, 4], "rows must differ for this test to mean something"
    eos = int(free[0, 4])
    stopped = model.generate(prompt, 6, temperature=0, eos_id=eos)
    assert (stopped[0, 4:] == eos).all()
    first_eos = (free[1, 4:] == eos).nonzero()
    end = 4 + (int(first_eos[0]) + 1 if len(first_eos) else 6)
    torch.testing.assert_close(stopped[1, :end], free[1, :end])
    assert stopped.shape[1] == end
    single = model.generate(prompt[:1], 6, temperature=0, eos_id=eos)
    assert single.shape == (1, 5)


def test_generate_restores_training_mode_and_keeps_no_grad() -> None:
    model = debug_model().train()
    tokens = model.generate(torch.zeros(1, 2, dtype=torch.long), 2)
    assert model.training and not tokens.requires_grad
    assert model.generate(torch.zeros(1, 2, dtype=torch.long), 0).shape == (1, 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens": -1}, "max_new_tokens must be a non-negative integer, got -1"),
        ({"max_new_tokens": 300}, "prompt of 3 tokens \\+ max_new_tokens=300 exceeds max_seq_len=256"),
        ({"temperature": -0.5}, "temperature must be a finite number >= 0"),
        ({"temperature": math.nan}, "temperature must be a finite number >= 0"),
        ({"top_k": 0}, "top_k must be None or a positive integer, got 0"),
        ({"top_p": 0.0}, r"top_p must be None or a number in \(0, 1\], got 0.0"),
        ({"top_p": 1.2}, r"top_p must be None or a number in \(0, 1\], got 1.2"),
        ({"eos_id": 257}, r"eos_id must be None or a token id in \[0, 257\), got 257"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs: dict, message: str) -> None:
    arguments = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        debug_model().generate(torch.zeros(1, 3, dtype=torch.long), **arguments)


def test_out_of_vocabulary_prompt_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"idx holds token ids outside \[0, 257\): min 0, max 300"):
        debug_model().generate(torch.tensor([[0, 300]]), 2)


@pytest.mark.parametrize("arch", ARCHS)
def test_stream_yields_the_tokens_generate_appends(arch: str) -> None:
    model, prompt = debug_model(arch), torch.randint(0, 257, (2, 3))
    streamed = list(stream(model, prompt, 7, temperature=0))
    assert len(streamed) == 7 and all(token.shape == (2,) for token in streamed)
    torch.testing.assert_close(torch.stack(streamed, dim=1), model.generate(prompt, 7, temperature=0)[:, 3:])


def test_stream_checks_its_arguments_before_the_first_token() -> None:
    with pytest.raises(ValueError, match="max_new_tokens must be a non-negative integer"):
        stream(debug_model(), torch.zeros(1, 2, dtype=torch.long), -1)


def decode_logits(model: torch.nn.Module, prompt: torch.Tensor, tokens: torch.Tensor, compile: bool) -> torch.Tensor:
    """Logits ``[B, steps + 1, vocab]``: after the prompt, then after each of ``tokens [B, steps]`` fed in turn."""
    decoder = StaticDecoder(model, prompt.shape[1] + tokens.shape[1] + 1, compile)
    with torch.no_grad():
        logits = [decoder.prefill(prompt)] + [decoder.step(token) for token in tokens.unbind(1)]
    return torch.stack(logits, dim=1)


@pytest.mark.parametrize("arch", ARCHS)
def test_compiled_step_equals_the_eager_step_and_the_full_forward(arch: str) -> None:
    model, prompt = debug_model(arch).eval(), torch.randint(0, 257, (2, 5))
    tokens = torch.randint(0, 257, (2, 9))
    compiled = decode_logits(model, prompt, tokens, compile=True)
    eager = decode_logits(model, prompt, tokens, compile=False)
    full = model(torch.cat([prompt, tokens], dim=1))[0][:, 4:]
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(compiled, full, rtol=1e-4, atol=1e-4)
    greedy = model.generate(prompt, 12, temperature=0)
    torch.testing.assert_close(greedy, model.generate(prompt, 12, temperature=0, compile=False), rtol=0, atol=0)


def test_the_step_is_compiled_once_per_block_type_and_reused_across_calls_and_lengths() -> None:
    torch.compiler.reset()
    counters.clear()
    model = build_model(ModelConfig.from_preset("debug", n_layer=3, n_embd=48))
    model.generate(torch.randint(0, 257, (1, 5)), 6, temperature=0)
    assert counters["frames"]["ok"] == 1, "one compiled graph serves all three blocks"
    model.generate(torch.randint(0, 257, (1, 9)), 20, temperature=0.8, top_k=5)
    stream_ = stream(model, torch.randint(0, 257, (1, 2)), 3)
    assert len(list(stream_)) == 3
    assert counters["frames"]["ok"] == 1, "other prompt and cache lengths reuse the graph"


@pytest.mark.parametrize("arch", ARCHS)
def test_one_call_per_token_runs_every_block_through_one_compiled_region(arch: str, monkeypatch) -> None:
    graphs = []

    def keep_graph(graph: torch.fx.GraphModule, inputs: list) -> object:
        graphs.append(graph)
        return graph.forward

    torch.compiler.reset()
    monkeypatch.setattr(decode_step, "compiled_decode_step", torch.compile(decode_step.decode_step, backend=keep_graph))
    model = build_model(ModelConfig.from_preset("debug", arch=arch, n_layer=3))
    model.generate(torch.randint(0, 257, (1, 4)), 5, temperature=0)
    [graph] = graphs
    regions = [node for node in graph.graph.nodes if node.target is torch.ops.higher_order.invoke_subgraph]
    assert len(regions) == 3, "the step's graph calls the block region once per block"
    assert len({node.args[0].target for node in regions}) == 1, "all blocks share one compiled region"
    assert sum(isinstance(module, torch.fx.GraphModule) for module in graph.children()) == 1


def test_a_shape_beyond_the_recompile_limit_decodes_eagerly_without_a_warning(monkeypatch) -> None:
    torch.compiler.reset()
    monkeypatch.setattr(decode_step, "compile_failure", None)
    prompt, steps = torch.randint(0, 257, (1, 4)), torch.randint(0, 257, (1, 6))
    other = build_model(ModelConfig.from_preset("debug", arch="transformer", n_embd=32)).eval()
    with torch._dynamo.config.patch(recompile_limit=1), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        debug_model().generate(prompt, 4, temperature=0)
        compiled = decode_logits(other, prompt, steps, compile=True)
    assert decode_step.compile_failure is None
    torch.testing.assert_close(compiled, decode_logits(other, prompt, steps, compile=False), rtol=0, atol=0)


def test_a_failing_compiler_falls_back_to_eager_with_one_warning(monkeypatch) -> None:
    def no_compiler(*args: object) -> torch.Tensor:
        raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found\nmore detail")

    monkeypatch.setattr(decode_step, "compiled_decode_step", no_compiler)
    monkeypatch.setattr(decode_step, "compile_failure", None)
    model, prompt = debug_model(), torch.randint(0, 257, (1, 4))
    message = "compiling the decoding step failed .*no working C\\+\\+ compiler found"
    with pytest.warns(RuntimeWarning, match=message) as caught:
        tokens = model.generate(prompt, 5, temperature=0)
        again = model.generate(prompt, 5, temperature=0)
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    eager = model.generate(prompt, 5, temperature=0, compile=False)
    torch.testing.assert_close(tokens, eager, rtol=0, atol=0)
    torch.testing.assert_close(again, eager, rtol=0, atol=0)


def test_static_decoder_refuses_steps_beyond_its_cache() -> None:
    decoder = StaticDecoder(debug_model().eval(), 4, compile=False)
    with pytest.raises(RuntimeError, match="call prefill with the prompt before the first step"):
        decoder.step(torch.zeros(1, dtype=torch.long))
    with torch.no_grad():
        decoder.prefill(torch.zeros(1, 3, dtype=torch.long))
        decoder.step(torch.zeros(1, dtype=torch.long))
        with pytest.raises(ValueError, match="the KV cache holds 4 positions, all filled"):
            decoder.step(torch.zeros(1, dtype=torch.long))
