"""The ``mf`` command and ``python -m mf_lightning``: help is answered before torch or Lightning is imported.

``mf``, ``mf --help`` and ``mf <subcommand> --help`` are answered by ``mf_lightning.commands`` (a few tens
of milliseconds); only a subcommand that runs imports ``mf_lightning.cli`` and with it torch and Lightning.
"""

import sys

from mf_lightning.commands import quick_answer


def main() -> None:
    """Entry point of ``mf``: the quick answer when there is one, else the subcommand (``cli.run_subcommand``)."""
    argv = sys.argv[1:]
    status = quick_answer(argv)
    if status is not None:
        raise SystemExit(status)
    from mf_lightning.cli import run_subcommand

    run_subcommand(argv, from_python=False)


if __name__ == "__main__":
    main()
