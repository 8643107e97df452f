"""The four published architectures and the tables of hyperparameters: the published one,
:data:`PAPER`, and a few named others (:data:`PRESETS`), which a run chooses with
``TrainConfig.preset``.

An architecture is a (builder function, number of dropout sites) entry of
:data:`ARCHITECTURES`; a table maps (dataset family, arch) to a :class:`Hyperparameters` row. A
new architecture is one builder, and its rows go in a table of their own in :data:`PRESETS`
(the paper's stays as published).

The builders follow isapome/BrainProp's ``get_architecture.py`` layer for layer: no biases,
Conv/LocallyConnected -> ReLU -> BatchNorm (Keras momentum 0.99, eps 1e-3), Keras's dropout
*rates*, and TensorFlow's asymmetric 'same' padding. They fit any input shape large enough
for their layers (loccon from 5x5 pixels, deep from 8x8). The last layer is a bias-free
``nn.Linear`` whose outputs are the Q-values (BrainProp) or the logits (EBP); the rule lives in
the objective, not in the network.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType

import torch
from torch import nn

from .data.catalog import FAMILIES
from .data.dataset import looks_channels_last
from .data.registry import DATASETS, dataset_family
from .devices import ran_out_of_memory
from .errors import BrainPropError, defined_in, kind_of, raised
from .fieldtypes import check_fields, make_plain, whole
from .layers import Conv2dSame, LocallyConnected2d
from .registry import Registry
from .rng import check_generator

# Keras's BatchNormalization defaults, in PyTorch's convention (momentum = 1 - Keras momentum).
BN_MOMENTUM = 0.01
BN_EPS = 1e-3


#: The least value of each numeric hyperparameter, and whether that least is allowed.
FLOORS: Mapping[str, tuple[int, bool]] = MappingProxyType({
    "lr": (0, False), "lr_halving_epochs": (1, True), "batch_size": (1, True),
    "init_std": (0, False), "l2": (0, True),
})  # fmt: skip
#: The step computes in float32: torch refuses a larger lr or weight decay with a traceback
#: mid-step, and a positive value below the smallest normal one is as good as 0 there.
FLOAT32_MAX = torch.finfo(torch.float32).max
FLOAT32_TINY = torch.finfo(torch.float32).tiny
_IN_RANGE = "pass a value in that range"


def hyperparameter_problem(field: str, value: float) -> tuple[str, str] | None:
    """What is wrong with ``value`` (NaN too) as the numeric hyperparameter ``field``: the rule
    it breaks (``"must be > 0"``) and the fix where the rule alone does not say it; None where
    nothing is. One rule for a run's own settings (:class:`~brainprop.config.TrainConfig`) and
    the rows of a table of one's own (:meth:`Hyperparameters.problem`)."""
    least, allowed = FLOORS[field]
    if not (value >= least if allowed else value > least):
        return f"must be {'>=' if allowed else '>'} {least}", ""
    if field in ("lr", "init_std") and not FLOAT32_TINY <= value <= FLOAT32_MAX:
        return (
            f"must lie in [{FLOAT32_TINY:.4g}, {FLOAT32_MAX:.4g}], the float32 range training "
            "computes in", _IN_RANGE,
        )  # fmt: skip
    # SGD's float32 weight decay is 2 * l2 (TrainConfig.weight_decay).
    if field == "l2" and value != 0 and not FLOAT32_TINY <= 2 * value <= FLOAT32_MAX:
        return (
            f"must be 0 or lie in [{FLOAT32_TINY / 2:.4g}, {FLOAT32_MAX / 2:.4g}] (SGD's float32 "
            "weight decay is twice it)", _IN_RANGE,
        )  # fmt: skip
    return None


