"""CIFAR-10/100 loading from the official pickles, through the restricted unpickler."""

from __future__ import annotations

import _codecs
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import SHARED_DATA, cifar_pickle, write_cifar10, write_cifar100

from brainprop.data import dataset_status, load_dataset
from brainprop.data.cifar import RestrictedUnpickler, unpickle_restricted
from brainprop.errors import BrainPropError

#: numpy's array reconstructor, wherever this numpy version keeps it.
_reconstruct = np.zeros(0).__reduce__()[0]

# The fixtures' folder is the default data root: see tests/test_data_registry.py for the
# download advice of another root.
pytestmark = pytest.mark.usefixtures("default_root_here")


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
        (_batch(labels=[0, 1, 2, 0]), "has 3 images but 4 b'labels'"),
        (_batch(labels=[0, 1, b"x"]), "has b'labels' that is not a list of integers"),
        (_batch(labels=[0, 10, 1]), "has label 10 at index 1, expected 0..9"),
        (
            _batch(data=np.zeros((0, 3072), np.uint8), labels=[]),
            "holds no images: delete it and run 'brainprop download cifar10'",
        ),
    ],
)
def test_bad_batch_one_liners(tmp_path: Path, content: bytes, message: str) -> None:
    write_cifar10(tmp_path)
    path = tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(content)
    error = _error(tmp_path)
    assert error.startswith(f"CIFAR file {path} ")
    assert message in error


def test_a_batch_too_large_for_the_free_memory_is_not_called_corrupt(tmp_path, monkeypatch):
    write_cifar10(tmp_path)
    path = tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_1"  # the first one read

    def full(self):
        raise MemoryError

    monkeypatch.setattr(RestrictedUnpickler, "load", full)
    size = path.stat().st_size
    assert _error(tmp_path) == (
        f"not enough memory to read CIFAR file {path} ({size:,} bytes): free some and try again"
    )


@pytest.mark.parametrize(("copied", "over"), [("test_batch", "data_batch_5"),
                                               ("data_batch_1", "data_batch_2"),
                                               ("data_batch_3", "test_batch")])  # fmt: skip
def test_a_file_copied_over_another_is_refused(tmp_path: Path, copied: str, over: str) -> None:
    """Only a whole training split equal to the test split was refused: a test batch copied
    over one of CIFAR-10's five training files trained on the test images unseen (review)."""
    write_cifar10(tmp_path)
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    (folder / over).write_bytes((folder / copied).read_bytes())
    first, second = sorted((copied, over))  # the order they are read in
    assert _error(tmp_path) == (
        f"CIFAR files {folder / first} and {folder / second} hold the same bytes: one was "
        "copied over the other (a network would train on its test images, or on one batch "
        "twice); delete both and run 'brainprop download cifar10'"
    )


def test_a_file_larger_than_any_cifar_file_is_refused_before_it_is_read(tmp_path: Path) -> None:
    """Read whole first, it could take all the memory; the error blamed the batch size."""
    write_cifar10(tmp_path)
    path = tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_2"
    os.truncate(path, 2**30 + 1)  # sparse: no disk space taken
    assert _error(tmp_path) == (
        f"CIFAR file {path} is 1,073,741,825 bytes, more than any CIFAR file holds: it is "
        "damaged; delete it and run 'brainprop download cifar10'"
    )


