"""A model folder that Hugging Face tools load: ``AutoModelForCausalLM.from_pretrained(folder)``.

The baseline is written as a native GPT-NeoX folder (``config.json`` of ``model_type`` ``gpt_neox`` and
``model.safetensors`` under ``GPTNeoXForCausalLM``'s names, :mod:`.gpt_neox`): transformers loads it
without remote code, and mf reads it back like any GPT-NeoX folder (a Pythia checkpoint included).
MemoryFormer has no class in transformers, so its folder holds :data:`MODELING_FILE`, a copy of
``hf_modeling_memoryformer.py`` (torch and transformers only), registered in ``config.json``'s ``auto_map``
and loaded with ``trust_remote_code=True``; its ``config.json`` carries mf's model config under
:data:`HF_CONFIG_KEY` (which :func:`~mf_lightning.models.pretrained.read_config` reads) and its weights are
``save_pretrained``'s, under mf's names. Both safetensors files keep the per-tensor SHA-256 digests
(:mod:`.integrity`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from mf_lightning.models.architectures import Transformer
from mf_lightning.models.base import DecoderLM
from mf_lightning.models.gpt_neox import gpt_neox_config, to_gpt_neox_state
from mf_lightning.models.integrity import DIGEST_KEY, tensors_digests
from mf_lightning.models.pretrained import (
    CONFIG_NAME,
    HF_CONFIG_KEY,
    HF_MODEL_TYPE,
    WEIGHTS_NAME,
    clean_keys,
    save_pretrained,
)
from mf_lightning.storage_errors import naming

MODELING_FILE = "modeling_memoryformer.py"
MODELING_SOURCE = Path(__file__).with_name("hf_modeling_memoryformer.py")
"""The modeling file shipped with the package (as a file: mf_lightning never imports it)."""


def save_hf_folder(model: DecoderLM, directory: str | Path, bos_token_id: int, eos_token_id: int) -> Path:
    """Write ``model`` into ``directory`` as a folder transformers loads (the baseline natively, MemoryFormer
    through :data:`MODELING_FILE`); the token ids go into its config for ``generate``. Returns the folder."""
    directory = Path(directory)
    if isinstance(model, Transformer):
        return save_gpt_neox(model, directory, bos_token_id, eos_token_id)
    save_pretrained(model, directory)
    with naming(directory, "saving the model"):
        shutil.copyfile(MODELING_SOURCE, directory / MODELING_FILE)
        (directory / CONFIG_NAME).write_text(
            json.dumps(memoryformer_config(model, bos_token_id, eos_token_id), indent=2)
        )
    return directory


def memoryformer_config(model: DecoderLM, bos_token_id: int, eos_token_id: int) -> dict[str, Any]:
    """``config.json`` of a MemoryFormer folder: transformers' fields, the ``auto_map`` and mf's model config."""
    module = MODELING_FILE.removesuffix(".py")
    return {
        "model_type": HF_MODEL_TYPE,
        "architectures": ["MemoryFormerForCausalLM"],
        "auto_map": {
            "AutoConfig": f"{module}.MemoryFormerConfig",
            "AutoModelForCausalLM": f"{module}.MemoryFormerForCausalLM",
        },
        HF_CONFIG_KEY: model.config.to_dict(),
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "use_cache": False,
        "torch_dtype": dtype_name(model),
    }


def save_gpt_neox(model: Transformer, directory: Path, bos_token_id: int, eos_token_id: int) -> Path:
    """The baseline as a GPT-NeoX folder: transformers' ``config.json`` and weights under its names."""
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} is an existing file; a model is saved as a folder: give a new or empty one")
    state = {key: value.detach().cpu().contiguous() for key, value in clean_keys(model.state_dict()).items()}
    state = to_gpt_neox_state(state)
    config = {**gpt_neox_config(model.config, bos_token_id, eos_token_id), "torch_dtype": dtype_name(model)}
    with naming(directory, "saving the model"):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        save_file(state, directory / WEIGHTS_NAME, metadata={"format": "pt", DIGEST_KEY: tensors_digests(state)})
    return directory


def dtype_name(model: DecoderLM) -> str:
    """The weights' dtype as transformers names it in ``config.json`` (``float32``, ``bfloat16``)."""
    return str(model.embed.weight.dtype).removeprefix("torch.")
