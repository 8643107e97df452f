"""The report: measurements aggregated per cell, BrainProp beside EBP and the published numbers.

:func:`aggregate` groups measurements by cell, validation, epoch cap, hyperparameter preset,
feedback pathway and numerics: the machine and its precision (numbers from different machines,
precisions, caps or settings are never pooled, so each number carries the machine it was
measured on) and computes per rule the mean (sd) over seeds. Runs replayed from a CUDA graph
pool with plain ones, as they replay the step a plain run takes (not yet confirmed on a GPU by
one seed's accuracy curve: ``benchmarks/gpu_check.sh``, step 4); their seconds are shown apart.
:func:`write_report` writes ``results.md``, ``results.json`` and ``results.png``;
:func:`update_readme` puts a summary between the README's ``<!-- results:start -->`` and
``<!-- results:end -->`` markers.

A rule of one's own (``reproduce --rules mine,ebp``) gets rows of its own, marked with its
name, in which it stands where BrainProp does: compared with the EBP runs of the same group
and held to the same claims and published numbers, to see how it fares against them.

The paper's claims checked per cell:

- accuracy: BrainProp equals EBP within noise: Welch's t-test of the two means at 95 %, i.e.
  |gap| <= t(0.975, Welch's degrees of freedom) x the standard error of the difference (needs
  2+ seeds per rule, none diverged; with the paper's 10 seeds that t is 2.1 to 2.3, with 2 or
  3 it is 2.8 to 12.7). A pass says the test found no gap, not that there is
  none: with few seeds only a large one counts, and each row's limit is shown beside it;
- speed: BrainProp needs 1 to 3.5 times EBP's epochs, compared on epochs to the best
  validation accuracy: the 95 % interval of the ratio of the means (:func:`ratio_interval`)
  must reach into 1 to 3.5 (needs 2+ seeds per rule). As with the gap, a pass says the runs do
  not contradict the claim; with few seeds the interval is wide;
- the goal of the reproduction: BrainProp within the published mean +- 2 published sd; a
  run that diverged counts with the best it reached, and one that diverged in its first epoch,
  which reached nothing, makes it a no.

Verdicts compare the numbers as printed (two decimals; an epoch ratio below 0.1, two
significant figures), so that a reader can check each from the table and none contradicts the
figures beside it.

A row with an epoch cap other than the paper's 500 (``--max-epochs``) in which any run stopped
at that cap rather than by early stopping, or one above 500 in which any run found its best
after epoch 500, gets no verdict on the paper; its numbers are still shown.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import re
import textwrap
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, localcontext
from pathlib import Path
from statistics import fmean, stdev
from typing import Any

from . import studentt
from .data.catalog import CATALOG
from .errors import BrainPropError
from .files import atomic_write, atomic_write_json, atomic_write_text, make_folder
from .matrix import (
    MATRIX,
    PAPER_EPOCHS,
    PAPER_FEEDBACK,
    PUBLISHED,
    PUBLISHED_SOURCE,
    RULE_ORDER,
    Cell,
    Published,
    rule_rank,
)
from .measurements import MEASUREMENTS, Measurement, load_measurements
from .presets import PAPER_PRESET, Hyperparameters, table_row
from .summary import DIVERGED, EARLY_STOPPING, MAX_EPOCHS, epochs_phrase

RESULTS_MD, RESULTS_JSON, RESULTS_PNG = "results.md", "results.json", "results.png"
README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"
#: The paper: BrainProp takes 1 to 3.5 times EBP's epochs.
CLAIMED_RATIO = (1.0, 3.5)

#: How the report names the rules; one of one's own goes by its registered name.
RULE_NAMES = {"brainprop": "BrainProp", "ebp": "EBP"}
#: The paper's rule, and the one it and every other rule is compared with.
PAPER_RULE, BASELINE = RULE_ORDER


def rule_name(rule: str) -> str:
    """``rule`` as the report names it."""
    return RULE_NAMES.get(rule, rule)


#: A run that early-stopped with its best validation accuracy at most this many times a
#: uniform guess's (1 / classes) learned nothing, e.g. a network whose ReLUs all died in its
#: first steps. The factor clears a constant guess of the most common class on every dataset
#: of the catalog (MNIST's digit 1 is 11.35 % of its test set, under 1.5 x 10 %) and lies below
#: anything that learned for an epoch, if not by much: MNIST dense at the paper's slow settings
#: has 16.8 % after one, and much more before early stopping could end it (45 epochs on).
CHANCE_FACTOR = 1.5


def did_not_learn(m: Measurement) -> bool:
    """Whether ``m`` stopped because it stopped improving while its best was still at chance
    (see :data:`CHANCE_FACTOR`). Only early stopping counts: a run at a ``--max-epochs`` cap
    may have been stopped before it could learn, and a divergence counts as diverged, not as
    this."""
    official = CATALOG.get(m.cell.dataset)
    if official is None or m.summary.get("stop_reason") != EARLY_STOPPING:
        return False
    return m.summary["best_val_acc"] <= CHANCE_FACTOR / official.format.classes


def _diverged(m: Measurement) -> bool:
    return m.summary.get("stop_reason", "").startswith(DIVERGED)


@dataclass(frozen=True)
class Stat:
    """Mean and sample sd (None for one value) over ``n`` seeds."""

    mean: float
    sd: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat | None:
        if not values:
            return None
        return cls(fmean(values), stdev(values) if len(values) > 1 else None, len(values))

    def text(self, digits: int = 2) -> str:
        if self.sd is None:
            return fixed(self.mean, digits)
        return f"{fixed(self.mean, digits)} ({fixed(self.sd, digits)})"


@dataclass(frozen=True)
class RuleStats:
    """One rule's runs in one group; accuracies in percent."""

    seeds: tuple[int, ...]
    best_val_acc: Stat | None
    test_acc: Stat | None
    epochs_to_best: Stat | None
    epochs_to_stop: Stat | None
    #: Seconds per epoch of the runs stepped one by one, and of those replayed from a CUDA
    #: graph: two kinds, never averaged together.
    s_per_epoch: Stat | None
    total_seconds: float
    stop_reasons: dict[str, int]
    graph_s_per_epoch: Stat | None = None
    #: How many runs in the accuracies diverged: they finished an epoch, then broke.
    cut_short: int = 0
    #: How many runs in the accuracies did not learn (:func:`did_not_learn`).
    unlearned: int = 0

    def s_per_epoch_text(self) -> str:
        """E.g. ``"1.2"``, ``"0.5 (graph)"`` or ``"1.2; 0.5 (graph)"``."""
        parts = [_stat(self.s_per_epoch, 1)] * (self.s_per_epoch is not None)
        parts += [f"{_stat(self.graph_s_per_epoch, 1)} (graph)"] * (
            self.graph_s_per_epoch is not None
        )
        return "; ".join(parts) or "–"

    @property
    def diverged(self) -> int:
        """How many of the runs ended on a NaN or inf loss or weight."""
        return sum(n for why, n in self.stop_reasons.items() if why.startswith(DIVERGED))

    def failures(self) -> list[str]:
        """E.g. ``["2 of 4 diverged", "1 of 4 did not learn"]``; empty where no run failed."""
        n = len(self.seeds)
        return [
            f"{k} of {n} {what}"
            for k, what in ((self.diverged, "diverged"), (self.unlearned, "did not learn"))
            if k
        ]

    def accuracy_text(self, stat: Stat | None) -> str:
        """``stat`` (one of the accuracies), with how many runs failed where any did, and how
        many it is over where fewer than ran: a run that broke in its first epoch has no
        accuracy, one that broke later its best before it."""
        if stat is None and self.diverged:
            return f"diverged ({self.diverged} of {len(self.seeds)})"
        over = f" over {stat.n}" if stat is not None and stat.n < len(self.seeds) else ""
        return ", ".join([_stat(stat) + over, *self.failures()])

    def epochs_text(self, stat: Stat | None) -> str:
        """``stat`` (one of the epoch counts), saying which failed runs it leaves out."""
        if not self.failures():
            return _stat(stat, 1)
        left_out = f"{', '.join(self.failures())}, not counted"
        return left_out if stat is None else f"{_stat(stat, 1)}, {left_out}"

    def duration_text(self) -> str:
        """Total time, or "–" when no run finished an epoch (it would read as 0 s)."""
        return "–" if self.test_acc is None else _duration(self.total_seconds)


