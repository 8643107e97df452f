"""Measurements: one small JSON file per finished run and setup, named by run and machine.

They live in ``<results>/measurements/<run>@<machine>.json`` (before ``.json``,
``-tf32-<ops>`` for a run whose GPU computed those ops in TF32 and ``-cuda-graph`` for one
replayed from a CUDA graph) and hold what ran (the run's
config), where (the machine, its precision, whether a CUDA graph replayed the steps, how many
runs shared the device), its summary and its accuracy curve. Results from another machine merge
in by copying its files; :mod:`brainprop.report` reads them all.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import rundir
from .data import DATASET_NAMES
from .errors import BrainPropError
from .feedback import FEEDBACK_MODES
from .files import atomic_write_json, make_folder
from .matrix import PAPER_FEEDBACK, Cell, RunSpec
from .objectives import OBJECTIVES
from .presets import ARCHITECTURES, PAPER_PRESET, table_row
from .registry import NAME
from .summary import LARGEST, TF32_OPS, check_summary

MEASUREMENTS = "measurements"
MEASUREMENT_FORMAT = "brainprop-measurement-1"


@dataclass(frozen=True)
class Measurement:
    """One finished run as recorded under ``measurements/``: what ran, where, and its summary.

    ``preset`` names the hyperparameter table the run took and ``feedback`` its feedback
    pathway (files written before either was recorded hold the paper's). ``machine`` is the
    device, ``bf16`` whether the run trained under bf16 autocast and ``cuda_graph`` whether it
    replayed its steps from a CUDA graph:
    with the ops its summary names as computed in TF32 (:attr:`tf32`) they are :attr:`setup`,
    what the run's seconds compare with. Its accuracy compares with :attr:`numerics`, the setup
    without the graph, which computes what a plain step does.
    ``stack`` (seeds trained as one network) and ``at_once`` (runs packed onto one GPU) say how
    many runs shared the device, so that its seconds can be compared with runs shared alike.
    ``company`` is how many runs shared the GPU on average over the run's time (itself
    included), which prices its share of the device; ``at_once`` is it rounded to a whole
    number, which labels and groups runs (files written before ``company`` was recorded
    have ``at_once`` alone). ``own_code`` holds the digests of the run's rule and pathway
    where they are one's own (:func:`brainprop.owncode.digests`; empty where a name of one's
    own ran the library's code; None in files of earlier versions and of the library's rules
    and pathways).
    """

    run: str
    cell: Cell
    rule: str
    seed: int
    val: int | None
    max_epochs: int | None
    machine: str
    summary: dict[str, Any]
    path: Path | None = None
    preset: str = PAPER_PRESET
    stack: int = 1
    at_once: int = 1
    bf16: bool = False
    cuda_graph: bool = False
    company: float | None = None
    feedback: str = PAPER_FEEDBACK
    own_code: dict[str, str] | None = None

    @property
    def file_name(self) -> str:
        return _file_name(self.run, self.machine, self.tf32, self.cuda_graph)

    @property
    def tf32(self) -> list[str]:
        """The ops the run computed in TF32 (see :func:`~brainprop.peaks.tf32_ops`), in one
        order however a merged file lists them."""
        return _tf32(self.summary)

    @property
    def shared_by(self) -> int:
        """How many runs shared the device with this one (itself included)."""
        return self.stack * self.at_once

    @property
    def device_share(self) -> float:
        """The share of the GPU's time that was this run's, beside the runs packed with it (a
        stack's share is in its summary's seconds already)."""
        return 1 / (self.at_once if self.company is None else self.company)

    @property
    def setup(self) -> str:
        """The machine and how the run computed, e.g. ``"NVIDIA H200, bf16, CUDA graph"``:
        what its seconds compare with."""
        return setup_label(self.machine, self.bf16, self.cuda_graph, self.tf32)

    @property
    def planned_setup(self) -> str:
        """:attr:`setup` as a request can name it before it runs: without TF32, which shows
        only once a network is built. What :func:`~brainprop.experiments.estimate_seconds`
        matches."""
        return setup_label(self.machine, self.bf16, self.cuda_graph)

    @property
    def numerics(self) -> str:
        """The machine and the precision, e.g. ``"NVIDIA H200, bf16"`` or ``"NVIDIA H200, TF32
        convolutions"``: what its accuracy and epochs compare with. A CUDA graph replays the
        very step a plain run takes, so graphed and plain runs pool in a report row; their
        seconds do not."""
        return setup_label(self.machine, self.bf16, False, self.tf32)

    @property
    def timed_on(self) -> str:
        """The setup and how the device was shared: what this run's seconds compare with."""
        return sharing_label(self.setup, self.stack, self.at_once)


