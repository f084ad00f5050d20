"""Checkpoints you can trust: opening one runs no code from it, and a damaged one is one error naming the file.

One small checkpoint of each kind is trained once per module (a single ``.ckpt`` file in this process,
sharded folders written by ``FSDP2Strategy`` on 1 and on 2 ranks in subprocesses); each test copies one,
damages or plants code in one of its files, and runs a command on it. Planted code is a ``__reduce__``
that creates a marker file and then returns the genuine object, so a reader that runs it sees nothing wrong.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import xxhash
from cli_support import REPO, run, tiny_run_args, write_corpus

from mf_lightning.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

LIGHT = {
    "model.overrides": "{max_seq_len: 64, code_bits: 4}",
    "bucket_usage.image_every_n_steps": 1000,
    "validation.every_n_steps": 2,
}
SHARDED = ["--trainer.strategy.class_path", "mf_lightning.lit.sharding.FSDP2Strategy", "--trainer.accelerator", "cpu"]
SUBPROCESS_TIMEOUT = 600


class Planted:
    """Unpickled, creates ``marker`` and then gives back the object pickled in ``genuine``."""

    def __init__(self, marker: Path, genuine: bytes) -> None:
        self.marker, self.genuine = marker, genuine

    def __reduce__(self):
        code = (
            f"(__import__('pathlib').Path({str(self.marker)!r}).touch(), __import__('pickle').loads({self.genuine!r}))"
        )
        return eval, (code + "[1]",)


def run_args(root: Path, corpus: Path, devices: int = 1) -> list[str]:
    """The training arguments every checkpoint of this module was made with, in run folder ``root``."""
    return tiny_run_args(root, corpus, max_steps=4, **LIGHT, **{"data.batch_size": 4 // devices})


def subprocess_fit(root: Path, corpus: Path, devices: int, *extra: str) -> subprocess.CompletedProcess:
    """``mf fit`` under ``FSDP2Strategy`` on ``devices`` CPU processes, as a subprocess."""
    command = [sys.executable, "-m", "mf_lightning", "fit", *run_args(root, corpus, devices), *SHARDED]
    return subprocess.run(
        [*command, "--trainer.devices", str(devices), *extra],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.environ.get("PYTHONPATH", str(REPO))},
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "docs")


@pytest.fixture(scope="module")
def plain(tmp_path_factory, corpus) -> Path:
    """``last.ckpt`` of a short fit in this process: a single file."""
    root = tmp_path_factory.mktemp("plain")
    run("fit", run_args(root, corpus))
    return root / "checkpoints" / "last.ckpt"


def sharded_on(tmp_path_factory, corpus: Path, devices: int) -> Path:
    root = tmp_path_factory.mktemp(f"sharded{devices}")
    result = subprocess_fit(root, corpus, devices)
    assert result.returncode == 0, result.stderr[-4000:]
    return root / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, corpus) -> Path:
    """``last.ckpt`` of a short fit under ``FSDP2Strategy`` on one process: a folder."""
    return sharded_on(tmp_path_factory, corpus, 1)


@pytest.fixture(scope="module")
def sharded2(tmp_path_factory, corpus) -> Path:
    """``last.ckpt`` of a short fit under ``FSDP2Strategy`` on 2 ranks: a folder with a shard per rank."""
    return sharded_on(tmp_path_factory, corpus, 2)


def copy_run(checkpoint: Path, root: Path) -> Path:
    """``checkpoint`` copied to ``root/checkpoints/last.ckpt`` (a fresh run folder); returns the copy."""
    target = root / "checkpoints" / "last.ckpt"
    target.parent.mkdir(parents=True)
    if checkpoint.is_dir():
        shutil.copytree(checkpoint, target)
    else:
        shutil.copyfile(checkpoint, target)
    return target


def plant_in_index(checkpoint: Path, marker: Path) -> Path:
    index = checkpoint / ".metadata"
    index.write_bytes(pickle.dumps(Planted(marker, index.read_bytes())))
    return index


def plant_in_meta(checkpoint: Path, marker: Path) -> Path:
    meta = checkpoint / "meta.pt"
    torch.save({**torch.load(meta, weights_only=True), "payload": Planted(marker, pickle.dumps(1))}, meta)
    return meta


def plant_in_file(checkpoint: Path, marker: Path) -> Path:
    checkpoint_dict = torch.load(checkpoint, weights_only=True)
    torch.save({**checkpoint_dict, "payload": Planted(marker, pickle.dumps(1))}, checkpoint)
    return checkpoint


def first_weight(index) -> tuple:
    """(key, storage entry) of the first weight's first piece in an index."""
    return next((where, info) for where, info in index.storage_data.items() if where.fqn.startswith("state_dict."))


