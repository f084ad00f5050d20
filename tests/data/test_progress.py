"""Progress of long preparation steps: a bar on a terminal, log lines with rate and ETA anywhere else."""

from __future__ import annotations

import logging
import re
import time

import pytest

from mf_lightning.data import progress
from mf_lightning.data.progress import Heartbeat, Progress


def test_off_a_terminal_progress_is_logged_with_rate_and_time_left(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    monkeypatch.setattr(progress, "PROGRESS_SECONDS", 0.0)
    with caplog.at_level(logging.INFO, logger="mf_lightning.data.progress"):
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