@dataclass(frozen=True)
class Verdict:
    """Whether a claim holds: True, False, or None; ``why``: the reason it cannot be told, or
    one a bare yes or no beside the figures would not show."""

    agrees: bool | None
    why: str = ""

    def text(self) -> str:
        if self.agrees is None:
            return f"– ({self.why})"
        word = "yes" if self.agrees else "no"
        return f"{word} ({self.why})" if self.why else word


@dataclass(frozen=True)
class CellResult:
    """One cell under one validation, epoch cap, preset, feedback pathway and machine: a rule
    (``rule``: BrainProp, or one of one's own), EBP, and the comparisons. ``machine`` is the runs'
    :attr:`~brainprop.measurements.Measurement.numerics`: the machine, and bf16 (``bf16``) or
    TF32 where they computed in it. ``cuda_graph`` says whether any of them replayed their steps
    from a CUDA graph, and ``graphed`` how many.

    ``gap`` is ``rule`` - EBP test accuracy (percentage points), ``gap_noise`` the largest
    gap Welch's t-test at 95 % calls noise (:func:`welch_limit`), ``ratio`` ``rule``'s / EBP's
    mean epochs to the best, ``ratio_interval`` its 95 % interval (:func:`ratio_interval`).
    """

    cell: Cell
    val: int | None
    max_epochs: int | None
    machine: str
    rules: dict[str, RuleStats]
    gap: float | None
    gap_noise: float | None
    gap_verdict: Verdict
    ratio: float | None
    ratio_interval: tuple[float, float] | None
    ratio_verdict: Verdict
    published: Published | None
    published_verdict: Verdict
    preset: str = PAPER_PRESET
    #: The runs' feedback pathway (the paper's: the exact transpose, ``symmetric``).
    feedback: str = PAPER_FEEDBACK
    #: How many of the runs shared the device, and how; empty when none did.
    sharing: str = ""
    #: Whether the runs trained under bf16 autocast instead of the paper's fp32.
    bf16: bool = False
    #: Whether any of the runs replayed their steps from a CUDA graph.
    cuda_graph: bool = False
    #: How many of the runs did, e.g. "2 runs from a CUDA graph"; empty when none did.
    graphed: str = ""
    #: The rule compared with EBP: the paper's BrainProp, or one of one's own.
    rule: str = PAPER_RULE
    #: Whether the runs' GPU computed any op in TF32 (``machine`` names which).
    tf32: bool = False
    #: Whether any run found its best after the paper's 500 epochs (under a higher cap).
    beyond_paper: bool = False
    #: How many runs were measured more than once, each counted once; empty when none was.
    twice: str = ""

    @property
    def machine_text(self) -> str:
        """The machine, and how its runs shared it and stepped where any did not plainly."""
        notes = "; ".join(n for n in (self.sharing, self.graphed, self.twice) if n)
        return self.machine if not notes else f"{self.machine} ({notes})"

    @property
    def label(self) -> str:
        """The cell, and the rule, preset and feedback pathway where they are not the paper's."""
        marks = [f"rule {self.rule}"] * (self.rule != PAPER_RULE)
        marks += [f"{self.preset} settings"] * (self.preset != PAPER_PRESET)
        marks += [f"{self.feedback} feedback"] * (self.feedback != PAPER_FEEDBACK)
        return ", ".join([self.cell.label, *marks])


def rule_stats(runs: Sequence[Measurement]) -> RuleStats:
    """Mean (sd) over the seeds in ``runs`` (one rule of one group, one measurement per run).
    Seconds are device time per run: a run that shared the device counts its share (a stack's
    share is in its summary already; runs packed onto one GPU divide theirs here)."""
    # Runs that finished no epoch are counted as diverged, not as runs of length 0.
    done = [m for m in runs if "best_val_acc" in m.summary]
    # A divergence also cuts a run's epochs short: they say when it broke, not how long it
    # took to learn, so the epoch counts (and the epoch-ratio claim) leave such runs out, as
    # they do runs that never learned. Their accuracies stay: the best epoch before the
    # overflow is what early stopping keeps, and chance is what a run that learned nothing
    # scores.
    cut = [m for m in done if _diverged(m)]
    unlearned = [m for m in done if did_not_learn(m)]
    whole = [m for m in done if not _diverged(m) and not did_not_learn(m)]

    def s_per_epoch(graphed: bool) -> Stat | None:
        return Stat.of(
            [m.summary["s_per_epoch"] * m.device_share for m in done if m.cuda_graph == graphed]
        )

    return RuleStats(
        seeds=tuple(sorted(m.seed for m in runs)),
        best_val_acc=Stat.of([100 * m.summary["best_val_acc"] for m in done]),
        test_acc=Stat.of([100 * m.summary["test_acc_at_best"] for m in done]),
        epochs_to_best=Stat.of([m.summary["best_epoch"] for m in whole]),
        epochs_to_stop=Stat.of([m.summary["epochs_run"] for m in whole]),
        s_per_epoch=s_per_epoch(graphed=False),
        total_seconds=sum(m.summary.get("total_seconds", 0.0) * m.device_share for m in done),
        stop_reasons=dict(Counter(m.summary.get("stop_reason", "?") for m in runs)),
        graph_s_per_epoch=s_per_epoch(graphed=True),
        cut_short=len(cut),
        unlearned=len(unlearned),
    )


