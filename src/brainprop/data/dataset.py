"""The in-memory dataset every model and trainer consumes."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..errors import BrainPropError


@dataclass(frozen=True)
class Dataset:
    """A labelled image classification dataset, held as four whole-split tensors.

    Attributes:
        name: the registry name, e.g. ``"cifar10"``.
        train_x: uint8 ``[N, C, H, W]`` (channels first), contiguous.
        train_y: int64 ``[N]``, values in ``[0, num_classes)``.
        test_x: uint8 ``[M, C, H, W]``, same ``C, H, W`` as ``train_x``.
        test_y: int64 ``[M]``.
        num_classes: number of classes.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    def __post_init__(self) -> None:
        # Loaders already validate user files, so a violation here is a programming error.
        for split, x, y in (
            ("train", self.train_x, self.train_y),
            ("test", self.test_x, self.test_y),
        ):
            if x.dtype != torch.uint8 or x.dim() != 4:
                raise ValueError(
                    f"{split}_x must be uint8 [N, C, H, W], got {x.dtype} {tuple(x.shape)}"
                )
            if y.dtype != torch.int64 or y.dim() != 1 or y.shape[0] != x.shape[0]:
                raise ValueError(
                    f"{split}_y must be int64 [{x.shape[0]}], got {y.dtype} {tuple(y.shape)}"
                )
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise ValueError(
                f"train and test images differ in shape: {tuple(self.train_x.shape[1:])} "
                f"vs {tuple(self.test_x.shape[1:])}"
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
        empty_x = test_x.new_empty((0, *test_x.shape[1:]))
        return cls(name, empty_x, test_y.new_empty(0), test_x, test_y, num_classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        _, c, h, w = self.train_x.shape
        return (c, h, w)


def split_validation(ds: Dataset, n: int) -> tuple[Dataset, torch.Tensor, torch.Tensor]:
    """Hold out ``n`` training images for validation.

    The held-out images are the same for every seed (a permutation seeded with 0), so seeds
    differ only in training randomness. Returns (dataset without them, val_x, val_y).
    """
    total = len(ds.train_y)
    if n >= total:
        raise BrainPropError(
            f"--val {n} would hold out all {total} training images: pick fewer than {total}"
        )
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(0)).to(ds.train_x.device)
    keep, held = perm[:-n], perm[-n:]
    train = Dataset(
        ds.name, ds.train_x[keep], ds.train_y[keep], ds.test_x, ds.test_y, ds.num_classes
    )
    return train, ds.train_x[held], ds.train_y[held]
