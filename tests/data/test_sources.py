import gzip
import json
import os
import sysconfig
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from mf_lightning.data.sources import DEMO_MAX_BYTES, DemoSource, open_source


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("\n".join(json.dumps(record) for record in records) + "\n", encoding="utf-8")
    return path


def test_text_folder_yields_whole_files_in_sorted_order_skipping_hidden(corpus_dir: Path, documents: list[str]) -> None:
    (corpus_dir / ".hidden").write_text("never read")
    nested = corpus_dir / "zz_nested"
    nested.mkdir()
    (nested / "last.txt").write_text("nested text")
    assert list(open_source(str(corpus_dir)).documents()) == [*documents, "nested text"]


def test_glob_selects_matching_files(corpus_dir: Path, documents: list[str]) -> None:
    source = open_source(str(corpus_dir / "doc0*.txt"))
    assert list(source.documents()) == documents[:10]


def test_single_text_file_is_one_document(corpus_dir: Path, documents: list[str]) -> None:
    assert list(open_source(str(corpus_dir / "doc03.txt")).documents()) == [documents[3]]


def test_non_utf8_text_file_is_an_error_naming_it(corpus_dir: Path) -> None:
    (corpus_dir / "doc05.txt").write_bytes(b"caf\xe9 latin-1")
    with pytest.raises(ValueError, match=r"doc05.txt is not UTF-8"):
        list(open_source(str(corpus_dir)).documents())


def test_empty_text_file_is_an_error_naming_it(corpus_dir: Path) -> None:
    (corpus_dir / "doc07.txt").write_text("  \n")
    with pytest.raises(ValueError, match=r"doc07.txt is empty"):
        list(open_source(str(corpus_dir)).documents())


@pytest.mark.parametrize("spec", ["missing_folder", "missing/*.txt", ""])
def test_missing_sources_are_clear_errors(tmp_path: Path, spec: str) -> None:
    with pytest.raises((FileNotFoundError, ValueError), match="does not exist|matches no files|empty source"):
        open_source(str(tmp_path / spec) if spec else spec)


def test_empty_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="holds no files"):
        open_source(str(tmp_path))


def test_jsonl_reads_the_text_field_and_skips_blank_lines_and_empty_records(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [{"body": "first", "id": 1}, {"body": ""}, {"body": "second"}])
    path.write_text(path.read_text() + "\n\n")
    assert list(open_source(str(path), text_field="body").documents()) == ["first", "second"]
    path.rename(tmp_path / "data.json")
    assert list(open_source(str(tmp_path / "data.json"), text_field="body").documents()) == ["first", "second"]


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([{"text": "ok"}, {"body": "x"}], r"data.jsonl line 2 has no text field 'text' \(found \['body'\]\)"),
        ([{"text": 3}], r"data.jsonl line 1: field 'text' holds int"),
        ([["text"]], r"line 1 has no text field 'text' \(found list\)"),
    ],
)
def test_jsonl_bad_records_are_errors_naming_the_line(tmp_path: Path, records: list[object], message: str) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", records)
    with pytest.raises(ValueError, match=message):
        list(open_source(str(path)).documents())


def test_jsonl_invalid_json_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "data.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        list(open_source(str(tmp_path / "data.jsonl")).documents())


def test_non_utf8_jsonl_in_a_glob_names_the_file_and_line(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"text": "fine"}])
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"b.jsonl line 2 is not UTF-8 \(byte 13: invalid continuation byte\)"):
        list(open_source(str(tmp_path / "*.jsonl")).documents())


@pytest.mark.parametrize("damage", [lambda data: b"not parquet", lambda data: data[: len(data) // 2]])
def test_corrupt_parquet_in_a_glob_names_the_file(tmp_path: Path, damage: Callable[[bytes], bytes]) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["alpha"] * 50}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": ["beta"] * 50}), tmp_path / "b.parquet")
    (tmp_path / "b.parquet").write_bytes(damage((tmp_path / "b.parquet").read_bytes()))
    with pytest.raises(ValueError, match=r"Parquet file \S*b.parquet cannot be read \(.+\); it is truncated or not"):
        list(open_source(str(tmp_path / "*.parquet")).documents())


def test_parquet_reads_the_text_column_and_names_missing_ones(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["alpha", None, "beta"], "n": [1, 2, 3]}), tmp_path / "data.parquet")
    assert list(open_source(str(tmp_path / "data.parquet"), text_field="content").documents()) == ["alpha", "beta"]
    with pytest.raises(ValueError, match=r"data.parquet has no text field 'text'; its columns are \['content', 'n'\]"):
        list(open_source(str(tmp_path / "data.parquet")).documents())


