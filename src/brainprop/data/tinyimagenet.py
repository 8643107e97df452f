"""Tiny ImageNet (200 classes of 64x64 JPEGs) from the official folder tree.

Class index = line number in ``wnids.txt``, so labels do not depend on directory listing order
(the reference Keras code used ``os.listdir`` order, which varies between file systems). The
official test split has no labels, so the ``val`` split serves as the test split.

Decoding ~110k JPEGs takes a minute, so the result is cached once as ``.npy`` files inside the
dataset folder and reused while a small manifest (file list and labels) still matches the tree.
A tree this user cannot write (a shared, read-only copy) gets its cache under the user's cache
folder instead, where it would otherwise be decoded again by every run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from brainprop import locks
from brainprop.errors import PERMISSIONS_FIX, BrainPropError, reason
from brainprop.files import atomic_write, remove_temporaries

from .dataset import Dataset
from .messages import (
    ABSENT,
    download_command,
    inside_root,
    move_away,
    not_a_file,
    not_a_folder,
    unpacked_too_deep,
    unpacked_too_high,
)
from .root import user_cache_dir
from .status import DatasetStatus

SUBDIR = "tiny-imagenet-200"
IMAGE_SIZE = (64, 64)
CACHE_DIR = ".brainprop-cache"
CACHE_VERSION = 2
CACHE_ARRAYS = ("train_x", "train_y", "test_x", "test_y")
WNID = re.compile(r"[\w.-]+")


def _fail(what: str, inside: Path, exc: BaseException | None = None) -> BrainPropError:
    """A one-line error about a damaged tree; ``inside`` is any path within the tree, ``exc``
    what went wrong, given in brackets. A file or folder this user may not read is no sign of
    damage: its fix is the permissions, not deleting a 248 MB download."""
    if exc is not None:
        what = f"{what} ({reason(exc)})"
        if isinstance(exc, PermissionError):
            return BrainPropError(f"Tiny ImageNet {what}: {PERMISSIONS_FIX}")
    tree = _tree(inside)
    return BrainPropError(
        f"Tiny ImageNet {what}: the tree is damaged; delete {tree} and run {_download(tree)}"
    )


def _tree(inside: Path) -> Path:
    """The ``tiny-imagenet-200`` folder ``inside`` lies in, else ``inside``."""
    return next((p for p in (inside, *inside.parents) if p.name == SUBDIR), inside)


def _download(tree: Path) -> str:
    # The tree lies in root/<name>/, whatever its dataset's name.
    return download_command(tree.parent.name, tree.parent.parent)


def _in_place(path: Path, instead: str, what: str = "file") -> BrainPropError:
    """Something other than a file (a folder, a pipe: ``instead`` says which) where the tree
    has a file, or, with ``what="folder"``, other than a folder where it has one: it may hold
    the user's work, so it is to be moved away, not deleted with the tree as damage."""
    fix = move_away(f"run {_download(_tree(path))}")
    return BrainPropError(f"Tiny ImageNet {what} {path} {instead}: {fix}")


def _read_text(path: Path) -> str:
    if found := not_a_file(path):
        raise _in_place(*found)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise _fail(f"file {path} is missing", path) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(f"file {path} cannot be read", path, exc) from exc


def _jpegs(folder: Path) -> list[Path]:
    """The ``*.JPEG`` files in ``folder``, sorted by name so the order is reproducible."""
    try:
        # scandir's entries know their type from the listing (d_type): no stat of each of
        # the tree's 110,000 files, which `datasets` and `download` list too (tree_problem).
        # Hidden files are no images: macOS's ._* beside each JPEG of a tree copied on a Mac.
        with os.scandir(folder) as entries:
            files = [Path(e.path) for e in entries if e.is_file() and e.name[0] != "."]
        return sorted(p for p in files if p.suffix == ".JPEG")
    except FileNotFoundError as exc:
        raise _fail(f"folder {folder} is missing", folder) from exc
    except NotADirectoryError as exc:
        # A file of one's own in the folder's place, or in its parent's (a class's folder).
        if blocked := _not_folders(folder, folder.parent):
            raise _in_place(*blocked, "folder") from exc
        raise _fail(f"folder {folder} cannot be listed", folder, exc) from exc
    except OSError as exc:
        raise _fail(f"folder {folder} cannot be listed", folder, exc) from exc


