"""One training step: forward, objective, backward, plain SGD update.

The training loop and ``brainprop bench`` both run :func:`train_step` (through
:func:`brainprop.fastpath.make_step`) and the loop's bookkeeping after it, :func:`tally`, so
the benchmark times exactly what training does. A stack of seeds has its own vmapped step,
:meth:`brainprop.stacked.Stack.plain_step`, which shares this one's optimizer groups and
short-batch scaling.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from . import distributed
from .config import TrainConfig
from .devices import autocast
from .objectives import Objective, Output, batch_scale
from .presets import decayed_parameters


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.SGD:
    """Plain SGD, with ``config.weight_decay`` on the weights the paper decays."""
    decay, rest = decayed_parameters(model)
    return torch.optim.SGD(
        decay_groups(decay, rest, config.weight_decay), lr=config.lr, momentum=0.0
    )


def decay_groups(
    decayed: list[torch.Tensor], rest: list[torch.Tensor], weight_decay: float
) -> list[dict[str, Any]]:
    """SGD parameter groups: ``weight_decay`` on ``decayed`` only; an empty group is left out."""
    groups = [
        {"params": decayed, "weight_decay": weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def objective_input(q: torch.Tensor) -> torch.Tensor:
    """The network's outputs ``q`` as the objective takes them: fp32 from bf16 autocast, so
    that its sums and the gradient it sends back are fp32; a float64 network's as they are
    (a gradient check against a hand-written step keeps its precision)."""
    return q if q.dtype in (torch.float32, torch.float64) else q.float()


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
    out = objective(objective_input(q), y, generator)
    loss = out.loss
    if spread:
        loss = loss * parallel.loss_weight(objective, len(y))
    elif (scale := batch_scale(objective, len(y), batch_size)) != 1:
        loss = loss * scale
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if spread:
        parallel.reduce_gradients(model)
    optimizer.step()
    return out


def tally(
    sums: Sequence[torch.Tensor] | torch.Tensor,
    first_bad: torch.Tensor,
    out: Output,
    images: int,
    step: int,
) -> torch.Tensor:
    """Add one step to an epoch's running sums, in place and on the device, so that the host
    never waits for the step: the loss times the batch's ``images``, the rewards and the
    explorations. ``sums`` are three tensors, [] for one network or [G] for a stack of G (the
    rows of one [3, G] tensor will do). Returns ``first_bad`` ([] or [G] int64, -1 while the
    loss is finite) with ``step`` where the loss first turned non-finite."""
    loss = out.loss.detach()
    sums[0].add_(loss * images)
    sums[1].add_(out.rewards.sum(-1))
    sums[2].add_(out.explored.sum(-1))
    bad = ~torch.isfinite(loss) & (first_bad < 0)
    return torch.where(bad, torch.full_like(first_bad, step), first_bad)
