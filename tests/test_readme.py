"""Every command the README, ``docs/*.md`` and ``benchmarks/README.md`` show runs, so the docs never rot.

The convention the pages follow is at the top of ``docs/README.md``: each ``bash`` block runs on its own, in
order, in a fresh copy of the repository where the quickstart has run; ``mf`` training commands get the
small sizes of ``CHEAP`` after their ``--config``; a command that cannot run here matches an entry of
``NOT_RUN``, which says why, and is still parsed (``mf``) or has its options checked (scripts).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard
from cli_support import REPO

from mf_lightning.cli import main
from mf_lightning.commands import SUBCOMMANDS

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md"]
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
CHEAP = {
    "data.seq_len": "32",
    "data.batch_size": "4",
    "data.val_windows": "8",
    "trainer.max_steps": "4",
    "trainer.limit_val_batches": "2",
    "trainer.limit_test_batches": "2",
    "trainer.log_every_n_steps": "2",
    "trainer.enable_progress_bar": "false",
    "validation.every_n_steps": "2",
    "bucket_usage.log_every_n_steps": "2",
    "bucket_usage.image_every_n_steps": "4",
    "gradient_coverage.log_every_n_steps": "2",
    "model.max_new_tokens": "8",
}
"""Put in after ``--config FILE`` of ``mf fit|validate|test|predict``: seconds instead of minutes."""
NOT_RUN = {
    r"^(MF_TEST_CUDA=1 )?python -m pytest": "the test suite itself: .ci/run runs it (checked below)",
    r"pip install|python3 -m venv": "installs from the network; .ci/run installs the project from scratch",
    r"^tensorboard |^jupyter ": "a server that runs until stopped; jupyter comes with the notebooks extra",
    r"^(torchrun|srun) ": "several nodes",
    r"configs/(ddp_example|fsdp_base)\.yaml": "8 GPUs, or 2 processes: tests/test_ddp.py and tests/test_fsdp.py",
    r"configs/(memoryformer|transformer)_\w+\.yaml": "a GPU for hours (tests/test_config.py parses every config)",
    r"^mf eval (?!.*--include_path)(?!--compare)": "the paper's tasks download from the Hugging Face Hub",
    r"^mf eval --compare results/": "compares the results of the GPU runs above",
    r"hf:": "downloads a dataset from the Hugging Face Hub",
    r"^huggingface-cli download ": "downloads a model from the Hugging Face Hub",
    r"^lm_eval ": "DIR is an exported folder and piqa downloads from the Hub (tests/models/test_hf_export.py runs "
    "lm-eval's hf model on the local test tasks)",
    r"^mf doctor( --out report\.md)?$": "the full check, minutes (tests/test_doctor.py runs mf doctor --quick, as does "
    "the --quick line beside it)",
    r"--device cuda|^bash benchmarks/gpu_suite\.sh( --rehearse)?$": "a GPU (.ci/run runs the --rehearse)",
    r"^(TRITON_INTERPRET=0 )?python (benchmarks|docs)/|mf_lightning\.kernels\.gpu_compile": "a measurement, minutes",
}
"""Commands that cannot run in CI, by pattern (``re.search``), with the reason."""
SHELL_TOKENS = {"|", "||", "&&", ";", ">", ">>", "<", "&", "(", ")"}
OPTION = re.compile(r"--?[A-Za-z][\w.-]*")


@dataclass(frozen=True)
class Block:
    """One ``bash`` code block of a page: where it starts and its commands, comments and continuations resolved."""

    page: str
    line: int
    commands: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.page}:{self.line}"


def read_blocks(page: Path, name: str) -> list[Block]:
    """The ``bash`` blocks of ``page``, called ``name`` (see ``docs/README.md`` for the convention)."""
    blocks, commands, start, pending = [], None, 0, ""
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        if commands is None:
            if line.strip() == "```bash":
                commands, start = [], number
            continue
        if line.strip() == "```":
            blocks.append(Block(name, start, tuple(commands)))
            commands = None
            continue
        text = line.split("  #")[0].strip()
        if pending or (text and not text.startswith("#")):
            pending += text
            if pending.endswith("\\"):
                pending = pending[:-1].rstrip() + " "
            else:
                commands.append(pending)
                pending = ""
    return blocks


BLOCKS = [block for page in PAGES for block in read_blocks(page, str(page.relative_to(REPO)))]
COMMANDS = [command for block in BLOCKS for command in block.commands]


def reason_not_run(command: str) -> str | None:
    """Why ``command`` is not run, or None when it runs."""
    return next((reason for pattern, reason in NOT_RUN.items() if re.search(pattern, command)), None)


def needs_shell(command: str) -> bool:
    """Whether ``command`` is more than one ``mf`` call (a pipe, a redirect, an environment prefix, ...)."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    tokens = list(lexer)
    return not tokens or tokens[0] != "mf" or any(token in SHELL_TOKENS for token in tokens)


