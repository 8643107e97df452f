"""``brainprop reproduce``: the paper's matrix, run resumably and in priority order.

:func:`reproduce` runs a :class:`Request`'s share of the matrix (:mod:`brainprop.matrix`).
Under the output folder (``results/`` by default) it keeps::

    runs/<run>/                      run directories with checkpoints (local, not committed)
    measurements/<run>@<machine>.json  one finished run (:mod:`brainprop.measurements`)
    results.md, results.json, results.png   the report (:mod:`brainprop.report`)

A run's name says what it is (``cifar10-deep-ebp-s3``, ``-quickstart`` for hyperparameters from
a preset table other than the paper's, ``-val5000`` for held-out validation, ``-e2`` for an
epoch cap other than the paper's 500, ``-bf16`` for bf16 autocast, ``-fb-random`` for a feedback
pathway other than the paper's), so the same request always maps to the same directories: a
finished run is skipped, an interrupted one resumes from its ``last.pt``. A budget admits runs
by estimates from earlier measurements; ``--jobs`` packs runs onto one device, each in its own
process, and ``--stack`` trains seeds side by side in one network.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import multiprocessing
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait
from pathlib import Path
from statistics import fmean
from typing import Any, NoReturn

from . import distributed, locks, plugins, processes, rundir, sharing, signals
from .config import TrainConfig
from .errors import BrainPropError, described
from .feedback import check_feedback
from .files import TEMPORARIES, atomic_write_json, make_folder
from .matrix import MATRIX, PAPER_EPOCHS, PAPER_FEEDBACK, RULE_ORDER, RUNS, Cell, RunSpec, plan
from .measurements import (
    MEASUREMENTS,
    Measurement,
    changed_setting,
    load_measurements,
    record,
    recorded_name,
    setup_label,
)
from .presets import PAPER_PRESET, table_row
from .summary import epochs_phrase

# --- cost estimates ----------------------------------------------------------------------------


def estimate_seconds(
    spec: RunSpec,
    measurements: Sequence[Measurement],
    setup: str,
    out: Path,
    *,
    stack: int = 1,
    at_once: int = 1,
) -> float | None:
    """Expected wall seconds left for ``spec`` on ``setup`` (see
    :attr:`~brainprop.measurements.Measurement.planned_setup`) in a stack of ``stack`` seeds, with
    ``at_once`` runs sharing the device; None when nothing tells.

    Seconds per epoch (training and evaluation) come from finished runs of the same cell on the
    same setup and stack size, the same rule preferred (the network is the same for every rule,
    so another rule is a fair stand-in, if a rough one for a rule of one's own). Runs that
    shared the device as this one will are preferred; others are scaled to ``at_once`` as if a
    run's device time did not depend on how many shared the device (packing runs on a GPU
    usually does better than that). A run records how many ran beside it on average, so an
    exact match cannot be required.

    The expected epochs are the mean of finished runs of the cell under the same cap (epochs do
    not depend on the machine), those of the same rule and precision preferred, then those of
    the same rule, then any, else the cap itself: the other rule's length is a far better guess
    than the cap, and without it a budget that admits BrainProp's runs would refuse every EBP
    run after them. In a stack (``stack`` > 1), which trains until its longest seed stops, a
    run is given the longest of those lengths instead of their mean. Epochs an interrupted run
    already has are subtracted.
    """
    same_cell = [
        m for m in measurements
        if m.cell == spec.cell and m.val == spec.val and m.preset == spec.preset
        and m.feedback == spec.feedback
    ]  # fmt: skip
    timed = [
        m for m in same_cell
        if m.planned_setup == setup and m.stack == stack and m.summary.get("epochs_run")
    ]  # fmt: skip
    alike = [m for m in timed if m.at_once == at_once] or timed
    own = [m for m in alike if m.rule == spec.rule] or alike
    if not own:
        return None
    per_epoch = fmean(
        _wall_seconds(m) * at_once * m.device_share / m.summary["epochs_run"] for m in own
    )
    # Runs that finished no epoch (diverged at once) say nothing about a run's length.
    capped = [
        m for m in same_cell if m.max_epochs == spec.max_epochs and m.summary["epochs_run"] > 0
    ]
    same_rule = [m for m in capped if m.rule == spec.rule]
    alike = [m for m in same_rule if m.bf16 == spec.bf16] or same_rule or capped
    # One length per run: a run measured both plain and graphed is one run, as in the report.
    lengths = {m.run: m.summary["epochs_run"] for m in alike}
    longest_of_stack = max if stack > 1 else fmean
    epochs = longest_of_stack(lengths.values()) if lengths else spec.max_epochs or PAPER_EPOCHS
    return max(epochs - _epochs_done(out / RUNS / spec.name), 0.0) * per_epoch


def _wall_seconds(m: Measurement) -> float:
    """The wall time of ``m``'s epochs. Summaries of earlier versions lack it; there a stacked
    run's ``total_seconds`` (its share) times its stack size stands in."""
    wall = m.summary.get("wall_seconds")
    return float(wall) if isinstance(wall, int | float) else m.stack * m.summary["total_seconds"]


def _epochs_done(run_dir: Path) -> int:
    """The epochs an interrupted run has trained, by its history; 0 where that is unreadable
    (an estimate's guess: the run's own checkpoint decides what it resumes from)."""
    try:
        history = json.loads((run_dir / rundir.HISTORY_JSON).read_text())
    except (OSError, ValueError):
        return 0
    return len(history) if isinstance(history, list) else 0


# --- the runner --------------------------------------------------------------------------------


#: The digests of each rule's and pathway's own code (:func:`brainprop.owncode.digests`), by
#: :attr:`RunSpec.rule_and_feedback`: empty for the library's.
OwnCode = Mapping[tuple[str, str], dict[str, str]]


@dataclass(frozen=True)
class Request:
    """What ``brainprop reproduce`` was asked for."""

    cells: tuple[Cell, ...] = MATRIX
    rules: tuple[str, ...] = RULE_ORDER
    seeds: int = 10
    val: int | None = None
    max_epochs: int | None = None
    preset: str = PAPER_PRESET
    out: Path = Path("results")
    data_dir: str | None = None
    device: str = "auto"
    budget_minutes: float | None = None
    jobs: int = 1
    stack: int = 1
    bf16: bool = False
    feedback: str = PAPER_FEEDBACK
    cuda_graph: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        """Take ``out`` as a string too, and refuse counts no request can have."""
        object.__setattr__(self, "out", Path(self.out))
        if self.jobs < 1:
            raise BrainPropError(f"--jobs must be >= 1, got {self.jobs}")
        if self.stack < 1:
            raise BrainPropError(f"--stack must be >= 1, got {self.stack}")
        if self.budget_minutes is not None and not self.budget_minutes > 0:
            raise BrainPropError(f"--budget-minutes must be > 0, got {self.budget_minutes}")
        check_feedback(self.feedback)
        if self.stack > 1 and self.feedback != PAPER_FEEDBACK:
            raise BrainPropError(
                f"--stack trains seeds as one vmapped network, and --feedback {self.feedback}'s "
                "autograd functions do not batch under vmap: drop --stack (--jobs packs runs "
                "side by side instead)"
            )

    @functools.cached_property
    def own_code(self) -> OwnCode:
        """The digests of its rules' and feedback pathway's own code
        (:func:`brainprop.owncode.digests`), taken the first time they are asked for, which
        :func:`reproduce` does as its session starts."""
        from .owncode import digests

        return {(rule, self.feedback): digests(rule, self.feedback) for rule in self.rules}

    def specs(self) -> list[RunSpec]:
        return plan(
            self.cells,
            self.rules,
            self.seeds,
            self.val,
            self.max_epochs,
            self.preset,
            self.bf16,
            self.feedback,
        )


