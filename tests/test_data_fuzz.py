"""Random and mutated bytes fed to the IDX and CIFAR readers only ever raise BrainPropError."""

from __future__ import annotations

import gzip
import tempfile
from pathlib import Path

import numpy as np
from data_fixtures import cifar_pickle, idx_bytes
from fuzz_strategies import mutated
from hypothesis import given, settings
from hypothesis import strategies as st

from brainprop.data.cifar import parse_cifar_batch
from brainprop.data.idx import IMAGES_MAGIC, LABELS_MAGIC, parse_idx, read_idx_file
from brainprop.errors import BrainPropError

VALID_IDX = idx_bytes(np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28) % 251)
VALID_CIFAR = cifar_pickle(
    {b"data": np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072), b"labels": [3, 7]}
)


def _only_brainprop_error(call) -> None:
    try:
        call()
    except BrainPropError as exc:
        assert "\n" not in str(exc)


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(st.binary(max_size=64), mutated(VALID_IDX)),
    st.sampled_from([IMAGES_MAGIC, LABELS_MAGIC]),
)
def test_idx_parser(data: bytes, magic: int) -> None:
    _only_brainprop_error(lambda: parse_idx(data, magic=magic, source="f", fix="x"))


@settings(max_examples=50, deadline=None)
@given(mutated(gzip.compress(VALID_IDX)))
def test_idx_gzip_reader(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "train-images-idx3-ubyte.gz"
        path.write_bytes(data)
        _only_brainprop_error(lambda: read_idx_file(path, magic=IMAGES_MAGIC, source="f", fix="x"))


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=64), mutated(VALID_CIFAR)))
def test_cifar_parser(data: bytes) -> None:
    _only_brainprop_error(
        lambda: parse_cifar_batch(data, label_key=b"labels", num_classes=10, source="f", fix="x")
    )
