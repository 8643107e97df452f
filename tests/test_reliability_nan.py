"""Numerical faults: a NaN/inf loss or weight stops the run (or rewinds it with --on-nan reload),
and no checkpoint ever holds a broken state."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_dataset
from own_rules import SquaredError
from reliability_helpers import (
    assert_same_run,
    inject,
    one_thread,
    poison,
    spoiled_running_var,
    step,
    tiny_config,
    train_module,
)

from brainprop import Dataset, checkpoint, evaluate, rundir, train
from brainprop.config import MAX_NAN_RELOADS
from brainprop.errors import BrainPropError
from brainprop.objectives import OBJECTIVES
from brainprop.signals import Interrupted
from brainprop.train import NonFinite

__all__ = ["one_thread"]  # the autouse fixture, imported to take effect here


@pytest.fixture(scope="module")
def ds():
    return make_tiny_dataset()


def _last(run_dir: Path) -> dict:
    return checkpoint.load(run_dir / "last.pt")


def _finite(state: dict) -> bool:
    return all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_nan_loss_stops_with_epoch_and_step_keeping_the_last_good_checkpoint(
    tmp_path: Path, ds, monkeypatch, capsys
) -> None:
    inject(monkeypatch, {step(2, 5): poison})
    run = train(tiny_config(tmp_path), dataset=ds)
    assert run.summary["stop_reason"] == "non-finite loss at epoch 2, step 5"
    assert len(run.history) == 1
    last = _last(run.dir)
    assert last["epoch"] == 1 and _finite(last)
    assert (
        f"stopped: the loss became NaN or inf at epoch 2, step 5; {run.dir / 'last.pt'} keeps the "
        "last good state, from which a resume would overflow again. Start a new run with a lower "
        "--lr or --init-std, or with --on-nan reload." in capsys.readouterr().out
    )


def test_a_nan_before_the_first_checkpoint_says_to_start_anew(
    tmp_path: Path, ds, monkeypatch, capsys
) -> None:
    inject(monkeypatch, {step(1, 2): poison})
    run = train(tiny_config(tmp_path), dataset=ds)
    assert (
        "stopped: the loss became NaN or inf at epoch 1, step 2; no checkpoint was written yet, "
        "so there is nothing to resume. Start a new run with a lower --lr or --init-std"
        in capsys.readouterr().out
    )
    with pytest.raises(BrainPropError, match="there is nothing to continue; start a new run"):
        train(None, resume=run.dir, dataset=ds, progress=False)


def test_a_nan_loss_of_a_rule_of_ones_own_names_the_rule_among_the_causes(
    tmp_path: Path, ds, monkeypatch, capsys
) -> None:
    """Its rewards, say, may be what is not finite: the settings are not the only suspects.
    Once it computes one, its last.pt resumes."""
    monkeypatch.setitem(OBJECTIVES, "mine", lambda epsilon, fused: SquaredError())
    inject(monkeypatch, {step(1, 2): poison})
    train(replace(tiny_config(tmp_path / "first"), rule="mine"), dataset=ds)
    assert (
        "nothing to resume. Start a new run with a lower --lr or --init-std, or with --on-nan "
        "reload; or check that rule 'mine', one's own, computes a finite loss.\n"
        in capsys.readouterr().out
    )
    inject(monkeypatch, {step(2, 5): poison})
    train(replace(tiny_config(tmp_path / "second"), rule="mine"), dataset=ds)
    assert (
        "last good state. Start a new run with a lower --lr or --init-std, or with --on-nan "
        "reload; or check that rule 'mine', one's own, computes a finite loss, and resume once "
        "it does.\n" in capsys.readouterr().out
    )


def test_nan_in_the_weights_alone_stops_the_run(tmp_path: Path, ds, monkeypatch) -> None:
    inject(monkeypatch, {step(2, 3): spoiled_running_var(monkeypatch)})
    run = train(tiny_config(tmp_path), dataset=ds, progress=False)
    assert run.summary["stop_reason"] == "non-finite weights at epoch 2 (found after step 8)"
    assert _last(run.dir)["epoch"] == 1 and _finite(_last(run.dir))


def test_on_nan_reload_rewinds_and_halves_the_learning_rate(tmp_path: Path, ds, monkeypatch):
    inject(monkeypatch, {step(2, 5): poison})
    run = train(tiny_config(tmp_path, on_nan="reload"), dataset=ds, progress=False)
    assert run.summary["stop_reason"] == "max epochs" and run.summary["nan_reloads"] == 1
    # Epoch 1 ran at the full rate; epoch 2 was redone from epoch 1's checkpoint at half of it.
    assert [h["lr"] for h in run.history] == [0.1, 0.05, 0.05]
    assert _last(run.dir)["lr_scale"] == 0.5


@pytest.mark.parametrize(
    ("epochs", "partial", "where"),
    [
        (2, None, "epoch 2"),
        (2, {"step": 4}, "epoch 3, step 4"),
        (0, None, "the start"),
        (0, {"step": 4}, "epoch 1, step 4"),
    ],
)
def test_a_rewind_says_where_it_went(epochs, partial, where):
    """Back to an epoch's end, into an epoch that a stop cut short (its last.pt), or to the
    initial weights when no epoch had ended: there is no epoch 0."""
    bad = NonFinite("loss", 2, 5)
    rewound = SimpleNamespace(history=[{}] * epochs, partial=partial, lr_scale=0.25, nan_reloads=2)
    assert bad.rewound(rewound) == (
        f"the loss became NaN or inf at epoch 3, step 6: rewound to {where} with the learning "
        f"rate scaled by 0.25 (reload 2 of {MAX_NAN_RELOADS})"
    )


def test_a_rewound_run_is_its_last_checkpoint_resumed_at_half_the_rate(
    tmp_path: Path, ds, monkeypatch
) -> None:
    """Built without rewind: epoch 1, then its last.pt resumed with the rate halved. Rewinding
    to another point (another epoch, a fresh generator, the old trainer's random streams)
    gives another run."""
    expected = tiny_config(tmp_path / "expected", on_nan="reload")
    train(replace(expected, epochs=1), dataset=ds, progress=False)
    run_dir = tmp_path / "expected" / "run"
    state = _last(run_dir)
    state |= {"lr_scale": 0.5, "nan_reloads": 1}
    checkpoint.save(run_dir / "last.pt", {k: v for k, v in state.items() if k != "format"})
    train(expected, resume=run_dir, dataset=ds, progress=False)
    inject(monkeypatch, {step(2, 5): poison})
    rewound = train(tiny_config(tmp_path / "rewound", on_nan="reload"), dataset=ds, progress=False)
    assert rewound.summary["nan_reloads"] == 1
    assert_same_run(rewound.dir, run_dir)


@pytest.mark.parametrize("val", ["test", 32])
def test_a_rewound_run_keeps_its_data_where_it_is(tmp_path: Path, ds, monkeypatch, val) -> None:
    # A second copy on the device beside the old trainer's could be more than a GPU holds.
    trainers, moves = [], []

    class Recorded(train_module.Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

    move = Dataset.to
    monkeypatch.setattr(
        Dataset, "to", lambda self, device: moves.append(device) or move(self, device)
    )
    monkeypatch.setattr(train_module, "Trainer", Recorded)
    inject(monkeypatch, {step(2, 5): poison})
    run = train(tiny_config(tmp_path, on_nan="reload", val=val), dataset=ds, progress=False)
    assert run.summary["nan_reloads"] == 1 and len(trainers) == 2
    assert len(moves) == 1  # the first trainer's, which the rewound one shares
    before, after = trainers
    for name in ("train_x", "train_y"):
        assert getattr(after.train_set, name) is getattr(before.train_set, name)
    assert after.val_x is before.val_x and after.val_y is before.val_y


def test_a_trainer_shares_data_only_with_one_of_its_device_and_validation(tmp_path, ds) -> None:
    first = train_module.Trainer(tiny_config(tmp_path, val=32).resolve(), ds, progress=False)
    with pytest.raises(ValueError, match="data_of must be a trainer of the same device"):
        train_module.Trainer(tiny_config(tmp_path).resolve(), ds, progress=False, data_of=first)


def test_on_nan_reload_before_any_checkpoint_restarts_from_the_initial_state(
    tmp_path: Path, ds, monkeypatch
) -> None:
    inject(monkeypatch, {step(1, 2): poison})
    run = train(tiny_config(tmp_path, on_nan="reload"), dataset=ds, progress=False)
    assert run.summary["nan_reloads"] == 1
    assert [h["lr"] for h in run.history] == [0.05, 0.05, 0.05]


def _stop(q: torch.Tensor) -> torch.Tensor:
    signal.raise_signal(signal.SIGINT)
    return q


def _run(monkeypatch, ds, out: Path, actions: dict, resume: bool = False, stops: bool = False):
    """Train (or resume) ``out``'s run with ``on_nan="reload"`` and ``actions`` injected; with
    ``stops``, expect it to be stopped by a signal."""
    inject(monkeypatch, actions)
    config = None if resume else tiny_config(out, on_nan="reload")
    try:
        if not stops:
            return train(config, resume=out / "run" if resume else None, dataset=ds,
                         progress=False)  # fmt: skip
        with pytest.raises(Interrupted):
            train(config, resume=out / "run" if resume else None, dataset=ds, progress=False)
        return None
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("epoch", [1, 2])
def test_a_nan_after_a_stop_inside_the_epoch_rewinds_to_the_epochs_start(
    tmp_path: Path, ds, monkeypatch, epoch
) -> None:
    """As a run never stopped does: back to the end of the epoch before (in the first, to the
    initial state), not to where the stop was."""
    never_stopped = _run(monkeypatch, ds, tmp_path / "ref", {step(epoch, 6): poison})
    cut = tmp_path / "cut"
    _run(monkeypatch, ds, cut, {step(epoch, 3): _stop}, stops=True)
    start = cut / "run" / "epoch_start.pt"
    assert (checkpoint.load(start)["epoch"] if start.exists() else 0) == epoch - 1
    # The resumed process starts at step 4 of the epoch.
    resumed = _run(monkeypatch, ds, cut, {3: poison}, resume=True)
    assert resumed.summary["nan_reloads"] == never_stopped.summary["nan_reloads"] == 1
    assert not (cut / "run" / "epoch_start.pt").exists()  # gone with the next epoch's end
    assert_same_run(never_stopped.dir, cut / "run")


def test_a_stale_epoch_start_is_replaced_and_a_missing_one_falls_back_to_last_pt(
    tmp_path: Path, ds, monkeypatch
) -> None:
    """A kill between an epoch's last.pt and the removal of epoch_start.pt leaves one from an
    epoch before: the next stop keeps a fresh one. A run directory of an earlier version has
    none: the rewind goes to last.pt itself, never to the initial state."""
    never_stopped = _run(monkeypatch, ds, tmp_path / "ref", {step(3, 6): poison})
    cut = tmp_path / "cut"
    start = cut / "run" / "epoch_start.pt"
    _run(monkeypatch, ds, cut, {step(2, 3): _stop}, stops=True)
    stale = start.read_bytes()  # the end of epoch 1
    # Epoch 2's last step: an epoch's end, which removes epoch_start.pt.
    _run(monkeypatch, ds, cut, {5: _stop}, resume=True, stops=True)
    assert not start.exists()
    start.write_bytes(stale)  # as a kill right there would have left it
    _run(monkeypatch, ds, cut, {3: _stop}, resume=True, stops=True)  # epoch 3, step 3
    assert checkpoint.load(start)["epoch"] == 2
    _run(monkeypatch, ds, cut, {3: poison}, resume=True)  # epoch 3, step 6
    assert_same_run(never_stopped.dir, cut / "run")

    old = tmp_path / "old"
    _run(monkeypatch, ds, old, {step(3, 4): _stop}, stops=True)
    (old / "run" / "epoch_start.pt").unlink()
    resumed = _run(monkeypatch, ds, old, {2: poison}, resume=True)
    assert resumed.summary["nan_reloads"] == 1
    assert [h["lr"] for h in resumed.history] == [0.1, 0.1, 0.05]  # epochs 1-2 kept


def test_a_damaged_epoch_start_never_costs_a_stop_its_checkpoint(
    tmp_path: Path, ds, monkeypatch
) -> None:
    _run(monkeypatch, ds, tmp_path, {step(2, 3): _stop}, stops=True)
    run_dir = tmp_path / "run"
    (run_dir / "epoch_start.pt").write_bytes(b"damaged")
    _run(monkeypatch, ds, tmp_path, {2: _stop}, resume=True, stops=True)  # epoch 2, step 5
    assert checkpoint.load(run_dir / "last.pt")["partial"]["step"] == 5
    # A rewind then goes to last.pt, not to epoch 0.
    resumed = _run(monkeypatch, ds, tmp_path, {1: poison}, resume=True)
    assert [h["lr"] for h in resumed.history] == [0.1, 0.05, 0.05]


@pytest.mark.parametrize("links", [True, False])
def test_an_epoch_start_that_cannot_be_copied_never_costs_a_stop_its_checkpoint(
    tmp_path: Path, ds, monkeypatch, capsys, links: bool
) -> None:
    """A nearly full disk: the copy came first, and its error lost the stop's state (review).
    A hard link takes no room, so it is kept all the same; where the filesystem has no links
    either, the stop is saved without it, and says where a NaN will then rewind to."""

    def full(source: Path, target: Path) -> None:
        raise BrainPropError(f"cannot write {target} (No space left on device); nothing was...")

    def no_links(source: Path, target: Path) -> None:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(rundir, "copy", full)
    if not links:
        monkeypatch.setattr(rundir.os, "link", no_links)
    _run(monkeypatch, ds, tmp_path, {step(2, 3): _stop}, stops=True)
    run_dir = tmp_path / "run"
    assert checkpoint.load(run_dir / "last.pt")["partial"]["step"] == 3
    assert [p.name for p in run_dir.glob(".*.tmp")] == []
    warned = (
        "brainprop: a NaN later in this epoch will rewind to this stop's last.pt, not to the "
        f"epoch's start, which was not kept: cannot write {run_dir / 'epoch_start.pt'} (No "
        "space left on device); nothing was...\n"
    )
    if links:
        # The end of epoch 1, which a rewind goes back to (test_a_nan_after_a_stop_inside_...).
        assert warned not in capsys.readouterr().err
        start = checkpoint.load(run_dir / "epoch_start.pt")
        assert (start["epoch"], start["partial"]) == (1, None)
        return
    assert warned in capsys.readouterr().err
    assert not (run_dir / "epoch_start.pt").exists()
    # A rewind then goes to last.pt, as without a usable epoch_start.pt.
    resumed = _run(monkeypatch, ds, tmp_path, {1: poison}, resume=True)
    assert [h["lr"] for h in resumed.history] == [0.1, 0.05, 0.05]


def test_an_epoch_start_copy_the_disk_cannot_hold_beside_the_stops_own_is_not_made(
    tmp_path: Path, ds, monkeypatch, capsys
) -> None:
    """Where the filesystem has no hard links, the copy took the last free space, and the
    stop's own last.pt then failed on the full disk (review)."""

    def no_links(source: Path, target: Path) -> None:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    def stop_on_a_nearly_full_disk(q: torch.Tensor) -> torch.Tensor:
        free = type("U", (), {"free": 2**20})()
        monkeypatch.setattr(rundir.shutil, "disk_usage", lambda _p: free)
        return _stop(q)

    monkeypatch.setattr(rundir.os, "link", no_links)
    _run(monkeypatch, ds, tmp_path, {step(2, 3): stop_on_a_nearly_full_disk}, stops=True)
    run_dir = tmp_path / "run"
    assert checkpoint.load(run_dir / "last.pt")["partial"]["step"] == 3
    assert not (run_dir / "epoch_start.pt").exists()
    assert (
        "brainprop: a NaN later in this epoch will rewind to this stop's last.pt, not to the "
        "epoch's start, which was not kept: there is no room for a copy of last.pt beside this "
        "stop's own (the filesystem has no hard links)\n"
    ) in capsys.readouterr().err


def test_a_last_pt_damaged_before_a_stop_never_costs_the_stop_its_checkpoint(
    tmp_path: Path, ds, monkeypatch, capsys
) -> None:
    """Read to be kept as the epoch's start, it raised, and the stop saved nothing (review)."""
    run_dir = tmp_path / "run"

    def damage_then_stop(q: torch.Tensor) -> torch.Tensor:
        (run_dir / "last.pt").write_bytes(b"damaged")
        return _stop(q)

    _run(monkeypatch, ds, tmp_path, {step(2, 3): damage_then_stop}, stops=True)
    assert checkpoint.load(run_dir / "last.pt")["partial"]["step"] == 3
    assert "the epoch's start, which was not kept: " in capsys.readouterr().err
    assert not (run_dir / "epoch_start.pt").exists()


def test_on_nan_reload_gives_up_after_the_bound(tmp_path: Path, ds, monkeypatch, capsys) -> None:
    # Every step from epoch 2 on is poisoned, however often the run rewinds.
    inject(monkeypatch, {n: poison for n in range(step(2, 1), step(2, 1) + 100)})
    run = train(tiny_config(tmp_path, on_nan="reload"), dataset=ds)
    assert run.summary["nan_reloads"] == MAX_NAN_RELOADS
    assert run.summary["stop_reason"] == "non-finite loss at epoch 2, step 1"
    assert _last(run.dir)["epoch"] == 1 and _finite(_last(run.dir))
    message = f"stopped after {MAX_NAN_RELOADS} reloads: the loss became NaN"
    out = capsys.readouterr().out
    assert message in out and "overflow again. Start a new run with a lower --lr.\n" in out


def test_a_stop_signal_never_checkpoints_a_broken_state(tmp_path: Path, ds, monkeypatch) -> None:
    def stop(q: torch.Tensor) -> torch.Tensor:
        signal.raise_signal(signal.SIGTERM)
        return q

    inject(monkeypatch, {step(2, 3): poison, step(2, 4): stop})
    with pytest.raises(Interrupted) as info:
        train(tiny_config(tmp_path), dataset=ds, progress=False)
    # The run ended on the NaN, which the signal does not hide; then the signal is obeyed.
    run_dir = tmp_path / "run"
    assert str(info.value) == (
        "stopped by SIGTERM as the run ended (non-finite loss at epoch 2, step 3); its results "
        f"are complete in {run_dir}"
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop_reason"] == "non-finite loss at epoch 2, step 3"
    assert _last(run_dir)["epoch"] == 1 and _last(run_dir)["partial"] is None


def test_a_run_that_diverged_after_a_checkpoint_is_unfinished_while_it_trains_again(
    tmp_path: Path, ds, monkeypatch
) -> None:
    """Resumed, it trains on from last.pt (on another machine it may not diverge): its old
    summary.json would mark it finished meanwhile (review), so that reproduce skipped it and
    recorded the divergence beside the newer curve."""
    inject(monkeypatch, {step(2, 5): poison})
    run = train(tiny_config(tmp_path), dataset=ds, progress=False)
    assert run.summary["stop_reason"] == "non-finite loss at epoch 2, step 5"
    monkeypatch.undo()
    inject(monkeypatch, {step(1, 3): _stop})
    with pytest.raises(Interrupted):
        train(None, resume=run.dir, dataset=ds, progress=False)
    assert not (run.dir / "summary.json").exists()
    monkeypatch.undo()
    assert train(None, resume=run.dir, dataset=ds, progress=False).summary["epochs_run"] == 3
    assert json.loads((run.dir / "summary.json").read_text())["stop_reason"] == "max epochs"


def test_a_resumed_run_with_nan_weights_in_its_checkpoint_is_refused(tmp_path: Path, ds):
    run = train(tiny_config(tmp_path, epochs=1), dataset=ds, progress=False)
    state = _last(run.dir)
    next(iter(state["model"].values())).fill_(math.nan)
    checkpoint.save(run.dir / "last.pt", {k: v for k, v in state.items() if k != "format"})
    with pytest.raises(BrainPropError, match="holds NaN or inf weights, which brainprop "
                       "never saves: the checkpoint is damaged"):  # fmt: skip
        train(None, resume=run.dir, dataset=ds, progress=False)


def test_an_evaluated_checkpoint_with_nan_weights_is_refused(tmp_path: Path, ds):
    run = train(tiny_config(tmp_path, epochs=1), dataset=ds, progress=False)
    state = checkpoint.load(run.dir / "best.pt")
    next(iter(state["model"].values())).fill_(math.inf)
    best = run.dir / "best.pt"
    checkpoint.save(best, {k: v for k, v in state.items() if k != "format"})
    with pytest.raises(BrainPropError) as info:
        evaluate(run.dir, dataset=ds)
    assert str(info.value) == (
        f"{best} holds NaN or inf weights: the checkpoint is damaged; use another one"
    )