@dataclass
class Outcome:
    """What one :func:`reproduce` call did, by run name."""

    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    over_budget: list[str] = field(default_factory=list)


def reproduce(request: Request, say: Callable[[str], None] = print) -> Outcome:
    """Run the requested part of the matrix, then rewrite the report.

    Finished runs (a measurement or a ``summary.json``) are skipped; interrupted ones resume.
    With ``budget_minutes`` a run starts only if its estimate fits the time left (a run with no
    estimate yet starts while time is left: it is the measurement the next estimate needs), in
    priority order; runs that do not fit are passed over, so a cheaper later one may still fill
    the time. ``jobs`` > 1 runs that many at once, each in its own process on the same device.
    ``stack`` > 1 trains up to that many seeds of one cell and rule side by side in one stacked
    network (:mod:`brainprop.stacked`); a stack is then one job, admitted by its longest run.

    Raises:
        BrainPropError: bad request, missing data, or a run that failed.
        Interrupted: SIGINT/SIGTERM; each running run saved its state, and the same request
            continues it.
    """
    from .devices import resolve_device, usable_cpus

    distributed.refuse_launched(
        "'brainprop reproduce'",
        "start it without torchrun (it starts a process per run itself, --jobs at a time)",
    )
    kind = resolve_device(request.device).type
    if request.cuda_graph and kind != "cuda":
        raise BrainPropError(
            f"--cuda-graph needs a CUDA device, and these runs would be on {kind} (--device "
            f"{request.device}): drop --cuda-graph"
        )
    if kind == "cpu" and request.jobs > (cores := usable_cpus()):
        # Each run records one thread as its machine, which would no longer mean one core.
        raise BrainPropError(
            f"--jobs {request.jobs} is more runs than the {cores} CPU core{'s' * (cores > 1)} "
            f"this process may use: they would take turns on them, and each run's s/epoch "
            f"would measure the sharing; pass --jobs {cores} or fewer"
        )
    # Before any run loads its data: a file or a read-only folder as --out.
    rundir.check_new(request.out, None)
    with contextlib.ExitStack() as held:
        # A second session on the folder would resume the first one's runs under it or delete
        # a run directory it is just making; two machines merge their measurements instead.
        busy = (
            f"{request.out} is in use by another 'brainprop reproduce': wait for it to end, or "
            "give this one another --out and copy its measurements/ in afterwards"
        )

        holding = False

        def hold() -> bool:
            nonlocal holding
            if holding:
                return False
            make_folder(request.out)
            held.enter_context(locks.held(request.out, busy))
            holding = True
            return True

        # A folder that does not exist yet is made and held once the request has passed its
        # checks, so that a refused one creates nothing, and is then scanned again.
        if request.out.is_dir():
            hold()
        return _reproduce(request, say, hold)


def _reproduce(request: Request, say: Callable[[str], None], hold: Callable[[], bool]) -> Outcome:
    """:func:`reproduce`'s work, once the request is checked; ``hold`` holds its folder (at
    once where it exists already) and says whether it took it just now."""
    from .report import digest, write_report

    # A copy whose digests of own code (Request.own_code, which _scan takes first) are this
    # session's, not an earlier session's of the same request, before the code changed: the
    # lines are read from the files by the line numbers of the code imported, which a file
    # edited meanwhile would shift.
    request = replace(request)
    specs = request.specs()
    measurements, outcome, pending = _scan(request, specs, say)
    _check_data(pending, request.data_dir)
    _check_val(pending, request.val, request.data_dir)
    if hold():
        # The folder was new, so the scan ran unheld, and a session that made the folder
        # meanwhile may have run (part of) these runs in it.
        measurements, outcome, pending = _scan(request, specs, say)
    # Where each run's measurement goes as it ends: a file in the way is found now, not after
    # the first run has trained.
    kept = request.out / MEASUREMENTS
    make_folder(kept, f"move away what is at {kept}: reproduce keeps its measurements there")
    # Read whatever --stack, where a run is to train: a damaged stacks.json is refused now, not
    # as the first run alone (_begin) comes up, after a dataset's load.
    begun = _stacks_begun(request.out) if pending else []
    jobs = stacks(pending, request.stack, begun if request.stack > 1 else [])
    say(
        f"reproduce: {len(specs)} runs requested, {len(outcome.skipped)} already measured, "
        f"{len(pending)} to run"
        + ("" if len(jobs) == len(pending) else f" in {len(jobs)} stack{'s' * (len(jobs) > 1)}")
        + ("" if request.jobs == 1 else f", {request.jobs} at a time")
    )
    try:
        if request.jobs == 1:
            _run_in_process(request, jobs, measurements, outcome, say)
        else:
            _run_in_workers(request, jobs, measurements, outcome, say)
    except BaseException:
        # The runs' error says what to do next; a report that fails too must not replace it.
        try:
            say(f"report: {write_report(request.out)}")
        except Exception as e:
            say(f"report not rewritten: {described(e)}")
        raise
    report = write_report(request.out)
    rows = digest(measurements, {spec.name for spec in specs})
    say(_done_line(outcome, bool(rows)))
    for line in rows:
        say(f"  {line}")
    say(f"report: {report}")
    return outcome