def compare(
    cell: Cell,
    val: int | None,
    max_epochs: int | None,
    machine: str,
    runs: Sequence[Measurement],
    preset: str = PAPER_PRESET,
    feedback: str = PAPER_FEEDBACK,
    rule: str = PAPER_RULE,
) -> CellResult:
    """Aggregate the runs of ``rule`` and EBP among one group's ``runs`` (all with ``preset``'s
    hyperparameters and ``feedback``'s pathway, and ``max_epochs`` as :func:`_group` keys it)
    and judge the paper's claims on them, ``rule`` standing where BrainProp does. Runs with
    other settings are still held to the published number: finding settings that reach it is
    what they are for, and how far another pathway or rule falls short of it is what it is run
    for. A run measured twice counts once (:func:`_once_per_run`)."""
    measured = [m for m in runs if m.rule in (rule, BASELINE)]
    runs = _once_per_run(measured)
    rules = {
        r: rule_stats([m for m in runs if m.rule == r])
        for r in (rule, BASELINE)
        if any(m.rule == r for m in runs)
    }
    compared, ebp = rules.get(rule), rules.get(BASELINE)
    capped = max_epochs is not None and any(
        m.summary.get("stop_reason") == MAX_EPOCHS for m in runs
    )
    # The paper's runs stopped at 500 epochs: a best found after that is no run of theirs.
    beyond = any(m.summary.get("best_epoch", 0) > PAPER_EPOCHS for m in runs)
    no_verdict = (
        Verdict(None, f"capped at {epochs_phrase(max_epochs)}") if capped
        else Verdict(None, f"best after epoch {PAPER_EPOCHS}, the paper's limit") if beyond
        else None
    )  # fmt: skip

    unpaired = Verdict(None, "needs both rules")
    if compared and ebp and not (compared.test_acc and ebp.test_acc):
        gone = [rule_name(r) for r, s in ((rule, compared), (BASELINE, ebp)) if not s.test_acc]
        unpaired = Verdict(None, f"{' and '.join(gone)} finished no epoch")

    gap = noise = None
    gap_verdict = unpaired
    if compared and ebp and compared.test_acc and ebp.test_acc:
        a, b = compared.test_acc, ebp.test_acc
        gap = a.mean - b.mean
        noise = welch_limit(a, b)
        # A diverged run's accuracy is its best before the overflow: a run cut short, whose
        # spread would widen the limit as much as it shifts the mean. One that broke before
        # its first epoch's end has none, and leaving it out would judge the survivors alone.
        # A run at chance would widen the limit so far that any gap passed as noise.
        failed = _failed_runs(((rule, compared), (BASELINE, ebp)))
        if failed:
            gap_verdict = no_verdict or Verdict(None, failed)
        elif noise is None:
            gap_verdict = no_verdict or Verdict(None, "needs 2+ seeds per rule")
        elif noise == 0 and printed_gap(a, b) != 0:
            gap_verdict = no_verdict or Verdict(None, "every seed of each rule scored alike")
        else:
            shown = abs(printed_gap(a, b)) <= Decimal(fixed(noise, 2))
            gap_verdict = no_verdict or Verdict(shown)

    ratio = interval = None
    ratio_verdict = unpaired
    if compared and ebp and compared.test_acc and ebp.test_acc:
        pairs = ((rule, compared), (BASELINE, ebp))
        if not (compared.epochs_to_best and ebp.epochs_to_best):
            gone = [(r, s) for r, s in pairs if not s.epochs_to_best]
            names = " and ".join(rule_name(r) for r, _ in gone)
            how = _how_lost([s for _, s in gone])
            ratio_verdict = Verdict(None, f"every run of {names} {how}")
        else:
            ratio = compared.epochs_to_best.mean / ebp.epochs_to_best.mean
            interval = ratio_interval(compared.epochs_to_best, ebp.epochs_to_best)
            if interval is not None:
                low, high = (Decimal(_ratio_text(end)) for end in interval)
                claimed_low, claimed_high = (Decimal(f"{end}") for end in CLAIMED_RATIO)
                overlap = low <= claimed_high and high >= claimed_low
                ratio_verdict = no_verdict or Verdict(overlap)
                # As the gap's: no spread is no interval to judge a ratio outside the claim by.
                if interval[0] == interval[1] and not overlap:
                    alike = "every seed of each rule took as many epochs"
                    ratio_verdict = no_verdict or Verdict(None, alike)
            else:
                how = _how_lost([compared, ebp])
                whole = f", not counting runs that {how}" if how else ""
                ratio_verdict = no_verdict or Verdict(None, f"needs 2+ seeds per rule{whole}")

    published = PUBLISHED.get(cell)
    published_verdict = Verdict(None, "no published number")
    if published is not None:
        finished = compared.test_acc.n if compared and compared.test_acc else 0
        if compared is None:
            published_verdict = Verdict(None, f"no {rule_name(rule)} run")
        elif finished < len(compared.seeds):
            # A run that broke in its first epoch reached nothing: under the published code its
            # NaN weights would have scored near chance, and its seed's number sunk the mean.
            broke = len(compared.seeds) - finished
            why = f"{broke} {rule_name(rule)} run{'s' * (broke > 1)} diverged in the first epoch"
            published_verdict = no_verdict or Verdict(False, why)
        else:
            shown = Decimal(fixed(compared.test_acc.mean, 2)) - Decimal(f"{published.accuracy}")
            within = abs(shown) <= 2 * Decimal(f"{published.accuracy_sd}")
            published_verdict = no_verdict or Verdict(within)
    return CellResult(
        cell, val, max_epochs, machine, rules, gap, noise, gap_verdict, ratio, interval,
        ratio_verdict,
        published, published_verdict, preset, feedback, _sharing(runs),
        any(m.bf16 for m in runs), any(m.cuda_graph for m in runs), _graphed(runs), rule,
        any(m.tf32 for m in runs), beyond, _twice(measured, runs),
    )  # fmt: skip


def _failed_runs(pairs: Sequence[tuple[str, RuleStats]]) -> str:
    """E.g. "1 BrainProp run and 2 EBP runs diverged; 1 EBP run did not learn": the runs of
    each rule that failed, by how; empty where none did."""
    parts = []
    for how, field in (("diverged", "diverged"), ("did not learn", "unlearned")):
        counts = [(r, getattr(s, field)) for r, s in pairs]
        runs = [f"{n} {rule_name(r)} run{'s' * (n > 1)}" for r, n in counts if n]
        parts += [f"{' and '.join(runs)} {how}"] * bool(runs)
    return "; ".join(parts)


