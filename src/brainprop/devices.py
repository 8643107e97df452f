"""Devices: which one a ``--device`` value means, whether it exists here, its name, and
whether bf16 runs fast on it.

Every command resolves ``--device`` through :func:`resolve_device`, so a device this machine
does not have is the same one-line error everywhere. The CPU's model and instruction set come
from ``/proc/cpuinfo`` (:func:`cpuinfo`).
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

from .errors import BrainPropError


def device_problem(device: str) -> str | None:
    """Why ``device`` ('auto', 'cpu', 'cuda', 'cuda:N') cannot be used here; None if it can."""
    if device == "auto":
        return None
    use = "use --device cpu, or cuda[:N] on a machine with a CUDA GPU, or auto"
    try:
        dev = torch.device(device)
    except RuntimeError:
        return f"{device!r} is no device name: {use}"
    cuda_ok = torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()
    if dev.type == "cpu" or (dev.type == "cuda" and cuda_ok):
        return None
    return f"device {device!r} is not available here: {use}"


def ran_out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` says the machine ran out of memory: CUDA's ``torch.OutOfMemoryError``,
    Python's ``MemoryError``, or the ``RuntimeError`` of torch's CPU allocator, which says so
    only in its message."""
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e)
    )


#: What of an out-of-memory message :func:`out_of_memory` shows, cut at a word.
MEMORY_DETAIL_CHARS = 160


def out_of_memory(e: BaseException) -> BrainPropError:
    """The one-line error for a device that ran out of memory (:func:`ran_out_of_memory`): too
    large a load, not a bug. It shows the first line of ``e``'s message, less the source line
    torch's CPU allocator puts first, so that the size asked for (a shape gone wrong asks for
    an absurd one) shows whole."""
    lines = str(e).strip().splitlines()
    # torch 2.13 writes "[enforce fail at alloc_cpu.cpp:127] err == 0. ", earlier ones "... . "
    said = re.sub(r"^\[enforce fail at [^\]]*\]\s*(err == 0)?\.?\s*", "", lines[0]) if lines else ""
    if len(said) > MEMORY_DETAIL_CHARS:
        said = said[:MEMORY_DETAIL_CHARS].rsplit(" ", 1)[0] + " ..."
    return BrainPropError(
        f"the device ran out of memory ({said or 'no details'}): lower the batch size, the "
        "seeds stacked (--stack) or the runs at once (--jobs), or free the device of other work"
    )


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity, by which SLURM, ``taskset`` and a
    container's cpuset give it fewer than the machine's, which ``os.cpu_count`` counts."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # no affinity on macOS and Windows
        return os.cpu_count() or 1


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
    """bf16 autocast on ``device`` (CUDA or CPU) when ``bf16``; a no-op context otherwise.

    Without autocast's weight cache, which saves nothing here (every weight is used once per
    forward pass) and which PyTorch advises against in CUDA-graph capture
    (``make_graphed_callables`` refuses it).
    """
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False)


def bf16_warning(device: torch.device, cpuinfo_text: str | None = None) -> str | None:
    """Why ``--bf16`` will likely be slow on ``device``; None where bf16 has hardware support.

    A CPU without bf16 instructions, or a GPU before Ampere (compute capability 8), still runs
    bf16 correctly, by converting or emulating it, but slower than fp32: worth a warning, not
    a refusal.
    """
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8:
            return None
        return (
            f"this GPU (compute capability {major}.{minor}) has no bf16 tensor cores, so --bf16 "
            "is emulated and will likely be slower than fp32: drop --bf16"
        )
    if device.type != "cpu":
        return None
    fields = cpuinfo(cpuinfo_text)
    if not ({"flags", "Features"} & fields.keys()) or native_bf16(fields):
        return None  # no instruction list to judge by: say nothing rather than guess
    return (
        "this CPU has no bf16 instructions (/proc/cpuinfo lists no avx512_bf16, amx_bf16 or "
        "Arm bf16), so --bf16 converts every matmul and will likely be slower than fp32: drop "
        "--bf16"
    )


def warn_if_slow_bf16(device: torch.device, bf16: bool) -> None:
    """Print :func:`bf16_warning` to stderr when ``bf16`` is asked for where it is slow."""
    note = bf16_warning(device) if bf16 else None
    if note:
        print(f"brainprop: {note}", file=sys.stderr)


def native_bf16(fields: dict[str, str]) -> bool:
    """Whether a CPU with these :func:`cpuinfo` fields multiplies bf16 in hardware: x86's
    ``flags`` name AVX512_BF16 or AMX, Arm's ``Features`` name ``bf16`` (Neoverse V1 on)."""
    x86 = {"avx512_bf16", "amx_bf16"} & set(fields.get("flags", "").split())
    return bool(x86) or "bf16" in fields.get("Features", "").split()


