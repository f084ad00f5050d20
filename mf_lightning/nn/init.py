"""Initialisation after materialisation: every module owns a ``reset_parameters`` that sets ALL of its state.

A model built on the meta device has no values; ``to_empty`` allocates them uninitialised. The model's
weights are then defined by one walk (the torchtitan pattern): every module holding parameters or
buffers of its own, in ``model.modules()`` order, runs its ``reset_parameters``. Constructors end by
calling the same method, in the same order, so an eager build from a random state equals a meta build
initialised from that state. A module with state but no ``reset_parameters``, or whose
``reset_parameters`` leaves a tensor unset (checked by filling floating-point state with NaN first),
is an error naming it, so a tensor filled only by its constructor (``torch.zeros``) can never reach
training as uninitialised memory.
"""

from __future__ import annotations

import torch
from torch import nn


def own_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters and buffers ``module`` holds itself (not its children's), by attribute name."""
    return {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}


def stateful_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every module of ``model`` with state of its own, in ``model.modules()`` order.

    Raises naming the modules that have state but no ``reset_parameters`` to set it.
    """
    stateful = [(name, module) for name, module in model.named_modules() if own_state(module)]
    missing = [
        f"{name or type(model).__name__} ({type(module).__name__})"
        for name, module in stateful
        if not callable(getattr(module, "reset_parameters", None))
    ]
    if missing:
        raise ValueError(
            f"modules with parameters or buffers but no reset_parameters to set them: {', '.join(missing)}"
        )
    return stateful


@torch.no_grad()
def reset_state(name: str, module: nn.Module) -> None:
    """Runs ``module.reset_parameters()`` and checks it set every floating-point tensor the module holds.

    The tensors are filled with NaN first, so one the method forgets stays NaN and is named (``name``
    is the module's name in the model, for the message).
    """
    state = own_state(module)
    for tensor in state.values():
        if tensor.is_floating_point():
            tensor.fill_(float("nan"))
    module.reset_parameters()
    unset = sorted(
        key for key, tensor in own_state(module).items() if tensor.is_floating_point() and tensor.isnan().any()
    )
    if unset:
        raise ValueError(f"{name or 'the model'} ({type(module).__name__}).reset_parameters leaves {unset} unset")


def initialise(model: nn.Module) -> None:
    """Sets every parameter and buffer of the materialised ``model`` from the global random state."""
    for name, module in stateful_modules(model):
        reset_state(name, module)
