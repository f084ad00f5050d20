"""Preparation faults: a cache file that cannot be written is named (not the input being read), leftovers that no
preparation can resume are removed, and "run again to resume" is said only where it works."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from corpus_support import make_documents

from mf_lightning.cli import main
from mf_lightning.data import cache as cache_module
from mf_lightning.data.cache import prepare_token_cache
from mf_lightning.data.sources import open_source
from mf_lightning.data.tokenizers import ByteTokenizer
from mf_lightning.fs.lock import Holder
from mf_lightning.fs.processes import this_host

REPO = Path(__file__).resolve().parents[2]
PART_BYTES = 1 << 17  # a corpus of about 600 KB in 5 parts, each writing about 256 KB of uint16 tokens
PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2  # <linux/prctl.h>, <linux/capability.h>


def write_jsonl(folder: Path, documents: list[str], files: int = 1) -> Path:
    """``documents`` as JSONL, spread over ``files`` files of ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    step = -(-len(documents) // files)
    for index in range(files):
        lines = "".join(json.dumps({"text": text}) + "\n" for text in documents[index * step : (index + 1) * step])
        (folder / f"{index:02d}.jsonl").write_text(lines, encoding="utf-8")
    return folder


@pytest.fixture
def corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(cache_module, "PART_BYTES", PART_BYTES)
    return write_jsonl(tmp_path / "corpus", make_documents(8000, words_per_document=10))


def prepare(corpus: Path, cache: Path, workers: int, *options: str) -> None:
    """``mf prepare`` of ``corpus`` into ``cache`` with the byte tokenizer."""
    data = ["--data.source", str(corpus), "--data.cache_dir", str(cache), "--data.tokenizer", "byte"]
    main(["prepare", *data, "--data.prepare_workers", str(workers), *options])


def failed_line(capsys: pytest.CaptureFixture, corpus: Path, cache: Path, workers: int) -> str:
    """The one ``mf: error:`` line of a preparation that fails, checked to name no input file."""
    with pytest.raises(SystemExit) as exit_info:
        prepare(corpus, cache, workers)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("mf: error:")]
    assert str(corpus) not in line and "part " not in line, "names the cache file, not the input being read"
    return line


def assert_only_the_cache(cache: Path) -> None:
    """The cache folder of a finished preparation holds its one cache: no parts, lock or staging folder."""
    (built,) = (cache / "tokens").iterdir()
    assert (built / "manifest.json").is_file()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_file_size_limit_names_the_part_file_and_the_rerun_resumes(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture, workers: int
) -> None:
    cache = tmp_path / "cache"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, hard))  # inherited by the workers
    try:
        line = failed_line(capsys, corpus, cache, workers)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    parts = next((cache / "tokens").glob(".*.parts"))
    assert line.startswith(f"mf: error: {parts}/"), line
    assert f": {os.strerror(errno.EFBIG)} (writing the token cache: raise the file size limit" in line
    assert re.search(
        rf"then run the same preparation again to resume: \d+ part\(s\) are unfinished, .* in {parts}\)$", line
    )
    prepare(corpus, cache, workers)
    assert_only_the_cache(cache)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KB tmpfs (root only: skipped where it cannot be mounted), unmounted afterwards."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)]
    if os.geteuid() != 0 or subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    yield folder
    subprocess.run(["umount", "--lazy", str(folder)], check=True)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_full_disk_names_the_part_file_and_the_rerun_resumes_once_there_is_room(
    corpus: Path, small_disk: Path, capsys: pytest.CaptureFixture, workers: int
) -> None:
    line = failed_line(capsys, corpus, small_disk, workers)
    parts = next((small_disk / "tokens").glob(".*.parts"))
    assert line.startswith(f"mf: error: {parts}/"), line
    assert f": {os.strerror(errno.ENOSPC)} (writing the token cache: free space there or set data.cache_dir" in line
    assert "then run the same preparation again to resume" in line
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    prepare(corpus, small_disk, workers)
    assert_only_the_cache(small_disk)


def test_a_read_only_parts_folder_names_it(corpus: Path, small_disk: Path, capsys: pytest.CaptureFixture) -> None:
    failed_line(capsys, corpus, small_disk, 2)  # leaves the parts folder of the full disk
    parts = next((small_disk / "tokens").glob(".*.parts"))
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    subprocess.run(["mount", "--bind", str(parts), str(parts)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(parts)], check=True)
        line = failed_line(capsys, corpus, small_disk, 2)
    finally:
        subprocess.run(["umount", str(parts)], check=True)
    assert line.startswith(f"mf: error: {parts}/"), line
    assert f": {os.strerror(errno.EROFS)} (writing the token cache: the file system is read-only" in line


