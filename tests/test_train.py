"""The training loop: outputs, reproducibility, checkpoints, held-out validation, NaN stops."""

import dataclasses
import importlib
import inspect
import json
import math
import re
import sys
import time
import types

import numpy as np
import pytest
import torch
from conftest import make_tiny_dataset
from data_fixtures import write_idx_dataset
from memory_errors import OUT_OF_MEMORY
from own_rules import FailsLater, SquaredError
from reliability_helpers import recorded_outputs
from torch import nn

from brainprop import TrainConfig, checkpoint, devices, evaluate, evaluation, load_model, train
from brainprop.cli import main
from brainprop.data import Dataset
from brainprop.data.batches import num_batches, ordered_batches, permuted_batches, to_float
from brainprop.data.dataset import split_validation
from brainprop.errors import BrainPropError
from brainprop.evaluation import accuracy
from brainprop.objectives import EBP, OBJECTIVES, make_objective
from brainprop.presets import ARCHITECTURES, PRESETS, Hyperparameters, build_model
from brainprop.rundir import write_history
from brainprop.step import make_optimizer, train_step
from brainprop.train import MEASURED_COLUMNS, check_one_image_steps

train_module = importlib.import_module("brainprop.train")


def _config(tmp_path, **kw):
    base = dict(
        dataset="mnist",
        arch="conv",
        epochs=3,
        batch_size=16,
        out_dir=str(tmp_path),
        name="run",
        seed=1,
    )
    return TrainConfig(**{**base, **kw})


