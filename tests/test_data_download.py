"""`download` against a local HTTP server serving fixture archives."""

from __future__ import annotations

import errno
import functools
import gzip
import hashlib
import http.server
import io
import os
import pickle
import signal
import socket
import tarfile
import threading
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import (
    REPO,
    WNIDS,
    cifar_pickle,
    patch_format,
    patch_remote,
    tar_gz_bytes,
    tree_bytes,
    write_cifar10,
    write_cifar100,
    write_idx_dataset,
    write_tiny_imagenet,
    zip_bytes,
)

from brainprop import locks
from brainprop.cli import main
from brainprop.data import dataset_status, download, fetch, load_dataset
from brainprop.data.catalog import CATALOG
from brainprop.data.messages import unpacked_too_deep
from brainprop.errors import BrainPropError

# The fixtures' folder is the default data root: see tests/test_data_registry.py for the
# download advice of another root.
pytestmark = pytest.mark.usefixtures("default_root_here")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A folder and the http://127.0.0.1:<port> URL that serves it."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(folder))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def _serve(folder: Path, name: str, content: bytes, monkeypatch, dataset: str) -> None:
    """Serve ``content`` as ``dataset``'s official file ``name``, whose md5 it takes."""
    (folder / name).write_bytes(content)
    patch_remote(monkeypatch, dataset, name, md5=hashlib.md5(content).hexdigest())


def _cifar_archive(tmp_path: Path) -> bytes:
    write_cifar10(tmp_path / "src")
    folder = tmp_path / "src" / "cifar10" / "cifar-10-batches-py"
    return tar_gz_bytes(tree_bytes(folder, "cifar-10-batches-py"))


def test_mnist_gz_files(tmp_path: Path, server, monkeypatch) -> None:
    served, url = server
    write_idx_dataset(tmp_path / "src")
    for path in (tmp_path / "src").iterdir():
        _serve(served, path.name, path.read_bytes(), monkeypatch, "mnist")
    root = tmp_path / "root"
    old_umask = os.umask(0o022)
    try:
        assert download("mnist", root, base_url=url, progress=False) == root / "mnist"
    finally:
        os.umask(old_umask)
    assert sorted(p.name for p in (root / "mnist").iterdir()) == sorted(
        p.name for p in (tmp_path / "src").iterdir()
    )
    # Readable as any new file is, not owner-only as the temporary file was made.
    assert {p.stat().st_mode & 0o777 for p in (root / "mnist").iterdir()} == {0o644}
    assert load_dataset("mnist", root).train_x.shape == (6, 1, 28, 28)


def test_cifar10_tar_gz(tmp_path: Path, server, monkeypatch) -> None:
    served, url = server
    archive = _cifar_archive(tmp_path)
    _serve(served, "cifar-10-python.tar.gz", archive, monkeypatch, "cifar10")
    root = tmp_path / "root"
    path = download("cifar10", root, base_url=url, progress=True)
    assert path == root / "cifar10" / "cifar-10-batches-py"
    # Only the extracted folder remains: no archive, no temp files.
    assert [p.name for p in (root / "cifar10").iterdir()] == ["cifar-10-batches-py"]
    assert load_dataset("cifar10", root).train_x.shape == (15, 3, 32, 32)
    # Present now, so a second call fetches nothing, even with the server gone.
    assert download("cifar10", root, base_url="http://127.0.0.1:9", progress=False) == path


def test_a_linked_data_folder_keeps_its_link(tmp_path: Path, server, monkeypatch) -> None:
    """An incomplete copy behind a link (to another disk) was replaced by a local folder, and
    the link was gone (a review): the data goes where the link points."""
    served, url = server
    _serve(served, "cifar-10-python.tar.gz", _cifar_archive(tmp_path), monkeypatch, "cifar10")
    elsewhere = tmp_path / "other-disk" / "cifar"
    (elsewhere / "mine").mkdir(parents=True)
    (elsewhere / "data_batch_1").write_bytes(pickle.dumps("an older copy"))
    (elsewhere / "mine" / "notes.txt").write_text("the user's")
    link = tmp_path / "root" / "cifar10" / "cifar-10-batches-py"
    link.parent.mkdir(parents=True)
    link.symlink_to(elsewhere)
    assert download("cifar10", tmp_path / "root", base_url=url, progress=False) == link
    assert link.is_symlink() and link.resolve() == elsewhere
    assert [p.name for p in link.parent.iterdir()] == [link.name]
    assert [p.name for p in elsewhere.parent.iterdir()] == ["cifar"]  # no work folder left
    assert load_dataset("cifar10", tmp_path / "root").train_x.shape == (15, 3, 32, 32)
    # A file the archive does not hold is the user's: kept, where it was deleted with the rest.
    assert (elsewhere / "mine" / "notes.txt").read_text() == "the user's"
    plain = tmp_path / "root2" / "cifar10" / "cifar-10-batches-py"
    (plain / ".brainprop-cache").mkdir(parents=True)
    (plain / "notes.txt").write_text("the user's")
    (plain / ".brainprop-cache" / "train_x.npy").write_bytes(b"a cache of the old copy")
    (tmp_path / "outside.txt").write_text("not the data's")
    (plain / "outside-link").symlink_to(tmp_path / "outside.txt")
    assert download("cifar10", tmp_path / "root2", base_url=url, progress=False) == plain
    assert (plain / "notes.txt").read_text() == "the user's"
    assert not (plain / ".brainprop-cache").exists()  # hidden: brainprop's own, not copied
    # A link is no file of the user's there: what it points to is not copied into the tree.
    assert not (plain / "outside-link").exists() and (tmp_path / "outside.txt").exists()
    assert [p.name for p in plain.parent.iterdir()] == [plain.name]


