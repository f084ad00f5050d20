"""A run's new TensorBoard event file sorts after those already in its folder: the clock is waited for, or a
skewed clock is named."""

from pathlib import Path

import pytest
from cli_support import FrozenClock

from mf_lightning.lit import event_files
from mf_lightning.lit.event_files import MAX_WAIT_S, follow_event_files, newest_event_second

NOW = 1_800_000_000.25


@pytest.fixture
def clock(monkeypatch) -> FrozenClock:
    clock = FrozenClock(NOW)
    monkeypatch.setattr(event_files, "time", clock)
    return clock


def event_file(folder: Path, second: float, writer: int = 0) -> None:
    """An event file named as TensorBoard's writers name them, created at ``second``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"events.out.tfevents.{int(second):010d}.host.123.{writer}").write_bytes(b"")


def test_the_newest_event_file_is_read_from_the_names(tmp_path) -> None:
    event_file(tmp_path, NOW - 60, writer=10)
    event_file(tmp_path, NOW - 5, writer=9)
    (tmp_path / "config.yaml").write_text("not an event file")
    event_file(tmp_path / "validate", NOW + 100)  # another run's folder
    assert newest_event_second(tmp_path) == int(NOW - 5)
    assert newest_event_second(tmp_path / "missing") is None


@pytest.mark.parametrize("newest", [None, NOW - 1])
def test_no_wait_when_the_clock_is_already_past(tmp_path, clock, newest) -> None:
    if newest is not None:
        event_file(tmp_path, newest)
    follow_event_files(tmp_path)
    assert clock.now == NOW


@pytest.mark.parametrize("ahead", [0, 4])
def test_waits_until_the_next_file_is_named_after_the_newest(tmp_path, clock, ahead) -> None:
    """The same second (a quick resume in one process) or a clock a little behind the newest file's."""
    event_file(tmp_path, NOW + ahead)
    follow_event_files(tmp_path)
    assert int(clock.now) == int(NOW) + ahead + 1


def test_a_clock_far_behind_is_named_instead_of_waited_for(tmp_path, clock) -> None:
    event_file(tmp_path, NOW + MAX_WAIT_S + 50)
    with pytest.warns(UserWarning, match=rf"{tmp_path}.* up to 60 s ahead of this machine's clock.*NTP"):
        follow_event_files(tmp_path)
    assert clock.now == NOW