def test_training_learns_and_writes_a_complete_run_directory(tmp_path, tiny_dataset):
    run = train(_config(tmp_path), dataset=tiny_dataset, progress=False)
    names = {p.name for p in run.dir.iterdir()}
    assert {"config.json", "history.csv", "history.json", "best.pt", "last.pt", "accuracy.png",
            "summary.json"} <= names  # fmt: skip
    history = json.loads((run.dir / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert (run.dir / "history.csv").read_text().splitlines()[0].startswith("epoch,lr,train_loss")
    summary = json.loads((run.dir / "summary.json").read_text())
    assert summary["best_val_acc"] == max(h["val_acc"] for h in history)
    assert summary["test_acc_at_best"] == summary["best_val_acc"]
    assert summary["epochs_run"] == 3 and summary["stop_reason"] == "max epochs"
    assert summary["best_val_acc"] > 0.6  # 4 classes: chance is 0.25
    assert json.loads((run.dir / "config.json").read_text())["lr"] == 0.1  # resolved from table
    # Each epoch's memory: the process's peak resident set during it and its size at the end.
    for h in history:
        assert 0 < h["host_rss_mib"] <= h["peak_memory_mib"] < 2**20
    assert "peak_memory_mib,host_rss_mib" in (run.dir / "history.csv").read_text()


def test_a_rule_registered_by_name_trains_from_the_library_and_the_cli(
    tmp_path, tiny_dataset, monkeypatch, capsys
):
    monkeypatch.setitem(OBJECTIVES, "squared-error", lambda epsilon, fused: SquaredError())
    run = train(_config(tmp_path, rule="squared-error"), dataset=tiny_dataset, progress=False)
    assert run.config.rule == "squared-error" and run.summary["best_val_acc"] > 0.6
    assert evaluate(run.dir, dataset=tiny_dataset)["test_acc"] == run.summary["test_acc_at_best"]
    write_idx_dataset(tmp_path / "data" / "mnist", n_train=64, n_test=16)
    monkeypatch.setenv("BRAINPROP_DATA", str(tmp_path / "data"))
    argv = ["train", "--rule", "squared-error", "--arch", "dense", "--epochs", "1", "--quiet",
            "--batch-size", "16", "--device", "cpu", "--out", str(tmp_path / "cli")]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    with pytest.raises(BrainPropError, match="unknown rule 'hebb': choose one of brainprop, ebp, "
                       "squared-error; a name of your own"):  # fmt: skip
        TrainConfig(rule="hebb").resolve()


class _NoFlag:
    def __call__(self, q, y, generator=None):
        return q.sum()


@pytest.mark.parametrize(
    "made", [_NoFlag(), SquaredError, None], ids=["no-flag", "a-class", "none"]
)
def test_a_registered_rule_that_makes_no_objective_is_refused_in_one_line(
    tmp_path, tiny_dataset, monkeypatch, made
):
    monkeypatch.setitem(OBJECTIVES, "odd", lambda epsilon, fused: made)
    with pytest.raises(
        BrainPropError, match=r"^rule 'odd' made .+, which is no Objective: make an instance "
    ):
        train(_config(tmp_path, rule="odd"), dataset=tiny_dataset, progress=False)
    assert not (tmp_path / "run").exists()


class _Broken(SquaredError):
    """The squared-error rule with one of a user's mistakes."""

    def __init__(self, mistake):
        self.mistake = mistake

    def __call__(self, q, y, generator=None):
        out = super().__call__(q, y, generator)
        if self.mistake == "per-example loss":
            return dataclasses.replace(out, loss=((q - 1) ** 2).mean(1))
        if self.mistake == "a bare tensor":
            return out.loss
        if self.mistake == "no explored":
            return dataclasses.replace(out, explored=None)
        if self.mistake == "detached loss":
            return dataclasses.replace(out, loss=out.loss.detach())
        if self.mistake == "int32 actions":
            return dataclasses.replace(out, actions=out.actions.int())
        # A one-hot of one class too few: it fails on the last class's label alone.
        torch.nn.functional.one_hot(y, q.shape[1] - 1)
        return out


@pytest.mark.parametrize(
    "mistake, said",
    [
        ("per-example loss", r"returned a loss of \[4\], not a float scalar"),
        ("a bare tensor", r"returned a Tensor, not a brainprop.Output"),
        ("no explored", r"returned explored NoneType, not \[4\] bool"),
        ("detached loss", r"returned a loss without a gradient to the Q-values"),
        ("int32 actions", r"returned actions \[4\] torch.int32, not \[4\] int64"),
        ("raises", r"failed on a test batch of 4 Q-values and labels: RuntimeError: .+ \(.+"
         r"test_train.py:\d+\)$"),
    ],
)  # fmt: skip
def test_a_rule_of_ones_own_that_fails_or_returns_no_output_is_one_line_before_the_run(
    tmp_path, tiny_dataset, monkeypatch, mistake, said
):
    """A run of it would end its first step in a traceback, its run directory left behind."""
    monkeypatch.setitem(OBJECTIVES, "broken", lambda epsilon, fused: _Broken(mistake))
    where = "" if mistake == "raises" else rf"\({re.escape(__file__)}:\d+\) "
    with pytest.raises(BrainPropError, match="^rule 'broken' " + where + said):
        train(_config(tmp_path, rule="broken"), dataset=tiny_dataset, progress=False)
    assert not (tmp_path / "run").exists()


@OUT_OF_MEMORY
def test_a_rule_of_ones_own_that_runs_out_of_memory_is_left_to_the_advice(
    tmp_path, tiny_dataset, monkeypatch, out_of_memory
):
    error = out_of_memory()

    def rule(q, y, generator=None):
        raise error

    rule.sums_over_nominal_batch = False
    monkeypatch.setitem(OBJECTIVES, "greedy", lambda epsilon, fused: rule)
    with pytest.raises(type(error)) as raised:
        train(_config(tmp_path, rule="greedy"), dataset=tiny_dataset, progress=False)
    assert raised.value is error


class _NoGenerator(SquaredError):
    def __call__(self, q, y):  # no generator: training passes one
        return super().__call__(q, y)


def test_a_rule_of_ones_own_called_with_what_it_does_not_take_names_its_definition(
    tmp_path, tiny_dataset, monkeypatch
):
    """No frame of the error is its own: the library's line alone was named (a helper's
    walkthrough)."""
    monkeypatch.setitem(OBJECTIVES, "no-generator", lambda epsilon, fused: _NoGenerator())
    said = (
        r"^rule 'no-generator' failed on a test batch .+: TypeError: .+ takes 3 positional "
        r"arguments but 4 were given \(.+objectives.py:\d+, calling the code .+test_train.py:"
        rf"{inspect.getsourcelines(_NoGenerator)[1]} defines: check its parameters and what it "
        r"returns\)$"
    )
    with pytest.raises(BrainPropError, match=said):
        train(_config(tmp_path, rule="no-generator"), dataset=tiny_dataset, progress=False)


def test_a_rule_of_ones_own_that_fails_on_a_later_batch_is_one_line_and_the_run_resumes(
    tmp_path, tiny_dataset, monkeypatch
):
    """16 steps an epoch: its 20th call is in epoch 2, after epoch 1's checkpoint."""
    monkeypatch.setitem(OBJECTIVES, "later", lambda epsilon, fused: FailsLater(at=20))
    config = _config(tmp_path, rule="later")
    with pytest.raises(BrainPropError) as failed:
        train(config, dataset=tiny_dataset, progress=False)
    # Registered from Python, not by a --plugin: the command line would not know the rule.
    run = tmp_path / "run"
    assert re.fullmatch(
        r"rule 'later' failed in epoch 2: ZeroDivisionError: division by zero \(.+own_rules"
        rf"\.py:\d+\): fix it; {re.escape(str(run / 'last.pt'))} keeps the last good state: "
        rf"continue with train\(resume={re.escape(repr(str(run)))}\) in a process that "
        "registers the mended code",
        str(failed.value),
    )
    monkeypatch.setitem(OBJECTIVES, "later", lambda epsilon, fused: SquaredError())
    run = train(config, resume=tmp_path / "run", dataset=tiny_dataset, progress=False)
    assert [h["epoch"] for h in run.history] == [1, 2, 3]


def test_an_error_in_the_librarys_code_keeps_its_traceback(tmp_path, tiny_dataset, monkeypatch):
    """A bug, to report as it is, even in a run of a rule of one's own."""
    monkeypatch.setitem(OBJECTIVES, "mine", lambda epsilon, fused: SquaredError())

    def tally(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(train_module, "tally", tally)
    with pytest.raises(RuntimeError, match="^a bug$"):
        train(_config(tmp_path, rule="mine"), dataset=tiny_dataset, progress=False)


def test_trying_a_rule_of_ones_own_changes_none_of_the_runs_draws(
    tmp_path, tiny_dataset, monkeypatch
):
    """EBP under another name trains as EBP does, bit for bit, dropout masks included: the try
    before the run draws from streams of its own and leaves the global ones as they were."""
    monkeypatch.setitem(OBJECTIVES, "ebp-too", lambda epsilon, fused: EBP())
    runs = [
        train(_config(tmp_path, rule=rule, epochs=2, name=rule), dataset=tiny_dataset,
              progress=False)
        for rule in ("ebp", "ebp-too")
    ]  # fmt: skip
    ebp, too = (r.model.state_dict() for r in runs)
    assert all(torch.equal(ebp[k], too[k]) for k in ebp)


def test_the_summary_names_ops_that_ran_in_tf32(tmp_path, tiny_dataset, monkeypatch):
    """Not the paper's fp32, so the report keeps such runs apart; fp32 on a CPU is unmarked."""
    plain = train(_config(tmp_path, epochs=1), dataset=tiny_dataset, progress=False)
    assert "tf32" not in plain.summary
    seen = []

    def tf32_ops(device, bf16, model):
        seen.append((device.type, bf16, type(model).__name__))
        return ["convolutions"]

    monkeypatch.setattr(train_module, "tf32_ops", tf32_ops)
    run = train(_config(tmp_path, epochs=1, name="tf32"), dataset=tiny_dataset, progress=False)
    assert run.summary["tf32"] == ["convolutions"] and seen == [("cpu", False, "Sequential")]
    assert json.loads((run.dir / "summary.json").read_text())["tf32"] == ["convolutions"]


def test_history_csv_holds_every_rows_columns(tmp_path):
    """A run resumed from an older version has early rows without the newer columns."""
    old, new = {"epoch": 1, "val_acc": 0.5}, {"epoch": 2, "val_acc": 0.6, "host_rss_mib": 9.5}
    write_history(tmp_path, [old, new])
    assert (tmp_path / "history.csv").read_text().splitlines() == [
        "epoch,val_acc,host_rss_mib", "1,0.5,", "2,0.6,9.5",
    ]  # fmt: skip


def test_same_seed_gives_bit_identical_weights(tmp_path, tiny_dataset):
    a = train(_config(tmp_path, epochs=2, name="a"), dataset=tiny_dataset, progress=False)
    b = train(_config(tmp_path, epochs=2, name="b"), dataset=tiny_dataset, progress=False)
    c = train(_config(tmp_path, epochs=2, name="c", seed=2), dataset=tiny_dataset, progress=False)
    weights = [r.model.state_dict() for r in (a, b, c)]
    for name, p in weights[0].items():
        assert torch.equal(p, weights[1][name]), name
    assert any(not torch.equal(p, weights[2][name]) for name, p in weights[0].items())


def test_resume_continues_bit_identically(tmp_path, tiny_dataset):
    full = train(_config(tmp_path, epochs=4, name="full"), dataset=tiny_dataset, progress=False)
    part = train(_config(tmp_path, epochs=2, name="part"), dataset=tiny_dataset, progress=False)
    resumed = train(
        _config(tmp_path, epochs=4), resume=part.dir, dataset=tiny_dataset, progress=False
    )
    assert resumed.dir == part.dir
    for name, p in full.model.state_dict().items():
        assert torch.equal(p, resumed.model.state_dict()[name]), name

    def strip(history):
        return [{k: v for k, v in h.items() if k not in MEASURED_COLUMNS} for h in history]

    assert strip(resumed.history) == strip(full.history)


def test_checkpoint_round_trip_and_evaluate(tmp_path, tiny_dataset):
    run = train(_config(tmp_path), dataset=tiny_dataset, progress=False)
    state = torch.load(run.dir / "best.pt", weights_only=True)
    assert state["epoch"] == run.summary["best_epoch"]
    before = torch.get_rng_state()
    model, _ = load_model(run.dir)
    assert torch.equal(torch.get_rng_state(), before)  # its weights are the checkpoint's
    ds = tiny_dataset
    assert accuracy(model, ds.test_x, ds.test_y) == run.summary["best_val_acc"]
    result = evaluate(run.dir, dataset=ds, device="cpu")
    assert result["test_acc"] == run.summary["test_acc_at_best"]
    assert result["checkpoint"] == str(run.dir / "best.pt")  # the file read, not its folder
    # Ready to score as it is handed over: BatchNorm's running statistics, no dropout.
    assert not any(m.training for m in model.modules())
    with pytest.raises(BrainPropError, match="inputs"):
        evaluate(run.dir, dataset=make_tiny_dataset(size=12), device="cpu")


def test_data_of_ones_own_is_named_in_the_runs_messages_and_summary(tmp_path, tiny_dataset, capsys):
    """It trains with config.dataset's settings, so both are named."""
    mine = dataclasses.replace(tiny_dataset, name="mine")
    run = train(_config(tmp_path, epochs=1), dataset=mine)
    assert "training conv on 'mine' (mnist's settings) with brainprop (" in capsys.readouterr().out
    assert (run.summary["dataset"], run.summary["data"]) == ("mnist", "mine")
    mnist = train(_config(tmp_path, epochs=1, name="mnist"), dataset=tiny_dataset)
    assert "data" not in mnist.summary
    with pytest.raises(BrainPropError) as info:
        train(_config(tmp_path, batch_size=512, name="big"), dataset=mine)
    assert str(info.value) == (
        "--batch-size 512 is more than the 256 training images of 'mine' (mnist's settings): "
        "pass at most 256"
    )


@pytest.mark.parametrize(
    "read_back",
    [
        lambda weight: weight.abs().max().item(),  # RuntimeError on meta
        lambda weight: np.asarray(weight).max(),  # TypeError on meta (a review)
    ],
)
def test_a_network_whose_builder_reads_a_weight_back_is_evaluated(
    tmp_path, tiny_dataset, monkeypatch, read_back
):
    # Such a builder cannot run on the meta device, where load_model sizes a network first.
    def reads_back(net, num_classes, dropout):
        net.flatten()
        net.dense(num_classes, relu=False)
        assert read_back(net.layers[-1].weight.detach()) >= 0

    monkeypatch.setitem(ARCHITECTURES, "reads-back", (reads_back, 0))
    table = {("mnist", "reads-back"): Hyperparameters(lr=0.1, init_std=0.05, dropout=())}
    monkeypatch.setitem(PRESETS, "reads-back", table)
    config = _config(tmp_path, arch="reads-back", preset="reads-back", epochs=1)
    run = train(config, dataset=tiny_dataset, progress=False)
    result = evaluate(run.dir, dataset=tiny_dataset, device="cpu")
    assert result["test_acc"] == run.summary["test_acc_at_best"]


def test_held_out_validation_reports_test_accuracy_separately(tmp_path, tiny_dataset, capsys):
    run = train(_config(tmp_path, val=56, epochs=2), dataset=tiny_dataset)
    # The opening line names what departs from the paper's setup.
    assert "training conv on mnist with brainprop, 56 images held out (" in capsys.readouterr().out
    assert run.summary["test_acc_at_best"] == run.history[run.summary["best_epoch"] - 1]["test_acc"]
    # Scored on the test split, not the held-out images: best.pt's accuracy there.
    best, _ = load_model(run.dir)
    test_acc = accuracy(best, tiny_dataset.test_x, tiny_dataset.test_y)
    assert run.summary["test_acc_at_best"] == test_acc
    with pytest.raises(BrainPropError, match="would hold out all 256"):
        train(_config(tmp_path, val=256, name="x"), dataset=tiny_dataset, progress=False)
    # Called from Python, no option parser checks n (review): perm[:-0] would train on nothing.
    for n in (0, -3):
        with pytest.raises(BrainPropError, match=rf"--val {n} is no number of images to hold"):
            split_validation(tiny_dataset, n)


def test_short_last_batch_takes_a_proportional_brainprop_step(tmp_path):
    """Keras divides BrainProp's summed loss by the nominal batch: batch 4 on 2 images = half lr.

    One step on its own: a batch larger than the whole training set is refused, so a short
    batch is only ever an epoch's last."""
    ds = make_tiny_dataset(n_train=2)
    x, y = to_float(ds.train_x), ds.train_y

    def stepped(rule, batch_size, lr):
        cfg = _config(tmp_path, rule=rule, batch_size=batch_size, lr=lr, epsilon=0.0,
                      dropout=(0.0,)).resolve()  # fmt: skip
        init = torch.Generator().manual_seed(0)
        model = build_model(cfg.arch, ds.input_shape, 4, cfg.hyperparameters(), init)
        objective = make_objective(rule, cfg.epsilon)
        optimizer = make_optimizer(model, cfg)
        train_step(model, objective, optimizer, x, y, generator=None, batch_size=batch_size)
        return model.state_dict()

    for rule, lr_at_4 in (("brainprop", 0.2), ("ebp", 0.1)):
        # EBP averages over the actual batch, as Keras's cross-entropy
        a, b = stepped(rule, 4, lr_at_4), stepped(rule, 2, 0.1)
        for name, p in a.items():
            torch.testing.assert_close(p, b[name], rtol=1e-6, atol=1e-9)


def test_a_bf16_step_hands_the_objective_fp32_outputs(tmp_path):
    """BrainProp's delta r - Q_s, its loss and the gradient it sends down are fp32 sums, not
    bf16's three significant digits, as in the fp32 master weights they update."""
    cfg = _config(tmp_path, bf16=True).resolve()
    ds = make_tiny_dataset(n_train=16)
    model = build_model(cfg.arch, ds.input_shape, 4, cfg.hyperparameters())
    brainprop, seen = make_objective("brainprop", cfg.epsilon), []

    class Spy:
        sums_over_nominal_batch = brainprop.sums_over_nominal_batch

        def __call__(self, q, y, generator=None):
            seen.append(q.dtype)
            return brainprop(q, y, generator)

    out = train_step(model, Spy(), make_optimizer(model, cfg), to_float(ds.train_x), ds.train_y,
                     generator=None, batch_size=16, bf16=True)  # fmt: skip
    assert seen == [torch.float32] and out.loss.dtype == torch.float32


def test_the_loop_halves_the_lr_on_schedule_and_explores_at_the_configured_rate(
    tmp_path, tiny_dataset
):
    """lr_at alone was tested, and every run here stopped before its first halving; the
    configured epsilon reached the step only through a two-process test (review)."""
    run = train(_config(tmp_path, lr_halving_epochs=1, epsilon=0.5), dataset=tiny_dataset,
                progress=False)  # fmt: skip
    assert [h["lr"] for h in run.history] == pytest.approx([0.1, 0.05, 0.025])
    # 16 batches of 16 per epoch: a rate of 0.5 draws 0.5 +- 0.1 in every epoch.
    assert all(0.35 < h["explore_rate"] < 0.65 for h in run.history)
    still = train(_config(tmp_path, name="still", lr_halving_epochs=2, epsilon=0.0),
                  dataset=tiny_dataset, progress=False)  # fmt: skip
    assert [h["lr"] for h in still.history] == pytest.approx([0.1, 0.1, 0.05])
    assert all(h["explore_rate"] == 0 for h in still.history)


def test_early_stopping_watches_the_validation_accuracy(tmp_path, tiny_dataset, monkeypatch):
    """Patience counts epochs without a better validation accuracy, whatever the training
    reward does; the best is the first of equals (review: any value stopped the runs here)."""
    scores = iter([0.5, 0.6, 0.6, 0.55, 0.7])

    def scripted(trainer):
        return train_module.Scores(next(scores), 0.1, 0.0)

    monkeypatch.setattr(train_module, "score_epoch", scripted)
    run = train(_config(tmp_path, epochs=5, patience=2, min_delta=0.0), dataset=tiny_dataset,
                progress=False)  # fmt: skip
    assert [h["val_acc"] for h in run.history] == [0.5, 0.6, 0.6, 0.55]
    assert run.summary["stop_reason"] == "early stopping" and run.summary["best_epoch"] == 2
    assert checkpoint.load(run.dir / "best.pt")["epoch"] == 2  # not rewritten at the tie
    # evaluate names the best epoch it scored, not the last one or the cap.
    assert evaluate(run.dir, dataset=tiny_dataset, device="cpu")["epoch"] == 2
    # A gain under min_delta is none to patience: 0.6 does not improve on 0.5 by 0.15.
    scores = iter([0.5, 0.6, 0.6, 0.6, 0.6])
    run = train(_config(tmp_path, name="delta", epochs=5, patience=2, min_delta=0.15),
                dataset=tiny_dataset, progress=False)  # fmt: skip
    assert len(run.history) == 3 and run.summary["stop_reason"] == "early stopping"


def test_l2_is_keras_semantics_on_weights_only(tmp_path, tiny_dataset):
    cfg = _config(tmp_path, l2=5e-4).resolve()
    run = train(_config(tmp_path, epochs=1, l2=5e-4), dataset=tiny_dataset, progress=False)
    groups = make_optimizer(run.model, cfg).param_groups
    assert [g["weight_decay"] for g in groups] == [1e-3, 0.0]  # d(lambda w^2)/dw = 2 lambda w
    # Keras regularises the kernels alone: not BatchNorm's scale and shift.
    kernels = [
        m.weight for m in run.model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)
    ]
    batchnorm = [
        p
        for m in run.model.modules()
        if isinstance(m, torch.nn.BatchNorm2d)
        for p in m.parameters()
    ]
    assert len(kernels) == 4 and len(batchnorm) == 4
    assert [id(p) for p in groups[0]["params"]] == [id(p) for p in kernels]
    assert [id(p) for p in groups[1]["params"]] == [id(p) for p in batchnorm]
    assert cfg.weight_decay == 1e-3
    with pytest.raises(ValueError, match="resolve"):
        _config(tmp_path).weight_decay  # noqa: B018 (l2 still None: the preset decides)


def test_bf16_on_cpu_really_runs_in_bf16_and_still_learns(tmp_path, tiny_dataset):
    fp32 = train(_config(tmp_path, epochs=2, name="fp32"), dataset=tiny_dataset, progress=False)
    bf16 = train(
        _config(tmp_path, epochs=2, name="bf16", bf16=True), dataset=tiny_dataset, progress=False
    )
    # A flag the CPU ignored would give bit-identical weights.
    assert any(
        not torch.equal(p, fp32.model.state_dict()[name])
        for name, p in bf16.model.state_dict().items()
    )
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())  # fp32 master weights
    assert bf16.summary["best_val_acc"] > 0.6  # 4 classes: chance is 0.25


def test_evaluate_scores_a_bf16_run_in_bf16(tmp_path, tiny_dataset, monkeypatch):
    """As its validation accuracies were scored in training, so that its test accuracy is the
    one its summary reports."""
    run = train(_config(tmp_path, epochs=1, bf16=True), dataset=tiny_dataset, progress=False)
    precisions = []

    def spy(model, x, y, bf16=False):
        precisions.append(bf16)
        return accuracy(model, x, y, bf16)

    monkeypatch.setattr(evaluation, "accuracy", spy)
    result = evaluate(run.dir, dataset=tiny_dataset, device="cpu")
    assert precisions == [True]
    assert result["test_acc"] == run.summary["test_acc_at_best"]


def test_bf16_where_it_is_slow_is_said_by_train_and_evaluate(
    tmp_path, tiny_dataset, monkeypatch, capsys
):
    monkeypatch.setattr(devices, "bf16_warning", lambda device: "no bf16 here")
    run = train(_config(tmp_path, epochs=1, bf16=True), dataset=tiny_dataset, progress=False)
    assert capsys.readouterr().err == "brainprop: no bf16 here\n"
    evaluate(run.dir, dataset=tiny_dataset, device="cpu")
    assert capsys.readouterr().err == "brainprop: no bf16 here\n"
    train(_config(tmp_path, epochs=1, name="fp32"), dataset=tiny_dataset, progress=False)
    assert capsys.readouterr().err == ""


def test_an_epochs_train_metrics_are_its_steps_means_over_its_images(
    tmp_path, tiny_dataset, monkeypatch
):
    """Each step weighs by its images: at batch 24 the epoch's last of 256 images is short."""
    outputs = recorded_outputs(monkeypatch)
    run = train(_config(tmp_path, epochs=1, batch_size=24), dataset=tiny_dataset, progress=False)
    assert [len(out.rewards) for out in outputs] == [24] * 10 + [16]
    loss = sum(float(out.loss.detach()) * len(out.rewards) for out in outputs) / 256
    reward = sum(float(out.rewards.sum()) for out in outputs) / 256
    explored = sum(float(out.explored.sum()) for out in outputs) / 256
    [row] = run.history
    assert row["train_loss"] == pytest.approx(loss, rel=1e-5)
    assert row["train_reward"] == pytest.approx(reward, rel=1e-6)
    assert row["explore_rate"] == pytest.approx(explored, rel=1e-6)


def test_the_epochs_seconds_add_up_to_less_than_the_run(tmp_path, tiny_dataset):
    """Each epoch's clock starts at zero: what the report's s/epoch and total time read."""
    began = time.perf_counter()
    run = train(_config(tmp_path, epochs=8), dataset=tiny_dataset, progress=False)
    took = time.perf_counter() - began
    assert all(h["seconds"] > 0 and h["eval_seconds"] > 0 for h in run.history)
    assert sum(h["seconds"] + h["eval_seconds"] for h in run.history) < took


def test_a_tag_starts_every_line_and_hides_the_progress_bar(
    tmp_path, tiny_dataset, bars_opened, capsys
):
    """Runs that share a terminal (reproduce --jobs): each line says whose it is, and no bar
    overwrites another's."""
    bars = bars_opened(sys.modules["brainprop.train"])
    train(_config(tmp_path, epochs=2), dataset=tiny_dataset, tag="mnist-conv-brainprop-s1")
    lines = capsys.readouterr().out.splitlines()
    assert sum(": epoch " in line for line in lines) == 2 and len(lines) == 4, lines
    assert all(line.startswith("mnist-conv-brainprop-s1: ") for line in lines), lines
    assert not any(line.count("mnist-conv-brainprop-s1: ") > 1 for line in lines), lines
    assert bars == [(True, "epoch 1"), (True, "epoch 2")]
    train(_config(tmp_path, epochs=1, name="untagged"), dataset=tiny_dataset)
    assert capsys.readouterr().out.startswith("training conv")
    assert bars[2:] == [(None, "epoch 1")]


def test_a_tagged_line_is_written_whole(monkeypatch):
    """Workers that share a pipe or file then never cut into each other's lines."""
    writes: list[str | None] = []

    class Out:
        def write(self, text: str) -> None:
            writes.append(text)

        def flush(self) -> None:
            writes.append(None)

    monkeypatch.setattr(sys, "stdout", Out())
    say = sys.modules["brainprop.train"].printer(True, "run")
    say("epoch 1")
    say("epoch 2")
    assert writes == ["run: epoch 1\n", None, "run: epoch 2\n", None]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (dict(batch_size=257), "--batch-size 257 is more than the 256 training images of mnist"),
        (
            dict(batch_size=None, global_batch=257),
            "--global-batch 257 is more than the 256 training images",
        ),
        (
            dict(batch_size=250, val=10),
            "--batch-size 250 is more than the 246 training images of mnist left after holding "
            "out 10 for validation: pass at most 246 or hold out fewer images with --val",
        ),
    ],
)
def test_a_batch_larger_than_the_training_set_is_refused_before_anything_is_written(
    tmp_path, tiny_dataset, override, message
):
    with pytest.raises(BrainPropError) as info:
        train(_config(tmp_path / "runs", **override), dataset=tiny_dataset, progress=False)
    assert str(info.value).startswith(message)
    assert not (tmp_path / "runs").exists()
    # The whole training set in one step is still a batch.
    run = train(_config(tmp_path, epochs=1, batch_size=256), dataset=tiny_dataset, progress=False)
    assert run.summary["epochs_run"] == 1


