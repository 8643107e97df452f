"""On-device batching: the whole split lives on the device as uint8.

Shuffling is one ``randperm`` on the device per epoch (the caller draws it, so it can redraw
it on resume), a batch is one gather, and scaling to [0, 1] happens on the gathered batch.
There are no DataLoader workers and no per-sample Python: for these small images a host-side
loader costs more than the step itself.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def num_batches(n: int, batch_size: int) -> int:
    """Batches per epoch, keeping the last partial batch as Keras's ``fit`` does."""
    return -(-n // batch_size)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images [B, C, H, W] -> float32 in [0, 1] (the paper's inputs / 255); bf16 runs
    cast them under autocast."""
    return x.to(torch.float32).div_(255.0)


def permuted_batches(
    x: torch.Tensor,
    y: torch.Tensor,
    perm: torch.Tensor,
    batch_size: int,
    start: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images [b, C, H, W] in [0, 1], labels [b]) batches in the order ``perm``, from batch
    number ``start`` on.

    ``x`` is uint8 [N, C, H, W], ``y`` int64 [N] and ``perm`` a permutation of ``range(N)``
    (one ``randperm`` per epoch), all on one device. ``start`` lets a run interrupted
    mid-epoch continue with the batch it would have taken next. A ``perm`` of [G, N], one
    permutation per seed of a :mod:`~brainprop.stacked` network, gives batches [G, b, ...].
    """
    for idx in perm.split(batch_size, dim=-1)[start:]:
        yield to_float(x[idx]), y[idx]


def ordered_batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches in dataset order, for evaluation. A last batch of one image
    goes with the one before: a BatchNorm without running statistics normalises with the
    batch's in evaluation too, which one value per channel cannot give."""
    sizes = [len(part) for part in y.split(batch_size)]
    if len(sizes) > 1 and sizes[-1] == 1:
        sizes[-2:] = [sizes[-2] + 1]
    for xb, yb in zip(x.split(sizes), y.split(sizes), strict=True):
        yield to_float(xb), yb