def _replace_failing(monkeypatch, fails: dict[int, BaseException]) -> list[Path]:
    """Make fetch's ``os.replace`` raise ``fails[n]`` at its n-th call (1-based) and rename
    at the others; returns the list it fills with each call's target."""
    replace, calls = os.replace, []

    def failing(source, target):
        calls.append(Path(target))
        if len(calls) in fails:
            raise fails[len(calls)]
        replace(source, target)

    monkeypatch.setattr(fetch.os, "replace", failing)
    return calls


def test_a_download_stopped_between_its_renames_is_recovered_by_the_next(
    tmp_path: Path, server, monkeypatch, capsys
) -> None:
    """Killed with the old tree aside and the new one not yet in, a download left the user's
    files aside for good, and the next took none of them into its tree (review)."""
    served, url = server
    _serve(served, "cifar-10-python.tar.gz", _cifar_archive(tmp_path), monkeypatch, "cifar10")
    root = tmp_path / "root"
    place = root / "cifar10" / "cifar-10-batches-py"
    (place / "mine").mkdir(parents=True)
    (place / "data_batch_1").write_bytes(pickle.dumps("an older copy"))
    (place / "mine" / "notes.txt").write_text("the user's")
    with monkeypatch.context() as killed, pytest.raises(SystemExit):
        _replace_failing(killed, {2: SystemExit("killed")})
        download("cifar10", root, base_url=url, progress=False)
    [aside] = place.parent.glob("cifar-10-batches-py.old-*")
    assert not place.exists() and (aside / place.name / "mine" / "notes.txt").exists()
    assert download("cifar10", root, base_url=url, progress=False) == place
    assert (place / "mine" / "notes.txt").read_text() == "the user's"
    assert sorted(p.name for p in place.parent.iterdir()) == [place.name]
    assert load_dataset("cifar10", root).train_x.shape == (15, 3, 32, 32)
    # An empty one (stopped before the tree moved in) goes without a word; beside a tree in
    # place, one is kept and named: a failed rename may have left it.
    aside.mkdir()
    fetch._recover_aside(place)
    assert not aside.exists() and capsys.readouterr().err == ""
    (aside / place.name).mkdir(parents=True)
    fetch._recover_aside(place)
    assert capsys.readouterr().err == (
        f"brainprop: {aside} holds an older copy of {place} that a stopped download put aside: "
        "keep what of it is yours, then remove it\n"
    )
    assert (aside / place.name).is_dir()


def test_cifar100_tar_gz(tmp_path: Path, server, monkeypatch) -> None:
    served, url = server
    arrays = write_cifar100(tmp_path / "src")
    folder = tmp_path / "src" / "cifar100" / "cifar-100-python"
    archive = tar_gz_bytes(tree_bytes(folder, "cifar-100-python"))
    _serve(served, "cifar-100-python.tar.gz", archive, monkeypatch, "cifar100")
    root = tmp_path / "root"
    path = download("cifar100", root, base_url=url, progress=False)
    assert path == root / "cifar100" / "cifar-100-python"
    assert [p.name for p in (root / "cifar100").iterdir()] == ["cifar-100-python"]
    ds = load_dataset("cifar100", root)
    assert ds.num_classes == 100 and ds.train_y.tolist() == arrays["train_fine"]
    # The coarse labels come from the same download.
    assert load_dataset("cifar100-coarse", root).test_y.tolist() == arrays["test_coarse"]


def test_tiny_imagenet_zip(tmp_path: Path, server, monkeypatch) -> None:
    served, url = server
    folder = write_tiny_imagenet(tmp_path / "src")
    content = zip_bytes(tree_bytes(folder, "tiny-imagenet-200"))
    _serve(served, "tiny-imagenet-200.zip", content, monkeypatch, "tiny-imagenet")
    root = tmp_path / "root"
    download("tiny-imagenet", root, base_url=url, progress=False)
    assert load_dataset("tiny-imagenet", root).test_y.tolist() == [2, 0, 1, 2]


def _served_tiny_imagenet(tmp_path: Path, server, monkeypatch) -> tuple[str, Path, Path]:
    """Serve a fixture Tiny ImageNet archive; the base URL, the data root to download it
    into and the tree it will be extracted to there."""
    served, url = server
    folder = write_tiny_imagenet(tmp_path / "src")
    content = zip_bytes(tree_bytes(folder, "tiny-imagenet-200"))
    _serve(served, "tiny-imagenet-200.zip", content, monkeypatch, "tiny-imagenet")
    root = tmp_path / "root"
    return url, root, root / "tiny-imagenet" / "tiny-imagenet-200"


def _while_fetching(monkeypatch, make: Callable[[], object]) -> None:
    """Run ``make`` as a download starts to fetch: after its checks of what is there."""
    real_fetch = fetch._fetch

    def fetching(*args, **kwargs):
        make()
        return real_fetch(*args, **kwargs)

    monkeypatch.setattr(fetch, "_fetch", fetching)


