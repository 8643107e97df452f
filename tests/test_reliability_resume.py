"""Checkpoint and resume: full state every epoch, atomic writes, SIGINT/SIGTERM, SIGKILL."""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import make_tiny_dataset
from data_fixtures import write_idx_dataset
from memory_errors import OUT_OF_MEMORY
from reliability_helpers import (
    STEPS_PER_EPOCH,
    assert_same_run,
    inject,
    one_thread,
    step,
    tiny_config,
    train_module,
)

from brainprop import (
    Dataset,
    TrainConfig,
    checkpoint,
    devices,
    evaluate,
    files,
    locks,
    resume,
    rng,
    rundir,
    signals,
    train,
)
from brainprop import __version__ as brainprop_version
from brainprop.errors import BrainPropError
from brainprop.signals import Interrupted
from brainprop.train import Trainer

__all__ = ["one_thread"]  # the autouse fixture, imported to take effect here


@pytest.fixture(scope="module")
def ds():
    return make_tiny_dataset()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ds) -> Path:
    """An uninterrupted 3-epoch run that the interrupted ones must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("reference")
    return train(tiny_config(out), dataset=ds, progress=False).dir


def _raise(signum: int):
    def action(q: torch.Tensor) -> torch.Tensor:
        signal.raise_signal(signum)
        return q

    return action


def test_checkpoint_holds_the_whole_training_state(reference: Path) -> None:
    state = checkpoint.load(reference / "last.pt")
    assert state["epoch"] == 3 and len(state["history"]) == 3
    assert state["config"]["arch"] == "conv" and state["config"]["epochs"] == 3
    assert {"model", "optimizer", "early_stopping", "lr_scale", "nan_reloads"} <= state.keys()
    assert state["partial"] is None  # written at an epoch's end
    assert set(state["rng"]) == {"torch", "cuda", "generator", "numpy", "python"}
    assert state["early_stopping"]["wait"] >= 0 and state["lr_scale"] == 1.0
    assert state["data"] == make_tiny_dataset().fingerprint()
    assert json.loads((reference / "data.json").read_text()) == state["data"]


def test_numpy_and_python_rng_states_round_trip(tmp_path: Path, ds) -> None:
    trainer = Trainer(tiny_config(tmp_path).resolve(), ds, progress=False)
    np.random.random(2), random.random()  # somewhere past the seeded start
    checkpoint.save(tmp_path / "state.pt", trainer.state())
    expected = (np.random.random(3).tolist(), [random.random() for _ in range(3)])
    np.random.seed(99)
    random.seed(99)
    trainer.load_state(checkpoint.load(tmp_path / "state.pt"))
    assert (np.random.random(3).tolist(), [random.random() for _ in range(3)]) == expected


@pytest.mark.parametrize("section", ["numpy", "python"])
def test_a_tensor_in_place_of_a_random_state_section_is_refused_without_a_warning(
    section: str,
) -> None:
    # Indexed by its string keys, a tensor raised torch's deprecation warning first.
    generator = torch.Generator()
    state = rng.capture(generator)
    state[section] = torch.zeros(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(TypeError, match=f"the {section} random state is a Tensor, not a dict"):
            rng.restore(state, generator)


def test_a_random_state_with_a_damaged_section_puts_back_none_of_it() -> None:
    """The torch and numpy streams are set before the python one fails: a caller that catches
    the error must go on with the streams it had, not with a mix."""
    generator = torch.Generator().manual_seed(1)
    state = rng.capture(generator)
    state["python"]["version"] = 99  # random.setstate refuses it, after the others are set
    torch.manual_seed(7), np.random.seed(7), random.seed(7), generator.manual_seed(7)
    with pytest.raises(ValueError, match="the python state"):
        rng.restore(state, generator)
    expected = torch.Generator().manual_seed(7)
    assert torch.equal(torch.rand(3, generator=generator), torch.rand(3, generator=expected))
    draws = torch.rand(3).tolist(), np.random.random(3).tolist(), random.random()
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    assert draws == (torch.rand(3).tolist(), np.random.random(3).tolist(), random.random())


@pytest.mark.parametrize("restore", [rng.restore, rng.restore_torch])
def test_a_tensor_in_place_of_the_whole_random_state_is_refused_without_a_warning(
    restore,
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(TypeError, match="the random state is a Tensor, not a dict"):
            restore(torch.zeros(3), torch.Generator())


def test_a_gpu_runs_cuda_random_state_is_its_own_gpus_alone(monkeypatch) -> None:
    """Saved and put back for the run's GPU only, so that a machine with fewer GPUs resumes
    the run, and a CPU run never starts CUDA to save a state."""
    calls = []

    def get(device):
        calls.append(("get", device))
        return torch.full((8,), 7, dtype=torch.uint8)

    def put(state, device):
        calls.append(("set", device, state.tolist()))

    monkeypatch.setattr(torch.cuda, "get_rng_state", get)
    monkeypatch.setattr(torch.cuda, "set_rng_state", put)

    class OnSecondGpu:  # a CPU-only torch cannot make a CUDA generator
        device = torch.device("cuda", 1)

        def get_state(self):
            return torch.zeros(4, dtype=torch.uint8)

        def set_state(self, state):
            pass

    state = rng.capture_torch(OnSecondGpu())
    rng.restore_torch(state, OnSecondGpu())
    gpu = torch.device("cuda", 1)
    assert calls == [("get", gpu), ("set", gpu, [7] * 8)]
    calls.clear()
    # Earlier versions saved every visible GPU's state: the run's own is taken from the list.
    every_gpu = [torch.full((8,), i, dtype=torch.uint8) for i in range(4)]
    rng.restore_torch({**state, "cuda": every_gpu}, OnSecondGpu())
    assert calls == [("set", gpu, [1] * 8)]
    calls.clear()
    cpu_state = rng.capture_torch(torch.Generator())
    rng.restore_torch(cpu_state, torch.Generator())
    rng.restore_torch({**cpu_state, "cuda": every_gpu}, torch.Generator())
    assert cpu_state["cuda"] == [] and calls == []


def test_a_gpu_past_the_saved_ones_is_named_not_an_index_error(monkeypatch) -> None:
    """An earlier version's list of every GPU's state, resumed on a GPU it did not hold."""
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: None)
    every_gpu = [torch.zeros(8, dtype=torch.uint8) for _ in range(2)]
    with pytest.raises(TypeError, match="^the checkpoint holds no random state for GPU 2$"):
        rng._set_cuda_states(every_gpu, torch.device("cuda", 2))


def test_a_random_state_of_another_dtype_is_refused_as_such() -> None:
    state = rng.capture_torch(torch.Generator())
    state["torch"] = state["torch"].to(torch.int64)
    with pytest.raises(TypeError) as info:
        rng.restore_torch(state, torch.Generator())
    assert str(info.value) == "a random state is a uint8 tensor, not a torch.int64 tensor"


def test_a_pending_normal_draw_of_numpy_is_restored_too() -> None:
    """numpy keeps the second of each pair of normal draws: a resume that dropped it would
    draw another number next (a plugin's noise, say) than the run it continues."""
    generator = torch.Generator()
    np.random.seed(3)
    np.random.standard_normal()  # leaves the pair's second draw pending
    state = rng.capture(generator)
    expected = np.random.standard_normal(3).tolist()
    np.random.seed(99)
    rng.restore(state, generator)
    assert np.random.standard_normal(3).tolist() == expected


def test_seeds_that_differ_give_numpy_and_python_streams_that_differ() -> None:
    """A run's seed is 32 bits; numpy's takes all of them, so that seeds 2**31 apart differ."""

    def draws(seed: int) -> tuple[list[float], float, float]:
        rng.seed_all(seed)
        return torch.rand(2).tolist(), float(np.random.random()), random.random()

    a, b, c = draws(5), draws(5 + 2**31), draws(5)
    assert a == c
    assert all(x != y for x, y in zip(a, b, strict=True))
    # A wider derived seed (a torchrun resume's) wraps for numpy, which takes 32 bits.
    rng.seed_all(5 + 2**32)
    assert float(np.random.random()) == a[1]


def test_the_global_streams_are_as_they_were_after_a_kept_block() -> None:
    """A diagnostic or check that draws or seeds inside must leave the run's streams alone:
    a run with it would otherwise differ from one without."""

    def draws() -> tuple[list[float], list[float], float]:
        return torch.rand(3).tolist(), np.random.random(3).tolist(), random.random()

    rng.seed_all(4)
    with rng.global_streams_kept(torch.device("cpu")):
        rng.seed_all(0)
        draws()
    kept = draws()
    rng.seed_all(4)
    assert kept == draws()


@pytest.mark.parametrize(
    ("signum", "at", "message"),
    [
        (signal.SIGINT, step(2, 3), "stopped by SIGINT in epoch 2 after step 3;"),
        (signal.SIGTERM, step(1, 1), "stopped by SIGTERM in epoch 1 after step 1;"),
        # On an epoch's last step the epoch completes and is checkpointed as usual.
        (signal.SIGTERM, step(2, 8), "stopped by SIGTERM after epoch 2;"),
    ],
)
def test_signal_checkpoints_and_resume_is_bit_identical(
    tmp_path: Path, ds, reference: Path, monkeypatch, signum: int, at: int, message: str
) -> None:
    inject(monkeypatch, {at: _raise(signum)})
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(Interrupted) as info:
        train(tiny_config(tmp_path), dataset=ds, progress=False)
    run_dir = tmp_path / "run"
    assert str(info.value).startswith(message)
    assert str(info.value).endswith(
        f"the state is saved in {run_dir / 'last.pt'}: continue with "
        f"'brainprop train --resume {run_dir}'"
    )
    assert info.value.exit_status == 128 + signum
    assert signal.getsignal(signal.SIGINT) is handler  # train() put the old handler back
    monkeypatch.undo()
    resumed = train(None, resume=run_dir, dataset=ds, progress=False)
    assert resumed.summary["epochs_run"] == 3
    assert_same_run(reference, run_dir)


def test_a_signal_in_the_last_step_lets_the_run_finish_then_stops(
    tmp_path: Path, ds, reference: Path, monkeypatch
) -> None:
    # Past the last step's check nothing is left to save for later: the run ends as it would
    # have, and the caller (a loop of runs, a batch job) still learns that it was told to stop.
    inject(monkeypatch, {step(3, STEPS_PER_EPOCH): _raise(signal.SIGTERM)})
    with pytest.raises(Interrupted) as info:
        train(tiny_config(tmp_path), dataset=ds, progress=False)
    run_dir = tmp_path / "run"
    assert str(info.value) == (
        f"stopped by SIGTERM as the run ended (max epochs); its results are complete in {run_dir}"
    )
    assert info.value.exit_status == 128 + signal.SIGTERM
    assert_same_run(reference, run_dir)


# The last step but one is the last whose stop leaves a step for later.
@pytest.mark.parametrize("at", [5, STEPS_PER_EPOCH - 1])
def test_mid_epoch_checkpoint_records_the_position(tmp_path: Path, ds, monkeypatch, at) -> None:
    inject(monkeypatch, {step(1, at): _raise(signal.SIGINT)})
    began = time.perf_counter()
    with pytest.raises(Interrupted):
        train(tiny_config(tmp_path), dataset=ds, progress=False)
    partial = checkpoint.load(tmp_path / "run" / "last.pt")["partial"]
    assert partial["step"] == at
    assert {"order_rng", "loss_sum", "reward_sum", "explored_sum", "first_bad"} <= partial.keys()
    monkeypatch.undo()
    run = train(None, resume=tmp_path / "run", dataset=ds, progress=False)
    took = time.perf_counter() - began
    # The epoch's clock runs on from where it stopped, across both calls.
    assert 0 < partial["seconds"] < run.history[0]["seconds"] < took


def _edit_cut_run(tmp_path: Path, ds, monkeypatch, edit: Callable[[dict], object]) -> None:
    """Stop a run in epoch 1 after step 5, then change its last.pt with ``edit``."""
    inject(monkeypatch, {step(1, 5): _raise(signal.SIGINT)})
    with pytest.raises(Interrupted):
        train(tiny_config(tmp_path), dataset=ds, progress=False)
    monkeypatch.undo()
    last = tmp_path / "run" / "last.pt"
    state = checkpoint.load(last)
    edit(state)
    torch.save(state, last)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda s: s["partial"].update(loss_sum=torch.tensor(3)), "position is malformed"),
        (lambda s: s["partial"].update(first_bad=torch.tensor(-1.0)), "position is malformed"),
        # Each ended the resumed run as diverged at a step that had been finite (review).
        (lambda s: s["partial"].update(first_bad=torch.tensor(2)), "position is malformed"),
        (lambda s: s["partial"].update(first_bad=torch.tensor(False)), "position is malformed"),
        # A traceback from the first in-place sum.
        (lambda s: s["partial"]["loss_sum"].requires_grad_(), "position is malformed"),
        (lambda s: s["partial"].update(step=10**6), "position is past the end of an epoch"),
        # A torchrun checkpoint's per-rank sums, read only when the epoch ends.
        (lambda s: s["partial"].update(rank_sums=[torch.zeros(2)]), "position is malformed"),
        (lambda s: s["partial"].update(rank_sums="0,0,0,0"), "position is malformed"),
        (
            lambda s: s["partial"].update(rank_sums=[torch.zeros(3, requires_grad=True)] * 2),
            "position is malformed",
        ),
        (
            lambda s: s["partial"].update(rank_sums=[torch.zeros(3, dtype=torch.int64)] * 2),
            "position is malformed",
        ),
        (lambda s: s.update(lr_scale=float("nan")), "learning-rate scale is out of range"),
        (lambda s: s.update(lr_scale=-0.5), "learning-rate scale is out of range"),
        # A zero scale would train on at lr 0, never learning again.
        (lambda s: s.update(lr_scale=0.0), "learning-rate scale is out of range"),
        (lambda s: s["early_stopping"].update(best=10**400), "are int and int, not float and"),
        (lambda s: s["early_stopping"].update(wait=-1), "wait -1 is out of range"),
        # Taken as a run's by float() and int() (review).
        (lambda s: s["early_stopping"].update(best=True), "are bool and int, not float and int"),
        (lambda s: s["early_stopping"].update(wait=1.5), "are float and float, not float and"),
        (lambda s: s["early_stopping"].update(wait=3), "waited more epochs than it ran"),
        (lambda s: s.update(nan_reloads=10**30), "NaN-reload count or learning-rate scale is"),
        (lambda s: s.update(nan_reloads=True), "NaN-reload count or learning-rate scale is"),
    ],
)
def test_a_damaged_mid_epoch_checkpoint_is_refused_before_training(
    tmp_path: Path, ds, monkeypatch, damage, message
) -> None:
    """Damage that would surface mid-run (a cast error at the first step, an epoch of no
    steps, a raw OverflowError) is found when the checkpoint is read."""
    _edit_cut_run(tmp_path, ds, monkeypatch, damage)
    with pytest.raises(BrainPropError, match=f"does not fit its run .*{message}"):
        train(None, resume=tmp_path / "run", dataset=ds, progress=False)


