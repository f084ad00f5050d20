"""``LanguageModel``: the LightningModule that trains, evaluates and samples either architecture."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics.aggregation import MeanMetric

from mf_lightning.config import ModelConfig
from mf_lightning.data.tokenizers import Tokenizer, tokenizer_state
from mf_lightning.lit.checkpoints import align_state_keys, check_checkpoint, stamp_checkpoint
from mf_lightning.lit.distributed_checkpoint import is_sharded_checkpoint, read_sharded_checkpoint
from mf_lightning.lit.lightning_private import align_logging_step
from mf_lightning.lit.optim import (
    WarmupCosineLR,
    check_fraction,
    configure_resumed,
    group_settings,
    parameter_groups,
    scale_group_lr,
)
from mf_lightning.lit.sharding import (
    build_on_meta,
    has_meta_parameters,
    is_sharded,
    materialize,
    shard_network,
    unsharded_copy,
)
from mf_lightning.models import build_model
from mf_lightning.models.base import IGNORE_INDEX
from mf_lightning.models.gpt_neox import init_weights_for, read_gpt_neox_config
from mf_lightning.models.pretrained import RUNTIME_FIELDS
from mf_lightning.nn.hash_input import balance_loss

TRAIN, VAL, TEST = "train", "val", "test"
LOSS, BALANCE_LOSS, PERPLEXITY, BITS_PER_BYTE = "loss", "balance_loss", "ppl", "bpb"
"""The splits and metric names ``LanguageModel`` logs as ``metric_tag(split, metric)``, e.g. ``loss/val``;
the checkpoint monitor and the TensorBoard layout and HParams name the metrics through these."""


def metric_tag(split: str, metric: str) -> str:
    """The logged name of ``metric`` on ``split``: ``loss/train``, ``loss/val``, ``val/bpb``, ``train/balance_loss``.

    The loss of every split is in the group ``loss``, every other metric in its split's group. TensorBoard's
    Time Series tab groups cards by a tag's first part, sorts the groups by character code and opens only the
    first two: ``loss`` sorts before every other group a run logs (``lr-AdamW``, ``memory_*``, ``train``,
    ``val``, ...), so the first thing it shows is the training and validation loss side by side.
    """
    return f"{LOSS}/{split}" if metric == LOSS else f"{split}/{metric}"


FORMER_LOSS_TAGS = {f"{split}/{LOSS}": metric_tag(split, LOSS) for split in (TRAIN, VAL, TEST)}
"""The loss of each split as mf_lightning 0.1.0 logged it (``val/loss``), and its name now (``loss/val``): a
config or a run's saved ``config.yaml`` from then may still monitor the former."""


