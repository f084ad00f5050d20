"""Checking that every rank of a multi-rank run sees the folders rank 0 writes to.

Sharded checkpoints are written by every rank into one folder, and a resume reads each checkpoint on every
rank, so a run folder on node-local disks (pods without a shared volume, a relative
``trainer.default_root_dir`` started from different working directories) would train on and leave
checkpoints that lack other ranks' shards. ``check_shared_folder`` finds that before the first step: rank 0
writes a token file holding a random value, broadcasts the value, and every rank reads the file; if a rank
cannot, every rank raises the same ``FolderNotShared``. ``check_all_shards`` is the same check at each
sharded save: rank 0 looks for every rank's shard file before the checkpoint is moved into place.
"""

from __future__ import annotations

import secrets
import socket
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch.strategies import Strategy

from mf_lightning.fs.atomic import write_atomic
from mf_lightning.fs.remote import is_remote

TOKEN_PREFIX = ".mf-shared-"
"""Name of the token file (hidden, never a checkpoint name), followed by its random value."""
WHAT_TO_DO = (
    "put trainer.default_root_dir and checkpoint.dirpath on a file system that every node mounts at the same "
    "path (an absolute path on a shared volume)"
)


class FolderNotShared(ValueError):
    """A folder the ranks must share is not the same folder on every rank."""


def check_shared_folder(strategy: Strategy, folder: str | Path, option: str) -> None:
    """Raises ``FolderNotShared`` on every rank when some rank does not see the token rank 0 writes into ``folder``.

    Collective: every rank of ``strategy`` must call it with the same ``option`` (the setting ``folder`` comes
    from, named in the error). A single process, or a remote (URL) folder, is not checked.
    """
    if strategy.world_size <= 1 or is_remote(str(folder)):
        return
    token = strategy.broadcast(secrets.token_hex(16) if strategy.is_global_zero else None)
    path = Path(folder).absolute() / f"{TOKEN_PREFIX}{token}"
    if strategy.is_global_zero:
        write_atomic(path, token, "checking that every rank sees the run folder")
    strategy.barrier()
    try:
        seen = path.read_text() == token
    except OSError:
        seen = False
    blind = ranks_without(strategy, seen)
    if strategy.is_global_zero:
        path.unlink(missing_ok=True)
    if blind:
        where = strategy.broadcast(str(path.parent))
        raise FolderNotShared(
            f"{option} {where} (as rank 0 on host {strategy.broadcast(socket.gethostname())} sees it) is not "
            f"shared: {describe_ranks(blind)} cannot see the file rank 0 wrote there; {WHAT_TO_DO}"
        )


def check_all_shards(strategy: Strategy, missing: Sequence[int], target: Path) -> None:
    """Raises ``FolderNotShared`` on every rank when rank 0 found the shards of the ranks ``missing`` (rank 0's
    list; the others pass anything) absent from the checkpoint it is about to move to ``target``. Collective."""
    missing = strategy.broadcast(list(missing))
    if missing:
        raise FolderNotShared(
            f"checkpoint {target} was not saved: the shards of {describe_ranks(missing)} are not in "
            f"{target.parent} as rank 0 sees it, so the folder is not shared; {WHAT_TO_DO}, or set "
            "FSDP2Strategy's save_distributed_checkpoint: false (one file written by rank 0)"
        )


def ranks_without(strategy: Strategy, ok: bool) -> list[int]:
    """The ranks whose ``ok`` is False (every rank gets the list). Collective."""
    flags = [False] * strategy.world_size
    torch.distributed.all_gather_object(flags, ok)
    return [rank for rank, flag in enumerate(flags) if not flag]


def describe_ranks(ranks: Sequence[int]) -> str:
    """``rank 1`` or ``ranks 1, 3``."""
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))
