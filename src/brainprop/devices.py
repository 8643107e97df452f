"""Devices: which one a ``--device`` value means, whether it exists here, and its name.

Every command resolves ``--device`` through :func:`resolve_device`, so a device this machine
does not have is the same one-line error everywhere.
"""

from __future__ import annotations

import platform

import torch

from .errors import BrainPropError


def device_problem(device: str) -> str | None:
    """Why ``device`` ('auto', 'cpu', 'cuda', 'cuda:N') cannot be used here; None if it can."""
    if device == "auto":
        return None
    try:
        dev = torch.device(device)
        cuda_ok = torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()
        ok = dev.type == "cpu" or (dev.type == "cuda" and cuda_ok)
    except RuntimeError:
        ok = False
    if ok:
        return None
    return (
        f"device {device!r} is not available here: use --device cpu, or cuda[:N] on a machine "
        "with a CUDA GPU, or auto"
    )


def resolve_device(device: str) -> torch.device:
    """The device ``device`` means here ('auto': the GPU if there is one).

    Raises:
        BrainPropError: the device does not exist on this machine.
    """
    problem = device_problem(device)
    if problem is not None:
        raise BrainPropError(problem)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA when ``bf16``; a no-op context otherwise (CPU runs stay fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")


def device_name(device: torch.device) -> str:
    """The machine a number was measured on: the GPU's name, or the CPU model and threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    model = _cpu_model()
    arch = platform.machine()
    kind = f"{model}, {arch}" if model else (platform.processor() or arch)
    return f"cpu ({kind}, {threads} thread{'s' if threads != 1 else ''})"


def _cpu_model() -> str | None:
    """Linux's name for the CPU (``platform`` has none there); None elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return None
