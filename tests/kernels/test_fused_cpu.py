"""The fused CPU operators of decoding compute what the reference and SDPA do, run where they should, and are
optional."""

import logging
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F

from mf_lightning.kernels import fused_cpu, memory_layer, memory_layer_and_buckets
from mf_lightning.kernels.fused_cpu import MAX_TOKENS, fused_cpu_applies, fused_cpu_memory_layer
from mf_lightning.kernels.reference import reference_memory_layer
from mf_lightning.nn import MemoryLayer
from mf_lightning.nn.attention import CausalSelfAttention, KVCache, rotary_cos_sin


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("slots", "head_size", "position"), [(13, 8, 0), (13, 8, 6), (13, 8, 12), (40, 64, 21)])
def test_attention_matches_sdpa_over_the_filled_slots_of_a_static_cache(dtype, slots, head_size, position):
    """Slots after ``position`` hold garbage here (a cache keeps zeros there): they must not count."""
    q, keys, values = (torch.randn(2, 3, length, head_size) for length in (1, slots, slots))
    mask = (torch.arange(slots) <= position)[None]
    expected = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    q, keys, values = (t.to(dtype) for t in (q, keys, values))
    y = fused_cpu.fused_cpu_attention(
        q.transpose(1, 2).contiguous().transpose(1, 2), keys, values, torch.tensor([position])
    )
    assert y.dtype == dtype and y.shape == (2, 3, 1, head_size)
    tolerance = 1e-5 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(y.float(), expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())


@pytest.mark.parametrize(
    ("case", "applies"),
    [
        ("decoding step", True),
        ("gradients recorded", False),
        ("two queries", False),
        ("dropout", False),
        ("float64", False),
        ("cache dtype differs", False),
    ],
)
def test_attention_applies_only_to_one_gradient_free_query_without_dropout(case, applies):
    q, keys = torch.randn(1, 2, 2 if case == "two queries" else 1, 8), torch.randn(1, 2, 5, 8)
    if case == "float64":
        q, keys = q.double(), keys.double()
    if case == "cache dtype differs":
        keys = keys.bfloat16()
    with torch.set_grad_enabled(case == "gradients recorded"):
        assert fused_cpu.fused_attention_applies(q, keys, 0.1 if case == "dropout" else 0.0) is applies


def test_a_decoding_step_attends_through_the_fused_operator_as_sdpa_would_and_the_prompt_through_sdpa():
    attention = CausalSelfAttention(n_head=2)
    prompt_qkv, step_qkv = torch.randn(1, 4, 3 * 16), torch.randn(1, 1, 3 * 16)
    cos, sin = rotary_cos_sin(torch.arange(5), 8, 10000.0)

    def step(grad: bool) -> tuple[torch.Tensor, set[str], set[str]]:
        cache = KVCache(6)
        with torch.no_grad():
            prompt = operators_of(lambda: attention(prompt_qkv, cos[:4], sin[:4], cache))
        static = cache.static(torch.tensor([4]))
        with torch.set_grad_enabled(grad):
            outputs = []
            calls = operators_of(lambda: outputs.append(attention(step_qkv, cos[4:], sin[4:], static)))
        return outputs[0].detach(), prompt, calls

    fused, prompt, calls = step(grad=False)
    through_sdpa, _, sdpa_calls = step(grad=True)
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in prompt
    assert "mf_lightning::attention_inference" in calls and not any("scaled_dot_product" in name for name in calls)
    assert "mf_lightning::attention_inference" not in sdpa_calls
    torch.testing.assert_close(fused, through_sdpa)


def test_loading_the_built_operator_says_nothing(caplog):
    fused_cpu.load_fused_cpu.cache_clear()
    with caplog.at_level(logging.INFO, logger=fused_cpu.__name__):
        assert fused_cpu.load_fused_cpu()
    assert not [record for record in caplog.records if "fused CPU Memory Layer" in record.getMessage()]


def test_a_build_is_told(monkeypatch):
    told = threading.Event()
    messages = []

    class Told(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())
            told.set()

    def building(**kwargs):
        assert told.wait(timeout=60)  # a build lasts until it has been told

    handler = Told()
    fused_cpu.log.addHandler(handler)
    monkeypatch.setattr(fused_cpu.log, "level", logging.INFO)
    monkeypatch.setattr("torch.utils.cpp_extension.load", building)
    monkeypatch.setattr(fused_cpu, "BUILD_NOTICE_SECONDS", 0.01)
    fused_cpu.load_fused_cpu.cache_clear()
    try:
        assert fused_cpu.load_fused_cpu()
    finally:
        fused_cpu.log.removeHandler(handler)
        monkeypatch.undo()
        fused_cpu.load_fused_cpu.cache_clear()
    (message,) = messages
    assert message.startswith("building the fused CPU Memory Layer mf_lightning_fused_cpu_")
    assert fused_cpu.fused_cpu_available()  # the real operator again, for the tests that follow


def test_a_build_lock_left_by_a_killed_builder_does_not_block_the_next_load(tmp_path):
    """torch's builder waits forever on the ``lock`` file of a builder killed mid-build; ours removes it, holding
    the one builder lock of the folder (whose holder, were it alive, would be waited for)."""
    (tmp_path / fused_cpu.TORCH_BATON).touch()
    with fused_cpu.builder_lock(tmp_path, "mf_lightning_fused_cpu_test"):
        assert not (tmp_path / fused_cpu.TORCH_BATON).exists()
        assert (tmp_path / fused_cpu.BUILDER_LOCK).exists()
    assert not (tmp_path / fused_cpu.BUILDER_LOCK).exists()
