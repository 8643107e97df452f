"""Time one training step (forward, objective, backward, SGD) of a preset per feedback mode.

Usage: python benchmarks/feedback_overhead.py [--arch conv] [--batch 128] [--steps 30]
Reports the median step time per mode and its ratio to ``symmetric`` (plain autograd).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from brainprop import FEEDBACK_MODES, BrainProp, build_model, convert
from brainprop.presets import preset_hyperparameters


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="conv")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    shape = (1, 28, 28)
    x = torch.rand(args.batch, *shape)
    y = torch.randint(0, 10, (args.batch,))
    objective = BrainProp(0.02)
    times: dict[str, list[float]] = {m: [] for m in FEEDBACK_MODES}
    models = {}
    for mode in FEEDBACK_MODES:
        hp = preset_hyperparameters("mnist", args.arch)
        model = build_model(args.arch, shape, 10, hp, torch.Generator().manual_seed(0))
        convert(model, mode, generator=torch.Generator().manual_seed(1))
        models[mode] = (model, torch.optim.SGD(model.parameters(), lr=0.1))
    # Interleave the modes so that load from other processes hits them all alike.
    for step in range(args.steps + 3):
        for mode, (model, opt) in models.items():
            t0 = time.perf_counter()
            out = objective(model(x), y)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            if step >= 3:
                times[mode].append(time.perf_counter() - t0)
    base = statistics.median(times["symmetric"])
    print(f"{args.arch}, batch {args.batch}, {torch.get_num_threads()} threads")
    for mode, ts in times.items():
        med = statistics.median(ts)
        print(f"{mode:10s} {med * 1e3:8.1f} ms/step  x{med / base:.3f}")


if __name__ == "__main__":
    main()
