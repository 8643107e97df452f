"""The run directory: one folder per run holding everything a run produces.

```
<out_dir>/<name>/
    config.json     the resolved TrainConfig
    data.json       the data's name and images per class (Dataset.fingerprint), as it starts
    history.csv     one row per epoch (also history.json)
    last.pt         full training state, rewritten every epoch (resume reads it)
    epoch_start.pt  the state at the last epoch's end, while last.pt holds one inside an epoch
    best.pt         model weights at the best validation epoch
    accuracy.png    training reward rate, validation accuracy (and test accuracy, where the
                    validation images are held out) per epoch
    diagnostics.png angle(W, B), angle(update, exact gradient) and |B|/|W| per layer and epoch
    summary.json    best validation accuracy and epoch, test accuracy there, timings, device
```
Every file is written atomically, and a process training a run holds its directory
(:func:`claimed`), so that a second one cannot resume the same run meanwhile.

The checkpoints are written in an order a kill at any moment leaves resumable:

- an epoch's end (:func:`save_epoch_end`): last.pt, best.pt where the epoch is the best,
  epoch_start.pt removed, the history. A best.pt one best behind last.pt's history is written
  from last.pt as the run resumes (:func:`mend_best`); a history one row short is rewritten as
  the run closes.
- a stop inside an epoch (:func:`save_state`): the end of the epoch before is kept as
  epoch_start.pt, where a NaN later in the epoch rewinds to (:func:`rewind_point`), then
  last.pt.
- the run's close: history, plots, and last summary.json, which marks it finished.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import checkpoint, locks
from .errors import PERMISSIONS_FIX, BrainPropError, kind_of, reason
from .files import atomic_write_figure, atomic_write_json, atomic_write_text, copy, probe_write, why
from .summary import best_row

CONFIG, HISTORY_CSV, HISTORY_JSON = "config.json", "history.csv", "history.json"
#: What the run trained on, for a resume before its first checkpoint, which records it too.
DATA = "data.json"
LAST, BEST, PLOT, SUMMARY = "last.pt", "best.pt", "accuracy.png", "summary.json"
#: While last.pt holds a position inside an epoch, the end of the epoch before it (see
#: :func:`save_state`): where a NaN later in that epoch rewinds to.
EPOCH_START = "epoch_start.pt"


def given_path(value: object, what: str, fix: str) -> Path:
    """A run directory or checkpoint as the caller gave it: text, a path or a
    :class:`~brainprop.train.Run` (anything ``os.fspath`` takes); one line, ``what`` and
    ``fix``, for anything else or an empty one, which ``Path`` would read as the working
    folder."""
    try:
        text = os.fspath(value)
    except TypeError:
        raise BrainPropError(
            f"{what} must be a path (text, a Path or a Run), not {kind_of(value)}: {fix}"
        ) from None
    if text in ("", b""):
        raise BrainPropError(f"{what} is empty: {fix}")
    return Path(os.fsdecode(text))


# Filesystems cap a name at 255 bytes, and create() may append "-9999" to a taken one.
MAX_NAME_BYTES = 250


def check_new(out_dir: str | Path, name: str | None) -> None:
    """Refuse what :func:`create` would, before a run loads its data (seconds, for a large
    dataset minutes): a name that is no folder name, an ``out_dir`` that cannot be written.

    Nothing is created: a run refused later (a full disk, a bad batch size) leaves no folder.
    """
    if name is not None:
        _check_name(name)
    out = _out_folder(out_dir)
    # The nearest folder that exists is where create() makes the first one it needs.
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        probe_write(existing)
    except OSError as e:
        raise _unwritable(out, e) from None


def create(out_dir: str | Path, name: str) -> Path:
    """Make a new, empty run folder ``out_dir/name`` (suffixed -2, -3, ... if taken)."""
    _check_name(name)
    out = _out_folder(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for i in range(1, 10_000):
            path = out / (name if i == 1 else f"{name}-{i}")
            try:
                path.mkdir()
            except FileExistsError:
                continue
            # Unnamed: a kill here leaves an empty folder, which reproduce knows to delete.
            probe_write(path)
            return path
    except OSError as e:
        raise _unwritable(out, e) from None
    raise BrainPropError(f"{out} already holds 9999 runs named {name!r}: pass another --name")


def _check_name(name: str) -> None:
    # Checked where a name becomes a folder, rather than in the config: a run stored under a
    # name this refuses (older versions took "a/b", and "" for the default) must still resume.
    if (
        name in ("", ".", "..")
        or "/" in name
        or any(ord(c) < 32 or ord(c) == 127 for c in name)  # NUL, newlines, escapes
        or len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES
    ):
        raise BrainPropError(
            f"--name must be one folder name (no '/' or control characters, at most "
            f"{MAX_NAME_BYTES} bytes), got "
            f"{name!r}: pass e.g. --name my-run"
        )


def _out_folder(out_dir: str | Path) -> Path:
    # Path("") is the working directory: an empty --out is a mistake, not a choice of it.
    if str(out_dir) == "":
        raise BrainPropError("--out is empty: pass the folder for run directories, e.g. runs")
    return Path(out_dir)


def _unwritable(out: Path, e: OSError) -> BrainPropError:
    return BrainPropError(f"cannot write runs under {out} ({why(e)}): pass a writable --out folder")


def check_writable(run: Path) -> None:
    """Refuse to continue the run in ``run`` where this process cannot make a file."""
    try:
        probe_write(run)
    except OSError as e:
        raise BrainPropError(
            f"cannot write in {run} ({e.strerror or e}): fix its permissions, or copy the run "
            "to a folder you can write and resume that copy"
        ) from None


def check_free_space(
    folder: Path, needed: int, elsewhere: str = "or pass another --out folder"
) -> None:
    """Refuse to start when ``folder``'s disk has less than ``needed`` bytes free; the advice
    is to free disk space, ``elsewhere`` what else will do.

    Catching a full disk up front costs one statfs; finding it at the first checkpoint costs
    an epoch, or on a long run the hours since the last one.
    """
    # The folder may not exist yet; the disk it will live on is that of its nearest ancestor.
    existing = next((p for p in (folder, *folder.absolute().parents) if p.exists()), folder)
    try:
        free = shutil.disk_usage(existing).free
    except OSError:
        return  # Unknown free space: the writes themselves still fail cleanly.
    if free < needed:
        raise BrainPropError(
            f"only {free / 2**20:.1f} MiB free in {folder}, and the checkpoints of this run need "
            f"about {needed / 2**20:.1f} MiB: free disk space {elsewhere}"
        )


def claimed(run: Path) -> contextlib.AbstractContextManager[None]:
    """Hold the run directory ``run`` for this process until the block ends.

    A second process resuming a run while it trains (a scheduler that restarts a job it thinks
    died, a user who typed the command twice) would delete its half-written checkpoint as a
    leftover, then both would write the same files.
    """
    return locks.held(
        run,
        f"{run} is being trained already: wait for that training to end, or stop it (it saves "
        "its state), then resume it once",
    )


def default_name(dataset: str, arch: str, rule: str, seed: int) -> str:
    return f"{dataset}-{arch}-{rule}-s{seed}-{time.strftime('%Y%m%d-%H%M%S')}"


def write_history(run: Path, history: list[dict[str, Any]]) -> None:
    atomic_write_json(run / HISTORY_JSON, history)
    if not history:
        return
    buf = io.StringIO()
    # Every row's columns, in first-seen order: a run resumed from an older version has rows
    # without the columns added since.
    columns = list(dict.fromkeys(key for row in history for key in row))
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(run / HISTORY_CSV, buf.getvalue())


def save_epoch_end(
    run: Path, state: dict[str, Any], history: list[dict[str, Any]], best: dict[str, Any] | None
) -> None:
    """Write the end of an epoch: the whole ``state`` as last.pt, ``best`` (the weights, where
    the epoch is the best so far) as best.pt, and the ``history`` that ends with it.

    last.pt first: a kill between the two leaves the new best epoch's weights in last.pt, which
    :func:`mend_best` copies to best.pt as the run resumes. best.pt first would leave best.pt
    holding an epoch that the history lacks, the previous best's weights overwritten."""
    checkpoint.save(run / LAST, state)
    if best is not None:
        checkpoint.save(run / BEST, best)
    (run / EPOCH_START).unlink(missing_ok=True)
    write_history(run, history)