def _scan(
    request: Request, specs: Sequence[RunSpec], say: Callable[[str], None]
) -> tuple[list[Measurement], Outcome, list[RunSpec]]:
    """The measurements in ``request.out``, with those of runs that finished there unrecorded
    now recorded; the outcome so far, with the runs measured (in any setup) skipped; and the
    runs left to train."""
    code = request.own_code
    outcome = Outcome()
    # Read once: a file half-copied in while the runs train (a merge) must not stop them.
    measurements = load_measurements(request.out)
    _check_own_code(specs, measurements, request.out, code)
    measured = {m.run for m in measurements}
    # Finished, but stopped before it was recorded: where a GPU run's sessions noted no sharing
    # (a run from before the record), this request's packing is the best guess.
    packing = runs_at_once(request)
    pending = []
    for spec in specs:
        run_dir = request.out / RUNS / spec.name
        finished = _run_ended(request.out, spec)
        if spec.name not in measured:
            _check_run_dir(spec, run_dir)
            if finished:
                company = _found_company(run_dir, packing)
                measurements.append(
                    record(spec, run_dir, request.out, company, code[spec.rule_and_feedback])
                )
                measured.add(spec.name)
        elif finished and not _recorded(spec, run_dir, measurements):
            _record_beside(spec, run_dir, request.out, packing, measurements, say, code)
        if spec.name in measured:
            outcome.skipped.append(spec.name)
        else:
            pending.append(spec)
    return measurements, outcome, pending


def _check_own_code(
    specs: Sequence[RunSpec], measurements: Sequence[Measurement], out: Path, code: OwnCode
) -> None:
    """Refuse, before anything trains, a measurement of one of ``specs`` whose rule or pathway
    of one's own was other code than that name is now (``code``): the run would be skipped as
    measured, and the old code's numbers reported as the new's."""
    from .owncode import changed

    wanted = {spec.name: spec for spec in specs}
    for m in measurements:
        spec = wanted.get(m.run)
        if spec is None or m.own_code is None:
            continue  # files of earlier versions hold no digest to compare
        if (piece := changed(m.own_code, code[spec.rule_and_feedback])) is not None:
            raise BrainPropError(
                f"{m.path} measured {piece} as other code than it is now: register the "
                f"changed code under a new name, or move the old code's measurements out of "
                f"{out / MEASUREMENTS} and its runs out of {out / RUNS} to measure it anew"
            )


def _recorded(spec: RunSpec, run_dir: Path, measurements: Sequence[Measurement]) -> bool:
    """Whether the finished run in ``run_dir`` has its measurement among ``measurements``: one
    in its own setup (machine, TF32, CUDA graph), the file that recording it would write."""
    try:
        summary = rundir.read_json(run_dir / rundir.SUMMARY)
        config = rundir.read_json(run_dir / rundir.CONFIG)
        file_name = recorded_name(spec.name, summary, config)
    except (BrainPropError, TypeError, AttributeError):
        return False  # recording it names the damage
    return file_name in {m.file_name for m in measurements if m.run == spec.name}


def _record_beside(
    spec: RunSpec,
    run_dir: Path,
    out: Path,
    packing: int,
    measurements: list[Measurement],
    say: Callable[[str], None],
    code: OwnCode,
) -> None:
    """Record the run finished in ``run_dir`` beside the measurements of its name in other
    setups (merged in from another machine), or its result would stay in a run directory,
    which nobody commits; ``packing`` as for :func:`_found_company`. One that cannot be
    recorded is said, and the session goes on: the name is measured, so it skips the run
    anyway."""
    try:
        _check_run_dir(spec, run_dir)
        company = _found_company(run_dir, packing)
        measurements.append(record(spec, run_dir, out, company, code[spec.rule_and_feedback]))
    except BrainPropError as e:
        # The error's advice (to train the run afresh) holds only once the name is unmeasured.
        say(
            f"{spec.name} is measured in another setup, so it is skipped; its run here is not "
            f"recorded: {e}, once the other setup's measurement is moved out of "
            f"{out / MEASUREMENTS}"
        )


def _found_company(run_dir: Path, packing: int) -> float:
    """How many runs shared the device with the run found finished but unrecorded in
    ``run_dir``, on average over its sessions (:func:`brainprop.sharing.average`). Where they
    noted none, a run on a GPU takes ``packing``, the recording session's, as the best guess;
    one on a CPU, which never notes, shared no GPU whatever this session's ``--device``: its
    jobs split the cores, which its machine's thread count says."""
    from .devices import names_a_cpu

    try:
        machine = rundir.read_json(run_dir / rundir.SUMMARY)["device"]
    except (BrainPropError, TypeError, KeyError):
        machine = None  # recording it names the damage
    return sharing.average(run_dir, 1.0 if names_a_cpu(machine) else packing)


def _done_line(outcome: Outcome, rows: bool) -> str:
    """What the session did, and the heading of its digest where it has ``rows``."""
    line = f"reproduce: {len(outcome.ran)} trained now, {len(outcome.skipped)} measured before"
    if outcome.over_budget:
        line += f", {len(outcome.over_budget)} over the budget (the same command runs them later)"
    if rows:
        line += (
            "; the report's rows of these runs (every seed of each), test accuracy (%) at the "
            "best-validation epoch, mean (sd) over seeds:"
        )
    return line


def runs_at_once(request: Request) -> int:
    """How many runs share one device under ``request``: its ``--jobs`` on a GPU; on a CPU the
    jobs split the cores, which the machine's thread count already says."""
    from .devices import resolve_device

    return 1 if resolve_device(request.device).type == "cpu" else request.jobs


def this_machine(device: str, threads: int | None = None) -> str:
    """The machine name a run on ``device`` records (``summary.json``'s ``device``)."""
    import torch

    from .devices import device_name, resolve_device

    dev = resolve_device(device)
    if threads is None or dev.type != "cpu":
        return device_name(dev)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return device_name(dev)
    finally:
        torch.set_num_threads(before)


def _check_data(pending: Sequence[RunSpec], data_dir: str | None) -> None:
    """Fail before the first run, not hours in, when a planned dataset is missing or damaged."""
    from .data import DATASET_NAMES, data_root, dataset_status
    from .data.registry import inside_data_root

    needed = {s.cell.dataset for s in pending}
    if not needed:
        return
    root = data_root(data_dir)
    # The library's datasets alone have a status; one's own load as their runs start.
    statuses = dataset_status(root, [n for n in DATASET_NAMES if n in needed])
    missing = [s for s in statuses if not s.present]
    if missing:
        if missing[0].damaged:
            raise BrainPropError(missing[0].damaged)
        if inside := inside_data_root(missing[0].name, root):
            raise BrainPropError(f"{missing[0].name} is not in {missing[0].path}: {inside}")
        have = sorted(needed - {s.name for s in missing})
        keep = f"or run only --datasets {','.join(have)}" if have else "or pass --data-dir"
        raise BrainPropError(
            f"{missing[0].name} is not in {missing[0].path}: {missing[0].how_to_get}, {keep}"
        )