def test_a_folder_of_ones_own_where_the_archive_has_a_file_is_named(
    tmp_path: Path, server, monkeypatch
) -> None:
    """A tree extracted in part, with a folder of notes where a class's list goes: the user's
    files are kept beside a new tree, and this one could not be. It is named before anything
    is fetched; one made while the download runs is named once the archive is extracted,
    where the message said to check free disk space (review)."""
    url, root, tree = _served_tiny_imagenet(tmp_path, server, monkeypatch)
    boxes = tree / "train" / WNIDS[0] / f"{WNIDS[0]}_boxes.txt"
    boxes.mkdir(parents=True)
    (boxes / "notes").write_text("mine")
    with pytest.raises(BrainPropError) as info:
        download("tiny-imagenet", root, base_url="http://127.0.0.1:9", progress=False)
    assert str(info.value) == (
        f"Tiny ImageNet file {boxes} is a folder, not a file: move or remove it, then run "
        f"'brainprop download tiny-imagenet --data-dir {root}'"
    )
    (boxes / "notes").unlink()
    boxes.rmdir()

    def make_notes():
        boxes.mkdir()
        (boxes / "notes").write_text("mine")

    _while_fetching(monkeypatch, make_notes)
    with pytest.raises(BrainPropError) as info:
        download("tiny-imagenet", root, base_url=url, progress=False)
    assert str(info.value) == (
        f"{boxes} is a folder, where the download has a file: move it out of {tree}, then run "
        "the command again"
    )
    assert (boxes / "notes").read_text() == "mine"


def test_a_file_of_ones_own_where_the_archive_has_a_folder_is_named(
    tmp_path: Path, server, monkeypatch
) -> None:
    """One made while the download runs (one there before is named before anything is
    fetched): it was taken for the archive's own and went with the old tree (review)."""
    url, root, tree = _served_tiny_imagenet(tmp_path, server, monkeypatch)
    (tree / "val").mkdir(parents=True)
    mine = tree / "val" / "images"
    _while_fetching(monkeypatch, lambda: mine.write_text("mine"))
    with pytest.raises(BrainPropError) as info:
        download("tiny-imagenet", root, base_url=url, progress=False)
    assert str(info.value) == (
        f"{mine} is a file, where the download has a folder: move it out of {tree}, then run "
        "the command again"
    )
    assert mine.read_text() == "mine"


def test_what_blocks_the_downloads_place_is_named_in_one_line(
    tmp_path: Path, server, monkeypatch
) -> None:
    """A folder where a file goes, a data folder linked to a disk not mounted: tracebacks
    before (review), and the link was no reason to fetch 170 MB first."""
    served, url = server
    write_idx_dataset(tmp_path / "src")
    for path in (tmp_path / "src").iterdir():
        _serve(served, path.name, path.read_bytes(), monkeypatch, "mnist")
    root = tmp_path / "root"
    blocked = root / "mnist" / "t10k-labels-idx1-ubyte.gz"
    blocked.mkdir(parents=True)
    (blocked / "keep").write_text("the user's")
    with pytest.raises(BrainPropError) as info:
        download("mnist", root, base_url=url, progress=False)
    # Refused before anything is fetched, now that a data root's status names it.
    assert str(info.value) == (
        f"{blocked} is a folder, not a file: move or remove it, then run "
        f"'brainprop download mnist --data-dir {root}'"
    )
    # Beside the same file unzipped, which loading reads first, it is in the way only once
    # the download is there to put in place.
    plain = gzip.decompress((tmp_path / "src" / blocked.name).read_bytes())
    blocked.with_suffix("").write_bytes(plain)
    with pytest.raises(BrainPropError) as info:
        download("mnist", root, base_url=url, progress=False)
    assert str(info.value).startswith(f"cannot put the download in place at {blocked} (")
    assert str(info.value).endswith(f"): move or remove {blocked}, then run the command again")
    assert (blocked / "keep").read_text() == "the user's"
    assert not [p for p in (root / "mnist").iterdir() if p.name.endswith(".part")]

    link = root / "cifar10" / "cifar-10-batches-py"
    link.parent.mkdir()
    link.symlink_to(tmp_path / "unmounted" / "cifar")
    with pytest.raises(BrainPropError) as info:
        download("cifar10", root, base_url="http://127.0.0.1:9", progress=False)  # not fetched
    assert str(info.value) == (
        f"{link} links to {tmp_path / 'unmounted' / 'cifar'}, which is not there: mount or "
        "create it, or remove the link, then run the command again"
    )
    assert link.is_symlink() and [p.name for p in link.parent.iterdir()] == [link.name]
    # The dataset's own folder: a link to nothing, a file. "cannot create the folder (File
    # exists): choose a writable data root" before (a review).
    (root / "tiny-imagenet").symlink_to(tmp_path / "unmounted" / "tiny")
    with pytest.raises(BrainPropError, match=r"tiny-imagenet links to .*, which is not there"):
        download("tiny-imagenet", root, base_url="http://127.0.0.1:9", progress=False)
    (root / "cifar100").write_text("not a folder")
    with pytest.raises(BrainPropError) as info:
        download("cifar100", root, base_url="http://127.0.0.1:9", progress=False)
    assert str(info.value) == (
        f"cifar100's folder {root / 'cifar100'} is a file, not a folder: move or remove it, "
        "then run the command again"
    )
    # The archive's top folder: the tree swapped in for it deleted the file without a word.
    top = root / "cifar100" / "cifar-100-python"
    (root / "cifar100").unlink()
    top.parent.mkdir()
    top.write_text("the user's")
    with pytest.raises(BrainPropError) as info:
        download("cifar100", root, base_url="http://127.0.0.1:9", progress=False)
    assert str(info.value) == (
        f"cifar100's folder {top} is a file, not a folder: move or remove it, then run the "
        "command again"
    )
    assert top.read_text() == "the user's"


