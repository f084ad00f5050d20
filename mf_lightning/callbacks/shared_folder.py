"""Stops a multi-rank fit before its first step when its run folder is not the same folder on every rank, or its
ranks prepared different token caches."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from mf_lightning.data.datamodule import TextDataModule
from mf_lightning.lit.shared_folders import check_same_token_cache, check_shared_folder


class SharedFolderCheck(pl.Callback):
    """At ``fit``'s setup (every rank connected, nothing trained yet), checks with ``check_shared_folder`` that
    every rank sees ``trainer.default_root_dir`` and each checkpoint callback's ``dirpath`` as rank 0 does: the
    ranks write shards into, and resume from, the same files; and with ``check_same_token_cache`` that every rank
    prepared the same token cache as rank 0 (the datamodule is set up by now), its ``data.cache_dir`` shared or not."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or trainer.world_size <= 1:
            return
        check_shared_folder(trainer.strategy, trainer.default_root_dir, "trainer.default_root_dir")
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is not None:
                check_shared_folder(trainer.strategy, callback.dirpath, "checkpoint.dirpath")
        datamodule = trainer.datamodule
        if isinstance(datamodule, TextDataModule):
            check_same_token_cache(trainer.strategy, datamodule.cache_dir, datamodule.token_cache().content_digest)
