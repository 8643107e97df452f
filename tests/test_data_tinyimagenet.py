"""Tiny ImageNet from the official folder tree, with the decoded-once cache."""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import WNIDS, write_tiny_imagenet
from PIL import Image

from brainprop import locks
from brainprop.data import dataset_status, download, load_dataset
from brainprop.data import tinyimagenet as tin
from brainprop.errors import BrainPropError

# The fixtures' folder is the default data root: see tests/test_data_registry.py for the
# download advice of another root.
pytestmark = pytest.mark.usefixtures("default_root_here")


def _reference(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).transpose(2, 0, 1)


def test_loads_tree_with_wnids_order_labels(tmp_path: Path) -> None:
    folder = write_tiny_imagenet(tmp_path)
    ds = load_dataset("tiny-imagenet", tmp_path)
    assert ds.num_classes == 3 and ds.input_shape == (3, 64, 64)
    assert ds.train_x.shape == (6, 3, 64, 64) and ds.test_x.shape == (4, 3, 64, 64)
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64
    assert ds.train_y.tolist() == [0, 0, 1, 1, 2, 2]
    # val_0..3 are annotated with WNIDS[2], [0], [1], [2].
    assert ds.test_y.tolist() == [2, 0, 1, 2]
    first = folder / "train" / WNIDS[0] / "images" / f"{WNIDS[0]}_0.JPEG"
    assert np.array_equal(ds.train_x[0].numpy(), _reference(first))


def test_grayscale_becomes_rgb(tmp_path: Path) -> None:
    folder = write_tiny_imagenet(tmp_path)
    gray = folder / "train" / WNIDS[1] / "images" / f"{WNIDS[1]}_0.JPEG"
    with Image.open(gray) as image:
        assert image.mode == "L"
        luminance = np.asarray(image)
    ds = load_dataset("tiny-imagenet", tmp_path)
    for channel in range(3):
        assert np.array_equal(ds.train_x[2, channel].numpy(), luminance)


def test_second_load_uses_cache_without_decoding(tmp_path: Path, monkeypatch) -> None:
    write_tiny_imagenet(tmp_path)
    first = load_dataset("tiny-imagenet", tmp_path)
    assert next(s for s in dataset_status(tmp_path) if s.name == "tiny-imagenet").note

    def refuse(*args, **kwargs):
        raise AssertionError("decoded a JPEG although the cache is valid")

    monkeypatch.setattr(tin.Image, "open", refuse)
    second = load_dataset("tiny-imagenet", tmp_path)
    for a, b in zip(
        (first.train_x, first.train_y, first.test_x, first.test_y),
        (second.train_x, second.train_y, second.test_x, second.test_y),
        strict=True,
    ):
        assert torch.equal(a, b)


def _tiny_imagenet_cached_once(root: Path, monkeypatch) -> Path:
    """Load the tree under ``root`` twice, the second time from a cache (a decode fails the
    test), with ``$XDG_CACHE_HOME`` in ``root``; returns that user cache folder."""
    user = root / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(user))
    first = load_dataset("tiny-imagenet", root)
    with monkeypatch.context() as m:
        m.setattr(tin.Image, "open", lambda *a, **k: pytest.fail("decoded again"))
        second = load_dataset("tiny-imagenet", root)
        assert next(s for s in dataset_status(root) if s.name == "tiny-imagenet").note
    assert torch.equal(first.train_x, second.train_x) and torch.equal(first.test_y, second.test_y)
    return user / "brainprop" / "decoded"