def _check_run_dir(spec: RunSpec, run_dir: Path) -> None:
    """Refuse, before anything trains, what is at ``spec``'s run directory where it is no run
    of ``spec`` to resume or record: something else in the way, another run's directory (it
    would resume as itself and be refused only when recorded, after its training), or a run
    whose stored hyperparameters are not its preset's as this version has them (a run of an
    older table), which would pass for a run of the table as it is now."""
    if not (run_dir / rundir.CONFIG).is_file():
        _check_unstarted(run_dir)
        return
    config = rundir.read_json(run_dir / rundir.CONFIG)
    if not isinstance(config, dict):
        return  # resuming it names the damage
    if other := spec.differs_from(config):
        key, stored, wanted = other
        raise BrainPropError(
            f"{run_dir} holds a run with {key} {stored!r}, not run {spec.name}'s {wanted!r}: "
            f"move that run directory out of {run_dir.parent} to run {spec.name} afresh"
        )
    if change := changed_setting(config, spec.preset, spec.cell):
        raise BrainPropError(
            f"{run_dir} {change}: move that run directory out of {run_dir.parent} to run it "
            "afresh, or give the settings it ran with a preset of their own in brainprop.presets"
        )


def _check_unstarted(run_dir: Path) -> None:
    """Refuse a ``run_dir`` without config.json unless it is what a run killed before writing
    that file leaves, which :func:`_train` deletes: an empty folder, or one holding the
    temporary files of that write and the one before it (data.json, written first).
    Anything else there is not ours to delete."""
    if run_dir.is_symlink():
        what = "a symbolic link"
    elif run_dir.is_dir():
        found = sorted(
            p.name
            for p in run_dir.iterdir()
            if not p.match(TEMPORARIES) and not (p.name == rundir.DATA and p.is_file())
        )
        if not found:
            return
        what = f"a folder holding {', '.join(found[:3])}{', ...' * (len(found) > 3)}"
    elif run_dir.exists():
        what = "a file"
    else:
        return
    raise BrainPropError(
        f"{run_dir} is in the way of run {run_dir.name}: it is {what}, and no run directory "
        "(it has no config.json); move it away or delete it"
    )


def _check_val(pending: Sequence[RunSpec], val: int | None, data_dir: str | None) -> None:
    """Fail before the first run when ``--val-split`` would leave a cell fewer training images
    than its batch, which the run otherwise reports only as it starts, maybe hours in. The
    loaders do not insist on the official files' sizes, so each dataset is counted as loaded."""
    from .data import load_dataset

    if val is None:
        return
    batches: dict[str, int] = {}
    for s in pending:
        row = table_row(s.preset, s.cell.dataset, s.cell.arch)
        if row is not None:
            batches[s.cell.dataset] = max(batches.get(s.cell.dataset, 1), row.batch_size)
    for name, batch in batches.items():
        total = len(load_dataset(name, data_dir).train_y)
        if total - val < batch:
            fix = f"pick at most {total - batch}" if total > batch else "validate on the test set"
            raise BrainPropError(
                f"--val-split {val} would leave {max(total - val, 0)} of the {total} {name} "
                f"training images, fewer than a batch of {batch}: {fix}"
            )


def _minutes(seconds: float) -> str:
    """E.g. "2.5 min", or "40 s" under a minute, which "0.0 min" would call no time at all."""
    return f"{seconds:.0f} s" if seconds < 59.5 else f"{seconds / 60:.1f} min"


class _Budget:
    """Admission of runs against ``budget_minutes`` of wall time from when the first comes up,
    by estimates from ``measurements``, to which the caller adds each run it records."""

    def __init__(
        self, request: Request, threads: int | None, measurements: list[Measurement]
    ) -> None:
        self.request = request
        self.threads = threads
        self.measurements = measurements
        self.at_once = runs_at_once(request)
        minutes = request.budget_minutes
        self.seconds = math.inf if minutes is None else 60 * minutes
        self.start: float | None = None

    def admits(self, job: Job, say: Callable[[str], None], others: int = 0) -> bool:
        """Whether ``job`` fits the time left; a stack takes as long as its longest run (see
        :func:`estimate_seconds`), beside at most ``others`` jobs (fewer than --jobs - 1 as
        the queue runs down: a lone run on a GPU was priced as --jobs runs' share). A job
        whose time is unknown starts while any time is left, and the clock starts when the
        first job comes up, so that the first always finds the whole budget: a deadline of
        "now + budget" would decide a tiny one by float rounding (now + 1e-298 is now) and
        by how long planning took."""
        if self.seconds == math.inf:
            return True
        now = time.monotonic()
        self.start = now if self.start is None else self.start
        left = self.seconds - (now - self.start)
        setup, out = self._setup(job), self.request.out
        estimates = [
            estimate_seconds(
                spec,
                self.measurements,
                setup,
                out,
                stack=len(job),
                at_once=min(self.at_once, 1 + others),
            )
            for spec in job
        ]
        estimate = None if None in estimates else max(e for e in estimates if e is not None)
        if left > 0 and (estimate is None or estimate <= left):
            return True
        if estimate is None:
            needs = "an unknown time (no run like it measured on this machine yet)"
        else:
            needs = f"~{_minutes(estimate)}"
        have = _minutes(left) if left > 0 else "none"
        say(f"over budget: {_names(job)} needs {needs}, {have} left")
        return False

    def _setup(self, job: Job) -> str:
        """Where and how ``job`` will run: a resumed run keeps its device and graph setting,
        whatever this request says (bf16 is in the runs' names, so it is the request's)."""
        request = self.request
        try:
            config = _members(job, request)[0]
            machine, graphed = this_machine(config.device, self.threads), config.cuda_graph
        except BrainPropError:
            # A damaged config.json, or a device this machine lacks: the run's own start
            # reports that, naming the run; the estimate makes do with the request.
            machine, graphed = this_machine(request.device, self.threads), request.cuda_graph
        return setup_label(machine, request.bf16, graphed)


#: What one process trains at a time: one run, or a stack of seeds (see :func:`stacks`).
Job = tuple[RunSpec, ...]


def stacks(pending: Sequence[RunSpec], size: int, begun: Sequence[Sequence[str]] = ()) -> list[Job]:
    """``pending`` as jobs of up to ``size`` runs that differ only in the seed, in the priority
    order of each job's first run (so a stack pulls later seeds of its cell forward).

    With ``size`` > 1, the runs of a stack ``begun`` in an earlier session (run names, as
    :func:`_stacks_begun` reads them, the latest begun last) stay together: a seed's dropout
    masks depend on its stack-mates, so regrouped, a resumed seed would train on differently
    than it began. Only a smaller ``size`` splits them (a stack too large for the device's
    memory must be able to shrink), and a run takes the latest stack it was begun in, so that
    a stack split so stays split. The rest are packed afresh."""
    jobs: list[Job] = []
    rest = {spec.name: spec for spec in pending}
    if size > 1:
        for names in reversed(begun):
            kept = [rest.pop(name) for name in names if name in rest]
            jobs += [tuple(kept[i : i + size]) for i in range(0, len(kept), size)]
    # One pass that groups the runs by all but their seed: comparing each run with every later
    # one took minutes for a large --seeds.
    alike: dict[RunSpec, list[RunSpec]] = {}
    for spec in rest.values():
        alike.setdefault(replace(spec, seed=0), []).append(spec)
    for runs in alike.values():
        jobs += [tuple(runs[i : i + size]) for i in range(0, len(runs), size)]
    position = {spec: i for i, spec in enumerate(pending)}
    return sorted(jobs, key=lambda job: position[job[0]])


