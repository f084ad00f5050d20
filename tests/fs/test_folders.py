"""Folders built beside their target and swapped in whole."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from mf_lightning.fs import atomic
from mf_lightning.fs.atomic import partial_path
from mf_lightning.fs.folders import install, replaced_folder


@pytest.mark.parametrize("can_exchange", [True, False])
@pytest.mark.parametrize("old_kind", ["folder", "file", "none"])
def test_install_replaces_the_target_and_leaves_nothing_else(tmp_path, monkeypatch, can_exchange, old_kind) -> None:
    if not can_exchange:
        monkeypatch.setattr(atomic, "exchange", lambda first, second: False)
    target = tmp_path / "last.ckpt"
    if old_kind == "folder":
        target.mkdir()
        (target / "meta.pt").write_text("old")
    elif old_kind == "file":
        target.write_text("old")
    stage = partial_path(target)
    stage.mkdir()
    (stage / "meta.pt").write_text("new")
    install(stage, target)
    assert (target / "meta.pt").read_text() == "new"
    assert [path.name for path in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_replaced_folder_appears_whole_when_the_block_ends(tmp_path: Path) -> None:
    target = tmp_path / "cache"
    target.mkdir()
    (target / "old.bin").write_text("old")
    with replaced_folder(target, "writing the cache") as stage:
        (stage / "new.bin").write_text("new")
        assert sorted(os.listdir(target)) == ["old.bin"], "nothing is seen before the block ends"
    assert sorted(os.listdir(target)) == ["new.bin"]
    assert os.listdir(tmp_path) == ["cache"]


def test_an_error_while_building_keeps_the_old_folder_and_names_the_target(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text("old")
    with pytest.raises(OSError, match="No space left") as raised, replaced_folder(target, "saving the model") as stage:
        (stage / "config.json").write_text("new")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(stage / "model.safetensors"))
    assert raised.value.filename == str(target / "model.safetensors")
    assert (target / "config.json").read_text() == "old" and os.listdir(tmp_path) == ["model"]


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_the_files_of_a_replaced_folder_get_the_mode_the_umask_gives(tmp_path, mask):
    previous = os.umask(mask)
    try:
        with replaced_folder(tmp_path / "model", "saving") as staged:
            (staged / "model.safetensors").write_bytes(b"weights")
            (staged / "model.safetensors").chmod(0o600)  # safetensors writes its file so
            (staged / "run.sh").write_text("#!/bin/sh\n")
            (staged / "run.sh").chmod(0o700)
            (staged / "config.json").write_text("{}")
    finally:
        os.umask(previous)
    modes = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "model").iterdir()}
    assert modes == {"model.safetensors": 0o666 & ~mask, "config.json": 0o666 & ~mask, "run.sh": 0o777 & ~mask}