def without_permission_override() -> None:
    """Drops root's power to write where the permission bits forbid it (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) from
    this process's bounding set, so that the program it then runs, and its children, have the bits obeyed."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.mark.slow  # a second interpreter importing mf
def test_a_parts_folder_without_write_permission_names_it(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    if os.geteuid() != 0 or not sys.platform.startswith("linux"):
        pytest.skip("runs a preparation as root without its permission override (Linux capabilities)")
    cache = tmp_path / "cache"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, hard))
    try:
        failed_line(capsys, corpus, cache, 2)  # leaves its parts folder
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    parts = next((cache / "tokens").glob(".*.parts"))
    parts.chmod(0o555)
    arguments = ["--data.source", str(corpus), "--data.cache_dir", str(cache), "--data.tokenizer", "byte"]
    result = subprocess.run(
        [sys.executable, "-m", "mf_lightning", "prepare", *arguments, "--data.prepare_workers", "2"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        preexec_fn=without_permission_override,
        capture_output=True,
        text=True,
        timeout=300,
    )
    parts.chmod(0o755)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("mf: error:")]
    assert line.startswith(f"mf: error: {parts}/"), line
    assert f": {os.strerror(errno.EACCES)} (writing the token cache: allow writing there or set data.cache_dir" in line
    assert str(corpus) not in line


BUILDER = """
import sys
from mf_lightning.data import cache
from mf_lightning.data.sources import open_source
from worker_tokenizers import SlowByteTokenizer

cache.PART_BYTES = 4096
cache.prepare_token_cache(open_source(sys.argv[1]), SlowByteTokenizer(), sys.argv[2], 0.1, 0.1, workers=2)
"""


def kill_after_a_part(corpus: Path, cache: Path) -> None:
    """Starts preparing ``corpus`` (slowly, in 2 workers) and kills it and its workers outright once a part is done."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(Path(__file__).parent)])}
    builder = subprocess.Popen(
        [sys.executable, "-c", BUILDER, str(corpus), str(cache)], env=env, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        before = set((cache / "tokens").glob(".*.parts/*.done"))
        while not set((cache / "tokens").glob(".*.parts/*.done")) - before:
            assert builder.poll() is None and time.monotonic() < deadline, "the builder ended before a part was done"
            time.sleep(0.05)
    finally:
        os.killpg(builder.pid, signal.SIGKILL)
        builder.wait()


def test_the_parts_and_lock_of_a_killed_preparation_go_once_its_corpus_is_edited(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    edited = write_jsonl(tmp_path / "edited", make_documents(600, words_per_document=10), files=3)
    unchanged = write_jsonl(tmp_path / "unchanged", make_documents(600, words_per_document=10, seed=1), files=3)
    cache = tmp_path / "cache"
    kill_after_a_part(edited, cache)
    leftovers = set((cache / "tokens").iterdir())
    assert sorted(path.suffix for path in leftovers) == [".lock", ".parts"], "the killed builder's parts and lock"
    kill_after_a_part(unchanged, cache)
    kept = set((cache / "tokens").iterdir()) - leftovers
    with (edited / "01.jsonl").open("a", encoding="utf-8") as file:
        file.write(json.dumps({"text": "an edit after the kill"}) + "\n")
    prepare(edited, cache, 1, "--data.val_fraction", "0.1", "--data.test_fraction", "0.1")
    built = prepare_token_cache(open_source(str(edited)), ByteTokenizer(), cache, 0.1, 0.1)
    assert built.built is False, "mf prepare built the cache of these settings"
    assert set((cache / "tokens").iterdir()) == {built.directory, *kept}, "the unchanged corpus's stay to resume"
    (kept_parts,) = [path for path in kept if path.suffix == ".parts"]
    assert re.search(rf"kept for resuming: {kept_parts} \([1-9]\d* finished part\(s\), ", capsys.readouterr().out)
    resumed = prepare_token_cache(open_source(str(unchanged)), ByteTokenizer(), cache, 0.1, 0.1, workers=1)
    assert set((cache / "tokens").iterdir()) == {built.directory, resumed.directory}


def test_dead_locks_guarding_no_parts_go_and_live_ones_stay(tmp_path: Path) -> None:
    corpus = write_jsonl(tmp_path / "corpus", make_documents(200, words_per_document=10))
    tokens, tokenizers = tmp_path / "cache" / "tokens", tmp_path / "cache" / "tokenizers"
    ended = subprocess.Popen([sys.executable, "-c", ""])
    ended.wait()
    holders = {
        "dead": Holder(this_host(), ended.pid, "dead").line(),
        "live": Holder(this_host(), os.getpid(), "live").line(),
        "elsewhere": Holder("another-host", 1, "elsewhere").line(),  # whether it runs cannot be told; fresh lock
    }
    locks = {}
    for folder, name in [(tokens, ".{}0123456789abcdef0.lock"), (tokenizers, ".bpe-300-{}0123456789abc.lock")]:
        folder.mkdir(parents=True)
        for code, (state, holder) in zip("abc", holders.items(), strict=True):
            locks[folder, state] = folder / name.format(code * 3)
            locks[folder, state].write_text(holder, encoding="utf-8")
    cache = prepare_token_cache(open_source(str(corpus)), ByteTokenizer(), tmp_path / "cache", 0.1, workers=1)
    assert sorted(tokens.iterdir()) == sorted([cache.directory, locks[tokens, "live"], locks[tokens, "elsewhere"]])
    assert sorted(tokenizers.iterdir()) == sorted([locks[tokenizers, "live"], locks[tokenizers, "elsewhere"]])
