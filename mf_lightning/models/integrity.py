"""SHA-256 of every tensor of a model, recorded in ``model.safetensors`` at save and checked at load.

safetensors checks its header (names, dtypes, shapes, offsets) but not the data after it: a bit
flipped on disk or in a copy loads silently as another model. At save, the SHA-256 of each tensor's
bytes is computed from the tensors in memory and stored in the file's metadata (``DIGEST_KEY``, a JSON
object by tensor name); at load, each tensor's byte range is hashed from the file before the weights
are used, and a mismatch is one error naming the file and the damaged tensors. Tensors are hashed in
parallel threads (hashlib releases the GIL), so the cost is one extra read of the file at the machine's
hashing rate times its cores (``benchmarks/results/weights_digest_cpu.md``).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

DIGEST_KEY = "mf_tensor_sha256"
BLOCK = 1 << 24
"""Bytes hashed per read when checking a file (16 MiB)."""
LISTED = 5


def tensors_digests(state: Mapping[str, torch.Tensor]) -> str:
    """The metadata value of ``DIGEST_KEY``: the SHA-256 of each contiguous CPU tensor of ``state``, as JSON."""
    names = sorted(state)

    def digest(name: str) -> str:
        return hashlib.sha256(state[name].reshape(-1).view(torch.uint8).numpy()).hexdigest()

    with ThreadPoolExecutor(hashing_threads()) as pool:
        return json.dumps(dict(zip(names, pool.map(digest, names))))


def check_file_digests(path: Path) -> None:
    """Raise a ``ValueError`` naming ``path`` and the tensors whose bytes do not hash to the digests stored in it.

    A file that records no digests was not written by ``save_pretrained`` (every model folder it writes has
    them), so it is refused too. ``path`` must be a readable safetensors file (its header already parsed by
    safetensors).
    """
    with path.open("rb") as file:
        (header_size,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(header_size))
    stored = (header.pop("__metadata__", None) or {}).get(DIGEST_KEY)
    if stored is None:
        raise ValueError(
            f"{path} records no SHA-256 of its tensors ({DIGEST_KEY} metadata), so its data cannot be checked; "
            "it was not written by save_pretrained / mf export: export the model again"
        )
    expected = json.loads(stored)
    start = 8 + header_size
    descriptor = os.open(path, os.O_RDONLY)
    try:

        def digest(name: str) -> str:
            begin, end = header[name]["data_offsets"]
            hasher = hashlib.sha256()
            for offset in range(start + begin, start + end, BLOCK):
                hasher.update(os.pread(descriptor, min(BLOCK, start + end - offset), offset))
            return hasher.hexdigest()

        names = sorted(header)
        with ThreadPoolExecutor(hashing_threads()) as pool:
            found = dict(zip(names, pool.map(digest, names)))
    finally:
        os.close(descriptor)
    damaged = sorted(name for name in set(found) | set(expected) if found.get(name) != expected.get(name))
    if damaged:
        listed = ", ".join(damaged[:LISTED]) + (", ..." if len(damaged) > LISTED else "")
        raise ValueError(
            f"{path} is damaged: the data of {len(damaged)} tensor(s) ({listed}) does not match the SHA-256 recorded "
            "when it was saved (a flipped bit or a changed byte on disk or in a copy); restore the file or export the "
            "model again"
        )


def hashing_threads() -> int:
    """Threads that hash tensors at once: one per CPU this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