def test_a_mid_epoch_position_is_refused_on_the_same_images_in_another_order(
    tmp_path: Path, ds, monkeypatch
):
    """The data's record counts images per class, so another copy with the same images in
    another order is the same data; but the rest of a cut-short epoch indexes this order, and
    went on over others, training some twice and some never (review)."""
    _edit_cut_run(tmp_path, ds, monkeypatch, lambda s: None)
    order = torch.randperm(len(ds.train_y), generator=torch.Generator().manual_seed(1))
    shuffled = Dataset(
        ds.name, ds.train_x[order], ds.train_y[order], ds.test_x, ds.test_y, ds.num_classes
    )
    last = tmp_path / "run" / "last.pt"
    with pytest.raises(BrainPropError) as info:
        train(None, resume=tmp_path / "run", dataset=shuffled, progress=False)
    assert str(info.value) == (
        f"{last} stopped partway through an epoch over these training images in another order "
        "(another copy of the data), and the rest of that epoch follows the order it began in: "
        "resume it on the copy of the data it was trained on"
    )
    assert train(None, resume=tmp_path / "run", dataset=ds, progress=False).summary["epochs_run"]


def test_a_position_at_the_end_of_an_epoch_ends_it_on_resume(tmp_path: Path, ds, monkeypatch):
    """Where a resume on another world size moves a position to a whole batch, it may land on
    the epoch's end: the epoch then ends with no step left, and the run trains on."""
    _edit_cut_run(tmp_path, ds, monkeypatch, lambda s: s["partial"].update(step=STEPS_PER_EPOCH))
    run = train(None, resume=tmp_path / "run", dataset=ds, progress=False)
    assert run.summary["epochs_run"] == 3


@pytest.mark.parametrize(
    "damage",
    [
        lambda h: h.pop(),  # a row short: the loop counts epochs by them
        lambda h: h.append(dict(h[-1], epoch=4)),
        lambda h: h[1].update(epoch=7),
        lambda h: h[0].update(val_acc=math.nan),
        lambda h: h[2].update(test_acc=1.5),
        # Values the close could not write, or divide by, after an epoch's checkpoint: every
        # resume from then on failed with a traceback (review).
        lambda h: h[0].update(stack_size=0),
        lambda h: h[0].update(stack_size="2"),
        lambda h: h[1].update(note=torch.tensor(1.0)),
        lambda h: h[1].update({("a",): 1}),
    ],
)
def test_a_history_that_does_not_fit_its_checkpoint_is_refused(
    tmp_path: Path, ds, reference: Path, damage
) -> None:
    """A history cut short trained on from later weights and reported the wrong epochs, and
    a NaN accuracy became the summary's best (review)."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    state = checkpoint.load(run_dir / "last.pt")
    damage(state["history"])
    torch.save(state, run_dir / "last.pt")
    with pytest.raises(BrainPropError, match="does not fit its run .*its history is malformed"):
        train(tiny_config(tmp_path, epochs=4), resume=run_dir, dataset=ds, progress=False)


def _renamed(weights: dict) -> None:
    """Every key given a prefix, as a DataParallel-wrapped copy saves them."""
    for key in list(weights):
        weights[f"module.{key}"] = weights.pop(key)


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        (
            lambda s: s["model"].pop("0.weight"),
            'its weights: Missing key(s) in state_dict: "0.weight")',
        ),
        (
            lambda s: s["model"].update({"0.weight": torch.zeros(3, 3)}),
            "its weights: size mismatch for 0.weight: copying a param with shape",
        ),
        (
            lambda s: s["model"].update(extra=torch.zeros(1)),
            'its weights: Unexpected key(s) in state_dict: "extra")',
        ),
        # Keys renamed: each list is cut short, so that both show, the renamed ones too.
        (
            lambda s: _renamed(s["model"]),
            'its weights: Missing key(s) in state_dict: "0.weight", "2.weight", "2.bias" and '
            '9 more; Unexpected key(s) in state_dict: "module.0.weight", "module.2.weight", '
            '"module.2.bias" and 11 more)',
        ),
        (
            lambda s: s["optimizer"].update(state="x"),
            "its optimizer state: 'str' object has no attribute 'items')",
        ),
        (
            lambda s: s.update(optimizer={"state": {}}),
            "its optimizer state: no entry 'param_groups')",
        ),
        (
            lambda s: [g.update(momentum=0.9) for g in s["optimizer"]["param_groups"]],
            "its optimizer settings differ from its config)",
        ),
        (lambda s: s.update(early_stopping="x"), "its early-stopping state: string indices"),
        (
            lambda s: s["rng"]["numpy"].pop("gauss"),
            "its random states: the numpy state: no entry 'gauss')",
        ),
    ],
)
def test_a_hand_tampered_checkpoint_names_the_entry_that_does_not_fit(
    tmp_path: Path, ds, reference: Path, damage, said: str
) -> None:
    """The message gave torch's headline alone ("Error(s) in loading state_dict for
    Sequential:") or a missing key's name alone ("'gauss'"), not which weight or entry; the
    entry now comes first, before torch's or Python's words for what is wrong with it."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    state = checkpoint.load(run_dir / "last.pt")
    damage(state)
    torch.save(state, run_dir / "last.pt")
    with pytest.raises(BrainPropError) as info:
        train(tiny_config(tmp_path, epochs=4), resume=run_dir, dataset=ds, progress=False)
    assert str(info.value).startswith(f"{run_dir / 'last.pt'} does not fit its run ({said}")
    assert "\n" not in str(info.value)