@dataclass(frozen=True)
class Hyperparameters:
    """One row of a hyperparameter table. The defaults are the settings every row of the
    paper's table shares, so that each row of :data:`PAPER` spells out only how it departs from
    them: a changed default changes the paper's table, which ``tests/test_readme.py`` checks
    against the README's copy.

    Attributes:
        lr: SGD learning rate (no momentum).
        lr_halving_epochs: the learning rate halves every this many epochs.
        batch_size: training batch size.
        init_std: standard deviation of the N(0, sigma) initialisation of every weight.
        l2: Keras ``l2(lambda)`` on every Linear/Conv/LC weight: lambda * sum(w^2) is added to
            the loss (BatchNorm parameters are not decayed).
        dropout: one Keras dropout *rate* per dropout site of the architecture, in order.
    """

    lr: float = 0.1
    lr_halving_epochs: int = 100
    batch_size: int = 128
    init_std: float = 0.005
    l2: float = 0.0
    dropout: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        # A row of one's own is checked where it is written: a batch size of 64.0 or a lone
        # dropout rate would otherwise fail deep inside a run, after its folder was made.
        make_plain(self)
        check_fields(self, {"dropout": "a tuple of one rate per dropout site: (0.3, 0.3)"})

    def problem(self) -> str | None:
        """What is wrong with this row's values (``"lr -1.0, which must be > 0"``), or None.
        How many dropout rates it needs is its network's to say."""
        for field in FLOORS:
            value = getattr(self, field)
            if (problem := hyperparameter_problem(field, value)) is not None:
                return f"{field} {value!r}, which {problem[0]}"
        if not all(0 <= rate < 1 for rate in self.dropout):
            return f"dropout {self.dropout!r}, whose rates must lie in [0, 1)"
        return None


_CONV = Hyperparameters(dropout=(0.3, 0.3))
_LOCCON = Hyperparameters(batch_size=32, dropout=(0.3, 0.3))
_DEEP = Hyperparameters(l2=5e-4, dropout=(0.3, 0.3, 0.8, 0.3))

#: The published hyperparameters (isapome/BrainProp), one row per (dataset family, arch);
#: read-only, as the published table is (a table of other settings is a preset of its own).
PAPER: Mapping[tuple[str, str], Hyperparameters] = MappingProxyType(
    {
        ("mnist", "dense"): Hyperparameters(init_std=0.01),
        ("mnist", "conv"): _CONV,
        ("mnist", "loccon"): _LOCCON,
        ("cifar10", "conv"): _CONV,
        ("cifar10", "loccon"): _LOCCON,
        ("cifar10", "deep"): _DEEP,
        ("cifar100", "conv"): _CONV,
        ("cifar100", "loccon"): _LOCCON,
        ("cifar100", "deep"): _DEEP,
        ("tiny-imagenet", "deep"): _DEEP,
    }
)


#: Not the paper's: the ``dense`` network with a larger learning rate and initialisation, so
#: that BrainProp passes 97% on MNIST in a few CPU minutes (the published lr 0.1 and sigma 0.01
#: need tens of epochs). It is the README's quick start.
QUICKSTART: Mapping[tuple[str, str], Hyperparameters] = MappingProxyType(
    {("mnist", "dense"): Hyperparameters(lr=0.5, init_std=0.03, batch_size=64)}
)

#: Not the paper's: the ``dense`` network at twice :data:`QUICKSTART`'s learning rate. The
#: published settings (lr 0.1, sigma 0.01) leave BrainProp at about 98.1% on MNIST and the
#: paper text's (lr 1, sigma 0.1) diverge; these are the settings docs/reproduce.md measures
#: against the published 98.68 (0.07).
TUNED: Mapping[tuple[str, str], Hyperparameters] = MappingProxyType(
    {("mnist", "dense"): Hyperparameters(lr=1.0, init_std=0.03, batch_size=64)}
)

