"""Zero-shot evaluation of our models with EleutherAI's lm-evaluation-harness (``mf eval``).

``lm-eval`` is an optional extra (``pip install 'mf_lightning[eval]'``): importing this package never
imports it; the modules that need it (``adapter``, ``harness``) raise :class:`MissingExtra` with the
install command when it is absent. ``scoring_windows`` (which tokens each forward pass scores) and ``report``
(the Table 1 style table and TensorBoard logging) work without it.
"""

from __future__ import annotations

PAPER_TASKS = ("piqa", "winogrande", "wsc", "arc_easy", "arc_challenge", "logiqa")
"""The zero-shot tasks of the paper's Table 1, by their lm-eval names (``wsc`` is SuperGLUE's WSC, as in
the Pythia evaluations the paper compares with; ``wsc273`` is the other Winograd set)."""

INSTALL_HINT = "mf eval needs lm-eval, the optional extra: pip install 'mf_lightning[eval]'"


class MissingExtra(ModuleNotFoundError):
    """lm-eval is not installed; the message says how to install it."""


def missing_extra(error: ModuleNotFoundError) -> MissingExtra | ModuleNotFoundError:
    """:class:`MissingExtra` when ``error`` is lm-eval itself missing, else ``error`` unchanged."""
    if error.name is not None and error.name.split(".")[0] == "lm_eval":
        return MissingExtra(INSTALL_HINT, name=error.name)
    return error