def _how_lost(stats: Sequence[RuleStats]) -> str:
    """How runs of ``stats`` left the epoch counts: "diverged", "did not learn", or both."""
    diverged = any(s.diverged for s in stats)
    unlearned = any(s.unlearned for s in stats)
    return " or ".join(["diverged"] * diverged + ["did not learn"] * unlearned)


def _sharing(runs: Sequence[Measurement]) -> str:
    """E.g. "2 runs stacked by 2, 8 runs stacked by 4": the runs that shared their device."""
    counts = Counter((m.stack, m.at_once) for m in runs if m.shared_by > 1)
    parts = []
    for (stack, at_once), n in sorted(counts.items()):
        how = [f"stacked by {stack}"] * (stack > 1) + [f"{at_once} at once"] * (at_once > 1)
        parts.append(f"{n} run{'s' * (n > 1)} {' and '.join(how)}")
    # The tail of a --jobs queue: beside others for less than half its time, it rounds to 1 at
    # once, yet its seconds are divided by its mean company as any packed run's are.
    partly = sum(m.at_once == 1 and (m.company or 1) > 1 for m in runs)
    if partly:
        parts.append(f"{partly} run{'s' * (partly > 1)} beside others part of the time")
    return ", ".join(parts)


def _graphed(runs: Sequence[Measurement]) -> str:
    """E.g. "4 runs from a CUDA graph": the runs that replayed their steps from one."""
    n = sum(m.cuda_graph for m in runs)
    return f"{n} run{'s' * (n > 1)} from a CUDA graph" if n else ""


def _twice(measured: Sequence[Measurement], kept: Sequence[Measurement]) -> str:
    """E.g. "1 run measured twice, 1 file left out", of ``measured`` with each run once,
    ``kept``: so that two files of one run that disagree (a plain and a graphed measurement of
    one seed, merged from two sessions) are seen, where the report shows one of them."""
    runs = sum(n > 1 for n in Counter((m.rule, m.seed) for m in measured).values())
    files = len(measured) - len(kept)
    if not runs:
        return ""
    how = "twice" if files == runs else "more than once"
    return f"{runs} run{'s' * (runs > 1)} measured {how}, {files} file{'s' * (files > 1)} left out"


def welch_limit(a: Stat, b: Stat) -> float | None:
    """The largest difference of the means of ``a`` and ``b`` that Welch's two-sided t-test at
    95 % calls noise: t(0.975, Welch-Satterthwaite degrees of freedom) x the standard error of
    the difference. None below 2 values each; 0 when neither varies (no test is possible).

    With 2 or 3 seeds per rule a difference must be 2.8 to 12.7 standard errors before it
    counts, where a fixed 2 would call one pair of equal rules in 5 different (2 seeds per
    rule, equal spreads: 2 degrees of freedom), one in 9 (3 seeds: 4).
    """
    if a.sd is None or b.sd is None:
        return None
    return _welch_half_width(a.sd**2 / a.n, a.n, b.sd**2 / b.n, b.n)


def ratio_interval(a: Stat, b: Stat) -> tuple[float, float] | None:
    """The 95 % interval of ``a``'s mean / ``b``'s (positive means, such as epoch counts): the
    delta method on the log of the ratio, whose standard error is that of the difference of
    the logs of the means, with Welch's degrees of freedom. None below 2 values each.

    On the log scale the interval is symmetric, so a ratio of 2 with wide spreads reaches
    towards 0 and far above, never below 0 as one on the ratio itself would.
    """
    if a.sd is None or b.sd is None:
        return None
    ratio = a.mean / b.mean
    half = _welch_half_width((a.sd / a.mean) ** 2 / a.n, a.n, (b.sd / b.mean) ** 2 / b.n, b.n)
    return ratio * math.exp(-half), ratio * math.exp(half)


def _welch_half_width(va: float, na: int, vb: float, nb: int) -> float:
    """t(0.975, Welch-Satterthwaite degrees of freedom) x sqrt(va + vb), for the variances
    ``va`` and ``vb`` of two means of ``na`` and ``nb`` values; 0 when neither varies."""
    if va + vb == 0:
        return 0.0
    # In shares of the sum, which cannot underflow as va**2 can (a tiny accuracy written by
    # hand divided by zero, review).
    wa = va / (va + vb)
    df = 1 / (wa**2 / (na - 1) + (1 - wa) ** 2 / (nb - 1))
    return studentt.quantile(0.975, df) * math.sqrt(va + vb)


def printed_gap(a: Stat, b: Stat) -> Decimal:
    """``a``'s mean - ``b``'s as the report prints them (two decimals each), exact. Verdicts
    decide on it, and on limits as printed, so ties (common: accuracies are multiples of
    0.01 % and the published numbers have two decimals) count, and no verdict disagrees with
    the figures printed beside it, as one on the unrounded gap could by a hundredth."""
    return Decimal(fixed(a.mean, 2)) - Decimal(fixed(b.mean, 2))


_Key = tuple[Cell, int | None, int | None, str, str, str]


def _group(m: Measurement) -> _Key:
    """The report row ``m`` belongs to, as :func:`aggregate` groups (before splitting by rule).
    Its cap is None for the paper's own limit, left out or given as such (``RunSpec(...,
    max_epochs=500)``, a run named ``-e500``): the same runs, judged and shown as the paper's."""
    cap = None if m.max_epochs == PAPER_EPOCHS else m.max_epochs
    return (m.cell, m.val, cap, m.numerics, m.preset, m.feedback)


def aggregate(measurements: Sequence[Measurement]) -> list[CellResult]:
    """One :class:`CellResult` per (cell, validation, epoch cap, machine and precision, preset,
    feedback pathway) and rule compared with EBP (BrainProp's, then one per rule of one's own
    that ran there), in matrix order (test-set validation first, the paper's settings and
    feedback first, uncapped before capped)."""
    groups: dict[_Key, list[Measurement]] = defaultdict(list)
    for m in measurements:
        groups[_group(m)].append(m)

    def order(key: _Key) -> tuple[Any, ...]:
        cell, val, cap, machine, preset, feedback = key
        rank = MATRIX.index(cell) if cell in MATRIX else len(MATRIX)
        return (val or 0, rank, cell, preset != PAPER_PRESET, preset,
                feedback != PAPER_FEEDBACK, feedback, cap is not None, cap or 0,
                machine)  # fmt: skip

    def rules_of(runs: Sequence[Measurement]) -> list[str]:
        # A group of EBP runs alone is still reported, in BrainProp's row.
        rules = sorted({m.rule for m in runs} - {BASELINE}, key=lambda r: (rule_rank(r), r))
        return rules or [PAPER_RULE]

    return [
        compare(cell, val, cap, machine, groups[key], preset, feedback, rule)
        for key in sorted(groups, key=order)
        for cell, val, cap, machine, preset, feedback in [key]
        for rule in rules_of(groups[key])
    ]


