"""Seeds trained side by side in one stacked network: the same runs as one by one."""

import gc
import importlib
import json
import shutil
import signal
import time
import weakref
from dataclasses import fields, replace

import pytest
import torch
from own_rules import FailsLater, SquaredError
from reliability_helpers import inject, poison, spoiled_running_var

from brainprop import TrainConfig, fastpath, rundir, stacked, train, train_stacked
from brainprop.data.batches import permuted_batches
from brainprop.errors import BrainPropError
from brainprop.evaluation import accuracy
from brainprop.objectives import OBJECTIVES, make_objective
from brainprop.signals import Interrupted
from brainprop.stacked import MEMBER_FIELDS
from brainprop.train import MEASURED_COLUMNS, Trainer


def _config(tmp_path, seed, **kw):
    base = dict(
        dataset="mnist", arch="conv", epochs=2, batch_size=16, out_dir=str(tmp_path),
        name=f"s{seed}", seed=seed,
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _same_weights(a, b, atol):
    for name, p in a.model.state_dict().items():
        torch.testing.assert_close(b.model.state_dict()[name], p, atol=atol, rtol=0, msg=name)


# Not EBP on the held-out split: in its sixth step a ReLU or max-pool tie on this tiny data
# breaks the other way under the stack's grouped convolutions, and the weights part by 2e-5.
# loccon: its layer's patches are an autograd.Function, which vmap must batch too. Batch 24:
# 256 images end each epoch in a short batch of 16, whose BrainProp step is 16/24 of a full one.
@pytest.mark.parametrize(
    ("rule", "val", "arch", "batch"),
    [("brainprop", "test", "conv", 16), ("ebp", "test", "conv", 16), ("brainprop", 64, "conv", 16),
     ("brainprop", "test", "loccon", 16), ("brainprop", "test", "conv", 24),
     ("brainprop", "test", "dense", 16)],
)  # fmt: skip
def test_a_stack_trains_each_seed_as_its_own_run_would(
    tmp_path, tiny_dataset, rule, val, arch, batch
):
    """Without dropout (whose masks a stack draws differently) only rounding differs: the
    same shuffles, explorations, weight decay, BatchNorm statistics and accuracies. On these
    few steps of toy data, that is: on real data BatchNorm amplifies the rounding within tens
    of steps (docs/reproduce.md)."""
    dropout = () if arch == "dense" else (0.0,)  # the MNIST dense net has no dropout site
    kw = dict(rule=rule, dropout=dropout, l2=1e-3, val=val, arch=arch, batch_size=batch)
    alone = [
        train(_config(tmp_path / "alone", s, **kw), dataset=tiny_dataset, progress=False)
        for s in (1, 2)
    ]
    together = train_stacked(
        [_config(tmp_path / "stack", s, **kw) for s in (1, 2)], dataset=tiny_dataset,
        progress=False,
    )  # fmt: skip
    for a, b in zip(alone, together, strict=True):
        assert b.config.seed == a.config.seed and b.dir == tmp_path / "stack" / a.dir.name
        _same_weights(a, b, atol=1e-6)
        # Counts divided as a run of its own divides them, not in float32 (review).
        for column in ("val_acc", "test_acc", "train_reward", "explore_rate"):
            assert [h[column] for h in b.history] == [h[column] for h in a.history]
        loss = [h["train_loss"] for h in b.history]
        assert loss == pytest.approx([h["train_loss"] for h in a.history], rel=1e-5)
        assert [h["stack_size"] for h in b.history] == [2, 2]
        assert b.summary["stop_reason"] == "max epochs" and b.summary["stack_size"] == 2
        assert json.loads((b.dir / "summary.json").read_text()) == b.summary
        # A member's checkpoint holds its own weights only, not the whole stack's.
        for name in ("last.pt", "best.pt"):
            saved = torch.load(b.dir / name, weights_only=True)["model"].values()
            assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in saved)


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                          reason="needs a CUDA device"))],
)  # fmt: skip
def test_a_bf16_stack_runs_its_convolutions_and_batchnorm_in_bf16_as_each_seed_alone_does(
    tmp_path, tiny_dataset, device
):
    """vmap skips autocast's cast of a convolution: a stack's ran in fp32 (review), with no bf16
    speed, and rounded otherwise than its seeds alone (their weights parted by 3 to 12% in 2
    epochs). Its BatchNorm then takes bf16 activations, which vmap's rule for it refused."""
    runs = [
        Trainer(_config(tmp_path, s, bf16=True, device=device).resolve(), tiny_dataset,
                progress=False)
        for s in (0, 1)
    ]  # fmt: skip
    stack = stacked.Stack(
        [r.model for r in runs], [r.generator for r in runs], make_objective("brainprop"),
        weight_decay=0.0, batch_size=16, bf16=True,
    )  # fmt: skip
    outputs = {torch.nn.Conv2d: [], torch.nn.BatchNorm2d: []}
    for module in stack.base.modules():
        for kind, dtypes in outputs.items():
            if isinstance(module, kind):
                module.register_forward_hook(lambda m, i, out, d=dtypes: d.append(out.dtype))
    x = tiny_dataset.train_x[:32].float().div(255).view(2, 16, *tiny_dataset.train_x.shape[1:])
    stack.step(x.to(device), tiny_dataset.train_y[:32].view(2, 16).to(device))
    stack.accuracies(tiny_dataset.test_x.to(device), tiny_dataset.test_y.to(device))
    for dtypes in outputs.values():
        assert dtypes and set(dtypes) == {torch.bfloat16}