def test_non_finite_loss_stops_with_epoch_and_step(tmp_path, tiny_dataset):
    run = train(_config(tmp_path, lr=1e30, init_std=1.0), dataset=tiny_dataset, progress=False)
    assert run.summary["stop_reason"].startswith("non-finite loss at epoch 1, step ")
    assert run.history == []


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (dict(lr=0.0), "--lr must be > 0"),
        (dict(lr=math.nan), "--lr must be > 0"),
        (dict(lr=1e39), r"--lr must lie in \[1.175e-38, 3.403e\+38\], the float32 range"),
        (dict(init_std=math.inf), r"--init-std must lie in \[1.175e-38, 3.403e\+38\]"),
        (dict(l2=1e308), r"--l2 must be 0 or lie in \[5.877e-39, 1.701e\+38\]"),
        (dict(min_delta=math.inf), r"--min-delta must lie in \[0, 1\), got inf"),
        (dict(epsilon=1.5), r"--epsilon must lie in \[0, 1\]"),
        (dict(batch_size=0), "--batch-size must be >= 1"),
        (dict(epochs=0), "--epochs must be >= 1"),
        (dict(dropout=(0.3, 1.0)), r"dropout rates must lie in \[0, 1\)"),
        # Too large for a float: the int was kept, and its :g failed (review).
        (dict(dropout=(0.3, 10**400)), r"dropout rates must lie in \[0, 1\), got 0.3, 1000"),
        (dict(lr=10**400), r"--lr must lie in \[1.175e-38, 3.403e\+38\].*, got 1000"),
        (dict(dropout=(0.1, 0.2, 0.3)), "has 2 dropout sites"),
        (dict(val="train"), "--val must be 'test'"),
        (dict(val=0), "--val must be 'test' or a positive number of held-out images, got 0"),
        (dict(patience=0), "--patience must be >= 1, got 0"),
        (dict(eager=True, cuda_graph=True), "--eager and --cuda-graph contradict each other"),
        (dict(arch="deep"), "no .deep. network for mnist: choose --arch from conv, dense, loccon"),
        (dict(dataset="imagenet"), "unknown dataset 'imagenet'"),
        (dict(rule="hebb"), "unknown rule 'hebb'"),
        (dict(device="cuda:7"), "device 'cuda:7' is not available"),
        (dict(seed=-1), r"--seed must lie in \[0, 4294967295\], got -1"),
        (dict(seed=2**32), r"--seed must lie in \[0, 4294967295\], got 4294967296"),
        (dict(seed=1.5), r"seed must be of type int, got a float \(1.5\)"),
        (dict(epochs="5"), r"epochs must be of type int, got a str \('5'\)"),
        (dict(lr="0.1"), r"lr must be of type float \| None, got a str \('0.1'\)"),
        (dict(dropout=0.3), r"dropout must .*got a float \(0.3\): a tuple of one rate per"),
        # A bool is an int and a float to Python: True would train one epoch, at a rate of 1.
        (dict(epochs=True), r"epochs must be of type int, got a bool \(True\)$"),
        (dict(lr=True), r"lr must be of type float \| None, got a bool \(True\)$"),
        (dict(dropout=(0.3, False)), r"dropout must be of type tuple\[float, ...\] \| None, got"),
        (dict(arch="dense", dropout=(0.5,)), "'dense' has no dropout sites: drop --dropout"),
    ],
)
def test_nonsense_configs_are_one_line_errors(override, message):
    with pytest.raises(BrainPropError, match=message) as info:
        TrainConfig(**{"dataset": "mnist", "arch": "conv", **override}).resolve()
    assert "\n" not in str(info.value)


