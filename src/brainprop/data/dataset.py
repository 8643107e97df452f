"""The in-memory dataset every model and trainer consumes."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


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

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        _, c, h, w = self.train_x.shape
        return (c, h, w)
