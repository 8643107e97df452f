"""Shared by the test_reliability_* files: a tiny run config, fault injection, run comparison."""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from brainprop import TrainConfig
from brainprop.checkpoint import load
from brainprop.objectives import Output
from brainprop.summary import TIMED_KEYS

# brainprop re-exports the function train, which hides the module of the same name.
train_module = importlib.import_module("brainprop.train")

#: History columns and summary fields measuring the machine: the only things two identical
#: runs may differ in.
TIMING = {*train_module.MEASURED_COLUMNS, *TIMED_KEYS}
#: make_tiny_dataset() has 256 training images; batches of 32 give 8 steps per epoch.
STEPS_PER_EPOCH = 8


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run torch on one thread: on CI's 2 shared cores, two OpenMP threads that wait for each
    other make these tiny steps ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(tmp_path: Path, **overrides: Any) -> TrainConfig:
    base: dict[str, Any] = dict(
        dataset="mnist", arch="conv", epochs=3, batch_size=32, out_dir=str(tmp_path),
        name="run", seed=3,
    )  # fmt: skip
    return TrainConfig(**{**base, **overrides})


def _hook(monkeypatch: Any, call: Callable[..., Output]) -> None:
    """Route every training step's objective call through ``call(objective, q, y, generator)``
    from then on, across NaN reloads that rebuild the objective."""
    make = train_module.make_objective

    class Hooked:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        def __call__(self, q: torch.Tensor, y: torch.Tensor, generator: Any) -> Output:
            return call(self.inner, q, y, generator)

    monkeypatch.setattr(train_module, "make_objective", lambda *a, **k: Hooked(make(*a, **k)))


def inject(monkeypatch: Any, actions: dict[int, Callable[[torch.Tensor], torch.Tensor]]) -> None:
    """Run ``actions[n](q)`` on the Q-values of the n-th training step (1-based, counted over
    the whole run)."""
    calls = [0]

    def call(objective: Any, q: torch.Tensor, y: torch.Tensor, generator: Any) -> Output:
        calls[0] += 1
        action = actions.get(calls[0])
        return objective(action(q) if action else q, y, generator)

    _hook(monkeypatch, call)


def recorded_outputs(monkeypatch: Any) -> list[Output]:
    """Every training step's objective output from then on, in a list that grows."""
    outputs: list[Output] = []

    def call(objective: Any, q: torch.Tensor, y: torch.Tensor, generator: Any) -> Output:
        outputs.append(objective(q, y, generator))
        return outputs[-1]

    _hook(monkeypatch, call)
    return outputs


def spoiled_running_var(
    monkeypatch: Any, member: int = 0
) -> Callable[[torch.Tensor], torch.Tensor]:
    """An :func:`inject` action that sets the first BatchNorm's running variance of the
    ``member``-th network built from then on (a stack builds one per seed) to inf: it is used
    only in eval mode, so the training loss stays finite and only the weight check finds it."""
    models: list[nn.Module] = []
    build = train_module.build_model

    def keep(*args: Any) -> nn.Module:
        models.append(build(*args))
        return models[-1]

    monkeypatch.setattr(train_module, "build_model", keep)

    def spoil(q: torch.Tensor) -> torch.Tensor:
        bn = next(m for m in models[member].modules() if isinstance(m, nn.BatchNorm2d))
        # .data: autograd saved it for this backward; in a stack it is a view of the stack's.
        bn.running_var.data.fill_(math.inf)
        return q

    return spoil


def step(epoch: int, step_in_epoch: int) -> int:
    """The 1-based global step number of 1-based ``epoch`` and ``step_in_epoch``."""
    return (epoch - 1) * STEPS_PER_EPOCH + step_in_epoch


def poison(q: torch.Tensor) -> torch.Tensor:
    return q * math.nan


def _untimed(obj: Any) -> Any:
    if isinstance(obj, list):
        return [_untimed(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if k not in TIMING}
    return obj


def assert_same_run(a: Path, b: Path) -> None:
    """Two run directories hold bit-identical weights, RNG states, history and summary."""
    for name in ("last.pt", "best.pt"):
        sa, sb = load(a / name), load(b / name)
        assert sa["model"].keys() == sb["model"].keys()
        for key, tensor in sa["model"].items():
            assert torch.equal(tensor, sb["model"][key]), f"{name} {key}"
    la, lb = load(a / "last.pt"), load(b / "last.pt")
    for key in ("torch", "generator"):
        assert torch.equal(la["rng"][key], lb["rng"][key]), key
    for key in ("numpy", "python"):
        for part, value in la["rng"][key].items():
            other = lb["rng"][key][part]
            same = torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
            assert same, f"{key} {part}"
    assert la["early_stopping"] == lb["early_stopping"]
    # Through JSON text, so NaN diagnostics compare equal to themselves.
    for name in ("history.json", "summary.json"):
        ja = json.dumps(_untimed(json.loads((a / name).read_text())), sort_keys=True)
        jb = json.dumps(_untimed(json.loads((b / name).read_text())), sort_keys=True)
        assert ja == jb, name
