"""The floors pyproject.toml declares are true: each one CI installs is the version CI installs, every
package the code imports is declared, and the build requirement can build this pyproject."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
CI_FILES = (REPO / ".ci" / "run", REPO / "benchmarks" / "gpu_suite.sh")
"""The scripts that build CI's environments: the main run, and the GPU image's rehearsal."""
FLOOR_CHECK = REPO / ".ci" / "check_python_floor.py"
PINNED = re.compile(r"(?<![\w.-])([A-Za-z][\w.-]*)==(\d[\w.]*)")
PEP_639_SETUPTOOLS = Version("77")
"""The first setuptools that reads a license expression (``license = "Apache-2.0"``, PEP 639)."""


def requirements() -> list[Requirement]:
    """Every dependency the project declares, its extras' included."""
    project = PYPROJECT["project"]
    listed = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    return [Requirement(line) for line in listed]


def floor(requirement: Requirement) -> Version | None:
    """The lowest version ``requirement`` allows (its ``>=`` or ``==`` bound), None when it has none."""
    bounds = [Version(spec.version) for spec in requirement.specifier if spec.operator in (">=", "==")]
    return min(bounds) if bounds else None


def ci_pins() -> dict[str, Version]:
    """The lowest version of each package a CI script installs with ``name==version``."""
    pins: dict[str, Version] = {}
    for script in CI_FILES:
        for name, version in PINNED.findall(script.read_text(encoding="utf-8")):
            key = canonicalize_name(name)
            pins[key] = min(pins.get(key, Version(version)), Version(version))
    return pins


def test_every_floor_ci_installs_is_the_version_it_installs() -> None:
    pins = ci_pins()
    assert {"torch", "lightning", "triton", "jsonargparse"} <= set(pins), pins  # the scripts' pins were read
    wrong = {
        requirement.name: f"declared >= {floor(requirement)}, CI installs {pins[canonicalize_name(requirement.name)]}"
        for requirement in requirements()
        if canonicalize_name(requirement.name) in pins
        and floor(requirement) != pins[canonicalize_name(requirement.name)]
    }
    assert not wrong, wrong


def test_every_third_party_import_is_declared() -> None:
    declared = {canonicalize_name(requirement.name) for requirement in requirements()}
    distributions = packages_distributions()
    undeclared = {}
    for path in sorted((REPO / "mf_lightning").rglob("*.py")):
        for module in imported_modules(path):
            if module in sys.stdlib_module_names or module == "mf_lightning":
                continue
            names = {canonicalize_name(name) for name in distributions.get(module, [module])}
            if not names & declared:
                undeclared.setdefault(module, []).append(str(path.relative_to(REPO)))
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def imported_modules(path: Path) -> set[str]:
    """The top-level names of the absolute imports in ``path`` (those inside functions included)."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module.split(".")[0])
    return modules


def test_the_build_requirement_reads_the_license_expression() -> None:
    (setuptools,) = [Requirement(line) for line in PYPROJECT["build-system"]["requires"]]
    assert isinstance(PYPROJECT["project"]["license"], str)  # an SPDX expression, PEP 639
    assert floor(setuptools) is not None and floor(setuptools) >= PEP_639_SETUPTOOLS, setuptools
    assert not any(c.startswith("License ::") for c in PYPROJECT["project"]["classifiers"])  # refused beside it


@pytest.mark.parametrize(("minor_offset", "passes"), [(0, True), (1, False), (-1, False)])
def test_ci_fails_unless_it_runs_the_python_floor(minor_offset: int, passes: bool, tmp_path: Path) -> None:
    major, minor = sys.version_info[:2]
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(f'[project]\nrequires-python = ">={major}.{minor + minor_offset}"\n')
    done = subprocess.run([sys.executable, str(FLOOR_CHECK), str(pyproject)], capture_output=True, text=True)
    assert (done.returncode == 0) is passes, done.stderr
    assert passes or "the floor is untested" in done.stderr


def test_ci_checks_the_python_floor_and_ruff_targets_it() -> None:
    assert "python .ci/check_python_floor.py" in (REPO / ".ci" / "run").read_text(encoding="utf-8")
    floor = PYPROJECT["project"]["requires-python"].removeprefix(">=")
    assert PYPROJECT["tool"]["ruff"]["target-version"] == "py" + floor.replace(".", "")