def _once_per_run(runs: Sequence[Measurement]) -> list[Measurement]:
    """``runs`` (one group's) with each run once, so that no seed counts twice: a run measured
    both plainly and from a CUDA graph (files merged from two sessions) counts as its plain
    measurement, and one measured both uncapped and capped at the paper's 500 epochs (two
    names for one run, which its group pools) as its uncapped one."""
    # In one group a rule and a seed are one run: every other part of its name is the group's.
    kept: dict[tuple[str, int], Measurement] = {}
    for m in sorted(runs, key=lambda m: (m.cuda_graph, m.max_epochs is not None)):
        kept.setdefault((m.rule, m.seed), m)
    return [m for m in runs if kept[m.rule, m.seed] is m]


# --- writing -----------------------------------------------------------------------------------


def write_report(out: Path) -> Path:
    """Aggregate every measurement under ``out`` into results.md/json/png; returns results.md."""
    measurements = load_measurements(out)
    results = aggregate(measurements)
    make_folder(out)
    machines = sorted({m.numerics for m in measurements})
    atomic_write_json(out / RESULTS_JSON, to_json(results, len(measurements), machines))
    if results:
        png = plot(results)
        atomic_write(out / RESULTS_PNG, lambda f: f.write(png))
    else:
        (out / RESULTS_PNG).unlink(missing_ok=True)
    atomic_write_text(out / RESULTS_MD, markdown(results, len(measurements), machines))
    return out / RESULTS_MD


def digest(measurements: Sequence[Measurement], runs: set[str]) -> list[str]:
    """The report's accuracy rows that hold any of ``runs``, one line each, for the end of a
    terminal session: where the row was measured, each rule's test accuracy (%), the gap and
    the published figure, with their verdicts, all as the report has them (every seed of the
    row, whichever session measured it)."""
    rows = {_group(m) for m in measurements if m.run in runs}
    lines = []
    for r in aggregate([m for m in measurements if _group(m) in rows]):
        where = ["test set" if r.val is None else f"{r.val:,} held out"]
        where += [f"capped at {epochs_phrase(r.max_epochs)}"] * (r.max_epochs is not None)
        rules = "; ".join(
            f"{rule_name(rule)} {'no runs' if s is None else s.accuracy_text(s.test_acc)}"
            for rule in (r.rule, BASELINE)
            for s in [r.rules.get(rule)]
        )
        line = f"{r.label} ({'; '.join([*where, r.machine_text])}): {rules}; {_seeds(r)} seeds"
        if r.gap is not None:
            # The limit with it: with few seeds a "yes" only says no large gap was found.
            limit = "" if r.gap_noise is None else f" (95% limit {_num(r.gap_noise)})"
            line += f"; gap {_gap_text(r)} pp{limit}, ≈ 0: {r.gap_verdict.text()}"
        if r.published is not None:
            line += (
                f"; published {_published_acc(r.published)}, within 2 sd: "
                f"{r.published_verdict.text()}"
            )
        lines.append(line)
    return lines


def to_json(results: Sequence[CellResult], count: int, machines: Sequence[str]) -> dict[str, Any]:
    """The report as data: every group with its machine, stats, comparisons and verdicts."""
    return {
        "format": "brainprop-results-8",
        "measurements": count,
        "machines": list(machines),
        "claims": {
            "accuracy": "BrainProp test accuracy equals EBP's within noise: |gap| <= gap_noise "
            "(Welch's t-test, 95 %; both as printed, two decimals; no verdict where a run "
            "diverged or did not learn)",
            "epochs": "the 95 % interval (ratio_interval) of BrainProp/EBP epochs to the best "
            f"reaches into [{CLAIMED_RATIO[0]}, {CLAIMED_RATIO[1]}] (both as printed)",
            "published": "BrainProp test accuracy within published mean +- 2 sd (false where "
            "a BrainProp run diverged in its first epoch)",
        },
        "published_source": PUBLISHED_SOURCE,
        "published": {f"{c.dataset}/{c.arch}": dataclasses.asdict(p) for c, p in PUBLISHED.items()},
        "no_full_paper_run": [f"{c.dataset}/{c.arch}" for c in _no_full_paper_run(results)],
        "cells": [_tidy(dataclasses.asdict(r)) for r in results],
    }


def _tidy(value: Any) -> Any:
    """``value`` with every float to 12 significant digits: a difference of two means carries
    float noise in its last digits (-0.07500000000000284), far below any measured precision."""
    if isinstance(value, float):
        return float(f"{value:.12g}")
    if isinstance(value, dict):
        return {key: _tidy(v) for key, v in value.items()}
    if isinstance(value, list | tuple):
        return [_tidy(v) for v in value]
    return value


def _no_full_paper_run(results: Sequence[CellResult]) -> list[Cell]:
    """The matrix cells with no full-length fp32 run of the paper's preset, validated on the
    test set as the paper's were (see :func:`_full`): cut-short or diverged runs and other
    settings show that a cell runs, not what the paper's claims are about."""
    full = {
        r.cell
        for r in results
        if r.val is None
        and r.preset == PAPER_PRESET
        and r.feedback == PAPER_FEEDBACK
        and not (r.bf16 or r.tf32)
        and _full(r)
    }
    return [c for c in MATRIX if c not in full]


def _full(result: CellResult) -> bool:
    """Whether a BrainProp run of ``result`` ended as the paper's would: by early stopping, or
    at the paper's own epoch limit (not a ``--max-epochs`` cap, not a divergence), and no run
    found its best after that limit."""
    if result.beyond_paper:
        return False
    bp = result.rules.get(PAPER_RULE)
    ended = set() if bp is None else {why for why, n in bp.stop_reasons.items() if n}
    return EARLY_STOPPING in ended or (result.max_epochs is None and MAX_EPOCHS in ended)


def _no_full_paper_run_line(results: Sequence[CellResult]) -> list[str]:
    """'No full-length fp32 run of the paper's settings yet: ...', with those cells' published
    numbers, or nothing."""
    missing = []
    for cell in _no_full_paper_run(results):
        p = PUBLISHED.get(cell)
        if p is None:
            missing.append(cell.label)
        else:
            epochs = "" if p.epochs is None else f", {_published_epochs(p)} epochs"
            missing.append(f"{cell.label} (published {_published_acc(p)}{epochs})")
    if not missing:
        return []
    return ["", "No full-length fp32 run of the paper's settings yet: " + ", ".join(missing) + "."]


def _validation(val: int | None) -> str:
    if val is None:
        return "validated on the test set, as the paper"
    return f"validated on {val:,} held-out training images; test accuracy at the best-val epoch"


def _cap(max_epochs: int | None) -> str:
    return f"{PAPER_EPOCHS} (paper)" if max_epochs is None else str(max_epochs)


def _num(value: float | None) -> str:
    return "–" if value is None else fixed(value, 2)