def machine_slug(machine: str) -> str:
    """``"NVIDIA H200"`` -> ``"nvidia-h200"``: the machine part of a measurement's file name."""
    return re.sub(r"[^a-z0-9]+", "-", machine.lower()).strip("-") or "unknown"


def setup_label(machine: str, bf16: bool, cuda_graph: bool, tf32: Sequence[str] = ()) -> str:
    """``machine``, marked ``", bf16"`` for runs under bf16 autocast, ``", TF32 convolutions"``
    (or matmuls) for runs whose GPU computed those in TF32 (PyTorch's default for fp32
    convolutions, see :func:`~brainprop.peaks.tf32_ops`) and ``", CUDA graph"`` for runs
    replayed from one (the paper's fp32, step by step, is unmarked)."""
    marks = ["bf16"] * bf16 + [f"TF32 {' and '.join(tf32)}"] * bool(tf32)
    return ", ".join([machine, *marks, *["CUDA graph"] * cuda_graph])


def _file_name(run: str, machine: str, tf32: Sequence[str], cuda_graph: bool) -> str:
    # bf16 is in the run's name already; TF32 and a graph are not, and are other setups.
    ops = f"-tf32-{'-'.join(tf32)}" if tf32 else ""
    return f"{run}@{machine_slug(machine)}{ops}{'-cuda-graph' * cuda_graph}.json"


def _tf32(summary: dict[str, Any]) -> list[str]:
    return [op for op in TF32_OPS if op in summary.get("tf32", [])]


def _machine(summary: dict[str, Any]) -> str:
    return str(summary.get("device", "unknown"))


def _cuda_graph(config: dict[str, Any]) -> bool:
    return bool(config.get("cuda_graph", False))


def recorded_name(run: str, summary: dict[str, Any], config: dict[str, Any]) -> str:
    """The file name :func:`record` gives the measurement of the finished run ``run`` whose
    ``summary.json`` and ``config.json`` hold these: one per run and setup (machine, TF32,
    CUDA graph)."""
    return _file_name(run, _machine(summary), _tf32(summary), _cuda_graph(config))


def record(
    spec: RunSpec,
    run_dir: Path,
    out: Path,
    company: float = 1.0,
    own_code: dict[str, str] | None = None,
) -> Measurement:
    """Write the measurement of the finished run in ``run_dir``, which shared its GPU with
    ``company - 1`` other runs on average, and whose rule or pathway of one's own has the
    digests ``own_code`` (:func:`brainprop.owncode.digests`); returns it.

    What it writes passes :func:`load_measurements`'s checks of a file first (its settings
    against the preset's row were checked with the run directory, before anything trained): a
    finished run directory that is damaged or edited is refused here, naming it, instead of
    by the report after the other runs have trained."""
    afresh = f"move {run_dir} out of {run_dir.parent} to train that run afresh"
    # Its last.pt closes the run again, writing the summary anew, as a kill before it leaves.
    summary = rundir.read_json(
        run_dir / rundir.SUMMARY, "delete it, and the same command closes the run again"
    )
    config = rundir.read_json(run_dir / rundir.CONFIG, afresh)
    history_file = run_dir / rundir.HISTORY_JSON
    history = rundir.read_json(history_file, afresh) if history_file.is_file() else []
    try:
        if not isinstance(summary, dict) or not isinstance(config, dict):
            raise ValueError(f"its {rundir.SUMMARY} or {rundir.CONFIG} holds no object")
        # Rounded before the count is taken from it, as a file's reader takes it: 1.4996
        # would be 1 run at once beside a mean of 1.5.
        company = round(company, 3)
        m = Measurement(
            spec.name, spec.cell, spec.rule, spec.seed, spec.val, spec.max_epochs,
            _machine(summary), summary, preset=spec.preset,
            stack=int(summary.get("stack_size", 1)),
            # Halves round up: a run beside another half its time shared the GPU.
            at_once=max(1, math.floor(company + 0.5)),
            bf16=bool(config.get("bf16", False)),
            cuda_graph=_cuda_graph(config), company=company,
            feedback=spec.feedback, own_code=own_code if _names_own(spec) else None,
        )  # fmt: skip
        # The curve lets a report plot or re-select epochs without the run directory.
        curve = {key: [_accuracy(row, key) for row in _rows(history)]
                 for key in ("val_acc", "test_acc")}  # fmt: skip
        content = _content(m, config, curve)
        _measurement(content, out / MEASUREMENTS / m.file_name)
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise BrainPropError(f"{run_dir} finished but cannot be recorded ({e}): {afresh}") from None
    return write_measurement(m, config, curve, out)


