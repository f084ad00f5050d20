"""The triton Memory Layer against the pure-torch reference: outputs, all gradients, both backward modes, ops, compile.

Without a GPU these run under triton's CPU interpreter (``TRITON_INTERPRET=1``, set by conftest) on tiny
shapes; the tests marked ``requires_cuda`` run the compiled kernels (``MF_TEST_CUDA=1`` on a GPU).
"""

from __future__ import annotations

import functools
import sys

import pytest
import torch
import triton

from mf_lightning.callbacks.usage_metrics import counts_with_gini, gini
from mf_lightning.kernels import dispatch, memory_layer, triton_memory
from mf_lightning.kernels.dispatch import triton_interpreted
from mf_lightning.kernels.hashing import bucket_indices, chunk_scores
from mf_lightning.kernels.reference import reference_memory_layer
from mf_lightning.kernels.triton_memory import triton_memory_layer
from mf_lightning.nn import MemoryLayer

DEVICE = "cpu" if triton_interpreted() else "cuda"
"""Where every test runs the kernels: interpreted on CPU, or compiled on the GPU under ``MF_TEST_CUDA=1``."""
requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or triton_interpreted(),
    reason="needs a CUDA GPU and compiled triton kernels (run with MF_TEST_CUDA=1)",
)


def make_inputs(
    leading: tuple[int, ...],
    in_features: int,
    out_features: int,
    code_bits: int,
    with_bias: bool = True,
    dtype: torch.dtype = torch.float32,
    device: str = DEVICE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Random input with exact zeros and negative zeros in it, tables and bias, all requiring grad."""
    x = torch.randn(*leading, in_features, device=device)
    flat = x.view(-1, in_features)
    flat[0, : code_bits + 1] = 0.0
    flat[-1, : code_bits + 1] = -0.0
    tables = 0.1 * torch.randn(in_features // code_bits, 2**code_bits, out_features, device=device)
    bias = 0.1 * torch.randn(out_features, device=device) if with_bias else None
    leaves = [t.to(dtype).requires_grad_() if t is not None else None for t in (x, tables, bias)]
    return leaves[0], leaves[1], leaves[2]


@pytest.fixture(params=dispatch.BACKWARD_MODES)
def backward_mode(request, monkeypatch) -> str:
    """Run the test under each table-gradient mode (``ModelConfig.triton_backward``): the test's calls of
    ``triton_memory_layer`` (this module's name for it) pass ``deterministic`` for the mode."""
    deterministic = request.param == "deterministic"
    bound = functools.partial(triton_memory_layer, deterministic=deterministic)
    monkeypatch.setattr(sys.modules[__name__], "triton_memory_layer", bound)
    return request.param


def run_with_grads(fn, x, tables, bias, code_bits, score, temperature, grad_y=None):
    """Output of ``fn`` and the gradients of x, tables (and bias) for the upstream gradient ``grad_y``."""
    y, _ = fn(x, tables, bias, code_bits, score, temperature)
    if grad_y is None:
        grad_y = torch.randn_like(y)
    leaves = [t for t in (x, tables, bias) if t is not None]
    return y, torch.autograd.grad(y, leaves, grad_y), grad_y


def float_leaves(*tensors):
    """Float32 copies of the tensors, as fresh leaves: the reference's inputs for a half-precision check."""
    return [None if t is None else t.detach().float().requires_grad_() for t in tensors]


def assert_matches_reference(x, tables, bias, code_bits, score, temperature, **tolerance):
    """Output and gradients of the triton layer equal the reference's (computed in float32 for fp16/bf16)."""
    y, grads, grad_y = run_with_grads(triton_memory_layer, x, tables, bias, code_bits, score, temperature)
    ref_inputs = float_leaves(x, tables, bias)
    y_ref, grads_ref, _ = run_with_grads(
        reference_memory_layer, *ref_inputs, code_bits, score, temperature, grad_y.float()
    )
    assert y.dtype == tables.dtype
    torch.testing.assert_close(y.float(), y_ref, **tolerance)
    for name, grad, grad_ref, leaf in zip(("x", "tables", "bias"), grads, grads_ref, (x, tables, bias)):
        assert grad.dtype == leaf.dtype, name
        torch.testing.assert_close(grad.float(), grad_ref, **tolerance, msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.parametrize("code_bits", [3, 4, 8])
@pytest.mark.parametrize("score", ["scaled", "paper"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_reference_on_odd_shapes(code_bits: int, score: str, with_bias: bool, backward_mode: str) -> None:
    x, tables, bias = make_inputs((3, 5), 24, 40, code_bits, with_bias)
    assert_matches_reference(x, tables, bias, code_bits, score, temperature=1.0)


@pytest.mark.parametrize("code_bits", [1, 16])
def test_extreme_code_bits_and_temperature(code_bits: int, backward_mode: str) -> None:
    x, tables, bias = make_inputs((6,), 2 * code_bits, 5, code_bits)
    assert_matches_reference(x, tables, bias, code_bits, "paper", temperature=0.5)
    assert_matches_reference(x, tables, bias, code_bits, "scaled", temperature=2.0)


def test_several_token_and_column_blocks_with_non_contiguous_input(backward_mode: str) -> None:
    """More tokens and columns than one program holds (masked edges), input read through strides."""
    x, tables, bias = make_inputs((2, 37), 8, 150, code_bits=2)
    wide = torch.zeros(2, 37, 16, device=DEVICE)
    wide[..., ::2] = x.detach()
    every_other = wide.requires_grad_()[..., ::2]
    assert every_other.reshape(-1, 8).stride() == (16, 2), "the kernel must read the strided view, not a copy"
    assert_matches_reference(every_other, tables, bias, 2, "scaled", temperature=1.0)


def test_saved_buckets_and_scores_match_hashing() -> None:
    """The forward hands the backward exactly the buckets and scores of the shared hashing code."""
    x, tables, _bias = make_inputs((9,), 24, 16, code_bits=4)
    _, buckets, scores = triton_memory.memory_layer_forward(x.detach(), tables.detach(), None, 4, "paper", 0.7)
    chunks = x.detach().view(9, 6, 4)
    assert buckets.dtype == torch.int32
    torch.testing.assert_close(buckets.long(), bucket_indices(chunks))
    torch.testing.assert_close(scores, chunk_scores(chunks, "paper", 0.7))
    assert buckets[0, 0] == buckets[-1, 0] == 2**4 - 1, "0.0 and -0.0 must hash to bit 1"


def test_table_gradient_is_dense_and_zero_on_rows_not_hit(backward_mode: str) -> None:
    """Hit rows get ``s * dy`` (non-zero: ``paper`` scores are positive even for an all-zero chunk)."""
    x, tables, bias = make_inputs((4,), 8, 6, code_bits=4)
    y, _ = triton_memory_layer(x, tables, bias, 4, "paper", 1.0)
    (grad_tables,) = torch.autograd.grad(y.sum(), tables)
    assert grad_tables.shape == tables.shape and grad_tables.is_contiguous() and not grad_tables.is_sparse
    hit = torch.zeros(tables.shape[:2], dtype=torch.bool, device=DEVICE)
    hit[torch.arange(2, device=DEVICE), bucket_indices(x.detach().view(4, 2, 4))] = True
    assert (grad_tables[~hit] == 0).all()
    assert (grad_tables[hit].abs().sum(-1) > 0).all()


def test_memory_layer_module_with_triton_backend_trains_like_torch_backend() -> None:
    layer = MemoryLayer(16, 12, code_bits=4, backend="triton", device=DEVICE)
    twin = MemoryLayer(16, 12, code_bits=4, backend="torch", device=DEVICE)
    twin.load_state_dict(layer.state_dict())
    x = torch.randn(2, 3, 16, device=DEVICE)
    for module in (layer, twin):
        module(x).square().mean().backward()
    torch.testing.assert_close(layer(x), twin(x))
    torch.testing.assert_close(layer.tables.grad, twin.tables.grad)
    torch.testing.assert_close(layer.bias.grad, twin.bias.grad)


def test_opcheck_forward_and_backward_ops() -> None:
    """All of opcheck's default checks (schema, autograd registration, fake tensor, AOT dispatch)."""
    x, tables, bias = make_inputs((7,), 24, 10, code_bits=8)
    torch.library.opcheck(torch.ops.mf_lightning.memory_layer_forward.default, (x, tables, bias, 8, "scaled", 1.0))
    detached = [t.detach() for t in (x, tables)]
    _, buckets, scores = triton_memory.memory_layer_forward(*detached, None, 8, "paper", 1.0)
    torch.library.opcheck(
        torch.ops.mf_lightning.memory_layer_backward.default,
        (torch.randn(7, 10, device=DEVICE), *detached, buckets, scores, 8, "paper", 1.0, True),
    )


def test_compiles_without_graph_breaks() -> None:
    """``fullgraph=True`` fails on any graph break; aot_eager traces forward and backward through the ops.

    Inductor also works on CPU but spends ~20 s compiling C++, so it is exercised by the CUDA test.
    """
    x, tables, bias = make_inputs((3, 5), 24, 40, code_bits=8)

    def loss(x, tables, bias):
        return triton_memory_layer(x, tables, bias, 8, "scaled", 1.0)[0].square().sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    value = compiled(x, tables, bias)
    grads = torch.autograd.grad(value, (x, tables, bias))
    value_ref = reference_memory_layer(x, tables, bias, 8, "scaled", 1.0)[0].square().sum()
    torch.testing.assert_close(value, value_ref)
    for grad, grad_ref in zip(grads, torch.autograd.grad(value_ref, (x, tables, bias))):
        torch.testing.assert_close(grad, grad_ref)


def test_rejects_bad_input_with_clear_errors() -> None:
    """The functional entry point checks once; the triton functions behind it trust their input."""
    x, tables, bias = make_inputs((2,), 8, 4, code_bits=4)
    with pytest.raises(TypeError, match="torch.float64"):
        memory_layer(x, tables.double(), bias, backend="triton")
    with pytest.raises(ValueError, match="width 8"):
        memory_layer(x[:, :6], tables, bias, backend="triton")
    with pytest.raises(ValueError, match=r"tables must have 2\*\*code_bits rows per table, got 12"):
        memory_layer(x, tables[:, :12], bias, backend="triton")
    with pytest.raises(ValueError, match="score must be one of"):
        memory_layer(x, tables, bias, score="softmax", backend="triton")
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        memory_layer(x, tables, bias[:3], backend="triton")


def test_unknown_backward_mode_is_a_clear_error() -> None:
    x, tables, bias = make_inputs((3,), 8, 4, code_bits=4)
    message = "triton_backward must be one of deterministic, atomic; got 'fast'"
    with pytest.raises(ValueError, match=message):
        memory_layer(x, tables, bias, backend="triton", triton_backward="fast")
    with pytest.raises(ValueError, match=message):
        MemoryLayer(8, 4, code_bits=4, backend="triton", triton_backward="fast")


@pytest.mark.parametrize(
    "mode, kernel", [("deterministic", "row_gradient_kernel"), ("atomic", "tuned_atomic_backward")]
)
def test_backward_mode_selects_its_kernel(mode: str, kernel: str, monkeypatch) -> None:
    """Deterministic (row pieces, no atomics) unless the layer's ``triton_backward`` is ``atomic``."""
    launched = []
    for name in ("row_gradient_kernel", "tuned_atomic_backward"):
        launcher = getattr(triton_memory, name)

        def spy(*args, _run=launcher.run, _name=name, **kwargs):
            launched.append(_name)
            return _run(*args, **kwargs)

        monkeypatch.setattr(launcher, "run", spy)
    x, tables, bias = make_inputs((5,), 8, 6, code_bits=4)
    triton_memory_layer(x, tables, bias, 4, "scaled", 1.0, deterministic=mode == "deterministic")[0].sum().backward()
    assert launched == [kernel]


def test_every_gather_candidate_gives_the_same_bits() -> None:
    """Whatever configuration autotuning picks, the forward is bitwise the same: each candidate is forced
    in turn (6 tables, so BLOCK_K 4 and 16 leave masked tables; 21 tokens, so every BLOCK_N a partial tile)."""
    x, tables, bias = make_inputs((21,), 6 * 4, 150, code_bits=4)
    _, buckets, scores = triton_memory.memory_layer_forward(x.detach(), tables.detach(), None, 4, "scaled", 1.0)
    candidates = [(triton_memory.INTERPRETED_GATHER, 1), *triton_memory.GATHER_TUNING]
    outputs = []
    for blocks, warps in candidates:
        y = torch.full((21, 150), float("nan"), device=DEVICE)
        triton_memory.gather(tables.detach(), bias.detach(), buckets, scores, y, kernel=triton_memory.gather_kernel,
                             num_warps=warps, **blocks)  # fmt: skip
        outputs.append(y)
    assert not outputs[0].isnan().any(), "every element must be written"
    for blocks, y in zip(candidates[1:], outputs[1:]):
        assert torch.equal(y.view(torch.int32), outputs[0].view(torch.int32)), f"{blocks} changed the bits"


def test_deterministic_backward_is_not_autotuned(monkeypatch) -> None:
    """The deterministic table gradient runs one configuration per shape: no autotuner runs in its backward,
    so its bits cannot depend on which configuration a timing picked."""
    x, tables, bias = make_inputs((5,), 8, 6, code_bits=4)
    y, _ = triton_memory_layer(x, tables, bias, 4, "scaled", 1.0)
    autotuned = []
    original = triton.runtime.autotuner.Autotuner.run

    def spy(self, *args, **kwargs):
        autotuned.append(self.base_fn.__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(triton.runtime.autotuner.Autotuner, "run", spy)
    y.sum().backward()
    assert autotuned == []


def skewed_inputs(num_tokens: int, code_bits: int, dtype: torch.dtype = torch.float32):
    """Input whose chunks share one sign pattern for 90% of tokens: most hits land on one row per table,
    the collapsed bucket usage seen in training, where atomics serialise."""
    x, tables, bias = make_inputs((num_tokens,), 4 * code_bits, 24, code_bits)
    with torch.no_grad():
        signs = torch.where(torch.arange(4 * code_bits, device=x.device) % 3 == 0, -1.0, 1.0)
        popular = signs * (0.5 + torch.rand(num_tokens, 1, device=x.device))
        x[: num_tokens * 9 // 10] = popular[: num_tokens * 9 // 10]
    return [None if t is None else t.detach().to(dtype).requires_grad_() for t in (x, tables, bias)]


def test_skewed_buckets_match_reference_in_both_modes(backward_mode: str) -> None:
    x, tables, bias = skewed_inputs(70, code_bits=3)
    buckets = triton_memory_layer(x, tables, bias, 3, "scaled", 1.0)[1]
    assert (buckets == buckets[0]).all(-1).sum() >= 63, "most tokens must share one row in every table"
    assert_matches_reference(x, tables, bias, 3, "scaled", 1.0)


MEASURED_GINI = 0.93
"""Gini coefficient of Q/K/V bucket usage measured in training (the ablation study)."""


def inputs_hashing_to(buckets: torch.Tensor, code_bits: int, out_features: int):
    """Input, tables and bias whose chunk ``[n, k]`` hashes to ``buckets[n, k]`` (random magnitudes)."""
    place_values = 2 ** torch.arange(code_bits - 1, -1, -1)
    bits = (buckets.unsqueeze(-1) & place_values) > 0
    magnitudes = 0.1 + torch.rand(*bits.shape)
    x = torch.where(bits, magnitudes, -magnitudes).flatten(-2).to(DEVICE)
    tables = 0.1 * torch.randn(buckets.shape[1], 2**code_bits, out_features, device=DEVICE)
    bias = 0.1 * torch.randn(out_features, device=DEVICE)
    return [t.requires_grad_() for t in (x, tables, bias)]


def hot_row_buckets(num_tokens: int, num_tables: int) -> torch.Tensor:
    """Every token in row 5 of every table: 100 % of the hits on one row per table."""
    return torch.full((num_tokens, num_tables), 5)


def measured_gini_buckets(num_tokens: int, num_tables: int, code_bits: int) -> torch.Tensor:
    """Per table, rows used with the measured Gini coefficient, rows and tokens in random order."""
    columns = []
    for _ in range(num_tables):
        counts = counts_with_gini(num_tokens, 2**code_bits, MEASURED_GINI)
        rows = torch.randperm(2**code_bits).repeat_interleave(counts)
        columns.append(rows[torch.randperm(num_tokens)])
    return torch.stack(columns, dim=1)


def assert_hot_row_matches_reference(num_tokens: int) -> None:
    """Every token on row 5 of both tables, against the reference, up to the rounding of a float32 sum of
    ``num_tokens`` terms taken in another order."""
    x, tables, bias = inputs_hashing_to(hot_row_buckets(num_tokens, 2), code_bits=3, out_features=10)
    assert (triton_memory_layer(x, tables, bias, 3, "scaled", 1.0)[1] == 5).all()
    rounding = num_tokens * torch.finfo(torch.float32).eps
    assert_matches_reference(x, tables, bias, 3, "scaled", 1.0, rtol=rounding, atol=rounding)


def test_one_hot_row_matches_reference_in_both_modes(backward_mode: str, monkeypatch) -> None:
    """100 % of the hits on one row per table: in the deterministic mode that row is cut into 4 pieces of
    16 hits whose partial sums are combined."""
    monkeypatch.setattr(triton_memory, "PIECE_HITS", 16)
    assert_hot_row_matches_reference(3 * 16 + 5)


def test_one_hot_row_longer_than_the_default_piece() -> None:
    assert_hot_row_matches_reference(triton_memory.PIECE_HITS + 5)


def test_measured_gini_distribution_matches_reference_in_both_modes(backward_mode: str, monkeypatch) -> None:
    """Bucket usage as collapsed in training (Gini 0.93): a few long rows cut into pieces, many short ones."""
    monkeypatch.setattr(triton_memory, "PIECE_HITS", 16)
    buckets = measured_gini_buckets(300, 3, code_bits=5)
    usage = torch.stack([torch.bincount(column, minlength=32) for column in buckets.T])
    assert (gini(usage) - MEASURED_GINI).abs().max() < 0.01
    assert usage.max() > 4 * 16, "the busiest rows must span several pieces"
    x, tables, bias = inputs_hashing_to(buckets, code_bits=5, out_features=12)
    assert torch.equal(triton_memory_layer(x, tables, bias, 5, "paper", 1.0)[1].cpu().long(), buckets)
    assert_matches_reference(x, tables, bias, 5, "paper", 1.0)


def test_row_pieces_bound_the_hits_per_program() -> None:
    """However the hits fall, no piece holds more than ``piece_hits`` of them, the pieces of each row tile its
    run of sorted hits in order, and the rows held by several pieces are listed with their slots."""
    buckets = torch.cat([hot_row_buckets(40, 2), measured_gini_buckets(40, 2, code_bits=3)]).int().to(DEVICE)
    sorted_hits, pieces, combines, max_slots = triton_memory.row_pieces(buckets, 8, piece_hits=8)
    rows = (buckets + torch.tensor([0, 8], device=DEVICE, dtype=torch.int32)).view(-1)
    assert torch.equal(rows[sorted_hits], rows.sort(stable=True).values)
    real = pieces[pieces[:, 0] >= 0].cpu()
    assert (real[:, 2] - real[:, 1]).max() <= 8 and (real[:, 2] > real[:, 1]).all()
    assert torch.equal(real[1:, 1], real[:-1, 2]), "pieces tile the sorted hits in order"
    assert real[0, 1] == 0 and real[-1, 2] == rows.numel()
    counts = torch.bincount(rows.cpu(), minlength=16)
    assert torch.equal(torch.bincount(real[:, 0], minlength=16), (counts + 7) // 8)
    split = combines[combines[:, 0] >= 0].cpu()
    assert torch.equal(split[:, 0], torch.nonzero(counts > 8).squeeze(1))
    assert torch.equal(split[:, 2], (counts[counts > 8] + 7) // 8)
    slots = real[real[:, 3] >= 0, 3]
    assert torch.equal(slots, torch.arange(len(slots))) and len(slots) <= max_slots


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_in_both_modes(dtype: torch.dtype, backward_mode: str) -> None:
    """fp16/bf16 inputs and tables, float32 accumulation (the interpreter runs both dtypes)."""
    x, tables, bias = skewed_inputs(21, code_bits=4, dtype=dtype)
    assert_matches_reference(x, tables, bias, 4, "scaled", 1.0, atol=2e-2, rtol=2e-2)


def test_bf16_input_with_float32_tables_as_under_autocast(backward_mode: str) -> None:
    """bf16-mixed training hands the layer bf16 activations and float32 tables."""
    x, tables, bias = make_inputs((3, 5), 16, 20, code_bits=4)
    x = x.detach().bfloat16().requires_grad_()
    assert_matches_reference(x, tables, bias, 4, "paper", 1.0, atol=1e-2, rtol=1e-2)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_parameters_on_gpu(dtype: torch.dtype, backward_mode: str) -> None:
    x, tables, bias = make_inputs((4, 33), 64, 72, code_bits=8, dtype=dtype, device="cuda")
    assert_matches_reference(x, tables, bias, 8, "scaled", 1.0, atol=2e-2, rtol=2e-2)


@requires_cuda
@pytest.mark.parametrize("score", ["scaled", "paper"])
@pytest.mark.parametrize("code_bits", [8, 10])
def test_large_shapes_on_gpu(score: str, code_bits: int, backward_mode: str) -> None:
    x, tables, bias = make_inputs((4, 1024), 100 * code_bits, 1000, code_bits=code_bits, device="cuda")
    assert_matches_reference(x, tables, bias, code_bits, score, 1.0, atol=1e-4, rtol=1e-4)


@requires_cuda
def test_deterministic_backward_is_bitwise_repeatable_on_skewed_buckets_on_gpu() -> None:
    """Thousands of hits on one row per table: the sorted backward gives identical bits every run."""
    x, tables, bias = (t.detach().cuda().requires_grad_() for t in skewed_inputs(8192, code_bits=8))
    grad_y = torch.randn(8192, 24, device="cuda")
    runs = [
        torch.autograd.grad(triton_memory_layer(x, tables, bias, 8, "scaled", 1.0)[0], (x, tables), grad_y)
        for _ in range(3)
    ]
    for grads in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads, runs[0]))
    assert_matches_reference(x, tables, bias, 8, "scaled", 1.0, atol=1e-4, rtol=1e-4)


@requires_cuda
def test_inductor_compile_on_gpu(backward_mode: str) -> None:
    layer = MemoryLayer(512, 384, backend="triton", triton_backward=backward_mode, device="cuda")
    x = torch.randn(8, 64, 512, device="cuda", requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)
    compiled(x).square().mean().backward()
    grads = [x.grad.clone(), layer.tables.grad.clone()]
    x.grad = layer.tables.grad = None
    layer.backend = "torch"
    layer(x).square().mean().backward()
    torch.testing.assert_close(grads[0], x.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grads[1], layer.tables.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device besides the CPU")
def test_device_mismatch_is_rejected() -> None:
    x, tables, bias = make_inputs((2,), 8, 4, code_bits=4, device="cpu")
    with pytest.raises(ValueError, match="tables are on cpu"):
        memory_layer(x.cuda(), tables, bias, backend="triton")