def _ratio_text(value: float | None) -> str:
    """A ratio of epochs, or an end of its interval, both above 0: with two decimals, or where
    those would show 0.0x or less, two significant figures (0.0026, which 0.00 misstated)."""
    if value is None:
        return "–"
    digits = 2 if not 0 < value < 0.1 else min(9, 1 - math.floor(math.log10(value)))
    return fixed(value, digits)


def _interval(ends: tuple[float, float] | None) -> str:
    return "–" if ends is None else f"{_ratio_text(ends[0])}–{_ratio_text(ends[1])}"


def fixed(value: float, digits: int) -> str:
    """``value`` with ``digits`` decimals, a half rounded away from zero.

    Means of two seeds are often exact halves (98.145, of 98.14 and 98.15), which a binary
    float holds a hair above or below, so that rounded as stored they went either way. Rounded
    first to 9 decimals, far below any accuracy's resolution (0.01 %), the float is the half
    it stands for.
    """
    if not math.isfinite(value):
        return str(value)
    with localcontext() as exact:
        exact.prec = 400  # every digit of any finite float's 9-decimal form (1e308 has 309)
        rounded = Decimal(f"{value:.9f}").quantize(Decimal(1).scaleb(-digits), ROUND_HALF_UP)
    return format(rounded, "f")


def _gap_text(result: CellResult) -> str:
    """The gap as the difference of the two means printed beside it: rounded on its own, a gap
    of exact halves (69.625 - 70.22 = -0.595) rounds the other way than its mean (-0.60,
    where 69.63 - 70.22 = -0.59)."""
    bp, ebp = result.rules.get(result.rule), result.rules.get(BASELINE)
    if result.gap is None or bp is None or ebp is None or not (bp.test_acc and ebp.test_acc):
        return "–"
    return format(printed_gap(bp.test_acc, ebp.test_acc), "+f")


def _stat(stat: Stat | None, digits: int = 2) -> str:
    return "–" if stat is None else stat.text(digits)


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s"


def _pair(result: CellResult, text: Callable[[RuleStats], str]) -> list[str]:
    """The compared rule's and EBP's ``text``; "–" for a rule without runs."""
    return ["–" if (s := result.rules.get(r)) is None else text(s) for r in (result.rule, BASELINE)]


def _seeds(result: CellResult) -> str:
    return " / ".join(
        str(len(s.seeds)) if (s := result.rules.get(r)) else "0" for r in (result.rule, BASELINE)
    )


def _published_acc(p: Published | None) -> str:
    return "–" if p is None else f"{p.accuracy:.2f} ({p.accuracy_sd:.2f})"


def _published_epochs(p: Published | None) -> str:
    if p is None or p.epochs is None:
        return "–"
    return f"{p.epochs:.0f} ({p.epochs_sd:.0f})"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def _settings_lines(results: Sequence[CellResult]) -> list[str]:
    """What each row run with settings other than the paper's used: its preset table's row,
    and what a feedback pathway other than the paper's means."""
    lines = _mark_lines(results)
    rows = sorted({(r.preset, r.cell) for r in results if r.preset != PAPER_PRESET})
    if not rows:
        return lines
    lines += ["", "Rows marked with a preset's settings use that table of `brainprop.presets` "
              "instead of the paper's:", ""]  # fmt: skip
    for preset, cell in rows:
        # A measurement merged from another version, or made with a table of one's own, may
        # name a preset this process lacks.
        hp = table_row(preset, cell.dataset, cell.arch)
        paper = table_row(PAPER_PRESET, cell.dataset, cell.arch)
        lines.append(f"- {cell.label}, {preset}: {_hp_text(hp)}; the paper's: {_hp_text(paper)}")
    return lines


def _mark_lines(results: Sequence[CellResult]) -> list[str]:
    """What a row marked with a rule of one's own or a feedback pathway means, where there is
    one."""
    lines = []
    if any(r.rule != PAPER_RULE for r in results):
        lines += ["", "Rows marked with a rule (`reproduce --rules`, a rule of one's own) show "
                  "that rule in BrainProp's columns, compared with the EBP runs of the same "
                  "cell, machine and settings (those of BrainProp's row, where there is one), "
                  "and held to BrainProp's claims and published numbers."]  # fmt: skip
    if any(r.feedback != PAPER_FEEDBACK for r in results):
        lines += ["", "Rows marked with a feedback pathway (`reproduce --feedback`; "
                  "docs/biology.md) sent the error down through that pathway instead of the "
                  "paper's exact transpose of the forward weights; the published numbers beside "
                  "them are the paper's, of that transpose."]  # fmt: skip
    return lines


def _hp_text(hp: Hyperparameters | None) -> str:
    if hp is None:
        return (
            "not in the tables this report knows (one of your own: rewrite it with 'brainprop "
            "--plugin MODULE reproduce --report-only')"
        )
    text = (f"lr {hp.lr:g} halved every {hp.lr_halving_epochs} epochs, batch {hp.batch_size}, "
            f"init sigma {hp.init_std:g}")  # fmt: skip
    if hp.l2:
        text += f", l2 {hp.l2:g}"
    if hp.dropout:
        text += f", dropout {', '.join(f'{d:g}' for d in hp.dropout)}"
    return text


