"""BrainProp's head as two GPU kernels: one for the choice, reward and error, one for the
gradient.

On PyTorch ops the head is 22 operators a step, forward and backward (``python
benchmarks/head_ops.py`` lists them), against EBP's 9. On a GPU each is a kernel, and a small
network's step, eager or captured in a CUDA graph, is bound by its kernels' count, not their
arithmetic: those operators are BrainProp's extra cost over EBP. Here the ε-greedy choice, the
reward, the chosen unit's error and the batch's loss are one Triton kernel, and the gradient
(zero except at each row's chosen unit) another. The two uniform draws stay ``torch.rand`` with
the caller's generator, so the exploration stream is the unfused head's.

The kernels compute what the unfused head computes on CUDA, in the same order and precision
(fp32): the Gumbel noise through libdevice's ``logf``, the algorithm of the CUDA ``logf``
that PyTorch's ``log`` calls, and the gradient's scale as PyTorch's CUDA division by a number
takes it (times the number's fp32 reciprocal). So choices, rewards, errors and gradient are the
unfused head's bit for bit; only the loss, summed over the batch in another order and divided
less precisely, may differ in its last bits, and it is reported, not differentiated.
:class:`brainprop.objectives.BrainProp` checks this on each device's first batch before it
relies on the kernels.

Without Triton, or for a tensor that is not fp32 on CUDA, :func:`unsupported` says why and the
unfused head runs. Triton's interpreter (``TRITON_INTERPRET=1``) runs the kernels on CPU tensors,
which is how the test suite checks them.
"""

from __future__ import annotations

import contextlib
from functools import cache
from typing import Any

import torch
from torch.autograd.function import once_differentiable

__all__ = ["chosen_unit_head", "unavailable", "unsupported"]

# Rows per block in the kernels: with the classes' block, at most 4096 elements, so that a
# block of Tiny ImageNet's 200 classes stays in registers.
_ELEMENTS = 4096

#: Whether Triton may contract a multiply and an add into one rounding, per kernel (said here
#: because Triton's default is to change): in ``choose`` as nvcc does in PyTorch's kernels
#: (``--fmad=true``), which leaves libdevice's logf as PyTorch's log has it, the rest being the
#: loss; not in ``spread``, whose product is added to zero as autograd adds it.
_FUSE_CHOOSE = {"enable_fp_fusion": True}
_FUSE_SPREAD = {"enable_fp_fusion": False}


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


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device's stream, which need not be the tensors'
    (an eager run on cuda:1 never makes it current)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


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
        with _on(q.device):
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
                **_FUSE_CHOOSE,
            )
        ctx.save_for_backward(actions, errors)
        ctx.classes = classes
        flags = explored.view(torch.bool)
        ctx.mark_non_differentiable(actions, flags, rewards)
        # Autograd would otherwise fill a tensor of zeros for each of those three: 3 kernels.
        ctx.set_materialize_grads(False)
        return loss, actions, flags, rewards

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor | None, *_: Any) -> tuple[torch.Tensor | None, ...]:
        from .headkernels import spread

        if grad is None:
            return None, None, None, None, None
        actions, errors = ctx.saved_tensors
        rows, classes = len(actions), ctx.classes
        block_rows, block_classes = _blocks(classes)
        q_grad = torch.empty(rows, classes, dtype=errors.dtype, device=errors.device)
        with _on(errors.device):
            spread[(-(-rows // block_rows),)](
                grad,
                actions,
                errors,
                q_grad,
                rows,
                classes,
                INTERPRETED=not errors.is_cuda,
                BLOCK_ROWS=block_rows,
                BLOCK_CLASSES=block_classes,
                **_FUSE_SPREAD,
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
