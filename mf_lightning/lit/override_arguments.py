"""``--model.overrides`` on the command line merged into the config's overrides, key by key.

jsonargparse treats a mapping as one value, so ``--model.overrides '{n_layer: 4}'`` would replace the config's
whole ``model.overrides`` block (dropping the quickstart's ``max_seq_len``). The command line's overrides are
therefore taken out of the arguments, merged into the overrides the rest of them parse to, and the merged block
given back as one ``--model.overrides`` (so ``--print_config`` and the saved config show it): each key given
replaces that key; ``--model.overrides null`` clears the config's overrides (the preset as it is). Several
``--model.overrides`` are merged in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml

from mf_lightning.config_errors import ConfigError

OVERRIDES_OPTION = "--model.overrides"
CLEAR = None
"""The command-line value that clears the config's overrides (``--model.overrides null``)."""


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[dict[str, Any] | None]]:
    """``argv`` without its ``--model.overrides VALUE`` arguments, and those values in order (None clears)."""
    kept: list[str] = []
    given: list[dict[str, Any] | None] = []
    arguments = iter(argv)
    for arg in arguments:
        if arg == OVERRIDES_OPTION:
            value = next(arguments, None)
            if value is None:
                raise ConfigError(f"option {OVERRIDES_OPTION} needs a value, e.g. '{{n_layer: 4}}' or null")
            given.append(parse_overrides(value))
        elif arg.startswith(f"{OVERRIDES_OPTION}="):
            given.append(parse_overrides(arg.split("=", 1)[1]))
        else:
            kept.append(arg)
    return kept, given


def parse_overrides(value: str) -> dict[str, Any] | None:
    """The mapping (or ``null``) that one ``--model.overrides`` value spells in YAML."""
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value
    if parsed is not CLEAR and not (isinstance(parsed, dict) and all(isinstance(key, str) for key in parsed)):
        raise ConfigError(
            f"{OVERRIDES_OPTION}={value!r} is not valid: expected a mapping of ModelConfig fields, "
            "e.g. '{n_layer: 4}', or null to clear the config's overrides"
        )
    return parsed


def merge_overrides(config: dict[str, Any] | None, given: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The config's overrides with each of ``given`` applied in turn: its keys replace the same keys; None clears."""
    merged = None if config is None else dict(config)
    for overrides in given:
        merged = None if overrides is CLEAR else {**(merged or {}), **overrides}
    return merged