@pytest.mark.parametrize("arch", ["dense", "conv", "loccon"])
def test_a_bf16_stack_of_each_network_trains(tmp_path, tiny_dataset, arch):
    """loccon's BatchNorm took its locally connected layer's bf16 output, which vmap's rule for
    BatchNorm refused: "expected scalar type BFloat16 but found Float" (review)."""
    runs = train_stacked(
        [_config(tmp_path, s, arch=arch, bf16=True, epochs=1) for s in (0, 1)],
        dataset=tiny_dataset, progress=False,
    )  # fmt: skip
    assert [r.summary["epochs_run"] for r in runs] == [1, 1]


@pytest.mark.parametrize("bf16", [False, True])
def test_a_stack_scores_each_member_as_it_would_score_alone(tmp_path, tiny_dataset, monkeypatch,
                                                              bf16):  # fmt: skip
    """One vmapped pass over the members gives each the accuracy that ``accuracy`` gives its
    network alone (in fp32 exactly), over several evaluation batches and a short last one."""
    runs = [
        train(_config(tmp_path, s, epochs=1, bf16=bf16), dataset=tiny_dataset, progress=False)
        for s in (0, 1, 2)
    ]
    x = tiny_dataset.test_x
    # Random labels give each member its own accuracy, so that a mix-up between members shows.
    y = torch.randint(0, 4, (len(x),), generator=torch.Generator().manual_seed(0))
    alone = [accuracy(r.model, x, y, bf16) for r in runs]
    assert len(set(alone)) > 1
    models = [r.model for r in runs]
    stack = stacked.Stack(
        models, [torch.Generator() for _ in runs], make_objective("brainprop"), weight_decay=0.0,
        batch_size=16, bf16=bf16,
    )  # fmt: skip
    monkeypatch.setattr(stacked, "EVAL_BATCH", 60)  # 20 images a member: 3 full batches, 1 short
    together = stack.accuracies(x, y)
    if bf16:  # bf16 rounds the grouped convolutions otherwise: a near-tie may flip
        assert all(abs(t - a) <= 2 / len(y) for t, a in zip(together, alone, strict=True))
    else:
        assert together == alone
    assert stack.base.training and all(m.training for m in models)


def test_a_stacks_batchnorm_runs_without_cudnn_and_its_convolutions_with_it(
    tmp_path, tiny_dataset, monkeypatch
):
    """cuDNN's BatchNorm cannot take a vmapped fp32 tensor on CUDA (seen on an H200): a
    stack's BatchNorm layers turn it off while they run, and only they do."""
    seen = {"batch_norm": [], "conv2d": []}
    for name, calls in seen.items():
        real = getattr(torch.nn.functional, name)

        def spy(*args, real=real, calls=calls, **kwargs):
            calls.append(torch.backends.cudnn.enabled)
            return real(*args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, name, spy)
    runs = [Trainer(_config(tmp_path, s).resolve(), tiny_dataset, progress=False) for s in (0, 1)]
    for calls in seen.values():
        calls.clear()  # the fast path's layout check, each network alone
    stack = stacked.Stack(
        [r.model for r in runs], [r.generator for r in runs], make_objective("ebp"),
        weight_decay=0.0, batch_size=16,
    )  # fmt: skip
    x = tiny_dataset.train_x[:32].float().div(255).view(2, 16, *tiny_dataset.train_x.shape[1:])
    stack.step(x, tiny_dataset.train_y[:32].view(2, 16))
    stack.accuracies(tiny_dataset.test_x, tiny_dataset.test_y)
    assert seen["batch_norm"] and not any(seen["batch_norm"])
    assert seen["conv2d"] and all(seen["conv2d"])
    assert torch.backends.cudnn.enabled


def test_a_tagged_stack_starts_every_line_with_the_tag_and_shows_no_bar(
    tmp_path, tiny_dataset, bars_opened, capsys
):
    bars = bars_opened(stacked)
    members = [_config(tmp_path, 1, epochs=1), _config(tmp_path, 2, epochs=1)]
    train_stacked(members, dataset=tiny_dataset, tag="s1 (+1)")
    lines = capsys.readouterr().out.splitlines()
    for seed in (1, 2):
        assert sum(line.startswith(f"s1 (+1): seed {seed}: epoch ") for line in lines) == 1
    assert all(line.startswith("s1 (+1): ") for line in lines), lines
    assert not any(line.count("s1 (+1): ") > 1 for line in lines), lines
    assert bars == [(True, "epoch 1, 2 seeds")]


def test_the_last_seed_left_keeps_the_bar_the_stack_showed(
    tmp_path, tiny_dataset, bars_opened, capsys
):
    stack_bars = bars_opened(stacked)
    own_bars = bars_opened(importlib.import_module("brainprop.train"))
    members = [_config(tmp_path, 1, epochs=1), _config(tmp_path, 2, epochs=2)]
    train_stacked(members, dataset=tiny_dataset)
    assert stack_bars == [(None, "epoch 1, 2 seeds")] and own_bars == [(None, "epoch 2")]


def test_a_rule_of_ones_own_that_fails_in_a_stack_is_one_line_and_the_stack_resumes(
    tmp_path, tiny_dataset, monkeypatch
):
    """Two members, 16 steps an epoch: the rule's 40th call is in epoch 2."""
    monkeypatch.setitem(OBJECTIVES, "later", lambda epsilon, fused: FailsLater(at=40))
    members = [_config(tmp_path, s, rule="later") for s in (1, 2)]
    with pytest.raises(
        BrainPropError,
        match=r"^rule 'later' failed in epoch 2 of a stack: ZeroDivisionError: division by "
        r"zero \(.+own_rules\.py:\d+\): fix it; train_stacked\(\[.+s1, .+s2\]\) ",
    ):
        train_stacked(members, dataset=tiny_dataset, progress=False)
    monkeypatch.setitem(OBJECTIVES, "later", lambda epsilon, fused: SquaredError())
    runs = train_stacked([tmp_path / "s1", tmp_path / "s2"], dataset=tiny_dataset, progress=False)
    assert [[h["epoch"] for h in r.history] for r in runs] == [[1, 2], [1, 2]]


