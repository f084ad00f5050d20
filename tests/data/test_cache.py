import errno
import json
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from mf_lightning.data import cache as cache_module
from mf_lightning.data.cache import (
    TokenCache,
    checked_chunks,
    document_split,
    is_validation,
    prepare_token_cache,
    token_dtype,
)
from mf_lightning.data.progress import lines_every
from mf_lightning.data.sources import FileSource, open_source
from mf_lightning.data.tokenizers import ByteTokenizer, load_tokenizer
from mf_lightning.fs.atomic import partial_path


class WideByteTokenizer(ByteTokenizer):
    """Bytes shifted by 70000: a vocabulary too large for uint16."""

    vocab_size = 70_257
    eos_id = 70_256
    fingerprint = "wide-byte"

    def encode(self, text: str) -> list[int]:
        return [70_000 + byte for byte in text.encode("utf-8")]


class FailingTokenizer(ByteTokenizer):
    """Fails on the third document, like an interrupted preparation."""

    fingerprint = "failing"

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) if index < 2 else self.fail() for index, text in enumerate(texts)]

    def fail(self) -> list[int]:
        raise KeyboardInterrupt


def test_split_is_by_documents_deterministic_and_never_empty() -> None:
    assert [index for index in range(45) if is_validation(index, 0.1)] == [0, 10, 20, 30, 40]
    assert [index for index in range(5) if is_validation(index, 0.05)] == [0]
    assert sum(is_validation(index, 0.25) for index in range(1000)) == 250


def test_test_split_is_disjoint_from_validation_which_it_leaves_unchanged() -> None:
    splits = [document_split(index, 0.1, 0.05) for index in range(1000)]
    assert [index for index, split in enumerate(splits) if split == "val"] == [
        i for i in range(1000) if is_validation(i, 0.1)
    ]
    assert splits[:3] == ["val", "test", "train"]  # the first non-validation document is held out for test
    assert {split: splits.count(split) for split in ("train", "val", "test")} == {"train": 850, "val": 100, "test": 50}
    assert all(document_split(index, 0.1, 0.0) != "test" for index in range(1000))


def test_cache_holds_documents_with_eos_split_as_planned(
    corpus_dir: Path, documents: list[str], tmp_path: Path
) -> None:
    tokenizer = ByteTokenizer()
    cache = prepare_token_cache(open_source(str(corpus_dir)), tokenizer, tmp_path, val_fraction=0.2, test_fraction=0.1)
    assert cache.directory.parent == tmp_path / "tokens"
    for split in ("train", "val", "test"):
        texts = [text for index, text in enumerate(documents) if document_split(index, 0.2, 0.1) == split]
        assert texts
        expected = [token for text in texts for token in [*tokenizer.encode(text), tokenizer.eos_id]]
        assert cache.open(split).tolist() == expected
        assert cache.manifest["splits"][split] == {
            "documents": len(texts),
            "tokens": len(expected),
            "bytes": sum(len(text.encode()) for text in texts),
        }
    assert cache.dtype == np.uint16
    val_bytes = cache.manifest["splits"]["val"]["bytes"]
    assert cache.bytes_per_token("val") == pytest.approx(val_bytes / len(cache.open("val")))
    assert sorted(path.name for path in (tmp_path / "tokens").iterdir()) == [cache.directory.name]


