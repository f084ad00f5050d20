"""save_pretrained / load_pretrained: bit-exact round trip, foreign prefixes, clear errors."""

import errno
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from mf_lightning.cli import main
from mf_lightning.config import ModelConfig
from mf_lightning.data.tokenizers import ByteTokenizer, save_tokenizer
from mf_lightning.models import MemoryFormer, Transformer, build_model, load_pretrained, pretrained, save_pretrained
from mf_lightning.models.integrity import DIGEST_KEY, LAYOUT_KEY, tensors_digests, tensors_layout
from mf_lightning.models.pretrained import build_in_dtype

ARCHS = ["memoryformer", "transformer"]


def debug_model(arch: str = "memoryformer", **overrides: object) -> torch.nn.Module:
    return build_model(ModelConfig.from_preset("debug", arch=arch, **overrides))


def rewrite_weights(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Replaces the weights in ``path`` with ``state``, with the metadata ``save_pretrained`` would write for it."""
    with safe_open(path, framework="pt") as file:
        metadata = file.metadata()
    save_file(state, path, metadata={**metadata, DIGEST_KEY: tensors_digests(state), LAYOUT_KEY: tensors_layout(state)})


def assert_same_weights(loaded: torch.nn.Module, original: torch.nn.Module) -> None:
    expected = original.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_is_bit_exact(arch: str, tmp_path: Path) -> None:
    model = debug_model(arch, tie_embeddings=arch == "transformer")
    model.save_pretrained(tmp_path / "saved")
    loaded = type(model).from_pretrained(tmp_path / "saved")
    assert type(loaded) is type(model) and loaded.config == model.config
    assert_same_weights(loaded, model)
    assert all(p.device.type == "cpu" and p.requires_grad for p in loaded.parameters())
    idx = torch.randint(0, 257, (1, 9))
    torch.testing.assert_close(loaded(idx)[0], model(idx)[0], rtol=0, atol=0)


def test_functional_api_loads_any_arch(tmp_path: Path) -> None:
    model = debug_model("transformer")
    assert save_pretrained(model, tmp_path) == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert type(load_pretrained(tmp_path)) is Transformer


@pytest.mark.parametrize("prefix", ["_orig_mod.", "model.", "model._orig_mod."])
def test_compile_and_lightning_prefixes_are_stripped(prefix: str, tmp_path: Path) -> None:
    model = debug_model()
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    rewrite_weights(tmp_path / "model.safetensors", {prefix + key: value for key, value in state.items()})
    assert_same_weights(load_pretrained(tmp_path), model)


def test_saving_a_compiled_model_writes_clean_keys(tmp_path: Path) -> None:
    model = debug_model()
    compiled = torch.compile(model)
    save_pretrained(compiled, tmp_path)
    assert not any("_orig_mod" in key for key in load_file(tmp_path / "model.safetensors"))


def test_loading_into_the_other_class_is_refused(tmp_path: Path) -> None:
    debug_model("transformer").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="config.json describes a 'transformer' model, not 'memoryformer'"):
        MemoryFormer.from_pretrained(tmp_path)


def test_weights_of_another_arch_are_a_clear_error(tmp_path: Path) -> None:
    debug_model("memoryformer").save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(ModelConfig.from_preset("debug", arch="transformer").to_dict()))
    with pytest.raises(ValueError, match=r"model.safetensors does not fit the transformer model .*missing \(\d+\): "):
        load_pretrained(tmp_path)


def test_weights_of_other_sizes_are_a_clear_error(tmp_path: Path) -> None:
    debug_model("transformer").save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps(ModelConfig.from_preset("debug", arch="transformer", vocab_size=300).to_dict())
    )
    with pytest.raises(ValueError, match=r"wrong shape \(2\): embed.weight \(257, 64\) != \(300, 64\), head.weight"):
        load_pretrained(tmp_path)


def test_missing_keys_are_listed(tmp_path: Path) -> None:
    debug_model().save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["norm.weight"]
    rewrite_weights(tmp_path / "model.safetensors", state)
    with pytest.raises(ValueError, match=r"missing \(1\): norm.weight"):
        load_pretrained(tmp_path)


def test_truncated_weights_are_a_clear_error(tmp_path: Path) -> None:
    debug_model().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"model.safetensors is not a readable safetensors file \(truncated"):
        load_pretrained(tmp_path)


def test_corrupt_or_missing_config_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no model config at .*config.json"):
        load_pretrained(tmp_path)
    debug_model().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"arch": "memoryformer", ')
    with pytest.raises(ValueError, match="config.json is not a valid model config: Expecting"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_format": 2, "arch": "memoryformer", "n_embd": 63}')
    with pytest.raises(ValueError, match="config.json is not a valid model config: n_embd=63 is not divisible"):
        load_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "config.json").write_text('{"model_format": 2}')
    with pytest.raises(FileNotFoundError, match="no model weights at .*model.safetensors"):
        load_pretrained(tmp_path)


def edit_config(folder: Path, **changes: object) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def test_config_json_that_no_longer_matches_its_weights_is_refused_naming_the_fields(tmp_path: Path) -> None:
    debug_model().save_pretrained(tmp_path)
    edit_config(tmp_path, score="paper", rotary_base=500.0, rms_norm_eps=1e-6)
    with pytest.raises(
        ValueError,
        match=r"config.json does not describe the model saved in model.safetensors: rms_norm_eps=1e-06 in config.json, "
        r"1e-08 in the weights; rotary_base=500.0 in config.json, 10000.0 in the weights; "
        r"score='paper' in config.json, 'scaled' in the weights; restore",
    ):
        load_pretrained(tmp_path)


def test_runtime_settings_of_config_json_may_change(tmp_path: Path) -> None:
    model = debug_model()
    model.save_pretrained(tmp_path)
    edit_config(tmp_path, backend="torch", dropout=0.1, max_seq_len=64)
    loaded = load_pretrained(tmp_path)
    assert (loaded.config.backend, loaded.config.dropout, loaded.config.max_seq_len) == ("torch", 0.1, 64)
    assert_same_weights(loaded, model)


@pytest.mark.parametrize(
    ("dropped", "message"),
    [(DIGEST_KEY, "records no SHA-256 of its tensors"), ("mf_model_config", "records no model config")],
)
def test_weights_not_written_by_save_pretrained_are_refused(dropped: str, message: str, tmp_path: Path) -> None:
    debug_model().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    with safe_open(weights, framework="pt") as file:
        metadata = file.metadata()
    del metadata[dropped]
    save_file(load_file(weights), weights, metadata=metadata)
    with pytest.raises(ValueError, match=f"model.safetensors {message} .*export the model again"):
        load_pretrained(tmp_path)


def flip_bit(path: Path, offset_from_end: int) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("offset_from_end", [1, 5000])
def test_a_bit_flipped_in_the_tensor_data_is_one_error_naming_the_file(offset_from_end: int, tmp_path: Path) -> None:
    debug_model().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    assert load_file(weights)  # the header is intact: safetensors alone would load the damaged data
    flip_bit(weights, offset_from_end)
    with pytest.raises(
        ValueError, match=rf"{weights} is damaged: the data of 1 tensor\(s\) \(.*\) does not match the SHA-256"
    ):
        load_pretrained(tmp_path)


def test_a_damaged_model_folder_stops_mf_generate_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    debug_model().save_pretrained(tmp_path)
    save_tokenizer(ByteTokenizer(), tmp_path)
    flip_bit(tmp_path / "model.safetensors", 100)
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model_dir", str(tmp_path), "--max_new_tokens", "2", "hi"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(f"mf: error: {tmp_path / 'model.safetensors'} is damaged")


def test_the_damaged_tensors_are_named(tmp_path: Path) -> None:
    model = debug_model()
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(weights)
    with safe_open(weights, framework="pt") as file:
        metadata = file.metadata()
    state["norm.weight"][3] = 2.0
    save_file(state, weights, metadata=metadata)  # valid header, the old digests
    with pytest.raises(ValueError, match=r"damaged: the data of 1 tensor\(s\) \(norm.weight\) does not match"):
        load_pretrained(tmp_path)


def test_the_digests_cover_every_dtype_and_shape() -> None:
    state = {"b": torch.zeros((), dtype=torch.bfloat16), "a": torch.arange(6, dtype=torch.int64).reshape(2, 3)}
    digests = json.loads(tensors_digests(state))
    assert list(digests) == ["a", "b"]
    assert digests == json.loads(tensors_digests(dict(reversed(state.items()))))
    changed = json.loads(tensors_digests({**state, "b": torch.ones((), dtype=torch.bfloat16)}))
    assert changed["a"] == digests["a"] and changed["b"] != digests["b"]


def test_saving_over_an_existing_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_text("keep me")
    with pytest.raises(ValueError, match=r"model.bin is an existing file; a model is saved as a folder"):
        save_pretrained(debug_model(), tmp_path / "model.bin")
    assert (tmp_path / "model.bin").read_text() == "keep me"


def test_a_full_disk_while_saving_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full_disk(*args: object, **kwargs: object) -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(pretrained, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left on device") as raised:
        save_pretrained(debug_model(), tmp_path / "model")
    assert raised.value.errno == errno.ENOSPC
    assert raised.value.filename == str(tmp_path / "model" / "model.safetensors")


@pytest.mark.parametrize("arch", ARCHS)
def test_loading_in_bfloat16_converts_every_weight(arch: str, tmp_path: Path) -> None:
    model = debug_model(arch)
    loaded = load_pretrained(model.save_pretrained(tmp_path / "saved"), dtype=torch.bfloat16)
    assert_same_weights(loaded, model.to(torch.bfloat16))
    assert all(parameter.dtype == torch.bfloat16 for parameter in loaded.parameters())


def test_a_dtype_that_cannot_hold_weights_is_a_clear_error(tmp_path: Path) -> None:
    directory = debug_model().save_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match="dtype must be None or a floating-point torch dtype.*torch.int8"):
        load_pretrained(directory, dtype=torch.int8)


def test_build_in_dtype_materialises_directly_in_that_dtype() -> None:
    config = ModelConfig.from_preset("debug")
    model = build_in_dtype(config, "cpu", torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in model.parameters())
    assert all(bool(p.isfinite().all()) for p in model.parameters())
    assert model.blocks[0].qkv.tables.std().item() == pytest.approx(model.blocks[0].qkv.init_std, rel=0.1)
    assert model.generate(torch.zeros(1, 1, dtype=torch.long), 3, temperature=0).shape == (1, 4)


def test_a_save_that_fails_midway_leaves_the_previous_model_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The folder is swapped in whole: a failure after config.json was written leaves the old config and weights,
    never the new config beside the old weights."""
    old = debug_model("transformer")
    old.save_pretrained(tmp_path / "model")

    def half_written(state: dict, path: Path, metadata: dict) -> None:
        Path(path).write_bytes(b"half of the weights")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(pretrained, "save_file", half_written)
    with pytest.raises(OSError, match="No space left on device"):
        save_pretrained(debug_model("memoryformer"), tmp_path / "model")
    monkeypatch.undo()
    assert_same_weights(load_pretrained(tmp_path / "model"), old)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"], "no staging folder is left"


def test_saving_over_a_saved_model_replaces_it_whole(tmp_path: Path) -> None:
    debug_model("transformer").save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "tokenizer.json").write_text("{}")  # the old model's tokenizer would be loaded with the new
    new = debug_model("memoryformer")
    save_pretrained(new, tmp_path / "model", extra=lambda folder: (folder / "extra.txt").write_text("written inside"))
    assert sorted(path.name for path in (tmp_path / "model").iterdir()) == [
        "config.json",
        "extra.txt",
        "model.safetensors",
    ]
    assert_same_weights(load_pretrained(tmp_path / "model"), new)


