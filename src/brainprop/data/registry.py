"""The datasets known by name (``DATASETS``, which one's own code extends), and the single
entry point that loads any of them by name."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from brainprop.errors import PERMISSIONS_FIX, BrainPropError, not_permitted, raised
from brainprop.registry import Registry

from .cifar import LAYOUTS, cifar_dir, cifar_file_problem, load_cifar
from .cifar import how_to_get as cifar_how_to_get
from .cifar import inside_hint as cifar_inside_hint
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
from .idx import inside_hint as idx_inside_hint
from .messages import UNREADABLE, redownload
from .root import data_root, resolve_data_root
from .tinyimagenet import CACHE_DIR, load_tiny_imagenet, tiny_imagenet_dir, tree_problem
from .tinyimagenet import NAME as TINY_IMAGENET
from .tinyimagenet import how_to_get as tiny_how_to_get
from .tinyimagenet import inside_hint as tiny_inside_hint

#: The dataset families, the first item of a preset table's key: each dataset takes its
#: family's rows of hyperparameters.
FAMILIES = ("mnist", "cifar10", "cifar100", "tiny-imagenet")


@dataclass(frozen=True)
class DatasetEntry:
    """How to load a dataset known by name: an entry of :data:`DATASETS`.

    Attributes:
        load: ``load(root, test_only=...)`` returns the :class:`Dataset`, named as its entry
            is. ``root`` is the data root (a :class:`Path`: ``--data-dir``, else as
            :func:`resolve_data_root` finds it), which the files need not be under; with
            ``test_only`` the training split may be left empty. An error it raises is one
            ``BrainPropError``: its own message, or the error's and where in the loader's file.
        family: the one of :data:`FAMILIES` whose preset rows the dataset takes: ``"mnist"``
            for 28x28 grey images, say (each network is built for the images' size, if they
            are large enough for its layers).
    """

    load: Callable[..., Dataset]
    family: str


_LOADER = "must load with a function of (root, test_only=...) that returns the Dataset, not"


def _entry_problem(entry: object) -> str | None:
    if not isinstance(entry, DatasetEntry):
        return f"must be a brainprop.DatasetEntry(load, family), not a {type(entry).__name__}"
    if not callable(entry.load):
        return f"{_LOADER} a {type(entry.load).__name__}"
    try:
        signature = inspect.signature(entry.load)
    except (TypeError, ValueError):  # no signature to read (some built-ins): its call tells
        signature = None
    if signature is not None:
        try:
            signature.bind(Path(), test_only=False)
        except TypeError:
            named = getattr(entry.load, "__name__", type(entry.load).__name__)
            return f"{_LOADER} {named}{signature}"
    if entry.family not in FAMILIES:
        return (
            f"has the family {entry.family!r}: one of {', '.join(FAMILIES)}, whose preset rows "
            "it takes"
        )
    return None


#: The datasets ``load_dataset``, ``TrainConfig.dataset`` and ``brainprop train --dataset``
#: know. One of one's own is an entry, e.g.
#: ``DATASETS["kmnist"] = DatasetEntry(load_kmnist, family="mnist")``; given to the command
#: with ``brainprop --plugin`` (:mod:`brainprop.plugins`). The library's own stay as they are.
DATASETS: Registry[DatasetEntry] = Registry(
    "DATASETS",
    "dataset",
    # Fashion-MNIST has MNIST's format and was not in the paper, so it takes MNIST's settings;
    # CIFAR-100's coarse labels take CIFAR-100's.
    {
        "mnist": DatasetEntry(partial(load_idx_dataset, "mnist"), "mnist"),
        "fashion-mnist": DatasetEntry(partial(load_idx_dataset, "fashion-mnist"), "mnist"),
        "cifar10": DatasetEntry(partial(load_cifar, "cifar10"), "cifar10"),
        "cifar100": DatasetEntry(partial(load_cifar, "cifar100"), "cifar100"),
        "cifar100-coarse": DatasetEntry(partial(load_cifar, "cifar100-coarse"), "cifar100"),
        "tiny-imagenet": DatasetEntry(load_tiny_imagenet, "tiny-imagenet"),
    },
    check=_entry_problem,
)
#: The library's datasets: their official files are what ``brainprop datasets`` lists and
#: ``brainprop download`` fetches.
DATASET_NAMES: tuple[str, ...] = DATASETS.builtin
_IDX = ("mnist", "fashion-mnist")


def dataset_family(name: str) -> str | None:
    """The family whose preset rows dataset ``name`` takes; None for a name not registered."""
    entry = DATASETS.get(name)
    return None if entry is None else entry.family


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
        unreadable: what ``damaged`` says is a file or folder this user may not read, which
            is no damage.
    """

    name: str
    present: bool
    path: Path
    how_to_get: str
    note: str = ""
    damaged: str = ""
    unreadable: bool = False

    def __str__(self) -> str:
        """One table row: name, present/unreadable/damaged/missing, folder, then the note,
        what is wrong, or how to get it."""
        state = "present" if self.present else "missing"
        if self.damaged:
            state = "unreadable" if self.unreadable else "damaged"
        extra = self.note if self.present else self.damaged or self.how_to_get
        return f"{self.name:<16} {state:<10} {self.path}" + (f"  ({extra})" if extra else "")


