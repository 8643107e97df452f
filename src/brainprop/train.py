"""The training loop: epochs, NaN stop, checkpoints, resume, history.

It knows nothing of which rule or architecture it runs: the objective turns Q-values into a
loss, the model is whatever :func:`brainprop.presets.build_model` builds for the config's
``arch`` (a new architecture is a builder registered there), and
:func:`~brainprop.step.train_step` applies plain SGD (through
:func:`brainprop.fastpath.make_step`, which may replay it from a CUDA graph).
The learning-rate schedule and early stopping are in :mod:`brainprop.schedule`, and what a
run's ``summary.json`` holds in :mod:`brainprop.summary`.

The loop keeps every per-step quantity on the device and reads back once per epoch, so a step
never waits for the host.

Everything about a run but its pass over the training set (:class:`Trainer`, ``end_epoch``,
``rewind``, ``create_run``, ``write_results`` ...) is public because :mod:`brainprop.stacked`
runs it for each of several seeds that share one stacked pass.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import (
    checkpoint,
    distributed,
    fastpath,
    files,
    memory,
    owncode,
    plugins,
    rng,
    rundir,
    signals,
)
from .config import MAX_NAN_RELOADS, VAL_TEST, TrainConfig
from .data import Dataset, given_dataset, load_dataset, split_validation
from .data.batches import num_batches, permuted_batches, to_float
from .devices import device_name, software, warn_if_slow_bf16
from .diagnostics import diagnostics, plot_diagnostics
from .errors import BrainPropError, kind_of
from .evaluation import accuracy, all_finite, modes_kept
from .feedback import convert
from .objectives import OBJECTIVES, Objective, check_rule, make_objective
from .peaks import tf32_ops
from .presets import build_model
from .provenance import check_loadable, check_same_data
from .resume import (
    PARTIAL_SUMS,
    RESUME_CALL,
    RESUME_REMEDY,
    checkpoint_and_config,
    data_record,
    history_ok,
    optimizer_settings,
    partial_ok,
    reopen,
    restore,
)
from .schedule import EarlyStopping, lr_at
from .step import make_optimizer, tally
from .summary import DIVERGED, EARLY_STOPPING, MAX_EPOCHS, best_row, epochs_phrase, summarize
from .syncbn import alone, synchronise, synchronised

DIAGNOSTIC_BATCH = 256
DIAGNOSTICS_PLOT = "diagnostics.png"
#: The history columns that measure the machine rather than the run: two runs that are
#: otherwise bit-identical differ in these.
MEASURED_COLUMNS = ("seconds", "eval_seconds", "peak_memory_mib", "host_rss_mib")


@dataclass
class Run:
    """A finished (or stopped) training run.

    Attributes:
        dir: its run directory (``config.json``, ``history.*``, ``best.pt``, ``last.pt``,
            ``summary.json``, the plots).
        config: the resolved configuration it trained with.
        model: the network as the run left it (the last epoch's weights, not the best's:
            ``load_model(run.dir)`` gives those).
        history: one dict per epoch, as ``history.json`` (lr, train loss and reward rate,
            validation and test accuracy, seconds, memory, feedback diagnostics).
        summary: as ``summary.json`` (:mod:`brainprop.summary`): best validation accuracy and
            its epoch, test accuracy there, epochs run, why it stopped, s/epoch, device.
    """

    dir: Path
    config: TrainConfig
    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    def __fspath__(self) -> str:
        """Its directory, where a path is taken: ``evaluate(run)``, ``load_model(run)``,
        ``train(resume=run)``, ``train_stacked([run, ...])``."""
        return str(self.dir)


@dataclass
class StepParts:
    """A run's training step and what it is built from: the network (converted to its feedback
    pathway, on its device, prepared for the fast path), objective, optimizer and exploration
    generator."""

    model: nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    step: fastpath.Step


def build_step(
    config: TrainConfig,
    input_shape: tuple[int, ...],
    num_classes: int,
    device: torch.device,
    parallel: distributed.Context,
) -> StepParts:
    """The step of the resolved ``config`` as a run of it takes it, on ``device`` among
    ``parallel``'s processes: what :class:`Trainer` trains with and ``brainprop bench`` times,
    so that the two cannot drift apart."""
    # The init, the loop's generator below and the global streams (Trainer) all start from
    # config.seed (one process's; parallel.seed gives each rank its own), so streams of one kind
    # (on a CPU, all three) draw one sequence of words into different things (normal weights, a
    # permutation, uniforms): a coupling of no known effect on learning. A seed derived per
    # stream would make every seed of results/ another run.
    init = torch.Generator().manual_seed(config.seed)
    model = build_model(config.arch, input_shape, num_classes, config.hyperparameters(), init)
    # Before .to() and before the optimizer, so reciprocal B lands in the decayed group.
    convert(model, config.feedback, generator=init)
    if parallel.active and config.sync_batchnorm:
        synchronise(model, parallel)
    fastpath.prepare(model.to(device), input_shape, eager=config.eager)
    objective = make_objective(config.rule, config.epsilon, fused=not config.eager)
    if config.rule not in OBJECTIVES.builtin:
        # On an instance of its own: the run's starts as the rule's code made it.
        check = make_objective(config.rule, config.epsilon, fused=not config.eager)
        check_rule(config.rule, check, num_classes, device)
    optimizer = make_optimizer(model, config)
    generator = torch.Generator(device=device).manual_seed(parallel.seed(config.seed))
    step = fastpath.make_step(
        model, objective, optimizer, generator=generator, batch_size=config.batch_size,
        bf16=config.bf16, cuda_graph=config.cuda_graph, parallel=parallel,
    )  # fmt: skip
    return StepParts(model, objective, optimizer, generator, step)


class Trainer:
    """One run's mutable state: what ``train`` below, or a stack of runs
    (:mod:`brainprop.stacked`), advances epoch by epoch."""

    def __init__(
        self,
        config: TrainConfig,
        ds: Dataset,
        progress: bool,
        tag: str | None = None,
        *,
        data_of: Trainer | None = None,
        parallel: distributed.Context | None = None,
    ) -> None:
        """``data_of``: a trainer of the same config and ``ds`` whose training and validation
        tensors, already on the device, this one shares instead of copying ``ds`` there.
        ``parallel``: the processes it trains among (:mod:`brainprop.distributed`); None, those
        of the ``distributed.joined`` block it is made in, or this process alone."""
        self.config, self.progress, self.tag = config, progress, tag
        if not len(ds.train_y):
            raise BrainPropError(
                f"dataset {ds.name!r} holds no training images: train on one that has a "
                "training split"
            )
        self.parallel = distributed.current() if parallel is None else parallel
        self.device = self.parallel.device(config.device)
        # As the run starts: its summary, written at the end, must name the code that ran, not
        # the files as edited meanwhile.
        self.software = software(self.device)
        # Alike on every rank until the network is built: a module of one's own may draw its
        # default initialisation (a bias, say) from the global streams.
        rng.seed_all(config.seed)
        if data_of is not None:
            if data_of.device != self.device or data_of.config.val != config.val:
                raise ValueError("data_of must be a trainer of the same device and validation")
            self.train_set, self.val_x, self.val_y = data_of.train_set, data_of.val_x, data_of.val_y
        elif config.val == VAL_TEST:
            ds = ds.to(self.device)
            self.train_set, self.val_x, self.val_y = ds, ds.test_x, ds.test_y
        else:
            self.train_set, self.val_x, self.val_y = split_validation(
                ds.to(self.device), int(config.val)
            )
        self.global_batch = self.parallel.global_batch(config.batch_size, config.global_batch)
        check_batch(config, self.global_batch, ds.name, len(self.train_set.train_y), self.parallel)
        parts = build_step(config, ds.input_shape, ds.num_classes, self.device, self.parallel)
        if self.parallel.active:
            # Dropout draws from the global streams: each rank its own.
            rng.seed_all(self.parallel.seed(config.seed))
        self.model, self.objective, self.optimizer = parts.model, parts.objective, parts.optimizer
        check_one_image_steps(self, ds.input_shape, ds.name)
        self.generator, self.step = parts.generator, parts.step
        # The epochs' order: one process draws it from its only generator; several draw it
        # from one seeded alike on every rank, apart from their own exploration streams.
        self.order_generator = self.generator
        if self.parallel.active:
            self.order_generator = torch.Generator(device=self.device).manual_seed(config.seed)
        # Set by load_state for a checkpoint written by another number of processes.
        self.resume_note: str | None = None
        self.stopper = EarlyStopping(config.patience, config.min_delta)
        self.history: list[dict[str, Any]] = []
        # Halved by each on_nan="reload"; multiplies the schedule's rate.
        self.lr_scale = 1.0
        self.nan_reloads = 0
        # Whether this epoch's peak memory is counted from its start (see memory.reset_peak).
        self.memory_counted = False
        # Where a stop signal cut the current epoch short (see train_epoch); None between epochs.
        self.partial: dict[str, Any] | None = None
        self.input_shape, self.num_classes = ds.input_shape, ds.num_classes
        # Recorded in every checkpoint: resume and evaluate refuse other data.
        self.data_fingerprint = ds.fingerprint(None if config.val == VAL_TEST else int(config.val))
        # One fixed batch for the per-epoch feedback diagnostics.
        n_diag = min(DIAGNOSTIC_BATCH, len(self.train_set.train_y))
        self.diag_x = to_float(self.train_set.train_x[:n_diag])
        self.diag_y = self.train_set.train_y[:n_diag]

    def state(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically from here: the end of the last epoch,
        or the step a stop signal interrupted (``partial``)."""
        return {
            **self.identity(),
            # CPU and CUDA random states differ in kind: a resume must stay on this device type.
            "device_type": self.device.type,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": len(self.history),
            "history": self.history,
            "early_stopping": self.stopper.state_dict(),
            "lr_scale": self.lr_scale,
            "nan_reloads": self.nan_reloads,
            "partial": self.partial,
            "rng": rng.capture(self.generator),
            # Several processes: every rank's streams (a collective: all ranks call state()).
            **self.parallel.streams(self.generator, self.order_generator),
        }

    def identity(self) -> dict[str, Any]:
        """What every checkpoint (last.pt, best.pt) says of the run: its config, and the
        network's input shape, classes and data."""
        return {
            "config": self.config.to_dict(),
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "data": self.data_fingerprint,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state`'s output.

        Raises ValueError, TypeError, KeyError, RuntimeError ... for a damaged state; every part
        the loop reads later is checked here, so damage never surfaces mid-run as a traceback.
        """
        self.resume_note = self.parallel.adapt_resume(
            state, self.config.batch_size, self.config.global_batch
        )
        with checkpoint.entry("its weights"):
            checkpoint.load_weights(self.model, state["model"])
        settings = optimizer_settings(self.optimizer)
        with checkpoint.entry("its optimizer state"):
            self.optimizer.load_state_dict(state["optimizer"])
        if optimizer_settings(self.optimizer) != settings:
            raise ValueError("its optimizer settings differ from its config")
        if not history_ok(state["history"], state["epoch"]):
            raise ValueError("its history is malformed")
        self.history = list(state["history"])
        with checkpoint.entry("its early-stopping state"):
            self.stopper.load_state_dict(state["early_stopping"])
        if self.stopper.wait > state["epoch"]:
            raise ValueError("its early stopping waited more epochs than it ran")
        self.lr_scale, self.nan_reloads = float(state["lr_scale"]), state["nan_reloads"]
        if not (
            math.isfinite(self.lr_scale)
            and self.lr_scale > 0
            and type(self.nan_reloads) is int
            and 0 <= self.nan_reloads <= MAX_NAN_RELOADS
        ):
            raise ValueError("its NaN-reload count or learning-rate scale is out of range")
        partial = state["partial"]
        if partial is not None:
            if not partial_ok(partial):
                raise ValueError("its mid-epoch position is malformed")
            # At most the end: a position moved to another world size's batches may land there.
            if partial["step"] > num_batches(len(self.train_set.train_y), self.global_batch):
                raise ValueError("its mid-epoch position is past the end of an epoch")
            self.generator.set_state(partial["order_rng"])  # fails now, not mid-run, if damaged
        self.partial = partial
        with checkpoint.entry("its random states"):
            rng.restore(state["rng"], self.generator)
        with checkpoint.entry("its per-process random states"):
            self.parallel.restore_streams(
                state, self.generator, self.order_generator, self.config.seed
            )

    def train_epoch(self, epoch: int, stop: signals.StopRequest) -> dict[str, float] | None:
        """One pass over the training set; returns the epoch's training metrics and seconds.

        Returns None when ``stop`` is requested before the last step: :attr:`partial` then
        holds the position (next step, the generator state the epoch's order was drawn from,
        the running sums), so a checkpoint of :meth:`state` resumes with the very next batch.
        A trainer restored with a ``partial`` starts there instead of at step 0.
        """
        cfg, model, ds = self.config, self.model, self.train_set
        self.set_lr(epoch)
        model.train()
        self.memory_counted = memory.reset_peak(self.device)
        t0 = time.perf_counter()
        n = len(ds.train_y)
        partial, self.partial = self.partial, None
        if partial is None:
            zero = torch.zeros((), device=self.device)
            loss_sum, reward_sum, explored_sum = zero.clone(), zero.clone(), zero.clone()
            first_bad = torch.full((), -1, dtype=torch.int64, device=self.device)
            start, seconds, order_rng = 0, 0.0, self.order_generator.get_state()
            perm = torch.randperm(n, device=self.device, generator=self.order_generator)
        else:
            loss_sum, reward_sum, explored_sum, first_bad = (
                partial[k].to(self.device) for k in PARTIAL_SUMS
            )
            loss_sum, reward_sum, explored_sum = self.parallel.own_share(
                partial, [loss_sum, reward_sum, explored_sum]
            )
            start, seconds = int(partial["step"]), float(partial["seconds"])
            order_rng = partial["order_rng"]
            # Redraw the interrupted epoch's order, then carry on from the generator's state at
            # the interruption, as if the epoch had never stopped.
            now = self.order_generator.get_state()
            self.order_generator.set_state(order_rng)
            perm = torch.randperm(n, device=self.device, generator=self.order_generator)
            self.order_generator.set_state(now)
        if self.parallel.active:
            perm = self.parallel.agreed_order(perm)
            batches = self.parallel.batches(ds.train_x, ds.train_y, perm, self.global_batch, start)
        else:
            batches = permuted_batches(ds.train_x, ds.train_y, perm, cfg.batch_size, start)
        total = num_batches(n, self.global_batch)
        bar = tqdm(
            batches, total=total, initial=start, desc=f"epoch {epoch + 1}", leave=False,
            # None, not False, where progress is wanted: tqdm then hides itself off a terminal.
            disable=True if not self.progress or self.tag is not None else None, unit="batch",
        )  # fmt: skip
        for step, (x, y) in enumerate(bar, start=start):
            out = self.step(x, y)
            first_bad = tally((loss_sum, reward_sum, explored_sum), first_bad, out, len(y), step)
            if stop.requested and step + 1 < total:
                shares = self.parallel.shares([loss_sum, reward_sum, explored_sum])
                (loss_sum, reward_sum, explored_sum), first_bad = self.parallel.settle(
                    model, [loss_sum, reward_sum, explored_sum], first_bad
                )
                # Never checkpoint a broken state: a NaN found now is reported as one.
                self.check_finite(epoch, first_bad, step)
                sums = (loss_sum, reward_sum, explored_sum, first_bad)
                self.partial = {
                    "step": step + 1,
                    "order_rng": order_rng,
                    # The rest of the epoch indexes the images in this order: the same images in
                    # another (another copy of CIFAR-10) would train some twice, some never.
                    "data_order": ds.digest(test=False),
                    **dict(zip(PARTIAL_SUMS, sums, strict=True)),
                    "seconds": seconds + time.perf_counter() - t0,
                    **shares,
                }
                bar.close()
                return None
        (loss_sum, reward_sum, explored_sum), first_bad = self.parallel.settle(
            model, [loss_sum, reward_sum, explored_sum], first_bad
        )
        self.check_finite(epoch, first_bad, total - 1)
        return {
            "train_loss": loss_sum.item() / n,
            "train_reward": reward_sum.item() / n,
            "explore_rate": explored_sum.item() / n,
            "seconds": seconds + time.perf_counter() - t0,
        }

    def set_lr(self, epoch: int) -> float:
        """Set and return the learning rate of 0-based ``epoch``: the schedule's, scaled by
        the NaN reloads."""
        cfg = self.config
        lr = self.lr_scale * lr_at(epoch, cfg.lr, cfg.lr_halving_epochs)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def stop_reason(self) -> str | None:
        """Why the run ends before its next epoch (patience, then the epoch cap), or None.
        Patience first: a run resumed after early stopping ended its last allowed epoch
        (killed before its summary was written) stopped early, as it would have whole."""
        if self.stopper.wait >= self.config.patience:
            return EARLY_STOPPING
        if len(self.history) >= self.config.epochs:
            return MAX_EPOCHS
        return None

    def may_rewind(self) -> bool:
        """Whether a NaN now rewinds the run (``on_nan="reload"`` with reloads left)."""
        return self.config.on_nan == "reload" and self.nan_reloads < MAX_NAN_RELOADS

    def check_finite(self, epoch: int, first_bad: torch.Tensor, last_step: int) -> None:
        """Raise :class:`NonFinite` for a NaN/inf loss so far or in the weights now.

        The weights include floating buffers: BatchNorm's running statistics only matter in
        eval mode, so a NaN there leaves the training loss finite and would go unnoticed.
        """
        if first_bad.item() >= 0:
            raise NonFinite("loss", epoch, int(first_bad.item()))
        if not all_finite(itertools.chain(self.model.parameters(), self.model.buffers())):
            raise NonFinite("weights", epoch, last_step)


def check_batch(
    config: TrainConfig, global_batch: int, data: str, n_train: int, parallel: distributed.Context
) -> None:
    """Refuse a step of more images than the training set (of the data named ``data``,
    ``n_train`` images) holds.

    Only the loaded dataset knows its size, so TrainConfig cannot check this. Such a batch
    would train one short step per epoch while recording the batch asked for, or, beyond
    int64, fail inside torch once training has started.
    """
    if global_batch <= n_train:
        return
    images = f"the {n_train} training image{'s' * (n_train != 1)} of {data_label(config, data)}"
    if config.val != VAL_TEST:
        images += f" left after holding out {config.val} for validation"
    if config.global_batch is not None:
        asked = f"--global-batch {config.global_batch} is"
    elif parallel.world_size > 1:
        asked = (
            f"--batch-size {config.batch_size} on {parallel.world_size} processes makes "
            f"{global_batch} images per step,"
        )
    else:
        asked = f"--batch-size {config.batch_size} is"
    # A global batch must also split evenly over the processes.
    most = n_train // parallel.world_size
    if config.global_batch is not None:
        most *= parallel.world_size
    fewer = " or hold out fewer images with --val" if config.val != VAL_TEST else ""
    raise BrainPropError(f"{asked} more than {images}: pass at most {most}{fewer}")


def check_one_image_steps(trainer: Trainer, input_shape: tuple[int, ...], data: str) -> None:
    """Refuse, before the first step, a run in which some process's share of a step is one
    image while a BatchNorm layer would then see one value per channel (a 1x1 map, or
    BatchNorm1d): torch refuses to normalise that in training, in the middle of an epoch.

    Keras trains such a step (with a variance of 0), as do the synchronised layers, which
    pool the whole step's images (:mod:`brainprop.syncbn`); plain BatchNorm cannot.
    """
    parallel, model = trainer.parallel, trainer.model
    if synchronised(model):
        return
    n, batch = len(trainer.train_set.train_y), trainer.global_batch

    def one_image_share(images: int) -> bool:  # as distributed.Context.batches splits a step
        return 1 in [len(s) for s in torch.arange(images).tensor_split(parallel.world_size)]

    every = one_image_share(batch)
    if not (every or n % batch and one_image_share(n % batch)):
        return
    seen: list[str] = []

    def note(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            if inputs[0][0].numel() == inputs[0].shape[1]:  # one value per channel an image
                seen.append(f"{name} ({type(module).__name__})")

        return hook

    layers = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    if not layers:
        return
    hooks = [m.register_forward_pre_hook(note(name)) for name, m in layers]
    # The shapes, in eval mode, without touching the running statistics or the random streams
    # the run starts from; two images, as a BatchNorm without running statistics normalises
    # with the batch's in eval mode too.
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad(), modes_kept(model, False):
            model(torch.zeros(2, *input_shape, device=trainer.device))
    finally:
        for hook in hooks:
            hook.remove()
    if not seen:
        return
    images = f"{n} training images of {data_label(trainer.config, data)}"
    option = "--global-batch" if trainer.config.global_batch is not None else "--batch-size"
    if parallel.world_size == 1:
        which = (
            f"every step trains on 1 image ({option} 1)"
            if every
            else f"the last step of each epoch trains on 1 image ({images}, {batch} a step)"
        )
    else:
        step = "a step" if every else "the last step of each epoch"
        which = (
            f"a process's share of {step} is 1 image ({images}, {batch} a step over "
            f"{parallel.world_size} processes)"
        )
    # Only a step's length over the training set's: the number held out cannot help otherwise.
    fix = f"pass another {option}" + ("" if every else " or --val-split")
    if parallel.active:
        fix += ", or leave out --local-batchnorm (synchronised BatchNorm pools the step's images)"
    raise BrainPropError(
        f"{which}, where layer {seen[0]} would see one value per channel, which it "
        f"cannot normalise in training: {fix}"
    )


class NonFinite(Exception):
    """The loss or the weights (``what``) became NaN or inf by 0-based ``epoch``/``step``."""

    def __init__(self, what: str, epoch: int, step: int) -> None:
        self.what, self.epoch, self.step = what, epoch, step

    def stop_reason(self) -> str:
        """The summary's ``stop_reason`` of a run it ended."""
        return f"{DIVERGED} {self.what} at {self.where()}"

    def where(self) -> str:
        if self.what == "loss":
            return f"epoch {self.epoch + 1}, step {self.step + 1}"
        return f"epoch {self.epoch + 1} (found after step {self.step + 1})"

    def rewound(self, trainer: Trainer) -> str:
        """What :func:`rewind` did about it, ``trainer`` being the rewound one."""
        where = f"epoch {len(trainer.history)}" if trainer.history else "the start"
        if trainer.partial is not None:
            where = f"epoch {len(trainer.history) + 1}, step {trainer.partial['step']}"
        return (
            f"the {self.what} became NaN or inf at {self.where()}: rewound to {where} with the "
            f"learning rate scaled by {trainer.lr_scale:g} "
            f"(reload {trainer.nan_reloads} of {MAX_NAN_RELOADS})"
        )


def train(
    config: TrainConfig | None = None,
    *,
    resume: str | os.PathLike[str] | None = None,
    dataset: Dataset | None = None,
    data_dir: str | Path | None = None,
    progress: bool = True,
    tag: str | None = None,
) -> Run:
    """Train one network and write its run directory.

    Every epoch ends with an atomic checkpoint of the whole training state (``last.pt``).
    SIGINT or SIGTERM finishes the current step, checkpoints it and raises
    :class:`~brainprop.signals.Interrupted`; ``resume`` then continues bit-identically. A signal
    that comes as the run ends (in its last step or while its results are written) lets it
    finish, then raises :class:`~brainprop.signals.Interrupted` all the same, so that a caller
    training one run after another stops too.

    Args:
        config: what to train; hyperparameters left as None take its preset's values (the
            published ones by default). With ``resume``, None continues the run as configured;
            a config given may raise its ``epochs`` (to train longer), and any other setting it
            gives that is not the run's own is refused.
        resume: a run directory (or its :class:`Run`) to continue from its ``last.pt``; one
            killed before its first checkpoint starts over from its ``config.json`` (one that
            has a history but lost its ``last.pt`` is refused).
        dataset: use this dataset instead of loading ``config.dataset`` (data of one's own,
            tests, notebooks); the run is still named and given hyperparameters as
            ``config.dataset``, and its checkpoints record this data's name and images per
            class (:meth:`~brainprop.data.Dataset.fingerprint`), so that a resume is refused
            other data: with ``resume``, pass the data the run trained on again.
        data_dir: with ``resume``, the data root to read the run's dataset from when it has
            moved since the run began (where the data lies is no setting of the run, so its
            config keeps the old one); ``config.data_dir`` otherwise. Not with ``dataset``.
        progress: show a progress bar per epoch and print one line per epoch.
        tag: put ``"<tag>: "`` before every line and show no progress bar: for runs that
            share a terminal (``reproduce --jobs``), whose bars would overwrite one another.

    Raises:
        BrainPropError: a bad config, dataset or checkpoint, or an output that cannot be written.
        Interrupted: a stop signal arrived; the message says what was saved and how to resume.

    Under ``torchrun`` every process calls this and trains its share (see
    :mod:`brainprop.distributed`); rank 0 alone reads and writes the run directory.
    """
    if resume is not None:
        resume = rundir.given_path(resume, "--resume", "pass the run directory to continue")
    if config is not None and not isinstance(config, TrainConfig):
        raise BrainPropError(
            f"train takes a TrainConfig, not {kind_of(config)}: TrainConfig(dataset=..., "
            "arch=...) makes one"
            + (", TrainConfig(**d) one of a dict" if isinstance(config, dict) else "")
        )
    dataset = given_dataset(dataset, "train")
    if data_dir is not None and (resume is None or dataset is not None):
        raise BrainPropError(
            "train(data_dir=...) reads a resumed run's data from a new place: for a new run, "
            "set config.data_dir; with dataset=..., leave it out"
        )
    with distributed.joined() as parallel:
        return _train(parallel, config, resume, dataset, data_dir, progress, tag)


def _train(
    parallel: distributed.Context,
    config: TrainConfig | None,
    resume: Path | None,
    dataset: Dataset | None,
    data_dir: str | Path | None,
    progress: bool,
    tag: str | None,
) -> Run:
    """:func:`train` as one of ``parallel``'s processes."""
    with contextlib.ExitStack() as held:

        def claim(run: Path) -> None:
            parallel.on_main(lambda: held.enter_context(rundir.claimed(run)))

        if resume is not None:
            run_path = Path(resume)
            claim(run_path)
            state, config = parallel.on_main(lambda: checkpoint_and_config(run_path, config))
        elif config is None:
            raise BrainPropError("train() needs a config, or resume= a run directory to continue")
        else:
            config, state = config.resolve(), None
            parallel.on_main(lambda: rundir.check_new(config.out_dir, config.name))
        # Loaded once every process has the config: under torchrun rank 0 alone reads the run
        # directory, which need exist only on its node.
        root = config.data_dir if data_dir is None else data_dir
        recorded, where = None, ""
        if resume is not None:
            recorded, where = parallel.on_main(lambda: data_record(run_path, state))
            if dataset is None:
                check_loadable(recorded, config.dataset, where, RESUME_CALL)
        ds = dataset if dataset is not None else _load(config.dataset, root, resume, data_dir)
        if parallel.active:
            # Each rank resolved its own settings and loaded its own copy of the data; where
            # the data lies may differ from node to node.
            settings = {k: v for k, v in config.to_dict().items() if k != "data_dir"}
            parallel.check_alike({**settings, "data": ds.digest()})
        trainer = parallel.on_every(
            lambda: Trainer(config, ds, progress and parallel.is_main, tag, parallel=parallel),
            "building the network",
        )
        if state is not None:
            restore(trainer, state, ds, run_path)
        elif resume is not None:
            # Killed before its first checkpoint: it starts over, on the data it began on.
            check_same_data(recorded, ds, where, RESUME_REMEDY, RESUME_CALL, config.data_dir)
        if resume is None:
            run_path = parallel.on_main(lambda: create_run(trainer))
            claim(run_path)
        else:
            parallel.on_main(lambda: ready_to_continue(trainer, run_path, state))
            ended = trainer.stop_reason()
            parallel.on_main(lambda: reopen(run_path, config, ended))
        try:
            return _held_train(parallel, trainer, ds, run_path, data_dir)
        except BrokenPipeError as e:
            if isinstance(e, signals.OutputClosed):
                raise
            raise signals.OutputClosed(_stopped_abruptly(run_path, data_dir)) from e


def _load(
    name: str, root: str | Path | None, resume: Path | None, data_dir: str | Path | None
) -> Dataset:
    """The dataset ``name`` from ``root``; a resume that cannot read it there is told how to
    give the data's new root, which its config.json cannot know."""
    try:
        return load_dataset(name, root)
    except BrainPropError as e:
        if resume is None or data_dir is not None:
            raise
        again = plugins.resume_command(resume, "NEW_ROOT")
        raise BrainPropError(f"{e}; if the data has moved since the run began: {again}") from e


def printer(progress: bool, tag: str | None) -> Callable[[str], None]:
    """Where a run's lines go: above its progress bar, each after ``"<tag>: "`` where given,
    nowhere without ``progress``."""
    if not progress:
        return lambda _line: None
    if tag is None:
        return tqdm.write

    def say(line: str) -> None:
        # One write and a flush per line: processes that share a pipe or file (reproduce's
        # workers) then never cut into each other's lines, as block-buffered halves would.
        sys.stdout.write(f"{tag}: {line}\n")
        sys.stdout.flush()

    return say


def _held_train(
    parallel: distributed.Context,
    trainer: Trainer,
    ds: Dataset,
    run_path: Path,
    data_dir: str | Path | None,
) -> Run:
    """The epochs and results of :func:`_train`, its run directory held; ``data_dir``: the data
    root a resume was given, which the command that continues a stop must give again."""
    config = trainer.config
    if parallel.is_main:
        if trainer.resume_note:
            print(f"brainprop: {trainer.resume_note}", file=sys.stderr)
        warn_if_slow_bf16(trainer.device, config.bf16)
    say = printer(trainer.progress, trainer.tag)
    say(_header(trainer, run_path))

    def warn(signum: int) -> None:
        say(signals.first_note(signum, "finishing this step, then saving a checkpoint"))

    trained_on = parallel.on_main(lambda: machine_facts(trainer, run_path))
    with signals.stop_on_signals(warn) as signalled:
        stop = distributed.AgreedStop(signalled, trainer.parallel)
        try:
            trainer, stop_reason = _epochs(trainer, ds, run_path, say, stop, data_dir)
            summary = summarize(trainer.history, facts(trainer, trained_on), stop_reason)
            parallel.on_main(lambda: write_results(trainer, run_path, summary))
        except signals.Interrupted:
            raise  # the first signal's stop, its state saved
        except distributed.LostOthers as e:
            way_on = _after_losing(parallel, run_path, data_dir)
            raise BrainPropError(f"{e.what}; {way_on}") from None
        except KeyboardInterrupt:
            # A second signal: whatever write it cut short left the previous file whole.
            raise signalled.quit_at_once(_stopped_abruptly(run_path, data_dir)) from None
        if trainer.history:
            say(done_line(summary, run_path))
        if stop.requested:
            # The signal came after the last step's check: the run is whole, and whoever
            # sent it still expects the process, and a loop of runs around it, to stop.
            raise stop.interrupted(
                f"as the run ended ({summary['stop_reason']}); its results are complete in "
                f"{run_path}"
            )
    return Run(run_path, config, trainer.model, trainer.history, summary)


#: The summary's facts of the process that trained, not of the run.
_MACHINE_FACTS = ("device", "world_size", "tf32", "software")


def machine_facts(trainer: Trainer, run_path: Path) -> dict[str, Any] | None:
    """The machine facts in the summary.json of a run that had ended before this resume, which
    trains nothing: its timings are the sessions' that trained it, not this process's. None
    where the run trains on, or its summary is missing or damaged (this process's, then)."""
    path = run_path / rundir.SUMMARY
    if trainer.stop_reason() is None or not path.is_file():
        return None
    try:
        summary = rundir.read_json(path)
    except BrainPropError:
        return None
    if not isinstance(summary, dict) or "device" not in summary:
        return None
    return {k: summary[k] for k in _MACHINE_FACTS if k in summary}


def done_line(summary: dict[str, Any], run_path: Path) -> str:
    """The line that closes a run that finished at least one epoch. A run that shared its
    epochs with a stack of seeds says so: its seconds are its share of their wall time."""
    seconds = f"{summary['total_seconds']:.0f}s"
    if summary.get("stack_size", 1) > 1:
        seconds += f" (its share of {summary['wall_seconds']:.0f}s in a stack)"
    return (
        f"done ({summary['stop_reason']}): best val {summary['best_val_acc']:.4f} at epoch "
        f"{summary['best_epoch']}, test accuracy there {summary['test_acc_at_best']:.4f}, "
        f"{epochs_phrase(summary['epochs_run'])}, {seconds}; results in {run_path}"
    )


def _epochs(
    trainer: Trainer,
    ds: Dataset,
    run_path: Path,
    say: Callable[[str], None],
    stop: signals.StopRequest,
    data_dir: str | Path | None,
) -> tuple[Trainer, str]:
    """Train epoch after epoch until a stopping rule ends the run (``data_dir``: as in
    :func:`_held_train`).

    Returns the trainer at the end (a NaN reload replaces it) and why the run stopped. A stop
    signal checkpoints the state and raises :class:`~brainprop.signals.Interrupted`.
    """
    config = trainer.config
    while True:
        epoch = len(trainer.history)
        if (ended := trainer.stop_reason()) is not None:
            return trainer, ended
        if stop.requested:
            save_last(trainer, run_path)
            raise _interrupted(stop, run_path, f"after epoch {epoch}", data_dir)
        with _own_code_stops(trainer, f"in epoch {epoch + 1}", run_path, data_dir):
            try:
                metrics = trainer.train_epoch(epoch, stop)
            except NonFinite as bad:
                if trainer.may_rewind():
                    trainer = rewind(trainer, ds, run_path)
                    say(bad.rewound(trainer))
                    continue
                say(gave_up(bad, config, run_path))
                return trainer, bad.stop_reason()
            if metrics is None:
                assert trainer.partial is not None  # train_epoch stopped mid-epoch
                save_last(trainer, run_path)
                at = f"in epoch {epoch + 1} after step {trainer.partial['step']}"
                raise _interrupted(stop, run_path, at, data_dir)
            if end_epoch(trainer, run_path, metrics, say):
                return trainer, EARLY_STOPPING


@contextlib.contextmanager
def _own_code_stops(
    trainer: Trainer, when: str, run_path: Path, data_dir: str | Path | None
) -> Iterator[None]:
    """Stops a run whose own code failed ``when`` (:mod:`brainprop.owncode`) in one line that
    says how to continue it once mended."""
    try:
        yield
    except Exception as e:
        own = owncode.of_run(trainer.config, trainer.objective, trainer.model)
        if (failed := owncode.failure(own, e, when)) is None:
            raise
        # Registered from Python, not by a --plugin, the code is unknown to the command line.
        moved = "" if data_dir is None else f", data_dir={str(data_dir)!r}"
        python = (
            f"train(resume={str(run_path)!r}{moved}) in a process that registers the mended code"
        )
        then = _stopped_abruptly(run_path, data_dir, None if plugins.loaded() else python)
        raise owncode.OwnCodeFailed(failed, then) from e


def data_label(config: TrainConfig, data: str) -> str:
    """The data named ``data`` in a run's messages; data of one's own also names the dataset
    whose settings it takes: ``'mine' (mnist's settings)``."""
    return data if data == config.dataset else f"{data!r} ({config.dataset}'s settings)"


def _header(trainer: Trainer, run_path: Path) -> str:
    """The line that opens a run: what trains, how where it departs from the paper's setup,
    where, and into which directory."""
    config, parallel = trainer.config, trainer.parallel
    default, how = TrainConfig(), []
    if config.feedback != default.feedback:
        how.append(f"{config.feedback} feedback")
    if config.preset != default.preset:
        how.append(f"preset {config.preset}")
    if config.bf16:
        how.append("bf16")
    if config.val != VAL_TEST:
        how.append(f"{config.val:,} images held out")
    where = str(trainer.device)
    fast = (
        ["eager"]
        if config.eager
        else fastpath.features(trainer.model, config.cuda_graph, trainer.objective)
    )
    if fast:
        where += f" ({', '.join(fast)})"
    if parallel.active:
        where = (
            f"{parallel.world_size} processes ({where} for rank 0), "
            f"{trainer.global_batch} images per step"
        )
        if synchronised(trainer.model):
            where += ", BatchNorm over the global batch"
    return (
        f"training {config.arch} on {data_label(config, trainer.data_fingerprint['name'])} "
        f"with {config.rule}"
        f"{''.join(f', {h}' for h in how)} "
        f"({sum(p.numel() for p in trainer.model.parameters()):,} parameters) on {where}, "
        f"run dir {run_path}"
    )


def gave_up(bad: NonFinite, config: TrainConfig, run_path: Path) -> str:
    """Why a run stopped on a NaN, and what to change: settings, which a resume keeps, so in a
    new run."""
    if config.on_nan == "reload":
        after, fix = f" after {MAX_NAN_RELOADS} reloads", "Start a new run with a lower --lr"
    else:
        after = ""
        fix = "Start a new run with a lower --lr or --init-std, or with --on-nan reload"
    kept = _kept(run_path, "so there is nothing to resume")
    resumable = (run_path / rundir.LAST).is_file()
    if bad.what == "loss" and config.rule not in OBJECTIVES.builtin:
        fix += f"; or check that rule {config.rule!r}, one's own, computes a finite loss"
        fix += ", and resume once it does" * resumable
    elif resumable:
        kept += ", from which a resume would overflow again"
    return f"stopped{after}: the {bad.what} became NaN or inf at {bad.where()}; {kept}. {fix}."


def create_run(trainer: Trainer) -> Path:
    """A new run directory holding the run's config."""
    config = trainer.config
    # last.pt, best.pt, a stop's epoch_start.pt (a copy where the filesystem has no hard
    # links) and a last.pt being written beside them.
    rundir.check_free_space(Path(config.out_dir), 4 * _checkpoint_bytes(trainer))
    name = config.name
    if name is None:
        name = rundir.default_name(config.dataset, config.arch, config.rule, config.seed)
    run_path = rundir.create(config.out_dir, name)
    files.atomic_write_json(run_path / rundir.DATA, trainer.data_fingerprint)
    files.atomic_write_json(run_path / rundir.CONFIG, config.to_dict())
    return run_path


def write_results(trainer: Trainer, run_path: Path, summary: dict[str, Any]) -> None:
    """The history, plots and summary that close a run.

    The history is written again because the last epoch's end writes it after last.pt: a kill
    between the two leaves a run that a resume closes without training, one row short.
    """
    config = trainer.config
    if trainer.history:
        rundir.write_history(run_path, trainer.history)
        title = f"{config.rule} - {trainer.data_fingerprint['name']} {config.arch}"
        rundir.write_plot(run_path, trainer.history, title)
        plot_diagnostics(
            trainer.history, run_path / DIAGNOSTICS_PLOT, f"{title}, {config.feedback} feedback"
        )
    files.atomic_write_json(run_path / rundir.SUMMARY, summary)


def save_last(trainer: Trainer, run_path: Path) -> None:
    """Checkpoint the whole state (:func:`rundir.save_state`); every rank calls this, as
    state() gathers their streams."""
    state = trainer.state()
    trainer.parallel.on_main(lambda: rundir.save_state(run_path, state, len(trainer.history)))


@dataclass(frozen=True)
class Scores:
    """An epoch's accuracies, and the seconds it took to measure them."""

    val_acc: float
    test_acc: float
    seconds: float


def score_epoch(trainer: Trainer) -> Scores:
    """The validation and test accuracy of ``trainer``'s network (one value when the test set
    is the validation set)."""
    t0 = time.perf_counter()
    config, parallel = trainer.config, trainer.parallel

    def score(x: torch.Tensor, y: torch.Tensor) -> float:
        return accuracy(trainer.model, x, y, config.bf16)

    val_acc = parallel.accuracy(score, trainer.val_x, trainer.val_y)
    test_acc = (
        val_acc
        if config.val == VAL_TEST
        else parallel.accuracy(score, trainer.train_set.test_x, trainer.train_set.test_y)
    )
    return Scores(val_acc, test_acc, time.perf_counter() - t0)


def end_epoch(
    trainer: Trainer,
    run_path: Path,
    metrics: dict[str, float],
    say: Callable[[str], None],
    scores: Scores | None = None,
) -> bool:
    """Evaluate, record and checkpoint a finished epoch; True when early stopping ends the run.

    ``scores`` are the epoch's accuracies if the caller measured them (a stack measures all its
    members in one pass); otherwise they are measured here. ``eval_seconds`` is everything
    after the training pass but the checkpoint writes: evaluation and the feedback diagnostics.
    """
    config, epoch = trainer.config, len(trainer.history)
    train_seconds = metrics.pop("seconds")
    if scores is None:
        scores = score_epoch(trainer)
    t1 = time.perf_counter()
    # In fp32 even under --bf16: the angles between feedback and forward weights are about the
    # weights, and bf16 rounding would blur the small angles the plots are read for.
    # Every rank runs the same batch: its BatchNorm statistics need no other rank's.
    with alone(trainer.model) as model:
        feedback = diagnostics(
            model, trainer.diag_x, trainer.diag_y, trainer.objective, config.seed
        )
    row = {
        "epoch": epoch + 1,
        "lr": trainer.optimizer.param_groups[0]["lr"],
        **metrics,
        "val_acc": scores.val_acc,
        "test_acc": scores.test_acc,
        "seconds": train_seconds,
        "eval_seconds": scores.seconds + time.perf_counter() - t1,
        **_memory_columns(trainer),
        **feedback,
    }
    trainer.history.append(row)
    val_acc = scores.val_acc
    early = trainer.stopper.update(val_acc)
    best = best_row(trainer.history) is row
    state = trainer.state()

    trainer.parallel.on_main(
        lambda: rundir.save_epoch_end(
            run_path, state, trainer.history, best_weights(trainer, epoch + 1) if best else None
        )
    )
    say(
        f"epoch {epoch + 1:3d}/{config.epochs}  loss {metrics['train_loss']:.4f}  "
        f"reward {metrics['train_reward']:.4f}  val {val_acc:.4f}  lr {row['lr']:.4g}  "
        f"{train_seconds:.1f}s"
    )
    return trainer.parallel.decide(early)


def _memory_columns(trainer: Trainer) -> dict[str, float]:
    """This epoch's peak memory (the device's on CUDA, the process's resident set on a CPU) and
    the host's resident memory at its end, in MiB: flat from epoch to epoch unless something
    accumulates."""
    rss = memory.host_rss()  # first: on a CPU, the peak read after it bounds it
    peak, _ = memory.peak(trainer.device, trainer.memory_counted)
    return {"peak_memory_mib": round(peak / 2**20, 1), "host_rss_mib": round(rss / 2**20, 1)}


def _interrupted(
    stop: signals.StopRequest, run_path: Path, at: str, data_dir: str | Path | None
) -> signals.Interrupted:
    return stop.interrupted(
        f"{at}; the state is saved in {run_path / rundir.LAST}: continue with "
        + plugins.resume_command(run_path, data_dir)
    )


def _stopped_abruptly(
    run_path: Path, data_dir: str | Path | None, resume: str | None = None
) -> str:
    """What a run stopped without its own checkpoint (a second signal, a closed output, its
    own code's error) keeps, and what continues it: ``resume``, else the command (with the
    data root a resume was given, ``data_dir``)."""
    resume = resume or plugins.resume_command(run_path, data_dir)
    return f"{_kept(run_path, 'so a resume starts over')}: continue with {resume}"


def _after_losing(
    parallel: distributed.Context, run_path: Path, data_dir: str | Path | None
) -> str:
    """What continues a run whose processes lost each other: :func:`_stopped_abruptly`'s,
    where this process sees the run folder (rank 0's, or a shared one); on another node,
    which need not hold it, where it may be."""
    if parallel.is_main or run_path.is_dir():
        return _stopped_abruptly(run_path, data_dir)
    return (
        f"continue from {run_path / rundir.LAST} on rank 0's node, once an epoch has ended "
        f"there (before, a resume starts over), with {plugins.resume_command(run_path, data_dir)}"
    )


def _kept(run_path: Path, without: str) -> str:
    """What ``run_path`` keeps of a stopped run: its last.pt, or, with ``without`` saying what
    follows from that, no checkpoint yet."""
    last = run_path / rundir.LAST
    if last.is_file():
        return f"{last} keeps the last good state"
    return f"no checkpoint was written yet, {without}"


def rewind(old: Trainer, ds: Dataset, run_path: Path) -> Trainer:
    """A trainer at the end of the last finished epoch (:func:`rundir.rewind_point`; the
    initial state if none), at half the LR."""
    # The data stays where it is: a second copy on the device, beside the old trainer's,
    # could be more than a GPU holds.
    trainer = Trainer(old.config, ds, old.progress, old.tag, data_of=old, parallel=old.parallel)
    state, source = old.parallel.on_main(lambda: rundir.rewind_point(run_path))
    if state is not None:
        restore(trainer, state, ds, run_path, source)
    trainer.lr_scale, trainer.nan_reloads = old.lr_scale / 2, old.nan_reloads + 1
    return trainer


def ready_to_continue(trainer: Trainer, run_path: Path, state: dict[str, Any] | None) -> None:
    """Make ``run_path`` ready for ``trainer`` to continue it, just restored from ``state``
    (None: a run killed before its first checkpoint): refuse a folder this process may not
    write in, rebuild a best.pt a kill lost (:func:`rundir.mend_best`), then refuse a disk
    that cannot take the next last.pt beside the old one before the rename. Found now, not at
    the first checkpoint, an epoch of training later; the room is asked for after the rebuilt
    best.pt took its share."""
    rundir.check_writable(run_path)
    if state is not None:
        rundir.mend_best(run_path, state, lambda epoch: best_weights(trainer, epoch))
    elsewhere = (
        "or copy the run (of 'brainprop reproduce', its whole --out folder) to a disk with "
        "room and continue it there"
    )
    rundir.check_free_space(run_path, _checkpoint_bytes(trainer), elsewhere)


def _checkpoint_bytes(trainer: Trainer) -> int:
    """About the size of one last.pt: its tensors, plus room for history and plots."""
    tensors = list(trainer.model.state_dict().values())
    for per_param in trainer.optimizer.state.values():
        tensors += [v for v in per_param.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors) + 2**20


def best_weights(trainer: Trainer, epoch: int) -> dict[str, Any]:
    """What best.pt holds of ``trainer`` after 1-based ``epoch``: the network and its identity."""
    return {
        **trainer.identity(),
        "model": trainer.model.state_dict(),
        "epoch": epoch,
    }


def facts(trainer: Trainer, trained_on: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the run was, for its summary; ``trained_on``: the :data:`_MACHINE_FACTS` of the
    sessions that trained it, where this process trained none of it."""
    config = trainer.config
    known = {
        "dataset": config.dataset,
        "arch": config.arch,
        "rule": config.rule,
        "seed": config.seed,
        "nan_reloads": trainer.nan_reloads,
        "device": device_name(trainer.device),
        "world_size": trainer.parallel.world_size,
        "software": trainer.software,
    }
    # Data of one's own passed from Python trains with config.dataset's settings: both count.
    if (data := trainer.data_fingerprint["name"]) != config.dataset:
        known["data"] = data
    # Another precision than the paper's fp32: the report keeps such runs apart
    # (Measurement.numerics). As this process computed; a resumed run's earlier epochs ran
    # under the settings of their own process.
    if tf32 := tf32_ops(trainer.device, config.bf16, trainer.model):
        known["tf32"] = tf32
    if trained_on is not None:
        known = {k: v for k, v in known.items() if k not in _MACHINE_FACTS} | trained_on
    # The most seeds the run shared a step with (brainprop.stacked), which its timing is
    # compared by; also when a plain resume finished a run that began in a stack.
    shared = max((h.get("stack_size", 1) for h in trainer.history), default=1)
    return (known | {"stack_size": shared}) if shared > 1 else known
