"""BrainProp's head as two GPU kernels: one for the choice, reward and error, one for the
gradient.

On PyTorch ops the head is 22 operators a step, forward and backward (``python
benchmarks/head_ops.py`` lists them), against EBP's 9. On a GPU each is a kernel, and a small
network's step, eager or captured in a CUDA graph, is bound by its kernels' count, not their
arithmetic: those operators are BrainProp's extra cost over EBP. Here the ε-greedy choice, the
reward, the chosen unit's error and the batch's loss are one Triton kernel, and the gradient
(zero except at each row's chosen unit) another. The two uniform draws stay ``torch.rand`` with
the caller's generator, so the exploration stream is the unfused head's.

The kernels compute what the unfused head computes, in the same order and precision (fp32):
the Gumbel noise through libdevice's ``logf``, which is the function PyTorch's CUDA ``log``
calls, the gradient's scale by a correctly rounded division. So choices, rewards, errors and
gradient are the unfused head's bit for bit; only the loss, a sum over the batch taken in
another order, may differ in its last bits, and it is reported, not differentiated.
:class:`brainprop.objectives.BrainProp` checks this on each device's first batch before it
relies on the kernels.

Without Triton, or for a tensor that is not fp32 on CUDA, :func:`unsupported` says why and the
unfused head runs. Triton's interpreter (``TRITON_INTERPRET=1``) runs the kernels on CPU tensors,
which is how the test suite checks them.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch
from torch.autograd.function import once_differentiable

__all__ = ["chosen_unit_head", "unavailable", "unsupported"]

# Rows per block in the kernels: with the classes' block, at most 4096 elements, so that a
# block of Tiny ImageNet's 200 classes stays in registers.
_ELEMENTS = 4096

#: Triton's compile options for both kernels: multiply-adds contracted, as nvcc compiles
#: PyTorch's own (``--fmad=true``), said here because Triton's default is to change.
_COMPILE = {"enable_fp_fusion": True}


@cache
def _triton_missing() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"Triton is not installed ({e})"
    return None


def unavailable(device: torch.device) -> str | None:
    """Why the kernels cannot run on ``device``, or None when they can."""
    if device.type != "cuda":
        return f"{device.type} is not CUDA"
    return _triton_missing()


def unsupported(q: torch.Tensor) -> str | None:
    """Why the kernels cannot compute the head of ``q`` ([B, K]), or None when they can."""
    if (why := unavailable(q.device)) is not None:
        return why
    if q.dtype != torch.float32 or q.dim() != 2 or q.stride(1) != 1 or q.numel() == 0:
        return f"the outputs are {q.dtype} of shape {tuple(q.shape)}, not fp32 rows [B, K]"
    return None


def _blocks(classes: int) -> tuple[int, int]:
    block_classes = max(16, 1 << (classes - 1).bit_length())
    return max(1, _ELEMENTS // block_classes), block_classes


class _Head(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        y: torch.Tensor,
        epsilon: float,
        explore: torch.Tensor | None,
        uniform: torch.Tensor | None,
    ) -> tuple[torch.Tensor, ...]:
        from .headkernels import choose

        rows, classes = q.shape
        block_rows, block_classes = _blocks(classes)
        actions = torch.empty(rows, dtype=torch.int64, device=q.device)
        explored = torch.empty(rows, dtype=torch.uint8, device=q.device)
        rewards, errors = torch.empty(2, rows, dtype=q.dtype, device=q.device)
        loss = torch.empty((), dtype=q.dtype, device=q.device)
        # One program: the loss sums over the whole batch, and a batch is too small to gain
        # from more (at most a few thousand rows of at most a few hundred classes).
        choose[(1,)](
            q,
            q.stride(0),
            y,
            explore,
            uniform,
            actions,
            explored,
            rewards,
            errors,
            loss,
            rows,
            classes,
            epsilon,
            torch.finfo(torch.float32).tiny,
            EXPLORE=explore is not None,
            INTERPRETED=not q.is_cuda,
            BLOCK_ROWS=block_rows,
            BLOCK_CLASSES=block_classes,
            **_COMPILE,
        )
        ctx.save_for_backward(actions, errors)
        ctx.classes = classes
        ctx.mark_non_differentiable(actions, explored, rewards)
        return loss, actions, explored.view(torch.bool), rewards

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        from .headkernels import spread

        actions, errors = ctx.saved_tensors
        rows, classes = len(actions), ctx.classes
        block_rows, block_classes = _blocks(classes)
        q_grad = torch.empty(rows, classes, dtype=errors.dtype, device=errors.device)
        spread[(-(-rows // block_rows),)](
            grad,
            actions,
            errors,
            q_grad,
            rows,
            classes,
            BLOCK_ROWS=block_rows,
            BLOCK_CLASSES=block_classes,
            **_COMPILE,
        )
        return q_grad, None, None, None, None


def chosen_unit_head(
    q: torch.Tensor,
    y: torch.Tensor,
    epsilon: float,
    explore: torch.Tensor | None,
    uniform: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """BrainProp's head on fp32 outputs ``q`` ([B, K]) and labels ``y`` ([B] int).

    ``explore`` ([B]) and ``uniform`` ([B, K]) are the uniform draws that decide which rows
    explore (those below ``epsilon``) and, through Gumbel noise, what they choose; both None
    when ``epsilon`` is 0. Returns (loss, actions [B] int64, explored [B] bool, rewards [B]),
    the loss ``1/2 mean((r - q_s)^2)`` differentiable with respect to ``q``.
    """
    return _Head.apply(q, y.contiguous(), epsilon, explore, uniform)