def test_valid_cache_is_reused(corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = prepare_token_cache(open_source(str(corpus_dir)), ByteTokenizer(), tmp_path, 0.2)
    monkeypatch.setattr(cache_module, "build_cache", lambda *args: pytest.fail("a valid cache was rebuilt"))
    second = prepare_token_cache(open_source(str(corpus_dir)), ByteTokenizer(), tmp_path, 0.2)
    assert second == first


def test_other_tokenizer_or_split_fractions_get_their_own_cache(corpus_dir: Path, tmp_path: Path) -> None:
    source = open_source(str(corpus_dir))
    byte = prepare_token_cache(source, ByteTokenizer(), tmp_path, 0.2)
    bpe_tokenizer = load_tokenizer("bpe:300", source, tmp_path)
    bpe = prepare_token_cache(source, bpe_tokenizer, tmp_path, 0.2)
    other_split = prepare_token_cache(source, ByteTokenizer(), tmp_path, 0.3)
    with_test = prepare_token_cache(source, ByteTokenizer(), tmp_path, 0.2, test_fraction=0.1)
    assert len({byte.directory, bpe.directory, other_split.directory, with_test.directory}) == 4
    assert bpe.manifest["tokenizer"] == bpe_tokenizer.fingerprint
    assert bpe.num_tokens("train") < byte.num_tokens("train")
    assert bpe_tokenizer.decode(bpe.open("val").tolist()) == ByteTokenizer().decode(byte.open("val").tolist())


def test_changed_file_gets_a_fresh_cache(corpus_dir: Path, tmp_path: Path) -> None:
    before = prepare_token_cache(open_source(str(corpus_dir)), ByteTokenizer(), tmp_path, 0.2)
    (corpus_dir / "doc00.txt").write_text("changed text in the first document")
    after = prepare_token_cache(open_source(str(corpus_dir)), ByteTokenizer(), tmp_path, 0.2)
    assert after.directory != before.directory
    assert ByteTokenizer().decode(after.open("val").tolist()).startswith("changed text")


def truncate_train(cache: TokenCache) -> None:
    cache.path("train").write_bytes(cache.path("train").read_bytes()[:-4])


def write_out_of_vocabulary_ids(cache: TokenCache) -> None:
    np.full(cache.num_tokens("val"), 999, np.uint16).tofile(cache.path("val"))


def corrupt_manifest(cache: TokenCache) -> None:
    (cache.directory / "manifest.json").write_text("{")


def delete_val(cache: TokenCache) -> None:
    cache.path("val").unlink()


def flip_a_byte_keeping_size_and_mtime(cache: TokenCache) -> None:
    path = cache.path("train")
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def rewrite_manifest(change: Callable[[dict], object]) -> Callable[[TokenCache], None]:
    def damage(cache: TokenCache) -> None:
        manifest = json.loads((cache.directory / "manifest.json").read_text())
        (cache.directory / "manifest.json").write_text(json.dumps(change(manifest)))

    return damage


def without(manifest: dict, key: str) -> dict:
    return {name: value for name, value in manifest.items() if name != key}


def with_split(manifest: dict, split: object) -> dict:
    return {**manifest, "splits": {**manifest["splits"], "train": split}}


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (truncate_train, "train.bin has .* bytes, the manifest says"),
        (write_out_of_vocabulary_ids, r"val.bin bytes 0\.\.\d+ differ from their checksum"),
        (flip_a_byte_keeping_size_and_mtime, r"train.bin bytes 0\.\.\d+ differ from their checksum"),
        (corrupt_manifest, "unreadable manifest"),
        (delete_val, "val.bin has None bytes"),
        (rewrite_manifest(lambda manifest: [manifest]), "the manifest holds a list, not an object"),
        (rewrite_manifest(lambda manifest: without(manifest, "checksums")), "lacks its splits or checksums"),
        (rewrite_manifest(lambda manifest: {**manifest, "splits": []}), "lacks its splits or checksums"),
        (rewrite_manifest(lambda manifest: with_split(manifest, [1, 2, 3])), r"splits.train is \[1, 2, 3\]"),
        (rewrite_manifest(lambda manifest: with_split(manifest, {"tokens": "9"})), "splits.train is"),
        (rewrite_manifest(lambda manifest: {**manifest, "dtype": "float64"}), "manifest dtype is 'float64'"),
    ],
)
def test_damaged_cache_is_rebuilt_with_a_log_message(
    corpus_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    damage: Callable[[TokenCache], None],
    reason: str,
) -> None:
    source = open_source(str(corpus_dir))
    good = prepare_token_cache(source, ByteTokenizer(), tmp_path, 0.2)
    expected = {split: good.open(split).tolist() for split in ("train", "val")}
    damage(good)
    with caplog.at_level(logging.WARNING, logger="mf_lightning.data.cache"):
        rebuilt = prepare_token_cache(source, ByteTokenizer(), tmp_path, 0.2)
    assert any("rebuilding token cache" in message and re.search(reason, message) for message in caplog.messages)
    assert {split: rebuilt.open(split).tolist() for split in ("train", "val")} == expected


def build_in_chunks_of(monkeypatch: pytest.MonkeyPatch, corpus_dir: Path, tmp_path: Path) -> TokenCache:
    """A cache whose files have many checksummed chunks (64 bytes each)."""
    monkeypatch.setattr(cache_module, "CHUNK_BYTES", 64)
    cache = prepare_token_cache(open_source(str(corpus_dir)), ByteTokenizer(), tmp_path, 0.2)
    assert len(cache.manifest["checksums"]["train"]["crc32"]) > 20
    return cache