#: The stacks ``reproduce`` has started in its ``--out`` folder, each a list of run names, in
#: the order they were last started.
STACKS = "stacks.json"


def _stacks_noted(out: Path) -> list[list[str]]:
    """Every stack noted in ``out`` as it started (none before the first)."""
    path = out / STACKS
    if not path.exists():
        return []
    fix = "delete it, and the runs it lists are stacked afresh"
    noted = rundir.read_json(path, fix)
    if not (
        isinstance(noted, list)
        and all(isinstance(job, list) and all(isinstance(n, str) for n in job) for job in noted)
    ):
        raise BrainPropError(f"{path} is not a list of stacks of run names: {fix}")
    return noted


def _stacks_begun(out: Path) -> list[list[str]]:
    """The stacks noted in ``out`` that trained: those of which a run has a checkpoint. One
    stopped before its first (or whose worker failed as it started) has nothing to keep, and
    its runs are packed afresh."""
    noted = _stacks_noted(out)
    return [job for job in noted if any((out / RUNS / n / rundir.LAST).is_file() for n in job)]


def _begin(out: Path, job: Job) -> None:
    """Note the stack ``job`` in ``out`` as it starts, the latest last, for :func:`stacks` in
    later sessions; reproduce holds the folder, so no other session writes it meanwhile. A
    run alone is noted only where it leaves a stack (``--stack 1``), so that it stays alone."""
    names = [spec.name for spec in job]
    noted = _stacks_noted(out)
    if len(job) < 2 and not any(names[0] in stack for stack in noted):
        return
    if noted[-1:] != [names]:
        # A stack begun again after its runs were split otherwise is the latest again.
        atomic_write_json(out / STACKS, [*(n for n in noted if n != names), names])


def _names(job: Job) -> str:
    return ", ".join(spec.name for spec in job)


def _run_in_process(
    request: Request,
    jobs: Sequence[Job],
    measurements: list[Measurement],
    outcome: Outcome,
    say: Callable[[str], None],
) -> None:
    from .data import load_dataset
    from .devices import resolve_device

    budget = _Budget(request, None, measurements)
    recorder = _Recorder(request.out, measurements, outcome, say, request.own_code)
    # A run here has the GPU to itself, which its run directory notes (see sharing).
    on_gpu = resolve_device(request.device).type != "cpu"
    loaded: dict[str, Any] = {}
    # Between runs (loading a dataset, recording a run) there is nothing to save, and a stop
    # ends the session at once; within a run, its training takes the signals over.
    between = "between runs: run the same 'brainprop reproduce' command to continue"
    with signals.quit_on_signals(between):
        for job in jobs:
            if not budget.admits(job, say):
                outcome.over_budget.extend(spec.name for spec in job)
                continue
            dataset = job[0].cell.dataset
            # One dataset in memory at a time: Tiny ImageNet alone is over a GB.
            if dataset not in loaded:
                loaded = {dataset: load_dataset(dataset, request.data_dir)}
            say(f"run {_names(job)}")
            _begin(request.out, job)
            started = time.monotonic()
            try:
                try:
                    _train(job, request, loaded[dataset])
                finally:
                    # Alone on the GPU, however it ended: the next session may finish it
                    # packed otherwise. Noted before the runs are recorded, which reads it.
                    if on_gpu:
                        _note_sharing(request.out, job, time.monotonic() - started, 1.0, say)
            except signals.Interrupted as e:
                names = recorder.record_ended(job)
                raise _stopped(e.exit_status - 128, names, request.out / RUNS) from None
            recorder.record(job)


def _note_sharing(
    out: Path, job: Job, seconds: float, runs: float, say: Callable[[str], None]
) -> None:
    """Note in the run directory of each run of ``job`` a session of ``seconds`` on a GPU
    beside ``runs - 1`` other jobs on average (:func:`brainprop.sharing.note`).

    Only a run that kept something of the session (a checkpoint, or its end) notes it: one
    stopped before its first checkpoint starts over, and a folder without its config.json is
    cleared as a run killed while it began. A note that cannot be written is said, and the run
    is recorded all the same, with this session's sharing for its whole time."""
    for spec in job:
        run_dir = out / RUNS / spec.name
        if not any((run_dir / name).is_file() for name in (rundir.LAST, rundir.SUMMARY)):
            continue
        try:
            sharing.note(run_dir, seconds, runs)
        except BrainPropError as e:
            say(f"{spec.name}: its share of the GPU this session is not noted: {e}")


def _run_ended(out: Path, spec: RunSpec) -> bool:
    """Whether ``spec``'s run in ``out`` has ended, its results written."""
    return (out / RUNS / spec.name / rundir.SUMMARY).is_file()


class _Recorder:
    """Records the runs of a session as they end, into ``measurements`` and ``outcome``, and
    keeps the report current with them: rewritten at most every :attr:`REPORT_EVERY_S`
    seconds (a session's end rewrites it anyway), so that it stays current through a session
    killed outright (SIGKILL, the out-of-memory killer) at the price of about a second of CPU
    a time with a few hundred measurements, beside runs that may be timing their epochs."""

    REPORT_EVERY_S = 60.0

    def __init__(
        self,
        out: Path,
        measurements: list[Measurement],
        outcome: Outcome,
        say: Callable[[str], None],
        code: OwnCode,
    ) -> None:
        self.out, self.measurements, self.outcome, self.say = out, measurements, outcome, say
        self.code = code
        self.reported_at = -math.inf

    def record(self, specs: Sequence[RunSpec], company: float = 1.0) -> None:
        """Record the runs ``specs``, which ended beside ``company - 1`` others on average over
        this session (their sessions' average where they noted theirs: :mod:`~.sharing`).

        Raises:
            BrainPropError: the first run that cannot be recorded, once the others are: one
                run's damaged files must not leave its stack-mates' results unrecorded.
        """
        error: BrainPropError | None = None
        for spec in specs:
            run_dir = self.out / RUNS / spec.name
            try:
                shared = sharing.average(run_dir, company)
                m = record(spec, run_dir, self.out, shared, self.code[spec.rule_and_feedback])
            except BrainPropError as e:
                error = error or e
                continue
            self.measurements.append(m)
            self.outcome.ran.append(spec.name)
            self.say(_finished_line(m))
        if specs and time.monotonic() - self.reported_at >= self.REPORT_EVERY_S:
            self.report()
        if error is not None:
            raise error

    def record_ended(self, job: Job, company: float = 1.0) -> list[str]:
        """Record the runs of ``job`` that ended as a stop came (one in its last step lets it
        end, see train); returns the names of the others. One that cannot be recorded is said,
        and the stop goes on, as a stop and not an error: the next session names it again."""
        ended = [_run_ended(self.out, spec) for spec in job]
        try:
            self.record([spec for spec, done in zip(job, ended, strict=True) if done], company)
        except BrainPropError as e:
            self.say(f"not recorded: {e}")
        return [spec.name for spec, done in zip(job, ended, strict=True) if not done]

    def report(self) -> None:
        """Rewrite the report with the runs recorded so far; one that cannot be written (a
        file half-copied in by a merge) is said and left to the session's end: the runs go
        on."""
        from .report import write_report

        self.reported_at = time.monotonic()
        try:
            write_report(self.out)
        except Exception as e:
            self.say(f"report not rewritten yet: {described(e)}")


