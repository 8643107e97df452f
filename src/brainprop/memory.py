"""How much memory this process holds: on the host (resident set) and on its device.

``brainprop bench`` reports the peak per preset and rule; the training loop records both per
epoch in the run's history, so that a run shows whether anything grows from epoch to epoch.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch


def _proc_bytes(field: str, source: str = "/proc/self/status") -> int | None:
    """A ``kB`` field of a /proc file (VmRSS and VmHWM of /proc/self/status, MemAvailable and
    MemTotal of /proc/meminfo) in bytes; None off Linux."""
    try:
        for line in Path(source).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _process_peak() -> int:
    # getrusage(2) gives ru_maxrss in kB on Linux and the BSDs but in bytes on macOS.
    unit = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit


def host_rss() -> int:
    """This process's resident memory now, in bytes (its peak where /proc is missing)."""
    rss = _proc_bytes("VmRSS")
    return rss if rss is not None else _process_peak()


def host_total() -> int | None:
    """The host's memory in bytes (MemTotal); None where the host does not say (no /proc)."""
    return _proc_bytes("MemTotal", "/proc/meminfo")


def available(device: torch.device) -> int | None:
    """Bytes that ``device`` can still give this process: free GPU memory (CUDA), with what
    PyTorch's caching allocator holds unused (the GPU counts it as taken), or the host's
    MemAvailable (CPU); None where the host does not say (no /proc)."""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    return _proc_bytes("MemAvailable", "/proc/meminfo")


def held(device: torch.device) -> int:
    """Bytes this process holds now: allocated on ``device`` (CUDA), or resident (CPU)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return host_rss()


def reset_peak(device: torch.device) -> bool:
    """Restart the peak-memory count of ``device`` (CUDA) or of this process's resident set
    (CPU); False where only the whole process's peak is known."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        # Writing 5 resets the kernel's resident high-water mark (VmHWM) of this process.
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


#: How :func:`peak` words a peak it could not restart: the whole process's, data loading and
#: all, which says nothing of one step's memory.
SINCE_START = "peak RSS of the process since it started (getrusage)"


def peak(device: torch.device, was_reset: bool) -> tuple[int, str]:
    """(bytes, what they are) of the peak since :func:`reset_peak` (which returned
    ``was_reset``)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    hwm = _proc_bytes("VmHWM") if was_reset else None
    if hwm is not None:
        return hwm, "peak RSS of the process since the reset (VmHWM)"
    return _process_peak(), SINCE_START
