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
from collections.abc import Callable
from functools import cache
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from .errors import BrainPropError

__all__ = ["Head", "chosen_unit_head", "disagreement", "unavailable", "unsupported"]

#: A head as :func:`chosen_unit_head` is one: (q, y, epsilon, explore, uniform) to (loss,
#: actions, explored, rewards).
Head = Callable[
    [torch.Tensor, torch.Tensor, float, torch.Tensor | None, torch.Tensor | None],
    tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
]

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
    # A broken install can raise anything on import; the unfused head needs none of it.
    except Exception as e:  # noqa: BLE001
        return f"Triton cannot be imported ({type(e).__name__}: {e})"
    return None


def unavailable(device: torch.device) -> str | None:
    """Why the kernels cannot run on ``device``, or None when they can."""
    if device.type != "cuda":
        return f"{device.type} is not CUDA"
    return missing(device)


def missing(device: torch.device) -> str | None:
    """What ``device``, a CUDA device, lacks to build the kernels (Triton, or a Triton that
    imports), or None: a CPU lacks nothing, as the kernels are not meant for it."""
    return _triton_missing() if device.type == "cuda" else None


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
        # Two tensors, not two views of one: errors is saved for the backward, and a view
        # shares its version counter with rewards, so changing rewards in place would fail it.
        rewards = torch.empty(rows, dtype=q.dtype, device=q.device)
        errors = torch.empty(rows, dtype=q.dtype, device=q.device)
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
    def backward(ctx: Any, grad: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        from .headkernels import spread

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

    Raises a one-line BrainPropError for inputs of other shapes, kinds or devices: the kernels
    index every tensor by ``q``'s shape, so they would read past the end of a shorter one.
    """
    if (why := _misfit(q, y, explore, uniform)) is not None:
        raise BrainPropError(f"chosen_unit_head cannot take {why}")
    # The kernels index every input but q's rows as one dense block.
    explore, uniform = (None if t is None else t.contiguous() for t in (explore, uniform))
    return _Head.apply(q, y.contiguous(), epsilon, explore, uniform)


def _misfit(
    q: torch.Tensor, y: torch.Tensor, explore: torch.Tensor | None, uniform: torch.Tensor | None
) -> str | None:
    """What of the head's inputs the kernels cannot take, or None; from their shapes, kinds
    and devices alone, so that it never waits for a GPU."""
    if q.dtype != torch.float32 or q.dim() != 2 or q.stride(1) != 1:
        return f"Q-values {q.dtype} of shape {tuple(q.shape)}: it takes fp32 rows [B, K]"
    if (explore is None) != (uniform is None):
        return "one draw without the other: pass explore and uniform, or neither (epsilon 0)"
    rows = q.shape[0]
    expected = [
        ("labels", y, (rows,)),
        ("explore", explore, (rows,)),
        ("uniform", uniform, q.shape),
    ]
    for name, tensor, shape in expected:
        if tensor is None:
            continue
        if tensor.shape != shape or tensor.device != q.device:
            return (
                f"{name} of shape {tuple(tensor.shape)} on {tensor.device}: Q-values of shape "
                f"{tuple(q.shape)} on {q.device} take {name} of shape {tuple(shape)} there"
            )
        if name == "labels":
            kind, fits = "integer", not (tensor.dtype.is_floating_point or tensor.dtype.is_complex)
            fits = fits and tensor.dtype != torch.bool
        else:
            kind, fits = "float32", tensor.dtype == torch.float32
        if not fits:
            return f"{name} of {tensor.dtype}: it takes {kind} {name}"
    return None


def disagreement(
    q: torch.Tensor,
    y: torch.Tensor,
    epsilon: float,
    draws: tuple[torch.Tensor | None, torch.Tensor | None],
    reference: Head,
) -> str:
    """How the kernels' head differs from ``reference`` (the unfused head) on ``q``'s device:
    '' where it gives the same choices, rewards and gradient, bit for bit, and the same loss
    to rounding; else what differed, or that the kernels failed (to build, say).

    Compared three ways: on this batch with its ``draws``; with every row exploring, from
    draws of the check's own (the caller's random stream stays as it was), which puts every
    output through the Gumbel noise's logarithms; and on 9 of those rows. Each gradient is of
    0.7 times the loss, as a short last batch's is scaled by n / B, which 9 rows turn into a
    scale that a true division and PyTorch's CUDA division by a number (times its reciprocal)
    round apart.
    """
    own = torch.Generator(device=q.device).manual_seed(0)
    explore = torch.rand(q.shape[0], device=q.device, generator=own)
    uniform = torch.rand(q.shape, device=q.device, generator=own)
    cases = [
        (q, y, epsilon, *draws),
        (q, y, 1.0, explore, uniform),
        (q[:9], y[:9], 1.0, explore[:9], uniform[:9]),
    ]
    wanted = [_outcome(reference, *case) for case in cases]
    try:
        got = [_outcome(chosen_unit_head, *case) for case in cases]
    # A speed-up must not stop a run the unfused head can train, and Triton's build errors
    # share no type: the caller says what failed, and trains with the unfused head.
    except Exception as e:  # noqa: BLE001
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        return f"failed ({type(e).__name__}: {first_line})"
    other = [
        name
        for i, name in enumerate(_OUTCOME)
        if any(not _same(name, a[i], b[i]) for a, b in zip(wanted, got, strict=True))
    ]
    return f"gave other {', '.join(other)}" if other else ""


_OUTCOME = ("actions", "explored", "rewards", "gradient", "loss")


def _outcome(
    head: Head,
    q: torch.Tensor,
    y: torch.Tensor,
    epsilon: float,
    explore: torch.Tensor | None,
    uniform: torch.Tensor | None,
) -> tuple[torch.Tensor, ...]:
    """``head``'s results in the order of ``_OUTCOME``: its loss as it is, and the gradient of
    0.7 times that loss (a short last batch's n / B scale)."""
    leaf = q.detach().requires_grad_()
    # The caller may compute the objective alone, under no_grad; this needs gradients.
    with torch.enable_grad():
        loss, actions, explored, rewards = head(leaf, y, epsilon, explore, uniform)
        (grad,) = torch.autograd.grad(loss * 0.7, leaf)
    return actions, explored, rewards, grad, loss


def _same(name: str, a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    if name == "loss":
        # NaN where the other has NaN: a first batch may have diverged already.
        return torch.allclose(a, b, rtol=1e-5, atol=0, equal_nan=True)
    return _same_bits(a, b)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the floats ``a`` and ``b`` are equal bit for bit, NaN to any NaN: ``allclose``
    with no tolerance takes -0.0 for +0.0, which autograd's gradient tells apart."""
    nan = a.isnan() & b.isnan()
    return torch.equal(_bits(a).masked_fill(nan, 0), _bits(b).masked_fill(nan, 0))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