def check_name(name: str) -> None:
    """Raise :class:`BrainPropError` unless ``name`` is in :data:`DATASET_NAMES`."""
    if name in DATASET_NAMES:
        return
    if name in DATASETS:
        raise BrainPropError(
            f"{name!r} is a dataset of one's own, whose files its loader reads: brainprop "
            f"fetches and checks only its own, {', '.join(DATASET_NAMES)}"
        )
    raise BrainPropError(f"unknown dataset {name!r}: choose one of {', '.join(DATASET_NAMES)}")


def data_dir(name: str, root: Path) -> Path:
    """The folder the loader of ``name`` reads under ``root``."""
    check_name(name)
    if name in _IDX:
        return idx_dataset_dir(name, root)
    if name in LAYOUTS:
        return cifar_dir(name, root)
    return tiny_imagenet_dir(root)


def inside_data_root(name: str, root: Path) -> str | None:
    """The fix where ``root`` is a folder inside the data root that holds ``name`` (``--data-dir
    data/mnist`` for ``data``), else None."""
    if name in _IDX:
        return idx_inside_hint(name, root)
    if name in LAYOUTS:
        return cifar_inside_hint(name, root)
    return tiny_inside_hint(root) if name == TINY_IMAGENET else None


def load_dataset(name: str, root: str | Path | None = None, *, test_only: bool = False) -> Dataset:
    """Load dataset ``name``, an entry of :data:`DATASETS`, from ``root`` (``None``:
    :func:`resolve_data_root`).

    Returns a :class:`Dataset` with uint8 ``[N, C, H, W]`` images and int64 labels;
    ``test_only``: only the test split is read, and the training split is empty (for the
    library's datasets; one's own may load both).
    """
    DATASETS.require(name)
    load, folder = DATASETS[name].load, data_root(root)
    try:
        dataset = load(folder, test_only=test_only)
    except Exception as e:
        if isinstance(e, PermissionError):
            # pathlib's is_file() and is_dir() raise it where a folder above may not be entered.
            raise BrainPropError(not_permitted(e, folder)) from e
        if isinstance(e, BrainPropError) or name in DATASETS.builtin:
            raise
        # One's own loader failing (its files missing, say) is one line, as a plugin that
        # fails as it is imported is.
        raise BrainPropError(f"DATASETS[{name!r}].load failed: {raised(e, _source(load))}") from e
    # A run records its data by name, and a resume or evaluate loads it by that name again.
    if not isinstance(dataset, Dataset):
        raise BrainPropError(
            f"DATASETS[{name!r}].load returned a {type(dataset).__name__}, not a "
            "brainprop.Dataset: return Dataset(...)"
        )
    if dataset.name != name:
        raise BrainPropError(
            f"DATASETS[{name!r}].load returned a Dataset named {dataset.name!r}: name it "
            f"{name!r}, as runs that load it by that name record it"
        )
    return dataset