def test_a_member_that_stops_leaves_and_the_others_train_on(tmp_path, tiny_dataset, monkeypatch):
    built = []  # the members of each stack built: one per set of members, not one per epoch

    class Counted(stacked.Stack):
        def __init__(self, models, *args, **kwargs):
            built.append(len(models))
            super().__init__(models, *args, **kwargs)

    monkeypatch.setattr(stacked, "Stack", Counted)
    kw = dict(dropout=(0.0,))
    began = time.perf_counter()
    short, long = train_stacked(
        [_config(tmp_path, 1, epochs=1, **kw), _config(tmp_path, 2, epochs=3, **kw)],
        dataset=tiny_dataset, progress=False,
    )  # fmt: skip
    took = time.perf_counter() - began
    assert short.summary["epochs_run"] == 1 and long.summary["epochs_run"] == 3
    # Left alone, it trains as a run of its own: no stack of one.
    assert [h.get("stack_size") for h in long.history] == [2, None, None]
    assert built == [2]
    for h in [*short.history, *long.history]:
        assert 0 < h["seconds"] < took and 0 < h["eval_seconds"] < took
    alone = train(
        _config(tmp_path / "alone", 2, epochs=3, **kw), dataset=tiny_dataset, progress=False
    )
    _same_weights(alone, long, atol=1e-6)
    # The member that left kept its weights as they were when it stopped.
    torch.testing.assert_close(
        short.model.state_dict(), torch.load(short.dir / "last.pt", weights_only=True)["model"]
    )


def test_a_restack_that_fails_raises_its_own_error(tmp_path, tiny_dataset, monkeypatch):
    """Not the AttributeError of releasing the old stack twice (review): running out of memory
    there must still reach the CLI's advice to stack fewer seeds."""
    built = []

    class FailsToRestack(stacked.Stack):
        def __init__(self, models, *args, **kwargs):
            built.append(len(models))
            if len(built) == 2:
                raise torch.OutOfMemoryError("out of memory restacking")
            super().__init__(models, *args, **kwargs)

    monkeypatch.setattr(stacked, "Stack", FailsToRestack)
    members = [_config(tmp_path, 1, epochs=1), *(_config(tmp_path, s, epochs=2) for s in (2, 3))]
    with pytest.raises(torch.OutOfMemoryError, match="restacking"):
        train_stacked(members, dataset=tiny_dataset, progress=False)
    assert built == [3, 2]


def test_a_stack_of_one_is_a_run_of_its_own_dropout_and_all(tmp_path, tiny_dataset):
    """Its dropout masks too, which a vmapped stack of one would draw otherwise."""
    alone = train(_config(tmp_path / "alone", 1, epochs=2), dataset=tiny_dataset, progress=False)
    (one,) = train_stacked([_config(tmp_path / "one", 1, epochs=2)], dataset=tiny_dataset,
                           progress=False)  # fmt: skip
    _same_weights(alone, one, atol=0)
    assert [h["val_acc"] for h in one.history] == [h["val_acc"] for h in alone.history]


def test_a_member_left_alone_resumes_alone_as_it_would_have_trained_on(
    tmp_path, tiny_dataset, monkeypatch
):
    """reproduce resumes the last seed of a stack on its own (``train --resume``): stopped once
    alone, it must go on as the session that was stopped would have, dropout masks and all."""
    members = [
        _config(tmp_path / "whole", 1, epochs=1), _config(tmp_path / "whole", 2, epochs=3),
    ]  # fmt: skip
    _, whole = train_stacked(members, dataset=tiny_dataset, progress=False)
    end_epoch = stacked.end_epoch

    def stop_after_second_epoch(trainer, *args, **kwargs):
        if len(trainer.history) == 1 and trainer.config.seed == 2:
            signal.raise_signal(signal.SIGTERM)
        return end_epoch(trainer, *args, **kwargs)

    monkeypatch.setattr(stacked, "end_epoch", stop_after_second_epoch)
    cut = [replace(c, out_dir=str(tmp_path / "cut")) for c in members]
    with pytest.raises(Interrupted):
        train_stacked(cut, dataset=tiny_dataset, progress=False)
    monkeypatch.setattr(stacked, "end_epoch", end_epoch)
    resumed = train(resume=tmp_path / "cut" / "s2", dataset=tiny_dataset, progress=False)
    _same_weights(whole, resumed, atol=0)
    assert [h["val_acc"] for h in resumed.history] == [h["val_acc"] for h in whole.history]


def test_a_stack_that_stopped_early_in_its_last_epoch_resumes_as_stopped_early(
    tmp_path, tiny_dataset
):
    kw = dict(epochs=2, patience=1, min_delta=0.99)  # no gain after epoch 1: patience ends epoch 2
    runs = train_stacked(
        [_config(tmp_path, s, **kw) for s in (1, 2)], dataset=tiny_dataset, progress=False
    )
    assert [r.summary["stop_reason"] for r in runs] == ["early stopping"] * 2
    for r in runs:
        (r.dir / "summary.json").unlink()  # killed before the summaries were written
    resumed = train_stacked([r.dir for r in runs], dataset=tiny_dataset, progress=False)
    assert [r.summary for r in resumed] == [r.summary for r in runs]