def test_hf_dataset_saved_to_disk_by_split_with_clear_errors(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    splits = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["one", "", "two"]}),
            "test": datasets.Dataset.from_dict({"text": ["three"]}),
        }
    )
    splits.save_to_disk(str(tmp_path / "dict"))
    splits["train"].save_to_disk(str(tmp_path / "single"))
    assert list(open_source(str(tmp_path / "dict")).documents()) == ["one", "two"]
    assert list(open_source(str(tmp_path / "dict"), hf_split="test").documents()) == ["three"]
    assert list(open_source(str(tmp_path / "single")).documents()) == ["one", "two"]
    test_split = open_source(str(tmp_path / "dict"), hf_split="test")
    assert open_source(str(tmp_path / "dict")).identity != test_split.identity
    with pytest.raises(ValueError, match=r"no split 'validation'; its splits are \['train', 'test'\]"):
        list(open_source(str(tmp_path / "dict"), hf_split="validation").documents())
    with pytest.raises(ValueError, match=r"no text field 'body'; its columns are \['text'\]"):
        list(open_source(str(tmp_path / "single"), text_field="body").documents())


def test_a_dataset_is_cut_into_row_ranges_that_together_are_its_documents(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    texts = [f"row {index} " + "x" * (index % 50) for index in range(500)]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))
    source = open_source(str(tmp_path / "saved"))
    parts = source.parts(2000)
    assert len(parts) > 5 and parts[1].describe().startswith(f"part 1 (dataset {tmp_path / 'saved'} rows ")
    assert [document for part in parts for document in source.part_documents(part)] == texts
    assert sum(part.size for part in parts) == pytest.approx(source.dataset.data.nbytes, rel=0.01)


def test_demo_corpus_is_deterministic_stdlib_source_within_its_cap() -> None:
    demo = DemoSource(max_bytes=300_000)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert demo.files and all(file.suffix == ".py" and stdlib in file.parents for file in demo.files)
    assert not any({"test", "tests", "site-packages"} & set(file.parts) for file in demo.files)
    documents = list(demo.documents())
    assert 0 < sum(len(text.encode()) for text in documents) <= 300_000
    assert DemoSource(max_bytes=300_000).identity == demo.identity
    assert "def " in documents[0] or "import " in documents[0]


def test_demo_spec_opens_a_few_megabytes() -> None:
    demo = open_source("demo")
    total = sum(file.stat().st_size for file in demo.files)
    assert 1_000_000 < total <= DEMO_MAX_BYTES


def test_file_identity_changes_when_a_file_changes(corpus_dir: Path) -> None:
    before = open_source(str(corpus_dir)).identity
    file = corpus_dir / "doc02.txt"
    file.write_text(file.read_text() + " more")
    os.utime(file, ns=(1, 1))
    assert open_source(str(corpus_dir)).identity != before
    assert open_source(str(corpus_dir), text_field="body").identity != open_source(str(corpus_dir)).identity


def edit_keeping_size_and_mtime(file: Path) -> None:
    stat = file.stat()
    text = file.read_text()
    file.write_text(text[:10] + ("X" if text[10] != "X" else "Y") + text[11:])
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (file.stat().st_size, file.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)


def test_file_identity_changes_when_an_edit_keeps_size_and_mtime(corpus_dir: Path) -> None:
    before = open_source(str(corpus_dir)).identity
    edit_keeping_size_and_mtime(corpus_dir / "doc03.txt")
    assert open_source(str(corpus_dir)).identity != before


