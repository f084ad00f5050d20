"""Renders ``mf <subcommand> --help`` from the real parsers, the text ``mf_lightning/help/`` must hold.

    python tests/help_snapshots.py          # writes every snapshot anew (after changing an option)
    python tests/help_snapshots.py --check  # exit status 1 naming the snapshots that differ

Rendered in a fresh process, as ``mf`` renders help (the subclasses a parser lists are those imported).
``tests/test_startup.py`` runs ``--check``, so a snapshot never goes stale.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def render(subcommand: str) -> str:
    """What the real parser of ``subcommand`` prints for ``--help`` at ``HELP_COLUMNS`` columns."""
    from mf_lightning.cli import run_subcommand
    from mf_lightning.commands import HELP_COLUMNS

    out = io.StringIO()
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(HELP_COLUMNS)
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            run_subcommand([subcommand, "--help"], from_python=True)
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns
    return out.getvalue()


def main(check: bool) -> None:
    from mf_lightning.commands import HELP_FOLDER, SUBCOMMANDS, help_snapshot

    stale = []
    for subcommand in SUBCOMMANDS:
        rendered = render(subcommand)
        if check:
            if not (HELP_FOLDER / f"{subcommand}.txt").is_file() or help_snapshot(subcommand) != rendered:
                stale.append(subcommand)
            continue
        HELP_FOLDER.mkdir(exist_ok=True)
        (HELP_FOLDER / f"{subcommand}.txt").write_text(rendered, encoding="utf-8")
        print(f"wrote {HELP_FOLDER / subcommand}.txt", file=sys.stderr)
    if stale:
        sys.exit(f"stale help snapshots in {HELP_FOLDER}: {', '.join(stale)}; run: python tests/help_snapshots.py")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main(check=sys.argv[1:] == ["--check"])
