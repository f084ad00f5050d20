"""The ``mf`` subcommands and the answers that need none of them to run: ``mf``, ``mf --help``,
``mf <subcommand> --help`` and an unknown subcommand, given without importing torch or Lightning.

A subcommand's full option list is its parser's help, and the parsers of ``fit``/``validate``/``test``/
``predict``/``prepare`` are built from Lightning's classes, so importing them costs seconds. The help of
every subcommand is therefore a snapshot, ``help/<subcommand>.txt``, printed as is: it is exactly what the
real parser prints at ``HELP_COLUMNS`` columns, and ``tests/test_startup.py`` renders each one from the
real parser and fails when a snapshot differs (``python tests/help_snapshots.py`` writes them anew).
Any other use of a subcommand, ``--help`` with other arguments included, goes to the real parser.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from collections.abc import Sequence
from pathlib import Path

SUBCOMMANDS = {
    "fit": "train a model from a YAML config; rerun with --ckpt_path last to resume",
    "validate": "validation loss, perplexity and bits per byte of a checkpoint",
    "test": "the same on the held-out test documents",
    "predict": "completions of data.prompts, written to the run's predictions.jsonl",
    "prepare": "train the tokenizer and tokenize the corpus into the token cache, without training",
    "eval": "lm-evaluation-harness tasks on a run or an exported model",
    "export": "a checkpoint as a self-contained model folder (safetensors + tokenizer)",
    "generate": "stream a continuation of a prompt from a run or an exported model",
    "efficiency": "parameters, memory and FLOPs per token of every preset",
    "doctor": "check this machine: kernels against the reference, speeds, a short training, one verdict",
}
"""What ``mf --help`` lists: every subcommand with one line (LightningCLI's four, then ``cli.TOOLS``)."""
HELP_FLAGS = ("-h", "--help")
VERSION_FLAGS = ("-V", "--version")
DISTRIBUTION = "mf-lightning"
"""The distribution's name (pyproject.toml's, normalized as in PEP 503)."""
HELP_FOLDER = Path(__file__).resolve().parent / "help"
HELP_COLUMNS = 100
"""The terminal width the help snapshots are rendered at."""


def quick_answer(argv: Sequence[str]) -> int | None:
    """Prints the answer to ``mf <argv>`` when it needs no subcommand to run, and returns its exit status:
    the overview for ``mf`` / ``mf --help``, the version for ``mf --version``, the snapshot for ``mf <subcommand> --help``, one error line for
    an unknown subcommand. None when a subcommand must run."""
    if not argv or argv[0] in HELP_FLAGS:
        print(overview())
        return 0
    if argv[0] in VERSION_FLAGS:
        print(f"mf {version()}")
        return 0
    if not argv[0].startswith("-") and argv[0] not in SUBCOMMANDS:
        print(
            f"mf: error: unknown subcommand {argv[0]!r}; choose from {', '.join(SUBCOMMANDS)} (mf --help)",
            file=sys.stderr,
        )
        return 2
    if len(argv) == 2 and argv[0] in SUBCOMMANDS and argv[1] in HELP_FLAGS:
        print(help_snapshot(argv[0]), end="")
        return 0
    return None


def version() -> str:
    """This package's version: the installed distribution's, else (a source checkout on ``PYTHONPATH``) the
    ``__version__`` that the package's ``__init__`` sets, read from its source (the ``__init__`` is a floor-mate
    of this module, not imported by it)."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        source = (Path(__file__).resolve().parent / "__init__.py").read_text(encoding="utf-8")
        match = re.search(r'^__version__ = "(?P<version>[^"]+)"$', source, re.MULTILINE)
        return match["version"] if match else "unknown"


def help_snapshot(subcommand: str) -> str:
    """What ``mf <subcommand> --help`` prints (see the module's docstring)."""
    return (HELP_FOLDER / f"{subcommand}.txt").read_text(encoding="utf-8")


def option_names(subcommand: str) -> list[str]:
    """Every option ``mf <subcommand>`` takes, as dotted names without dashes (``model.lr``), from its help."""
    return sorted(set(re.findall(r"--([\w.]+)", help_snapshot(subcommand))))


def overview() -> str:
    """``mf --help``: every subcommand with one line, and where each one's options are listed."""
    width = max(map(len, SUBCOMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, summary in SUBCOMMANDS.items()]
    return "\n".join(
        [
            "usage: mf <subcommand> [options]    (mf --version: the version)",
            "",
            "Train, inspect and run MemoryFormer language models. `mf <subcommand> --help` lists a subcommand's",
            "options; fit, validate, test and predict read a YAML config (--config configs/quickstart.yaml).",
            "",
            "subcommands:",
            *lines,
        ]
    )
