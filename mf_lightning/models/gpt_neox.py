"""The baseline as GPT-NeoX: our ``arch: transformer`` in the config and weight names of transformers' ``GPTNeoXForCausalLM``.

The baseline computes what ``GPTNeoXForCausalLM`` computes with Pythia's settings (SPEC §2), so one is the
other under a renaming of the weights and of the config's fields. This module is that renaming, both ways:
:func:`gpt_neox_config` / :func:`config_from_gpt_neox` for ``config.json`` and :func:`to_gpt_neox_state` /
:func:`from_gpt_neox_state` for the tensors, and :func:`load_gpt_neox` reads a GPT-NeoX folder written by
transformers (a Pythia checkpoint from the Hub, or ``mf export`` of a baseline) into our model. A folder
whose config asks for something our baseline does not compute (sequential residual, another activation,
scaled rotary, no biases) is refused naming the field, never loaded into a different model. Nothing here
imports transformers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from mf_lightning.config import ModelConfig
from mf_lightning.models.architectures import Transformer
from mf_lightning.models.integrity import DIGEST_KEY, check_file_digests

MODEL_TYPE = "gpt_neox"
ARCHITECTURE = "GPTNeoXForCausalLM"
CONFIG_NAME = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "qkv": "attention.query_key_value",
    "proj": "attention.dense",
    "ffn_in": "mlp.dense_h_to_4h",
    "ffn_out": "mlp.dense_4h_to_h",
}
"""Our block's module names -> ``GPTNeoXLayer``'s."""
TOP_NAMES = {
    "embed.weight": "gpt_neox.embed_in.weight",
    "norm.weight": "gpt_neox.final_layer_norm.weight",
    "norm.bias": "gpt_neox.final_layer_norm.bias",
    "head.weight": "embed_out.weight",
}
BUFFERS = re.compile(r"\.attention\.(bias|masked_bias)$|\.rotary_emb\.inv_freq$")
"""Non-weight buffers older transformers saved into GPT-NeoX checkpoints (Pythia's have them); recomputed, ignored."""
HEAD_ALIASES = ("embed_out.weight", "lm_head.weight")
"""The LM head's name in files (``embed_out``, the Hub's) and in transformers 5's modules (``lm_head``, renamed on load)."""
OUR_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(\w+)\.(weight|bias)$")
THEIR_BLOCK_KEY = re.compile(r"^gpt_neox\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def to_gpt_neox_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our baseline's state dict under ``GPTNeoXForCausalLM``'s names (same tensors, nothing copied)."""
    renamed = {}
    for key, value in state.items():
        match = OUR_BLOCK_KEY.match(key)
        if match and match[2] in BLOCK_NAMES:
            renamed[f"gpt_neox.layers.{match[1]}.{BLOCK_NAMES[match[2]]}.{match[3]}"] = value
        elif key in TOP_NAMES:
            renamed[TOP_NAMES[key]] = value
        else:
            raise ValueError(f"{key} is not a tensor of the baseline Transformer, which GPT-NeoX has a name for")
    return renamed


def from_gpt_neox_state(
    state: dict[str, torch.Tensor], config: ModelConfig, where: str | Path
) -> dict[str, torch.Tensor]:
    """A ``GPTNeoXForCausalLM`` state dict under our baseline's names; tensors without a counterpart are an error
    naming them (the buffers of :data:`BUFFERS` are dropped; so is ``embed_out`` of a tied model)."""
    block_names = {theirs: ours for ours, theirs in BLOCK_NAMES.items()}
    top_names = {theirs: ours for ours, theirs in TOP_NAMES.items()}
    renamed, unknown = {}, []
    for key, value in state.items():
        match = THEIR_BLOCK_KEY.match(key)
        key = TOP_NAMES["head.weight"] if key in HEAD_ALIASES else key
        if BUFFERS.search(key) or (key == TOP_NAMES["head.weight"] and config.tie_embeddings):
            continue
        if match and match[2] in block_names:
            renamed[f"blocks.{match[1]}.{block_names[match[2]]}.{match[3]}"] = value
        elif key in top_names:
            renamed[top_names[key]] = value
        else:
            unknown.append(key)
    if unknown:
        listed = ", ".join(sorted(unknown)[:5]) + (", ..." if len(unknown) > 5 else "")
        raise ValueError(f"{where} holds tensors that GPT-NeoX (Pythia) has no place for: {listed}")
    return renamed


def gpt_neox_config(config: ModelConfig, bos_token_id: int, eos_token_id: int) -> dict[str, Any]:
    """``config.json`` of the ``GPTNeoXForCausalLM`` our baseline ``config`` computes (rotary under both the
    current ``rope_parameters`` and the older ``rotary_pct`` / ``rotary_emb_base`` names)."""
    if config.arch != Transformer.arch:
        raise ValueError(f"only the baseline (arch='transformer') is a GPT-NeoX model, not arch={config.arch!r}")
    return {
        "model_type": MODEL_TYPE,
        "architectures": [ARCHITECTURE],
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "intermediate_size": config.ffn_hidden,
        "hidden_act": "gelu",
        "max_position_embeddings": config.max_seq_len,
        "layer_norm_eps": config.layer_norm_eps,
        "use_parallel_residual": True,
        "attention_bias": True,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_dropout": config.dropout,
        "attention_dropout": config.dropout,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": config.rotary_base,
            "partial_rotary_factor": config.rotary_fraction,
        },
        "rotary_pct": config.rotary_fraction,
        "rotary_emb_base": config.rotary_base,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "use_cache": True,
    }


def config_from_gpt_neox(values: dict[str, Any], where: str | Path) -> ModelConfig:
    """Our baseline config computing what the ``GPTNeoXForCausalLM`` of ``config.json`` ``values`` computes.

    Raises a ``ValueError`` naming ``where`` and the field when the model is not GPT-NeoX or computes
    something else (the fields our baseline does not have a setting for must hold Pythia's values).
    """
    if not isinstance(values, dict) or values.get("model_type") != MODEL_TYPE:
        found = values.get("model_type") if isinstance(values, dict) else None
        raise ValueError(f"{where} describes a {found!r} model, not GPT-NeoX (model_type 'gpt_neox')")
    rope = values.get("rope_parameters") or values.get("rope_scaling") or {}
    fixed = {
        "use_parallel_residual": (values.get("use_parallel_residual", True), True),
        "hidden_act": (values.get("hidden_act", "gelu"), "gelu"),
        "attention_bias": (values.get("attention_bias", True), True),
        "rope_type": (rope.get("rope_type", rope.get("type", "default")), "default"),
    }
    for name, (found, needed) in fixed.items():
        if found != needed:
            raise ValueError(
                f"{where} has {name}={found!r}; the baseline computes Pythia's GPT-NeoX, which needs {name}={needed!r}"
            )
    hidden, intermediate = values.get("hidden_size"), values.get("intermediate_size")
    if not isinstance(hidden, int) or not isinstance(intermediate, int) or intermediate % hidden:
        raise ValueError(
            f"{where} has intermediate_size={intermediate!r}, hidden_size={hidden!r}; the baseline's feed-forward "
            "width is a whole multiple of the width"
        )
    try:
        return ModelConfig(
            arch=Transformer.arch,
            vocab_size=values.get("vocab_size"),
            n_layer=values.get("num_hidden_layers"),
            n_embd=hidden,
            n_head=values.get("num_attention_heads"),
            ffn_multiplier=intermediate // hidden,
            rotary_fraction=float(rope.get("partial_rotary_factor", values.get("rotary_pct", 0.25))),
            rotary_base=float(rope.get("rope_theta", values.get("rotary_emb_base", 10000.0))),
            layer_norm_eps=float(values.get("layer_norm_eps", 1e-5)),
            max_seq_len=values.get("max_position_embeddings", 2048),
            tie_embeddings=bool(values.get("tie_word_embeddings", False)),
            dropout=float(values.get("hidden_dropout", 0.0)),
        )
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where} describes a GPT-NeoX model the baseline cannot be: {error}") from error


