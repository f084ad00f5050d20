"""Where a run keeps its resolved config, its checkpoints and its logs: one answer, from its ``mf fit`` config.

``mf fit`` writes there (``MFCLI`` sets the checkpoint folder and the default logger from it) and every
command that reads a run looks there (``load_for_inference`` for ``mf eval`` / ``mf generate``, the scores
``mf eval`` logs). ``trainer.default_root_dir`` (the working directory when unset) holds ``checkpoints/``
unless ``checkpoint.dirpath`` names another folder. The logs are where ``trainer.logger`` writes, which is
also where Lightning saves the resolved ``config.yaml`` (``Trainer.log_dir``): ``<root>/tensorboard`` for the
default TensorBoard logger; ``<save_dir>/<name>/<version>`` for a configured ``TensorBoardLogger`` or
``CSVLogger`` (``version_<N>`` when the version is a number; the newest ``version_<N>`` on disk when it
is left to the logger); the logger's ``save_dir`` for any other logger; the root with ``trainer.logger: false``.

Relative paths are relative to the folder the run was started in. Given the run's saved ``config.yaml``,
that folder is found from where the file lies, so a run can be read from any working directory.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

TENSORBOARD = "tensorboard"
"""The default logger's folder under the run's root (``TensorBoardLogger(root, name=TENSORBOARD, version="")``)."""
TENSORBOARD_LOGGER = "TensorBoardLogger"
CHECKPOINTS = "checkpoints"
EVAL = "eval"
"""The folder under the run's root where ``mf eval`` writes a checkpoint's results and their TensorBoard scalars."""
CONFIG_NAME = "config.yaml"
VERSIONED_LOGGERS = (TENSORBOARD_LOGGER, "CSVLogger")
"""Lightning's loggers whose folder is ``<save_dir>/<name>/<version>`` (``Trainer.log_dir`` is their ``log_dir``)."""
DEFAULT_LOGGER_NAME = "lightning_logs"
ANY_VERSION = "version_*"
VERSION_FOLDER = re.compile(r"version_(\d+)")


@dataclass(frozen=True)
class RunFolders:
    """A run's folders: ``root`` (``trainer.default_root_dir``), ``checkpoints`` and ``logs`` (where the logger
    writes and the resolved config is saved); ``logger`` is the class name of its first logger (None without)."""

    root: Path
    checkpoints: Path
    logs: Path
    logger: str | None

    @property
    def config(self) -> Path:
        """The resolved config ``mf fit`` saved for the run."""
        return self.logs / CONFIG_NAME

    @property
    def tensorboard(self) -> bool:
        """Whether ``logs`` is a TensorBoard folder (``mf eval`` logs its scores there)."""
        return self.logger == TENSORBOARD_LOGGER


def run_folders(config: Any, config_file: str | Path | None = None) -> RunFolders:
    """The folders of the run of ``config``, a parsed ``mf fit`` config (a namespace or a dict of its sections).

    ``config_file``, the file ``config`` was read from, places relative paths when it is the run's saved config.
    """
    values = config.as_dict() if hasattr(config, "as_dict") else dict(config)
    trainer = values.get("trainer") or {}
    root = Path(trainer.get("default_root_dir") or ".")
    checkpoints = Path((values.get("checkpoint") or {}).get("dirpath") or root / CHECKPOINTS)
    logger, logs = logger_folder(trainer.get("logger"), root)
    folders = RunFolders(root, checkpoints, logs, logger)
    if config_file is not None:
        placed = placed_by_saved_config(folders, Path(config_file))
        if placed is not None:
            return placed
    return replace(folders, logs=newest_version(folders.logs))


def logger_folder(logger: Any, root: Path) -> tuple[str | None, Path]:
    """The class name and folder of the first logger ``trainer.logger`` configures (see the module's docstring)."""
    if logger is None or logger is True:
        return TENSORBOARD_LOGGER, root / TENSORBOARD
    if isinstance(logger, list):
        logger = logger[0] if logger else False
    if logger is False:
        return None, root
    if not isinstance(logger, Mapping) or "class_path" not in logger:
        raise ValueError(f"trainer.logger must be true, false, a logger class or a list of them, got {logger!r}")
    name = str(logger["class_path"]).rsplit(".", 1)[-1]
    init = logger.get("init_args") or {}
    save_dir = Path(init.get("save_dir") or root)
    if name not in VERSIONED_LOGGERS:
        return name, save_dir
    version = init.get("version")
    folder = ANY_VERSION if version is None else version if isinstance(version, str) else f"version_{version}"
    return name, save_dir / str(init.get("name", DEFAULT_LOGGER_NAME) or "") / folder


def placed_by_saved_config(folders: RunFolders, config_file: Path) -> RunFolders | None:
    """``folders`` with relative paths made relative to where the run started, when ``config_file`` lies where the
    run saved its config (``<start>/<logs>/config.yaml``); None when it does not (it is the file the run was
    started with, and relative paths stay relative to the working directory)."""
    if config_file.name != CONFIG_NAME or folders.logs.is_absolute():
        return None
    saved_in = config_file.absolute().parent
    pattern = [part for part in folders.logs.parts if part != "."]
    if len(pattern) > len(saved_in.parts) - 1:
        return None
    tail = saved_in.parts[len(saved_in.parts) - len(pattern) :] if pattern else ()
    if not all(fnmatch.fnmatchcase(part, wanted) for part, wanted in zip(tail, pattern)):
        return None
    start = Path(*saved_in.parts[: len(saved_in.parts) - len(pattern)])

    def place(path: Path) -> Path:
        return path if path.is_absolute() else start / path

    return RunFolders(place(folders.root), place(folders.checkpoints), saved_in, folders.logger)


def newest_version(logs: Path) -> Path:
    """``logs`` itself, or where its version is left to the logger, the newest ``version_<N>`` folder there (the
    last run's; ``version_0`` before the first)."""
    if logs.name != ANY_VERSION:
        return logs
    numbers = [
        int(match[1])
        for path in (logs.parent.iterdir() if logs.parent.is_dir() else ())
        if path.is_dir() and (match := VERSION_FOLDER.fullmatch(path.name))
    ]
    return logs.parent / f"version_{max(numbers, default=0)}"
