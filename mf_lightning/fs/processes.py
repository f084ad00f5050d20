"""Who writes: this host's name and whether a process of this host still runs.

Temporary files and lock holders record their writer's host and process id, so that what a process
killed outright left behind can be told from what a live one is still writing: on this host by
asking whether the process exists, on another host not at all (the lock's heartbeat answers that).
"""

from __future__ import annotations

import os
import socket


def this_host() -> str:
    """This machine's host name, as other processes on it see it."""
    return socket.gethostname()


def is_running(pid: int) -> bool:
    """Whether a process with id ``pid`` exists on this host (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
