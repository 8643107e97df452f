"""Datasets read from their official on-disk formats into uint8 ``[N, C, H, W]`` tensors.

Layout under the data root (see :func:`resolve_data_root`):

- ``mnist/``, ``fashion-mnist/``: the four official IDX files, gzipped or not.
- ``cifar10/cifar-10-batches-py/``, ``cifar100/cifar-100-python/``: the official pickles.
- ``tiny-imagenet/tiny-imagenet-200/``: the official folder tree.
"""

from .dataset import Dataset, given_dataset, split_validation
from .fetch import download
from .registry import DATASET_NAMES, DATASETS, DatasetEntry, dataset_status, load_dataset
from .root import data_root, resolve_data_root
from .status import DatasetStatus

__all__ = [
    "DATASETS",
    "DATASET_NAMES",
    "Dataset",
    "DatasetEntry",
    "DatasetStatus",
    "data_root",
    "dataset_status",
    "download",
    "given_dataset",
    "load_dataset",
    "resolve_data_root",
    "split_validation",
]
