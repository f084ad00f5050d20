"""One holder per lock file, across the processes of one host and the hosts sharing a file system.

``FileLock(path, what).acquire(wait=...)`` creates the lock file ``path`` naming its holder, or waits for
(``wait`` seconds, ``None`` for as long as it takes) or refuses (``LockHeld``) a live holder; ``release()``
(or leaving its ``with`` block) removes it. ``what`` is what the lock guards, for messages.

- **Creation is atomic**: the holder is written and fsynced under a temporary name (``atomic.partial_path``)
  and hard-linked to ``path``, which fails if ``path`` exists (atomic on local file systems and NFS), so
  of several claimers exactly one gets the lock, and a reader never sees a half-written holder.
- **The holder** is one line of JSON: ``{"host", "pid", "token", "what", "since", "heartbeat_seconds"}``;
  ``token`` is unique to one acquisition, so a lock is released or taken over only by comparing the whole
  holder, never by a host and pid that a later process may reuse.
- **Heartbeat**: while held, a thread touches the lock file every ``HEARTBEAT_SECONDS`` (its modification
  time). It stops touching it if the file no longer names this holder.
- **Staleness**: a holder on this host is gone when its process no longer runs (asked at once). A holder on
  another host cannot be asked: it is gone when its lock file has not changed for ``STALE_SECONDS`` of
  watching, measured on the watcher's own clock (the hosts' clocks need not agree), so taking over a lock
  whose host died costs at most ``STALE_SECONDS`` of waiting, and a live one is known within a heartbeat.
  A stale lock is removed under a short-lived guard file (``<lock>.takeover``) by one claimer only, after
  checking that it still holds the stale holder, so a fresh lock is never removed.
- **Signals**: while a lock is held, SIGTERM and SIGHUP that would kill the process outright (their handler
  is the default one) raise ``SystemExit(128 + signal)`` instead, so ``finally`` blocks and ``with`` blocks
  run and the lock is released; a handler someone else installed (Lightning's during training) is left alone.
- **A lock file that is not a lock** (a folder, bytes that are not UTF-8 JSON, a holder without its fields,
  a file that cannot be read) is ``LockFileUnreadable``, one error naming the file and what to do.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import signal
import stat
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from mf_lightning.fs.atomic import partial_path, remove_abandoned
from mf_lightning.fs.processes import is_running, this_host

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 30.0
"""How often a holder touches its lock file."""
STALE_SECONDS = 300.0
"""How long a lock file of another host must stay unchanged (ten missed heartbeats, beyond NFS's attribute
caching of up to 60 s) before its holder counts as gone and the lock is taken over."""
POLL_SECONDS = 0.5
"""How often a waiter looks at the lock again."""
TAKEOVER_RETRY_SECONDS = 0.01
"""How soon a claimer looks again while another one takes a stale lock over."""
ABANDONED_GUARD_SECONDS = 10.0
"""Age after which a takeover guard counts as left by a claimer killed while holding it."""
WAIT_LOG_SECONDS = 60.0
"""How often a waiter says whom it waits for."""
MAX_HOLDER_BYTES = 1 << 16
"""More than any holder line; a larger lock file is not read whole."""
MAX_PID = 1 << 31
RELEASING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
"""Signals that, while a lock is held, end the process through ``SystemExit`` instead of killing it outright."""


class LockHeld(ValueError):
    """A live process holds the lock (a ``ValueError``: ``mf`` reports it in one line)."""

    def __init__(self, message: str, path: Path, holder: Holder) -> None:
        super().__init__(message)
        self.path = path
        self.holder = holder


class LockFileUnreadable(ValueError):
    """The lock file exists but holds no holder this module wrote (a ``ValueError``: ``mf`` reports it in one line)."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: a process of a host, in one acquisition (``token``)."""

    host: str
    pid: int
    token: str
    what: str = ""
    since: float = 0.0
    heartbeat_seconds: float = HEARTBEAT_SECONDS

    @classmethod
    def of_this_process(cls, what: str) -> Holder:
        return cls(this_host(), os.getpid(), secrets.token_hex(8), what, time.time(), HEARTBEAT_SECONDS)

    def line(self) -> str:
        return json.dumps(asdict(self)) + "\n"

    def describe(self) -> str:
        """``process <pid> on host <host>``."""
        return f"process {self.pid} on host {self.host}"

    def is_local(self) -> bool:
        return self.host == this_host()


