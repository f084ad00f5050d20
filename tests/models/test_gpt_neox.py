"""``arch: transformer`` is Pythia exactly: transformers' own ``GPTNeoXForCausalLM`` with a small Pythia-shaped
config and our baseline holding its weights give the same logits and gradients (SPEC §2)."""

from __future__ import annotations

import pytest
import torch

from mf_lightning.config import ModelConfig
from mf_lightning.models.architectures import Transformer
from mf_lightning.models.gpt_neox import (
    config_from_gpt_neox,
    from_gpt_neox_state,
    gpt_neox_config,
    to_gpt_neox_state,
)

transformers = pytest.importorskip("transformers")
RELATIVE_ERROR = 1e-5
"""fp32 round-off (measured about 1e-7); a swapped Q/K/V layout, a sequential residual or RMSNorm is 1e-2 or more."""


def pythia_like(**overrides: object) -> transformers.GPTNeoXForCausalLM:
    """A random ``GPTNeoXForCausalLM`` shaped like Pythia (parallel residual, 25 % rotary, GELU 4d, untied), every
    weight and bias perturbed away from transformers' init so that no term hides behind a zero or a one."""
    values = {
        "vocab_size": 97,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 256,
        "rotary_pct": 0.25,
        "rotary_emb_base": 10000,
        "max_position_embeddings": 64,
        "layer_norm_eps": 1e-5,
        "use_parallel_residual": True,
        "tie_word_embeddings": False,
        "hidden_act": "gelu",
    }
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**{**values, **overrides}))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.float().eval()


def file_name(module_name: str) -> str:
    """transformers 5 calls the head ``lm_head`` in the module and ``embed_out`` in files (renamed on load)."""
    return "embed_out.weight" if module_name == "lm_head.weight" else module_name


def module_name(file_name: str) -> str:
    return "lm_head.weight" if file_name == "embed_out.weight" else file_name


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).norm() / expected.norm()).item()


def test_baseline_with_pythia_weights_gives_transformers_logits_and_gradients() -> None:
    theirs = pythia_like()
    config = config_from_gpt_neox(theirs.config.to_dict(), "test")
    ours = Transformer(config).eval()
    ours.load_state_dict(from_gpt_neox_state(theirs.state_dict(), config, "test"))
    tokens = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    expected = theirs(tokens).logits
    got, _ = ours(tokens)
    assert relative_error(got, expected) < RELATIVE_ERROR
    targets = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(2))
    torch.nn.functional.cross_entropy(expected.flatten(0, 1), targets.flatten()).backward()
    ours(tokens, targets)[1].backward()
    their_grads = {file_name(name): param.grad for name, param in theirs.named_parameters()}
    for key, grad in to_gpt_neox_state({name: p.grad for name, p in ours.named_parameters()}).items():
        assert relative_error(grad, their_grads[key]) < RELATIVE_ERROR, key
    assert set(their_grads) == set(to_gpt_neox_state(dict(ours.named_parameters())))


def test_our_weights_load_into_transformers_with_its_config() -> None:
    """The other way: our baseline, freshly initialised, in transformers under the config we write for it."""
    config = ModelConfig(arch="transformer", vocab_size=97, n_layer=2, n_embd=64, n_head=4, max_seq_len=64)
    torch.manual_seed(3)
    ours = Transformer(config).eval()
    theirs = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**gpt_neox_config(config, 0, 96))).eval()
    state = {module_name(key): value for key, value in to_gpt_neox_state(ours.state_dict()).items()}
    missing, unexpected = theirs.load_state_dict(state, strict=False)
    assert not unexpected and all(key.endswith("inv_freq") for key in missing)
    tokens = torch.randint(0, 97, (1, 33))
    assert relative_error(ours(tokens)[0], theirs(tokens).logits) < RELATIVE_ERROR


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"use_parallel_residual": False}, "use_parallel_residual=False; the baseline computes Pythia's GPT-NeoX"),
        ({"hidden_act": "relu"}, "hidden_act='relu'"),
        ({"intermediate_size": 100}, "intermediate_size=100, hidden_size=64"),
    ],
)
def test_a_gpt_neox_config_the_baseline_does_not_compute_is_refused(overrides: dict, message: str) -> None:
    values = {**pythia_like().config.to_dict(), **overrides}
    with pytest.raises(ValueError, match=message):
        config_from_gpt_neox(values, "x/config.json")
