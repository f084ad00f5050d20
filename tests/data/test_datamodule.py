from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn

from mf_lightning.data import TextDataModule
from mf_lightning.data.cache import document_split
from mf_lightning.models.base import IGNORE_INDEX

SEQ_LEN = 16
BATCH = 4


@pytest.fixture
def make_datamodule(corpus_dir: Path, tmp_path: Path):
    def make(**overrides) -> TextDataModule:
        args = {"source": str(corpus_dir), "seq_len": SEQ_LEN, "batch_size": BATCH, "val_fraction": 0.2}
        return TextDataModule(**{**args, "cache_dir": str(tmp_path / "cache"), **overrides})

    return make


def take(loader, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == count:
            return batches
    return batches


def same_batches(first: list, second: list) -> bool:
    pairs = zip(first, second)
    return len(first) == len(second) and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in pairs)


def test_vocab_size_and_tokenizer_are_ready_after_init(make_datamodule) -> None:
    assert make_datamodule().vocab_size == 257
    bpe = make_datamodule(tokenizer="bpe:300")
    assert 257 < bpe.vocab_size <= 300
    assert bpe.tokenizer.decode(bpe.tokenizer.encode("hashes über")) == "hashes über"


def test_training_batches_are_shifted_windows_and_reproducible(make_datamodule) -> None:
    datamodule = make_datamodule()
    datamodule.setup("fit")
    batches = take(datamodule.train_dataloader(), 3)
    for x, y in batches:
        assert x.shape == y.shape == (BATCH, SEQ_LEN) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert int(x.max()) < datamodule.vocab_size
    assert same_batches(take(make_datamodule().train_dataloader(), 3), batches)
    assert not same_batches(take(make_datamodule(seed=99).train_dataloader(), 3), batches)


def test_validation_windows_are_deterministic_and_capped(make_datamodule) -> None:
    datamodule = make_datamodule(val_windows=3)
    batches = list(datamodule.val_dataloader())
    assert sum(len(x) for x, _ in batches) == 3
    tokens = torch.from_numpy(datamodule.token_cache().open("val")[: 3 * SEQ_LEN + 1].astype("int64"))
    assert torch.equal(batches[0][0][1], tokens[SEQ_LEN : 2 * SEQ_LEN])
    assert same_batches(list(datamodule.val_dataloader()), batches)
    uncapped = make_datamodule()
    assert len(uncapped.val_dataloader().dataset) == (uncapped.token_cache().num_tokens("val") - 1) // SEQ_LEN


def test_test_windows_come_from_held_out_documents_of_their_own(make_datamodule, documents: list[str]) -> None:
    datamodule = make_datamodule(test_fraction=0.1)
    tokenizer = datamodule.tokenizer
    held_out = [text for index, text in enumerate(documents) if document_split(index, 0.2, 0.1) == "test"]
    x, _ = next(iter(datamodule.test_dataloader()))
    assert x[0].tolist() == tokenizer.encode(held_out[0])[:SEQ_LEN]
    texts = {
        split: tokenizer.decode(datamodule.token_cache().open(split).tolist()) for split in ("train", "val", "test")
    }
    assert texts["test"] == "".join(held_out)
    assert all(text not in texts["train"] + texts["val"] for text in held_out)


def test_without_a_test_split_test_is_a_clear_error(make_datamodule) -> None:
    with pytest.raises(ValueError, match="data.test_fraction is 0, so there is no test split"):
        make_datamodule(test_fraction=0.0).test_dataloader()


def test_bytes_per_token_is_utf8_bytes_over_the_split_tokens(make_datamodule, documents: list[str]) -> None:
    datamodule = make_datamodule()
    for split in ("val", "test"):
        texts = [text for index, text in enumerate(documents) if document_split(index, 0.2, 0.05) == split]
        expected = sum(len(text.encode()) for text in texts) / sum(len(text.encode()) + 1 for text in texts)
        assert datamodule.bytes_per_token(split) == pytest.approx(expected)
    assert make_datamodule(tokenizer="bpe:300").bytes_per_token("val") > 1.5


