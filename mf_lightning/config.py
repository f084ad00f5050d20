"""``ModelConfig``: the one description of a MemoryFormer or baseline Transformer, with named presets.

The fields a user sets are the constructor arguments; everything derived from them (head size,
rotary dimensions, number of tables, feed-forward width) is computed in ``__post_init__``, after every
field has been checked, so a model is never built from an inconsistent configuration.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from mf_lightning.checks import positive_int
from mf_lightning.kernels.dispatch import BACKENDS, BACKWARD_MODES, CHECK_MODES
from mf_lightning.kernels.hashing import MAX_CODE_BITS, SCORES

ARCHS = ("memoryformer", "transformer")

GPT_NEOX_VOCAB = 50304
"""The GPT-NeoX tokenizer's 50277 tokens padded to a multiple of 128, as Pythia does."""

PRESETS: dict[str, dict[str, Any]] = {
    "debug": {"vocab_size": 257, "n_layer": 2, "n_embd": 64, "n_head": 2, "max_seq_len": 256},
    "tiny": {"vocab_size": GPT_NEOX_VOCAB, "n_layer": 6, "n_embd": 512, "n_head": 8, "max_seq_len": 2048},
    "small": {"vocab_size": GPT_NEOX_VOCAB, "n_layer": 12, "n_embd": 768, "n_head": 12, "max_seq_len": 2048},
    "base": {"vocab_size": GPT_NEOX_VOCAB, "n_layer": 24, "n_embd": 1024, "n_head": 16, "max_seq_len": 2048},
}
"""Sizes of SPEC §2 (Pythia-70M/160M/410M widths and depths); ``debug`` trains on a CPU in seconds on
byte-level text (256 bytes + EOS)."""

MODEL_FORMAT = 2
"""Version of the maths a saved model config describes, stored with it (:data:`FORMAT_KEY`). 2: MemoryFormer's
norms and init follow the authors' GPT-NeoX code and ``arch: transformer`` is Pythia (GPT-NeoX); a config of
another format is refused, its weights would load into a different model."""
FORMAT_KEY = "model_format"