def test_file_identity_samples_content_where_ctime_cannot_be_trusted(
    corpus_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_stat = Path.stat

    class WithoutCtime:
        def __init__(self, result: os.stat_result) -> None:
            self.result = result

        def __getattr__(self, name: str) -> object:
            return 0 if name == "st_ctime_ns" else getattr(self.result, name)

    monkeypatch.setattr(Path, "stat", lambda path, **options: WithoutCtime(real_stat(path, **options)))
    before = open_source(str(corpus_dir)).identity
    edit_keeping_size_and_mtime(corpus_dir / "doc03.txt")
    assert open_source(str(corpus_dir)).identity != before


def test_document_separator_splits_plain_text_into_records(tmp_path):
    file = tmp_path / "fortunes.txt"
    file.write_text("first fortune\n%\nsecond\nfortune\n%\n\n%\nthird\n", encoding="utf-8")
    assert list(open_source(str(file), document_separator="%").documents()) == [
        "first fortune\n",
        "second\nfortune\n",
        "third\n",
    ]
    assert list(open_source(str(file)).documents()) == [file.read_text()]


def test_blank_line_separator(tmp_path):
    file = tmp_path / "prose.txt"
    file.write_text("para one\nstill one\n\npara two\n  \npara three", encoding="utf-8")
    assert list(open_source(str(file), document_separator="").documents()) == [
        "para one\nstill one\n",
        "para two\n",
        "para three",
    ]


def compressed_corpus(folder: Path, texts: list[str]) -> dict[str, Path]:
    """The same JSONL records as gzip and Zstandard files, and one text document of each kind."""
    folder.mkdir(exist_ok=True)
    lines = "".join(json.dumps({"text": text}) + "\n" for text in texts).encode()
    files = {
        ".jsonl.gz": gzip.compress(lines),
        ".json.gz": gzip.compress(lines),
        ".jsonl.zst": zstandard.ZstdCompressor().compress(lines),
        ".txt.gz": gzip.compress(texts[0].encode()),
        ".txt.zst": zstandard.ZstdCompressor().compress(texts[0].encode()),
    }
    for suffix, data in files.items():
        (folder / f"corpus{suffix}").write_bytes(data)
    return {suffix: folder / f"corpus{suffix}" for suffix in files}


def test_compressed_jsonl_and_text_read_like_the_plain_files(tmp_path: Path, documents: list[str]) -> None:
    files = compressed_corpus(tmp_path / "corpus", documents)
    for suffix in (".jsonl.gz", ".json.gz", ".jsonl.zst"):
        assert list(open_source(str(files[suffix])).documents()) == documents
    for suffix in (".txt.gz", ".txt.zst"):
        assert list(open_source(str(files[suffix])).documents()) == [documents[0]]
    assert len(list(open_source(str(tmp_path / "corpus" / "*.zst")).documents())) == len(documents) + 1
    assert len(list(open_source(str(tmp_path / "corpus")).documents())) == 3 * len(documents) + 2


def test_zstandard_frames_written_one_after_another_are_all_read(tmp_path: Path, documents: list[str]) -> None:
    frames = [zstandard.ZstdCompressor().compress((json.dumps({"text": text}) + "\n").encode()) for text in documents]
    (tmp_path / "frames.jsonl.zst").write_bytes(b"".join(frames))
    assert list(open_source(str(tmp_path / "frames.jsonl.zst")).documents()) == documents


def truncate(data: bytes) -> bytes:
    return data[: len(data) * 2 // 3]


def flip_middle(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes(byte ^ 0xFF for byte in data[middle : middle + 64]) + data[middle + 64 :]


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst", ".txt.gz", ".txt.zst"])
@pytest.mark.parametrize("damage", [truncate, flip_middle], ids=["truncated", "corrupt"])
def test_damaged_compressed_files_are_one_error_naming_the_file(
    tmp_path: Path, suffix: str, damage: Callable[[bytes], bytes]
) -> None:
    texts = [f"document {index} " + "words of text " * 40 for index in range(400)]
    path = compressed_corpus(tmp_path, texts)[suffix]
    path.write_bytes(damage(path.read_bytes()))
    where = " after document \\d+ of the file" if suffix.startswith(".jsonl") else ""
    damaged = rf"compressed file {path} is damaged or truncated{where} .*replace or remove it"
    garbled = rf"{path} line \d+ is not (valid JSON|UTF-8)"  # damage decoded to bad lines before gzip's CRC check
    with pytest.raises(ValueError, match=rf"{damaged}|{garbled}"):
        list(open_source(str(path)).documents())


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst", ".txt.gz", ".txt.zst"])
def test_empty_compressed_files_are_errors_naming_them(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"{path} (holds no documents|is empty).*remove it"):
        list(open_source(str(path)).documents())


@pytest.mark.parametrize("part_bytes", [1, 37, 500, 4096, 10**6])
def test_parts_of_a_jsonl_file_together_are_its_documents(tmp_path: Path, part_bytes: int) -> None:
    texts = [f"record {index} " + "é" * (index % 7) for index in range(300)]
    write_jsonl(tmp_path / "a.jsonl", [{"text": text} for text in texts[:200]])
    write_jsonl(tmp_path / "b.jsonl", [{"text": text} for text in texts[200:]])
    source = open_source(str(tmp_path))
    parts = source.parts(part_bytes)
    assert [document for part in parts for document in source.part_documents(part)] == texts
    assert [part.index for part in parts] == list(range(len(parts)))


def test_an_error_in_a_later_part_names_the_line_of_the_whole_file(tmp_path: Path) -> None:
    records = [json.dumps({"text": f"record {index}"}) for index in range(100)]
    records[80] = json.dumps({"other": 1})
    (tmp_path / "a.jsonl").write_text("\n".join(records) + "\n")
    source = open_source(str(tmp_path / "a.jsonl"))
    last = source.parts(200)[-1]
    with pytest.raises(ValueError, match=r"a.jsonl line 81 has no text field 'text'"):
        for part in source.parts(200)[: last.index + 1]:
            list(source.part_documents(part))