@dataclass(frozen=True)
class Sighting:
    """What a lock file held when it was read: its holder and modification time."""

    holder: Holder
    mtime_ns: int


class FileLock:
    """The lock file ``path``, guarding ``what`` (see the module)."""

    def __init__(self, path: str | os.PathLike, what: str) -> None:
        self.path = Path(path)
        self.what = what
        self.holder = Holder.of_this_process(what)
        self.held = False
        self.stop_beating = threading.Event()
        self.heartbeat: threading.Thread | None = None

    def __enter__(self) -> FileLock:
        if not self.held:
            self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def acquire(self, wait: float | None = None) -> FileLock:
        """Takes the lock, waiting at most ``wait`` seconds (``None``: as long as it takes) for a live holder to
        release it; raises ``LockHeld`` naming the holder after that.

        Whether a holder on another host is alive is learnt by watching its heartbeat, for up to
        ``STALE_SECONDS`` even with ``wait=0``: it is refused as soon as its lock file changes, and taken over if
        it does not.
        """
        if self.held:
            raise RuntimeError(f"{self.path} is already held by this lock object")
        deadline = None if wait is None else time.monotonic() + wait
        make_folder(self.path.parent)
        remove_abandoned(self.path.parent)  # holders staged by claimers killed before they linked them
        watch = Watch()
        logged = 0.0
        while not self.create():
            sighting = self.read()
            if sighting is None:
                continue  # released between the two calls
            alive = watch.alive(sighting)
            if alive is False:
                if not self.remove_stale(sighting.holder, watch.why):
                    time.sleep(TAKEOVER_RETRY_SECONDS)  # another claimer is taking it over
                continue
            if alive and deadline is not None and time.monotonic() >= deadline:
                raise self.held_by(sighting.holder)
            if time.monotonic() - logged >= WAIT_LOG_SECONDS:
                logged = time.monotonic()
                log.info(waiting_message(self.path, sighting.holder, alive))
            time.sleep(POLL_SECONDS)
        self.held = True
        self.start_heartbeat()
        RELEASE_ON_SIGNALS.hold()
        return self

    def release(self) -> None:
        """Stops the heartbeat and removes the lock file if it still names this holder; nothing if not held."""
        if not self.held:
            return
        self.held = False
        RELEASE_ON_SIGNALS.drop()
        self.stop_beating.set()
        if self.heartbeat is not None:
            self.heartbeat.join()
            self.heartbeat = None
        if self.still_mine():
            self.path.unlink(missing_ok=True)

    def held_by(self, holder: Holder) -> LockHeld:
        return LockHeld(
            f"{self.what} is in use by {holder.describe()} (lock {self.path}); wait for it to end "
            f"(if that process is gone, delete {self.path})",
            self.path,
            holder,
        )

    def create(self) -> bool:
        """Atomically creates the lock file holding this holder; False if it exists."""
        return create_holding(self.path, self.holder.line())

    def read(self) -> Sighting | None:
        """The lock file's holder and modification time; ``None`` when there is no lock file."""
        return read_sighting(self.path, self.what)

    def still_mine(self) -> bool:
        try:
            sighting = self.read()
        except LockFileUnreadable:
            return False
        return sighting is not None and sighting.holder == self.holder

    def remove_stale(self, stale: Holder, why: str) -> bool:
        """Removes the lock if it still names ``stale`` (logging ``why`` it is stale), under the takeover guard;
        False if another claimer holds the guard."""
        guard = self.path.with_name(f"{self.path.name}.takeover")
        if not create_holding(guard, self.holder.line()):
            other = read_sighting(guard, self.what)  # another claimer's guard, or something that is no guard
            if other is not None and time.time() - other.mtime_ns / 1e9 > ABANDONED_GUARD_SECONDS:
                guard.unlink(missing_ok=True)
            return False
        try:
            sighting = self.read()
            if sighting is not None and sighting.holder == stale:
                self.path.unlink(missing_ok=True)
                log.warning("removed the stale lock %s of %s (%s)", self.path, stale.describe(), why)
        finally:
            guard.unlink(missing_ok=True)
        return True

    def start_heartbeat(self) -> None:
        self.stop_beating.clear()
        self.heartbeat = threading.Thread(target=self.beat, name=f"mf-lock-heartbeat {self.path}", daemon=True)
        self.heartbeat.start()

    def beat(self) -> None:
        """Touches the lock file every ``HEARTBEAT_SECONDS`` while it names this holder."""
        while not self.stop_beating.wait(self.holder.heartbeat_seconds):
            if not self.still_mine():
                log.warning("the lock %s no longer names this process; its heartbeat stops", self.path)
                return
            try:
                os.utime(self.path)
            except OSError as error:
                log.warning("cannot touch the lock %s (%s); its heartbeat stops", self.path, error)
                return


