"""CIFAR-10 and CIFAR-100 from the official python pickles, read without executing code.

The pickles are protocol 2 dicts with bytes keys. ``data`` is uint8 ``[N, 3072]`` where each
row is the 32x32 red plane, then green, then blue, so a plain reshape gives ``[N, 3, 32, 32]``.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brainprop.errors import BrainPropError

from .dataset import Dataset
from .messages import reason, redownload

#: The only globals the official files (and protocol-2 re-pickles of them) reference.
#: ``_codecs.encode`` is how Python 3 spells a bytes object at protocol 2; it only encodes text.
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
)

ROW_BYTES = 3 * 32 * 32


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR variant lives under the data root and which labels it uses."""

    folder: str  # under the data root
    subdir: str  # the archive's top folder
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    num_classes: int
    download_name: str


LAYOUTS: dict[str, CifarLayout] = {
    "cifar10": CifarLayout(
        "cifar10",
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        b"labels",
        10,
        "cifar10",
    ),
    "cifar100": CifarLayout(
        "cifar100", "cifar-100-python", ("train",), ("test",), b"fine_labels", 100, "cifar100"
    ),
    "cifar100-coarse": CifarLayout(
        "cifar100", "cifar-100-python", ("train",), ("test",), b"coarse_labels", 20, "cifar100"
    ),
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`ALLOWED_GLOBALS`, so no pickled code can run."""

    source = "pickle"

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise BrainPropError(
                f"{self.source} references {module}.{name}, which a CIFAR file never does: "
                "refusing to load it; replace it with the official file"
            )
        return super().find_class(module, name)


def unpickle_restricted(data: bytes, *, source: str, fix: str) -> Any:
    """Unpickle ``data`` (bytes keys kept as bytes) allowing only numpy array globals."""
    if len(data) == 0:
        raise BrainPropError(f"{source} is empty (0 bytes): {fix}")
    unpickler = RestrictedUnpickler(io.BytesIO(data), encoding="bytes")
    unpickler.source = source
    try:
        return unpickler.load()
    except BrainPropError:
        raise
    except Exception as exc:
        # With globals restricted to numpy arrays, anything raised here (UnpicklingError,
        # EOFError, ValueError from a bad array state, ...) just means the bytes are corrupt.
        raise BrainPropError(
            f"{source} is not a valid CIFAR pickle ({reason(exc)}): {fix}"
        ) from exc


def parse_cifar_batch(
    data: bytes, *, label_key: bytes, num_classes: int, source: str, fix: str
) -> tuple[np.ndarray, np.ndarray]:
    """Parse one CIFAR pickle.

    Returns:
        uint8 images ``[N, 3, 32, 32]`` and int64 labels ``[N]``.
    """
    batch = unpickle_restricted(data, source=source, fix=fix)
    if not isinstance(batch, dict):
        raise BrainPropError(f"{source} holds a {type(batch).__name__}, expected a dict: {fix}")
    for key in (b"data", label_key):
        if key not in batch:
            raise BrainPropError(f"{source} has no {key!r} entry: {fix}")
    pixels = batch[b"data"]
    if (
        not isinstance(pixels, np.ndarray)
        or pixels.dtype != np.uint8
        or pixels.ndim != 2
        or pixels.shape[1] != ROW_BYTES
    ):
        what = (
            f"{pixels.dtype} {list(pixels.shape)}"
            if isinstance(pixels, np.ndarray)
            else type(pixels).__name__
        )
        raise BrainPropError(f"{source} has b'data' of {what}, expected uint8 [N, 3072]: {fix}")
    raw_labels = batch[label_key]
    if not isinstance(raw_labels, (list, np.ndarray)) or not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in raw_labels
    ):
        raise BrainPropError(f"{source} has {label_key!r} that is not a list of integers: {fix}")
    labels = np.asarray(raw_labels, dtype=np.int64).reshape(-1)
    if labels.shape[0] != pixels.shape[0]:
        raise BrainPropError(
            f"{source} has {pixels.shape[0]} images but {labels.shape[0]} {label_key!r}: {fix}"
        )
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise BrainPropError(
            f"{source} has label {labels[bad[0]]} at index {bad[0]}, "
            f"expected 0..{num_classes - 1}: {fix}"
        )
    return np.ascontiguousarray(pixels.reshape(-1, 3, 32, 32)), labels


def cifar_dir(name: str, root: Path) -> Path:
    """The folder holding the pickles of ``name``, e.g. ``root/cifar10/cifar-10-batches-py``."""
    layout = LAYOUTS[name]
    return root / layout.folder / layout.subdir


def _load_split(name: str, root: Path, files: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    layout = LAYOUTS[name]
    folder = cifar_dir(name, root)
    xs, ys = [], []
    for file_name in files:
        path = folder / file_name
        if not path.is_file():
            raise BrainPropError(
                f"CIFAR file {path} is missing: run 'brainprop download {layout.download_name}' "
                f"or extract the official python archive into {folder.parent}"
            )
        source = f"CIFAR file {path}"
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BrainPropError(
                f"{source} cannot be read ({reason(exc)}): check its permissions"
            ) from exc
        x, y = parse_cifar_batch(
            data,
            label_key=layout.label_key,
            num_classes=layout.num_classes,
            source=source,
            fix=redownload(layout.download_name),
        )
        xs.append(x)
        ys.append(y)
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def load_cifar(name: str, root: Path) -> Dataset:
    """Load ``"cifar10"``, ``"cifar100"`` (fine labels) or ``"cifar100-coarse"``.

    Returns a :class:`Dataset` with ``train_x`` uint8 ``[50000, 3, 32, 32]`` and ``test_x``
    ``[10000, 3, 32, 32]`` for the official files, in file order.
    """
    layout = LAYOUTS[name]
    train_x, train_y = _load_split(name, root, layout.train_files)
    test_x, test_y = _load_split(name, root, layout.test_files)
    return Dataset(name, train_x, train_y, test_x, test_y, layout.num_classes)
