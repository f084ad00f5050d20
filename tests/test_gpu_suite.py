"""The GPU suite's CPU-checkable part: ``--dry-run`` lists its steps, runs nothing, and every script it names
exists; the scripts it runs import only what the GPU image has. (``--rehearse``, which runs every step on the
CPU in a fresh venv of the image's packages, takes minutes: ``.ci/run`` runs it.)"""

import ast
import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
SUITE = REPO / "benchmarks" / "gpu_suite.sh"


def test_dry_run_lists_the_five_steps_without_running_them(tmp_path):
    done = subprocess.run(
        ["bash", str(SUITE), "--dry-run"], capture_output=True, text=True, timeout=30,
        env={"PATH": "/usr/bin:/bin", "PYTHON": str(tmp_path / "no-python-here")},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    steps = re.findall(r"^step \d+: (.+)$", done.stdout, flags=re.M)
    assert steps == ["install", "doctor", "kernel tests", "memory layer benchmark", "training throughput"]
    commands = re.findall(r"^  \$ (.+)$", done.stdout, flags=re.M)
    assert "pip install -q --no-index --no-deps --no-build-isolation -e ." in commands[0]
    assert "--target /tmp/mf_site .whl/*.whl" in commands[0], "carried wheels install beside, not over, torch"
    assert "-m mf_lightning doctor --device cuda --out benchmarks/results/doctor_gpu.md" in commands[1]
    assert "pytest tests/kernels" in commands[2] and "--device cuda" in commands[3] and "--steps 40" in commands[4]
    assert all(command.startswith("timeout ") for command in commands[1:]), "every step after the install has a limit"
    assert all(command.split()[2] == str(tmp_path / "no-python-here") for command in commands[1:])
    for script in re.findall(r"(benchmarks/\S+\.py)", done.stdout):
        assert (REPO / script).is_file(), script
    assert not (tmp_path / "no-python-here").exists()


def test_unknown_argument_is_refused_with_usage():
    done = subprocess.run(["bash", str(SUITE), "--fast"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "usage: bash benchmarks/gpu_suite.sh [--dry-run | --rehearse]" in done.stderr


def suite_variable(name: str) -> str:
    return re.search(rf'^{name}="([^"]*)"', SUITE.read_text(), flags=re.M).group(1)


def test_suite_scripts_import_only_the_gpu_image_packages_and_mf_lightning():
    """No import of another benchmark (train_compare pulled matplotlib onto the GPU), nor of a package the
    image lacks: the standard library, IMAGE_PACKAGES, CARRIED_WHEELS, mf_lightning and the shared
    benchmarks/harness.py only (itself held to the same list; PyYAML comes with lightning)."""
    packages = (suite_variable("IMAGE_PACKAGES") + " " + suite_variable("CARRIED_WHEELS")).split()
    allowed = {re.split(r"[=<>]", p)[0].replace("-", "_") for p in packages} | {"mf_lightning"}
    allowed |= set(sys.stdlib_module_names) | {"harness", "yaml"}
    for script in ("gpu_train.py", "memory_layer.py", "harness.py"):
        tree = ast.parse((REPO / "benchmarks" / script).read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 0}
        outside = sorted(name for name in imported if name.split(".")[0] not in allowed)
        assert not outside, f"benchmarks/{script} imports {outside}, which the GPU image lacks"