class LanguageModel(L.LightningModule):
    """Next-token language model (MemoryFormer or the baseline Transformer) with the paper's recipe.

    The model is ``ModelConfig.from_preset(preset, arch=arch, vocab_size=vocab_size, **overrides)``;
    ``vocab_size`` is linked from the DataModule by the CLI. Optimisation defaults follow SPEC §2:
    AdamW(0.9, 0.95, eps 1e-8), peak ``lr`` 3e-3, 1% linear warm-up then cosine to 1% of peak,
    weight decay 0.1 on matrices and tables but not on biases and norms, tables in their own
    parameter group (``table_lr_multiplier``, ``table_weight_decay``). ``optimizer`` / ``scheduler``
    replace AdamW / the schedule when given (LightningCLI injects them from YAML).

    Resuming from a checkpoint keeps the optimizer's moments and the step count, but the config wins for
    every optimizer and schedule setting (``lr``, ``weight_decay``, ``table_*``, ``warmup_fraction``,
    ``min_lr_ratio``, the run length from ``trainer.max_steps``): each change is logged as ``old -> new``.

    Args:
        arch: ``memoryformer`` (Memory Layers) or ``transformer`` (the baseline, Pythia's GPT-NeoX).
        preset: model size: ``debug``, ``tiny``, ``small`` or ``base`` (``mf efficiency`` lists them).
        vocab_size: tokenizer vocabulary; the CLI links it from ``data.vocab_size``.
        overrides: ``ModelConfig`` fields replacing the preset's, e.g. ``{n_layer: 4, code_bits: 4}``.
        lr: peak learning rate of every parameter group (tables: times ``table_lr_multiplier``).
        betas: AdamW's ``(beta1, beta2)``.
        eps: AdamW's epsilon.
        weight_decay: decoupled weight decay of matrices and embeddings (biases and norms get none).
        table_lr_multiplier: learning-rate factor of the Memory Layer tables.
        table_weight_decay: weight decay of the tables; ``None`` uses ``weight_decay``.
        warmup_fraction: share of the optimizer steps spent in linear warm-up.
        min_lr_ratio: the cosine decay ends at this fraction of the peak learning rate.
        optimizer: an optimizer class (and its arguments) replacing AdamW, e.g. ``torch.optim.SGD``.
        scheduler: a learning-rate scheduler replacing the warm-up + cosine schedule.
        compile: wrap the model in ``torch.compile``.
        max_new_tokens: tokens generated per prompt by ``predict``.
        temperature: sampling temperature of ``predict`` (0 = greedy).
        top_k: sample among the ``top_k`` most likely tokens (``None``: all).
        top_p: nucleus sampling threshold (``None``: off).
        init_from: a GPT-NeoX folder written by transformers (a Pythia checkpoint, or ``mf export`` of a
            baseline) whose weights start the baseline instead of the random init. Its model must be the
            run's (preset, overrides); its vocabulary may be larger than the tokenizer's (Pythia pads the
            GPT-NeoX tokenizer's 50277 ids to 50304), and then the model takes the folder's.
    """

    def __init__(
        self,
        arch: str = "memoryformer",
        preset: str = "debug",
        vocab_size: int | None = None,
        overrides: dict[str, Any] | None = None,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        table_lr_multiplier: float = 1.0,
        table_weight_decay: float | None = None,
        warmup_fraction: float = 0.01,
        min_lr_ratio: float = 0.01,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        compile: bool = False,
        max_new_tokens: int = 64,
        temperature: float = 0.8,
        top_k: int | None = 50,
        top_p: float | None = None,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        for name, value in (("lr", lr), ("eps", eps), ("table_lr_multiplier", table_lr_multiplier)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"model.{name} must be a positive number, got {value!r}")
        if weight_decay < 0 or (table_weight_decay is not None and table_weight_decay < 0):
            raise ValueError(
                f"weight decay must be >= 0, got weight_decay={weight_decay!r}, table_weight_decay={table_weight_decay!r}"
            )
        check_fraction("model.warmup_fraction", warmup_fraction, upper_inclusive=False)
        check_fraction("model.min_lr_ratio", min_lr_ratio)
        config_args = dict(overrides or {})
        if vocab_size is not None:
            if config_args.get("vocab_size", vocab_size) != vocab_size:
                raise ValueError(
                    f"model.overrides.vocab_size={config_args['vocab_size']} disagrees with the tokenizer's "
                    f"vocabulary of {vocab_size} ids (linked from data.vocab_size); remove the override"
                )
            config_args["vocab_size"] = vocab_size
            if init_from is not None and "vocab_size" not in (overrides or {}):
                config_args["vocab_size"] = max(vocab_size, read_gpt_neox_config(init_from).vocab_size)
        self.config = ModelConfig.from_preset(preset, arch=arch, **config_args)
        self.init_state = None if init_from is None else init_weights_for(self.config, init_from, RUNTIME_FIELDS)
        self.init_rng_state = torch.get_rng_state()
        self.model = build_on_meta(lambda: build_model(self.config))
        if compile:
            self.model = torch.compile(self.model)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self.flops_per_batch: int | None = None
        self.configured_groups: list[dict[str, Any]] = []
        self.configured_shape: dict[str, Any] | None = None
        self.resumed = False
        self.predictor: torch.nn.Module | None = None

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> LanguageModel:
        """Lightning's ``load_from_checkpoint``, which also reads the folder of a sharded checkpoint
        (``FSDP2Strategy``), assembled whole in this process."""
        if isinstance(checkpoint_path, (str, os.PathLike)) and is_sharded_checkpoint(checkpoint_path):
            buffer = io.BytesIO()
            torch.save(read_sharded_checkpoint(Path(checkpoint_path)), buffer)
            buffer.seek(0)
            checkpoint_path = buffer
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        if self.attached_trainer is None:  # used on its own: nothing called configure_model
            self.configure_model()
        return self.model(idx, targets)

    @property
    def attached_trainer(self) -> L.Trainer | None:
        """The Trainer running this module, or None when it is used on its own (Lightning's public ``trainer``
        raises then)."""
        try:
            return self.trainer
        except RuntimeError:
            return None

    @property
    def network(self) -> torch.nn.Module:
        """The bare model (unwrapped from ``torch.compile``), for saving and generation."""
        return getattr(self.model, "_orig_mod", self.model)

    def configure_model(self) -> None:
        """Materialises the network built on the meta device in ``__init__`` (a no-op once done).

        Under ``ModelParallelStrategy`` (``FSDP2Strategy``) each block and then the whole network are
        sharded with FSDP2 first, so each rank allocates only its shards; otherwise the whole network
        is allocated on the CPU (the strategy then moves it). Either way the weights are those an eager
        build from the random state at construction gives (``mf_lightning.lit.sharding``). Outside a
        ``Trainer`` the first forward calls it; call it yourself to read the weights before that.
        """
        if not has_meta_parameters(self.network):
            return
        trainer = self.attached_trainer
        strategy = trainer.strategy if trainer is not None else None
        if isinstance(strategy, ModelParallelStrategy):
            if self.device_mesh["tensor_parallel"].size() > 1:
                raise ValueError(
                    "LanguageModel shards with FSDP2 only; use trainer.strategy=mf_lightning.lit.sharding.FSDP2Strategy "
                    "or ModelParallelStrategy with tensor_parallel_size=1"
                )
            if self.init_state is not None:
                raise ValueError("model.init_from is not supported with FSDP2Strategy; train without sharding")
            shard_network(self.network, self.device_mesh["data_parallel"], self.trainer.precision)
            materialize(self.network, strategy.broadcast(self.init_rng_state), strategy.root_device)
        else:
            materialize(self.network, self.init_rng_state, torch.device("cpu"))
            if self.init_state is not None:
                self.network.load_state_dict(self.init_state)

    def cpu(self) -> LanguageModel:
        """Moves to the CPU; a network not materialised yet (a run that failed before ``configure_model``,
        which Lightning's teardown still moves) stays on the meta device, where nothing needs moving."""
        return self if has_meta_parameters(self.network) else super().cpu()

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        seq_len = getattr(datamodule, "seq_len", None)
        if seq_len is not None and seq_len > self.config.max_seq_len:
            raise ValueError(
                f"data.seq_len={seq_len} exceeds the model's max_seq_len={self.config.max_seq_len}; "
                "lower data.seq_len or raise model.overrides.max_seq_len"
            )
        batch_size = getattr(datamodule, "batch_size", None)
        if seq_len is not None and batch_size is not None:
            self.flops_per_batch = self.network.flops_per_token(seq_len, training=True) * seq_len * batch_size

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        _, loss = self(x, y)
        self.log(metric_tag(TRAIN, LOSS), loss, prog_bar=True, on_step=True, on_epoch=False)
        balance = balance_loss(self.network)
        if balance is None:
            return loss
        self.log(metric_tag(TRAIN, BALANCE_LOSS), balance, on_step=True, on_epoch=False)
        return loss + balance

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.evaluate(batch, self.val_loss, VAL)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.evaluate(batch, self.test_loss, TEST)

    def evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], metric: MeanMetric, split: str) -> None:
        """Token-weighted mean loss over the targets that count (filler windows have none; see
        ``mf_lightning.data.sharded_evaluation``); perplexity and bits per byte derive from it at epoch end."""
        x, y = batch
        _, loss = self(x, y)
        tokens = (y != IGNORE_INDEX).sum()
        # A batch of filler windows alone has no target, so its mean loss is 0/0; it adds nothing (a NaN
        # loss of real targets still shows).
        metric.update(torch.where(tokens > 0, loss.detach(), 0.0), weight=tokens)
        self.log(metric_tag(split, LOSS), metric, prog_bar=True, on_step=False, on_epoch=True)

    def on_validation_epoch_end(self) -> None:
        self.log_derived(VAL, self.val_loss)

    def on_test_epoch_end(self) -> None:
        self.log_derived(TEST, self.test_loss)

    def log_derived(self, split: str, metric: MeanMetric) -> None:
        loss = metric.compute()
        self.log(metric_tag(split, PERPLEXITY), torch.exp(loss), sync_dist=False)
        bytes_per_token = getattr(getattr(self.trainer, "datamodule", None), "bytes_per_token", None)
        if bytes_per_token:
            self.log(metric_tag(split, BITS_PER_BYTE), loss / (math.log(2) * bytes_per_token(split)), sync_dist=False)

    def on_predict_start(self) -> None:
        """Under FSDP, gathers a whole copy of the weights on every rank for ``predict_step``.

        Generation reads the embedding and head outside the sharded network's ``forward``, and each rank
        decodes its own prompts for as many steps as they need, so it cannot run on shards that must be
        all-gathered in lockstep; the copy costs one all-gather of the weights (no optimizer state).
        """
        if is_sharded(self.network):
            self.predictor = unsharded_copy(self.network, lambda: build_model(self.config))

    def on_predict_end(self) -> None:
        self.predictor = None

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, str]:
        tokenizer = self.trainer.datamodule.tokenizer
        prompt_ids = batch["input_ids"].to(self.device)
        network = self.network if self.predictor is None else self.predictor
        out = network.generate(
            prompt_ids,
            max_new_tokens=self.hparams.max_new_tokens,
            temperature=self.hparams.temperature,
            top_k=self.hparams.top_k,
            top_p=self.hparams.top_p,
            eos_id=tokenizer.eos_id,
        )
        completion = out[0, prompt_ids.shape[1] :].tolist()
        if tokenizer.eos_id in completion:
            completion = completion[: completion.index(tokenizer.eos_id)]
        return {"prompt": batch["prompt"], "completion": tokenizer.decode(completion)}

    @property
    def tokenizer(self) -> Tokenizer | None:
        """The attached DataModule's tokenizer (``None`` without one)."""
        return getattr(getattr(self.attached_trainer, "datamodule", None), "tokenizer", None)

    @property
    def tokenizer_fingerprint(self) -> str | None:
        """Fingerprint of the attached DataModule's tokenizer (``None`` without one)."""
        return getattr(self.tokenizer, "fingerprint", None)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Records the model config and tokenizer, which loading checks the checkpoint against."""
        tokenizer = self.tokenizer
        state = None if tokenizer is None else tokenizer_state(tokenizer)
        stamp_checkpoint(checkpoint, self.config.to_dict(), self.tokenizer_fingerprint, state)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuses, with one clear error, a checkpoint of another model or tokenizer before any weight is copied.

        Keys are first aligned with this model's, so checkpoints with and without ``torch.compile`` load.
        """
        expected = self.state_dict()
        checkpoint["state_dict"] = align_state_keys(checkpoint["state_dict"], expected)
        path = getattr(self.attached_trainer, "ckpt_path", None)
        check_checkpoint(checkpoint, self.config.to_dict(), self.tokenizer_fingerprint, expected, path)
        align_logging_step(checkpoint, self.attached_trainer)
        self.resumed = True

    def on_train_start(self) -> None:
        """Applies the config over the optimizer and schedule settings a resumed checkpoint restored.

        Lightning restores optimizer and scheduler states after ``configure_optimizers`` and before this
        hook (``tests/lit/test_resume.py`` pins that order); the schedule's length is also set here, since
        asking for ``estimated_stepping_batches`` earlier would build the training loader before
        Lightning restores its position (Lightning issue #20550).
        """
        scheduler = self.trainer.lr_scheduler_configs[0].scheduler if self.trainer.lr_scheduler_configs else None
        shape = self.configured_shape
        if shape is not None and shape["total_steps"] is None:
            shape = {**shape, "total_steps": int(self.trainer.estimated_stepping_batches)}
        changes = configure_resumed(self.trainer.optimizers[0], scheduler, self.configured_groups, shape)
        if self.resumed and changes:
            rank_zero_info(f"resumed with the config's optimizer settings (checkpoint -> config): {'; '.join(changes)}")

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = parameter_groups(self.network, hp.weight_decay, hp.table_weight_decay)
        if self.optimizer_factory is None:
            optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps)
        else:
            optimizer = self.optimizer_factory(groups)
        scale_group_lr(optimizer, "tables", hp.table_lr_multiplier)
        self.configured_groups = group_settings(optimizer)
        if self.scheduler_factory is None:
            scheduler = WarmupCosineLR(
                optimizer, total_steps=None, warmup_fraction=hp.warmup_fraction, min_lr_ratio=hp.min_lr_ratio
            )
        else:
            scheduler = self.scheduler_factory(optimizer)
        self.configured_shape = (
            {key: getattr(scheduler, key) for key in WarmupCosineLR.SHAPE}
            if isinstance(scheduler, WarmupCosineLR)
            else None
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
