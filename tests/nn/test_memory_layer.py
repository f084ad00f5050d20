"""MemoryLayer: public interface (SPEC §4), argument checks, backend choice, dtypes."""

import pytest
import torch

from mf_lightning.config import ModelConfig
from mf_lightning.kernels import resolve_backend
from mf_lightning.models.architectures import build_model
from mf_lightning.nn import MemoryLayer


def test_interface_matches_spec():
    layer = MemoryLayer(in_features=512, out_features=512, code_bits=8, bias=True, score="scaled")
    assert layer.tables.shape == (64, 256, 512)
    assert layer.num_tables == 64
    assert isinstance(layer.tables, torch.nn.Parameter)
    assert layer.tables.std().item() == pytest.approx(0.02, rel=0.01)
    assert layer(torch.randn(2, 512)).shape == (2, 512)


@pytest.mark.parametrize("shape", [(24,), (7, 24), (2, 3, 4, 24)])
def test_any_leading_shape(shape):
    layer = MemoryLayer(24, 10, code_bits=4)
    x = torch.randn(shape)
    y = layer(x)
    assert y.shape == (*shape[:-1], 10)
    torch.testing.assert_close(y.reshape(-1, 10), layer(x.reshape(-1, 24)))


def test_non_contiguous_input():
    layer = MemoryLayer(16, 8, code_bits=4)
    x = torch.randn(16, 5).t()
    torch.testing.assert_close(layer(x), layer(x.contiguous()))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"in_features": 30, "code_bits": 8}, "in_features=30 is not divisible by code_bits=8"),
        ({"code_bits": 0}, "code_bits must be an integer in 1..16, got 0"),
        ({"code_bits": 17}, "got 17"),
        ({"in_features": 0}, "in_features must be a positive integer, got 0"),
        ({"out_features": -3}, "out_features must be a positive integer, got -3"),
        ({"score": "softmax"}, "score must be one of .* got 'softmax'"),
        ({"temperature": 0.0}, "temperature must be a positive finite number, got 0.0"),
        ({"backend": "cuda"}, "unknown Memory Layer backend 'cuda'; valid: auto, torch, embedding_bag, triton"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, message):
    args = {"in_features": 32, "out_features": 8, **kwargs}
    with pytest.raises(ValueError, match=message):
        MemoryLayer(**args)


def test_wrong_input_width_and_dtype():
    layer = MemoryLayer(32, 8)
    with pytest.raises(ValueError, match=r"inputs of width 32 \(4 tables x 8 bits\), got shape \(2, 31\)"):
        layer(torch.randn(2, 31))
    with pytest.raises(TypeError, match="floating-point tensor, got dtype torch.int64"):
        layer(torch.ones(2, 32, dtype=torch.long))


def test_kernel_settings_are_config_fields_not_environment(monkeypatch):
    """The backend, the triton backward mode and the kernel check come from the model config and reach every
    Memory Layer; the environment variables that once set them change nothing."""
    monkeypatch.setenv("MF_KERNEL_BACKEND", "torch")
    monkeypatch.setenv("MF_TRITON_BACKWARD", "atomic")
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "embedding_bag"
    default = build_model(ModelConfig.from_preset("debug"))
    assert {(m.backend, m.triton_backward, m.kernel_check) for m in memory_layers(default)} == {
        ("auto", "deterministic", "warn")
    }
    config = ModelConfig.from_preset("debug", backend="torch", triton_backward="atomic", kernel_check="fatal")
    chosen = build_model(ModelConfig.from_dict(config.to_dict()))
    assert {(m.backend, m.triton_backward, m.kernel_check) for m in memory_layers(chosen)} == {
        ("torch", "atomic", "fatal")
    }
    for name, valid in (("triton_backward", "deterministic, atomic"), ("kernel_check", "warn, fatal, off")):
        with pytest.raises(ValueError, match=f"{name} must be one of {valid}; got 'fast'"):
            ModelConfig.from_preset("debug", **{name: "fast"})
        with pytest.raises(ValueError, match=f"{name} must be one of {valid}; got 'fast'"):
            MemoryLayer(16, 8, code_bits=4, **{name: "fast"})


