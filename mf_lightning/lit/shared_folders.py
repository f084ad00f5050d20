"""Checking that every rank of a multi-rank run sees the folders rank 0 writes to.

Sharded checkpoints are written by every rank into one folder, and a resume reads each checkpoint on every
rank, so a run folder on node-local disks (pods without a shared volume, a relative
``trainer.default_root_dir`` started from different working directories) would train on and leave
checkpoints that lack other ranks' shards. ``check_shared_folder`` finds that before the first step: rank 0
writes a token file holding a random value, broadcasts the value, and every rank reads the file; if a rank
cannot, every rank raises the same ``FolderNotShared``. ``check_all_shards`` is the same check at each
sharded save: rank 0 looks for every rank's shard file before the checkpoint is moved into place.
``check_same_token_cache`` compares every rank's token cache with rank 0's and uses the token file to say why
they differ: a data cache folder that is not shared is allowed (each node prepares its own copy), different
data on different ranks is not.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch.strategies import Strategy

from mf_lightning.fs.atomic import write_atomic
from mf_lightning.fs.remote import is_remote

log = logging.getLogger(__name__)

TOKEN_PREFIX = ".mf-shared-"
"""Name of the token file (hidden, never a checkpoint name), followed by its random value."""
WHAT_TO_DO = (
    "put trainer.default_root_dir and checkpoint.dirpath on a file system that every node mounts at the same "
    "path (an absolute path on a shared volume)"
)
CACHE_WHAT_TO_DO = "put data.cache_dir on a file system that every node mounts at the same path (an absolute path)"


class FolderNotShared(ValueError):
    """A folder the ranks must share is not the same folder on every rank."""


def check_shared_folder(strategy: Strategy, folder: str | Path, option: str) -> None:
    """Raises ``FolderNotShared`` on every rank when some rank does not see the token rank 0 writes into ``folder``.

    Collective: every rank of ``strategy`` must call it with the same ``option`` (the setting ``folder`` comes
    from, named in the error). A single process, or a remote (URL) folder, is not checked.
    """
    if strategy.world_size <= 1 or is_remote(str(folder)):
        return
    blind = ranks_not_seeing(strategy, folder)
    if blind:
        raise FolderNotShared(
            f"{option} {as_rank_zero_sees(strategy, folder)} is not shared: {describe_ranks(blind)} cannot see the "
            f"file rank 0 wrote there; {WHAT_TO_DO}"
        )


def check_same_token_cache(strategy: Strategy, folder: str | Path, digest: str) -> None:
    """Raises ``FolderNotShared`` on every rank when some rank's token cache (its ``content_digest``: the tokenizer
    and every token) differs from rank 0's, naming the cache folder ``folder`` (``data.cache_dir``) and, from the
    token file, whether it is shared. Identical caches pass, shared or not: nodes with their own cache folder each
    prepare the data once (logged by rank 0), and train on the same windows. Collective; nothing for one process."""
    if strategy.world_size <= 1:
        return
    digests: list[str] = [""] * strategy.world_size
    torch.distributed.all_gather_object(digests, digest)
    differing = [rank for rank, other in enumerate(digests) if other != digests[0]]
    # a prepared cache may be read-only (a shared data set): then no token file, and nothing said about sharing
    checkable = strategy.broadcast(os.access(Path(folder).absolute(), os.W_OK) if strategy.is_global_zero else None)
    blind = ranks_not_seeing(strategy, folder) if checkable else []
    where = as_rank_zero_sees(strategy, folder)
    if not differing:
        if blind and strategy.is_global_zero:
            log.info(
                "data.cache_dir %s is not shared with %s: each node prepared its own copy of the token cache "
                "(identical on every rank); %s to prepare it once per job",
                where,
                describe_ranks(blind),
                CACHE_WHAT_TO_DO,
            )
        return
    different = f"{describe_ranks(differing)} prepared another token cache (tokenizer or tokens) than rank 0"
    same_text = "give data.source as one absolute path that every node sees with the same content"
    if blind:
        raise FolderNotShared(
            f"data.cache_dir {where} is not shared ({describe_ranks(blind)} cannot see the file rank 0 wrote there) "
            f"and {different}, so the ranks would train on different data; {CACHE_WHAT_TO_DO}, and {same_text}"
        )
    shared = "the shared " if checkable else ""
    raise FolderNotShared(
        f"{different} in {shared}data.cache_dir {where}, so the ranks would train on different data: data.source "
        f"is other text there; {same_text}"
    )


def ranks_not_seeing(strategy: Strategy, folder: str | Path) -> list[int]:
    """The ranks that cannot read the token file rank 0 writes into ``folder`` (every rank gets the list; the file
    is removed). Collective."""
    token = strategy.broadcast(secrets.token_hex(16) if strategy.is_global_zero else None)
    path = Path(folder).absolute() / f"{TOKEN_PREFIX}{token}"
    if strategy.is_global_zero:
        write_atomic(path, token, f"checking that every rank sees {folder}")
    strategy.barrier()
    try:
        seen = path.read_text() == token
    except OSError:
        seen = False
    blind = ranks_without(strategy, seen)
    if strategy.is_global_zero:
        path.unlink(missing_ok=True)
    return blind


def as_rank_zero_sees(strategy: Strategy, folder: str | Path) -> str:
    """``<rank 0's absolute folder> (as rank 0 on host <host> sees it)``, on every rank. Collective."""
    where, host = strategy.broadcast((str(Path(folder).absolute()), socket.gethostname()))
    return f"{where} (as rank 0 on host {host} sees it)"


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
