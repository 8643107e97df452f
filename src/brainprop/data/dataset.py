"""The in-memory dataset every model and trainer consumes."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..errors import BrainPropError, kind_of


@dataclass(frozen=True)
class Dataset:
    """A labelled image classification dataset, held as four whole-split tensors.

    Attributes:
        name: the dataset's name: a built-in one's, e.g. ``"cifar10"``, or one's own, which a run
            records (with :meth:`fingerprint`) so that it resumes and is evaluated on it only.
        train_x: uint8 ``[N, C, H, W]`` (channels first; any strides).
        train_y: int64 ``[N]``, values in ``[0, num_classes)``.
        test_x: uint8 ``[M, C, H, W]``, same ``C, H, W`` as ``train_x``.
        test_y: int64 ``[M]``.
        num_classes: number of classes, at least 2.

    Raises:
        BrainPropError: a name that is no non-empty str, images or labels of another type,
            dtype or shape than above, a label outside ``[0, num_classes)``, fewer than 2
            classes, no test images, or training images that are the test images.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    def __post_init__(self) -> None:
        # The library's loaders check their files, but a Dataset of one's own (``train(config,
        # dataset=...)``) arrives unchecked: what would train silently on wrong data, or fail
        # deep inside torch, is refused here in one line. The name must be plain text, as
        # checkpoints record it (fingerprint) and hold plain types only.
        if type(self.name) is not str or not self.name:
            raise BrainPropError(
                f"a dataset's name must be a non-empty str, got {self.name!r}: pass str(name)"
            )
        if type(self.num_classes) is not int:
            raise BrainPropError(
                f"dataset {self.name!r}: num_classes must be an int, got "
                f"{self.num_classes!r}: pass int(num_classes)"
            )
        if self.num_classes < 2:
            raise BrainPropError(
                f"dataset {self.name!r}: num_classes must be at least 2, got {self.num_classes} "
                "(a choice among fewer is none): pass the number of classes the labels name"
            )
        # The test split first: test_only() makes the empty training split from it.
        for split, x, y in (
            ("test", self.test_x, self.test_y),
            ("train", self.train_x, self.train_y),
        ):
            _check_images(self.name, split, x)
            _check_labels(self.name, split, y, len(x), self.num_classes)
        if not len(self.test_y):
            raise BrainPropError(
                f"dataset {self.name!r}: test_x holds no images, and every run validates or "
                "tests on them: hold some images out of the training split as test images"
            )
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise BrainPropError(
                f"dataset {self.name!r}: train and test images differ in shape: "
                f"{tuple(self.train_x.shape[1:])} vs {tuple(self.test_x.shape[1:])}: give both "
                "splits images of one size"
            )
        # Trained on its test images, a network's test accuracy means nothing, and nothing
        # else would show it (training files that are copies of the test files, a loader that
        # returned one split twice).
        if (
            self.train_x.shape == self.test_x.shape
            and self.train_x.device == self.test_x.device
            and torch.equal(self.train_x, self.test_x)
        ):
            raise BrainPropError(
                f"dataset {self.name!r}: the training images are the test images, all "
                f"{len(self.test_x)} in the same order: the training files are copies of the "
                "test files, or the loader returned one split twice; restore the training files"
            )

    def to(self, device: torch.device | str) -> Dataset:
        """Return a copy whose four tensors live on ``device``."""
        return replace(
            self,
            train_x=self.train_x.to(device),
            train_y=self.train_y.to(device),
            test_x=self.test_x.to(device),
            test_y=self.test_y.to(device),
        )

    @classmethod
    def test_only(
        cls, name: str, test_x: torch.Tensor, test_y: torch.Tensor, num_classes: int
    ) -> Dataset:
        """A dataset whose training split is empty (``[0, C, H, W]``): for scoring a trained
        network, which needs neither the time to read the training files nor their health."""
        _require_tensor(f"dataset {name!r}: test_x", test_x)
        _require_tensor(f"dataset {name!r}: test_y", test_y)
        empty_x = test_x.new_empty((0, *test_x.shape[1:]))
        return cls(name, empty_x, test_y.new_empty(0), test_x, test_y, num_classes)

    def fingerprint(self, held_out: int | None = None) -> dict[str, Any]:
        """What a run records of the data it trained on, to refuse other data when it is
        resumed or evaluated: the name, and the images per class of each split. Counts, not a
        hash: the same images in another order (as another copy of CIFAR-10 may hold them)
        are the same data.

        With ``held_out``, a run's number of images held out for validation, also a digest of
        the images :func:`split_validation` holds out of this order: another order holds out
        others, some of which the run trained on before it was resumed on it."""
        record: dict[str, Any] = {
            "name": self.name,
            "train": torch.bincount(self.train_y, minlength=self.num_classes).tolist(),
            "test": torch.bincount(self.test_y, minlength=self.num_classes).tolist(),
        }
        if held_out is not None:
            _, held = _split(len(self.train_y), held_out, self.train_x.device)
            digest = hashlib.sha256(self.train_x[held].cpu().numpy().tobytes())
            digest.update(self.train_y[held].cpu().numpy().tobytes())
            record["held_out"] = {"images": held_out, "sha256": digest.hexdigest()}
        return record

    def digest(self, images: int = 1024, *, test: bool = True) -> str:
        """A sha256 of both splits' labels and of up to ``images`` evenly spaced images of each
        (``test=False``: of the training split only): cheap enough to compare every rank's copy
        of the data as a run starts, and another order, labelling or shape shows in it."""
        digest = hashlib.sha256(self.name.encode())
        splits = [(self.train_x, self.train_y)] + [(self.test_x, self.test_y)] * test
        for x, y in splits:
            digest.update(repr(tuple(x.shape)).encode())
            digest.update(y.cpu().numpy().tobytes())
            if len(x):
                spaced = torch.linspace(0, len(x) - 1, min(images, len(x))).long()
                digest.update(x[spaced.to(x.device)].cpu().numpy().tobytes())
        return digest.hexdigest()

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        _, c, h, w = self.train_x.shape
        return (c, h, w)


