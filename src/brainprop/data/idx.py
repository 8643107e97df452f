"""MNIST's format, the official IDX files (gzipped or not): MNIST and Fashion-MNIST.

IDX layout: 2 zero bytes, a type byte (0x08 = uint8), a byte with the number of dimensions,
then one big-endian uint32 per dimension, then the data in C order.
"""

from __future__ import annotations

import gzip
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, ClassVar

import numpy as np
import torch

from brainprop.errors import PERMISSIONS_FIX, BrainPropError, reason

from .dataset import Dataset
from .messages import (
    UNREADABLE,
    download_command,
    inside_root,
    missing,
    not_a_file,
    redownload,
)
from .status import DatasetStatus, first_damage

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
IMAGE_SIZE = (28, 28)
NUM_CLASSES = 10
#: The most data an IDX file may declare (MNIST's training images are 47 MB).
MAX_DATA_BYTES = 2**31
#: The least a gzip file holds: its 10-byte header and 8-byte trailer (RFC 1952).
GZIP_MIN_BYTES = 18

#: split -> (images file, labels file), without the optional ``.gz``.
SPLIT_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_FILE_NAMES: tuple[str, ...] = tuple(f for pair in SPLIT_FILES.values() for f in pair)
#: Each file's magic number, images or labels.
IDX_MAGIC = {
    name: magic
    for pair in SPLIT_FILES.values()
    for name, magic in zip(pair, (IMAGES_MAGIC, LABELS_MAGIC), strict=True)
}