#: Not the paper's: :data:`TUNED` at lr 1.25, the row of docs/reproduce.md whose mean lands
#: nearest the published MNIST-dense 98.68 (0.07). It is near the edge of stability: one seed
#: of six overflowed in its first 14 steps (at lr 1.5, one of two). A table of its own, rather
#: than TUNED at a new lr, because TUNED's committed measurements ran at lr 1.
TUNED_LR125: Mapping[tuple[str, str], Hyperparameters] = MappingProxyType(
    {("mnist", "dense"): Hyperparameters(lr=1.25, init_std=0.03, batch_size=64)}
)

#: The name of :data:`PAPER` among the presets: the default everywhere.
PAPER_PRESET = "paper"


def _table_problem(table: object) -> str | None:
    if not isinstance(table, Mapping):
        return (
            "must be a table: {(dataset family, arch): Hyperparameters(...)}, not "
            f"{kind_of(table)}"
        )
    for key, row in table.items():
        if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, str) for k in key)):
            return f"has the key {key!r}: a key is a (dataset family, arch) pair, ('mnist', 'conv')"
        if key[0] not in FAMILIES:
            families = ", ".join(FAMILIES)
            return f"has the key {key!r}: {key[0]!r} is no dataset family: one of {families}"
        if not isinstance(row, Hyperparameters):
            return f"has the row {key!r}: {kind_of(row)}, not a Hyperparameters(...)"
        # Else a run would blame the value on a flag it was not given (--lr must be > 0).
        if (problem := row.problem()) is not None:
            return f"has the row {key!r} with {problem}"
    return None


def _preset_name_problem(name: str) -> str | None:
    # A run's name is its settings' names joined by '-' (brainprop.matrix.RunSpec.name): a
    # table named like one of its marks would give two different runs one name, and one of
    # them would be skipped as measured.
    # Either case: on a disk that ignores it, 'x-E2' names the folder of 'x-e2'.
    marks = [p for p in name.split("-") if re.fullmatch(r"fb|bf16|(val|e)\d+", p, re.IGNORECASE)]
    if marks:
        return (
            f"its part {marks[0]!r} reads as a mark of a run's name (-val<N>, -e<N>, -bf16, -fb-)"
        )
    return None


#: Named tables a run can take its hyperparameters from. The library's own stay as they are,
#: read-only (their committed measurements ran with them); a table of one's own is a mapping
#: (a dict, to add rows later) added here.
PRESETS: Registry[Mapping[tuple[str, str], Hyperparameters]] = Registry(
    "PRESETS",
    "preset",
    {
        PAPER_PRESET: PAPER,
        "quickstart": QUICKSTART,
        "tuned": TUNED,
        "tuned-lr1.25": TUNED_LR125,
    },
    check=_table_problem,
    name_check=_preset_name_problem,
)


def preset_hyperparameters(dataset: str, arch: str, preset: str = PAPER_PRESET) -> Hyperparameters:
    """The ``preset`` table's row for ``dataset`` and ``arch``; a clear error for missing pairs."""
    PRESETS.require(preset)
    ARCHITECTURES.require(arch)
    DATASETS.require(dataset)
    family = dataset_family(dataset)
    row = table_row(preset, dataset, arch)
    if row is None:
        # A network of one's own needs a row of hyperparameters, even where every one is
        # given: the paper's table stays as published, so the row goes in a table of its own.
        own_table = preset not in PRESETS.builtin and isinstance(PRESETS[preset], MutableMapping)
        own = (
            f"add PRESETS[{preset!r}][({family!r}, {arch!r})] = Hyperparameters(...)"
            if own_table
            else f"add PRESETS['<name>'] = {{({family!r}, {arch!r}): Hyperparameters(...)}} "
            "and pass --preset <name>"
        )
        valid = table_archs(preset, dataset)
        if not valid:
            pairs = ", ".join(f"{f}/{a}" for f, a in preset_table(preset))
            raise BrainPropError(
                f"preset {preset!r} has no row for {dataset}: it covers {pairs}; {own}"
            )
        raise BrainPropError(
            f"preset {preset!r} has no {arch!r} network for {dataset}: "
            f"choose --arch from {', '.join(valid)}, or {own}"
        )
    return row


