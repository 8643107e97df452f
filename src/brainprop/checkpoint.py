"""Checkpoints: written atomically, read without unpickling anything but tensors and primitives.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so
``torch.load(path, weights_only=True)`` reads it and a file carrying a pickled object is
refused. Writes go to a temporary file in the same folder, are fsynced, then renamed over the
target: a crash at any instant leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import re
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .errors import BrainPropError

FORMAT = "brainprop-checkpoint-1"


def make_folder(
    folder: Path, fix: str = "pass as --out a folder you can write to, not a file"
) -> None:
    """Create ``folder`` and its parents and check that it takes files, or say in one line why
    it cannot and ``fix``: callers make it before long work, which should not end unwritten."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BrainPropError(
            f"cannot create the folder {folder} ({e.strerror or e}): {fix}"
        ) from None
    try:
        probe_write(folder)
    except OSError as e:
        raise BrainPropError(f"cannot write into {folder} ({e.strerror or e}): {fix}") from None


def probe_write(folder: Path) -> None:
    """Make a file in ``folder`` and leave no trace of it; OSError where it cannot be made."""
    # An unnamed file (O_TMPFILE on Linux) that vanishes on close: a write, and no trace.
    with tempfile.TemporaryFile(dir=folder):
        pass


#: What the names of :func:`atomic_write`'s temporary files match.
TEMPORARIES = ".*.tmp"


def atomic_write(path: str | Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write ``path`` through ``write(file)`` so that readers see the old or the new file only."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            usual_permissions(fd)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _write_error(path, e) from None
        raise
    _fsync_dir(path.parent)


def usual_permissions(fd: int) -> None:
    """Give a file that ``mkstemp`` made owner-only the permissions of any new file under the
    umask: a run's results or a shared data root stay readable to whom they usually are."""
    os.fchmod(fd, 0o666 & ~_umask())


def _umask() -> int:
    # Linux says it in /proc; elsewhere reading the umask means setting it, for a moment in
    # which another thread's new files would get none.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def atomic_write_figure(path: str | Path, fig: Any, dpi: int) -> None:
    """Write a matplotlib figure as a PNG, atomically like every other file of a run."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def copy(source: str | Path, target: str | Path) -> None:
    """Copy the file ``source`` to ``target`` atomically."""
    data = Path(source).read_bytes()
    atomic_write(target, lambda f: f.write(data))


def remove_temporaries(folder: str | Path) -> None:
    """Delete the temporary files that writers killed mid-write (SIGKILL, power loss) left in
    ``folder``; each may be as large as a checkpoint."""
    for tmp in Path(folder).glob(TEMPORARIES):
        tmp.unlink(missing_ok=True)


def _write_error(path: Path, e: OSError) -> BrainPropError:
    # A full disk (ENOSPC, or EDQUOT past a quota) is the common case on long runs.
    kept = f"{path.name} keeps its previous content" if path.exists() else "nothing was written"
    # A run directory (every one holds its config.json, rundir.CONFIG) continues where it stopped;
    # a bench, report or download is simply run again.
    if (path.parent / "config.json").is_file():
        then = (
            f"continue the run with 'brainprop train --resume {path.parent}' (adding the "
            "--epochs you gave), or with the same 'brainprop reproduce' command"
        )
    else:
        then = "run the command again"
    return BrainPropError(
        f"cannot write {path} ({e.strerror or e}); {kept}: free disk space or fix the folder's "
        f"permissions, then {then}"
    )


def _fsync_dir(folder: Path) -> None:
    # The rename itself is durable only once the directory entry is on disk.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save(path: str | Path, state: dict[str, Any]) -> None:
    """Atomically save ``state`` (tensors and primitives only) as a checkpoint."""
    # Serialised in memory first: torch.save reports a failed write to a file as an opaque
    # RuntimeError, while a plain write raises the OSError (ENOSPC ...) that names the cause.
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **_compact(state)}, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def _compact(value: Any) -> Any:
    """``value`` with every tensor that is a view into a larger storage copied out of it.

    ``torch.save`` writes a view's whole storage: the weights of a seed trained in a
    :mod:`~brainprop.stacked` network would carry every other seed's into its checkpoint.
    """
    if isinstance(value, torch.Tensor):
        own = value.numel() * value.element_size()
        return value.clone() if value.untyped_storage().nbytes() > own else value
    if isinstance(value, dict):
        return {k: _compact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_compact(v) for v in value)
    return value


#: Read errors of the device, not the file: a sound checkpoint must not be called damaged.
_DEVICE_FAILURES = {errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.ENOLINK}


def _damaged(path: Path, e: BaseException) -> BrainPropError:
    return BrainPropError(
        f"{path} is not a readable checkpoint ({type(e).__name__}): it may be truncated or not "
        "a checkpoint at all; use another checkpoint or retrain"
    )


def _no_memory(path: Path) -> BrainPropError:
    return BrainPropError(
        f"not enough memory to load {path}: free some (other jobs on this machine), then try again"
    )


def load(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save`, its tensors on the CPU; anything else is a
    one-line error."""
    path = Path(path)
    if not path.is_file():
        raise BrainPropError(
            f"no checkpoint at {path}: pass a run directory or a .pt file it holds"
        )
    if path.stat().st_size == 0:
        raise BrainPropError(
            f"{path} is empty (0 bytes), not a checkpoint: use another checkpoint or retrain"
        )
    try:
        with warnings.catch_warnings():
            # Damaged bytes can look like an exotic pickle protocol; the error below says more.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as e:
        # The checkpoint may be sound, so do not tell the user to throw it away. Not every
        # OSError: torch raises some (EINVAL) for a zip archive that was cut short.
        raise BrainPropError(
            f"cannot read {path} ({e.strerror or e}): fix its permissions or copy it somewhere "
            "readable"
        ) from None
    except OSError as e:
        if e.errno not in _DEVICE_FAILURES:
            raise _damaged(path, e) from None
        raise BrainPropError(
            f"cannot read {path} ({e.strerror or e}): the disk or network filesystem failed, "
            "not necessarily the file; check it and try again"
        ) from None
    except MemoryError:
        raise _no_memory(path) from None
    except Exception as e:
        # torch's own allocator says so in a RuntimeError.
        if "can't allocate memory" in str(e) or isinstance(e, torch.OutOfMemoryError):
            raise _no_memory(path) from None
        # torch names a refused object as "GLOBAL module.name" somewhere in a long message.
        refused = re.search(r"GLOBAL (\S+)", str(e))
        if isinstance(e, pickle.UnpicklingError) and refused:
            raise BrainPropError(
                f"{path} is not a safe brainprop checkpoint (it holds pickled objects: "
                f"{refused.group(1)}), so it was not loaded; only load checkpoints written by "
                "brainprop"
            ) from None
        # The weights_only unpickler runs no code, so what it raises past a failed read or
        # allocation (RuntimeError, EOFError, struct.error, KeyError ...) means damaged bytes.
        raise _damaged(path, e) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise BrainPropError(
            f"{path} is not a brainprop checkpoint (no {FORMAT!r} marker): pass a file written "
            "by 'brainprop train'"
        )
    return state
