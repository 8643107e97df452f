"""The learning-rate halving and Keras's early stopping."""

import numpy as np
import pytest

from brainprop.schedule import EarlyStopping, lr_at


def test_lr_halves_every_100_epochs():
    assert [lr_at(e, 0.1, 100) for e in (0, 99, 100, 199, 200, 499)] == [
        0.1, 0.1, 0.05, 0.05, 0.025, 0.1 / 16,
    ]  # fmt: skip


def test_early_stopping_follows_keras():
    stopper = EarlyStopping(patience=3, min_delta=0.001)
    # 0.5 improves; 0.5005 is within min_delta, so does not; 0.6 improves; then three flat epochs.
    decisions = [stopper.update(v) for v in (0.5, 0.5005, 0.6, 0.6, 0.6009, 0.59)]
    assert decisions == [False, False, False, False, False, True]
    assert stopper.best == float(np.float32(0.6))


def test_an_equal_value_is_no_improvement_without_min_delta():
    # Keras's np.greater: a plateau stops the run even when min_delta is 0.
    stopper = EarlyStopping(patience=2, min_delta=0.0)
    assert [stopper.update(v) for v in (0.5, 0.5, 0.5)] == [False, False, True]


def test_a_tie_at_min_delta_is_decided_in_float32_as_keras_decides_it():
    # 95.03% then 95.13%: exactly min_delta better. In float64 the difference rounds below
    # 0.001; Keras compares float32 accuracies, whose difference rounds above, and improves.
    stopper = EarlyStopping(patience=1, min_delta=0.001)
    assert stopper.update(0.9503) is False
    assert stopper.update(0.9513) is False and stopper.wait == 0


def test_a_float64_best_from_an_earlier_checkpoint_is_compared_as_float32():
    # 90.03% then 90.13%: in float32, as Keras compares them, no improvement; against the
    # unrounded float64 best an earlier version saved, one.
    stopper = EarlyStopping(patience=2, min_delta=0.001)
    stopper.load_state_dict({"best": 0.9003, "wait": 0})
    assert stopper.update(0.9013) is False and stopper.wait == 1


def test_a_stored_best_that_is_no_accuracy_is_refused():
    # 1e39 passed as finite, then rounded to float32's inf, which no epoch improves on.
    for best in (1e39, 1.5, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="out of range"):
            EarlyStopping(patience=2, min_delta=0.001).load_state_dict({"best": best, "wait": 0})
    stopper = EarlyStopping(patience=2, min_delta=0.001)
    stopper.load_state_dict({"best": float("-inf"), "wait": 0})  # before the first epoch
    assert stopper.update(0.1) is False and stopper.wait == 0
    # The ends of the range are accuracies too: an epoch that scored nothing, or everything.
    for best in (0.0, 1.0):
        stopper = EarlyStopping(patience=2, min_delta=0.001)
        stopper.load_state_dict({"best": best, "wait": 1})
        assert stopper.best == best and stopper.update(best) is True