def preset_table(preset: str) -> Mapping[tuple[str, str], Hyperparameters]:
    """The ``preset`` table, empty for an unknown preset (a measurement from another version
    may name one). Every read of a table goes through here.

    Raises:
        BrainPropError: a table of one's own that changed, since it was registered, into one
            the registry would refuse.
    """
    table = PRESETS.get(preset, {})
    problem = _table_problem(table)
    if problem is not None:
        raise BrainPropError(f"PRESETS[{preset!r}] {problem}")
    return table


def table_row(preset: str, dataset: str, arch: str) -> Hyperparameters | None:
    """The ``preset`` table's row for ``dataset`` and ``arch``; None where it has none, an
    unknown preset or dataset included."""
    return preset_table(preset).get((dataset_family(dataset) or dataset, arch))


def table_archs(preset: str, dataset: str) -> list[str]:
    """The architectures the ``preset`` table has a row for on ``dataset``, sorted."""
    family = dataset_family(dataset) or dataset
    return sorted(a for f, a in preset_table(preset) if f == family)


class LayerStack:
    """Appends layers while tracking the activation shape (C, H, W), so builders fit any input
    large enough for their layers (a layer that would get too few pixels is refused as it is
    added).

    An architecture's builder takes one, the number of classes and its dropout rates, and adds
    the network layer by layer; ``layers`` then holds its modules in order, which
    :func:`build_model` makes an ``nn.Sequential``."""

    def __init__(self, input_shape: Sequence[int]) -> None:
        self.layers: list[nn.Module] = []
        self.input_shape = self.shape = tuple(input_shape)

    def add(self, module: nn.Module) -> None:
        """Append any module (a network of one's own, whole or in part); the shape it outputs
        is that of its output for zero inputs, in eval mode (BatchNorm's running statistics stay
        as they were). Two of them: a BatchNorm without running statistics normalises with the
        batch's in eval mode too, which one value per channel cannot give."""
        self.layers.append(module)
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                self.shape = tuple(module(torch.zeros(2, *self.shape)).shape[1:])
        finally:
            module.train(was_training)

    def _local(self, make: Callable[..., nn.Module], channels: int, stride: int, padding: str):
        c, h, w = self.shape
        layer = make(c, channels, (h, w), stride, padding)
        self.layers.append(layer)
        with torch.no_grad():
            self.shape = tuple(layer(torch.zeros(1, c, h, w)).shape[1:])
        self.layers += [nn.ReLU(), nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)]

    def conv(self, channels: int, stride: int = 1) -> None:
        """3x3 Conv2D, 'same' padding -> ReLU -> BatchNorm."""
        self._local(
            lambda c, o, hw, s, p: Conv2dSame(c, o, 3, stride=s, input_size=hw),
            channels,
            stride,
            "same",
        )

    def loccon(self, channels: int, stride: int = 1) -> None:
        """3x3 LocallyConnected2D, 'valid' padding -> ReLU -> BatchNorm."""
        self._fits(3, "a 3x3 locally connected layer")
        self._local(
            lambda c, o, hw, s, p: LocallyConnected2d(c, o, hw, 3, stride=s, padding=p),
            channels,
            stride,
            "valid",
        )

    def pool(self) -> None:
        # A pool over fewer pixels would be built, and fail only as the network first runs.
        self._fits(2, "a 2x2 max-pool")
        c, h, w = self.shape
        self.layers.append(nn.MaxPool2d(2))
        self.shape = (c, h // 2, w // 2)

    def _fits(self, size: int, layer: str) -> None:
        """Refuse ``layer``, the next, if the images, as the layers before it shrank them, have
        fewer than ``size`` pixels a side."""
        _, h, w = self.shape
        if h < size or w < size:
            _, height, width = self.input_shape
            raise BrainPropError(
                f"images of {height}x{width} pixels are too small for this network: its "
                f"model[{len(self.layers)}], {layer}, would get {h}x{w} and needs {size}x{size} "
                "or more; use larger images, or another network"
            )

    def dropout(self, rate: float) -> None:
        self.layers.append(nn.Dropout(rate))

    def flatten(self) -> None:
        self.layers.append(nn.Flatten())
        c, h, w = self.shape
        self.shape = (c * h * w,)

    def dense(self, units: int, relu: bool = True) -> None:
        self.layers.append(nn.Linear(self.shape[0], units, bias=False))
        if relu:
            self.layers.append(nn.ReLU())
        self.shape = (units,)


def _dense(s: LayerStack, num_classes: int, dropout: Sequence[float]) -> None:
    s.flatten()
    for units in (1500, 1000, 500):
        s.dense(units)
    s.dense(num_classes, relu=False)


def _shallow(local: str) -> Callable[[LayerStack, int, Sequence[float]], None]:
    def build(s: LayerStack, num_classes: int, dropout: Sequence[float]) -> None:
        add = getattr(s, local)
        add(32)
        add(32, stride=2)
        s.dropout(dropout[0])
        s.flatten()
        s.dense(500)
        s.dropout(dropout[1])
        s.dense(num_classes, relu=False)

    return build


def _deep(s: LayerStack, num_classes: int, dropout: Sequence[float]) -> None:
    s.conv(64)
    s.conv(64)
    s.pool()
    s.dropout(dropout[0])
    s.conv(128)
    s.conv(128)
    s.pool()
    s.dropout(dropout[1])
    s.conv(128)
    s.conv(128)
    s.conv(128)
    s.pool()
    s.dropout(dropout[2])
    s.flatten()
    s.dense(500)
    s.dropout(dropout[3])
    s.dense(num_classes, relu=False)


def _architecture_problem(entry: object) -> str | None:
    if not (isinstance(entry, tuple) and len(entry) == 2):
        size = f" of {len(entry)}" if isinstance(entry, tuple) else ""
        return (
            "must be (builder, number of dropout sites), e.g. (build, 1), not "
            f"{kind_of(entry)}{size}"
        )
    builder, sites = entry
    if not callable(builder):
        return (
            "must start with its builder, a function of (net, num_classes, dropout), not "
            f"{kind_of(builder)}"
        )
    if not whole(sites, least=0):
        return f"must end with its number of dropout sites, a whole number >= 0, not {sites!r}"
    return None


#: Builder and number of dropout sites per architecture.
ARCHITECTURES: Registry[tuple[Callable[[LayerStack, int, Sequence[float]], None], int]] = Registry(
    "ARCHITECTURES",
    "architecture",
    {
        "dense": (_dense, 0),
        "conv": (_shallow("conv"), 2),
        "loccon": (_shallow("loccon"), 2),
        "deep": (_deep, 4),
    },
    check=_architecture_problem,
)


def build_model(
    arch: str,
    input_shape: Sequence[int],
    num_classes: int,
    hp: Hyperparameters | None = None,
    generator: torch.Generator | None = None,
) -> nn.Sequential:
    """Build a published architecture for inputs of ``input_shape`` (C, H, W).

    Returns an ``nn.Sequential`` mapping [B, C, H, W] inputs to [B, num_classes] outputs, with
    every weight drawn from N(0, hp.init_std) using ``generator``. Without ``hp`` the network
    has no dropout and the default sigma; pass a :data:`PAPER` row for the published network.
    """
    ARCHITECTURES.require(arch)
    builder, sites = ARCHITECTURES[arch]
    if hp is not None and not isinstance(hp, Hyperparameters):
        raise BrainPropError(
            f"build_model takes hp= a Hyperparameters row (PAPER[dataset, arch]), not "
            f"{kind_of(hp)}" + (": Hyperparameters(**d) makes one" if isinstance(hp, dict) else "")
        )
    check_generator(generator, "build_model")
    hp = hp or Hyperparameters(dropout=(0.0,) * sites)
    if len(hp.dropout) != sites:
        fix = (
            "give its row dropout=()"
            if sites == 0
            else f"pass {sites} comma-separated rates, or one rate for all"
        )
        raise BrainPropError(
            f"{arch!r} has {sites} dropout sites but {len(hp.dropout)} rates were given: {fix}"
        )
    if not whole(num_classes, least=2):
        raise BrainPropError(f"num_classes must be a whole number >= 2, got {num_classes!r}")
    try:
        shape = tuple(input_shape)
    except TypeError:  # An int, or a 0-d array or tensor, which is Iterable yet iterates not.
        shape = ()
    if len(shape) != 3 or not all(whole(n, least=1) for n in shape):
        raise BrainPropError(
            f"input shape must be (C, H, W), whole numbers >= 1, got {input_shape!r}"
        )
    input_shape, num_classes = tuple(map(int, shape)), int(num_classes)
    if looks_channels_last(*input_shape):
        c, h, w = input_shape
        raise BrainPropError(
            f"input shape {tuple(input_shape)} looks channels-last (H, W, C): pass (C, H, W), "
            f"{(w, c, h)}"
        )
    stack = LayerStack(input_shape)
    try:
        builder(stack, num_classes, hp.dropout)
    except Exception as e:
        # A LayerStack's refusal, already one line; the machine's limit; the library's bug.
        if isinstance(e, BrainPropError) or ran_out_of_memory(e) or arch in ARCHITECTURES.builtin:
            raise
        # One's own code: one line naming its line, as a rule that fails on its test batch.
        raise BrainPropError(
            f"network {arch!r} failed as it was built for inputs {tuple(input_shape)}: "
            f"{raised(e, defined_in(builder), builder)}"
        ) from e
    if stack.shape != (num_classes,):
        # Caught here, not as a shape error deep in the objective (or never: more outputs
        # than classes train without complaint).
        raise BrainPropError(
            f"{arch!r} outputs {stack.shape} per image, not ({num_classes},), one Q-value per "
            "class: end it with a flatten and a dense layer of num_classes units"
        )
    model = nn.Sequential(*stack.layers)
    init_weights(model, hp.init_std, generator)
    return model


def init_weights(model: nn.Module, std: float, generator: torch.Generator | None = None) -> None:
    """Draw every Linear/Conv/LocallyConnected weight from N(0, std), as the Keras code does."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear | nn.Conv2d | LocallyConnected2d):
                module.weight.normal_(0.0, std, generator=generator)


def with_dropout(hp: Hyperparameters, rates: Sequence[float], arch: str) -> Hyperparameters:
    """``hp`` with new dropout rates; a single rate applies to every site of ``arch``."""
    sites = ARCHITECTURES[arch][1]
    rates = tuple(rates)
    if sites == 0 and rates:
        raise BrainPropError(f"{arch!r} has no dropout sites: drop --dropout")
    if len(rates) == 1:
        rates = rates * sites
    return replace(hp, dropout=rates)


def decayed_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split parameters into (weights under L2, the rest): Keras regularises kernels only.

    Reciprocal feedback weights (``feedback_weight``) are decayed like the forward weights they
    mirror: that shared decay is what pulls a randomly initialised B towards W.

    A parameter held by several modules (tied weights) is listed once, and decayed if any of
    them decays it: SGD steps a parameter once per time its group lists it.
    """
    decay: dict[int, nn.Parameter] = {}
    held: dict[int, nn.Parameter] = {}
    for module in model.modules():
        weighted = isinstance(module, nn.Linear | nn.Conv2d | LocallyConnected2d)
        for name, p in module.named_parameters(recurse=False):
            held.setdefault(id(p), p)
            if weighted and name in ("weight", "feedback_weight"):
                decay.setdefault(id(p), p)
    return list(decay.values()), [p for key, p in held.items() if key not in decay]
