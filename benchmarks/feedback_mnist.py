"""Tables and the reciprocal-feedback plot for docs/biology.md from finished MNIST run directories.

Usage: python benchmarks/feedback_mnist.py RUNS_DIR [--plot docs/feedback_reciprocal_mnist.png]
Expects run directories named <arch>-<rule>-<feedback> (as written by ``brainprop train --name``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _history(run: Path) -> list[dict]:
    return json.loads((run / "history.json").read_text())


def _by_layer(row: dict, prefix: str) -> list[tuple[str, float]]:
    """(layer, value) of the ``prefix`` columns, layers in network order."""
    keys = sorted((k for k in row if k.startswith(prefix)), key=lambda k: int(k[len(prefix) :]))
    return [(k[len(prefix) :], row[k]) for k in keys]


def _initial_alignment(config: dict) -> dict[str, float]:
    """angle(W, B) of the run's network at initialisation, rebuilt exactly as train() does."""
    import torch

    from brainprop import TrainConfig, build_model, convert
    from brainprop.diagnostics import weight_alignment

    cfg = TrainConfig.from_dict(config)
    init = torch.Generator().manual_seed(cfg.seed)
    model = build_model(cfg.arch, (1, 28, 28), 10, cfg.hyperparameters(), init)
    convert(model, cfg.feedback, generator=init)
    return {k: v for k, v in weight_alignment(model).items() if k.startswith("angle_wb/")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", type=Path)
    parser.add_argument("--plot", type=Path, default=Path("docs/feedback_reciprocal_mnist.png"))
    args = parser.parse_args()
    found = sorted(args.runs.iterdir()) if args.runs.is_dir() else []
    runs = {p.name: _history(p) for p in found if (p / "history.json").exists()}
    if not runs or not all(runs.values()):
        parser.error(f"{args.runs} holds no run directory with a finished epoch (history.json)")
    layers = "/".join(name for name, _ in _by_layer(next(iter(runs.values()))[0], "angle_update/"))
    print(f"layers: {layers}")
    head = (
        "| run | epoch | s/epoch | train reward | test acc | angle(W,B) "
        "| angle(update, exact gradient) |"
    )
    print(head + "\n" + "|---" * 7 + "|")
    for name, hist in runs.items():
        for h in hist:
            wb = _by_layer(h, "angle_wb/")
            wb_text = " / ".join(f"{v:.1f}" for _, v in wb) if wb else "-"
            upd = " / ".join(f"{v:.1f}" for _, v in _by_layer(h, "angle_update/"))
            print(
                f"| {name} | {h['epoch']} | {h['seconds']:.0f} | {h['train_reward']:.4f} | "
                f"{h['test_acc']:.4f} | {wb_text} | {upd} |"
            )

    rec, sym = runs.get("conv-brainprop-reciprocal"), runs.get("conv-brainprop-symmetric")
    if rec is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = _initial_alignment(
        json.loads((args.runs / "conv-brainprop-reciprocal" / "config.json").read_text())
    )
    print("angle(W, B) at initialisation:", {k: round(v, 2) for k, v in start.items()})
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4))
    epochs = [h["epoch"] for h in rec]
    for key in [k for k in rec[0] if k.startswith("angle_wb/")]:
        ax1.plot(
            [0, *epochs], [start[key], *[h[key] for h in rec]], marker="o", label=f"layer {key[9:]}"
        )
    ax1.set(xlabel="epoch", ylabel="angle(W, B) [deg]", title="reciprocal B from random init")
    ax1.legend()
    for key in [k for k in rec[0] if k.startswith("angle_update/")]:
        ax2.plot(epochs, [h[key] for h in rec], marker="o", label=f"layer {key[13:]}")
    ax2.set(xlabel="epoch", ylabel="angle(update, exact gradient) [deg]", title="update alignment")
    ax2.legend()
    ax3.plot(epochs, [h["test_acc"] for h in rec], marker="o", label="reciprocal")
    if sym is not None:
        ax3.plot(
            [h["epoch"] for h in sym], [h["test_acc"] for h in sym], marker="s", label="symmetric"
        )
    ax3.set(xlabel="epoch", ylabel="test accuracy", title="MNIST conv, BrainProp")
    ax3.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
