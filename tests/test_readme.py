"""Every command the README shows is a real one: `mf` lines parse, the test command is what CI runs."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest
from cli_support import REPO

from mf_lightning.cli import main
from mf_lightning.eval.cli import build_parser as build_eval_parser
from mf_lightning.lit.generate_cli import parse_args

README = (REPO / "README.md").read_text(encoding="utf-8")
COMMAND_LINES = [
    line.split("  #")[0].strip()
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    for line in block.splitlines()
    if line.strip()
]
MF_COMMANDS = [line for line in COMMAND_LINES if line.startswith("mf ")]


def test_readme_has_the_two_commands_and_ci_runs_its_test_command():
    setup, tests = COMMAND_LINES[0], COMMAND_LINES[1]
    assert 'pip install -e ".[dev]"' in setup and setup.endswith("mf fit --config configs/quickstart.yaml")
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert tests in ci
    assert "python -m pip install -q torch==2.13.0" in ci


@pytest.mark.parametrize("command", MF_COMMANDS)
def test_mf_command_parses(command, capsys):
    args = shlex.split(command)[1:]
    if args[0] == "--help":
        assert main(args) is None and "subcommands:" in capsys.readouterr().out
        return
    if args[0] == "efficiency":
        main(args)
        assert "FLOPs" in capsys.readouterr().out
        return
    if args[0] == "eval":  # parse only: running it needs a trained model (tests/eval runs it end to end)
        build_eval_parser().parse_args(args[1:])
        return
    if args[0] == "generate":
        assert parse_args(args[1:]).prompt
        return
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code == 0, capsys.readouterr().err


def test_tensorboard_is_installed():
    assert any(line.startswith("tensorboard --logdir") for line in COMMAND_LINES)
    assert (Path(sys.executable).parent / "tensorboard").is_file()
