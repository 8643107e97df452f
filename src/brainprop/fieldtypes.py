"""The typed settings' fields checked against their annotations, for
:class:`~brainprop.config.TrainConfig` and :class:`~brainprop.presets.Hyperparameters`.

The annotations are text (``from __future__ import annotations``), of the few types those
settings use; :data:`TYPE_CHECKS` has a checker for each. Numbers and text of other kinds
(numpy's ``int64`` from ``np.arange``, its ``float64``, a ``Fraction``) become Python's own
first, as a run stores its settings in JSON and in its checkpoints.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import BrainPropError, kind_of

#: The largest integer a float holds; a larger one's float() raises OverflowError.
_FLOAT_MAX = int(np.finfo(np.float64).max)


def whole(value: object, least: int) -> bool:
    """Whether ``value`` is a whole number (numpy's too, not a bool) of at least ``least``."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= least


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


#: A checker per type spelled in the settings' annotations.
TYPE_CHECKS: dict[str, Any] = {
    "str": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": _number,
    "bool": lambda v: isinstance(v, bool),
    "None": lambda v: v is None,
    "tuple[float, ...]": lambda v: isinstance(v, list | tuple) and all(map(_number, v)),
}


def value_fits(value: Any, annotation: str) -> bool:
    """Whether ``value`` is of the annotated type, e.g. ``"float | None"``."""
    return any(TYPE_CHECKS[alternative](value) for alternative in annotation.split(" | "))


def plain(value: Any, annotation: str) -> Any:
    """``value`` as Python's own ``int``, ``float``, ``str`` or ``bool`` where it is a number
    or text of another kind the annotation takes (an ``int`` for a ``float`` too), and a list of
    rates as a tuple; anything else as it is, for :func:`check_fields` to judge.

    A run's checkpoints hold its config and load with ``weights_only=True``, which refuses
    numpy's scalars (``np.float64`` too, a ``float`` subclass): kept, one would end a run's
    every later load."""
    if isinstance(value, np.generic):
        value = value.item()
    kinds = annotation.split(" | ")
    # ``lr=1`` reads as meant, and its config.json then says 1.0 like every other rate. One
    # too large for a float stays as it is, for the setting's range check to name.
    if type(value) is int and "float" in kinds and "int" not in kinds and abs(value) <= _FLOAT_MAX:
        return float(value)
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, numbers.Integral) and "int" in kinds:
        return int(value)
    if isinstance(value, numbers.Real) and "float" in kinds:
        return float(value)
    if isinstance(value, list | tuple) and "tuple[float, ...]" in kinds:
        return tuple(plain(v, "float") for v in value)
    return value


def make_plain(settings: Any) -> None:
    """Put :func:`plain` values in the fields of the (frozen) dataclass ``settings``; called
    from its ``__post_init__``."""
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        tidy = plain(value, str(f.type))
        if tidy is not value:
            object.__setattr__(settings, f.name, tidy)


def check_fields(settings: Any, hints: Mapping[str, str] | None = None) -> None:
    """Raise a one-line :class:`BrainPropError` for the first field of the dataclass
    ``settings`` whose value is not of its annotated type; ``hints`` adds a fix per field."""
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if value_fits(value, str(f.type)):
            continue
        # A long value (a Dataset passed for its name) would fill the screen.
        shown = repr(value)
        got = kind_of(value) + (f" ({shown})" if len(shown) <= 40 and "\n" not in shown else "")
        hint = (hints or {}).get(f.name)
        raise BrainPropError(
            f"{f.name} must be of type {f.type}, got {got}" + (f": {hint}" if hint else "")
        )