def test_resolve_takes_the_global_batch_and_keeps_the_data_folder_absolute(tmp_path, monkeypatch):
    """One process trains on the whole global batch, as the several it stands for would; a
    relative data folder stored as given would name another one when the run is resumed or
    evaluated from elsewhere."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    base = dict(dataset="mnist", arch="conv")
    assert TrainConfig(**base, global_batch=64).resolve().batch_size == 64
    with pytest.raises(BrainPropError, match="--batch-size 32 and --global-batch 64 both set"):
        TrainConfig(**base, batch_size=32, global_batch=64).resolve()
    assert TrainConfig(**base, data_dir="d").resolve().data_dir == str(tmp_path / "d")
    assert TrainConfig(**base, data_dir="~/d").resolve().data_dir == str(tmp_path / "home" / "d")


def test_a_config_takes_numbers_and_text_of_any_kind(tmp_path, tiny_dataset):
    """numpy's scalars (np.float64 a float subclass, np.str_ a str one) were kept, and each
    checkpoint then held one, which a weights_only load refuses: evaluate and resume failed
    after the whole run (a review)."""
    config = TrainConfig(
        dataset=np.str_("mnist"), arch="dense", seed=np.int64(3), lr=np.float64(0.1),
        epsilon=np.float32(0.5), eager=np.bool_(False), epochs=1, min_delta=0,
        batch_size=32, out_dir=tmp_path, name="run",
    )  # fmt: skip
    resolved = config.resolve()
    kinds = {f.name: type(getattr(resolved, f.name)) for f in dataclasses.fields(resolved)}
    assert kinds["dataset"] is str and kinds["seed"] is int and kinds["eager"] is bool
    assert kinds["lr"] is float and kinds["epsilon"] is float and kinds["min_delta"] is float
    assert TrainConfig.from_dict(json.loads(json.dumps(resolved.to_dict()))) == resolved
    run = train(config, dataset=tiny_dataset, progress=False)
    assert evaluate(run, dataset=tiny_dataset)["epoch"] == 1


def test_text_of_a_kind_of_ones_own_is_stored_as_plain_text():
    """A str subclass (an enum of names, say) kept in the config would be pickled by its class
    into every checkpoint, which a weights_only load refuses: evaluate and resume would fail
    after the whole run."""

    class Name(str):
        pass

    resolved = TrainConfig(dataset=Name("mnist"), arch=Name("dense")).resolve()
    assert type(resolved.dataset) is str and type(resolved.arch) is str
    assert resolved.dataset == "mnist" and resolved.arch == "dense"


def test_a_value_whose_repr_spans_lines_is_named_by_its_type_alone():
    """A 2-D tensor's repr is short but two lines: the one-line error must stay one line."""
    with pytest.raises(BrainPropError) as info:
        TrainConfig(dataset="mnist", arch="conv", dropout=torch.zeros(2, 2)).resolve()
    assert str(info.value) == (
        "dropout must be of type tuple[float, ...] | None, got a Tensor: a tuple of one rate "
        "per dropout site, or of one for all: (0.3,)"
    )


