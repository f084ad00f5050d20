"""The signals that stop ``mf fit`` (SIGTERM, SIGUSR1, SIGINT), owned by one handler from the first second to the last.

A scheduler may signal any rank at any moment: SLURM sends SIGUSR1 ahead of a time limit (``--signal=USR1@90``)
and SIGTERM at preemption or ``scancel``, Kubernetes and spot instances SIGTERM, a terminal SIGINT. Left to their
defaults, SIGUSR1 kills the process outright (status 138, no save, locks left) and SIGTERM during data
preparation dies without a message; left to Lightning, SIGUSR1 under SLURM writes a stray ``hpc_ckpt_*.ckpt``
mid-step and one rank's SIGTERM handler broadcasts alone, which hangs a multi-rank job. So ``mf fit`` installs
``StopSignals`` before it does anything, and the handler has two modes:

- **stopping** (preparation: tokenizer training, cache building, model set-up; an evaluation): the first
  signal raises ``StoppedBySignal`` in the main thread, which unwinds every ``finally`` and ``with`` block (the
  preparation and run locks are released, staging files removed) and ``mf`` exits with one line;
- **noting** (while the fit loop runs, switched by ``PreemptionCheckpoint``): the signal is only recorded; the
  ranks combine their records after every optimizer step and all stop at the same step and save ``last.ckpt``.
  A second SIGINT while noting (Ctrl-C pressed twice) stops at once, without a save, even in the middle of a save
  (whose staging file is removed, so ``last.ckpt`` stays the previous whole checkpoint), as ``StoppedBySignal``
  with ``during_training`` set: not as ``KeyboardInterrupt``, which Lightning turns into exit status 1 and no line.

Once the handler has raised, or the fit loop has ended (stopped and saved, or finished: ``finish``), the process is
on its way out: later signals are only recorded, so that a repeated signal (a scheduler's SIGTERM after its SIGUSR1,
Ctrl-C held down) cannot interrupt the ``finally`` blocks that release the locks and remove the staging files, nor
end a run whose ``last.ckpt`` was saved with a line saying nothing was.

A forked child inherits the handler but not the job: there the signal gets its default action.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
"""The signals that stop a fit with a save once training started."""
PREEMPTED_EXIT_STATUS = 128 + signal.SIGTERM
"""Exit status of ``mf`` stopped by SIGTERM or SIGUSR1 (143, as a shell reports SIGTERM): "preempted, resume"."""
INTERRUPTED_EXIT_STATUS = 128 + signal.SIGINT
"""Exit status of ``mf`` stopped by SIGINT alone (130, as a shell reports Ctrl-C)."""


class StoppedBySignal(BaseException):
    """A stop signal arrived outside the fit loop, or a second SIGINT inside it; a ``BaseException`` (like
    ``KeyboardInterrupt``), so that no ``except Exception`` on the way turns it into another error."""

    def __init__(self, signum: int, during_training: bool = False) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.during_training = during_training
        """Whether it stopped the fit loop itself (a second SIGINT while noting), not the preparation before it."""


def exit_status(signums: set[int]) -> int:
    """The exit status of a run stopped by ``signums`` (those any rank received): 143 if SIGTERM or SIGUSR1 is among
    them (the scheduler's), else 130 (SIGINT)."""
    return INTERRUPTED_EXIT_STATUS if signums <= {signal.SIGINT} else PREEMPTED_EXIT_STATUS


def signal_names(signums: set[int]) -> str:
    """``SIGTERM``, or ``SIGINT and SIGUSR1``: the signals named in messages, in a fixed order."""
    return " and ".join(signal.Signals(signum).name for signum in sorted(signums))


class StopSignals:
    """This process's handler of ``STOP_SIGNALS`` (see the module); ``STOP_SIGNALS_HANDLER`` is the one instance."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.previous: dict[int, Any] = {}
        self.noting = False
        self.stopping = False
        """Whether the process is on its way out (``handle`` raised, or ``finish``): later signals are only recorded."""
        self.received: set[int] = set()
        self.agreed: set[int] = set()
        """The signals the ranks together stopped a fit for (``PreemptionCheckpoint``): what ``mf`` exits with."""

    @property
    def installed(self) -> bool:
        return self.pid == os.getpid() and signal.getsignal(signal.SIGTERM) == self.handle

    def install(self) -> None:
        """Takes over ``STOP_SIGNALS`` in this process; ``uninstall`` gives them back. Outside the main thread, where
        Python neither installs handlers nor runs them, nothing is done."""
        if self.installed or threading.current_thread() is not threading.main_thread():
            return
        self.pid, self.noting, self.stopping, self.received, self.agreed = os.getpid(), False, False, set(), set()
        self.previous = {signum: signal.signal(signum, self.handle) for signum in STOP_SIGNALS}

    def uninstall(self) -> None:
        """Puts back the handlers ``install`` replaced."""
        if self.pid != os.getpid():
            return
        for signum, handler in self.previous.items():
            if signal.getsignal(signum) == self.handle:
                signal.signal(signum, handler)
        self.pid, self.previous, self.noting = None, {}, False

    @contextmanager
    def owning(self) -> Iterator[StopSignals]:
        """``install`` for the duration of the block, ``uninstall`` after it (nothing if already installed)."""
        if self.installed:
            yield self
            return
        self.install()
        try:
            yield self
        finally:
            self.uninstall()

    def note(self) -> None:
        """Records signals from now on instead of stopping (the fit loop, which stops every rank at one step)."""
        self.noting = True

    def stop(self) -> None:
        """Stops at the next signal from now on (a stage starting: a fit's preparation, an evaluation); one already
        recorded stays recorded."""
        self.noting, self.stopping = False, False

    def finish(self) -> None:
        """Only records signals from now on: the fit loop has ended, and what is left (closing the logs, releasing
        the locks) must complete."""
        self.stopping = True

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.pid != os.getpid():  # a forked child: the signal's default action
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        repeated_sigint = signum == signal.SIGINT and signal.SIGINT in self.received
        self.received.add(signum)
        if self.stopping or (self.noting and not repeated_sigint):
            return
        self.stopping = True
        raise StoppedBySignal(signum, during_training=self.noting)


STOP_SIGNALS_HANDLER = StopSignals()
"""The process's one ``StopSignals``: ``mf fit`` installs it first, ``PreemptionCheckpoint`` switches its mode."""
