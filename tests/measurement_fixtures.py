"""Hand-made measurement files, as ``brainprop reproduce`` writes them, for report tests."""

from __future__ import annotations

import math
from pathlib import Path

from brainprop.matrix import RunSpec
from brainprop.measurements import Measurement
from brainprop.measurements import write_measurement as write_record


def write_measurement(
    out: Path,
    spec: RunSpec,
    machine: str,
    *,
    test_acc: float,
    best_epoch: int = 10,
    epochs_run: int | None = None,
    s_per_epoch: float = 2.0,
    best_val_acc: float | None = None,
    stop_reason: str = "early stopping",
    stack: int = 1,
    at_once: int | None = None,
    cuda_graph: bool = False,
    company: float | None = None,
) -> Measurement:
    """Write one measurement of ``spec`` measured on ``machine``; returns what it says.
    ``at_once`` is ``company`` rounded by default, as ``reproduce`` records it."""
    if at_once is None:
        at_once = 1 if company is None else max(1, math.floor(company + 0.5))
    epochs_run = best_epoch + 45 if epochs_run is None else epochs_run
    summary = {
        "dataset": spec.cell.dataset,
        "arch": spec.cell.arch,
        "rule": spec.rule,
        "seed": spec.seed,
        "stop_reason": stop_reason,
        "epochs_run": epochs_run,
        "device": machine,
        "best_val_acc": test_acc if best_val_acc is None else best_val_acc,
        "best_epoch": best_epoch,
        "test_acc_at_best": test_acc,
        "final_val_acc": test_acc,
        "s_per_epoch": s_per_epoch,
        # Evaluation adds a second per epoch on top of training.
        "total_seconds": (s_per_epoch + 1.0) * epochs_run,
    }
    m = Measurement(
        spec.name,
        spec.cell,
        spec.rule,
        spec.seed,
        spec.val,
        spec.max_epochs,
        machine,
        summary,
        preset=spec.preset,
        stack=stack,
        at_once=at_once,
        bf16=spec.bf16,
        cuda_graph=cuda_graph,
        company=company,
        feedback=spec.feedback,
    )
    return write_record(m, {}, {"val_acc": [], "test_acc": []}, out)