def with_cheap_sizes(args: list[str]) -> list[str]:
    """``args`` (after ``mf``) with ``CHEAP`` put in after ``--config FILE`` of a training subcommand."""
    if args[0] not in LIGHTNING_SUBCOMMANDS or "--config" not in args:
        return args
    at = args.index("--config") + 2
    cheap = [part for key, value in CHEAP.items() for part in (f"--{key}", value)]
    return [*args[:at], *cheap, *args[at:]]


def shell_environment(cache: Path) -> dict[str, str]:
    """This interpreter's ``python`` and ``mf`` first on PATH, this checkout importable, the shared token cache."""
    env = dict(os.environ, MF_CACHE_DIR=str(cache))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run_command(command: str, cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Run one docs command in the current directory; fail with its output when it does not succeed."""
    if needs_shell(command):
        done = subprocess.run(
            ["bash", "-o", "pipefail", "-c", command],
            env=shell_environment(cache),
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert done.returncode == 0, (
            f"{command}\nexit status {done.returncode}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
        return
    args = with_cheap_sizes(shlex.split(command)[1:])
    try:
        main(args)
    except SystemExit as stop:
        assert stop.code in (0, None), f"{command}\nexit status {stop.code}\n{capsys.readouterr().err[-3000:]}"


def write_example_inputs(root: Path) -> None:
    """The inputs docs/README.md promises: corpus/, notes.txt, data.jsonl, shards/*.jsonl.zst (real text)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [path.read_text(encoding="utf-8") for path in sorted(stdlib.glob("[a-c]*.py"))[:40]]
    for index, text in enumerate(texts):
        document = root / "corpus" / ("more" if index % 2 else "") / f"doc{index:02d}.txt"
        document.parent.mkdir(parents=True, exist_ok=True)
        document.write_text(text, encoding="utf-8")
    paragraphs = [part for text in texts[:10] for part in text.split("\n\n") if part.strip()]
    (root / "notes.txt").write_text("\n\n".join(paragraphs), encoding="utf-8")
    (root / "data.jsonl").write_text("".join(json.dumps({"content": text}) + "\n" for text in texts), encoding="utf-8")
    (root / "shards").mkdir()
    for shard in range(2):
        records = "".join(json.dumps({"text": text}) + "\n" for text in texts[shard::2])
        (root / "shards" / f"part{shard}.jsonl.zst").write_bytes(zstandard.compress(records.encode()))


QUICKSTART_SETUP = BLOCKS[0].commands[0]
QUICKSTART_FIT = QUICKSTART_SETUP.split("&&")[-1].strip()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """A copy of the repository with the example inputs, where the quickstart's ``mf fit`` has run (cheaply),
    and the token cache every command shares."""
    root = tmp_path_factory.mktemp("docs")
    template, cache = root / "template", root / "cache"
    ignored = shutil.ignore_patterns(".git", ".venv", ".whl", "runs", "__pycache__", "*.egg-info", ".*_cache")
    shutil.copytree(REPO, template, ignore=ignored)
    write_example_inputs(template)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MF_CACHE_DIR", str(cache))
        patch.chdir(template)
        try:
            main(with_cheap_sizes(shlex.split(QUICKSTART_FIT)[1:]))
        except SystemExit as stop:
            pytest.fail(f"the quickstart's {QUICKSTART_FIT} stopped with exit status {stop.code}")
    assert (template / "runs" / "quickstart" / "checkpoints" / "last.ckpt").exists()
    yield template, cache


def test_readme_has_the_two_commands_and_ci_runs_its_test_command():
    assert QUICKSTART_SETUP.startswith("python3 -m venv .venv && . .venv/bin/activate && ")
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in QUICKSTART_SETUP
    assert 'pip install -e ".[dev]"' in QUICKSTART_SETUP and QUICKSTART_FIT == "mf fit --config configs/quickstart.yaml"
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert BLOCKS[1].commands[0] == "python -m pytest -n 2" and BLOCKS[1].commands[0] in ci
    assert BLOCKS[1].commands[1] == 'python -m pytest -m "not slow"'
    assert "python -m pip install -q torch==2.13.0" in ci and "CI runs torch 2.13.0" in PAGES[0].read_text()


def test_readme_is_a_landing_page():
    assert len(PAGES[0].read_text(encoding="utf-8").splitlines()) <= 250


def table_first_column(page: Path, heading: str) -> list[str]:
    """The code spans of the first column of the first table under ``heading``."""
    text = page.read_text(encoding="utf-8").split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    return [m.group(1) for m in re.finditer(r"^\| `([^`]+)` \|", text, flags=re.M)]


def test_readme_lists_every_subcommand_and_config():
    commands = table_first_column(PAGES[0], "## Commands")
    assert set(SUBCOMMANDS) <= {name.removeprefix("mf ") for name in commands}
    configs = table_first_column(PAGES[0], "## Configs")
    assert sorted(configs) == sorted(f"configs/{path.name}" for path in (REPO / "configs").glob("*.yaml"))


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of the headings of ``page``."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(encoding="utf-8"), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_every_link_between_pages_resolves():
    missing, broken = set(), []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                missing.add(str(file.relative_to(REPO)))
            elif anchor and anchor not in anchors(file):
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert broken == []
    assert not missing, f"links to missing files: {sorted(missing)}"


def test_every_not_run_entry_matches_a_command():
    """An entry that matches no command is stale; the pages hold commands of every kind."""
    assert [pattern for pattern in NOT_RUN if not any(re.search(pattern, c) for c in COMMANDS)] == []


def test_blocks_are_read_as_the_convention_says(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "text\n```bash\n#!/bin/bash\n#SBATCH --nodes=2\nmf fit --config a.yaml   # a comment\n\n"
        "mf prepare \\\n  --config a.yaml\n```\n```python\nprint(1)\n```\n```bash\nmf --help\n```\n",
        encoding="utf-8",
    )
    assert read_blocks(page, "page.md") == [
        Block("page.md", 2, ("mf fit --config a.yaml", "mf prepare --config a.yaml")),
        Block("page.md", 13, ("mf --help",)),
    ]


def mf_arguments(command: str) -> list[str] | None:
    """The arguments after ``mf`` when ``command`` is one call of the CLI: ``mf ...``, or ``python -m mf_lightning
    ...`` under a launcher (``srun``, ``torchrun``)."""
    words = shlex.split(command)
    if words[0] == "mf" and not needs_shell(command):
        return words[1:]
    at = next((at for at in range(len(words) - 1) if words[at : at + 2] == ["-m", "mf_lightning"]), None)
    return None if at is None else words[at + 2 :]


def segments(command: str) -> list[list[str]]:
    """The words of each simple command of the shell line ``command`` (split at pipes, ``&&``, redirects, ...)."""
    parts: list[list[str]] = [[]]
    for token in shlex.shlex(command, posix=True, punctuation_chars=True):
        if token in SHELL_TOKENS:
            parts.append([])
        else:
            parts[-1].append(token)
    return [part for part in parts if part]


def script_call(command: str) -> tuple[tuple[str, ...], list[str]] | None:
    """What ``python`` runs in ``command``, when that is a script or a module other than the CLI and pytest, and
    the arguments it gets."""
    for words in segments(command):
        for at, word in enumerate(words[:-1]):
            if word in ("python", "python3"):
                if words[at + 1].endswith(".py"):
                    return (words[at + 1],), words[at + 2 :]
                if words[at + 1] == "-m" and words[at + 2] not in ("mf_lightning", "pytest"):
                    return tuple(words[at + 1 : at + 3]), words[at + 3 :]
    return None


@functools.cache
def script_help(program: tuple[str, ...]) -> str:
    """What ``python PROGRAM --help`` prints, run from the repository."""
    done = subprocess.run([sys.executable, *program, "--help"], capture_output=True, text=True, cwd=REPO, check=False)
    assert done.returncode == 0, f"python {' '.join(program)} --help: {done.stderr[-2000:]}"
    return done.stdout


def unknown_options(words: list[str], help_text: str) -> list[str]:
    """The options among ``words`` that ``help_text`` does not name."""
    known = set(re.findall(r"--?[A-Za-z][\w.-]*", help_text))
    return [word for word in words if OPTION.fullmatch(word) and word not in known]


NOT_RUN_MF = [c for c in COMMANDS if reason_not_run(c) and mf_arguments(c)]
NOT_RUN_SCRIPTS = [c for c in COMMANDS if reason_not_run(c) and script_call(c)]


@pytest.mark.parametrize("command", NOT_RUN_MF, ids=NOT_RUN_MF)
def test_mf_command_not_run_still_parses(command, capsys):
    args = mf_arguments(command)
    if args[0] in (*LIGHTNING_SUBCOMMANDS, "prepare"):
        with pytest.raises(SystemExit) as stop:
            main([*args, "--print_config"])
        assert stop.value.code == 0, capsys.readouterr().err
        return
    with contextlib.suppress(SystemExit):  # the help snapshot returns; a real parser's --help exits
        main([args[0], "--help"])
    assert unknown_options(args, capsys.readouterr().out) == []


@pytest.mark.slow
@pytest.mark.parametrize("command", NOT_RUN_SCRIPTS, ids=NOT_RUN_SCRIPTS)
def test_script_not_run_takes_its_options(command):
    program, args = script_call(command)
    assert unknown_options(args, script_help(program)) == []


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[block.name for block in BLOCKS])
def test_block_runs(block, workspace, tmp_path, monkeypatch, capsys):
    template, cache = workspace
    runnable = [command for command in block.commands if reason_not_run(command) is None]
    if not runnable:
        pytest.skip("; ".join(sorted({reason_not_run(command) for command in block.commands})))
    copy = tmp_path / "checkout"
    shutil.copytree(template, copy, symlinks=True)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("MF_CACHE_DIR", str(cache))
    for command in runnable:
        run_command(command, cache, capsys)
