"""ModelConfig: presets, derived fields, validation messages and the JSON round trip."""

import json

import pytest

from mf_lightning.config import FORMAT_KEY, MODEL_FORMAT, PRESETS, ModelConfig, settable_fields


@pytest.mark.parametrize("arch", ["memoryformer", "transformer"])
@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_for_both_archs(name: str, arch: str) -> None:
    config = ModelConfig.from_preset(name, arch=arch)
    assert (config.arch, config.n_layer, config.n_embd) == (arch, PRESETS[name]["n_layer"], PRESETS[name]["n_embd"])


def test_paper_sizes_and_derived_fields() -> None:
    tiny = ModelConfig.from_preset("tiny")
    assert (tiny.n_layer, tiny.n_embd, tiny.n_head, tiny.vocab_size, tiny.max_seq_len) == (6, 512, 8, 50304, 2048)
    assert (tiny.head_size, tiny.rotary_dims, tiny.num_tables) == (64, 16, 64)
    assert (tiny.ffn_code_bits, tiny.ffn_hidden) == (10, 640)
    assert ModelConfig.from_preset("small").num_tables == 96
    assert ModelConfig.from_preset("base").num_tables == 128
    dense = ModelConfig.from_preset("tiny", arch="transformer")
    assert (dense.num_tables, dense.ffn_hidden) == (0, 2048)


def test_debug_preset_is_byte_level_and_small() -> None:
    debug = ModelConfig.from_preset("debug")
    assert debug.vocab_size == 257 and debug.n_layer == 2 and 64 <= debug.n_embd <= 128


def test_overrides_apply_and_rederive() -> None:
    config = ModelConfig.from_preset("tiny", code_bits=4, ffn_extra_bits=0)
    assert (config.num_tables, config.ffn_hidden) == (128, 512)


def test_unknown_preset_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown preset 'huge'; valid: debug, tiny, small, base"):
        ModelConfig.from_preset("huge")


def test_unknown_override_lists_valid_keys() -> None:
    with pytest.raises(ValueError, match=r"unknown override key\(s\) \['d_model'\]; valid: arch, vocab_size"):
        ModelConfig.from_preset("tiny", d_model=512)


def test_derived_fields_cannot_be_overridden() -> None:
    with pytest.raises(ValueError, match=r"unknown override key\(s\) \['head_size'\]"):
        ModelConfig.from_preset("tiny", head_size=32)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"arch": "mamba"}, "arch must be one of memoryformer, transformer; got 'mamba'"),
        ({"score": "cosine"}, "score must be one of scaled, paper; got 'cosine'"),
        ({"backend": "cuda"}, "backend must be one of auto, torch, embedding_bag, triton; got 'cuda'"),
        ({"n_layer": 0}, "n_layer must be a positive integer, got 0"),
        ({"vocab_size": 1.5}, "vocab_size must be a positive integer, got 1.5"),
        ({"n_head": True}, "n_head must be a positive integer, got True"),
        ({"ffn_extra_bits": -1}, "ffn_extra_bits must be a non-negative integer, got -1"),
        ({"n_embd": 96, "n_head": 5}, "n_embd=96 is not divisible by n_head=5"),
        ({"n_embd": 36, "n_head": 3, "rotary_fraction": 0.5}, "n_embd=36 is not divisible by code_bits=8"),
        ({"rotary_fraction": 0.1}, r"rotary_fraction=0.1 gives 3.2 rotary dimensions per head of 32"),
        ({"rotary_fraction": 1.5}, r"rotary_fraction must be a number in \[0, 1\], got 1.5"),
        ({"dropout": 1.0}, r"dropout must be a number in \[0, 1\), got 1.0"),
        ({"rms_norm_eps": 0.0}, "rms_norm_eps must be a positive finite number, got 0.0"),
        ({"layer_norm_eps": -1.0}, "layer_norm_eps must be a positive finite number, got -1.0"),
        ({"tie_embeddings": "yes"}, "tie_embeddings must be True or False, got 'yes'"),
        ({"ffn_extra_bits": 9}, "code_bits \\+ ffn_extra_bits = 17 exceeds 16"),
        ({"hash_centering": 1}, "hash_centering must be True or False, got 1"),
        ({"bucket_balance_weight": -0.1}, "bucket_balance_weight must be a non-negative finite number, got -0.1"),
        ({"bucket_balance_weight": float("nan")}, "bucket_balance_weight must be a non-negative finite number"),
        ({"arch": "transformer", "bucket_balance_weight": 0.1}, "act on Memory Layers and need arch='memoryformer'"),
    ],
)
def test_invalid_fields_are_named(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_preset("debug", **overrides)


def test_odd_rotary_dims_rejected() -> None:
    with pytest.raises(ValueError, match="gives 5 rotary dimensions per head of 20; it must be an even whole number"):
        ModelConfig(n_embd=40, n_head=2, rotary_fraction=0.25)


def test_transformer_ignores_code_bits_divisibility() -> None:
    assert ModelConfig.from_preset("debug", arch="transformer", n_embd=60, n_head=3, rotary_fraction=0.2).n_embd == 60


def test_json_round_trip() -> None:
    config = ModelConfig.from_preset("small", arch="transformer", dropout=0.1, tie_embeddings=True)
    data = json.loads(json.dumps(config.to_dict()))
    assert set(data) == {*settable_fields(), FORMAT_KEY} and data[FORMAT_KEY] == MODEL_FORMAT
    assert ModelConfig.from_dict(data) == config


@pytest.mark.parametrize("stored", [None, 1])
def test_a_config_of_an_older_model_format_is_refused_as_predating_it(stored: int | None) -> None:
    """Configs saved before MemoryFormer's GPT-NeoX norms and the Pythia baseline (issue 29) describe other maths."""
    saved = {**ModelConfig.from_preset("debug").to_dict(), FORMAT_KEY: stored}
    if stored is None:
        del saved[FORMAT_KEY]
    with pytest.raises(ValueError, match=r"^the model predates model format 2 \(MemoryFormer's GPT-NeoX norms"):
        ModelConfig.from_dict(saved)


def test_from_dict_rejects_unknown_keys_and_non_dicts() -> None:
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['layers'\]"):
        ModelConfig.from_dict({FORMAT_KEY: MODEL_FORMAT, "layers": 3})
    with pytest.raises(ValueError, match="must be a dict of fields, got list"):
        ModelConfig.from_dict([1, 2])


def test_kernel_check_off_written_bare_in_yaml_is_off() -> None:
    """``kernel_check: off`` in YAML arrives as ``False`` (YAML 1.1 booleans); it means the check is off."""
    import yaml

    overrides = yaml.safe_load("kernel_check: off")
    assert ModelConfig.from_preset("debug", **overrides).kernel_check == "off"
