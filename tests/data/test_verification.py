"""A damaged token cache is never used: chunks the opening sample skips are checked in the background."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from cli_support import QUICKSTART, run, tiny_run_args, write_corpus

from mf_lightning.cli import main
from mf_lightning.data import TextDataModule
from mf_lightning.data import cache as cache_module
from mf_lightning.data.verification import DamagedCache


def zero_a_middle_chunk_keeping_mtime(path: Path, chunk_bytes: int) -> None:
    """4 KiB-like damage: zeroes chunk 10, then restores the modification time."""
    stat = path.stat()
    with path.open("r+b") as file:
        file.seek(chunk_bytes * 10)
        file.write(bytes(chunk_bytes))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> int:
    """64-byte chunks, and an opening sample of the first and last only, so a middle chunk is never sampled."""
    monkeypatch.setattr(cache_module, "CHUNK_BYTES", 64)
    monkeypatch.setattr(cache_module, "SAMPLED_CHUNKS", 0)
    return 64


def make(corpus_dir: Path, tmp_path: Path, verify_cache: bool = False) -> TextDataModule:
    return TextDataModule(
        source=str(corpus_dir),
        seq_len=16,
        batch_size=4,
        val_fraction=0.2,
        cache_dir=str(tmp_path / "cache"),
        verify_cache=verify_cache,
    )


def test_damage_the_sample_misses_fails_the_run_and_the_next_run_rebuilds(
    corpus_dir: Path, tmp_path: Path, small_chunks: int, caplog: pytest.LogCaptureFixture
) -> None:
    built = make(corpus_dir, tmp_path)
    cache = built.token_cache()
    assert built._full_check is None  # just written here: nothing to check
    expected = cache.path("train").read_bytes()
    zero_a_middle_chunk_keeping_mtime(cache.path("train"), small_chunks)

    opened = make(corpus_dir, tmp_path)
    assert opened.token_cache().directory == cache.directory  # the sampled check passes...
    with pytest.raises(DamagedCache, match=r"train.bin bytes 640\.\.704 differ from their checksum.*run again"):
        opened.teardown("fit")  # ...the full check does not, and the run fails
    with pytest.raises(DamagedCache):
        next(iter(opened.train_dataloader()))
    assert not (cache.directory / "manifest.json").exists()

    with caplog.at_level(logging.WARNING, logger="mf_lightning.data.cache"):
        rebuilt = make(corpus_dir, tmp_path).token_cache()
    assert any("rebuilding token cache" in message and "no manifest" in message for message in caplog.messages)
    assert rebuilt.path("train").read_bytes() == expected


def test_verify_cache_rebuilds_damage_the_sample_misses_before_training(
    corpus_dir: Path, tmp_path: Path, small_chunks: int, caplog: pytest.LogCaptureFixture
) -> None:
    cache = make(corpus_dir, tmp_path).token_cache()
    expected = cache.path("train").read_bytes()
    zero_a_middle_chunk_keeping_mtime(cache.path("train"), small_chunks)
    with caplog.at_level(logging.WARNING, logger="mf_lightning.data.cache"):
        opened = make(corpus_dir, tmp_path, verify_cache=True)
        assert opened.token_cache().path("train").read_bytes() == expected
    assert any("train.bin bytes 640..704 differ from their checksum" in message for message in caplog.messages)
    assert opened._full_check is None  # checked in full already: nothing left for the background


def test_verify_cache_must_be_a_boolean(corpus_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="verify_cache must be true or false, got 'yes'"):
        make(corpus_dir, tmp_path, verify_cache="yes")


def test_an_intact_cache_passes_the_background_check(corpus_dir: Path, tmp_path: Path, small_chunks: int) -> None:
    make(corpus_dir, tmp_path).token_cache()
    opened = make(corpus_dir, tmp_path)
    manifest = json.loads((opened.token_cache().directory / "manifest.json").read_text())
    opened.teardown("fit")
    assert len(next(iter(opened.train_dataloader()))) == 2
    assert manifest["checksums"]["train"]["crc32"]


def test_mf_fit_on_a_cache_damaged_where_the_sample_misses_stops_with_one_line(
    tmp_path: Path, small_chunks: int, capsys: pytest.CaptureFixture
) -> None:
    corpus = write_corpus(tmp_path / "corpus")
    args = tiny_run_args(tmp_path / "run", corpus, max_steps=2)
    data_args = [arg for key, value in zip(args[2::2], args[3::2]) if key.startswith("--data.") for arg in (key, value)]
    main(["prepare", "--config", str(QUICKSTART), *data_args])
    (cache,) = (tmp_path / "run" / "cache" / "tokens").iterdir()
    zero_a_middle_chunk_keeping_mtime(cache / "train.bin", small_chunks)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run("fit", args)
    assert exit_info.value.code == 2
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mf: error:")]
    assert len(error) == 1 and f"token cache {cache} is damaged (train.bin bytes 640..704 differ" in error[0]
