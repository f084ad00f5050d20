"""Every ``ModelConfig`` option trains through ``mf fit`` on the real path: meta-device build, materialisation,
a few steps with finite losses, resume, export and loading the exported folder for generation.

Unit tests build models eagerly and miss what only the real path does (the meta-device build and its
initialisation, checkpointing, export); an option that breaks there fails here. Options are grouped so
that each group is one short run; ``test_the_groups_cover_every_option`` keeps the groups complete when
a field is added to ``ModelConfig``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import pytest
import torch
from cli_support import run, scalars, state_of, tiny_run_args, write_corpus

from mf_lightning.cli import main as mf
from mf_lightning.config import ARCHS, ModelConfig, settable_fields
from mf_lightning.kernels.dispatch import BACKENDS
from mf_lightning.kernels.hashing import SCORES
from mf_lightning.lit.loading import load_for_inference

pytestmark = pytest.mark.slow

GROUPS: dict[str, tuple[str, dict[str, object], dict[str, object]]] = {
    # name: (arch, model.overrides, other model.* options)
    "paper-score-centering-plain-loss": (
        "memoryformer",
        {
            "score": "paper",
            "hash_centering": True,
            "backend": "torch",
            "loss_chunk_size": 0,
            "dropout": 0.1,
            "triton_backward": "atomic",  # read by triton layers only: this group checks the field is accepted
            "kernel_check": "off",
        },
        {},
    ),
    "balance-tied-rotary-chunked": (
        "memoryformer",
        {
            "bucket_balance_weight": 0.1,
            "tie_embeddings": True,
            "rotary_fraction": 0.5,
            "rotary_base": 500.0,
            "backend": "embedding_bag",
            "loss_chunk_size": 7,
        },
        {},
    ),
    "narrow-codes-no-extra-bits": (
        "memoryformer",
        {
            "code_bits": 4,
            "ffn_extra_bits": 0,
            "n_layer": 1,
            "n_embd": 32,
            "n_head": 4,
            "rms_norm_eps": 1e-6,
            "rotary_fraction": 0.0,
            "hash_centering": True,
        },
        {"table_lr_multiplier": 2.0, "table_weight_decay": 0.0},
    ),
    "transformer": (
        "transformer",
        {
            "ffn_multiplier": 2,
            "tie_embeddings": True,
            "dropout": 0.1,
            "loss_chunk_size": 0,
            "rotary_fraction": 1.0,
            "layer_norm_eps": 1e-6,
        },
        {},
    ),
}
ON_GPU = os.environ.get("MF_TEST_CUDA") == "1" and torch.cuda.is_available()
GPU_GROUPS: dict[str, tuple[str, dict[str, object], dict[str, object]]] = {
    # The triton kernels run on a CPU only under triton's interpreter (a minute per short run); tests/kernels
    # checks them there against the reference, and this group trains with them where a GPU is.
    "triton-backend": (
        "memoryformer",
        {"backend": "triton", "hash_centering": True, "loss_chunk_size": 0, "kernel_check": "fatal"},
        {},
    ),
}
LINKED_FIELDS = {"vocab_size": "set from the tokenizer (data.vocab_size)", "max_seq_len": "set by every run below"}


def test_the_groups_cover_every_option() -> None:
    """Every settable field is set away from its default somewhere, and every value of a field with choices."""
    covered = {"arch"} | set(LINKED_FIELDS) | {key for _, overrides, _ in GROUPS.values() for key in overrides}
    assert set(settable_fields()) <= covered, f"add {sorted(set(settable_fields()) - covered)} to GROUPS"
    every = [(arch, overrides) for arch, overrides, _ in (*GROUPS.values(), *GPU_GROUPS.values())]
    assert {arch for arch, _ in every} == set(ARCHS)
    for name, choices in (("score", SCORES), ("backend", BACKENDS)):
        used = {overrides[name] for _, overrides in every if name in overrides} | {getattr(ModelConfig(), name)}
        assert set(choices) <= used, f"{name}: add {sorted(set(choices) - used)} to a group"
    flags = [field.name for field in dataclasses.fields(ModelConfig) if field.init and field.type == "bool"]
    assert flags and all(any(overrides.get(flag) is True for _, overrides in every) for flag in flags)


def overrides_flag(overrides: dict[str, object]) -> str:
    """``--model.overrides`` of a run: the group's fields, and windows short enough to train in seconds."""
    return json.dumps({"max_seq_len": 64, **overrides})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("options") / "corpus")


@pytest.mark.parametrize(
    "group",
    [
        *GROUPS,
        *(
            pytest.param(name, marks=pytest.mark.skipif(not ON_GPU, reason="needs MF_TEST_CUDA=1 and a GPU"))
            for name in GPU_GROUPS
        ),
    ],
)
def test_option_group_trains_resumes_exports_and_loads(group: str, corpus: Path, tmp_path: Path, capsys) -> None:
    arch, overrides, options = {**GROUPS, **GPU_GROUPS}[group]
    settings = {
        "model.arch": arch,
        "model.overrides": overrides_flag(overrides),
        "validation.every_n_steps": 2,
        "data.cache_dir": corpus.parent / "cache",
        **{f"model.{key}": value for key, value in options.items()},
    }
    run("fit", tiny_run_args(tmp_path, corpus, max_steps=4, **settings))
    run("fit", tiny_run_args(tmp_path, corpus, max_steps=6, **settings) + ["--ckpt_path", "last"])

    logged = scalars(tmp_path / "tensorboard")
    assert len(logged["loss/train"]) == 6 and len(logged["loss/val"]) == 3, "a step or validation was lost"
    assert all(math.isfinite(value) for _, value in logged["loss/train"] + logged["loss/val"])
    if overrides.get("bucket_balance_weight"):
        assert all(value > 0 for _, value in logged["train/balance_loss"])

    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    mf(["export", "--ckpt_path", str(checkpoint), "--out", str(tmp_path / "exported")])
    device = "cuda" if ON_GPU else "cpu"
    model, tokenizer = load_for_inference(model_dir=tmp_path / "exported", device=device)
    saved = {key.removeprefix("model."): value for key, value in state_of(checkpoint).items()}
    assert model.state_dict().keys() == saved.keys()
    assert all(torch.equal(model.state_dict()[key].cpu(), saved[key]) for key in saved)
    tokens = torch.tensor([tokenizer.encode("the memory layer hashes tokens")], device=device)
    with torch.no_grad():
        assert math.isfinite(model(tokens[:, :-1], tokens[:, 1:])[1].item())
    capsys.readouterr()
    mf(
        [
            "generate",
            "--model_dir",
            str(tmp_path / "exported"),
            "--device",
            device,
            "--max_new_tokens",
            "5",
            "--temperature",
            "0",
            "the",
        ]
    )
    assert " tokens in " in capsys.readouterr().err


def test_an_unknown_model_override_is_one_clear_error(corpus: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run("fit", tiny_run_args(tmp_path, corpus, max_steps=1, **{"model.overrides": "{hash_offset: true}"}))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("mf: error: unknown override key(s) ['hash_offset']; valid: arch,"), err
    assert len(err.splitlines()) == 2  # the error and the traceback hint
