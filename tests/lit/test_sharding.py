"""Meta-device build and recorded initialisation: the materialised model is the eager build's, bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mf_lightning.config import ModelConfig
from mf_lightning.lit import LanguageModel
from mf_lightning.lit.sharding import FSDPStrategy, build_on_meta, has_meta_parameters, keyed_by_name, materialize
from mf_lightning.models import build_model


@pytest.mark.parametrize("arch", ["memoryformer", "transformer"])
def test_configure_model_gives_the_eager_build_and_keeps_the_random_state(arch: str) -> None:
    torch.manual_seed(3)
    module = LanguageModel(arch=arch, vocab_size=300)
    after_init = torch.get_rng_state()
    assert has_meta_parameters(module.network)
    module.configure_model()
    assert torch.equal(torch.get_rng_state(), after_init)
    torch.manual_seed(3)
    eager = build_model(ModelConfig.from_preset("debug", arch=arch, vocab_size=300)).state_dict()
    built = module.network.state_dict()
    assert built.keys() == eager.keys()
    assert all(torch.equal(built[key], eager[key]) for key in eager)
    weights = {key: value.clone() for key, value in built.items()}
    module.configure_model()
    assert all(torch.equal(module.network.state_dict()[key], weights[key]) for key in weights)


def test_a_parameter_left_uninitialised_is_named() -> None:
    class Uninitialised(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.empty(3))
            self.linear = nn.Linear(2, 2)

    with pytest.raises(ValueError, match=r"Uninitialised leaves parameters \['scale'\] uninitialised"):
        build_on_meta(Uninitialised)


def test_replay_initialises_in_the_recorded_order() -> None:
    def build() -> nn.Module:
        module = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        nn.init.normal_(module[0].weight, std=3.0)
        return module

    module, calls = build_on_meta(build)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    materialize(module, calls, state, torch.device("cpu"))
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


def test_the_former_strategy_name_is_refused_with_the_new_one() -> None:
    with pytest.raises(ValueError, match=r"FSDPStrategy was renamed: use class_path: \S+sharding\.FSDP2Strategy"):
        FSDPStrategy().setup_environment()
