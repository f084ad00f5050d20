"""Digests of tensors: SHA-256 of every tensor of a model folder, and the fast digest checkpoints carry.

safetensors checks its header (names, dtypes, shapes, offsets) for consistency but not the data after
it, nor whether the header still says what was saved: a bit flipped on disk or in a copy loads silently
as another model, and a header whose dtype was changed to another of the same size (``F32`` to ``I32``)
reinterprets the same bytes. At save, the SHA-256 of each tensor's bytes is computed from the tensors
in memory and stored in the file's metadata (``DIGEST_KEY``, a JSON object by tensor name), with each
tensor's dtype and shape (``LAYOUT_KEY``); at load, the header's dtypes and shapes are compared with
those and each tensor's byte range is hashed from the file before the weights are used, and a mismatch
is one error naming the file and the damaged tensors. Tensors are hashed in parallel threads (hashlib
releases the GIL), so the cost is one extra read of the file at the machine's hashing rate times its
cores (``benchmarks/results/weights_digest_cpu.md``).

Checkpoints, written and read far more often, carry XXH3-128 digests instead (``tensor_digest``,
``bytes_digest``): a non-cryptographic hash that detects accidental damage at a few percent of the time
reading the file takes (``benchmarks/results/checkpoint_digest_cpu.md``), where SHA-256 costs ~40 %.
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
import xxhash

DIGEST_KEY = "mf_tensor_sha256"
LAYOUT_KEY = "mf_tensor_layout"
"""Metadata key of each tensor's dtype (safetensors' name) and shape at save, a JSON object by tensor name."""
FAST_DIGEST = "xxh3_128"
"""The hash checkpoints record their tensors' digests with (chosen by ``benchmarks/checkpoint_digest.py``)."""
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
"""The dtype names of the safetensors format, as its header spells them."""
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


def tensors_layout(state: Mapping[str, torch.Tensor]) -> str:
    """The metadata value of ``LAYOUT_KEY``: each tensor's dtype (as the safetensors header names it) and shape."""
    return json.dumps(
        {
            name: [SAFETENSORS_DTYPES.get(state[name].dtype, str(state[name].dtype)), list(state[name].shape)]
            for name in sorted(state)
        }
    )


def check_file_digests(path: Path) -> None:
    """Raise a ``ValueError`` naming ``path`` and the tensors whose dtype, shape or bytes are not those recorded
    when it was saved.

    A file that records no digests or layouts was not written by ``save_pretrained`` (every model folder it
    writes has them), so it is refused too. ``path`` must be a readable safetensors file (its header already
    parsed by safetensors).
    """
    with path.open("rb") as file:
        (header_size,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(header_size))
    metadata = header.pop("__metadata__", None) or {}
    check_layout(path, header, metadata.get(LAYOUT_KEY))
    stored = metadata.get(DIGEST_KEY)
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


def check_layout(path: Path, header: Mapping[str, dict], stored: str | None) -> None:
    """Raise a ``ValueError`` naming the tensors whose dtype or shape in the header of ``path`` differ from
    ``stored`` (the ``LAYOUT_KEY`` value recorded at save; None: not recorded, so not written by ``save_pretrained``)."""
    if stored is None:
        raise ValueError(
            f"{path} records no dtype and shape of its tensors ({LAYOUT_KEY} metadata), so its header cannot be "
            "checked; it was not written by save_pretrained / mf export: export the model again"
        )
    expected = {name: tuple(dtype_and_shape) for name, dtype_and_shape in json.loads(stored).items()}
    found = {name: (entry["dtype"], entry["shape"]) for name, entry in header.items()}
    changed = [
        f"{name}: {describe(found.get(name))} in the header, {describe(expected.get(name))} when saved"
        for name in sorted(set(found) | set(expected))
        if found.get(name) != expected.get(name)
    ]
    if changed:
        listed = "; ".join(changed[:LISTED]) + ("; ..." if len(changed) > LISTED else "")
        raise ValueError(
            f"{path} is damaged: the header gives {len(changed)} tensor(s) another dtype or shape than they were "
            f"saved with ({listed}); restore the file or export the model again"
        )


def describe(layout: tuple | None) -> str:
    """A tensor's (dtype, shape) as the error names it."""
    return "absent" if layout is None else f"{layout[0]} {list(layout[1])}"


def tensor_digest(tensor: torch.Tensor) -> str:
    """The ``FAST_DIGEST`` of a tensor's dtype, shape and values (hex): equal tensors, and only they, agree."""
    hasher = xxhash.xxh3_128(f"{tensor.dtype} {list(tensor.shape)}\n".encode())
    hasher.update(tensor.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy())
    return hasher.hexdigest()


def bytes_digest(data: bytes | memoryview) -> str:
    """The ``FAST_DIGEST`` of ``data`` (hex)."""
    return xxhash.xxh3_128_hexdigest(data)


def hashing_threads() -> int:
    """Threads that hash tensors at once: one per CPU this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
