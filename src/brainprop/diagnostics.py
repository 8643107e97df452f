"""How far a feedback pathway is from exact backpropagation, per layer.

Two kinds of numbers, both cheap enough for once per epoch on one batch:

* weight alignment: the angle (degrees) between a layer's forward weights W and its feedback
  weights B, and the norm ratio |B| / |W| (``direct`` mode has no B shaped like W and is skipped);
* update alignment: the angle between the weight gradient the rule's feedback delivers (its
  update before weight decay) and the exact gradient (symmetric feedback: backpropagation's)
  of the *same* objective on the *same* batch with the *same* actions and dropout masks.

:func:`diagnostics` returns them as one flat dict of floats (``angle_wb/<layer>``,
``norm_ratio/<layer>``, ``angle_update/<layer>``) ready to be history columns;
:func:`plot_diagnostics` draws a history's columns into a PNG.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .evaluation import modes_kept
from .feedback import exact_gradients, feedback_weight, layer_kind, layer_mode
from .files import atomic_write_figure
from .objectives import Objective
from .rng import global_streams_kept
from .step import objective_input

__all__ = ["angle", "diagnostics", "plot_diagnostics", "update_alignment", "weight_alignment"]


def angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """Angle in degrees between two same-shaped tensors, flattened; NaN if either is zero."""
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    if a.norm() == 0 or b.norm() == 0:
        return math.nan
    a, b = a / a.norm(), b / b.norm()
    # 2 atan2(|a - b|, |a + b|) instead of acos(a.b): exact near 0 and 180 degrees.
    return math.degrees(2 * math.atan2(float((a - b).norm()), float((a + b).norm())))


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name or "root", m) for name, m in model.named_modules() if layer_kind(m) is not None]


def weight_alignment(model: nn.Module) -> dict[str, float]:
    """``angle_wb/<layer>`` (degrees) and ``norm_ratio/<layer>`` (|B| / |W|) per layer."""
    out: dict[str, float] = {}
    for name, layer in _layers(model):
        b = feedback_weight(layer)
        if b is None:
            continue
        w = layer.weight.detach()
        out[f"angle_wb/{name}"] = angle(w, b)
        out[f"norm_ratio/{name}"] = float(b.detach().double().norm() / w.double().norm())
    return out


def update_alignment(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, objective: Objective, seed: int = 0
) -> dict[str, float]:
    """``angle_update/<layer>``: the rule's weight update vs the exact gradient of the same
    objective (symmetric feedback: backpropagation), in degrees.

    Runs the batch ``x`` ([N, ...]) twice in the model's current mode, once through the layers'
    feedback and once with :func:`~brainprop.feedback.exact_gradients`, with the same dropout
    masks (the RNG state is replayed) and the same actions (the objective's generator is seeded
    with ``seed`` both times). The model's gradients, buffers (BatchNorm running statistics) and
    the global RNG state are restored afterwards, so training continues as if nothing had run.
    A layer whose weights get no gradient (frozen, or not used by the forward) gets NaN.

    An all-symmetric model's update is the exact gradient by definition: its angles are 0 (NaN
    for a frozen layer; 0 for a layer the forward skips, which only the passes could tell)
    without the two passes, which every epoch of a paper run would pay for.
    """
    layers = _layers(model)
    if all(layer_mode(m) == "symmetric" for _, m in layers):
        return {
            f"angle_update/{name}": 0.0 if m.weight.requires_grad else math.nan
            for name, m in layers
        }
    params = list(model.parameters())
    saved_grads = [p.grad for p in params]
    saved_buffers = [b.detach().clone() for b in model.buffers()]
    grads: list[list[torch.Tensor | None]] = []
    try:
        for exact in (False, True):
            # Each pass leaves the streams as it found them, so the second replays the first's
            # dropout masks and training goes on with the streams it had.
            with (
                global_streams_kept(x.device),
                exact_gradients() if exact else contextlib.nullcontext(),
            ):
                for p in params:
                    p.grad = None
                q = model(x)
                gen = torch.Generator(device=x.device).manual_seed(seed)
                objective(objective_input(q), y, gen).loss.backward()
            grads.append([_grad(m) for _, m in layers])
    finally:
        for p, g in zip(params, saved_grads, strict=True):
            p.grad = g
        with torch.no_grad():
            for b, saved in zip(model.buffers(), saved_buffers, strict=True):
                b.copy_(saved)
    return {
        f"angle_update/{name}": math.nan if rule is None or exact is None else angle(rule, exact)
        for (name, _), rule, exact in zip(layers, grads[0], grads[1], strict=True)
    }


def _grad(layer: nn.Module) -> torch.Tensor | None:
    """A copy of ``layer``'s weight gradient; None for a frozen layer or one the forward skips."""
    grad = layer.weight.grad
    return None if grad is None else grad.detach().clone()


def diagnostics(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, objective: Objective, seed: int = 0
) -> dict[str, float]:
    """All per-layer diagnostics for one batch, as a flat dict of floats (history columns)."""
    with modes_kept(model, training=True):
        return {**weight_alignment(model), **update_alignment(model, x, y, objective, seed)}


def plot_diagnostics(history: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Plot every ``angle_wb/``, ``angle_update/`` and ``norm_ratio/`` column over epochs."""
    from matplotlib.figure import Figure

    panels = [
        ("angle_wb/", "angle(W, B) [deg]"),
        ("angle_update/", "angle(update, exact gradient) [deg]"),
        ("norm_ratio/", "|B| / |W|"),
    ]
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(15, 4))
    axes = fig.subplots(1, 3)
    for ax, (prefix, label) in zip(axes, panels, strict=True):
        keys = [k for k in history[0] if k.startswith(prefix)] if history else []
        for key in keys:
            values = [h.get(key, math.nan) for h in history]
            ax.plot(epochs, values, marker=".", label=key[len(prefix) :])
        ax.set(xlabel="epoch", ylabel=label)
        if keys:
            ax.legend(fontsize="small", title="layer")
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write_figure(path, fig, dpi=110)
