"""CIFAR-10/100 loading from the official pickles, through the restricted unpickler."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import SHARED_DATA, cifar_pickle, write_cifar10, write_cifar100

from brainprop.data import load_dataset
from brainprop.data.cifar import unpickle_restricted
from brainprop.errors import BrainPropError


def test_cifar10_shapes_labels_and_channel_order(tmp_path: Path) -> None:
    expected = write_cifar10(tmp_path)
    ds = load_dataset("cifar10", tmp_path)
    assert ds.train_x.shape == (15, 3, 32, 32) and ds.test_x.shape == (3, 3, 32, 32)
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64
    assert ds.num_classes == 10 and ds.input_shape == (3, 32, 32) and ds.train_x.is_contiguous()
    assert ds.train_y.tolist() == expected["train_y"].tolist()  # batches 1..5 in order
    rows = expected["train_rows"]
    # Each row is the red 32x32 plane, then green, then blue, each row-major.
    assert np.array_equal(ds.train_x[4, 0].numpy(), rows[4, :1024].reshape(32, 32))
    assert np.array_equal(ds.train_x[4, 1].numpy(), rows[4, 1024:2048].reshape(32, 32))
    assert ds.train_x[4, 2, 3, 5].item() == rows[4, 2048 + 3 * 32 + 5]
    assert np.array_equal(ds.test_x.reshape(3, -1).numpy(), expected["test_rows"])


@pytest.mark.parametrize(
    ("name", "key", "classes"), [("cifar100", "fine", 100), ("cifar100-coarse", "coarse", 20)]
)
def test_cifar100_fine_and_coarse(tmp_path: Path, name: str, key: str, classes: int) -> None:
    expected = write_cifar100(tmp_path)
    ds = load_dataset(name, tmp_path)
    assert ds.num_classes == classes and ds.train_x.shape == (5, 3, 32, 32)
    assert ds.train_y.tolist() == expected[f"train_{key}"]
    assert ds.test_y.tolist() == expected[f"test_{key}"]
    assert np.array_equal(ds.train_x.reshape(5, -1).numpy(), expected["train_rows"])


def _error(tmp_path: Path, name: str = "cifar10") -> str:
    with pytest.raises(BrainPropError) as info:
        load_dataset(name, tmp_path)
    assert "\n" not in str(info.value)
    return str(info.value)


def _batch(**overrides: object) -> bytes:
    entries: dict[bytes, object] = {
        b"data": np.zeros((3, 3072), np.uint8),
        b"labels": [0, 1, 2],
    }
    for key, value in overrides.items():
        if value is None:
            del entries[key.encode()]
        else:
            entries[key.encode()] = value
    return cifar_pickle(entries)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty (0 bytes): delete it and run 'brainprop download cifar10'"),
        (b"\x80\x02}q\x00(U\x04data", "is not a valid CIFAR pickle ("),
        (b"not a pickle at all", "is not a valid CIFAR pickle ("),
        (cifar_pickle([1, 2, 3]), "holds a list, expected a dict"),
        (_batch(data=None), "has no b'data' entry"),
        (_batch(labels=None), "has no b'labels' entry"),
        (
            _batch(data=np.zeros((3, 3000), np.uint8)),
            "has b'data' of uint8 [3, 3000], expected uint8 [N, 3072]",
        ),
        (_batch(data=np.zeros((3, 3072), np.float32)), "has b'data' of float32 [3, 3072]"),
        (_batch(data=[1, 2]), "has b'data' of list, expected uint8 [N, 3072]"),
        (_batch(labels=[0, 1]), "has 3 images but 2 b'labels'"),
        (_batch(labels=[0, 1, b"x"]), "has b'labels' that is not a list of integers"),
        (_batch(labels=[0, 10, 1]), "has label 10 at index 1, expected 0..9"),
    ],
)
def test_bad_batch_one_liners(tmp_path: Path, content: bytes, message: str) -> None:
    write_cifar10(tmp_path)
    path = tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(content)
    error = _error(tmp_path)
    assert error.startswith(f"CIFAR file {path} ")
    assert message in error


def test_missing_file(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    (folder / "test_batch").unlink()
    assert _error(tmp_path) == (
        f"CIFAR file {folder / 'test_batch'} is missing: run 'brainprop download cifar10' "
        f"or extract the official python archive into {tmp_path / 'cifar10'}"
    )
    assert "brainprop download cifar100'" in _error(tmp_path, "cifar100-coarse")


class _Exploit:
    """Unpickling this would run a shell command that creates a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _ExploitViaEval:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("exploit", [_Exploit, _ExploitViaEval])
def test_malicious_pickle_is_refused_without_running(tmp_path: Path, exploit: type) -> None:
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    # Hidden inside an otherwise valid batch, after the numpy array the file needs.
    payload = pickle.dumps(
        {b"data": np.zeros((3, 3072), np.uint8), b"labels": exploit(marker)}, protocol=2
    )
    path = tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_1"
    path.write_bytes(payload)
    error = _error(tmp_path)
    assert not marker.exists()
    assert error.startswith(f"CIFAR file {path} references ")
    assert "which a CIFAR file never does: refusing to load it" in error


def test_restricted_unpickler_accepts_plain_numpy_payloads() -> None:
    data = pickle.dumps({b"a": np.arange(6, dtype=np.uint8).reshape(2, 3)}, protocol=2)
    out = unpickle_restricted(data, source="x", fix="y")
    assert out[b"a"].tolist() == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.skipif(
    not (SHARED_DATA / "cifar10" / "cifar-10-batches-py").is_dir(), reason="shared CIFAR-10 absent"
)
def test_real_cifar10() -> None:
    ds = load_dataset("cifar10", SHARED_DATA)
    assert ds.train_x.shape == (50000, 3, 32, 32) and ds.test_x.shape == (10000, 3, 32, 32)
    assert torch.bincount(ds.train_y).tolist() == [5000] * 10
    assert torch.bincount(ds.test_y).tolist() == [1000] * 10
    # The published per-channel train means prove the R, G, B planes land in that order.
    means = ds.train_x[::10].float().mean(dim=(0, 2, 3)) / 255
    assert torch.allclose(means, torch.tensor([0.4914, 0.4822, 0.4465]), atol=3e-3)
