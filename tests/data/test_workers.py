"""Parallel, resumable preparation: the cache built by worker processes is the serial build, byte for byte."""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zstandard
from corpus_support import make_documents
from worker_tokenizers import KILL_MARK, KillingByteTokenizer

from mf_lightning.data import cache as cache_module
from mf_lightning.data.cache import SPLITS, document_split, prepare_token_cache
from mf_lightning.data.sources import FileSource, open_source
from mf_lightning.data.tokenizers import ByteTokenizer, train_bpe
from mf_lightning.data.workers import PreparationFailed

REPO = Path(__file__).resolve().parents[2]


def write_mixed_corpus(folder: Path, documents: list[str]) -> Path:
    """``documents`` spread in order over plain, gzip and Zstandard JSONL files and text files."""
    folder.mkdir(parents=True)
    quarter = len(documents) // 4
    lines = lambda texts: "".join(json.dumps({"text": text}) + "\n" for text in texts).encode()  # noqa: E731
    (folder / "a.jsonl").write_bytes(lines(documents[:quarter]))
    (folder / "b.jsonl.gz").write_bytes(gzip.compress(lines(documents[quarter : 2 * quarter])))
    (folder / "c.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress(lines(documents[2 * quarter : 3 * quarter]))
    )
    (folder / "d.jsonl").write_bytes(lines(documents[3 * quarter : -2]))
    (folder / "e.txt.gz").write_bytes(gzip.compress(documents[-2].encode()))
    (folder / "f.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(documents[-1].encode()))
    return folder


def split_files(cache: cache_module.TokenCache) -> dict[str, bytes]:
    return {split: cache.path(split).read_bytes() for split in SPLITS}


def test_workers_build_the_serial_cache_byte_for_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    documents = make_documents(3000, words_per_document=12)
    source = FileSource(sorted(write_mixed_corpus(tmp_path / "corpus", documents).iterdir()))
    assert list(source.documents()) == documents
    tokenizer = train_bpe(documents[:200], 300)
    monkeypatch.setattr(cache_module, "PART_BYTES", 8192)  # about 20 parts, JSONL files cut into byte ranges
    assert len(source.parts(cache_module.PART_BYTES)) > 10
    parallel = prepare_token_cache(source, tokenizer, tmp_path / "parallel", 0.05, 0.05, workers=2)
    serial = prepare_token_cache(source, tokenizer, tmp_path / "serial", 0.05, 0.05, workers=1)
    assert split_files(parallel) == split_files(serial)
    assert parallel.manifest["splits"] == serial.manifest["splits"]
    for split in SPLITS:  # the tokens are what encoding each document of the split in order gives
        texts = [text for index, text in enumerate(documents) if document_split(index, 0.05, 0.05) == split]
        expected = [token for text in texts for token in [*tokenizer.encode(text), tokenizer.eos_id]]
        assert parallel.open(split).tolist() == expected
    assert sorted(path.name for path in (tmp_path / "parallel" / "tokens").iterdir()) == [parallel.directory.name]


BUILDER = """
import sys
from mf_lightning.data import cache
from mf_lightning.data.sources import open_source
from worker_tokenizers import SlowByteTokenizer

cache.PART_BYTES = 4096
print("started", flush=True)
cache.prepare_token_cache(open_source(sys.argv[1]), SlowByteTokenizer(), sys.argv[2], 0.1, 0.1, workers=2)
print("finished", flush=True)
"""


@pytest.mark.slow
def test_a_preparation_killed_at_a_random_moment_resumes_to_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus = write_mixed_corpus(tmp_path / "corpus", make_documents(4000, words_per_document=10))
    monkeypatch.setattr(cache_module, "PART_BYTES", 4096)
    reference = prepare_token_cache(
        open_source(str(corpus)), ByteTokenizer(), tmp_path / "reference", 0.1, 0.1, workers=1
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(Path(__file__).parent)])}
    builder = subprocess.Popen(
        [sys.executable, "-c", BUILDER, str(corpus), str(tmp_path / "killed")],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert builder.stdout.readline() == "started\n"
    time.sleep(random.uniform(0.5, 6.0))
    os.killpg(builder.pid, signal.SIGKILL)  # the builder and its workers at once, like a crash
    builder.wait()
    resumed = prepare_token_cache(open_source(str(corpus)), ByteTokenizer(), tmp_path / "killed", 0.1, 0.1, workers=2)
    assert split_files(resumed) == split_files(reference)
    assert list((tmp_path / "killed" / "tokens").iterdir()) == [resumed.directory]


def test_a_killed_worker_names_its_part_and_the_rerun_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    documents = make_documents(600, words_per_document=10)
    documents[450] = f"{KILL_MARK} {documents[450]}"
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "all.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in documents))
    monkeypatch.setattr(cache_module, "PART_BYTES", 4096)
    source = open_source(str(corpus))
    with pytest.raises(PreparationFailed) as raised:
        prepare_token_cache(source, KillingByteTokenizer(), tmp_path / "cache", 0.1, workers=2)
    message = str(raised.value)
    assert "was killed by SIGKILL, likely the out-of-memory killer, while tokenizing part " in message
    assert f"{corpus / 'all.jsonl'} bytes " in message and "run the same preparation again to resume" in message
    (parts,) = (tmp_path / "cache" / "tokens").iterdir()
    assert len(list(parts.glob("*.done"))) > 0  # the parts finished before the kill are kept


def test_a_file_gone_mid_preparation_is_one_error_naming_it(
    corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = open_source(str(corpus_dir))
    planned = FileSource.parts

    def plan_then_lose_a_file(self: FileSource, part_bytes: int) -> list:
        parts = planned(self, part_bytes)
        (corpus_dir / "doc05.txt").unlink(missing_ok=True)
        return parts

    monkeypatch.setattr(FileSource, "parts", plan_then_lose_a_file)
    with pytest.raises(PreparationFailed, match=r"part 0 \(12 files, .*doc05.txt: No such file or directory$"):
        prepare_token_cache(source, ByteTokenizer(), tmp_path, 0.2, workers=1)  # no "run again to resume": a
        # corpus whose file is back has another identity, and is tokenized anew


def test_bad_json_in_a_worker_names_file_line_and_part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = [json.dumps({"text": text}) for text in make_documents(300, words_per_document=10)]
    lines[250] = "{not json"
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(cache_module, "PART_BYTES", 4096)
    with pytest.raises(
        PreparationFailed, match=r"part \d+ \(.*c.jsonl bytes \d+\.\.\d+\): .*c.jsonl line 251 is not valid JSON"
    ) as raised:
        prepare_token_cache(open_source(str(tmp_path / "c.jsonl")), ByteTokenizer(), tmp_path / "cache", 0.1, workers=2)
    assert "resume" not in str(raised.value)  # the fixed file is another corpus, tokenized anew


def test_a_file_edited_mid_preparation_is_refused_not_cached(
    corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = open_source(str(corpus_dir))
    planned = FileSource.parts

    def plan_then_edit_a_file(self: FileSource, part_bytes: int) -> list:
        parts = planned(self, part_bytes)
        (corpus_dir / "doc05.txt").write_text("edited while being read")
        return parts

    monkeypatch.setattr(FileSource, "parts", plan_then_edit_a_file)
    with pytest.raises(
        ValueError, match=r"the corpus changed while it was being tokenized \(.*doc05.txt was modified\)"
    ):
        prepare_token_cache(source, ByteTokenizer(), tmp_path, 0.2, workers=1)
    assert list((tmp_path / "tokens").iterdir()) == []  # no cache, and no parts that could never be resumed
