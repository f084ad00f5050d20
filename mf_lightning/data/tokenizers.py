"""Tokenizers behind one small interface: built-in bytes, any ``tokenizer.json``, or a BPE trained on the corpus.

``load_tokenizer(spec)`` accepts ``"byte"`` (256 byte values + EOS, nothing to download), a path to a
``tokenizer.json`` file or to a Hugging Face tokenizer folder holding one, or ``"bpe:<vocab_size>"``: a
byte-level BPE trained once on the corpus with the ``tokenizers`` library and cached as a folder
(``tokenizer.json`` + ``manifest.json`` recording its SHA-256), built in a staging folder and swapped
into place (``mf_lightning.fs.folders``); a cached BPE whose file does not match its checksum is logged and trained again. A corpus
too small for the requested size is an error saying what size it gives.

The BPE is trained on at most ``sample_bytes`` of text (``sources.sample_documents``: a share of every part
of the corpus, the same every time), so its training time and memory stay flat as the corpus grows; all
of a smaller corpus is used. Processes of one job asking at once train it once (``mf_lightning.fs.lock``). Reading
the sample shows progress (``progress``), and the merge phase, silent off a terminal, logs a heartbeat.
Every tokenizer has a ``fingerprint`` that changes whenever its text-to-id mapping could, so token
caches keyed by it are never reused with another mapping.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizerModel
from tokenizers import decoders, models, pre_tokenizers, trainers

from mf_lightning.data.progress import Heartbeat, Progress, on_terminal
from mf_lightning.data.sources import Source, sample_documents
from mf_lightning.fs.folders import replaced_folder
from mf_lightning.fs.lock import FileLock

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
KNOWN_EOS_TOKENS = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>")
TOKENIZER_FILE = "tokenizer.json"
MANIFEST = "manifest.json"
DEFAULT_SAMPLE_BYTES = 1 << 30
SAMPLE_PART_BYTES = 8 << 20
VALID_SPECS = '"byte", a path to a tokenizer.json file or a folder holding one, or "bpe:<vocab_size>" (e.g. "bpe:4096")'


class Tokenizer(ABC):
    """Maps text to token ids and back; ``eos_id`` separates documents and ends generation."""

    vocab_size: int
    eos_id: int
    fingerprint: str

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without added special tokens."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; end-of-text tokens are dropped."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of several texts (subclasses may do this in parallel)."""
        return [self.encode(text) for text in texts]

    def check_ids(self, ids: Iterable[int]) -> None:
        """Raises ``ValueError`` naming the first id outside ``[0, vocab_size)``."""
        for token_id in ids:
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(f"token id {token_id} is outside this tokenizer's vocabulary [0, {self.vocab_size})")


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255 and EOS as 256: works on any text, needs no files."""

    vocab_size = 257
    eos_id = 256
    fingerprint = "byte-v1"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        self.check_ids(ids)
        return bytes(i for i in ids if i != self.eos_id).decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    """A ``tokenizers`` library tokenizer (any ``tokenizer.json``) with a known end-of-text token."""

    def __init__(self, model: HFTokenizerModel, eos_token: str, name: str) -> None:
        eos_id = model.token_to_id(eos_token)
        if eos_id is None:
            raise ValueError(f"tokenizer {name} has no token {eos_token!r} to use as end-of-text")
        self.model = model
        self.eos_id = eos_id
        self.vocab_size = model.get_vocab_size(with_added_tokens=True)
        self.fingerprint = "hf-" + hashlib.sha256(model.to_str().encode()).hexdigest()[:16]

    @classmethod
    def from_path(cls, path: str | os.PathLike) -> HFTokenizer:
        """Loads ``path``, a ``tokenizer.json`` or a folder holding one (and maybe a ``tokenizer_config.json``)."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {file}; expected {VALID_SPECS}")
        try:
            model = HFTokenizerModel.from_file(str(file))
        except Exception as error:
            raise ValueError(f"{file} is not a valid tokenizers JSON file: {error}") from error
        return cls(model, find_eos_token(model, file.parent / "tokenizer_config.json", file), str(file))

    def encode(self, text: str) -> list[int]:
        return self.model.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """The ids of ``texts``, by ``encode_batch_fast``: the same ids without the character offsets we never use."""
        return [encoding.ids for encoding in self.model.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        self.check_ids(ids)
        return self.model.decode(ids, skip_special_tokens=True)

    @property
    def eos_token(self) -> str:
        """The end-of-text token's text."""
        return self.model.id_to_token(self.eos_id)


def find_eos_token(model: HFTokenizerModel, config_file: Path, name: Path) -> str:
    """The end-of-text token: ``eos_token`` of the tokenizer config beside it, else a well-known one present."""
    if config_file.is_file():
        eos = json.loads(config_file.read_text(encoding="utf-8")).get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str):
            return eos
    for token in KNOWN_EOS_TOKENS:
        if model.token_to_id(token) is not None:
            return token
    raise ValueError(
        f"tokenizer {name} has none of the end-of-text tokens {list(KNOWN_EOS_TOKENS)} "
        f"and no eos_token in {config_file}; add one of them to the tokenizer"
    )


