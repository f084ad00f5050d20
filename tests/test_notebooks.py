"""The notebooks run top to bottom in a fresh kernel, and are kept in the repository without outputs."""

import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
KERNEL = "python3"
CELL_TIMEOUT_S = 300
PYTHON_NAMES = {"python", f"python{sys.version_info[0]}", f"python{sys.version_info[0]}.{sys.version_info[1]}"}
"""Kernel commands jupyter_client replaces by ``sys.executable``, i.e. this environment's interpreter."""


def test_notebooks_are_saved_without_outputs() -> None:
    assert NOTEBOOKS, f"no notebooks found in {ROOT / 'notebooks'}"
    dirty = []
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        for index, cell in enumerate(notebook.cells):
            if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None):
                dirty.append(f"{path.name} cell {index}")
    assert not dirty, f"clear the outputs of these cells before committing: {dirty}"


@pytest.fixture(scope="module")
def kernel_name() -> str:
    """``python3``, after checking that it launches this environment's Python (where mf_lightning is)."""
    try:
        command = KernelSpecManager().get_kernel_spec(KERNEL).argv[0]
    except NoSuchKernel:
        pytest.fail(f"no {KERNEL!r} Jupyter kernel: install ipykernel here (pip install -e '.[notebooks]')")
    if command not in PYTHON_NAMES and Path(command).resolve() != Path(sys.executable).resolve():
        pytest.fail(f"the {KERNEL!r} kernel runs {command}, not this environment's {sys.executable}")
    return KERNEL


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs(
    path: Path,
    kernel_name: str,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The kernel inherits the environment: its temporary runs land in tmp_path, token caches in a shared one,
    # and torch uses one thread (the notebooks' tiny tensors only lose time to thread hand-offs on shared cores).
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MF_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "mf_cache"))
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook, kernel_name=kernel_name, timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute()
    figures = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if "image/png" in output.get("data", {})
    ]
    assert figures, f"{path.name} ran but drew no figure"