def given_dataset(value: object, call: str) -> Dataset | None:
    """``call``'s ``dataset=`` argument, None or a :class:`Dataset`; one line for anything
    else (its name, a ``TensorDataset``), which failed on a missing attribute."""
    if value is None or isinstance(value, Dataset):
        return value
    named = "; a dataset's name goes in the config" if isinstance(value, str) else ""
    raise BrainPropError(
        f"{call} takes dataset= a brainprop.Dataset (load_dataset(name) gives one, "
        f"Dataset(...) makes one of tensors), not {kind_of(value)}{named}"
    )


def split_validation(ds: Dataset, n: int) -> tuple[Dataset, torch.Tensor, torch.Tensor]:
    """Hold out ``n`` training images for validation.

    The held-out images are the same for every seed (a permutation seeded with 0), so seeds
    differ only in training randomness; for the same images in another order they are others.
    Returns (dataset without them, val_x, val_y).
    """
    total = len(ds.train_y)
    # perm[:-0] is empty and perm[:-(-3)] three images: neither is a split.
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise BrainPropError(f"--val {n!r} is no number of images to hold out: pass 1 or more")
    if n >= total:
        raise BrainPropError(
            f"--val (or --val-split) {n} would hold out all {total} training images: pick "
            f"fewer than {total}"
        )
    keep, held = _split(total, n, ds.train_x.device)
    train = Dataset(
        ds.name, ds.train_x[keep], ds.train_y[keep], ds.test_x, ds.test_y, ds.num_classes
    )
    return train, ds.train_x[held], ds.train_y[held]


def _split(total: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions :func:`split_validation` keeps and holds out of ``total`` training images:
    the last ``n`` of a permutation fixed by the count alone, whatever the run's seed."""
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(0)).to(device)
    return perm[:-n], perm[-n:]


def _check_images(name: str, split: str, x: Any) -> None:
    what = f"dataset {name!r}: {split}_x"
    _require_tensor(what, x)
    if x.dtype != torch.uint8:
        fix = (
            "for floats in [0, 1] pass (x * 255).round().to(torch.uint8)"
            if x.is_floating_point()
            else "for integers in [0, 255] pass x.to(torch.uint8)"
        )
        raise BrainPropError(
            f"{what} holds {x.dtype}: images are uint8 in [0, 255] (each step scales them by "
            f"1/255); {fix}"
        )
    if x.dim() != 4:
        fix = ": add a channel axis, x[:, None]" if x.dim() == 3 else ""
        raise BrainPropError(f"{what} must be [N, C, H, W], got {tuple(x.shape)}{fix}")
    if looks_channels_last(*x.shape[1:]):
        raise BrainPropError(
            f"{what} of shape {tuple(x.shape)} looks channels-last ([N, H, W, C]): pass "
            "x.permute(0, 3, 1, 2).contiguous()"
        )


def looks_channels_last(c: int, h: int, w: int) -> bool:
    """Whether an image shape read as (C, H, W) is likely (H, W, C): square images of 1 or 3
    channels read as H channels of W x C images, which would train, on nonsense."""
    return c == h and c > 4 and w in (1, 3)


def _check_labels(name: str, split: str, y: Any, n: int, num_classes: int) -> None:
    what = f"dataset {name!r}: {split}_y"
    _require_tensor(what, y)
    if y.dtype != torch.int64 or y.dim() != 1 or len(y) != n:
        fix = ": give as many labels as images"
        if y.dim() == 1 and len(y) == n:
            fix = ": pass y.long()"
        elif y.dim() == 2 and len(y) == n:
            fix = ": for one-hot labels pass y.argmax(1)"
        raise BrainPropError(
            f"{what} must be int64 [{n}], one label per image, got {y.dtype} {tuple(y.shape)}{fix}"
        )
    if not n:
        return
    low, high = torch.stack(torch.aminmax(y)).tolist()
    if low < 0 or high >= num_classes:
        raise BrainPropError(
            f"{what} holds labels from {low} to {high}, but num_classes {num_classes} allows "
            f"0 to {num_classes - 1}: number the classes from 0, or raise num_classes"
        )


def _require_tensor(what: str, value: Any) -> None:
    if not isinstance(value, torch.Tensor):
        raise BrainPropError(
            f"{what} is of type {type(value).__name__}, not a torch.Tensor: convert it with "
            "torch.from_numpy or torch.as_tensor"
        )
