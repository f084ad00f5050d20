"""Checkpoint files: atomic writes and links, safe reads with clear errors, and the model/tokenizer fit checks."""

from __future__ import annotations

import fractions
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from mf_lightning.config import ModelConfig
from mf_lightning.fs.atomic import partial_path
from mf_lightning.lit import LanguageModel
from mf_lightning.lit.checkpoints import (
    AtomicCheckpointIO,
    AtomicModelCheckpoint,
    align_state_keys,
    check_checkpoint,
    check_run_folder,
    read_checkpoint,
    stamp_checkpoint,
)

CONFIG = ModelConfig.from_preset("debug").to_dict()


def checkpoint_with(value: float) -> dict:
    return {"state_dict": {"w": torch.full((2, 3), value)}, "global_step": int(value)}


def test_save_and_load_round_trip(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "sub" / "last.ckpt"
    io.save_checkpoint(checkpoint_with(1.0), path)
    loaded = io.load_checkpoint(path)
    assert torch.equal(loaded["state_dict"]["w"], torch.ones(2, 3)) and loaded["global_step"] == 1
    assert os.listdir(path.parent) == ["last.ckpt"]


def test_a_save_that_dies_midway_keeps_the_previous_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint(checkpoint_with(1.0), path)

    def torn_write(obj, file):
        file.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", torn_write)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint(checkpoint_with(2.0), path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["global_step"] == 1
    assert not partial_path(path).exists()


def test_a_kill_before_the_rename_keeps_the_previous_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint(checkpoint_with(1.0), path)
    monkeypatch.setattr(os, "replace", lambda *args: (_ for _ in ()).throw(SystemExit("killed")))
    with pytest.raises(SystemExit):
        io.save_checkpoint(checkpoint_with(2.0), path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["global_step"] == 1


def test_two_writers_saving_one_target_at_once_both_complete(tmp_path, monkeypatch):
    """A second writer finishing while the first is mid-write must neither break nor tear the first's file."""
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    real_save = torch.save

    def first_writer_interrupted_by_a_second(obj, file):
        monkeypatch.setattr(torch, "save", real_save)
        io.save_checkpoint(checkpoint_with(2.0), path)
        real_save(obj, file)

    monkeypatch.setattr(torch, "save", first_writer_interrupted_by_a_second)
    io.save_checkpoint(checkpoint_with(1.0), path)
    assert io.load_checkpoint(path)["global_step"] == 1, "the last rename wins with a complete file"
    assert os.listdir(tmp_path) == ["last.ckpt"]


def test_temporary_names_are_unique_and_stale_ones_of_dead_writers_are_removed(tmp_path):
    path = tmp_path / "last.ckpt"
    assert partial_path(path) != partial_path(path)
    assert partial_path(path).name.startswith(".last.ckpt.") and f"-{os.getpid()}-" in partial_path(path).name
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = partial_path(path).with_name(partial_path(path).name.replace(f"-{os.getpid()}-", f"-{dead.pid}-"))
    live = partial_path(path)
    stale.write_bytes(b"left by a killed writer")
    live.write_bytes(b"being written by this process")
    AtomicCheckpointIO().save_checkpoint(checkpoint_with(1.0), path)
    assert not stale.exists() and live.exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "truncated, corrupt or not a checkpoint"),
        (b"", "truncated, corrupt or not a checkpoint"),
        (b"this is not a checkpoint", "truncated, corrupt or not a checkpoint"),
    ],
    ids=["truncated", "empty", "garbage"],
)
def test_unreadable_checkpoints_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "bad.ckpt"
    if content is None:
        torch.save(checkpoint_with(1.0), path)
        content = path.read_bytes()[:-100]
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as error:
        AtomicCheckpointIO().load_checkpoint(path)
    assert str(path) in str(error.value)


def test_pickled_objects_are_refused_unless_trusted(tmp_path):
    path = tmp_path / "objects.ckpt"
    torch.save({"state_dict": {}, "ratio": fractions.Fraction(1, 3)}, path)
    with pytest.raises(ValueError, match=r"Python object \(fractions.Fraction\).*weights_only: false"):
        AtomicCheckpointIO().load_checkpoint(path)
    assert AtomicCheckpointIO(weights_only=False).load_checkpoint(path)["ratio"] == fractions.Fraction(1, 3)


