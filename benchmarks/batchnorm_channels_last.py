"""How far the fast path's channels-last layout moves a CPU step's numbers from float64.

Usage: python benchmarks/batchnorm_channels_last.py [--threads 1] [--arch deep] [--batch 128]

Two tables (docs/performance.md quotes them):
1. One BatchNorm2d (eps 1e-3, as the presets) in training mode over a batch of post-ReLU
   maps, relu(N(0, 1)): the relative error of its output against float64, NCHW and
   channels-last.
2. One BrainProp step of a preset network at the published initialisation (dropout off, so the
   layouts draw no different masks), on uniform [0, 1) images as the loader's /255 pixels: the
   relative error of each weight's gradient against float64, eager (NCHW) and fast path.
Relative error is ||a - ref|| / ||ref||.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses

import torch
from torch import nn

from brainprop import BrainProp, build_model, fastpath
from brainprop.presets import preset_hyperparameters


def _relative(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm()).item()


def batchnorm_errors(batch: int) -> None:
    print("| BatchNorm input | NCHW | channels-last |\n| --- | ---: | ---: |")
    for channels, size in ((64, 32), (128, 8)):
        x = torch.relu(
            torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(0))
        )
        ref = nn.BatchNorm2d(channels, eps=1e-3).double()(x.double())
        errors = []
        for layout in (torch.contiguous_format, torch.channels_last):
            out = nn.BatchNorm2d(channels, eps=1e-3)(x.contiguous(memory_format=layout))
            errors.append(_relative(out.detach(), ref.detach()))
        print(f"| {batch} x {channels} x {size} x {size} | {errors[0]:.1e} | {errors[1]:.1e} |")


def gradient_errors(arch: str, batch: int) -> None:
    dataset = "cifar10" if arch == "deep" else "mnist"
    shape = (3, 32, 32) if dataset == "cifar10" else (1, 28, 28)
    hp = preset_hyperparameters(dataset, arch)
    hp = dataclasses.replace(hp, dropout=(0.0,) * len(hp.dropout))
    model = build_model(arch, shape, 10, hp, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    x = torch.rand(batch, *shape, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    # Exploration off: every copy must choose the same output.
    objective = BrainProp(0.0)

    def gradients(net: nn.Module, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        objective(net(inputs), y).loss.backward()
        return {n: p.grad.double() for n, p in net.named_parameters() if p.dim() > 1}

    eager = gradients(copy.deepcopy(model), x)
    fast_model = copy.deepcopy(model)
    fastpath.prepare(fast_model, shape)
    fast = gradients(fast_model, x)
    ref = gradients(copy.deepcopy(model).double(), x.double())
    print(f"\n| {arch} weight | eager | fast path |\n| --- | ---: | ---: |")
    for name, r in ref.items():
        print(f"| {name} | {_relative(eager[name], r):.1e} | {_relative(fast[name], r):.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--arch", default="deep", choices=("conv", "deep"))
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}\n")
    batchnorm_errors(args.batch)
    gradient_errors(args.arch, args.batch)


if __name__ == "__main__":
    main()
