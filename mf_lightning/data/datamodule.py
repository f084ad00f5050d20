"""``TextDataModule``: a text corpus as random training windows, fixed validation windows and prompts.

Every argument is a plain value LightningCLI fills from YAML. The tokenizer is ready after
``__init__`` (a BPE is trained or loaded then) so ``vocab_size`` can be linked into the model config;
the corpus is tokenized into the token cache in ``prepare_data`` / ``setup`` by ``prepare_workers``
processes, once per job (the other processes wait and check it). A cache opened rather than built here
is checked in full in the background (``verification``); the training loader and ``teardown`` raise if
it is damaged. ``mf prepare`` builds the tokenizer and cache ahead of training (``prepare_cli``).

Training is governed by ``max_steps``: an epoch is ``train_samples_per_epoch`` random windows. The
training loader (``ResumableLoader``) records how many samples the run consumed, and Lightning keeps
that in the checkpoint, so a resumed run continues with exactly the samples an uninterrupted one would
see. The training sampler shards across DDP ranks itself and Lightning keeps it as is (it is a
``DistributedSampler``); evaluation loaders shard the validation and test windows themselves so that
each counts once whatever the number of ranks (``data.sharded_evaluation``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from mf_lightning.checks import positive_int
from mf_lightning.data.cache import TokenCache, check_fractions, prepare_token_cache
from mf_lightning.data.sharded_evaluation import sharded_evaluation
from mf_lightning.data.sources import open_source
from mf_lightning.data.token_windows import ConsecutiveWindows, RandomWindows, ResumableLoader, ResumableSampler
from mf_lightning.data.tokenizers import DEFAULT_SAMPLE_BYTES, load_tokenizer
from mf_lightning.data.verification import FullCheck

CACHE_DIR_VARIABLE = "MF_CACHE_DIR"
DEFAULT_CACHE_DIR = "~/.cache/mf_lightning"


class TextDataModule(L.LightningDataModule):
    """Serves ``(x, y)`` int64 batches ``[batch_size, seq_len]`` (``y`` is ``x`` shifted by one) from a corpus.

    Args:
        source: ``"demo"``, a text/JSONL/Parquet file, folder or glob, a ``save_to_disk`` folder, or
            ``"hf:<name>"`` (see ``mf_lightning.data.sources``).
        tokenizer: ``"byte"``, a ``tokenizer.json`` path or folder, or ``"bpe:<vocab_size>"``.
        text_field: the text field of JSONL, Parquet and dataset records.
        seq_len: tokens per training window.
        batch_size: windows per batch on each device.
        val_fraction: fraction of documents held out for validation: checkpoint selection and curves.
        test_fraction: fraction of documents held out for ``mf test``, disjoint from training and
            validation: the final numbers, never looked at while training; 0 for no test split.
        num_workers: DataLoader worker processes.
        cache_dir: where token caches and trained tokenizers live; default ``$MF_CACHE_DIR`` or
            ``~/.cache/mf_lightning``.
        seed: decides the training windows.
        val_windows: at most this many validation windows (all when ``None``).
        prompts: prompts for ``predict``: a list, or the path of a text file with one prompt per line.
        hf_split: the split of a Hugging Face dataset source.
        document_separator: in plain-text files, a line that separates documents (``"%"`` for fortune
            files, ``""`` for blank lines); ``None`` makes each file one document. A single-file corpus
            needs one, since training and validation are split by documents.
        train_samples_per_epoch: windows per epoch over all ranks (rounded down to whole optimizer steps).
        prepare_workers: processes that tokenize the corpus into the cache; ``None`` for every core this
            process may use. The cache is the same whatever the number.
        bpe_sample_bytes: a ``bpe:<N>`` tokenizer is trained on at most this much text, a reproducible
            share of every part of the corpus (all of a smaller one); default 1 GiB.
        verify_cache: check every chunk of a token cache found on disk before training starts (a cache
            that fails is rebuilt), instead of a sample then and the rest in the background while training
            runs (``verification``); for a cache whose disk or copy you do not trust.
    """

    def __init__(
        self,
        source: str = "demo",
        tokenizer: str = "byte",
        text_field: str = "text",
        seq_len: int = 256,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        num_workers: int = 0,
        cache_dir: str | None = None,
        seed: int = 1234,
        val_windows: int | None = None,
        prompts: list[str] | str | None = None,
        hf_split: str = "train",
        train_samples_per_epoch: int = 1_000_000,
        document_separator: str | None = None,
        prepare_workers: int | None = None,
        bpe_sample_bytes: int = DEFAULT_SAMPLE_BYTES,
        verify_cache: bool = False,
    ) -> None:
        super().__init__()
        check_positive(seq_len=seq_len, batch_size=batch_size, train_samples_per_epoch=train_samples_per_epoch)
        if val_windows is not None:
            check_positive(val_windows=val_windows)
        if prepare_workers is not None:
            check_positive(prepare_workers=prepare_workers)
        check_positive(bpe_sample_bytes=bpe_sample_bytes)
        if num_workers < 0 or seed < 0:
            raise ValueError(f"num_workers and seed must be >= 0, got num_workers={num_workers}, seed={seed}")
        check_fractions(val_fraction, test_fraction)
        if not isinstance(verify_cache, bool):
            raise ValueError(f"verify_cache must be true or false, got {verify_cache!r}")
        if not text_field or not hf_split:
            raise ValueError(f"text_field and hf_split must be non-empty, got {text_field!r} and {hf_split!r}")
        self.save_hyperparameters()
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.num_workers = num_workers
        self.seed = seed
        self.val_windows = val_windows
        self.train_samples_per_epoch = train_samples_per_epoch
        self.prompts = read_prompts(prompts)
        self.prepare_workers = prepare_workers
        self.verify_cache = verify_cache
        self.cache_dir = resolve_cache_dir(cache_dir)
        self.corpus = open_source(source, text_field, hf_split, document_separator)
        self.tokenizer = load_tokenizer(tokenizer, self.corpus, self.cache_dir, bpe_sample_bytes)
        self._cache: TokenCache | None = None
        self._full_check: FullCheck | None = None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def token_cache(self) -> TokenCache:
        """The prepared token cache, built on first use and checked to hold a window in each split."""
        if self._cache is None:
            cache = prepare_token_cache(
                self.corpus,
                self.tokenizer,
                self.cache_dir,
                self.val_fraction,
                self.test_fraction,
                self.prepare_workers,
                self.verify_cache,
            )
            splits = ("train", "val", "test") if self.test_fraction > 0 else ("train", "val")
            sizes = {split: cache.num_tokens(split) for split in splits}
            if min(sizes.values()) < self.seq_len + 1:
                raise ValueError(
                    f"the corpus is too small for seq_len={self.seq_len}: token counts {sizes}, each split needs "
                    f"at least seq_len + 1 = {self.seq_len + 1}; "
                    "use more text, a shorter seq_len or a larger val_fraction / test_fraction"
                )
            self._cache = cache
            if not cache.verified:
                self._full_check = FullCheck(cache)
        return self._cache

    def raise_if_damaged(self) -> None:
        """Raises ``DamagedCache`` once the background check has found the cache damaged."""
        if self._full_check is not None:
            self._full_check.raise_if_damaged()

    def bytes_per_token(self, split: str) -> float:
        """UTF-8 bytes per token of ``split`` (``"val"`` or ``"test"``): bits per byte = loss / ln(2) / bytes_per_token."""
        return self.token_cache().bytes_per_token(split)

    def prepare_data(self) -> None:
        """Tokenizes the corpus into the token cache (Lightning calls this on one process per node)."""
        self.token_cache()

    def setup(self, stage: str) -> None:
        """Opens and checks the token cache on every process."""
        self.token_cache()

    def teardown(self, stage: str) -> None:
        """Waits for the background check of the cache; raises ``DamagedCache`` if it failed."""
        if self._full_check is not None:
            self._full_check.wait()

    def train_dataloader(self) -> DataLoader:
        world_size, rank, accumulate = 1, 0, 1
        if self.trainer is not None:
            world_size, rank = self.trainer.world_size, self.trainer.global_rank
            accumulate = self.trainer.accumulate_grad_batches
        step_samples = self.batch_size * accumulate * world_size
        epoch_samples = max(1, self.train_samples_per_epoch // step_samples) * step_samples
        cache = self.token_cache()
        dataset = RandomWindows(
            cache.path("train"), cache.dtype.name, cache.num_tokens("train"), self.seq_len, self.seed, epoch_samples
        )
        sampler = ResumableSampler(dataset, epoch_samples, num_replicas=world_size, rank=rank)
        return ResumableLoader(
            dataset,
            sampler,
            self.batch_size,
            check=self.raise_if_damaged,
            persistent_workers=self.num_workers > 0,
            **self._loader_options(),
        )

    def val_dataloader(self) -> DataLoader:
        """The validation windows, each counted once over all ranks (``mf_lightning.data.sharded_evaluation``)."""
        return self._evaluation_loader("val")

    def test_dataloader(self) -> DataLoader:
        """Windows of the test documents (``test_fraction`` of the corpus, held out from training and validation)."""
        if self.test_fraction == 0:
            raise ValueError(
                "data.test_fraction is 0, so there is no test split; set it > 0 (e.g. 0.05) to hold one out"
            )
        return self._evaluation_loader("test")

    def _evaluation_loader(self, split: str) -> DataLoader:
        """Consecutive windows of ``split`` (at most ``val_windows``), each counted once over all ranks."""
        cache = self.token_cache()
        windows = ConsecutiveWindows(
            cache.path(split), cache.dtype.name, cache.num_tokens(split), self.seq_len, self.val_windows
        )
        world_size, rank = (1, 0) if self.trainer is None else (self.trainer.world_size, self.trainer.global_rank)
        dataset, sampler = sharded_evaluation(windows, world_size, rank)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, **self._loader_options())

    def predict_dataloader(self) -> DataLoader:
        """One prompt per batch: ``{"prompt": str, "input_ids": LongTensor [1, T]}``, ids starting with EOS."""
        if not self.prompts:
            raise ValueError("predict needs prompts: a list of strings or a text file with one prompt per line")
        items = [
            {"prompt": prompt, "input_ids": torch.tensor([[self.tokenizer.eos_id, *self.tokenizer.encode(prompt)]])}
            for prompt in self.prompts
        ]
        return DataLoader(items, batch_size=1, collate_fn=only_item)

    def _loader_options(self) -> dict[str, Any]:
        return {"num_workers": self.num_workers, "pin_memory": torch.cuda.is_available()}


def only_item(batch: list[Any]) -> Any:
    """Collates a batch of one item into that item."""
    return batch[0]


def check_positive(**values: int) -> None:
    """Raises naming the first of ``values`` that is not an int >= 1."""
    for name, value in values.items():
        positive_int(name, value, "an integer >= 1")


def resolve_cache_dir(cache_dir: str | None) -> Path:
    """``cache_dir``, else ``$MF_CACHE_DIR``, else ``~/.cache/mf_lightning``, with ``~`` expanded."""
    return Path(cache_dir or os.environ.get(CACHE_DIR_VARIABLE) or DEFAULT_CACHE_DIR).expanduser()


def read_prompts(prompts: list[str] | str | None) -> list[str] | None:
    """The prompts as a list: given directly, or the non-empty lines of the text file ``prompts``."""
    if isinstance(prompts, list) and not all(isinstance(prompt, str) for prompt in prompts):
        raise ValueError(f"prompts must be strings, got {prompts!r}")
    if prompts is None or isinstance(prompts, list):
        return prompts
    path = Path(prompts)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist; give a list or a text file, one prompt per line")
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
