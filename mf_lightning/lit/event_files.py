"""A TensorBoard event file a run creates sorts after the event files already in its folder.

TensorBoard reads the event files of a run folder in name order, and where several hold a tag, the last
value read is the tag's latest one: the value the HParams table shows and a resumed curve ends on. The
writers name their files ``events.out.tfevents.<second>.<host>.<pid>.<n>``, so name order is creation
order only when the seconds differ: within one second the host, the process id and the process's writer
count ``n`` are compared as text (writer 10 sorts before writer 9), and a clock behind the one that named
the folder's newest file (a run resumed on another machine) sorts every new file first. A resumed run
would then show the earlier run's values as its final ones.

``follow_event_files`` runs before a logger creates its writer: it waits until this machine's clock is
past the second of the folder's newest event file (at most a second when the clocks agree), or, when that
second is further ahead than ``MAX_WAIT_S``, warns that the folder's values will read as the earlier run's.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

EVENT_FILE_NAME = re.compile(r"events\.out\.tfevents\.(\d+)\.")
"""The name TensorBoard's writers give an event file, and the second it was created in."""
MAX_WAIT_S = 10.0
"""The longest wait for the clock: longer means the clocks disagree (fix the machine's), not a quick resume."""


def newest_event_second(folder: Path) -> int | None:
    """The second the newest event file directly in ``folder`` was created in (from its name); None without one."""
    if not folder.is_dir():
        return None
    seconds = [int(match[1]) for path in folder.iterdir() if (match := EVENT_FILE_NAME.match(path.name))]
    return max(seconds, default=None)


def follow_event_files(folder: Path) -> None:
    """Returns once an event file created in ``folder`` from now on is named after every one already there
    (see the module); warns instead of waiting longer than ``MAX_WAIT_S``."""
    newest = newest_event_second(folder)
    if newest is None:
        return
    wait = newest + 1 - time.time()
    if wait > MAX_WAIT_S:
        rank_zero_warn(
            f"the event files in {folder} are dated up to {math.ceil(wait - 1)} s ahead of this machine's clock: "
            "TensorBoard reads this run's events before theirs, so the HParams table and the curves' latest values "
            "will be the earlier run's; set this machine's clock right (NTP) before resuming in that folder"
        )
        return
    if wait > 1:
        rank_zero_info(f"waiting {wait:.0f} s for this machine's clock to pass the newest event file's in {folder}")
    while wait > 0:
        time.sleep(wait)
        wait = newest + 1 - time.time()
