"""Argument checks shared across the package, so every bad value is reported the same way."""

from __future__ import annotations

from typing import Any


def positive_int(name: str, value: Any, expected: str = "a positive integer") -> int:
    """Return ``value`` if it is an int >= 1 (bools refused); else raise naming ``name``, ``expected`` and ``value``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return value


def non_negative_number(name: str, value: Any) -> float:
    """Return ``value`` as a float if it is a finite number >= 0 (bools refused); else raise naming ``name`` and it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")
    return float(value)