@dataclass
class ModelConfig:
    """Architecture and sizes of a decoder-only language model (SPEC §2).

    ``arch`` is ``memoryformer`` (Memory Layers instead of fully-connected layers) or ``transformer``
    (the baseline: Pythia, GPT-NeoX). ``code_bits``, ``ffn_extra_bits`` and ``score`` shape the Memory Layers;
    ``ffn_multiplier`` is the baseline's feed-forward expansion. ``backend``, ``triton_backward`` and
    ``kernel_check`` choose how the Memory Layers compute (:class:`~mf_lightning.nn.MemoryLayer`). ``rms_norm_eps`` is MemoryFormer's RMSNorm
    epsilon (GPT-NeoX's formula, added to the rms: 1e-8 as in the authors' code), ``layer_norm_eps`` every
    LayerNorm's (MemoryFormer's mid-FFN one, the baseline's: 1e-5 as in the authors' code and Pythia). ``loss_chunk_size`` tokens at a time go
    through the LM head and cross-entropy when a loss is computed (``mf_lightning.nn.chunked_loss``; 0 forms
    the full ``[tokens, vocab]`` logits instead). ``hash_centering`` and
    ``bucket_balance_weight`` switch on remedies for bucket collapse (:mod:`mf_lightning.nn.hash_input`);
    all off is the paper's model. Derived, read-only fields:
    ``head_size``, ``rotary_dims`` (rotated dimensions of each head), ``num_tables`` (tables per Memory
    Layer reading the residual stream, 0 for the baseline), ``ffn_code_bits`` and ``ffn_hidden``
    (``num_tables * ffn_code_bits`` for MemoryFormer, ``ffn_multiplier * n_embd`` for the baseline).
    """

    arch: str = "memoryformer"
    vocab_size: int = 257
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 2
    code_bits: int = 8
    ffn_extra_bits: int = 2
    score: str = "scaled"
    rotary_fraction: float = 0.25
    rotary_base: float = 10000.0
    rms_norm_eps: float = 1e-8
    layer_norm_eps: float = 1e-5
    max_seq_len: int = 256
    tie_embeddings: bool = False
    backend: str = "auto"
    triton_backward: str = "deterministic"
    kernel_check: str = "warn"
    dropout: float = 0.0
    ffn_multiplier: int = 4
    loss_chunk_size: int = 1024
    hash_centering: bool = False
    bucket_balance_weight: float = 0.0
    head_size: int = field(init=False)
    rotary_dims: int = field(init=False)
    num_tables: int = field(init=False)
    ffn_code_bits: int = field(init=False)
    ffn_hidden: int = field(init=False)

    def __post_init__(self) -> None:
        if self.kernel_check is False:  # YAML 1.1 reads a bare `off` as false: the user wrote kernel_check: off
            self.kernel_check = "off"
        self._check()
        self.head_size = self.n_embd // self.n_head
        self.rotary_dims = round(self.head_size * self.rotary_fraction)
        self.ffn_code_bits = self.code_bits + self.ffn_extra_bits
        if self.arch == "memoryformer":
            self.num_tables = self.n_embd // self.code_bits
            self.ffn_hidden = self.num_tables * self.ffn_code_bits
        else:
            self.num_tables = 0
            self.ffn_hidden = self.ffn_multiplier * self.n_embd

    def _check(self) -> None:
        """Raise ``ValueError`` naming the first invalid field and what would be valid."""
        choose("arch", self.arch, ARCHS)
        choose("score", self.score, SCORES)
        choose("backend", self.backend, ("auto", *BACKENDS))
        choose("triton_backward", self.triton_backward, BACKWARD_MODES)
        choose("kernel_check", self.kernel_check, CHECK_MODES)
        for name in ("vocab_size", "n_layer", "n_embd", "n_head", "max_seq_len", "code_bits", "ffn_multiplier"):
            positive_int(name, getattr(self, name))
        if isinstance(self.ffn_extra_bits, bool) or not isinstance(self.ffn_extra_bits, int) or self.ffn_extra_bits < 0:
            raise ValueError(f"ffn_extra_bits must be a non-negative integer, got {self.ffn_extra_bits!r}")
        if (
            isinstance(self.loss_chunk_size, bool)
            or not isinstance(self.loss_chunk_size, int)
            or self.loss_chunk_size < 0
        ):
            raise ValueError(
                f"loss_chunk_size must be a non-negative integer (0: no chunking), got {self.loss_chunk_size!r}"
            )
        for name in ("tie_embeddings", "hash_centering"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        weight = self.bucket_balance_weight
        if not is_real(weight) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"bucket_balance_weight must be a non-negative finite number, got {weight!r}")
        in_range("rotary_fraction", self.rotary_fraction, 0.0, 1.0, closed_low=True)
        in_range("dropout", self.dropout, 0.0, 1.0, closed_low=True, closed_high=False)
        for name in ("rotary_base", "rms_norm_eps", "layer_norm_eps"):
            value = getattr(self, name)
            if not is_real(value) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: every head gets n_embd/n_head "
                "dimensions (choose an n_head that divides n_embd)"
            )
        rotary = self.n_embd // self.n_head * self.rotary_fraction
        if rotary != int(rotary) or int(rotary) % 2:
            raise ValueError(
                f"rotary_fraction={self.rotary_fraction} gives {rotary:g} rotary dimensions per head of "
                f"{self.n_embd // self.n_head}; it must be an even whole number (rotary turns pairs of dimensions)"
            )
        if self.arch == "memoryformer":
            self._check_memory_layers()
        elif self.hash_centering or self.bucket_balance_weight:
            raise ValueError(
                "hash_centering and bucket_balance_weight act on Memory Layers and need "
                f"arch='memoryformer', got arch={self.arch!r} (leave them at False / 0.0 for the Transformer)"
            )

    def _check_memory_layers(self) -> None:
        if self.code_bits + self.ffn_extra_bits > MAX_CODE_BITS:
            raise ValueError(
                f"code_bits + ffn_extra_bits = {self.code_bits + self.ffn_extra_bits} exceeds {MAX_CODE_BITS}: "
                f"the feed-forward tables would have 2**{self.code_bits + self.ffn_extra_bits} rows"
            )
        if self.n_embd % self.code_bits:
            raise ValueError(
                f"n_embd={self.n_embd} is not divisible by code_bits={self.code_bits}: Memory Layers cut the "
                f"residual stream into chunks of code_bits entries (use a code_bits that divides {self.n_embd})"
            )

    @classmethod
    def from_preset(cls, name: str, arch: str = "memoryformer", **overrides: Any) -> ModelConfig:
        """The preset ``name`` (``debug``, ``tiny``, ``small``, ``base``) for ``arch``, with fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
        check_keys(overrides, "override")
        return cls(**{**PRESETS[name], "arch": arch, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """The settable fields and :data:`FORMAT_KEY` as a JSON-ready dict (derived fields are recomputed on load)."""
        return {FORMAT_KEY: MODEL_FORMAT, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; a dict of another format (:func:`check_format`) or with unknown keys is an
        error naming them."""
        if not isinstance(values, dict):
            raise ValueError(f"a model config must be a dict of fields, got {type(values).__name__}")
        check_format(values)
        fields = {name: value for name, value in values.items() if name != FORMAT_KEY}
        check_keys(fields, "config")
        return cls(**fields)


def check_format(values: dict[str, Any]) -> None:
    """Raise a ``ValueError`` unless the saved model config ``values`` is of :data:`MODEL_FORMAT`."""
    found = values.get(FORMAT_KEY)
    if found == MODEL_FORMAT:
        return
    if found is None or (isinstance(found, int) and found < MODEL_FORMAT):
        raise ValueError(
            f"the model predates model format {MODEL_FORMAT} (MemoryFormer's GPT-NeoX norms and init, the Pythia "
            "baseline) and computes something else; train it again with this version"
        )
    raise ValueError(f"model format {found!r} is not {MODEL_FORMAT}, the one this version of mf_lightning reads")


def settable_fields() -> tuple[str, ...]:
    """Names of the fields a user may set (the constructor arguments)."""
    return tuple(f.name for f in dataclasses.fields(ModelConfig) if f.init)


def check_keys(values: dict[str, Any], what: str) -> None:
    unknown = sorted(set(values) - set(settable_fields()))
    if unknown:
        raise ValueError(f"unknown {what} key(s) {unknown}; valid: {', '.join(settable_fields())}")


def choose(name: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{name} must be one of {', '.join(valid)}; got {value!r}")


def is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def in_range(name: str, value: Any, low: float, high: float, closed_low: bool, closed_high: bool = True) -> None:
    above = is_real(value) and (value >= low if closed_low else value > low)
    if not (above and (value <= high if closed_high else value < high)):
        interval = f"{'[' if closed_low else '('}{low:g}, {high:g}{']' if closed_high else ')'}"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
