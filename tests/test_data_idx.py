"""MNIST / Fashion-MNIST IDX loading, on fixtures in the official format and the real files."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import REPO, idx_bytes, patch_format, write_idx_dataset

from brainprop.data import dataset_status, idx, load_dataset
from brainprop.errors import BrainPropError

# The fixtures' folder is the default data root: see tests/test_data_registry.py for the
# download advice of another root.
pytestmark = pytest.mark.usefixtures("default_root_here")


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_loads_official_layout(tmp_path: Path, name: str, gz: bool) -> None:
    arrays = write_idx_dataset(tmp_path / name, gz=gz)
    ds = load_dataset(name, tmp_path)
    assert ds.name == name and ds.num_classes == 10
    assert ds.train_x.shape == (6, 1, 28, 28) and ds.test_x.shape == (4, 1, 28, 28)
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64
    assert ds.train_x.is_contiguous() and ds.input_shape == (1, 28, 28)
    assert np.array_equal(ds.train_x[:, 0].numpy(), arrays["train_x"])
    assert np.array_equal(ds.test_y.numpy(), arrays["test_y"])


def test_mixed_gz_and_raw_files(tmp_path: Path) -> None:
    arrays = write_idx_dataset(tmp_path / "mnist", gz=True)
    gz_path = tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz"
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte").write_bytes(
        gzip.decompress(gz_path.read_bytes())
    )
    gz_path.unlink()
    assert np.array_equal(load_dataset("mnist", tmp_path).test_y.numpy(), arrays["test_y"])


def test_the_unpacked_file_is_read_before_the_gzipped_one(tmp_path: Path) -> None:
    """As ``find_idx_file`` says: a file unpacked beside its archive is the one read."""
    write_idx_dataset(tmp_path / "mnist", gz=True, seed=0)
    plain = write_idx_dataset(tmp_path / "mnist", gz=False, seed=1)
    ds = load_dataset("mnist", tmp_path)
    assert np.array_equal(ds.train_x[:, 0].numpy(), plain["train_x"])
    assert np.array_equal(ds.test_y.numpy(), plain["test_y"])


def _corrupt(tmp_path: Path, base: str, data: bytes) -> Path:
    write_idx_dataset(tmp_path / "mnist", gz=False)
    path = tmp_path / "mnist" / base
    path.write_bytes(data)
    return path


def _error(tmp_path: Path) -> str:
    with pytest.raises(BrainPropError) as info:
        load_dataset("mnist", tmp_path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_truncated_pixels(tmp_path: Path) -> None:
    full = idx_bytes(np.zeros((6, 28, 28), np.uint8))
    path = _corrupt(tmp_path, "train-images-idx3-ubyte", full[:116])
    assert _error(tmp_path) == (
        f"MNIST file {path} is truncated (expected 4704 bytes of data for dimensions 6x28x28, "
        "got 100): delete it and run 'brainprop download mnist'"
    )


def test_trailing_bytes(tmp_path: Path) -> None:
    _corrupt(tmp_path, "train-labels-idx1-ubyte", idx_bytes(np.zeros(6, np.uint8)) + b"xx")
    assert "has trailing bytes (expected 6 bytes of data for dimensions 6, got more)" in _error(
        tmp_path
    )


def _count_reads(monkeypatch) -> list[int]:
    """The sizes every gzip read asks for from now on (-1: the whole rest)."""
    asked: list[int] = []
    read = gzip.GzipFile.read

    def counted(self, size=-1):
        asked.append(size)
        return read(self, size)

    monkeypatch.setattr(gzip.GzipFile, "read", counted)
    return asked


def test_a_gzip_inflating_far_beyond_its_header_is_not_inflated(tmp_path: Path, monkeypatch):
    """One image declared, 200 MB of zeros behind it (a 0.2 MB gzip): refused after reading
    one byte past the declared data, not after inflating it all."""
    folder = tmp_path / "mnist"
    write_idx_dataset(folder)
    with gzip.open(folder / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(idx_bytes(np.zeros((1, 28, 28), np.uint8)))
        for _ in range(200):
            f.write(bytes(2**20))
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.zeros(1, np.uint8)))
    )
    asked = _count_reads(monkeypatch)
    assert "has trailing bytes (expected 784 bytes" in _error(tmp_path)
    assert -1 not in asked and sum(asked) < 1000


# 2**24 + 10: a count whose top byte alone says it is too large.
@pytest.mark.parametrize("count", [10**9, 2**24 + 10])
def test_a_header_declaring_more_than_any_dataset_is_refused(tmp_path: Path, count: int) -> None:
    header = (0x00000803).to_bytes(4, "big") + b"".join(
        n.to_bytes(4, "big") for n in (count, 28, 28)
    )
    path = _corrupt(tmp_path, "train-images-idx3-ubyte", header)
    assert _error(tmp_path) == (
        f"MNIST file {path} declares {count * 784:,} bytes of data, more than any IDX dataset "
        "holds: it is damaged or not an MNIST-style file; delete it and run 'brainprop download "
        "mnist'"
    )


def test_a_labels_header_declaring_more_than_any_images_file_holds_is_refused_unread(
    tmp_path: Path, monkeypatch
) -> None:
    """2 MB of gzip declaring 2**31 labels, within the bytes any IDX file may declare, was read
    whole (4 GiB at its peak, 42 s) before the images' count refused it (review)."""
    write_idx_dataset(tmp_path / "mnist")
    count = idx.MAX_DATA_BYTES // 784 + 1
    path = tmp_path / "mnist" / "train-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress((0x00000801).to_bytes(4, "big") + count.to_bytes(4, "big")))
    asked = _count_reads(monkeypatch)
    assert _error(tmp_path) == (
        f"MNIST file {path} declares {count:,} labels, more than the 2,739,137 images any IDX "
        "file holds: it is damaged; delete it and run 'brainprop download mnist'"
    )
    assert asked and max(asked) <= 4


