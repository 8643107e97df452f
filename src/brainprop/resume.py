"""Continuing a run: find its checkpoint, check it belongs to the run, restore the trainer.

A run directory is continued from its ``last.pt``; everything read here comes from disk and
may be damaged or copied from elsewhere, so every failure is one :class:`BrainPropError` line.
The checks of a checkpoint's parts (:func:`history_ok`, :func:`partial_ok`,
:func:`optimizer_settings`) serve ``Trainer.load_state``, which restores them.
"""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import checkpoint, files, rundir
from .config import TrainConfig
from .data import Dataset
from .devices import device_problem, ran_out_of_memory
from .errors import BrainPropError, UnknownName, reason
from .evaluation import all_finite
from .provenance import (
    check_same_data,
    check_same_run,
    check_trained_on,
    declares_sizes,
    recorded_config,
)
from .summary import EARLY_STOPPING, epochs_phrase

if TYPE_CHECKING:
    from .train import Trainer


def checkpoint_and_config(
    run_path: Path, config: TrainConfig | None
) -> tuple[dict[str, Any] | None, TrainConfig]:
    """The checkpoint to continue from (None: killed before its first one) and the config, with
    ``config``'s epochs where it is given (:func:`reopen` writes them once restored).

    ``last.pt`` and ``best.pt`` must belong to the run whose ``config.json`` sits beside them:
    a checkpoint copied in from another run would otherwise silently continue the wrong
    network, or stand as its best.
    """
    stored = stored_config(run_path)
    if config is not None:
        _refuse_ignored(config, stored)
    files.remove_temporaries(run_path)
    last = run_path / rundir.LAST
    state = checkpoint.load(last) if last.is_file() else None
    if state is None:
        rundir.refuse_restart(run_path)
    else:
        check_same_run(last, _stored_config(state.get("config"), last), stored)
    if config is not None and config.epochs < 1:
        # Checked here, as the flag it is: once merged into the stored config, the resolve
        # below would blame config.json for it.
        raise BrainPropError(f"--epochs must be >= 1, got {config.epochs}")
    # A damaged count is left to restore(), which names the checkpoint as damaged.
    done = state.get("epoch") if state is not None else 0
    if config is not None and isinstance(done, int) and config.epochs < done:
        raise BrainPropError(
            f"{run_path} has already run {epochs_phrase(done)}, so --epochs {config.epochs} would "
            f"change nothing: pass more than {done} to continue it"
        )
    resolved = _resolve_stored(
        stored if config is None else replace(stored, epochs=config.epochs),
        run_path / rundir.CONFIG,
    )
    # After config.json's own checks (a device this machine lacks, say), which say more.
    if (best := _sound_config(run_path / rundir.BEST)) is not None:
        # Scored by evaluate, and kept as the run's best unless a later epoch beats it.
        check_same_run(run_path / rundir.BEST, best, stored)
    return state, resolved


def _sound_config(path: Path) -> TrainConfig | None:
    """The config of the checkpoint at ``path``; None where there is none, or none that reads:
    a damaged best.pt is no reason to stop a resume, which replaces it where it can
    (:func:`~brainprop.rundir.mend_best`), and evaluate refuses it."""
    if not path.is_file():
        return None
    try:
        return _stored_config(checkpoint.load(path).get("config"), path)
    except BrainPropError:
        return None


def _refuse_ignored(config: TrainConfig, stored: TrainConfig) -> None:
    """A resumed run keeps its own settings; a config that sets another one (``lr=0.5``) would
    be dropped without a word, as the CLI refuses such options beside ``--resume``. Where a new
    run would go (``out_dir``, ``name``) is no setting: the folder given is the run.

    A setting counts as the run's own as the run stores it, resolved: the config it was
    started with (a relative ``data_dir``, one dropout rate for every layer) passes."""
    try:
        own = stored.resolve(stored=True)
    except BrainPropError:
        return  # a damaged config.json, which _resolve_stored names
    default = TrainConfig()
    ignored = [
        f.name for f in fields(TrainConfig)
        if f.name not in ("epochs", "out_dir", "name")
        and getattr(config, f.name) != getattr(default, f.name)
        and replace(stored, **{f.name: getattr(config, f.name)}).resolve(stored=True) != own
    ]  # fmt: skip
    if ignored:
        raise BrainPropError(
            f"a resumed run keeps its own settings, so the config's {', '.join(ignored)} would be "
            "ignored: pass TrainConfig(epochs=N) to train longer, or no config (data that moved: "
            "data_dir=)"
        )


