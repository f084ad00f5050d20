"""``mf export --ckpt_path X --out DIR``: the model of a Lightning checkpoint as a safetensors model folder.

A Lightning checkpoint is a pickle that also carries optimizer and loop state; the exported folder
(``config.json`` + ``model.safetensors``, as written by ``save_pretrained``) holds only the model, in a
format that cannot carry code, and loads with ``mf_lightning.models.load_pretrained``. The checkpoint
itself is read with ``weights_only=True``. The tokenizer is not part of the export.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from mf_lightning.config import ModelConfig
from mf_lightning.lit.checkpoints import MODEL_CONFIG_KEY, read_checkpoint
from mf_lightning.models.pretrained import clean_keys, save_pretrained, state_problems
from mf_lightning.models.registry import build_model


def export_checkpoint(ckpt_path: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Writes the model of the ``mf fit`` checkpoint ``ckpt_path`` into the folder ``out``; returns ``out``.

    A non-empty ``out`` may hold another model, so it is refused unless ``overwrite``.
    """
    out_dir = Path(out)
    if not overwrite and out_dir.is_dir() and any(out_dir.iterdir()):
        names = ", ".join(sorted(path.name for path in out_dir.iterdir())[:5])
        raise ValueError(
            f"--out {out_dir} is not empty ({names}); choose an empty or new folder, or pass --overwrite to replace it"
        )
    checkpoint = read_checkpoint(ckpt_path, map_location="cpu")
    saved = checkpoint.get(MODEL_CONFIG_KEY)
    if saved is None:
        raise ValueError(f"checkpoint {ckpt_path} records no model config (it was not written by mf fit); cannot export")
    config = ModelConfig.from_dict(saved)
    with torch.device("meta"):
        model = build_model(config)
    state = clean_keys(checkpoint["state_dict"])
    problems = state_problems(state, model.state_dict())
    if problems:
        raise ValueError(f"checkpoint {ckpt_path} does not fit its own {config.arch} config: {'; '.join(problems)}")
    model.load_state_dict(state, assign=True)
    return save_pretrained(model, out)


def main(argv: Sequence[str] | None = None) -> None:
    """``mf export``: parse the arguments, export, and say where the model went."""
    parser = argparse.ArgumentParser(prog="mf export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_path", required=True, help="a .ckpt file written by mf fit")
    parser.add_argument("--out", required=True, help="folder to write config.json and model.safetensors into")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty --out folder")
    args = parser.parse_args(argv)
    print(f"exported the model of {args.ckpt_path} to {export_checkpoint(args.ckpt_path, args.out, args.overwrite)}")