def test_resumed_loader_yields_what_the_uninterrupted_one_yields_next(make_datamodule) -> None:
    uninterrupted = take(make_datamodule(train_samples_per_epoch=16).train_dataloader(), 9)
    resumed = make_datamodule(train_samples_per_epoch=16).train_dataloader()
    resumed.load_state_dict({"consumed_samples": 3 * BATCH})
    assert same_batches(take(resumed, 6), uninterrupted[3:])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_state_counts_the_batches_handed_out_not_read_ahead(make_datamodule, num_workers) -> None:
    loader = make_datamodule(train_samples_per_epoch=16, num_workers=num_workers).train_dataloader()
    assert loader.state_dict() == {"consumed_samples": 0}
    iterator = iter(loader)
    for _ in range(3):
        next(iterator)
    assert loader.state_dict() == {"consumed_samples": 3 * BATCH}
    with pytest.raises(ValueError, match="consumed_samples as an int >= 0"):
        loader.load_state_dict({"consumed_samples": -1})


def test_ddp_ranks_get_disjoint_samples(make_datamodule) -> None:
    indices = []
    for rank in (0, 1):
        datamodule = make_datamodule(train_samples_per_epoch=64)
        datamodule.trainer = SimpleNamespace(global_step=0, accumulate_grad_batches=1, world_size=2, global_rank=rank)
        loader = datamodule.train_dataloader()
        indices.append(list(loader.sampler))
    assert len(indices[0]) == len(indices[1]) == 32
    assert not set(indices[0]) & set(indices[1])
    assert sorted(indices[0] + indices[1]) == list(range(64))


def test_validation_windows_count_once_over_ranks_that_stay_in_step(make_datamodule) -> None:
    """5 windows over 2 ranks: 3 items each, the filler one with every target ignored, so no window
    counts twice (Lightning's DistributedSampler would repeat one) and both ranks run 2 batches."""
    single = [x for batch_x, _ in make_datamodule(val_windows=5, batch_size=2).val_dataloader() for x in batch_x]
    counted, batches = [], []
    for rank in (0, 1):
        datamodule = make_datamodule(val_windows=5, batch_size=2)
        datamodule.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        loader = list(datamodule.val_dataloader())
        batches.append(len(loader))
        counted += [x for batch_x, batch_y in loader for x, y in zip(batch_x, batch_y) if (y != IGNORE_INDEX).all()]
    assert batches == [2, 2]
    assert len(counted) == len(single) == 5
    assert all(any(torch.equal(x, window) for x in counted) for window in single)


def test_two_workers_give_the_same_batches(make_datamodule) -> None:
    serial = take(make_datamodule().train_dataloader(), 4)
    loader = make_datamodule(num_workers=2).train_dataloader()
    assert loader.num_workers == 2
    assert same_batches(take(loader, 4), serial)


def test_predict_yields_one_prompt_per_batch_starting_with_eos(make_datamodule, tmp_path: Path) -> None:
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("Once upon\n\nthe memory über\n", encoding="utf-8")
    for prompts in (["Once upon", "the memory über"], str(prompts_file)):
        datamodule = make_datamodule(prompts=prompts)
        batches = list(datamodule.predict_dataloader())
        assert [batch["prompt"] for batch in batches] == ["Once upon", "the memory über"]
        ids = batches[1]["input_ids"]
        assert ids.dtype == torch.int64 and ids.shape == (1, 1 + len("the memory über".encode()))
        assert int(ids[0, 0]) == datamodule.tokenizer.eos_id
        assert datamodule.tokenizer.decode(ids[0].tolist()) == "the memory über"


