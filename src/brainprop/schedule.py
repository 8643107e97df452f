"""When the learning rate halves and when training stops: the published code's Keras callbacks.

Both are bookkeeping over epoch numbers and validation accuracies, kept out of the loop so that
each can be held against Keras's behaviour on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def lr_at(epoch: int, base: float, halving_epochs: int) -> float:
    """Learning rate for 0-based ``epoch``: ``base`` halved every ``halving_epochs`` epochs."""
    return base * 0.5 ** (epoch // halving_epochs)


@dataclass
class EarlyStopping:
    """Keras's ``EarlyStopping(monitor='val_accuracy', mode='max')``, step for step.

    An epoch improves when ``value - min_delta > best``; training stops once ``patience``
    epochs in a row have not improved. Keras sees the accuracy as a float32 (its metric's
    ``total / count``), and an improvement of exactly ``min_delta`` (10 images of 10,000) is a
    tie that rounding decides, differently in float32 than in float64: so the values compared
    here are rounded to float32 first, as Keras's were.
    """

    patience: int
    min_delta: float
    best: float = -math.inf
    wait: int = 0

    def update(self, value: float) -> bool:
        """Record one epoch's value; True when training should stop."""
        self.wait += 1
        value = float(np.float32(value))
        if value - self.min_delta > self.best:
            self.best = value
            self.wait = 0
        return self.wait >= self.patience

    def state_dict(self) -> dict[str, float]:
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore :meth:`state_dict`'s output; ValueError for one no run could have written."""
        stored, wait = state["best"], state["wait"]
        # Not converted: float() and int() took a True, or a wait of 1.5, as a run's (review).
        if type(stored) is not float or type(wait) is not int:
            kinds = f"{type(stored).__name__} and {type(wait).__name__}"
            raise ValueError(f"its best and wait are {kinds}, not float and int")
        # An accuracy, or -inf before the first epoch (a value past float32's range would
        # round to an inf below, which no epoch could improve on).
        if not (stored == -math.inf or 0.0 <= stored <= 1.0) or wait < 0:
            raise ValueError(f"best {stored} or wait {wait} is out of range")
        # Checkpoints of earlier versions hold the float64 value.
        self.best, self.wait = float(np.float32(stored)) if stored > -math.inf else stored, wait
