"""The run lock: one mf fit per folder, claimed by the process that will be global rank 0, refused in one line.

The lock itself (atomic creation, heartbeat, staleness, odd lock files, signals) is tested in tests/fs/test_lock.py.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import types
from pathlib import Path

import lightning.pytorch as pl
import pytest
from cli_support import run, tiny_run_args, write_corpus
from lightning.fabric.plugins.environments import mpi

from mf_lightning.lit.run_lock import LOCK_NAME, RunFolderInUse, claim_run_folder


def held_by(pid: int) -> str:
    """A lock line of a live process ``pid`` of this host (another mf fit, or rank 0 of this job)."""
    return json.dumps({"host": socket.gethostname(), "pid": pid, "token": "feedface", "what": "a run"}) + "\n"


def test_a_claim_holds_the_lock_file_until_released(tmp_path: Path) -> None:
    lock = claim_run_folder(tmp_path / "run")
    assert lock.path == tmp_path / "run" / LOCK_NAME
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    lock.release()
    assert os.listdir(tmp_path / "run") == []


def test_a_folder_held_by_a_running_process_is_refused_naming_it(tmp_path: Path) -> None:
    (tmp_path / LOCK_NAME).write_text(held_by(os.getppid()))
    with pytest.raises(RunFolderInUse) as error:
        claim_run_folder(tmp_path)
    message = str(error.value)
    assert f"{tmp_path} is in use by another mf fit (process {os.getppid()} on host {socket.gethostname()})" in message
    assert f"delete {tmp_path / LOCK_NAME}" in message


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture
def fit_reached(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``Trainer.fit`` replaced by a note of the lock file it found, so a fit stops once it would train."""
    seen: list[str] = []

    def fit(trainer: pl.Trainer, *args: object, **kwargs: object) -> None:
        lock = Path(trainer.default_root_dir) / LOCK_NAME
        seen.append(lock.read_text() if lock.exists() else "no lock")

    monkeypatch.setattr(pl.Trainer, "fit", fit)
    return seen


class FakeWorld:
    """``mpi4py.MPI.COMM_WORLD`` of a one-node ``mpirun`` job, its rank and size read from the launcher's variables,
    with the collectives Lightning's ``MPIEnvironment`` calls answered as that job's would be."""

    def __init__(self, rank_variable: str, size_variable: str) -> None:
        self.rank_variable, self.size_variable = rank_variable, size_variable

    def Get_rank(self) -> int:
        return int(os.environ[self.rank_variable])

    def Get_size(self) -> int:
        return int(os.environ[self.size_variable])

    def gather(self, value: object, root: int = 0) -> list[object]:
        return [value] * self.Get_size()

    def bcast(self, value: object, root: int = 0) -> object:
        return value

    def Split(self, color: int) -> FakeWorld:
        return self


def fake_mpi(monkeypatch: pytest.MonkeyPatch, rank_variable: str, size_variable: str) -> None:
    """``mpi4py`` as it is under ``mpirun`` (not installed here)."""
    module = types.ModuleType("mpi4py")
    module.MPI = types.SimpleNamespace(COMM_WORLD=FakeWorld(rank_variable, size_variable), Comm=object)
    monkeypatch.setitem(sys.modules, "mpi4py", module)
    monkeypatch.setattr(mpi, "_MPI4PY_AVAILABLE", True)


def ddp_args(root: Path, corpus: Path) -> list[str]:
    extra = {"trainer.strategy": "ddp", "trainer.devices": 2, "trainer.accelerator": "cpu"}
    return tiny_run_args(root, corpus, **extra)


@pytest.mark.parametrize("variables", [("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE")])
def test_under_mpi_a_non_zero_rank_does_not_take_the_run_lock(
    tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch, fit_reached: list[str], variables: tuple[str, str]
) -> None:
    """Rank 0 of the job holds the lock (here: the parent process); rank 1 goes on to train without claiming."""
    monkeypatch.setenv(variables[0], "1")
    monkeypatch.setenv(variables[1], "2")
    fake_mpi(monkeypatch, *variables)
    root = tmp_path / "run"
    root.mkdir()
    (root / LOCK_NAME).write_text(held_by(os.getppid()))
    run("fit", ddp_args(root, corpus))
    assert fit_reached == [held_by(os.getppid())], "rank 1 reached fit and left rank 0's lock alone"


def test_under_mpi_rank_0_takes_the_run_lock(
    tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch, fit_reached: list[str]
) -> None:
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "0")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    fake_mpi(monkeypatch, "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE")
    run("fit", ddp_args(tmp_path, corpus))
    (holder,) = fit_reached
    assert json.loads(holder)["pid"] == os.getpid()
    assert not (tmp_path / LOCK_NAME).exists(), "released when the CLI ended"


def test_rank_variables_that_lightning_does_not_act_on_do_not_excuse_a_process_from_the_lock(
    tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, fit_reached: list[str]
) -> None:
    """Without mpi4py Lightning runs each process of ``mpirun`` as a job of its own, all writing this folder: each
    must claim it, so all but one are refused."""
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    (tmp_path / LOCK_NAME).write_text(held_by(os.getppid()))
    with pytest.raises(SystemExit) as exit_info:
        run("fit", tiny_run_args(tmp_path, corpus))
    assert exit_info.value.code == 2 and fit_reached == []
    assert f"mf: error: {tmp_path} is in use by another mf fit" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["folder", "not-utf8"])
def test_an_odd_lock_file_stops_mf_fit_with_one_line_naming_it(
    tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture, fit_reached: list[str], kind: str
) -> None:
    lock = tmp_path / LOCK_NAME
    if kind == "folder":
        lock.mkdir()
    else:
        lock.write_bytes(b"\xff\xfe\x80 not text")
    with pytest.raises(SystemExit) as exit_info:
        run("fit", tiny_run_args(tmp_path, corpus))
    assert exit_info.value.code == 2 and fit_reached == []
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("mf: error:")]
    assert line.startswith(f"mf: error: the lock file {lock} cannot be read as a lock (")
    assert f"delete it (rm -r {lock}) and run again" in line
    assert "Traceback" not in err