def is_gpt_neox_folder(directory: str | Path) -> bool:
    """Whether ``directory`` holds a ``config.json`` of ``model_type`` ``gpt_neox`` (a transformers folder)."""
    path = Path(directory) / CONFIG_NAME
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(values, dict) and values.get("model_type") == MODEL_TYPE


def read_gpt_neox_config(directory: str | Path) -> ModelConfig:
    """The baseline config of the GPT-NeoX folder ``directory``."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {directory} (expected a GPT-NeoX folder written by transformers)")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    return config_from_gpt_neox(values, path)


def read_gpt_neox_state(directory: str | Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of the GPT-NeoX folder ``directory`` (``model.safetensors``, else ``pytorch_model.bin``, read
    with ``weights_only``), under transformers' names; safetensors digests written by ``mf export`` are checked."""
    directory = Path(directory)
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if name.endswith(".safetensors"):
            try:
                with safe_open(path, framework="pt", device=str(device)) as weights:
                    state = {key: weights.get_tensor(key) for key in weights.keys()}  # noqa: SIM118 (safe_open is not iterable)
                    written_by_mf = DIGEST_KEY in (weights.metadata() or {})
            except SafetensorError as error:
                raise ValueError(
                    f"{path} is not a readable safetensors file (truncated or corrupt?): {error}"
                ) from error
            if written_by_mf:  # a folder transformers wrote (a downloaded Pythia) records no digests to check
                check_file_digests(path)
            return state
        try:
            return torch.load(path, map_location=device, weights_only=True, mmap=True)
        except Exception as error:
            raise ValueError(f"{path} cannot be read as a PyTorch state dict: {error}") from error
    raise FileNotFoundError(
        f"{directory} holds no single-file weights ({' or '.join(WEIGHT_FILES)}); sharded GPT-NeoX folders are not read"
    )