def test_a_folder_of_other_files_or_the_current_folder_is_never_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"holds files that are not a saved model \(notes.txt\).*new or empty folder"):
        save_pretrained(debug_model(), tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    with pytest.raises(ValueError, match="is the current folder or holds it"):
        save_pretrained(debug_model(), ".")
    assert Path.cwd() == empty and list(empty.iterdir()) == []


def change_header_dtype(weights: Path, name: str, dtype: str) -> None:
    """Rewrites the dtype of tensor ``name`` in the safetensors header of ``weights``; bytes and digests unchanged."""
    data = weights.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    header[name]["dtype"] = dtype
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= size
    weights.write_bytes(data[:8] + text.ljust(size) + data[8 + size :])


def test_a_dtype_changed_in_the_header_is_one_line_naming_the_file_and_tensor(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """F32 -> I32 keeps every size and byte (safetensors loads it, the data digests match): the recorded
    layout catches it."""
    debug_model().save_pretrained(tmp_path)
    save_tokenizer(ByteTokenizer(), tmp_path)
    weights = tmp_path / "model.safetensors"
    change_header_dtype(weights, "norm.weight", "I32")
    assert load_file(weights)["norm.weight"].dtype == torch.int32
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model_dir", str(tmp_path), "--max_new_tokens", "2", "hi"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("mf: error:")]
    assert line.startswith(f"mf: error: {weights} is damaged: the header gives 1 tensor(s) another dtype"), line
    assert "norm.weight: I32 [" in line and "F32 [" in line, line