def reopen(run_path: Path, config: TrainConfig, ended: str | None) -> None:
    """Mark a restored run unfinished if it trains on (``ended``: why it ends before its next
    epoch, None if it trains), and write ``config``'s epochs (a raised ``--epochs``) into its
    ``config.json``; called once the run is restored, so that a resume that fails leaves both
    files as they were. New epochs are refused for a run whose patience ran out.

    ``summary.json`` marks a run complete (``reproduce`` skips it, records it), so it goes
    until the run ends again: that of a finished run given more epochs, or of one that
    diverged after a checkpoint and trains again from there."""
    raised = stored_config(run_path).epochs != config.epochs
    if raised and ended == EARLY_STOPPING:
        # Its patience is spent, so it would end again at once, under a cap it never reached.
        raise BrainPropError(
            f"{run_path} stopped early (no gain of --min-delta {config.min_delta} in "
            f"--patience {config.patience} epochs), so --epochs {config.epochs} would not train "
            "it further: start a new run, with a larger --patience to train longer"
        )
    if raised or ended is None:
        # The summary first: a config.json already raised would make the next resume skip
        # this, and leave a summary that calls the run still training finished.
        summary = run_path / rundir.SUMMARY
        try:
            summary.unlink(missing_ok=True)
        except OSError as e:
            raise BrainPropError(
                f"cannot remove {summary} ({e.strerror or e}), which marks the run finished, to "
                "train it on: fix the permissions of its folder, then resume it again"
            ) from None
    if raised:
        files.atomic_write_json(run_path / rundir.CONFIG, config.to_dict())


def stored_config(run_path: Path) -> TrainConfig:
    """The config in the ``config.json`` of the run directory ``run_path``, as stored."""
    if not run_path.is_dir():
        raise BrainPropError(
            f"no run directory at {run_path}: pass a folder 'brainprop train' created "
            "(it holds config.json and last.pt)"
        )
    return _stored_config(rundir.read_json(run_path / rundir.CONFIG), run_path / rundir.CONFIG)


def _stored_config(d: Any, source: Path) -> TrainConfig:
    return recorded_config(d, source, "the run directory is damaged or from another version")


def _a_device(name: object) -> bool:
    """Whether ``name`` names a device at all (another machine's, maybe): not one is damage.
    Text only: torch.device takes a number for a CUDA index, which no config.json stores."""
    if not isinstance(name, str):
        return False
    try:
        torch.device(name)
    except RuntimeError:
        return False
    return True


def _resolve_stored(config: TrainConfig, source: Path) -> TrainConfig:
    # The device is the run's, which a resume may not change: the usual advice, another
    # --device, would be refused.
    if _a_device(config.device) and device_problem(config.device) is not None:
        raise BrainPropError(
            f"{source}: the run trains on device {config.device!r}, which this machine does not "
            "have: resume it on a machine that has"
        )
    try:
        return config.resolve(stored=True)
    except UnknownName as e:
        raise BrainPropError(f"{source}: {e}") from None
    except BrainPropError as e:
        raise BrainPropError(f"{source} holds an invalid config ({e})") from None
    except (TypeError, ValueError) as e:
        raise BrainPropError(
            f"{source} holds a config with a wrongly typed value ({reason(e)}): the run "
            "directory is damaged"
        ) from None


#: The history columns the loop itself reads back (summary, best epoch, plots).
_ROW_NUMBERS = ("epoch", "lr", "train_loss", "train_reward", "val_acc", "test_acc", "seconds",
                "eval_seconds")  # fmt: skip
#: The types of a history row's values: what JSON and CSV write as they are.
_PLAIN = (int, float, str, bool, type(None))
#: An interrupted epoch's running sums, added to in float (each rank its own under torchrun),
#: and with them the first bad step, an index.
FLOAT_SUMS = ("loss_sum", "reward_sum", "explored_sum")
PARTIAL_SUMS = (*FLOAT_SUMS, "first_bad")


def history_ok(history: Any, epoch: Any) -> bool:
    """Whether a checkpoint's history has every column the loop reads back, as numbers, one
    row for each of the ``epoch`` epochs it records, numbered from 1, with accuracies that
    are fractions and a stack's size (if any) a count: the loop counts epochs by the rows,
    and the summary picks the best of them and divides seconds by stack sizes. Every row is
    written to history.csv and .json, so it holds named plain values only: one that is not
    failed that write after the epoch's checkpoint, at every resume from then on."""
    return (
        isinstance(history, list)
        and epoch == len(history)
        and all(
            isinstance(row, dict)
            and all(type(k) is str and type(v) in _PLAIN for k, v in row.items())
            and all(
                isinstance(row.get(k), int | float) and not isinstance(row.get(k), bool)
                for k in _ROW_NUMBERS
            )
            and row["epoch"] == i
            and 0 <= row["val_acc"] <= 1
            and 0 <= row["test_acc"] <= 1
            and type(row.get("stack_size", 1)) is int
            and row.get("stack_size", 1) >= 1
            for i, row in enumerate(history, 1)
        )
    )