def train_bpe(documents: Iterable[str], vocab_size: int, text_bytes: int | None = None) -> HFTokenizer:
    """Trains a byte-level BPE of ``vocab_size`` tokens (all 256 bytes and EOS included) on ``documents``.

    ``text_bytes``, the expected size of the text when known, lets the reading progress show an ETA.
    """
    model = HFTokenizerModel(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=on_terminal(),
    )
    progress = Progress(f"reading text for bpe:{vocab_size}", text_bytes)
    merging = Heartbeat(f"training bpe:{vocab_size}: still computing merges")

    def read() -> Iterable[str]:
        for document in documents:
            yield document
            progress.advance(len(document.encode("utf-8")), 1)
        progress.close()
        log.info(
            "read %d documents (%.1f MB) for bpe:%d; computing its merges",
            progress.documents,
            progress.done / 1e6,
            vocab_size,
        )
        merging.start()

    try:
        model.train_from_iterator(read(), trainer)
    finally:
        merging.stop()
    tokenizer = HFTokenizer(model, EOS_TOKEN, f"bpe:{vocab_size}")
    if tokenizer.vocab_size < vocab_size:
        raise ValueError(
            f"tokenizer bpe:{vocab_size} cannot be trained on this corpus: it gives only {tokenizer.vocab_size} "
            f"tokens (256 bytes, EOS and every merge its text holds); use bpe:{tokenizer.vocab_size} or less, "
            "or a larger corpus"
        )
    return tokenizer


def load_bpe(
    vocab_size: int, source: Source, cache_dir: str | os.PathLike, sample_bytes: int = DEFAULT_SAMPLE_BYTES
) -> HFTokenizer:
    """The BPE for this corpus and size from ``cache_dir/tokenizers``, trained on a sample of at most ``sample_bytes``
    and saved there on first use (once per job: see the module). The sample size is part of the key only when
    it is smaller than the corpus, since a BPE trained on all of it is the same whatever the limit."""
    corpus_bytes = sum(part.size for part in source.parts(SAMPLE_PART_BYTES))
    sampled = f"\n{sample_bytes}" if corpus_bytes > sample_bytes else ""
    key = hashlib.sha256(f"{source.identity}\n{vocab_size}{sampled}".encode()).hexdigest()[:16]
    folder = Path(cache_dir) / "tokenizers" / f"bpe-{vocab_size}-{key}"
    problem = saved_bpe_problem(folder, vocab_size)
    if problem is None:
        return HFTokenizer.from_path(folder / TOKENIZER_FILE)
    with FileLock(folder.parent / f".{folder.name}.lock", f"the tokenizer {folder}"):
        problem = saved_bpe_problem(folder, vocab_size)  # another process may have trained it meanwhile
        if problem is None:
            return HFTokenizer.from_path(folder / TOKENIZER_FILE)
        if folder.exists():
            log.warning("training tokenizer %s again: %s", folder, problem)
        return train_and_save_bpe(vocab_size, source, folder, sample_bytes, min(sample_bytes, corpus_bytes))