def test_a_signal_stops_a_loop_of_runs_that_skips_failed_ones(tmp_path: Path, ds, monkeypatch):
    """A sweep that skips configs raising an Exception (BrainPropError or any other) must
    still stop on Ctrl-C."""
    inject(monkeypatch, {step(1, 5): _raise(signal.SIGINT)})
    skipped = []
    with pytest.raises(Interrupted):
        for seed in (0, 1):
            try:
                train(tiny_config(tmp_path / str(seed), seed=seed), dataset=ds, progress=False)
            except Exception:  # noqa: BLE001 (the sweep's own catch-all is what is tested)
                skipped.append(seed)
    assert skipped == []


@OUT_OF_MEMORY
def test_a_checkpoint_too_large_for_the_machine_is_not_called_damaged(
    tmp_path: Path, ds, monkeypatch, out_of_memory
) -> None:
    inject(monkeypatch, {step(1, 5): _raise(signal.SIGINT)})
    with pytest.raises(Interrupted):
        train(tiny_config(tmp_path), dataset=ds, progress=False)
    monkeypatch.undo()
    error = out_of_memory()

    def full(self, state):
        raise error

    monkeypatch.setattr(Trainer, "load_state", full)
    with pytest.raises(type(error)) as raised:  # which the CLI reports as such, in one line
        train(None, resume=tmp_path / "run", dataset=ds, progress=False)
    assert raised.value is error


@OUT_OF_MEMORY
def test_running_out_of_memory_restoring_an_entry_is_not_the_entrys_misfit(out_of_memory) -> None:
    error = out_of_memory()
    with pytest.raises(type(error)) as raised, checkpoint.entry("its optimizer state"):
        raise error
    assert raised.value is error
    with pytest.raises(ValueError, match="^its state: "), checkpoint.entry("its state"):
        raise RuntimeError("size mismatch")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_second_signal_quits_at_once_keeping_the_last_checkpoint(
    tmp_path: Path, ds, monkeypatch, signum: int
) -> None:
    monkeypatch.setattr(signals, "SAME_STOP_S", 0.0)  # a SIGTERM sent later than the first's

    def twice(q: torch.Tensor) -> torch.Tensor:
        signal.raise_signal(signum)
        signal.raise_signal(signum)
        return q

    inject(monkeypatch, {step(2, 4): twice})
    with pytest.raises(Interrupted, match="stopped at once by a second signal; .* keeps the last "
                       "good state: continue with 'brainprop train --resume ") as info:  # fmt: skip
        train(tiny_config(tmp_path), dataset=ds, progress=False)
    assert info.value.exit_status == 128 + signum  # a scheduler's SIGTERM twice is not Ctrl-C
    assert checkpoint.load(tmp_path / "run" / "last.pt")["epoch"] == 1


def test_a_relayed_stop_beside_a_schedulers_sigterm_still_saves(
    tmp_path: Path, ds, monkeypatch
) -> None:
    """A scheduler's SIGTERM reaches every process of a job, a reproduce worker too, beside
    the stop its parent passes on: taken as a second SIGTERM, it quit the worker without its
    checkpoint, and the epoch in progress was lost (a review)."""

    def both(q: torch.Tensor) -> torch.Tensor:
        signal.raise_signal(signals.RELAY)
        signal.raise_signal(signal.SIGTERM)
        return q

    inject(monkeypatch, {step(2, 4): both})
    # The stop is the relay's, which came first, and the SIGTERM after it no second signal.
    with pytest.raises(Interrupted, match="^stopped by SIGUSR1 ") as info:
        train(tiny_config(tmp_path), dataset=ds, progress=False)
    assert info.value.exit_status == 128 + signals.RELAY
    assert checkpoint.load(tmp_path / "run" / "last.pt")["partial"] is not None


def test_a_relay_is_a_first_stop_and_never_a_second_signal(monkeypatch) -> None:
    for order in ((signals.RELAY, signal.SIGTERM), (signal.SIGTERM, signals.RELAY)):
        with signals.stop_on_signals() as stop:
            for signum in order:
                signal.raise_signal(signum)
        assert stop.signum == order[0] and stop.again is None
    monkeypatch.setattr(signals, "SAME_STOP_S", 0.0)
    with signals.stop_on_signals() as stop:
        signal.raise_signal(signals.RELAY)
        signal.raise_signal(signals.RELAY)
        signal.raise_signal(signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt):  # one's own second signal still quits at once
            signal.raise_signal(signal.SIGTERM)
    assert stop.again == signal.SIGTERM


def test_a_stop_before_training_quits_at_once_as_a_stop() -> None:
    """A reproduce worker loading its dataset has nothing to save: a stop ends it at once, with
    the signal's exit status (which its parent reads as a stop, not a failure); an ignored
    SIGINT stays ignored, and the handlers are restored after."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signals.RELAY)}
    for signum in (signal.SIGTERM, signals.RELAY):
        with (
            pytest.raises(Interrupted, match="^stopped by SIG\\w+ while loading$") as info,
            signals.quit_on_signals("while loading"),
        ):
            signal.raise_signal(signum)
        assert info.value.exit_status == 128 + signum
    assert {s: signal.getsignal(s) for s in before} == before
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with signals.quit_on_signals("while loading"):
            signal.raise_signal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_relay_is_taken_even_where_the_process_ignores_it() -> None:
    """A worker inherits an ignored SIGUSR1 from a parent started so (``trap '' USR1``):
    left ignored, its parent's stop and death passed unseen and it trained on (a review)."""
    previous = signal.signal(signals.RELAY, signal.SIG_IGN)
    try:
        with signals.stop_on_signals() as stop:
            signal.raise_signal(signals.RELAY)
        assert stop.signum == signals.RELAY
        with pytest.raises(Interrupted), signals.quit_on_signals("while loading"):
            signal.raise_signal(signals.RELAY)
    finally:
        signal.signal(signals.RELAY, previous)


