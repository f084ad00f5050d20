"""Parameter groups and the warm-up + cosine schedule of SPEC §2."""

import itertools

import pytest
import torch

from mf_lightning.config import ModelConfig
from mf_lightning.lit.optim import WarmupCosineLR, parameter_groups, scale_group_lr
from mf_lightning.models import build_model


def test_groups_separate_tables_matrices_and_biases_norms():
    model = build_model(ModelConfig.from_preset("debug"))
    groups = {g["name"]: g for g in parameter_groups(model, weight_decay=0.1, table_weight_decay=0.01)}
    names = {id(p): n for n, p in model.named_parameters()}
    grouped = {name: {names[id(p)] for p in group["params"]} for name, group in groups.items()}
    memory_layers = [f"blocks.{i}.{layer}" for i in range(2) for layer in ("qkv", "ffn_in", "ffn_out")]
    norms = [f"blocks.{i}.{norm}" for i in range(2) for norm in ("attn_norm", "ffn_norm")] + ["norm"]
    assert grouped["tables"] == {f"{layer}.tables" for layer in memory_layers}
    assert grouped["decay"] == {"embed.weight", "head.weight"}
    assert grouped["no_decay"] == (
        {f"{layer}.bias" for layer in memory_layers}
        | {f"{norm}.weight" for norm in norms}
        | {f"blocks.{i}.ffn_mid_norm.{kind}" for i in range(2) for kind in ("weight", "bias")}
    )
    assert groups["tables"]["weight_decay"] == 0.01
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len(list(model.parameters()))


def test_baseline_has_an_empty_table_group():
    model = build_model(ModelConfig.from_preset("debug", arch="transformer"))
    groups = {g["name"]: g for g in parameter_groups(model, weight_decay=0.1)}
    assert groups["tables"]["params"] == []


def test_schedule_warms_up_then_decays_to_the_floor():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [param], "name": "tables"}], lr=1.0)
    scale_group_lr(optimizer, "tables", 2.0)
    scheduler = WarmupCosineLR(optimizer, warmup_fraction=0.1, min_lr_ratio=0.01)
    scheduler.set_total_steps(100)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(2.0 / 10)
    assert lrs[9] == pytest.approx(2.0)
    assert max(lrs) == pytest.approx(2.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    assert lrs[-1] == pytest.approx(0.02, rel=0.05)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.02)


def test_schedule_state_round_trips():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = WarmupCosineLR(optimizer, total_steps=50)
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    restored = WarmupCosineLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0))
    restored.load_state_dict(scheduler.state_dict())
    assert restored.total_steps == 50 and restored.last_epoch == 7


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"warmup_fraction": 1.0}, r"warmup_fraction must be in \[0, 1\), got 1.0"),
        ({"min_lr_ratio": -0.1}, r"min_lr_ratio must be in \[0, 1\], got -0.1"),
    ],
)
def test_schedule_rejects_bad_fractions(kwargs, message):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match=message):
        WarmupCosineLR(optimizer, **kwargs)