class Watch:
    """Whether the holder of a lock file is alive, from what the file held each time it was read."""

    def __init__(self) -> None:
        self.seen: Sighting | None = None
        self.since = time.monotonic()
        self.beating = False
        self.why = ""

    def alive(self, sighting: Sighting) -> bool | None:
        """True: alive; False: gone (``why`` says how it was told); None: not known yet (another host's holder
        whose lock file has not changed since it was first seen, for less than ``STALE_SECONDS``)."""
        holder = sighting.holder
        if holder.is_local():
            self.why = f"process {holder.pid} no longer runs"
            return is_running(holder.pid)
        if self.seen is None or self.seen.holder != holder:
            self.seen, self.since, self.beating = sighting, time.monotonic(), False
        elif self.seen.mtime_ns != sighting.mtime_ns:
            self.seen, self.since, self.beating = sighting, time.monotonic(), True
        unchanged = time.monotonic() - self.since
        if unchanged >= STALE_SECONDS:
            self.why = f"its heartbeat stopped: the lock file did not change for {unchanged:.0f} s"
            return False
        return True if self.beating else None


def may_be_held(path: Path) -> bool:
    """Whether a process that may still run holds the lock file ``path``, judged from one look at it (for tidying up
    leftovers, not for taking the lock): its process runs, on this host; its file changed within ``STALE_SECONDS``,
    on another. A file that is no readable lock counts as held: only the user should remove it."""
    try:
        sighting = read_sighting(path, "a lock")
    except (OSError, LockFileUnreadable):
        return True
    if sighting is None:
        return False
    if sighting.holder.is_local():
        return is_running(sighting.holder.pid)
    return time.time() - sighting.mtime_ns / 1e9 < STALE_SECONDS


def waiting_message(path: Path, holder: Holder, alive: bool | None) -> str:
    if alive is None:
        return (
            f"the lock {path} is held by {holder.describe()}, which cannot be asked from here: waiting up to "
            f"{STALE_SECONDS:.0f} s for its heartbeat (a holder whose lock file does not change that long is gone)"
        )
    return f"waiting for {holder.describe()}, which holds {holder.what or path} (lock {path})"


