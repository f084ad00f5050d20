"""Save and load models as a directory: ``config.json`` (the ``ModelConfig``) + ``model.safetensors``.

The weights' content is checked at load against the SHA-256 of each tensor stored in the safetensors metadata
(:mod:`.integrity`), so a damaged file is one error naming it instead of another model. The config is
also stored inside the safetensors metadata, and loading compares the two: a
``config.json`` that differs from its weights on any setting but ``RUNTIME_FIELDS`` (settings that
shape no tensor, such as ``score``, norms or rotary, would otherwise load silently into another
model) is one error naming the fields.

Loading accepts state dicts written from a ``torch.compile``-d model (``_orig_mod.`` in the keys) or
taken from a LightningModule that holds the model as ``self.model`` (every key under ``model.``).
Anything that does not fit the saved config (another arch, other sizes, missing or extra tensors) or
a file that cannot be read is one ``ValueError`` naming the file and the problem.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mf_lightning.config import ModelConfig
from mf_lightning.fs.folders import replaced_folder
from mf_lightning.models.architectures import build_model
from mf_lightning.models.base import DecoderLM
from mf_lightning.models.integrity import DIGEST_KEY, LAYOUT_KEY, check_file_digests, tensors_digests, tensors_layout
from mf_lightning.nn.init import initialise

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
COMPILE_PREFIX = "_orig_mod."
LIGHTNING_PREFIX = "model."
LISTED = 5
CONFIG_METADATA_KEY = "mf_model_config"
HF_MODEL_TYPE = "memoryformer"
HF_CONFIG_KEY = "mf_model_config"
"""A Hugging Face ``config.json`` of ``model_type`` :data:`HF_MODEL_TYPE` (``mf export``, :mod:`.hf_export`)
holds the model config under this key."""
RUNTIME_FIELDS = frozenset(
    {"backend", "triton_backward", "kernel_check", "dropout", "max_seq_len", "loss_chunk_size", "bucket_balance_weight"}
)

"""Model config fields a loaded, resumed or evaluated model may change: they shape no weight and change no result."""
OS_ERROR_IN_MESSAGE = re.compile(r"\(os error (\d+)\)")


def save_pretrained(model: DecoderLM, directory: str | Path, extra: Callable[[Path], None] | None = None) -> Path:
    """Write ``model``'s config and weights, and whatever ``extra`` writes into the folder it is given (``mf
    export``: the tokenizer), as the folder ``directory``; return the directory.

    The folder is built beside ``directory`` and swapped in whole (``mf_lightning.fs.folders``), so a reader
    or a crash sees the previous model or the new one, never a mix. An existing folder is replaced only when
    it is empty or holds a saved model (``config.json`` or ``model.safetensors``), never a folder of other files.
    """
    directory = Path(directory)
    check_replaceable(directory)
    config = json.dumps(model.config.to_dict(), indent=2)
    state = {key: value.detach().cpu().contiguous() for key, value in clean_keys(model.state_dict()).items()}
    with replaced_folder(Path(os.path.abspath(directory)), "saving the model") as staged:
        (staged / CONFIG_NAME).write_text(config + "\n")
        try:
            metadata = {
                "format": "pt",
                CONFIG_METADATA_KEY: config,
                DIGEST_KEY: tensors_digests(state),
                LAYOUT_KEY: tensors_layout(state),
            }
            save_file(state, staged / WEIGHTS_NAME, metadata=metadata)
        except SafetensorError as error:
            code = OS_ERROR_IN_MESSAGE.search(str(error))
            if code is None:
                raise
            raise OSError(int(code[1]), os.strerror(int(code[1])), str(staged / WEIGHTS_NAME)) from error
        if extra is not None:
            extra(staged)
    return directory


def check_replaceable(directory: Path) -> None:
    """Refuses a ``directory`` that saving a model would destroy: a file, a folder holding other things than a
    saved model, or the current folder (or one holding it)."""
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} is an existing file; a model is saved as a folder: give a new or empty one")
    if Path.cwd().is_relative_to(os.path.abspath(directory)):
        raise ValueError(f"{directory} is the current folder or holds it; save the model into a folder of its own")
    names = sorted(path.name for path in directory.iterdir()) if directory.is_dir() else []
    if names and CONFIG_NAME not in names and WEIGHTS_NAME not in names:
        raise ValueError(
            f"{directory} holds files that are not a saved model ({', '.join(names[:LISTED])}); saving replaces "
            "the whole folder: give a new or empty folder"
        )


def load_pretrained(
    directory: str | Path,
    device: torch.device | str = "cpu",
    arch: str | None = None,
    dtype: torch.dtype | None = None,
) -> DecoderLM:
    """The model saved in ``directory``, with its weights on ``device``; ``arch`` demands that architecture.

    The model is built on the meta device and the loaded tensors are assigned to it, so no memory or
    time goes into an initialisation that would be overwritten. ``dtype`` (e.g. ``torch.bfloat16`` for
    inference) converts the floating-point weights one tensor at a time as they are read, so the
    whole model never exists in the saved precision.
    """
    check_float_dtype(dtype)
    directory = Path(directory)
    config = read_config(directory / CONFIG_NAME)
    if arch is not None and config.arch != arch:
        raise ValueError(f"{directory / CONFIG_NAME} describes a {config.arch!r} model, not {arch!r}")
    weights = directory / WEIGHTS_NAME
    state = read_weights(weights, device, dtype)
    check_file_digests(weights)
    with torch.device("meta"):
        model = build_model(config)
    check_state(model, state, weights)
    check_config_matches_weights(config, directory / CONFIG_NAME, weights)
    model.load_state_dict(state, assign=True)
    return model


def read_config(path: Path) -> ModelConfig:
    """The ``ModelConfig`` stored as JSON at ``path`` (or nested in an exported Hugging Face ``config.json``)."""
    if not path.is_file():
        raise FileNotFoundError(f"no model config at {path} (expected a directory written by save_pretrained)")
    try:
        values = json.loads(path.read_text())
        if isinstance(values, dict) and values.get("model_type") == HF_MODEL_TYPE:
            values = values.get(HF_CONFIG_KEY)
        return ModelConfig.from_dict(values)
    except (json.JSONDecodeError, ValueError) as error:
        raise ValueError(f"{path} is not a valid model config: {error}") from error


def read_weights(path: Path, device: torch.device | str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file at ``path``, with compile/Lightning key prefixes removed and
    floating-point tensors converted to ``dtype`` (when given) one by one."""
    if not path.is_file():
        raise FileNotFoundError(f"no model weights at {path} (expected a directory written by save_pretrained)")
    try:
        with safe_open(path, framework="pt", device=str(device)) as weights:
            state = {key: to_dtype(weights.get_tensor(key), dtype) for key in weights.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except SafetensorError as error:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {error}") from error
    return clean_keys(state)


def check_config_matches_weights(config: ModelConfig, config_path: Path, weights: Path) -> None:
    """Raise a ``ValueError`` naming the fields where ``config`` differs from the config stored with ``weights``.

    Every ``save_pretrained`` file stores its config, so weights without one were not written by it and are refused.
    """
    with safe_open(weights, framework="pt") as file:
        stored = (file.metadata() or {}).get(CONFIG_METADATA_KEY)
    if stored is None:
        raise ValueError(
            f"{weights} records no model config ({CONFIG_METADATA_KEY} metadata) to check {config_path.name} against; "
            "it was not written by save_pretrained / mf export: export the model again"
        )
    saved = json.loads(stored)
    current = as_json(config.to_dict())
    differences = [
        f"{name}={current.get(name)!r} in {CONFIG_NAME}, {saved.get(name)!r} in the weights"
        for name in sorted(set(saved) | set(current))
        if name not in RUNTIME_FIELDS and saved.get(name) != current.get(name)
    ]
    if differences:
        raise ValueError(
            f"{config_path} does not describe the model saved in {weights.name}: {'; '.join(differences)}; "
            "restore the config saved with the weights or save the model again"
        )


def as_json(values: dict[str, Any]) -> Any:
    """``values`` as they read back from JSON (tuples become lists)."""
    return json.loads(json.dumps(values))


def to_dtype(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``tensor`` in ``dtype`` if it is floating-point and ``dtype`` is given; integer tensors stay as they are."""
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def check_float_dtype(dtype: torch.dtype | None) -> None:
    """Reject a ``dtype`` that is not a floating-point torch dtype (weights cannot be stored in it)."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be None or a floating-point torch dtype such as torch.bfloat16, got {dtype!r}")


def build_in_dtype(config: ModelConfig, device: torch.device | str, dtype: torch.dtype) -> DecoderLM:
    """The model of ``config`` built on the meta device and materialised directly in ``dtype`` on ``device``.

    Every module's ``reset_parameters`` then initialises all its state in place (the model's own
    initialisation, :func:`~mf_lightning.nn.init.initialise`, drawn in ``dtype`` on ``device``), so a
    model too large for memory in float32 (MemoryFormer-base: 6.6 billion table values) can be built in
    bfloat16 without ever being whole in float32. On the ``meta`` device nothing is allocated or set.
    """
    check_float_dtype(dtype)
    with torch.device("meta"):
        model = build_model(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    if torch.device(device).type != "meta":
        initialise(model)
    return model


def clean_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop ``_orig_mod.`` (torch.compile) anywhere in the keys and a ``model.`` prefix shared by all keys."""
    state = {key.replace(COMPILE_PREFIX, ""): value for key, value in state.items()}
    if state and all(key.startswith(LIGHTNING_PREFIX) for key in state):
        state = {key.removeprefix(LIGHTNING_PREFIX): value for key, value in state.items()}
    return state


def state_problems(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> list[str]:
    """Missing, unexpected and wrongly shaped tensors of ``state`` compared with ``expected``."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    reshaped = [
        f"{key} {tuple(state[key].shape)} != {tuple(expected[key].shape)}"
        for key in sorted(set(expected) & set(state))
        if state[key].shape != expected[key].shape
    ]
    return [
        f"{label} ({len(items)}): {', '.join(items[:LISTED])}{', ...' if len(items) > LISTED else ''}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", reshaped))
        if items
    ]


def check_state(model: DecoderLM, state: dict[str, torch.Tensor], path: Path) -> None:
    """Raise one ``ValueError`` listing every way ``state`` does not fit ``model``."""
    problems = state_problems(state, model.state_dict())
    if problems:
        raise ValueError(
            f"{path} does not fit the {model.config.arch} model described by {path.parent / CONFIG_NAME}: "
            + "; ".join(problems)
        )
