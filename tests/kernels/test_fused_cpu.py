"""The fused CPU operator of decoding computes what the reference does, runs where it should, and is optional."""

import warnings

import pytest
import torch

from mf_lightning.kernels import fused_cpu, memory_layer, memory_layer_and_buckets
from mf_lightning.kernels.fused_cpu import MAX_TOKENS, fused_cpu_applies, fused_cpu_memory_layer
from mf_lightning.kernels.reference import reference_memory_layer
from mf_lightning.nn import MemoryLayer


@pytest.fixture(autouse=True)
def built() -> None:
    """Built and registered before a test calls the operator directly (the C++ compiler torch.compile needs
    on CPU builds it)."""
    assert fused_cpu.fused_cpu_available()


def layer_inputs(tokens, num_tables, code_bits, width, dtype, bias=True, scale=1.0):
    """Inputs with exact zeros and negative zeros (both hash to bit 1) and, with ``scale``, large magnitudes."""
    x = torch.randn(tokens, num_tables * code_bits) * scale
    x.view(-1)[::7] = 0.0
    x.view(-1)[3::11] = -0.0
    tables = torch.randn(num_tables, 2**code_bits, width) * 0.02
    b = torch.randn(width) * 0.01 if bias else None
    return [t.to(dtype) if t is not None else None for t in (x, tables, b)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("tokens", "num_tables", "code_bits", "width", "bias", "score", "temperature", "scale"),
    [
        (1, 16, 8, 96, True, "scaled", 1.0, 1.0),
        (3, 5, 3, 37, False, "paper", 0.3, 1.0),
        (MAX_TOKENS, 4, 10, 33, True, "scaled", 2.5, 1.0),
        (2, 13, 1, 8, True, "paper", 1.0, 1.0),
        (2, 6, 4, 16, True, "scaled", 0.05, 100.0),
    ],
)
def test_matches_the_reference(dtype, tokens, num_tables, code_bits, width, bias, score, temperature, scale):
    """Same buckets; outputs as close as the reference's own rounding allows (it rounds every product in
    bfloat16, the fused loop keeps the sum in float32): compared with the reference in float32."""
    x, tables, b = layer_inputs(tokens, num_tables, code_bits, width, dtype, bias, scale)
    y, buckets = fused_cpu_memory_layer(x, tables, b, code_bits, score, temperature)
    exact = [t.float() if t is not None else None for t in (x, tables, b)]
    expected, expected_buckets = reference_memory_layer(*exact, code_bits, score, temperature)
    assert y.dtype == dtype and y.shape == (tokens, width)
    torch.testing.assert_close(buckets, expected_buckets)
    if dtype == torch.float32:
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())
    else:
        torch.testing.assert_close(y.float(), expected, rtol=2**-7, atol=2**-7 * expected.abs().max().item())


def test_keeps_the_leading_shape_and_reads_non_contiguous_inputs():
    x, tables, b = layer_inputs(6, 4, 3, 10, torch.float32)
    x = x.view(2, 3, 12).transpose(0, 1)  # [3, 2, 12], not contiguous
    y, buckets = fused_cpu_memory_layer(x, tables, b, 3, "scaled", 1.0)
    expected, expected_buckets = reference_memory_layer(x, tables, b, 3, "scaled", 1.0)
    assert y.shape == (3, 2, 10) and buckets.shape == (3, 2, 4)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(buckets, expected_buckets)


@pytest.mark.parametrize(
    ("case", "applies"),
    [
        ("decoding step", True),
        ("gradients recorded", False),
        ("too many tokens", False),
        ("float64", False),
        ("float16", False),
        ("input dtype differs", False),
        ("bias dtype differs", False),
        ("meta device", False),
    ],
)
def test_applies_only_to_gradient_free_cpu_calls_of_few_tokens_in_one_supported_dtype(case, applies):
    x, tables, b = layer_inputs(1, 4, 3, 8, torch.float32)
    dtypes = {"float64": torch.float64, "float16": torch.float16}
    if case in dtypes:
        x, tables, b = (t.to(dtypes[case]) for t in (x, tables, b))
    if case == "too many tokens":
        x = x.expand(MAX_TOKENS + 1, -1)
    if case == "input dtype differs":
        x = x.bfloat16()
    if case == "bias dtype differs":
        b = b.bfloat16()
    if case == "meta device":
        x, tables, b = (t.to("meta") for t in (x, tables, b))
    with torch.set_grad_enabled(case == "gradients recorded"):
        assert fused_cpu_applies(x, tables, b) is applies


def operators_of(function) -> set[str]:
    with torch.profiler.profile() as profile:
        function()
    return {event.key for event in profile.key_averages()}


def test_a_decoding_step_of_a_memory_layer_is_one_fused_call_and_training_keeps_embedding_bag():
    layer = MemoryLayer(24, 40, code_bits=4, backend="embedding_bag")
    x = torch.randn(2, 1, 24)
    with torch.no_grad():
        decoding = operators_of(lambda: layer(x))
        expected = layer(x)
    assert "mf_lightning::memory_layer_inference" in decoding and "aten::embedding_bag" not in decoding
    training = operators_of(lambda: layer(x).sum().backward())
    assert "mf_lightning::memory_layer_inference" not in training and "aten::_embedding_bag" in training
    torch.testing.assert_close(layer(x).detach(), expected)


def test_the_reference_backend_never_runs_the_fused_operator():
    layer = MemoryLayer(24, 40, code_bits=4, backend="torch")
    with torch.no_grad():
        assert "mf_lightning::memory_layer_inference" not in operators_of(lambda: layer(torch.randn(1, 24)))


def test_without_a_compiler_the_layer_warns_once_and_computes_the_same(monkeypatch):
    x, tables, b = layer_inputs(2, 4, 3, 8, torch.float32)
    with torch.no_grad():
        fused = memory_layer_and_buckets(x, tables, b, "scaled", 1.0, "embedding_bag")

    def no_compiler(**kwargs):
        raise RuntimeError("Error building extension 'mf_lightning_fused_cpu': c++: command not found")

    monkeypatch.setattr("torch.utils.cpp_extension.load", no_compiler)
    fused_cpu.load_fused_cpu.cache_clear()
    try:
        with torch.no_grad(), pytest.warns(RuntimeWarning, match="could not be built .*command not found"):
            chain = memory_layer_and_buckets(x, tables, b, "scaled", 1.0, "embedding_bag")
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("error")
            again = memory_layer(x, tables, b, backend="embedding_bag")
            assert not fused_cpu_applies(x, tables, b)
    finally:
        monkeypatch.undo()
        fused_cpu.load_fused_cpu.cache_clear()
    with torch.no_grad():
        assert fused_cpu_applies(x, tables, b)  # built again for the tests that follow
    torch.testing.assert_close(chain, fused)
    torch.testing.assert_close(again, fused[0])
