"""BatchNorm whose training statistics span the whole global batch of a torchrun job.

Under several processes each rank holds only its share of every global batch, and a plain
BatchNorm normalises with that share's mean and variance: a conv net trained on 4 ranks x 32
images is then not the network one process trains on the paper's 128, although its summed
gradients are. :func:`synchronise` swaps each BatchNorm of a model for the same layer with
synchronised statistics: in training mode every rank sums its per-channel count, sum and
sum of squares with the others' (one all-reduce per layer in the forward pass and one in
the backward pass), and normalises with the global batch's mean and variance. The gradients are
then those of one process on the whole batch, and the running statistics agree on all ranks.

``torch.nn.SyncBatchNorm`` does this with fused kernels, but for CUDA tensors only; this one
runs on any device, so CI's gloo processes on CPU test the code a GPU job runs. Evaluation
mode and single-process runs take plain BatchNorm's path, and the state dict is plain
BatchNorm's, so checkpoints load into either.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from .errors import BrainPropError

if TYPE_CHECKING:
    from .distributed import Context


class _Synchronised(nn.modules.batchnorm._BatchNorm):
    """Plain BatchNorm outside training, global-batch statistics in training.

    ``parallel`` is the world whose ranks share the statistics; it is set by
    :func:`synchronise`. Without one (a layer built directly, or within :func:`alone`) the
    layer is plain BatchNorm.
    """

    parallel: Context | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _talks(self)):
            return super().forward(x)
        self._check_input_dim(x)
        xf = _wide(x)
        mean, var, count = self._global_moments(xf)
        if self.track_running_stats:
            self._track(mean, var, count)
        y = (xf - _channels(mean, x)) * _channels(torch.rsqrt(var + self.eps), x)
        if self.affine:
            y = y * _channels(self.weight, x) + _channels(self.bias, x)
        return y.to(x.dtype)

    def _global_moments(self, xf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The per-channel mean and (biased) variance of ``xf`` ([N, C, ...], at least fp32)
        over all ranks' shares of the batch, and the number of values per channel ([1],
        float64); a rank with an empty share contributes nothing. Unlike plain BatchNorm, one
        value per channel in the whole batch is not refused: that would need the count on the
        host, a sync."""
        channels = xf.shape[1]
        dims = [0, *range(2, xf.dim())]
        n = xf.numel() // channels
        s1 = xf.sum(dims)
        # Each rank's squared deviations from its own mean, taken in its precision, then
        # turned back into a sum of squares (m2 + s1^2 / n) in float64 and summed over the
        # ranks: E[x^2] - E[x]^2 straight from fp32 sums would cancel catastrophically for
        # channels whose mean is large next to their spread.
        m2 = (xf - _channels(s1 / max(n, 1), xf)).square().sum(dims)
        s1 = s1.double()
        local = torch.cat([s1.new_full((1,), n), s1, m2.double() + s1.square() / max(n, 1)])
        total = self.parallel.summed(local, "the BatchNorm statistics")
        count, s1, s2 = total[:1], total[1 : 1 + channels], total[1 + channels :]
        mean = s1 / count
        var = (s2 / count - mean.square()).clamp_min(0)
        return mean.to(xf.dtype), var.to(xf.dtype), count

    @torch.no_grad()
    def _track(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        """Plain BatchNorm's running statistics, from the global batch (unbiased variance)."""
        self.num_batches_tracked.add_(1)
        factor = self.momentum
        if factor is None:  # a cumulative average, as nn.BatchNorm's momentum=None
            # In float64, as nn.BatchNorm's Python float, but without its sync with the host.
            factor = (1.0 / self.num_batches_tracked.double()).to(self.running_mean.dtype)
        unbiased = var.double() * count / (count - 1).clamp_min(1)
        self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)


def _channels(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The per-channel ``v`` ([C]) shaped to broadcast over ``like`` ([N, C, ...])."""
    return v.view([1, -1] + [1] * (like.dim() - 2))


def _wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least fp32: bf16 or fp16 activations are normalised in fp32, as by cuDNN."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class SyncBatchNorm1d(_Synchronised, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` with global-batch statistics under torchrun."""


class SyncBatchNorm2d(_Synchronised, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with global-batch statistics under torchrun."""


class SyncBatchNorm3d(_Synchronised, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` with global-batch statistics under torchrun."""


_SYNCHRONISED: dict[type[nn.Module], type[_Synchronised]] = {
    nn.BatchNorm1d: SyncBatchNorm1d,
    nn.BatchNorm2d: SyncBatchNorm2d,
    nn.BatchNorm3d: SyncBatchNorm3d,
}


def synchronise(model: nn.Module, parallel: Context) -> nn.Module:
    """Make every BatchNorm of ``model`` (in place) share its training statistics over
    ``parallel``'s ranks (layers already synchronised move to ``parallel``). Returns ``model``.

    Each layer becomes its synchronised twin by a change of class, not a copy: the twins add
    behaviour but no state, so the layer keeps its very parameters and buffers (an optimizer
    built before still holds them), its device, dtype and hooks. Another kind of BatchNorm (a
    subclass, whose forward the twin would drop, or a lazy one) is refused, before any layer
    changes: left as it is, it would quietly normalise with its own rank's share.
    """
    for name, layer in model.named_modules():
        if (
            isinstance(layer, nn.modules.batchnorm._BatchNorm)
            and not isinstance(layer, _Synchronised)
            and type(layer) not in _SYNCHRONISED
        ):
            raise BrainPropError(
                f"layer {name or 'root'} is a {type(layer).__name__}, whose statistics brainprop "
                "cannot share over processes: build the network with nn.BatchNorm1d/2d/3d of a "
                "known size, or train with --local-batchnorm (sync_batchnorm=False)"
            )
    for layer in model.modules():
        twin = _SYNCHRONISED.get(type(layer))
        if twin is not None:
            layer.__class__ = twin
        if isinstance(layer, _Synchronised):
            layer.parallel = parallel
    return model


@contextlib.contextmanager
def alone(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model``'s synchronised layers use their own rank's statistics.

    For work that every rank does alike on the same images (the feedback diagnostics): there
    the global statistics equal the local ones, and talking to the other ranks would only
    cost collectives and mix their dropout masks into each rank's result.
    """
    layers = [m for m in model.modules() if isinstance(m, _Synchronised)]
    worlds = [m.parallel for m in layers]
    for m in layers:
        m.parallel = None
    try:
        yield model
    finally:
        for m, world in zip(layers, worlds, strict=True):
            m.parallel = world


def synchronised(model: nn.Module) -> bool:
    """Whether ``model`` has layers that talk to the other ranks in their forward pass."""
    return any(isinstance(m, _Synchronised) and _talks(m) for m in model.modules())


def _talks(layer: _Synchronised) -> bool:
    return layer.parallel is not None and layer.parallel.active