def _source(function: Callable[..., object]) -> Path | None:
    """The file that defines ``function`` (a ``partial``'s function, a callable object's
    class), if there is one."""
    function = getattr(function, "func", function)
    for defines in (function, type(function)):
        try:
            source = inspect.getsourcefile(defines)
        except TypeError:  # a callable object (then its class is tried), or a built-in
            continue
        # Code typed into the interpreter has a "file" such as <stdin>, which is none.
        return Path(source).resolve() if source and Path(source).is_file() else None
    return None


def _barred(path: Path) -> Path:
    """The highest folder above ``path`` that may not be entered: looking a file up needs only
    its folders' permissions. Its own folder where none says so (a check faked in a test)."""
    barred = [p for p in path.parents if not os.access(p, os.X_OK)]
    return barred[-1] if barred else path.parent


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
        damaged, unreadable = _damaged(problems, name, root)
        hint = how_to_get(name, root)
        return DatasetStatus(name, present and not damaged, folder, hint, note, damaged, unreadable)
    if name in LAYOUTS:
        layout = LAYOUTS[name]
        paths = [folder / f for f in layout.train_files + layout.test_files]
        present = all(p.is_file() for p in paths)
        hint = cifar_how_to_get(name, root)
        damaged, unreadable = _damaged(
            ((p, cifar_file_problem(p)) for p in paths if p.is_file()), layout.download_name, root
        )
        return DatasetStatus(
            name, present and not damaged, folder, hint, damaged=damaged, unreadable=unreadable
        )
    present = all(
        p.exists()
        for p in (folder / "wnids.txt", folder / "train", folder / "val" / "val_annotations.txt")
    )
    hint = tiny_how_to_get(root)
    note = "decoded cache present" if (folder / CACHE_DIR / "manifest.json").is_file() else ""
    damaged = (tree_problem(folder) or "") if present else ""
    unreadable = damaged.endswith(PERMISSIONS_FIX)
    return DatasetStatus(name, present and not damaged, folder, hint, note, damaged, unreadable)


def _damaged(
    problems: Iterable[tuple[Path, str | None]], download_name: str, root: Path
) -> tuple[str, bool]:
    """The first problem of ``problems`` (path, problem or None) in the data root ``root``, as
    one line with its fix, and whether it is one of permissions; ``""`` where there is none."""
    for path, problem in problems:
        if problem is not None:
            # Permissions, not damage, are the usual reason a file cannot be opened.
            unreadable = problem.startswith(UNREADABLE)
            fix = PERMISSIONS_FIX if unreadable else redownload(download_name, root)
            return f"{path} {problem}: {fix}", unreadable
    return "", False


def own_datasets() -> list[str]:
    """One row per registered dataset of one's own, for ``brainprop datasets`` beside the
    statuses: its files are its loader's business, so they are not checked."""
    rows = []
    for name, entry in DATASETS.items():
        if name not in DATASETS.builtin:
            source = _source(entry.load)
            where = f" from {source}" if source else ""
            rows.append(
                f"{name:<16} {'own':<10} loaded by DATASETS[{name!r}].load{where}  "
                f"({entry.family}'s settings; its loader reads and checks its files)"
            )
    return rows


def dataset_status(
    root: str | Path | None = None, names: Sequence[str] = DATASET_NAMES
) -> list[DatasetStatus]:
    """One :class:`DatasetStatus` per name of ``names`` (of :data:`DATASET_NAMES`, all by
    default), in that order.

    Checks that files exist, for MNIST-style and CIFAR files that their size agrees with their
    header (or ends as a pickle does), and lists Tiny ImageNet's tree against its own lists
    without decoding an image (a second or two for its 110,000 files; the others take
    milliseconds).
    """
    root = resolve_data_root(root)
    return [_checked_status(name, root) for name in names]


def _checked_status(name: str, root: Path) -> DatasetStatus:
    """:func:`_status`, or, where a folder on the way to the files may not be entered, a row
    that names it: the other datasets are still listed."""
    try:
        return _status(name, root)
    except PermissionError as e:
        where = _barred(Path(e.filename)) if e.filename else root / name
        return DatasetStatus(
            name, False, where, "",
            damaged=f"cannot look inside {where} ({e.strerror or e}): {PERMISSIONS_FIX}",
            unreadable=True,
        )  # fmt: skip
