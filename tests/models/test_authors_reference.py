"""MemoryFormer computes what the authors' code computes (SPEC §2): block and model against a transcription of
their GPT-NeoX fork (:mod:`tests.models.authors_reference`), weights copied both ways, forward and every gradient.

Inputs are at the residual stream's scale at init (std 0.02), where a norm that differs by 1 % flips hash
buckets; the model test feeds tokens, whose embedding is at that scale by construction.
"""

from __future__ import annotations

import authors_reference as authors
import pytest
import torch

from mf_lightning.config import ModelConfig
from mf_lightning.models.architectures import MemoryFormer
from mf_lightning.nn.attention import rotary_cos_sin
from mf_lightning.nn.blocks import MemoryBlock

WIDTH, HEADS, BITS, VOCAB = 128, 2, 8, 97
RELATIVE_ERROR = 1e-5
"""``||ours - theirs|| / ||theirs||`` allowed: fp32 round-off of two orders of summation (measured 1e-7 to 1e-6);
one flipped bucket or a 1 % norm change is 1e-3 or more. Relative to the whole tensor, because gradients
through the norm cancel to values far below their tensor's scale, where elementwise tolerances are noise."""


def assert_close(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    error = ((got - expected).norm() / expected.norm()).item()
    assert error <= RELATIVE_ERROR, f"{what}: relative error {error:.2e} > {RELATIVE_ERROR:g}"


def config(**overrides: object) -> ModelConfig:
    values = {"vocab_size": VOCAB, "n_layer": 2, "n_embd": WIDTH, "n_head": HEADS, "code_bits": BITS}
    return ModelConfig(**{**values, "backend": "torch", **overrides})


def gradients(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.grad for name, param in module.named_parameters()}


def assert_state_close(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert_close(ours[key], theirs[key], f"gradient of {key}")


@pytest.mark.parametrize("backend", ["torch", "embedding_bag"])
@pytest.mark.parametrize("direction", ["theirs_to_ours", "ours_to_theirs"])
def test_block_matches_authors_layer(backend: str, direction: str) -> None:
    torch.manual_seed(0)
    theirs = authors.Layer(WIDTH, HEADS, BITS)
    settings = config(backend=backend)
    ours = MemoryBlock(settings)
    if direction == "theirs_to_ours":
        ours.load_state_dict(authors.our_state_from_layer(theirs))
    else:
        authors.load_our_state(theirs, ours.state_dict())
    x = (0.02 * torch.randn(2, 16, WIDTH)).requires_grad_()
    x_ours = x.detach().clone().requires_grad_()
    expected = theirs(x)
    got = ours(x_ours, *rotary_cos_sin(torch.arange(16), settings.rotary_dims, settings.rotary_base))
    assert_close(got, expected, "block output")
    upstream = torch.randn_like(expected)
    expected.backward(upstream)
    got.backward(upstream)
    assert_close(x_ours.grad, x.grad, "gradient of the input")
    assert_state_close(gradients(ours), authors.our_state_from_layer(theirs, get=lambda p: p.grad))


@pytest.mark.parametrize("direction", ["theirs_to_ours", "ours_to_theirs"])
def test_two_block_model_matches_authors_model(direction: str) -> None:
    torch.manual_seed(1)
    theirs = authors.Model(VOCAB, WIDTH, 2, HEADS, BITS)
    ours = MemoryFormer(config())
    if direction == "theirs_to_ours":
        ours.load_state_dict(authors.our_state_from_model(theirs))
    else:
        authors.load_our_state(theirs, ours.state_dict())
    tokens = torch.randint(0, VOCAB, (2, 24))
    targets = torch.randint(0, VOCAB, (2, 24))
    expected = theirs(tokens)
    got, _ = ours(tokens)
    assert_close(got, expected, "logits")
    torch.nn.functional.cross_entropy(expected.flatten(0, 1), targets.flatten()).backward()
    _, loss = ours(tokens, targets)
    loss.backward()
    assert_state_close(gradients(ours), authors.our_state_from_model(theirs, get=lambda p: p.grad))


def test_initialisation_follows_authors_code() -> None:
    """small_init embedding and head, GPT-NeoX RMSNorm eps 1e-8, mid-FFN LayerNorm eps 1e-5 (SPEC §2)."""
    model = MemoryFormer(config(vocab_size=4096))
    small_init = (2 / (5 * WIDTH)) ** 0.5
    for weight in (model.embed.weight, model.head.weight):
        assert abs(weight.std().item() / small_init - 1) < 0.02
    assert model.norm.eps == 1e-8 and model.blocks[0].attn_norm.eps == 1e-8
    assert model.blocks[0].ffn_mid_norm.eps == 1e-5


def test_embedding_goes_through_dropout() -> None:
    """The authors' ``embedding_dropout`` (``hidden_dropout``): with dropout on, training changes the embedding."""
    torch.manual_seed(0)
    model = MemoryFormer(config(dropout=0.5, n_layer=1))
    captured = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    tokens = torch.randint(0, VOCAB, (2, 8))
    model.train()(tokens)
    dropped = captured.pop()
    assert (dropped == 0).float().mean() > 0.3
    torch.testing.assert_close(dropped[dropped != 0], 2 * model.embed(tokens)[dropped != 0])
