"""Data-parallel training: the sharding and weighting arithmetic in-process, then real gloo
process groups on localhost (spawned workers and whole ``torchrun`` jobs), kept tiny for CI's
2 shared cores."""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import operator
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import make_tiny_dataset
from data_fixtures import write_idx_dataset
from reliability_helpers import assert_same_run

from brainprop import (
    ARCHITECTURES,
    PRESETS,
    Hyperparameters,
    TrainConfig,
    distributed,
    fastpath,
    train,
)
from brainprop.checkpoint import load
from brainprop.distributed import Context, current, joined
from brainprop.errors import BrainPropError
from brainprop.objectives import EBP, BrainProp
from brainprop.signals import Interrupted
from brainprop.train import _after_losing

BIN = Path(sys.executable).parent
#: Images per step over all ranks in the spawned jobs.
GLOBAL = 8


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_one_process_is_the_identity() -> None:
    one = Context()
    assert not one.active and one.is_main
    assert one.seed(7) == 7
    assert one.global_batch(32, None) == 32 and one.global_batch(32, 64) == 64
    values = [torch.tensor(1.5)]
    assert one.sum(values) is values
    assert one.decide(True) and one.on_main(lambda: 3) == 3 and one.gather(5) == [5]
    assert one.device("cpu") == torch.device("cpu")
    with joined() as context:  # no torchrun variables: nothing is joined
        assert not context.active and current() is context


def test_world_of_one_from_torchrun_is_the_plain_run(tmp_path: Path, monkeypatch) -> None:
    ds = make_tiny_dataset(n_train=64, n_test=16)
    config = dict(dataset="mnist", arch="dense", epochs=1, batch_size=16, out_dir=str(tmp_path))
    plain = train(TrainConfig(**config, name="plain"), dataset=ds, progress=False)
    for name, value in {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    one = train(TrainConfig(**config, name="one"), dataset=ds, progress=False)
    for key, tensor in plain.model.state_dict().items():
        assert torch.equal(tensor, one.model.state_dict()[key]), key


def test_losing_the_others_in_training_names_the_run_and_the_command_that_continues_it(
    tmp_path: Path, monkeypatch
) -> None:
    """It said 'continue from the last checkpoint with torchrun ... --resume RUN_DIR' even
    before there was one, the run's folder known (a review)."""
    lost = "process 0 of 2 lost the others during agreeing whether to stop (reset): ..."

    def lose(self: Context, value: bool) -> bool:
        raise distributed.LostOthers(lost)

    monkeypatch.setattr(Context, "decide", lose)
    ds = make_tiny_dataset(n_train=64, n_test=16)
    config = TrainConfig(dataset="mnist", arch="dense", epochs=3, batch_size=16,
                         out_dir=str(tmp_path), name="run")  # fmt: skip
    run = tmp_path / "run"
    said = (
        rf"^{re.escape(lost)}; {re.escape(str(run / 'last.pt'))} keeps the last good state: "
        rf"continue with 'brainprop train --resume {re.escape(str(run))}'$"
    )
    with pytest.raises(BrainPropError, match=said):
        train(config, dataset=ds, progress=False)
    assert load(run / "last.pt")["epoch"] == 1
    # Where no run knows better, as the run folder is made, the way on is the generic one.
    assert "start the command again, or where the run has a checkpoint" in str(
        distributed.LostOthers(lost)
    )
    # A rank on another node than rank 0 need not see the run folder: it says where to look.
    for name, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)
    elsewhere = _after_losing(SimpleNamespace(is_main=False), tmp_path / "on-rank-0s-node", None)
    assert elsewhere.startswith(
        f"continue from {tmp_path / 'on-rank-0s-node' / 'last.pt'} on rank 0's node, once an "
        "epoch has ended there (before, a resume starts over), with 'torchrun ... -m brainprop "
        "train --resume "
    )
    (run / "last.pt").unlink()  # a folder it sees (rank 0's node, a shared one) tells
    here = _after_losing(SimpleNamespace(is_main=False), run, None)
    assert here.startswith("no checkpoint was written yet, so a resume starts over: continue")


@pytest.mark.parametrize("text", ["inf", "1e20", "nan", "0", "-5", "soon"])
def test_a_bad_timeout_is_a_one_line_error(text: str, monkeypatch) -> None:
    """Infinity passed a plain "> 0" check, then overflowed timedelta with a traceback."""
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "BRAINPROP_DIST_TIMEOUT": text}.items():
        monkeypatch.setenv(name, value)
    error = pytest.raises(BrainPropError, match=r"give a positive number of seconds below 1e9$")
    with error, joined():
        pass


