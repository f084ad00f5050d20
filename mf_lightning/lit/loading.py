"""A trained model and its tokenizer, ready for inference, from a run or from an exported model folder.

One loader serves ``mf export``, ``mf eval`` and ``mf generate``:

- a run: its folders (``run_folders`` of its config: ``<run>/tensorboard/config.yaml``, or the YAML it was
  started with) and ``ckpt_path`` (``last`` or a ``.ckpt`` file, or the folder of a sharded checkpoint written under
  ``FSDP2Strategy``, assembled in this process). The model is rebuilt from the config the checkpoint
  records and the tokenizer from the copy the checkpoint carries;
- a folder written by ``mf export`` / ``save_pretrained``: ``config.json``, ``model.safetensors`` and
  the tokenizer files; or a GPT-NeoX folder written by transformers (a Pythia checkpoint), read as the
  baseline (:mod:`mf_lightning.models.gpt_neox`).

Checkpoints are read with ``weights_only=True`` (``read_checkpoint``), so loading never runs code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mf_lightning.config import ModelConfig
from mf_lightning.data.tokenizers import Tokenizer, load_folder_tokenizer, tokenizer_from_state
from mf_lightning.lit.checkpoints import MODEL_CONFIG_KEY, TOKENIZER_STATE_KEY, read_checkpoint
from mf_lightning.lit.run_folders import RunFolders
from mf_lightning.models.architectures import build_model
from mf_lightning.models.base import DecoderLM
from mf_lightning.models.gpt_neox import is_gpt_neox_folder, load_gpt_neox
from mf_lightning.models.pretrained import clean_keys, load_pretrained, state_problems

LAST = "last"


def load_for_inference(
    run: RunFolders | None = None,
    ckpt_path: str | Path | None = None,
    model_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[DecoderLM, Tokenizer]:
    """The model (in eval mode, on ``device``, in ``dtype`` when given) and tokenizer of a run or a model folder.

    Give either ``model_dir``, or ``ckpt_path`` (``last`` needs ``run``, the run's folders, to find its
    checkpoints: ``run_folders`` of its config as ``mf fit`` parses it).
    """
    if (model_dir is None) == (ckpt_path is None and run is None):
        raise ValueError("give either --model_dir DIR, or --config RUN_CONFIG with --ckpt_path last|FILE")
    if model_dir is not None:
        load_folder = load_gpt_neox if is_gpt_neox_folder(model_dir) else load_pretrained
        model, tokenizer = load_folder(model_dir, device, dtype=dtype), load_folder_tokenizer(model_dir)
    else:
        path = resolve_checkpoint(ckpt_path or LAST, run)
        checkpoint = read_checkpoint(path, map_location="cpu")
        model = model_from_checkpoint(checkpoint, path).to(device)
        tokenizer = checkpoint_tokenizer(checkpoint, path)
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model only {model.config.vocab_size}; "
            "they do not belong together"
        )
    if dtype is not None:
        model = model.to(dtype)
    return model.eval(), tokenizer


def resolve_checkpoint(ckpt_path: str | Path, run: RunFolders | None) -> Path:
    """``ckpt_path`` itself, or for ``last`` the ``last.ckpt`` (file or sharded folder) in the run's checkpoints."""
    if str(ckpt_path) != LAST:
        return Path(ckpt_path)
    if run is None:
        raise ValueError("--ckpt_path last needs --config (the run's config.yaml) to find the run's checkpoints")
    candidate = run.checkpoints / "last.ckpt"
    if not candidate.exists():  # a file, or the folder of a sharded checkpoint
        raise FileNotFoundError(f"--ckpt_path last: the run has no last.ckpt (looked at {candidate}); train it first")
    return candidate


def model_from_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> DecoderLM:
    """The model an ``mf fit`` checkpoint holds, built from the config it records (never initialised twice)."""
    saved = checkpoint.get(MODEL_CONFIG_KEY)
    if saved is None:
        raise ValueError(f"checkpoint {path} records no model config (it was not written by mf fit)")
    try:
        config = ModelConfig.from_dict(saved)
    except ValueError as error:
        raise ValueError(f"checkpoint {path}: {error}") from None
    with torch.device("meta"):
        model = build_model(config)
    state = clean_keys(checkpoint["state_dict"])
    problems = state_problems(state, model.state_dict())
    if problems:
        raise ValueError(f"checkpoint {path} does not fit its own {config.arch} config: {'; '.join(problems)}")
    model.load_state_dict(state, assign=True)
    return model


def checkpoint_tokenizer(checkpoint: dict[str, Any], path: str | Path) -> Tokenizer:
    """The tokenizer an ``mf fit`` checkpoint carries (every one does: ``stamp_checkpoint``)."""
    state = checkpoint.get(TOKENIZER_STATE_KEY)
    if state is None:
        raise ValueError(
            f"checkpoint {path} carries no tokenizer, so it was not written by mf fit; give a checkpoint of an mf run"
        )
    return tokenizer_from_state(state, str(path))