def test_an_interrupted_stack_resumes_bit_identically(tmp_path, tiny_dataset, monkeypatch):
    members = [_config(tmp_path / "full", s, epochs=3) for s in (1, 2)]
    full = train_stacked(members, dataset=tiny_dataset, progress=False)
    calls = [0]
    end_epoch = stacked.end_epoch

    def signal_after_first_epoch(*args, **kw):
        calls[0] += 1
        if calls[0] == 1:
            signal.raise_signal(signal.SIGTERM)
        return end_epoch(*args, **kw)

    monkeypatch.setattr(stacked, "end_epoch", signal_after_first_epoch)
    part = [_config(tmp_path / "part", s, epochs=3) for s in (1, 2)]
    with pytest.raises(Interrupted, match="stopped by SIGTERM at the end of an epoch") as info:
        train_stacked(part, dataset=tiny_dataset, progress=False)
    assert info.value.exit_status == 128 + signal.SIGTERM
    monkeypatch.undo()
    dirs = [tmp_path / "part" / f"s{s}" for s in (1, 2)]
    assert [json.loads((d / "history.json").read_text())[-1]["epoch"] for d in dirs] == [1, 1]
    resumed = train_stacked(dirs, dataset=tiny_dataset, progress=False)
    for a, b in zip(full, resumed, strict=True):
        _same_weights(a, b, atol=0)

        def strip(history):
            return [{k: v for k, v in h.items() if k not in MEASURED_COLUMNS} for h in history]

        assert strip(b.history) == strip(a.history)


def test_a_signal_in_the_stacks_last_epoch_stops_once_its_runs_are_complete(
    tmp_path, tiny_dataset, monkeypatch
):
    end_epoch, sent = stacked.end_epoch, []

    def signal_in_the_last_epoch(trainer, *args, **kw):
        if len(trainer.history) == 1 and not sent:  # epoch 2 of 2 is ending
            signal.raise_signal(signal.SIGTERM)
            sent.append(True)
        return end_epoch(trainer, *args, **kw)

    monkeypatch.setattr(stacked, "end_epoch", signal_in_the_last_epoch)
    members = [_config(tmp_path, s) for s in (1, 2)]
    with pytest.raises(Interrupted) as info:
        train_stacked(members, dataset=tiny_dataset, progress=False)
    dirs = [tmp_path / f"s{s}" for s in (1, 2)]
    assert str(info.value) == (
        "stopped by SIGTERM as the last seeds ended; every seed's run is complete: results in "
        f"{dirs[0]}, {dirs[1]}"
    )
    assert info.value.exit_status == 128 + signal.SIGTERM
    for d in dirs:
        assert json.loads((d / "summary.json").read_text())["epochs_run"] == 2


def test_a_run_begun_in_a_stack_and_finished_alone_keeps_its_stack_size(
    tmp_path, tiny_dataset, monkeypatch
):
    end_epoch, sent = stacked.end_epoch, []

    def signal_after_first_epoch(trainer, *args, **kw):
        if not sent:
            signal.raise_signal(signal.SIGTERM)
            sent.append(True)
        return end_epoch(trainer, *args, **kw)

    monkeypatch.setattr(stacked, "end_epoch", signal_after_first_epoch)
    with pytest.raises(Interrupted):
        train_stacked([_config(tmp_path, s) for s in (1, 2)], dataset=tiny_dataset,
                      progress=False)  # fmt: skip
    monkeypatch.undo()
    alone = train(resume=tmp_path / "s1", dataset=tiny_dataset, progress=False)
    assert [h.get("stack_size") for h in alone.history] == [2, None]
    # Its timing is compared with runs that shared their steps as it did (reproduce's report).
    assert alone.summary["stack_size"] == 2


def test_a_member_can_continue_alone(tmp_path, tiny_dataset):
    (first,) = train_stacked([_config(tmp_path, 1)], dataset=tiny_dataset, progress=False)
    more = train(_config(tmp_path, 1, epochs=3), resume=first.dir, dataset=tiny_dataset,
                 progress=False)  # fmt: skip
    assert [h["epoch"] for h in more.history] == [1, 2, 3]


def test_members_on_data_of_ones_own_continue_on_it_alone(tmp_path, tiny_dataset, capsys):
    mine = replace(tiny_dataset, name="mine")
    first = train(_config(tmp_path, 1, epochs=1), dataset=mine, progress=False)
    config = json.loads((first.dir / "config.json").read_text())
    (first.dir / "config.json").write_text(json.dumps(config | {"epochs": 2}))
    (first.dir / "summary.json").unlink()
    with pytest.raises(BrainPropError) as info:
        train_stacked([first.dir], progress=False)
    assert str(info.value) == (
        f"checkpoint in {first.dir} was trained on data of one's own, 'mine', not on mnist's "
        "files, which brainprop would load: pass that data again, as "
        "train_stacked(runs, dataset=...) (from Python: the command line loads only the "
        "dataset the run's config names, mnist)"
    )
    capsys.readouterr()
    (more,) = train_stacked([first.dir], dataset=mine)
    assert [h["epoch"] for h in more.history] == [1, 2]
    assert "training 1 seeds of conv on 'mine' (mnist's settings) with " in capsys.readouterr().out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(lr=0.5), r"seeds 0 and 1 differ in lr \(0.1 and 0.5\), so they cannot share"),
        (dict(seed=0), r"seeds \[0, 0\] repeat"),
        (dict(feedback="random"), "--feedback random cannot be stacked"),
    ],
)
def test_members_that_cannot_share_a_stack_are_refused(tmp_path, tiny_dataset, change, message):
    first = _config(tmp_path, 0, **({"feedback": "random"} if "feedback" in change else {}))
    second = replace(_config(tmp_path, 1), **change)
    with pytest.raises(BrainPropError, match=message):
        train_stacked([first, second], dataset=tiny_dataset, progress=False)
    assert not list(tmp_path.iterdir())  # refused before any run directory was made


@pytest.mark.parametrize(
    "field", [f.name for f in fields(TrainConfig) if f.name not in MEMBER_FIELDS]
)
def test_members_differing_in_any_shared_setting_are_refused(tmp_path, field):
    """The stack trains every member with the first one's settings: any other difference
    would go unapplied while the member's run recorded it."""
    assert MEMBER_FIELDS == ("seed", "name", "epochs", "out_dir", "data_dir")  # no more
    first = _config(tmp_path, 0)
    other = replace(_config(tmp_path, 1), **{field: object()})
    with pytest.raises(BrainPropError, match=f"seeds 0 and 1 differ in {field} "):
        stacked._common_config([first, other])