def test_a_dataset_given_for_its_name_is_one_short_line(tiny_dataset):
    """Its repr filled 129 lines (a helper's walkthrough)."""
    with pytest.raises(BrainPropError) as info:
        TrainConfig(dataset=tiny_dataset).resolve()
    assert str(info.value) == (
        "dataset must be of type str, got a Dataset: the name of a registered dataset; a "
        "Dataset of one's own goes to train(config, dataset=...)"
    )


def test_config_round_trips_through_json():
    cfg = TrainConfig(dataset="cifar10", arch="deep", dropout=(0.1, 0.2, 0.3, 0.4)).resolve()
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(BrainPropError, match="unknown keys"):
        TrainConfig.from_dict({**cfg.to_dict(), "momentum": 0.9})


def test_a_stored_config_resolves_with_its_own_settings_and_a_partial_one_from_its_row():
    """A run's config.json holds every hyperparameter: resumed, it needs no preset row; one
    that lacks a hyperparameter (damaged, or of another version) still takes the row's."""
    own = TrainConfig(dataset="mnist", arch="deep", lr=0.05, lr_halving_epochs=10, batch_size=64,
                      init_std=0.01, l2=0.0, dropout=(0.1, 0.2, 0.3, 0.4))  # fmt: skip
    assert own.resolve(stored=True).lr == 0.05
    with pytest.raises(BrainPropError, match="no 'deep' network for mnist"):
        own.resolve()
    with pytest.raises(BrainPropError, match="no 'deep' network for mnist"):
        dataclasses.replace(own, l2=None).resolve(stored=True)
    with pytest.raises(BrainPropError, match="has 4 dropout sites, got 2 rates"):
        dataclasses.replace(own, dropout=(0.1, 0.2)).resolve(stored=True)


