import json
import logging
import re
from pathlib import Path

import pytest
from corpus_support import make_documents
from tokenizers import Tokenizer as HFTokenizerModel
from tokenizers import models

from mf_lightning.data import tokenizers
from mf_lightning.data.progress import lines_every
from mf_lightning.data.sources import FileSource, sample_documents
from mf_lightning.data.tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer, train_bpe

TEXT = "Hello, wörld!\n\tTabs, spaces  and émojis 🎉 survive."


def test_byte_tokenizer_round_trips_utf8_and_drops_eos() -> None:
    tokenizer = load_tokenizer("byte")
    ids = tokenizer.encode(TEXT)
    assert ids == list(TEXT.encode("utf-8"))
    assert (tokenizer.vocab_size, tokenizer.eos_id) == (257, 256)
    assert tokenizer.decode(ids) == TEXT
    assert tokenizer.decode([tokenizer.eos_id, *ids, tokenizer.eos_id]) == TEXT


def test_decode_rejects_ids_outside_the_vocabulary() -> None:
    with pytest.raises(ValueError, match=r"token id 300 is outside .*\[0, 257\)"):
        ByteTokenizer().decode([72, 300])


def test_bpe_is_trained_once_round_trips_and_is_cached(
    corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = FileSource(sorted(corpus_dir.iterdir()))
    tokenizer = load_tokenizer("bpe:300", source, tmp_path / "cache")
    assert 257 < tokenizer.vocab_size <= 300
    assert tokenizer.decode(tokenizer.encode(TEXT)) == TEXT
    document = next(source.documents())
    assert len(tokenizer.encode(document)) < len(document.encode())
    assert tokenizer.decode([tokenizer.eos_id]) == ""

    monkeypatch.setattr(tokenizers, "train_bpe", lambda *args: pytest.fail("a cached BPE was trained again"))
    again = load_tokenizer("bpe:300", source, tmp_path / "cache")
    assert again.fingerprint == tokenizer.fingerprint
    assert again.encode(TEXT) == tokenizer.encode(TEXT)


def test_bpe_on_real_english_compresses_and_round_trips(real_prose_path: Path, tmp_path: Path) -> None:
    tokenizer = load_tokenizer("bpe:512", FileSource([real_prose_path]), tmp_path)
    text = real_prose_path.read_text(encoding="utf-8")[:5000]
    ids = tokenizer.encode(text)
    assert tokenizer.vocab_size == 512
    assert tokenizer.decode(ids) == text
    assert len(ids) < 0.6 * len(text.encode())


def test_fingerprints_differ_between_mappings(corpus_dir: Path, tmp_path: Path) -> None:
    source = FileSource(sorted(corpus_dir.iterdir()))
    fingerprints = {load_tokenizer(spec, source, tmp_path).fingerprint for spec in ("byte", "bpe:280", "bpe:300")}
    assert len(fingerprints) == 3


def test_tokenizer_json_file_and_folder_load_with_eos_from_config(corpus_dir: Path, tmp_path: Path) -> None:
    trained = load_tokenizer("bpe:300", FileSource(sorted(corpus_dir.iterdir())), tmp_path / "cache")
    folder = tmp_path / "hf_tokenizer"
    folder.mkdir()
    trained.model.save(str(folder / "tokenizer.json"))
    from_file = load_tokenizer(str(folder / "tokenizer.json"))
    assert isinstance(from_file, HFTokenizer)
    assert from_file.fingerprint == trained.fingerprint
    assert from_file.decode(from_file.encode(TEXT)) == TEXT

    trained.model.add_special_tokens(["</s>"])
    trained.model.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    from_folder = load_tokenizer(str(folder))
    assert from_folder.eos_id == trained.model.token_to_id("</s>")
    assert from_folder.fingerprint != trained.fingerprint


def test_tokenizer_without_end_of_text_token_is_refused(tmp_path: Path) -> None:
    model = HFTokenizerModel(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    model.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="none of the end-of-text tokens"):
        load_tokenizer(str(tmp_path))


def test_invalid_tokenizer_json_is_refused(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizers JSON file"):
        load_tokenizer(str(tmp_path / "tokenizer.json"))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("bpe:abc", "integer >= 257"),
        ("bpe:100", "integer >= 257"),
        ("no/such/tokenizer", 'unknown tokenizer .*"byte", a path .*"bpe:<vocab_size>"'),
    ],
)
def test_bad_specs_name_the_valid_forms(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_tokenizer(spec)


def test_bpe_needs_a_source_and_cache_dir() -> None:
    with pytest.raises(ValueError, match="trained on the corpus"):
        load_tokenizer("bpe:300")


def test_folder_without_tokenizer_json_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path))


