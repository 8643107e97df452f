"""500 random or mutated inputs each for the IDX, CIFAR and Tiny ImageNet loaders and for the
checkpoint loader: whatever the bytes, only a one-line BrainPropError may escape.

Unlike test_data_fuzz.py, which fuzzes the byte parsers, these go through the whole loader
(``load_dataset``, ``checkpoint.load``, ``load_model``, a resume's restore) as a user's file would.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import make_tiny_dataset
from data_fixtures import cifar_pickle, idx_bytes, write_cifar10, write_tiny_imagenet
from fuzz_strategies import mutated
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_helpers import one_thread, tiny_config

from brainprop import Hyperparameters, TrainConfig, checkpoint, load_dataset, load_model, train
from brainprop.data.tinyimagenet import CACHE_DIR
from brainprop.errors import BrainPropError
from brainprop.fieldtypes import TYPE_CHECKS
from brainprop.presets import build_model
from brainprop.resume import restore
from brainprop.train import Trainer

__all__ = ["one_thread"]  # the autouse fixture, imported to take effect here

FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _only_brainprop_error(call: Callable[[], Any]) -> None:
    try:
        call()
    except BrainPropError as exc:
        assert "\n" not in str(exc) and str(exc)


def _fuzz_file(path: Path, content: bytes, load: Callable[[], Any]) -> None:
    original = path.read_bytes()
    path.write_bytes(content)
    try:
        _only_brainprop_error(load)
    finally:
        path.write_bytes(original)


# --- IDX ---------------------------------------------------------------------------------------

_RNG = np.random.default_rng(0)
IDX_FILES = {
    "train-images-idx3-ubyte": idx_bytes(_RNG.integers(0, 256, (4, 28, 28), dtype=np.uint8)),
    "train-labels-idx1-ubyte": idx_bytes(np.array([1, 2, 3, 4], np.uint8)),
    "t10k-images-idx3-ubyte": idx_bytes(_RNG.integers(0, 256, (2, 28, 28), dtype=np.uint8)),
    "t10k-labels-idx1-ubyte": idx_bytes(np.array([5, 9], np.uint8)),
}


@pytest.fixture(scope="module")
def idx_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("idx")
    (root / "mnist").mkdir()
    for name, content in IDX_FILES.items():
        (root / "mnist" / name).write_bytes(content)
    return root


@FUZZ
@given(
    st.sampled_from(sorted(IDX_FILES)).flatmap(
        lambda name: st.tuples(
            st.just(name),
            st.one_of(st.binary(max_size=64), mutated(IDX_FILES[name], hot=(0, 16))),
        )
    )
)
def test_idx_loader(idx_root: Path, case: tuple[str, bytes]) -> None:
    name, content = case
    _fuzz_file(idx_root / "mnist" / name, content, lambda: load_dataset("mnist", idx_root))


# --- CIFAR -------------------------------------------------------------------------------------

VALID_BATCH = cifar_pickle({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1, 2]})

_values = st.one_of(
    st.none(),
    st.integers(-(2**40), 2**40),
    st.binary(max_size=8),
    st.lists(st.integers(-3, 12), max_size=5),
    st.builds(
        lambda dtype, shape: np.zeros(shape, dtype),
        st.sampled_from([np.uint8, np.int64, np.float32]),
        st.lists(st.integers(0, 3100), min_size=0, max_size=3).filter(
            lambda s: int(np.prod(s)) <= 20_000
        ),
    ),
)
_batches = st.dictionaries(
    st.sampled_from([b"data", b"labels", b"filenames", b"batch_label", b"x"]), _values, max_size=4
).map(cifar_pickle)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10(root, per_batch=2)
    return root


@FUZZ
@given(
    st.sampled_from([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]),
    st.one_of(st.binary(max_size=64), mutated(VALID_BATCH, hot=(0, 120)), _batches),
)
def test_cifar_loader(cifar_root: Path, name: str, content: bytes) -> None:
    path = cifar_root / "cifar10" / "cifar-10-batches-py" / name
    _fuzz_file(path, content, lambda: load_dataset("cifar10", cifar_root))


# --- Tiny ImageNet -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    write_tiny_imagenet(root, train_per_class=1)
    return root


TINY_TARGETS = (
    "wnids.txt",
    "val/val_annotations.txt",
    "train/n04067472/images/n04067472_0.JPEG",
    "val/images/val_2.JPEG",
)


@FUZZ
@given(st.sampled_from(TINY_TARGETS), st.data())
def test_tiny_imagenet_loader(tiny_root: Path, target: str, data: st.DataObject) -> None:
    folder = tiny_root / "tiny-imagenet" / "tiny-imagenet-200"
    path = folder / target
    valid = path.read_bytes()
    text = st.text(max_size=80).map(str.encode)
    content = data.draw(st.one_of(st.binary(max_size=64), text, mutated(valid, hot=(0, 200))))
    # The decode cache is keyed on file names, not contents: without this, a changed JPEG
    # would never be decoded again.
    shutil.rmtree(folder / CACHE_DIR, ignore_errors=True)
    _fuzz_file(path, content, lambda: load_dataset("tiny-imagenet", tiny_root))


# --- checkpoints -------------------------------------------------------------------------------


def _small_checkpoint() -> bytes:
    """A real best.pt layout for a small conv net (4x4 inputs, 2 classes: 75k weights)."""
    config = tiny_config(Path("runs")).resolve()
    model = build_model("conv", (1, 4, 4), 2, config.hyperparameters())
    buffer = io.BytesIO()
    state = {"format": checkpoint.FORMAT, "config": config.to_dict(), "input_shape": [1, 4, 4],
             "num_classes": 2, "model": model.state_dict(), "epoch": 1}  # fmt: skip
    torch.save(state, buffer)
    return buffer.getvalue()


CHECKPOINT = _small_checkpoint()
# data.pkl (the dict's structure) comes first in the zip, its directory last.
CHECKPOINT_HOT = (0, 3000)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ckpt")


@FUZZ
@given(st.one_of(st.binary(max_size=256), mutated(CHECKPOINT, hot=CHECKPOINT_HOT)))
def test_checkpoint_load_and_load_model(scratch: Path, content: bytes) -> None:
    path = scratch / "best.pt"
    path.write_bytes(content)
    _only_brainprop_error(lambda: checkpoint.load(path))
    _only_brainprop_error(lambda: load_model(path))


def _junk() -> st.SearchStrategy[Any]:
    leaves = st.one_of(
        st.none(), st.booleans(), st.integers(-5, 10**12), st.floats(), st.text(max_size=5),
        st.builds(torch.zeros, st.lists(st.integers(0, 4), max_size=3)),
    )  # fmt: skip
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
        ),
        max_leaves=6,
    )


class _Resumable:
    """A 1-epoch run's directory, its last.pt, and a trainer to restore states into; with a
    short repr, which hypothesis computes for every example."""

    def __init__(self, out: Path) -> None:
        self.ds = make_tiny_dataset()
        run = train(tiny_config(out, epochs=1), dataset=self.ds, progress=False)
        self.dir, self.state = run.dir, checkpoint.load(run.dir / "last.pt")
        self.trainer = Trainer(run.config, self.ds, progress=False)

    def __repr__(self) -> str:
        return f"_Resumable({self.dir})"


@pytest.fixture(scope="module")
def resumable(tmp_path_factory) -> _Resumable:
    return _Resumable(tmp_path_factory.mktemp("resume"))


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path into the nested dicts of a checkpoint."""
    out = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.append((*prefix, key))
            out += _paths(value, (*prefix, key))
    return out


