"""The chunked LM head + cross-entropy equals the plain path in loss and gradients, in every mode it runs in."""

import pytest
import torch
import torch.nn.functional as F

from mf_lightning.config import ModelConfig
from mf_lightning.models import build_model
from mf_lightning.nn.chunked_loss import chunked_cross_entropy

TOKENS, WIDTH, VOCAB = 37, 16, 101


def inputs(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(TOKENS, WIDTH, generator=generator, dtype=dtype, requires_grad=True)
    weight = torch.randn(VOCAB, WIDTH, generator=generator, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, VOCAB, (TOKENS,), generator=generator)
    targets[::5] = -100
    return hidden, weight, targets


def loss_and_grads(loss_fn, hidden, weight, targets):
    loss = loss_fn(hidden, weight, targets)
    grad_hidden, grad_weight = torch.autograd.grad(2.5 * loss, (hidden, weight))
    return loss, grad_hidden, grad_weight


def plain(hidden, weight, targets):
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=-100)


def assert_all_close(actual, expected, rtol: float) -> None:
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype
        torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * e.abs().max().item())


@pytest.mark.parametrize("chunk_size", [1, 8, TOKENS, 1000])
def test_loss_and_gradients_equal_the_plain_path(chunk_size: int) -> None:
    hidden, weight, targets = inputs()
    chunked = loss_and_grads(lambda h, w, t: chunked_cross_entropy(h, w, t, chunk_size), hidden, weight, targets)
    assert_all_close(chunked, loss_and_grads(plain, hidden, weight, targets), rtol=1e-5)


def test_without_grad_only_the_loss_is_computed() -> None:
    hidden, weight, targets = inputs()
    with torch.no_grad():
        loss = chunked_cross_entropy(hidden, weight, targets, 8)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, plain(hidden, weight, targets).detach(), rtol=1e-5, atol=0)


def test_autocast_matches_the_plain_path_and_accumulates_in_float32() -> None:
    hidden, weight, targets = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked = loss_and_grads(lambda h, w, t: chunked_cross_entropy(h, w, t, 8), hidden, weight, targets)
        expected = loss_and_grads(plain, hidden, weight, targets)
    assert chunked[0].dtype == torch.float32 and chunked[2].dtype == torch.float32
    assert_all_close(chunked, expected, rtol=2e-2)


def test_half_precision_inputs_give_gradients_of_their_dtype() -> None:
    hidden, weight, targets = inputs(torch.bfloat16)
    chunked = loss_and_grads(lambda h, w, t: chunked_cross_entropy(h, w, t, 8), hidden, weight, targets)
    assert_all_close(chunked, loss_and_grads(plain, hidden, weight, targets), rtol=2e-2)


@pytest.mark.slow
def test_torch_compile_traces_it_in_one_graph() -> None:
    hidden, weight, targets = inputs()
    compiled = torch.compile(lambda h, w, t: chunked_cross_entropy(h, w, t, 8), backend="aot_eager", fullgraph=True)
    assert_all_close(
        loss_and_grads(compiled, hidden, weight, targets), loss_and_grads(plain, hidden, weight, targets), rtol=1e-5
    )


def test_chunk_size_must_be_positive() -> None:
    hidden, weight, targets = inputs()
    with pytest.raises(ValueError, match="chunk_size must be a positive integer, got 0"):
        chunked_cross_entropy(hidden, weight, targets, 0)


@pytest.mark.parametrize("tie_embeddings", [False, True])
@pytest.mark.parametrize("arch", ["memoryformer", "transformer"])
def test_model_gradients_equal_with_and_without_chunking(arch: str, tie_embeddings: bool) -> None:
    config = {"arch": arch, "tie_embeddings": tie_embeddings, "n_layer": 1, "vocab_size": VOCAB}
    plain_model = build_model(ModelConfig.from_preset("debug", loss_chunk_size=0, **config))
    chunked_model = build_model(ModelConfig.from_preset("debug", loss_chunk_size=7, **config))
    chunked_model.load_state_dict(plain_model.state_dict())
    idx = torch.randint(0, VOCAB, (3, 10))
    targets = idx.roll(-1, dims=1)
    targets[:, -1] = -100
    plain_logits, plain_loss = plain_model(idx, targets)
    chunked_logits, chunked_loss = chunked_model(idx, targets)
    assert plain_logits.shape == (3, 10, VOCAB) and chunked_logits is None
    plain_loss.backward()
    chunked_loss.backward()
    torch.testing.assert_close(chunked_loss, plain_loss, rtol=1e-5, atol=0)
    plain_grads = dict(plain_model.named_parameters())
    for name, parameter in chunked_model.named_parameters():
        expected = plain_grads[name].grad
        torch.testing.assert_close(parameter.grad, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_config_refuses_a_negative_chunk_size() -> None:
    with pytest.raises(ValueError, match="loss_chunk_size must be a non-negative integer .*got -1"):
        ModelConfig(loss_chunk_size=-1)
