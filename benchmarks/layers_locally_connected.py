"""Compare implementations of a locally connected (unshared) 2-D layer on the published shapes.

Prints milliseconds per forward+backward pass (batch 32, float32, current device threads) for
each variant on the four BrainProp ``loccon`` layer shapes, and for the library's
``LocallyConnected2d`` (strided gather in Keras's (k_h, k_w, C_in) patch order, bmm, and a
col2im backward for the input gradient where ``strided+bmm`` has autograd's ``unfold_backward``).
The library keeps only the fastest; the others stay here so the choice can be re-checked on
other hardware::

    python benchmarks/layers_locally_connected.py [--device cuda] [--repeats 20]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from brainprop.layers import LocallyConnected2d

# (name, C_in, C_out, input size, kernel, stride) from the reference `get_model_loccon`.
SHAPES: list[tuple[str, int, int, int, int, int]] = [
    ("MNIST L1 1->32 28x28 s1", 1, 32, 28, 3, 1),
    ("MNIST L2 32->32 26x26 s2", 32, 32, 26, 3, 2),
    ("CIFAR L1 3->32 32x32 s1", 3, 32, 32, 3, 1),
    ("CIFAR L2 32->32 30x30 s2", 32, 32, 30, 3, 2),
]

# Each variant maps (x [B, C, H, W], weight [L, C*k*k, O], k, stride) -> [B, O, H_out, W_out];
# the weight's K axis is ordered (C, k_h, k_w), as F.unfold lays out its patches.
Variant = Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]


def _out(size: int, k: int, s: int) -> int:
    return (size - k) // s + 1


def unfold_einsum(x: torch.Tensor, w: torch.Tensor, k: int, s: int) -> torch.Tensor:
    b, _, h, wd = x.shape
    cols = F.unfold(x, k, stride=s)  # [B, K, L]
    y = torch.einsum("bkl,lko->bol", cols, w)
    return y.reshape(b, -1, _out(h, k, s), _out(wd, k, s))


def unfold_bmm(x: torch.Tensor, w: torch.Tensor, k: int, s: int) -> torch.Tensor:
    b, _, h, wd = x.shape
    cols = F.unfold(x, k, stride=s).permute(2, 0, 1)  # [L, B, K]
    y = torch.bmm(cols, w)  # [L, B, O]
    return y.permute(1, 2, 0).reshape(b, -1, _out(h, k, s), _out(wd, k, s))


def strided_bmm(x: torch.Tensor, w: torch.Tensor, k: int, s: int) -> torch.Tensor:
    b, c, h, wd = x.shape
    ho, wo = _out(h, k, s), _out(wd, k, s)
    # Tensor.unfold is a view ([B, C, Ho, Wo, k, k]); the reshape makes the only copy.
    patches = x.unfold(2, k, s).unfold(3, k, s)
    cols = patches.permute(2, 3, 0, 1, 4, 5).reshape(ho * wo, b, c * k * k)
    y = torch.bmm(cols, w)
    return y.permute(1, 2, 0).reshape(b, -1, ho, wo)


def strided_bmm_transposed(x: torch.Tensor, w: torch.Tensor, k: int, s: int) -> torch.Tensor:
    # Same as strided_bmm but computes [L, O, B] so the output permute moves the batch axis last.
    b, c, h, wd = x.shape
    ho, wo = _out(h, k, s), _out(wd, k, s)
    patches = x.unfold(2, k, s).unfold(3, k, s)
    cols = patches.permute(2, 3, 1, 4, 5, 0).reshape(ho * wo, c * k * k, b)  # [L, K, B]
    y = torch.bmm(w.transpose(1, 2), cols)  # [L, O, B]
    return y.permute(2, 1, 0).reshape(b, -1, ho, wo)


def offset_sum(x: torch.Tensor, w: torch.Tensor, k: int, s: int) -> torch.Tensor:
    # Accumulate one kernel offset at a time: no patch matrix, but k*k small einsums.
    b, c, h, wd = x.shape
    ho, wo = _out(h, k, s), _out(wd, k, s)
    w6 = w.reshape(ho * wo, c, k, k, -1)
    y = x.new_zeros(b, w.shape[-1], ho * wo)
    for i in range(k):
        for j in range(k):
            xs = x[:, :, i : i + s * (ho - 1) + 1 : s, j : j + s * (wo - 1) + 1 : s]
            y = y + torch.einsum("bcl,lco->bol", xs.reshape(b, c, -1), w6[:, :, i, j])
    return y.reshape(b, -1, ho, wo)


VARIANTS: dict[str, Variant] = {
    "unfold+einsum": unfold_einsum,
    "unfold+bmm": unfold_bmm,
    "strided+bmm": strided_bmm,
    "strided+bmm(T)": strided_bmm_transposed,
    "offset-sum": offset_sum,
}


def module_variant(layer: torch.nn.Module) -> Variant:
    """Wrap a layer that owns its weight so it can be timed like the functional variants."""
    return lambda x, *_: layer(x)


def time_variant(
    fn: Variant, x: torch.Tensor, w: torch.Tensor, k: int, s: int, repeats: int
) -> float:
    """Median milliseconds of one forward+backward pass (input and weight gradients)."""

    def step() -> None:
        x.grad = None
        w.grad = None
        fn(x, w, k, s).sum().backward()
        if x.is_cuda:
            torch.cuda.synchronize()

    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.device}, threads={torch.get_num_threads()}")
    header = "".join(f"{name:>16s}" for name in VARIANTS)
    print(f"{'shape':28s}{header}{'LocallyConnected2d':>20s}")
    for label, cin, cout, size, k, s in SHAPES:
        x = torch.randn(args.batch, cin, size, size, device=args.device, requires_grad=True)
        n_pos = _out(size, k, s) ** 2
        w = torch.randn(n_pos, cin * k * k, cout, device=args.device, requires_grad=True)
        ref = unfold_einsum(x, w, k, s)
        row = f"{label:28s}"
        for fn in VARIANTS.values():
            torch.testing.assert_close(fn(x, w, k, s), ref, rtol=1e-4, atol=1e-4)
            row += f"{time_variant(fn, x, w, k, s, args.repeats):16.2f}"
        print(row, end="")
        layer = LocallyConnected2d(cin, cout, (size, size), k, s).to(args.device)
        with torch.no_grad():  # (C, k_h, k_w) -> Keras (k_h, k_w, C) patch order
            layer.weight.copy_(w.reshape(n_pos, cin, k * k, cout).transpose(1, 2).flatten(1, 2))
        torch.testing.assert_close(layer(x), ref, rtol=1e-4, atol=1e-4)
        print(f"{time_variant(module_variant(layer), x, w, k, s, args.repeats):20.2f}")


if __name__ == "__main__":
    main()
