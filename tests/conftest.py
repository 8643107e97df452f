"""Shared fixtures: a tiny synthetic dataset that trains in a second on 2 cores."""

import signal

import pytest
import torch
from hypothesis import settings

from brainprop.data import Dataset

# The fuzz tests draw the same examples on every run, so a landing never hangs on a draw no
# earlier run made; 'pytest --hypothesis-profile explore' draws fresh ones to hunt for bugs.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile("repeatable")


@pytest.fixture(autouse=True, scope="session")
def sigint_handled():
    """Ctrl-C as an interactive Python takes it, however the suite was started: a script that
    runs it in the background ('pytest &') starts it with SIGINT ignored, which training then
    leaves ignored, and the tests that stop runs with SIGINT would wait in vain."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def sigterm_caught():
    """A SIGTERM that the code under test leaves to its default action fails the test, instead
    of killing the whole suite."""

    def uncaught(signum, frame):
        raise AssertionError("SIGTERM reached the test: the code under test did not handle it")

    previous = signal.signal(signal.SIGTERM, uncaught)
    yield
    signal.signal(signal.SIGTERM, previous)


def make_tiny_dataset(
    n_train: int = 256, n_test: int = 64, classes: int = 4, size: int = 8, seed: int = 0
):
    """Learnable images: each class lights up its own quadrant band, plus noise."""
    g = torch.Generator().manual_seed(seed)

    def split(n):
        y = torch.randint(0, classes, (n,), generator=g)
        x = torch.randint(0, 60, (n, 1, size, size), generator=g, dtype=torch.uint8)
        rows = size // classes
        for c in range(classes):
            x[y == c, :, c * rows : (c + 1) * rows, :] += 180
        return x, y

    (train_x, train_y), (test_x, test_y) = split(n_train), split(n_test)
    return Dataset("mnist", train_x, train_y, test_x, test_y, classes)


@pytest.fixture
def default_root_here(tmp_path, monkeypatch):
    """Make the test's folder the default data root ($BRAINPROP_DATA), as for a user whose
    data live there: messages then advise 'brainprop download NAME' without --data-dir."""
    monkeypatch.setenv("BRAINPROP_DATA", str(tmp_path))


@pytest.fixture
def tiny_dataset():
    return make_tiny_dataset()


@pytest.fixture
def bars_opened(monkeypatch):
    """``watch(module)``: every progress bar ``module`` opens from then on, as a list that
    grows of its ``(disable, desc)`` arguments (disable True: no bar; None: tqdm's choice, a
    bar on a terminal)."""

    def watch(module) -> list:
        seen: list = []

        class Bar(module.tqdm):
            def __init__(self, *args, **kwargs):
                seen.append((kwargs["disable"], kwargs["desc"]))
                super().__init__(*args, **kwargs)

        monkeypatch.setattr(module, "tqdm", Bar)
        return seen

    return watch
