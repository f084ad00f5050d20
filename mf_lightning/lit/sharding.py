"""Sharded training: PyTorch FSDP2 (``fully_shard``) driven by Lightning's ``ModelParallelStrategy``.

``LanguageModel`` builds its network on the meta device (no memory, no initialisation) while recording
every in-place initialisation call the constructors make (``nn.init.normal_``, ``fill_`` ...), and
materialises it in ``configure_model``:

- single device and DDP: ``materialize`` allocates the whole network on the CPU and replays the calls
  from the random state captured at construction, which gives exactly the weights an eager build would;
- ``FSDP2Strategy``: ``shard_network`` first wraps every block (its Memory Layer tables included) and then
  the whole network (embedding, final norm, head) in ``fully_shard`` while still on the meta device; the
  replay then allocates each parameter in full on the CPU, one at a time, keeps this rank's shard and
  frees the rest. So a rank never holds more than its shards plus one full parameter, and every world
  size starts from the same weights as one process.

Inside ``forward`` FSDP2 has all-gathered a unit's parameters into plain tensors, so the Memory Layer
kernels (Triton, embedding_bag, torch) see ordinary tensors; outside it, parameters and gradients are
``DTensor`` shards along their first dimension (the tables' ``num_tables`` axis). Checkpoints are folders
of per-rank shards (``FSDP2Strategy``, ``mf_lightning.lit.distributed_checkpoint``); prediction runs on
a gathered plain copy (``unsharded_copy``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.overrides import TorchFunctionMode

from mf_lightning.lit.checkpoints import partial_path, read_checkpoint, remove_stale_partials
from mf_lightning.lit.distributed_checkpoint import (
    SHARDED_FOLDER_KEY,
    install,
    is_sharded_checkpoint,
    load_sharded_model,
    load_sharded_optimizer,
    read_sharded_placeholder,
    remove,
    save_sharded,
)
from mf_lightning.models.pretrained import COMPILE_PREFIX

BF16_PRECISIONS = ("bf16-mixed", "bf16-true", "bf16")


@dataclass(frozen=True)
class InitCall:
    """One in-place initialisation call on parameter ``name``: ``func(*args, **kwargs)`` with the
    parameter's place in ``args``/``kwargs`` held by ``TARGET``."""

    name: str
    func: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def apply(self, tensor: torch.Tensor) -> None:
        """Runs the call on ``tensor`` instead of the recorded parameter."""
        args = tuple(tensor if arg is TARGET else arg for arg in self.args)
        kwargs = {key: tensor if value is TARGET else value for key, value in self.kwargs.items()}
        self.func(*args, **kwargs)


TARGET = object()
"""Stands for the initialised parameter in a recorded ``InitCall``."""