def mend_best(run: Path, state: dict[str, Any], weights: Callable[[int], dict[str, Any]]) -> None:
    """Write best.pt, as ``weights(epoch)`` gives it (the network restored from ``state``, the
    run's last.pt as it resumes), where ``state`` ends at the best epoch of its history and
    best.pt holds another: a kill between the two writes of an epoch's end
    (:func:`save_epoch_end`) left it one best behind."""
    history = state.get("history") or []
    if state.get("partial") is not None or not history:
        return
    epoch = state["epoch"]
    if best_row(history)["epoch"] != epoch:
        return
    path = run / BEST
    try:
        # By the weights, not the epoch alone: a best.pt left by a run since started over may
        # hold another attempt's epoch of that number.
        if path.is_file() and _same_weights(checkpoint.load(path), state, epoch):
            return
    except BrainPropError:
        pass  # a damaged best.pt is replaced by the weights it should hold
    checkpoint.save(path, weights(epoch))


def _same_weights(best: dict[str, Any], state: dict[str, Any], epoch: int) -> bool:
    """Whether ``best``, a best.pt as read, holds ``state``'s weights, of ``epoch``.

    Anything else a hand-edited file may hold is simply not the same (and rewritten): a tensor
    for the epoch, whose ``==`` has no truth value, a sparse tensor, which ``torch.equal``
    refuses, or values of another dtype, which it would promote and call equal."""
    mine, theirs = best.get("model"), state["model"]
    return (
        type(best.get("epoch")) is int
        and best["epoch"] == epoch
        and isinstance(mine, dict)
        and mine.keys() == theirs.keys()
        and all(_same_tensor(mine[k], theirs[k]) for k in theirs)
    )