def test_missing_folder_and_foreign_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.ckpt")
    with pytest.raises(ValueError, match="is a folder, expected a .ckpt file"):
        read_checkpoint(tmp_path)
    torch.save({"weights": torch.ones(1)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not a Lightning checkpoint"):
        read_checkpoint(tmp_path / "plain.pt")


def test_last_link_is_swapped_atomically(tmp_path, monkeypatch):
    trainer = SimpleNamespace(is_global_zero=True, strategy=SimpleNamespace(barrier=lambda: None))
    first, second, last = tmp_path / "step=2.ckpt", tmp_path / "step=4.ckpt", tmp_path / "last.ckpt"
    first.write_text("2")
    second.write_text("4")
    AtomicModelCheckpoint.link_last(trainer, str(first), str(last))
    assert last.is_symlink() and last.read_text() == "2"
    monkeypatch.setattr(os, "replace", lambda *args: (_ for _ in ()).throw(SystemExit("killed")))
    with pytest.raises(SystemExit):
        AtomicModelCheckpoint.link_last(trainer, str(second), str(last))
    assert last.read_text() == "2", "a kill while linking must leave the previous last.ckpt in place"
    monkeypatch.undo()
    AtomicModelCheckpoint.link_last(trainer, str(second), str(last))
    assert last.read_text() == "4" and os.readlink(last) == "step=4.ckpt"


def stamped(config: dict, tokenizer: str | None, state: dict) -> dict:
    checkpoint = {"state_dict": state}
    stamp_checkpoint(checkpoint, config, tokenizer)
    return checkpoint


def test_a_checkpoint_of_another_model_names_every_difference():
    state = {"w": torch.zeros(2)}
    other = {**CONFIG, "arch": "transformer", "n_layer": 3}
    with pytest.raises(ValueError) as error:
        check_checkpoint(stamped(other, None, state), CONFIG, None, state, Path("runs/x/last.ckpt"))
    message = str(error.value)
    assert "checkpoint runs/x/last.ckpt holds another model" in message
    assert "arch='transformer' in the checkpoint, 'memoryformer' in the config" in message
    assert "n_layer=3 in the checkpoint, 2 in the config" in message
    assert "tensorboard/config.yaml" in message


def test_runtime_fields_may_change():
    state = {"w": torch.zeros(2)}
    resumed = {**CONFIG, "backend": "torch", "dropout": 0.1, "max_seq_len": 1024}
    check_checkpoint(stamped(CONFIG, "byte-v1", state), resumed, "byte-v1", state)


def test_another_tokenizer_is_refused():
    state = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match="tokenizer 'hf-aaa', but data.tokenizer gives 'hf-bbb'"):
        check_checkpoint(stamped(CONFIG, "hf-aaa", state), CONFIG, "hf-bbb", state)


def test_an_unstamped_checkpoint_is_checked_by_its_tensors():
    expected = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    checkpoint = {"state_dict": {"a": torch.zeros(3, 2), "c": torch.zeros(1)}}
    with pytest.raises(ValueError) as error:
        check_checkpoint(checkpoint, CONFIG, None, expected)
    assert "missing (1): b; unexpected (1): c; wrong shape (1): a (3, 2) != (2, 3)" in str(error.value)


def test_compiled_and_plain_keys_align():
    compiled = {"model._orig_mod.blocks.0.w": 1, "model._orig_mod.head.w": 2}
    plain = {"model.blocks.0.w": 0, "model.head.w": 0}
    assert align_state_keys(compiled, plain) == {"model.blocks.0.w": 1, "model.head.w": 2}
    assert align_state_keys({"model.head.w": 3}, {"model._orig_mod.head.w": 0}) == {"model._orig_mod.head.w": 3}


def test_language_model_checkpoints_carry_and_check_their_config(tmp_path):
    module = LanguageModel(overrides={"n_layer": 1})
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["mf_model_config"]["n_layer"] == 1
    LanguageModel(overrides={"n_layer": 1, "dropout": 0.1}).on_load_checkpoint(dict(checkpoint))
    with pytest.raises(ValueError, match="n_layer=1 in the checkpoint, 2 in the config"):
        LanguageModel().on_load_checkpoint(dict(checkpoint))


class ScriptedScore(pl.LightningModule):
    """A regression whose validation logs ``score`` from a script, so a test decides which validations improve."""

    def __init__(self, scores: list[float]) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)
        self.scores = scores
        self.validations = 0

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.mse_loss(self.linear(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        pass

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.log("score", self.scores[self.validations])
            self.validations += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class LastAfterValidation(pl.Callback):
    """Records (step validated, step held by last.ckpt right after) for every validation, and the final pair."""

    def __init__(self, last: Path) -> None:
        self.last, self.pairs, self.validated = last, [], None

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.validated = trainer.global_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.record()

    def on_train_end(self, trainer, pl_module) -> None:
        self.record()

    def record(self) -> None:
        if self.validated is not None:
            self.pairs.append((self.validated, torch.load(self.last, weights_only=True)["global_step"]))
            self.validated = None


def fit_scripted(
    folder: Path, scores: list[float], save_last=True, max_steps=8, ckpt_path=None, callbacks=(), **checkpoint_options
):
    """Fits ``ScriptedScore`` validating every 2 steps into ``folder``; returns (trainer, module, probe, saved names)."""
    probe = LastAfterValidation(folder / "last.ckpt")
    checkpoint = AtomicModelCheckpoint(
        dirpath=folder, monitor="score", save_last=save_last, filename="best-{step}", **checkpoint_options
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[checkpoint, probe, *callbacks],
    )
    saved, real_save = [], trainer.save_checkpoint

    def recording_save(path, *args, **kwargs):
        saved.append(Path(path).name)
        real_save(path, *args, **kwargs)

    trainer.save_checkpoint = recording_save
    module = ScriptedScore(scores)
    data = TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
    trainer.fit(module, DataLoader(data, batch_size=4), DataLoader(data, batch_size=4), ckpt_path=ckpt_path)
    return trainer, module, probe, saved


@pytest.mark.parametrize("save_last", [True, "link"])
def test_last_holds_every_validated_model_whatever_the_metric(tmp_path, save_last):
    """Validations at steps 2, 4, 6, 8 with scores 1, 2 (worse), 0.5 (best), 3 (worse, at the end)."""
    trainer, module, probe, saved = fit_scripted(tmp_path, [1.0, 2.0, 0.5, 3.0], save_last=save_last)
    assert probe.pairs == [(2, 2), (4, 4), (6, 6), (8, 8)]
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert all(torch.equal(last["state_dict"][key], value) for key, value in module.state_dict().items())
    assert sorted(path.name for path in tmp_path.glob("*.ckpt")) == ["best-step=6.ckpt", "last.ckpt"]
    # One save per validation beside Lightning's: it writes last beside a new best (a link under "link"),
    # this callback writes it after a validation that is not one.
    expected = {
        True: ["best-step=2.ckpt", "last.ckpt", "last.ckpt", "best-step=6.ckpt", "last.ckpt", "last.ckpt"],
        "link": ["best-step=2.ckpt", "last.ckpt", "best-step=6.ckpt", "last.ckpt"],
    }[save_last]
    assert saved == expected
    assert trainer.checkpoint_callback.best_model_path == str(tmp_path / "best-step=6.ckpt")


@pytest.mark.parametrize("every_n_train_steps", [1, 2])
def test_periodic_saves_on_a_validation_step_wait_for_its_score(tmp_path, every_n_train_steps):
    """Scores 1, 2, 0.5 (best), 3 at steps 2, 4, 6, 8, and a periodic save at every validation step: each waits for
    its validation, so the best file holds step 6 with its 0.5 (saved first, Lightning scored it with the earlier
    validation's value and its own save made the validation skip: the best stayed at step 2)."""
    trainer, _, probe, _ = fit_scripted(tmp_path, [1.0, 2.0, 0.5, 3.0], every_n_train_steps=every_n_train_steps)
    assert probe.pairs == [(2, 2), (4, 4), (6, 6), (8, 8)]
    assert sorted(path.name for path in tmp_path.glob("best*.ckpt")) == ["best-step=6.ckpt"]
    callback = trainer.checkpoint_callback
    assert callback.best_model_path == str(tmp_path / "best-step=6.ckpt") and callback.best_model_score == 0.5
    assert torch.load(tmp_path / "best-step=6.ckpt", weights_only=True)["global_step"] == 6


@pytest.mark.parametrize("how", ["moved", "copied"])
def test_a_resume_after_moving_the_run_folder_continues_its_last_and_best(tmp_path, how):
    first = tmp_path / "first" / "checkpoints"
    fit_scripted(first, [1.0, 2.0, 3.0, 4.0], max_steps=4)
    second = tmp_path / "second" / "checkpoints"
    second.parent.mkdir()
    if how == "moved":
        first.parent.rename(second.parent)
    else:
        shutil.copytree(first.parent, second.parent, dirs_exist_ok=True)
    _, _, probe, _ = fit_scripted(second, [0.5, 3.0], ckpt_path=str(second / "last.ckpt"))
    assert probe.pairs == [(6, 6), (8, 8)]
    assert sorted(path.name for path in second.glob("*.ckpt")) == ["best-step=6.ckpt", "last.ckpt"], (
        "no versioned last-v1.ckpt, and the best of the first part (step 2) is replaced by the better one at step 6"
    )
    assert torch.load(second / "last.ckpt", weights_only=True)["global_step"] == 8


def test_a_resume_into_another_folder_keeps_its_own_best(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    fit_scripted(first, [1.0, 2.0, 3.0, 4.0], max_steps=4)
    with pytest.warns(UserWarning, match="The dirpath has changed"):
        fit_scripted(second, [0.5, 3.0], ckpt_path=str(first / "last.ckpt"))
    assert sorted(path.name for path in second.glob("*.ckpt")) == ["best-step=6.ckpt", "last.ckpt"]
    assert sorted(path.name for path in first.glob("*.ckpt")) == ["best-step=2.ckpt", "last.ckpt"]


def test_a_fit_from_another_folders_checkpoint_into_a_folder_with_checkpoints_is_refused(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "last.ckpt").write_bytes(b"this run")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "last.ckpt").write_bytes(b"another run")
    with pytest.raises(ValueError, match="is a checkpoint of another folder, but .*mine holds checkpoints of a run"):
        check_run_folder("fit", str(tmp_path / "other" / "last.ckpt"), str(tmp_path / "mine"))
    check_run_folder("fit", str(tmp_path / "mine" / "last.ckpt"), str(tmp_path / "mine"))
    check_run_folder("fit", str(tmp_path / "other" / "last.ckpt"), str(tmp_path / "empty"))


def test_a_last_checkpoint_of_another_run_is_left_alone(tmp_path):
    """Outside mf (whose check_run_folder refuses this case), a fresh run beside another run's last.ckpt does not
    overwrite it: Lightning's versioned name takes the new state."""
    fit_scripted(tmp_path / "other", [1.0, 2.0], max_steps=4)
    (tmp_path / "mine").mkdir()
    shutil.copy(tmp_path / "other" / "last.ckpt", tmp_path / "mine" / "last.ckpt")
    foreign = (tmp_path / "mine" / "last.ckpt").read_bytes()
    with pytest.warns(UserWarning, match="exists and is not empty"):
        fit_scripted(tmp_path / "mine", [1.0, 2.0, 0.5, 3.0])
    assert (tmp_path / "mine" / "last.ckpt").read_bytes() == foreign
    assert torch.load(tmp_path / "mine" / "last-v1.ckpt", weights_only=True)["global_step"] == 8


def test_a_changed_tensor_of_a_saved_checkpoint_is_refused_naming_it(tmp_path):
    """The digests cover every tensor (optimizer state too) and its dtype; a file without digests still loads."""
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    checkpoint = {**checkpoint_with(1.0), "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}}]}
    io.save_checkpoint(checkpoint, path)
    assert torch.equal(io.load_checkpoint(path)["optimizer_states"][0]["state"][0]["exp_avg"], torch.zeros(3))
    saved = torch.load(path, weights_only=True)
    for edit, name in [
        (
            lambda state: state["optimizer_states"][0]["state"][0]["exp_avg"].fill_(1e37),
            "optimizer_states/0/state/0/exp_avg",
        ),
        (lambda state: state["state_dict"].update(w=state["state_dict"]["w"].view(torch.int32)), "state_dict/w"),
    ]:
        damaged = torch.load(path, weights_only=True)
        edit(damaged)
        torch.save(damaged, tmp_path / "damaged.ckpt")
        with pytest.raises(ValueError, match=rf"damaged.ckpt is damaged: the data of 1 tensor\(s\) \({name}\)"):
            io.load_checkpoint(tmp_path / "damaged.ckpt")
    saved.pop("mf_tensor_digests")
    torch.save(saved, tmp_path / "older.ckpt")
    assert io.load_checkpoint(tmp_path / "older.ckpt")["global_step"] == 1