def test_a_tree_that_cannot_hold_its_cache_is_cached_in_the_users_cache_folder(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """A shared, read-only tree was decoded again by every load (a minute for the official
    one), behind a two-line UserWarning (review). A file where the cache goes refuses it as a
    read-only tree does, for root as well."""
    folder = write_tiny_imagenet(tmp_path)
    (folder / tin.CACHE_DIR).write_text("in the way")
    decoded = _tiny_imagenet_cached_once(tmp_path, monkeypatch)
    [user] = decoded.iterdir()
    assert user == tin._caches(folder)[1]
    assert capsys.readouterr().err == (
        f"brainprop: Tiny ImageNet's tree {folder} cannot hold its decoded cache (something "
        f"other than a folder stands where it goes): cached in {user} instead\n"
    )
    # The same tree through a link is cached once.
    (tmp_path / "link").symlink_to(tmp_path)
    assert tin._caches(tmp_path / "link" / folder.relative_to(tmp_path))[1] == user
    # A user without a home folder keeps the tree's cache alone, where datasets crashed.
    with monkeypatch.context() as m:
        m.setattr(tin, "user_cache_dir", lambda: (_ for _ in ()).throw(BrainPropError("none")))
        assert tin._caches(folder) == [folder / tin.CACHE_DIR]
    # A tree that can hold its cache keeps it there, and nothing goes to the user's.
    (folder / tin.CACHE_DIR).unlink()
    shutil.rmtree(decoded)
    assert _tiny_imagenet_cached_once(tmp_path, monkeypatch).exists() is False
    assert (folder / tin.CACHE_DIR / "manifest.json").is_file()
    assert capsys.readouterr().err == ""


def _said_uncached(err: str, where: str) -> None:
    """``err`` is the one line saying that the decoded images could not be cached in
    ``where`` (the cache folder and the start of the cause)."""
    assert err.count("\n") == 1
    assert err.startswith(f"brainprop: warning: could not cache decoded Tiny ImageNet in {where}")
    assert err.endswith(
        "): every load decodes its images again (a minute for the official tree); free disk "
        "space there, or make that folder writable\n"
    )


def test_a_cache_that_can_go_nowhere_is_one_line_saying_what_that_costs(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    folder = write_tiny_imagenet(tmp_path)
    (folder / tin.CACHE_DIR).write_text("in the way")
    (tmp_path / "xdg").write_text("in the way too")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    for _ in range(2):
        assert len(load_dataset("tiny-imagenet", tmp_path).train_y)
        _said_uncached(capsys.readouterr().err, f"{tin._caches(folder)[1]} (")


def test_a_tree_whose_disk_fills_as_its_cache_is_written_says_so_and_leaves_no_arrays(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """A full disk was taken for a tree that cannot hold a cache: the cache went to the
    user's folder without a word, and the arrays written before the failure stayed, 1.2 GB
    that no manifest vouched for (review)."""
    folder = write_tiny_imagenet(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    save = np.save

    def full_at_train_y(file, array, **kwargs) -> None:  # the labels come after the images
        if array.dtype == np.int64:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        save(file, array, **kwargs)

    monkeypatch.setattr(tin.np, "save", full_at_train_y)
    assert len(load_dataset("tiny-imagenet", tmp_path).train_y)
    cache = folder / tin.CACHE_DIR
    cause = f"(cannot write {cache / 'train_y.npy'} (No space left on device); nothing was "
    _said_uncached(capsys.readouterr().err, f"{cache} {cause}written: ")
    assert list(cache.iterdir()) == [] and not (tmp_path / "xdg").exists()


def test_cache_is_rebuilt_when_files_change(tmp_path: Path) -> None:
    folder = write_tiny_imagenet(tmp_path)
    load_dataset("tiny-imagenet", tmp_path)
    # An image taken out of the tree and out of its class's list, as a curated subset would be.
    (folder / "train" / WNIDS[0] / "images" / f"{WNIDS[0]}_1.JPEG").unlink()
    boxes = folder / "train" / WNIDS[0] / f"{WNIDS[0]}_boxes.txt"
    boxes.write_text(boxes.read_text().splitlines(keepends=True)[0])
    assert load_dataset("tiny-imagenet", tmp_path).train_y.tolist() == [0, 1, 1, 2, 2]


def test_a_val_image_relabelled_after_caching_takes_its_new_label(tmp_path: Path) -> None:
    """The labels are part of the cache's manifest: the same files, annotated anew, must not
    load the old labels from the cache."""
    folder = write_tiny_imagenet(tmp_path)
    assert load_dataset("tiny-imagenet", tmp_path).test_y.tolist() == [2, 0, 1, 2]
    annotations = folder / "val" / "val_annotations.txt"
    lines = annotations.read_text().splitlines(keepends=True)
    assert lines[0].startswith(f"val_0.JPEG\t{WNIDS[2]}\t")
    annotations.write_text("".join([lines[0].replace(WNIDS[2], WNIDS[0]), *lines[1:]]))
    assert load_dataset("tiny-imagenet", tmp_path).test_y.tolist() == [0, 0, 1, 2]


@pytest.mark.parametrize(("name", "array"), [("train_x", "shape"), ("test_y", "dtype")])
def test_a_cache_array_of_another_shape_or_dtype_is_rebuilt(
    tmp_path: Path, name: str, array: str
) -> None:
    folder = write_tiny_imagenet(tmp_path)
    expected = load_dataset("tiny-imagenet", tmp_path)
    path = folder / tin.CACHE_DIR / f"{name}.npy"
    cached = np.load(path)
    np.save(path, cached[:-1] if array == "shape" else cached.astype(np.int16))
    again = load_dataset("tiny-imagenet", tmp_path)
    assert torch.equal(getattr(again, name), getattr(expected, name))


def test_an_image_changed_after_caching_is_decoded_again(tmp_path: Path) -> None:
    folder = write_tiny_imagenet(tmp_path)
    load_dataset("tiny-imagenet", tmp_path)
    image = folder / "train" / WNIDS[0] / "images" / f"{WNIDS[0]}_0.JPEG"
    Image.new("RGB", (64, 64), (200, 100, 50)).save(image)
    assert np.array_equal(load_dataset("tiny-imagenet", tmp_path).train_x[0], _reference(image))
    image.write_bytes(image.read_bytes()[:100])
    assert f"image {image} cannot be decoded" in _error(tmp_path)


def test_damaged_cache_is_rebuilt(tmp_path: Path) -> None:
    folder = write_tiny_imagenet(tmp_path)
    load_dataset("tiny-imagenet", tmp_path)
    (folder / tin.CACHE_DIR / "train_x.npy").write_bytes(b"garbage")
    assert load_dataset("tiny-imagenet", tmp_path).train_x.shape == (6, 3, 64, 64)


@pytest.mark.parametrize("images", [6 * 10**9, 7])
def test_a_cache_header_claiming_other_images_is_rebuilt_unallocated(
    tmp_path: Path, images: int
) -> None:
    """A header claiming 6e9 images was allocated (67 TiB, a MemoryError) before the file was
    found short; one claiming 7 of the 6 images, allocated too, before the same (review)."""
    folder = write_tiny_imagenet(tmp_path)
    expected = load_dataset("tiny-imagenet", tmp_path).train_x
    path = folder / tin.CACHE_DIR / "train_x.npy"
    with path.open("rb") as f:
        np.lib.format.read_magic(f)
        np.lib.format.read_array_header_1_0(f)
        pixels = f.read()
    with path.open("wb") as f:
        header = {"descr": "|u1", "fortran_order": False, "shape": (images, 3, 64, 64)}
        np.lib.format.write_array_header_1_0(f, header)
        f.write(pixels)
    assert torch.equal(load_dataset("tiny-imagenet", tmp_path).train_x, expected)


def test_a_manifest_nested_too_deep_is_a_damaged_cache(tmp_path: Path) -> None:
    folder = write_tiny_imagenet(tmp_path)
    load_dataset("tiny-imagenet", tmp_path)
    (folder / tin.CACHE_DIR / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    assert load_dataset("tiny-imagenet", tmp_path).train_x.shape == (6, 3, 64, 64)


def test_cache_file_cut_to_nothing_is_rebuilt(tmp_path: Path) -> None:
    # np.load raises EOFError, not OSError or ValueError, for an empty file.
    folder = write_tiny_imagenet(tmp_path)
    load_dataset("tiny-imagenet", tmp_path)
    (folder / tin.CACHE_DIR / "train_x.npy").write_bytes(b"")
    assert load_dataset("tiny-imagenet", tmp_path).train_x.shape == (6, 3, 64, 64)


def test_cache_with_labels_outside_the_classes_is_rebuilt(tmp_path: Path) -> None:
    """Its shapes and dtypes were checked, its labels not: the Dataset check then refused them
    with advice for data of one's own."""
    folder = write_tiny_imagenet(tmp_path)
    expected = load_dataset("tiny-imagenet", tmp_path).train_y
    path = folder / tin.CACHE_DIR / "train_y.npy"
    labels = np.load(path)
    labels[0] = len(WNIDS)
    np.save(path, labels)
    assert torch.equal(load_dataset("tiny-imagenet", tmp_path).train_y, expected)


def _error(tmp_path: Path) -> str:
    with pytest.raises(BrainPropError) as info:
        load_dataset("tiny-imagenet", tmp_path)
    message = str(info.value)
    assert "\n" not in message
    return message


def _refused_alike(tmp_path: Path, expected: str) -> None:
    """Loading refuses the tree with ``expected``, and ``brainprop datasets`` calls it damaged
    with the same words."""
    assert _error(tmp_path) == expected
    [status] = dataset_status(tmp_path, ["tiny-imagenet"])
    assert (status.present, status.damaged) == (False, expected)


def fix(folder: Path) -> str:
    return f"the tree is damaged; delete {folder} and run 'brainprop download tiny-imagenet'"


@pytest.mark.parametrize("wnid", ["..", ".", "a/b", "n0\x00", "n01443537 x"])
def test_a_class_id_that_is_no_plain_name_is_refused(tmp_path: Path, wnid: str) -> None:
    """Each names a folder under train/: '..' or 'a/b' would read outside the tree, and a NUL
    crashed the file system call (found by the fuzz test)."""
    folder = write_tiny_imagenet(tmp_path)
    path = folder / "wnids.txt"
    path.write_text(path.read_text() + wnid + "\n")
    assert _error(tmp_path) == (
        f"Tiny ImageNet file {path} lists {wnid!r}, which is not a class id like n01443537: "
        f"{fix(folder)}"
    )


def test_missing_val_annotations(tmp_path: Path) -> None:
    folder = write_tiny_imagenet(tmp_path)
    path = folder / "val" / "val_annotations.txt"
    path.unlink()
    assert _error(tmp_path) == f"Tiny ImageNet file {path} is missing: {fix(folder)}"


def _never_read_pipes(monkeypatch) -> None:
    """Fail where a named pipe is opened: reading one waits for a writer for ever, so the
    test would hang, not fail, on code that does."""
    targets = ((Path, "read_text"), (Path, "open"), (tin.np, "load"), (tin.Image, "open"))
    for owner, name in targets:
        real = getattr(owner, name)

        def guarded(path, *args, _real=real, **kwargs):
            try:
                pipe = stat.S_ISFIFO(os.stat(path).st_mode)
            except (OSError, TypeError):  # a file to be created, an open file object
                pipe = False
            if pipe:
                raise AssertionError(f"{path}, a named pipe, was opened")
            return _real(path, *args, **kwargs)

        monkeypatch.setattr(owner, name, guarded)


@pytest.mark.parametrize(
    ("where", "kind"),
    [
        ("wnids.txt", "pipe"),
        ("wnids.txt", "folder"),
        ("val/val_annotations.txt", "pipe"),
        (f"train/{WNIDS[1]}/{WNIDS[1]}_boxes.txt", "folder"),
        (f"train/{WNIDS[1]}/images/{WNIDS[1]}_0.JPEG", "folder"),
        ("val/images/val_2.JPEG", "pipe"),
    ],
)
def test_a_pipe_or_folder_in_a_files_place_is_named_and_never_read(
    tmp_path: Path, monkeypatch, where: str, kind: str
) -> None:
    """Reading a pipe waited for a writer for ever, in loading and in ``brainprop datasets``;
    a folder was called missing, or the tree damaged and to be deleted, though what it holds
    may be the user's (reviews)."""
    folder = write_tiny_imagenet(tmp_path)
    path = folder / where
    path.unlink()
    if kind == "pipe":
        os.mkfifo(path)
    else:
        path.mkdir()
    _never_read_pipes(monkeypatch)
    expected = (
        f"Tiny ImageNet file {path} is a {'named pipe' if kind == 'pipe' else 'folder'}, not a "
        "file: move or remove it, then run 'brainprop download tiny-imagenet'"
    )
    _refused_alike(tmp_path, expected)


@pytest.mark.parametrize(
    "where", ["", "val/images", f"train/{WNIDS[1]}", f"train/{WNIDS[1]}/images"]
)
def test_a_file_in_a_folders_place_is_named_as_such(tmp_path: Path, where: str) -> None:
    """Loading called the tree's own folder missing, and said to download it, which refused;
    a file in an image folder's place made the tree damaged, to be deleted (review)."""
    folder = write_tiny_imagenet(tmp_path)
    path = folder / where
    shutil.rmtree(path)
    path.write_text("mine")
    expected = (
        f"Tiny ImageNet folder {path} is a file, not a folder: move or remove it, then run "
        "'brainprop download tiny-imagenet'"
    )
    _refused_alike(tmp_path, expected)


def test_hidden_files_beside_the_images_are_no_images(tmp_path: Path) -> None:
    """macOS's ._* files beside each JPEG of a tree copied on a Mac made it damaged (review)."""
    folder = write_tiny_imagenet(tmp_path)
    clean = load_dataset("tiny-imagenet", tmp_path)
    shutil.rmtree(folder / tin.CACHE_DIR)
    for images in (folder / "val" / "images", folder / "train" / WNIDS[1] / "images"):
        for jpeg in list(images.iterdir()):
            (images / f"._{jpeg.name}").write_bytes(b"\x00\x05\x16\x07")
    again = load_dataset("tiny-imagenet", tmp_path)
    assert torch.equal(again.train_x, clean.train_x) and torch.equal(again.test_y, clean.test_y)


@pytest.mark.parametrize(
    ("where", "text", "said"),
    [
        ("wnids.txt", "\n\n", "lists no classes"),
        ("wnids.txt", f"{WNIDS[0]}\n{WNIDS[1]}\n{WNIDS[0]}\n", "lists a class twice"),
        ("val/val_annotations.txt", f"val_0.JPEG {WNIDS[0]} 0 0 63 63\n", "line 1 is not"),
        ("val/val_annotations.txt", "", "has no val images"),
    ],
)
def test_lists_that_do_not_make_a_tree_are_refused(
    tmp_path: Path, where: str, text: str, said: str
) -> None:
    """No classes, one twice (two indices for one folder), an annotation split by spaces, not
    tabs, or no val images at all: each a damaged tree, in one line."""
    folder = write_tiny_imagenet(tmp_path)
    (folder / where).write_text(text)
    if said == "has no val images":
        shutil.rmtree(folder / "val" / "images")
        (folder / "val" / "images").mkdir()
    assert said in _error(tmp_path)


@pytest.mark.parametrize("name", ["..", "", "\x00al_0.JPEG", "../images", "x" * 300])
def test_a_listed_name_that_is_no_plain_file_name_is_missing_not_in_place(
    tmp_path: Path, name: str
) -> None:
    """Looking for what stands in a listed image's place, '..' named the folder above as if
    it did, and a NUL (found by the fuzz test) or a name too long for any file crashed the
    look."""
    folder = write_tiny_imagenet(tmp_path)
    annotations = folder / "val" / "val_annotations.txt"
    annotations.write_text(annotations.read_text().replace("val_0.JPEG", name, 1))
    assert _error(tmp_path).startswith(f"Tiny ImageNet 1 image listed in {annotations} is missing")


@pytest.mark.parametrize(
    ("where", "kind", "said"),
    [
        ("wnids.txt", "folder", "file {} is a folder, not a file"),
        ("wnids.txt", "link to a folder", "file {} is a folder, not a file"),
        ("val/val_annotations.txt", "pipe", "file {} is a named pipe, not a file"),
        (f"train/{WNIDS[1]}/{WNIDS[1]}_boxes.txt", "folder", "file {} is a folder, not a file"),
        (
            f"train/{WNIDS[2]}/images/{WNIDS[2]}_1.JPEG",
            "pipe",
            "file {} is a named pipe, not a file",
        ),
        ("val/images/val_3.JPEG", "folder", "file {} is a folder, not a file"),
        ("test/images/test_0.JPEG", "folder", "file {} is a folder, not a file"),
        ("val/images", "file", "folder {} is a file, not a folder"),
        ("", "file", "folder {} is a file, not a folder"),
        (f"train/{WNIDS[0]}", "pipe", "folder {} is a named pipe, not a folder"),
    ],
)
def test_what_stands_in_the_archives_way_in_a_tree_in_part_is_named_before_a_download(
    tmp_path: Path, monkeypatch, where: str, kind: str, said: str
) -> None:
    """The tree looked missing, so a download fetched 248 MB, then failed to keep a folder
    beside the tree it extracted (review); deeper than the two lists it was found only then,
    and a file where the archive has a folder went with the old tree, without a word."""
    folder = write_tiny_imagenet(tmp_path)
    (folder / "wnids.txt").unlink()  # so the tree is in part
    path = folder / where
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "folder":
        path.mkdir()
    elif kind == "pipe":
        os.mkfifo(path)
    elif kind == "file":
        path.write_text("the user's")
    else:
        (tmp_path / "notes").mkdir()
        path.symlink_to(tmp_path / "notes")
    _never_read_pipes(monkeypatch)
    [status] = dataset_status(tmp_path, ["tiny-imagenet"])
    assert status.damaged == (
        f"Tiny ImageNet {said.format(path)}: move or remove it, then run "
        "'brainprop download tiny-imagenet'"
    )
    with pytest.raises(BrainPropError, match=f"{path.name} {said.split(' ', 2)[2]}"):
        download("tiny-imagenet", tmp_path, base_url="http://127.0.0.1:9", progress=False)


def test_a_tree_in_part_with_nothing_in_the_archives_way_is_missing_not_damaged(
    tmp_path: Path,
) -> None:
    """Folders of one's own where the archive has none, links to nothing or in a loop (the
    tree's own folder too), and a link to a folder (which the extraction does not look into)
    stand in no file's way."""
    folder = write_tiny_imagenet(tmp_path)
    (folder / "wnids.txt").unlink()
    for mine in (
        "train/notes/images/x.JPEG",
        "val/images/val_10000.JPEG",
        "val/images/val_\u0661.JPEG",
    ):
        (folder / mine).mkdir(parents=True)
    (folder / "val" / "images" / "val_0.JPEG").unlink()
    (folder / "val" / "images" / "val_0.JPEG").symlink_to(tmp_path / "nowhere")
    (folder / "words.txt").symlink_to(folder / "words.txt")
    linked = tmp_path / "elsewhere"
    (linked / "images" / "test_0.JPEG").mkdir(parents=True)
    shutil.rmtree(folder / "test")
    (folder / "test").symlink_to(linked)
    [status] = dataset_status(tmp_path, ["tiny-imagenet"])
    assert (status.present, status.damaged) == (False, "")
    loop = tmp_path / "loop" / "tiny-imagenet" / "tiny-imagenet-200"
    loop.parent.mkdir(parents=True)
    loop.symlink_to(loop)
    [status] = dataset_status(tmp_path / "loop", ["tiny-imagenet"])
    assert (status.present, status.damaged) == (False, "")


def test_a_folder_of_a_tree_in_part_that_may_not_be_listed_is_named(
    tmp_path: Path, monkeypatch
) -> None:
    """Named as what may not be looked inside, before a download, where it was skipped and
    the download swapped the user's files in it away with the old tree (review)."""
    folder = write_tiny_imagenet(tmp_path)
    (folder / "wnids.txt").unlink()
    barred = folder / "val"
    real_scandir = os.scandir

    def scandir(path):
        if Path(path) == barred:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(tin.os, "scandir", scandir)
    [status] = dataset_status(tmp_path, ["tiny-imagenet"])
    assert status.unreadable and status.path == barred
    assert (
        status.damaged == f"cannot look inside {barred} (Permission denied): check its permissions"
    )
    with pytest.raises(BrainPropError, match=f"cannot look inside {barred} "):
        download("tiny-imagenet", tmp_path, base_url="http://127.0.0.1:9", progress=False)


def test_a_pipe_in_the_cache_is_rebuilt_over_unread(tmp_path: Path, monkeypatch) -> None:
    folder = write_tiny_imagenet(tmp_path)
    expected = load_dataset("tiny-imagenet", tmp_path).train_x
    manifest = folder / tin.CACHE_DIR / "manifest.json"
    manifest.unlink()
    os.mkfifo(manifest)
    _never_read_pipes(monkeypatch)
    assert torch.equal(load_dataset("tiny-imagenet", tmp_path).train_x, expected)
    assert manifest.is_file()


def test_unknown_wnid_in_annotations(tmp_path: Path) -> None:
    folder = write_tiny_imagenet(tmp_path)
    path = folder / "val" / "val_annotations.txt"
    path.write_text(path.read_text().replace(WNIDS[1], "n99999999"))
    assert _error(tmp_path) == (
        f"Tiny ImageNet file {path} line 3 names class 'n99999999', which is not in wnids.txt: "
        + fix(folder)
    )


def test_an_image_labelled_twice_in_the_annotations_is_refused(tmp_path: Path) -> None:
    """A second line for val_0 with another class relabelled it without a word (review)."""
    folder = write_tiny_imagenet(tmp_path)
    path = folder / "val" / "val_annotations.txt"
    lines = path.read_text().splitlines()
    first = lines[0].split("\t")
    other = next(w for w in WNIDS if w != first[1])
    path.write_text("\n".join([*lines, "\t".join([first[0], other, *first[2:]])]) + "\n")
    assert _error(tmp_path) == (
        f"Tiny ImageNet file {path} line {len(lines) + 1} gives {first[0]} class {other!r}, an "
        f"earlier line another: {fix(folder)}"
    )


def test_corrupt_jpeg(tmp_path: Path) -> None:
    folder = write_tiny_imagenet(tmp_path)
    path = folder / "val" / "images" / "val_2.JPEG"
    path.write_bytes(path.read_bytes()[:300])
    message = _error(tmp_path)
    assert message.startswith(f"Tiny ImageNet image {path} cannot be decoded (")
    assert message.endswith(fix(folder))


def test_not_a_jpeg_at_all(tmp_path: Path) -> None:
    folder = write_tiny_imagenet(tmp_path)
    path = folder / "train" / WNIDS[2] / "images" / f"{WNIDS[2]}_1.JPEG"
    path.write_bytes(b"")
    assert _error(tmp_path).startswith(f"Tiny ImageNet image {path} cannot be decoded (")


@pytest.mark.parametrize("kind", ["PNG", "EPS"])
def test_an_image_of_another_format_is_refused_undecoded(tmp_path: Path, kind: str) -> None:
    """The official files are JPEGs. Pillow opens any format it knows from the content: a PNG
    loaded as if it were one, and an EPS went to Ghostscript (review)."""
    folder = write_tiny_imagenet(tmp_path)
    path = folder / "val" / "images" / "val_1.JPEG"
    if kind == "PNG":
        Image.new("RGB", (64, 64)).save(path, format="PNG")
    else:
        path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nshowpage\n")
    assert _error(tmp_path).startswith(f"Tiny ImageNet image {path} cannot be decoded (")


def test_wrong_image_size(tmp_path: Path) -> None:
    folder = write_tiny_imagenet(tmp_path)
    path = folder / "val" / "images" / "val_0.JPEG"
    Image.new("RGB", (32, 64)).save(path, format="JPEG")
    assert _error(tmp_path) == f"Tiny ImageNet image {path} is 32x64, expected 64x64: {fix(folder)}"


def test_unannotated_val_image(tmp_path: Path) -> None:
    folder = write_tiny_imagenet(tmp_path)
    path = folder / "val" / "images" / "val_9.JPEG"
    path.write_bytes((folder / "val" / "images" / "val_0.JPEG").read_bytes())
    assert _error(tmp_path).startswith(f"Tiny ImageNet val image {path} has no line in ")


def test_missing_class_folder(tmp_path: Path) -> None:
    folder = write_tiny_imagenet(tmp_path)
    (folder / "wnids.txt").write_text("\n".join(WNIDS) + "\nn00000001\n")
    missing = folder / "train" / "n00000001" / "images"
    assert _error(tmp_path) == f"Tiny ImageNet folder {missing} is missing: {fix(folder)}"


def test_a_val_image_annotated_but_absent_is_refused(tmp_path: Path) -> None:
    """A half-extracted archive must not test on part of the val split."""
    folder = write_tiny_imagenet(tmp_path)
    (folder / "val" / "images" / "val_3.JPEG").unlink()
    (folder / "val" / "images" / "val_1.JPEG").unlink()
    assert _error(tmp_path) == (
        f"Tiny ImageNet 2 images listed in {folder / 'val' / 'val_annotations.txt'} are missing "
        f"from {folder / 'val' / 'images'} (the first: val_1.JPEG): {fix(folder)}"
    )


def test_a_training_image_its_class_lists_but_lacks_is_refused(tmp_path: Path) -> None:
    folder = write_tiny_imagenet(tmp_path)
    class_dir = folder / "train" / WNIDS[2]
    (class_dir / "images" / f"{WNIDS[2]}_1.JPEG").unlink()
    assert _error(tmp_path) == (
        f"Tiny ImageNet 1 image listed in {class_dir / f'{WNIDS[2]}_boxes.txt'} is missing "
        f"from {class_dir / 'images'} (the first: {WNIDS[2]}_1.JPEG): {fix(folder)}"
    )


def test_a_training_image_its_class_does_not_list_is_refused(tmp_path: Path) -> None:
    """A stray JPEG in a class folder trained under that folder's label, unseen (a review)."""
    folder = write_tiny_imagenet(tmp_path)
    class_dir = folder / "train" / WNIDS[0]
    stray = class_dir / "images" / f"{WNIDS[1]}_99.JPEG"
    shutil.copy(class_dir / "images" / f"{WNIDS[0]}_0.JPEG", stray)
    assert _error(tmp_path) == (
        f"Tiny ImageNet 1 image in {class_dir / 'images'} is not listed in "
        f"{class_dir / f'{WNIDS[0]}_boxes.txt'} (the first: {stray.name}): {fix(folder)}"
    )
    stray.unlink()
    # Without its list, a class's images cannot be checked: an image lost would go unseen.
    (class_dir / f"{WNIDS[0]}_boxes.txt").unlink()
    assert _error(tmp_path) == (
        f"Tiny ImageNet file {class_dir / f'{WNIDS[0]}_boxes.txt'} is missing: {fix(folder)}"
    )


def test_a_cache_build_killed_while_writing_leaves_no_temporary_behind(tmp_path: Path) -> None:
    folder = write_tiny_imagenet(tmp_path)
    cache = folder / tin.CACHE_DIR
    cache.mkdir()
    left = cache / ".train_x.npy.2521u2z0.tmp"
    left.write_bytes(b"\0" * 1000)
    load_dataset("tiny-imagenet", tmp_path)
    assert not left.exists() and (cache / "manifest.json").is_file()


def test_a_cache_another_process_is_writing_is_left_to_it(tmp_path: Path, capsys) -> None:
    """Processes loading at once each wrote the cache, and one deleted another's temporary
    file mid-write, warning of a full disk (review)."""
    folder = write_tiny_imagenet(tmp_path)
    cache = folder / tin.CACHE_DIR
    cache.mkdir()
    writing = cache / ".train_x.npy.2521u2z0.tmp"
    writing.write_bytes(b"\0" * 1000)
    with locks.held(cache, "busy"):
        ds = load_dataset("tiny-imagenet", tmp_path)
    assert len(ds.train_y) and writing.exists() and not (cache / "manifest.json").exists()
    assert capsys.readouterr().err == ""


def test_a_class_without_images_is_refused(tmp_path: Path) -> None:
    folder = write_tiny_imagenet(tmp_path)
    class_dir = folder / "train" / WNIDS[1]
    (class_dir / f"{WNIDS[1]}_boxes.txt").unlink()
    for image in (class_dir / "images").iterdir():
        image.unlink()
    assert _error(tmp_path) == (
        f"Tiny ImageNet folder {class_dir / 'images'} holds no images: {fix(folder)}"
    )


def test_an_image_removed_while_the_tree_is_read_is_named(tmp_path: Path, monkeypatch) -> None:
    folder = write_tiny_imagenet(tmp_path)
    path = folder / "val" / "images" / "val_0.JPEG"
    listed = tin._list_test

    def list_then_remove(folder: Path, class_index: dict[str, int]):
        files = listed(folder, class_index)
        path.unlink()
        return files

    monkeypatch.setattr(tin, "_list_test", list_then_remove)
    message = _error(tmp_path)
    assert message.startswith(f"Tiny ImageNet image {path} cannot be read (")
    assert message.endswith(f": {fix(folder)}")


@pytest.mark.parametrize("where", ["wnids.txt", "val/images", "val/images/val_0.JPEG"])
def test_a_file_this_user_may_not_read_is_a_permissions_problem_not_damage(
    tmp_path: Path, monkeypatch, where: str
) -> None:
    """Deleting and downloading 248 MB again would not help; permissions would."""
    folder = write_tiny_imagenet(tmp_path)
    denied = folder / where
    original = {"read_text": Path.read_text, "scandir": tin.os.scandir, "open": tin.Image.open}

    def refuse(name):
        def call(path, *args, **kwargs):
            if Path(path) == denied:
                raise PermissionError(13, "Permission denied", str(path))
            return original[name](path, *args, **kwargs)

        return call

    monkeypatch.setattr(Path, "read_text", refuse("read_text"))
    monkeypatch.setattr(tin.os, "scandir", refuse("scandir"))
    monkeypatch.setattr(tin.Image, "open", refuse("open"))
    message = _error(tmp_path)
    assert message.startswith("Tiny ImageNet ") and f" {denied} cannot be " in message
    assert message.endswith("): check its permissions") and "delete" not in message


def test_missing_dataset(tmp_path: Path) -> None:
    folder = tmp_path / "tiny-imagenet" / "tiny-imagenet-200"
    assert _error(tmp_path) == (
        f"Tiny ImageNet folder {folder} is missing: run 'brainprop download tiny-imagenet' or "
        f"unzip tiny-imagenet-200.zip into {folder.parent}"
    )


def test_a_tree_unzipped_one_folder_too_deep_is_to_be_moved_up_not_deleted(tmp_path: Path) -> None:
    folder = write_tiny_imagenet(tmp_path)
    nested = folder / "tiny-imagenet-200"
    nested.mkdir()
    for entry in list(folder.iterdir()):
        if entry != nested:
            entry.rename(nested / entry.name)
    move = f"move what {nested} holds up into {folder}, where brainprop looks for it"
    assert _error(tmp_path) == f"Tiny ImageNet folder {folder} holds no tree of its own: {move}"
    (status,) = dataset_status(tmp_path, ["tiny-imagenet"])
    assert not status.present and status.how_to_get == move
    for entry in list(nested.iterdir()):
        entry.rename(folder / entry.name)
    nested.rmdir()
    assert load_dataset("tiny-imagenet", tmp_path).num_classes == 3
