"""A run's ``summary.json``: written by the training loop, read back by ``reproduce``.

Both sides live here, so that a field the report starts to rely on is added to
:data:`EPOCH_KEYS` beside the code that writes it: the measurements of ``results/`` may come
from another machine or an older version, and are checked before they are read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

#: What a summary holds once a run finished an epoch, and the types the report needs.
EPOCH_KEYS: dict[str, type | tuple[type, ...]] = {
    "best_val_acc": (int, float),
    "best_epoch": int,
    "test_acc_at_best": (int, float),
    "s_per_epoch": (int, float),
    "total_seconds": (int, float),
}

#: Fields the report or a budget reads where present: runs of earlier versions lack them.
OPTIONAL_KEYS = ("final_val_acc", "wall_seconds")
#: The ops that ``tf32`` can name as computed in TF32 (:func:`brainprop.peaks.tf32_ops`).
TF32_OPS = ("matmuls", "convolutions")
#: The values a run can record, where they are narrower than "finite and >= 0".
BOUNDS: dict[str, tuple[float, float]] = {
    "best_val_acc": (0, 1),
    "test_acc_at_best": (0, 1),
    "final_val_acc": (0, 1),
    "best_epoch": (1, math.inf),
}

#: The largest a summary's number may be: beyond it a float cannot hold an integer exactly, and
#: far beyond it the report's means (and math.isfinite, for an integer) overflow.
LARGEST = 2**53

#: The summary's fields of measured time: all a rerun of the same run may change.
TIMED_KEYS = ("s_per_epoch", "total_seconds", "wall_seconds")

#: How the stop reason of a run that ended on a NaN or inf loss or weight begins.
DIVERGED = "non-finite"
#: The stop reasons of a run that ended as the paper's do.
EARLY_STOPPING = "early stopping"
MAX_EPOCHS = "max epochs"


def summarize(
    history: Sequence[dict[str, Any]], facts: dict[str, Any], stop_reason: str
) -> dict[str, Any]:
    """The summary of a run with per-epoch ``history`` rows.

    ``facts`` are what the run was (dataset, arch, rule, seed, device ...), copied in first.
    The best epoch is the first with the highest ``val_acc``, as Keras's ``np.argmax`` over
    the history picks it; ``total_seconds`` counts training and evaluation. Seconds are the
    run's own: an epoch shared by a stack of seeds (its ``stack_size``) counts its share.
    ``wall_seconds`` is the wall time of the run's epochs, shared or not, training and
    evaluation: what a budget estimates the next run like it from.
    """
    summary: dict[str, Any] = {**facts, "stop_reason": stop_reason, "epochs_run": len(history)}
    if history:
        best = best_row(history)
        shares = [h.get("stack_size", 1) for h in history]
        seconds = [h["seconds"] / n for h, n in zip(history, shares, strict=True)]
        evaluation = [h["eval_seconds"] / n for h, n in zip(history, shares, strict=True)]
        summary |= {
            "best_val_acc": best["val_acc"],
            "best_epoch": best["epoch"],
            "test_acc_at_best": best["test_acc"],
            "final_val_acc": history[-1]["val_acc"],
            "s_per_epoch": sum(seconds) / len(seconds),
            "total_seconds": sum(seconds) + sum(evaluation),
            "wall_seconds": sum(h["seconds"] + h["eval_seconds"] for h in history),
        }
    return summary


def best_row(history: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The best epoch's row of a non-empty ``history``: the first with the highest ``val_acc``,
    as Keras's ``np.argmax`` over the history picks it. ``best.pt``, the summary and the
    curve's marker all take it from here, so that they name one epoch."""
    return max(history, key=lambda h: h["val_acc"])


def epochs_phrase(n: int) -> str:
    """``n`` epochs in words, as the lines that close runs write it: "1 epoch", "2 epochs"."""
    return f"{n} epoch{'s' * (n != 1)}"


def check_summary(summary: Any) -> None:
    """Raise ValueError naming the first summary field the report could not use."""
    if not isinstance(summary, dict):
        raise ValueError("summary is not an object")
    if not _is(summary.get("epochs_run"), int) or not 0 <= summary["epochs_run"] <= LARGEST:
        raise ValueError("summary's epochs_run is missing or not a count")
    if not isinstance(summary.get("stop_reason", ""), str):
        raise ValueError("summary's stop_reason is not text")
    tf32 = summary.get("tf32", [])
    # Tested one by one: a list in the list would fail set() with an unhashable TypeError.
    if not isinstance(tf32, list) or not all(isinstance(op, str) and op in TF32_OPS for op in tf32):
        raise ValueError(f"summary's tf32 is {tf32!r}, not a list of {' and '.join(TF32_OPS)}")
    # A run stopped before its first epoch ended legitimately has none of the epoch fields.
    if summary["epochs_run"] == 0 and not summary.keys() & EPOCH_KEYS.keys():
        return
    for key, kind in EPOCH_KEYS.items():
        if not _is(summary.get(key), kind):
            raise ValueError(f"summary's {key} is missing or not a number")
    # Python's json reads and writes NaN and Infinity, and a hand-edited or damaged file may
    # hold a value no run can have: either would pass into the report's means as a number.
    for key in [k for k in (*EPOCH_KEYS, *OPTIONAL_KEYS) if k in summary]:
        value = summary[key]
        if not _is(value, (int, float)):
            raise ValueError(f"summary's {key} is not a number")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"summary's {key} is {value}, not a finite number")
        if abs(value) > LARGEST:
            kind = "an integer" if isinstance(value, int) else "a number"
            raise ValueError(f"summary's {key} is {kind} beyond 2**53, no run's")
        low, high = BOUNDS.get(key, (0, math.inf))
        if not low <= value <= high:
            side = f"below {low}" if value < low else f"above {high}"
            raise ValueError(f"summary's {key} is {value}, {side}")
    if summary["best_epoch"] > summary["epochs_run"]:
        raise ValueError(
            f"summary's best_epoch {summary['best_epoch']} is after its last epoch "
            f"(epochs_run {summary['epochs_run']})"
        )


def _is(value: Any, kind: type | tuple[type, ...]) -> bool:
    # JSON true/false load as bools, which Python counts as ints.
    return isinstance(value, kind) and not isinstance(value, bool)
