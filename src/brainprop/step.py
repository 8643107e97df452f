"""One training step: forward, objective, backward, plain SGD update.

The training loop and ``brainprop bench`` both run :func:`train_step` (through
:func:`brainprop.fastpath.make_step`), so the benchmark times exactly what training does.
"""

from __future__ import annotations

import torch
from torch import nn

from . import distributed
from .config import TrainConfig
from .devices import autocast
from .objectives import Objective, Output
from .presets import decayed_parameters


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.SGD:
    """Plain SGD; Keras's l2(lambda) adds lambda*w^2 to the loss, i.e. weight decay 2*lambda."""
    decay, rest = decayed_parameters(model)
    groups = [
        {"params": decay, "weight_decay": 2 * config.l2},
        {"params": rest, "weight_decay": 0.0},
    ]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=config.lr, momentum=0.0)


def train_step(
    model: nn.Module,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    generator: torch.Generator | None,
    batch_size: int,
    bf16: bool = False,
    parallel: distributed.Context | None = None,
) -> Output:
    """One training step on the batch ``x`` ([b, C, H, W] float), ``y`` ([b]): forward,
    objective, backward, SGD update.

    ``batch_size`` is the nominal batch size: an objective that sums over the nominal batch
    (BrainProp, as the Keras code) takes a proportionally smaller step on a short last batch.
    Returns the objective's output; its ``loss`` is the unscaled batch mean.

    With ``parallel`` of several processes, ``x`` is this rank's share of the global batch:
    the loss is weighted by that share and the gradients are summed over the ranks before the
    update (see :mod:`brainprop.distributed`).
    """
    spread = parallel is not None and parallel.active
    if spread and len(y) == 0:
        return parallel.idle_step(model, optimizer, x, y)
    with autocast(x.device, bf16):
        q = model(x)
    out = objective(q.float(), y, generator)
    loss = out.loss
    if spread:
        loss = loss * parallel.loss_weight(objective, len(y))
    elif objective.sums_over_nominal_batch and len(y) != batch_size:
        loss = loss * (len(y) / batch_size)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if spread:
        parallel.reduce_gradients(model)
    optimizer.step()
    return out
