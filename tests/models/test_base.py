"""The shared model interface on both architectures: shapes, loss, causality, FLOPs, compile."""

import math

import pytest
import torch

from mf_lightning.config import PRESETS, ModelConfig
from mf_lightning.models import MemoryFormer, Transformer, build_model
from mf_lightning.nn.memory_layer import MemoryLayer

ARCHS = ["memoryformer", "transformer"]


def debug_model(arch: str, **overrides: object) -> torch.nn.Module:
    return build_model(ModelConfig.from_preset("debug", arch=arch, **overrides))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_has_the_right_shapes_on_meta(preset: str, arch: str) -> None:
    config = ModelConfig.from_preset(preset, arch=arch)
    with torch.device("meta"):
        model = build_model(config)
        idx = torch.zeros(2, 8, dtype=torch.long)
        logits, loss = model(idx, idx)
    assert logits is None and loss.shape == ()
    assert model(idx)[0].shape == (2, 8, config.vocab_size)
    assert len(model.blocks) == config.n_layer


def test_tiny_memoryformer_table_count_matches_spec() -> None:
    with torch.device("meta"):
        model = build_model(ModelConfig.from_preset("tiny"))
    tables = sum(m.tables.numel() for m in model.modules() if isinstance(m, MemoryLayer))
    assert math.isclose(tables, 415e6, rel_tol=0.01)


def test_build_model_picks_the_class_by_arch() -> None:
    assert type(debug_model("memoryformer")) is MemoryFormer
    assert type(debug_model("transformer")) is Transformer
    with pytest.raises(ValueError, match="MemoryFormer needs a config with arch='memoryformer', got arch='transf"):
        MemoryFormer(ModelConfig.from_preset("debug", arch="transformer"))


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_backward_on_debug_preset(arch: str) -> None:
    model = debug_model(arch)
    idx = torch.randint(0, 257, (2, 16))
    logits, loss = model(idx, idx.roll(-1, dims=1))
    assert logits is None, "the default chunked loss never forms the logits"
    assert abs(loss.item() - math.log(257)) < 0.5
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.embed.weight.grad.abs().sum() > 0 and model.head.weight.grad.abs().sum() > 0
    assert model(idx)[1] is None


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_ignores_minus_100(arch: str) -> None:
    model = debug_model(arch)
    idx = torch.randint(0, 257, (1, 10))
    targets = idx.clone()
    targets[:, 5:] = -100
    _, loss = model(idx, targets)
    expected = torch.nn.functional.cross_entropy(model(idx)[0][0, :5], idx[0, :5])
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_changing_a_future_token_never_changes_earlier_logits(arch: str) -> None:
    model = debug_model(arch).eval()
    idx = torch.randint(0, 257, (1, 12))
    changed = idx.clone()
    changed[0, 7] = (idx[0, 7] + 1) % 257
    before, after = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(before[:, :7], after[:, :7], rtol=0, atol=0)
    assert not torch.allclose(before[:, 7:], after[:, 7:])


def test_sequence_longer_than_max_seq_len_is_a_clear_error() -> None:
    model = debug_model("memoryformer", max_seq_len=8)
    with pytest.raises(ValueError, match="sequence of 9 tokens is longer than max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize(
    ("idx", "targets", "error", "message"),
    [
        (torch.zeros(1, 4), None, TypeError, r"idx must be an int64 or int32 tensor of token ids, got a torch.float32"),
        (torch.zeros(4, dtype=torch.long), None, ValueError, r"idx must have shape \[batch, seq_len\]"),
        (torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long), ValueError, "targets must have"),
    ],
)
def test_bad_inputs_are_clear_errors(idx: torch.Tensor, targets: torch.Tensor, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        debug_model("transformer")(idx, targets)


def test_tied_embeddings_share_the_head() -> None:
    untied, tied = debug_model("memoryformer"), debug_model("memoryformer", tie_embeddings=True)
    assert tied.head is None
    assert untied.num_parameters() - tied.num_parameters() == 257 * 64
    _, loss = tied(torch.randint(0, 257, (1, 5)), torch.randint(0, 257, (1, 5)))
    loss.backward()
    assert tied.embed.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_dropout_acts_in_training_only(arch: str) -> None:
    model, idx = debug_model(arch, dropout=0.5), torch.randint(0, 257, (1, 8))
    assert not torch.equal(model(idx)[0], model(idx)[0])
    model.eval()
    torch.testing.assert_close(model(idx)[0], model(idx)[0], rtol=0, atol=0)


def test_num_parameters_excluding_embeddings() -> None:
    model = debug_model("transformer")
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    assert model.num_parameters() - model.num_parameters(exclude_embeddings=True) == 257 * 64


@pytest.mark.parametrize("preset", ["tiny", "small", "base"])
def test_baseline_flops_agree_with_six_n(preset: str) -> None:
    with torch.device("meta"):
        model = build_model(ModelConfig.from_preset(preset, arch="transformer"))
    six_n = 6 * model.num_parameters(exclude_embeddings=True)
    assert math.isclose(model.flops_per_token(seq_len=64), six_n, rel_tol=0.10)


@pytest.mark.parametrize("arch", ARCHS)
def test_flops_formula(arch: str) -> None:
    model = debug_model(arch)
    config = model.config
    forward = model.flops_per_token(128, training=False)
    assert model.flops_per_token(128) == 3 * forward
    expected_block = 12 * 64 * 64 if arch == "transformer" else config.num_tables * (4 * 64 + config.ffn_hidden)
    assert forward == 2 * (2 * (expected_block + 2 * 128 * 64) + 64 * 257)
    with pytest.raises(ValueError, match="seq_len must be a positive integer, got 0"):
        model.flops_per_token(0)


def test_memoryformer_needs_fewer_flops_than_baseline() -> None:
    for preset in ("tiny", "small", "base"):
        with torch.device("meta"):
            memory, dense = (build_model(ModelConfig.from_preset(preset, arch=arch)) for arch in ARCHS)
        assert memory.flops_per_token(2048) < dense.flops_per_token(2048)


@pytest.mark.slow
def test_torch_compile_runs_on_cpu() -> None:
    model = debug_model("memoryformer", n_layer=1)
    compiled = torch.compile(model)
    idx = torch.randint(0, 257, (1, 8))
    _, loss = compiled(idx, idx)
    loss.backward()
    torch.testing.assert_close(loss, model(idx, idx)[1], rtol=1e-4, atol=1e-4)


def test_config_backend_and_score_reach_every_memory_layer() -> None:
    reference = debug_model("memoryformer", backend="torch", score="paper")
    fast = debug_model("memoryformer", backend="embedding_bag", score="paper")
    layers = [m for m in reference.modules() if isinstance(m, MemoryLayer)]
    assert len(layers) == 6 and all(m.backend == "torch" and m.score == "paper" for m in layers)
    fast.load_state_dict(reference.state_dict())
    idx = torch.randint(0, 257, (2, 7))
    torch.testing.assert_close(fast(idx)[0], reference(idx)[0])
