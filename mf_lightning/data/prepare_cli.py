"""``mf prepare``: build the tokenizer and the token cache of a config's ``data:`` section, without training.

    mf prepare --config configs/quickstart.yaml [--config more.yaml] [--data.prepare_workers 8] [--data.source ...]
    mf prepare --config configs/quickstart.yaml --print_config     # the resolved data settings, nothing built

Reads the YAML files with ``mf fit``'s own parser and defaults (a config ``mf fit`` would refuse is
refused), takes their ``data:`` settings and any ``--data.*`` option; trains the ``bpe:<N>`` tokenizer if there is one, tokenizes the corpus into the
cache (in ``data.prepare_workers`` processes, resuming an interrupted preparation) and prints the
documents, tokens and speed, and where it wrote. ``mf fit`` with the same data settings then finds both
and starts training at once. Run it on one machine before a multi-node job, or let the job do it: the
job's processes prepare once between them either way. It also removes the parts folders of interrupted
preparations whose corpus has changed since (``leftovers``) and lists those it keeps, which another
preparation may still resume, with their size, so that one that will not be run again can be deleted.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentError, ArgumentParser, Namespace

from mf_lightning.checks import non_negative_number
from mf_lightning.commands import option_names
from mf_lightning.config_errors import ConfigError, describe_parse_error
from mf_lightning.data.cache import SPLITS
from mf_lightning.data.datamodule import TextDataModule
from mf_lightning.data.leftovers import TOKENS, kept_parts, remove_unresumable
from mf_lightning.data.progress import LOG_EVERY_S, lines_every


def build_parser(defaults: dict[str, Any]) -> ArgumentParser:
    """``--config`` plus every ``--data.*`` option of ``TextDataModule``, defaulting to ``defaults``."""
    parser = ArgumentParser(prog="mf prepare", description=__doc__.split("\n\n")[0], exit_on_error=False)
    parser.add_argument(
        "--config", action="append", default=[], help="a mf fit config file (repeatable); its data: settings are used"
    )
    parser.add_class_arguments(TextDataModule, "data")
    parser.set_defaults({f"data.{name}": value for name, value in defaults.items()})
    return parser


def prepare(data: TextDataModule) -> str:
    """Builds (or finds) the tokenizer and cache of ``data``; returns the report to print."""
    started = time.monotonic()
    cache = data.token_cache()
    seconds = time.monotonic() - started
    splits = cache.manifest["splits"]
    documents = {split: splits[split]["documents"] for split in SPLITS}
    tokens = sum(splits[split]["tokens"] for split in SPLITS)
    text_bytes = sum(splits[split]["bytes"] for split in SPLITS)
    speed = f"tokenized {text_bytes / 1e6:.1f} MB of text in {seconds:.1f} s ({text_bytes / 1e6 / seconds:.1f} MB/s)"
    how = speed if cache.built else "found ready (nothing to do)"
    return (
        f"prepared {sum(documents.values())} documents ({', '.join(f'{split} {count}' for split, count in documents.items())}), "
        f"{tokens} tokens of a {data.vocab_size}-token vocabulary; {how}\n"
        f"token cache: {cache.directory}\ntokenizer: {data.hparams['tokenizer']} (trained BPEs are kept in "
        f"{data.cache_dir / 'tokenizers'})" + kept_report(data.cache_dir)
    )


def kept_report(cache_root: Path) -> str:
    """Lines naming the parts folders of other preparations under ``cache_root``, once those no preparation can
    resume are removed; empty when there are none."""
    remove_unresumable(cache_root, keep=None)
    return "".join(
        f"\nkept for resuming: {folder} ({finished} finished part(s), {size / 1e6:.1f} MB), left by an interrupted "
        "(or running) preparation of another corpus, tokenizer or split; running it again resumes from them; "
        "delete the folder if it will not be run again"
        for folder, finished, size in kept_parts(cache_root / TOKENS)
    )


def main(argv: Sequence[str], read_config: Callable[[Sequence[str]], Namespace]) -> None:
    """``mf prepare``: read the configs (with ``read_config``, ``mf fit``'s parser), take their data settings and
    the ``--data.*`` options, prepare, and print what was done."""
    argv = list(argv)
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--config", action="append", default=[])
    first.add_argument("--print_config", action="store_true", help="print the resolved data settings and exit")
    known, _ = first.parse_known_args(argv)
    config = read_config(known.config) if known.config else None
    defaults = config.data.as_dict() if config else {}
    parser = build_parser(defaults)
    kept = [argument for argument in argv if argument != "--print_config"]
    try:
        arguments = parser.parse_args(kept)
    except ArgumentError as error:
        raise ConfigError(describe_parse_error(str(error), "prepare", kept, option_names("prepare"))) from None
    if known.print_config:
        print(yaml.safe_dump({"data": arguments.data.as_dict()}, sort_keys=False), end="")
        raise SystemExit(0)
    seconds = non_negative_number("progress.log_every_s", config.progress.log_every_s) if config else LOG_EVERY_S
    with lines_every(seconds):  # the configs' training progress interval, for the preparation as in mf fit
        data = TextDataModule(**arguments.data.as_dict())
        print(prepare(data))