def memory_layers(model: torch.nn.Module) -> list[MemoryLayer]:
    layers = [module for module in model.modules() if isinstance(module, MemoryLayer)]
    assert layers
    return layers


def test_unavailable_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    layer = MemoryLayer(16, 8, code_bits=4, backend="triton")
    with pytest.raises(RuntimeError, match="backend 'triton' was requested .* need CUDA"):
        layer(torch.randn(3, 16))


@pytest.mark.parametrize("backend", ["torch", "embedding_bag"])
def test_bf16_autocast_on_cpu(backend):
    layer = MemoryLayer(32, 16, code_bits=8, backend=backend)
    x = torch.randn(4, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
    torch.testing.assert_close(y.float(), layer(x).float(), atol=2e-2, rtol=2e-2)
    assert layer.tables.grad.dtype == torch.float32
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", ["torch", "embedding_bag"])
def test_bf16_parameters(backend):
    layer = MemoryLayer(32, 16, code_bits=8, backend=backend, dtype=torch.bfloat16)
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    reference = MemoryLayer(32, 16, code_bits=8, backend="torch")
    reference.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    torch.testing.assert_close(y.float(), reference(x.float()), atol=1e-2, rtol=2e-2)


def test_bucket_indices_match_hash():
    layer = MemoryLayer(8, 4, code_bits=4)
    x = torch.tensor([[1.0, -1.0, 1.0, 1.0, -1.0, -1.0, -1.0, 0.0]])
    assert layer.bucket_indices(x).tolist() == [[0b1011, 0b0001]]


def reveal_buckets(layer: MemoryLayer) -> None:
    """Sets tables and bias so that output ``t`` is ``score_t * (bucket_t + 1)`` and output ``T + t`` is ``score_t``."""
    tables = layer.num_tables
    assert layer.out_features >= 2 * tables
    with torch.no_grad():
        layer.tables.zero_()
        layer.bias.zero_()
        for table in range(tables):
            layer.tables[table, :, table] = torch.arange(1, layer.tables.shape[1] + 1, dtype=layer.tables.dtype)
            layer.tables[table, :, tables + table] = 1.0


def buckets_used(layer: MemoryLayer, output: torch.Tensor) -> torch.Tensor:
    """The bucket of each table the forward read, recovered from the output of a ``reveal_buckets`` layer."""
    tables = layer.num_tables
    return (output[..., :tables] / output[..., tables : 2 * tables]).round().long() - 1


@pytest.mark.parametrize("backend", ["torch", "embedding_bag", "triton"])
def test_bucket_observers_see_the_forward_hash_and_change_nothing(backend):
    layer = MemoryLayer(24, 12, code_bits=4, backend=backend)
    reveal_buckets(layer)
    x = torch.randn(3, 5, 24, requires_grad=True)
    expected = layer(x)
    seen = []
    handle = layer.observe_buckets(seen.append)
    observed = layer(x)
    torch.testing.assert_close(observed, expected, rtol=0, atol=0)
    assert len(seen) == 1 and torch.equal(seen[0], buckets_used(layer, observed.detach()))
    observed.sum().backward()
    assert x.grad is not None and layer.tables.grad is not None
    handle.remove()
    layer(x)
    assert len(seen) == 1 and not layer.bucket_observers


@pytest.mark.parametrize("backend", ["torch", "embedding_bag", "triton"])
def test_observers_cost_no_second_hash(backend, monkeypatch):
    """The layer hands observers the buckets its backend returned; it never hashes the input itself."""
    layer = MemoryLayer(16, 6, code_bits=4, backend=backend)
    x = torch.randn(5, 16)
    seen = []
    layer.observe_buckets(seen.append)

    def second_hash(*args):
        raise AssertionError("the layer hashed the input a second time")

    monkeypatch.setattr("mf_lightning.nn.memory_layer.bucket_indices", second_hash)
    layer(x)
    assert seen[0].dtype == torch.int64 and seen[0].shape == (5, 4)