def _same_tensor(mine: Any, theirs: torch.Tensor) -> bool:
    return (
        isinstance(mine, torch.Tensor)
        and (mine.layout, mine.dtype, mine.shape) == (theirs.layout, theirs.dtype, theirs.shape)
        and torch.equal(mine, theirs)
    )


def save_state(run: Path, state: dict[str, Any], epochs_done: int) -> None:
    """Write ``state`` as last.pt, as a stop does, after ``epochs_done`` epochs.

    A state inside an epoch replaces the end of the epoch before, which a NaN later in this
    epoch rewinds to, as it would in a run never stopped: that one is kept first, as
    epoch_start.pt, until an epoch's end is written again.
    """
    last, start = run / LAST, run / EPOCH_START
    if state["partial"] is None:
        checkpoint.save(last, state)
        start.unlink(missing_ok=True)
        return
    if epochs_done and _epoch_start_state(run, epochs_done) is None and last.is_file():
        try:
            on_disk = checkpoint.load(last)
            if on_disk.get("partial") is None and on_disk.get("epoch") == epochs_done:
                _keep_as(last, start)
        except (BrainPropError, OSError) as e:
            # The stop's own state comes first.
            why = e if isinstance(e, BrainPropError) else f"cannot read {last} ({reason(e)})"
            print(
                f"brainprop: a NaN later in this epoch will rewind to this stop's last.pt, not "
                f"to the epoch's start, which was not kept: {why}",
                file=sys.stderr,
            )
    checkpoint.save(last, state)


def _keep_as(source: Path, target: Path) -> None:
    """Make ``target`` hold what ``source`` holds: a hard link where the filesystem has them,
    which takes no room where a copy takes a checkpoint's (a stop on a nearly full disk keeps
    both). Safe as every write of ``source`` renames a new file over its name."""
    link = target.with_name(f".{target.name}.link.tmp")  # a temporary remove_temporaries takes
    try:
        link.unlink(missing_ok=True)
        os.link(source, link)
        os.replace(link, target)
    except OSError:
        link.unlink(missing_ok=True)
        # A copy takes a checkpoint's room, which the stop's own last.pt needs next.
        if shutil.disk_usage(target.parent).free < 2 * source.stat().st_size + 2**20:
            raise BrainPropError(
                f"there is no room for a copy of {source.name} beside this stop's own (the "
                "filesystem has no hard links)"
            ) from None
        copy(source, target)


def _epoch_start_state(run: Path, epoch: int) -> dict[str, Any] | None:
    """epoch_start.pt if it holds the end of epoch ``epoch`` (1-based), else None: one left
    from an earlier epoch by a kill is stale, and a damaged one is as good as none (a stop
    replaces it; a rewind goes to last.pt instead), never a reason to lose a stop's state."""
    start = run / EPOCH_START
    if not start.is_file():
        return None
    try:
        state = checkpoint.load(start)
    except BrainPropError:
        return None
    return state if state.get("partial") is None and state.get("epoch") == epoch else None


