"""Evaluation: accuracy of a network, and rebuilding a trained one from its checkpoint.

``evaluate`` and ``load_model`` are what ``brainprop evaluate`` calls; ``accuracy`` is what the
training loop calls once per epoch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint, fastpath, plugins, rundir
from .config import TrainConfig
from .data import Dataset, given_dataset, load_dataset
from .data.batches import ordered_batches
from .devices import autocast, device_name, ran_out_of_memory, resolve_device, warn_if_slow_bf16
from .errors import BrainPropError, UnknownName, reason
from .feedback import convert
from .presets import Hyperparameters, build_model
from .provenance import (
    check_loadable,
    check_same_data,
    check_same_run,
    check_trained_on,
    declares_sizes,
    recorded_config,
)

EVAL_BATCH = 1000


@torch.inference_mode()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool = False) -> float:
    """Fraction of ``x`` (uint8 [N, C, H, W]) whose argmax output equals ``y`` ([N])."""
    if x.dtype != torch.uint8:
        # Scaled by 1/255 here as the datasets hold them: a float batch would be scaled twice
        # (and, already float32, in place, the caller's own tensor).
        raise ValueError(f"accuracy takes uint8 images as the datasets hold them, got {x.dtype}")
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    with modes_kept(model, training=False), autocast(x.device, bf16):
        for xb, yb in ordered_batches(x, y, EVAL_BATCH):
            correct += (model(xb).argmax(dim=1) == yb).sum()
    return correct.item() / max(len(y), 1)


@contextlib.contextmanager
def modes_kept(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    """``model`` in train (``training``) or eval mode within the block; afterwards each module
    is back in its own mode, where ``model.train(was_training)`` would put a caller's frozen
    BatchNorm layers, held in eval mode while the rest trains, back into training. (The training
    loop itself puts the whole model in train mode at each epoch's start.)"""
    modes = [m.training for m in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        for m, mode in zip(model.modules(), modes, strict=True):
            m.training = mode


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every floating tensor of ``tensors`` is free of NaN and inf (one device sync)."""
    checks = [torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
    return not checks or bool(torch.stack(checks).all())


def _checkpoint_path(target: object) -> Path:
    return rundir.given_path(target, "the checkpoint to evaluate", "pass a run directory or a .pt")


def load_model(target: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network stored in a run directory (its best.pt) or a checkpoint file.

    Returns (model in eval mode, on the CPU; the checkpoint dict).
    """
    path = _checkpoint_path(target)
    run = path if path.is_dir() else None
    if run is not None:
        path = _best_of(run)
    state = checkpoint.load(path)
    try:
        config = recorded_config(state.get("config"), path, _DAMAGED)
        if run is not None and (stored := _run_config(run)) is not None:
            check_same_run(path, config, stored)
        hp = config.hyperparameters()
        shape, classes, stored = state["input_shape"], state["num_classes"], state["model"]
        # Checked here, as the layers would name a damaged value in their own words, its repr
        # (a tensor's spans lines) included.
        if not declares_sizes(state):
            raise ValueError("its input_shape or num_classes is not a size")
        # Reported as it is, in evaluate's JSON line.
        if (epoch := state.get("epoch")) is not None and (type(epoch) is not int or epoch < 0):
            raise ValueError("its epoch is not a count")
        wanted = _weights_wanted(config.arch, shape, classes, hp)
        held = sum(t.numel() for t in stored.values() if isinstance(t, torch.Tensor))
        if wanted is not None and wanted > held:
            raise ValueError(f"it declares {wanted:,} weights but holds {held:,}")
        # The checkpoint overwrites every weight drawn here (PyTorch's layers draw their
        # default ones from the global stream): the caller's streams stay as they were.
        with torch.random.fork_rng(devices=[]):
            model = _build(config.arch, shape, classes, hp)
            convert(model, config.feedback)
        checkpoint.load_weights(model, stored)
    except checkpoint.MISFITS as e:
        if ran_out_of_memory(e):
            raise  # too large for the machine, which is no fault of the checkpoint's
        raise BrainPropError(
            f"{path} does not match its own architecture ({checkpoint.misfit(e)}): the "
            "checkpoint is damaged or from another version"
        ) from None
    if not all_finite(model.state_dict().values()):
        raise BrainPropError(
            f"{path} holds NaN or inf weights: the checkpoint is damaged; use another one"
        )
    return model.eval(), state


#: The end of a message for a checkpoint that does not read.
_DAMAGED = "the checkpoint is damaged or from another version; use another one"


def _run_config(run: Path) -> TrainConfig | None:
    """The config in the run directory ``run``'s config.json, or None where it does not read:
    scoring needs only best.pt, which a damaged config.json leaves as good."""
    path = run / rundir.CONFIG
    try:
        return recorded_config(rundir.read_json(path), path, "the run directory is damaged")
    except BrainPropError:
        return None


def _build(arch: str, shape: list[int], classes: int, hp: Hyperparameters) -> nn.Module:
    """:func:`build_model` of a checkpoint's stored settings. Its refusal of them (dropout
    rates for other sites, a shape of the channels last) is the checkpoint's damage, a
    ValueError here, not a fix for the caller to make; a name not registered here, or one's own
    builder failing (the refusal's cause), keeps its own words."""
    try:
        return build_model(arch, shape, classes, hp)
    except BrainPropError as e:
        if isinstance(e, UnknownName) or e.__cause__ is not None:
            raise
        raise ValueError(reason(e)) from None


def _weights_wanted(arch: str, shape: list[int], classes: int, hp: Hyperparameters) -> int | None:
    """How many numbers the network of ``arch`` for these sizes holds, counted on the meta
    device: a damaged input_shape could ask for a network of many GB, which is then never
    built. None where the builder cannot run there (a user's that reads a weight back)."""
    try:
        with torch.device("meta"):
            skeleton = _build(arch, shape, classes, hp)
    except (NotImplementedError, RuntimeError):
        return None
    except BrainPropError as e:
        # build_model words a builder of one's own that fails (its cause); failing on meta
        # alone (reading a weight back, as numpy or .item()), it is built for real below.
        if e.__cause__ is not None:
            return None
        raise
    return sum(t.numel() for t in skeleton.state_dict().values())


def _best_of(run: Path) -> Path:
    """The best.pt of the run directory ``run``; a one-line error for a run that has none yet,
    and for a folder that is no run (no config.json; a best.pt there, copied, is read)."""
    best = run / rundir.BEST
    if best.exists():
        return best
    if not (run / rundir.CONFIG).is_file():
        raise BrainPropError(
            f"{run} is no run directory (it has no {rundir.CONFIG}): pass a folder that "
            "'brainprop train' made, or a .pt file"
        )
    resume = plugins.resume_command(run)
    if (run / rundir.LAST).is_file():
        # Stopped inside its first epoch, or killed as that epoch's end was written: last.pt
        # comes first, and the resume writes best.pt from it (rundir.mend_best).
        raise BrainPropError(
            f"{run} has no {rundir.BEST} yet: evaluate its latest state, {run / rundir.LAST}, "
            f"or continue it with {resume}, which writes it"
        )
    if (run / rundir.SUMMARY).is_file():
        raise BrainPropError(
            f"{run} has no {rundir.BEST}: it ended before an epoch did ({rundir.SUMMARY} says "
            "why), so there is nothing to evaluate"
        )
    raise BrainPropError(
        f"{run} has no {rundir.BEST} yet, as no epoch of it has ended: continue it with {resume}"
    )


def evaluate(
    target: str | os.PathLike[str],
    *,
    data_dir: str | None = None,
    device: str = "auto",
    dataset: Dataset | None = None,
) -> dict[str, Any]:
    """Test accuracy of a run directory's best network (its best.pt), or of any checkpoint file.

    Args:
        target: a run directory (or its :class:`~brainprop.train.Run`) or a ``.pt``
            checkpoint brainprop wrote.
        data_dir: the data root; by default the one the run trained on.
        device: where to score it ('auto': the GPU if there is one).
        dataset: score on this dataset instead of loading the run's (data of one's own,
            tests, notebooks), as given. Without it, a run on data of one's own is refused, as
            is data loaded from the run's data root that is not what the checkpoint records.

    Returns:
        ``checkpoint`` (the file read: a run directory's best.pt), ``dataset`` (the scored
        data's name), ``arch``, ``rule``, ``epoch`` (the epochs the checkpoint had finished),
        ``test_acc`` (a fraction), ``test_size`` and ``device``.
    """
    target = _checkpoint_path(target)
    dataset = given_dataset(dataset, "evaluate")
    read = _best_of(target) if target.is_dir() else target
    dev = resolve_device(device)
    model, state = load_model(target)
    config = TrainConfig.from_dict(state["config"])
    root = config.data_dir if data_dir is None else data_dir
    call = "evaluate(run, dataset=...)"
    if dataset is None:
        check_loadable(state.get("data"), config.dataset, str(target), call)
    ds = dataset if dataset is not None else load_dataset(config.dataset, root, test_only=True)
    remedy = "evaluate it on the dataset it was trained on"
    check_trained_on(state, ds, str(target), remedy)
    if dataset is None:
        # Data passed in is the caller's choice: a network may be scored on other test images.
        check_same_data(state.get("data"), ds, str(target), remedy, call, config.data_dir)
    fastpath.prepare(model.to(dev), ds.input_shape, eager=config.eager)
    # Scored in the precision it was validated in during training.
    warn_if_slow_bf16(dev, config.bf16)
    test_acc = accuracy(model, ds.test_x.to(dev), ds.test_y.to(dev), config.bf16)
    return {
        "checkpoint": str(read),
        "dataset": ds.name,
        "arch": config.arch,
        "rule": config.rule,
        "epoch": state.get("epoch"),
        "test_acc": test_acc,
        "test_size": len(ds.test_y),
        "device": device_name(dev),
    }