def _train(job: Job, request: Request, dataset: Any, tagged: bool = False) -> None:
    """Train ``job``'s runs to their end, each fresh or resumed from its ``last.pt``: one run
    alone, several in one stack. ``tagged``: each line they print starts with the run's name,
    a stack's with its first run's and ``(+N)`` (see ``train``'s ``tag``).

    Resumed runs keep their stored configs, which can differ beyond the seed (runs started by
    an older version, or with other flags): each kind then trains in a stack of its own.
    """
    from .owncode import OwnCodeFailed
    from .stacked import stack_key, train_stacked
    from .train import train

    run_dirs = [_run_dir(spec, request) for spec in job]
    for spec, run_dir in zip(job, run_dirs, strict=True):
        left = request.out / RUNS / spec.name
        if run_dir is None and left.exists():
            # Killed before its config was written: nothing in it to resume.
            _check_unstarted(left)
            shutil.rmtree(left)
    # Keyed as the configs are: a job's are all fresh (unresolved) or all take stored ones,
    # which were resolved when written; a damaged one is then named with its file by train().
    # The budget admitted the job as one stack; kinds trained one after another take longer.
    kinds: dict[tuple[Any, ...], list[tuple[str, TrainConfig | Path]]] = {}
    for spec, run_dir, config in zip(job, run_dirs, _members(job, request), strict=True):
        member = config if run_dir is None else run_dir
        kinds.setdefault(stack_key(config), []).append((spec.name, member))
    for kind in kinds.values():
        names, members = [name for name, _ in kind], [member for _, member in kind]
        tag = _tag(names) if tagged else None
        try:
            if len(members) > 1:
                train_stacked(members, dataset=dataset, progress=request.progress, tag=tag)
            elif isinstance(members[0], Path):
                train(resume=members[0], dataset=dataset, progress=request.progress, tag=tag)
            else:
                train(members[0], dataset=dataset, progress=request.progress, tag=tag)
        except OwnCodeFailed as e:
            # The run keeps its checkpoint, which the same command resumes, as after a signal.
            raise BrainPropError(
                f"{e.failure}: fix it, then run the same 'brainprop reproduce' command to continue"
            ) from e


def _tag(names: Sequence[str]) -> str:
    """What starts each line of these runs trained together: the first's name, and ``(+N)``."""
    return names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1})"


def _run_dir(spec: RunSpec, request: Request) -> Path | None:
    """``spec``'s run directory if it holds a run to resume (its ``config.json``), else None."""
    run_dir = request.out / RUNS / spec.name
    return run_dir if (run_dir / rundir.CONFIG).is_file() else None


def _members(job: Job, request: Request) -> list[TrainConfig]:
    """The config each run of ``job`` will train with.

    A run resumes with its stored config: the cap is part of its name, so it is already this
    request's, and the device stays the one it started on, since CPU and CUDA random streams
    differ and a checkpoint of one cannot continue on the other; so does whether it replays a
    CUDA graph, whose seconds are another kind. A stack is one configuration, so its new seeds
    take a resumed seed's in all but :data:`~brainprop.stacked.MEMBER_FIELDS`.
    """
    from .resume import stored_config
    from .stacked import MEMBER_FIELDS

    fresh = [spec.config(request.out, request.data_dir, request.device, request.cuda_graph)
             for spec in job]  # fmt: skip
    stored = [None if (d := _run_dir(spec, request)) is None else stored_config(d) for spec in job]
    ran = next((config for config in stored if config is not None), None)
    if ran is None:
        return fresh
    own = [{f: getattr(config, f) for f in MEMBER_FIELDS} for config in fresh]
    return [
        config if config is not None else replace(ran, **mine)
        for config, mine in zip(stored, own, strict=True)
    ]


def _finished_line(m: Measurement) -> str:
    s = m.summary
    if "best_val_acc" not in s:
        return f"done {m.run}: {s.get('stop_reason')}, no epoch finished ({m.setup})"
    return (
        f"done {m.run}: best val {s['best_val_acc']:.4f} at epoch {s['best_epoch']}, test "
        f"there {s['test_acc_at_best']:.4f}, {epochs_phrase(s['epochs_run'])}, "
        f"{s['s_per_epoch']:.1f} s/epoch ({m.timed_on})"
    )


def _stopped(signum: int, names: Sequence[str], runs: Path, failed: int = 0) -> signals.Interrupted:
    """The stop of a session whose runs ``names`` (their folders in ``runs``) were in progress,
    beside ``failed`` whose workers failed as they stopped (their errors already said).

    A run that trained saved its state as it stopped (its last.pt); one without had begun
    nothing (its worker was stopped while it started) or was quit at once by a second signal
    before its first checkpoint, and the same command starts it afresh.
    """
    kept = [name for name in names if (runs / name / rundir.LAST).is_file()]
    unbegun = [name for name in names if name not in kept]
    saved = []
    if kept:
        saved.append(f"{', '.join(kept)}{' each' * (len(kept) > 1)} kept its progress")
    if unbegun:
        saved.append(f"{', '.join(unbegun)} had no checkpoint yet")
    if failed:
        they = "1 worker failed as it" if failed == 1 else f"{failed} workers failed as they"
        saved.append(f"{they} stopped (above)")
    return signals.Interrupted(
        f"stopped by {signal.Signals(signum).name}; "
        f"{'; '.join(saved) or 'no run was in progress'}: run the same 'brainprop reproduce' "
        "command to continue",
        signum,
    )


# --- packing runs onto one device: one process per run ----------------------------------------