def test_global_batch_must_split_evenly() -> None:
    with pytest.raises(BrainPropError, match="--global-batch 10 does not split evenly over 3"):
        Context(0, 3).global_batch(4, 10)
    assert Context(1, 3).global_batch(4, None) == 12


def test_ranks_get_independent_reproducible_seeds() -> None:
    seeds = [Context(r, 4).seed(3) for r in range(4)]
    assert len(set(seeds)) == 4 and seeds == [Context(r, 4).seed(3) for r in range(4)]
    assert Context(0, 4).seed(4) not in seeds


def test_shards_of_each_global_batch_are_the_one_process_batches() -> None:
    x = torch.arange(41, dtype=torch.uint8).view(41, 1, 1, 1)
    y = torch.arange(41)
    perm = torch.randperm(41, generator=torch.Generator().manual_seed(0))
    ranks = [list(Context(r, 2).batches(x, y, perm, GLOBAL)) for r in range(2)]
    whole = perm.split(GLOBAL)
    assert [len(b[1]) for b in ranks[1]] == [4, 4, 4, 4, 4, 0]
    for step, idx in enumerate(whole):
        assert torch.equal(torch.cat([ranks[0][step][1], ranks[1][step][1]]), idx)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_evaluation_shares_cover_the_images_and_leave_no_rank_one_image(world: int) -> None:
    """A rank's share of one image failed in a BatchNorm without running statistics, which
    normalises with the batch's in evaluation too; shares of two or more are tensor_split's."""
    for images in range(13):
        shares = [Context(r, world).evaluation_share(images) for r in range(world)]
        covered = [i for share in shares for i in range(images)[share]]
        assert covered == list(range(images))
        sizes = [share.stop - share.start for share in shares]
        assert 1 not in sizes or images == 1
        if images >= 2 * world:
            assert sizes == [len(p) for p in torch.arange(images).tensor_split(world)]


@pytest.mark.parametrize("objective", [BrainProp(0.0), EBP()], ids=["brainprop", "ebp"])
def test_weighted_rank_losses_sum_to_the_global_batch_loss(objective) -> None:
    """On a short last batch of 5 split 3 + 2, the weighted per-rank mean losses add up to the
    loss one process computes: BrainProp's over the nominal batch, EBP's over the 5 images."""
    q = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3, 0])
    perm = torch.arange(5)
    total = 0.0
    for rank in range(2):
        context = Context(rank, 2)
        batches = context.batches(q.view(5, 4, 1, 1), y, perm, GLOBAL)
        _, yb = next(batches)
        idx = perm.tensor_split(2)[rank]
        out = objective(q[idx], yb)
        total += float(out.loss) * context.loss_weight(objective, len(yb))
    whole = float(objective(q, y).loss)
    expected = whole * 5 / GLOBAL if objective.sums_over_nominal_batch else whole
    assert total == pytest.approx(expected, rel=1e-6)


def test_resume_on_another_world_size_warns_and_moves_to_a_whole_batch() -> None:
    state: dict[str, Any] = {"world_size": 2, "epoch": 3, "partial": {"step": 3}}
    note = Context(0, 3).adapt_resume(state, 4, None)
    assert note is not None and note.startswith("warning: resuming a run of 2 process(es) on 3")
    assert "global batch changes from 8 to 12" in note and "from image 24 instead of 24" not in note
    assert state["partial"]["step"] == 2  # 24 images done: two batches of 12
    state = {"world_size": 2, "epoch": 3, "partial": {"step": 1}}
    note = Context(0, 4).adapt_resume(state, 4, 8)
    assert "the global batch stays 8" in note and state["partial"]["step"] == 1
    assert Context(0, 2).adapt_resume({"world_size": 2, "epoch": 0}, 4, None) is None


def test_resume_on_another_world_size_gives_each_rank_fresh_streams_of_every_kind() -> None:
    """Not rank 0's, which the plain restore put on every rank: numpy and python too."""
    state = {"world_size": 2, "epoch": 3, "order_generator": torch.Generator().get_state()}
    drawn = []
    for rank in range(3):
        np.random.seed(0)
        random.seed(0)
        Context(rank, 3).restore_streams(state, torch.Generator(), torch.Generator(), seed=5)
        drawn.append((np.random.random_sample(), random.random(), torch.rand(()).item()))
    assert len({d[0] for d in drawn}) == len({d[1] for d in drawn}) == 3
    assert len({d[2] for d in drawn}) == 3


