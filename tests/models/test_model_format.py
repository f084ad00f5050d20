"""Models saved before model format 2 (MemoryFormer's GPT-NeoX norms, the Pythia baseline) are refused, wherever
they come from: a training checkpoint resumed or loaded for inference, or a model folder (issue 29)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mf_lightning.config import FORMAT_KEY, ModelConfig
from mf_lightning.lit.checkpoints import MODEL_CONFIG_KEY, check_checkpoint
from mf_lightning.lit.loading import model_from_checkpoint
from mf_lightning.models.architectures import build_model
from mf_lightning.models.pretrained import load_pretrained

PREDATES = r"the model predates model format 2 \(MemoryFormer's GPT-NeoX norms and init, the Pythia baseline\)"


def old_config(arch: str) -> dict:
    """A config as saved before the format marker: no ``model_format``, the old ``norm_eps``."""
    values = ModelConfig.from_preset("debug", arch=arch).to_dict()
    del values[FORMAT_KEY], values["rms_norm_eps"], values["layer_norm_eps"]
    return {**values, "norm_eps": 1e-5}


@pytest.mark.parametrize("arch", ["memoryformer", "transformer"])
def test_an_old_checkpoint_is_refused_on_resume_and_on_load(arch: str) -> None:
    model = build_model(ModelConfig.from_preset("debug", arch=arch))
    checkpoint = {"state_dict": model.state_dict(), MODEL_CONFIG_KEY: old_config(arch)}
    with pytest.raises(ValueError, match=f"^checkpoint runs/x/last.ckpt: {PREDATES}"):
        check_checkpoint(checkpoint, model.config.to_dict(), None, model.state_dict(), Path("runs/x/last.ckpt"))
    with pytest.raises(ValueError, match=f"^checkpoint runs/x/last.ckpt: {PREDATES}"):
        model_from_checkpoint(checkpoint, "runs/x/last.ckpt")


def test_an_old_model_folder_is_refused(tmp_path: Path) -> None:
    build_model(ModelConfig.from_preset("debug")).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(old_config("memoryformer")))
    with pytest.raises(ValueError, match=f"config.json is not a valid model config: {PREDATES}"):
        load_pretrained(tmp_path)


def test_a_current_checkpoint_loads() -> None:
    model = build_model(ModelConfig.from_preset("debug", arch="transformer"))
    checkpoint = {"state_dict": model.state_dict(), MODEL_CONFIG_KEY: model.config.to_dict()}
    loaded = model_from_checkpoint(checkpoint, "x.ckpt")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
