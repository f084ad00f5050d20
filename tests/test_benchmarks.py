"""The benchmark scripts share one module, ``benchmarks/harness.py``, and never import one another."""

import ast
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SHARED = "harness"


def imported_modules(script: Path) -> set[str]:
    """The top-level names of every module ``script`` imports, wherever the import statement is."""
    names = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_benchmark_script_imports_another() -> None:
    scripts = {path.stem: path for path in BENCHMARKS.glob("*.py") if path.stem != SHARED}
    offenders = {name: sorted(imported_modules(path) & set(scripts)) for name, path in scripts.items()}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_every_benchmark_script_uses_the_shared_module() -> None:
    scripts = [path for path in BENCHMARKS.glob("*.py") if path.stem != SHARED]
    assert scripts
    assert [path.name for path in scripts if SHARED not in imported_modules(path)] == []


def test_the_shared_module_imports_no_plotting_library() -> None:
    """The GPU image has no matplotlib: importing the harness must not need it."""
    code = (
        f"import sys; sys.path.insert(0, {str(BENCHMARKS)!r}); import harness; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'PIL', 'pandas')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_markdown_table_lines() -> None:
    sys.path.insert(0, str(BENCHMARKS))
    import harness

    assert harness.markdown_table(["a", "b"], [[1, "x"], [2.5, "y"]]) == [
        "| a | b |",
        "|---|---|",
        "| 1 | x |",
        "| 2.5 | y |",
    ]
