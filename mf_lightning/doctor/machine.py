"""What this machine is: versions of the packages that compute, the device, the CPU and its vector ISA.

torch is imported by the functions that need it, not with the module: ``benchmarks/harness.py`` takes
:func:`cpu_model` from here for scripts that measure memory without torch.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PACKAGES = ("torch", "triton", "lightning", "mf_lightning")


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def device_name(device: torch.device | str = "cpu") -> str:
    """The GPU's name, or the CPU's model with its logical CPUs and torch's thread count."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads)"


def device_slug(device: torch.device | str = "cpu") -> str:
    """What result files are named after: ``cpu`` or the GPU's name in lowercase words joined by ``_``."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name(device).lower()).strip("_")


def version(package: str) -> str:
    """The installed version of ``package``, or ``not installed``."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def memory_bytes() -> int | None:
    """The machine's RAM (``MemTotal``), ``None`` where ``/proc/meminfo`` is absent."""
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        return None
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return None


def environment_rows(device: torch.device) -> list[tuple[str, str]]:
    """(item, value) rows: python and package versions, the device, its memory and compute capability, the
    CPU and its vector instructions (what torch's kernels and the fused CPU operator are built for)."""
    import torch

    rows = [("python", platform.python_version()), *((package, version(package)) for package in PACKAGES)]
    rows.append(("torch CUDA build", torch.version.cuda or "none (CPU build)"))
    rows.append(("CPU", f"{cpu_model()} ({os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads)"))
    rows.append(("CPU capability", torch.backends.cpu.get_cpu_capability()))
    ram = memory_bytes()
    rows.append(("RAM", "unknown" if ram is None else f"{ram / 2**30:.1f} GiB"))
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        rows.append(("device", f"{device} {properties.name}"))
        rows.append(("device memory", f"{properties.total_memory / 2**30:.1f} GiB"))
        rows.append(("compute capability", f"{properties.major}.{properties.minor}"))
    else:
        rows.append(("device", "cpu"))
    rows.append(("load average (1/5/15 min)", " / ".join(f"{value:.1f}" for value in os.getloadavg())))
    return rows