def cpuinfo(text: str | None = None) -> dict[str, str]:
    """The first processor's fields in ``/proc/cpuinfo`` (or in ``text``); {} off Linux."""
    if text is None:
        try:
            with open("/proc/cpuinfo") as f:
                text = f.read()
        except OSError:
            return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def physical_cores(text: str | None = None) -> int | None:
    """Distinct physical cores (``physical id``, ``core id``) of the logical CPUs in
    ``/proc/cpuinfo`` that this process may run on, or of every CPU listed in ``text``.

    Two threads on the two hyperthreads of one core share its vector units, so a peak counts
    cores, not threads. None where cpuinfo does not say (many Arm and some VM kernels).
    """
    allowed: set[int] | None = None
    if text is None:
        try:
            with open("/proc/cpuinfo") as f:
                text = f.read()
            allowed = os.sched_getaffinity(0)
        except (OSError, AttributeError):
            return None
    cores = set()
    for block in text.split("\n\n"):
        fields = cpuinfo(block)
        if "processor" not in fields:
            continue
        if "core id" not in fields:
            return None
        if allowed is None or int(fields["processor"]) in allowed:
            cores.add((fields.get("physical id", "0"), fields["core id"]))
    return len(cores) or None


def vector_units(fields: dict[str, str]) -> str | None:
    """An x86 CPU's widest vector instructions, from these :func:`cpuinfo` fields: ``AMX``,
    ``AVX-512 BF16``, ``AVX-512`` or ``AVX2``; None where ``flags`` name none of them."""
    flags = set(fields.get("flags", "").split())
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512f" in flags:
        return "AVX-512 BF16" if "avx512_bf16" in flags else "AVX-512"
    return "AVX2" if "avx2" in flags else None


def device_name(device: torch.device, cpuinfo_text: str | None = None) -> str:
    """The machine a number was measured on: the GPU's name, or the CPU model, its vector
    instructions and the threads, e.g. ``cpu (AMD EPYC, x86_64, AVX2, 2 threads)``.

    Cloud machines give one model name to CPUs of different generations (an "AMD EPYC" with
    AVX-512 ran mnist/dense 2.4 times as fast as one without), and a report pools the numbers
    of one name, so the instructions are part of it.
    """
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    fields = cpuinfo(cpuinfo_text)
    model, units = fields.get("model name"), vector_units(fields)
    arch = platform.machine()
    kind = f"{model}, {arch}" if model else (platform.processor() or arch)
    kind += f", {units}" if units else ""
    return f"cpu ({kind}, {threads} thread{'s' if threads != 1 else ''})"


def software(device: torch.device) -> dict[str, str]:
    """The versions a number was measured with: brainprop's, with the digest of its source
    (:func:`source_digest`) and, from a git checkout, its commit (:func:`source_commit`);
    torch's and Python's; and the CUDA toolkit torch was built with where ``device`` is a
    GPU."""
    from . import __version__  # here: the package imports this module as it starts

    versions = {"brainprop": __version__}
    if (digest := source_digest()) is not None:
        versions["brainprop_source"] = digest
    if (commit := source_commit()) is not None:
        versions["brainprop_commit"] = commit
    versions |= {"torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda" and torch.version.cuda:
        versions["cuda"] = torch.version.cuda
    return versions


_PACKAGE = Path(__file__).resolve().parent


@functools.cache
def source_digest() -> str | None:
    """The first 16 hex digits of a sha256 of the package's Python files, their paths
    relative to it included: the version number changes with releases, the code between them,
    so that measurements of different code are told apart however it was installed. None
    where there are no such files to read (a zipped package, one of .pyc files alone) or one
    cannot be read (deleted as it was listed).

    Modules only: an editor's lock file (Emacs's ``.#train.py``, a link to nowhere) is none."""
    paths = sorted(p for p in _PACKAGE.rglob("*.py") if p.stem.isidentifier() and p.is_file())
    if not paths:
        return None
    digest = hashlib.sha256()
    try:
        for path in paths:
            digest.update(path.relative_to(_PACKAGE).as_posix().encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    except OSError:
        return None
    return digest.hexdigest()[:16]


@functools.cache
def source_commit() -> str | None:
    """The git commit of the checkout the package's files are tracked in, ``+dirty`` where
    they differ from it (a file edited or added); None where they are not tracked (an installed
    copy, even one in a virtual environment inside a checkout) or git cannot tell."""

    # Without the caller's GIT_DIR and the like (a hook's), which would name another checkout.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}

    def git(*args: str) -> str:
        return subprocess.run(
            # No optional locks: a status would take the index's lock from the user's own git.
            ["git", "--no-optional-locks", *args],
            cwd=_PACKAGE, env=env, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip

    try:
        git("ls-files", "--error-unmatch", "__init__.py")
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return None  # no git, or not a checkout
    return commit + "+dirty" * bool(dirty)


def names_a_cpu(machine: object) -> bool:
    """Whether ``machine``, as :func:`device_name` gave it, is a CPU (a GPU goes by its own
    name)."""
    return isinstance(machine, str) and machine.startswith("cpu (")