def markdown(results: Sequence[CellResult], count: int, machines: Sequence[str]) -> str:
    """``results.md``: per validation variant, an accuracy table and an epochs/time table."""
    lines = [
        "# BrainProp vs EBP: measured results",
        "",
        f"Generated by `brainprop reproduce` from {count} measurement files in `measurements/` "
        f"(machines: {'; '.join(machines) or 'none yet'}). Do not edit by hand: merge "
        "measurement files from other machines into `measurements/` and run "
        "`brainprop reproduce --report-only`.",
        "",
        "Accuracies are test accuracy (%) at the epoch of best validation accuracy, mean (sd) "
        "over seeds; `seeds` counts BrainProp / EBP runs. Numbers from different machines, "
        "precisions or epoch caps are never pooled: each row is one machine label (a CPU's "
        "without its vector unit, such as AVX2, is from before labels named it, and may cover "
        "CPUs of more than one kind), marked bf16 where "
        "its runs trained under bf16 autocast (`reproduce --bf16`) instead of the paper's fp32, "
        "and TF32 convolutions (or matmuls) where a GPU computed those in TF32, PyTorch's "
        "default for convolutions (the paper's GPU had no TF32). "
        "Runs that replayed their steps from a CUDA graph (`reproduce --cuda-graph`) are "
        "pooled with the others, as they replay the step a plain run takes (not yet confirmed "
        "by comparing one seed's accuracy curve with `--eager`'s on a GPU: "
        "`benchmarks/gpu_check.sh`, step 4); the machine column says how many did, "
        "and their s/epoch, another kind of seconds, is shown apart, marked (graph); total time "
        "adds both kinds. A run measured both plainly and from a CUDA graph, or both uncapped "
        "and capped at 500 epochs (files merged from two sessions), counts once, as its plain, "
        "uncapped measurement; the machine column says how many runs were measured more than "
        "once. Runs that shared their device "
        "(seeds stacked in one network, or several runs at once on a GPU) are pooled with its "
        "other runs, and the machine column says how many did; their s/epoch and total time "
        "are device time per run, their wall time divided by how many runs shared the device. "
        "Seconds per epoch count the training steps alone; total time adds each epoch's "
        "evaluation. "
        "The paper claims that BrainProp's "
        "accuracy equals EBP's (checked by Welch's t-test at 95 %: |gap| at most the 95% limit, "
        "t at Welch's degrees of freedom times the standard error of the difference, both as "
        'printed; "gap ≈ 0?" yes says the test found no gap, which with few seeds only a '
        "large one makes; a row with a run that diverged, or that did not learn, gets no "
        "verdict) and that "
        f"BrainProp needs {CLAIMED_RATIO[0]:g} to {CLAIMED_RATIO[1]:g} times EBP's epochs "
        "(checked on epochs to the best: yes if the ratio's 95 % interval, by the delta method "
        "on its log with Welch's degrees of freedom, reaches into that range, so that with few "
        "seeds only a ratio far outside it makes a no). Epoch counts leave out runs that "
        "diverged, whose epochs end at the overflow, not by early stopping, and runs that did "
        "not learn: those that early-stopped with their best validation accuracy at most "
        f"{CHANCE_FACTOR:g} times a uniform guess's (1 / classes), whose best epoch says "
        "nothing about how fast the rule learns; their accuracies stay in the means. "
        "A row with an epoch cap other than the paper's 500 gets no verdict if any of its runs "
        "stopped at "
        "that cap instead of by early stopping, or (above 500) found its best after epoch 500. "
        '"Within 2 sd?" asks whether BrainProp\'s mean lies within the published mean +- 2 '
        "published sd, the goal of the reproduction; a run cut short by a divergence counts "
        "with the best it reached, which lowers the mean (out of that range, or into it from "
        "above), where in the gap test its spread would widen the limit, and a run that "
        "diverged in its first epoch reached "
        "nothing, which makes it a no (under the published code its NaN weights would have "
        "scored near chance). "
        f"Published numbers: {PUBLISHED_SOURCE}.",
    ]
    if not results:
        lines += ["", "No measurements yet."]
    lines += _settings_lines(results)
    for val in sorted({r.val for r in results}, key=lambda v: v or 0):
        rows = [r for r in results if r.val == val]
        acc_rows = []
        time_rows = []
        for r in rows:
            head = [r.label, r.machine_text, _cap(r.max_epochs), _seeds(r)]
            acc_rows.append([
                *head, *_pair(r, lambda s: s.accuracy_text(s.test_acc)), _gap_text(r),
                _num(r.gap_noise), r.gap_verdict.text(), _published_acc(r.published),
                r.published_verdict.text(), *_pair(r, lambda s: s.accuracy_text(s.best_val_acc)),
            ])  # fmt: skip
            time_rows.append([
                *head, *_pair(r, lambda s: s.epochs_text(s.epochs_to_best)), _ratio_text(r.ratio),
                _interval(r.ratio_interval), r.ratio_verdict.text(), _published_epochs(r.published),
                *_pair(r, lambda s: s.epochs_text(s.epochs_to_stop)),
                *_pair(r, lambda s: s.s_per_epoch_text()),
                " / ".join(_pair(r, lambda s: s.duration_text())),
            ])  # fmt: skip
        lines += ["", f"## {_validation(val).capitalize()}", ""]
        if val is not None:
            lines += [
                "The published numbers chose their epoch on the test set: the highest of the "
                "very accuracies reported. Chosen on held-out images, a test accuracy lands "
                'lower on average, so "within 2 sd?" is the stricter test in this section.',
                "",
            ]
        lines += ["### Accuracy", ""]
        lines += _table(
            ["cell", "machine", "epoch cap", "seeds", "BrainProp", "EBP", "gap (pp)",
             "95% limit", "gap ≈ 0?", "published BrainProp", "within 2 sd?",
             "best val BrainProp", "best val EBP"],
            acc_rows,
        )  # fmt: skip
        lines += ["", "### Epochs and time", ""]
        lines += _table(
            ["cell", "machine", "epoch cap", "seeds", "to best BrainProp", "to best EBP",
             "ratio", "95% interval", f"in [{CLAIMED_RATIO[0]:g}, {CLAIMED_RATIO[1]:g}]?",
             "published epochs",
             "to stop BrainProp", "to stop EBP", "s/epoch BrainProp", "s/epoch EBP",
             "total time BrainProp / EBP"],
            time_rows,
        )  # fmt: skip
    lines += _no_full_paper_run_line(results)
    if results:
        lines += ["", f"![BrainProp vs EBP]({RESULTS_PNG})"]
    return "\n".join(lines) + "\n"