class InitRecorder(TorchFunctionMode):
    """Records the in-place calls (``normal_``, ``kaiming_uniform_``, ``fill_`` ...) made on parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[nn.Parameter, Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        target = args[0] if args else kwargs.get("tensor")
        if name.endswith("_") and not name.startswith("_") and isinstance(target, nn.Parameter):
            self.calls.append((target, func, args, kwargs))
        return func(*args, **kwargs)


def build_on_meta(build: Callable[[], nn.Module]) -> tuple[nn.Module, list[InitCall]]:
    """``build()`` on the meta device, and the initialisation calls its constructors made, in order.

    Raises naming a parameter no call initialised, as its value would otherwise be left undefined.
    """
    recorder = InitRecorder()
    with torch.device("meta"), recorder:
        module = build()
    names = {id(parameter): name for name, parameter in module.named_parameters()}
    calls = []
    for parameter, func, args, kwargs in recorder.calls:
        if id(parameter) not in names:
            raise ValueError(f"{type(module).__name__} initialises a tensor that is not one of its parameters")
        calls.append(
            InitCall(
                names[id(parameter)],
                func,
                tuple(TARGET if arg is parameter else arg for arg in args),
                {key: TARGET if value is parameter else value for key, value in kwargs.items()},
            )
        )
    uninitialised = sorted(set(names.values()) - {call.name for call in calls})
    if uninitialised:
        raise ValueError(f"{type(module).__name__} leaves parameters {uninitialised} uninitialised")
    return module, calls


@torch.no_grad()
def materialize(module: nn.Module, calls: list[InitCall], rng_state: torch.Tensor, device: torch.device) -> None:
    """Allocates the meta parameters of ``module`` on ``device`` and initialises them by replaying ``calls``.

    The replay runs on the CPU from ``rng_state`` (the global random state when the module was built) and
    leaves the global random state untouched. A plain parameter is initialised in place (``device`` must
    then be the CPU, where the eager build would have run); a ``DTensor`` shard receives its part of a
    full-size CPU tensor that lives only until the parameter's last call.
    """
    module.to_empty(device=device)
    parameters = dict(module.named_parameters())
    last_call = {call.name: index for index, call in enumerate(calls)}
    full: dict[str, torch.Tensor] = {}
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(rng_state)
        for index, call in enumerate(calls):
            parameter = parameters[call.name]
            if not isinstance(parameter, DTensor):
                call.apply(parameter)
                continue
            tensor = full.setdefault(call.name, torch.empty(parameter.shape, dtype=parameter.dtype))
            call.apply(tensor)
            if last_call[call.name] == index:
                shard = distribute_tensor(
                    full.pop(call.name).to(parameter.device), parameter.device_mesh, parameter.placements,
                    src_data_rank=None,
                )
                parameter.copy_(shard)


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
        timeout: timeout of the collectives.
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

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    @property
    def lightning_restore_optimizer(self) -> bool:
        """Lightning hands the optimizer states to ``load_optimizer_state_dict`` after the checks."""
        return True

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The full weights on rank 0 (single-file checkpoints), else this rank's shards, left where they
        are (on the GPU): the checkpoint writer copies them to the host one tensor at a time."""
        if not self._save_distributed_checkpoint:
            return super().lightning_module_state_dict()
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.model)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Like ``lightning_module_state_dict``: keyed by parameter name, this rank's shards, not copied."""
        if not self._save_distributed_checkpoint:
            return super().optimizer_state(optimizer)
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, getattr(optimizer, "_optimizer", optimizer))

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        """A sharded folder written by all ranks into a hidden stage, then moved to ``filepath`` by rank 0."""
        if not self._save_distributed_checkpoint:
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        if storage_options is not None or "://" in str(filepath):
            raise ValueError(
                f"sharded checkpoints are written to local or mounted folders, not {filepath!r}; "
                "use a local checkpoint.dirpath or FSDP2Strategy(save_distributed_checkpoint=False)"
            )
        target = Path(self.broadcast(str(filepath)))
        stage = None
        if self.is_global_zero:
            target.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_partials(target)
            stage = partial_path(target)
        stage = Path(self.broadcast(str(stage)))
        try:
            save_sharded(checkpoint, stage, self.is_global_zero, self.barrier)
            if self.is_global_zero:
                install(stage, target)
        except BaseException:
            if self.is_global_zero and os.path.lexists(stage):
                remove(stage)
            raise
        self.barrier()

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
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
                self.model, optimizer, optim_state_dict=keyed_by_name(state, optimizer, names),
                options=StateDictOptions(full_state_dict=True),
            )


class FSDPStrategy(FSDP2Strategy):
    """The former name of ``FSDP2Strategy``, which read like Lightning's FSDP1 ``FSDPStrategy``: refused
    with the new class path before anything runs. (Raised from ``setup_environment``, not the constructor,
    because the config parser would bury a constructor's error in its own multi-line report.)"""

    def setup_environment(self) -> None:
        raise ValueError(
            "trainer.strategy mf_lightning.lit.sharding.FSDPStrategy was renamed: use "
            "class_path: mf_lightning.lit.sharding.FSDP2Strategy (FSDP2, sharded checkpoint folders by default)"
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
