"""The matrix runner: plan and priority, budget, skip and resume, worker processes, and an
end-to-end ``brainprop reproduce`` on fixture files in the official formats."""

from __future__ import annotations

import collections
import copy
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from data_fixtures import write_cifar100, write_idx_dataset, write_tiny_imagenet
from measurement_fixtures import write_measurement
from memory_errors import CPU_ALLOCATOR, ENFORCED
from own_rules import FailsLater, SquaredError

from brainprop import (
    EBP,
    OBJECTIVES,
    devices,
    matrix,
    processes,
    report,
    rundir,
    sharing,
    signals,
)
from brainprop import experiments as ex
from brainprop.cli import main
from brainprop.errors import BrainPropError
from brainprop.experiments import Request, reproduce
from brainprop.feedback import PATHWAYS, Pathway
from brainprop.matrix import (
    HEADLINE,
    MATRIX,
    MAX_SEEDS,
    RUNS,
    Cell,
    RunSpec,
    plan,
    select_cells,
)
from brainprop.measurements import MEASUREMENTS, load_measurements, machine_slug, record
from brainprop.measurements import write_measurement as write_measurement_record
from brainprop.presets import PRESETS, Hyperparameters
from brainprop.report import README_END, README_START
from brainprop.resume import stored_config

# brainprop re-exports the function train, which hides the module of the same name.
train_module = importlib.import_module("brainprop.train")
DENSE, CONV = Cell("mnist", "dense"), Cell("mnist", "conv")


#: A session's digests of own code (experiments.OwnCode) where every rule is the library's.
NO_OWN_CODE = collections.defaultdict(dict)


def _dense_request(out, mnist_root, rules, **settings) -> Request:
    """A quiet request on the CPU for MNIST dense, one seed unless ``settings`` say otherwise."""
    base = dict(cells=(DENSE,), rules=rules, seeds=1, out=out, data_dir=str(mnist_root),
                device="cpu", progress=False)  # fmt: skip
    return Request(**{**base, **settings})


@pytest.fixture
def no_plots(monkeypatch):
    """Run plots cost seconds per fixture run and are not what these tests check."""
    monkeypatch.setattr(train_module, "plot_diagnostics", lambda *a, **k: None)
    monkeypatch.setattr(rundir, "write_plot", lambda *a, **k: None)


@pytest.fixture
def mnist_root(tmp_path):
    # As many training images as the paper's batch: a larger batch than that is refused.
    write_idx_dataset(tmp_path / "data" / "mnist", n_train=128)
    return tmp_path / "data"


def test_plan_puts_seed_zero_of_headline_cells_first():
    specs = plan(MATRIX, seeds=2)
    assert len(specs) == len(MATRIX) * 2 * 2
    first = [(s.cell, s.rule) for s in specs[: 2 * len(HEADLINE)]]
    assert first == [(c, r) for c in HEADLINE for r in ("brainprop", "ebp")]
    rest = [s.cell for s in specs[2 * len(HEADLINE) : 2 * len(MATRIX) : 2]]
    assert rest == [c for c in MATRIX if c not in HEADLINE]
    assert {s.seed for s in specs[: 2 * len(MATRIX)]} == {0}
    assert {s.seed for s in specs[2 * len(MATRIX) :]} == {1}


def test_a_cell_or_rule_given_twice_is_planned_once():
    """Planned twice, one run would be trained by two workers in one folder."""
    assert plan([DENSE, DENSE], ["ebp", "ebp"], 2) == plan([DENSE], ["ebp"], 2)


@pytest.mark.parametrize(
    ("cap", "message"),
    [(0, "--max-epochs must be >= 1, got 0"),
     # Trained, its measurements would be refused as they were read back (a review).
     (2**60, "--max-epochs must be at most 9007199254740992: no run takes that many")],
)  # fmt: skip
def test_an_epoch_cap_no_run_could_have_is_refused(cap, message):
    with pytest.raises(BrainPropError) as info:
        plan([DENSE], ["ebp"], 1, max_epochs=cap)
    assert str(info.value) == message


def test_run_names_are_deterministic_and_say_validation_and_cap():
    assert [s.name for s in plan([DENSE], ["ebp"], seeds=1)] == ["mnist-dense-ebp-s0"]
    [spec] = plan([Cell("cifar10", "deep")], ["brainprop"], 1, val=5000, max_epochs=2)
    assert spec.name == "cifar10-deep-brainprop-s0-val5000-e2"
    # The paper's own cap is the default, not a different experiment.
    assert plan([DENSE], ["ebp"], 1, max_epochs=500)[0].name == "mnist-dense-ebp-s0"
    [uncapped] = plan([DENSE], ["ebp"], 1)
    assert uncapped.config(Path("res"), None, "cpu").resolve().epochs == 500
    assert uncapped.identity()["epochs"] == 500
    config = spec.config(Path("res"), None, "cpu").resolve()
    assert (config.name, config.out_dir, config.epochs, config.val) == (
        spec.name, "res/runs", 2, 5000,
    )  # fmt: skip
    assert (config.lr, config.l2, config.batch_size) == (0.1, 5e-4, 128)  # the paper preset


def test_a_preset_other_than_the_papers_is_in_the_name_and_config_and_covers_its_cells():
    [spec] = plan([DENSE], ["brainprop"], 1, val=5000, preset="quickstart")
    assert spec.name == "mnist-dense-brainprop-s0-quickstart-val5000"
    config = spec.config(Path("res"), None, "cpu").resolve()
    assert (config.preset, config.lr, config.batch_size) == ("quickstart", 0.5, 64)
    with pytest.raises(BrainPropError, match="no settings for mnist/conv: run it with "
                       "--datasets mnist --archs dense"):  # fmt: skip
        plan([DENSE, Cell("mnist", "conv")], preset="quickstart")
    with pytest.raises(BrainPropError, match="unknown preset 'fast'"):
        plan([DENSE], preset="fast")


def test_a_preset_of_several_cells_advises_selections_that_hold_only_its_cells(monkeypatch):
    """--datasets mnist,cifar10 --archs dense,conv selects mnist/conv too, so that advice for
    a table of rows for mnist/dense and cifar10/conv sent the user round in a loop (review)."""
    monkeypatch.setitem(PRESETS, "own", {("mnist", "dense"): Hyperparameters(),
                                         ("cifar10", "conv"): Hyperparameters()})  # fmt: skip
    with pytest.raises(BrainPropError) as info:
        plan(select_cells(None, None), preset="own")
    advice = str(info.value).split("run it once per dataset: ")[1]
    assert advice == "--datasets mnist --archs dense; --datasets cifar10 --archs conv"
    for selection in advice.split("; "):
        _, datasets, _, archs = selection.split()
        assert plan(select_cells([datasets], [archs]), seeds=1, preset="own")


def test_a_preset_of_no_matrix_cell_says_that_reproduce_runs_the_papers_networks(monkeypatch):
    monkeypatch.setitem(PRESETS, "own", {("mnist", "small"): Hyperparameters()})
    with pytest.raises(
        BrainPropError,
        match=r"^preset 'own' has no row for a cell of the paper's matrix \(its rows: "
        r"mnist/small\): reproduce runs the paper's networks, 'brainprop train --preset' any",
    ):
        plan([DENSE], preset="own")


def test_a_feedback_pathway_other_than_the_papers_is_in_the_name_and_config():
    [spec] = plan([DENSE], ["ebp"], 1, val=5000, feedback="random")
    assert spec.name == "mnist-dense-ebp-s0-val5000-fb-random"
    assert spec.config(Path("res"), None, "cpu").feedback == "random"
    with pytest.raises(BrainPropError, match="^unknown feedback 'transpose': choose one of "):
        plan([DENSE], feedback="transpose")
    with pytest.raises(
        BrainPropError,
        match="^--stack trains seeds as one vmapped network, and --feedback random's autograd "
        "functions do not batch under vmap",
    ):
        Request(stack=2, feedback="random")


def test_a_run_through_another_pathway_is_estimated_from_runs_through_it_alone(tmp_path):
    for feedback, s in (("symmetric", 1.0), ("random", 3.0)):
        spec = RunSpec(DENSE, "ebp", 0, feedback=feedback)
        write_measurement(tmp_path, spec, "cpu", test_acc=0.9, epochs_run=10, s_per_epoch=s)
    measured = load_measurements(tmp_path)
    # 10 epochs of (s + 1 s of evaluation) each.
    later = {f: RunSpec(DENSE, "ebp", 1, feedback=f) for f in ("symmetric", "random", "sign")}
    assert ex.estimate_seconds(later["symmetric"], measured, "cpu", tmp_path) == 20
    assert ex.estimate_seconds(later["random"], measured, "cpu", tmp_path) == 40
    assert ex.estimate_seconds(later["sign"], measured, "cpu", tmp_path) is None


def test_a_feedback_request_trains_through_it_and_reports_apart(tmp_path, mnist_root, no_plots):
    args = ["reproduce", "--datasets", "mnist", "--archs", "dense", "--rules", "ebp", "--seeds",
            "1", "--max-epochs", "1", "--feedback", "sign", "--device", "cpu", "--quiet",
            "--out", str(tmp_path), "--data-dir", str(mnist_root)]  # fmt: skip
    assert main(args) == 0
    [m] = load_measurements(tmp_path)
    assert m.run == "mnist-dense-ebp-s0-e1-fb-sign" and m.feedback == "sign"
    assert rundir.read_json(tmp_path / RUNS / m.run / rundir.CONFIG)["feedback"] == "sign"
    assert "| MNIST dense, sign feedback | " in (tmp_path / "results.md").read_text()


def test_bf16_is_in_the_name_config_and_stacks_of_a_run():
    specs = plan([DENSE], ["brainprop"], 2, val=5000, bf16=True)
    assert [s.name for s in specs] == [
        "mnist-dense-brainprop-s0-val5000-bf16", "mnist-dense-brainprop-s1-val5000-bf16",
    ]  # fmt: skip
    assert specs[0].config(Path("res"), None, "cpu").bf16
    assert not plan([DENSE], ["brainprop"], 1)[0].config(Path("res"), None, "cpu").bf16
    assert ex.stacks(specs + plan([DENSE], ["brainprop"], 1, val=5000), 4) == [
        tuple(specs), (RunSpec(DENSE, "brainprop", 0, val=5000),),
    ]  # fmt: skip


def test_cells_filter_and_reject_what_is_not_in_the_matrix():
    assert select_cells(["mnist"], None) == [c for c in MATRIX if c.dataset == "mnist"]
    assert select_cells(None, ["deep"]) == [c for c in MATRIX if c.arch == "deep"]
    for datasets, archs, message in (
        (["fashion-mnist"], None, "not in the paper's matrix"),
        (["mnist"], ["deep"], "no matrix cell"),
        (None, ["resnet"], "arch 'resnet'"),
    ):
        with pytest.raises(BrainPropError, match=message):
            select_cells(datasets, archs)
    with pytest.raises(
        BrainPropError,
        match="^unknown rule 'feedback-alignment': choose one of brainprop, ebp; a name of your "
        "own is known once its code has run: import it first, or give its module to the "
        "command with 'brainprop --plugin MODULE'$",
    ):
        plan(MATRIX, ["feedback-alignment"])


def test_a_rule_of_ones_own_joins_the_plan_after_the_papers_rules(monkeypatch):
    """Each seed of a cell runs BrainProp and EBP first, then the others in the order given:
    every pair a finished seed gives includes EBP, the rule each is compared with."""
    objectives = copy.copy(OBJECTIVES)
    for name in ("mine", "theirs"):
        objectives[name] = lambda epsilon, fused: EBP()
    monkeypatch.setattr(matrix, "OBJECTIVES", objectives)
    specs = plan([DENSE], ["theirs", "ebp", "mine", "brainprop"], seeds=2)
    assert [(s.rule, s.seed) for s in specs] == [
        (r, seed) for seed in (0, 1) for r in ("brainprop", "ebp", "theirs", "mine")
    ]
    assert specs[2].name == "mnist-dense-theirs-s0"


