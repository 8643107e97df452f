"""Layers that reproduce Keras/TensorFlow semantics the reference models rely on.

* :func:`tf_same_padding`: TensorFlow's ``padding='same'`` rule, which pads *asymmetrically*
  (the extra pixel goes after) whenever the total pad is odd, e.g. a 3x3 stride-2 conv on 28x28.
* :class:`Conv2dSame`: ``nn.Conv2d`` with that rule baked in for a fixed input size.
* :class:`LocallyConnected2d`: Keras ``LocallyConnected2D`` (unshared 2-D filters), channels-first.

All tensors are channels-first, ``[B, C, H, W]``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .errors import BrainPropError
from .fieldtypes import whole

__all__ = ["Conv2dSame", "LocallyConnected2d", "tf_same_padding"]

Padding = Literal["valid", "same"]
IntPair = int | tuple[int, int]


def _pair(value: IntPair, name: str) -> tuple[int, int]:
    pair = tuple(value) if isinstance(value, tuple | list) else (value, value)
    if len(pair) != 2 or not all(whole(v, least=1) for v in pair):
        raise BrainPropError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return int(pair[0]), int(pair[1])


def tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's ``'same'`` padding along one spatial axis.

    The output has ``ceil(size / stride)`` positions; the total pad is
    ``max((out - 1) * stride + kernel - size, 0)``, split with the smaller half before and the
    larger half after (PyTorch's symmetric ``padding=`` cannot express the odd case).

    Returns:
        ``(pad_before, pad_after)``, e.g. ``(0, 1)`` for size 28, kernel 3, stride 2.
    """
    if min(size, kernel, stride) < 1:
        raise BrainPropError(
            f"size, kernel and stride must be >= 1, got size={size}, kernel={kernel}, "
            f"stride={stride}"
        )
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _output_size(size: int, kernel: int, stride: int, padding: Padding) -> int:
    if padding == "same":
        return -(-size // stride)
    return (size - kernel) // stride + 1


def _same_pads(
    input_size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int]
) -> tuple[int, int, int, int]:
    """TF 'same' pads for both spatial axes, in ``F.pad`` order ``(left, right, top, bottom)``."""
    (top, bottom), (left, right) = (
        tf_same_padding(n, k, s) for n, k, s in zip(input_size, kernel, stride, strict=True)
    )
    return left, right, top, bottom


