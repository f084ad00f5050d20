"""Cheap start-up: ``mf``, ``mf --help`` and every ``mf <subcommand> --help`` import neither torch nor Lightning,
and ``mf --help`` takes at most half the time of ``import torch``; the help they print is the real parsers'."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

import mf_lightning
from mf_lightning import commands
from mf_lightning.commands import SUBCOMMANDS, help_snapshot, overview

REPO = Path(__file__).resolve().parents[1]
ENTRY_POINT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]["mf"]
HEAVY = ("torch", "lightning", "pytorch_lightning", "triton")


def mf(*argv: str, importtime: bool = False) -> subprocess.CompletedProcess:
    """Runs ``mf <argv>`` in a fresh interpreter exactly as the installed ``mf`` script does: it calls the
    project's ``[project.scripts]`` entry point."""
    module, function = ENTRY_POINT.split(":")
    code = f"import sys; sys.argv = ['mf', *{list(argv)!r}]; from {module} import {function}; {function}()"
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def imported(importtime_log: str) -> set[str]:
    """The modules ``-X importtime`` reports imported."""
    return {line.rsplit("|", 1)[1].strip() for line in importtime_log.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize(
    ("argv", "status"),
    [((), 0), (("--help",), 0), (("nope",), 2)]
    + [((name, "--help"), 0) for name in SUBCOMMANDS]
    + [(("fit", "-h"), 0)],
    ids=lambda value: " ".join(value) if isinstance(value, tuple) else str(value),
)
def test_help_imports_neither_torch_nor_lightning(argv: tuple[str, ...], status: int) -> None:
    done = mf(*argv, importtime=True)
    assert done.returncode == status, done.stderr[-2000:]
    modules = imported(done.stderr)
    assert "mf_lightning.commands" in modules  # the log was read
    heavy = sorted(name for name in modules if name.split(".")[0] in HEAVY)
    assert not heavy, f"mf {' '.join(argv)} imported {heavy[:5]}"
    if len(argv) == 2:
        assert done.stdout == help_snapshot(argv[0])
    elif status == 0:
        assert done.stdout == overview() + "\n"
    else:
        assert done.stderr.splitlines()[-1].startswith("mf: error: unknown subcommand 'nope'; choose from fit,")


def test_python_m_mf_lightning_answers_help_as_cheaply() -> None:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "mf_lightning", "fit", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout == help_snapshot("fit")
    assert not [name for name in imported(done.stderr) if name.split(".")[0] in HEAVY]


def fastest_wall_seconds(command: list[str], repeats: int = 3) -> float:
    """The least wall time of ``repeats`` runs (the least disturbed by other work on the machine)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, cwd=REPO, capture_output=True, check=True, timeout=300)
        times.append(time.perf_counter() - start)
    return min(times)


def test_mf_help_takes_at_most_half_the_time_of_importing_torch() -> None:
    module, function = ENTRY_POINT.split(":")
    help_code = f"import sys; sys.argv = ['mf', '--help']; from {module} import {function}; {function}()"
    torch_seconds = fastest_wall_seconds([sys.executable, "-c", "import torch"])
    help_seconds = fastest_wall_seconds([sys.executable, "-c", help_code])
    assert help_seconds <= 0.5 * torch_seconds, f"mf --help {help_seconds:.3f} s, import torch {torch_seconds:.3f} s"


@pytest.mark.slow
def test_the_help_snapshots_are_what_the_real_parsers_print() -> None:
    """Renders every subcommand's help from its parser (with Lightning) in a fresh process and compares."""
    done = subprocess.run(
        [sys.executable, "tests/help_snapshots.py", "--check"], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_mf_version_answers_without_importing_torch(flag: str) -> None:
    done = mf(flag, importtime=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == f"mf {mf_lightning.__version__}\n"
    assert not sorted(name for name in imported(done.stderr) if name.split(".")[0] in HEAVY)


def test_the_version_of_a_source_checkout_is_the_packages(monkeypatch) -> None:
    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert commands.version() == mf_lightning.__version__