def test_missing_file(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    (folder / "test_batch").unlink()
    assert _error(tmp_path) == (
        f"CIFAR file {folder / 'test_batch'} is missing: run 'brainprop download cifar10' "
        f"or extract the official python archive into {tmp_path / 'cifar10'}"
    )
    assert "brainprop download cifar100'" in _error(tmp_path, "cifar100-coarse")


def test_a_folder_or_a_pipe_where_a_file_goes_is_named_as_such(tmp_path: Path) -> None:
    """Both were called missing; status would have waited for ever reading the pipe
    (review)."""
    write_cifar10(tmp_path)
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    fix = "'brainprop download cifar10'"
    (folder / "test_batch").unlink()
    (folder / "test_batch").mkdir()
    assert _error(tmp_path) == (
        f"CIFAR file {folder / 'test_batch'} is a folder, not a file: move or remove it, then "
        f"run {fix} or extract the official python archive into {tmp_path / 'cifar10'}"
    )
    [status] = dataset_status(tmp_path, ["cifar10"])
    assert (
        status.damaged
        == f"{folder / 'test_batch'} is a folder, not a file: move or remove it, then run {fix}"
    )
    (folder / "data_batch_1").unlink()
    os.mkfifo(folder / "data_batch_1")
    assert _error(tmp_path).startswith(
        f"CIFAR file {folder / 'data_batch_1'} is a named pipe, not a file: move or remove "
        "it, then run"
    )
    [status] = dataset_status(tmp_path, ["cifar10"])
    assert status.damaged.startswith(f"{folder / 'data_batch_1'} is a named pipe, not a file")


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
    arrays = {
        b"a": np.arange(6, dtype=np.uint8).reshape(2, 3),
        b"fortran": np.asfortranarray(np.arange(6, dtype=">i8").reshape(2, 3)),
        b"no rows": np.zeros((0, 3072), np.uint8),
    }
    data = pickle.dumps({**arrays, b"name": b"batch 1 of 5", b"labels": [1, 2]}, protocol=2)
    out = unpickle_restricted(data, source="x", fix="y")
    for key, array in arrays.items():
        assert out[key].dtype == array.dtype and np.array_equal(out[key], array)
    assert out[b"name"] == b"batch 1 of 5" and out[b"labels"] == [1, 2]


def test_an_object_referred_to_many_times_is_copied_once() -> None:
    """Each level lists the one below twice: a copy that followed every reference took
    2**levels steps (5.7 s at 20 levels, so about 1.5 hours at 30, a pickle of 449 bytes; now
    under a millisecond). Twelve levels keep a regression quick to fail here: it would copy
    the shared lists apart."""
    nested: list = [np.zeros(3, np.uint8)]
    for _ in range(12):
        nested = [nested, nested]
    data = pickle.dumps({b"data": nested}, protocol=2)
    out = unpickle_restricted(data, source="x", fix="y")[b"data"]
    assert out[0] is out[1] and out[0][0] is out[0][1]


class _Reduce:
    """Pickles as ``f(*args)``, then ``__setstate__(state)`` if a state is given."""

    def __init__(self, f, args, state=None) -> None:
        self.f, self.args, self.state = f, args, state

    def __reduce__(self):
        return (self.f, self.args) if self.state is None else (self.f, self.args, self.state)


def _pointer_array():
    """An array whose dtype was rebuilt to hold a Python object at offset 0 without numpy
    knowing, filled with 8 bytes from the file: numpy would dereference 0x4141414141414141."""
    evil = _Reduce(np.dtype, ("V8", False, True),
                   (3, "|", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 1, 0))  # fmt: skip
    return _Reduce(_reconstruct, (np.ndarray, (0,), b"b"), (1, (1,), evil, False, b"A" * 8))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        # Only the allowed globals, yet with numpy's real dtype this crashed the interpreter.
        (lambda: _Reduce(np.dtype, ("u1", _pointer_array(), True)), "is no plain numeric dtype"),
        # An array with no bytes behind it: 1.2 GB of uninitialised memory as "pixels".
        (lambda: _Reduce(np.ndarray, ((400_000, 3072), np.dtype("u1"))), "is not callable"),
        (
            lambda: _Reduce(
                _reconstruct,
                (np.ndarray, (0,), b"b"),
                (1, (10**6, 3072), np.dtype("u1"), False, b"\0" * 3072),
            ),
            "an array of shape (1000000, 3072) comes with 3072 bytes",
        ),  # fmt: skip
        (lambda: _Reduce(_codecs.encode, ("x" * 10, "rot13")), "other than bytes"),
        # Shown by type: Python gives an int of 80,000 bits no repr (review).
        (lambda: _Reduce(np.dtype, (1 << 80_000, 0, 1)), "dtype(int, ...) is no plain"),
    ],
)
def test_a_crafted_pickle_of_allowed_globals_is_refused(tmp_path: Path, payload, message) -> None:
    write_cifar10(tmp_path)
    path = tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": payload(), b"labels": [0]}, protocol=2))
    error = _error(tmp_path)
    assert error.startswith(f"CIFAR file {path} is not a valid CIFAR pickle (") and message in error


def _hash_bomb(depth: int, old_style: bool = False) -> bytes:
    """A dict whose key is a tuple nested ``depth`` deep, each level holding the one below
    twice through a memo reference: hashing it takes 2^depth steps. Built by SETITEM, or
    ``old_style`` by protocol 0's DICT (review: that way round the check)."""
    ops = [b"\x80\x02}", b"K\x00q\x000"]  # a dict; 0, memoised as 0, popped
    for i in range(depth):  # (memo[i], memo[i]) memoised as i + 1, popped
        ops.append(b"h%ch%c\x86q%c0" % (i, i, i + 1))
    # dict[memo[depth]] = 1
    return b"".join([*ops, (b"(h%cK\x01d." if old_style else b"h%cK\x01s.") % depth])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        # 2^24 steps to build here; at a depth of 80, 565 bytes, the loader hung (review).
        (_hash_bomb(24), "a dict key that is no bytes or str"),
        (_hash_bomb(24, old_style=True), "a dict key that is no bytes or str"),
        (pickle.dumps({b"data": frozenset({1}), b"labels": [0]}, protocol=4), "a set"),
        # Memo index 2^32 - 16: the C unpickler tried to allocate 64 GiB for these 9 bytes and
        # was reported as out of memory.
        (b"\x80\x02}r\xf0\xff\xff\xff.", "has no b'data'"),
    ],
    ids=["hash-bomb", "hash-bomb-dict", "set", "memo-index"],
)
def test_a_few_crafted_bytes_cannot_exhaust_time_or_memory(tmp_path: Path, content, message):
    write_cifar10(tmp_path)
    path = tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_1"
    path.write_bytes(content)
    error = _error(tmp_path)
    assert error.startswith(f"CIFAR file {path} ") and message in error


