"""Warning, at the start of a fit under torchrun ``--max-restarts``, when a restart would reuse the dead attempt's store.

torchrun's static rendezvous, and its c10d rendezvous unless ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, hand the
agent's own TCP store to the workers; it outlives a restart, and PyTorch connects the restarted workers to it
without a per-attempt prefix, so they may read the dead attempt's addresses: refused connections, or a hang
across nodes (docs/multi-gpu-and-slurm.md#torchrun-restarts). Nothing is wrong until a worker dies, so this is a
warning at the start, not an error; the workers see the setting in the variables torchrun gives them.
"""

from __future__ import annotations

from collections.abc import Mapping

SHARE_STORE_VARIABLE = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def restart_store_warning(environ: Mapping[str, str]) -> str | None:
    """The warning for a worker whose torchrun may restart it into the agent's store (``environ``: its variables), or
    ``None`` (not under torchrun, no restarts allowed, or a store of its own per attempt)."""
    restarts = environ.get("TORCHELASTIC_MAX_RESTARTS", "0")
    if "TORCHELASTIC_RUN_ID" not in environ or not restarts.isdigit() or int(restarts) == 0:
        return None
    if environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    return (
        f"torchrun --max-restarts {restarts} shares its rendezvous store with the workers: restarted workers may "
        "read the dead attempt's addresses from it and fail or hang; start torchrun with --rdzv-backend c10d and "
        f"{SHARE_STORE_VARIABLE}=1 in its environment (docs/multi-gpu-and-slurm.md, torchrun restarts)"
    )
