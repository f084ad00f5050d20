"""The parts folders and locks of token caches, and the removal of those no preparation can ever resume.

A cache ``tokens/<digest>`` is built from a parts folder ``tokens/.<digest>.parts`` under the lock
``tokens/.<digest>.lock``. A preparation killed outright (SIGKILL, a lost node) leaves both, so that
running it again resumes. Once a file of its corpus has changed (edited, replaced, removed), the corpus
has another identity and so another digest (``sources``: a file's inode change time never goes back):
nothing will ever ask for the old digest again, and its parts and lock would stay forever. So each parts
folder records the cache key it is for (``KEY_FILE``), and a preparation about to build removes every
other parts folder whose corpus has changed and whose lock no live process holds, with that lock, and
every dead lock that guards no parts folder, there and beside the trained tokenizers (a BPE training
killed outright leaves its lock, under a key of the corpus too). Parts of an unchanged corpus stay to
be resumed, and so do those whose change cannot be told (a Hugging Face dataset, a key that cannot be
read) or whose builder may still run (a lock of another host that was touched within
``fs.lock.STALE_SECONDS``).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from mf_lightning.data.sources import recorded_change
from mf_lightning.fs.atomic import write_atomic
from mf_lightning.fs.lock import may_be_held

log = logging.getLogger(__name__)

KEY_FILE = "key.json"
TOKENS = "tokens"
TOKENIZERS = "tokenizers"
"""The folders of ``cache_root`` holding the token caches and the trained tokenizers."""
LEFTOVER_NAME = re.compile(r"^\.(?P<digest>[0-9a-f]+)\.(?P<kind>parts|lock)$")


def parts_folder(directory: Path) -> Path:
    """The folder the parts of the cache ``directory`` are tokenized into."""
    return directory.parent / f".{directory.name}.parts"


def lock_file(directory: Path) -> Path:
    """The lock of the builder of the cache ``directory``."""
    return directory.parent / f".{directory.name}.lock"


def record_key(folder: Path, key: dict[str, Any]) -> None:
    """Writes the cache ``key`` of the parts folder ``folder`` into it, unless it is there already."""
    if not (folder / KEY_FILE).is_file():
        write_atomic(folder / KEY_FILE, json.dumps(key), "recording the corpus of a parts folder")


def remove_unresumable(cache_root: Path, keep: Path | None) -> None:
    """Removes the parts folders (but ``keep``) and locks under ``cache_root`` that no preparation can resume (see
    the module)."""
    tokens = cache_root / TOKENS
    for path in sorted(tokens.iterdir()) if tokens.is_dir() else []:
        match = LEFTOVER_NAME.match(path.name)
        if match is None or path == keep:
            continue
        cache = tokens / match["digest"]
        if match["kind"] == "parts":
            change = abandoned_change(path)
            lock = lock_file(cache)
            if change is not None and not may_be_held(lock):
                log.info("removing %s, the parts of an interrupted preparation whose corpus changed (%s)", path, change)
                shutil.rmtree(path, ignore_errors=True)
                remove_if_dead(lock)
        elif not parts_folder(cache).exists():
            remove_if_dead(path)
    tokenizers = cache_root / TOKENIZERS
    for lock in sorted(tokenizers.glob(".*.lock")) if tokenizers.is_dir() else []:
        remove_if_dead(lock)


def kept_parts(tokens: Path) -> list[tuple[Path, int, int]]:
    """The parts folders left in ``tokens`` (by interrupted or running preparations), each with its finished parts
    and the bytes of its files."""
    kept = []
    for folder in sorted(tokens.glob(".*.parts")):
        if LEFTOVER_NAME.match(folder.name) and folder.is_dir():
            files = [path for path in folder.iterdir() if path.is_file()]
            finished = sum(path.suffix == ".done" for path in files)
            kept.append((folder, finished, sum(path.stat().st_size for path in files)))
    return kept


def abandoned_change(folder: Path) -> str | None:
    """What changed in the corpus of the parts folder ``folder`` since its key was recorded, or ``None`` (unchanged,
    or not to be told)."""
    try:
        key = json.loads((folder / KEY_FILE).read_text(encoding="utf-8"))
        return recorded_change(key["source"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remove_if_dead(lock: Path) -> None:
    """Removes ``lock`` if no process that may still run holds it."""
    if lock.exists() and not may_be_held(lock):
        log.info("removing %s, the lock of an interrupted preparation", lock)
        lock.unlink(missing_ok=True)