def _array_of(raw: bytes) -> _Reduce:
    return _Reduce(_reconstruct, (np.ndarray, (0,), b"b"), (1, (len(raw),), np.dtype("u1"), 0, raw))


@pytest.mark.parametrize(
    "entries",
    [
        # pickle writes one object once and names it again in 2 bytes: each array copied the
        # same 100 kB again, so memory grew as the square of the file's size (review).
        lambda raw: [_array_of(raw) for _ in range(50)],
        lambda raw: [_Reduce(_codecs.encode, (text, "latin1")) for text in [raw.decode()] * 50],
    ],
    ids=["array", "latin1"],
)
def test_bytes_named_many_times_cannot_take_more_memory_than_the_file(tmp_path, entries):
    write_cifar10(tmp_path)
    path = tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_1"
    raw = b"\x07" * 100_000
    path.write_bytes(pickle.dumps({b"data": entries(raw), b"labels": [0]}, protocol=2))
    assert path.stat().st_size < 2 * len(raw)
    assert "its arrays take more bytes than the file holds" in _error(tmp_path)


def test_a_crafted_shape_or_name_gives_a_short_line(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    path = tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_1"
    # Each dimension one byte more: multiplying 10^5 of 2^62 took hours, and the message
    # showed them all (review).
    shape = (2,) * 20_000
    array = _Reduce(_reconstruct, (np.ndarray, (0,), b"b"), (1, shape, np.dtype("u1"), 0, b""))
    path.write_bytes(pickle.dumps({b"data": array, b"labels": [0]}, protocol=2))
    error = _error(tmp_path)
    assert "an array's state is not that of a plain numeric array" in error and len(error) < 300
    # Protocol 4 names a global by any two strings: a line break in one split the message.
    module, name = b"numpy\nThe file is fine: run this to go on", b"x"
    path.write_bytes(b"\x80\x04\x8c%c%s\x8c%c%s\x93." % (len(module), module, len(name), name))
    error = _error(tmp_path)
    assert "\n" not in error and "references 'numpy\\nThe file is fine" in error


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_python_3_re_pickles_load_up_to_protocol_4(tmp_path: Path, protocol: int) -> None:
    write_cifar10(tmp_path)
    path = tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_1"
    pixels = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    path.write_bytes(pickle.dumps({b"data": pixels, b"labels": [3, 1]}, protocol=protocol))
    if protocol == 5:
        assert "was pickled with protocol 5" in _error(tmp_path)
        return
    ds = load_dataset("cifar10", tmp_path)
    assert ds.train_x[:2].flatten(1).numpy().tolist() == pixels.tolist()
    assert ds.train_y[:2].tolist() == [3, 1]
    # Read with encoding="latin1" and pickled again, a file holds str keys (a review: it was
    # said to have no b'data').
    path.write_bytes(pickle.dumps({"data": pixels, "labels": [2, 0]}, protocol=protocol))
    assert load_dataset("cifar10", tmp_path).train_y[:2].tolist() == [2, 0]


@pytest.mark.parametrize(
    "labels",
    [
        [2**70],
        [2**63],
        [-(2**63) - 1],
        np.array(3),
        np.zeros((1, 1), np.int64),
        np.zeros(1, np.float32),
        [True],
    ],
)
def test_labels_that_are_no_list_of_integers_are_refused(tmp_path: Path, labels) -> None:
    write_cifar10(tmp_path)
    path = tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_1"
    batch = {b"data": np.zeros((1, 3072), np.uint8), b"labels": labels}
    path.write_bytes(pickle.dumps(batch, protocol=2))
    assert "has b'labels' that is not a list of integers" in _error(tmp_path)


def test_labels_may_be_an_integer_array_and_any_int64_is_judged_as_a_class(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    path = tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_1"
    pixels = np.zeros((1, 3072), np.uint8)
    path.write_bytes(
        pickle.dumps({b"data": pixels, b"labels": np.array([7], np.uint8)}, protocol=2)
    )
    assert load_dataset("cifar10", tmp_path).train_y[0].item() == 7
    # The least and the greatest int64 are integers, out of the classes' range.
    for label in (-(2**63), 2**63 - 1):
        path.write_bytes(pickle.dumps({b"data": pixels, b"labels": [label]}, protocol=2))
        assert f"has label {label} at index 0, expected 0..9" in _error(tmp_path)


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