def cached_bpe_folder(cache: Path) -> Path:
    (folder,) = (cache / "tokenizers").iterdir()
    return folder


def truncate_tokenizer_json(folder: Path) -> None:
    file = folder / "tokenizer.json"
    file.write_bytes(file.read_bytes()[:-100])


def swap_two_vocabulary_ids(folder: Path) -> None:
    file = folder / "tokenizer.json"
    text = file.read_text()
    assert '"a":65,' in text and '"b":66,' in text
    file.write_text(text.replace('"a":65,', '"a":66,').replace('"b":66,', '"b":65,', 1))


def write_a_list_manifest(folder: Path) -> None:
    (folder / "manifest.json").write_text("[300]")


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (truncate_tokenizer_json, "tokenizer.json differs from the SHA-256 recorded when it was written"),
        (swap_two_vocabulary_ids, "tokenizer.json differs from the SHA-256"),
        (write_a_list_manifest, r"the manifest is \[300\], expected vocab_size 300"),
        (lambda folder: (folder / "manifest.json").unlink(), "manifest.json is missing"),
    ],
)
def test_damaged_cached_bpe_is_trained_again_with_a_log_message(
    corpus_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, damage, reason: str
) -> None:
    source = FileSource(sorted(corpus_dir.iterdir()))
    first = load_tokenizer("bpe:300", source, tmp_path)
    damage(cached_bpe_folder(tmp_path))
    with caplog.at_level(logging.WARNING, logger="mf_lightning.data.tokenizers"):
        again = load_tokenizer("bpe:300", source, tmp_path)
    assert any("training tokenizer" in message and re.search(reason, message) for message in caplog.messages)
    assert again.fingerprint == first.fingerprint
    assert load_tokenizer("bpe:300", source, tmp_path).fingerprint == first.fingerprint


def test_bpe_larger_than_the_corpus_allows_says_what_it_gives(corpus_dir: Path, tmp_path: Path) -> None:
    source = FileSource(sorted(corpus_dir.iterdir()))
    with pytest.raises(ValueError, match=r"bpe:70000 cannot be trained on this corpus: it gives only (\d+) tokens"):
        load_tokenizer("bpe:70000", source, tmp_path)
    assert list(tmp_path.glob("tokenizers/*")) == []


def test_bpe_training_logs_its_progress(corpus_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with lines_every(0), caplog.at_level(logging.INFO, logger="mf_lightning.data"):
        load_tokenizer("bpe:300", FileSource(sorted(corpus_dir.iterdir())), tmp_path)
    assert any(re.match(r"reading text for bpe:300: \d+% .* 12 documents", message) for message in caplog.messages)
    assert any(re.match(r"trained bpe:300 in \d+ s", message) for message in caplog.messages)


def test_bpe_merge_phase_logs_a_heartbeat_off_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    no_spaces = [
        "".join(chr(0x4E00 + (index * 7919 + offset * 31) % 500) for offset in range(400)) for index in range(50)
    ]
    with lines_every(0.001), caplog.at_level(logging.INFO, logger="mf_lightning.data"):
        train_bpe(no_spaces, 1200)
    read = next(index for index, message in enumerate(caplog.messages) if message.startswith("read 50 documents"))
    assert any("training bpe:1200: still computing merges" in message for message in caplog.messages[read:])
    assert not any("still computing merges" in message for message in caplog.messages[:read])


def test_bpe_is_trained_on_a_bounded_sample_spread_over_the_corpus(tmp_path: Path) -> None:
    texts = [f"document {index} {text}" for index, text in enumerate(make_documents(400, words_per_document=40))]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    source = FileSource([tmp_path / "corpus.jsonl"])
    sample = list(sample_documents(source, sample_bytes=20_000, part_bytes=40_000))
    assert sample == list(sample_documents(source, sample_bytes=20_000, part_bytes=40_000))
    assert 20_000 <= sum(len(text.encode()) for text in sample) < 20_000 + 3 * max(len(text.encode()) for text in texts)
    numbers = [int(text.split()[1]) for text in sample]
    assert numbers[0] == 0 and numbers[-1] > 300  # drawn from every part, not the first documents only
    assert list(sample_documents(source, sample_bytes=10**9, part_bytes=40_000)) == texts
    small = load_tokenizer("bpe:300", source, tmp_path, sample_bytes=20_000)
    whole = load_tokenizer("bpe:300", source, tmp_path, sample_bytes=10**9)
    assert len(list((tmp_path / "tokenizers").iterdir())) == 2 and small.vocab_size == whole.vocab_size == 300
    assert load_tokenizer("bpe:300", source, tmp_path, sample_bytes=10**8).fingerprint == whole.fingerprint
    assert len(list((tmp_path / "tokenizers").iterdir())) == 2  # a limit above the corpus's size keys the same BPE