def partial_ok(partial: Any) -> bool:
    """Whether a checkpoint's mid-epoch position (see ``Trainer.train_epoch``) is whole."""
    return (
        isinstance(partial, dict)
        and isinstance(partial.get("step"), int)
        and partial["step"] >= 1
        and isinstance(partial.get("seconds"), int | float)
        and isinstance(partial.get("order_rng"), torch.Tensor)
        # Positions saved before it was recorded lack it.
        and isinstance(partial.get("data_order", ""), str)
        and all(
            isinstance(partial.get(k), torch.Tensor) and partial[k].dim() == 0 for k in PARTIAL_SUMS
        )
        and all(partial[k].is_floating_point() for k in FLOAT_SUMS)
        # An in-place sum would fail on it mid-epoch.
        and not any(partial[k].requires_grad for k in FLOAT_SUMS)
        # A position is saved only once every step so far is known to be finite (-1); another
        # value would end the resumed run as diverged where nothing diverged.
        and partial["first_bad"].dtype == torch.int64
        and partial["first_bad"].item() == -1
        and _rank_sums_ok(partial.get("rank_sums"))
    )


def _rank_sums_ok(sums: Any) -> bool:
    """A torchrun checkpoint's per-rank running sums (``distributed.Context.shares``): one
    tensor of the float sums per rank; None in a checkpoint of one process. Like the sums of
    one process, they must not require gradients: the epoch adds to them in place."""
    return sums is None or (
        isinstance(sums, list)
        and all(
            isinstance(s, torch.Tensor)
            and s.shape == (len(FLOAT_SUMS),)
            and s.is_floating_point()
            and not s.requires_grad
            for s in sums
        )
    )


def optimizer_settings(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Every param group's hyperparameters but the learning rate, which each epoch sets."""
    return [
        {k: v for k, v in group.items() if k not in ("params", "lr")}
        for group in optimizer.state_dict()["param_groups"]
    ]


#: How a resume is given data of one's own again, for the messages that refuse other data.
RESUME_CALL = "train(resume=run, dataset=...)"
RESUME_REMEDY = "resume with the dataset it was trained on"


def restore(
    trainer: Trainer, state: dict[str, Any], ds: Dataset, run_path: Path,
    source: Path | None = None, call: str = RESUME_CALL,
) -> None:  # fmt: skip
    """Load ``state`` (read from ``source``, by default the run's last.pt) into ``trainer``;
    a one-line BrainPropError for a state that does not fit the run (``call``: how its data
    is passed again, if it is not the data it was trained on)."""
    check_compatible(state, ds, run_path, call, trainer.config.data_dir)
    last = source or run_path / rundir.LAST
    saved = state.get("device_type")
    if saved is not None and saved != trainer.device.type:
        # A --device auto run started on a CPU resolves to the GPU of a machine that has one;
        # a resume takes no --device, so hiding the GPUs is what keeps it on the CPU.
        fix = (
            "resume it with the GPUs hidden (CUDA_VISIBLE_DEVICES= before the command)"
            if saved == "cpu"
            else f"resume it on a machine with a {saved} device"
        )
        raise BrainPropError(
            f"{last} was written on {saved} and this run would continue on "
            f"{trainer.device.type}, whose random states are of another kind: {fix}"
        )
    try:
        trainer.load_state(state)
    except checkpoint.MISFITS as e:
        if ran_out_of_memory(e):
            raise  # too large for the machine, which is no fault of the checkpoint's
        raise BrainPropError(
            f"{last} does not fit its run ({checkpoint.misfit(e)}): the checkpoint is "
            "damaged or from another version; start a new run"
        ) from None
    order = trainer.partial and trainer.partial.get("data_order")
    if order and order != trainer.train_set.digest(test=False):
        raise BrainPropError(
            f"{last} stopped partway through an epoch over these training images in another "
            "order (another copy of the data), and the rest of that epoch follows the order it "
            "began in: resume it on the copy of the data it was trained on"
        )
    if not all_finite(trainer.model.state_dict().values()):
        raise BrainPropError(
            f"{last} holds NaN or inf weights, which brainprop never saves: the checkpoint is "
            "damaged; start a new run"
        )


def check_compatible(
    state: dict[str, Any], ds: Dataset, path: Path, call: str, data_dir: str | None = None
) -> None:
    if not declares_sizes(state):
        raise BrainPropError(
            f"checkpoint in {path} does not say which inputs and classes it is for: it is "
            "damaged or from another version"
        )
    source = f"checkpoint in {path}"
    check_trained_on(state, ds, source, RESUME_REMEDY)
    check_same_data(state.get("data"), ds, source, RESUME_REMEDY, call, data_dir)


def data_record(run_path: Path, state: dict[str, Any] | None) -> tuple[Any, str]:
    """What a run to continue records of its data, and where (for messages): the record in
    ``state``, its checkpoint, or for a run killed before its first checkpoint, the data.json
    it wrote as it started. None for a run from before either."""
    if state is not None:
        return state.get("data"), f"checkpoint in {run_path}"
    path = run_path / rundir.DATA
    if not path.exists():
        return None, str(path)
    return rundir.read_json(path), str(path)
