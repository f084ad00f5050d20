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
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from mf_lightning.fs.folders import replaced_folder
from mf_lightning.models.architectures import Transformer
from mf_lightning.models.base import DecoderLM
from mf_lightning.models.gpt_neox import gpt_neox_config, to_gpt_neox_state
from mf_lightning.models.integrity import DIGEST_KEY, LAYOUT_KEY, tensors_digests, tensors_layout
from mf_lightning.models.pretrained import (
    CONFIG_NAME,
    HF_CONFIG_KEY,
    HF_MODEL_TYPE,
    WEIGHTS_NAME,
    check_replaceable,
    clean_keys,
    save_pretrained,
)

MODELING_FILE = "modeling_memoryformer.py"
MODELING_SOURCE = Path(__file__).with_name("hf_modeling_memoryformer.py")
"""The modeling file shipped with the package (as a file: mf_lightning never imports it)."""


def save_hf_folder(
    model: DecoderLM,
    directory: str | Path,
    bos_token_id: int,
    eos_token_id: int,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``model`` into ``directory`` as a folder transformers loads (the baseline natively, MemoryFormer
    through :data:`MODELING_FILE`), with whatever ``extra`` writes into it (``mf export``: the tokenizer); the
    token ids go into its config for ``generate``. The folder is swapped in whole, as ``save_pretrained``'s is.
    Returns the folder."""
    directory = Path(directory)
    if isinstance(model, Transformer):
        return save_gpt_neox(model, directory, bos_token_id, eos_token_id, extra)

    def add_hf_files(folder: Path) -> None:
        shutil.copyfile(MODELING_SOURCE, folder / MODELING_FILE)
        config = memoryformer_config(model, bos_token_id, eos_token_id)
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        if extra is not None:
            extra(folder)

    return save_pretrained(model, directory, extra=add_hf_files)


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


def save_gpt_neox(
    model: Transformer,
    directory: Path,
    bos_token_id: int,
    eos_token_id: int,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """The baseline as a GPT-NeoX folder: transformers' ``config.json`` and weights under its names, built beside
    ``directory`` and swapped in whole (``mf_lightning.fs.folders``)."""
    check_replaceable(directory)
    state = {key: value.detach().cpu().contiguous() for key, value in clean_keys(model.state_dict()).items()}
    state = to_gpt_neox_state(state)
    config = {**gpt_neox_config(model.config, bos_token_id, eos_token_id), "torch_dtype": dtype_name(model)}
    metadata = {"format": "pt", DIGEST_KEY: tensors_digests(state), LAYOUT_KEY: tensors_layout(state)}
    with replaced_folder(Path(os.path.abspath(directory)), "saving the model") as staged:
        (staged / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        save_file(state, staged / WEIGHTS_NAME, metadata=metadata)
        if extra is not None:
            extra(staged)
    return directory


def dtype_name(model: DecoderLM) -> str:
    """The weights' dtype as transformers names it in ``config.json`` (``float32``, ``bfloat16``)."""
    return str(model.embed.weight.dtype).removeprefix("torch.")