def make_folder(folder: Path) -> None:
    """Creates the lock's folder; a path in the way that is a file is one error naming it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError as error:
        raise OSError(errno.ENOTDIR, "a file is in the way of the lock's folder", str(folder)) from error


def create_holding(path: Path, content: str) -> bool:
    """Atomically creates ``path`` holding ``content`` (written and fsynced under a temporary name, then
    hard-linked into place); False if ``path`` exists."""
    staged = partial_path(path)
    try:
        with staged.open("w", encoding="utf-8") as file:
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        os.link(staged, path)
    except FileExistsError:
        return False
    except OSError as error:
        raise OSError(error.errno, f"{error.strerror} (creating the lock file)", str(path)) from error
    finally:
        staged.unlink(missing_ok=True)
    return True


def read_sighting(path: Path, what: str) -> Sighting | None:
    """What the lock file ``path`` holds (``None`` when there is none); ``LockFileUnreadable`` when it is no lock
    of this module. Read through one open descriptor, so the contents and time belong together (and NFS
    revalidates both on open)."""
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not block the reader
    except FileNotFoundError:
        if os.path.lexists(path):
            raise unreadable(path, what, "it is a link to nothing") from None
        return None
    except OSError as error:
        raise unreadable(path, what, error.strerror or str(error)) from error
    try:
        status = os.fstat(descriptor)
        if stat.S_ISDIR(status.st_mode):
            raise unreadable(path, what, "it is a folder")
        if not stat.S_ISREG(status.st_mode):
            raise unreadable(path, what, "it is not a regular file")
        with os.fdopen(descriptor, "rb", closefd=False) as file:
            data = file.read(MAX_HOLDER_BYTES)
    except OSError as error:
        raise unreadable(path, what, error.strerror or str(error)) from error
    finally:
        os.close(descriptor)
    return Sighting(parse_holder(data, path, what), status.st_mtime_ns)


def parse_holder(data: bytes, path: Path, what: str) -> Holder:
    """The ``Holder`` of a lock file's bytes; ``LockFileUnreadable`` naming what is wrong with them."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise unreadable(path, what, f"its bytes are not UTF-8 text (byte {error.start})") from error
    try:
        fields: Any = json.loads(text)
    except json.JSONDecodeError as error:
        shown = text.strip()[:40] or "nothing"
        raise unreadable(path, what, f"it holds {shown!r}, not a holder written by mf") from error
    if not (
        isinstance(fields, dict)
        and isinstance(fields.get("host"), str)
        and type(fields.get("pid")) is int
        and 0 < fields["pid"] < MAX_PID
        and isinstance(fields.get("token"), str)
    ):
        raise unreadable(path, what, "it holds JSON without a holder's host, pid and token")
    known = {name: fields[name] for name in Holder.__dataclass_fields__ if name in fields}
    try:
        return Holder(**known)
    except TypeError as error:
        raise unreadable(path, what, str(error)) from error


def unreadable(path: Path, what: str, reason: str) -> LockFileUnreadable:
    guards = f" (it guards {what})" if what else ""
    return LockFileUnreadable(
        f"the lock file {path} cannot be read as a lock ({reason}){guards}; if no mf process is using it, "
        f"delete it (rm -r {path}) and run again"
    )


class SignalRelease:
    """Turns SIGTERM and SIGHUP into ``SystemExit`` while this process holds a lock (see the module).

    Installed by the main thread, for a signal whose handler is the default one, and put back when the last
    lock is released. The handler acts only while a lock is held, in the process that installed it, and
    while it is the installed handler: otherwise (a forked child, no lock held any more) the signal gets its
    default action, and a composition of handlers that includes it (Lightning's during training) is left to
    act alone.
    """

    def __init__(self) -> None:
        self.mutex = threading.Lock()
        self.held = 0
        self.owner = 0

    def hold(self) -> None:
        with self.mutex:
            self.held += 1
            if threading.current_thread() is threading.main_thread():
                self.owner = os.getpid()
                for signum in RELEASING_SIGNALS:
                    if signal.getsignal(signum) == signal.SIG_DFL:
                        signal.signal(signum, self.handle)

    def drop(self) -> None:
        with self.mutex:
            self.held -= 1
            if self.held == 0 and threading.current_thread() is threading.main_thread():
                for signum in RELEASING_SIGNALS:
                    if signal.getsignal(signum) == self.handle:
                        signal.signal(signum, signal.SIG_DFL)

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self.owner or self.held == 0:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if signal.getsignal(signum) == self.handle:
            raise SystemExit(128 + signum)


RELEASE_ON_SIGNALS = SignalRelease()