def test_estimates_use_this_machine_and_subtract_epochs_done(tmp_path):
    bp, ebp = RunSpec(DENSE, "brainprop", 0), RunSpec(DENSE, "ebp", 0)
    write_measurement(tmp_path, bp, "cpu A", test_acc=0.9, best_epoch=5, epochs_run=50,
                      s_per_epoch=3.0)  # fmt: skip
    later = RunSpec(DENSE, "brainprop", 1)
    # 50 epochs x (3 s training + 1 s evaluation).
    assert ex.estimate_seconds(later, load_measurements(tmp_path), "cpu A", tmp_path) == 200
    # EBP, with no run of its own, borrows BrainProp's seconds per epoch and its epochs: the
    # cap (500 epochs, 2000 s) would keep a budget from ever admitting it after BrainProp.
    assert ex.estimate_seconds(ebp, load_measurements(tmp_path), "cpu A", tmp_path) == 200
    write_measurement(tmp_path, RunSpec(DENSE, "ebp", 1), "cpu A", test_acc=0.9, best_epoch=5,
                      epochs_run=20, s_per_epoch=3.0)  # fmt: skip
    assert ex.estimate_seconds(ebp, load_measurements(tmp_path), "cpu A", tmp_path) == 80
    assert ex.estimate_seconds(later, load_measurements(tmp_path), "cpu B", tmp_path) is None
    run_dir = tmp_path / RUNS / later.name
    run_dir.mkdir(parents=True)
    (run_dir / rundir.HISTORY_JSON).write_text(json.dumps([{}] * 20))
    assert ex.estimate_seconds(later, load_measurements(tmp_path), "cpu A", tmp_path) == 120
    # A damaged history counts no epochs done; it had no len() (review).
    (run_dir / rundir.HISTORY_JSON).write_text("null")
    assert ex.estimate_seconds(later, load_measurements(tmp_path), "cpu A", tmp_path) == 200
    (run_dir / rundir.HISTORY_JSON).write_text(json.dumps([{}] * 20))
    # Runs that shared the device time only runs shared alike; a stacked run's seconds are its
    # share, so a stack of 4 takes 4 shares: 10 epochs x 4 x (9 + 1) s.
    write_measurement(tmp_path, RunSpec(CONV, "brainprop", 0), "gpu", test_acc=0.9,
                      epochs_run=10, s_per_epoch=9.0, stack=4)  # fmt: skip
    conv = RunSpec(CONV, "brainprop", 1)
    measurements = load_measurements(tmp_path)
    assert ex.estimate_seconds(conv, measurements, "gpu", tmp_path) is None
    assert ex.estimate_seconds(conv, measurements, "gpu", tmp_path, stack=4) == 400
    # With the wall time recorded (a seed that outlived its stack-mates ran its last epochs
    # faster, alone), the estimate takes that, not its share times the stack's size.
    [stacked] = [m for m in measurements if m.stack == 4]
    d = json.loads(stacked.path.read_text())
    d["summary"]["wall_seconds"] = 120.0
    stacked.path.write_text(json.dumps(d))
    measurements = load_measurements(tmp_path)
    assert ex.estimate_seconds(conv, measurements, "gpu", tmp_path, stack=4) == 120
    # A stack trains until its longest seed stops: a seed measured at 30 epochs beside the
    # one at 10 makes a lone run 20 epochs long, a stack's runs 30 (a review: the mean let a
    # budget admit a stack that then ran half as long again).
    write_measurement(tmp_path, RunSpec(CONV, "brainprop", 2), "gpu", test_acc=0.9,
                      epochs_run=30, s_per_epoch=4.0)  # fmt: skip
    measurements = load_measurements(tmp_path)
    assert ex.estimate_seconds(conv, measurements, "gpu", tmp_path) == 20 * (4 + 1)
    assert ex.estimate_seconds(conv, measurements, "gpu", tmp_path, stack=4) == 30 * 12
    [longer] = [m for m in measurements if m.cell == CONV and m.seed == 2]
    longer.path.unlink()
    # bf16 runs time only bf16 runs: 30 epochs x (2 + 1) s.
    write_measurement(tmp_path, RunSpec(CONV, "ebp", 0, bf16=True), "gpu", test_acc=0.9,
                      epochs_run=30, s_per_epoch=2.0)  # fmt: skip
    measurements = load_measurements(tmp_path)
    assert ex.estimate_seconds(RunSpec(CONV, "ebp", 1), measurements, "gpu", tmp_path) is None
    fast = RunSpec(CONV, "ebp", 1, bf16=True)
    assert ex.estimate_seconds(fast, measurements, "gpu, bf16", tmp_path) == 90
    # The expected epochs also come from runs of the same precision where there are some: an
    # fp32 run of 60 epochs leaves the bf16 estimate at 30 epochs, and is the fp32 one's.
    write_measurement(tmp_path, RunSpec(CONV, "ebp", 2), "gpu", test_acc=0.9, epochs_run=60,
                      s_per_epoch=4.0)  # fmt: skip
    measurements = load_measurements(tmp_path)
    assert ex.estimate_seconds(fast, measurements, "gpu, bf16", tmp_path) == 90
    assert ex.estimate_seconds(RunSpec(CONV, "ebp", 1), measurements, "gpu", tmp_path) == 300
    # A run measured twice, plain and graphed, is one run of its cell: (60 + 30) / 2 epochs.
    write_measurement(tmp_path, RunSpec(CONV, "ebp", 2), "gpu", test_acc=0.9, epochs_run=60,
                      s_per_epoch=4.0, cuda_graph=True)  # fmt: skip
    write_measurement(tmp_path, RunSpec(CONV, "ebp", 3), "gpu", test_acc=0.9, epochs_run=30,
                      s_per_epoch=4.0)  # fmt: skip
    measurements = load_measurements(tmp_path)
    assert ex.estimate_seconds(RunSpec(CONV, "ebp", 4), measurements, "gpu", tmp_path) == 225


def test_a_run_whose_convolutions_took_tf32_times_the_next_on_its_machine(tmp_path):
    """A request cannot know whether a network's convolutions take TF32 before it builds it;
    its machine's runs in TF32 still estimate it, and record apart."""
    m = write_measurement(tmp_path, RunSpec(CONV, "brainprop", 0), "gpu", test_acc=0.9,
                          epochs_run=10, s_per_epoch=5.0)  # fmt: skip
    d = json.loads(m.path.read_text())
    d["summary"]["tf32"] = ["convolutions"]
    m.path.unlink()
    write_measurement_record(replace(m, summary=d["summary"]), {}, {}, tmp_path)
    [back] = load_measurements(tmp_path)
    assert back.setup == "gpu, TF32 convolutions" and back.path.name.endswith(
        "@gpu-tf32-convolutions.json"
    )
    # 10 epochs x (5 + 1) s.
    assert ex.estimate_seconds(RunSpec(CONV, "brainprop", 1), [back], "gpu", tmp_path) == 60


def test_estimates_scale_runs_that_shared_the_device_otherwise(tmp_path):
    """A run records how many ran beside it on average, so a budget for 3 at once finds runs of
    2 or 4: each run's device time (its wall time over its sharing) times the new sharing."""
    conv = RunSpec(CONV, "brainprop", 9)
    write_measurement(tmp_path, RunSpec(CONV, "brainprop", 0), "gpu", test_acc=0.9,
                      epochs_run=10, s_per_epoch=5.0, at_once=2)  # fmt: skip
    measurements = load_measurements(tmp_path)
    # 10 epochs x (5 + 1) s of wall time shared by 2: 30 s of device time, 90 s for 3 at once.
    assert ex.estimate_seconds(conv, measurements, "gpu", tmp_path, at_once=3) == 90
    assert ex.estimate_seconds(conv, measurements, "gpu", tmp_path, at_once=2) == 60
    # A run shared exactly as asked wins over one that needs scaling.
    write_measurement(tmp_path, RunSpec(CONV, "brainprop", 1), "gpu", test_acc=0.9,
                      epochs_run=10, s_per_epoch=11.0, at_once=3)  # fmt: skip
    measurements = load_measurements(tmp_path)
    assert ex.estimate_seconds(conv, measurements, "gpu", tmp_path, at_once=3) == 120
    # Stacks are not scaled: a stack's step is another kernel, not a share of the device.
    assert ex.estimate_seconds(conv, measurements, "gpu", tmp_path, stack=2) is None


def _fake_train(calls):
    """Stand-in for training one job: writes what finished run directories hold."""

    def run(job, request, dataset):
        for spec in job:
            calls.append(spec.name)
            run_dir = request.out / RUNS / spec.name
            run_dir.mkdir(parents=True, exist_ok=True)  # a run resumed is there
            config = spec.config(request.out, request.data_dir, request.device).resolve()
            (run_dir / rundir.CONFIG).write_text(json.dumps(config.to_dict()))
            (run_dir / rundir.HISTORY_JSON).write_text("[]")
            summary = {"device": ex.this_machine(request.device), "epochs_run": 1,
                       "best_val_acc": 0.5, "best_epoch": 1, "test_acc_at_best": 0.5,
                       "s_per_epoch": 99.0, "total_seconds": 100.0,
                       "stop_reason": "max epochs"}  # fmt: skip
            (run_dir / rundir.SUMMARY).write_text(json.dumps(summary))

    return run


