"""``mf fit``'s progress: plain log lines when its output is a file, the rich bar on a terminal; its data
preparation's lines follow the same ``progress.log_every_s``."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys

import pytest
from cli_support import REPO, tiny_run_args, write_corpus

TRAIN_LINE = re.compile(
    r"train: step (\d+)/6 · [\d.]+( [KMBT])? tokens · loss [\d.]+ · [\d.]+( [KMBT])? tokens/s · ETA (\d+ s|\d+ min|[\d.]+ h|\?)"
)
VALIDATION_LINE = re.compile(r"validation: batch (\d+)/2 · ETA")
PREPARATION_LINE = re.compile(
    r"^(reading text for bpe:300|tokenizing the corpus|merging the parts into the cache): .*, (\d+) documents, ",
    re.MULTILINE,
)


def mf_fit(tmp_path) -> list[str]:
    corpus = write_corpus(tmp_path / "corpus")
    args = tiny_run_args(tmp_path / "run", corpus, **{"trainer.enable_progress_bar": True, "progress.log_every_s": 0})
    return [sys.executable, "-m", "mf_lightning", "fit", *args]


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "160"}


@pytest.mark.slow
def test_redirected_output_gets_a_progress_line_per_interval(tmp_path):
    log = tmp_path / "fit.log"
    with log.open("w") as output:
        result = subprocess.run(mf_fit(tmp_path), stdout=output, stderr=output, env=environment(), timeout=300)
    text = log.read_text()
    assert result.returncode == 0, text[-3000:]
    assert [int(match[1]) for match in TRAIN_LINE.finditer(text)] == [1, 2, 3, 4, 5, 6], text[-3000:]
    assert {int(match[1]) for match in VALIDATION_LINE.finditer(text)} == {1, 2}
    assert "Step 6/6" not in text  # no bar drawn into the file


@pytest.mark.slow
@pytest.mark.parametrize("log_every_s", [0, 3600])
def test_redirected_preparation_logs_at_the_progress_interval(tmp_path, log_every_s):
    """0: a line per unit of progress (BPE training reads the corpus document by document); an interval longer
    than the preparation: the last line of each step only."""
    corpus = write_corpus(tmp_path / "corpus")
    settings = {"progress.log_every_s": log_every_s, "data.tokenizer": "bpe:300", "trainer.max_steps": 1}
    log = tmp_path / "fit.log"
    with log.open("w") as output:
        command = [sys.executable, "-m", "mf_lightning", "fit", *tiny_run_args(tmp_path / "run", corpus, **settings)]
        result = subprocess.run(command, stdout=output, stderr=output, env=environment(), timeout=300)
    text = log.read_text()
    assert result.returncode == 0, text[-3000:]
    lines = [(match[1], int(match[2])) for match in PREPARATION_LINE.finditer(text)]
    read = [documents for step, documents in lines if step.startswith("reading")]
    assert read == (list(range(1, 25)) if log_every_s == 0 else [24]), text[:3000]
    assert [step for step, _ in lines if not step.startswith("reading")] == [
        "tokenizing the corpus",
        "merging the parts into the cache",
    ], text[:3000]
    assert all(documents == 24 for step, documents in lines if not step.startswith("reading"))


@pytest.mark.slow
def test_a_terminal_gets_the_bar(tmp_path):
    controller, terminal = pty.openpty()
    process = subprocess.Popen(mf_fit(tmp_path), stdout=terminal, stderr=terminal, env=environment())
    os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the terminal closed: the process ended
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(controller)
    assert process.wait(timeout=300) == 0
    text = b"".join(chunks).decode(errors="replace")
    assert "Step 6/6" in text, text[-3000:]
    assert not TRAIN_LINE.search(text)
