"""Meta-device build and initialisation by each module's reset_parameters: the materialised model is the eager
build's, bit for bit, with every parameter and buffer set."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mf_lightning.config import ModelConfig
from mf_lightning.lit import LanguageModel
from mf_lightning.lit.sharding import (
    build_on_meta,
    has_meta_parameters,
    keyed_by_name,
    materialize,
    shard_network,
)
from mf_lightning.models import build_model


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [
        ("memoryformer", {}),
        ("memoryformer", {"hash_centering": True, "tie_embeddings": True, "code_bits": 4, "ffn_extra_bits": 0}),
        ("transformer", {}),
        ("transformer", {"tie_embeddings": True, "ffn_multiplier": 2}),
    ],
)
def test_configure_model_gives_the_eager_build_and_keeps_the_random_state(arch: str, overrides: dict) -> None:
    torch.manual_seed(3)
    module = LanguageModel(arch=arch, vocab_size=300, overrides=overrides)
    after_init = torch.get_rng_state()
    assert has_meta_parameters(module.network)
    module.configure_model()
    assert torch.equal(torch.get_rng_state(), after_init)
    torch.manual_seed(3)
    eager = build_model(ModelConfig.from_preset("debug", arch=arch, vocab_size=300, **overrides)).state_dict()
    built = module.network.state_dict()
    assert built.keys() == eager.keys()
    assert all(torch.equal(built[key], eager[key]) for key in eager)
    weights = {key: value.clone() for key, value in built.items()}
    module.configure_model()
    assert all(torch.equal(module.network.state_dict()[key], weights[key]) for key in weights)


@pytest.mark.parametrize(
    "overrides",
    [{"hash_centering": True, "bucket_balance_weight": 0.1}, {"tie_embeddings": True, "score": "paper"}],
)
def test_every_parameter_and_buffer_is_set_after_materialisation(overrides: dict) -> None:
    torch.manual_seed(0)
    module = LanguageModel(overrides=overrides)
    module.configure_model()
    state = module.network.state_dict(keep_vars=True)
    assert all(bool(tensor.isfinite().all()) for tensor in state.values())
    if "hash_centering" in overrides:
        assert torch.equal(module.network.blocks[0].qkv_hash_input.running_mean, torch.zeros(64))


def test_a_module_without_reset_parameters_is_named() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("scale", torch.ones(3))

    module = build_on_meta(lambda: nn.Sequential(nn.Linear(2, 2), Scaled()))
    with pytest.raises(ValueError, match=r"no reset_parameters to set them: 1 \(Scaled\)"):
        materialize(module, torch.get_rng_state(), torch.device("cpu"))


def test_a_tensor_reset_parameters_leaves_unset_is_named() -> None:
    class HalfReset(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.empty(3))
            self.register_buffer("count", torch.zeros(3))
            self.reset_parameters()

        def reset_parameters(self) -> None:
            nn.init.ones_(self.weight)

    module = build_on_meta(lambda: nn.Sequential(HalfReset()))
    with pytest.raises(ValueError, match=r"0 \(HalfReset\)\.reset_parameters leaves \['count'\] unset"):
        materialize(module, torch.get_rng_state(), torch.device("cpu"))


def test_materialisation_runs_reset_parameters_in_module_order_from_the_given_state() -> None:
    def build() -> nn.Module:
        return nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Embedding(5, 4))

    module = build_on_meta(build)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    materialize(module, state, torch.device("cpu"))
    torch.manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), build().state_dict().values()))


def test_optimizer_state_is_keyed_by_name_group_by_group() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    groups = [{"params": [model[1].weight, model[0].bias]}, {"params": [model[0].weight, model[1].bias]}]
    optimizer = torch.optim.AdamW(groups)
    model(torch.randn(4, 2)).sum().backward()
    optimizer.step()
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    keyed = keyed_by_name(optimizer.state_dict(), optimizer, names)
    for name, parameter in model.named_parameters():
        assert torch.equal(keyed["state"][name]["exp_avg"], optimizer.state[parameter]["exp_avg"])
    assert [group["params"] for group in keyed["param_groups"]] == [["1.weight", "0.bias"], ["0.weight", "1.bias"]]
    with pytest.raises(ValueError, match=r"parameter groups of sizes \[2, 2\], this one \[4\]"):
        keyed_by_name(optimizer.state_dict(), torch.optim.AdamW(model.parameters()), names)


def test_sharded_materialisation_gives_each_rank_its_shard_of_the_one_process_weights() -> None:
    """FSDP2 on a 1-rank gloo group: every parameter is a ``DTensor`` and every module is initialised through
    full-size CPU stand-ins; the shards hold the eager build's weights and the buffers are set too."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(5)
        module = LanguageModel(overrides={"hash_centering": True})
        shard_network(module.network, init_device_mesh("cpu", (1,)), "32-true")
        materialize(module.network, module.init_rng_state, torch.device("cpu"))
        torch.manual_seed(5)
        eager = build_model(module.config).state_dict()
        parameters = dict(module.network.named_parameters())
        assert parameters and all(isinstance(parameter, DTensor) for parameter in parameters.values())
        for name, tensor in module.network.state_dict().items():
            full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
            assert torch.equal(full, eager[name]), name
    finally:
        dist.destroy_process_group()
