"""The paper's experiment matrix: its cells, and the runs that measure them.

A :class:`Cell` is one (dataset, architecture) entry of the paper's table; :data:`MATRIX` lists
them all, :data:`PUBLISHED` the published numbers and :data:`HEADLINE` their cells. A
:class:`RunSpec` is one run of a cell (a rule, a seed, how it is validated and capped, its
preset table, precision and feedback pathway), and :func:`plan` orders a request's runs by
priority. :mod:`brainprop.experiments`
runs them and :mod:`brainprop.measurements` keeps what they measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .data.registry import dataset_family
from .errors import BrainPropError
from .feedback import check_feedback
from .objectives import OBJECTIVES, RULES
from .plugins import did_you_mean
from .presets import PAPER_PRESET, PRESETS, preset_table
from .summary import LARGEST

#: The folder of the run directories under a results folder (local, not committed).
RUNS = "runs"
#: The paper's epoch budget (with early stopping); runs capped elsewhere carry ``-e<cap>``.
PAPER_EPOCHS = TrainConfig.epochs
#: The paper's feedback: the exact transpose of the forward weights. Runs through another
#: pathway carry ``-fb-<mode>``.
PAPER_FEEDBACK = TrainConfig.feedback
#: The paper's protocol beyond the preset table, which no matrix run varies: exploration,
#: early stopping, and stopping (not rewinding at a halved rate) on a NaN.
PAPER_PROTOCOL = {
    key: getattr(TrainConfig, key) for key in ("epsilon", "patience", "min_delta", "on_nan")
}
#: The rules in the order runs are planned and reported: BrainProp, then its baseline. Rules of
#: one's own (``OBJECTIVES``) come after them, each compared with EBP as BrainProp is.
RULE_ORDER = RULES
#: The most seeds a request may ask for: a hundred times the paper's ten. Far more is a slip
#: of the keyboard, and a plan of millions of runs would fill the memory before its first line.
MAX_SEEDS = 1000
DISPLAY = {
    "mnist": "MNIST",
    "cifar10": "CIFAR-10",
    "cifar100": "CIFAR-100",
    "tiny-imagenet": "Tiny ImageNet",
}


@dataclass(frozen=True, order=True)
class Cell:
    """One (dataset, architecture) entry of the paper's table."""

    dataset: str
    arch: str

    @property
    def label(self) -> str:
        return f"{DISPLAY.get(self.dataset, self.dataset)} {self.arch}"


#: The paper's matrix, in the paper's order.
MATRIX: tuple[Cell, ...] = (
    Cell("mnist", "dense"),
    Cell("mnist", "loccon"),
    Cell("mnist", "conv"),
    Cell("cifar10", "loccon"),
    Cell("cifar10", "conv"),
    Cell("cifar10", "deep"),
    Cell("cifar100", "loccon"),
    Cell("cifar100", "conv"),
    Cell("cifar100", "deep"),
    Cell("tiny-imagenet", "deep"),
)


@dataclass(frozen=True)
class Published:
    """A published BrainProp result: test accuracy (percent) and epochs, mean and sd."""

    accuracy: float
    accuracy_sd: float
    epochs: float | None = None
    epochs_sd: float | None = None


#: The README table of isapome/BrainProp (MNIST dense: an earlier revision of that README).
PUBLISHED: dict[Cell, Published] = {
    Cell("mnist", "conv"): Published(99.31, 0.04, 63, 18),
    Cell("cifar10", "deep"): Published(88.88, 0.27, 105, 4),
    Cell("cifar100", "deep"): Published(59.58, 0.46, 218, 22),
    Cell("tiny-imagenet", "deep"): Published(47.50, 1.30, 328, 75),
    Cell("mnist", "dense"): Published(98.68, 0.07),
}
PUBLISHED_SOURCE = (
    "the README of isapome/BrainProp (MNIST dense from an earlier revision of it); it does not "
    "say whether its epochs count to the best epoch or to the stop"
)

#: The cells with published numbers to check against, in the published table's order: a
#: budget spends itself on these first.
HEADLINE: tuple[Cell, ...] = tuple(PUBLISHED)