def train_and_save_bpe(
    vocab_size: int, source: Source, folder: Path, sample_bytes: int, text_bytes: int
) -> HFTokenizer:
    """Trains the BPE on the corpus's sample (about ``text_bytes``) and saves it in ``folder`` (staged, then moved)."""
    log.info(
        "training a byte-level BPE with %d tokens on at most %s bytes of the corpus, saved to %s",
        vocab_size,
        f"{sample_bytes:,}",
        folder,
    )
    started = time.monotonic()
    tokenizer = train_bpe(sample_documents(source, sample_bytes, SAMPLE_PART_BYTES), vocab_size, text_bytes)
    log.info("trained bpe:%d in %.0f s", vocab_size, time.monotonic() - started)
    text = tokenizer.model.to_str()
    manifest = {"vocab_size": vocab_size, "sha256": hashlib.sha256(text.encode()).hexdigest()}
    with replaced_folder(folder, "saving the trained tokenizer") as staged:
        (staged / TOKENIZER_FILE).write_text(text, encoding="utf-8")
        (staged / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    return tokenizer


def saved_bpe_problem(folder: Path, vocab_size: int) -> str | None:
    """Why the BPE saved in ``folder`` cannot be used (missing, or not what was written), or ``None``."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        data = (folder / TOKENIZER_FILE).read_bytes()
    except FileNotFoundError as error:
        return f"{Path(error.filename).name} is missing"
    except (OSError, ValueError) as error:
        return f"unreadable manifest ({error})"
    if not isinstance(manifest, dict) or manifest.get("vocab_size") != vocab_size:
        return f"the manifest is {manifest!r}, expected vocab_size {vocab_size} and a sha256"
    if hashlib.sha256(data).hexdigest() != manifest.get("sha256"):
        return f"{TOKENIZER_FILE} differs from the SHA-256 recorded when it was written"
    return None


def parse_bpe_size(spec: str) -> int:
    """The vocabulary size of a ``"bpe:<vocab_size>"`` spec, at least 257 (256 bytes + EOS)."""
    size = spec.removeprefix("bpe:")
    if not size.isdigit() or int(size) < ByteTokenizer.vocab_size:
        raise ValueError(f"tokenizer spec {spec!r}: the BPE vocabulary size must be an integer >= 257 (bytes + EOS)")
    return int(size)


def load_tokenizer(
    spec: str,
    source: Source | None = None,
    cache_dir: str | os.PathLike | None = None,
    sample_bytes: int = DEFAULT_SAMPLE_BYTES,
) -> Tokenizer:
    """The tokenizer named by ``spec``: ``"byte"``, a tokenizer path, or ``"bpe:<vocab_size>"``.

    A BPE is trained on at most ``sample_bytes`` of the documents of ``source`` and cached under ``cache_dir``;
    both are required for it.
    """
    if spec == "byte":
        return ByteTokenizer()
    if spec.startswith("bpe:"):
        vocab_size = parse_bpe_size(spec)
        if source is None or cache_dir is None:
            raise ValueError(f"tokenizer {spec!r} is trained on the corpus: pass its source and a cache_dir")
        return load_bpe(vocab_size, source, cache_dir, sample_bytes)
    if Path(spec).exists():
        return HFTokenizer.from_path(spec)
    raise ValueError(f"unknown tokenizer {spec!r} (no such file or folder); expected {VALID_SPECS}")


TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
BYTE_MARKER = "mf_byte_tokenizer"


def tokenizer_state(tokenizer: Tokenizer) -> dict[str, str]:
    """The whole tokenizer as plain strings, small enough to store in a checkpoint and rebuild from."""
    if isinstance(tokenizer, ByteTokenizer):
        return {"kind": "byte"}
    if isinstance(tokenizer, HFTokenizer):
        return {"kind": "hf", "json": tokenizer.model.to_str(), "eos_token": tokenizer.eos_token}
    raise TypeError(f"cannot serialise a tokenizer of type {type(tokenizer).__name__}")


def tokenizer_from_state(state: dict[str, str], where: str) -> Tokenizer:
    """Inverse of :func:`tokenizer_state`; ``where`` names the file the state came from in errors."""
    kind = state.get("kind") if isinstance(state, dict) else None
    if kind == "byte":
        return ByteTokenizer()
    if kind == "hf" and isinstance(state.get("json"), str) and isinstance(state.get("eos_token"), str):
        try:
            model = HFTokenizerModel.from_str(state["json"])
        except Exception as error:
            raise ValueError(f"the tokenizer stored in {where} cannot be read: {error}") from error
        return HFTokenizer(model, state["eos_token"], where)
    raise ValueError(f"{where} holds no readable tokenizer (got {kind!r}, expected 'byte' or 'hf')")


def save_tokenizer(tokenizer: Tokenizer, directory: str | os.PathLike) -> None:
    """Write ``tokenizer`` into a model folder: ``tokenizer.json`` + ``tokenizer_config.json``, the Hugging Face
    layout that ``tokenizers`` and ``transformers.AutoTokenizer`` load; the byte tokenizer as the equivalent
    byte-level ``tokenizer.json`` (:func:`byte_tokenizer_model`), its config naming it so mf reads it back
    as the byte tokenizer."""
    directory = Path(directory)
    if isinstance(tokenizer, HFTokenizer):
        model, config = tokenizer.model, {}
    else:
        tokenizer_state(tokenizer)
        model, config = byte_tokenizer_model(), {BYTE_MARKER: True, "eos_token_id": tokenizer.eos_id}
    eos = model.id_to_token(tokenizer.eos_id)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": eos, **config}
    (directory / TOKENIZER_FILE).write_text(model.to_str(), encoding="utf-8")
    (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def byte_tokenizer_model() -> HFTokenizerModel:
    """The byte tokenizer as a ``tokenizers`` tokenizer: byte ``b`` is id ``b`` (GPT-2's byte-level alphabet,
    no merges) and :data:`EOS_TOKEN` is id 256, so Hugging Face tools encode and decode as ``ByteTokenizer``."""
    alphabet = byte_level_alphabet()
    model = HFTokenizerModel(models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    model.decoder = decoders.ByteLevel()
    model.add_special_tokens([EOS_TOKEN])
    return model


def byte_level_alphabet() -> list[str]:
    """GPT-2's ``bytes_to_unicode``: the printable character ByteLevel pre-tokenisation maps each byte value to."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    characters, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            characters[byte] = chr(byte)
        else:
            characters[byte] = chr(256 + extra)
            extra += 1
    return [characters[byte] for byte in range(256)]


def load_folder_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """The tokenizer saved by :func:`save_tokenizer` in a model folder."""
    directory = Path(directory)
    config_file = directory / TOKENIZER_CONFIG_FILE
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{config_file} is not valid JSON: {error}") from error
        if isinstance(config, dict) and config.get(BYTE_MARKER) is True:
            return ByteTokenizer()
    if (directory / TOKENIZER_FILE).is_file():
        return HFTokenizer.from_path(directory)
    raise FileNotFoundError(
        f"{directory} holds no tokenizer ({TOKENIZER_FILE} or a byte-tokenizer {TOKENIZER_CONFIG_FILE}); "
        "export the model again with `mf export`, which writes it"
    )