def test_a_damaged_file_of_a_partial_dataset_is_named_before_anything_is_fetched(
    tmp_path: Path,
) -> None:
    """An uncompressed file is read in place of the .gz a download would bring, so a cut-short
    one (an interrupted 'gunzip -c > file') left beside nothing else made the download say
    "ready" and training fail after it."""
    write_idx_dataset(tmp_path / "src", gz=False)
    images = tmp_path / "root" / "mnist" / "train-images-idx3-ubyte"
    images.parent.mkdir(parents=True)
    images.write_bytes((tmp_path / "src" / images.name).read_bytes()[:100])
    nowhere = (tmp_path / "no-mirror").as_uri()
    with pytest.raises(BrainPropError) as info:
        download("mnist", tmp_path / "root", base_url=nowhere, progress=False)
    assert str(info.value) == (
        f"{images} is cut short or padded (its header declares 4720 bytes, it holds 100): "
        f"delete it and run 'brainprop download mnist --data-dir {tmp_path / 'root'}'"
    )
    assert [p.name for p in images.parent.iterdir()] == [images.name]


def test_files_already_there_are_read_before_they_are_called_ready(tmp_path: Path) -> None:
    """Damage that keeps a file's size (a flipped byte) is found by reading it, as training
    would: the gzip CRC, the pickle's content. Nothing is fetched, nor replaced."""
    nowhere = (tmp_path / "no-mirror").as_uri()
    write_idx_dataset(tmp_path / "mnist")
    assert download("mnist", tmp_path, base_url=nowhere, progress=False) == tmp_path / "mnist"
    images = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    whole = images.read_bytes()
    images.write_bytes(whole[:-9])
    with pytest.raises(BrainPropError) as info:
        download("mnist", tmp_path, base_url=nowhere, progress=False)
    assert str(info.value).startswith(f"{images} is cut short or damaged (its header declares")
    flipped = bytearray(whole)
    flipped[len(whole) // 2] ^= 0xFF
    images.write_bytes(bytes(flipped))
    with pytest.raises(BrainPropError) as info:
        download("mnist", tmp_path, base_url=nowhere, progress=False)
    assert str(info.value).startswith(f"MNIST file {images} cannot be read (")
    assert str(info.value).endswith("): delete it and run 'brainprop download mnist'")
    assert images.read_bytes() == flipped

    write_cifar10(tmp_path)
    batch = tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(cifar_pickle({b"data": np.zeros((2, 3072), np.uint8)}))
    with pytest.raises(BrainPropError) as info:
        download("cifar10", tmp_path, base_url=nowhere, progress=False)
    assert str(info.value) == (
        f"CIFAR file {batch} has no b'labels' entry: delete it and run 'brainprop download cifar10'"
    )


def test_a_killed_downloads_leftovers_are_removed_by_the_next(
    tmp_path: Path, server, monkeypatch
) -> None:
    served, url = server
    _serve(served, "cifar-10-python.tar.gz", _cifar_archive(tmp_path), monkeypatch, "cifar10")
    dest = tmp_path / "root" / "cifar10"
    (dest / ".cifar-10-batches-py.extract-k1ll3d" / "cifar-10-batches-py").mkdir(parents=True)
    (dest / ".extract-0ld3r" / "cifar-10-batches-py").mkdir(parents=True)  # an older version's
    (dest / ".cifar-10-python.tar.gz.k1ll3d.part").write_bytes(b"the first half")
    download("cifar10", tmp_path / "root", base_url=url, progress=False)
    assert [p.name for p in dest.iterdir()] == ["cifar-10-batches-py"]


def test_a_killed_extraction_beside_a_links_target_is_removed_by_the_next(
    tmp_path: Path, server, monkeypatch
) -> None:
    """The half-extracted tree lay beside the link's target (on another disk), where only the
    dataset's folder was cleaned, and stayed there for good (review). Another folder's work
    beside it, and a target whose name is a glob's, are left alone and found."""
    served, url = server
    _serve(served, "cifar-10-python.tar.gz", _cifar_archive(tmp_path), monkeypatch, "cifar10")
    elsewhere = tmp_path / "other-disk" / "cifar[1]"
    killed = elsewhere.parent / ".cifar[1].extract-k1ll3d" / "cifar-10-batches-py"
    killed.mkdir(parents=True)
    (elsewhere.parent / ".cifar[2].extract-running").mkdir()
    elsewhere.mkdir()  # an incomplete copy, as a link to nothing is refused
    link = tmp_path / "root" / "cifar10" / "cifar-10-batches-py"
    link.parent.mkdir(parents=True)
    link.symlink_to(elsewhere)
    assert download("cifar10", tmp_path / "root", base_url=url, progress=False) == link
    assert sorted(p.name for p in elsewhere.parent.iterdir()) == [
        ".cifar[2].extract-running",
        "cifar[1]",
    ]
    assert load_dataset("cifar10", tmp_path / "root").train_x.shape == (15, 3, 32, 32)
    # Another data root's link to the same target: its download, while this one's holds the
    # target's folder, is refused, where it took this one's work folder for a leftover.
    other = tmp_path / "root2" / "cifar10" / "cifar-10-batches-py"
    other.parent.mkdir(parents=True)
    other.symlink_to(elsewhere)
    (elsewhere / "data_batch_1").unlink()  # incomplete, so that it is fetched
    with locks.held(elsewhere.parent, "held"), pytest.raises(BrainPropError) as info:
        download("cifar10", tmp_path / "root2", base_url=url, progress=False)
    assert str(info.value) == (
        f"{elsewhere.parent} is being extracted into by another process: wait for it to end"
    )


def test_a_loop_of_links_where_the_tree_goes_is_one_line(tmp_path: Path) -> None:
    """A RuntimeError ("Symlink loop") went out as a traceback (review)."""
    dest = tmp_path / "root" / "cifar10"
    dest.mkdir(parents=True)
    (dest / "cifar-10-batches-py").symlink_to("loop")
    (dest / "loop").symlink_to("cifar-10-batches-py")
    with pytest.raises(BrainPropError, match="cifar-10-batches-py links to loop, which is not"):
        download("cifar10", tmp_path / "root", base_url="http://127.0.0.1:9", progress=False)


def test_a_stop_signal_ends_a_download_in_one_line_and_leaves_nothing(
    tmp_path: Path, server, monkeypatch, capsys, sigterm_caught
) -> None:
    """SIGTERM (a job's time limit) killed it without a word, and left its partial archive
    and a new empty folder (review)."""
    served, url = server
    _serve(served, "cifar-10-python.tar.gz", _cifar_archive(tmp_path), monkeypatch, "cifar10")
    row = CATALOG["cifar10"]
    monkeypatch.setitem(CATALOG, "cifar10", replace(row, source=replace(row.source, base_url=url)))
    real_read = fetch._read_chunk

    def read_stopped(*args, **kwargs):
        chunk = real_read(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return chunk

    monkeypatch.setattr(fetch, "_read_chunk", read_stopped)
    root = tmp_path / "root"
    assert main(["download", "cifar10", "--data-dir", str(root)]) == 128 + signal.SIGTERM
    assert capsys.readouterr().err.endswith("brainprop: stopped by SIGTERM while downloading\n")
    assert list(root.iterdir()) == []


@pytest.mark.parametrize(
    ("name", "top", "marker"),
    [("cifar10", "cifar-10-batches-py", "batches.meta"),
     ("tiny-imagenet", "tiny-imagenet-200", "wnids.txt")],
)  # fmt: skip
def test_a_tree_unpacked_one_folder_too_deep_is_to_be_moved_up_not_fetched_again(
    tmp_path: Path, server, name: str, top: str, marker: str
) -> None:
    """The download fetched the archive again and copied the whole nested tree into the new
    one, file by file, as files of one's own (review)."""
    _, url = server
    nested = tmp_path / "root" / name / top / top
    nested.mkdir(parents=True)
    (nested / marker).write_bytes(b"")
    # Beside a file of one's own, or the rest of a tree moved up in part (review).
    (nested.parent / "notes.txt").write_bytes(b"")
    with pytest.raises(BrainPropError) as info:
        download(name, tmp_path / "root", base_url=url, progress=False)
    assert str(info.value) == (
        f"{name} is unpacked one folder too deep: move what {nested} holds up into "
        f"{nested.parent}, where brainprop looks for it"
    )
    assert {p.name for p in nested.parent.iterdir()} == {"notes.txt", top}
    # An empty folder of that name, or one beside the tree's own top file, is no tree unpacked
    # too deep (review): nothing to move up.
    (nested / marker).unlink()
    assert unpacked_too_deep(nested.parent, marker) is None
    (nested / marker).write_bytes(b"")
    (nested.parent / marker).write_bytes(b"")
    assert unpacked_too_deep(nested.parent, marker) is None


@pytest.mark.parametrize("where", ["root", "dataset folder"])
@pytest.mark.parametrize(
    ("name", "top", "files"),
    [("cifar10", "cifar-10-batches-py", ("batches.meta", "data_batch_1")),
     ("cifar100", "cifar-100-python", ("meta", "train")),
     ("tiny-imagenet", "tiny-imagenet-200", ("wnids.txt",))],
)  # fmt: skip
def test_a_tree_extracted_one_folder_too_high_is_to_be_moved_not_fetched_again(
    tmp_path: Path, server, name: str, top: str, files: tuple[str, ...], where: str
) -> None:
    """'tar xzf' or 'unzip' in the data root, or the tree's files in the dataset's folder: the
    tree was called missing, and the download fetched it again beside itself (review). The
    advice names the tree's place in full: 'mv' to a folder not yet made renames the tree to
    it, where brainprop still did not look (review)."""
    _, url = server
    root = tmp_path / "root"
    folder = root / CATALOG[name].source.folder
    loose = root / top if where == "root" else folder
    loose.mkdir(parents=True)
    for file in files:
        (loose / file).write_bytes(b"")
    move = (
        f"move {loose} to {folder / top} (make {folder} first), where brainprop looks for it"
        if where == "root"
        else f"move the archive's files in {folder} into a folder {folder / top}, where "
        "brainprop looks for them"
    )
    [status] = dataset_status(root, [name])
    assert (status.present, status.how_to_get) == (False, move)
    with pytest.raises(BrainPropError) as info:
        load_dataset(name, root)
    assert str(info.value).endswith(f" is missing: {move}")
    with pytest.raises(BrainPropError) as info:
        download(name, root, base_url=url, progress=False)
    assert str(info.value) == f"{name} is extracted one folder too high: {move}"
    assert list(root.iterdir()) == [loose if where == "root" else folder]
    assert sorted(p.name for p in loose.iterdir()) == sorted(files)
    if where == "root":
        # Moved as told, the tree is where brainprop looks: no longer missing.
        folder.mkdir()
        loose.rename(folder / top)
        assert dataset_status(root, [name])[0].how_to_get != move


def test_a_folder_being_downloaded_into_is_left_alone(tmp_path: Path, server) -> None:
    _, url = server
    dest = tmp_path / "root" / "cifar10"
    dest.mkdir(parents=True)
    part = dest / ".cifar-10-python.tar.gz.other.part"
    part.write_bytes(b"another process's download, in progress")
    with locks.held(dest, "busy"), pytest.raises(BrainPropError) as info:
        download("cifar10", tmp_path / "root", base_url=url, progress=False)
    assert str(info.value) == (
        f"{dest} is being downloaded into by another process: wait for it to end"
    )
    assert part.exists()


def test_every_file_is_on_disk_before_its_name_is(tmp_path: Path, server, monkeypatch) -> None:
    """A power cut must not leave a final name standing for a file of fewer bytes."""
    served, url = server
    write_idx_dataset(tmp_path / "src")
    for path in (tmp_path / "src").iterdir():
        _serve(served, path.name, path.read_bytes(), monkeypatch, "mnist")
    archive = _cifar_archive(tmp_path)
    _serve(served, "cifar-10-python.tar.gz", archive, monkeypatch, "cifar10")
    events: list[str] = []
    real_fsync, real_sync, real_replace = os.fsync, fetch._sync_filesystem, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(
        fetch, "_sync_filesystem", lambda folder: (events.append("sync"), real_sync(folder))[1]
    )

    def replace(src, dst):
        events.append(f"replace {Path(dst).name}")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    download("mnist", tmp_path / "root", base_url=url, progress=False)
    files = CATALOG["mnist"].source.files
    assert events == [x for file in files for x in ("fsync", f"replace {file.name}")]
    events.clear()
    download("cifar10", tmp_path / "root", base_url=url, progress=False)
    assert events == ["fsync", "sync", "replace cifar-10-batches-py"]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts /proc/self/fd")
def test_a_failed_download_closes_its_file(tmp_path: Path, server, monkeypatch) -> None:
    def refused(fd: int) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(fetch, "usual_permissions", refused)
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(BrainPropError, match="cannot write into .*check free disk space"):
        download("mnist", tmp_path / "root", base_url=server[1], progress=False)
    assert len(os.listdir("/proc/self/fd")) == before


def test_checksum_mismatch_leaves_nothing(tmp_path: Path, server) -> None:
    served, url = server
    (served / "cifar-10-python.tar.gz").write_bytes(_cifar_archive(tmp_path))
    root = tmp_path / "root"
    with pytest.raises(BrainPropError) as info:
        download("cifar10", root, base_url=url, progress=False)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"downloaded {url}/cifar-10-python.tar.gz has md5 ")
    assert "expected c58f30108f718f92721af3b95e74349a: the download is damaged" in message
    assert not (root / "cifar10").exists()


def test_a_body_far_larger_than_the_published_file_is_cut_off(
    tmp_path: Path, server, monkeypatch
) -> None:
    """The md5 is known only at the end: a wrong or hostile server (two hosts are plain http)
    could fill the disk first (review)."""
    served, url = server
    archive = _cifar_archive(tmp_path)
    (served / "cifar-10-python.tar.gz").write_bytes(archive)
    patch_remote(monkeypatch, "cifar10", "cifar-10-python.tar.gz", size=len(archive) // 3)
    root = tmp_path / "root"
    with pytest.raises(BrainPropError) as info:
        download("cifar10", root, base_url=url, progress=False)
    assert str(info.value) == (
        f"{url}/cifar-10-python.tar.gz sent more than {2 * (len(archive) // 3):,} bytes, twice "
        "the published file's size, so it is some other file: check the base URL, or download "
        f"it by hand and extract it into {root / 'cifar10'}"
    )
    assert not (root / "cifar10").exists()
    # Up to twice the size it is taken, as the published sizes are known to within a percent.
    md5 = hashlib.md5(archive).hexdigest()
    half = -(-len(archive) // 2)
    patch_remote(monkeypatch, "cifar10", "cifar-10-python.tar.gz", size=half, md5=md5)
    assert download("cifar10", root, base_url=url, progress=False).is_dir()


def test_the_shipped_mnist_files_have_the_published_sizes() -> None:
    # The MNIST files the repository ships are the published ones (the training images
    # gzipped anew, data/README.md), so their sizes check the table.
    sizes = {file.name: file.size for file in CATALOG["mnist"].source.files}
    for path in (REPO / "data" / "mnist").iterdir():
        if not path.name.startswith("train-images"):
            assert sizes[path.name] == path.stat().st_size


def _evil_tar(member: tarfile.TarInfo, content: bytes = b"") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        ok = tarfile.TarInfo("cifar-10-batches-py/readme")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"hi"))
        member.size = len(content)
        tar.addfile(member, io.BytesIO(content))
    return buffer.getvalue()


def _symlink(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = "/etc/passwd"
    return info


def _hardlink(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE
    info.linkname = "cifar-10-batches-py/readme"
    return info


def _fifo(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.FIFOTYPE
    return info


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (tarfile.TarInfo("cifar-10-batches-py/../../evil"), "points outside its folder"),
        (tarfile.TarInfo("../evil"), "points outside its folder"),
        (tarfile.TarInfo("/tmp/evil"), "points outside its folder"),
        (_symlink("cifar-10-batches-py/evil"), "has a link member"),
        (_hardlink("cifar-10-batches-py/evil"), "has a link member"),
        # Windows's separators and drives, which extraction on Windows would follow.
        (tarfile.TarInfo("cifar-10-batches-py\\..\\..\\evil"), "points outside its folder"),
        (tarfile.TarInfo("C:evil"), "points outside its folder"),
        (_fifo("cifar-10-batches-py/evil"), "has a special-file member"),
    ],
)
def test_tar_slip_and_links_refused(
    tmp_path: Path, server, monkeypatch, member: tarfile.TarInfo, message: str
) -> None:
    served, url = server
    content = _evil_tar(member, b"pwned" if member.isfile() else b"")
    _serve(served, "cifar-10-python.tar.gz", content, monkeypatch, "cifar10")
    root = tmp_path / "root"
    with pytest.raises(BrainPropError, match=message) as info:
        download("cifar10", root, base_url=url, progress=False)
    assert "refusing to extract it" in str(info.value)
    assert not (root / "cifar10").exists()
    assert not (tmp_path / "evil").exists() and not (root / "evil").exists()


def test_zip_slip_refused(tmp_path: Path, server, monkeypatch) -> None:
    served, url = server
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("tiny-imagenet-200/wnids.txt", "n1\n")
        zf.writestr("tiny-imagenet-200/../../evil", "pwned")
    _serve(served, "tiny-imagenet-200.zip", buffer.getvalue(), monkeypatch, "tiny-imagenet")
    with pytest.raises(BrainPropError, match="points outside its folder"):
        download("tiny-imagenet", tmp_path / "root", base_url=url, progress=False)
    assert not (tmp_path / "evil").exists() and not (tmp_path / "root" / "tiny-imagenet").exists()


def test_zip_symlink_refused(tmp_path: Path, server, monkeypatch) -> None:
    served, url = server
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("tiny-imagenet-200/wnids.txt", "n1\n")
        link = zipfile.ZipInfo("tiny-imagenet-200/evil")
        link.external_attr = 0o120777 << 16  # a symlink's mode bits, as Info-ZIP stores them
        zf.writestr(link, "/etc/passwd")
    _serve(served, "tiny-imagenet-200.zip", buffer.getvalue(), monkeypatch, "tiny-imagenet")
    with pytest.raises(BrainPropError, match="has a link member 'tiny-imagenet-200/evil'"):
        download("tiny-imagenet", tmp_path / "root", base_url=url, progress=False)
    assert not (tmp_path / "root" / "tiny-imagenet").exists()


@pytest.mark.parametrize("how", ["encrypted", "unknown method"])
def test_a_zip_member_zipfile_cannot_read_is_one_line(tmp_path: Path, how: str) -> None:
    """zipfile's RuntimeError and NotImplementedError went out as tracebacks (review)."""
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("top/data", b"payload")
    raw = bytearray(archive.read_bytes())
    # The flag bits (offset 6) and the method (offset 8) of the local header and of the central
    # directory's entry (offsets 8 and 10), patched alike.
    for start, flags in ((0, 6), (raw.index(b"PK\x01\x02"), 8)):
        if how == "encrypted":
            raw[start + flags] |= 0x1
        else:
            raw[start + flags + 2 : start + flags + 4] = (99).to_bytes(2, "little")
    archive.write_bytes(bytes(raw))
    (tmp_path / "dest").mkdir()
    with pytest.raises(BrainPropError) as info:
        fetch.extract_archive(archive, tmp_path / "dest", "top", archive_name="a.zip")
    assert str(info.value) == (
        "archive a.zip has a member 'top/data' that is encrypted or compressed in a way Python "
        "cannot read: download the official file again"
    )
    assert not (tmp_path / "dest" / "top").exists()


@pytest.mark.parametrize("back_too", [False, True])
def test_a_new_tree_that_cannot_take_its_place_leaves_the_old_one_there(
    tmp_path: Path, monkeypatch, back_too: bool
) -> None:
    """The old tree, moved aside into the work folder, went with it, and the user's files with
    it (review); where it cannot be put back either, it is kept beside its place, where the
    next download's clean-up of leftovers leaves it, and the message says where."""
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(tar_gz_bytes({"top/data": b"new"}))
    dest = tmp_path / "dest"
    place = dest / "top"
    place.mkdir(parents=True)
    (place / "data").write_bytes(b"old")
    (place / "my_notes.txt").write_text("the user's")
    busy = OSError(errno.EBUSY, os.strerror(errno.EBUSY))
    calls = _replace_failing(monkeypatch, {2: busy, 3: busy} if back_too else {2: busy})
    with pytest.raises(BrainPropError) as info:
        fetch.extract_archive(archive, dest, "top", archive_name="a.tar.gz")
    said = str(info.value)
    assert said.startswith(f"cannot put the download in place at {place} (")
    if back_too:
        aside = calls[0]
        assert aside.parent.parent == dest and aside.parent.name.startswith("top.old-")
        assert said.endswith(
            f"): it is kept at {aside}; move it back to {place}, then run the command again"
        )
        fetch._remove_leftovers(dest)
        assert (aside / "my_notes.txt").read_text() == "the user's"
        assert sorted(p.name for p in dest.iterdir()) == [aside.parent.name]
    else:
        assert said.endswith(
            f"); the old copy is back there: check the permissions of {dest}, then run the "
            "command again"
        )
        assert (place / "my_notes.txt").read_text() == "the user's"
        assert (place / "data").read_bytes() == b"old"
        assert [p.name for p in dest.iterdir()] == ["top"]  # no work or aside folder left


def test_archive_without_expected_folder(tmp_path: Path, server, monkeypatch) -> None:
    served, url = server
    content = tar_gz_bytes({"other/file": b"x"})
    _serve(served, "cifar-10-python.tar.gz", content, monkeypatch, "cifar10")
    with pytest.raises(BrainPropError, match="has no cifar-10-batches-py/ folder"):
        download("cifar10", tmp_path / "root", base_url=url, progress=False)


def test_offline(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tmp_path / "root"
    with pytest.raises(BrainPropError) as info:
        download("cifar100", root, base_url=f"http://127.0.0.1:{port}", progress=False)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"cannot download http://127.0.0.1:{port}/cifar-100-python.tar.gz (")
    assert message.endswith(
        f"this machine seems offline; download it by hand and extract it into {root / 'cifar100'}"
    )
    assert not (root / "cifar100").exists()


def test_missing_local_mirror_is_a_wrong_path_not_offline(tmp_path: Path) -> None:
    mirror = tmp_path / "no-such-mirror"
    with pytest.raises(BrainPropError) as info:
        download("mnist", tmp_path / "root", base_url=mirror.as_uri(), progress=False)
    message = str(info.value)
    assert message.startswith(f"cannot read {mirror.as_uri()}/train-images-idx3-ubyte.gz (")
    assert "check the path in the base URL" in message
    assert "offline" not in message


class _BadLengthHandler(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", f"{len(self.body)}, {len(self.body)}")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_malformed_content_length_still_downloads(tmp_path: Path, monkeypatch) -> None:
    content = _cifar_archive(tmp_path)
    md5 = hashlib.md5(content).hexdigest()
    patch_remote(monkeypatch, "cifar10", "cifar-10-python.tar.gz", md5=md5)
    handler = type("Handler", (_BadLengthHandler,), {"body": content})
    httpd = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        root = tmp_path / "root"
        download("cifar10", root, base_url=f"http://127.0.0.1:{httpd.server_address[1]}",
                 progress=True)  # fmt: skip
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()
    assert len(load_dataset("cifar10", root).test_y) > 0


def test_http_error(tmp_path: Path, server) -> None:
    _, url = server
    with pytest.raises(BrainPropError, match=r"\(HTTP 404 File not found\): download it by hand"):
        download("fashion-mnist", tmp_path / "root", base_url=url, progress=False)


def test_bad_base_url(tmp_path: Path) -> None:
    with pytest.raises(BrainPropError, match="the base URL must start with http://"):
        download("mnist", tmp_path / "root", base_url="127.0.0.1:8000", progress=False)
    assert not (tmp_path / "root" / "mnist").exists()


def test_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(BrainPropError, match="unknown dataset 'svhn': choose one of mnist, "):
        download("svhn", tmp_path)


def test_a_disk_that_fills_up_mid_download_keeps_no_partial_archive(
    tmp_path: Path, server, monkeypatch
) -> None:
    """The partial archive, as large as the archive, would stay in the folder the message tells
    the user to free (a review)."""
    served, url = server
    _serve(served, "cifar-10-python.tar.gz", _cifar_archive(tmp_path), monkeypatch, "cifar10")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    root = tmp_path / "root"
    with pytest.raises(BrainPropError, match="check free disk space"):
        download("cifar10", root, base_url=url, progress=False)
    assert not (root / "cifar10").exists()  # the folder it made goes with the archive


def test_a_failed_download_keeps_an_empty_folder_it_did_not_make(tmp_path: Path) -> None:
    # An empty folder of the user's (made by hand, a mount point) is theirs to keep.
    dest = tmp_path / "root" / "cifar10"
    dest.mkdir(parents=True)
    with pytest.raises(BrainPropError):
        download("cifar10", tmp_path / "root", base_url=(tmp_path / "none").as_uri(),
                 progress=False)  # fmt: skip
    assert dest.is_dir()


def test_a_dataset_another_process_finished_meanwhile_is_not_fetched_again(
    tmp_path: Path, monkeypatch
) -> None:
    """Looked for again once its folder is held: another download may have finished between
    the first look and the hold, and would be fetched and unpacked over."""
    write_idx_dataset(tmp_path / "mnist")
    real, looks = fetch._present_in, []

    def absent_at_first(*args):
        looks.append(args)
        return None if len(looks) == 1 else real(*args)

    monkeypatch.setattr(fetch, "_present_in", absent_at_first)
    nowhere = (tmp_path / "no-mirror").as_uri()
    assert download("mnist", tmp_path, base_url=nowhere, progress=False) == tmp_path / "mnist"
    assert len(looks) == 2


def test_a_system_packages_copy_does_not_stand_for_a_download(
    tmp_path: Path, server, monkeypatch
) -> None:
    """With Debian's Fashion-MNIST installed, 'download fashion-mnist --data-dir X' said it was
    there and fetched nothing into X."""
    served, url = server
    write_idx_dataset(tmp_path / "system")
    patch_format(monkeypatch, "fashion-mnist", system_dir=tmp_path / "system")
    write_idx_dataset(tmp_path / "src")
    for path in (tmp_path / "src").iterdir():
        _serve(served, path.name, path.read_bytes(), monkeypatch, "fashion-mnist")
    root = tmp_path / "root"
    root.mkdir()
    assert download("fashion-mnist", root, base_url=url, progress=False) == root / "fashion-mnist"
    assert len(list((root / "fashion-mnist").glob("*.gz"))) == 4