def test_a_sigterm_soon_after_the_first_is_the_same_stop(monkeypatch) -> None:
    """A scheduler sends SIGTERM to every process of a job, torchrun among them, which passes
    its own on to its workers at once: each worker gets two, and the second quit it without its
    checkpoint, if it came while the worker saved."""
    with signals.stop_on_signals() as stop:
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)
        assert stop.name == "SIGTERM" and stop.again is None
        monkeypatch.setattr(signals, "SAME_STOP_S", 0.0)  # later: a second signal
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGTERM)
    monkeypatch.undo()
    with signals.stop_on_signals() as stop:  # Ctrl-C twice quits at once, however soon
        signal.raise_signal(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    # So does a SIGTERM soon after a Ctrl-C: whoever pressed it and then sent one means it.
    with signals.stop_on_signals() as stop:
        signal.raise_signal(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGTERM)
    assert stop.signum == signal.SIGINT and stop.again == signal.SIGTERM
    assert signals.first_note(signal.SIGTERM, "saving") == (
        "SIGTERM: saving (send it again after 5 s to quit at once)"
    )
    assert signals.first_note(signals.RELAY, "saving") == "SIGUSR1 (a stop passed on): saving"


def test_a_stop_as_a_signal_block_ends_leaves_every_handler_restored(monkeypatch) -> None:
    """signal.signal() runs a pending signal's handler first: a stop that came as the block
    ended raised out of the first restore, and the other signals kept the block's handlers,
    to raise its stop later in code that expects none (review)."""
    before = {s: signal.getsignal(s) for s in signals._watched()}
    real, calls = signal.signal, []

    def with_a_stop_pending(signum, handler):
        calls.append(signum)
        if len(calls) == len(before) + 1:  # the first restore
            raise Interrupted("stopped by SIGTERM at the block's end", signal.SIGTERM)
        return real(signum, handler)

    monkeypatch.setattr(signal, "signal", with_a_stop_pending)
    with pytest.raises(Interrupted, match="at the block's end"), signals.quit_on_signals("x"):
        pass
    monkeypatch.undo()
    assert {s: signal.getsignal(s) for s in before} == before


def test_killed_before_the_first_checkpoint_starts_over(tmp_path: Path, ds, reference) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(reference / "config.json", run_dir / "config.json")
    (run_dir / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    train(None, resume=run_dir, dataset=ds, progress=False)
    assert not list(run_dir.glob(".*.tmp"))  # what a killed write left behind is cleaned up
    assert_same_run(reference, run_dir)


def test_a_temporary_that_cannot_be_deleted_is_one_line(tmp_path: Path, monkeypatch) -> None:
    """A folder of a temporary's name, or a file that could not be deleted, was a traceback
    (review): the folder is no writer's and is left."""
    (tmp_path / ".mine.tmp").mkdir()
    stuck = tmp_path / ".last.pt.abc123.tmp"
    stuck.write_bytes(b"half a checkpoint")

    def denied(self: Path, missing_ok: bool = False) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(Path, "unlink", denied)
    with pytest.raises(BrainPropError) as info:
        files.remove_temporaries(tmp_path)
    assert str(info.value) == (
        f"cannot delete {stuck}, a file left by a write that was cut short (Permission denied): "
        "delete it, then run the command again"
    )
    monkeypatch.undo()
    files.remove_temporaries(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [".mine.tmp"]


def test_a_run_being_trained_elsewhere_is_not_resumed_meanwhile(
    tmp_path: Path, ds, reference: Path
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    half = run_dir / ".last.pt.abc123.tmp"  # the other process's checkpoint, being written
    half.write_bytes(b"half a checkpoint")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from brainprop import "
         "rundir\nwith rundir.claimed(Path(sys.argv[1])):\n print('held', flush=True)\n "
         "sys.stdin.read()", str(run_dir)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
        with pytest.raises(BrainPropError) as info:
            train(tiny_config(tmp_path, epochs=4), resume=run_dir, dataset=ds, progress=False)
        assert str(info.value) == (
            f"{run_dir} is being trained already: wait for that training to end, or stop it (it "
            "saves its state), then resume it once"
        )
        assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
    finally:
        holder.communicate("")
    train(tiny_config(tmp_path, epochs=4), resume=run_dir, dataset=ds, progress=False)
    assert not half.exists()


def test_training_holds_its_run_directory_until_it_ends(tmp_path: Path, ds, monkeypatch) -> None:
    refused = []
    write_history = rundir.write_history

    def try_to_claim(run: Path, history) -> None:
        with (
            pytest.raises(BrainPropError, match="is being trained already") as info,
            rundir.claimed(run),
        ):
            pass
        refused.append(info.value)
        write_history(run, history)

    monkeypatch.setattr(rundir, "write_history", try_to_claim)
    run = train(tiny_config(tmp_path, epochs=2), dataset=ds, progress=False)
    assert len(refused) >= 2  # once an epoch
    with rundir.claimed(run.dir):
        pass


def test_a_filesystem_without_locks_trains_unheld_and_says_so(
    tmp_path: Path, ds, monkeypatch, capsys
) -> None:
    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(locks.fcntl, "flock", no_locks)
    monkeypatch.setattr(locks, "_WARNED", set())
    run = train(tiny_config(tmp_path), dataset=ds, progress=False)
    assert run.summary["epochs_run"] == 3
    assert capsys.readouterr().err == (
        f"brainprop: warning: cannot lock {run.dir} ({os.strerror(errno.ENOLCK)}): nothing "
        "stops another brainprop process from using it (nor other folders on its filesystem) "
        "meanwhile\n"
    )
    # Once per filesystem: a second run there trains without a second warning.
    train(tiny_config(tmp_path, name="again", epochs=1), dataset=ds, progress=False)
    assert capsys.readouterr().err == ""


def _open_fails(monkeypatch, folder: Path, kind: type[OSError], code: int) -> None:
    """Make the lock's open of ``folder`` alone fail with ``kind`` (``code``)."""
    opened = os.open

    def fails(path, flags, *args):
        if Path(path) == folder:
            raise kind(code, os.strerror(code), str(path))
        return opened(path, flags, *args)

    monkeypatch.setattr(locks.os, "open", fails)


def test_a_run_directory_that_cannot_be_listed_is_refused_not_trained_unheld(
    tmp_path: Path, ds, monkeypatch
) -> None:
    """Mode 0300: written and entered but not opened to lock, and two processes trained the
    run in it at once (review). chmod does not stop root, who may run this suite."""
    run = train(tiny_config(tmp_path, epochs=1), dataset=ds, progress=False)
    _open_fails(monkeypatch, run.dir, PermissionError, errno.EACCES)
    with pytest.raises(BrainPropError) as info:
        train(tiny_config(tmp_path, epochs=2), resume=run.dir, dataset=ds, progress=False)
    assert str(info.value) == (
        f"cannot hold {run.dir} for this process ({os.strerror(errno.EACCES)}): let yourself "
        "read it (chmod u+r), then run the command again"
    )


def test_a_folder_that_cannot_be_opened_to_lock_is_refused_not_used_unheld(
    tmp_path: Path, monkeypatch
) -> None:
    """Out of file descriptors, the folder was once taken to have nothing to hold, and used
    unheld without a word (review)."""
    _open_fails(monkeypatch, tmp_path, OSError, errno.EMFILE)
    with pytest.raises(BrainPropError) as info, locks.held(tmp_path, "busy"):
        pass
    assert str(info.value) == (
        f"cannot hold {tmp_path} for this process ({os.strerror(errno.EMFILE)}): let this "
        "process open more files (raise ulimit -n), then run the command again"
    )


def test_a_folder_gone_before_it_is_opened_to_lock_is_left_to_the_caller(
    tmp_path: Path, monkeypatch
) -> None:
    """Removed between the look and the open: the caller says what is missing, in its words."""
    _open_fails(monkeypatch, tmp_path, FileNotFoundError, errno.ENOENT)
    with locks.held(tmp_path, "busy"):
        pass


#: What best.pt may hold of the epoch that last.pt ends, other than its weights: those of an
#: attempt since started over, which the epoch alone would not tell apart, or, edited by hand,
#: the epoch as a tensor, sparse weights or the weights in another dtype (each once gave a raw
#: traceback, or was taken for the same weights; review).
BEST_PT_OF_THAT_EPOCH = {
    "another attempt's weights": lambda best: {**best, "model": _zeros(best["model"])},
    "the epoch as a tensor": lambda best: {**best, "epoch": torch.tensor([best["epoch"]] * 2)},
    "sparse weights": lambda best: {**best, "model": _map(best["model"], torch.Tensor.to_sparse)},
    "weights in float64": lambda best: {**best, "model": _map(best["model"], torch.Tensor.double)},
}


def _map(model: dict, f: Callable[[torch.Tensor], torch.Tensor]) -> dict:
    return {k: f(v) if v.is_floating_point() else v for k, v in model.items()}


def _zeros(model: dict) -> dict:
    return {k: torch.zeros_like(v) for k, v in model.items()}


@pytest.mark.parametrize("that_epoch", [None, *BEST_PT_OF_THAT_EPOCH])
def test_killed_between_last_pt_and_best_pt_resumes_with_that_epochs_best_pt(
    tmp_path: Path, ds, reference: Path, monkeypatch, that_epoch: str | None
) -> None:
    """Killed as the run's last new best is written: no later epoch writes best.pt again, so
    only the resume can give it the weights it should hold, from the last.pt written first.
    ``that_epoch``: best.pt holds that epoch, but not its weights (BEST_PT_OF_THAT_EPOCH)."""
    history = json.loads((reference / "history.json").read_text())
    accuracies = [row["val_acc"] for row in history]
    bests = sum(a > max(accuracies[:i], default=-1.0) for i, a in enumerate(accuracies))
    real, written = checkpoint.save, []

    def killed_at_the_last_best(path: Path, state: dict) -> None:
        if Path(path).name == "best.pt":
            written.append(state["epoch"])
            if len(written) == bests:
                raise SystemExit("killed")  # last.pt of this epoch is written, best.pt is not
        real(path, state)

    monkeypatch.setattr(checkpoint, "save", killed_at_the_last_best)
    with pytest.raises(SystemExit):
        train(tiny_config(tmp_path), dataset=ds, progress=False)
    monkeypatch.undo()
    run_dir = tmp_path / "run"
    assert checkpoint.load(run_dir / "last.pt")["epoch"] == written[-1]
    if bests > 1:
        assert checkpoint.load(run_dir / "best.pt")["epoch"] == written[-2]
    else:
        assert not (run_dir / "best.pt").exists()
    if that_epoch is not None:
        last = checkpoint.load(run_dir / "last.pt")
        keys = ("config", "input_shape", "num_classes", "data", "model", "epoch")
        best = BEST_PT_OF_THAT_EPOCH[that_epoch]({k: last[k] for k in keys})
        # As a hand would write it: checkpoint.save refuses a sparse tensor.
        torch.save({"format": checkpoint.FORMAT, **best}, run_dir / "best.pt")
    train(None, resume=run_dir, dataset=ds, progress=False)
    assert_same_run(reference, run_dir)
    best = checkpoint.load(run_dir / "best.pt")
    assert best["epoch"] == written[-1]
    for k, v in checkpoint.load(run_dir / "last.pt")["model"].items():
        assert v.dtype == best["model"][k].dtype and v.layout == best["model"][k].layout


def test_a_raise_of_epochs_that_cannot_unmark_the_finished_run_is_not_stored(
    tmp_path: Path, ds, monkeypatch
) -> None:
    """config.json raised beside a summary.json that says the run finished would make
    ``reproduce`` skip a run that has epochs left, and the next resume think them stored."""
    run = train(tiny_config(tmp_path, epochs=1), dataset=ds, progress=False)
    unlink = Path.unlink

    def refused(path: Path, missing_ok: bool = False) -> None:
        if path.name == "summary.json":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refused)
    summary = run.dir / "summary.json"
    with pytest.raises(BrainPropError) as info:
        train(tiny_config(tmp_path, epochs=2), resume=run.dir, dataset=ds, progress=False)
    assert str(info.value) == (
        f"cannot remove {summary} (Permission denied), which marks the run finished, to train it "
        "on: fix the permissions of its folder, then resume it again"
    )
    monkeypatch.undo()
    assert json.loads((run.dir / "config.json").read_text())["epochs"] == 1
    longer = train(tiny_config(tmp_path, epochs=2), resume=run.dir, dataset=ds, progress=False)
    assert longer.summary["epochs_run"] == 2


def test_a_run_without_last_pt_that_has_trained_is_not_started_over(
    tmp_path: Path, ds, reference: Path
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    (run_dir / "last.pt").unlink()  # say, to save disk
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    missing = r"last.pt is missing, but the run has trained \(history.csv is there\)"
    with pytest.raises(BrainPropError, match=missing + ".*put back its last.pt, or start a new"):
        train(None, resume=run_dir, dataset=ds, progress=False)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
    # A run that ended (diverged, say) before its first checkpoint has nothing to continue.
    for name in ("history.csv", "history.json", "best.pt"):
        (run_dir / name).unlink()
    with pytest.raises(BrainPropError, match="ended before its first checkpoint"):
        train(None, resume=run_dir, dataset=ds, progress=False)


def test_resume_raises_epochs_only_when_asked(tmp_path: Path, ds) -> None:
    run = train(tiny_config(tmp_path, epochs=1), dataset=ds, progress=False)
    assert train(None, resume=run.dir, dataset=ds, progress=False).summary["epochs_run"] == 1
    longer = train(tiny_config(tmp_path, epochs=2), resume=run.dir, dataset=ds, progress=False)
    assert longer.summary["epochs_run"] == 2
    assert json.loads((run.dir / "config.json").read_text())["epochs"] == 2
    with pytest.raises(BrainPropError, match="has already run 2 epochs, so --epochs 1 would "
                       "change nothing: pass more than 2"):  # fmt: skip
        train(tiny_config(tmp_path, epochs=1), resume=run.dir, dataset=ds, progress=False)
    assert json.loads((run.dir / "config.json").read_text())["epochs"] == 2


def test_resume_refuses_a_config_whose_other_settings_it_would_drop(
    tmp_path: Path, ds, monkeypatch
) -> None:
    """The CLI refuses --lr beside --resume; the library took the epochs and dropped the lr
    without a word (review). The config the run began with, as given, is no such request."""
    monkeypatch.chdir(tmp_path)
    run = train(tiny_config(tmp_path, epochs=1, data_dir="data"), dataset=ds, progress=False)
    with pytest.raises(BrainPropError) as info:
        train(tiny_config(tmp_path, epochs=2, lr=0.5, seed=4), resume=run.dir, dataset=ds,
              progress=False)  # fmt: skip
    assert str(info.value) == (
        "a resumed run keeps its own settings, so the config's lr, seed would be ignored: pass "
        "TrainConfig(epochs=N) to train longer, or no config (data that moved: data_dir=)"
    )
    assert json.loads((run.dir / "config.json").read_text())["epochs"] == 1
    # Settings left at their defaults are no request to change anything, nor is the relative
    # data root the run stored absolute.
    assert train(TrainConfig(epochs=2), resume=run.dir, dataset=ds,
                 progress=False).summary["epochs_run"] == 2  # fmt: skip
    again = tiny_config(tmp_path, epochs=3, data_dir="data")
    assert train(again, resume=run.dir, dataset=ds, progress=False).summary["epochs_run"] == 3


def test_a_finished_run_given_more_epochs_is_unfinished_until_it_ends_again(
    tmp_path: Path, ds, monkeypatch
) -> None:
    """Its old summary.json would mark it finished while it trains on (review): reproduce
    would skip it and record the old summary with the newer curve."""
    run = train(tiny_config(tmp_path, epochs=1), dataset=ds, progress=False)
    inject(monkeypatch, {step(1, 2): _raise(signal.SIGTERM)})
    with pytest.raises(Interrupted):
        train(tiny_config(tmp_path, epochs=2), resume=run.dir, dataset=ds, progress=False)
    assert not (run.dir / "summary.json").exists()
    monkeypatch.undo()
    assert train(None, resume=run.dir, dataset=ds, progress=False).summary["epochs_run"] == 2
    assert json.loads((run.dir / "summary.json").read_text())["epochs_run"] == 2


def test_resume_with_epochs_below_one_blames_the_flag(tmp_path: Path, ds, reference) -> None:
    # Killed before its first checkpoint: nothing trained, so 0 epochs is not "fewer than run".
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(reference / "config.json", run_dir / "config.json")
    with pytest.raises(BrainPropError) as info:
        train(tiny_config(tmp_path, epochs=0), resume=run_dir, dataset=ds, progress=False)
    assert str(info.value) == "--epochs must be >= 1, got 0"


def test_a_new_place_for_the_data_is_for_a_resumed_run_only(tmp_path: Path, ds, reference):
    message = (
        "train(data_dir=...) reads a resumed run's data from a new place: for a new run, set "
        "config.data_dir; with dataset=..., leave it out"
    )
    with pytest.raises(BrainPropError) as info:
        train(tiny_config(tmp_path), data_dir=tmp_path, progress=False)
    assert str(info.value) == message
    with pytest.raises(BrainPropError) as info:
        train(resume=reference, dataset=ds, data_dir=tmp_path, progress=False)
    assert str(info.value) == message


def test_a_run_that_stopped_early_in_its_last_epoch_resumes_as_stopped_early(
    tmp_path: Path, ds
) -> None:
    # No epoch after the first gains a min_delta of 0.99: patience 1 ends the run at epoch 2, the
    # last the cap allows.
    run = train(
        tiny_config(tmp_path, epochs=2, patience=1, min_delta=0.99), dataset=ds, progress=False
    )
    assert run.summary["stop_reason"] == "early stopping"
    (run.dir / "summary.json").unlink()  # killed before the summary was written
    assert train(resume=run.dir, dataset=ds, progress=False).summary == run.summary


def test_a_run_directory_that_cannot_be_written_is_refused_before_training(
    tmp_path: Path, ds, monkeypatch
) -> None:
    run = train(tiny_config(tmp_path, epochs=1), dataset=ds, progress=False)
    config = json.loads((run.dir / "config.json").read_text())
    (run.dir / "config.json").write_text(json.dumps({**config, "epochs": 2}))  # stopped midway
    (run.dir / "summary.json").unlink()
    # Lost by a kill at the epoch's end: not rebuilt first, which gave the write's own advice.
    (run.dir / "best.pt").unlink()
    made = tempfile.TemporaryFile

    def read_only(*args: Any, dir: Any = None, **kw: Any) -> Any:
        # chmod does not stop root, who may run this suite
        if Path(dir) == run.dir:
            raise PermissionError(errno.EACCES, "Permission denied")
        return made(*args, dir=dir, **kw)

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    with pytest.raises(BrainPropError) as info:
        train(resume=run.dir, dataset=ds, progress=False)
    assert str(info.value) == (
        f"cannot write in {run.dir} (Permission denied): fix its permissions, or copy the run "
        "to a folder you can write and resume that copy"
    )
    assert not (run.dir / "best.pt").exists()
    assert len(json.loads((run.dir / "history.json").read_text())) == 1  # before any training


def test_room_on_resuming_is_asked_for_after_best_pt_is_rebuilt(
    tmp_path: Path, ds, monkeypatch
) -> None:
    """A kill between last.pt and best.pt at an epoch's end: the room for the next last.pt
    was asked for first, then the rebuilt best.pt took it, and a whole epoch trained before
    its last.pt failed on the full disk (review). The advice was --out, which a resume
    refuses."""
    run = train(tiny_config(tmp_path, epochs=1), dataset=ds, progress=False)
    config = json.loads((run.dir / "config.json").read_text())
    (run.dir / "config.json").write_text(json.dumps({**config, "epochs": 2}))
    (run.dir / "summary.json").unlink()
    one = (run.dir / "best.pt").stat().st_size
    (run.dir / "best.pt").unlink()

    def used() -> int:
        return sum(p.stat().st_size for p in run.dir.iterdir() if p.is_file())

    # Room for the next last.pt (and the 1 MiB of history and plots allowed beside it) and
    # half a checkpoint more, beside what the run holds now.
    disk = used() + one + 2**20 + one // 2
    monkeypatch.setattr(
        "brainprop.rundir.shutil.disk_usage",
        lambda _p: type("U", (), {"free": disk - used()})(),
    )
    with pytest.raises(BrainPropError) as info:
        train(resume=run.dir, dataset=ds, progress=False)
    assert re.fullmatch(
        rf"only [\d.]+ MiB free in {re.escape(str(run.dir))}, and the checkpoints of this run "
        r"need about [\d.]+ MiB: free disk space or copy the run \(of 'brainprop reproduce', its "
        r"whole --out folder\) to a disk with room and continue it there",
        str(info.value),
    )
    assert (run.dir / "best.pt").is_file()
    assert len(json.loads((run.dir / "history.json").read_text())) == 1  # before any training


def test_a_kill_between_the_last_checkpoint_and_the_history_is_mended_on_resume(
    tmp_path: Path, ds
) -> None:
    run = train(tiny_config(tmp_path, epochs=2), dataset=ds, progress=False)
    rows = json.loads((run.dir / "history.json").read_text())
    (run.dir / "history.json").write_text(json.dumps(rows[:1]))  # as the kill left it
    train(None, resume=run.dir, dataset=ds, progress=False)
    assert json.loads((run.dir / "history.json").read_text()) == rows
    assert len((run.dir / "history.csv").read_text().splitlines()) == 1 + 2


@pytest.mark.parametrize("at", ["fsync", "replace"])
def test_a_crash_inside_a_write_leaves_the_previous_file(
    tmp_path: Path, monkeypatch, at: str
) -> None:
    """A crash once the new bytes went out (at the fsync), or as they take the old file's
    place (at the rename)."""
    path = tmp_path / "last.pt"
    checkpoint.save(path, {"epoch": 1})

    def crash(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, at, crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, {"epoch": 2})
    monkeypatch.undo()
    assert checkpoint.load(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_write_reaches_its_file_by_one_rename_alone(tmp_path: Path, monkeypatch) -> None:
    """The new bytes go to a file beside the old one, renamed over it: a copy into the old file
    (which the test above cannot tell from a rename) leaves it half-written if killed in the
    middle (review)."""
    path = tmp_path / "last.pt"
    checkpoint.save(path, {"epoch": 1})
    renamed = []
    replace = os.replace

    def watched(src: str, dst: Path) -> None:
        renamed.append((Path(src).parent, os.stat(src).st_ino, Path(dst)))
        replace(src, dst)

    monkeypatch.setattr(files.os, "replace", watched)
    checkpoint.save(path, {"epoch": 2})
    [(folder, inode, target)] = renamed
    assert (folder, target, path.stat().st_ino) == (tmp_path, path, inode)
    assert checkpoint.load(path)["epoch"] == 2


def test_a_failed_write_leaves_no_open_file(tmp_path: Path, monkeypatch) -> None:
    def refuse(fd: int) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(files, "usual_permissions", refuse)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with pytest.raises(BrainPropError, match="Operation not permitted"):
            checkpoint.save(tmp_path / "last.pt", {"epoch": 1})
    assert len(os.listdir("/proc/self/fd")) == before
    assert list(tmp_path.iterdir()) == []


def test_successful_writes_leave_no_open_file(tmp_path: Path) -> None:
    # A run writes its history every epoch: one descriptor kept per write would end a long
    # reproduce in "Too many open files".
    before = len(os.listdir("/proc/self/fd"))
    for i in range(20):
        files.atomic_write_text(tmp_path / "history.json", str(i))
    assert len(os.listdir("/proc/self/fd")) == before


def test_the_fsync_sees_every_byte_written(tmp_path: Path, monkeypatch) -> None:
    """What is still in Python's buffer is no part of what fsync makes durable: a small file
    (config.json) synced that way is renamed into place empty, and a power loss keeps that."""
    sizes = []
    fsync = os.fsync

    def watched(fd: int) -> None:
        if not os.path.isdir(f"/proc/self/fd/{fd}"):  # the folder's own fsync has no size
            sizes.append(os.fstat(fd).st_size)
        fsync(fd)

    monkeypatch.setattr(files.os, "fsync", watched)
    files.atomic_write(tmp_path / "last.pt", lambda f: f.write(b"x" * 100_000))
    files.atomic_write(tmp_path / "config.json", lambda f: f.write(b"{}"))
    assert sizes == [100_000, 2]


def test_only_brainprops_own_temporaries_are_removed(tmp_path: Path) -> None:
    (tmp_path / ".last.pt.abc123.tmp").write_bytes(b"half")
    (tmp_path / "notes.tmp").write_text("a file of the user's")
    files.remove_temporaries(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.tmp"]


def test_a_file_in_the_way_behind_a_working_link_is_not_blamed_on_the_link(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "out").write_text("a file, not a folder")
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(BrainPropError) as info:
        files.make_folder(tmp_path / "link" / "out")
    assert "(File exists)" in str(info.value) and "symbolic link" not in str(info.value)


def test_a_held_folder_is_refused_at_once_not_waited_for(tmp_path: Path) -> None:
    # A timeout, not a hang of the suite, where the lock would block.
    take = (
        "import sys; from pathlib import Path; from brainprop import locks\n"
        "with locks.held(Path(sys.argv[1]), 'busy'): pass"
    )
    with locks.held(tmp_path, "held"):
        p = subprocess.run([sys.executable, "-c", take, str(tmp_path)], capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    assert p.returncode != 0 and "Busy: busy" in p.stderr


def test_the_umask_is_left_as_it_was_where_proc_does_not_say_it(
    tmp_path: Path, monkeypatch
) -> None:
    """Off Linux, reading the umask means setting it for a moment: left at 0o077, every later
    file of the process would be owner-only."""
    read_text = Path.read_text

    def no_proc(self: Path, *args: Any, **kwargs: Any) -> str:
        if str(self) == "/proc/self/status":
            raise OSError(errno.ENOENT, "no /proc")
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", no_proc)
    old = os.umask(0o027)
    try:
        files.atomic_write_text(tmp_path / "a.json", "{}")
        now = os.umask(0o027)
    finally:
        os.umask(old)
    assert now == 0o027 and (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640


def test_a_written_file_is_as_readable_as_the_umask_allows(tmp_path: Path) -> None:
    """Not owner-only, as the temporary file it was renamed from was made."""
    old = os.umask(0o022)
    try:
        files.atomic_write_text(tmp_path / "summary.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "summary.json").stat().st_mode & 0o777 == 0o644


def test_checkpoint_of_another_run_is_refused(tmp_path: Path, ds, reference: Path) -> None:
    other = train(tiny_config(tmp_path, name="other", lr=0.05, epochs=1), dataset=ds,
                  progress=False)  # fmt: skip
    run_dir = tmp_path / "copy"
    shutil.copytree(reference, run_dir)
    shutil.copy(other.dir / "last.pt", run_dir / "last.pt")
    with pytest.raises(BrainPropError) as info:
        train(None, resume=run_dir, dataset=ds, progress=False)
    assert str(info.value) == (
        f"{run_dir / 'last.pt'} is not the run of the config.json beside it: its lr is 0.05 "
        "but config.json says 0.1 (3 settings differ); put back the run's own last.pt and "
        "config.json as it wrote them, or start a new run"
    )


def test_a_best_checkpoint_of_another_run_is_refused_by_resume_and_evaluate(
    tmp_path: Path, ds, reference: Path
) -> None:
    """Only last.pt was compared with config.json: another run's best.pt was scored as this
    run's, and a resume kept it as its best (review)."""
    other = train(tiny_config(tmp_path, name="other", lr=0.05, epochs=1), dataset=ds,
                  progress=False)  # fmt: skip
    run_dir = tmp_path / "copy"
    shutil.copytree(reference, run_dir)
    assert evaluate(run_dir, dataset=ds)["epoch"] >= 1
    shutil.copy(other.dir / "best.pt", run_dir / "best.pt")
    expected = (
        f"{run_dir / 'best.pt'} is not the run of the config.json beside it: its lr is 0.05 "
        "but config.json says 0.1 (3 settings differ); put back the run's own best.pt and "
        "config.json as it wrote them, or start a new run"
    )
    for attempt in (
        lambda: train(tiny_config(tmp_path, epochs=4), resume=run_dir, dataset=ds, progress=False),
        lambda: evaluate(run_dir, dataset=ds),
    ):
        with pytest.raises(BrainPropError) as info:
            attempt()
        assert str(info.value) == expected
    evaluate(run_dir / "best.pt", dataset=ds)  # a file named alone is scored as it is
    (run_dir / "best.pt").write_bytes(b"damaged")  # mended by a resume, as before
    assert train(None, resume=run_dir, dataset=ds, progress=False).summary["epochs_run"] == 3


def test_weights_of_another_dtype_are_refused_not_converted(tmp_path: Path, ds, reference):
    """load_state_dict converts them: int8 weights came back as zeros, and a resume trained on
    from them (review)."""
    run_dir = tmp_path / "copy"
    shutil.copytree(reference, run_dir)
    state = checkpoint.load(run_dir / "last.pt")
    key = next(k for k, t in state["model"].items() if t.is_floating_point())
    state["model"][key] = state["model"][key].to(torch.int8)
    checkpoint.save(run_dir / "last.pt", {k: v for k, v in state.items() if k != "format"})
    with pytest.raises(BrainPropError, match=rf"its weights: {re.escape(key)} is torch.int8, "
                       r"not torch.float32\)"):  # fmt: skip
        train(tiny_config(tmp_path, epochs=4), resume=run_dir, dataset=ds, progress=False)


def test_a_run_stored_with_a_relative_data_dir_resumes_again_and_again(
    tmp_path: Path, ds, monkeypatch
) -> None:
    # Older versions stored "data" as typed; a resume writes the absolute root into last.pt,
    # and the next resume called that checkpoint another run's.
    monkeypatch.chdir(tmp_path)
    run = train(tiny_config(tmp_path, epochs=1, data_dir="data"), dataset=ds, progress=False)
    config = json.loads((run.dir / "config.json").read_text())
    state = checkpoint.load(run.dir / "last.pt")
    state["config"]["data_dir"] = "data"
    checkpoint.save(run.dir / "last.pt", state)
    for epochs in (2, 3):  # stopped after each epoch, as the older version left it
        (run.dir / "config.json").write_text(
            json.dumps(config | {"data_dir": "data", "epochs": epochs})
        )
        (run.dir / "summary.json").unlink()
        assert train(resume=run.dir, dataset=ds, progress=False).summary["epochs_run"] == epochs


def test_resume_with_data_of_another_number_of_classes(tmp_path, ds, reference) -> None:
    with pytest.raises(BrainPropError) as info:
        train(None, resume=reference, dataset=make_tiny_dataset(classes=3), progress=False)
    assert str(info.value) == (
        f"checkpoint in {reference} was trained on inputs (1, 8, 8) with 4 classes, but the "
        "data has (1, 8, 8) with 3: resume with the dataset it was trained on"
    )


RESUME_ON_IT = (
    "resume with the dataset it was trained on (--data-dir the folder it was read from; data "
    "of one's own as train(resume=run, dataset=...))"
)


def test_resume_on_other_data_of_the_same_shape_is_refused(tmp_path, ds, reference) -> None:
    """Only the test split is the same: resumed, the run trained on another training set."""
    other = dataclasses.replace(make_tiny_dataset(n_train=128), test_x=ds.test_x, test_y=ds.test_y)
    with pytest.raises(BrainPropError) as info:
        train(None, resume=reference, dataset=other, progress=False)
    assert str(info.value) == (
        f"checkpoint in {reference} was trained on 'mnist' (256 training, 64 test images), "
        f"but the data now is 'mnist' (128 training, 64 test images): {RESUME_ON_IT}"
    )


def test_a_run_on_data_of_ones_own_resumes_on_it_alone(tmp_path) -> None:
    """Without dataset=, the resume would train on config.dataset's files (here, none are where
    it would look: refused before any is read)."""
    mine = dataclasses.replace(make_tiny_dataset(), name="mine")
    config = tiny_config(tmp_path, epochs=1, data_dir=str(tmp_path))
    run = train(config, dataset=mine, progress=False)
    longer = dataclasses.replace(config, epochs=2)
    with pytest.raises(BrainPropError) as info:
        train(longer, resume=run.dir, progress=False)
    assert str(info.value) == (
        f"checkpoint in {run.dir} was trained on data of one's own, 'mine', not on mnist's "
        "files, which brainprop would load: pass that data again, as "
        "train(resume=run, dataset=...) (from Python: the command line loads only the "
        "dataset the run's config names, mnist)"
    )
    assert train(longer, resume=run.dir, dataset=mine, progress=False).summary["epochs_run"] == 2


def test_a_run_killed_before_its_first_checkpoint_starts_over_on_its_own_data(tmp_path) -> None:
    """It starts over from config.json, which does not name the data: it trained on
    config.dataset's files. data.json, written as the run starts, names it."""
    mine = dataclasses.replace(make_tiny_dataset(), name="mine")
    run = train(tiny_config(tmp_path, epochs=1), dataset=mine, progress=False).dir
    for leftover in run.iterdir():
        if leftover.name not in ("config.json", "data.json"):
            leftover.unlink()  # as a kill inside the first epoch leaves it
    with pytest.raises(BrainPropError) as info:
        train(None, resume=run, progress=False)
    assert str(info.value) == (
        f"{run / 'data.json'} was trained on data of one's own, 'mine', not on mnist's files, "
        "which brainprop would load: pass that data again, as train(resume=run, dataset=...) "
        "(from Python: the command line loads only the dataset the run's config names, mnist)"
    )
    other = make_tiny_dataset(n_train=128)
    with pytest.raises(BrainPropError, match="but the data now is 'mnist' \\(128 training"):
        train(None, resume=run, dataset=other, progress=False)
    assert train(None, resume=run, dataset=mine, progress=False).summary["epochs_run"] == 1


def test_a_damaged_data_json_is_named_as_such(tmp_path) -> None:
    run = train(tiny_config(tmp_path, epochs=1), dataset=make_tiny_dataset(), progress=False).dir
    for leftover in run.iterdir():
        if leftover.name not in ("config.json", "data.json"):
            leftover.unlink()
    (run / "data.json").write_text("{")
    with pytest.raises(BrainPropError) as info:
        train(None, resume=run, dataset=make_tiny_dataset(), progress=False)
    assert str(info.value) == f"{run / 'data.json'} is not valid JSON: the run directory is damaged"


def test_resume_takes_the_same_data_in_another_order_and_older_checkpoints(tmp_path, ds) -> None:
    """Copies of CIFAR-10 may hold its images in another order (the one this project was
    given does); checkpoints from before the data was recorded are not checked."""
    config = tiny_config(tmp_path, epochs=1)
    run = train(config, dataset=ds, progress=False)
    order = torch.randperm(len(ds.train_y), generator=torch.Generator().manual_seed(1))
    shuffled = dataclasses.replace(ds, train_x=ds.train_x[order], train_y=ds.train_y[order])
    for epochs, data in ((2, shuffled), (3, make_tiny_dataset(n_train=128))):
        if epochs == 3:  # as written before the data was recorded
            state = checkpoint.load(run.dir / "last.pt")
            del state["data"], state["format"]
            checkpoint.save(run.dir / "last.pt", state)
        longer = dataclasses.replace(config, epochs=epochs)
        resumed = train(longer, resume=run.dir, dataset=data, progress=False)
        assert resumed.summary["epochs_run"] == epochs


def test_a_run_that_holds_images_out_is_refused_another_order_of_them(tmp_path, ds) -> None:
    """Another order holds out other images, some of which the run trained on: resumed on it,
    a run validated on 4,569 of MNIST's 5,000 images it had trained on (review)."""
    config = dataclasses.replace(tiny_config(tmp_path, epochs=1), val=32)
    run = train(config, dataset=ds, progress=False)
    order = torch.randperm(len(ds.train_y), generator=torch.Generator().manual_seed(1))
    shuffled = dataclasses.replace(ds, train_x=ds.train_x[order], train_y=ds.train_y[order])
    longer = dataclasses.replace(config, epochs=2)
    with pytest.raises(BrainPropError) as info:
        train(longer, resume=run.dir, dataset=shuffled, progress=False)
    assert str(info.value) == (
        f"checkpoint in {run.dir} validated on 32 training images held out of the data, and "
        "this copy of it holds other images in their places (the same images in another "
        "order?), some of which the run trained on: resume with the dataset it was trained on, "
        "in the order it had (the copy the run started on)"
    )
    recorded = json.loads((run.dir / rundir.DATA).read_text())["held_out"]
    assert recorded == ds.fingerprint(32)["held_out"] and recorded["images"] == 32
    assert train(longer, resume=run.dir, dataset=ds, progress=False).summary["epochs_run"] == 2


@pytest.mark.parametrize(
    "held_out",
    [{"images": 32}, {"images": 0, "sha256": "0"}, {"images": True, "sha256": "0"},
     {"images": 10**9, "sha256": "0"}, {"images": 32, "sha256": None}, [32, "0"]],
)  # fmt: skip
def test_a_damaged_record_of_the_held_out_images_is_refused(tmp_path, ds, held_out) -> None:
    config = dataclasses.replace(tiny_config(tmp_path, epochs=1), val=32)
    run = train(config, dataset=ds, progress=False)
    state = checkpoint.load(run.dir / "last.pt")
    state["data"]["held_out"] = held_out
    checkpoint.save(run.dir / "last.pt", state)
    with pytest.raises(BrainPropError, match="records the data it was trained on in a damaged"):
        train(dataclasses.replace(config, epochs=2), resume=run.dir, dataset=ds, progress=False)


def test_checkpoint_written_on_another_device_type_is_refused(tmp_path, ds, reference) -> None:
    # A run with --device auto started on a GPU and resumed on a CPU machine.
    run_dir = tmp_path / "copy"
    shutil.copytree(reference, run_dir)
    state = torch.load(run_dir / "last.pt", weights_only=True)
    assert state["device_type"] == "cpu"
    state["device_type"] = "cuda"
    torch.save(state, run_dir / "last.pt")
    with pytest.raises(BrainPropError) as info:
        train(None, resume=run_dir, dataset=ds, progress=False)
    assert str(info.value) == (
        f"{run_dir / 'last.pt'} was written on cuda and this run would continue on cpu, whose "
        "random states are of another kind: resume it on a machine with a cuda device"
    )


def test_a_cpu_checkpoint_met_by_a_gpu_says_how_to_stay_on_the_cpu(tmp_path, ds, reference):
    """A --device auto run started on a CPU goes to the GPU of a machine that has one, and a
    resume takes no --device: "a machine with a cpu device" was no advice (review)."""
    state = checkpoint.load(reference / "last.pt")
    on_gpu = Trainer(tiny_config(tmp_path).resolve(), ds, progress=False)
    on_gpu.device = torch.device("cuda")
    with pytest.raises(BrainPropError) as info:
        resume.restore(on_gpu, state, ds, reference)
    assert str(info.value) == (
        f"{reference / 'last.pt'} was written on cpu and this run would continue on cuda, whose "
        "random states are of another kind: resume it with the GPUs hidden "
        "(CUDA_VISIBLE_DEVICES= before the command)"
    )


@pytest.mark.parametrize("device", ["cuda:999", "gpu"])
def test_a_run_on_a_device_this_machine_lacks_is_told_where_to_resume(
    tmp_path, ds, reference, device
):
    """It was told to pass --device cpu, which a resume refuses (review); a name that is no
    device at all is damage, not another machine's."""
    run_dir = tmp_path / "copy"
    shutil.copytree(reference, run_dir)
    state = torch.load(run_dir / "last.pt", weights_only=True)
    state["config"]["device"] = device
    torch.save(state, run_dir / "last.pt")
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps(config | {"device": device}))
    with pytest.raises(BrainPropError) as info:
        train(None, resume=run_dir, dataset=ds, progress=False)
    told = (
        f"{run_dir / 'config.json'}: the run trains on device 'cuda:999', which this machine "
        "does not have: resume it on a machine that has"
        if device == "cuda:999"
        else f"{run_dir / 'config.json'} holds an invalid config ('gpu' is no device name: use "
    )
    assert str(info.value).startswith(told)


def test_resume_of_a_folder_that_is_not_a_run(tmp_path: Path, ds) -> None:
    with pytest.raises(BrainPropError, match="no run directory at .*: pass a folder"):
        train(None, resume=tmp_path / "nope", dataset=ds, progress=False)
    with pytest.raises(BrainPropError, match="config.json is missing: is .* a brainprop run"):
        train(None, resume=tmp_path, dataset=ds, progress=False)


# --- SIGKILL of a real CLI process ------------------------------------------------------------

EPOCHS = 6


def _cli(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "brainprop", *map(str, args)]


def _env() -> dict[str, str]:
    # One thread: the same kernels in every process, and no fight over the 2 CI cores.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _epochs_done(run_dir: Path) -> int:
    try:
        return len(json.loads((run_dir / "history.json").read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def _start(args: list[str | Path]) -> subprocess.Popen:
    return subprocess.Popen(_cli(*args), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for(proc: subprocess.Popen, ready) -> None:
    while not ready() and proc.poll() is None:
        time.sleep(0.005)


def test_sigkill_at_three_seeded_moments_then_resume_is_bit_identical(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "runs"
    write_idx_dataset(data / "mnist", n_train=96, n_test=32, gz=False)
    fresh = ["train", "--dataset", "mnist", "--arch", "dense", "--batch-size", "16",
             "--epochs", EPOCHS, "--data-dir", data, "--out", out, "--quiet"]  # fmt: skip
    whole = _start([*fresh, "--name", "whole"])
    _wait_for(whole, lambda: _epochs_done(out / "whole") >= 1)
    t0 = time.perf_counter()
    _wait_for(whole, lambda: _epochs_done(out / "whole") >= EPOCHS)
    # Time per epoch, from the end of epoch 1 to that of the last: the plots and the exit after
    # it would lengthen the sleeps below until a run slowed by its neighbours finished first.
    epoch_s = (time.perf_counter() - t0) / (EPOCHS - 1)
    assert whole.wait() == 0, whole.communicate()[1]

    rng = random.Random(5)
    cut = out / "cut"
    for _ in range(3):
        before = _epochs_done(cut)
        resume = ["train", "--resume", cut, "--quiet"]
        proc = _start(resume if (cut / "config.json").is_file() else [*fresh, "--name", "cut"])
        # A seeded moment: 1 or 2 epochs on, plus up to one epoch's time, so it may land in a
        # step, the evaluation or a checkpoint write. At least one epoch is left to go, so the
        # process is still alive.
        target = min(before + rng.randint(1, 2), EPOCHS - 2)
        _wait_for(proc, lambda target=target: _epochs_done(cut) >= target)
        time.sleep(rng.uniform(0, epoch_s))
        proc.kill()
        _, err = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, f"finished before the kill: {err.decode()}"
        checkpoint.load(cut / "last.pt")  # whole, wherever the kill landed

    done = subprocess.run(_cli("train", "--resume", cut, "--quiet"), env=_env(),
                          capture_output=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["epochs_run"] == EPOCHS
    assert_same_run(out / "whole", cut)


@pytest.mark.parametrize(
    "error",
    [RuntimeError("reentrant call inside <_io.BufferedWriter name='<stderr>'>"), BrokenPipeError()],
    ids=["reentrant", "reader-gone"],
)
def test_a_signal_whose_note_cannot_be_printed_still_stops_cleanly(error) -> None:
    def fails(_signum: int) -> None:
        raise error

    with signals.stop_on_signals(fails) as stop:
        signal.raise_signal(signal.SIGTERM)
    assert stop.requested and stop.name == "SIGTERM"


def _handlers() -> dict[int, object]:
    return {s: signal.getsignal(s) for s in (*signals.SIGNALS, signals.RELAY)}


def test_the_handlers_come_back_after_an_error_a_second_signal_and_a_quit() -> None:
    before = _handlers()
    with pytest.raises(ValueError), signals.stop_on_signals():
        raise ValueError("a bug in the block")
    assert _handlers() == before
    with pytest.raises(KeyboardInterrupt), signals.stop_on_signals():
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
    assert _handlers() == before
    with pytest.raises(signals.Interrupted), signals.quit_on_signals("loading"):
        signal.raise_signal(signal.SIGTERM)
    assert _handlers() == before


@pytest.mark.parametrize("block", ["stop", "quit"])
def test_a_signal_between_two_installs_leaves_no_handler_behind(block, monkeypatch) -> None:
    before, install = _handlers(), signal.signal
    calls = []

    def lands_on_the_second(signum, handler):
        calls.append(signum)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as the first signal's handler would, quitting
        return install(signum, handler)

    monkeypatch.setattr(signal, "signal", lands_on_the_second)
    guard = signals.stop_on_signals() if block == "stop" else signals.quit_on_signals("loading")
    with pytest.raises(KeyboardInterrupt), guard:
        pass
    monkeypatch.undo()
    # Two installs tried, and both handlers put back: the second's previous one was noted
    # before its install, which the stop broke off.
    assert len(calls) == 4 and _handlers() == before


def test_a_signal_the_process_ignores_stays_ignored() -> None:
    # As a shell starts a background job: a Ctrl-C meant for the foreground must not stop it.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with signals.stop_on_signals() as stop:
            signal.raise_signal(signal.SIGINT)
            assert not stop.requested
            signal.raise_signal(signal.SIGTERM)
        assert stop.name == "SIGTERM"
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_resume_of_moved_data_is_told_and_its_stop_says_the_new_root(
    tmp_path: Path, monkeypatch
) -> None:
    """config.json keeps the data root the run began with: a resume that cannot read the data
    there was told only to put the files back or download them, and a resume given the new
    root by --data-dir, once stopped, suggested a command without it, which then failed."""
    write_idx_dataset(tmp_path / "old" / "mnist", n_train=64, n_test=16)
    config = tiny_config(tmp_path, arch="dense", epochs=1, data_dir=str(tmp_path / "old"))
    run = train(config, progress=False).dir
    (tmp_path / "old").rename(tmp_path / "new")
    with pytest.raises(BrainPropError) as info:
        train(TrainConfig(epochs=2), resume=run, progress=False)
    assert str(info.value).endswith(
        f"; if the data has moved since the run began: 'brainprop train --resume {run} "
        "--data-dir NEW_ROOT'"
    )
    inject(monkeypatch, {1: _raise(signal.SIGTERM)})  # the resume's first step
    with pytest.raises(Interrupted) as info:
        train(TrainConfig(epochs=2), resume=run, data_dir=tmp_path / "new", progress=False)
    assert str(info.value).endswith(
        f"continue with 'brainprop train --resume {run} --data-dir {tmp_path / 'new'}'"
    )
    monkeypatch.undo()
    resumed = train(None, resume=run, data_dir=tmp_path / "new", progress=False)
    assert resumed.summary["epochs_run"] == 2


def test_more_epochs_for_a_run_that_stopped_early_are_refused(tmp_path: Path, ds) -> None:
    """Its spent patience ended it again at once, under the raised cap now in its config.json,
    with no word that the epochs asked for would never train (review)."""
    config = tiny_config(tmp_path, epochs=5, patience=1, min_delta=0.99)
    run = train(config, dataset=ds, progress=False)
    assert run.summary["stop_reason"] == "early stopping"
    stored = (run.dir / "config.json").read_text()
    summary = (run.dir / "summary.json").read_text()
    with pytest.raises(BrainPropError) as info:
        train(TrainConfig(epochs=10), resume=run.dir, dataset=ds, progress=False)
    assert str(info.value) == (
        f"{run.dir} stopped early (no gain of --min-delta 0.99 in --patience 1 epochs), so "
        "--epochs 10 would not train it further: start a new run, with a larger --patience to "
        "train longer"
    )
    assert (run.dir / "config.json").read_text() == stored
    assert (run.dir / "summary.json").read_text() == summary
    again = train(None, resume=run.dir, dataset=ds, progress=False)
    assert again.summary["stop_reason"] == "early stopping"


def test_epochs_lowered_to_those_run_close_a_stopped_run(tmp_path: Path, ds, monkeypatch) -> None:
    """Only early stopping is refused new epochs: a run stopped at epoch 2 of 5 and given
    --epochs 2 ends there, as it did before the refusal came (review)."""
    inject(monkeypatch, {step(3, 1): _raise(signal.SIGTERM)})
    with pytest.raises(Interrupted):
        train(tiny_config(tmp_path, epochs=5, patience=50), dataset=ds, progress=False)
    monkeypatch.undo()
    run = train(TrainConfig(epochs=2), resume=tmp_path / "run", dataset=ds, progress=False)
    assert (run.summary["stop_reason"], run.summary["epochs_run"]) == ("max epochs", 2)


def test_a_run_records_the_software_it_started_with(tmp_path: Path, ds, monkeypatch) -> None:
    """Read as the run ended, it named the files as edited while the run trained (a review)."""
    edited: list[bool] = []

    def files(device: torch.device) -> dict[str, str]:
        return {"brainprop_source": "edited" if edited else "as imported"}

    monkeypatch.setattr(train_module, "software", files)
    inject(monkeypatch, {1: lambda q: edited.append(True) or q})  # edited in the first step
    run = train(tiny_config(tmp_path, epochs=1), dataset=ds, progress=False)
    assert edited and run.summary["software"] == {"brainprop_source": "as imported"}


def test_a_resume_of_a_finished_run_keeps_the_machine_that_trained_it(tmp_path: Path, ds) -> None:
    """It trains nothing, yet its summary took this process's machine and threads for the
    timings of the sessions that trained it, and the report files runs by that label
    (review). A resume that trains on is this process's."""
    run = train(tiny_config(tmp_path, epochs=1), dataset=ds, progress=False).dir
    summary = json.loads((run / "summary.json").read_text())
    commit = devices.source_commit()
    assert summary["software"] == {
        "brainprop": brainprop_version,
        "brainprop_source": devices.source_digest(),
        **({} if commit is None else {"brainprop_commit": commit}),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    older = {"brainprop": "0.0.9", "torch": "2.11.0", "python": "3.12.1"}
    elsewhere = {**summary, "device": "cpu (elsewhere)", "world_size": 2, "software": older}
    (run / "summary.json").write_text(json.dumps(elsewhere))
    assert train(None, resume=run, dataset=ds, progress=False).summary == elsewhere
    assert json.loads((run / "summary.json").read_text()) == elsewhere
    longer = train(TrainConfig(epochs=2), resume=run, dataset=ds, progress=False).summary
    assert (longer["device"], longer["world_size"]) == (summary["device"], 1)
    assert longer["software"] == summary["software"]
