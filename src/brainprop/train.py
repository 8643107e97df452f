"""The training loop: schedule, early stopping, NaN stop, checkpoints, resume, history.

It knows nothing of which rule or architecture it runs: the objective turns Q-values into a
loss, the model is any ``nn.Module``, and plain SGD applies the gradient.

The loop keeps every per-step quantity on the device and reads back once per epoch, so a step
never waits for the host.
"""

from __future__ import annotations

import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import checkpoint, rundir
from .config import VAL_TEST, TrainConfig
from .data import Dataset, load_dataset
from .data.batches import num_batches, ordered_batches, shuffled_batches, to_float
from .diagnostics import diagnostics, plot_diagnostics
from .errors import BrainPropError
from .feedback import convert
from .objectives import Objective, make_objective
from .presets import Hyperparameters, build_model, decayed_parameters

EVAL_BATCH = 1000
DIAGNOSTIC_BATCH = 256
DIAGNOSTICS_PLOT = "diagnostics.png"


def lr_at(epoch: int, base: float, halving_epochs: int) -> float:
    """Learning rate for 0-based ``epoch``: ``base`` halved every ``halving_epochs`` epochs."""
    return base * 0.5 ** (epoch // halving_epochs)


@dataclass
class EarlyStopping:
    """Keras's ``EarlyStopping(monitor='val_accuracy', mode='max')``, step for step.

    An epoch improves when ``value - min_delta > best``; training stops once ``patience``
    epochs in a row have not improved.
    """

    patience: int
    min_delta: float
    best: float = -math.inf
    wait: int = 0

    def update(self, value: float) -> bool:
        """Record one epoch's value; True when training should stop."""
        self.wait += 1
        if value - self.min_delta > self.best:
            self.best = value
            self.wait = 0
        return self.wait >= self.patience

    def state_dict(self) -> dict[str, float]:
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.best, self.wait = float(state["best"]), int(state["wait"])


@dataclass
class Run:
    """A finished (or stopped) training run."""

    dir: Path
    config: TrainConfig
    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def hyperparameters(config: TrainConfig) -> Hyperparameters:
    """The resolved config's table fields as a :class:`Hyperparameters` row."""
    return Hyperparameters(
        lr=config.lr,
        lr_halving_epochs=config.lr_halving_epochs,
        batch_size=config.batch_size,
        init_std=config.init_std,
        l2=config.l2,
        dropout=config.dropout,
    )


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.SGD:
    """Plain SGD; Keras's l2(lambda) adds lambda*w^2 to the loss, i.e. weight decay 2*lambda."""
    decay, rest = decayed_parameters(model)
    groups = [{"params": decay, "weight_decay": 2 * config.l2}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=config.lr, momentum=0.0)


@torch.inference_mode()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool = False) -> float:
    """Fraction of ``x`` (uint8 [N, C, H, W]) whose argmax output equals ``y`` ([N])."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    with _autocast(x.device, bf16):
        for xb, yb in ordered_batches(x, y, EVAL_BATCH):
            correct += (model(xb).argmax(dim=1) == yb).sum()
    model.train(was_training)
    return correct.item() / max(len(y), 1)


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")


def split_validation(ds: Dataset, n: int) -> tuple[Dataset, torch.Tensor, torch.Tensor]:
    """Hold out ``n`` training images for validation.

    The held-out images are the same for every seed (a permutation seeded with 0), so seeds
    differ only in training randomness. Returns (dataset without them, val_x, val_y).
    """
    total = len(ds.train_y)
    if n >= total:
        raise BrainPropError(
            f"--val {n} would hold out all {total} training images: pick fewer than {total}"
        )
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(0)).to(ds.train_x.device)
    keep, held = perm[:-n], perm[-n:]
    train = Dataset(
        ds.name, ds.train_x[keep], ds.train_y[keep], ds.test_x, ds.test_y, ds.num_classes
    )
    return train, ds.train_x[held], ds.train_y[held]


class _Trainer:
    """One run's mutable state; ``train`` below is its only user."""

    def __init__(self, config: TrainConfig, ds: Dataset, run: Path, progress: bool) -> None:
        self.config, self.run, self.progress = config, run, progress
        self.device = resolve_device(config.device)
        torch.manual_seed(config.seed)
        ds = ds.to(self.device)
        if config.val == VAL_TEST:
            self.train_set, self.val_x, self.val_y = ds, ds.test_x, ds.test_y
        else:
            self.train_set, self.val_x, self.val_y = split_validation(ds, int(config.val))
        init = torch.Generator().manual_seed(config.seed)
        self.model = build_model(
            config.arch, ds.input_shape, ds.num_classes, hyperparameters(config), init
        )
        # Before .to() and before the optimizer, so reciprocal B lands in the decayed group.
        convert(self.model, config.feedback, generator=init)
        self.model.to(self.device)
        self.objective: Objective = make_objective(config.rule, config.epsilon)
        self.optimizer = make_optimizer(self.model, config)
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.stopper = EarlyStopping(config.patience, config.min_delta)
        self.history: list[dict[str, Any]] = []
        self.input_shape, self.num_classes = ds.input_shape, ds.num_classes
        # One fixed batch for the per-epoch feedback diagnostics.
        n_diag = min(DIAGNOSTIC_BATCH, len(self.train_set.train_y))
        self.diag_x = to_float(self.train_set.train_x[:n_diag])
        self.diag_y = self.train_set.train_y[:n_diag]

    def state(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically from the end of the last epoch."""
        return {
            "config": self.config.to_dict(),
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": len(self.history),
            "history": self.history,
            "early_stopping": self.stopper.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "generator": self.generator.get_state(),
            },
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.history = list(state["history"])
        self.stopper.load_state_dict(state["early_stopping"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.generator.set_state(state["rng"]["generator"])

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training set; returns the epoch's training metrics."""
        cfg, model, ds = self.config, self.model, self.train_set
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(epoch, cfg.lr, cfg.lr_halving_epochs)
        model.train()
        zero = torch.zeros((), device=self.device)
        loss_sum, reward_sum, explored_sum = zero.clone(), zero.clone(), zero.clone()
        first_bad = torch.full((), -1, dtype=torch.int64, device=self.device)
        batches = shuffled_batches(ds.train_x, ds.train_y, cfg.batch_size, self.generator)
        total = num_batches(len(ds.train_y), cfg.batch_size)
        bar = tqdm(
            batches, total=total, desc=f"epoch {epoch + 1}", leave=False,
            disable=not self.progress or None, unit="batch",
        )  # fmt: skip
        for step, (x, y) in enumerate(bar):
            with _autocast(self.device, cfg.bf16):
                q = model(x)
            out = self.objective(q.float(), y, self.generator)
            loss = out.loss
            if self.objective.sums_over_nominal_batch and len(y) != cfg.batch_size:
                loss = loss * (len(y) / cfg.batch_size)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            loss_sum += out.loss.detach() * len(y)
            reward_sum += out.rewards.sum()
            explored_sum += out.explored.sum()
            bad = ~torch.isfinite(out.loss.detach()) & (first_bad < 0)
            first_bad = torch.where(bad, torch.full_like(first_bad, step), first_bad)
        n = len(ds.train_y)
        if first_bad.item() >= 0:
            raise _NonFinite(epoch, int(first_bad.item()))
        return {
            "train_loss": loss_sum.item() / n,
            "train_reward": reward_sum.item() / n,
            "explore_rate": explored_sum.item() / n,
        }


class _NonFinite(Exception):
    def __init__(self, epoch: int, step: int) -> None:
        self.epoch, self.step = epoch, step


def train(
    config: TrainConfig,
    *,
    resume: str | Path | None = None,
    dataset: Dataset | None = None,
    progress: bool = True,
) -> Run:
    """Train one network and write its run directory.

    Args:
        config: what to train; hyperparameters left as None take the published values.
        resume: a run directory to continue from its ``last.pt`` (``config`` is then ignored
            except for ``epochs``, which may be raised to train longer).
        dataset: use this dataset instead of loading ``config.dataset`` (tests, notebooks).
        progress: show a progress bar per epoch and print one line per epoch.
    """
    if resume is not None:
        run_path = Path(resume)
        state = checkpoint.load(run_path / rundir.LAST)
        stored = TrainConfig.from_dict(state["config"])
        config = TrainConfig.from_dict({**stored.to_dict(), "epochs": config.epochs}).resolve()
    else:
        config = config.resolve()
        state = None
    ds = dataset if dataset is not None else load_dataset(config.dataset, config.data_dir)
    if state is None:
        name = config.name or rundir.default_name(config.dataset, config.arch, config.rule, config.seed)
        run_path = rundir.create(config.out_dir, name)
        rundir.atomic_write_json(run_path / rundir.CONFIG, config.to_dict())
    trainer = _Trainer(config, ds, run_path, progress)
    if state is not None:
        _check_compatible(state, ds, run_path)
        trainer.load_state(state)
    say = tqdm.write if progress else (lambda _msg: None)
    say(
        f"training {config.arch} on {config.dataset} with {config.rule} "
        f"({sum(p.numel() for p in trainer.model.parameters()):,} parameters) on {trainer.device}, "
        f"run dir {run_path}"
    )
    stop_reason = "max epochs"
    for epoch in range(len(trainer.history), config.epochs):
        if trainer.stopper.wait >= config.patience:
            stop_reason = "early stopping"
            break
        t0 = time.perf_counter()
        try:
            metrics = trainer.train_epoch(epoch)
        except _NonFinite as bad:
            stop_reason = f"non-finite loss at epoch {bad.epoch + 1}, step {bad.step + 1}"
            say(
                f"stopped: the loss became NaN or inf at epoch {bad.epoch + 1}, step {bad.step + 1}; "
                f"{run_path / rundir.LAST} keeps the last good epoch. Lower --lr or --init-std."
            )
            break
        train_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        val_acc = accuracy(trainer.model, trainer.val_x, trainer.val_y, config.bf16)
        test_acc = (
            val_acc
            if config.val == VAL_TEST
            else accuracy(trainer.model, ds.test_x.to(trainer.device), ds.test_y.to(trainer.device), config.bf16)
        )
        row = {
            "epoch": epoch + 1,
            "lr": trainer.optimizer.param_groups[0]["lr"],
            **metrics,
            "val_acc": val_acc,
            "test_acc": test_acc,
            "seconds": train_seconds,
            "eval_seconds": time.perf_counter() - t1,
            **diagnostics(
                trainer.model, trainer.diag_x, trainer.diag_y, trainer.objective, config.seed
            ),
        }
        trainer.history.append(row)
        stop = trainer.stopper.update(val_acc)
        if val_acc > max((h["val_acc"] for h in trainer.history[:-1]), default=-1.0):
            checkpoint.save(run_path / rundir.BEST, _weights(trainer, epoch + 1))
        checkpoint.save(run_path / rundir.LAST, trainer.state())
        rundir.write_history(run_path, trainer.history)
        say(
            f"epoch {epoch + 1:3d}/{config.epochs}  loss {metrics['train_loss']:.4f}  "
            f"reward {metrics['train_reward']:.4f}  val {val_acc:.4f}  lr {row['lr']:.4g}  "
            f"{train_seconds:.1f}s"
        )
        if stop:
            stop_reason = "early stopping"
            break
    summary = _summarize(trainer, stop_reason)
    if trainer.history:
        title = f"{config.rule} - {config.dataset} {config.arch}"
        rundir.write_plot(run_path, trainer.history, title)
        plot_diagnostics(
            trainer.history, run_path / DIAGNOSTICS_PLOT, f"{title}, {config.feedback} feedback"
        )
    rundir.atomic_write_json(run_path / rundir.SUMMARY, summary)
    if trainer.history:
        say(
            f"done ({stop_reason}): best val {summary['best_val_acc']:.4f} at epoch "
            f"{summary['best_epoch']}, test accuracy there {summary['test_acc_at_best']:.4f}, "
            f"{summary['epochs_run']} epochs, {summary['total_seconds']:.0f}s; results in {run_path}"
        )
    return Run(run_path, config, trainer.model, trainer.history, summary)


def _weights(trainer: _Trainer, epoch: int) -> dict[str, Any]:
    return {
        "config": trainer.config.to_dict(),
        "input_shape": list(trainer.input_shape),
        "num_classes": trainer.num_classes,
        "model": trainer.model.state_dict(),
        "epoch": epoch,
    }


def _check_compatible(state: dict[str, Any], ds: Dataset, path: Path) -> None:
    if tuple(state["input_shape"]) != ds.input_shape or state["num_classes"] != ds.num_classes:
        raise BrainPropError(
            f"checkpoint in {path} is for inputs {tuple(state['input_shape'])} with "
            f"{state['num_classes']} classes, but the data has {ds.input_shape} with "
            f"{ds.num_classes}: resume with the dataset it was trained on"
        )


def _summarize(trainer: _Trainer, stop_reason: str) -> dict[str, Any]:
    history = trainer.history
    summary: dict[str, Any] = {
        "dataset": trainer.config.dataset,
        "arch": trainer.config.arch,
        "rule": trainer.config.rule,
        "seed": trainer.config.seed,
        "stop_reason": stop_reason,
        "epochs_run": len(history),
        "device": _device_name(trainer.device),
    }
    if history:
        best = max(history, key=lambda h: h["val_acc"])
        seconds = [h["seconds"] for h in history]
        summary |= {
            "best_val_acc": best["val_acc"],
            "best_epoch": best["epoch"],
            "test_acc_at_best": best["test_acc"],
            "final_val_acc": history[-1]["val_acc"],
            "s_per_epoch": sum(seconds) / len(seconds),
            "total_seconds": sum(seconds) + sum(h["eval_seconds"] for h in history),
        }
    return summary


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def load_model(target: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network stored in a run directory (its best.pt) or a checkpoint file.

    Returns (model in eval mode, the checkpoint dict).
    """
    path = Path(target)
    if path.is_dir():
        path = path / rundir.BEST
    state = checkpoint.load(path, map_location)
    try:
        config = TrainConfig.from_dict(state["config"])
        model = build_model(
            config.arch, state["input_shape"], state["num_classes"], hyperparameters(config)
        )
        convert(model, config.feedback)
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BrainPropError(
            f"{path} does not match its own architecture ({detail[:160]}): the checkpoint is damaged "
            "or from another version"
        ) from None
    return model.eval(), state


def evaluate(
    target: str | Path, *, data_dir: str | None = None, device: str = "auto", dataset: Dataset | None = None
) -> dict[str, Any]:
    """Test accuracy of a run directory's best network, or of any checkpoint file."""
    dev = resolve_device(device)
    model, state = load_model(target)
    config = TrainConfig.from_dict(state["config"])
    ds = dataset if dataset is not None else load_dataset(config.dataset, data_dir or config.data_dir)
    if tuple(state["input_shape"]) != ds.input_shape or state["num_classes"] != ds.num_classes:
        raise BrainPropError(
            f"{target} was trained on inputs {tuple(state['input_shape'])} with "
            f"{state['num_classes']} classes, but {config.dataset} has {ds.input_shape} with "
            f"{ds.num_classes}: evaluate it on the dataset it was trained on"
        )
    model.to(dev)
    test_acc = accuracy(model, ds.test_x.to(dev), ds.test_y.to(dev), config.bf16)
    return {
        "checkpoint": str(target),
        "dataset": config.dataset,
        "arch": config.arch,
        "rule": config.rule,
        "epoch": state.get("epoch"),
        "test_acc": test_acc,
        "test_size": len(ds.test_y),
        "device": _device_name(dev),
    }