def _worker(
    job: Job,
    request: Request,
    threads: int | None,
    conn: Connection,
    parent: int,
    plugin_specs: Sequence[str],
) -> None:
    """Body of a worker process: import the parent's plugins (its registrations are not
    inherited by a spawned process), train one job, report an error through ``conn``.

    The worker ignores SIGINT (:func:`~brainprop.processes.worker_signals`) and leaves the
    terminal's process group, so Ctrl-C reaches the parent only, which passes the stop on
    (:data:`~brainprop.signals.RELAY`, which a scheduler's own SIGTERM to the worker does not
    turn into a second signal). A stop is never its death: one that comes while it starts or
    loads its dataset ends it at once, one between runs is held for the next run's checkpoint
    (:func:`~brainprop.signals.hold_stops`), and one after the last run ends it as a stop.
    """
    signals.hold_stops()  # first: a stop may have come while this process started
    import torch

    from .data import load_dataset
    from .devices import out_of_memory, ran_out_of_memory

    os.setpgrp()
    processes.die_with_parent(parent)
    if threads is not None:
        torch.set_num_threads(threads)
    # Workers share the terminal: each line says whose it is, on stdout the run's (train's tag),
    # on stderr (warnings, a traceback) the job's, the same but where a job splits by config.
    processes.tag_stderr(_tag([spec.name for spec in job]))
    status = 0
    try:
        # A stop passed on before training can checkpoint (loading Tiny ImageNet the first time
        # takes a minute) ends the worker at once: it has nothing to save.
        with signals.quit_on_signals("before its training began"):
            plugins.load_all(plugin_specs)
            _check_code_unchanged(job, request)
            dataset = load_dataset(job[0].cell.dataset, request.data_dir)
        _train(job, request, dataset, tagged=True)
    except signals.Interrupted as e:
        status = e.exit_status
    except BrainPropError as e:
        processes.send_error(conn, str(e))
        status = 2
    except (MemoryError, RuntimeError) as e:
        if not ran_out_of_memory(e):
            raise
        processes.send_error(conn, str(out_of_memory(e)))
        status = 2
    conn.close()
    held = signals.end_holding()
    if status == 0 and held is not None:
        # The parent reads the stop (its runs all ended, so they are recorded) and stops too.
        status = 128 + held
    sys.exit(status)


def _check_code_unchanged(job: Job, request: Request) -> None:
    """Refuse to train ``job`` in a worker whose import of the plugins found other code of its
    rule or pathway than the session began with (a file edited since): the parent would record
    its runs under the session's digests (:attr:`Request.own_code`), the old code's."""
    from .owncode import changed, digests

    for key in dict.fromkeys(spec.rule_and_feedback for spec in job):
        if (piece := changed(request.own_code[key], digests(*key))) is not None:
            raise BrainPropError(
                f"the code of {piece} changed since this session began (its file was "
                f"edited): run the same 'brainprop reproduce' command again to go on with the "
                "code as it is then"
            )


def _run_in_workers(
    request: Request,
    jobs: Sequence[Job],
    measurements: list[Measurement],
    outcome: Outcome,
    say: Callable[[str], None],
) -> None:
    from .devices import resolve_device, usable_cpus

    # On a CPU, workers split the cores instead of each taking them all.
    on_cpu = resolve_device(request.device).type == "cpu"
    # >= 1: reproduce() caps the jobs at the cores.
    threads = usable_cpus() // request.jobs if on_cpu else None
    budget = _Budget(request, threads, measurements)
    pool = _Workers(request, threads, on_cpu, measurements, outcome, say)
    queue = list(jobs)

    def passing_on(signum: int) -> None:
        # The workers' own lines name the signal they get, which the user did not send.
        say(
            f"{signal.Signals(signum).name}: passing it on to the runs in progress as "
            f"{signals.RELAY.name}, each to save a checkpoint as it stops; this command ends "
            "when they have"
        )

    def still_waiting(signum: int) -> None:
        # Quitting now would leave the workers unwatched (multiprocessing would join them at
        # exit anyway), and a second stop would cost them their checkpoints.
        say(
            f"{signal.Signals(signum).name} again: still waiting for the runs in progress to "
            "save their state"
        )

    def stop_session(signum: int) -> NoReturn:
        failures = pool.stop_all()
        raise _stopped(signum, pool.stopped, request.out / RUNS, len(failures))

    with signals.stop_on_signals(passing_on, on_again=still_waiting) as stop:
        try:
            while queue or pool.running:
                pool.tick()
                while queue and len(pool.running) < request.jobs and not stop.requested:
                    job = queue.pop(0)
                    # It shares the device with those running and, as they come up, the
                    # queued ones: as many as --jobs while the queue lasts, fewer after.
                    if budget.admits(job, say, len(pool.running) + len(queue)):
                        pool.start(job)
                    else:
                        outcome.over_budget.extend(spec.name for spec in job)
                # Before the check for an empty pool: a signal that came after the last worker
                # ended still leaves queued runs unstarted, which must not read as success.
                if stop.requested:
                    stop_session(stop.signum)
                if not pool.running:
                    break
                ended: list[int] = wait(list(pool.running), timeout=1.0)  # type: ignore[assignment]
                pool.tick()
                failures = pool.reap(ended)
                if failures:
                    raise BrainPropError(_failed(failures, pool.names()))
                if pool.stopped_by is not None:
                    # A signal that reached a worker first (a scheduler's, to every process)
                    # stops the session, as it would have stopped the parent.
                    stop_session(stop.signum or pool.stopped_by)
        except signals.Interrupted:
            raise  # the first signal's stop, which each worker saw and saved its run for
        except Exception:
            # Workers would go on training unwatched for hours after the parent's error (their
            # results unrecorded): stop them, each saving its state, as a signal does. Nothing
            # is recorded here, where a second error would hide the first; the next session
            # records what completed.
            pool.terminate()
            pool.note_sessions()
            raise


