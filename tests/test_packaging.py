"""A wheel of the project holds every file the package reads at run time, not only its Python modules."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_the_wheel_ships_the_fused_cpu_operator_source_and_the_hf_modeling_file(tmp_path):
    """The operator is compiled from its C++ source on first use: a wheel without it decodes slower. ``mf export``
    copies the MemoryFormer modeling file into every MemoryFormer folder: without it the export fails."""
    pytest.importorskip("setuptools.build_meta", reason="building a wheel needs setuptools")
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "mf_lightning", source / "mf_lightning", ignore=shutil.ignore_patterns("__pycache__"))
    build = f"import setuptools.build_meta as backend; print(backend.build_wheel({str(tmp_path / 'dist')!r}))"
    (tmp_path / "dist").mkdir()
    done = subprocess.run([sys.executable, "-c", build], cwd=source, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    wheel = tmp_path / "dist" / done.stdout.strip().splitlines()[-1]
    names = zipfile.ZipFile(wheel).namelist()
    assert "mf_lightning/kernels/fused_cpu.cpp" in names
    assert "mf_lightning/models/hf_modeling_memoryformer.py" in names
    assert "mf_lightning/kernels/fused_cpu.py" in names
    assert {f"mf_lightning/help/{name}.txt" for name in ("fit", "prepare", "eval")} <= set(names)  # mf <sub> --help
