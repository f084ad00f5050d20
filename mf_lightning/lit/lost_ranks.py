"""Naming the lost rank when a process of a multi-rank fit dies (SIGKILL, the OOM killer, a crash).

The surviving ranks then fail in their next collective with a raw gloo or NCCL error ("Connection
reset by peer") that names neither the rank nor what to do. ``lost_rank_error`` turns such a failure
into a ``RankLostError`` naming the lost rank where this process can tell: rank 0 of a node started the
node's other ranks (Lightning's launcher) and sees how they ended; another rank sees whether the
process that started it is gone. Elsewhere (torchrun, SLURM, a rank on another node) the survivors hold a
roll call in the job's store (the TCP store at ``MASTER_ADDR:MASTER_PORT`` the ranks met in, which outlives
the process group): each writes its rank, and the ranks that have not answered within ``EXIT_GRACE_SECONDS``
are named as not answering: killed, frozen or cut off (on a large job a live rank still blocked in another
collective is named too, so the message says "did not answer", not "died"). A stop signal meanwhile (torchrun
stops the survivors of a dead worker at once) ends the roll call early, naming the ranks silent so far. When the store cannot be
reached either (its host, rank 0 or torchrun's agent, is gone), the error says the connection to another
rank failed.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import torch

from mf_lightning.lit.lightning_private import launched_processes
from mf_lightning.lit.stop_signals import StoppedBySignal

PARENT_AT_START = os.getppid()
"""The process that started this one: rank 0 of the node for ranks that Lightning's launcher started."""

COMMUNICATION_FAILURE = re.compile(
    r"Connection (reset|closed) by peer|Broken pipe|Connection refused|NCCL communicator was aborted"
    r"|collective operation timeout|Timed out waiting \d+ms for \w+ operation"
)
"""What gloo and NCCL say when another rank is gone (a reset connection) or frozen (a timed-out collective)."""
FROZEN = "is stopped (SIGSTOP, or frozen) and did not answer within the collective timeout"
ROLL_CALL_KEY = "mf-roll-call"
"""The store keys the survivors of a lost rank write (``<key>/<restart>/<rank>``)."""
EXIT_GRACE_SECONDS = 5.0
"""How long a rank waits for the process of a lost rank to finish ending (its sockets close before it is
reaped or its children are handed on), so it can be named."""


class RankLostError(RuntimeError):
    """A rank of a multi-rank fit stopped, and this one could not go on; the message names the lost rank."""


def lost_rank_error(trainer: pl.Trainer | None, error: BaseException) -> RankLostError | None:
    """The ``RankLostError`` for ``error`` if it is this rank's failure to reach another rank, else None.

    Only communication errors qualify, so a bug that stops every rank keeps its traceback.
    """
    if trainer is None or trainer.world_size <= 1 or not isinstance(error, RuntimeError):
        return None
    if not isinstance(error, torch.distributed.DistError) and not COMMUNICATION_FAILURE.search(str(error)):
        return None
    lost = ended_children(trainer) + ended_parent(trainer) or silent_ranks(trainer)
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    culprit = "; ".join(lost) or f"the connection to another rank failed ({first_line})"
    return RankLostError(f"rank {trainer.global_rank} of {trainer.world_size} stopped: {culprit}")


def ended_children(trainer: pl.Trainer) -> list[str]:
    """How the ranks this process started (Lightning's subprocess launcher on each node's rank 0) ended, if they did."""
    processes = launched_processes(trainer)
    deadline = time.monotonic() + EXIT_GRACE_SECONDS
    ended = []
    for local_rank, process in enumerate(processes, start=1):
        rank = trainer.node_rank * trainer.num_devices + local_rank
        if is_stopped(process.pid):
            ended.append(f"rank {rank} (process {process.pid}) {FROZEN}")
            continue
        try:
            status = process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            continue
        ended.append(f"rank {rank} (process {process.pid}) {how_it_ended(status)}")
    return ended


def ended_parent(trainer: pl.Trainer) -> list[str]:
    """Rank 0 of this node, when it started this rank and is gone (this process was handed to another parent)."""
    if trainer.local_rank == 0:
        return []
    rank = trainer.node_rank * trainer.num_devices
    if is_stopped(PARENT_AT_START):
        return [f"rank {rank} (process {PARENT_AT_START}, which started this one) {FROZEN}"]
    deadline = time.monotonic() + EXIT_GRACE_SECONDS
    while os.getppid() == PARENT_AT_START:
        if time.monotonic() > deadline:
            return []
        time.sleep(0.05)
    return [f"rank {rank} (process {PARENT_AT_START}, which started this one) is gone"]


def silent_ranks(trainer: pl.Trainer) -> list[str]:
    """The ranks that do not answer a roll call in the job's store within ``EXIT_GRACE_SECONDS`` (see the module),
    or nothing when the store cannot be reached or every rank answers.

    A stop signal meanwhile (torchrun stops the survivors of a dead worker at once) ends the roll call with the
    ranks silent so far, and is dropped: this rank is ending anyway, with the lost-rank line."""
    address, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT", "")
    if not address or not port.isdigit():
        return []
    prefix = (
        f"{ROLL_CALL_KEY}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"  # a restart's store may be the same
    )
    deadline = time.monotonic() + EXIT_GRACE_SECONDS
    silent: list[int] | None = None
    waited = f"within {EXIT_GRACE_SECONDS:g} s"
    try:
        store = torch.distributed.TCPStore(
            address, int(port), is_master=False, timeout=timedelta(seconds=EXIT_GRACE_SECONDS)
        )
        store.set(f"{prefix}{trainer.global_rank}", "here")
        while True:
            silent = [rank for rank in range(trainer.world_size) if not store.check([f"{prefix}{rank}"])]
            if not silent or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
    except StoppedBySignal:
        waited = "before the launcher stopped this rank"
    except (RuntimeError, OSError):  # the store's host is gone or does not answer: DistError is a RuntimeError
        return []
    if not silent:
        return []
    ranks = ("rank " if len(silent) == 1 else "ranks ") + ", ".join(map(str, silent))
    return [f"{ranks} did not answer {waited} (killed, frozen or cut off)"]


def how_it_ended(status: int) -> str:
    """``killed by SIGKILL`` for a negative ``Popen`` status, ``exited with status N`` otherwise."""
    if status < 0:
        return f"was killed by {signal.Signals(-status).name}"
    return f"exited with status {status}"


def is_stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped (SIGSTOP, a debugger): state ``T`` or ``t`` in ``/proc/<pid>/stat``.

    A stopped rank keeps its connections open, so the others see no reset, only a timed-out collective."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] in (["T"], ["t"])