def damage_middle_chunk(cache: TokenCache, keep_mtime: bool) -> None:
    path = cache.path("train")
    stat = path.stat()
    with path.open("r+b") as file:
        file.seek(64 * 10 + 3)
        file.write(b"\xff")
    if keep_mtime:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_file_modified_since_written_is_checked_in_full(
    corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cache = build_in_chunks_of(monkeypatch, corpus_dir, tmp_path)
    damage_middle_chunk(cache, keep_mtime=False)
    with caplog.at_level(logging.WARNING, logger="mf_lightning.data.cache"):
        prepare_token_cache(open_source(str(corpus_dir)), ByteTokenizer(), tmp_path, 0.2)
    assert any("train.bin bytes 640..704 differ from their checksum" in message for message in caplog.messages)


def test_a_touched_file_is_checked_in_full_once_then_sampled_again(
    corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = build_in_chunks_of(monkeypatch, corpus_dir, tmp_path)
    os.utime(cache.path("train"), ns=(1, 1))
    checked: list[bool] = []
    real_checked_chunks = cache_module.checked_chunks

    def spy(count: int, full: bool) -> list[int]:
        checked.append(full)
        return real_checked_chunks(count, full)

    monkeypatch.setattr(cache_module, "checked_chunks", spy)
    for _ in range(2):
        reopened = prepare_token_cache(open_source(str(corpus_dir)), ByteTokenizer(), tmp_path, 0.2)
        assert reopened.directory == cache.directory
    assert checked == [True, False, False, False, False, False]  # train, val, test; twice
    assert json.loads((cache.directory / "manifest.json").read_text())["checksums"]["train"]["mtime_ns"] == 1


def test_verify_checks_every_chunk(
    corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cache = build_in_chunks_of(monkeypatch, corpus_dir, tmp_path)
    damage_middle_chunk(cache, keep_mtime=True)
    with caplog.at_level(logging.WARNING, logger="mf_lightning.data.cache"):
        rebuilt = prepare_token_cache(open_source(str(corpus_dir)), ByteTokenizer(), tmp_path, 0.2, verify=True)
    assert any("train.bin bytes 640..704 differ from their checksum" in message for message in caplog.messages)
    assert 0xFF not in rebuilt.open("train")[: 64 * 11 // 2].tolist()


def test_opening_checks_the_first_last_and_a_few_random_chunks() -> None:
    sampled = checked_chunks(1000, full=False)
    assert len(sampled) == 4 and sampled[0] == 0 and sampled[-1] == 999
    assert checked_chunks(1000, full=True) == list(range(1000))
    assert checked_chunks(3, full=False) == [0, 1, 2]


def test_interrupted_preparation_leaves_no_cache_only_its_hidden_parts_folder(corpus_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        prepare_token_cache(open_source(str(corpus_dir)), FailingTokenizer(), tmp_path, 0.2)
    (parts,) = (tmp_path / "tokens").iterdir()
    assert parts.name.endswith(".parts") and parts.name.startswith(".")


KILLED_BUILDER = """
import sys, time
from mf_lightning.data.cache import prepare_token_cache
from mf_lightning.data.sources import open_source
from mf_lightning.data.tokenizers import ByteTokenizer

class Stalling(ByteTokenizer):
    def encode_batch(self, texts):
        print("building", flush=True)
        time.sleep(60)

prepare_token_cache(open_source(sys.argv[1]), Stalling(), sys.argv[2], 0.2)
"""


@pytest.mark.slow
def test_a_build_killed_outright_leaves_nothing_once_the_next_build_ran(corpus_dir: Path, tmp_path: Path) -> None:
    builder = subprocess.Popen(
        [sys.executable, "-c", KILLED_BUILDER, str(corpus_dir), str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert builder.stdout.readline() == "building\n"
    staged = list((tmp_path / "tokens").iterdir())
    assert {path.suffix for path in staged} == {".lock", ".parts"} and all(path.name.startswith(".") for path in staged)
    builder.send_signal(signal.SIGKILL)
    builder.wait()
    cache = prepare_token_cache(open_source(str(corpus_dir)), ByteTokenizer(), tmp_path, 0.2)
    assert list((tmp_path / "tokens").iterdir()) == [cache.directory]


def test_a_build_stopped_by_sigterm_releases_its_lock_at_once(corpus_dir: Path, tmp_path: Path) -> None:
    """SIGTERM (a scheduler's stop, ``kill``) ends the builder through its cleanup: no lock is left for the next
    process to wait on; the finished parts stay to resume from."""
    builder = subprocess.Popen(
        [sys.executable, "-c", KILLED_BUILDER, str(corpus_dir), str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert builder.stdout.readline() == "building\n"
    builder.send_signal(signal.SIGTERM)
    assert builder.wait(timeout=60) == 128 + signal.SIGTERM
    assert [path.suffix for path in (tmp_path / "tokens").iterdir()] == [".parts"]


def test_staging_folders_of_running_builders_and_other_hosts_are_kept(corpus_dir: Path, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    staged = partial_path(tokens / "abc")
    running = staged.with_name(staged.name.replace(f"-{os.getpid()}-", f"-{os.getppid()}-"))
    elsewhere = tokens / ".abc.another_host-1-0a1b2c3d.partial"
    for folder in (running, elsewhere):
        folder.mkdir(parents=True)
    cache = prepare_token_cache(open_source(str(corpus_dir)), ByteTokenizer(), tmp_path, 0.2)
    assert sorted(tokens.iterdir()) == sorted([cache.directory, running, elsewhere])


def test_a_full_disk_while_building_names_the_cache_and_leaves_nothing(
    corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(self, data: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cache_module.ChecksummedWriter, "write", full)
    with pytest.raises(OSError, match="No space left on device") as raised:
        prepare_token_cache(open_source(str(corpus_dir)), ByteTokenizer(), tmp_path, 0.2)
    assert raised.value.errno == errno.ENOSPC
    assert Path(raised.value.filename).parent == tmp_path / "tokens"
    assert [path.suffix for path in (tmp_path / "tokens").iterdir()] == [".parts"]  # kept to resume from


def test_building_logs_its_progress(corpus_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with lines_every(0), caplog.at_level(logging.INFO, logger="mf_lightning.data"):
        prepare_token_cache(open_source(str(corpus_dir)), ByteTokenizer(), tmp_path, 0.2)
    assert any(re.match(r"tokenizing the corpus: 100% .* 12 documents", message) for message in caplog.messages)
    assert any(re.match(r"tokenized 12 documents into \d+ tokens", message) for message in caplog.messages)


def test_single_document_cannot_be_split(corpus_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"1 document\(s\), split \{'train': 0, 'val': 1, 'test': 0\}"):
        prepare_token_cache(open_source(str(corpus_dir / "doc00.txt")), ByteTokenizer(), tmp_path, 0.2)


@pytest.mark.parametrize("val_fraction,test_fraction", [(1.5, 0.0), (0.0, 0.1), (0.2, -0.1), (0.5, 0.5)])
def test_split_fractions_that_leave_no_split_are_refused(
    corpus_dir: Path, tmp_path: Path, val_fraction: float, test_fraction: float
) -> None:
    message = rf"test_fraction in \[0, 1\), and together below 1 .* got val_fraction={val_fraction}, test_fraction={test_fraction}"
    with pytest.raises(ValueError, match=message):
        prepare_token_cache(open_source(str(corpus_dir)), ByteTokenizer(), tmp_path, val_fraction, test_fraction)


def test_a_test_split_needs_a_document(corpus_dir: Path, tmp_path: Path) -> None:
    source = FileSource([corpus_dir / "doc00.txt", corpus_dir / "doc01.txt"])
    with pytest.raises(ValueError, match=r"2 document\(s\), split \{'train': 0, 'val': 1, 'test': 1\}"):
        prepare_token_cache(source, ByteTokenizer(), tmp_path, 0.2, test_fraction=0.1)


def test_dtype_follows_vocabulary_size(corpus_dir: Path, documents: list[str], tmp_path: Path) -> None:
    assert token_dtype(2**16) == np.uint16
    assert token_dtype(2**16 + 1) == np.uint32
    with pytest.raises(ValueError, match="does not fit uint32"):
        token_dtype(2**32 + 1)
    cache = prepare_token_cache(FileSource(sorted(corpus_dir.iterdir())), WideByteTokenizer(), tmp_path, 0.2)
    assert cache.dtype == np.uint32
    first = documents[0].encode()
    assert cache.open("val")[: len(first)].tolist() == [70_000 + byte for byte in first]
    assert int(cache.open("train").max()) == WideByteTokenizer.eos_id