@pytest.mark.parametrize(
    ("world", "message"),
    [("2", "a stack of seeds runs in one process: start it without torchrun"),
     ("two", r"\$WORLD_SIZE is 'two', not a whole number: launch with torchrun$")],
)  # fmt: skip
def test_a_stack_is_refused_under_torchrun(tmp_path, tiny_dataset, monkeypatch, world, message):
    monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(BrainPropError, match=message):
        train_stacked([_config(tmp_path, 0), _config(tmp_path, 1)], dataset=tiny_dataset)
    assert not list(tmp_path.iterdir())


def test_a_stack_holds_its_members_run_directories_until_it_ends(
    tmp_path, tiny_dataset, monkeypatch
):
    old = tmp_path / "s1"  # a run killed before its first checkpoint: it resumes from scratch
    old.mkdir()
    (old / "config.json").write_text(json.dumps(_config(tmp_path, 1).resolve().to_dict()))
    refused = set()
    end_epoch = stacked.end_epoch

    def try_to_claim(trainer, run_path, *args, **kw):
        with (
            pytest.raises(BrainPropError, match="is being trained already"),
            rundir.claimed(run_path),
        ):
            pass
        refused.add(run_path.name)
        return end_epoch(trainer, run_path, *args, **kw)

    monkeypatch.setattr(stacked, "end_epoch", try_to_claim)
    members = [_config(tmp_path, 0), old]  # a new run and one resumed
    runs = train_stacked(members, dataset=tiny_dataset, progress=False)
    assert refused == {"s0", "s1"}
    for run in runs:
        with rundir.claimed(run.dir):
            pass
    with pytest.raises(BrainPropError, match=r"run directory .*s1 is given twice: give each"):
        train_stacked([old, tmp_path / "." / "s1"], dataset=tiny_dataset, progress=False)