@dataclass(frozen=True)
class RunSpec:
    """One run of the matrix: a cell, a rule, a seed, how it is validated and capped, the
    preset table its hyperparameters come from, its precision and its feedback pathway.

    ``val`` is None to validate on the test set (as the paper) or a number of held-out training
    images; ``max_epochs`` is None for the paper's 500 epochs with early stopping; ``bf16``
    trains under bf16 autocast instead of the paper's fp32; ``feedback`` is a mode of
    :func:`~brainprop.feedback.convert`, the paper's exact transpose (``symmetric``) or another.
    """

    cell: Cell
    rule: str
    seed: int
    val: int | None = None
    max_epochs: int | None = None
    preset: str = PAPER_PRESET
    bf16: bool = False
    feedback: str = PAPER_FEEDBACK

    @property
    def name(self) -> str:
        name = f"{self.cell.dataset}-{self.cell.arch}-{self.rule}-s{self.seed}"
        if self.preset != PAPER_PRESET:
            name += f"-{self.preset}"
        if self.val is not None:
            name += f"-val{self.val}"
        if self.max_epochs is not None:
            name += f"-e{self.max_epochs}"
        if self.bf16:
            name += "-bf16"
        if self.feedback != PAPER_FEEDBACK:
            # Marked as feedback: a preset may have a mode's name.
            name += f"-fb-{self.feedback}"
        return name

    @property
    def rule_and_feedback(self) -> tuple[str, str]:
        """What of the run's code may be one's own (:func:`brainprop.owncode.digests`)."""
        return self.rule, self.feedback

    def identity(self) -> dict[str, Any]:
        """The :class:`TrainConfig` fields that make this run the one :attr:`name` names: a
        run directory or measurement whose config.json says otherwise on any of them is
        another run's (copied, renamed or edited into this one's place, or trained by hand
        under its name with another protocol)."""
        return {
            "name": self.name,
            "dataset": self.cell.dataset,
            "arch": self.cell.arch,
            "rule": self.rule,
            "seed": self.seed,
            "preset": self.preset,
            "val": "test" if self.val is None else self.val,
            "epochs": self.max_epochs or PAPER_EPOCHS,
            "bf16": self.bf16,
            "feedback": self.feedback,
            # EBP does not explore: its epsilon, whatever it is, is not part of its run.
            **{k: v for k, v in PAPER_PROTOCOL.items() if k != "epsilon" or self.rule != "ebp"},
        }

    def differs_from(self, config: dict[str, Any]) -> tuple[str, Any, Any] | None:
        """The first :meth:`identity` field a stored ``config`` holds otherwise, as (field,
        its value there, this run's), or None; a field it lacks (an older file's) passes."""
        for key, wanted in self.identity().items():
            if key in config and config[key] != wanted:
                return key, config[key], wanted
        return None

    def config(
        self, out: Path, data_dir: str | None, device: str, cuda_graph: bool = False
    ) -> TrainConfig:
        """This run's preset for its cell, writing its directory under ``out/runs``;
        ``cuda_graph`` is how it runs, not which run it is, so it is no part of the name."""
        return TrainConfig(
            **self.identity(),
            device=device,
            cuda_graph=cuda_graph,
            data_dir=data_dir,
            out_dir=str(out / RUNS),
        )


def select_cells(datasets: Sequence[str] | None, archs: Sequence[str] | None) -> list[Cell]:
    """The matrix cells of ``datasets`` and ``archs`` (None: all), in matrix order."""
    known_datasets = sorted({c.dataset for c in MATRIX})
    known_archs = sorted({c.arch for c in MATRIX})
    for kind, given, known in (("dataset", datasets, known_datasets), ("arch", archs, known_archs)):
        bad = [v for v in given or () if v not in known]
        if bad:
            raise BrainPropError(
                f"{kind} {bad[0]!r} is not in the paper's matrix: choose from {', '.join(known)}"
                + did_you_mean(bad[0], known)
            )
    cells = [
        c for c in MATRIX
        if (datasets is None or c.dataset in datasets) and (archs is None or c.arch in archs)
    ]  # fmt: skip
    if not cells:
        pairs = ", ".join(f"{c.dataset}/{c.arch}" for c in MATRIX)
        raise BrainPropError(f"no matrix cell has those datasets and archs: the cells are {pairs}")
    return cells