def plot(results: Sequence[CellResult]) -> bytes:
    """A PNG: per validation variant, BrainProp and EBP test accuracy (sd bars) and the
    published number per group; below, the gap with its 95 % Welch limit, which the accuracy
    scale (up to 100 %) cannot show."""
    from matplotlib.figure import Figure

    variants = sorted({r.val for r in results}, key=lambda v: v or 0)
    fig = Figure(figsize=(max(6, 1.3 * len(results) + 2), 7.5 * len(variants)))
    axes = fig.subplots(2 * len(variants), 1, squeeze=False, height_ratios=[3, 2] * len(variants))[
        :, 0
    ]
    for acc_ax, gap_ax, val in zip(axes[::2], axes[1::2], variants, strict=True):
        rows = [r for r in results if r.val == val]
        own = any(r.rule != PAPER_RULE for r in rows)
        # The left bar is the row's compared rule: BrainProp, or the one its label names.
        paper_rule = rule_name(PAPER_RULE)
        bars = (
            (-0.2, None, f"{paper_rule} or the label's rule" if own else paper_rule, "tab:blue"),
            (0.2, BASELINE, rule_name(BASELINE), "tab:orange"),
        )
        for offset, which, label, color in bars:
            xs, means, sds = [], [], []
            for i, r in enumerate(rows):
                stats = r.rules.get(which or r.rule)
                if stats and stats.test_acc:
                    xs.append(i + offset)
                    means.append(stats.test_acc.mean)
                    sds.append(stats.test_acc.sd or 0.0)
            acc_ax.bar(xs, means, 0.4, yerr=sds, capsize=3, color=color, label=label)
        published = [(i, r.published) for i, r in enumerate(rows) if r.published]
        if published:
            acc_ax.errorbar(
                [i for i, _ in published], [p.accuracy for _, p in published],
                yerr=[2 * p.accuracy_sd for _, p in published], fmt="kD", capsize=4,
                label="published BrainProp (± 2 sd)",
            )  # fmt: skip
        acc_ax.set(ylabel="test accuracy (%)", ylim=(0, 100), title=_validation(val))
        acc_ax.set_xticks(range(len(rows)), [""] * len(rows))
        # Under the bars, not on them: a rule's low bar would sit where a legend inside goes.
        acc_ax.legend(
            loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=8, frameon=False
        )
        gap_ax.axhline(0, color="grey", linewidth=0.8)
        for i, r in enumerate(rows):
            # Only gaps the report judges: a capped row's or one seed's would set the scale.
            if r.gap is not None and r.gap_noise is not None and r.gap_verdict.agrees is not None:
                color = "k" if r.gap_verdict.agrees else "tab:red"
                gap_ax.errorbar(i, r.gap, yerr=r.gap_noise, capsize=4, fmt="o", color=color)
        gap_ax.set(
            xlim=acc_ax.get_xlim(),
            ylabel="gap (points)\n± 95 % Welch limit",
            title="BrainProp − EBP, rows with a verdict (red: a gap the test finds)",
        )
        gap_ax.set_xticks(
            range(len(rows)),
            [f"{r.label}\n{textwrap.fill(r.machine, 24)}\ncap {_cap(r.max_epochs)}" for r in rows],
            fontsize=7,
        )
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def readme_section(results: Sequence[CellResult], out: Path, readme: Path) -> str:
    """The results section of ``readme`` for the report in ``out``: one line per group, and a
    link to the full report."""
    source, link = (_from_readme(path, readme) for path in (out, out / RESULTS_MD))
    # The command as run from the README's folder; --out is left out where it is the default.
    given_out = "" if source == "results" else f" --out {source}"
    rows = [
        [
            r.label, "test set" if r.val is None else f"{r.val:,} held out", r.machine_text,
            _cap(r.max_epochs), _seeds(r), *_pair(r, lambda s: s.accuracy_text(s.test_acc)),
            _gap_text(r), r.gap_verdict.text(), _ratio_text(r.ratio),
            r.ratio_verdict.text(), _published_acc(r.published), r.published_verdict.text(),
        ]
        for r in results
    ]  # fmt: skip
    lines = [
        f"Generated from `{source}/` by `brainprop reproduce --report-only{given_out} --readme "
        f"{readme.name}`. "
        "Test accuracy (%) at the best-validation epoch, mean (sd) over seeds (BrainProp / EBP "
        "runs); gap = BrainProp − EBP in points; ratio = BrainProp / EBP epochs to the best; "
        'the paper claims gap ≈ 0 and a ratio of 1 to 3.5. "gap ≈ 0?" yes means Welch\'s '
        "t-test at 95 % found no gap, which with few seeds only a large one makes; "
        '"1–3.5?" yes means the ratio\'s 95 % interval reaches into 1 to 3.5 (the full report '
        "gives each row's limit and interval).",
        "",
        *_table(
            [
                "cell",
                "validation",
                "machine",
                "epoch cap",
                "seeds",
                "BrainProp",
                "EBP",
                "gap",
                "gap ≈ 0?",
                "epoch ratio",
                "1–3.5?",
                "published",
                "within 2 sd?",
            ],
            rows,
        ),  # fmt: skip
        "",
        f"Full report, timings and figure: [{link}]({link}).",
    ]
    lines += _mark_lines(results)
    lines += _no_full_paper_run_line(results)
    return "\n".join(lines)


def _from_readme(path: Path, readme: Path) -> str:
    """``path`` relative to ``readme``'s folder, as the README's links need it; absolute where
    no relative path leads there (another drive on Windows)."""
    try:
        return Path(os.path.relpath(path, readme.resolve().parent)).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def check_readme(readme: Path) -> None:
    """Raise :class:`BrainPropError` unless ``readme`` is UTF-8 text with the results markers:
    ``reproduce`` checks its ``--readme`` before the first run, not after the last."""
    _readme_text(readme)


def _readme_text(readme: Path) -> tuple[str, int, int]:
    """The text of ``readme``, line endings as they are, where its start marker starts, and
    where the line of its end marker starts."""
    try:
        # Decoded from bytes: read as text, CRLF line endings would come back as LF.
        text = readme.read_bytes().decode("utf-8")
    except OSError as e:
        raise BrainPropError(
            f"cannot read {readme} ({e.strerror or e}): pass the README's path to --readme"
        ) from None
    except UnicodeDecodeError as e:
        raise BrainPropError(
            f"{readme} is not UTF-8 text (byte {e.start} is 0x{e.object[e.start]:02x}): pass "
            "the README's path to --readme, or save the file as UTF-8"
        ) from None
    # A marker counts on a line of its own (indented or not): prose that names the markers
    # (how to regenerate the section) is no section, and rewriting from there would overwrite
    # the prose. The section runs from the start marker's end to the end marker's line.
    starts, ends = (
        list(re.finditer(rf"^[ \t]*({re.escape(marker)})[ \t]*\r?$", text, re.M))
        for marker in (README_START, README_END)
    )
    starts, ends = [m.start(1) for m in starts], [m.start() for m in ends]
    if not starts or not ends or ends[0] < starts[0]:
        raise BrainPropError(
            f"{readme} has no '{README_START}' ... '{README_END}' section: add the two markers, "
            "each on a line of its own, where the results belong"
        )
    if len(starts) > 1 or len(ends) > 1:
        raise BrainPropError(
            f"{readme} has {len(starts)} '{README_START}' and {len(ends)} '{README_END}' "
            "lines: keep one of each, around the results section"
        )
    return text, starts[0], ends[0]


def update_readme(readme: Path, out: Path) -> None:
    """Replace the text between the results markers of ``readme`` with :func:`readme_section`,
    leaving the rest of the file, its line endings and its permissions as they were."""
    text, start, end = _readme_text(readme)
    measurements = load_measurements(out)
    if not measurements:
        raise BrainPropError(
            f"no measurements in {out / MEASUREMENTS}, so {readme}'s results section was left as "
            "it is: pass the --out that holds them"
        )
    newline = _line_ending(text)
    section = readme_section(aggregate(measurements), out, readme).replace("\n", newline)
    new = text[: start + len(README_START)] + newline + section + newline + text[end:]
    # Through a link, not over it: a README linked to the real file stays linked to it.
    atomic_write_text(readme.resolve(), new, keep_mode=True)


def _line_ending(text: str) -> str:
    """The line ending of ``text``'s first line: CRLF or LF (LF for a file of one line)."""
    first = text.find("\n")
    return "\r\n" if first > 0 and text[first - 1] == "\r" else "\n"