def test_every_dimension_is_read_from_all_four_of_its_bytes(tmp_path: Path) -> None:
    """28 in its low bytes: read short, 2**16 + 28 would pass for the 28 expected."""
    header = (0x00000803).to_bytes(4, "big") + b"".join(
        n.to_bytes(4, "big") for n in (6, 2**16 + 28, 2**16 + 28)
    )
    path = _corrupt(tmp_path, "train-images-idx3-ubyte", header)
    expected = f"MNIST file {path} holds 65564x65564 images, expected 28x28"
    assert _error(tmp_path).startswith(expected)


def test_a_header_declaring_the_most_any_dataset_holds_is_read(tmp_path: Path) -> None:
    """Exactly MAX_DATA_BYTES is allowed: this file is then found short of it."""
    # Gzipped: a plain file's read would reserve the 2 GiB declared before finding it short.
    path = tmp_path / "labels.gz"
    header = (0x00000801).to_bytes(4, "big") + idx.MAX_DATA_BYTES.to_bytes(4, "big")
    path.write_bytes(gzip.compress(header))
    with pytest.raises(BrainPropError, match=r"is truncated \(expected 2147483648 bytes"):
        idx.read_idx_file(path, magic=0x00000801, source="labels", fix="fix")


def test_status_of_whole_gzip_files_reads_their_trailers_without_inflating_them(
    tmp_path: Path, monkeypatch
) -> None:
    """Inflating MNIST's 55 MB to check it would make every status call slow."""
    write_idx_dataset(tmp_path / "mnist", gz=True)

    def inflated(*args):
        raise AssertionError("inflated to be counted")

    monkeypatch.setattr(idx, "_inflated_size", inflated)
    [status] = dataset_status(tmp_path, ["mnist"])
    assert status.present and status.damaged == ""


@pytest.mark.parametrize("gz", [True, False])
def test_status_finds_a_file_of_another_kind_under_the_name(tmp_path: Path, gz: bool) -> None:
    """Labels where images belong: long enough for an images header, but not one."""
    write_idx_dataset(tmp_path / "mnist", gz=gz)
    name = "train-images-idx3-ubyte" + (".gz" if gz else "")
    labels = idx_bytes(np.zeros(600, np.uint8))
    (tmp_path / "mnist" / name).write_bytes(gzip.compress(labels) if gz else labels)
    [status] = dataset_status(tmp_path, ["mnist"])
    assert status.damaged.startswith(f"{tmp_path / 'mnist' / name} has no IDX header of its kind")