def test_predict_without_prompts_or_with_a_missing_file_is_an_error(make_datamodule, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="predict needs prompts"):
        make_datamodule().predict_dataloader()
    with pytest.raises(FileNotFoundError, match="prompts file .*nope.txt does not exist"):
        make_datamodule(prompts=str(tmp_path / "nope.txt"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"seq_len": 0}, "seq_len must be an integer >= 1, got 0"),
        ({"batch_size": -2}, "batch_size must be an integer >= 1, got -2"),
        ({"val_windows": 0}, "val_windows must be an integer >= 1, got 0"),
        ({"train_samples_per_epoch": 0}, "train_samples_per_epoch must be an integer >= 1"),
        ({"num_workers": -1}, "num_workers and seed must be >= 0"),
        ({"seed": -5}, "num_workers and seed must be >= 0"),
        ({"val_fraction": 0.0}, r"val_fraction must be in \(0, 1\), .* got val_fraction=0.0"),
        ({"test_fraction": 0.9}, r"together below 1 .* got val_fraction=0.2, test_fraction=0.9"),
        ({"text_field": ""}, "text_field and hf_split must be non-empty"),
        ({"prompts": ["ok", 3]}, "prompts must be strings"),
        ({"tokenizer": "wordpiece"}, "unknown tokenizer 'wordpiece'"),
    ],
)
def test_bad_arguments_are_named(make_datamodule, overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_datamodule(**overrides)


def test_corpus_too_small_for_seq_len_names_the_sizes(make_datamodule) -> None:
    with pytest.raises(
        ValueError, match=r"too small for seq_len=4000: token counts \{'train': \d+, 'val': \d+, 'test': \d+\}"
    ):
        make_datamodule(seq_len=4000).setup("fit")


def test_cache_dir_defaults_to_the_environment_variable(
    corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MF_CACHE_DIR", str(tmp_path / "from_env"))
    datamodule = TextDataModule(source=str(corpus_dir), seq_len=SEQ_LEN, val_fraction=0.2)
    datamodule.prepare_data()
    assert datamodule.token_cache().directory.parent == tmp_path / "from_env" / "tokens"


def test_demo_corpus_serves_batches(tmp_path: Path) -> None:
    datamodule = TextDataModule(seq_len=SEQ_LEN, batch_size=2, cache_dir=str(tmp_path), val_windows=2)
    datamodule.setup("fit")
    x, y = next(iter(datamodule.train_dataloader()))
    assert x.shape == (2, SEQ_LEN) and torch.equal(x[:, 1:], y[:, :-1])
    assert len(list(datamodule.val_dataloader())) == 1


class RecordingModel(L.LightningModule):
    """A tiny bigram model that records the training batches it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.logits = nn.Embedding(257, 257)
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.seen.append(x.clone())
        return nn.functional.cross_entropy(self.logits(x).flatten(0, 1), y.flatten())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(datamodule: TextDataModule, max_steps: int, ckpt_path: Path | None = None) -> tuple[RecordingModel, L.Trainer]:
    model = RecordingModel()
    trainer = L.Trainer(
        max_steps=max_steps,
        accumulate_grad_batches=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    return model, trainer


@pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning")
@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`")
def test_lightning_resume_from_checkpoint_continues_the_sample_stream(make_datamodule, tmp_path: Path) -> None:
    uninterrupted, _ = fit(make_datamodule(train_samples_per_epoch=24), max_steps=5)
    first_half, trainer = fit(make_datamodule(train_samples_per_epoch=24), max_steps=2)
    trainer.save_checkpoint(tmp_path / "step2.ckpt")
    checkpoint = torch.load(tmp_path / "step2.ckpt", weights_only=True)
    assert checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"consumed_samples": 2 * 2 * BATCH}]
    second_half, _ = fit(make_datamodule(train_samples_per_epoch=24), max_steps=5, ckpt_path=tmp_path / "step2.ckpt")
    assert len(uninterrupted.seen) == 10
    resumed = first_half.seen + second_half.seen
    assert len(resumed) == 10
    assert all(torch.equal(a, b) for a, b in zip(resumed, uninterrupted.seen))


def test_every_argument_can_be_filled_from_the_command_line(corpus_dir: Path, tmp_path: Path) -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(TextDataModule, "data")
    config = parser.parse_args(
        [
            f"--data.source={corpus_dir}",
            f"--data.cache_dir={tmp_path}",
            "--data.seq_len=16",
            "--data.val_fraction=0.2",
            "--data.val_windows=2",
            "--data.prompts=[Once, upon]",
            "--data.tokenizer=bpe:300",
        ]
    )
    datamodule = parser.instantiate(config).data
    assert datamodule.prompts == ["Once", "upon"]
    assert datamodule.val_windows == 2 and datamodule.hparams.tokenizer == "bpe:300"
