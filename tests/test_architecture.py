"""The package's floors (ARCHITECTURE.md), read from every module's imports with ``ast``; and private Lightning
names only in ``lit/lightning_private.py``.

A module may import its own package and anything on a lower floor, never a floor-mate or a floor above;
no module imports its own package's ``__init__`` where that ``__init__`` imports the package's modules
(the package is half-built while its ``__init__`` imports them: a circle); and the imports run when a
module is loaded form no circle. Imports
inside functions and ``if TYPE_CHECKING:`` count for the floors too, and so does a string that names a
module of the package (``importlib.import_module`` targets such as ``cli.TOOLS``).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mf_lightning"
ROOT_UNIT = "mf_lightning"

FLOORS: tuple[tuple[str, ...], ...] = (
    (ROOT_UNIT, "checks", "fs", "commands", "config_errors"),
    ("kernels",),
    ("config",),
    ("nn",),
    ("models",),
    ("data",),
    ("lit",),
    ("callbacks", "eval", "doctor"),
    ("cli",),
    ("__main__",),
)
"""Floor ``i`` holds the units (subpackages and top-level modules, by name) listed at index ``i``."""

LIGHTNING_PRIVATE = "mf_lightning.lit.lightning_private"
"""The one module that may use Lightning's private names (ARCHITECTURE.md, docs/private-lightning-hooks.md)."""

FLOOR_OF = {unit: level for level, units in enumerate(FLOORS) for unit in units}
ALLOWED = {unit: {lower for below in FLOORS[:level] for lower in below} for unit, level in FLOOR_OF.items()}


def module_name(path: Path) -> str:
    """``mf_lightning/models/base.py`` -> ``mf_lightning.models.base``; a package's ``__init__`` is the package."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


MODULES = package_modules()


def unit_of(module: str) -> str:
    """The floor unit a module belongs to: ``mf_lightning.models.base`` -> ``models``; the root is its own."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT_UNIT


def is_package(module: str) -> bool:
    return MODULES.get(module, Path()).name == "__init__.py"


def resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` reads from, relative imports included."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package(module) else base[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


def imported(module: str, node: ast.AST) -> list[str]:
    """The package's modules an import statement reads: ``from X import y`` reads ``X`` (its ``__init__`` for a
    package), and ``X.y`` too where that is a submodule."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        source = resolve(module, node)
        names = [source, *(f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in MODULES)]
    else:
        return []
    return [name for name in names if name == ROOT_UNIT or name.startswith(ROOT_UNIT + ".")]


def is_type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None) if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def load_time_nodes(nodes: list[ast.stmt]) -> Iterator[ast.AST]:
    """The statements that run when a module is loaded: not function bodies, not ``if TYPE_CHECKING:``."""
    for node in nodes:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or is_type_checking_block(node):
            continue
        yield node
        for field in ("body", "orelse", "finalbody", "handlers"):
            yield from load_time_nodes(getattr(node, field, []))


def all_imports(module: str, tree: ast.Module) -> set[str]:
    """Every module of the package that ``module`` imports anywhere, or names in a string for importlib."""
    found = {name for node in ast.walk(tree) for name in imported(module, node)}
    strings = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    return (found | (strings & set(MODULES))) - {module}


def load_time_imports(module: str, tree: ast.Module) -> set[str]:
    return {name for node in load_time_nodes(tree.body) for name in imported(module, node)} - {module}


def floor_violations(module: str, source: str) -> list[str]:
    """Each import of ``module`` (given its ``source``) that leaves its floor or reads its own package's ``__init__``."""
    tree = ast.parse(source)
    unit = unit_of(module)
    problems = []
    for target in sorted(all_imports(module, tree)):
        target_unit = unit_of(target)
        if target_unit != unit and target_unit not in ALLOWED[unit]:
            problems.append(
                f"{module} imports {target}: floor {FLOOR_OF[unit]} ({unit}) may not import "
                f"floor {FLOOR_OF[target_unit]} ({target_unit})"
            )
    own_package = module.rpartition(".")[0]
    if not is_package(module) and own_package != ROOT_UNIT and imports_own_modules(own_package):
        for node in ast.walk(tree):
            if own_package in imported(module, node):
                problems.append(
                    f"{module} line {node.lineno} imports {own_package}, whose __init__ imports the package's "
                    f"modules (a circle); import the module itself: from {own_package}.<module> import ..."
                )
    return problems


def imports_own_modules(package: str) -> bool:
    """Whether ``package``'s ``__init__`` imports (or names for importlib) modules of the package."""
    init = MODULES[package]
    return any(name.startswith(package + ".") for name in all_imports(package, ast.parse(init.read_text())))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle in ``graph`` as ``[a, b, ..., a]``, or None."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for successor in sorted(graph.get(node, ())):
            if state.get(successor) == "open":
                return path[path.index(successor) :] + [successor]
            if successor not in state and (cycle := visit(successor)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def architecture_md_floors() -> list[tuple[tuple[str, ...], set[str]]]:
    """The rows of ARCHITECTURE.md's floor table: (units, what they may import), by floor."""
    rows = []
    for line in (ROOT / "ARCHITECTURE.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 3 and cells[0].isdigit():
            assert int(cells[0]) == len(rows), f"ARCHITECTURE.md lists floor {cells[0]} after floor {len(rows) - 1}"
            rows.append((tuple(re.findall(r"`([\w.]+)`", cells[1])), set(re.findall(r"`([\w.]+)`", cells[2]))))
    return rows


def test_every_unit_of_the_package_has_a_floor() -> None:
    units = {unit_of(module) for module in MODULES}
    assert units - set(FLOOR_OF) == set(), "place the new package on a floor in ARCHITECTURE.md and FLOORS"
    assert set(FLOOR_OF) - units == set(), "FLOORS names a package that no longer exists"


def test_architecture_md_states_the_floors_of_this_test() -> None:
    documented = architecture_md_floors()
    assert [units for units, _ in documented] == list(FLOORS)
    for units, may_import in documented:
        assert may_import == ALLOWED[units[0]], f"ARCHITECTURE.md: what floor {FLOOR_OF[units[0]]} may import"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_imports_only_from_lower_floors(module: str) -> None:
    assert floor_violations(module, MODULES[module].read_text()) == []


def test_modules_loaded_together_import_no_circle() -> None:
    graph = {module: load_time_imports(module, ast.parse(path.read_text())) for module, path in MODULES.items()}
    assert find_cycle(graph) is None


@pytest.mark.parametrize(
    ("module", "source", "complaint"),
    [
        ("mf_lightning.nn.blocks", "from mf_lightning.lit.module import LanguageModel", "may not import floor 6 (lit)"),
        ("mf_lightning.callbacks.heatmap", "import mf_lightning.eval.harness", "may not import floor 7 (eval)"),
        ("mf_lightning.models.base", "def f():\n    from mf_lightning.data.cache import TokenCache", "floor 5 (data)"),
        ("mf_lightning.kernels.dispatch", "MODULE = 'mf_lightning.config'", "may not import floor 2 (config)"),
        (
            "mf_lightning.models.base",
            "from mf_lightning.models import generation",
            "whose __init__ imports the package's modules",
        ),
        ("mf_lightning.models.base", "from . import generation", "whose __init__ imports the package's modules"),
        ("mf_lightning.models.base", "from .. import cli", "may not import floor 8 (cli)"),
    ],
)
def test_forbidden_imports_are_reported(module: str, source: str, complaint: str) -> None:
    problems = floor_violations(module, source)
    assert len(problems) == 1 and complaint in problems[0], problems


def test_an_init_that_imports_no_module_of_its_package_may_be_imported_by_them() -> None:
    assert floor_violations("mf_lightning.eval.harness", "from mf_lightning.eval import missing_extra") == []


def test_a_circle_is_found() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


@cache
def lightning_private_names() -> frozenset[str]:
    """Every private name Lightning defines: its ``_``-prefixed functions and methods, and the ``self._x``
    attributes its classes set (``lightning.pytorch`` and ``lightning.fabric``)."""
    import lightning

    root = Path(lightning.__file__).parent
    names = set()
    for path in [*(root / "pytorch").rglob("*.py"), *(root / "fabric").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names.update(
                    target.attr
                    for target in targets
                    if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
                    if target.value.id == "self"
                )
    return frozenset(name for name in names if name.startswith("_") and not name.startswith("__"))


def private_lightning_uses(source: str) -> list[str]:
    """Each place ``source`` reads, sets, overrides or names (in a string: a checkpoint key) a private Lightning name."""
    uses = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            name = node.attr
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name = node.name
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            name = node.value
        else:
            continue
        if name in lightning_private_names():
            uses.append(f"line {node.lineno}: {name}")
    return uses


@pytest.mark.parametrize("module", sorted(set(MODULES) - {LIGHTNING_PRIVATE}))
def test_only_lightning_private_uses_lightning_internals(module: str) -> None:
    """A private Lightning API is used through ``mf_lightning.lit.lightning_private`` (with its canary test in
    tests/lit/test_lightning_private.py and its row in docs/private-lightning-hooks.md), nowhere else."""
    assert private_lightning_uses(MODULES[module].read_text()) == [], f"move these into {LIGHTNING_PRIVATE}"


def test_private_lightning_uses_are_found() -> None:
    source = (
        "class CLI(LightningCLI):\n    def _parse_ckpt_path(self):\n        pass\n"
        "trainer._signal_connector.received_sigterm = True\n"
        "state['_batches_that_stepped'] = 3\n"
        "self._own_counter = 0\n"
    )
    assert private_lightning_uses(source) == [
        "line 2: _parse_ckpt_path",
        "line 4: _signal_connector",
        "line 5: _batches_that_stepped",
    ]
