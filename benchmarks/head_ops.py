"""Count the operators each rule's output head dispatches per training step, forward and backward.

Usage: python benchmarks/head_ops.py [--batch 128] [--classes 10]

On a GPU with the whole step in one CUDA graph a step is bound by its kernels' latencies, so
each operator of the head is a kernel that costs about the same whatever its size. This lists,
per rule, every non-view ATen operator that one objective call and its ``backward()`` dispatch
(as a ``TorchDispatchMode`` sees them, below autograd), so that a change to a head can be
weighed on a CPU before a GPU times it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from brainprop.objectives import RULES, make_objective

#: Operators that allocate or alias without launching work.
NO_WORK = {"detach", "empty", "empty_like", "empty_strided", "alias", "_local_scalar_dense"}


class OperatorLog(TorchDispatchMode):
    """Records the name of every non-view operator dispatched while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(
        self, func: Callable[..., Any], types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        name = func.__name__.split(".")[0]
        if not func.is_view and name not in NO_WORK:
            self.names.append(name)
        return func(*args, **(kwargs or {}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--classes", type=int, default=10)
    args = parser.parse_args()
    for rule in RULES:
        objective = make_objective(rule)
        q = torch.randn(args.batch, args.classes, requires_grad=True)
        y = torch.randint(0, args.classes, (args.batch,))
        with OperatorLog() as log:
            objective(q, y, torch.Generator().manual_seed(0)).loss.backward()
        print(f"{rule:<10} {len(log.names):3d} operators: {' '.join(log.names)}")


if __name__ == "__main__":
    main()
