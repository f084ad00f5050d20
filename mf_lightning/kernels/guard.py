"""The first-call check of the triton kernels on a GPU: a kernel that disagrees is not trained on silently.

The kernels were tested under triton's CPU interpreter and compiled ahead of time, but a GPU, driver or
triton release we never ran can still miscompute. So the first triton Memory Layer call of a process on
each device first runs the kernels on a small random input against the ``embedding_bag`` backend, forward
and backward (:func:`~mf_lightning.kernels.agreement.compare`). On disagreement, ``kernel_check: warn``
(the default, ``ModelConfig.kernel_check``) warns once, naming the worst error, and the process runs
``embedding_bag`` instead; ``fatal`` raises :class:`KernelDisagreement`; ``off`` skips the check.
"""

from __future__ import annotations

import warnings

import torch

from mf_lightning.kernels.agreement import Agreement, MemoryLayerFunction, compare
from mf_lightning.kernels.embedding_bag import embedding_bag_memory_layer

GUARDED_DEVICE_TYPES = ("cuda",)
"""Device types whose first triton call is checked (tests add ``cpu``, where triton runs interpreted)."""
CHECK_TOKENS, CHECK_TABLES, CHECK_CODE_BITS, CHECK_OUT = 67, 5, 6, 40
"""The check's layer: odd sizes, so partial tiles and masked lanes are exercised too."""
RESULTS: dict[str, Agreement] = {}
"""The check's result per device (``cuda:0``), for the process."""
WARNED: set[str] = set()


class KernelDisagreement(RuntimeError):
    """The triton kernels disagree with ``embedding_bag`` on this device (``kernel_check: fatal``)."""


def check_triton(device: torch.device, triton_function: MemoryLayerFunction) -> Agreement:
    """The triton kernels against ``embedding_bag`` on a small random float32 input on ``device``."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(CHECK_TOKENS, CHECK_TABLES * CHECK_CODE_BITS, generator=generator)
    tables = 0.1 * torch.randn(CHECK_TABLES, 2**CHECK_CODE_BITS, CHECK_OUT, generator=generator)
    bias = 0.1 * torch.randn(CHECK_OUT, generator=generator)
    inputs = (x.to(device), tables.to(device), bias.to(device))
    return compare(triton_function, embedding_bag_memory_layer, inputs, (CHECK_CODE_BITS, "scaled", 1.0))


def triton_agrees(device: torch.device, kernel_check: str, triton_function: MemoryLayerFunction) -> bool:
    """Whether layers on ``device`` may run the triton kernels: checked once per device and process.

    ``kernel_check`` is ``warn`` (disagreement: one warning, then False), ``fatal`` (disagreement raises
    :class:`KernelDisagreement`) or ``off`` (no check, True).
    """
    if kernel_check == "off" or device.type not in GUARDED_DEVICE_TYPES:
        return True
    key = str(device)
    if key not in RESULTS:
        RESULTS[key] = check_triton(device, triton_function)
    result = RESULTS[key]
    if result.agrees:
        return True
    message = f"the triton Memory Layer kernels disagree with embedding_bag on {key}: {result.describe()}"
    if kernel_check == "fatal":
        raise KernelDisagreement(f"{message} (model.kernel_check: fatal)")
    if key not in WARNED:
        WARNED.add(key)
        warnings.warn(
            f"{message}; this process runs the embedding_bag backend instead (model.kernel_check: fatal stops, "
            "off skips the check); please report it with the output of `mf doctor`",
            RuntimeWarning,
            stacklevel=2,
        )
    return False
