"""A trained model and its tokenizer, ready for inference, from a run or from an exported model folder.

One loader serves ``mf export``, ``mf eval`` and ``mf generate``:

- a run: its config (``<run>/tensorboard/config.yaml``, or the YAML it was started with) and
  ``ckpt_path`` (``last`` or a ``.ckpt`` file, or the folder of a sharded checkpoint written under
  ``FSDP2Strategy``, assembled in this process). The model is rebuilt from the config the checkpoint
  records and the tokenizer from the copy the checkpoint carries (checkpoints written before it
  carried one fall back to the config's ``data.tokenizer``);
- a folder written by ``mf export`` / ``save_pretrained``: ``config.json``, ``model.safetensors`` and
  the tokenizer files; or a GPT-NeoX folder written by transformers (a Pythia checkpoint), read as the
  baseline (:mod:`mf_lightning.models.gpt_neox`).

Checkpoints are read with ``weights_only=True`` (``read_checkpoint``), so loading never runs code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from mf_lightning.config import ModelConfig
from mf_lightning.data.tokenizers import Tokenizer, load_folder_tokenizer, load_tokenizer, tokenizer_from_state
from mf_lightning.lit.checkpoints import MODEL_CONFIG_KEY, TOKENIZER_KEY, TOKENIZER_STATE_KEY, read_checkpoint
from mf_lightning.models.architectures import build_model
from mf_lightning.models.base import DecoderLM
from mf_lightning.models.gpt_neox import is_gpt_neox_folder, load_gpt_neox
from mf_lightning.models.pretrained import clean_keys, load_pretrained, state_problems

LAST = "last"


def load_for_inference(
    config: str | Path | None = None,
    ckpt_path: str | Path | None = None,
    model_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[DecoderLM, Tokenizer]:
    """The model (in eval mode, on ``device``, in ``dtype`` when given) and tokenizer of a run or a model folder.

    Give either ``model_dir``, or ``ckpt_path`` (``last`` needs ``config`` to find the run's checkpoints).
    """
    if (model_dir is None) == (ckpt_path is None and config is None):
        raise ValueError("give either --model_dir DIR, or --config RUN_CONFIG with --ckpt_path last|FILE")
    if model_dir is not None:
        load_folder = load_gpt_neox if is_gpt_neox_folder(model_dir) else load_pretrained
        model, tokenizer = load_folder(model_dir, device, dtype=dtype), load_folder_tokenizer(model_dir)
    else:
        run_config = read_run_config(config) if config is not None else {}
        path = resolve_checkpoint(ckpt_path or LAST, config, run_config)
        checkpoint = read_checkpoint(path, map_location="cpu")
        model = model_from_checkpoint(checkpoint, path).to(device)
        tokenizer = checkpoint_tokenizer(checkpoint, path, run_config)
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model only {model.config.vocab_size}; "
            "they do not belong together"
        )
    if dtype is not None:
        model = model.to(dtype)
    return model.eval(), tokenizer


def read_run_config(config: str | Path) -> dict[str, Any]:
    """The YAML config of a run as a dict (a saved ``config.yaml`` or the file the run was started with)."""
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"run config {path} does not exist; give <run>/tensorboard/config.yaml")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f"run config {path} is not valid YAML: {error}") from error
    if not isinstance(values, dict):
        raise ValueError(f"run config {path} must be a mapping of sections (trainer, model, data, ...)")
    return values


def resolve_checkpoint(ckpt_path: str | Path, config: str | Path | None, run_config: dict[str, Any]) -> Path:
    """``ckpt_path`` itself, or for ``last`` the run's ``last.ckpt`` (file or sharded folder), searched where
    the run can have put it."""
    if str(ckpt_path) != LAST:
        return Path(ckpt_path)
    if config is None:
        raise ValueError("--ckpt_path last needs --config (the run's config.yaml) to find the run's checkpoints")
    candidates = [Path(folder) / "last.ckpt" for folder in checkpoint_folders(Path(config), run_config)]
    for candidate in candidates:
        if candidate.exists():  # a file, or the folder of a sharded checkpoint
            return candidate
    tried = ", ".join(str(candidate) for candidate in dict.fromkeys(candidates))
    raise FileNotFoundError(f"--ckpt_path last: the run has no last.ckpt (looked at {tried}); train it first")


def checkpoint_folders(config: Path, run_config: dict[str, Any]) -> list[Path]:
    """Where a run's checkpoints can be: the configured folder, beside a saved ``tensorboard/config.yaml``,
    and under the configured ``default_root_dir`` (relative paths as the run saw them, from here)."""
    folders = []
    configured = (run_config.get("checkpoint") or {}).get("dirpath")
    if configured:
        folders.append(Path(configured))
    if config.parent.name == "tensorboard":
        folders.append(config.parent.parent / "checkpoints")
    root = (run_config.get("trainer") or {}).get("default_root_dir")
    if root:
        folders.append(Path(root) / "checkpoints")
    return folders


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


def checkpoint_tokenizer(checkpoint: dict[str, Any], path: str | Path, run_config: dict[str, Any]) -> Tokenizer:
    """The tokenizer stored in the checkpoint, else the one the run config's ``data`` section names."""
    state = checkpoint.get(TOKENIZER_STATE_KEY)
    if state is not None:
        return tokenizer_from_state(state, str(path))
    tokenizer = config_tokenizer(run_config, path)
    trained_with = checkpoint.get(TOKENIZER_KEY)
    if trained_with is not None and trained_with != tokenizer.fingerprint:
        raise ValueError(
            f"checkpoint {path} was trained with tokenizer {trained_with!r}, but the run config's data.tokenizer "
            f"gives {tokenizer.fingerprint!r}; pass the config the checkpoint was trained with"
        )
    return tokenizer


def config_tokenizer(run_config: dict[str, Any], path: str | Path) -> Tokenizer:
    """The tokenizer the ``data`` section of a run config names (for checkpoints that carry none)."""
    data = run_config.get("data") or {}
    spec = data.get("tokenizer")
    if spec is None:
        raise ValueError(
            f"checkpoint {path} carries no tokenizer (written by an older mf); pass the run's config.yaml with --config"
        )
    if str(spec).startswith("bpe:"):
        from mf_lightning.data.datamodule import resolve_cache_dir
        from mf_lightning.data.sources import open_source

        source = open_source(
            data.get("source", "demo"),
            data.get("text_field", "text"),
            data.get("hf_split", "train"),
            data.get("document_separator"),
        )
        return load_tokenizer(spec, source, resolve_cache_dir(data.get("cache_dir")))
    return load_tokenizer(spec)
