"""The datasets known by name (``DATASETS``, which one's own code extends), and the single
entry point that loads any of them by name."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from brainprop.errors import (
    PERMISSIONS_FIX,
    BrainPropError,
    barred_folder,
    defined_in,
    kind_of,
    not_permitted,
    not_taking,
    raised,
)
from brainprop.plugins import did_you_mean
from brainprop.registry import Registry

from .catalog import CATALOG, FAMILIES
from .dataset import Dataset
from .root import data_root, resolve_data_root
from .status import NAME_WIDTH, DatasetStatus, table_row


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
        return f"must be a brainprop.DatasetEntry(load, family), not {kind_of(entry)}"
    if not callable(entry.load):
        return f"{_LOADER} {kind_of(entry.load)}"
    if (called := not_taking(entry.load, Path(), test_only=False)) is not None:
        return f"{_LOADER} {called}"
    if entry.family not in FAMILIES:
        return (
            f"has the family {entry.family!r}: one of {', '.join(FAMILIES)}, whose preset rows "
            "it takes"
        )
    return None


def _load_official(name: str, root: Path, *, test_only: bool = False) -> Dataset:
    """Load one of the library's datasets by its catalog row as the row is now, so that a row
    replaced (its system folder, in a test) is the one read."""
    return CATALOG[name].format.load(name, root, test_only=test_only)


#: The datasets ``load_dataset``, ``TrainConfig.dataset`` and ``brainprop train --dataset``
#: know. One of one's own is an entry, e.g.
#: ``DATASETS["kmnist"] = DatasetEntry(load_kmnist, family="mnist")``; given to the command
#: with ``brainprop --plugin`` (:mod:`brainprop.plugins`). The library's own stay as they are.
DATASETS: Registry[DatasetEntry] = Registry(
    "DATASETS",
    "dataset",
    {
        name: DatasetEntry(partial(_load_official, name), row.family)
        for name, row in CATALOG.items()
    },
    check=_entry_problem,
)
#: The library's datasets: their official files are what ``brainprop datasets`` lists and
#: ``brainprop download`` fetches.
DATASET_NAMES: tuple[str, ...] = DATASETS.builtin


def dataset_family(name: str) -> str | None:
    """The family whose preset rows dataset ``name`` takes; None for a name not registered."""
    entry = DATASETS.get(name)
    return None if entry is None else entry.family


def check_name(name: str) -> None:
    """Raise :class:`BrainPropError` unless ``name`` is in :data:`DATASET_NAMES`."""
    if name in DATASET_NAMES:
        return
    if name in DATASETS:
        raise BrainPropError(
            f"{name!r} is a dataset of one's own, whose files its loader reads: brainprop "
            f"fetches and checks only its own, {', '.join(DATASET_NAMES)}"
        )
    raise BrainPropError(
        f"unknown dataset {name!r}: choose one of {', '.join(DATASET_NAMES)}"
        + did_you_mean(name, DATASET_NAMES)
    )


def data_dir(name: str, root: Path) -> Path:
    """The folder the loader of ``name`` reads under ``root``."""
    check_name(name)
    return CATALOG[name].format.dataset_dir(name, root)


def inside_data_root(name: str, root: Path) -> str | None:
    """The fix where ``root`` is a folder inside the data root that holds ``name`` (``--data-dir
    data/mnist`` for ``data``), else None."""
    return CATALOG[name].format.inside_hint(name, root) if name in CATALOG else None


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
        failed = raised(e, defined_in(load))
        raise BrainPropError(f"DATASETS[{name!r}].load failed: {failed}") from e
    # A run records its data by name, and a resume or evaluate loads it by that name again.
    if not isinstance(dataset, Dataset):
        raise BrainPropError(
            f"DATASETS[{name!r}].load returned {kind_of(dataset)}, not a "
            "brainprop.Dataset: return Dataset(...)"
        )
    if dataset.name != name:
        raise BrainPropError(
            f"DATASETS[{name!r}].load returned a Dataset named {dataset.name!r}: name it "
            f"{name!r}, as runs that load it by that name record it"
        )
    return dataset


def own_datasets(name_width: int = NAME_WIDTH) -> list[str]:
    """One row per registered dataset of one's own, for ``brainprop datasets`` beside the
    statuses (its name in a column ``name_width`` wide): its files are its loader's
    business, so they are not checked."""
    rows = []
    for name, entry in DATASETS.items():
        if name not in DATASETS.builtin:
            source = defined_in(entry.load)
            where = f"loaded by DATASETS[{name!r}].load" + (f" from {source}" if source else "")
            extra = f"{entry.family}'s settings; its loader reads and checks its files"
            rows.append(table_row(name, "own", where, extra, name_width))
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
    """The format's status of ``name``, or, where a folder on the way to the files may not
    be entered, a row that names it: the other datasets are still listed."""
    try:
        return CATALOG[name].format.status(name, root)
    except PermissionError as e:
        where = root / name
        if e.filename:
            # Where os.access sees no barred folder above but the kernel refused (a folder
            # that may not be listed, root on an NFS share that squashes root), the folder
            # being looked inside is the best guess: the one named, or the file's.
            refused = Path(e.filename)
            where = barred_folder(refused) or (
                refused if os.path.isdir(refused) else refused.parent
            )
        return DatasetStatus(
            name, False, where, "",
            damaged=f"cannot look inside {where} ({e.strerror or e}): {PERMISSIONS_FIX}",
            unreadable=True,
        )  # fmt: skip
