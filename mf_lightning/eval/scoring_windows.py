"""Which tokens each forward pass scores, so a sequence longer than the model's context is scored in windows.

A window is ``(inputs, targets)``: the model reads ``inputs`` (at most ``max_len`` tokens) and its last
``len(targets)`` positions predict ``targets``. :func:`scoring_windows` covers ``tokens[first:]`` with
consecutive windows of ``max_len`` targets, each read with the ``max_len`` tokens before its last target
(or all there are), so every token is scored exactly once, the final window with a full context. This is
lm-evaluation-harness's rolling-window convention (``get_rolling_token_windows`` with ``context_len=1``,
made disjoint), so perplexities are comparable with other harness models; a continuation that fits in
one window gets the harness's left-truncated context.
"""

from __future__ import annotations

from collections.abc import Sequence

Window = tuple[list[int], list[int]]


def scoring_windows(tokens: Sequence[int], first: int, max_len: int) -> list[Window]:
    """Windows that score ``tokens[first:]`` given everything before; ``1 <= first <= len(tokens)``."""
    windows = []
    for start in range(first, len(tokens), max_len):
        end = min(start + max_len, len(tokens))
        windows.append((list(tokens[max(0, end - 1 - max_len) : end - 1]), list(tokens[start:end])))
    return windows