def parse_idx(data: bytes, *, magic: int, source: str, fix: str) -> np.ndarray:
    """Parse one uint8 IDX file held in ``data``.

    Args:
        data: the whole (uncompressed) file.
        magic: the expected magic number, which also fixes the number of dimensions.
        source: how to name the file in messages, e.g. ``"MNIST file /x/t10k-images..."``.
        fix: what the user should do about a bad file.

    Returns:
        uint8 array whose shape is the header's dimensions, e.g. ``[N, 28, 28]``.
    """
    if len(data) == 0:
        raise BrainPropError(f"{source} is empty (0 bytes): {fix}")
    if len(data) < 4:
        raise BrainPropError(f"{source} is truncated ({len(data)} bytes, no IDX header): {fix}")
    got = int.from_bytes(data[:4], "big")
    if got != magic:
        raise BrainPropError(
            f"{source} has magic number 0x{got:08x}, expected 0x{magic:08x}: "
            f"it is not the right IDX file; {fix}"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise BrainPropError(
            f"{source} is truncated ({len(data)} bytes, header needs {header}): {fix}"
        )
    dims = _dims(data, ndim)
    expected = math.prod(dims)
    got_len = len(data) - header
    if got_len != expected:
        got = f"got {got_len}" if got_len < expected else "got more"
        state = "is truncated" if got_len < expected else "has trailing bytes"
        raise BrainPropError(
            f"{source} {state} (expected {expected} bytes of data for dimensions "
            f"{'x'.join(map(str, dims))}, {got}): {fix}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def read_idx_file(
    path: Path,
    *,
    magic: int,
    source: str,
    fix: str,
    image_size: tuple[int, ...] | None = None,
    check_count: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Read and parse the IDX file at ``path``, decompressing it when it ends in ``.gz``.

    Checked against the header before the data is read, as a small gzip may declare
    gigabytes: ``image_size``, the dimensions after the first that it must declare (images),
    and ``check_count``, called with the first (how many), which raises where that is wrong.
    """
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as f:
            data = _read_declared(f, magic, source, fix, image_size, check_count)
    except PermissionError as exc:
        # Not damage: deleting the file, as ``fix`` says, is no cure (and on a shared, read-only
        # data root not possible).
        raise BrainPropError(f"{source} cannot be read ({reason(exc)}): {PERMISSIONS_FIX}") from exc
    except (OSError, EOFError, zlib.error) as exc:
        # gzip.BadGzipFile is an OSError; a cut-off gzip stream raises EOFError.
        raise BrainPropError(f"{source} cannot be read ({reason(exc)}): {fix}") from exc
    try:
        return parse_idx(data, magic=magic, source=source, fix=fix)
    except MemoryError:
        raise BrainPropError(
            f"not enough memory to hold {source} ({len(data):,} bytes): free some and try again"
        ) from None


def _dims(header: bytes, ndim: int) -> tuple[int, ...]:
    """The ``ndim`` big-endian uint32 dimensions that follow the magic number."""
    return tuple(int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))


def _read_declared(
    f: BinaryIO,
    magic: int,
    source: str,
    fix: str,
    image_size: tuple[int, ...] | None,
    check_count: Callable[[int], None] | None,
) -> bytes:
    """The header and at most one byte more of data than it declares: a small gzip that
    inflates far beyond its dimensions is caught without inflating it whole, and a header
    declaring images of another size without reading them."""
    head = f.read(4)
    if int.from_bytes(head, "big") != magic:
        return head  # parse_idx says what is wrong
    ndim = magic & 0xFF
    head += f.read(4 * ndim)
    if len(head) < 4 + 4 * ndim:
        return head  # parse_idx says what is missing
    dims = _dims(head, ndim)
    if image_size is not None and dims[1:] != image_size:
        raise BrainPropError(
            f"{source} holds {'x'.join(map(str, dims[1:]))} images, expected "
            f"{'x'.join(map(str, image_size))}: {fix}"
        )
    declared = math.prod(dims)
    if too_much := _too_much(declared):
        raise BrainPropError(f"{source} {too_much}; {fix}")
    if check_count is not None:
        check_count(dims[0])
    try:
        return head + f.read(declared + 1)
    except MemoryError:
        # Below MAX_DATA_BYTES a file of a real dataset may declare as much: the header alone
        # cannot tell damage from a large dataset.
        raise BrainPropError(
            f"not enough memory to read {source}, whose header declares {declared:,} bytes of "
            f"data: free some and try again, or, if it should hold less, {fix}"
        ) from None


def _too_much(declared: int) -> str | None:
    """Why ``declared`` bytes of data are no IDX dataset's, or None."""
    if declared <= MAX_DATA_BYTES:
        return None
    return (
        f"declares {declared:,} bytes of data, more than any IDX dataset holds: it is damaged "
        "or not an MNIST-style file"
    )


def idx_file_problem(path: Path, magic: int) -> str | None:
    """What is wrong with the IDX file ``path`` as its header and size tell, without reading
    its data; None when they agree. A gzip file ends with its uncompressed size (mod 2**32),
    so one cut short is found without inflating it."""
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    try:
        if path.suffix == ".gz":
            if (held := path.stat().st_size) < GZIP_MIN_BYTES:
                return f"is too short for a gzip file ({held} bytes)"
            with gzip.open(path, "rb") as f:
                head = f.read(header)
            with path.open("rb") as f:
                f.seek(-4, 2)
                size = int.from_bytes(f.read(4), "little")
        else:
            with path.open("rb") as f:
                head = f.read(header)
            size = path.stat().st_size
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        # It opened, so this is damage (an error page saved under the name, a cut-short
        # download), not permissions; BadGzipFile is an OSError, hence first.
        return f"is not a whole gzip file ({reason(exc)})"
    except OSError as exc:
        return f"{UNREADABLE} ({reason(exc)})"
    if len(head) < header or int.from_bytes(head[:4], "big") != magic:
        return "has no IDX header of its kind"
    declared = math.prod(_dims(head, ndim))
    if too_much := _too_much(declared):
        return too_much  # before a gzip is inflated to count it: a small one can hold gigabytes
    expected = header + declared
    if path.suffix != ".gz" and size != expected:
        return f"is cut short or padded (its header declares {expected} bytes, it holds {size})"
    # The trailer is the last gzip member's: a file of several (gzip files concatenated,
    # valid and read as one) is counted whole before it is called damaged.
    if (
        path.suffix == ".gz"
        and size != expected % 2**32
        and _inflated_size(path, expected) != expected
    ):
        return (
            f"is cut short or damaged (its header declares {expected} bytes, its gzip trailer "
            f"{size})"
        )
    return None


def _inflated_size(path: Path, limit: int) -> int | None:
    """The bytes the gzip file ``path`` inflates to, all its members, counted up to one past
    ``limit`` (a small file can inflate to gigabytes); None where it cannot be read."""
    total = 0
    try:
        with gzip.open(path, "rb") as f:
            while total <= limit and (chunk := f.read(1 << 20)):
                total += len(chunk)
    except (OSError, EOFError, zlib.error):
        return None
    return total


def _names(folder: Path, base: str) -> tuple[Path, Path]:
    """The two names the IDX file ``base`` goes by in ``folder``: as published and gzipped."""
    return folder / base, folder / f"{base}.gz"


def find_idx_file(folder: Path, base: str) -> Path | None:
    """``folder/base`` if it exists, else ``folder/base.gz``, else ``None``."""
    for candidate in _names(folder, base):
        if candidate.is_file():
            return candidate
    return None


def _problem(folder: Path, base: str, path: Path | None) -> tuple[Path, str | None]:
    """The IDX file ``base`` in ``folder``, found at ``path`` (:func:`find_idx_file`), and what
    is wrong with it, or None where it is whole or missing (which its status reports apart); a
    folder or a pipe in its place is wrong."""
    if path is None:
        return not_a_file(*_names(folder, base)) or (folder / base, None)
    return path, idx_file_problem(path, IDX_MAGIC[base])


@dataclass(frozen=True)
class IdxFiles:
    """The format of a dataset in MNIST's four IDX files (gzipped or not) under
    ``root/<name>/``: a :class:`~.catalog.Format`.

    Attributes:
        title: the dataset's name in messages, e.g. ``"Fashion-MNIST"``.
        system_dir: a folder a system package fills, read when the data root has none of the
            files.
        system_package: that package, named in the hint on getting the files.
    """

    title: str
    system_dir: Path | None = None
    system_package: str | None = None

    image: ClassVar[tuple[int, int, int]] = (1, *IMAGE_SIZE)
    classes: ClassVar[int] = NUM_CLASSES
    verified_by_loading: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if (self.system_dir is None) != (self.system_package is None):
            raise ValueError("IdxFiles takes a system_dir together with its system_package")

    def dataset_dir(self, name: str, root: Path) -> Path:
        """``root/name``, or the system package's folder when ``root/name`` has none of the
        four files, nor anything in their place, and the system folder has all. A folder (or
        anything but a file) where a file goes counts as the user's copy: read past, it went
        unreported, and a download fetched before it failed to put the file there (review)."""
        own = root / name
        if any(find_idx_file(own, b) or not_a_file(*_names(own, b)) for b in IDX_FILE_NAMES):
            return own
        system = self.system_dir
        if system is not None and all(find_idx_file(system, base) for base in IDX_FILE_NAMES):
            return system
        return own

    def inside_hint(self, name: str, root: Path) -> str | None:
        """The fix where ``root`` is a folder inside the data root that holds ``name``'s
        files (:func:`~.messages.inside_root`), else None."""
        first = Path(name, IDX_FILE_NAMES[0])
        return inside_root(root, first, first.with_name(f"{first.name}.gz"))

    def how_to_get(self, name: str, root: Path) -> str:
        """A one-line hint on obtaining the IDX files of ``name`` into the data root."""
        if inside := self.inside_hint(name, root):
            return inside
        hint = (
            f"put the four official IDX files (gzipped or not) in {root / name} "
            f"or run {download_command(name, root)}"
        )
        if self.system_package is not None:
            hint += f" (or 'apt-get install {self.system_package}')"
        return hint

    def _damage_fix(self, name: str, root: Path, folder: Path, files: str = "it") -> str:
        """The fix for a damaged file of ``name`` read from ``folder``: the system package's
        files are not the user's to delete, and a download puts a copy in the data root."""
        if folder == root / name or self.system_package is None:
            return redownload(name, root, files)
        return (
            f"reinstall them ('apt-get install --reinstall {self.system_package}'), or run "
            f"{download_command(name, root)} for a copy in the data root"
        )

    def status(self, name: str, root: Path) -> DatasetStatus:
        """Present where all four files exist and each one's size agrees with its header."""
        folder = self.dataset_dir(name, root)
        paths = [find_idx_file(folder, base) for base in IDX_FILE_NAMES]
        present = all(paths)
        note = ""
        if present and folder != root / name:
            note = f"from system package {self.system_package}"
        problems = (
            _problem(folder, base, path) for base, path in zip(IDX_FILE_NAMES, paths, strict=True)
        )
        fix = self._damage_fix(name, root, folder)
        damaged, unreadable = first_damage(problems, name, root, fix)
        hint = self.how_to_get(name, root)
        return DatasetStatus(name, present and not damaged, folder, hint, note, damaged, unreadable)

    def load(self, name: str, root: Path, *, test_only: bool = False) -> Dataset:
        """Load ``name`` from ``root/<name>/`` (or the system folder).

        Returns a :class:`Dataset` with ``train_x`` uint8 ``[60000, 1, 28, 28]`` and
        ``test_x`` ``[10000, 1, 28, 28]`` for the official files; ``test_only``: the training
        files are not read and the training split is empty.
        """
        folder = self.dataset_dir(name, root)
        if test_only:
            return Dataset.test_only(name, *self._split(name, root, folder, "test"), NUM_CLASSES)
        train_x, train_y = self._split(name, root, folder, "train")
        test_x, test_y = self._split(name, root, folder, "test")
        return Dataset(name, train_x, train_y, test_x, test_y, NUM_CLASSES)

    def _split(
        self, name: str, root: Path, folder: Path, split: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return uint8 images ``[N, 1, 28, 28]`` and int64 labels ``[N]`` of one split from
        ``folder``: the data root ``root``'s, or the system package's."""
        title = self.title
        fix = self._damage_fix(name, root, folder)
        paths = []
        for base in SPLIT_FILES[split]:
            path = find_idx_file(folder, base)
            if path is None:
                raise BrainPropError(
                    missing(
                        f"{title} file", f"{folder / base}(.gz)", self.how_to_get(name, root),
                        *_names(folder, base),
                    )
                )  # fmt: skip
            paths.append(path)
        images_path, labels_path = paths
        most = MAX_DATA_BYTES // math.prod(IMAGE_SIZE)

        # A labels file may not declare more than an images file can hold: 2 MB declaring
        # 2**31 labels was read whole (4 GiB at its peak) before the images' count refused it.
        def check_labels(count: int) -> None:
            if count > most:
                raise BrainPropError(
                    f"{title} file {labels_path} declares {count:,} labels, more than the "
                    f"{most:,} images any IDX file holds: it is damaged; {fix}"
                )

        labels = read_idx_file(
            labels_path, magic=LABELS_MAGIC, source=f"{title} file {labels_path}", fix=fix,
            check_count=check_labels,
        )  # fmt: skip

        # Checked on the images' header, before their data is read: read_idx_file calls it for
        # every whole header, so any images it returns agree with the labels.
        def check_count(images: int) -> None:
            if images != len(labels):
                raise BrainPropError(
                    f"{title} {split} split has {images} images in {images_path} but "
                    f"{len(labels)} labels in {labels_path}: "
                    + self._damage_fix(name, root, folder, "both")
                )

        images = read_idx_file(
            images_path, magic=IMAGES_MAGIC, source=f"{title} file {images_path}", fix=fix,
            image_size=IMAGE_SIZE, check_count=check_count,
        )  # fmt: skip
        if images.shape[0] == 0:
            raise BrainPropError(f"{title} file {images_path} holds no images: {fix}")
        bad = np.flatnonzero(labels >= NUM_CLASSES)
        if bad.size:
            raise BrainPropError(
                f"{title} file {labels_path} has label {labels[bad[0]]} at index {bad[0]}, "
                f"expected 0..{NUM_CLASSES - 1}: {fix}"
            )
        x = torch.from_numpy(images).unsqueeze(1).contiguous()
        y = torch.from_numpy(labels.astype(np.int64))
        return x, y
