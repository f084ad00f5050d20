"""``mf export --ckpt_path X --out DIR``: the model of a Lightning checkpoint as a self-contained model folder.

``--ckpt_path last`` is the run's ``last.ckpt``, found, as ``mf generate`` and ``mf eval`` find it, from the
run's config given with ``--config`` (``mf export --config runs/quickstart/tensorboard/config.yaml --ckpt_path
last --out DIR``).

A Lightning checkpoint is a pickle that also carries optimizer and loop state; the exported folder
(``config.json`` + ``model.safetensors``, plus the tokenizer's ``tokenizer.json`` / ``tokenizer_config.json``)
holds only the model and its tokenizer and is a Hugging Face model folder (:mod:`mf_lightning.models.hf_export`:
the baseline as native GPT-NeoX, MemoryFormer with its modeling file for ``trust_remote_code``). It is written as a whole (built beside ``--out`` and swapped in, so an interrupted
export leaves the previous folder or the new one), and loads with ``mf_lightning.lit.loading.load_for_inference(model_dir=DIR)``
(``mf eval`` / ``mf generate --model_dir DIR``), which checks every tensor against the SHA-256 recorded
in ``model.safetensors`` at export (:mod:`mf_lightning.models.integrity`). The checkpoint itself is read
with ``weights_only=True``; a sharded checkpoint folder (``FSDP2Strategy``) is assembled in this process,
which needs host memory for its weights and optimizer state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

from jsonargparse import Namespace

from mf_lightning.config_errors import OneLineArgumentParser
from mf_lightning.data.tokenizers import save_tokenizer
from mf_lightning.lit.checkpoints import read_checkpoint
from mf_lightning.lit.loading import LAST, checkpoint_tokenizer, model_from_checkpoint, resolve_checkpoint
from mf_lightning.lit.run_folders import run_folders
from mf_lightning.models.hf_export import save_hf_folder


def export_checkpoint(ckpt_path: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Writes the model and tokenizer of the ``mf fit`` checkpoint ``ckpt_path`` into the folder ``out``.

    A non-empty ``out`` may hold another model, so it is refused unless ``overwrite``.
    """
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is an existing file; a model is saved as a folder (give a new folder)")
    if not overwrite and out_dir.is_dir() and any(out_dir.iterdir()):
        names = ", ".join(sorted(path.name for path in out_dir.iterdir())[:5])
        raise ValueError(
            f"--out {out_dir} is not empty ({names}); choose an empty or new folder, or pass --overwrite to replace it"
        )
    checkpoint = read_checkpoint(ckpt_path, map_location="cpu")
    model = model_from_checkpoint(checkpoint, ckpt_path)
    tokenizer = checkpoint_tokenizer(checkpoint, ckpt_path)
    return save_hf_folder(model, out, tokenizer.eos_id, tokenizer.eos_id, extra=partial(save_tokenizer, tokenizer))


def main(argv: Sequence[str], read_config: Callable[[Sequence[str]], Namespace]) -> None:
    """``mf export``: parse the arguments (a run's config read with ``read_config``, ``mf fit``'s parser, to find
    ``--ckpt_path last``), export, and say where the model went."""
    parser = OneLineArgumentParser(prog="mf export", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--ckpt_path",
        required=True,
        help="a .ckpt file written by mf fit, a sharded (FSDP) checkpoint folder, or last (needs --config)",
    )
    parser.add_argument(
        "--config", help="the run's config (e.g. RUN/tensorboard/config.yaml), to find --ckpt_path last"
    )
    parser.add_argument("--out", required=True, help="folder to write the model and tokenizer files into")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty --out folder holding a model (replaced whole)"
    )
    args = parser.parse_args(argv)
    run = None if args.config is None else run_folders(read_config([args.config]), args.config)
    checkpoint = resolve_checkpoint(args.ckpt_path, run) if args.ckpt_path == LAST else args.ckpt_path
    directory = export_checkpoint(checkpoint, args.out, args.overwrite)
    print(f"exported the model of {checkpoint} to {directory}")
