"""The dataset names, and the single entry point that loads any of them by name."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from brainprop.errors import BrainPropError

from .cifar import LAYOUTS, cifar_dir, cifar_file_problem, load_cifar
from .dataset import Dataset
from .idx import (
    IDX_FILE_NAMES,
    IDX_MAGIC,
    SYSTEM_PACKAGES,
    find_idx_file,
    how_to_get,
    idx_dataset_dir,
    idx_file_problem,
    load_idx_dataset,
)
from .messages import UNREADABLE, download_command, redownload
from .root import data_root, resolve_data_root
from .tinyimagenet import CACHE_DIR, load_tiny_imagenet, tiny_imagenet_dir

DATASET_NAMES: tuple[str, ...] = (
    "mnist",
    "fashion-mnist",
    "cifar10",
    "cifar100",
    "cifar100-coarse",
    "tiny-imagenet",
)
_IDX = ("mnist", "fashion-mnist")


@dataclass(frozen=True)
class DatasetStatus:
    """Whether one dataset is available under a data root (for ``brainprop datasets``).

    Attributes:
        name: the dataset name.
        present: all files the loader needs exist, and none looks damaged by its size and
            header (their content is checked only on load).
        path: the folder the loader reads, or would read once the files are there.
        how_to_get: one line on obtaining the files.
        note: where a present dataset comes from when not the data root itself, or cache state.
        damaged: what is wrong with the first existing file that looks damaged (its path,
            what, and the fix), else "": also where other files are missing, so that a
            download does not fetch them beside a damaged one the loader would read.
    """

    name: str
    present: bool
    path: Path
    how_to_get: str
    note: str = ""
    damaged: str = ""

    def __str__(self) -> str:
        """One table row: name, present/damaged/missing, folder, then the note, what is
        damaged, or how to get it."""
        state = "present" if self.present else "damaged" if self.damaged else "missing"
        extra = self.note if self.present else self.damaged or self.how_to_get
        return f"{self.name:<16} {state:<8} {self.path}" + (f"  ({extra})" if extra else "")


def check_name(name: str) -> None:
    """Raise :class:`BrainPropError` unless ``name`` is in :data:`DATASET_NAMES`."""
    if name not in DATASET_NAMES:
        raise BrainPropError(f"unknown dataset {name!r}: choose one of {', '.join(DATASET_NAMES)}")


def data_dir(name: str, root: Path) -> Path:
    """The folder the loader of ``name`` reads under ``root``."""
    check_name(name)
    if name in _IDX:
        return idx_dataset_dir(name, root)
    if name in LAYOUTS:
        return cifar_dir(name, root)
    return tiny_imagenet_dir(root)


def load_dataset(name: str, root: str | Path | None = None, *, test_only: bool = False) -> Dataset:
    """Load dataset ``name`` from ``root`` (``None``: :func:`resolve_data_root`).

    Returns a :class:`Dataset` with uint8 ``[N, C, H, W]`` images and int64 labels;
    ``test_only``: only the test split is read, and the training split is empty.
    """
    check_name(name)
    root = data_root(root)
    if name in _IDX:
        return load_idx_dataset(name, root, test_only=test_only)
    if name in LAYOUTS:
        return load_cifar(name, root, test_only=test_only)
    return load_tiny_imagenet(root, test_only=test_only)


def _status(name: str, root: Path) -> DatasetStatus:
    folder = data_dir(name, root)
    if name in _IDX:
        paths = [find_idx_file(folder, base) for base in IDX_FILE_NAMES]
        present = all(paths)
        note = ""
        if present and folder != root / name:
            note = f"from system package {SYSTEM_PACKAGES[name]}"
        problems = (
            (path, idx_file_problem(path, IDX_MAGIC[base]))
            for path, base in zip(paths, IDX_FILE_NAMES, strict=True)
            if path is not None
        )
        damaged = _damaged(problems, name, root)
        hint = how_to_get(name, root)
        return DatasetStatus(name, present and not damaged, folder, hint, note, damaged)
    if name in LAYOUTS:
        layout = LAYOUTS[name]
        paths = [folder / f for f in layout.train_files + layout.test_files]
        present = all(p.is_file() for p in paths)
        hint = (
            f"run {download_command(layout.download_name, root)} or extract the official "
            f"python archive into {folder.parent}"
        )
        damaged = _damaged(
            ((p, cifar_file_problem(p)) for p in paths if p.is_file()), layout.download_name, root
        )
        return DatasetStatus(name, present and not damaged, folder, hint, damaged=damaged)
    present = all(
        p.exists()
        for p in (folder / "wnids.txt", folder / "train", folder / "val" / "val_annotations.txt")
    )
    hint = f"run {download_command(name, root)} or unzip tiny-imagenet-200.zip into {folder.parent}"
    note = "decoded cache present" if (folder / CACHE_DIR / "manifest.json").is_file() else ""
    return DatasetStatus(name, present, folder, hint, note)


def _damaged(problems: Iterable[tuple[Path, str | None]], download_name: str, root: Path) -> str:
    """The first problem of ``problems`` (path, problem or None) in the data root ``root``, as
    one line with its fix."""
    for path, problem in problems:
        if problem is not None:
            # Permissions, not damage, are the usual reason a file cannot be opened.
            unreadable = problem.startswith(UNREADABLE)
            fix = "check its permissions" if unreadable else redownload(download_name, root)
            return f"{path} {problem}: {fix}"
    return ""


def dataset_status(root: str | Path | None = None) -> list[DatasetStatus]:
    """One :class:`DatasetStatus` per name in :data:`DATASET_NAMES`, in that order.

    Checks that files exist, and for MNIST-style and CIFAR files that their size agrees with
    their header (or ends as a pickle does), so it is quick even for Tiny ImageNet.
    """
    root = resolve_data_root(root)
    return [_status(name, root) for name in DATASET_NAMES]