def _not_folders(*paths: Path) -> tuple[Path, str] | None:
    """The first of ``paths`` that is no folder, and what it is; one that cannot be looked
    at (permissions) is not known to be one."""
    for path in paths:
        try:
            if instead := not_a_folder(path):
                return path, instead
        except OSError:
            continue
    return None


def _check_complete(listed: set[str], images: list[Path], listing: Path, folder: Path) -> None:
    """Fail unless every image file name ``listing`` lists is among ``images`` of ``folder``:
    an archive extracted in part must not train or test on part of the data."""
    missing = sorted(listed - {p.name for p in images})
    if missing:
        # The names are the list's, not the folder's: only a plain one can name a file in
        # it ('..' or 'a/b' would name some folder elsewhere as standing in an image's place).
        plain = (n for n in missing if n not in ("", ".", "..") and "/" not in n)
        if found := not_a_file(*(folder / name for name in plain)):
            raise _in_place(*found)
        n = len(missing)
        raise _fail(
            f"{n} image{'s' * (n > 1)} listed in {listing} {'are' if n > 1 else 'is'} missing "
            f"from {folder} (the first: {missing[0]})",
            folder,
        )


def _train_images(folder: Path, wnid: str) -> list[Path]:
    """One class's training JPEGs: at least one, and exactly those its ``<wnid>_boxes.txt``
    lists (the official tree's list, one line per image, 500 per class; a curated subset
    edits it). An image it does not list would train under the folder's label, unseen."""
    class_dir = folder / "train" / wnid
    images = _jpegs(class_dir / "images")
    if not images:
        raise _fail(f"folder {class_dir / 'images'} holds no images", class_dir)
    boxes = class_dir / f"{wnid}_boxes.txt"
    lines = _read_text(boxes).splitlines()
    listed = {line.split("\t")[0].strip() for line in lines if line.strip()}
    _check_complete(listed, images, boxes, class_dir / "images")
    unlisted = sorted({p.name for p in images} - listed)
    if unlisted:
        n = len(unlisted)
        raise _fail(
            f"{n} image{'s' * (n > 1)} in {class_dir / 'images'} {'are' if n > 1 else 'is'} "
            f"not listed in {boxes} (the first: {unlisted[0]})",
            class_dir,
        )
    return images


def read_wnids(folder: Path) -> list[str]:
    """The class ids in ``wnids.txt``, in file order (= class index)."""
    path = folder / "wnids.txt"
    wnids = [line.strip() for line in _read_text(path).splitlines() if line.strip()]
    if not wnids:
        raise _fail(f"file {path} lists no classes", path)
    if len(set(wnids)) != len(wnids):
        raise _fail(f"file {path} lists a class twice", path)
    # Each wnid names a folder under train/: anything but a plain name ('..', 'a/b', NUL)
    # would read outside the tree or crash the file system call.
    bad = next((w for w in wnids if not WNID.fullmatch(w) or w in (".", "..")), None)
    if bad is not None:
        raise _fail(f"file {path} lists {bad!r}, which is not a class id like n01443537", path)
    return wnids


def read_val_annotations(folder: Path, class_index: dict[str, int]) -> dict[str, int]:
    """Map each val image file name to its class index, from ``val/val_annotations.txt``.

    Each line is tab-separated: file name, wnid, then four bounding-box numbers (unused).
    """
    path = folder / "val" / "val_annotations.txt"
    labels: dict[str, int] = {}
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise _fail(f"file {path} line {number} is not '<file>\\t<wnid>\\t...'", path)
        file_name, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in class_index:
            raise _fail(
                f"file {path} line {number} names class {wnid!r}, which is not in wnids.txt", path
            )
        # A second line would relabel the image without a word; the official file has one each.
        if labels.setdefault(file_name, class_index[wnid]) != class_index[wnid]:
            raise _fail(
                f"file {path} line {number} gives {file_name} class {wnid!r}, an earlier line "
                "another",
                path,
            )
    return labels


