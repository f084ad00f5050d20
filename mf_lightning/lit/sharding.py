"""Sharded training: PyTorch FSDP2 (``fully_shard``) driven by Lightning's ``ModelParallelStrategy``.

``LanguageModel`` builds its network on the meta device (no memory, no initialisation) and materialises
it in ``configure_model``, where every module's ``reset_parameters`` sets all of its parameters and
buffers (:mod:`mf_lightning.nn.init`, the torchtitan pattern), run from the random state captured at
construction:

- single device and DDP: ``materialize`` allocates the whole network on the CPU and initialises it in
  place, which gives exactly the weights an eager build would;
- ``FSDPStrategy``: ``shard_network`` first wraps every block (its Memory Layer tables included) and then
  the whole network (embedding, final norm, head) in ``fully_shard`` while still on the meta device;
  ``materialize`` then initialises each module's state in full on the CPU, one module at a time, keeps
  this rank's shard and frees the rest. So a rank never holds more than its shards plus one module's
  own parameters, and every world size starts from the same weights as one process.

Inside ``forward`` FSDP2 has all-gathered a unit's parameters into plain tensors, so the Memory Layer
kernels (Triton, embedding_bag, torch) see ordinary tensors; outside it, parameters and gradients are
``DTensor`` shards along their first dimension (the tables' ``num_tables`` axis).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from mf_lightning.lit.checkpoints import read_checkpoint
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


class FSDPStrategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as plain FSDP2: every process is one data-parallel rank.

    ``ModelParallelStrategy`` would by default make the GPUs of a node a tensor-parallel group; here the
    data-parallel size is always ``num_nodes x devices`` and the tensor-parallel size 1, so the same
    config runs on any number of devices. Checkpoints are single files, as under DDP: the full state
    (weights and optimizer, gathered to rank 0's CPU memory) is written by the trainer's
    ``CheckpointIO`` (``AtomicCheckpointIO`` in ``mf``), so ``mf export``, ``mf validate --ckpt_path``
    and a resume on another number of devices (or without sharding) read it unchanged. Resuming reads
    the file memory-mapped on every rank, lets ``LanguageModel.on_load_checkpoint`` check it against the
    config, and only then copies each rank's shards of the weights and optimizer state.
    """

    def __init__(self, process_group_backend: str | None = None, timeout: timedelta | None = default_pg_timeout) -> None:
        super().__init__(
            tensor_parallel_size=1,
            save_distributed_checkpoint=False,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    @property
    def lightning_restore_optimizer(self) -> bool:
        """Lightning hands the optimizer states to ``load_optimizer_state_dict`` after the checks."""
        return True

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        if weights_only is None:
            weights_only = getattr(self.checkpoint_io, "weights_only", True)
        return read_checkpoint(path, "cpu", weights_only, mmap=True)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        state = {key.replace(COMPILE_PREFIX, ""): value for key, value in checkpoint["state_dict"].items()}
        set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True, strict=strict))

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = {id(parameter): name.replace(COMPILE_PREFIX, "") for name, parameter in self.model.named_parameters()}
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
            set_optimizer_state_dict(
                self.model, optimizer, optim_state_dict=keyed_by_name(state, optimizer, names),
                options=StateDictOptions(full_state_dict=True),
            )


def keyed_by_name(state: Mapping[str, Any], optimizer: torch.optim.Optimizer, names: Mapping[int, str]) -> dict[str, Any]:
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
        "param_groups": [{**group, "params": [name_of[number] for number in group["params"]]} for group in saved_groups],
    }