def test_plots_leave_the_callers_matplotlib_backend_alone(tmp_path) -> None:
    # A notebook's inline backend must survive train(), which writes the run's plots.
    import matplotlib
    from measurement_fixtures import write_measurement

    from brainprop.diagnostics import plot_diagnostics
    from brainprop.matrix import Cell, plan
    from brainprop.report import write_report
    from brainprop.rundir import write_plot

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        rows = [
            {"epoch": e, "train_reward": 0.5, "val_acc": 0.5, "test_acc": 0.4, "angle_wb/1": 3.0}
            for e in (1, 2)
        ]
        write_plot(tmp_path, rows, "run")
        plot_diagnostics(rows, tmp_path / "diagnostics.png")
        (spec,) = plan((Cell("mnist", "conv"),), ("ebp",), 1, None, None, "paper", False)
        write_measurement(tmp_path, spec, "cpu", test_acc=0.99)
        write_report(tmp_path)
        assert matplotlib.get_backend() == "svg"
        for png in ("diagnostics.png", "results.png"):
            assert (tmp_path / png).read_bytes().startswith(b"\x89PNG")
    finally:
        matplotlib.use(before)


def test_evaluation_and_diagnostics_give_each_module_its_own_mode_back() -> None:
    from brainprop.diagnostics import diagnostics

    model = build_model("conv", (1, 28, 28), 10)
    model.train()
    frozen = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    frozen.eval()  # a BatchNorm frozen in eval mode while the rest trains
    x = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    y = torch.randint(0, 10, (8,))
    accuracy(model, x, y)
    diagnostics(model, x.float() / 255, y, make_objective("brainprop"))
    assert model.training and not frozen.training