def test_status_refuses_a_gzip_declaring_more_than_any_dataset_uninflated(
    tmp_path: Path, monkeypatch
) -> None:
    """Its trailer disagrees with its header, so status counted the bytes it inflates to, up
    to the declared 784 GB: a small gzip bomb under the data root (review)."""
    write_idx_dataset(tmp_path / "mnist", gz=True)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    header = (0x00000803).to_bytes(4, "big") + b"".join(
        n.to_bytes(4, "big") for n in (10**9, 28, 28)
    )
    path.write_bytes(gzip.compress(header + bytes(2**16)))

    def inflated(*args):
        raise AssertionError("inflated to be counted")

    monkeypatch.setattr(idx, "_inflated_size", inflated)
    [status] = dataset_status(tmp_path, ["mnist"])
    assert status.damaged.startswith(
        f"{path} declares 784,000,000,000 bytes of data, more than any IDX dataset holds: it is "
        "damaged or not an MNIST-style file"
    )


def test_zero_length(tmp_path: Path) -> None:
    path = _corrupt(tmp_path, "t10k-images-idx3-ubyte", b"")
    assert _error(tmp_path).startswith(f"MNIST file {path} is empty (0 bytes): delete it")


def test_wrong_magic(tmp_path: Path) -> None:
    # A labels file where the images file should be.
    _corrupt(tmp_path, "train-images-idx3-ubyte", idx_bytes(np.zeros(6, np.uint8)))
    assert "has magic number 0x00000801, expected 0x00000803" in _error(tmp_path)


def test_wrong_image_dims(tmp_path: Path) -> None:
    _corrupt(tmp_path, "train-images-idx3-ubyte", idx_bytes(np.zeros((6, 32, 30), np.uint8)))
    assert "holds 32x30 images, expected 28x28" in _error(tmp_path)


def test_image_dims_are_checked_before_the_data_is_read(tmp_path: Path) -> None:
    """A header declaring other images is refused as such, not after reading (up to the 2 GiB
    cap) the data it declares and calling the file cut short (review)."""
    header = idx_bytes(np.zeros((6, 32, 30), np.uint8))[:16]
    _corrupt(tmp_path, "train-images-idx3-ubyte", header)
    assert "holds 32x30 images, expected 28x28" in _error(tmp_path)


def test_mismatched_counts(tmp_path: Path) -> None:
    _corrupt(tmp_path, "train-labels-idx1-ubyte", idx_bytes(np.zeros(5, np.uint8)))
    assert "train split has 6 images in" in _error(tmp_path)
    assert "but 5 labels in" in _error(tmp_path)


def test_an_image_count_other_than_the_labels_is_refused_before_the_images_are_read(
    tmp_path: Path,
) -> None:
    """A small gzip may declare gigabytes of images: against the labels' count its header
    alone gives it away, before they are inflated, not as a file cut short after (review)."""
    header = idx_bytes(np.zeros((6, 28, 28), np.uint8))[:16]
    declared = header[:4] + (2_000_000).to_bytes(4, "big") + header[8:]
    _corrupt(tmp_path, "train-images-idx3-ubyte", declared + bytes(28 * 28))
    message = _error(tmp_path)
    assert "train split has 2000000 images in" in message and "but 6 labels in" in message


def test_images_too_large_for_memory_are_a_one_line_error(tmp_path: Path, monkeypatch) -> None:
    write_idx_dataset(tmp_path / "mnist", gz=True)
    read = gzip.GzipFile.read

    def short_of_memory(self: gzip.GzipFile, size: int = -1) -> bytes:
        if size > 1000:  # the images, not a header or the labels
            raise MemoryError
        return read(self, size)

    monkeypatch.setattr(gzip.GzipFile, "read", short_of_memory)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    assert _error(tmp_path) == (
        f"not enough memory to read MNIST file {path}, whose header declares 4,704 bytes of "
        "data: free some and try again, or, if it should hold less, delete it and run "
        "'brainprop download mnist'"
    )


