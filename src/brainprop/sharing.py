"""How many runs shared a GPU with a run, over all the sessions it trained in.

``reproduce --jobs N`` packs runs onto one GPU, and a run's measurement divides its seconds by
how many shared the device on average (:mod:`brainprop.measurements`). A run is often stopped
at the end of one session (a short GPU window) and finished in another, packed otherwise: the
session that finished it alone would speak for its whole time. So each session that trains
a run on a GPU notes in its run directory how long it ran and beside how many runs, and the
measurement takes the average over all of them that makes its seconds divided by it the run's
device time: the mean weighted by time of ``1 / runs``, inverted (100 s alone and 100 s beside
three others are 125 s of device time, 1.6 runs on average, where the plain mean, 2.5, would
make 80 s of them).

The record is a JSON list of ``[seconds, runs]`` pairs in ``RUN/sharing.json``.
"""

from __future__ import annotations

import math
from pathlib import Path

from . import rundir
from .errors import BrainPropError
from .files import atomic_write_json

#: The record's name in a run directory.
SHARING = "sharing.json"


def note(run_dir: Path, seconds: float, runs: float) -> None:
    """Add a session in which the run in ``run_dir`` trained ``seconds`` beside ``runs - 1``
    others on average (``runs`` counts itself) to its record."""
    atomic_write_json(run_dir / SHARING, [*_sessions(run_dir), [seconds, runs]])


def average(run_dir: Path, default: float) -> float:
    """How many runs shared the GPU with the run in ``run_dir`` on average over the time of
    the sessions it noted (itself included; see the module's docstring); ``default`` where it
    noted none (a run from before the record, or one that trained on a CPU)."""
    sessions = _sessions(run_dir)
    seconds = sum(s for s, _ in sessions)
    if seconds <= 0:
        return default
    return max(1.0, seconds / sum(s / runs for s, runs in sessions))


def _sessions(run_dir: Path) -> list[list[float]]:
    path = run_dir / SHARING
    if not path.exists():
        return []
    sessions = rundir.read_json(
        path, f"delete it, and {run_dir}'s device time is its last session's"
    )
    ok = isinstance(sessions, list) and all(
        isinstance(pair, list)
        and len(pair) == 2
        and all(_finite(v) for v in pair)
        and pair[0] >= 0
        and pair[1] >= 1
        for pair in sessions
    )
    if not ok:
        raise BrainPropError(
            f"{path} is no list of [seconds, runs] pairs: delete it, and {run_dir}'s device "
            "time is its last session's"
        )
    return sessions


def _finite(v: object) -> bool:
    if not isinstance(v, int | float) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int beyond a float's range
        return False
