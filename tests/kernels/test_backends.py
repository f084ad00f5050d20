"""Reference gradients are exact (gradcheck) and the embedding_bag backend agrees with the reference."""

import pytest
import torch

from mf_lightning.kernels import bucket_indices, memory_layer, memory_layer_and_buckets
from mf_lightning.kernels.dispatch import triton_interpreted
from mf_lightning.kernels.reference import reference_memory_layer


def make_inputs(shape, code_bits, out_features, dtype=torch.float32, bias=True):
    in_features = (shape[-1] // code_bits) * code_bits
    x = torch.randn(*shape[:-1], in_features, dtype=dtype)
    x.view(-1)[::7] = 0.0
    x.view(-1)[3::11] = -0.0
    tables = torch.randn(in_features // code_bits, 2**code_bits, out_features, dtype=dtype) * 0.02
    b = torch.randn(out_features, dtype=dtype) * 0.01 if bias else None
    return [t.requires_grad_() if t is not None else None for t in (x, tables, b)]


@pytest.mark.parametrize("score", ["scaled", "paper"])
def test_reference_gradcheck(score):
    x, tables, bias = make_inputs((2, 3, 6), 3, 5, dtype=torch.float64)
    with torch.no_grad():
        x.copy_(torch.where(x.abs() < 1e-3, 0.5, x))
    torch.autograd.gradcheck(lambda *a: reference_memory_layer(*a, 3, score, 0.7)[0], (x, tables, bias))


@pytest.mark.parametrize("code_bits", [3, 4, 8])
@pytest.mark.parametrize("score", ["scaled", "paper"])
@pytest.mark.parametrize("bias", [True, False])
def test_embedding_bag_matches_reference(code_bits, score, bias):
    shape = (3, 5, 24)
    out_grad = torch.randn(3, 5, 40)
    results = []
    for backend in ("torch", "embedding_bag"):
        torch.manual_seed(1)
        x, tables, b = make_inputs(shape, code_bits, 40, bias=bias)
        y = memory_layer(x, tables, b, score=score, temperature=1.3, backend=backend)
        y.backward(out_grad)
        results.append((y, x.grad, tables.grad, None if b is None else b.grad))
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected)


def test_table_gradient_is_dense_and_only_hit_rows_are_nonzero():
    x, tables, bias = make_inputs((4, 8), 4, 6)
    memory_layer(x, tables, bias, backend="embedding_bag").sum().backward()
    assert tables.grad.layout == torch.strided and tables.grad.is_contiguous()
    assert tables.grad.shape == tables.shape
    hit = torch.zeros(2, 16, dtype=torch.bool)
    bits = (x.detach().reshape(4, 2, 4) >= 0).long() @ torch.tensor([8, 4, 2, 1])
    hit[torch.arange(2), bits] = True
    assert torch.equal(tables.grad.abs().sum(-1) > 0, hit)


@pytest.mark.parametrize("backend", ["torch", "embedding_bag", "triton"])
def test_every_backend_returns_the_buckets_it_hashed(backend):
    x, tables, bias = make_inputs((2, 3, 24), 4, 8)
    if not triton_interpreted():  # MF_TEST_CUDA=1: every backend on the GPU
        x, tables, bias = (t.detach().cuda() for t in (x, tables, bias))
    y, buckets = memory_layer_and_buckets(x, tables, bias, "scaled", 1.0, backend)
    torch.testing.assert_close(y, memory_layer(x, tables, bias, backend="torch"))
    assert torch.equal(buckets.long(), bucket_indices(x.detach().reshape(2, 3, 6, 4)))


def test_embedding_bag_trains_after_an_inference_mode_call_of_the_same_shape():
    """Its cached bag starts, first made under ``inference_mode`` (validation, decoding), are saved for the
    backward of a later training step of the same shape: they must be normal tensors."""
    x, tables, bias = make_inputs((5, 16), 4, 6)
    with torch.inference_mode():
        memory_layer(x, tables, bias, backend="embedding_bag")
    memory_layer(x, tables, bias, backend="embedding_bag").sum().backward()
    assert tables.grad is not None and x.grad is not None


@pytest.mark.parametrize(
    ("backend", "in_features", "out_features", "grad", "gather_call"),
    [
        ("embedding_bag", 64, 256, False, None),
        ("embedding_bag", 128, 2048, False, "memory_layer_inference"),
        ("embedding_bag", 128, 2048, True, "embedding_bag"),
        ("torch", 128, 2048, False, None),
    ],
)
def test_compiled_cpu_layer_calls_one_gather_kernel_where_a_token_gathers_many_values(
    backend, in_features, out_features, grad, gather_call
):
    """Narrow layers and the reference backend leave the gather to inductor's loop; a wide layer calls the fused
    operator in a decoding step (no gradient) and ``embedding_bag`` where gradients are recorded."""
    graphs = []

    def keep_graph(graph: torch.fx.GraphModule, inputs: list) -> object:
        graphs.append(graph)
        return graph.forward

    x, tables, bias = make_inputs((2, 3, in_features), 8, out_features)
    layer = torch.compile(lambda *a: memory_layer(*a, backend=backend), backend=keep_graph, fullgraph=True)
    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(layer(x, tables, bias), memory_layer(x, tables, bias, backend="torch"))
    calls = {str(getattr(node.target, "__name__", "")).split(".")[0] for node in graphs[0].graph.nodes}
    gathers = calls & {"embedding_bag", "memory_layer_inference"}
    assert gathers == ({gather_call} if gather_call else set())