def init_weights_for(
    config: ModelConfig, directory: str | Path, runtime_fields: frozenset[str]
) -> dict[str, torch.Tensor]:
    """The weights of the GPT-NeoX folder ``directory`` under our names, for a run whose model is ``config``.

    Raises one ``ValueError`` naming the folder and every field where its model differs from ``config``
    (``runtime_fields`` may differ: they shape no weight): another architecture, vocabulary or shape.
    """
    if config.arch != Transformer.arch:
        raise ValueError(
            f"--model.init_from {directory}: a GPT-NeoX folder initialises the baseline (arch: transformer), "
            f"not arch={config.arch!r}"
        )
    folder = read_gpt_neox_config(directory)
    ours, theirs = config.to_dict(), folder.to_dict()
    differences = [
        f"{name}={theirs[name]!r} in the folder, {ours[name]!r} in the run"
        for name in ours
        if name not in runtime_fields and ours[name] != theirs[name]
    ]
    if differences:
        raise ValueError(
            f"--model.init_from {directory} holds another model than the run's: {'; '.join(differences)}; "
            "set model.preset / model.overrides (and the tokenizer) to the folder's"
        )
    return from_gpt_neox_state(read_gpt_neox_state(directory), folder, directory)


def load_gpt_neox(
    directory: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> Transformer:
    """Our baseline holding the weights of the GPT-NeoX folder ``directory`` (built on the meta device, the
    tensors assigned: nothing is initialised and overwritten); floating-point weights in ``dtype`` when given."""
    config = read_gpt_neox_config(directory)
    state = from_gpt_neox_state(read_gpt_neox_state(directory, device), config, directory)
    with torch.device("meta"):
        model = Transformer(config)
    expected = model.state_dict()
    problems = [
        f"{key}: {tuple(state[key].shape) if key in state else 'missing'}, the config gives {tuple(value.shape)}"
        for key, value in expected.items()
        if key not in state or state[key].shape != value.shape
    ]
    if problems:
        raise ValueError(
            f"the weights in {directory} do not fit its config.json: {'; '.join(problems[:5])}"
            + ("; ..." if len(problems) > 5 else "")
        )
    if dtype is not None:
        state = {key: value.to(dtype) if value.is_floating_point() else value for key, value in state.items()}
    model.load_state_dict(state, assign=True)
    return model