class _Workers:
    """The worker processes of :func:`_run_in_workers`, one job each, by the sentinel
    ``multiprocessing.connection.wait`` returns for it; each job's runs are recorded as its
    worker completes them."""

    def __init__(
        self,
        request: Request,
        threads: int | None,
        on_cpu: bool,
        measurements: list[Measurement],
        outcome: Outcome,
        say: Callable[[str], None],
    ) -> None:
        self.request, self.threads, self.on_cpu = request, threads, on_cpu
        self.say = say
        self.recorder = _Recorder(request.out, measurements, outcome, say, request.own_code)
        self.ctx = multiprocessing.get_context("spawn")
        self.running: dict[int, tuple[Job, Any, Connection]] = {}
        self.company = _Company()
        # Each worker is passed the stop once, however many signals the parent gets.
        self.signalled: set[int] = set()
        # A worker stopped by a signal of its own (a scheduler's SIGTERM that reached it before
        # the parent, a kill of its pid): that signal.
        self.stopped_by: int | None = None
        # The runs a stop left unfinished, however it came, for the stop's message.
        self.stopped: list[str] = []

    def tick(self) -> None:
        """Count the time since the last tick for each running job (see :class:`_Company`)."""
        self.company.tick(self.running)

    def start(self, job: Job) -> None:
        _begin(self.request.out, job)
        receive, send = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(
            target=_worker,
            args=(job, self.request, self.threads, send, os.getpid(), plugins.loaded()),
            name=job[0].name,
        )
        with processes.worker_signals():
            proc.start()
        send.close()
        self.running[proc.sentinel] = (job, proc, receive)
        self.say(f"run {_names(job)} (process {proc.pid})")

    def names(self) -> list[str]:
        """The runs in progress."""
        return [spec.name for job, _, _ in self.running.values() for spec in job]

    def finished(self, sentinel: int) -> None:
        """Record the runs of the job that ``sentinel``'s worker completed."""
        job, _, _ = self.running.pop(sentinel)
        self.recorder.record(job, self._company(sentinel, job))

    def record_stopped(self, sentinel: int) -> None:
        """Record the runs of ``sentinel``'s job that ended as the stop came (a signal in a
        run's last step lets it end), and note the others in :attr:`stopped`."""
        job, _, _ = self.running.pop(sentinel)
        self.stopped += self.recorder.record_ended(job, self._company(sentinel, job))

    def _company(self, sentinel: int, job: Job) -> float:
        """How many jobs shared the GPU with ``job`` on average this session, noted in its
        runs' directories for the session that finishes them (1 on a CPU: the cores are split,
        which the machine's thread count says)."""
        if self.on_cpu:
            return 1.0
        seconds, runs = self.company.leave(sentinel)
        _note_sharing(self.request.out, job, seconds, runs, self.say)
        return runs

    def note_sessions(self) -> None:
        """Note the session of every job still held (stopped beside a failure, each saving its
        state), as the one that finishes it counts every session's sharing."""
        for sentinel, (job, _, _) in self.running.items():
            self._company(sentinel, job)

    def reap(self, ended: list[int]) -> list[str]:
        """Record the jobs whose workers ``ended`` completed; returns why each other one failed.
        One stopped by a signal, its state saved, is no failure: it is noted in
        :attr:`stopped_by` and :attr:`stopped`.

        Every worker that ended is seen to: one that failed beside one that completed must not
        leave the completed runs unrecorded."""
        failures = []
        for sentinel in ended:
            try:
                failure = self._reap_one(sentinel)
            except BrainPropError as e:
                # A run that cannot be recorded fails as a worker does, and the rest are seen to.
                failure = str(e)
            if failure is not None:
                failures.append(failure)
        return failures

    def _reap_one(self, sentinel: int) -> str | None:
        """:meth:`reap` one worker that ended: why it failed, or None."""
        job, proc, receive = self.running[sentinel]
        proc.join()
        if proc.exitcode == 0:
            self.finished(sentinel)
            return None
        error = processes.error_sent(receive)
        # A run stopped by a signal exits with the shell's 128 + its number (Interrupted).
        signum = proc.exitcode - 128
        if error is None and signum in (*signals.SIGNALS, signals.RELAY):
            self.stopped_by = signum
            self.record_stopped(sentinel)
            return None
        self._company(sentinel, job)  # its checkpoint, if any, is continued next session
        del self.running[sentinel]
        return error or _ended(_names(job), proc.exitcode)

    def stop_all(self) -> list[str]:
        """Stop the workers, each saving its state, and see to each as :meth:`reap` does: the
        runs that completed meanwhile are recorded (a signal after a run's last step lets it
        end, see train), those stopped noted in :attr:`stopped`, and why a worker failed as
        it stopped (its checkpoint not saved on a full disk, killed for memory) is said, not
        taken for a stop that kept its progress. The session stops all the same.

        Returns the failures, as said."""
        self.tick()
        self.terminate()
        failures = self.reap(list(self.running))
        for failure in failures:
            self.say(failure)
        return failures

    def signal_all(self) -> None:
        """Pass the stop on to each worker still alive and not yet sent it, without waiting for
        it: :data:`~brainprop.signals.RELAY`, which stops a worker as a first signal does and
        never counts as a second, since a scheduler's own SIGTERM may have reached it already."""
        for _, proc, _ in self.running.values():
            if proc.is_alive() and proc.pid not in self.signalled:
                self.signalled.add(proc.pid)
                os.kill(proc.pid, signals.RELAY)

    def terminate(self) -> None:
        """Pass the stop on to every worker (:meth:`signal_all`) and wait while each saves its
        checkpoint."""
        self.signal_all()
        for _, proc, _ in self.running.values():
            proc.join()


def _failed(failures: Sequence[str], others: Sequence[str]) -> str:
    """The error of workers that failed (``failures``, why each did), which stops the runs
    still in progress beside them (``others``), each saving its state."""
    if not others:
        return "; ".join(failures)
    each = "each " * (len(others) > 1)
    return "; ".join([
        *failures,
        f"{', '.join(others)} stopped as well, {each}saving its state: once the failure is "
        "mended, the same 'brainprop reproduce' command continues",
    ])  # fmt: skip


def _ended(names: str, status: int) -> str:
    """Why a worker that sent no error of its own ended: killed by a signal (a negative exit
    status, as multiprocessing gives it), or its exit status."""
    if status >= 0:
        return f"{names} ended with exit status {status}"
    try:
        name = signal.Signals(-status).name
    except ValueError:
        name = f"signal {-status}"
    if -status == getattr(signal, "SIGKILL", None):
        # Unless someone sent it by hand, a SIGKILL is the kernel's out-of-memory killer.
        name += (
            " (as the kernel does when memory runs out: check the free memory, or pass fewer "
            "--jobs)"
        )
    return f"{names} was killed by {name}"


class _Company:
    """How many jobs, on average over its time, ran beside each one (itself included): how
    many shared the GPU with it, whatever ``--jobs`` allowed; the average that divides its
    seconds into its device time, as :mod:`brainprop.sharing`'s does."""

    def __init__(self) -> None:
        self.since = time.monotonic()
        self.seconds: dict[int, float] = {}
        self.device_seconds: dict[int, float] = {}

    def tick(self, running: Collection[int]) -> None:
        """Count the time since the last tick for the jobs ``running`` during it."""
        now = time.monotonic()
        for key in running:
            self.seconds[key] = self.seconds.get(key, 0.0) + now - self.since
            share = (now - self.since) / len(running)
            self.device_seconds[key] = self.device_seconds.get(key, 0.0) + share
        self.since = now

    def leave(self, key: int) -> tuple[float, float]:
        """The seconds the job ``key`` ran, and how many ran beside it on average (itself
        included); it is counted no more."""
        seconds, device = self.seconds.pop(key, 0.0), self.device_seconds.pop(key, 0.0)
        return seconds, max(1.0, seconds / device) if device > 0 else 1.0
