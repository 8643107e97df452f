"""Tiny datasets written in the exact official on-disk formats, for the data tests."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
#: CI mounts the shared real datasets beside the clone.
SHARED_DATA = REPO.parent / "shared" / "data"

IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def idx_bytes(array: np.ndarray) -> bytes:
    """An uint8 IDX file: magic 0x0000080<ndim>, big-endian uint32 dims, then the data."""
    header = bytes([0, 0, 0x08, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx_dataset(
    folder: Path, *, n_train: int = 6, n_test: int = 4, gz: bool = True, seed: int = 0
) -> dict[str, np.ndarray]:
    """Write the four IDX files of an MNIST-shaped dataset; returns the arrays written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, size=n, dtype=np.uint8)
        arrays[f"{split}_x"], arrays[f"{split}_y"] = x, y
        for base, array in zip(IDX_NAMES[split], (x, y), strict=True):
            data = idx_bytes(array)
            if gz:
                (folder / f"{base}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / base).write_bytes(data)
    return arrays


class _Python2Pickler(pickle._Pickler):  # the pure-Python pickler: its opcodes can be changed
    """Pickles as Python 2's cPickle wrote the official CIFAR files (protocol 2): every string
    (keys, pixels, dtype codes) a BINSTRING, numpy's functions under ``numpy.core``, and a memo
    entry for each. Python 3 writes bytes as ``_codecs.encode`` calls instead, and numpy 2 its
    functions under ``numpy._core``: a loader tested on those alone might not read the real
    files."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_string(self, obj: bytes | str) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = dispatch[str] = save_string

    def save_global(self, obj: object, name: str | None = None) -> None:
        name = name or obj.__qualname__
        module = pickle.whichmodule(obj, name).replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
        self.memoize(obj)


def cifar_pickle(entries: object) -> bytes:
    """A CIFAR batch exactly as the official files store it (see :class:`_Python2Pickler`)."""
    out = io.BytesIO()
    _Python2Pickler(out, protocol=2).dump(entries)
    return out.getvalue()


def write_cifar10(root: Path, *, per_batch: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """Write ``root/cifar10/cifar-10-batches-py``; returns rows ``[N, 3072]`` and labels."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    out: dict[str, list] = {"train_rows": [], "train_y": [], "test_rows": [], "test_y": []}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for file_name in names:
        rows = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        batch = {b"batch_label": b"fixture", b"labels": labels, b"data": rows}
        batch[b"filenames"] = [b"x.png"] * per_batch
        (folder / file_name).write_bytes(cifar_pickle(batch))
        split = "test" if file_name == "test_batch" else "train"
        out[f"{split}_rows"].append(rows)
        out[f"{split}_y"].extend(labels)
    meta = {b"num_cases_per_batch": per_batch, b"label_names": [b"a"] * 10, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(cifar_pickle(meta))
    return {
        "train_rows": np.concatenate(out["train_rows"]),
        "train_y": np.array(out["train_y"]),
        "test_rows": np.concatenate(out["test_rows"]),
        "test_y": np.array(out["test_y"]),
    }


def write_cifar100(root: Path, *, n_train: int = 5, n_test: int = 3) -> dict[str, np.ndarray]:
    """Write ``root/cifar100/cifar-100-python``; returns rows, fine and coarse labels."""
    rng = np.random.default_rng(1)
    folder = root / "cifar100" / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        rows = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, size=n)]
        coarse = [int(v) for v in rng.integers(0, 20, size=n)]
        batch = {b"filenames": [b"x.png"] * n, b"batch_label": b"fixture", b"fine_labels": fine}
        batch.update({b"coarse_labels": coarse, b"data": rows})
        (folder / split).write_bytes(cifar_pickle(batch))
        out.update({f"{split}_rows": rows, f"{split}_fine": fine, f"{split}_coarse": coarse})
    meta = {b"fine_label_names": [b"f"] * 100, b"coarse_label_names": [b"c"] * 20}
    (folder / "meta").write_bytes(cifar_pickle(meta))
    return out


def jpeg_bytes(rng: np.random.Generator, *, mode: str = "RGB", size: int = 64) -> bytes:
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    image = Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode=mode)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


WNIDS = ("n02124075", "n04067472", "n01443537")


def write_tiny_imagenet(root: Path, *, train_per_class: int = 2) -> Path:
    """Write a 3-class ``root/tiny-imagenet/tiny-imagenet-200`` tree with real JPEGs.

    One train image of the second class and one val image are grayscale ("L"), as some
    official ones are. Returns the ``tiny-imagenet-200`` folder.
    """
    rng = np.random.default_rng(2)
    folder = root / "tiny-imagenet" / "tiny-imagenet-200"
    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("".join(f"{w}\n" for w in WNIDS))
    for c, wnid in enumerate(WNIDS):
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        boxes = []
        for i in range(train_per_class):
            mode = "L" if (c, i) == (1, 0) else "RGB"
            (images / f"{wnid}_{i}.JPEG").write_bytes(jpeg_bytes(rng, mode=mode))
            boxes.append(f"{wnid}_{i}.JPEG\t0\t10\t63\t58\n")
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("".join(boxes))
    val = folder / "val" / "images"
    val.mkdir(parents=True)
    lines = []
    # Annotations deliberately not in wnids order, to check labels come from wnids.txt.
    for i, wnid in enumerate((WNIDS[2], WNIDS[0], WNIDS[1], WNIDS[2])):
        name = f"val_{i}.JPEG"
        (val / name).write_bytes(jpeg_bytes(rng, mode="L" if i == 1 else "RGB"))
        lines.append(f"{name}\t{wnid}\t0\t0\t63\t63\n")
    (folder / "val" / "val_annotations.txt").write_text("".join(lines))
    (folder / "test" / "images").mkdir(parents=True)
    return folder


def tar_gz_bytes(members: dict[str, bytes]) -> bytes:
    """A .tar.gz holding regular files ``name -> content``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, content in members.items():
            zf.writestr(name, content)
    return buffer.getvalue()


def tree_bytes(folder: Path, prefix: str) -> dict[str, bytes]:
    """Every file under ``folder`` as ``prefix/<relative path> -> content``."""
    return {
        f"{prefix}/{p.relative_to(folder).as_posix()}": p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def patch_format(monkeypatch, dataset: str, **fields) -> None:
    """Replace fields of ``dataset``'s format in its catalog row for one test
    (``system_dir=...``)."""
    from brainprop.data.catalog import CATALOG

    row = CATALOG[dataset]
    monkeypatch.setitem(CATALOG, dataset, replace(row, format=replace(row.format, **fields)))


def patch_remote(monkeypatch, dataset: str, file_name: str, **fields) -> None:
    """Replace the md5 or size of ``dataset``'s official file ``file_name`` in its catalog row
    for one test."""
    from brainprop.data.catalog import CATALOG

    row = CATALOG[dataset]
    assert any(f.name == file_name for f in row.source.files), f"no {dataset} file {file_name}"
    files = tuple(replace(f, **fields) if f.name == file_name else f for f in row.source.files)
    monkeypatch.setitem(CATALOG, dataset, replace(row, source=replace(row.source, files=files)))
