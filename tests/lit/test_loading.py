"""One loader for inference: a run (config + checkpoint) or an exported folder gives the trained model and tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_support import run, state_of, tiny_run_args, write_corpus

from mf_lightning.cli import read_config
from mf_lightning.config import ModelConfig
from mf_lightning.data.tokenizers import (
    ByteTokenizer,
    HFTokenizer,
    load_folder_tokenizer,
    save_tokenizer,
    tokenizer_from_state,
    tokenizer_state,
    train_bpe,
)
from mf_lightning.lit import export as export_module
from mf_lightning.lit.checkpoints import TOKENIZER_STATE_KEY
from mf_lightning.lit.export import export_checkpoint
from mf_lightning.lit.loading import load_for_inference
from mf_lightning.lit.run_folders import run_folders
from mf_lightning.models import build_model
from mf_lightning.models.pretrained import clean_keys

TEXTS = ["the memory layer hashes tokens into buckets", "attention mixes them"] * 20


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory) -> Path:
    """A finished 4-step run of a BPE-tokenized corpus; returns its root folder."""
    root = tmp_path_factory.mktemp("bpe_run")
    corpus = write_corpus(root / "corpus")
    run("fit", tiny_run_args(root, corpus, max_steps=4, **{"data.tokenizer": "bpe:300", "validation.every_n_steps": 2}))
    return root


def run_of(config: Path):
    """The folders of the run whose config is ``config``, as mf eval and mf generate find them."""
    return run_folders(read_config([config]), config)


def assert_weights_of(model: torch.nn.Module, checkpoint: Path) -> None:
    expected = clean_keys(state_of(checkpoint))
    state = model.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[key], expected[key]) for key in state)


def test_a_run_loads_from_its_saved_config_and_last(bpe_run):
    model, tokenizer = load_for_inference(run_of(bpe_run / "tensorboard" / "config.yaml"), ckpt_path="last")
    assert_weights_of(model, bpe_run / "checkpoints" / "last.ckpt")
    assert not model.training
    assert isinstance(tokenizer, HFTokenizer) and tokenizer.vocab_size == 300
    checkpoint = torch.load(bpe_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert tokenizer.fingerprint == checkpoint["mf_tokenizer"]


def test_an_exported_folder_is_self_contained(bpe_run, tmp_path):
    checkpoint = bpe_run / "checkpoints" / "last.ckpt"
    folder = export_checkpoint(checkpoint, tmp_path / "model")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in folder.iterdir()
    }
    model, tokenizer = load_for_inference(model_dir=folder, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    _, from_run = load_for_inference(run_of(bpe_run / "tensorboard" / "config.yaml"), ckpt_path=checkpoint)
    assert tokenizer.fingerprint == from_run.fingerprint
    assert tokenizer.encode("memory layer") == from_run.encode("memory layer")


def test_a_checkpoint_without_a_tokenizer_is_refused(bpe_run, tmp_path):
    checkpoint = torch.load(bpe_run / "checkpoints" / "last.ckpt", weights_only=True)
    del checkpoint[TOKENIZER_STATE_KEY]
    foreign = tmp_path / "foreign.ckpt"
    torch.save(checkpoint, foreign)
    message = f"checkpoint {foreign} carries no tokenizer, so it was not written by mf fit"
    with pytest.raises(ValueError, match=message):
        load_for_inference(run_of(bpe_run / "tensorboard" / "config.yaml"), ckpt_path=foreign)
    with pytest.raises(ValueError, match=message):
        export_checkpoint(foreign, tmp_path / "model")


def test_bad_requests_name_what_is_missing(bpe_run, tmp_path):
    with pytest.raises(ValueError, match="either --model_dir"):
        load_for_inference()
    with pytest.raises(ValueError, match="either --model_dir"):
        load_for_inference(run_of(bpe_run / "tensorboard" / "config.yaml"), model_dir=tmp_path)
    with pytest.raises(ValueError, match="needs --config"):
        load_for_inference(ckpt_path="last")
    empty = tmp_path / "tensorboard" / "config.yaml"
    empty.parent.mkdir()
    empty.write_text("trainer: {default_root_dir: nowhere}\n")
    with pytest.raises(FileNotFoundError, match="has no last.ckpt"):
        load_for_inference(run_of(empty), ckpt_path="last")
    with pytest.raises(FileNotFoundError, match="holds no tokenizer"):
        load_folder_tokenizer(tmp_path)


@pytest.mark.parametrize("tokenizer", [ByteTokenizer(), train_bpe(TEXTS, 280)], ids=["byte", "bpe"])
def test_tokenizers_round_trip_through_checkpoint_state_and_folders(tokenizer, tmp_path):
    for restored in (tokenizer_from_state(tokenizer_state(tokenizer), "x"), save_and_load(tokenizer, tmp_path)):
        assert type(restored) is type(tokenizer)
        assert (restored.fingerprint, restored.eos_id, restored.vocab_size) == (
            tokenizer.fingerprint,
            tokenizer.eos_id,
            tokenizer.vocab_size,
        )
        assert restored.encode("hashes tokens") == tokenizer.encode("hashes tokens")


def save_and_load(tokenizer, folder: Path):
    save_tokenizer(tokenizer, folder)
    return load_folder_tokenizer(folder)


def test_an_interrupted_export_leaves_the_previous_folder_with_its_tokenizer(bpe_run, tmp_path, monkeypatch):
    """The tokenizer is written into the staged folder with the model: an export interrupted while writing it
    leaves the previous export whole, not the new model beside the old model's tokenizer."""
    folder = tmp_path / "model"
    build_model(ModelConfig.from_preset("debug")).save_pretrained(folder)
    save_tokenizer(ByteTokenizer(), folder)
    before = {path.name: path.read_bytes() for path in folder.iterdir()}

    def interrupted(tokenizer, directory):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "save_tokenizer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(bpe_run / "checkpoints" / "last.ckpt", folder, overwrite=True)
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
    assert [path.name for path in tmp_path.iterdir()] == ["model"]


def test_export_finds_last_from_the_runs_config_and_says_what_to_pass_without_it(bpe_run, tmp_path, capsys):
    config = bpe_run / "tensorboard" / "config.yaml"
    run("export", ["--config", str(config), "--ckpt_path", "last", "--out", str(tmp_path / "model")])
    model, _ = load_for_inference(model_dir=tmp_path / "model")
    assert_weights_of(model, bpe_run / "checkpoints" / "last.ckpt")
    modes = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "model").iterdir()}
    assert len(set(modes.values())) == 1, modes  # model.safetensors as readable as config.json
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run("export", ["--ckpt_path", "last", "--out", str(tmp_path / "other")])
    assert capsys.readouterr().err.startswith("mf: error: --ckpt_path last needs --config (the run's config.yaml)")
