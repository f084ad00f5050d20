"""Sharded training: PyTorch FSDP2 (``fully_shard``) driven by Lightning's ``ModelParallelStrategy``.

``LanguageModel`` builds its network on the meta device (no memory, no initialisation) and materialises
it in ``configure_model``, where every module's ``reset_parameters`` sets all of its parameters and
buffers (:mod:`mf_lightning.nn.init`, the torchtitan pattern), run from the random state captured at
construction:

- single device and DDP: ``materialize`` allocates the whole network on the CPU and initialises it in
  place, which gives exactly the weights an eager build would;
- ``FSDP2Strategy``: ``shard_network`` first wraps every block (its Memory Layer tables included) and then
  the whole network (embedding, final norm, head) in ``fully_shard`` while still on the meta device;
  ``materialize`` then initialises each module's state in full on the CPU, one module at a time, keeps
  this rank's shard and frees the rest. So a rank never holds more than its shards plus one module's
  own parameters, and every world size starts from the same weights as one process.

Inside ``forward`` FSDP2 has all-gathered a unit's parameters into plain tensors, so the Memory Layer
kernels (Triton, embedding_bag, torch) see ordinary tensors; outside it, parameters and gradients are
``DTensor`` shards along their first dimension (the tables' ``num_tables`` axis). Checkpoints are folders
of per-rank shards (``FSDP2Strategy``, ``mf_lightning.lit.distributed_checkpoint``); prediction runs on
a gathered plain copy (``unsharded_copy``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.constants import default_pg_timeout
from torch.distributed.tensor import DTensor, distribute_tensor

from mf_lightning.fs.folders import replaced_folder
from mf_lightning.fs.remote import is_remote
from mf_lightning.lit.checkpoints import read_checkpoint
from mf_lightning.lit.distributed_checkpoint import (
    SHARDED_FOLDER_KEY,
    is_sharded_checkpoint,
    load_sharded_model,
    load_sharded_optimizer,
    missing_shards,
    read_sharded_placeholder,
    save_sharded,
)
from mf_lightning.lit.lightning_private import make_every_rank_data_parallel
from mf_lightning.lit.shared_folders import check_all_shards
from mf_lightning.models.pretrained import COMPILE_PREFIX
from mf_lightning.nn.init import reset_state, stateful_modules

BF16_PRECISIONS = ("bf16-mixed", "bf16-true", "bf16")


def build_on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` on the meta device: shapes only, no memory and no initialisation (see :func:`materialize`)."""
    with torch.device("meta"):
        return build()


@torch.no_grad()
def materialize(module: nn.Module, rng_state: torch.Tensor, device: torch.device) -> None:
    """Allocates the meta state of ``module`` on ``device`` and sets it with every module's ``reset_parameters``.

    The modules run in :func:`~mf_lightning.nn.init.initialise`'s order on the CPU from ``rng_state``
    (the global random state when ``module`` was built), leaving the global random state untouched, so
    the result is the eager build's from that state. The state of one module at a time that is not a
    plain CPU tensor (a ``DTensor`` shard, or a tensor on an accelerator) is initialised as a full-size
    CPU stand-in, of which this rank keeps its shard: a rank never holds more than its shards plus one
    module's own parameters in full, and every world size starts from the weights of one process.
    """
    module.to_empty(device=device)
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(rng_state)
        for name, owner in stateful_modules(module):
            with cpu_stand_ins(owner):
                reset_state(name, owner)


