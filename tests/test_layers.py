"""Tests for brainprop.layers against direct, slow reference implementations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from brainprop.errors import BrainPropError
from brainprop.layers import Conv2dSame, LocallyConnected2d, tf_same_padding


def loop_locally_connected(layer: LocallyConnected2d, x: torch.Tensor) -> torch.Tensor:
    """One explicit slice and contraction per output position, in the Keras weight layout."""
    k_h, k_w = layer.kernel_size
    s_h, s_w = layer.stride
    h_out, w_out = layer.output_size
    if layer.padding == "same":
        (top, bottom), (left, right) = (
            tf_same_padding(n, k, s)
            for n, k, s in zip(layer.input_size, layer.kernel_size, layer.stride, strict=True)
        )
        x = F.pad(x, (left, right, top, bottom))
    # Keras flattens each patch channels-last: (k_h, k_w, C_in).
    kernel = layer.weight.reshape(h_out, w_out, k_h, k_w, layer.in_channels, layer.out_channels)
    rows = []
    for i in range(h_out):
        cols = []
        for j in range(w_out):
            patch = x[:, :, i * s_h : i * s_h + k_h, j * s_w : j * s_w + k_w]
            cols.append(torch.einsum("bchw,hwco->bo", patch, kernel[i, j]))
        rows.append(torch.stack(cols, dim=-1))
    y = torch.stack(rows, dim=-2)
    if layer.bias is not None:
        y = y + layer.bias
    return y


def make_layer(
    c_in: int,
    c_out: int,
    size: tuple[int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: str,
    bias: bool,
) -> LocallyConnected2d:
    layer = LocallyConnected2d(c_in, c_out, size, kernel, stride, padding, bias).double()
    with torch.no_grad():
        layer.weight.normal_()
        if layer.bias is not None:
            layer.bias.normal_()
    return layer


def check_against_loop(layer: LocallyConnected2d, batch: int) -> None:
    x = torch.randn(batch, layer.in_channels, *layer.input_size, dtype=torch.float64)
    x_fast = x.clone().requires_grad_()
    x_loop = x.clone().requires_grad_()
    y_fast = layer(x_fast)
    params = list(layer.parameters())
    assert y_fast.shape == (batch, layer.out_channels, *layer.output_size)

    g = torch.randn_like(y_fast)
    fast_grads = torch.autograd.grad(y_fast, [x_fast, *params], g)
    y_loop = loop_locally_connected(layer, x_loop)
    loop_grads = torch.autograd.grad(y_loop, [x_loop, *params], g)

    torch.testing.assert_close(y_fast, y_loop, rtol=1e-12, atol=1e-12)
    for fast, loop in zip(fast_grads, loop_grads, strict=True):
        torch.testing.assert_close(fast, loop, rtol=1e-12, atol=1e-12)


GRID = list(
    itertools.product(
        ["valid", "same"],
        [(1, 1), (2, 2), (3, 3), (1, 2)],
        [(3, 3), (2, 3), (1, 1)],
        [False, True],
    )
)


@pytest.mark.parametrize(("padding", "stride", "kernel", "bias"), GRID)
def test_locally_connected_matches_loop_grid(
    padding: str, stride: tuple[int, int], kernel: tuple[int, int], bias: bool
) -> None:
    torch.manual_seed(0)
    layer = make_layer(2, 3, (7, 6), kernel, stride, padding, bias)
    check_against_loop(layer, batch=3)


@settings(max_examples=40, deadline=None)
@given(
    c_in=st.integers(1, 4),
    c_out=st.integers(1, 4),
    h=st.integers(3, 9),
    w=st.integers(3, 9),
    k_h=st.integers(1, 3),
    k_w=st.integers(1, 3),
    s_h=st.integers(1, 3),
    s_w=st.integers(1, 3),
    padding=st.sampled_from(["valid", "same"]),
    bias=st.booleans(),
    batch=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_locally_connected_matches_loop_random(
    c_in: int,
    c_out: int,
    h: int,
    w: int,
    k_h: int,
    k_w: int,
    s_h: int,
    s_w: int,
    padding: str,
    bias: bool,
    batch: int,
    seed: int,
) -> None:
    torch.manual_seed(seed)
    layer = make_layer(c_in, c_out, (h, w), (k_h, k_w), (s_h, s_w), padding, bias)
    check_against_loop(layer, batch)


# Forward mode makes torch register its own jvp decompositions with torch.jit.script.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("padding", ["valid", "same"])
def test_locally_connected_gradcheck(padding: str) -> None:
    torch.manual_seed(1)
    layer = make_layer(2, 2, (5, 4), (3, 2), (2, 1), padding, bias=True)
    x = torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=True)

    def fn(inp: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(layer, {"weight": weight, "bias": bias}, (inp,))

    weight = layer.weight.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    # Forward mode and vmapped gradients too: the patch gather is an autograd.Function of ours.
    assert torch.autograd.gradcheck(
        fn, (x, weight, bias), check_forward_ad=True, check_batched_grad=True
    )


@pytest.mark.parametrize(
    ("c_in", "size", "stride", "bias", "expected_out", "expected_params"),
    [
        (1, (28, 28), 1, False, (26, 26), 194_688),
        (32, (26, 26), 2, False, (12, 12), 1_327_104),
        (3, (32, 32), 1, False, (30, 30), 30 * 30 * 9 * 3 * 32),
        (32, (30, 30), 2, False, (14, 14), 14 * 14 * 9 * 32 * 32),
        (1, (28, 28), 1, True, (26, 26), 194_688 + 26 * 26 * 32),
    ],
)
def test_locally_connected_keras_parameter_counts(
    c_in: int,
    size: tuple[int, int],
    stride: int,
    bias: bool,
    expected_out: tuple[int, int],
    expected_params: int,
) -> None:
    layer = LocallyConnected2d(c_in, 32, size, 3, stride, "valid", bias)
    assert layer.output_size == expected_out
    assert sum(p.numel() for p in layer.parameters() if p.requires_grad) == expected_params
    y = layer(torch.randn(2, c_in, *size))
    assert y.shape == (2, 32, *expected_out)


def test_locally_connected_same_output_size() -> None:
    layer = LocallyConnected2d(1, 4, (28, 27), 3, 2, "same")
    assert layer.output_size == (14, 14)
    assert layer(torch.randn(1, 1, 28, 27)).shape == (1, 4, 14, 14)


def test_locally_connected_rejects_wrong_input_size() -> None:
    layer = LocallyConnected2d(1, 4, (8, 8), 3)
    with pytest.raises(ValueError, match="8, 8"):
        layer(torch.randn(1, 1, 9, 8))
    # A wrong channel count was torch.bmm's error about its operands' sizes.
    with pytest.raises(ValueError) as info:
        layer(torch.randn(1, 3, 8, 8))
    assert str(info.value) == (
        "LocallyConnected2d was built for [B, 1, 8, 8] inputs, got [1, 3, 8, 8]"
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"padding": "full"},
        {"kernel_size": 9},
        {"stride": 0},
        {"kernel_size": (3, 3, 3)},
        # A float was a TypeError ("'float' object is not iterable"); True passed as 1.
        {"stride": 2.0},
        {"kernel_size": True},
    ],
)
def test_locally_connected_rejects_bad_arguments(kwargs: dict) -> None:
    args = {"kernel_size": 3, "stride": 1, "padding": "valid"} | kwargs
    with pytest.raises(BrainPropError):
        LocallyConnected2d(1, 2, (8, 8), **args)


def test_locally_connected_rejects_a_channel_count_that_is_no_whole_number_above_zero() -> None:
    # A float was a TypeError out of torch.empty, True a layer of one channel.
    for channels in ((0, 2), (1, 0), (2.0, 2), (1, True)):
        with pytest.raises(BrainPropError, match=f"got in_channels={channels[0]}, out_channels="):
            LocallyConnected2d(*channels, (8, 8), 3)
    layer = LocallyConnected2d(np.int64(1), np.int64(2), (8, 8), 3)
    assert (type(layer.in_channels), layer.weight.shape) == (int, (36, 9, 2))


def test_locally_connected_default_init_and_repr() -> None:
    layer = LocallyConnected2d(3, 8, (10, 10), 3, bias=True)
    bound = 1 / (3 * 3 * 3) ** 0.5
    assert layer.weight.abs().max() <= bound
    assert layer.bias is not None and layer.bias.abs().max() <= bound
    assert layer.weight.min() < 0 < layer.weight.max() and layer.bias.min() < 0 < layer.bias.max()
    assert layer.weight.std() > bound / 4
    assert "output_size=(8, 8)" in repr(layer)
    assert "padding='valid'" in repr(layer)


def test_locally_connected_equals_conv_when_weights_are_shared() -> None:
    # Copying one conv kernel to every position must reproduce the ordinary (shared) conv.
    torch.manual_seed(2)
    conv = torch.randn(5, 3, 3, 2, dtype=torch.float64)  # [C_out, C_in, k_h, k_w]
    layer = LocallyConnected2d(3, 5, (9, 8), (3, 2), 2, "same").double()
    with torch.no_grad():
        layer.weight.copy_(conv.permute(2, 3, 1, 0).reshape(1, -1, 5))
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    expected = F.conv2d(F.pad(x, (0, 0, 1, 1)), conv, stride=2)
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "expected"),
    [
        (28, 3, 2, (0, 1)),
        (28, 3, 1, (1, 1)),
        (32, 3, 2, (0, 1)),
        (26, 3, 2, (0, 1)),
        (27, 3, 2, (1, 1)),
        (30, 3, 2, (0, 1)),
        (28, 5, 1, (2, 2)),
        (28, 4, 1, (1, 2)),
        (7, 1, 2, (0, 0)),
        (6, 1, 3, (0, 0)),
        (2, 5, 1, (2, 2)),
        (5, 5, 3, (1, 2)),
    ],
)
def test_tf_same_padding_known_values(
    size: int, kernel: int, stride: int, expected: tuple[int, int]
) -> None:
    assert tf_same_padding(size, kernel, stride) == expected


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 40), st.integers(1, 7), st.integers(1, 4))
def test_tf_same_padding_gives_ceil_output(size: int, kernel: int, stride: int) -> None:
    before, after = tf_same_padding(size, kernel, stride)
    assert 0 <= before <= after <= before + 1
    assert (size + before + after - kernel) // stride + 1 == -(-size // stride)


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "bias"),
    [
        ((28, 28), 3, 2, False),
        ((28, 28), 3, 1, True),
        ((26, 27), (3, 2), (2, 1), False),
        ((28, 27), 3, 2, False),  # padded unevenly in height alone
        ((9, 10), 4, 3, True),
    ],
)
def test_conv2d_same_matches_pad_then_conv(
    size: tuple[int, int], kernel: int | tuple[int, int], stride: int | tuple[int, int], bias: bool
) -> None:
    torch.manual_seed(3)
    conv = Conv2dSame(2, 4, kernel, stride, size, bias=bias).double()
    x = torch.randn(3, 2, *size, dtype=torch.float64)
    k = kernel if isinstance(kernel, tuple) else (kernel, kernel)
    s = stride if isinstance(stride, tuple) else (stride, stride)
    (top, bottom), (left, right) = (tf_same_padding(*a) for a in zip(size, k, s, strict=True))
    expected = F.conv2d(F.pad(x, (left, right, top, bottom)), conv.weight, conv.bias, stride=s)
    y = conv(x)
    assert y.shape == (3, 4, -(-size[0] // s[0]), -(-size[1] // s[1]))
    torch.testing.assert_close(y, expected)


def test_conv2d_same_padding_placement_and_parameters() -> None:
    symmetric = Conv2dSame(1, 32, 3, 1, (28, 28))
    assert symmetric.padding == (1, 1) and symmetric.explicit_pad == ()
    asymmetric = Conv2dSame(32, 32, 3, 2, (28, 28))
    assert asymmetric.padding == (0, 0) and asymmetric.explicit_pad == (0, 1, 0, 1)
    assert [name for name, _ in asymmetric.named_parameters()] == ["weight"]
    assert sum(p.numel() for p in asymmetric.parameters()) == 3 * 3 * 32 * 32
    assert "input_size=(28, 28)" in repr(asymmetric)
    with pytest.raises(ValueError):
        asymmetric(torch.randn(1, 32, 27, 28))
