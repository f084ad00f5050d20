"""The GPU suite's CPU-checkable part: ``--dry-run`` lists its steps, runs nothing, and every script it names exists."""

import pathlib
import re
import subprocess

REPO = pathlib.Path(__file__).resolve().parents[1]
SUITE = REPO / "benchmarks" / "gpu_suite.sh"


def test_dry_run_lists_the_four_steps_without_running_them(tmp_path):
    done = subprocess.run(
        ["bash", str(SUITE), "--dry-run"], capture_output=True, text=True, timeout=30,
        env={"PATH": "/usr/bin:/bin", "PYTHON": str(tmp_path / "no-python-here")},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    steps = re.findall(r"^step \d+: (.+)$", done.stdout, flags=re.M)
    assert steps == ["install", "kernel tests", "memory layer benchmark", "training throughput"]
    commands = re.findall(r"^  \$ (.+)$", done.stdout, flags=re.M)
    assert "pip install -q --no-index --no-deps --no-build-isolation -e ." in commands[0]
    assert "--target /tmp/mf_site .whl/*.whl" in commands[0], "carried wheels install beside, not over, torch"
    assert "pytest tests/kernels" in commands[1] and "--device cuda" in commands[2] and "--steps 60" in commands[3]
    assert all(command.split()[2] == str(tmp_path / "no-python-here") for command in commands[1:])
    for script in re.findall(r"(benchmarks/\S+\.py)", done.stdout):
        assert (REPO / script).is_file(), script
    assert not (tmp_path / "no-python-here").exists()


def test_unknown_argument_is_refused_with_usage():
    done = subprocess.run(["bash", str(SUITE), "--fast"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "usage: bash benchmarks/gpu_suite.sh [--dry-run]" in done.stderr
