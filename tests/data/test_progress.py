"""Progress of long preparation steps: a bar on a terminal, log lines with rate and ETA anywhere else."""

from __future__ import annotations

import logging
import re
import time

import pytest

from mf_lightning.data import progress
from mf_lightning.data.progress import HEARTBEAT_S, LOG_EVERY_S, Heartbeat, LineClock, Progress, lines_every


def test_off_a_terminal_progress_is_logged_with_rate_and_time_left(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    with lines_every(0), caplog.at_level(logging.INFO, logger="mf_lightning.data.progress"):
        counter = Progress("tokenizing the corpus", total=4_000_000)
        time.sleep(0.01)
        counter.advance(1_000_000, documents=10)
        counter.close()
    (line,) = caplog.messages
    assert re.fullmatch(
        r"tokenizing the corpus: 25% \(1\.0 of 4\.0 MB\), [\d.]+ MB/s, 10 documents, \d+ s, about \d+ s left", line
    )


def test_on_a_terminal_progress_is_a_bar_with_rate_and_eta(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(progress, "on_terminal", lambda: True)
    counter = Progress("tokenizing the corpus", total=4_000_000)
    counter.advance(1_000_000)
    counter.close()
    bar = capsys.readouterr().err
    assert "tokenizing the corpus:  25%" in bar and "1.00M/4.00M" in bar and "B/s]" in bar


def test_a_heartbeat_logs_from_start_to_stop(caplog: pytest.LogCaptureFixture) -> None:
    beat = Heartbeat("merging", seconds=0.01)
    with caplog.at_level(logging.INFO, logger="mf_lightning.data.progress"):
        time.sleep(0.05)
        assert caplog.messages == []  # nothing before it starts
        beat.start()
        time.sleep(0.1)
        beat.stop()
    assert any(re.fullmatch(r"merging \(\d+ s\)", message) for message in caplog.messages)


class Monotonic:
    """Stands for ``time`` in ``progress``: ``monotonic`` reads ``now``, which only the test moves."""

    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now


def test_a_line_is_due_once_per_interval_and_always_for_the_last(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Monotonic()
    monkeypatch.setattr(progress, "time", clock)
    lines = LineClock(10)
    due = []
    for now in (105, 110, 115, 119.9, 120, 121):
        clock.now = now
        due.append(lines.due())
    assert due == [False, True, False, False, True, False]
    assert lines.due(last=True)
    lines.restart()
    clock.now = 130
    assert not lines.due() and LineClock(0).due()


def test_the_interval_is_the_one_lines_every_sets_until_its_block_ends() -> None:
    assert LineClock().seconds == LOG_EVERY_S
    with lines_every(5):
        assert LineClock().seconds == 5 and Heartbeat("merging").interval == 5
        with lines_every(0):
            assert LineClock().seconds == 0
            assert Heartbeat("merging").interval == HEARTBEAT_S, "no heartbeat loop without a pause"
        assert LineClock().seconds == 5
    assert LineClock().seconds == LOG_EVERY_S


@pytest.mark.parametrize("seconds, expected", [(3600, ["4.0 of 4.0"]), (0, ["1.0 of 4.0", "4.0 of 4.0"])])
def test_off_a_terminal_the_last_count_is_always_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, seconds: float, expected: list[str]
) -> None:
    """An interval longer than the step: only its last line; 0: a line per advance, none for no progress."""
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    with lines_every(seconds), caplog.at_level(logging.INFO, logger="mf_lightning.data.progress"):
        counter = Progress("tokenizing the corpus", total=4_000_000)
        counter.advance(1_000_000, documents=1)
        counter.advance(0)
        counter.advance(3_000_000, documents=3)
        counter.close()
    assert [re.search(r"\(([\d.]+ of [\d.]+) MB\)", message)[1] for message in caplog.messages] == expected