def test_a_damaged_member_leaves_no_new_run_behind(tmp_path, tiny_dataset):
    (done,) = train_stacked([_config(tmp_path, 1, epochs=1)], dataset=tiny_dataset,
                            progress=False)  # fmt: skip
    state = torch.load(done.dir / "last.pt", weights_only=True)
    state["model"]["0.weight"].fill_(float("nan"))
    torch.save(state, done.dir / "last.pt")
    with pytest.raises(BrainPropError, match="holds NaN or inf weights"):
        train_stacked([_config(tmp_path, 0), done.dir], dataset=tiny_dataset, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s1"]


def test_a_graphed_stack_needs_a_cuda_device(tmp_path, tiny_dataset):
    members = [_config(tmp_path, s, cuda_graph=True, device="cpu") for s in (0, 1)]
    with pytest.raises(BrainPropError, match="--cuda-graph cannot run here: it needs a CUDA"):
        train_stacked(members, dataset=tiny_dataset, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_graphed_stack_trains_as_a_plain_one_on_cuda(tmp_path, tiny_dataset):
    kw = dict(dropout=(0.0,), device="cuda")
    plain = train_stacked(
        [_config(tmp_path / "plain", s, **kw) for s in (0, 1)], dataset=tiny_dataset,
        progress=False,
    )  # fmt: skip
    graphed = train_stacked(
        [_config(tmp_path / "graph", s, cuda_graph=True, **kw) for s in (0, 1)],
        dataset=tiny_dataset, progress=False,
    )  # fmt: skip
    for a, b in zip(plain, graphed, strict=True):
        _same_weights(a, b, atol=1e-5)
        for column in ("val_acc", "test_acc"):
            assert [h[column] for h in b.history] == [h[column] for h in a.history]


def test_a_run_stopped_mid_epoch_finishes_that_epoch_alone_then_joins(
    tmp_path, tiny_dataset, monkeypatch
):
    calls = [0]
    step = Trainer.train_epoch

    def stop_mid_epoch(self, epoch, stop):
        calls[0] += 1
        if calls[0] == 1:
            signal.raise_signal(signal.SIGINT)  # lands before the first step's end
        return step(self, epoch, stop)

    monkeypatch.setattr(Trainer, "train_epoch", stop_mid_epoch)
    with pytest.raises(Interrupted, match="in epoch 1 after step 1"):
        train(_config(tmp_path, 0), dataset=tiny_dataset, progress=False)
    monkeypatch.undo()
    interrupted, fresh = train_stacked(
        [tmp_path / "s0", _config(tmp_path, 1)], dataset=tiny_dataset, progress=False
    )
    # Epoch 1 of seed 0 ended alone; its epoch 2 shared a stack with seed 1's epoch 1.
    assert [h.get("stack_size") for h in interrupted.history] == [None, 2]
    assert [h.get("stack_size") for h in fresh.history] == [2, None]


class _AddressGraph:
    """A CPU stand-in for a CUDA graph: replays by calling the step, and counts the replays
    whose weights no longer lie where they lay at its capture (a CUDA graph would go on
    reading and writing those addresses). Its capture runs nothing, as a CUDA graph's: the
    static buffers hold no batch yet."""

    stale = 0

    def __init__(self, params):
        self.params = params

    def capture(self, step):
        self.step, self.addresses = step, [p.data_ptr() for p in self.params]

    def replay(self):
        _AddressGraph.stale += [p.data_ptr() for p in self.params] != self.addresses
        return self.step()


def _graphed_on_cpu(step, optimizer, model, generators, *, batch_size, parallel=None):
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return fastpath.GraphedStep(
        step, optimizer, generators=generators, batch_size=batch_size,
        new_graph=lambda _: _AddressGraph(params),
    )  # fmt: skip


def test_a_graph_captured_before_a_member_joined_is_not_replayed_once_it_is_alone(
    tmp_path, tiny_dataset, monkeypatch
):
    """Seed 0 finishes its cut-short epoch with its own graphed step, joins seed 1's stack,
    then trains alone with that step again: on memory the stack moved its weights to (review:
    a GPU replayed the graph on the old weights' addresses, training nothing, silently)."""
    monkeypatch.setattr(fastpath, "graphed", _graphed_on_cpu)
    _cut_in_epoch(tmp_path, tiny_dataset, monkeypatch, epochs=3, cuda_graph=True)
    monkeypatch.setattr(fastpath, "graphed", _graphed_on_cpu)  # _cut_in_epoch undid it
    monkeypatch.setattr(_AddressGraph, "stale", 0)
    cut, _ = train_stacked(
        [tmp_path / "cut" / "s0", _config(tmp_path / "cut", 1, epochs=1, cuda_graph=True)],
        dataset=tiny_dataset, progress=False,
    )  # fmt: skip
    assert [h.get("stack_size") for h in cut.history] == [None, 2, None]
    assert _AddressGraph.stale == 0


def _cut_in_epoch(tmp_path, tiny_dataset, monkeypatch, cut=1, **kw) -> None:
    """Train seed 0 into ``tmp_path/cut`` and stop it at the first step of epoch ``cut``,
    then copy that run directory to ``tmp_path/alone``: two identical runs cut short there."""
    run_epoch = Trainer.train_epoch

    def stop_after_first_step(self, epoch, stop):
        if epoch == cut - 1:
            signal.raise_signal(signal.SIGINT)
        return run_epoch(self, epoch, stop)

    monkeypatch.setattr(Trainer, "train_epoch", stop_after_first_step)
    with pytest.raises(Interrupted):
        train(_config(tmp_path / "cut", 0, **kw), dataset=tiny_dataset, progress=False)
    monkeypatch.undo()
    shutil.copytree(tmp_path / "cut", tmp_path / "alone")


def test_a_cut_short_epoch_ends_alone_with_its_own_random_streams(
    tmp_path, tiny_dataset, monkeypatch
):
    """Its dropout masks come from the streams its checkpoint saved, as under ``train
    --resume``, not from those of the seed built after it (each seeds the global streams)."""
    _cut_in_epoch(tmp_path, tiny_dataset, monkeypatch, epochs=1)
    cut, _ = train_stacked(
        [tmp_path / "cut" / "s0", _config(tmp_path / "cut", 1, epochs=1)],
        dataset=tiny_dataset, progress=False,
    )  # fmt: skip
    alone = train(resume=tmp_path / "alone" / "s0", dataset=tiny_dataset, progress=False)
    assert cut.config.dropout and max(cut.config.dropout) > 0
    _same_weights(alone, cut, atol=0)


@pytest.mark.parametrize(
    ("epoch", "saved"),
    [(0, "no seed had reached a checkpoint, so they start afresh"),
     (1, "every seed's last.pt is whole")],
)  # fmt: skip
def test_a_second_signal_quits_at_once_with_one_line(
    tmp_path, tiny_dataset, monkeypatch, epoch, saved
):
    """In the first epoch there is no last.pt to be whole (it said there was: review)."""
    end_epoch = stacked.end_epoch

    def interrupt(trainer, *args, **kw):
        if len(trainer.history) == epoch:
            raise KeyboardInterrupt
        return end_epoch(trainer, *args, **kw)

    monkeypatch.setattr(stacked, "end_epoch", interrupt)
    with pytest.raises(Interrupted, match="stopped at once by a second signal") as info:
        train_stacked([_config(tmp_path, s) for s in (0, 1)], dataset=tiny_dataset,
                      progress=False)  # fmt: skip
    assert "\n" not in str(info.value) and info.value.exit_status == 128 + signal.SIGINT
    assert f"; {saved}: train_stacked([" in str(info.value)


@pytest.mark.parametrize("on_nan", ["stop", "reload"])
def test_a_nan_in_one_seed_leaves_the_others_untouched(tmp_path, tiny_dataset, monkeypatch, on_nan):
    # The objective runs once per seed and step: call 4 is seed 1's second step.
    inject(monkeypatch, {4: poison})
    kw = dict(dropout=(0.0,), on_nan=on_nan)
    healthy, hit = train_stacked(
        [_config(tmp_path, s, **kw) for s in (0, 1)], dataset=tiny_dataset, progress=False
    )
    monkeypatch.undo()
    alone = train(_config(tmp_path / "alone", 0, **kw), dataset=tiny_dataset, progress=False)
    # Rounding only: seed 0's first epoch ran in the stack's kernels.
    _same_weights(alone, healthy, atol=1e-5)
    if on_nan == "stop":
        assert hit.summary["stop_reason"] == "non-finite loss at epoch 1, step 2"
        assert hit.history == []
    else:
        assert hit.summary["nan_reloads"] == 1 and hit.summary["epochs_run"] == 2
        assert [h["lr"] for h in hit.history] == [0.05, 0.05]


def test_a_nan_in_one_seeds_running_statistics_is_found_at_the_stacks_epoch_end(
    tmp_path, tiny_dataset, monkeypatch
):
    """BatchNorm's running variance is used only in eval mode, so the loss stays finite: the
    weights are checked after the epoch's last step, as in a run of its own."""
    inject(monkeypatch, {4: spoiled_running_var(monkeypatch, member=1)})  # seed 1's 2nd step
    healthy, hit = train_stacked(
        [_config(tmp_path, s, dropout=(0.0,)) for s in (0, 1)], dataset=tiny_dataset,
        progress=False,
    )  # fmt: skip
    assert hit.summary["stop_reason"] == "non-finite weights at epoch 1 (found after step 16)"
    assert hit.history == [] and len(healthy.history) == 2


def test_a_diverged_run_resumed_in_a_stack_is_unfinished_while_it_trains_again(
    tmp_path, tiny_dataset, monkeypatch
):
    """As under train --resume: its old summary.json would mark it finished meanwhile."""
    inject(monkeypatch, {20: poison})  # 16 steps an epoch: epoch 2, step 4
    run = train(_config(tmp_path, 0, epochs=3), dataset=tiny_dataset, progress=False)
    assert run.summary["stop_reason"] == "non-finite loss at epoch 2, step 4"
    monkeypatch.undo()

    def stop(q):
        signal.raise_signal(signal.SIGTERM)
        return q

    def no_room(trainer):
        raise BrainPropError("only 1.0 MiB free")

    # A new member whose directory cannot be made: nothing trains, so nothing is reopened.
    monkeypatch.setattr(stacked, "create_run", no_room)
    with pytest.raises(BrainPropError, match="only 1.0 MiB free"):
        train_stacked([run.dir, _config(tmp_path, 1)], dataset=tiny_dataset, progress=False)
    assert (run.dir / "summary.json").exists()
    monkeypatch.undo()
    inject(monkeypatch, {1: stop})
    with pytest.raises(Interrupted):
        train_stacked([run.dir], dataset=tiny_dataset, progress=False)
    assert not (run.dir / "summary.json").exists()


def test_a_rewound_seed_does_not_replay_the_others_dropout_masks(tmp_path, tiny_dataset,
                                                                 monkeypatch):  # fmt: skip
    """Dropout draws from the global stream, which the whole stack shares: rewinding one seed
    to its checkpoint must not rewind that stream for the others."""
    kw = dict(on_nan="reload", epochs=3)
    clean, _ = train_stacked(
        [_config(tmp_path / "clean", s, **kw) for s in (0, 1)], dataset=tiny_dataset,
        progress=False,
    )  # fmt: skip
    # 16 steps an epoch, the objective once per seed and step: call 34 is seed 1's first step
    # of epoch 2, so seed 1 goes back to its epoch-1 checkpoint while seed 0 trains on.
    inject(monkeypatch, {34: poison})
    healthy, hit = train_stacked(
        [_config(tmp_path / "hit", s, **kw) for s in (0, 1)], dataset=tiny_dataset,
        progress=False,
    )  # fmt: skip
    assert hit.summary["nan_reloads"] == 1 and healthy.summary["nan_reloads"] == 0
    _same_weights(clean, healthy, atol=1e-6)


def test_a_stop_after_a_rewind_keeps_the_halved_learning_rate(tmp_path, tiny_dataset,
                                                              monkeypatch):  # fmt: skip
    """The rewind's halved LR and its count live in memory until the next checkpoint: a stop
    in the epoch of the NaN must save them, or the resumed seed steps at the full LR again and
    may rewind past the cap."""

    def stop(q):
        signal.raise_signal(signal.SIGTERM)
        return q

    # 16 steps an epoch, the objective once per seed and step: seed 1's first step of epoch 2.
    inject(monkeypatch, {34: poison, 36: stop})
    with pytest.raises(Interrupted):
        train_stacked(
            [_config(tmp_path, s, on_nan="reload", epochs=3) for s in (0, 1)],
            dataset=tiny_dataset, progress=False,
        )  # fmt: skip
    state = torch.load(tmp_path / "s1" / "last.pt", weights_only=True)
    assert (state["lr_scale"], state["nan_reloads"]) == (0.5, 1)


def test_a_nan_while_a_cut_short_epoch_ends_alone_rewinds_as_a_run_of_its_own(
    tmp_path, tiny_dataset, monkeypatch
):
    """Back to the end of the last finished epoch (here, none: the initial state), and no
    later checkpoint keeps the old mid-epoch position."""
    _cut_in_epoch(tmp_path, tiny_dataset, monkeypatch, dropout=(0.0,), on_nan="reload")
    # Call 3 is the fourth step of the cut-short epoch, finished outside any stack.
    inject(monkeypatch, {3: poison})
    (stacked_run,) = train_stacked([tmp_path / "cut" / "s0"], dataset=tiny_dataset,
                                   progress=False)  # fmt: skip
    monkeypatch.undo()
    inject(monkeypatch, {3: poison})
    alone = train(resume=tmp_path / "alone" / "s0", dataset=tiny_dataset, progress=False)
    assert stacked_run.summary["nan_reloads"] == alone.summary["nan_reloads"] == 1
    assert [h["epoch"] for h in stacked_run.history] == [1, 2]
    assert torch.load(stacked_run.dir / "last.pt", weights_only=True)["partial"] is None
    _same_weights(alone, stacked_run, atol=1e-5)


def test_a_nan_rewinding_into_a_cut_short_epoch_finishes_it_with_its_own_streams(
    tmp_path, tiny_dataset, monkeypatch
):
    """Where the stop could not keep epoch_start.pt, a NaN rewinds to last.pt, inside the
    epoch: the member finishes it again alone, from the random streams that checkpoint saved,
    as the run would on its own (dropout masks included)."""
    _cut_in_epoch(tmp_path, tiny_dataset, monkeypatch, cut=2, on_nan="reload")
    for run in ("cut", "alone"):
        (tmp_path / run / "s0" / rundir.EPOCH_START).unlink()
    inject(monkeypatch, {3: poison})
    # A new seed beside it, built after it, seeds the global streams the stack draws from.
    stacked_run, _ = train_stacked(
        [tmp_path / "cut" / "s0", _config(tmp_path / "cut", 1, on_nan="reload")],
        dataset=tiny_dataset, progress=False,
    )  # fmt: skip
    monkeypatch.undo()
    inject(monkeypatch, {3: poison})
    alone = train(resume=tmp_path / "alone" / "s0", dataset=tiny_dataset, progress=False)
    assert stacked_run.summary["nan_reloads"] == alone.summary["nan_reloads"] == 1
    assert [h["epoch"] for h in stacked_run.history] == [1, 2]
    assert max(stacked_run.config.dropout) > 0
    _same_weights(alone, stacked_run, atol=0)


def _trainers(tmp_path, tiny_dataset, **kw):
    """The trainers of seeds 0 and 1 (``kw``: config fields), unstacked."""
    return [
        Trainer(_config(tmp_path, s, **kw).resolve(), tiny_dataset, progress=False) for s in (0, 1)
    ]


def _stack_of(trainers):
    return stacked.Stack(
        [t.model for t in trainers], [t.generator for t in trainers], trainers[0].objective,
        weight_decay=0.0, batch_size=16,
    )  # fmt: skip


def _stack(tmp_path, tiny_dataset, **kw):
    """A stack of seeds 0 and 1 (``kw``: config fields), its members' trainers, and one
    batch of the same images for both, [2, 16, ...]."""
    trainers = _trainers(tmp_path, tiny_dataset, **kw)
    return _stack_of(trainers), trainers, *_same_batch(tiny_dataset)


def _same_batch(tiny_dataset):
    """The first 16 training images and labels for each of two members, as a step takes them."""
    order = torch.arange(len(tiny_dataset.train_y))
    return next(permuted_batches(tiny_dataset.train_x, tiny_dataset.train_y,
                                 torch.stack([order, order]), 16))  # fmt: skip


def _weights(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_each_member_steps_at_its_own_learning_rate(tmp_path, tiny_dataset):
    """Members' rates differ after a NaN halving, or across an lr-halving epoch (a resumed
    seed stacked with a new one); member 0's rate for all went unnoticed (review)."""
    stack, trainers, x, y = _stack(tmp_path, tiny_dataset)
    before = [_weights(t) for t in trainers]
    stack.rates.copy_(torch.tensor([0.1, 0.0]))
    stack.step(x, y)
    moved, still = _weights(trainers[0]), _weights(trainers[1])
    assert not torch.equal(moved["0.weight"], before[0]["0.weight"])
    for k, v in before[1].items():
        if "running" not in k and "num_batches" not in k:  # BatchNorm's statistics, no step
            assert torch.equal(still[k], v), k


@pytest.mark.parametrize("dropout", [(0.0,), (0.5,)])
def test_members_draw_their_own_dropout_masks(tmp_path, tiny_dataset, dropout):
    """Two members alike in weights, exploration stream and batch part only through their
    dropout masks: masks shared by all members would correlate the seeds (review)."""
    stack, trainers, x, y = _stack(tmp_path, tiny_dataset, dropout=dropout)
    trainers[1].model.load_state_dict(trainers[0].model.state_dict())
    trainers[1].generator.set_state(trainers[0].generator.get_state())
    stack.rates.fill_(0.1)
    stack.step(x, y)
    same = torch.equal(trainers[0].model[0].weight, trainers[1].model[0].weight)
    assert same == (dropout == (0.0,))


def test_a_frozen_weight_stays_frozen_in_a_stack(tmp_path, tiny_dataset):
    """As SGD leaves a weight without a gradient alone in a run of its own; the stack once
    made every stacked tensor require one, and stepped it (review)."""
    trainers = _trainers(tmp_path, tiny_dataset)
    for t in trainers:
        t.model[0].weight.requires_grad_(False)
    stack = _stack_of(trainers)
    before = [_weights(t) for t in trainers]
    stack.rates.fill_(0.1)
    stack.step(*_same_batch(tiny_dataset))
    for t, weights in zip(trainers, before, strict=True):
        assert torch.equal(t.model[0].weight, weights["0.weight"])
        assert not t.model[0].weight.requires_grad
        assert not torch.equal(t.model[2].weight, weights["2.weight"])  # the rest learns


def test_members_may_come_from_a_generator(tmp_path, tiny_dataset):
    """Its first pass over them (the run directories) once used it up (review)."""
    runs = train_stacked(
        (_config(tmp_path, s, epochs=1) for s in (0, 1)), dataset=tiny_dataset, progress=False
    )
    assert [r.config.seed for r in runs] == [0, 1]

    def failing():
        yield _config(tmp_path / "failing", 0, epochs=1)
        raise TypeError("the generator's own")

    # Its own error, not taken for members of the wrong kind.
    with pytest.raises(TypeError, match="the generator's own"):
        train_stacked(failing(), dataset=tiny_dataset, progress=False)


def test_a_released_stack_frees_its_tensors_without_the_cycle_collector(tmp_path, tiny_dataset):
    """Else every restack would keep the last stack's weights, gradients and CUDA graph pool
    until Python's cycle collector happened to run."""
    stack, _, x, y = _stack(tmp_path, tiny_dataset)
    stack.rates.fill_(0.1)
    stack.step(x, y)
    weight = weakref.ref(stack.params["0.weight"])
    gc.disable()
    try:
        stack.release()
        del stack
        assert weight() is None
    finally:
        gc.enable()


def test_a_finished_member_keeps_the_machine_that_trained_it(tmp_path, tiny_dataset):
    """A finished run given to a stack trains nothing, yet its summary took this process's
    machine, as train(resume=...) did before it was mended (review)."""
    first, _ = train_stacked([_config(tmp_path, s, epochs=1) for s in (1, 2)],
                             dataset=tiny_dataset, progress=False)  # fmt: skip
    elsewhere = {**first.summary, "device": "cpu (elsewhere)", "world_size": 2}
    (first.dir / "summary.json").write_text(json.dumps(elsewhere))
    again, _ = train_stacked([first.dir, tmp_path / "s2"], dataset=tiny_dataset, progress=False)
    assert again.summary == elsewhere
    assert json.loads((first.dir / "summary.json").read_text()) == elsewhere