def _rows(history: Any) -> list[dict[str, Any]]:
    if not isinstance(history, list) or not all(isinstance(row, dict) for row in history):
        raise ValueError(f"its {rundir.HISTORY_JSON} is not a list of epochs")
    return history


def _accuracy(row: dict[str, Any], key: str) -> float:
    v = row.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 1:
        raise ValueError(f"its {rundir.HISTORY_JSON} holds {key} {v!r}, not an accuracy")
    return round(float(v), 5)


def sharing_label(machine: str, stack: int, at_once: int) -> str:
    """``machine`` and how its device was shared, e.g. ``"NVIDIA H200, 10 seeds
    stacked"``: a run's wall time compares only with that of runs shared alike."""
    shared = [f"{stack} seeds stacked"] * (stack > 1) + [f"{at_once} runs at once"] * (at_once > 1)
    return ", ".join([machine, *shared])


def write_measurement(
    m: Measurement, config: dict[str, Any], curve: dict[str, list[float]], out: Path
) -> Measurement:
    """Write ``m`` as ``out/measurements/`` and its :attr:`~Measurement.file_name`; returns it
    with its path."""
    folder = out / MEASUREMENTS
    make_folder(folder)
    atomic_write_json(folder / m.file_name, _content(m, config, curve))
    return replace(m, path=folder / m.file_name)


def _content(m: Measurement, config: dict[str, Any], curve: dict[str, list[float]]) -> dict:
    """A measurement file's JSON."""
    # Only where there is own code, so that a run of the library's code is written as before.
    own_code = {} if m.own_code is None else {"own_code": m.own_code}
    return {
        "format": MEASUREMENT_FORMAT,
        "run": m.run,
        "dataset": m.cell.dataset,
        "arch": m.cell.arch,
        "rule": m.rule,
        "seed": m.seed,
        "val": m.val,
        "max_epochs": m.max_epochs,
        "preset": m.preset,
        "machine": m.machine,
        "stack": m.stack,
        "runs_at_once": m.at_once,
        "runs_at_once_mean": m.company,
        "bf16": m.bf16,
        "cuda_graph": m.cuda_graph,
        "feedback": m.feedback,
        "summary": m.summary,
        "config": config,
        "curve": curve,
        **own_code,
    }


def load_measurements(out: Path) -> list[Measurement]:
    """Every measurement under ``out/measurements``, from any machine, sorted by file name.

    Two files of one run in one setup (a copy made while merging, say) are refused: the run
    would count twice in its cell.
    """
    folder = out / MEASUREMENTS
    # A merge by ``cp -r other/measurements results/measurements`` nests the folder, and its
    # runs would drop out of their cells without a word. Other subfolders (an archive of old
    # files, a notebook's checkpoints) are left unread, as they always were.
    nested = sorted((folder / MEASUREMENTS).glob("*.json"))
    if nested:
        raise BrainPropError(
            f"{nested[0]} lies in a folder under {folder}, where the report does not look: "
            f"move the files of {nested[0].parent} up into {folder}, or the folder out of it"
        )
    measurements = [_read_measurement(p) for p in sorted(folder.glob("*.json"))]
    seen: dict[tuple[str, str], Measurement] = {}
    for m in measurements:
        first = seen.setdefault((m.run, m.setup), m)
        if first is not m:
            raise BrainPropError(
                f"{first.path} and {m.path} both measure run {m.run} on {m.setup}: "
                "remove one of them"
            )
    return measurements


def _read_measurement(path: Path) -> Measurement:
    fix = "remove it or copy it again from the machine that made it"
    d = rundir.read_json(path, fix)
    if not isinstance(d, dict):
        raise BrainPropError(f"{path} is not a brainprop measurement (no JSON object): {fix}")
    written = d.get("format")
    # Another version's file is no damage that copying it again would mend.
    if (
        isinstance(written, str)
        and written.startswith("brainprop-measurement-")
        and written != MEASUREMENT_FORMAT
    ):
        raise BrainPropError(
            f"{path} is a measurement of format {written!r}, and this brainprop reads "
            f"{MEASUREMENT_FORMAT!r}: report it with the brainprop version that wrote it"
        )
    try:
        m = _measurement(d, path)
    except KeyError as e:
        # A bare KeyError reads "('max_epochs')".
        raise BrainPropError(
            f"{path} is not a brainprop measurement (no {e.args[0]!r} field): {fix}"
        ) from None
    except (TypeError, ValueError) as e:
        raise BrainPropError(f"{path} is not a brainprop measurement ({e}): {fix}") from None
    _check_settings(path, d, m)
    return m


