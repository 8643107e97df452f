"""Typed training configuration.

:class:`TrainConfig` is what a user writes (from Python or the CLI): every hyperparameter may be
left as ``None``, meaning "the preset's value" (the paper's unless ``preset`` names another
table). :meth:`TrainConfig.resolve` fills those from that table in :mod:`brainprop.presets`,
validates everything, and returns a config in which every field is concrete. The resolved
config is what a run stores and what a resume reloads.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from .data.registry import DATASETS
from .devices import device_problem
from .errors import BrainPropError, kind_of
from .feedback import check_feedback
from .fieldtypes import check_fields, make_plain, value_fits
from .objectives import DEFAULT_EPSILON, OBJECTIVES
from .presets import (
    ARCHITECTURES,
    PAPER_PRESET,
    Hyperparameters,
    hyperparameter_problem,
    preset_hyperparameters,
    with_dropout,
)

VAL_TEST = "test"
#: What a NaN or inf loss or weight does: end the run, or reload the last checkpoint at half the LR.
ON_NAN = ("stop", "reload")
#: How often ``on_nan="reload"`` may rewind one run before it stops as ``"stop"`` would.
MAX_NAN_RELOADS = 3


#: The fix :meth:`TrainConfig.resolve` suggests for a field of the wrong type, where the type
#: alone does not say it.
_FIELD_HINTS = {
    "dataset": "the name of a registered dataset; a Dataset of one's own goes to "
    "train(config, dataset=...)",
    "dropout": "a tuple of one rate per dropout site, or of one for all: (0.3,)",
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines one training run.

    Hyperparameters left at ``None`` take the value of the ``preset`` table's row for
    (dataset, arch): the paper's by default.
    ``val`` is ``"test"`` (validate on the test set, as the original does) or a number of
    training images to hold out for validation. ``on_nan`` is ``"stop"`` or ``"reload"`` (see
    :data:`ON_NAN`). ``global_batch``, for runs of several processes (see
    :mod:`brainprop.distributed`), fixes the images per step over all of them, each training on
    ``global_batch / world size``; without it ``batch_size`` is per process. There,
    ``sync_batchnorm`` makes BatchNorm normalise with the global batch's statistics, as one
    process training on the whole batch does (see :mod:`brainprop.syncbn`); off, each process
    uses its own share's.

    ``epsilon`` is BrainProp's exploration rate; EBP, which never explores, ignores it, so
    that one config can be run under either rule.

    :meth:`resolve`'s errors name a field by its command-line flag (``--lr`` for ``lr``), the
    spelling most of them reach a user in.
    """

    dataset: str = "mnist"
    arch: str = "conv"
    rule: str = "brainprop"
    epsilon: float = DEFAULT_EPSILON
    feedback: str = "symmetric"
    # Hyperparameters: None means the value in the preset's table (presets.PRESETS).
    preset: str = PAPER_PRESET
    lr: float | None = None
    lr_halving_epochs: int | None = None
    batch_size: int | None = None
    global_batch: int | None = None
    sync_batchnorm: bool = True
    init_std: float | None = None
    l2: float | None = None
    dropout: tuple[float, ...] | None = None
    # Stopping.
    epochs: int = 500
    patience: int = 45
    min_delta: float = 0.001
    val: str | int = VAL_TEST
    on_nan: str = "stop"
    # Where and how.
    seed: int = 0
    device: str = "auto"
    bf16: bool = False
    # Plain PyTorch instead of the fast path (brainprop.fastpath): for debugging.
    eager: bool = False
    # Each full-batch step replayed from one CUDA graph (brainprop.fastpath.GraphedStep).
    cuda_graph: bool = False
    data_dir: str | None = None
    out_dir: str = "runs"
    name: str | None = None

    def __post_init__(self) -> None:
        # Folders may be given as paths too; stored, as in config.json, as text.
        for name in ("data_dir", "out_dir"):
            if isinstance(value := getattr(self, name), os.PathLike):
                object.__setattr__(self, name, os.fspath(value))
        make_plain(self)

    def resolve(self, *, stored: bool = False) -> TrainConfig:
        """Return a copy with every hyperparameter filled in and every value checked.

        ``stored``: this is the config of a run made already (its ``config.json``). Where every
        hyperparameter is there, the run goes on with those, not its preset's row: a
        registration the row came from (a dataset's family, a table of one's own) may have
        changed since, and no longer has one.
        """
        check_fields(self, _FIELD_HINTS)
        DATASETS.require(self.dataset)
        ARCHITECTURES.require(self.arch)
        OBJECTIVES.require(self.rule)
        if self.global_batch is not None and self.batch_size not in (None, self.global_batch):
            raise BrainPropError(
                f"--batch-size {self.batch_size} and --global-batch {self.global_batch} both "
                "set the batch: pass one (--global-batch is split over the processes)"
            )
        own = {f.name: getattr(self, f.name) for f in fields(Hyperparameters)}
        if stored and None not in own.values():
            hp = Hyperparameters(**own)
        else:
            hp = preset_hyperparameters(self.dataset, self.arch, self.preset)
            sites = ARCHITECTURES[self.arch][1]
            if self.dropout is None and len(hp.dropout) != sites:
                # A row of one's own, written for another network: not a --dropout given.
                raise BrainPropError(
                    f"preset {self.preset!r} gives {self.arch} on {self.dataset} "
                    f"{len(hp.dropout)} dropout rates, but {self.arch!r} has {sites} dropout "
                    "sites: "
                    + (f"give that row {sites} rates, or pass --dropout" if sites else
                       "give that row no rates, dropout=()")
                )  # fmt: skip
        if self.global_batch is not None:
            # One process trains on the whole global batch, like the several it stands for.
            hp = replace(hp, batch_size=self.global_batch)
        if self.dropout is not None:
            hp = with_dropout(hp, self.dropout, self.arch)
        filled = {
            f.name: getattr(hp, f.name) if getattr(self, f.name) is None else getattr(self, f.name)
            for f in dataclasses.fields(hp)
            if f.name != "dropout"
        }
        resolved = replace(self, dropout=hp.dropout, **filled)
        resolved._check()
        if resolved.data_dir:
            # Stored relative, it would name another folder when the run is resumed or
            # evaluated from elsewhere, and data of the same shape there would pass unnoticed.
            root = Path(resolved.data_dir).expanduser().absolute()
            resolved = replace(resolved, data_dir=str(root))
        return resolved

    def _check(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise BrainPropError(message)

        def in_range(field: str) -> None:
            value = getattr(self, field)
            if (problem := hyperparameter_problem(field, value)) is not None:
                rule, fix = problem
                raise BrainPropError(
                    f"--{field.replace('_', '-')} {rule}, got {value}" + (f": {fix}" if fix else "")
                )

        check_feedback(self.feedback)
        in_range("lr")
        need(0.0 <= self.epsilon <= 1.0, f"--epsilon must lie in [0, 1], got {self.epsilon}")
        need(
            self.global_batch is None or self.global_batch >= 1,
            f"--global-batch must be >= 1, got {self.global_batch}",
        )
        in_range("batch_size")
        need(self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}")
        # numpy, which every run seeds too, takes 32-bit seeds only.
        need(0 <= self.seed < 2**32, f"--seed must lie in [0, {2**32 - 1}], got {self.seed}")
        need(self.patience >= 1, f"--patience must be >= 1, got {self.patience}")
        need(
            not self.min_delta < 0,  # NaN is for the range's own message
            f"--min-delta must be >= 0, got {self.min_delta}: it is the least gain in accuracy "
            "that counts as an improvement; the paper's is 0.001",
        )
        need(
            self.min_delta < 1,
            f"--min-delta must lie in [0, 1), got {self.min_delta}: accuracies lie in [0, 1], "
            "so no epoch could improve by that much; the paper's is 0.001",
        )
        in_range("lr_halving_epochs")
        in_range("init_std")
        in_range("l2")
        sites = ARCHITECTURES[self.arch][1]
        need(
            len(self.dropout) == sites,
            f"{self.arch!r} has {sites} dropout sites, got {len(self.dropout)} rates: "
            f"give {sites} comma-separated rates or one for all",
        )
        # An int too large for a float (fieldtypes.plain keeps it) has no :g.
        rates = (f"{r:g}" if isinstance(r, float) else str(r) for r in dict.fromkeys(self.dropout))
        need(
            all(0.0 <= r < 1.0 for r in self.dropout),
            f"--dropout rates must lie in [0, 1), got {', '.join(rates)}",
        )
        need(
            self.val == VAL_TEST or (isinstance(self.val, int) and self.val >= 1),
            f"--val must be 'test' or a positive number of held-out images, got {self.val!r}",
        )
        need(
            not (self.eager and self.cuda_graph),
            "--eager and --cuda-graph contradict each other: drop one",
        )
        need(
            self.on_nan in ON_NAN,
            f"--on-nan must be one of {', '.join(ON_NAN)}, got {self.on_nan!r}",
        )
        problem = device_problem(self.device)
        need(problem is None, problem or "")

    @property
    def weight_decay(self) -> float:
        """SGD's weight decay for the resolved ``l2``: Keras's ``l2(lambda)`` adds
        ``lambda * w^2`` to the loss, whose gradient is ``2 * lambda * w``."""
        if self.l2 is None:
            raise ValueError("weight_decay needs a resolved config (call resolve() first)")
        return 2 * self.l2

    def hyperparameters(self) -> Hyperparameters:
        """This (resolved) config's table fields as a :class:`Hyperparameters` row."""
        row = {f.name: getattr(self, f.name) for f in fields(Hyperparameters)}
        unset = [name for name, value in row.items() if value is None]
        if unset:
            raise ValueError(f"the config has no {unset[0]}: resolve() fills it")
        return Hyperparameters(**row)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        if d["dropout"] is not None:
            d["dropout"] = list(d["dropout"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error, not silently dropped.

        Stored configs come from files, so every value's type is checked here: a damaged one
        is named in one line instead of failing somewhere later.
        """
        if not isinstance(d, dict) or not all(isinstance(k, str) for k in d):
            raise BrainPropError("config is not a mapping of names to values: it is damaged")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise BrainPropError(
                f"config has unknown keys {unknown}: it was written by another version"
            )
        for f in fields(cls):
            if f.name in d and not value_fits(d[f.name], str(f.type)):
                raise BrainPropError(
                    f"config entry {f.name!r} holds {kind_of(d[f.name])}, expected "
                    f"{f.type}: it is damaged or was written by another version"
                )
        d = dict(d)
        # Runs written before the fast path existed trained eager: they resume so, and stay
        # bit-identical to an uninterrupted run (the layouts draw different dropout masks).
        d.setdefault("eager", True)
        # Runs from before synchronised BatchNorm used each process's own statistics.
        d.setdefault("sync_batchnorm", False)
        # Runs from before an empty --data-dir was refused stored "" for the working directory
        # of the day; they read the default root, as an empty $BRAINPROP_DATA means, and data
        # that is elsewhere is passed with --data-dir.
        if d.get("data_dir") == "":
            d["data_dir"] = None
        return cls(**d)
