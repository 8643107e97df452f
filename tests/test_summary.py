"""summary.json: what the loop writes is what reproduce's check accepts."""

import os
import re
import shutil
import subprocess

import pytest
import torch
from measurement_fixtures import write_measurement as measurement

from brainprop import devices
from brainprop.experiments import _finished_line
from brainprop.matrix import Cell, RunSpec
from brainprop.summary import EPOCH_KEYS, check_summary, summarize
from brainprop.train import done_line


def _row(epoch, val, test, seconds=2.0, eval_seconds=0.5):
    return {"epoch": epoch, "val_acc": val, "test_acc": test, "seconds": seconds,
            "eval_seconds": eval_seconds}  # fmt: skip


def test_the_best_epoch_is_the_first_with_the_highest_validation_accuracy():
    history = [_row(1, 0.5, 0.4), _row(2, 0.9, 0.8), _row(3, 0.9, 0.7), _row(4, 0.6, 0.6, 4.0)]
    s = summarize(history, {"seed": 3}, "early stopping")
    assert (s["best_epoch"], s["best_val_acc"], s["test_acc_at_best"]) == (2, 0.9, 0.8)
    assert s["final_val_acc"] == 0.6 and s["epochs_run"] == 4 and s["seed"] == 3
    assert s["s_per_epoch"] == pytest.approx(2.5)  # training only
    assert s["total_seconds"] == pytest.approx(10.0 + 2.0)  # training and evaluation
    check_summary(s)


def test_a_stacked_epoch_counts_the_runs_share_of_its_seconds():
    """Two epochs in a stack of 4, then one alone (its stack-mates had stopped)."""
    history = [_row(1, 0.5, 0.5, 8.0, 2.0), _row(2, 0.6, 0.6, 8.0, 2.0), _row(3, 0.7, 0.7)]
    for row, size in zip(history, (4, 4, 1), strict=True):
        row["stack_size"] = size
    s = summarize(history, {}, "max epochs")
    assert s["s_per_epoch"] == pytest.approx((2.0 + 2.0 + 2.0) / 3)
    assert s["total_seconds"] == pytest.approx(2.5 + 2.5 + 2.5)
    assert s["wall_seconds"] == pytest.approx(10.0 + 10.0 + 2.5)


def test_a_run_without_a_finished_epoch_has_no_epoch_fields_and_passes():
    s = summarize([], {}, "non-finite loss at epoch 1, step 3")
    assert not s.keys() & EPOCH_KEYS.keys()
    check_summary(s)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda s: s.pop("best_epoch"), "best_epoch is missing"),
        (lambda s: s.update(best_val_acc=True), "best_val_acc is missing or not a number"),
        (lambda s: s.update(epochs_run=-1), "epochs_run is missing or not a count"),
        (lambda s: s.update(stop_reason=3), "stop_reason is not text"),
        # Epochs run, but none of their fields: only a run of no epoch may lack them.
        (lambda s: [s.pop(key) for key in EPOCH_KEYS], "best_val_acc is missing"),
    ],
)
def test_check_names_the_first_field_the_report_could_not_use(damage, message):
    s = summarize([_row(1, 0.5, 0.5)], {}, "max epochs")
    damage(s)
    with pytest.raises(ValueError, match=message):
        check_summary(s)


def test_the_lines_that_close_a_run_count_one_epoch_in_the_singular(tmp_path):
    s = summarize([_row(1, 0.5, 0.4)], {}, "max epochs")
    assert ", 1 epoch, 2s; results in " in done_line(s, tmp_path)
    # A run of a stack of four: its share of the wall time, and that it is a share.
    stacked = summarize([_row(1, 0.5, 0.4, 8.0, 2.0) | {"stack_size": 4}], {"stack_size": 4}, "")
    assert ", 1 epoch, 2s (its share of 10s in a stack); results in " in done_line(
        stacked, tmp_path
    )
    spec = RunSpec(Cell("mnist", "dense"), "brainprop", 0, max_epochs=1)
    m = measurement(tmp_path, spec, "cpu", test_acc=0.5, best_epoch=1, epochs_run=1)
    assert ", 1 epoch, " in _finished_line(m)
    m = measurement(tmp_path, spec, "cpu", test_acc=0.5, best_epoch=1, epochs_run=2)
    assert ", 2 epochs, " in _finished_line(m)


def _source_of(monkeypatch, package):
    """:func:`devices.source_digest` and :func:`devices.source_commit` of ``package``, a folder
    standing in for brainprop's."""
    monkeypatch.setattr(devices, "_PACKAGE", package)
    devices.source_digest.cache_clear()
    devices.source_commit.cache_clear()
    return devices.source_digest(), devices.source_commit()


@pytest.fixture
def source_caches_cleared():
    """Left to later tests as they were: of brainprop's own folder."""
    yield
    devices.source_digest.cache_clear()
    devices.source_commit.cache_clear()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_the_software_a_run_records_tells_its_code_from_other_code(
    tmp_path, monkeypatch, source_caches_cleared
):
    """The version number alone, 0.1.0 through every commit, pooled numbers of other code
    (a review)."""
    package = tmp_path / "src" / "brainprop"
    (package / "data").mkdir(parents=True)
    assert _source_of(monkeypatch, package) == (None, None)  # no files (a zipped package)
    (package / "__init__.py").write_text("x = 1\n")
    (package / "data" / "idx.py").write_text("y = 2\n")
    # Emacs's lock of a file with unsaved edits, a link to nowhere: no module (a review).
    (package / ".#train.py").symlink_to("user@host.1234:1700000000")
    digest, commit = _source_of(monkeypatch, package)
    assert re.fullmatch("[0-9a-f]{16}", digest) and commit is None  # no checkout: no commit
    # Git as the developer's own hooks and settings leave it: a hook's GIT_INDEX_FILE would
    # have this test write that index, a global commit.gpgsign refuse its commit (a review).
    for name in [name for name in os.environ if name.startswith("GIT_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")

    def git(*args):
        return subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
            cwd=tmp_path, check=True, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip

    git("init", "-q")
    # An installed copy inside the checkout (a virtual environment's) is no checkout's code.
    installed = tmp_path / ".venv" / "brainprop"
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("x = 1\n")
    (tmp_path / ".gitignore").write_text(".venv/\n")
    git("add", "-A")
    git("commit", "-q", "-m", "first")
    head = git("rev-parse", "HEAD")
    assert _source_of(monkeypatch, package) == (digest, head)
    assert _source_of(monkeypatch, installed)[1] is None
    # Another checkout named by GIT_DIR (a hook's environment) is not the package's.
    monkeypatch.setenv("GIT_DIR", str(tmp_path / "elsewhere"))
    assert _source_of(monkeypatch, package) == (digest, head)
    monkeypatch.delenv("GIT_DIR")
    (package / "data" / "idx.py").write_text("y = 3\n")
    edited, dirty = _source_of(monkeypatch, package)
    assert edited != digest and dirty == f"{head}+dirty"
    # A file moved is other code too; a file added but not committed makes the tree dirty.
    (package / "data" / "idx.py").write_text("y = 2\n")
    (package / "data" / "idx.py").rename(package / "idx.py")
    assert _source_of(monkeypatch, package)[0] != digest
    (package / "idx.py").rename(package / "data" / "idx.py")
    (package / "new.py").write_text("")
    assert _source_of(monkeypatch, package)[1] == f"{head}+dirty"
    software = devices.software(torch.device("cpu"))
    assert software["brainprop_commit"] == f"{head}+dirty"
    assert software["brainprop_source"] == devices.source_digest() != digest