def _check_input(x: torch.Tensor, channels: int, input_size: tuple[int, int], layer: str) -> None:
    # The pads (and, for unshared weights, the number of positions) were fixed for input_size;
    # any other size would silently compute something Keras never would.
    if x.dim() != 4 or tuple(x.shape[1:]) != (channels, *input_size):
        raise ValueError(
            f"{layer} was built for [B, {channels}, {input_size[0]}, {input_size[1]}] inputs, "
            f"got {list(x.shape)}"
        )


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow ``'same'`` padding for a fixed input size.

    The pads are computed once from ``input_size`` with :func:`tf_same_padding`. Symmetric pads
    go into the convolution's own ``padding`` (no extra copy); only an asymmetric pad (odd total,
    as for a 3x3 stride-2 conv on an even size) is applied with ``F.pad`` before the conv. The
    only parameters are ``weight`` ``[C_out, C_in, k_h, k_w]`` and, if ``bias``, ``bias``
    ``[C_out]``, so parameter counts match Keras ``Conv2D``.

    Shapes:
        input ``[B, C_in, H, W]`` with ``(H, W) == input_size``;
        output ``[B, C_out, ceil(H / s_h), ceil(W / s_w)]``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair,
        input_size: tuple[int, int],
        bias: bool = False,
    ) -> None:
        kernel = _pair(kernel_size, "kernel_size")
        strides = _pair(stride, "stride")
        self.input_size = _pair(input_size, "input_size")
        left, right, top, bottom = _same_pads(self.input_size, kernel, strides)
        symmetric = top == bottom and left == right
        super().__init__(
            in_channels,
            out_channels,
            kernel,
            stride=strides,
            padding=(top, left) if symmetric else 0,
            bias=bias,
        )
        # F.pad order is (left, right, top, bottom); empty when the conv pads by itself.
        self.explicit_pad: tuple[int, ...] = () if symmetric else (left, right, top, bottom)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C_in, H, W] -> [B, C_out, H_out, W_out]``."""
        _check_input(x, self.in_channels, self.input_size, type(self).__name__)
        if self.explicit_pad:
            x = F.pad(x, self.explicit_pad)
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, input_size={self.input_size}, tf_padding='same'"


class _Patches(torch.autograd.Function):
    """``[B, C, H, W] -> [L, B, k_h * k_w * C]``, the patches of :class:`LocallyConnected2d`
    (input already padded), whose way back is one ``F.fold`` (col2im).

    Autograd's own way back through the two ``Tensor.unfold`` views is two scatter passes
    (``unfold_backward``); col2im does it in one, and cut a whole ``loccon`` step's time by
    5-23 % on a CPU (docs/performance.md, "Changes tried on the CPU step").
    """

    generate_vmap_rule = True  # a stack of seeds (brainprop.stacked) vmaps its forward

    @staticmethod
    def forward(x, kernel, stride, output_size):
        (k_h, k_w), (s_h, s_w), (h_out, w_out) = kernel, stride, output_size
        # Strided view [B, C, H_out, W_out, k_h, k_w]; the reshape below is the only copy.
        # Every size is spelled out: an empty batch (an idle torchrun rank) has no -1 to infer.
        patches = x.unfold(2, k_h, s_h).unfold(3, k_w, s_w)
        return patches.permute(2, 3, 0, 4, 5, 1).reshape(
            h_out * w_out, x.shape[0], k_h * k_w * x.shape[1]
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.kernel, ctx.stride, ctx.output_size = inputs
        ctx.input_shape = x.shape

    @staticmethod
    def jvp(ctx, x_tangent, *_):
        # The gather is linear: a tangent's patches are its forward-mode derivative.
        return _Patches.forward(x_tangent, ctx.kernel, ctx.stride, ctx.output_size)

    @staticmethod
    def backward(ctx, g):
        (b, c, h, w), (k_h, k_w) = ctx.input_shape, ctx.kernel
        positions = g.shape[0]
        # F.fold wants [B, C * k_h * k_w, L], the patch in (C, k_h, k_w) order.
        cols = g.reshape(positions, b, k_h, k_w, c).permute(1, 4, 2, 3, 0)
        cols = cols.reshape(b, c * k_h * k_w, positions)
        return F.fold(cols, (h, w), ctx.kernel, stride=ctx.stride), None, None, None


class LocallyConnected2d(nn.Module):
    """Keras ``LocallyConnected2D``: a 2-D convolution whose filters are not shared.

    Every output position ``l = i * W_out + j`` (row-major) has its own kernel. The layer is
    computed as one batched matmul over positions: the input's patches are gathered as a strided
    view, copied once into ``[L, B, K]``, multiplied by ``weight`` with ``torch.bmm`` and the
    result permuted back to channels-first. That beat ``F.unfold`` + ``einsum``/``bmm`` on the
    published shapes (see ``benchmarks/layers_locally_connected.py``).

    Parameters:
        weight: ``[L, K, C_out]`` with ``L = H_out * W_out`` and ``K = k_h * k_w * C_in``, the
            patch flattened in ``(k_h, k_w, C_in)`` order. This is exactly the Keras kernel
            layout (``implementation=1``, channels-last patches), so this layer's Keras kernel
            loads as-is. (A dense layer after ``Flatten`` would not: Keras flattens
            channels-last, PyTorch channels-first.)
        bias (if ``bias``): ``[C_out, H_out, W_out]``, Keras's ``[H_out, W_out, C_out]`` bias
            moved to channels-first.

    The parameter count is Keras's: ``L * K * C_out`` (+ ``L * C_out`` with bias).

    Args:
        in_channels: ``C_in``.
        out_channels: ``C_out`` (Keras ``filters``).
        input_size: ``(H, W)`` of the inputs; the number of positions depends on it.
        kernel_size: ``k`` or ``(k_h, k_w)``.
        stride: ``s`` or ``(s_h, s_w)``.
        padding: ``'valid'`` (``H_out = (H - k_h) // s_h + 1``) or ``'same'``
            (``H_out = ceil(H / s_h)``, zero pads placed by :func:`tf_same_padding`, as a
            TensorFlow convolution places them). Keras's own ``LocallyConnected2D`` takes
            'valid' only in its ``implementation=1``; its others start each 'same' window at
            ``o * s - k // 2``, which can differ from this for a stride above 1 or an even
            kernel. The paper's networks use 'valid'.
        bias: whether to add a per-position, per-channel bias.

    Shapes:
        input ``[B, C_in, H, W]`` with ``(H, W) == input_size``; output
        ``[B, C_out, H_out, W_out]``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        input_size: tuple[int, int],
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: Padding = "valid",
        bias: bool = False,
    ) -> None:
        super().__init__()
        if padding not in ("valid", "same"):
            raise BrainPropError(f"padding must be 'valid' or 'same', got {padding!r}")
        if not (whole(in_channels, least=1) and whole(out_channels, least=1)):
            raise BrainPropError(
                f"channels must be whole numbers >= 1, got in_channels={in_channels!r}, "
                f"out_channels={out_channels!r}"
            )
        self.in_channels = in_channels = int(in_channels)
        self.out_channels = out_channels = int(out_channels)
        self.input_size = _pair(input_size, "input_size")
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding: Padding = padding
        if padding == "valid" and any(
            k > n for k, n in zip(self.kernel_size, self.input_size, strict=True)
        ):
            raise BrainPropError(
                f"kernel_size {self.kernel_size} is larger than input_size {self.input_size} "
                "with padding='valid'; use a smaller kernel or padding='same'"
            )
        self.output_size: tuple[int, int] = (
            _output_size(self.input_size[0], self.kernel_size[0], self.stride[0], padding),
            _output_size(self.input_size[1], self.kernel_size[1], self.stride[1], padding),
        )
        self.explicit_pad: tuple[int, ...] = (
            _same_pads(self.input_size, self.kernel_size, self.stride) if padding == "same" else ()
        )
        n_positions = self.output_size[0] * self.output_size[1]
        patch = self.kernel_size[0] * self.kernel_size[1] * in_channels
        self.weight = nn.Parameter(torch.empty(n_positions, patch, out_channels))
        self.bias: nn.Parameter | None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, *self.output_size))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """U(-1/sqrt(K), 1/sqrt(K)) for weight and bias, K = k_h * k_w * C_in.

        The same per-kernel scale ``nn.Conv2d`` uses by default; Keras's glorot_uniform would
        count all ``L`` kernels into the fan and shrink the weights with the image size.
        """
        bound = 1.0 / math.sqrt(self.weight.shape[1])
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C_in, H, W] -> [B, C_out, H_out, W_out]``."""
        y = self.image(torch.bmm(self.patches(x), self.weight))
        return y if self.bias is None else y + self.bias

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C_in, H, W] -> [L, B, k_h * k_w * C_in]``: each output position's input patch,
        padded as the layer pads, in the order of the weight's rows. Every forward, plain or
        with a feedback pathway, goes through here, so the input size is checked here."""
        _check_input(x, self.in_channels, self.input_size, type(self).__name__)
        if self.explicit_pad:
            x = F.pad(x, self.explicit_pad)
        return _Patches.apply(x, self.kernel_size, self.stride, self.output_size)

    def image(self, y: torch.Tensor) -> torch.Tensor:
        """``[L, B, C_out] -> [B, C_out, H_out, W_out]``: the inverse arrangement of
        :meth:`patches` for the per-position outputs."""
        return y.permute(1, 2, 0).reshape(y.shape[1], self.out_channels, *self.output_size)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, input_size={self.input_size}, "
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding!r}, "
            f"output_size={self.output_size}, bias={self.bias is not None}"
        )