def rule_rank(rule: str) -> int:
    """Where ``rule`` comes in plans and reports: the paper's two in :data:`RULE_ORDER`, then
    any of one's own (tied: a plan keeps the order they were given in, a report sorts them by
    name)."""
    return RULE_ORDER.index(rule) if rule in RULE_ORDER else len(RULE_ORDER)


def plan(
    cells: Sequence[Cell],
    rules: Sequence[str] = RULE_ORDER,
    seeds: int = 10,
    val: int | None = None,
    max_epochs: int | None = None,
    preset: str = PAPER_PRESET,
    bf16: bool = False,
    feedback: str = PAPER_FEEDBACK,
) -> list[RunSpec]:
    """Every run of ``cells x rules x range(seeds)`` with ``preset``'s hyperparameters (under
    bf16 autocast with ``bf16``, through the ``feedback`` pathway), in priority order.

    The order is what a budget cuts: seed 0 of every cell before seed 1 (a first estimate of
    every cell beats ten seeds of one); within a seed the headline cells (published numbers)
    before the others, then the matrix order; within a cell BrainProp, EBP, then rules of one's
    own (each compared with EBP) as given, so that each finished pair gives a gap and an epoch
    ratio.
    """
    outside = [c for c in cells if c not in MATRIX]
    if outside:
        # Said here, or the preset check below would blame the preset for it.
        pairs = ", ".join(f"{c.dataset}/{c.arch}" for c in MATRIX)
        raise BrainPropError(
            f"{outside[0].dataset}/{outside[0].arch} is no cell of the paper's matrix, which is "
            f"{pairs}: 'brainprop train' trains any other"
        )
    for rule in rules:
        OBJECTIVES.require(rule)
    if not 1 <= seeds <= MAX_SEEDS:
        raise BrainPropError(
            f"--seeds must lie in [1, {MAX_SEEDS}], got {seeds}: the paper runs 10 per cell and "
            "rule, and each run takes minutes to hours"
        )
    if val is not None and val < 1:
        raise BrainPropError(f"--val-split must be >= 1 held-out images, got {val}")
    if max_epochs is not None and max_epochs < 1:
        raise BrainPropError(f"--max-epochs must be >= 1, got {max_epochs}")
    if max_epochs is not None and max_epochs > LARGEST:
        # Trained, its runs' measurements would be refused as they were read back.
        raise BrainPropError(f"--max-epochs must be at most {LARGEST}: no run takes that many")
    PRESETS.require(preset)
    check_feedback(feedback)
    covered = [c for c in MATRIX if (dataset_family(c.dataset), c.arch) in preset_table(preset)]
    uncovered = [c for c in cells if c not in covered]
    if uncovered and not covered:
        rows = ", ".join(f"{f}/{a}" for f, a in preset_table(preset)) or "none"
        raise BrainPropError(
            f"preset {preset!r} has no row for a cell of the paper's matrix (its rows: {rows}): "
            "reproduce runs the paper's networks, 'brainprop train --preset' any of its own"
        )
    if uncovered:
        # One selection per dataset: --datasets and --archs select every pair of the two lists,
        # so one of all the covered datasets and archs may hold a pair the preset lacks.
        by_dataset: dict[str, list[str]] = {}
        for c in covered:
            by_dataset.setdefault(c.dataset, []).append(c.arch)
        selections = [f"--datasets {d} --archs {','.join(a)}" for d, a in by_dataset.items()]
        how = "once per dataset: " + "; ".join(selections)
        if len(selections) == 1:
            how = f"with {selections[0]}"
        raise BrainPropError(
            f"preset {preset!r} has no settings for {uncovered[0].dataset}/{uncovered[0].arch}: "
            f"run it {how}"
        )
    cap = None if max_epochs == PAPER_EPOCHS else max_epochs

    def priority(spec: RunSpec) -> tuple[int, int, int, int]:
        headline = HEADLINE.index(spec.cell) if spec.cell in HEADLINE else len(HEADLINE)
        return (spec.seed, headline, MATRIX.index(spec.cell), rule_rank(spec.rule))

    specs = [
        RunSpec(cell, rule, seed, val, cap, preset, bf16, feedback)
        for cell in dict.fromkeys(cells) for rule in dict.fromkeys(rules) for seed in range(seeds)
    ]  # fmt: skip
    return sorted(specs, key=priority)
