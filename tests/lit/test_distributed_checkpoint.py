"""Sharded checkpoint folders in one process: the layout, reading them whole, and atomic replacement.

The multi-rank paths (each rank writing its shards, resuming on another number of ranks) run in
``tests/test_fsdp.py``.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

from mf_lightning.fs.atomic import partial_path, remove_abandoned
from mf_lightning.lit.checkpoint_files import index_globals
from mf_lightning.lit.checkpoints import check_run_folder, read_checkpoint
from mf_lightning.lit.distributed_checkpoint import (
    SHARDED_FOLDER_KEY,
    is_sharded_checkpoint,
    read_sharded_placeholder,
    save_sharded,
)

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP in one process, on purpose


def trained() -> tuple[nn.Module, torch.optim.Optimizer]:
    """A model after two AdamW steps, its groups listing parameters out of the model's order."""
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    groups = [
        {"params": [model[2].weight, model[0].bias]},
        {"params": [model[0].weight, model[1].weight, model[1].bias, model[2].bias], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    for _ in range(2):
        model(torch.randn(5, 3)).square().sum().backward()
        optimizer.step()
    return model, optimizer


def save(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    checkpoint = {
        "state_dict": get_model_state_dict(model),
        "optimizer_states": [get_optimizer_state_dict(model, optimizer)],
        "global_step": 2,
        "lr_schedulers": [{"last_epoch": 2}],
    }
    save_sharded(checkpoint, folder, is_coordinator=True, barrier=lambda: None)


def test_a_folder_reads_back_whole_as_a_single_file_checkpoint(tmp_path) -> None:
    model, optimizer = trained()
    save(model, optimizer, tmp_path / "last.ckpt")
    assert is_sharded_checkpoint(tmp_path / "last.ckpt")
    checkpoint = read_checkpoint(tmp_path / "last.ckpt")
    assert checkpoint["global_step"] == 2 and checkpoint["lr_schedulers"] == [{"last_epoch": 2}]
    assert checkpoint["state_dict"].keys() == model.state_dict().keys()
    assert all(torch.equal(checkpoint["state_dict"][k], v) for k, v in model.state_dict().items())
    _fresh_model, fresh = trained()
    fresh.load_state_dict(checkpoint["optimizer_states"][0])
    for parameter, restored in zip(
        (p for group in optimizer.param_groups for p in group["params"]),
        (p for group in fresh.param_groups for p in group["params"]),
    ):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(fresh.state[restored][key], optimizer.state[parameter][key])
    assert [group["weight_decay"] for group in fresh.param_groups] == [0.01, 0.0]


def test_a_placeholder_holds_shapes_only_and_names_its_folder(tmp_path) -> None:
    model, optimizer = trained()
    save(model, optimizer, tmp_path / "step.ckpt")
    placeholder = read_sharded_placeholder(tmp_path / "step.ckpt")
    assert {k: (v.shape, v.device.type) for k, v in placeholder["state_dict"].items()} == {
        k: (v.shape, "meta") for k, v in model.state_dict().items()
    }
    assert placeholder[SHARDED_FOLDER_KEY] == str(tmp_path / "step.ckpt")
    groups = placeholder["optimizer_states"][0]["param_groups"]
    assert [group["params"] for group in groups] == [
        ["2.weight", "0.bias"],
        ["0.weight", "1.weight", "1.bias", "2.bias"],
    ]


def test_no_python_object_is_unpickled_from_a_folder(tmp_path) -> None:
    model, optimizer = trained()
    save(model, optimizer, tmp_path / "x.ckpt")
    torch.save({"global_step": 2, "where": Path("runs")}, tmp_path / "x.ckpt" / "meta.pt")
    with pytest.raises(ValueError, match=r"meta.pt holds a Python object beyond tensors and plain data \(pathlib"):
        read_checkpoint(tmp_path / "x.ckpt")
    assert read_checkpoint(tmp_path / "x.ckpt", weights_only=False)["where"] == Path("runs")


def test_a_folder_that_is_not_a_checkpoint_is_refused(tmp_path) -> None:
    (tmp_path / "other.ckpt").mkdir()
    with pytest.raises(ValueError, match="is a folder, expected a .ckpt file or a sharded checkpoint folder"):
        read_checkpoint(tmp_path / "other.ckpt")


def test_a_killed_writers_staging_folder_is_never_last_and_is_cleared(tmp_path) -> None:
    """A save killed before its rename leaves only a hidden folder beside the previous ``last.ckpt``;
    the next save removes it (its writer is dead), a live writer's stays."""
    target = tmp_path / "last.ckpt"
    target.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    live = partial_path(target)
    killed = live.with_name(live.name.replace(f"-{os.getpid()}-", f"-{dead.stdout.strip()}-"))
    for stage in (killed, live):
        stage.mkdir()
        (stage / "__0_0.distcp").write_bytes(b"half")
    assert sorted(path.name for path in tmp_path.glob("last*")) == ["last.ckpt"]
    remove_abandoned(tmp_path)
    assert not killed.exists() and live.exists()


def test_a_fresh_run_is_refused_where_sharded_checkpoints_are(tmp_path) -> None:
    model, optimizer = trained()
    save(model, optimizer, tmp_path / "last.ckpt")
    with pytest.raises(ValueError, match=r"already holds checkpoints of a run \(last.ckpt\)"):
        check_run_folder("fit", None, str(tmp_path))
    check_run_folder("fit", "last", str(tmp_path))
    check_run_folder("validate", "last", str(tmp_path))


class Recording(pickle.Unpickler):
    """Unpickles as ``pickle`` does, recording every global looked up."""

    def __init__(self, file) -> None:
        super().__init__(file)
        self.names: set[tuple[str, str]] = set()

    def find_class(self, module: str, name: str):
        self.names.add((module, name))
        return super().find_class(module, name)


def test_the_index_reader_admits_what_a_genuine_index_names_and_nothing_else(tmp_path) -> None:
    model, optimizer = trained()
    save(model.to(torch.bfloat16), optimizer, tmp_path / "x.ckpt")
    with (tmp_path / "x.ckpt" / ".metadata").open("rb") as file:
        recording = Recording(file)
        recording.load()
    allowed = index_globals()
    assert recording.names <= set(allowed), recording.names - set(allowed)
    assert ("builtins", "eval") not in allowed and ("os", "system") not in allowed
    assert read_checkpoint(tmp_path / "x.ckpt")["global_step"] == 2


def rewrite_index(folder: Path, edit) -> None:
    index = pickle.loads((folder / ".metadata").read_bytes())
    edit(index)
    (folder / ".metadata").write_bytes(pickle.dumps(index))


def first_piece(index):
    return next(info for where, info in index.storage_data.items() if where.fqn.startswith("state_dict."))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda index: setattr(first_piece(index), "relative_path", "../elsewhere.distcp"), "lies outside the folder"),
        (lambda index: setattr(first_piece(index), "offset", -1), "has no valid place"),
        (lambda index: index.storage_data.pop(next(iter(index.storage_data))), "is not listed"),
        (lambda index: setattr(index, "state_dict_metadata", [1]), "it lists no tensors"),
    ],
    ids=["outside", "negative-offset", "unlisted-piece", "not-a-dict"],
)
def test_an_index_that_mf_fit_cannot_have_written_is_refused_naming_it(tmp_path, edit, message) -> None:
    model, optimizer = trained()
    save(model, optimizer, tmp_path / "x.ckpt")
    rewrite_index(tmp_path / "x.ckpt", edit)
    with pytest.raises(
        ValueError, match=rf"checkpoint {tmp_path / 'x.ckpt' / '.metadata'} is not the index .*{message}"
    ):
        read_checkpoint(tmp_path / "x.ckpt")


def test_a_changed_byte_in_a_shard_names_the_shard_and_the_tensor(tmp_path) -> None:
    model, optimizer = trained()
    save(model, optimizer, tmp_path / "x.ckpt")
    index = pickle.loads((tmp_path / "x.ckpt" / ".metadata").read_bytes())
    piece = next(info for where, info in index.storage_data.items() if where.fqn == "state_dict.0.weight")
    shard = tmp_path / "x.ckpt" / piece.relative_path
    data = bytearray(shard.read_bytes())
    data[piece.offset + piece.length - 100] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(
        ValueError, match=rf"checkpoint {shard} is damaged: the data of 1 tensor\(s\) \(state_dict.0.weight\)"
    ):
        read_checkpoint(tmp_path / "x.ckpt")