def test_budget_passes_over_runs_whose_estimate_does_not_fit(tmp_path, mnist_root, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(ex, "_train", _fake_train(calls))
    monkeypatch.setattr(ex.time, "monotonic", lambda: 0.0)  # a stalled machine uses no budget
    here = ex.this_machine("cpu")
    conv, loccon = Cell("mnist", "conv"), Cell("mnist", "loccon")
    # Measured seed 0: conv costs 10 x 3 s per run, loccon 500 x 3 s (more than a minute).
    for cell, epochs in ((conv, 10), (loccon, 500)):
        write_measurement(tmp_path, RunSpec(cell, "brainprop", 0), here, test_acc=0.5,
                          epochs_run=epochs, s_per_epoch=2.0)  # fmt: skip
    request = Request(
        cells=(DENSE, loccon, conv), rules=("brainprop",), seeds=2, out=tmp_path,
        data_dir=str(mnist_root), device="cpu", budget_minutes=1.0, progress=False,
    )  # fmt: skip
    outcome = reproduce(request, say=lambda _: None)
    # Seed 0 of conv and loccon is measured; dense has no estimate, so it runs to provide one.
    assert outcome.skipped == ["mnist-conv-brainprop-s0", "mnist-loccon-brainprop-s0"]
    assert calls == ["mnist-dense-brainprop-s0", "mnist-conv-brainprop-s1"]
    assert outcome.ran == calls
    # dense seed 1 now has an estimate (seed 0 took 100 s), over the minute like loccon's.
    assert outcome.over_budget == ["mnist-dense-brainprop-s1", "mnist-loccon-brainprop-s1"]


def test_a_measurement_half_copied_in_while_runs_train_does_not_stop_them(
    tmp_path, mnist_root, monkeypatch
):
    # Each admission under a budget read every file again, and the copy's first bytes ended
    # the session, stopping its workers.
    merged = tmp_path / "elsewhere"
    whole = write_measurement(merged, RunSpec(CONV, "ebp", 0), "gpu", test_acc=0.5).path
    calls: list[str] = []
    train_one = _fake_train(calls)

    def train_while_copying(job, request, dataset):
        train_one(job, request, dataset)
        copy = tmp_path / "measurements" / whole.name
        copy.parent.mkdir(exist_ok=True)
        copy.write_bytes(whole.read_bytes()[: 50 if len(calls) == 1 else None])

    monkeypatch.setattr(ex, "_train", train_while_copying)
    request = _dense_request(tmp_path, mnist_root, ("brainprop",), seeds=2, budget_minutes=60.0)
    outcome = reproduce(request, say=lambda _: None)
    assert outcome.ran == calls == ["mnist-dense-brainprop-s0", "mnist-dense-brainprop-s1"]
    assert len(load_measurements(tmp_path)) == 3


@pytest.mark.parametrize("minutes", [0.001, 1e-300])
def test_any_budget_starts_the_first_run_of_unknown_time_and_says_what_it_passes_over(
    tmp_path, mnist_root, monkeypatch, minutes
):
    """A deadline of "now + budget" lost 1e-300 minutes to float rounding, so 0.001 started a
    run of unknown time that 1e-300 passed over; the clock now starts at the first run."""
    calls: list[str] = []
    monkeypatch.setattr(ex, "_train", _fake_train(calls))
    # Planning and the first run take longer than either budget.
    clock = iter(range(0, 10**6, 60))
    monkeypatch.setattr(ex.time, "monotonic", lambda: next(clock))
    request = Request(
        cells=(DENSE, CONV), rules=("brainprop",), seeds=1, out=tmp_path,
        data_dir=str(mnist_root), device="cpu", budget_minutes=minutes, progress=False,
    )  # fmt: skip
    lines: list[str] = []
    outcome = reproduce(request, say=lines.append)
    assert outcome.ran == ["mnist-conv-brainprop-s0"]
    assert outcome.over_budget == ["mnist-dense-brainprop-s0"]
    assert (
        "over budget: mnist-dense-brainprop-s0 needs an unknown time (no run like it measured on "
        "this machine yet), none left"
    ) in lines


def test_an_out_folder_that_cannot_be_written_fails_before_any_run(tmp_path, mnist_root, capsys):
    taken = tmp_path / "a-file"
    taken.write_text("")
    status = main(["reproduce", "--datasets", "mnist", "--archs", "dense", "--seeds", "1",
                   "--max-epochs", "1", "--device", "cpu", "--out", str(taken),
                   "--data-dir", str(mnist_root)])  # fmt: skip
    captured = capsys.readouterr()
    assert status == 2 and "run " not in captured.out
    assert captured.err == (
        f"brainprop: error: cannot write runs under {taken} (Not a directory): pass a writable "
        "--out folder\n"
    )


def test_a_second_session_on_the_same_folder_is_refused(tmp_path, mnist_root, monkeypatch):
    from brainprop import locks

    calls: list[str] = []
    monkeypatch.setattr(ex, "_train", _fake_train(calls))
    request = _dense_request(tmp_path / "r", mnist_root, ("ebp",))
    (tmp_path / "r").mkdir()
    first = locks.held(tmp_path / "r", "held by the first session")
    with first, pytest.raises(BrainPropError) as info:
        reproduce(request, say=lambda _: None)
    assert str(info.value) == (
        f"{tmp_path / 'r'} is in use by another 'brainprop reproduce': wait for it to end, or "
        "give this one another --out and copy its measurements/ in afterwards"
    )
    assert calls == []
    reproduce(request, say=lambda _: None)  # the folder is free once the first one ends
    assert calls == ["mnist-dense-ebp-s0"]


def test_a_session_holds_the_folder_it_made(tmp_path, mnist_root, monkeypatch):
    from brainprop import locks

    out = tmp_path / "new"
    tried: list[str] = []

    def train_while_another_starts(job, request, dataset):
        # As a second session would try to hold it: the folder did not exist when this began.
        with pytest.raises(BrainPropError, match="held already"), locks.held(out, "held already"):
            pass
        tried.append(job[0].name)
        _fake_train([])(job, request, dataset)

    monkeypatch.setattr(ex, "_train", train_while_another_starts)
    request = _dense_request(out, mnist_root, ("ebp",))
    reproduce(request, say=lambda _: None)
    assert tried == ["mnist-dense-ebp-s0"]


def test_a_session_on_a_new_folder_takes_in_what_another_ran_there_while_it_checked(
    tmp_path, mnist_root, monkeypatch
):
    """A folder that did not exist was scanned before it was held: a session that made it and
    ran meanwhile left runs this one would train again, over their measurements (review)."""
    calls: list[str] = []
    monkeypatch.setattr(ex, "_train", _fake_train(calls))
    request = _dense_request(tmp_path / "new", mnist_root, ("ebp",))
    checked = ex._check_data

    def check_while_another_runs(pending, data_dir):
        checked(pending, data_dir)
        monkeypatch.setattr(ex, "_check_data", checked)
        assert reproduce(request, say=lambda _: None).ran == ["mnist-dense-ebp-s0"]

    monkeypatch.setattr(ex, "_check_data", check_while_another_runs)
    outcome = reproduce(request, say=lambda _: None)
    assert calls == ["mnist-dense-ebp-s0"]
    assert outcome.ran == [] and outcome.skipped == ["mnist-dense-ebp-s0"]


@pytest.mark.parametrize("every_s, expected", [(0.0, [0, 1, 2, 3]), (3600.0, [0, 1, 1, 1])])
def test_the_report_is_rewritten_as_runs_are_recorded_at_most_so_often(
    tmp_path, mnist_root, monkeypatch, every_s, expected
):
    """A session killed outright (SIGKILL) left the report of the session before (review);
    a report costs about a second of CPU with a few hundred measurements, so not every run's
    end writes one."""
    monkeypatch.setattr(ex._Recorder, "REPORT_EVERY_S", every_s)
    calls: list[str] = []
    train_one = _fake_train(calls)
    reported: list[int] = []

    def train_reading_the_report(job, request, dataset):
        results = tmp_path / "results.json"
        reported.append(json.loads(results.read_text())["measurements"] if calls else 0)
        train_one(job, request, dataset)

    monkeypatch.setattr(ex, "_train", train_reading_the_report)
    request = Request(cells=(DENSE, CONV), rules=("brainprop",), seeds=2, out=tmp_path,
                      data_dir=str(mnist_root), device="cpu", progress=False)  # fmt: skip
    reproduce(request, say=lambda _: None)
    assert reported == expected
    # The session's end writes it whatever the last run's end skipped.
    assert json.loads((tmp_path / "results.json").read_text())["measurements"] == 4


def test_a_report_that_fails_while_runs_go_on_is_said_and_they_go_on(
    tmp_path, mnist_root, monkeypatch
):
    """The report rewritten as runs end is a courtesy: its failure, of any kind, must not stop
    the runs, and the session's own report at its end still fails as it always did."""

    def no_report(out):
        raise RuntimeError("matplotlib broke")

    calls: list[str] = []
    monkeypatch.setattr(ex, "_train", _fake_train(calls))
    monkeypatch.setattr(report, "write_report", no_report)
    monkeypatch.setattr(ex._Recorder, "REPORT_EVERY_S", 0.0)
    request = _dense_request(tmp_path, mnist_root, ("brainprop", "ebp"))
    lines: list[str] = []
    with pytest.raises(RuntimeError, match="matplotlib broke"):  # the session's own report
        reproduce(request, say=lines.append)
    assert calls == ["mnist-dense-brainprop-s0", "mnist-dense-ebp-s0"]
    assert lines.count("report not rewritten yet: RuntimeError: matplotlib broke") == 2


def test_a_run_finished_here_is_recorded_though_another_machine_measured_it(
    tmp_path, mnist_root, monkeypatch
):
    """A measurement of the same run merged in from another machine left this machine's
    finished run unrecorded for good, its result only in a run directory (review)."""
    spec = RunSpec(DENSE, "ebp", 0)
    request = _dense_request(tmp_path, mnist_root, ("ebp",))
    _fake_train([])((spec,), request, None)  # finished, stopped before it was recorded
    write_measurement(tmp_path, spec, "NVIDIA H200", test_acc=0.9)
    calls: list[str] = []
    monkeypatch.setattr(ex, "_train", _fake_train(calls))
    outcome = reproduce(request, say=lambda _: None)
    assert calls == [] and outcome.skipped == [spec.name]
    machines = sorted(m.machine for m in load_measurements(tmp_path))
    assert machines == sorted(["NVIDIA H200", ex.this_machine("cpu")])
    stamps = [m.path.stat().st_mtime_ns for m in load_measurements(tmp_path)]
    reproduce(request, say=lambda _: None)
    assert [m.path.stat().st_mtime_ns for m in load_measurements(tmp_path)] == stamps


def test_a_run_finished_here_is_recorded_beside_its_graphed_measurement_on_the_same_label(
    tmp_path, mnist_root
):
    """Labels name a GPU's model, so another host's graphed run of the same name carries this
    machine's label: a setup of its own all the same (review)."""
    spec = RunSpec(DENSE, "ebp", 0)
    request = _dense_request(tmp_path, mnist_root, ("ebp",))
    _fake_train([])((spec,), request, None)
    here = ex.this_machine("cpu")
    write_measurement(tmp_path, spec, here, test_acc=0.9, cuda_graph=True)
    reproduce(request, say=lambda _: None)
    graphs = sorted(m.cuda_graph for m in load_measurements(tmp_path))
    assert graphs == [False, True]


def test_a_damaged_run_here_of_a_run_measured_elsewhere_is_said_and_skipped(
    tmp_path, mnist_root, monkeypatch
):
    """Recording it beside the other machine's measurement failed the whole session, where it
    had been skipped (review): the name is measured, so nothing would train it again."""
    spec = RunSpec(DENSE, "ebp", 0)
    request = _dense_request(tmp_path, mnist_root, ("ebp",))
    _fake_train([])((spec,), request, None)
    history = tmp_path / RUNS / spec.name / rundir.HISTORY_JSON
    history.write_text("{")
    write_measurement(tmp_path, spec, "NVIDIA H200", test_acc=0.9)
    lines: list[str] = []
    outcome = reproduce(request, say=lines.append)
    assert outcome.skipped == [spec.name] and outcome.ran == []
    assert [m.machine for m in load_measurements(tmp_path)] == ["NVIDIA H200"]
    assert lines[0] == (
        f"{spec.name} is measured in another setup, so it is skipped; its run here is not "
        f"recorded: {history} is not valid JSON: move {history.parent} out of "
        f"{history.parent.parent} to train that run afresh, once the other setup's measurement "
        f"is moved out of {tmp_path / 'measurements'}"
    )


def test_a_summary_too_deep_for_python_of_a_run_measured_elsewhere_is_said_and_skipped(
    tmp_path, mnist_root
):
    """Read with json.loads alone, it raised RecursionError from the check of whether it was
    recorded, a traceback; the run directory's own reader names it."""
    spec = RunSpec(DENSE, "ebp", 0)
    request = _dense_request(tmp_path, mnist_root, ("ebp",))
    _fake_train([])((spec,), request, None)
    summary = tmp_path / RUNS / spec.name / rundir.SUMMARY
    summary.write_text("[" * 100_000 + "]" * 100_000)
    write_measurement(tmp_path, spec, "NVIDIA H200", test_acc=0.9)
    lines: list[str] = []
    assert reproduce(request, say=lines.append).skipped == [spec.name]
    assert f"{summary} is not JSON brainprop can read" in lines[0]


def test_a_stop_in_a_runs_last_step_records_it_in_one_process(tmp_path, mnist_root, monkeypatch):
    """With --jobs 1 a run that ended as the stop came read as unfinished and went unrecorded
    (review); --jobs N recorded it."""
    train_one = _fake_train([])

    def train_then_stop(job, request, dataset):
        train_one(job, request, dataset)
        raise signals.Interrupted("stopped by SIGTERM after the last epoch", signal.SIGTERM)

    monkeypatch.setattr(ex, "_train", train_then_stop)
    request = _dense_request(tmp_path, mnist_root, ("ebp",))
    with pytest.raises(signals.Interrupted, match="SIGTERM; no run was in progress") as info:
        reproduce(request, say=lambda _: None)
    assert info.value.exit_status == 128 + signal.SIGTERM
    assert [m.run for m in load_measurements(tmp_path)] == ["mnist-dense-ebp-s0"]


def test_a_stop_records_the_runs_of_a_stack_that_ended_and_names_the_others(
    tmp_path, mnist_root, monkeypatch
):
    """A run that ended in a stack whose other runs had not was left unrecorded and said to
    have kept its progress (review)."""
    first, second = plan([DENSE], ["ebp"], 2)
    train_one = _fake_train([])

    def one_ends_then_stop(job, request, dataset):
        train_one(job[:1], request, dataset)
        raise signals.Interrupted("stopped by SIGTERM", signal.SIGTERM)

    monkeypatch.setattr(ex, "_train", one_ends_then_stop)
    request = Request(out=tmp_path, data_dir=str(mnist_root), device="cpu", progress=False)
    outcome = ex.Outcome()
    with pytest.raises(signals.Interrupted) as info:
        ex._run_in_process(request, [(first, second)], [], outcome, lambda _: None)
    assert str(info.value) == (
        f"stopped by SIGTERM; {second.name} had no checkpoint yet: run the same 'brainprop "
        "reproduce' command to continue"
    )
    assert outcome.ran == [first.name]
    assert [m.run for m in load_measurements(tmp_path)] == [first.name]


def test_a_stop_with_a_run_that_cannot_be_recorded_stops_in_one_process_too(
    tmp_path, mnist_root, monkeypatch
):
    """With --jobs 1 a run of the stopped stack that could not be recorded replaced the stop
    with its error (exit status 2, the runs that kept their progress unsaid), where --jobs N
    said it and stopped (review)."""
    damaged, ended, kept = plan([DENSE], ["ebp"], 3)
    train_two = _fake_train([])

    def two_end_then_stop(job, request, dataset):
        train_two(job[:2], request, dataset)
        (request.out / RUNS / damaged.name / rundir.SUMMARY).write_text("{")
        (request.out / RUNS / kept.name).mkdir(parents=True)
        (request.out / RUNS / kept.name / rundir.LAST).write_bytes(b"a checkpoint")
        raise signals.Interrupted("stopped by SIGINT", signal.SIGINT)

    monkeypatch.setattr(ex, "_train", two_end_then_stop)
    monkeypatch.setattr(ex._Recorder, "REPORT_EVERY_S", math.inf)
    request = Request(out=tmp_path, data_dir=str(mnist_root), device="cpu", progress=False)
    outcome, lines = ex.Outcome(), []
    with pytest.raises(signals.Interrupted) as info:
        ex._run_in_process(request, [(damaged, ended, kept)], [], outcome, lines.append)
    assert info.value.exit_status == 128 + signal.SIGINT
    assert str(info.value) == (
        f"stopped by SIGINT; {kept.name} kept its progress: run the same 'brainprop "
        "reproduce' command to continue"
    )
    summary = tmp_path / RUNS / damaged.name / rundir.SUMMARY
    assert lines[-1] == (
        f"not recorded: {summary} is not valid JSON: delete it, and the same command closes "
        "the run again"
    )
    assert outcome.ran == [ended.name]


def test_a_run_that_cannot_be_recorded_leaves_its_stack_mates_recorded(tmp_path, monkeypatch):
    """Recording stopped at the first run of a stack it could not record, leaving the later
    ones that had ended unrecorded (review): each is recorded, then the first error raised."""
    monkeypatch.setattr(ex._Recorder, "REPORT_EVERY_S", math.inf)
    damaged, ended, also = plan([DENSE], ["ebp"], 3)
    _fake_train([])((damaged, ended, also), Request(out=tmp_path, device="cpu"), None)
    summary = tmp_path / RUNS / damaged.name / rundir.SUMMARY
    summary.write_text("{")
    outcome = ex.Outcome()
    recorder = ex._Recorder(tmp_path, [], outcome, lambda _: None, NO_OWN_CODE)
    with pytest.raises(BrainPropError, match=f"^{re.escape(str(summary))} is not valid JSON"):
        recorder.record((damaged, ended, also))
    assert outcome.ran == [ended.name, also.name]
    assert sorted(m.run for m in load_measurements(tmp_path)) == [ended.name, also.name]


def test_a_stop_between_runs_in_one_process_ends_the_session_as_a_stop(
    tmp_path, mnist_root, monkeypatch
):
    """Outside a run's training, a SIGTERM killed a --jobs 1 session by its default action,
    with no word and no report (review)."""
    import brainprop.data

    loading = brainprop.data.load_dataset

    def load_then_stop(name, data_dir):
        dataset = loading(name, data_dir)
        os.kill(os.getpid(), signal.SIGTERM)
        return dataset

    monkeypatch.setattr(brainprop.data, "load_dataset", load_then_stop)
    monkeypatch.setattr(ex, "_train", _fake_train([]))
    request = _dense_request(tmp_path, mnist_root, ("ebp",))
    got: list[int] = []

    def mine(signum, _frame):
        got.append(signum)

    # Where the session sets no handler of its own, this one takes the signal and nothing
    # raises, instead of the default action killing the test run.
    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with pytest.raises(signals.Interrupted) as info:
            reproduce(request, say=lambda _: None)
        assert signal.getsignal(signal.SIGTERM) is mine  # put back as the session ends
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert str(info.value) == (
        "stopped by SIGTERM between runs: run the same 'brainprop reproduce' command to continue"
    )
    assert info.value.exit_status == 128 + signal.SIGTERM and got == []
    assert (tmp_path / "results.md").is_file()


def test_missing_dataset_fails_before_any_run(tmp_path, capsys):
    status = main(["reproduce", "--datasets", "cifar100", "--archs", "deep", "--out",
                   str(tmp_path / "r"), "--data-dir", str(tmp_path)])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "cifar100 is not in" in err
    assert not (tmp_path / "r" / RUNS).exists()


@pytest.mark.parametrize("val", [128, 1])
def test_a_val_split_leaving_less_than_a_batch_fails_before_any_run(tmp_path, mnist_root, capsys,
                                                                     val):  # fmt: skip
    out = tmp_path / "r"
    argv = ["reproduce", "--datasets", "mnist", "--archs", "dense", "--seeds", "1", "--val-split",
            str(val), "--out", str(out), "--data-dir", str(mnist_root), "--device",
            "cpu"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert (
        f"--val-split {val} would leave {128 - val} of the 128 mnist training images, fewer than "
        "a batch of 128: validate on the test set"
    ) in err
    assert not out.exists()


def test_a_data_dir_inside_the_data_root_is_told_the_root_before_any_run(tmp_path, mnist_root,
                                                                          capsys):  # fmt: skip
    inside = mnist_root / "mnist"
    argv = ["reproduce", "--datasets", "mnist", "--archs", "dense", "--seeds", "1", "--out",
            str(tmp_path / "r"), "--data-dir", str(inside), "--device", "cpu"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    # The root's own fix, with no "or pass --data-dir" after it to say the same again (review).
    assert err.count("\n") == 1 and err.rstrip().endswith(
        f"{inside} is a folder inside the data root: pass '--data-dir {mnist_root}' instead"
    )


def test_a_file_in_the_way_of_the_measurements_is_refused_before_any_run(tmp_path, mnist_root,
                                                                          monkeypatch):  # fmt: skip
    """It was found only as the first run's measurement was written, after it trained (review)."""
    calls: list[str] = []
    monkeypatch.setattr(ex, "_train", _fake_train(calls))
    (tmp_path / "measurements").write_text("")
    request = _dense_request(tmp_path, mnist_root, ("ebp",))
    with pytest.raises(BrainPropError, match=f"cannot create the folder {tmp_path / 'measurements'}"
                       " .*: move away what is at"):  # fmt: skip
        reproduce(request, say=lambda _: None)
    assert calls == []


def test_a_damaged_dataset_is_named_as_damaged_before_any_run(tmp_path, mnist_root, capsys):
    labels = mnist_root / "mnist" / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:-10])
    argv = ["reproduce", "--datasets", "mnist", "--archs", "dense", "--seeds", "1", "--out",
            str(tmp_path / "r"), "--data-dir", str(mnist_root), "--device", "cpu"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train-labels-idx1-ubyte" in err and "is not in" not in err


def test_a_session_ends_with_what_it_did_and_the_report_rows_of_its_runs(
    tmp_path, mnist_root, monkeypatch
):
    monkeypatch.setattr(ex, "_train", _fake_train([]))
    here = ex.this_machine("cpu")
    # Measured before: EBP seed 0, BrainProp seed 3 of the same row (which this request does
    # not ask for, yet its row shows, as the report does) and a cell of another request.
    write_measurement(tmp_path, RunSpec(DENSE, "ebp", 0), here, test_acc=0.9)
    write_measurement(tmp_path, RunSpec(DENSE, "brainprop", 3), here, test_acc=0.6)
    write_measurement(tmp_path, RunSpec(CONV, "ebp", 0), here, test_acc=0.99)
    request = Request(
        cells=(DENSE,), seeds=1, out=tmp_path, data_dir=str(mnist_root), device="cpu",
        progress=False,
    )  # fmt: skip
    lines: list[str] = []
    reproduce(request, say=lines.append)
    assert lines[-3:] == [
        "reproduce: 1 trained now, 1 measured before; the report's rows of these runs (every "
        "seed of each), test accuracy (%) at the best-validation epoch, mean (sd) over seeds:",
        f"  MNIST dense (test set; {here}): BrainProp 55.00 (7.07); EBP 90.00; 2 / 1 seeds; gap "
        "-35.00 pp, ≈ 0: – (needs 2+ seeds per rule); published 98.68 (0.07), within 2 sd: no",
        f"report: {tmp_path / report.RESULTS_MD}",
    ]
    lines.clear()
    # Seed 1 is estimated from seed 0's 100 s, over the budget's minute.
    reproduce(replace(request, seeds=2, budget_minutes=1.0), say=lines.append)
    assert lines[-3].startswith(
        "reproduce: 0 trained now, 2 measured before, 2 over the budget (the same command "
        "runs them later); the report's rows"
    )
    lines.clear()
    # Nothing of this request measured: no rows, and no heading for them.
    loccon = Cell("mnist", "loccon")
    write_measurement(tmp_path, RunSpec(loccon, "ebp", 0), here, test_acc=0.99, epochs_run=500)
    reproduce(replace(request, cells=(loccon,), rules=("brainprop",), budget_minutes=1.0),
              say=lines.append)  # fmt: skip
    assert lines[-2:] == [
        "reproduce: 0 trained now, 0 measured before, 1 over the budget (the same command runs "
        "them later)",
        f"report: {tmp_path / report.RESULTS_MD}",
    ]


def test_finished_runs_are_skipped_and_an_interrupted_run_resumes(tmp_path, mnist_root, no_plots):
    spec = RunSpec(DENSE, "brainprop", 0, max_epochs=2)
    out = tmp_path / "results"
    request = _dense_request(out, mnist_root, ("brainprop",), max_epochs=2)
    # A run stopped after its first epoch: last.pt holds epoch 1, config.json the run's 2
    # epochs, and there is no summary.
    config = spec.config(out, str(mnist_root), "cpu")
    first = train_module.train(replace(config, epochs=1), progress=False)
    (first.dir / rundir.SUMMARY).unlink()
    stored = json.loads((first.dir / rundir.CONFIG).read_text())
    (first.dir / rundir.CONFIG).write_text(json.dumps(stored | {"epochs": 2}))
    outcome = reproduce(request, say=lambda _: None)
    assert outcome.ran == [spec.name] and first.dir == out / RUNS / spec.name
    history = json.loads((first.dir / rundir.HISTORY_JSON).read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[0]["train_loss"] == first.history[0]["train_loss"]
    [m] = load_measurements(out)
    assert m.run == spec.name and m.summary["epochs_run"] == 2
    # The library's rule and pathway: the file holds no digests of one's own code.
    assert m.own_code is None and "own_code" not in json.loads(m.path.read_text())
    assert m.path.name == f"{spec.name}@{machine_slug(m.machine)}.json"
    stamp = m.path.stat().st_mtime_ns
    again = reproduce(request, say=lambda _: None)
    assert again.ran == [] and again.skipped == [spec.name]
    assert m.path.stat().st_mtime_ns == stamp


def test_a_rule_of_ones_own_that_fails_in_a_run_says_to_run_the_same_command_again(
    tmp_path, mnist_root, no_plots, monkeypatch
):
    """One step an epoch: the rule's second call is in epoch 2, after epoch 1's checkpoint,
    which the same command, the rule mended, resumes."""
    monkeypatch.setitem(OBJECTIVES, "later", lambda epsilon, fused: FailsLater(at=2))
    request = _dense_request(tmp_path, mnist_root, ("later",), max_epochs=2)
    said = (
        r"^rule 'later' failed in epoch 2: ZeroDivisionError: division by zero \(.+own_rules"
        r"\.py:\d+\): fix it, then run the same 'brainprop reproduce' command to continue$"
    )
    with pytest.raises(BrainPropError, match=said):
        reproduce(request, say=lambda _: None)
    monkeypatch.setitem(OBJECTIVES, "later", lambda epsilon, fused: SquaredError())
    assert reproduce(request, say=lambda _: None).ran == ["mnist-dense-later-s0-e2"]
    [m] = load_measurements(tmp_path)
    history = json.loads((tmp_path / RUNS / m.run / rundir.HISTORY_JSON).read_text())
    assert m.summary["epochs_run"] == 2 and len(history) == 2


#: A rule of one's own, "mine", in a plugin's file.
LAB = textwrap.dedent("""\
    from own_rules import SquaredError


    class Mine(SquaredError):
        scale = 1


    def make(epsilon, fused):
        return Mine()
""")


def _register_lab(monkeypatch, lab, text, name):
    """Write ``text`` as the file ``lab`` and register its rule as "mine", imported as the
    module ``name`` as a --plugin file is (into sys.modules)."""
    lab.write_text(text)
    spec = importlib.util.spec_from_file_location(name, lab)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    monkeypatch.setitem(OBJECTIVES, "mine", module.make)


def test_a_rule_of_ones_own_changed_since_its_runs_were_measured_is_refused(
    tmp_path, mnist_root, no_plots, monkeypatch
):
    """Known by its name alone, an edited rule's runs were skipped as measured, and the old
    code's numbers reported as the new's (review)."""
    lab, source = tmp_path / "lab.py", LAB

    def register(text, name):
        _register_lab(monkeypatch, lab, text, name)

    out = tmp_path / "results"
    request = _dense_request(out, mnist_root, ("mine",), max_epochs=1)
    register(source, "lab_first")
    edited = source.replace("class Mine", "class Another(SquaredError):\n    pass\n\n\nclass Mine")

    def edit(_):
        # Another rule added above it as the session goes on: its lines shift, its code not.
        lab.write_text(edited)

    reproduce(request, say=edit)
    [m] = load_measurements(out)
    assert list(m.own_code) == ["rule 'mine'"]
    register(edited, "lab_again")  # the same code, loaded anew by the next session
    assert reproduce(request, say=lambda _: None).skipped == [m.run]
    register(source.replace("scale = 1", "scale = 10"), "lab_changed")
    with pytest.raises(BrainPropError) as e:
        reproduce(request, say=lambda _: None)
    assert str(e.value) == (
        f"{m.path} measured rule 'mine' as other code than it is now: register the changed "
        f"code under a new name, or move the old code's measurements out of {out / MEASUREMENTS} "
        f"and its runs out of {out / RUNS} to measure it anew"
    )


def test_a_name_of_ones_own_for_the_librarys_rule_is_known_as_that_when_it_changes(
    tmp_path, mnist_root, no_plots, monkeypatch
):
    """Its measurement held no digests, as the library's rules' hold none, so the same name
    registered later for code of one's own reused the library rule's numbers (a review)."""
    monkeypatch.setitem(OBJECTIVES, "mine", OBJECTIVES["brainprop"])
    request = _dense_request(tmp_path, mnist_root, ("mine",), max_epochs=1)
    reproduce(request, say=lambda _: None)
    [m] = load_measurements(tmp_path)
    assert m.own_code == {} and json.loads(m.path.read_text())["own_code"] == {}
    _register_lab(monkeypatch, tmp_path / "lab.py", LAB, "lab_mine")
    with pytest.raises(BrainPropError, match=r"measured rule 'mine' as other code than it is now"):
        reproduce(request, say=lambda _: None)


def test_a_name_of_ones_own_for_a_librarys_pathway_is_known_as_that_when_it_changes(
    tmp_path, mnist_root, no_plots, monkeypatch
):
    """As a rule's: a pathway of one's own records its code, even where that is the library's,
    or a later change to the code under its name would reuse the old code's numbers."""
    monkeypatch.setitem(PATHWAYS, "mine", PATHWAYS["random"])
    request = _dense_request(tmp_path, mnist_root, ("ebp",), max_epochs=1, feedback="mine")
    reproduce(request, say=lambda _: None)
    [m] = load_measurements(tmp_path)
    assert m.own_code == {} and json.loads(m.path.read_text())["own_code"] == {}
    monkeypatch.setitem(PATHWAYS, "mine", Pathway(make=lambda layer, scale, g: None))
    with pytest.raises(BrainPropError, match=r"measured feedback 'mine' as other code than it"):
        reproduce(request, say=lambda _: None)


def test_a_worker_that_finds_its_rule_changed_since_the_session_began_refuses_to_train(
    tmp_path, monkeypatch
):
    """A worker imports the plugins anew: it trained the edited code, which the parent recorded
    under the digest the session began with, the old code's (review)."""
    lab = tmp_path / "lab.py"
    _register_lab(monkeypatch, lab, LAB, "lab_parent")
    request = Request(cells=(DENSE,), rules=("mine",), seeds=1, out=tmp_path)
    job = tuple(request.specs())
    assert request.own_code[job[0].rule_and_feedback]  # taken as the session began
    _register_lab(monkeypatch, lab, LAB, "lab_worker")  # the worker's import, nothing changed
    ex._check_code_unchanged(job, request)
    _register_lab(monkeypatch, lab, LAB.replace("scale = 1", "scale = 10"), "lab_edited")
    with pytest.raises(BrainPropError) as e:
        ex._check_code_unchanged(job, request)
    assert str(e.value) == (
        "the code of rule 'mine' changed since this session began (its file was edited): run the "
        "same 'brainprop reproduce' command again to go on with the code as it is then"
    )


def test_a_damaged_summary_is_written_again_once_deleted_as_its_error_says(
    tmp_path, mnist_root, no_plots
):
    """It said only "the run directory is damaged" (review); the run's last.pt closes it again."""
    request = _dense_request(tmp_path, mnist_root, ("ebp",), max_epochs=1)
    reproduce(request, say=lambda _: None)
    [m] = load_measurements(tmp_path)
    m.path.unlink()  # stopped before it was recorded
    summary = m.path.parent.parent / RUNS / m.run / rundir.SUMMARY
    summary.write_text("{")
    with pytest.raises(BrainPropError) as e:
        reproduce(request, say=lambda _: None)
    assert str(e.value) == (
        f"{summary} is not valid JSON: delete it, and the same command closes the run again"
    )
    summary.unlink()
    outcome = reproduce(request, say=lambda _: None)
    [again] = load_measurements(tmp_path)
    assert outcome.ran == [m.run] and again.summary["epochs_run"] == 1
    assert again.summary["test_acc_at_best"] == m.summary["test_acc_at_best"]


def test_a_run_file_that_may_not_be_read_is_not_called_damaged(tmp_path, monkeypatch):
    """A summary.json this user may not read was to be deleted, as a damaged one is (review)."""
    summary = tmp_path / rundir.SUMMARY
    summary.write_text("{}")
    real_read = Path.read_text

    def refuse(self, *args, **kwargs):
        if self == summary:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", refuse)
    with pytest.raises(BrainPropError) as info:
        rundir.read_json(summary, "delete it, and the same command closes the run again")
    assert str(info.value) == f"cannot read {summary} (Permission denied): check its permissions"


@pytest.mark.parametrize("finished", [True, False])
def test_a_run_directory_of_an_older_preset_table_is_refused_before_any_run(
    tmp_path, mnist_root, monkeypatch, finished
):
    """Recorded, it was a measurement every later reproduce refused, and moving that file away
    only had it recorded again; resumed, it trained for hours before that."""
    calls: list[str] = []
    monkeypatch.setattr(ex, "_train", _fake_train(calls))
    request = _dense_request(tmp_path, mnist_root, ("brainprop", "ebp"), max_epochs=1)
    stale = RunSpec(DENSE, "ebp", 0, max_epochs=1)
    _fake_train([])((stale,), request, None)
    run_dir = tmp_path / RUNS / stale.name
    config = json.loads((run_dir / rundir.CONFIG).read_text())
    (run_dir / rundir.CONFIG).write_text(json.dumps(config | {"lr": 0.05}))
    if not finished:
        (run_dir / rundir.SUMMARY).unlink()
    with pytest.raises(BrainPropError) as info:
        reproduce(request, say=lambda _: None)
    assert str(info.value) == (
        f"{run_dir} ran with lr 0.05, but preset 'paper' now has 0.1: move that run directory "
        f"out of {tmp_path / RUNS} to run it afresh, or give the settings it ran with a preset "
        "of their own in brainprop.presets"
    )
    assert calls == [] and not (tmp_path / "measurements").exists()


@pytest.mark.parametrize("finished", [True, False])
@pytest.mark.parametrize(
    ("key", "value"),
    [("feedback", "random"), ("bf16", True), ("seed", 1), ("rule", "brainprop"), ("epochs", 500),
     ("val", 5000),
     # Trained by hand under a matrix run's name with another protocol (review).
     ("patience", 5), ("min_delta", 0.05), ("on_nan", "reload")],
)  # fmt: skip
def test_another_runs_directory_in_a_runs_place_is_refused_before_any_run(
    tmp_path, mnist_root, monkeypatch, key, value, finished
):
    """Copied or renamed there, it resumed as itself for hours, then was refused as its
    measurement was recorded under the name it sat at; finished, it is refused as such, not as
    a run that cannot be recorded."""
    calls: list[str] = []
    monkeypatch.setattr(ex, "_train", _fake_train(calls))
    request = _dense_request(tmp_path, mnist_root, ("ebp",), max_epochs=1)
    spec = RunSpec(DENSE, "ebp", 0, max_epochs=1)
    _fake_train([])((spec,), request, None)
    run_dir = tmp_path / RUNS / spec.name
    if not finished:
        (run_dir / rundir.SUMMARY).unlink()
    config = json.loads((run_dir / rundir.CONFIG).read_text())
    (run_dir / rundir.CONFIG).write_text(json.dumps(config | {key: value}))
    with pytest.raises(BrainPropError) as info:
        reproduce(request, say=lambda _: None)
    assert str(info.value) == (
        f"{run_dir} holds a run with {key} {value!r}, not run {spec.name}'s {config[key]!r}: "
        f"move that run directory out of {tmp_path / RUNS} to run {spec.name} afresh"
    )
    assert calls == []


def test_exploration_is_part_of_a_runs_identity_except_for_ebp_which_does_not_explore():
    assert RunSpec(DENSE, "brainprop", 0).differs_from({"epsilon": 0.5}) == ("epsilon", 0.5, 0.02)
    assert RunSpec(DENSE, "ebp", 0).differs_from({"epsilon": 0.5}) is None


def test_only_what_a_run_killed_before_its_config_leaves_is_deleted(tmp_path, monkeypatch):
    calls: list[str] = []
    train_job = ex._train
    monkeypatch.setattr(ex, "_train", _fake_train(calls))
    monkeypatch.setattr(ex, "_check_data", lambda *a: None)
    request = Request(cells=(DENSE,), rules=("ebp",), seeds=1, out=tmp_path, device="cpu",
                      progress=False)  # fmt: skip
    run_dir = tmp_path / RUNS / "mnist-dense-ebp-s0"
    run_dir.mkdir(parents=True)
    (run_dir / "best.pt").write_bytes(b"weights")  # someone's, not a run's: it has no config
    (run_dir / "last.pt").write_bytes(b"state")
    with pytest.raises(BrainPropError) as info:
        reproduce(request, say=lambda _: None)
    assert str(info.value) == (
        f"{run_dir} is in the way of run mnist-dense-ebp-s0: it is a folder holding best.pt, "
        "last.pt, and no run directory (it has no config.json); move it away or delete it"
    )
    assert (run_dir / "best.pt").is_file() and calls == []
    shutil.rmtree(run_dir)
    run_dir.write_text("")
    with pytest.raises(BrainPropError, match="it is a file, and no run directory"):
        reproduce(request, say=lambda _: None)
    run_dir.unlink()
    run_dir.mkdir()
    (run_dir / ".config.json.x1y2.tmp").write_text("{")  # the kill's half-written config
    (run_dir / rundir.DATA).write_text("{}")  # written before it (review)
    seen: list[bool] = []
    monkeypatch.setattr(train_module, "train", lambda *a, **kw: seen.append(run_dir.exists()))
    train_job((RunSpec(DENSE, "ebp", 0),), request, None)
    assert seen == [False]  # deleted, and the run started afresh


def test_stacks_group_the_seeds_of_one_cell_and_rule_in_priority_order():
    conv = Cell("mnist", "conv")
    specs = plan([conv, DENSE], ["brainprop", "ebp"], seeds=3)
    jobs = ex.stacks(specs, 2)
    assert [[s.name.removeprefix("mnist-") for s in job] for job in jobs] == [
        ["conv-brainprop-s0", "conv-brainprop-s1"], ["conv-ebp-s0", "conv-ebp-s1"],
        ["dense-brainprop-s0", "dense-brainprop-s1"], ["dense-ebp-s0", "dense-ebp-s1"],
        ["conv-brainprop-s2"], ["conv-ebp-s2"], ["dense-brainprop-s2"], ["dense-ebp-s2"],
    ]  # fmt: skip
    assert ex.stacks(specs, 1) == [(s,) for s in specs]
    # Seeds 1 to 3 of a session stopped after seed 0 finished: 1 keeps to itself, as it began
    # beside 0, and 2 beside 3 (a review: a seed's dropout masks depend on its stack-mates,
    # and regrouped as [1, 2], [3] they would have trained on differently than they began).
    # Seeds never started are packed afresh.
    seeds = plan([conv], ["brainprop"], seeds=8)
    names = [s.name for s in seeds]
    begun = [names[0:2], names[2:4]]
    assert ex.stacks(seeds[1:], 2, begun) == [(seeds[1],), tuple(seeds[2:4]), *(
        tuple(seeds[i : i + 2]) for i in (4, 6)
    )]  # fmt: skip
    assert ex.stacks(seeds[1:4], 4, begun) == [(seeds[1],), tuple(seeds[2:4])]
    assert ex.stacks(seeds[1:], 1, begun) == [(s,) for s in seeds[1:]]  # unstacked on purpose
    # A smaller --stack splits a stack begun larger (one too large for the device's memory).
    assert ex.stacks(seeds, 2, [names]) == [tuple(seeds[i : i + 2]) for i in (0, 2, 4, 6)]
    # Runs validated or capped differently never share a stack.
    mixed = [RunSpec(DENSE, "ebp", 0), RunSpec(DENSE, "ebp", 1, val=5000)]
    assert ex.stacks(mixed, 4) == [(mixed[0],), (mixed[1],)]


def test_a_stack_split_by_a_smaller_stack_stays_split(tmp_path):
    """Seeds begun as one stack of 4, then split by --stack 2, were joined again by a later
    --stack 4 (and regrouped as 3 and 1 by --stack 3), their dropout masks changed once more:
    the oldest stack noted won (review). The latest stack a seed was begun in wins."""
    seeds = plan([CONV], ["brainprop"], 4)

    def session(out, size, *, checkpoint=True):
        jobs = ex.stacks(seeds, size, ex._stacks_begun(out))
        for job in jobs:
            ex._begin(out, job)
            for spec in job:  # an epoch each, then a stop; or a stop before the first
                (out / RUNS / spec.name).mkdir(parents=True, exist_ok=True)
                if checkpoint:
                    (out / RUNS / spec.name / rundir.LAST).write_bytes(b"a checkpoint")
        return [[spec.seed for spec in job] for job in jobs]

    assert session(tmp_path, 4) == [[0, 1, 2, 3]]
    assert session(tmp_path, 2) == [[0, 1], [2, 3]]
    assert session(tmp_path, 4) == session(tmp_path, 3) == [[0, 1], [2, 3]]
    # A split that never trained keeps nothing apart: the stack begun again after it is the
    # latest, and the seeds it trained stay in it.
    out = tmp_path / "again"
    out.mkdir()
    assert session(out, 4, checkpoint=False) == [[0, 1, 2, 3]]
    assert session(out, 2, checkpoint=False) == [[0, 1], [2, 3]]
    assert session(out, 4) == session(out, 4) == [[0, 1, 2, 3]]
    # --stack 1 splits a stack too, and its seeds, trained alone, stay alone; a run alone that
    # left no stack is not noted.
    out = tmp_path / "alone"
    out.mkdir()
    assert session(out, 1) == [[0], [1], [2], [3]] and not (out / ex.STACKS).exists()
    assert session(out, 2) == [[0, 1], [2, 3]]
    assert session(out, 1) == [[0], [1], [2], [3]]
    assert session(out, 4) == [[0], [1], [2], [3]]


def test_stacking_compares_each_run_once_not_with_every_later_one(monkeypatch):
    """Pairwise comparison made --seeds 100 over the matrix take 14 s before its first line,
    and --seeds 1000 most of an hour."""
    specs = plan(MATRIX, seeds=20)
    calls, compared = [], [0]
    monkeypatch.setattr(ex, "replace", lambda spec, **kw: calls.append(spec) or replace(spec, **kw))
    equal = RunSpec.__eq__

    def counted(a, b):
        compared[0] += 1
        return equal(a, b)

    monkeypatch.setattr(RunSpec, "__eq__", counted)
    jobs = ex.stacks(specs, 1)
    monkeypatch.undo()
    assert jobs == [(s,) for s in specs]
    assert calls == specs
    # A dict finds each run's group with one comparison; comparing pairs makes ~n^2 / 2.
    assert compared[0] <= 2 * len(specs)


def test_an_absurd_number_of_seeds_is_refused_before_planning(tmp_path, capsys):
    argv = ["reproduce", "--datasets", "mnist", "--seeds", str(MAX_SEEDS + 1), "--out",
            str(tmp_path / "r"), "--data-dir", str(tmp_path / "empty")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--seeds must lie in [1, {MAX_SEEDS}], got 1001: the" in err


def test_a_packed_run_records_how_many_ran_beside_it_on_average(monkeypatch):
    """Not --jobs: a run alone for 30 s, then beside another for 10 s, had 35 s of the GPU,
    as 40 s shared by 8/7 runs on average (not the plain mean, 1.25, which made it 32 s:
    review); the other, beside it all its 10 s, shared it with 2."""
    clock = [0.0]
    monkeypatch.setattr(ex.time, "monotonic", lambda: clock[0])
    company = ex._Company()
    company.tick({1})
    clock[0] = 30.0
    company.tick({1})
    clock[0] = 40.0
    company.tick({1, 2})
    assert (company.leave(1), company.leave(2), company.leave(3)) == (
        (40.0, pytest.approx(8 / 7)),
        (10.0, 2.0),
        (0.0, 1.0),
    )


def test_a_run_finished_in_a_session_packed_otherwise_records_all_its_sessions(
    tmp_path, monkeypatch
):
    """A run alone on the GPU for 900 s, stopped, then finished beside another for 100 s was
    recorded as sharing it all its time: its device time halved (review)."""
    clock = [0.0]
    monkeypatch.setattr(ex.time, "monotonic", lambda: clock[0])
    spec = RunSpec(DENSE, "ebp", 0)
    request = Request(out=tmp_path, device="cpu")
    _fake_train([])((spec,), request, None)
    run_dir = tmp_path / RUNS / spec.name
    sharing.note(run_dir, 900.0, 1.0)  # the session that stopped it, alone
    pool = ex._Workers(request, None, False, [], ex.Outcome(), lambda _: None)
    pool.running[7] = ((spec,), None, None)
    pool.company.tick({7, 8})
    clock[0] = 100.0
    pool.company.tick({7, 8})
    pool.finished(7)
    [m] = pool.recorder.measurements
    assert json.loads((run_dir / sharing.SHARING).read_text()) == [[900.0, 1.0], [100.0, 2.0]]
    assert m.company == pytest.approx(1000 / 950, abs=1e-3) and m.at_once == 1  # 950 s of the GPU


def test_a_run_finished_alone_in_one_process_notes_its_session(tmp_path, mnist_root, monkeypatch):
    """--jobs 1 on a GPU: the run has it to itself, which counts beside a packed session
    that stopped it before: 100 s beside another, then 300 s alone, 350 s of the GPU."""
    clock = [0.0]
    monkeypatch.setattr(ex.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(devices, "resolve_device", lambda device: torch.device("cuda"))
    monkeypatch.setattr(ex, "this_machine", lambda device, threads=None: "NVIDIA H200")
    spec = RunSpec(DENSE, "ebp", 0)
    run_dir = tmp_path / RUNS / spec.name
    run_dir.mkdir(parents=True)
    sharing.note(run_dir, 100.0, 2.0)
    finish = _fake_train([])

    def train_for_300_s(job, request, dataset):
        clock[0] += 300.0
        finish(job, request, dataset)

    monkeypatch.setattr(ex, "_train", train_for_300_s)
    # --device cpu for the stand-in's config: a GPU is only resolve_device's word here.
    request = Request(out=tmp_path, device="cpu", data_dir=str(mnist_root))
    outcome = ex.Outcome()
    ex._run_in_process(request, [(spec,)], [], outcome, lambda _: None)
    assert outcome.ran == [spec.name]
    assert json.loads((run_dir / sharing.SHARING).read_text()) == [[100.0, 2.0], [300.0, 1.0]]
    [m] = load_measurements(tmp_path)
    assert m.company == pytest.approx(400 / 350, abs=1e-3)
    stopped = RunSpec(DENSE, "ebp", 2)

    def stopped_after_its_first_checkpoint(job, request, dataset):
        clock[0] += 60.0
        (tmp_path / RUNS / stopped.name).mkdir(parents=True)
        (tmp_path / RUNS / stopped.name / rundir.LAST).write_bytes(b"a checkpoint")
        raise signals.Interrupted("stopped", signal.SIGTERM)

    monkeypatch.setattr(ex, "_train", stopped_after_its_first_checkpoint)
    with pytest.raises(signals.Interrupted):
        ex._run_in_process(request, [(stopped,)], [], outcome, lambda _: None)
    assert json.loads((tmp_path / RUNS / stopped.name / sharing.SHARING).read_text()) == [
        [60.0, 1.0]
    ]
    monkeypatch.setattr(ex, "_train", train_for_300_s)
    monkeypatch.setattr(devices, "resolve_device", lambda device: torch.device("cpu"))
    other = RunSpec(DENSE, "ebp", 1)
    ex._run_in_process(request, [(other,)], [], outcome, lambda _: None)
    assert not (tmp_path / RUNS / other.name / sharing.SHARING).exists()  # a CPU notes none


def test_sessions_are_noted_however_they_end_but_never_on_a_cpu(tmp_path, monkeypatch):
    """A session stopped beside a failure was not noted, nor one whose run had kept nothing
    yet, whose folder then held sharing.json alone (review); a CPU notes none."""
    clock = [0.0]
    monkeypatch.setattr(ex.time, "monotonic", lambda: clock[0])
    kept, begun = RunSpec(DENSE, "ebp", 0), RunSpec(DENSE, "ebp", 1)
    for spec in (kept, begun):
        (tmp_path / RUNS / spec.name).mkdir(parents=True)
    (tmp_path / RUNS / kept.name / rundir.LAST).write_bytes(b"a checkpoint")
    for on_cpu in (True, False):
        pool = ex._Workers(Request(out=tmp_path, device="cpu"), None, on_cpu, [],
                           ex.Outcome(), lambda _: None)  # fmt: skip
        pool.running = {7: ((kept,), None, None), 8: ((begun,), None, None)}
        pool.company.tick({7, 8})
        clock[0] += 50.0
        pool.company.tick({7, 8})
        pool.note_sessions()
        noted = [(tmp_path / RUNS / spec.name / sharing.SHARING).exists() for spec in (kept, begun)]
        assert noted == [not on_cpu, False], on_cpu
    assert sharing.average(tmp_path / RUNS / kept.name, 1.0) == 2.0


def test_a_finished_run_recorded_in_a_later_session_is_averaged_over_its_sessions(tmp_path):
    spec = RunSpec(DENSE, "ebp", 0)
    request = Request(out=tmp_path, device="cpu")
    _fake_train([])((spec,), request, None)
    sharing.note(tmp_path / RUNS / spec.name, 900.0, 1.0)
    sharing.note(tmp_path / RUNS / spec.name, 100.0, 2.0)
    measurements, outcome, pending = ex._scan(request, [spec], lambda _: None)
    assert pending == [] and outcome.skipped == [spec.name]
    assert [m.company for m in measurements] == [pytest.approx(1000 / 950, abs=1e-3)]


def test_a_run_without_a_note_takes_this_sessions_sharing_not_its_stack_mates(tmp_path):
    """Recording a stack, a run whose note could not be written took the average of the run
    before it (three at once) instead of this session's one (review)."""
    noted, unnoted = plan([DENSE], ["ebp"], 2)
    request = Request(out=tmp_path, device="cpu")
    for spec in (noted, unnoted):
        _fake_train([])((spec,), request, None)
    sharing.note(tmp_path / RUNS / noted.name, 100.0, 3.0)
    recorder = ex._Recorder(tmp_path, [], ex.Outcome(), lambda _: None, request.own_code)
    recorder.record([noted, unnoted], company=1.0)
    assert [m.company for m in recorder.measurements] == [3.0, 1.0]


def test_a_cpu_run_found_unrecorded_by_a_gpu_session_counts_as_alone(tmp_path, monkeypatch):
    """A CPU run killed between its summary and its measurement, recorded by a later
    --device cuda --jobs 4 session, took that session's packing: 4 runs at once, its s/epoch
    quartered (review). CPU runs note no sharing: only a GPU run takes the session's packing,
    a guess for one from before sharing.json."""
    on_cpu, on_gpu, beside = plan([DENSE], ["ebp"], 3)
    for spec in (on_cpu, on_gpu, beside):
        _fake_train([])((spec,), Request(out=tmp_path, device="cpu"), None)
    summary = tmp_path / RUNS / on_gpu.name / rundir.SUMMARY
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "device": "NVIDIA H200"}))
    # Measured on another machine too: the run here is recorded beside it.
    write_measurement(tmp_path, beside, "NVIDIA A100", test_acc=0.9)
    monkeypatch.setattr(devices, "resolve_device", lambda device: torch.device("cuda"))
    request = Request(out=tmp_path, device="cuda", jobs=4)
    measurements, _, pending = ex._scan(request, [on_cpu, on_gpu, beside], lambda _: None)
    assert pending == []
    here = sorted((m.run, m.at_once, m.company) for m in measurements if m.machine != "NVIDIA A100")
    assert here == [(on_cpu.name, 1, 1.0), (on_gpu.name, 4, 4.0), (beside.name, 1, 1.0)]


def test_a_note_that_cannot_be_written_is_said_and_the_run_recorded(tmp_path, monkeypatch):
    def full(*_args):
        raise BrainPropError("cannot write sharing.json (No space left on device)")

    monkeypatch.setattr(sharing, "note", full)
    spec = RunSpec(DENSE, "ebp", 0)
    request = Request(out=tmp_path, device="cpu")
    _fake_train([])((spec,), request, None)
    lines: list[str] = []
    pool = ex._Workers(request, None, False, [], ex.Outcome(), lines.append)
    pool.running[7] = ((spec,), None, None)
    pool.finished(7)
    assert lines[0] == (
        f"{spec.name}: its share of the GPU this session is not noted: cannot write "
        "sharing.json (No space left on device)"
    )
    assert [m.run for m in pool.recorder.measurements] == [spec.name]


def test_a_damaged_record_of_a_runs_sessions_is_one_line(tmp_path):
    spec = RunSpec(DENSE, "ebp", 0)
    _fake_train([])((spec,), Request(out=tmp_path, device="cpu"), None)
    run_dir = tmp_path / RUNS / spec.name
    assert sharing.average(run_dir, 3.0) == 3.0  # none noted: the session's own
    huge = "9" * 400  # no float: a raw OverflowError (review)
    for damage in ("[[100, 0.5]]", "[[-1, 2]]", '{"a": 1}', "[[1, 2, 3]]", "[[true, 2]]",
                   f"[[{huge}, 2]]"):  # fmt: skip
        (run_dir / sharing.SHARING).write_text(damage)
        with pytest.raises(BrainPropError) as info:
            sharing.average(run_dir, 1.0)
        assert str(info.value) == (
            f"{run_dir / sharing.SHARING} is no list of [seconds, runs] pairs: delete it, and "
            f"{run_dir}'s device time is its last session's"
        ), damage


@pytest.mark.parametrize(
    ("company", "kept", "at_once"),
    # 1.4996 counted 1 run at once beside its kept 1.5, which the file's reader refused.
    # Halves round up, as the reader rounds them: round() takes 2.5 to 2.
    [(1.25, 1.25, 1), (1.5, 1.5, 2), (2.4, 2.4, 2), (2.5, 2.5, 3), (3.0, 3.0, 3),
     (1.4996, 1.5, 2)],
)  # fmt: skip
def test_a_run_records_its_average_company_and_is_labelled_by_it_rounded(
    tmp_path, company, kept, at_once
):
    spec = RunSpec(DENSE, "ebp", 0)
    request = Request(out=tmp_path, device="cpu")
    _fake_train([])((spec,), request, None)
    m = record(spec, tmp_path / RUNS / spec.name, tmp_path, company)
    assert (m.at_once, m.company, m.device_share) == (at_once, kept, 1 / kept)
    assert m.timed_on == m.machine + (f", {at_once} runs at once" if at_once > 1 else "")
    [loaded] = load_measurements(tmp_path)
    assert (loaded.at_once, loaded.company) == (at_once, kept)


def test_a_measurement_keeps_both_accuracies_of_every_epoch(tmp_path):
    """The curve lets a report plot or choose epochs without the run directory."""
    spec = RunSpec(DENSE, "ebp", 0)
    _fake_train([])((spec,), Request(out=tmp_path, device="cpu"), None)
    run_dir = tmp_path / RUNS / spec.name
    rows = [{"epoch": 1, "val_acc": 0.4, "test_acc": 0.41},
            {"epoch": 2, "val_acc": 0.5, "test_acc": 0.52}]  # fmt: skip
    (run_dir / rundir.HISTORY_JSON).write_text(json.dumps(rows))
    m = record(spec, run_dir, tmp_path)
    curve = {"val_acc": [0.4, 0.5], "test_acc": [0.41, 0.52]}
    assert json.loads(m.path.read_text())["curve"] == curve


def test_a_stacked_request_trains_and_records_each_seed(tmp_path, mnist_root, no_plots):
    request = _dense_request(tmp_path, mnist_root, ("ebp",), seeds=2, max_epochs=1, stack=2)
    lines: list[str] = []
    outcome = reproduce(request, say=lines.append)
    names = ["mnist-dense-ebp-s0-e1", "mnist-dense-ebp-s1-e1"]
    assert outcome.ran == names
    assert lines[0] == "reproduce: 2 runs requested, 0 already measured, 2 to run in 1 stack"
    assert f"run {names[0]}, {names[1]}" in lines
    for name in names:
        history = json.loads((tmp_path / RUNS / name / rundir.HISTORY_JSON).read_text())
        assert [h["stack_size"] for h in history] == [2]
    # The stack is noted as it starts, for a later session to keep its seeds together once
    # they have trained; a stack noted but stopped before its first checkpoint is not kept.
    assert rundir.read_json(tmp_path / ex.STACKS) == [names]
    assert ex._stacks_begun(tmp_path) == [names]
    untrained = ["mnist-dense-ebp-s2-e1", "mnist-dense-ebp-s3-e1"]
    ex._begin(tmp_path, tuple(RunSpec(DENSE, "ebp", s, max_epochs=1) for s in (2, 3)))
    assert rundir.read_json(tmp_path / ex.STACKS) == [names, untrained]
    assert ex._stacks_begun(tmp_path) == [names]
    (tmp_path / ex.STACKS).write_text('{"not": "stacks"}')
    # Refused before a run starts, alone (--stack 1) too, not as the first one comes up; where
    # no run is left to train (a report rewritten) it is not read (review).
    for stack in (2, 1):
        with pytest.raises(BrainPropError, match=r"stacks.json is not a list of stacks of run"):
            reproduce(replace(request, stack=stack, seeds=4), say=lines.append)
        assert not (tmp_path / RUNS / "mnist-dense-ebp-s2-e1").exists()
    assert reproduce(request, say=lines.append).skipped == names
    measurements = load_measurements(tmp_path)
    assert {m.seed for m in measurements} == {0, 1}
    # A stacked run's seconds are the stack's: its budget estimates come from stacks alike.
    assert {m.machine for m in measurements} == {ex.this_machine("cpu")}
    assert {m.timed_on for m in measurements} == {f"{ex.this_machine('cpu')}, 2 seeds stacked"}


def _killed_before_its_first_checkpoint(out, mnist_root, seed: int, *, older: bool) -> RunSpec:
    """An MNIST dense EBP run directory holding only the config.json of a --device cpu run; an
    ``older`` one was written before the fast path (no "eager": it resumes eager)."""
    spec = RunSpec(DENSE, "ebp", seed, max_epochs=1)
    run_dir = out / RUNS / spec.name
    run_dir.mkdir(parents=True)
    config = spec.config(out, str(mnist_root), "cpu").resolve().to_dict()
    if older:
        del config["eager"]
    (run_dir / rundir.CONFIG).write_text(json.dumps(config))
    return spec


def test_a_stacks_new_seeds_run_where_its_resumed_ones_started(tmp_path, mnist_root, no_plots):
    """Seed 0 was started with --device cpu by a version before the fast path (its config has
    no "eager": it resumes eager) and killed before its first checkpoint; the rerun says
    --device auto. Its new seed 1 must take neither difference, or the two could not share a
    stack."""
    first = _killed_before_its_first_checkpoint(tmp_path, mnist_root, 0, older=True)
    request = Request(
        cells=(DENSE,), rules=("ebp",), seeds=2, max_epochs=1, out=tmp_path, stack=2,
        data_dir=str(mnist_root), device="auto", progress=False,
    )  # fmt: skip
    assert reproduce(request, say=lambda _: None).ran == [first.name, "mnist-dense-ebp-s1-e1"]
    stored = rundir.read_json(tmp_path / RUNS / "mnist-dense-ebp-s1-e1" / rundir.CONFIG)
    assert stored["device"] == "cpu" and stored["eager"] is True


def test_resumed_seeds_of_two_configurations_train_each_in_its_own_stack(
    tmp_path, mnist_root, no_plots
):
    """Seed 0 was started by a version before the fast path (no "eager": it resumes eager),
    seed 1 by this one; both were killed before their first checkpoint. They cannot share a
    stack, and a rerun with --stack must train both rather than stop."""
    for seed in (0, 1):
        _killed_before_its_first_checkpoint(tmp_path, mnist_root, seed, older=seed == 0)
    request = _dense_request(tmp_path, mnist_root, ("ebp",), seeds=2, max_epochs=1, stack=2)
    names = ["mnist-dense-ebp-s0-e1", "mnist-dense-ebp-s1-e1"]
    assert reproduce(request, say=lambda _: None).ran == names
    for name, eager in zip(names, (True, False), strict=True):
        assert stored_config(tmp_path / RUNS / name).eager is eager
        history = json.loads((tmp_path / RUNS / name / rundir.HISTORY_JSON).read_text())
        assert "stack_size" not in history[0]


def test_a_worker_tags_the_lines_of_each_run_it_trains_with_that_runs_name(
    tmp_path, mnist_root, capsys
):
    """The two resumed seeds above, one job of a worker: each trains alone, so each line names
    its own run, not the job's stack."""
    specs = tuple(
        _killed_before_its_first_checkpoint(tmp_path, mnist_root, seed, older=seed == 0)
        for seed in (0, 1)
    )
    request = Request(
        cells=(DENSE,), rules=("ebp",), seeds=2, max_epochs=1, out=tmp_path, stack=2,
        data_dir=str(mnist_root), device="cpu",
    )  # fmt: skip
    ex._train(specs, request, None, tagged=True)
    lines = capsys.readouterr().out.splitlines()
    for spec in specs:
        assert sum(line.startswith(f"{spec.name}: epoch   1/1 ") for line in lines) == 1, lines
    assert all(line.startswith(tuple(f"{s.name}: " for s in specs)) for line in lines), lines
    assert not any("(+1)" in line for line in lines), lines


def test_a_bf16_request_trains_in_bf16_and_reports_apart(tmp_path, mnist_root, no_plots):
    args = ["reproduce", "--datasets", "mnist", "--archs", "dense", "--rules", "ebp", "--seeds",
            "1", "--max-epochs", "1", "--bf16", "--device", "cpu", "--quiet", "--out",
            str(tmp_path), "--data-dir", str(mnist_root)]  # fmt: skip
    assert main(args) == 0
    [m] = load_measurements(tmp_path)
    assert m.run == "mnist-dense-ebp-s0-e1-bf16" and m.bf16
    assert m.setup == f"{ex.this_machine('cpu')}, bf16"
    assert rundir.read_json(tmp_path / RUNS / m.run / rundir.CONFIG)["bf16"] is True
    assert f"| MNIST dense | {m.setup} | 1 |" in (tmp_path / "results.md").read_text()


def test_a_cuda_graph_request_starts_graphed_runs_and_times_them_apart(tmp_path, capsys):
    spec, graphed = RunSpec(DENSE, "brainprop", 0), Request(out=tmp_path, cuda_graph=True)
    [config] = ex._members((spec,), graphed)
    assert config.cuda_graph and config.name == spec.name  # how it runs, not which run it is
    # record() takes the flag from the run's config.
    run_dir = tmp_path / RUNS / spec.name
    run_dir.mkdir(parents=True)
    (run_dir / rundir.CONFIG).write_text(json.dumps(config.resolve().to_dict()))
    summary = {"device": "gpu", "epochs_run": 10, "best_val_acc": 0.9, "best_epoch": 5,
               "test_acc_at_best": 0.9, "s_per_epoch": 1.0, "total_seconds": 20.0,
               "stop_reason": "max epochs"}  # fmt: skip
    (run_dir / rundir.SUMMARY).write_text(json.dumps(summary))
    m = record(spec, run_dir, tmp_path)
    [back] = load_measurements(tmp_path)
    assert back.cuda_graph and back.setup == back.timed_on == "gpu, CUDA graph"
    # Its seconds time only graphed runs: 10 epochs x (1 + 1) s; a plain run has no estimate.
    later = RunSpec(DENSE, "brainprop", 1)
    assert ex.estimate_seconds(later, [back], "gpu, CUDA graph", tmp_path) == 20
    assert ex.estimate_seconds(later, [back], "gpu", tmp_path) is None
    # A plain measurement of the same run on the same machine (merged in from another session)
    # is another setup: a file of its own, not a duplicate (the report counts the run once).
    assert m.path.name == f"{spec.name}@gpu-cuda-graph.json"
    plain = write_measurement(tmp_path, spec, "gpu", test_acc=0.9)
    assert {x.setup for x in load_measurements(tmp_path)} == {"gpu", "gpu, CUDA graph"}
    plain.path.unlink()
    # Files written before the flag was recorded hold runs without a graph.
    d = json.loads(m.path.read_text())
    del d["cuda_graph"]
    m.path.write_text(json.dumps(d))
    assert not load_measurements(tmp_path)[0].cuda_graph
    # A request that cannot run graphed is refused before it starts anything.
    args = ["reproduce", "--datasets", "mnist", "--archs", "dense", "--cuda-graph", "--device",
            "cpu", "--out", str(tmp_path / "r")]  # fmt: skip
    assert main(args) == 2 and not (tmp_path / "r").exists()
    assert capsys.readouterr().err == (
        "brainprop: error: --cuda-graph needs a CUDA device, and these runs would be on cpu "
        "(--device cpu): drop --cuda-graph\n"
    )


def test_a_budget_times_a_run_as_it_will_resume(tmp_path):
    """A run started without a graph resumes without one under --cuda-graph, so its estimate
    comes from plain runs: 10 epochs x (5 + 1) s, over a budget of half a minute."""
    machine = ex.this_machine("cpu")
    write_measurement(tmp_path, RunSpec(DENSE, "brainprop", 0), machine, test_acc=0.9,
                      epochs_run=10, s_per_epoch=5.0)  # fmt: skip
    spec = RunSpec(DENSE, "brainprop", 1)
    run_dir = tmp_path / RUNS / spec.name
    run_dir.mkdir(parents=True)
    config = spec.config(tmp_path, None, "cpu").resolve()
    (run_dir / rundir.CONFIG).write_text(json.dumps(config.to_dict()))
    request = Request(out=tmp_path, device="cpu", cuda_graph=True, budget_minutes=0.5)
    lines: list[str] = []
    assert not ex._Budget(request, None, load_measurements(tmp_path)).admits((spec,), lines.append)
    assert lines == [f"over budget: {spec.name} needs ~1.0 min, 30 s left"]
    # A damaged config.json is the run's own start to report, naming it; the estimate takes
    # the request's setup instead (graphed: no timing, so the run is admitted to fail there).
    (run_dir / rundir.CONFIG).write_text(json.dumps({"momentum": 0.9}))
    assert ex._Budget(request, None, load_measurements(tmp_path)).admits((spec,), lines.append)
    with pytest.raises(BrainPropError, match=f"^{run_dir / rundir.CONFIG}: config has unknown"):
        ex._members((spec,), request)


def test_a_budget_gives_times_under_a_minute_in_seconds():
    """A run estimated at 2 s was refused as needing "~0.0 min" (review)."""
    assert [ex._minutes(s) for s in (2.4, 59.4, 59.6, 90)] == ["2 s", "59 s", "1.0 min", "1.5 min"]


def test_a_budget_prices_a_run_by_the_runs_it_will_share_the_gpu_with(tmp_path, monkeypatch):
    """Under --jobs 4 a lone last run was priced as four runs' share of the GPU, 40 min where
    it takes 10, and passed over in a budget of 30 (review)."""
    monkeypatch.setattr(devices, "resolve_device", lambda device: torch.device("cuda"))
    monkeypatch.setattr(ex, "this_machine", lambda device, threads=None: "NVIDIA H200")
    write_measurement(tmp_path, RunSpec(CONV, "brainprop", 0), "NVIDIA H200", test_acc=0.99,
                      epochs_run=60, s_per_epoch=9.0)  # fmt: skip
    measured = load_measurements(tmp_path)
    spec = RunSpec(CONV, "brainprop", 1)
    request = Request(out=tmp_path, device="cuda", budget_minutes=30, jobs=4)
    lines: list[str] = []
    assert ex._Budget(request, None, measured).admits((spec,), lines.append)
    assert ex._Budget(request, None, measured).admits((spec,), lines.append, 2)
    assert not ex._Budget(request, None, measured).admits((spec,), lines.append, 3)
    assert lines == [f"over budget: {spec.name} needs ~40.0 min, 30.0 min left"]


def test_the_cores_are_those_this_process_may_use(tmp_path, monkeypatch, capsys):
    """os.cpu_count ignores the affinity by which SLURM or taskset give a process fewer:
    --jobs 2 on one allowed core passed, and its runs took turns on it (review)."""
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    args = ["reproduce", "--datasets", "mnist", "--archs", "dense", "--jobs", "2", "--out",
            str(tmp_path), "--device", "cpu", "--data-dir", str(tmp_path / "none")]  # fmt: skip
    assert main(args) == 2
    assert "--jobs 2 is more runs than the 1 CPU core this process" in capsys.readouterr().err
    monkeypatch.delattr(os, "sched_getaffinity")
    assert devices.usable_cpus() == 64


def test_two_jobs_train_in_worker_processes_on_cpu(tmp_path, mnist_root, monkeypatch, capfd):
    monkeypatch.setattr(devices, "usable_cpus", lambda: 2)
    request = Request(
        cells=(DENSE,), rules=("brainprop", "ebp"), seeds=1, max_epochs=1, out=tmp_path / "r",
        data_dir=str(mnist_root), device="cpu", jobs=2,
    )  # fmt: skip
    lines: list[str] = []
    outcome = reproduce(request, say=lines.append)
    names = ["mnist-dense-brainprop-s0-e1", "mnist-dense-ebp-s0-e1"]
    assert sorted(outcome.ran) == names
    assert sum("(process " in line for line in lines) == 2
    # The workers' lines, interleaved on one terminal, each say whose they are.
    printed = capfd.readouterr().out.splitlines()
    for name in names:
        assert sum(line.startswith(f"{name}: epoch   1/1 ") for line in printed) == 1, printed
    assert all(line.startswith(tuple(names)) for line in printed), printed
    measurements = load_measurements(request.out)
    assert {m.rule for m in measurements} == {"brainprop", "ebp"}
    # Each worker took its share of the cores.
    assert all(m.machine.endswith(", 1 thread)") for m in measurements)


def _run_worker(tmp_path, train: str) -> subprocess.CompletedProcess:
    """Run a ``reproduce --jobs`` worker of two runs whose training is ``train`` (a function's
    body), its dataset not loaded; its stdout is the error it sent its parent (or None)."""
    script = tmp_path / "worker.py"
    script.write_text(f"""
import logging, os, sys, warnings
from multiprocessing import Pipe
import brainprop.data
from brainprop import experiments as ex, processes
from brainprop.matrix import Cell, RunSpec

# As torch does on import: a handler that holds the stderr of before the worker's start.
logging.getLogger("early").addHandler(logging.StreamHandler(sys.stderr))

def train(job, request, dataset, tagged=False):
{textwrap.indent(textwrap.dedent(train), "    ")}

brainprop.data.load_dataset = lambda name, root: None
ex._train = train
job = tuple(RunSpec(Cell("mnist", "dense"), "ebp", seed) for seed in (0, 1))
receive, send = Pipe(duplex=False)
try:
    ex._worker(job, ex.Request(), None, send, os.getppid(), ())
finally:
    print(processes.error_sent(receive))
""")
    return subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )


def test_everything_a_worker_writes_to_stderr_names_its_job(tmp_path):
    """Warnings, notes and the traceback of an error no one caught: a line from one of two
    workers sharing a terminal would otherwise not say whose it is."""
    ran = _run_worker(tmp_path, """
        print("a note", file=sys.stderr)
        warnings.warn("a library's warning")
        logging.getLogger("early").warning("a log record")
        sys.stderr.buffer.write(b"")  # what a real stream has, the tagged one has too
        raise RuntimeError("an error nobody caught")
    """)  # fmt: skip
    assert ran.returncode == 1
    lines = ran.stderr.splitlines()
    assert "mnist-dense-ebp-s0 (+1): a note" in lines
    assert "mnist-dense-ebp-s0 (+1): a log record" in lines
    assert any("UserWarning: a library's warning" in line for line in lines), lines
    assert "mnist-dense-ebp-s0 (+1): RuntimeError: an error nobody caught" in lines
    assert all(line.startswith("mnist-dense-ebp-s0 (+1): ") for line in lines), lines
    assert ran.stdout == "None\n"


@pytest.mark.parametrize(
    ("error", "said"),
    [(f"RuntimeError({ENFORCED + CPU_ALLOCATOR!r})", CPU_ALLOCATOR),
     ("MemoryError()", "no details")],
    ids=["cpu-allocator", "python"],
)  # fmt: skip
def test_a_worker_out_of_memory_sends_the_one_line_advice(tmp_path, error, said):
    ran = _run_worker(tmp_path, f"raise {error}")
    assert ran.returncode == 2 and ran.stderr == "", ran.stderr
    assert ran.stdout == (
        f"the device ran out of memory ({said}): lower the batch size, the seeds stacked "
        "(--stack) or the runs at once (--jobs), or free the device of other work\n"
    )


def test_a_workers_error_too_long_for_the_pipe_is_cut_and_the_worker_ends(tmp_path):
    """Its parent reads the pipe only once it has ended: a longer message waited for good."""
    ran = _run_worker(tmp_path, 'raise ex.BrainPropError("labels " + "7, " * 40_000)')
    assert ran.returncode == 2 and ran.stderr == "", ran.stderr
    sent = ran.stdout.removesuffix("\n")
    assert sent.startswith("labels 7, 7, ") and sent.endswith(" bytes more]")
    assert len(sent.encode()) <= processes.ERROR_BYTES


def test_a_run_that_completes_beside_one_that_fails_is_recorded(tmp_path, mnist_root, monkeypatch):
    monkeypatch.setattr(devices, "usable_cpus", lambda: 2)
    out = tmp_path / "r"
    request = _dense_request(out, mnist_root, ("brainprop", "ebp"), max_epochs=1, jobs=2)
    # The EBP run resumes from a damaged last.pt: its worker fails as it starts.
    failing = RunSpec(DENSE, "ebp", 0, max_epochs=1)
    stopped = train_module.train(failing.config(out, str(mnist_root), "cpu"), progress=False)
    (stopped.dir / rundir.SUMMARY).unlink()
    (stopped.dir / "last.pt").write_bytes(b"not a checkpoint")
    some = ex.wait

    def both_ended(objects, timeout=None):
        ended: list = []
        while len(ended) < len(objects):
            ended += some([o for o in objects if o not in ended])
        return ended

    monkeypatch.setattr(ex, "wait", both_ended)
    with pytest.raises(BrainPropError, match="last.pt is not a readable checkpoint"):
        reproduce(request, say=lambda _: None)
    assert [m.run for m in load_measurements(out)] == ["mnist-dense-brainprop-s0-e1"]


def test_a_run_that_cannot_be_recorded_leaves_the_others_that_ended_beside_it_recorded(
    tmp_path, mnist_root
):
    """reap stopped at the first recording that failed, leaving the other workers that ended
    in the same wait unrecorded, their errors unread (review)."""

    class Ended:
        exitcode = 0

        def join(self):
            pass

    request = Request(out=tmp_path, data_dir=str(mnist_root), device="cpu", progress=False)
    specs = plan([DENSE], ["brainprop", "ebp"], 1)
    for spec in specs:
        _fake_train([])((spec,), request, None)
    damaged = tmp_path / RUNS / specs[0].name / rundir.SUMMARY
    damaged.write_text("{")
    measurements: list = []
    outcome = ex.Outcome()
    pool = ex._Workers(request, 1, True, measurements, outcome, lambda _: None)
    pool.running = {i: ((spec,), Ended(), None) for i, spec in enumerate(specs)}
    failures = pool.reap([0, 1])
    assert failures == [
        f"{damaged} is not valid JSON: delete it, and the same command closes the run again"
    ]
    assert [m.run for m in measurements] == outcome.ran == [specs[1].name]
    assert pool.running == {}


def test_a_stop_with_a_run_that_cannot_be_recorded_records_the_others_and_stops(
    tmp_path, mnist_root
):
    """The recording's error escaped the stop, which then read as a failure (status 2) with
    the other finished runs unrecorded (review)."""

    class Saved:
        exitcode = 128 + signals.RELAY  # a worker that saw its run end, then the stop

        def is_alive(self):
            return False

        def join(self):
            pass

    class Silent:
        def poll(self) -> bool:
            return False

    request = Request(out=tmp_path, data_dir=str(mnist_root), device="cpu", progress=False)
    specs = plan([DENSE], ["brainprop", "ebp"], 2)
    for spec in specs[:2]:
        _fake_train([])((spec,), request, None)
    damaged = tmp_path / RUNS / specs[0].name / rundir.SUMMARY
    damaged.write_text("{")
    outcome, lines = ex.Outcome(), []
    pool = ex._Workers(request, 1, True, [], outcome, lines.append)
    pool.running = {i: ((spec,), Saved(), Silent()) for i, spec in enumerate(specs)}
    pool.stop_all()
    assert outcome.ran == [specs[1].name] and pool.running == {}
    assert pool.stopped == [spec.name for spec in specs[2:]]
    assert f"not recorded: {damaged} is not valid JSON" in lines[0]


def test_a_worker_that_fails_as_it_stops_is_said_not_taken_for_a_stop(tmp_path):
    """A worker that failed while it saved its stop checkpoint (a full disk: its error sent) or
    was killed for memory then was said to have kept its progress, its exit status and error
    never read (review)."""

    class Ended:
        pid = 4321

        def __init__(self, exitcode: int) -> None:
            self.exitcode = exitcode

        def is_alive(self) -> bool:
            return False

        def join(self) -> None:
            pass

    class Sent:
        def __init__(self, error: str | None) -> None:
            self.error = error

        def poll(self) -> bool:
            return self.error is not None

        def recv(self) -> str | None:
            return self.error

    failed, killed, stopped = plan([DENSE], ["ebp"], 3)
    for spec in (failed, killed, stopped):  # each with the checkpoint of an earlier epoch
        (tmp_path / RUNS / spec.name).mkdir(parents=True)
        (tmp_path / RUNS / spec.name / rundir.LAST).write_bytes(b"a checkpoint")
    full = f"cannot write {tmp_path / RUNS / failed.name / rundir.LAST} (No space left on device)"
    lines: list[str] = []
    pool = ex._Workers(Request(out=tmp_path, device="cpu"), 1, True, [], ex.Outcome(),
                       lines.append)  # fmt: skip
    pool.running = {
        7: ((failed,), Ended(2), Sent(full)),
        8: ((killed,), Ended(-signal.SIGKILL), Sent(None)),
        9: ((stopped,), Ended(128 + signals.RELAY), Sent(None)),
    }
    pool.stop_all()
    assert lines == [full, ex._ended(killed.name, -signal.SIGKILL)]
    assert pool.stopped == [stopped.name] and pool.running == {}
    assert str(ex._stopped(signal.SIGINT, pool.stopped, tmp_path / RUNS)) == (
        f"stopped by SIGINT; {stopped.name} kept its progress: run the same 'brainprop "
        "reproduce' command to continue"
    )


def test_a_stop_whose_every_worker_failed_does_not_say_no_run_was_in_progress(tmp_path):
    """The failures were said, then the stop's line ended "no run was in progress" (review)."""

    class Killed:
        pid, exitcode = 4321, -signal.SIGKILL

        def is_alive(self) -> bool:
            return False

        def join(self) -> None:
            pass

    class Silent:
        def poll(self) -> bool:
            return False

    first, second = plan([DENSE], ["ebp"], 2)
    lines: list[str] = []
    pool = ex._Workers(Request(out=tmp_path, device="cpu"), 1, True, [], ex.Outcome(),
                       lines.append)  # fmt: skip
    pool.running = {7: ((first,), Killed(), Silent()), 8: ((second,), Killed(), Silent())}
    failures = pool.stop_all()
    assert failures == lines and len(lines) == 2 and pool.stopped == []
    assert str(ex._stopped(signal.SIGTERM, pool.stopped, tmp_path / RUNS, len(failures))) == (
        "stopped by SIGTERM; 2 workers failed as they stopped (above): run the same 'brainprop "
        "reproduce' command to continue"
    )


def test_a_ctrl_c_while_workers_start_stops_them_without_tracebacks(tmp_path, mnist_root):
    if devices.usable_cpus() < 2:
        pytest.skip("two jobs on a CPU need two cores")
    # The terminal's Ctrl-C reaches the whole foreground process group: the workers too, while
    # they import torch and have not yet left it.
    command = [sys.executable, "-m", "brainprop", "reproduce", "--datasets", "mnist", "--archs",
               "dense", "--seeds", "1", "--max-epochs", "50", "--jobs", "2", "--device", "cpu",
               "--out", str(tmp_path / "r"), "--data-dir", str(mnist_root), "--quiet"]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    started = 0
    while started < 2:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        started += "(process " in line
    time.sleep(0.5)  # into their imports, past the first milliseconds of the interpreter's start
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert "SIGINT: passing it on to the runs in progress as SIGUSR1" in out, out
    # How far each worker got by the signal depends on the machine: a fast one can be training
    # (fifty epochs, so that none has finished).
    stop = re.fullmatch(
        r"brainprop: stopped by SIGINT; (.+): run the same 'brainprop reproduce' command to "
        r"continue\n",
        err,
    )
    assert stop, err
    clauses = stop[1].split("; ")
    said = [
        re.fullmatch(r"(.+?)(?: each)? (kept its progress|had no checkpoint yet)", c)
        for c in clauses
    ]
    assert all(said), err
    kept = {name: m[2] == "kept its progress" for m in said for name in m[1].split(", ")}
    assert sorted(kept) == ["mnist-dense-brainprop-s0-e50", "mnist-dense-ebp-s0-e50"], err
    for name, progress in kept.items():
        assert (tmp_path / "r" / "runs" / name / rundir.LAST).is_file() == progress, name


def test_a_stop_names_the_runs_that_kept_progress_apart_from_those_not_begun(tmp_path):
    """Every run in progress was said to have "kept its progress", also one whose worker was
    stopped while it started, which had none."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / rundir.LAST).write_bytes(b"state")
    stop = ex._stopped(signal.SIGTERM, ["a", "b", "c", "d"], tmp_path)
    assert str(stop) == (
        "stopped by SIGTERM; a, b each kept its progress; c, d had no checkpoint yet: run the "
        "same 'brainprop reproduce' command to continue"
    )
    assert stop.exit_status == 128 + signal.SIGTERM
    assert "; a kept its progress: run" in str(ex._stopped(signal.SIGINT, ["a"], tmp_path))


def test_more_jobs_than_cpu_cores_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    """Runs that took turns on a core would each record one thread as their machine, and
    seconds that measure the sharing."""
    monkeypatch.setattr(devices, "usable_cpus", lambda: 2)
    # No data there: were the jobs let through, the runs would fail there, not train.
    args = ["reproduce", "--datasets", "mnist", "--archs", "dense", "--jobs", "3", "--out",
            str(tmp_path), "--device", "cpu", "--data-dir", str(tmp_path / "none")]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--jobs 3 is more runs than the 2 CPU cores this process" in err
    assert "pass --jobs 2 or fewer" in err and not (tmp_path / RUNS).exists()


def test_reproduce_runs_cifar100_and_tiny_imagenet_cells_end_to_end(tmp_path, no_plots, capsys):
    """The CLI on fixture files in the official formats: the cells run unchanged on real ones."""
    data, out = tmp_path / "data", tmp_path / "results"
    # A training set of at least the paper's batch of 128, which a run refuses to exceed.
    write_cifar100(data, n_train=128)
    write_tiny_imagenet(data, train_per_class=43)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_START}\nnone\n{README_END}\n")
    args = ["reproduce", "--datasets", "cifar100,tiny-imagenet", "--rules", "brainprop",
            "--seeds", "1", "--max-epochs", "1", "--out", str(out), "--data-dir", str(data),
            "--device", "cpu", "--quiet", "--readme", str(readme)]  # fmt: skip
    assert main(args) == 0
    cells = ["cifar100-conv", "cifar100-deep", "cifar100-loccon", "tiny-imagenet-deep"]
    runs = sorted(m.run for m in load_measurements(out))
    assert runs == [f"{c}-brainprop-s0-e1" for c in cells]
    md = (out / "results.md").read_text()
    for text in ("CIFAR-100 loccon", "CIFAR-100 deep", "Tiny ImageNet deep", "59.58 (0.46)",
                 "47.50 (1.30)", "(capped at 1 epoch)"):  # fmt: skip
        assert text in md
    assert "Tiny ImageNet deep" in readme.read_text() and "none" not in readme.read_text()
    capsys.readouterr()
    assert main(args) == 0
    assert "4 already measured, 0 to run" in capsys.readouterr().out


def test_a_failing_report_does_not_hide_why_the_runs_stopped(tmp_path, mnist_root, monkeypatch):
    def fail(job, request, dataset):
        raise BrainPropError("the run failed: fix it")

    def no_report(out):
        raise BrainPropError("cannot write the report: free disk space")

    monkeypatch.setattr(ex, "_train", fail)
    monkeypatch.setattr(report, "write_report", no_report)
    request = _dense_request(tmp_path, mnist_root, ("ebp",))
    lines: list[str] = []
    with pytest.raises(BrainPropError, match="the run failed"):
        reproduce(request, say=lines.append)
    assert lines[-1] == "report not rewritten: cannot write the report: free disk space"
    # With nothing else going wrong, the report's own error is the one to see.
    monkeypatch.setattr(ex, "_train", _fake_train([]))
    with pytest.raises(BrainPropError, match="cannot write the report"):
        reproduce(request, say=lines.append)


def test_a_stop_after_the_last_worker_ended_still_stops(tmp_path, mnist_root, monkeypatch):
    first, second = plan([DENSE], ["brainprop", "ebp"], 1, max_epochs=1)
    request = Request(out=tmp_path, data_dir=str(mnist_root), device="cpu", progress=False)
    real_wait = ex.wait

    def wait_then_signal(sentinels, timeout):
        ended = real_wait(sentinels, timeout)
        if ended:  # the only worker just ended: the signal lands before the next one starts
            os.kill(os.getpid(), signal.SIGTERM)
        return ended

    monkeypatch.setattr(ex, "wait", wait_then_signal)
    outcome = ex.Outcome()
    with pytest.raises(signals.Interrupted, match="SIGTERM; no run was in progress") as info:
        ex._run_in_workers(request, [(first,), (second,)], [], outcome, lambda _: None)
    assert info.value.exit_status == 128 + signal.SIGTERM
    assert outcome.ran == [first.name] and not (tmp_path / RUNS / second.name).exists()


def test_a_second_signal_leaves_the_parent_waiting_for_its_workers(
    tmp_path, mnist_root, monkeypatch
):
    """It said "stopped at once", but the process still waited for its workers as it exited,
    and a Ctrl-C meanwhile printed a traceback (a review): quitting would leave them
    unwatched, and a second stop passed on would cost them their checkpoints."""
    (job,) = plan([DENSE], ["ebp"], 1, max_epochs=1)
    request = Request(out=tmp_path, data_dir=str(mnist_root), device="cpu", progress=False)

    def signal_twice(sentinels, timeout):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        return []

    monkeypatch.setattr(signals, "SAME_STOP_S", 0.0)  # the second sent later than the first
    monkeypatch.setattr(ex, "wait", signal_twice)
    lines: list[str] = []
    with pytest.raises(signals.Interrupted, match="^stopped by SIGTERM; ") as info:
        ex._run_in_workers(request, [(job,)], [], ex.Outcome(), lines.append)
    assert info.value.exit_status == 128 + signal.SIGTERM
    assert "SIGTERM again: still waiting for the runs in progress to save their state" in lines


def test_a_worker_killed_by_a_signal_is_named_so_and_the_others_are_said_to_resume(tmp_path):
    """ "ended with exit status -9" named neither the kill nor what became of the other runs,
    stopped with it (a review)."""

    class Killed:
        pid, exitcode = 4321, -signal.SIGKILL

        def join(self) -> None:
            pass

    class Silent:
        def poll(self) -> bool:
            return False

    outcome = ex.Outcome()
    pool = ex._Workers(Request(out=tmp_path, device="cpu"), None, True, [], outcome,
                       lambda _: None)  # fmt: skip
    pool.running[7] = ((RunSpec(DENSE, "ebp", 0),), Killed(), Silent())
    assert pool.reap([7]) == [
        "mnist-dense-ebp-s0 was killed by SIGKILL (as the kernel does when memory runs out: "
        "check the free memory, or pass fewer --jobs)"
    ]
    assert ex._ended("x", -signal.SIGSEGV) == "x was killed by SIGSEGV"
    assert ex._ended("x", 3) == "x ended with exit status 3"
    # One stopped by a signal of its own (a scheduler's SIGTERM that reached it before its
    # parent) saved its state: no failure, but a stop of the session (a review: "ended with
    # exit status 143", exit status 2).
    Killed.exitcode = 128 + signal.SIGTERM
    pool.running[8] = ((RunSpec(DENSE, "ebp", 1),), Killed(), Silent())
    assert pool.reap([8]) == []
    assert (pool.stopped_by, pool.stopped) == (signal.SIGTERM, ["mnist-dense-ebp-s1"])
    # A signal in a run's last step lets it end: it is recorded, as a completed run is.
    done = RunSpec(DENSE, "ebp", 2)
    _fake_train([])((done,), Request(out=tmp_path, device="cpu"), None)
    pool.running[9] = ((done,), Killed(), Silent())
    assert pool.reap([9]) == [] and outcome.ran == [done.name]
    assert pool.stopped == ["mnist-dense-ebp-s1"]
    assert ex._failed(["x failed"], []) == "x failed"
    assert ex._failed(["x failed"], ["y", "z"]) == (
        "x failed; y, z stopped as well, each saving its state: once the failure is mended, "
        "the same 'brainprop reproduce' command continues"
    )


def test_a_worker_gets_one_stop_however_many_signals_the_parent_gets(tmp_path, monkeypatch):
    """A second signal while the workers save their checkpoints (the first signal's stop) would
    pass a second stop on (review). The stop is the relay, never a second SIGTERM to a worker
    that a scheduler's SIGTERM reached already."""
    kills = []
    monkeypatch.setattr(ex.os, "kill", lambda pid, signum: kills.append((pid, signum)))

    class Worker:
        pid = 4321

        def is_alive(self) -> bool:
            return True

        def join(self) -> None:
            pass

    pool = ex._Workers(Request(out=tmp_path, device="cpu"), None, True, [], ex.Outcome(),
                       lambda _: None)  # fmt: skip
    pool.running[7] = ((), Worker(), None)
    pool.terminate()  # the first signal's stop
    pool.signal_all()  # the second signal's
    assert kills == [(Worker.pid, signals.RELAY)]


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda s, h, c: (s.pop("best_val_acc"), None)[1], "best_val_acc is missing"),
        (lambda s, h, c: h.append({"epoch": 1}), "holds val_acc None, not an"),
        (lambda s, h, c: h.append({"val_acc": 1.5, "test_acc": 0.5}), "val_acc 1.5, not an"),
        (lambda s, h, c: s.update({"stack_size": math.inf}), "cannot convert float infinity"),
    ],
)
def test_a_finished_run_that_cannot_be_recorded_is_refused_before_anything_trains(
    tmp_path, damage, named
):
    """A run directory with a summary but no measurement (stopped before it was recorded, or
    copied in) is recorded as the request starts: what load_measurements would refuse later
    is refused then, naming the directory, and no file is written."""
    spec = RunSpec(DENSE, "ebp", 0)
    request = Request(cells=(DENSE,), rules=("ebp",), seeds=1, out=tmp_path, device="cpu")
    _fake_train([])((spec,), request, None)
    run_dir = tmp_path / RUNS / spec.name
    files = [run_dir / name for name in (rundir.SUMMARY, rundir.HISTORY_JSON, rundir.CONFIG)]
    summary, history, config = (json.loads(f.read_text()) for f in files)
    history.append({"val_acc": 0.5, "test_acc": 0.5})
    damage(summary, history, config)
    for f, content in zip(files, (summary, history, config), strict=True):
        f.write_text(json.dumps(content))
    with pytest.raises(BrainPropError) as e:
        reproduce(request, say=lambda _: None)
    assert str(e.value).startswith(f"{run_dir} finished but cannot be recorded (")
    assert named in str(e.value)
    assert str(e.value).endswith(
        f"move {run_dir} out of {tmp_path / RUNS} to train that run afresh"
    )
    assert not list(tmp_path.glob("measurements/*"))


def test_a_request_takes_its_folder_as_text_and_refuses_impossible_counts(tmp_path):
    assert Request(out=str(tmp_path)).out == tmp_path
    for field, value, message in [
        ("jobs", 0, "--jobs must be >= 1, got 0"),
        ("stack", -1, "--stack must be >= 1, got -1"),
        ("budget_minutes", math.nan, "--budget-minutes must be > 0, got nan"),
    ]:
        with pytest.raises(BrainPropError, match=f"^{message}$"):
            Request(out=tmp_path, **{field: value})