@pytest.mark.parametrize("label", [10, 12])
def test_label_out_of_range(tmp_path: Path, label: int) -> None:
    labels = np.array([1, 2, label, 0], np.uint8)
    _corrupt(tmp_path, "t10k-labels-idx1-ubyte", idx_bytes(labels))
    assert f"has label {label} at index 2, expected 0..9" in _error(tmp_path)


def test_a_split_of_no_images_is_refused(tmp_path: Path) -> None:
    """Headers that agree on zero images: nothing to test on."""
    path = _corrupt(tmp_path, "t10k-images-idx3-ubyte", idx_bytes(np.zeros((0, 28, 28), np.uint8)))
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(0, np.uint8)))
    assert _error(tmp_path) == (
        f"MNIST file {path} holds no images: delete it and run 'brainprop download mnist'"
    )


def test_bad_gzip(tmp_path: Path) -> None:
    write_idx_dataset(tmp_path / "mnist", gz=True)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:50])
    message = _error(tmp_path)
    assert message.startswith(f"MNIST file {path} cannot be read (")
    assert message.endswith("delete it and run 'brainprop download mnist'")


def test_missing_file_names_path_and_command(tmp_path: Path) -> None:
    write_idx_dataset(tmp_path / "mnist")
    (tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz").unlink()
    folder = tmp_path / "mnist"
    assert _error(tmp_path) == (
        f"MNIST file {folder / 't10k-images-idx3-ubyte'}(.gz) is missing: put the four official "
        f"IDX files (gzipped or not) in {folder} or run 'brainprop download mnist'"
    )


def test_a_folder_or_a_pipe_where_a_file_goes_is_named_as_such(tmp_path: Path) -> None:
    """It was called missing, and the user looked for a file that seemed to be there
    (review)."""
    write_idx_dataset(tmp_path / "mnist", gz=True)
    folder = tmp_path / "mnist"
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    (folder / "t10k-labels-idx1-ubyte").mkdir()
    assert _error(tmp_path) == (
        f"MNIST file {folder / 't10k-labels-idx1-ubyte'} is a folder, not a file: move or remove "
        f"it, then put the four official IDX files (gzipped or not) in {folder} or run "
        "'brainprop download mnist'"
    )
    [status] = dataset_status(tmp_path, ["mnist"])
    assert (status.present, status.unreadable) == (False, False)
    assert status.damaged == (
        f"{folder / 't10k-labels-idx1-ubyte'} is a folder, not a file: move or remove it, then "
        "run 'brainprop download mnist'"
    )
    (folder / "t10k-labels-idx1-ubyte").rmdir()
    os.mkfifo(folder / "t10k-labels-idx1-ubyte.gz")
    assert _error(tmp_path).startswith(
        f"MNIST file {folder / 't10k-labels-idx1-ubyte.gz'} is a named pipe, not a file: move "
        "or remove it, then put"
    )
    [status] = dataset_status(tmp_path, ["mnist"])
    assert status.damaged.startswith(f"{folder / 't10k-labels-idx1-ubyte.gz'} is a named pipe")


def test_test_files_copied_over_the_training_files_are_refused(tmp_path: Path) -> None:
    """Training on the test images, the run would report their accuracy as a test's (review)."""
    write_idx_dataset(tmp_path / "mnist")
    folder = tmp_path / "mnist"
    for kind in ("images-idx3", "labels-idx1"):
        (folder / f"train-{kind}-ubyte.gz").write_bytes(
            (folder / f"t10k-{kind}-ubyte.gz").read_bytes()
        )
    n = len(load_dataset("mnist", tmp_path, test_only=True).test_y)
    assert _error(tmp_path) == (
        f"dataset 'mnist': the training images are the test images, all {n} in the same order: "
        "the training files are copies of the test files, or the loader returned one split "
        "twice; restore the training files"
    )


def test_fashion_falls_back_to_system_folder(tmp_path: Path, monkeypatch) -> None:
    system = tmp_path / "usr-share"
    arrays = write_idx_dataset(system, seed=5)
    patch_format(monkeypatch, "fashion-mnist", system_dir=system)
    (tmp_path / "root").mkdir()  # a data root that does not exist is refused as a slip
    ds = load_dataset("fashion-mnist", tmp_path / "root")
    assert np.array_equal(ds.train_x[:, 0].numpy(), arrays["train_x"])
    # Files in the data root win over the system folder.
    own = write_idx_dataset(tmp_path / "root" / "fashion-mnist", seed=6)
    ds = load_dataset("fashion-mnist", tmp_path / "root")
    assert np.array_equal(ds.train_x[:, 0].numpy(), own["train_x"])
    # So does a folder where one goes: named, not read past to the system's (review).
    blocked = tmp_path / "root" / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz"
    blocked.unlink()
    blocked.mkdir()
    with pytest.raises(BrainPropError, match=f"^Fashion-MNIST file {blocked} is a folder, not "):
        load_dataset("fashion-mnist", tmp_path / "root")
    for other in blocked.parent.glob("*.gz"):
        if other != blocked:
            other.unlink()
    [status] = dataset_status(tmp_path / "root", ["fashion-mnist"])
    assert status.path == blocked.parent
    assert status.damaged.startswith(f"{blocked} is a folder, not a file: move or remove it")


def test_fashion_missing_mentions_apt(tmp_path: Path, monkeypatch) -> None:
    patch_format(monkeypatch, "fashion-mnist", system_dir=tmp_path / "nowhere")
    with pytest.raises(BrainPropError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", tmp_path)


def test_a_damaged_file_of_the_system_package_is_not_the_users_to_delete(
    tmp_path: Path, monkeypatch
) -> None:
    """Its fix said to delete a file the package owns (a review); a download into the data
    root, which the loader then reads first, or a reinstall mend it."""
    system = tmp_path / "system"
    write_idx_dataset(system)
    patch_format(monkeypatch, "fashion-mnist", system_dir=system)
    labels = next(system.glob("t10k-labels*"))
    labels.write_bytes(labels.read_bytes()[:-3])
    (tmp_path / "root").mkdir()
    fix = (
        "reinstall them ('apt-get install --reinstall dataset-fashion-mnist'), or run "
        f"'brainprop download fashion-mnist --data-dir {tmp_path / 'root'}' for a copy in the "
        "data root"
    )
    with pytest.raises(BrainPropError) as info:
        load_dataset("fashion-mnist", tmp_path / "root")
    assert str(info.value).startswith(f"Fashion-MNIST file {labels} ")
    assert str(info.value).endswith(f": {fix}")
    [status] = dataset_status(tmp_path / "root", ["fashion-mnist"])
    assert status.damaged.startswith(f"{labels} ") and status.damaged.endswith(f": {fix}")


def test_a_damaged_file_in_the_data_root_is_the_users_to_replace(
    tmp_path: Path, monkeypatch
) -> None:
    """The system package is installed, but the damaged copy is the data root's own."""
    system = tmp_path / "system"
    write_idx_dataset(system)
    patch_format(monkeypatch, "fashion-mnist", system_dir=system)
    write_idx_dataset(tmp_path / "fashion-mnist")
    labels = next((tmp_path / "fashion-mnist").glob("t10k-labels*"))
    labels.write_bytes(labels.read_bytes()[:-3])
    [status] = dataset_status(tmp_path, ["fashion-mnist"])
    assert status.note == "" and status.damaged.startswith(f"{labels} ")
    assert status.damaged.endswith(": delete it and run 'brainprop download fashion-mnist'")


def test_committed_mnist_is_the_real_thing() -> None:
    ds = load_dataset("mnist", REPO / "data")
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.train_y[0].item() == 5 and ds.test_y[0].item() == 7
    counts = torch.bincount(ds.train_y, minlength=10)
    assert counts.sum() == 60000 and counts.min() > 5000 and counts.max() < 7000
    assert counts[1].item() == 6742  # the published per-class count of digit 1
    assert abs(ds.train_x.float().mean().item() / 255 - 0.1307) < 1e-3
