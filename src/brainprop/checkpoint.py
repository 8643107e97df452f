"""Checkpoints: written atomically, read without unpickling anything but tensors and primitives.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so
``torch.load(path, weights_only=True)`` reads it and a file carrying a pickled object is
refused. Writes go to a temporary file in the same folder, are fsynced, then renamed over the
target: a crash at any instant leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .errors import BrainPropError

FORMAT = "brainprop-checkpoint-1"


def atomic_write(path: str | Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write ``path`` through ``write(file)`` so that readers see the old or the new file only."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


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
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save`; anything else is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise BrainPropError(f"no checkpoint at {path}: pass a run directory or a .pt file it holds")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported content"
        raise BrainPropError(
            f"{path} is not a safe brainprop checkpoint (it holds pickled objects: {first}); "
            "only load checkpoints written by brainprop"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise BrainPropError(
            f"{path} is not a readable checkpoint ({type(e).__name__}): it may be truncated or "
            "not a checkpoint at all; use another checkpoint or retrain"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise BrainPropError(
            f"{path} is not a brainprop checkpoint (no {FORMAT!r} marker): pass a file written "
            "by 'brainprop train'"
        )
    return state