@contextmanager
def cpu_stand_ins(module: nn.Module) -> Iterator[None]:
    """Within the block, ``module``'s own parameters and buffers that are not plain CPU tensors are
    replaced by full-size CPU tensors; on exit their values go into the originals (a ``DTensor`` receives
    its shard), which are put back."""
    originals = {
        slot: (store, tensor)
        for store in (module._parameters, module._buffers)
        for slot, tensor in store.items()
        if tensor is not None and (isinstance(tensor, DTensor) or tensor.device.type != "cpu")
    }
    for slot, (store, tensor) in originals.items():
        stand_in = torch.empty(tensor.shape, dtype=tensor.dtype)
        store[slot] = nn.Parameter(stand_in, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else stand_in
    try:
        yield
        for slot, (store, tensor) in originals.items():
            full = store[slot].detach().to(tensor.device)
            if isinstance(tensor, DTensor):
                full = distribute_tensor(full, tensor.device_mesh, tensor.placements, src_data_rank=None)
            tensor.copy_(full)
    finally:
        for slot, (store, tensor) in originals.items():
            store[slot] = tensor


def has_meta_parameters(module: nn.Module) -> bool:
    """Whether ``module`` still has parameters on the meta device (built but not yet materialised)."""
    return any(parameter.is_meta for parameter in module.parameters())


def mixed_precision_policy(precision: str) -> Any:
    """FSDP2's policy for a trainer ``precision``: bf16 parameters and compute with fp32 gradient
    reduction for the bf16 precisions, else none (parameters stay in their own dtype)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if str(precision) in BF16_PRECISIONS:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_network(network: nn.Module, mesh: Any, precision: str) -> None:
    """``fully_shard`` each block of ``network`` (one all-gather per block), then ``network`` itself, which
    takes the remaining parameters (embedding, final norm, head) as one unit: a tied head reads the
    embedding outside the embedding's own forward, so the two must be gathered together."""
    from torch.distributed.fsdp import fully_shard

    policy = mixed_precision_policy(precision)
    for block in network.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(network, mesh=mesh, mp_policy=policy)


def is_sharded(network: nn.Module) -> bool:
    """Whether ``network`` is wrapped by FSDP2's ``fully_shard``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(network, FSDPModule)


def unsharded_copy(network: nn.Module, build: Callable[[], nn.Module]) -> nn.Module:
    """A plain (not sharded) copy of the FSDP ``network``, in eval mode, holding its whole weights and buffers.

    Collective: every rank all-gathers the full tensors (on the parameters' device, in their dtype).
    ``build()`` constructs the same architecture; it runs on the meta device, so nothing is initialised.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(network, options=StateDictOptions(full_state_dict=True))
    with torch.device("meta"):
        copy = build()
    copy.load_state_dict(state, assign=True)
    return copy.eval()


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as plain FSDP2 (``fully_shard``): every process is one
    data-parallel rank. (Lightning's own ``FSDPStrategy`` is the older FSDP1 wrapper; this is not it.)

    ``ModelParallelStrategy`` would by default make the GPUs of a node a tensor-parallel group; here the
    data-parallel size is always ``num_nodes x devices`` and the tensor-parallel size 1, so the same
    config runs on any number of devices.

    Checkpoints (``save_distributed_checkpoint=True``, the default) are folders in which every rank
    writes its own shards of the weights and optimizer state (``mf_lightning.lit.distributed_checkpoint``):
    nothing is gathered on one host, a save is atomic (staged under a hidden name, moved into place when
    every rank is done), and a resume on any number of ranks reads just its own shards, after
    ``LanguageModel.on_load_checkpoint`` has checked the stored shapes against the config. ``mf export``,
    ``mf eval``, ``mf generate``, ``mf validate`` and a resume without sharding read the folder too.

    ``save_distributed_checkpoint=False`` writes single ``.ckpt`` files instead, as under DDP: the full
    state is gathered into rank 0's host memory and written by the trainer's ``CheckpointIO``
    (``AtomicCheckpointIO`` in ``mf``); only sensible for models whose whole state fits one host.

    Both kinds resume under this strategy: a file is memory-mapped on every rank, checked, and each
    rank copies its shards from it.

    Args:
        save_distributed_checkpoint: write sharded checkpoint folders (default) rather than single files.
        process_group_backend: ``nccl``, ``gloo`` ...; default: the device's.
        timeout: how long a collective waits for every rank (``"h:m:s"`` in a config) before the run stops
            with one line naming the rank that did not answer: 30 minutes (PyTorch's default), which a
            preemption save of the largest preset fits (docs/checkpoints-and-fault-tolerance.md).
    """

    def __init__(
        self,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.save_distributed_checkpoint = save_distributed_checkpoint

    def setup_environment(self) -> None:
        """Every process is a data-parallel rank (``make_every_rank_data_parallel``, set before the mesh is
        built); ``tests/test_fsdp.py`` checks that each of 2 ranks holds half of every parameter. A launch
        of another size than ``num_nodes x devices`` (torchrun, SLURM) is one ``ValueError`` naming both, as
        under DDP (whose launcher makes the same check), instead of a failure to build the device mesh."""
        make_every_rank_data_parallel(self)
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        super().setup_environment()

    @property
    def lightning_restore_optimizer(self) -> bool:
        """Lightning hands the optimizer states to ``load_optimizer_state_dict`` after the checks."""
        return True

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The full weights on rank 0 (single-file checkpoints), else this rank's shards, left where they
        are (on the GPU): the checkpoint writer copies them to the host one tensor at a time."""
        if not self.save_distributed_checkpoint:
            return super().lightning_module_state_dict()
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.model)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Like ``lightning_module_state_dict``: keyed by parameter name, this rank's shards, not copied."""
        if not self.save_distributed_checkpoint:
            return super().optimizer_state(optimizer)
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        plain = optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        return get_optimizer_state_dict(self.model, plain)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: str | os.PathLike, storage_options: Any | None = None
    ) -> None:
        """A sharded folder written by all ranks into a hidden stage, then moved to ``filepath`` by rank 0
        (``replaced_folder``, held by rank 0 only; the other ranks write into the folder it broadcasts). Rank 0
        first checks that every rank's shards are there (``check_all_shards``): if not, no rank goes on."""
        if not self.save_distributed_checkpoint:
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        if storage_options is not None or is_remote(filepath):
            raise ValueError(
                f"sharded checkpoints are written to local or mounted folders, not {filepath!r}; "
                "use a local checkpoint.dirpath or FSDP2Strategy(save_distributed_checkpoint=False)"
            )
        target = Path(self.broadcast(str(filepath)))
        staging = replaced_folder(target, "saving a sharded checkpoint") if self.is_global_zero else nullcontext()
        with staging as stage:
            folder = Path(self.broadcast(str(stage)))
            save_sharded(checkpoint, folder, self.is_global_zero, self.barrier)
            check_all_shards(self, missing_shards(folder, self.world_size) if self.is_global_zero else [], target)
        self.barrier()

    def load_checkpoint(self, checkpoint_path: str | os.PathLike, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        if weights_only is None:
            weights_only = getattr(self.checkpoint_io, "weights_only", True)
        if is_sharded_checkpoint(path):
            return read_sharded_placeholder(path, weights_only)
        return read_checkpoint(path, "cpu", weights_only, mmap=True)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if SHARDED_FOLDER_KEY in checkpoint:
            load_sharded_model(Path(checkpoint[SHARDED_FOLDER_KEY]), self.model, strict)
            return
        state = {key.replace(COMPILE_PREFIX, ""): value for key, value in checkpoint["state_dict"].items()}
        set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True, strict=strict))

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if SHARDED_FOLDER_KEY in checkpoint:
            folder = Path(checkpoint[SHARDED_FOLDER_KEY])
            for index, (optimizer, rest) in enumerate(zip(self.optimizers, checkpoint["optimizer_states"])):
                load_sharded_optimizer(folder, self.model, optimizer, index, rest)
            return
        names = {id(parameter): name.replace(COMPILE_PREFIX, "") for name, parameter in self.model.named_parameters()}
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
            set_optimizer_state_dict(
                self.model,
                optimizer,
                optim_state_dict=keyed_by_name(state, optimizer, names),
                options=StateDictOptions(full_state_dict=True),
            )


def keyed_by_name(
    state: Mapping[str, Any], optimizer: torch.optim.Optimizer, names: Mapping[int, str]
) -> dict[str, Any]:
    """An ``Optimizer.state_dict()`` (parameters numbered) keyed by parameter name instead.

    Saved and current parameters are matched group by group, in order, as ``Optimizer.load_state_dict``
    matches them, so it holds however the numbers were given: by a single-device optimizer (in its
    groups' order) or by Lightning's sharded save (in the model's order). ``names`` maps ``id(param)`` to
    the parameter's name.
    """
    saved_groups, groups = state["param_groups"], optimizer.param_groups
    if [len(group["params"]) for group in saved_groups] != [len(group["params"]) for group in groups]:
        raise ValueError(
            f"the checkpoint's optimizer has parameter groups of sizes {[len(g['params']) for g in saved_groups]}, "
            f"this one {[len(g['params']) for g in groups]}; resume with the optimizer the checkpoint was trained with"
        )
    name_of = {
        number: names[id(parameter)]
        for saved, group in zip(saved_groups, groups)
        for number, parameter in zip(saved["params"], group["params"])
    }
    return {
        "state": {name_of[number]: value for number, value in state["state"].items()},
        "param_groups": [
            {**group, "params": [name_of[number] for number in group["params"]]} for group in saved_groups
        ],
    }