def _list_test(folder: Path, class_index: dict[str, int]) -> list[tuple[Path, int]]:
    """The (image path, label) list of the val split, which serves as the test split."""
    val_labels = read_val_annotations(folder, class_index)
    annotations = folder / "val" / "val_annotations.txt"
    val_images = _jpegs(folder / "val" / "images")
    _check_complete(set(val_labels), val_images, annotations, folder / "val" / "images")
    test = []
    for p in val_images:
        if p.name not in val_labels:
            raise _fail(f"val image {p} has no line in {annotations}", p)
        test.append((p, val_labels[p.name]))
    if not test:
        raise _fail(f"folder {folder} has no val images", folder)
    return test


#: The official archive's folders and files, by their path in its tree (``/``-separated):
#: images numbered from 0 (500 per class, 10,000 in val, test). Any class of the official
#: form (``n`` and eight digits) counts, its 200 being known only once wnids.txt is there.
_ARCHIVE_FOLDER = re.compile(r"train(/n[0-9]{8}(/images)?)?|(val|test)(/images)?", re.ASCII)
_ARCHIVE_FILE = re.compile(
    r"(wnids|words)\.txt|val/val_annotations\.txt"
    r"|train/(?P<w>n[0-9]{8})/(?P=w)_boxes\.txt"
    r"|train/(?P<i>n[0-9]{8})/images/(?P=i)_(0|[1-9][0-9]?|[1-4][0-9]{2})\.JPEG"
    r"|(?P<s>val|test)/images/(?P=s)_(0|[1-9][0-9]{0,3})\.JPEG",
    re.ASCII,
)


def _in_the_archives_way(folder: Path) -> str | None:
    """Why a download could not safely extract the archive around a tree extracted in part
    (``folder``), else None: the first place, breadth first and by name, where the official
    archive has a file or a folder and something else stands. The download would find it only
    after fetching 248 MB, and replace a file, or an empty folder, of one's own without a word:
    what may be the user's is theirs to move. Only the archive's own folders are listed, with
    scandir, whose entries know their type: no stat of each of the 110,000 files. A folder that
    may not be listed raises its PermissionError, for the caller to name."""
    if instead := not_a_folder(folder):
        return str(_in_place(folder, instead, "folder"))
    pending = deque([""])
    while pending:
        inside = pending.popleft()
        try:
            with os.scandir(folder / inside) as listing:
                names = sorted((e.name, e) for e in listing)
        except OSError as exc:
            if exc.errno in ABSENT:
                continue  # nothing there yet: the tree not begun, a link to nothing or a loop
            raise
        for name, entry in names:
            relative = inside + name
            path = folder / relative
            if _ARCHIVE_FOLDER.fullmatch(relative):
                # A link to a folder is left unlisted, as the extraction leaves it.
                if entry.is_dir(follow_symlinks=False):
                    pending.append(relative + "/")
                elif instead := not_a_folder(path):
                    return str(_in_place(path, instead, "folder"))
            elif (
                _ARCHIVE_FILE.fullmatch(relative)
                and not entry.is_file(follow_symlinks=False)
                and (found := not_a_file(path))
            ):
                return str(_in_place(*found))
    return None


def tree_problem(folder: Path) -> str | None:
    """Why the tree at ``folder`` is not whole (an unzip cut short, a file that may not be
    read), as the one line loading would give, or None: every list loading checks, checked
    against the files there, without decoding an image (its 201 image folders listed)."""
    try:
        wnids = read_wnids(folder)
        _list_test(folder, {wnid: i for i, wnid in enumerate(wnids)})
        for wnid in wnids:
            _train_images(folder, wnid)
    except BrainPropError as e:
        return str(e)
    return None


