"""Checkpoints: written atomically, read without unpickling anything but tensors and primitives.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so
``torch.load(path, weights_only=True)`` reads it and a file carrying a pickled object is
refused. It is written as every file is (:func:`brainprop.files.atomic_write`): a crash at any
instant leaves either the old checkpoint or the new one, never half of one. What does not fit
once it is read is said in the checkpoint's terms (:func:`misfit`, :func:`entry`).
"""

from __future__ import annotations

import errno
import io
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .devices import ran_out_of_memory
from .errors import BrainPropError, reason
from .files import atomic_write

FORMAT = "brainprop-checkpoint-1"


def save(path: str | Path, state: dict[str, Any]) -> None:
    """Atomically save ``state`` (tensors and primitives only) as a checkpoint."""
    # Serialised in memory first: torch.save reports a failed write to a file as an opaque
    # RuntimeError, while a plain write raises the OSError (ENOSPC ...) that names the cause.
    buffer = io.BytesIO()
    with _checksums():
        torch.save({"format": FORMAT, **_compact(state)}, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


@contextmanager
def _checksums() -> Iterator[None]:
    """torch.save with a CRC-32 for every entry, as :func:`load` checks them, whatever the
    caller set (``torch.serialization.set_crc32_options``; torch before 2.6 always writes
    them)."""
    options = torch.serialization
    if not hasattr(options, "get_crc32_options") or options.get_crc32_options():
        yield
        return
    options.set_crc32_options(True)
    try:
        yield
    finally:
        options.set_crc32_options(False)


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
    if (failing := _failing_entry(path)) is not None:
        raise BrainPropError(
            f"{path} is damaged: its entry {failing} fails its checksum (a byte changed since it "
            "was written); use another checkpoint or retrain"
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
    except Exception as e:
        if ran_out_of_memory(e):
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


def _failing_entry(path: Path) -> str | None:
    """The first entry of the checkpoint's zip archive whose bytes fail their CRC-32, or None.

    torch's reader does not check them: a changed byte in a weight loaded without a word, and
    a resume trained it on. An entry written without one (a CRC of 0) is not checked. A file
    that is no readable zip is left to torch.load, which refuses it in its own terms."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0:
                    continue
                try:
                    with archive.open(info) as f:
                        while f.read(1 << 20):
                            pass
                except zipfile.BadZipFile:
                    return info.filename
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError):
        return None
    return None


def load_weights(model: torch.nn.Module, stored: Any) -> None:
    """``model.load_state_dict(stored)``, but a ValueError naming a tensor of another dtype than
    the model's own, which ``load_state_dict`` converts without a word (int8 weights came back
    as zeros, and a resume trained on from them)."""
    own = model.state_dict()
    for key, tensor in stored.items() if isinstance(stored, dict) else ():
        mine = own.get(key)
        if isinstance(tensor, torch.Tensor) and mine is not None and tensor.dtype != mine.dtype:
            raise ValueError(f"{key} is {tensor.dtype}, not {mine.dtype}")
    model.load_state_dict(stored)


#: What reading a damaged entry of a loaded checkpoint raises, in torch or in Python.
MISFITS = (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError, OverflowError)
#: How much of :func:`misfit` a one-line message shows.
MISFIT_CHARS = 240
#: torch's finding of keys missing or unexpected, with the list of keys.
_KEY_LIST = re.compile(r"((?:Missing|Unexpected) key\(s\) in state_dict): (.*)")
_KEYS_SHOWN = 3


def misfit(exc: BaseException) -> str:
    """What ``exc``, one of :data:`MISFITS` raised as a checkpoint's entries were read, says
    is wrong, on one line of at most :data:`MISFIT_CHARS`: the entry a KeyError names, or
    torch's findings under its headline "Error(s) in loading state_dict", which alone says
    nothing, each list of keys cut to its first few so that every finding shows (keys
    renamed show as both missing and unexpected)."""
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        text = f"no entry {exc.args[0]!r}"
    else:
        lines = [line.strip() for line in str(exc).splitlines()]
        if lines and lines[0].startswith("Error(s) in loading state_dict"):
            text = "; ".join(_finding(line) for line in lines[1:] if line) or lines[0]
        else:
            text = reason(exc)
    return text if len(text) <= MISFIT_CHARS else text[: MISFIT_CHARS - 1] + "…"


def _finding(line: str) -> str:
    line = line.rstrip(". ")
    if found := _KEY_LIST.fullmatch(line):
        keys = found[2].split(", ")
        more = f" and {len(keys) - _KEYS_SHOWN} more" if len(keys) > _KEYS_SHOWN else ""
        return f"{found[1]}: {', '.join(keys[:_KEYS_SHOWN])}{more}"
    return line


@contextmanager
def entry(name: str) -> Iterator[None]:
    """Name the entry ``name`` (``"its optimizer state"``) in a ValueError for what goes wrong
    as it is read: torch and Python word a damaged one by their own objects ("'gauss'", "'str'
    object has no attribute 'items'"), not by the checkpoint's. Running out of memory
    (:func:`~brainprop.devices.ran_out_of_memory`) passes unchanged: it is the machine's lack,
    not the entry's fault."""
    try:
        yield
    except MISFITS as e:
        if ran_out_of_memory(e):
            raise
        raise ValueError(f"{name}: {misfit(e)}") from e