def test_accuracy_refuses_images_that_are_not_uint8() -> None:
    # They are scaled by 1/255 as the datasets hold them: a float batch, scaled already, would
    # be scaled twice, and in place, the caller's own tensor.
    model = build_model("dense", (1, 28, 28), 10)
    x = torch.rand(4, 1, 28, 28)
    with pytest.raises(ValueError, match="accuracy takes uint8 images as the datasets hold them"):
        accuracy(model, x, torch.zeros(4, dtype=torch.int64))


def test_folders_may_be_given_as_paths(tmp_path):
    config = TrainConfig(out_dir=tmp_path / "runs", data_dir=tmp_path).resolve()
    assert (config.out_dir, config.data_dir) == (str(tmp_path / "runs"), str(tmp_path))


def _small_images(n: int, side: int = 6) -> Dataset:
    g = torch.Generator().manual_seed(0)
    return Dataset(
        "mnist",
        torch.randint(0, 256, (n, 1, side, side), dtype=torch.uint8, generator=g),
        torch.randint(0, 4, (n,), generator=g),
        torch.randint(0, 256, (8, 1, side, side), dtype=torch.uint8, generator=g),
        torch.randint(0, 4, (8,), generator=g),
        4,
    )


def test_a_step_of_one_image_that_batchnorm_cannot_normalise_is_refused_before_training(
    tmp_path,
):
    """loccon on 6x6 images ends in a 1x1 map: a last step of one image failed inside torch
    at the end of the first epoch, with a raw traceback and a run folder without a checkpoint
    (review). A step of two images, or a map BatchNorm sees several values of, trains."""
    config = TrainConfig(dataset="mnist", arch="loccon", epochs=1, batch_size=16,
                         out_dir=str(tmp_path))  # fmt: skip
    with pytest.raises(BrainPropError) as info:
        train(config, dataset=_small_images(33), progress=False)
    assert str(info.value) == (
        "the last step of each epoch trains on 1 image (33 training images of mnist, 16 a "
        "step), where layer 5 (BatchNorm2d) would see one value per channel, which it cannot "
        "normalise in training: pass another --batch-size or --val-split"
    )
    assert not list(tmp_path.iterdir())
    with pytest.raises(BrainPropError, match=r"^every step trains on 1 image \(--batch-size 1\)"):
        train(dataclasses.replace(config, batch_size=1), dataset=_small_images(4), progress=False)
    assert train(config, dataset=_small_images(34), progress=False).summary["epochs_run"] == 1
    wide = train(config, dataset=_small_images(33, side=8), progress=False)
    assert wide.summary["epochs_run"] == 1