def decode_image(path: Path) -> np.ndarray:
    """Decode one JPEG to uint8 ``[3, 64, 64]``; grayscale and other modes become RGB."""
    try:
        # JPEG alone, as the official files are: Pillow would otherwise open any format it
        # knows from a file's content, EPS too, which it hands to Ghostscript.
        with Image.open(path, formats=("JPEG",)) as image:
            # From the header, before decoding: a damaged or hostile header may claim a huge
            # image, which would otherwise be allocated and decoded first.
            if image.size != IMAGE_SIZE:
                raise _fail(
                    f"image {path} is {image.size[0]}x{image.size[1]}, expected 64x64", path
                )
            rgb = image.convert("RGB")
    except PermissionError as exc:
        raise _fail(f"image {path} cannot be read", path, exc) from exc
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise _fail(f"image {path} cannot be decoded", path, exc) from exc
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)


def _decode_split(items: list[tuple[Path, int]], desc: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.empty((len(items), 3, *IMAGE_SIZE), dtype=np.uint8)
    y = np.empty(len(items), dtype=np.int64)
    # disable=None hides the bar when stderr is not a terminal (CI logs, tests).
    for i, (path, label) in enumerate(tqdm(items, desc=desc, unit="img", disable=None)):
        x[i] = decode_image(path)
        y[i] = label
    return x, y


def _manifest(folder: Path, train: list[tuple[Path, int]], test: list[tuple[Path, int]]) -> dict:
    """What the cache must have been built from: the exact file list and labels, and each
    file's size and modification time, so that a replaced or damaged image is decoded again."""
    listing = hashlib.sha256()
    for split, items in (("train", train), ("test", test)):
        for path, label in items:
            try:
                st = path.stat()
            except OSError as exc:  # listed a moment ago, and removed since
                raise _fail(f"image {path} cannot be read", path, exc) from exc
            name = path.relative_to(folder).as_posix()
            line = f"{split}\t{name}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\n"
            listing.update(line.encode())
    return {
        "version": CACHE_VERSION,
        "files_sha256": listing.hexdigest(),
        "train_files": len(train),
        "test_files": len(test),
    }


def _load_cache(cache: Path, manifest: dict, classes: int) -> dict[str, np.ndarray] | None:
    """The cached arrays if the cache was written for exactly this ``manifest`` and holds
    images and labels of ``classes`` classes, else None."""
    paths = {k: cache / f"{k}.npy" for k in CACHE_ARRAYS}
    try:
        # Reading a named pipe would wait for ever; whatever stands there, the cache is
        # rebuilt over it.
        if not_a_file(cache / "manifest.json", *paths.values()):
            return None
        if json.loads((cache / "manifest.json").read_text()) != manifest:
            return None
        # Mapped first, to check the shapes the headers claim without allocating them (a
        # damaged one claimed 67 TiB, a MemoryError), then read; a copy of the mapped arrays
        # would hold the 1.2 GB twice.
        mapped = {k: np.load(p, mmap_mode="r") for k, p in paths.items()}
        if not _cache_fits(mapped, manifest, classes):
            return None
        return {k: np.load(p, allow_pickle=False) for k, p in paths.items()}
    except (OSError, ValueError, EOFError, RecursionError):
        # A missing or damaged cache is rebuilt, never reported: it is ours, not the user's.
        # (np.load raises EOFError for a file cut short before its first array; json.loads
        # RecursionError for a manifest nested too deep.)
        return None


def _cache_fits(arrays: dict[str, np.ndarray], manifest: dict, classes: int) -> bool:
    """Whether the cache's ``arrays`` hold the images and labels of ``manifest``'s files."""
    n = {"train": manifest["train_files"], "test": manifest["test_files"]}
    for split in n:
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if (
            x.shape != (n[split], 3, *IMAGE_SIZE)
            or x.dtype != np.uint8
            or y.shape != (n[split],)
            or y.dtype != np.int64
            or (y.size and (y.min() < 0 or y.max() >= classes))
        ):
            return False
    return True


def _caches(folder: Path) -> list[Path]:
    """Where the tree in ``folder`` may have its decoded cache: inside it, and (for a tree
    this user cannot write) in the user's cache folder, named for the tree's real path (so
    that a tree reached through a link is cached once), where that folder is known."""
    place = hashlib.sha256(os.path.realpath(folder).encode()).hexdigest()[:16]
    try:
        user = user_cache_dir()
    except BrainPropError:  # no home folder: the tree's cache alone
        return [folder / CACHE_DIR]
    return [folder / CACHE_DIR, user / "decoded" / f"tiny-imagenet-{place}"]


def _holds(cache: Path) -> bool:
    """Whether this user may make and write the cache folder ``cache`` in the tree (a
    shared, read-only copy may not). Asked before writing, so that another failure there (a
    full disk) is said as such, not taken for a tree that cannot hold a cache."""
    if cache.exists():
        return cache.is_dir() and os.access(cache, os.W_OK | os.X_OK)
    return os.access(cache.parent, os.W_OK | os.X_OK)


def _load_either(folder: Path, manifest: dict, classes: int) -> dict[str, np.ndarray] | None:
    """The arrays of whichever of :func:`_caches` was written for exactly this ``manifest``."""
    for cache in _caches(folder):
        if (arrays := _load_cache(cache, manifest, classes)) is not None:
            return arrays
    return None


def _save_either(folder: Path, manifest: dict, arrays: dict[str, np.ndarray]) -> None:
    """Cache ``arrays`` in the tree, or where it cannot hold them, in the user's cache folder
    (and say so: 1.35 GB for the official tree); where that fails, say in one line that
    every load decodes the images again."""
    tree, *user = _caches(folder)
    cache = tree if _holds(tree) or not user else user[0]
    try:
        _save_cache(cache, manifest, arrays)
    except (OSError, BrainPropError) as exc:
        print(
            f"brainprop: warning: could not cache decoded Tiny ImageNet in {cache} "
            f"({reason(exc)}): every load decodes its images again (a minute for the official "
            "tree); free disk space there, or make that folder writable",
            file=sys.stderr,
        )
        return
    if cache != tree:
        why = (
            "something other than a folder stands where it goes"
            if tree.exists() and not tree.is_dir()
            else "this user may not write there, or its filesystem is read-only"
        )
        print(
            f"brainprop: Tiny ImageNet's tree {folder} cannot hold its decoded cache ({why}): "
            f"cached in {cache} instead",
            file=sys.stderr,
        )


def _save_cache(cache: Path, manifest: dict, arrays: dict[str, np.ndarray]) -> None:
    try:
        cache.mkdir(parents=True, exist_ok=True)
        # Held while written: processes loading at once (reproduce --jobs, torchrun's ranks)
        # each decode, and one removed another's temporaries below as a killed build's.
        with locks.held(cache, "another process is writing it"):
            # A build killed while writing (out of memory, at its peak) left a temporary file
            # as large as the training images, 1.2 GB, in this hidden folder.
            remove_temporaries(cache)
            (cache / "manifest.json").unlink(missing_ok=True)
            try:
                for key in CACHE_ARRAYS:
                    atomic_write(
                        cache / f"{key}.npy",
                        lambda f, a=arrays[key]: np.save(f, a, allow_pickle=False),
                    )
                # The manifest goes last: its presence vouches for the arrays beside it.
                atomic_write(
                    cache / "manifest.json", lambda f: f.write(json.dumps(manifest).encode())
                )
            except BaseException:
                # No manifest vouches for them: left, they would fill the disk for nothing.
                for key in CACHE_ARRAYS:
                    (cache / f"{key}.npy").unlink(missing_ok=True)
                raise
    except locks.Busy:
        pass  # the other process writes the same cache


@dataclass(frozen=True)
class TinyImageNetTree:
    """The format of Tiny ImageNet: the official tree under ``root/<name>/tiny-imagenet-200``,
    its ``val`` split serving as the test split: a :class:`~.catalog.Format`. Its files and
    lists are Tiny ImageNet's own; the name only places them."""

    image: ClassVar[tuple[int, int, int]] = (3, *IMAGE_SIZE)
    #: The official tree's; a tree whose wnids.txt lists others loads as many as it lists.
    classes: ClassVar[int] = 200
    #: Loading decodes 110,000 JPEGs (a minute), too long for a check before a download.
    verified_by_loading: ClassVar[bool] = False

    def dataset_dir(self, name: str, root: Path) -> Path:
        """``root/<name>/tiny-imagenet-200``."""
        return root / name / SUBDIR

    def inside_hint(self, name: str, root: Path) -> str | None:
        """The fix where ``root`` is a folder inside the data root that holds the tree
        (:func:`~.messages.inside_root`), else None."""
        return inside_root(root, Path(name, SUBDIR, "wnids.txt"))

    def how_to_get(self, name: str, root: Path) -> str:
        """A one-line hint on obtaining the tree into the data root ``root``."""
        return (
            self.inside_hint(name, root)
            or unpacked_too_deep(self.dataset_dir(name, root), "wnids.txt")
            or unpacked_too_high(root, self.dataset_dir(name, root), "wnids.txt")
            or f"run {download_command(name, root)} or unzip tiny-imagenet-200.zip into "
            f"{root / name}"
        )

    def status(self, name: str, root: Path) -> DatasetStatus:
        """Present where the tree's lists and image folders agree (no image decoded), and
        whether a decoded cache is there."""
        folder = self.dataset_dir(name, root)
        wnids, annotations = folder / "wnids.txt", folder / "val" / "val_annotations.txt"
        present = all(p.exists() for p in (wnids, folder / "train", annotations))
        cached = any((cache / "manifest.json").is_file() for cache in _caches(folder))
        note = "decoded cache present" if cached else ""
        # A tree in part: a download would extract the archive around what is there (review).
        damaged = (tree_problem if present else _in_the_archives_way)(folder) or ""
        unreadable = damaged.endswith(PERMISSIONS_FIX)
        hint = self.how_to_get(name, root)
        return DatasetStatus(name, present and not damaged, folder, hint, note, damaged, unreadable)

    def load(self, name: str, root: Path, *, test_only: bool = False) -> Dataset:
        """Load the tree from ``root/<name>/tiny-imagenet-200``.

        Returns a :class:`Dataset` with ``train_x`` uint8 ``[100000, 3, 64, 64]`` and
        ``test_x`` (the official val split) ``[10000, 3, 64, 64]`` for the official tree; 200
        classes. ``test_only``: the training images are neither listed nor decoded and the
        training split is empty. Nor is the cache read: it vouches for both splits, and
        checking it would mean listing and reading the size of every training image.
        """
        folder = self.dataset_dir(name, root)
        if instead := not_a_folder(folder):
            raise _in_place(folder, instead, "folder")
        if not folder.is_dir():
            raise BrainPropError(
                f"Tiny ImageNet folder {folder} is missing: {self.how_to_get(name, root)}"
            )
        if hint := unpacked_too_deep(folder, "wnids.txt"):
            raise BrainPropError(f"Tiny ImageNet folder {folder} holds no tree of its own: {hint}")
        wnids = read_wnids(folder)
        class_index = {wnid: i for i, wnid in enumerate(wnids)}
        test = _list_test(folder, class_index)
        if test_only:
            test_x, test_y = _decode_split(test, "decoding Tiny ImageNet val")
            return Dataset.test_only(
                name, torch.from_numpy(test_x), torch.from_numpy(test_y), len(wnids)
            )
        train = [(p, i) for i, wnid in enumerate(wnids) for p in _train_images(folder, wnid)]
        manifest = _manifest(folder, train, test)
        arrays = _load_either(folder, manifest, len(wnids))
        if arrays is None:
            train_x, train_y = _decode_split(train, "decoding Tiny ImageNet train")
            test_x, test_y = _decode_split(test, "decoding Tiny ImageNet val")
            arrays = {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}
            _save_either(folder, manifest, arrays)
        t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
        return Dataset(name, t["train_x"], t["train_y"], t["test_x"], t["test_y"], len(wnids))