def _measurement(d: Any, path: Path) -> Measurement:
    """The measurement the JSON ``d`` of the file at ``path`` holds; ValueError, KeyError or
    TypeError naming what is wrong with it."""
    if d["format"] != MEASUREMENT_FORMAT:
        raise ValueError(f"format {d['format']!r}")
    # A misspelt name would be reported as a cell of its own, beside the real one.
    for key, known in (("dataset", DATASET_NAMES), ("arch", tuple(ARCHITECTURES))):
        if d[key] not in known:
            raise ValueError(f"{key} {d[key]!r}, not one of {', '.join(known)}")
    # A rule of one's own need not be registered for its report (its runs measured it), so
    # only its name is checked: one that could not have named a run is no measurement's.
    if problem := OBJECTIVES.name_problem(d["rule"]):
        raise ValueError(f"rule {d['rule']!r}: {problem}")
    summary = d["summary"]
    check_summary(summary)
    # Files written before sharing was recorded hold runs that had the device alone.
    stack, at_once = _whole(d, "stack", 1, least=1), _whole(d, "runs_at_once", 1, least=1)
    m = Measurement(
        _text(d, "run"), Cell(d["dataset"], d["arch"]), d["rule"],
        _whole(d, "seed", least=0), _opt_whole(d, "val"), _opt_whole(d, "max_epochs"),
        _machine_field(d), summary, path, _name(d, "preset", PAPER_PRESET), stack, at_once,
        _flag(d, "bf16"), _flag(d, "cuda_graph"), _company(d, at_once),
        # Files written before feedback was recorded hold runs of the paper's.
        _name(d, "feedback", PAPER_FEEDBACK), _own_code(d),
    )  # fmt: skip
    # The machine names the run's row: relabelled by hand, a run would count in another's.
    if "device" in summary and summary["device"] != m.machine:
        raise ValueError(
            f"machine {m.machine!r}, but its summary's device is {summary['device']!r}"
        )
    # The report groups by the fields and counts runs by name: a file whose two disagree
    # (edited by hand, or merged under another name) would count a seed twice.
    spec = RunSpec(m.cell, m.rule, m.seed, m.val, m.max_epochs, m.preset, m.bf16, m.feedback)
    if m.run != spec.name:
        raise ValueError(f"run {m.run!r}, but its fields make it {spec.name!r}")
    _check_config(d.get("config"), spec)
    return m


def _check_config(config: Any, spec: RunSpec) -> None:
    """Refuse a stored run config (absent from the earliest files) that names another run than
    the fields of its file, ``spec``."""
    if isinstance(config, dict) and (other := spec.differs_from(config)):
        key, stored, own = other
        raise ValueError(f"its config's {key} is {stored!r}, its own {own!r}")


def _check_settings(path: Path, d: dict[str, Any], m: Measurement) -> None:
    """Refuse a run whose recorded hyperparameters are not its preset's row as this version has
    it: the report pools and describes rows by preset name, so a run of an older table would
    pass for one of the new. A preset or row this version lacks is described as such instead."""
    config = d.get("config")
    if isinstance(config, dict) and (change := changed_setting(config, m.preset, m.cell)):
        raise BrainPropError(
            f"{path} {change}: move it out of {MEASUREMENTS}/, or give the settings it ran "
            "with a preset of their own in brainprop.presets"
        )


def changed_setting(config: dict[str, Any], preset: str, cell: Cell) -> str | None:
    """How a run's stored ``config`` departs from ``preset``'s row for ``cell`` as this version
    has it ("ran with lr 0.05, but preset 'paper' now has 0.1"); None where it does not, or
    where this version has no such row."""
    row = table_row(preset, cell.dataset, cell.arch)
    if row is None:
        return None
    for field in dataclasses.fields(row):
        if field.name not in config:
            continue
        ran, now = config[field.name], getattr(row, field.name)
        if field.name == "dropout" and isinstance(ran, list):
            ran = tuple(ran)
        if ran != now:
            return f"ran with {field.name} {ran!r}, but preset {preset!r} now has {now!r}"
    return None