def test_one_image_a_process_is_refused_with_local_batchnorm_only(monkeypatch):
    """Each process's share of a step is its own BatchNorm's batch where the layers are not
    synchronised: 5 images over 4 processes leaves three of them one image each."""

    class Parallel:
        world_size, active = 4, True

    model = build_model("loccon", (1, 6, 6), 4, PRESETS["paper"][("mnist", "loccon")])
    trainer = types.SimpleNamespace(
        parallel=Parallel(), model=model, global_batch=5, device=torch.device("cpu"),
        train_set=_small_images(20), config=TrainConfig(dataset="mnist", arch="loccon"),
    )  # fmt: skip
    running = [b.running_mean.clone() for b in model.modules() if isinstance(b, nn.BatchNorm2d)]
    with pytest.raises(BrainPropError) as info:
        check_one_image_steps(trainer, (1, 6, 6), "mnist")
    assert str(info.value).startswith(
        "a process's share of a step is 1 image (20 training images of mnist, 5 a step over 4 "
        "processes), where layer 5 (BatchNorm2d)"
    )
    assert str(info.value).endswith(
        "pass another --batch-size, or leave out --local-batchnorm (synchronised BatchNorm pools "
        "the step's images)"
    )
    after = [b.running_mean for b in model.modules() if isinstance(b, nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(running, after, strict=True))
    assert model.training
    trainer.global_batch, trainer.train_set = 8, _small_images(24)  # two images each
    check_one_image_steps(trainer, (1, 6, 6), "mnist")
    # Under --global-batch, --batch-size does nothing: the advice names the option given.
    trainer.global_batch, trainer.train_set = 8, _small_images(26)
    trainer.config = TrainConfig(dataset="mnist", arch="loccon", global_batch=8)
    with pytest.raises(BrainPropError) as info:
        check_one_image_steps(trainer, (1, 6, 6), "mnist")
    assert str(info.value).startswith(
        "a process's share of the last step of each epoch is 1 image (26 training images of "
        "mnist, 8 a step over 4 processes)"
    )
    assert "pass another --global-batch or --val-split, or leave out" in str(info.value)
    # Synchronised BatchNorm pools the step's images: nothing to refuse.
    monkeypatch.setattr(train_module, "synchronised", lambda model: True)
    check_one_image_steps(trainer, (1, 6, 6), "mnist")


def _no_running_statistics(net, num_classes, dropout):
    net.flatten()
    net.add(nn.Linear(net.shape[0], 16))
    net.add(nn.BatchNorm1d(16, track_running_stats=False))
    net.add(nn.ReLU())
    net.dense(num_classes, relu=False)


def test_a_batchnorm_without_running_statistics_builds_and_is_checked_like_the_others(
    tmp_path, tiny_dataset, monkeypatch
):
    """It normalises with the batch's statistics in eval mode too, so the one-image probes of
    the network's shapes failed on it: it could not be built at any batch size (review)."""
    monkeypatch.setitem(ARCHITECTURES, "no-stats", (_no_running_statistics, 0))
    row = Hyperparameters(init_std=0.05, dropout=())
    monkeypatch.setitem(PRESETS, "no-stats", {("mnist", "no-stats"): row})
    config = TrainConfig(dataset="mnist", arch="no-stats", preset="no-stats", epochs=1,
                         batch_size=16, out_dir=str(tmp_path))  # fmt: skip
    assert train(config, dataset=tiny_dataset, progress=False).summary["epochs_run"] == 1
    # An evaluation batch of one image goes with the one before: it failed after the epoch.
    odd = make_tiny_dataset(n_train=64, n_test=1001)
    again = dataclasses.replace(config, name="odd-test-set")
    assert train(again, dataset=odd, progress=False).summary["epochs_run"] == 1
    n = len(tiny_dataset.train_y)
    short = dataclasses.replace(config, batch_size=n - 1)  # a last step of one image
    with pytest.raises(BrainPropError, match=r"where layer 2 \(BatchNorm1d\) would see one"):
        train(short, dataset=tiny_dataset, progress=False)


def test_an_epoch_counts_its_last_partial_batch():
    """As Keras's fit does; the count sizes progress bars, bench's epochs and resume's check
    of a step past the end."""
    assert [num_batches(n, 3) for n in (1, 2, 3, 9, 10)] == [1, 1, 1, 3, 4]


def test_images_are_scaled_as_the_papers_inputs_over_255():
    x = to_float(torch.tensor([0, 51, 255], dtype=torch.uint8))
    assert x.dtype == torch.float32 and x.tolist() == pytest.approx([0.0, 0.2, 1.0], abs=1e-7)


def test_batches_from_a_later_step_continue_the_epochs_order():
    """A run resumed mid-epoch takes the batch it would have taken next, none skipped."""
    x = torch.arange(7, dtype=torch.uint8).view(7, 1, 1, 1)
    y = torch.arange(7)
    perm = torch.tensor([3, 6, 0, 5, 1, 4, 2])
    whole = [yb.tolist() for _, yb in permuted_batches(x, y, perm, 3)]
    assert whole == [[3, 6, 0], [5, 1, 4], [2]]
    later = [(xb.flatten() * 255).round().long().tolist() for xb, _ in
             permuted_batches(x, y, perm, 3, start=1)]  # fmt: skip
    assert later == whole[1:]
    # A stack's [G, N] permutations give each member its own batch: [G, b] labels a step.
    perms = torch.stack([perm, perm.flip(0)])
    stacked = [yb.tolist() for _, yb in permuted_batches(x, y, perms, 3)]
    assert stacked == [[[3, 6, 0], [2, 4, 1]], [[5, 1, 4], [5, 0, 6]], [[2], [3]]]


def test_evaluation_batches_leave_no_last_batch_of_one_image():
    """A BatchNorm without running statistics normalises with the batch's in evaluation too,
    and one image gives it one value per channel (review)."""
    for n, sizes in ((2001, [1000, 1001]), (2000, [1000, 1000]), (1, [1]), (1002, [1000, 2])):
        y = torch.arange(n)
        x = torch.zeros(n, 1, 1, 1, dtype=torch.uint8)
        batches = list(ordered_batches(x, y, 1000))
        assert [len(yb) for _, yb in batches] == sizes
        assert torch.equal(torch.cat([yb for _, yb in batches]), y)