@pytest.mark.parametrize(
    ("command", "what", "fix"),
    [
        (["reproduce", "--datasets", "mnist", "--archs", "dense", "--seeds", "1"],
         "'brainprop reproduce'", "start it without torchrun (it starts a process per run "
         "itself, --jobs at a time)"),
        (["bench", "--presets", "mnist/dense", "--steps", "1"], "'brainprop bench'",
         "start it without torchrun"),
    ],
)  # fmt: skip
def test_reproduce_and_bench_are_refused_under_torchrun(
    tmp_path: Path, monkeypatch, capsys, command: list[str], what: str, fix: str
) -> None:
    """Each rank ran the whole command: reproduce found its folder held by the other rank's
    and called it 'another brainprop reproduce' (review)."""
    from brainprop.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([*command, "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"brainprop: error: {what} runs in one process: {fix}\n"
    assert not (tmp_path / "out").exists()


# -- real process groups ------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join_env(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), BRAINPROP_DIST_TIMEOUT="60",
    )  # fmt: skip


def test_a_resume_with_data_dir_reads_the_run_directory_on_rank_0_alone(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """Rank 1 of a resumed run whose directory lies on rank 0's node only: given --data-dir, it
    looked for the run directory itself and stopped ('no run directory at ...'). It must join
    and take the config from rank 0; no rank 0 comes here, so its join times out."""
    from brainprop.cli import main

    env = dict(RANK="1", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), BRAINPROP_DIST_TIMEOUT="2")  # fmt: skip
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    elsewhere = tmp_path / "on-rank-0s-node"
    assert main(["train", "--resume", str(elsewhere), "--data-dir", str(tmp_path)]) == 2
    assert "process 1 could not join the other 1" in capsys.readouterr().err


def _failing_rank_worker(rank: int, world: int, port: int, out: Path) -> None:
    _join_env(rank, world, port)
    lacks = "process 1 has LOCAL_RANK 1 but this node has 1 GPUs"
    device = distributed.Context.device

    def on_a_one_gpu_node(self: distributed.Context, requested: str) -> torch.device:
        if self.rank == 1:
            raise BrainPropError(lacks)
        return device(self, requested)

    distributed.Context.device = on_a_one_gpu_node
    try:
        train(_config(out, "r", epochs=1, global_batch=8),
              dataset=make_tiny_dataset(n_train=16, n_test=8), progress=False)  # fmt: skip
    except BrainPropError as e:
        (out / f"rank{rank}.txt").write_text(str(e))


def test_a_rank_that_cannot_build_its_trainer_fails_every_rank_before_the_run_is_made(
    tmp_path: Path,
) -> None:
    """Rank 0 went on to make the run directory, then found rank 1 gone: the folder stayed
    behind, and the same --name next time became NAME-2 (review)."""
    mp.spawn(_failing_rank_worker, args=(2, _free_port(), tmp_path), nprocs=2, join=True)
    for rank in range(2):
        assert (tmp_path / f"rank{rank}.txt").read_text() == (
            "process 1 has LOCAL_RANK 1 but this node has 1 GPUs"
        )
    assert not (tmp_path / "r").exists()


def _config(out: Path, name: str, **overrides: Any) -> TrainConfig:
    base: dict[str, Any] = dict(
        dataset="mnist", arch="dense", epsilon=0.0, epochs=2, seed=5, out_dir=str(out),
        name=name, device="cpu",
    )  # fmt: skip
    return TrainConfig(**{**base, **overrides})


#: (rule, arch, training images): BrainProp over 41 images ends with a global batch of 1, so
#: rank 1 idles through it; EBP over 43 ends with 3, split 2 + 1, which its mean weights
#: unevenly. ``conv`` has BatchNorm, synchronised over the ranks, and its dropout is off.
EQUIVALENCE = tuple(
    (rule, arch, n) for arch in ("dense", "conv") for rule, n in (("brainprop", 41), ("ebp", 43))
)


def _equivalence_config(out: Path, rule: str, arch: str, n_train: int, **batch: int) -> TrainConfig:
    dropout = {"dropout": (0.0, 0.0)} if arch == "conv" else {}
    return _config(out, f"{rule}-{arch}-{n_train}", rule=rule, arch=arch, **dropout, **batch)


def _biased_net(net, num_classes, dropout):
    """A network of one's own whose biases PyTorch initialises from the global streams."""
    net.flatten()
    net.add(torch.nn.Linear(net.shape[0], 16))
    net.add(torch.nn.ReLU())
    net.dense(num_classes, relu=False)


#: Trained on 2 ranks by the spawned job and on one process by the test.
BIASED = dict(arch="biased", preset="biased", epochs=1)


def _register_biased(setitem: Any) -> None:
    setitem(ARCHITECTURES, "biased", (_biased_net, 0))
    setitem(PRESETS, "biased", {("mnist", "biased"): Hyperparameters(init_std=0.05, dropout=())})


def _leaving_worker(rank: int, world: int, port: int, out: Path) -> None:
    _join_env(rank, world, port)
    imported_before = "torch._dynamo" in sys.modules
    train(_config(out, "leave", epochs=1, batch_size=8),
          dataset=make_tiny_dataset(n_train=16, n_test=8), progress=False)  # fmt: skip
    group = torch.distributed.group.WORLD
    torch.distributed.destroy_process_group()
    gc.collect()
    (out / f"rank{rank}.txt").write_text(f"{imported_before} {sys.getrefcount(group) - 1}")


def test_leaving_frees_the_process_group(tmp_path: Path) -> None:
    """Once a job leaves its group, nothing holds it but the caller (here one local name):
    not torch._dynamo, which the optimizer imports after the group exists. A group that
    survives keeps gloo's threads running into Python's shutdown, where under torch 2.11 they
    abort the finished process now and then."""
    mp.spawn(_leaving_worker, args=(2, _free_port(), tmp_path), nprocs=2, join=True)
    for rank in range(2):
        assert (tmp_path / f"rank{rank}.txt").read_text() == "False 1"


def _worker(rank: int, world: int, port: int, out: Path) -> None:
    _join_env(rank, world, port)
    for rule, arch, n_train in EQUIVALENCE:
        config = _equivalence_config(out, rule, arch, n_train, global_batch=GLOBAL)
        train(config, dataset=make_tiny_dataset(n_train=n_train, n_test=20), progress=False)
    ds = make_tiny_dataset(n_train=48, n_test=16)
    _register_biased(operator.setitem)
    train(_config(out, "biased", global_batch=GLOBAL, **BIASED), dataset=ds, progress=False)
    # Rank 1 started with another setting, or with other data: each rank is refused.
    (out / "refused").mkdir(exist_ok=True)
    for name, setting, data_seed in (("epochs", {"epochs": 1 + rank}, 0), ("data", {}, rank)):
        with pytest.raises(BrainPropError) as refused:
            train(_config(out, f"refused-{name}", global_batch=GLOBAL, **setting),
                  dataset=make_tiny_dataset(n_train=48, n_test=16, seed=data_seed),
                  progress=False)  # fmt: skip
        (out / "refused" / f"{name}-rank{rank}.txt").write_text(str(refused.value))
    for name in ("explore-a", "explore-b"):
        train(_config(out, name, epsilon=0.5, epochs=1, global_batch=GLOBAL), dataset=ds,
              progress=False)  # fmt: skip
    # The same run, but rank 1 alone gets SIGTERM during step 3 of 6; then resumed.
    real = fastpath.train_step
    steps = [0]

    def signalled_step(*args: Any, **kwargs: Any) -> Any:
        steps[0] += 1
        if rank == 1 and steps[0] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    fastpath.train_step = signalled_step
    with pytest.raises(Interrupted, match="in epoch 1 after step 3") as cut:
        train(_config(out, "explore-cut", epsilon=0.5, epochs=1, global_batch=GLOBAL),
              dataset=ds, progress=False)  # fmt: skip
    (out / "stops").mkdir(exist_ok=True)
    (out / "stops" / f"cut-rank{rank}.txt").write_text(str(cut.value))
    fastpath.train_step = real
    if rank == 0:  # kept mid-epoch, for a resume on one process
        shutil.copytree(out / "explore-cut", out / "explore-cut-one")
    train(None, resume=out / "explore-cut", dataset=ds, progress=False)
    # Rank 1 alone sees a NaN loss at step 2: with --on-nan stop and reload, every rank must
    # take the same branch (stop, or rewind to the initial state at half the learning rate).
    nans = [0]

    def nan_step(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)
        nans[0] += 1
        if rank == 1 and nans[0] == 2:
            return dataclasses.replace(out, loss=out.loss * math.nan)
        return out

    fastpath.train_step = nan_step
    for on_nan in ("stop", "reload"):
        nans[0] = 0
        train(_config(out, f"nan-{on_nan}", epochs=1, global_batch=GLOBAL, on_nan=on_nan),
              dataset=ds, progress=False)  # fmt: skip
    fastpath.train_step = real
    # Rank 1 draws another epoch order (as on another GPU model): the run is still rank 0's.
    real_randperm = torch.randperm

    def other_order(*args: Any, **kwargs: Any) -> torch.Tensor:
        return real_randperm(*args, **kwargs).flip(0)

    torch.randperm = other_order if rank == 1 else real_randperm
    train(_config(out, "order-other", epochs=1, global_batch=GLOBAL), dataset=ds, progress=False)
    torch.randperm = real_randperm
    train(_config(out, "order-same", epochs=1, global_batch=GLOBAL), dataset=ds, progress=False)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """The run directories of one 2-process job (one spawn: each costs seconds of imports)."""
    out = tmp_path_factory.mktemp("two")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    return out


def test_two_processes_match_one_with_the_global_batch(two_ranks: Path, tmp_path: Path) -> None:
    """Exploration and dropout off: 2 ranks x 4 images per step take the steps 1 process takes
    with 8, over 2 epochs, short last batches included; with BatchNorm (the conv net) too,
    since its statistics are the global batch's."""
    for rule, arch, n_train in EQUIVALENCE:
        config = _equivalence_config(tmp_path, rule, arch, n_train, batch_size=GLOBAL)
        name = config.name
        one = train(config, dataset=make_tiny_dataset(n_train=n_train, n_test=20), progress=False)
        two = load(two_ranks / name / "last.pt")
        assert two["world_size"] == 2 and two["epoch"] == 2
        for key, tensor in one.model.state_dict().items():
            torch.testing.assert_close(two["model"][key], tensor, rtol=1e-5, atol=1e-6)
        history = json.loads((two_ranks / name / "history.json").read_text())
        assert [h["val_acc"] for h in history] == [h["val_acc"] for h in one.history]
        for h, h1 in zip(history, one.history, strict=True):
            assert h["train_loss"] == pytest.approx(h1["train_loss"], rel=1e-5)
            assert h["train_reward"] == h1["train_reward"]
    # Rank 0 alone wrote: one directory per run.
    assert sorted(p.name for p in two_ranks.iterdir()) == sorted(
        [
            "biased",
            "refused",
            "stops",
            "explore-a",
            "explore-b",
            "explore-cut",
            "explore-cut-one",
            "nan-reload",
            "nan-stop",
            "order-other",
            "order-same",
            *(f"{r}-{a}-{n}" for r, a, n in EQUIVALENCE),
        ]  # fmt: skip
    )


def test_ranks_start_a_network_of_ones_own_alike(two_ranks: Path, tmp_path: Path, monkeypatch):
    """Its biases too, which PyTorch draws from the global streams: each rank's own stream
    began only after the build, or every rank trained another network (review)."""
    _register_biased(monkeypatch.setitem)
    config = _config(tmp_path, "biased", batch_size=GLOBAL, **BIASED)
    one = train(config, dataset=make_tiny_dataset(n_train=48, n_test=16), progress=False)
    two = load(two_ranks / "biased" / "last.pt")["model"]
    for key, tensor in one.model.state_dict().items():
        torch.testing.assert_close(two[key], tensor, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("differs", ["epochs", "data"])
def test_ranks_that_differ_in_a_setting_or_their_data_are_refused(two_ranks: Path, differs):
    """In one line on every rank, before a run directory is made (review): other settings hung
    until the timeout, other data trained one run of mixed data or aborted in gloo."""
    for rank in (0, 1):
        said = (two_ranks / "refused" / f"{differs}-rank{rank}.txt").read_text()
        assert said == (
            f"rank 1 differs from rank 0 in {differs}: start every process with the same "
            "command, data and brainprop version"
        )


def test_exploration_streams_differ_per_rank_and_the_run_is_reproducible(two_ranks: Path) -> None:
    a, b = load(two_ranks / "explore-a" / "last.pt"), load(two_ranks / "explore-b" / "last.pt")
    ranks = a["ranks"]
    assert not torch.equal(ranks[0]["generator"], ranks[1]["generator"])
    assert not torch.equal(ranks[0]["torch"], ranks[1]["torch"])
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    for ra, rb in zip(a["ranks"], b["ranks"], strict=True):
        assert torch.equal(ra["generator"], rb["generator"])
    history = json.loads((two_ranks / "explore-a" / "history.json").read_text())
    assert history[0]["explore_rate"] > 0.3


def test_a_signal_on_one_rank_stops_all_at_one_step_and_resume_is_bit_identical(
    two_ranks: Path,
) -> None:
    assert_same_run(two_ranks / "explore-a", two_ranks / "explore-cut")
    whole = load(two_ranks / "explore-a" / "last.pt")
    cut = load(two_ranks / "explore-cut" / "last.pt")
    for ra, rb in zip(whole["ranks"], cut["ranks"], strict=True):
        assert torch.equal(ra["generator"], rb["generator"])
        assert torch.equal(ra["torch"], rb["torch"])
        # numpy's and python's too: each rank seeded its own, and takes it back.
        assert torch.equal(ra["numpy"]["keys"], rb["numpy"]["keys"])
        assert torch.equal(ra["python"]["internal"], rb["python"]["internal"])
    assert not torch.equal(whole["ranks"][0]["numpy"]["keys"], whole["ranks"][1]["numpy"]["keys"])
    # Resumed on one process, the run would take another global batch and other streams.
    again = (
        "continue with 'torchrun --standalone --nproc_per_node=2 -m brainprop train --resume "
        f"{two_ranks / 'explore-cut'}'"
    )
    for rank in range(2):
        assert (two_ranks / "stops" / f"cut-rank{rank}.txt").read_text().endswith(again)


def test_a_nan_on_one_rank_stops_or_rewinds_every_rank(two_ranks: Path) -> None:
    stop = json.loads((two_ranks / "nan-stop" / "summary.json").read_text())
    assert stop["stop_reason"] == "non-finite loss at epoch 1, step 2"
    assert stop["epochs_run"] == 0 and not (two_ranks / "nan-stop" / "last.pt").exists()
    reload = json.loads((two_ranks / "nan-reload" / "summary.json").read_text())
    assert reload["nan_reloads"] == 1 and reload["epochs_run"] == 1
    assert load(two_ranks / "nan-reload" / "last.pt")["lr_scale"] == 0.5


def test_ranks_train_on_rank_zeros_epoch_order(two_ranks: Path) -> None:
    same, other = (load(two_ranks / name / "last.pt") for name in ("order-same", "order-other"))
    for key, tensor in same["model"].items():
        assert torch.equal(other["model"][key], tensor), key


def test_a_two_process_checkpoint_resumes_on_one_process_with_a_warning(
    two_ranks: Path, capsys
) -> None:
    run = train(None, resume=two_ranks / "explore-cut-one", progress=False,
                dataset=make_tiny_dataset(n_train=48, n_test=16))  # fmt: skip
    assert capsys.readouterr().err.strip() == (
        "brainprop: warning: resuming a run of 2 process(es) on 1: the global batch stays 8, each "
        "process explores with a new random stream; the continuation is deterministic but not "
        "the run 2 process(es) would have made"
    )
    assert run.summary["epochs_run"] == 1 and run.summary["world_size"] == 1
    whole = json.loads((two_ranks / "explore-a" / "history.json").read_text())[0]
    # The first 3 of 6 steps were the 2-process run's; the rest differ only in exploration.
    assert run.history[0]["train_reward"] == pytest.approx(whole["train_reward"], abs=0.25)


def test_batch_size_and_global_batch_are_one_setting() -> None:
    with pytest.raises(BrainPropError, match="--batch-size 32 and --global-batch 64 both"):
        TrainConfig(dataset="mnist", arch="dense", batch_size=32, global_batch=64).resolve()
    config = TrainConfig(dataset="mnist", arch="dense", global_batch=64).resolve()
    assert config.batch_size == 64 and config.global_batch == 64
    with pytest.raises(BrainPropError, match="--global-batch must be >= 1, got 0"):
        TrainConfig(dataset="mnist", arch="dense", global_batch=0).resolve()


# -- whole torchrun jobs --------------------------------------------------------------------


def _torchrun(*args: str | Path, module: bool = True) -> list[str]:
    target = ["-m", "brainprop"] if module else [str(BIN / "brainprop")]
    return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", *target, *map(str, args)]


def _env() -> dict[str, str]:
    return {
        **os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        "BRAINPROP_DIST_TIMEOUT": "30",
    }  # fmt: skip


def test_torchrun_trains_end_to_end_into_one_run_directory(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "runs"
    write_idx_dataset(data / "mnist", n_train=40, n_test=20, gz=False)
    done = subprocess.run(
        _torchrun("train", "--dataset", "mnist", "--arch", "dense", "--global-batch", "16",
                  "--epochs", "2", "--data-dir", data, "--out", out, "--quiet"),
        env=_env(), capture_output=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    (run,) = out.iterdir()
    summary = json.loads(done.stdout)  # rank 0 alone prints it
    assert summary["epochs_run"] == 2 and summary["world_size"] == 2
    assert json.loads((run / "config.json").read_text())["global_batch"] == 16
    assert {"last.pt", "best.pt", "history.csv", "summary.json"} <= {p.name for p in run.iterdir()}


def _workers(agent: int) -> dict[int, int]:
    """{rank: pid} of the worker processes torchrun's agent ``agent`` started."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        rank = [v for v in env if v.startswith(b"RANK=")]
        if ppid == agent and rank:
            found[int(rank[0][5:])] = int(entry.name)
    return found


def test_a_killed_rank_fails_the_job_promptly_and_resume_completes(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "runs"
    write_idx_dataset(data / "mnist", n_train=64, n_test=16, gz=False)
    run = out / "run"
    job = subprocess.Popen(
        _torchrun("train", "--dataset", "mnist", "--arch", "dense", "--batch-size", "8",
                  "--epochs", "100", "--data-dir", data, "--out", out, "--name", "run", "--quiet"),
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 90
    while not (run / "last.pt").is_file() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = _workers(job.pid)
    assert job.poll() is None and set(workers) == {0, 1}, job.communicate()[1].decode()[-3000:]
    os.kill(workers[1], signal.SIGKILL)
    # Promptly: a job that hung on its dead rank would time out here (no timed assertion,
    # which a loaded machine could fail).
    _, err = job.communicate(timeout=90)
    assert job.returncode != 0
    assert "SIGKILL" in err.decode(), err.decode()[-3000:]
    # The survivor, waiting for the dead rank in a collective, says how to go on.
    way_on = (
        f"{run / 'last.pt'} keeps the last good state: continue with 'torchrun --standalone "
        f"--nproc_per_node=2 -m brainprop train --resume {run}'\n"
    )
    said = err.decode()
    assert "process 0 of 2 lost the others during " in said and way_on in said, said[-3000:]

    epochs = load(run / "last.pt")["epoch"] + 1
    done = subprocess.run(
        _torchrun("train", "--resume", run, "--epochs", str(epochs), "--quiet", module=False),
        env=_env(), capture_output=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert json.loads(done.stdout)["epochs_run"] == epochs
    assert [p.name for p in out.iterdir()] == ["run"]


def test_summed_gradients_keep_each_parameters_layout(monkeypatch) -> None:
    """channels_last convolution weights (the fast path) get their gradients back in that
    layout, summed over the ranks; plain ones stay contiguous."""
    from brainprop.presets import build_model

    model = fastpath.prepare(
        build_model("conv", (3, 8, 8), 4, generator=torch.Generator()), (3, 8, 8)
    )
    model(torch.rand(2, 3, 8, 8)).square().sum().backward()
    before = {name: p.grad.clone() for name, p in model.named_parameters()}
    # Two ranks with the same gradients: the all-reduce doubles them.
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: t.mul_(2))
    Context(rank=0, world_size=2).reduce_gradients(model)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * before[name])
        assert p.grad.stride() == p.stride(), name
    assert any(p.dim() == 4 and not p.is_contiguous() for p in model.parameters())


# -- the collectives' arithmetic, one rank's view (the others' part faked) --------------------


def test_a_nan_at_the_first_step_is_agreed_as_step_0(monkeypatch) -> None:
    """Step 0 is a step: the 'no NaN' sentinel must not swallow it (the other rank is clean)."""
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, op=None: t)
    assert Context(0, 2).first_bad(torch.tensor(0)).item() == 0
    assert Context(0, 2).first_bad(torch.tensor(3)).item() == 3
    assert Context(0, 2).first_bad(torch.tensor(-1)).item() == -1


def test_decisions_and_batchnorm_statistics_are_rank_zeros(monkeypatch) -> None:
    """Rank 1 takes rank 0's early-stopping decision and running statistics, not its own."""

    def broadcast(t: torch.Tensor, src: int) -> None:
        t.fill_(1 if src == 0 else 0)  # rank 0's values are ones

    monkeypatch.setattr(torch.distributed, "broadcast", broadcast)
    rank1 = Context(1, 2)
    assert rank1.decide(False) is True
    bn = torch.nn.BatchNorm1d(3)
    rank1.broadcast_buffers(bn)
    assert torch.equal(bn.running_mean, torch.ones(3))


def test_a_sharded_accuracy_counts_each_ranks_correct_images_exactly(monkeypatch) -> None:
    """0.29 * 100 is 28.999... in floats: the count of correct images is rounded, not cut,
    and the sum over ranks is divided by all the images."""
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: t.mul_(2))  # 2 alike ranks
    shares = []

    def score(x: torch.Tensor, y: torch.Tensor) -> float:
        shares.append(len(y))
        return 29 / 100

    acc = Context(0, 2).accuracy(score, torch.zeros(200, 1), torch.zeros(200, dtype=torch.long))
    assert shares == [100] and acc == 58 / 200


class _PartlyUsed(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used, self.unused = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def test_a_parameter_the_forward_pass_leaves_unused_keeps_no_gradient(monkeypatch) -> None:
    """As in one process: summed gradients for the used parameters, none for an unused one
    (a zero would be decayed and pushed by momentum), on a step with images and on an idle
    rank's step, which takes the set of its last step with images."""
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: t.mul_(2))
    model, context = _PartlyUsed(), Context(1, 2)
    model(torch.ones(4, 2)).sum().backward()
    before = model.used.weight.grad.clone()
    context.reduce_gradients(model)
    torch.testing.assert_close(model.used.weight.grad, 2 * before)
    assert model.unused.weight.grad is None and model.unused.bias.grad is None
    model.zero_grad(set_to_none=True)  # an idle step: no images, no backward
    context.reduce_gradients(model)
    assert torch.equal(model.used.weight.grad, torch.zeros_like(model.used.weight))
    assert model.unused.weight.grad is None


def test_each_rank_takes_its_own_running_sums_from_a_mid_epoch_checkpoint() -> None:
    """Its own on as many processes; else rank 0 takes all of them and the others none, so
    the epoch's sums count them once."""
    totals = [torch.tensor(6.0), torch.tensor(3.0)]
    rank_sums = [torch.tensor([1.0, 2.0]), torch.tensor([5.0, 1.0])]
    assert Context(1, 2).own_share({"rank_sums": rank_sums}, totals) == [5.0, 1.0]
    assert Context(0, 3).own_share({"rank_sums": rank_sums}, totals) == totals
    for partial in ({"rank_sums": rank_sums}, {}):
        assert Context(1, 3).own_share(partial, totals) == [0.0, 0.0]
        assert Context(2, 3).own_share(partial, totals) == [0.0, 0.0]


def test_a_failure_on_rank_0_reaches_every_rank(monkeypatch) -> None:
    """Rank 0 raises its own error (an Interrupted stays one: its exit status); the others a
    BrainPropError with its line, and a crash says where to look."""
    sent: list[Any] = []
    monkeypatch.setattr(
        torch.distributed, "broadcast_object_list", lambda box, src: sent.append(box[0])
    )

    def interrupted() -> None:
        raise Interrupted("stopped at once by a second signal", signal.SIGTERM)

    with pytest.raises(Interrupted):
        Context(0, 2).on_main(interrupted)
    assert sent == [("crash", "Interrupted: stopped at once by a second signal")]

    def receive(kind: str, value: str) -> Any:
        monkeypatch.setattr(torch.distributed, "broadcast_object_list",
                            lambda box, src: box.__setitem__(0, (kind, value)))  # fmt: skip
        return Context(1, 2).on_main(lambda: pytest.fail("rank 1 did rank 0's work"))

    with pytest.raises(BrainPropError, match=r"^no space left on /runs$"):
        receive("error", "no space left on /runs")
    with pytest.raises(BrainPropError, match=r"^rank 0 failed \(OSError: gone\); see its output"):
        receive("crash", "OSError: gone")
    assert receive("ok", 7) == 7


def test_a_rank_outside_the_world_is_refused(monkeypatch) -> None:
    for name, value in {"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(name, value)
    refused = pytest.raises(BrainPropError, match=r"^\$RANK is 2 but \$WORLD_SIZE is 2: launch")
    with refused, joined():
        pass


def test_each_rank_is_given_a_gpu_of_its_own_or_refused(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert Context(1, 2, local_rank=1).device("cuda") == torch.device("cuda", 1)
    with pytest.raises(BrainPropError, match="has LOCAL_RANK 2 but this node has 2 GPUs"):
        Context(2, 3, local_rank=2).device("auto")
    with pytest.raises(BrainPropError, match="^--device cuda:0 would put all 2 processes on one"):
        Context(0, 2).device("cuda:0")


def test_a_lost_rank_is_said_in_one_line() -> None:
    """gloo spreads its cause over several lines."""
    collective = Context(0, 2, timeout_s=30)._collective("the gradient all-reduce")
    with pytest.raises(distributed.LostOthers) as lost, collective:
        raise RuntimeError("[../gloo/transport/tcp/pair.cc:534]\n  Connection closed by peer")
    assert "\n" not in str(lost.value)
    assert str(lost.value).startswith(
        "process 0 of 2 lost the others during the gradient all-reduce ([../gloo/transport/tcp/"
        "pair.cc:534] Connection closed by peer): another process died or stalled for over 30s"
    )


def test_a_several_process_checkpoint_continues_its_order_stream_in_one_process() -> None:
    order = torch.Generator().manual_seed(11).get_state()
    generator = torch.Generator().manual_seed(0)
    Context().restore_streams({"world_size": 2, "order_generator": order}, generator,
                              torch.Generator(), seed=5)  # fmt: skip
    assert torch.equal(generator.get_state(), order)