def _text(d: dict[str, Any], key: str, default: str | None = None) -> str:
    """``d[key]`` (``default`` where absent) if it is a string that says something; ``str()``
    would make a machine of null."""
    v = d[key] if default is None else d.get(key, default)
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"{key} {v!r}, not a name")
    return v


#: What no machine name holds and a report's table or README cannot: a line break or another
#: control character would end a row, a '|' add a column, '<' or '>' make an HTML comment such
#: as the README's results markers.
_NOT_IN_A_MACHINE = re.compile(r"[\x00-\x1f\x7f|<>]")


def _machine_field(d: dict[str, Any]) -> str:
    """``d["machine"]`` if it is a name :func:`~brainprop.devices.device_name` could give."""
    v = _text(d, "machine")
    if bad := _NOT_IN_A_MACHINE.search(v):
        raise ValueError(f"machine {v!r} holds {bad.group()!r}, which no machine's name does")
    return v


def _name(d: dict[str, Any], key: str, default: str) -> str:
    """``d[key]`` (``default`` where absent) if it could name a preset or feedback pathway: it
    is part of the run's name, and of the report's tables."""
    v = _text(d, key, default)
    if not NAME.fullmatch(v):
        raise ValueError(f"{key} {v!r}, not a name (letters, digits and . _ + -)")
    return v


def _flag(d: dict[str, Any], key: str) -> bool:
    """``d[key]`` if it is a bool; absent (files of earlier versions) is False."""
    v = d.get(key, False)
    if not isinstance(v, bool):
        raise ValueError(f"{key} {v!r}, not true or false")
    return v


def _whole(d: dict[str, Any], key: str, default: int | None = None, *, least: int = 1) -> int:
    """``d[key]`` (``default`` where absent) if it is a whole number of at least ``least``; a
    float such as 1e400 or 1.7 is no seed or epoch count, and ``int()`` would overflow or
    truncate it. One above :data:`~brainprop.summary.LARGEST` would overflow the report's
    arithmetic, or print its hundreds of digits in a machine's label."""
    v = d[key] if default is None else d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{key} {v!r}, not a whole number")
    if v < least:
        raise ValueError(f"{key} {v}, below {least}")
    if v > LARGEST:
        raise ValueError(f"{key} above {LARGEST}")
    return v


def _company(d: dict[str, Any], at_once: int) -> float | None:
    """``runs_at_once_mean``: absent or null in files of earlier versions. It divides the run's
    seconds, so it must be what :func:`record` writes beside ``at_once`` (runs_at_once): that,
    rounded."""
    v = d.get("runs_at_once_mean")
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not 1 <= v < math.inf:
        raise ValueError(f"runs_at_once_mean {v!r}, not a number of at least 1")
    if v > LARGEST:
        # No count of runs is that large, and an integer beyond a float's range would
        # overflow the rounding below.
        raise ValueError(f"runs_at_once_mean above {LARGEST}")
    if max(1, math.floor(v + 0.5)) != at_once:
        raise ValueError(f"runs_at_once_mean {v!r}, but runs_at_once {at_once}")
    return float(v)


#: What :func:`brainprop.owncode.digests` names, and what it gives.
_OWN_CODE_NAME, _DIGEST = re.compile(r"(rule|feedback) '.+'"), re.compile(r"[0-9a-f]{16}")


def _names_own(spec: RunSpec) -> bool:
    """Whether ``spec`` names a rule or pathway of one's own, whose code its measurement
    records: even where that is the library's (``functools.partial(BrainProp)``), or a later
    change to code of one's own under that name would go unseen."""
    return spec.rule not in OBJECTIVES.builtin or spec.feedback not in FEEDBACK_MODES


def _own_code(d: dict[str, Any]) -> dict[str, str] | None:
    """``d["own_code"]`` (absent: None) if it holds digests of a rule's or pathway's code."""
    if "own_code" not in d:
        return None
    v = d["own_code"]
    if not isinstance(v, dict) or not all(map(_is_digest, v.items())):
        raise ValueError(f"own_code {v!r}, not digests of a rule's or pathway's code")
    return v


def _is_digest(item: tuple[Any, Any]) -> bool:
    what, digest = item
    return (
        isinstance(what, str) and bool(_OWN_CODE_NAME.fullmatch(what))
        and isinstance(digest, str) and bool(_DIGEST.fullmatch(digest))
    )  # fmt: skip


def _opt_whole(d: dict[str, Any], key: str) -> int | None:
    return None if d[key] is None else _whole(d, key)