def rewind_point(run: Path) -> tuple[dict[str, Any] | None, Path]:
    """The state a NaN rewinds to, and the file it is in (None: the initial state): the end of
    the last finished epoch.

    A last.pt inside an epoch (a stop, then a resume) is not where a run never stopped goes
    back to; the end of the epoch before, kept as epoch_start.pt by :func:`save_state`, is.
    Inside the first epoch that is the initial state. Without a usable epoch_start.pt (a run
    directory of an earlier version, a damaged file) it is last.pt itself.
    """
    last = run / LAST
    if not last.is_file():
        return None, last
    state = checkpoint.load(last)
    if state.get("partial") is None:
        return state, last
    if state.get("epoch") == 0:
        return None, last
    start = _epoch_start_state(run, state.get("epoch"))
    return (start, run / EPOCH_START) if start is not None else (state, last)


def refuse_restart(run: Path) -> None:
    """A run without ``last.pt`` resumes from its start, which is right only if it was killed
    before its first checkpoint; once it has results, starting over would overwrite them.

    ``best.pt`` alone is no such result: it holds the weights of an epoch whose state is gone
    (left by a version that wrote it before ``last.pt``, or by a ``last.pt`` deleted by hand).
    The history comes after ``last.pt``, and ``epoch_start.pt`` holds an earlier one.
    """
    left = [n for n in (HISTORY_CSV, HISTORY_JSON, EPOCH_START) if (run / n).exists()]
    if left:
        raise BrainPropError(
            f"{run / LAST} is missing, but the run has trained ({left[0]} is there), and "
            "resuming would start it over and overwrite that: put back its last.pt, or start a "
            "new run"
        )
    if (run / SUMMARY).is_file():
        raise BrainPropError(
            f"{run} ended before its first checkpoint ({SUMMARY} says why): there is nothing "
            "to continue; start a new run"
        )


def read_json(path: Path, fix: str = "the run directory is damaged") -> Any:
    """The JSON in ``path``; a one-line error ending in ``fix`` if it cannot be read."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        if path.is_symlink():
            raise BrainPropError(
                f"{path} links to {path.readlink()}, which is missing: {fix}"
            ) from None
        raise BrainPropError(
            f"{path} is missing: is {path.parent} a brainprop run directory?"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BrainPropError(f"{path} is not valid JSON: {fix}") from None
    except (ValueError, RecursionError):
        # Valid JSON that Python will not read: a number of over 4300 digits, deep nesting.
        raise BrainPropError(
            f"{path} is not JSON brainprop can read (a number too long, or nesting too deep): {fix}"
        ) from None
    except PermissionError as e:  # no damage: ``fix`` may say to delete the file
        raise BrainPropError(f"cannot read {path} ({e.strerror or e}): {PERMISSIONS_FIX}") from None
    except OSError as e:  # a folder where a file should be, ...
        raise BrainPropError(f"cannot read {path} ({e.strerror or e}): {fix}") from None


def write_plot(run: Path, history: list[dict[str, Any]], title: str) -> None:
    """Training reward rate and validation/test accuracy per epoch, as a PNG."""
    from matplotlib.figure import Figure

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    # Points as well as lines: a run of one epoch has no line to draw.
    ax.plot(epochs, [h["train_reward"] for h in history], ".-", label="train reward rate")
    ax.plot(epochs, [h["val_acc"] for h in history], ".-", label="validation accuracy")
    if any(h["test_acc"] != h["val_acc"] for h in history):
        ax.plot(epochs, [h["test_acc"] for h in history], ".-", label="test accuracy")
    best = best_row(history)
    ax.plot([best["epoch"]], [best["val_acc"]], "ks", label=f"best {best['val_acc']:.4f}")
    # A rule of one's own may reward a wrong choice below BrainProp's 0.
    low = min(h["train_reward"] for h in history)
    bottom = 0.0 if low >= 0 else low - 0.02
    ax.set(xlabel="epoch", ylabel="accuracy", title=title, ylim=(bottom, 1.02))
    ax.legend(loc="lower right")
    fig.tight_layout()
    atomic_write_figure(run / PLOT, fig, dpi=120)