def plant_in_shard_as_tensor(checkpoint: Path, marker: Path) -> Path:
    """The first weight's piece re-pointed at a ``torch.save``-d object appended to its shard, its digest
    recorded as an attacker would (so the object reaches the unpickler)."""
    index = pickle.loads((checkpoint / ".metadata").read_bytes())
    where, info = first_weight(index)
    shard = checkpoint / info.relative_path
    genuine = shard.read_bytes()[info.offset : info.offset + info.length]
    payload = pickle_with_torch(Planted(marker, pickle.dumps(torch.load(io.BytesIO(genuine), weights_only=True))))
    info.offset, info.length = shard.stat().st_size, len(payload)
    with shard.open("ab") as file:
        file.write(payload)
    (checkpoint / ".metadata").write_bytes(pickle.dumps(index))
    digests = shard.with_name(shard.name + ".digests.json")
    if digests.exists():
        recorded = json.loads(digests.read_text())
        recorded["pieces"][f"{info.offset}+{info.length}"] = [where.fqn, xxhash.xxh3_128_hexdigest(payload)]
        digests.write_text(json.dumps(recorded))
    return shard


def plant_in_shard_as_bytes(checkpoint: Path, marker: Path) -> Path:
    """As ``plant_in_shard_as_tensor``, the index declaring the piece a stored Python object (bytes), which
    torch's loader unpickles with ``weights_only=False``."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    shard = plant_in_shard_as_tensor(checkpoint, marker)
    index = pickle.loads((checkpoint / ".metadata").read_bytes())
    where, _ = first_weight(index)
    index.state_dict_metadata[where.fqn] = BytesStorageMetadata()
    (checkpoint / ".metadata").write_bytes(pickle.dumps(index))
    return shard


def pickle_with_torch(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


PLANTS = {
    "index": ("sharded", plant_in_index),
    "meta.pt": ("sharded", plant_in_meta),
    "shard-tensor": ("sharded", plant_in_shard_as_tensor),
    "shard-bytes": ("sharded", plant_in_shard_as_bytes),
    "ckpt": ("plain", plant_in_file),
}


def command(name: str, root: Path, corpus: Path, checkpoint: Path) -> list[str]:
    """``mf <name>`` opening ``checkpoint`` (in the run folder ``root``)."""
    if name == "export":
        return ["export", "--ckpt_path", str(checkpoint), "--out", str(root / "exported")]
    if name == "generate":
        return ["generate", "--ckpt_path", str(checkpoint), "def", "--max_new_tokens", "2"]
    if name == "eval":
        return ["eval", "--ckpt_path", str(checkpoint), "--tasks", "mf_no_such_task", "--device", "cpu"]
    return [name, *run_args(root, corpus), "--ckpt_path", str(checkpoint)]


COMMANDS = ["fit", "validate", "test", "predict", "export", "generate", "eval"]


def assert_one_error_naming(stderr: str, path: Path, *words: str) -> str:
    """The single ``mf: error:`` line of ``stderr``, checked to name ``path`` (and ``words``) with no traceback."""
    assert "Traceback" not in stderr, stderr[-4000:]
    lines = [line for line in stderr.splitlines() if line.startswith("mf: error:")]
    assert len(lines) == 1, stderr[-4000:]
    assert str(path) in lines[0] and all(word in lines[0] for word in words), lines[0]
    return lines[0]


@pytest.mark.parametrize("name", COMMANDS)
@pytest.mark.parametrize("plant", PLANTS)
def test_no_command_runs_code_planted_in_a_checkpoint(request, tmp_path, corpus, capsys, plant, name) -> None:
    kind, planter = PLANTS[plant]
    checkpoint = copy_run(request.getfixturevalue(kind), tmp_path)
    marker = tmp_path / "code-ran"
    planted = planter(checkpoint, marker)
    with pytest.raises(SystemExit) as exit_info:
        main(command(name, tmp_path, corpus, checkpoint))
    assert not marker.exists(), "the planted code ran"
    assert exit_info.value.code == 2
    assert_one_error_naming(capsys.readouterr().err, planted, "Python object")


def flip_exponents(path: Path, start: int, count: int = 64) -> None:
    """Flips an exponent bit of ``count`` float32 values from byte ``start`` of ``path``: weights become ~1e37."""
    data = bytearray(path.read_bytes())
    for value in range(count):
        data[start + 4 * value + 3] ^= 0x40
    path.write_bytes(bytes(data))


def largest_zip_entry(data: bytes, base: int = 0) -> int:
    """Where the data of the largest entry of the zip archive ``data`` (a ``torch.save`` file) starts, plus ``base``."""
    archive = zipfile.ZipFile(io.BytesIO(data))
    entry = max(archive.infolist(), key=lambda info: info.file_size)
    name_length, extra_length = struct.unpack("<HH", data[entry.header_offset + 26 : entry.header_offset + 30])
    return base + entry.header_offset + 30 + name_length + extra_length


def rot_file(checkpoint: Path) -> Path:
    flip_exponents(checkpoint, largest_zip_entry(checkpoint.read_bytes()))
    return checkpoint


def largest_piece(checkpoint: Path, shard: str = "__0_0.distcp"):
    index = pickle.loads((checkpoint / ".metadata").read_bytes())
    return max((info for info in index.storage_data.values() if info.relative_path == shard), key=lambda i: i.length)


def rot_shard(checkpoint: Path, shard: str = "__0_0.distcp") -> Path:
    piece = largest_piece(checkpoint, shard)
    path = checkpoint / shard
    flip_exponents(path, largest_zip_entry(path.read_bytes()[piece.offset : piece.offset + piece.length], piece.offset))
    return path


def delete_shard(checkpoint: Path, shard: str = "__0_0.distcp") -> Path:
    (checkpoint / shard).unlink()
    return checkpoint / shard


def truncate_shard(checkpoint: Path, shard: str = "__0_0.distcp") -> Path:
    path = checkpoint / shard
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def pickle_over_shard(checkpoint: Path, shard: str = "__0_0.distcp") -> Path:
    path = checkpoint / shard
    path.write_bytes(pickle.dumps({"not": "a shard"}))
    return path


DAMAGE = {
    "rot-ckpt": ("plain", rot_file),
    "rot-shard": ("sharded", rot_shard),
    "deleted-shard": ("sharded", delete_shard),
    "truncated-shard": ("sharded", truncate_shard),
    "pickle-shard": ("sharded", pickle_over_shard),
}


@pytest.mark.parametrize("name", ["fit", "export", "generate", "eval"])
@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_is_one_error_naming_the_file(request, tmp_path, corpus, capsys, damage, name) -> None:
    """Bit rot is found by the digests (``mf export`` refuses it instead of digesting it anew); a missing,
    cut or replaced shard is one line too."""
    kind, damager = DAMAGE[damage]
    checkpoint = copy_run(request.getfixturevalue(kind), tmp_path)
    damaged = damager(checkpoint)
    with pytest.raises(SystemExit) as exit_info:
        main(command(name, tmp_path, corpus, checkpoint))
    assert exit_info.value.code == 2
    line = assert_one_error_naming(capsys.readouterr().err, damaged)
    if damage.startswith("rot"):
        assert "is damaged: the data of 1 tensor(s) (" in line and "does not match the digest" in line, line
    assert not (tmp_path / "exported").exists()


RANK1 = "__1_0.distcp"
ON_TWO_RANKS = {
    "planted-index": plant_in_index,
    "planted-shard": plant_in_shard_as_bytes,
    "planted-meta.pt": plant_in_meta,
    "rot-shard": lambda checkpoint, marker: rot_shard(checkpoint, RANK1),
    "deleted-shard": lambda checkpoint, marker: delete_shard(checkpoint, RANK1),
    "truncated-shard": lambda checkpoint, marker: truncate_shard(checkpoint, RANK1),
    "pickle-shard": lambda checkpoint, marker: pickle_over_shard(checkpoint, RANK1),
}


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("case", ON_TWO_RANKS)
def test_a_two_rank_resume_runs_no_planted_code_and_names_the_damaged_file(sharded2, tmp_path, corpus, case) -> None:
    """Each rank reads its own shard (rank 1 the damaged one); every rank stops, one line is printed."""
    checkpoint = copy_run(sharded2, tmp_path)
    marker = tmp_path / "code-ran"
    path = ON_TWO_RANKS[case](checkpoint, marker)
    result = subprocess_fit(tmp_path, corpus, 2, "--ckpt_path", str(checkpoint))
    assert not marker.exists(), "the planted code ran"
    assert result.returncode == 2, result.stderr[-4000:]
    assert_one_error_naming(result.stderr, path)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("name", ["export", "generate", "validate"])
@pytest.mark.parametrize("case", ["planted-index", "rot-shard", "truncated-shard"])
def test_a_two_rank_checkpoint_read_whole_names_the_damaged_file(sharded2, tmp_path, corpus, capsys, case, name):
    checkpoint = copy_run(sharded2, tmp_path)
    marker = tmp_path / "code-ran"
    path = ON_TWO_RANKS[case](checkpoint, marker)
    with pytest.raises(SystemExit) as exit_info:
        main(command(name, tmp_path, corpus, checkpoint))
    assert not marker.exists(), "the planted code ran"
    assert exit_info.value.code == 2
    assert_one_error_naming(capsys.readouterr().err, path)