def _replaced(state: dict[str, Any], path: tuple, value: Any, delete: bool) -> dict[str, Any]:
    """A copy of ``state`` with the entry at ``path`` replaced or deleted (unchanged when an
    earlier damage already removed that path)."""
    copy = dict(state)
    node = copy
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            return state
        node[key] = dict(node[key])
        node = node[key]
    if delete:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value
    return copy


@settings(FUZZ, max_examples=200)
@given(st.data())
def test_restoring_structurally_damaged_states(resumable: _Resumable, data: st.DataObject):
    run_dir, state, trainer, ds = resumable.dir, resumable.state, resumable.trainer, resumable.ds
    paths = sorted(_paths({k: v for k, v in state.items() if k != "history"}), key=str)
    damaged = state
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        damaged = _replaced(damaged, path, data.draw(_junk()), data.draw(st.booleans()))
    _only_brainprop_error(lambda: restore(trainer, damaged, ds, run_dir))
    path = run_dir.parent / "damaged.pt"
    torch.save(damaged, path)
    _only_brainprop_error(lambda: load_model(path))


def test_every_config_field_type_is_checked() -> None:
    # A new TrainConfig (or table row) field with a type TYPE_CHECKS cannot check would break
    # from_dict (or every row).
    for f in fields(TrainConfig) + fields(Hyperparameters):
        assert all(t in TYPE_CHECKS for t in str(f.type).split(" | ")), f.name
