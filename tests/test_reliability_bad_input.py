"""Bad input reaches the user as one line saying what is wrong and how to fix it, exit status 2.

The loaders' own messages are tested case by case in test_data_*.py; here every listed case goes
through the command line (or train() where the case needs a model), with the exact message.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_dataset
from data_fixtures import (
    cifar_pickle,
    idx_bytes,
    write_cifar10,
    write_idx_dataset,
    write_tiny_imagenet,
)
from memory_errors import OUT_OF_MEMORY
from reliability_helpers import one_thread, tiny_config

from brainprop import (
    TrainConfig,
    checkpoint,
    distributed,
    evaluate,
    evaluation,
    files,
    load_model,
    plugins,
    train,
    train_stacked,
)
from brainprop.cli import main
from brainprop.data import Dataset, load_dataset
from brainprop.errors import BrainPropError, unusable_path
from brainprop.provenance import check_same_data
from brainprop.train import check_batch

__all__ = ["one_thread"]  # the autouse fixture, imported to take effect here

# The fixtures' folder is the default data root: see tests/test_data_registry.py for the
# download advice of another root.
pytestmark = pytest.mark.usefixtures("default_root_here")


def _error(capsys, *argv: str | Path) -> str:
    """Run the CLI; assert it failed with exactly one line on stderr, and return that line."""
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert status == 2, (out, err)
    assert err.startswith("brainprop: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err.removeprefix("brainprop: error: ").rstrip("\n")


#: The float32 range that the step's learning rate and initialisation must lie in, and the fix.
FLOAT32 = "[1.175e-38, 3.403e+38], the float32 range training computes in"
IN_RANGE = ": pass a value in that range"


def _train(capsys, data: Path, *extra: str) -> str:
    return _error(capsys, "train", "--data-dir", data, "--out", data / "runs", "--epochs", "1",
                  "--quiet", *extra)  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished 1-epoch conv run on 8x8 images with 4 classes."""
    out = tmp_path_factory.mktemp("run")
    return train(tiny_config(out, epochs=1), dataset=make_tiny_dataset(), progress=False).dir


# --- hyperparameters ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lr", "0"], "--lr must be > 0, got 0.0"),
        (["--lr", "-0.1"], "--lr must be > 0, got -0.1"),
        # Python < 3.14's argparse took these for options: "expected one argument".
        (["--lr", "-1e-3"], "--lr must be > 0, got -0.001"),
        (["--lr", "-.5"], "--lr must be > 0, got -0.5"),
        (["--l2", "-5E-4"], "--l2 must be >= 0, got -0.0005"),
        (["--epsilon", "1.5"], "--epsilon must lie in [0, 1], got 1.5"),
        (["--epsilon", "-0.01"], "--epsilon must lie in [0, 1], got -0.01"),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--epochs", "0"], "--epochs must be >= 1, got 0"),
        (["--lr", "1e39"], f"--lr must lie in {FLOAT32}, got 1e+39{IN_RANGE}"),
        (["--lr", "1e308"], f"--lr must lie in {FLOAT32}, got 1e+308{IN_RANGE}"),
        (["--lr", "inf"], f"--lr must lie in {FLOAT32}, got inf{IN_RANGE}"),
        (["--lr", "1e-50"], f"--lr must lie in {FLOAT32}, got 1e-50{IN_RANGE}"),
        (["--init-std", "1e39"], f"--init-std must lie in {FLOAT32}, got 1e+39{IN_RANGE}"),
        (
            ["--l2", "2e38"],
            "--l2 must be 0 or lie in [5.877e-39, 1.701e+38] (SGD's float32 weight decay is "
            f"twice it), got 2e+38{IN_RANGE}",
        ),
        *(
            (
                ["--min-delta", value],
                f"--min-delta must lie in [0, 1), got {float(value)}: accuracies lie in [0, 1], "
                "so no epoch could improve by that much; the paper's is 0.001",
            )
            for value in ("inf", "1", "nan")
        ),
        (["--arch", "conv", "--dropout", "1.5"], "--dropout rates must lie in [0, 1), got 1.5"),
        # Read as an option, they were "expected one argument" (review).
        (["--lr", "-inf"], "--lr must be > 0, got -inf"),
        (["--epsilon", "-NaN"], "--epsilon must lie in [0, 1], got nan"),
        (
            ["--min-delta", "-0.1"],
            "--min-delta must be >= 0, got -0.1: it is the least gain in accuracy that counts "
            "as an improvement; the paper's is 0.001",
        ),
    ],
)
def test_nonsense_hyperparameters(tmp_path: Path, capsys, argv: list[str], message: str) -> None:
    assert _error(capsys, "train", "--out", tmp_path, *argv) == message
    assert not any(tmp_path.iterdir())  # refused before anything was written


HUGE = "99999999999999999999"  # beyond int64, where torch's split gave a traceback


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch-size", HUGE], f"--batch-size {HUGE} is"),
        (["--global-batch", HUGE], f"--global-batch {HUGE} is"),
        (["--batch-size", "7"], "--batch-size 7 is"),
    ],
)
def test_a_batch_larger_than_the_training_set_is_refused_before_the_run_starts(
    tmp_path: Path, capsys, argv: list[str], message: str
) -> None:
    write_idx_dataset(tmp_path / "mnist")
    assert _train(capsys, tmp_path, "--arch", "dense", *argv) == (
        f"{message} more than the 6 training images of mnist: pass at most 6"
    )
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("global_batch", "most"), [(None, 25), (128, 100)])
def test_the_largest_batch_offered_under_torchrun_is_one_that_is_accepted(global_batch, most):
    """A global batch must also split evenly over the processes: 101 images on 4 give 100."""
    sizes = {"batch_size": 32} if global_batch is None else {"global_batch": global_batch}
    config = TrainConfig(dataset="mnist", arch="dense", **sizes)
    with pytest.raises(BrainPropError, match=f"pass at most {most}$"):
        check_batch(config, 128, "mnist", 101, distributed.Context(world_size=4))


@pytest.mark.parametrize("world_size", [2, 4])
def test_a_batch_too_large_only_on_several_processes_says_how_they_make_it(world_size):
    config = TrainConfig(dataset="mnist", arch="dense", batch_size=64)
    parallel = distributed.Context(world_size=world_size)
    with pytest.raises(BrainPropError) as info:
        check_batch(config, 64 * world_size, "mnist", 101, parallel)
    assert str(info.value) == (
        f"--batch-size 64 on {world_size} processes makes {64 * world_size} images per step, "
        f"more than the 101 training images of mnist: pass at most {101 // world_size}"
    )


def test_a_run_stored_with_an_out_of_range_lr_resumes_to_a_one_line_error(
    tmp_path: Path, capsys
) -> None:
    # What earlier versions left: only config.json, then a traceback in torch's SGD.
    run = tmp_path / "run"
    run.mkdir()
    config = dataclasses.replace(tiny_config(tmp_path).resolve(), lr=1e39).to_dict()
    (run / "config.json").write_text(json.dumps(config))
    assert _error(capsys, "train", "--resume", run) == (
        f"{run / 'config.json'} holds an invalid config (--lr must lie in {FLOAT32}, got "
        f"1e+39{IN_RANGE})"
    )


def test_unknown_on_nan_choice(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["train", "--on-nan", "retry"])
    assert info.value.code == 2
    assert "argument --on-nan: invalid choice: 'retry'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "reproduce", "datasets"])
def test_an_unknown_option_points_to_its_commands_help(capsys, command) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--cuda-graphs"])
    assert info.value.code == 2
    assert capsys.readouterr().err == (
        f"brainprop: error: unrecognized arguments: --cuda-graphs (see 'brainprop {command} "
        "--help')\n"
    )


@pytest.mark.parametrize(
    ("argv", "told"),
    [(["train", "--max-epochs", "2"], "--max-epochs 2; train calls it --epochs"),
     (["reproduce", "--epochs=2"], "--epochs=2; reproduce calls it --max-epochs")],
)  # fmt: skip
def test_the_epoch_cap_spelled_as_the_other_command_spells_it_is_named(capsys, argv, told):
    """The issue and reproduce say --max-epochs, which train calls --epochs (review)."""
    with pytest.raises(SystemExit):
        main(argv)
    assert capsys.readouterr().err == (
        f"brainprop: error: unrecognized arguments: {told} (see 'brainprop {argv[0]} --help')\n"
    )


@pytest.mark.parametrize(
    ("argv", "told"),
    [
        (["--quiet", "train"], "--quiet must come after the command: 'brainprop train "
         "--quiet ...'"),
        # argparse took the value for a command: "invalid choice: '1'"
        (["--epochs", "1", "train"], "--epochs must come after the command: 'brainprop train "
         "--epochs 1 ...'"),
        (["--epochs=1", "train", "--quiet"], "--epochs=1 must come after the command: 'brainprop "
         "train --epochs=1 ...'"),
        # The command takes a unique prefix; before it, "invalid choice: '1'" again (review).
        (["--epo", "1", "train"], "--epo must come after the command: 'brainprop train "
         "--epo 1 ...'"),
        # A prefix of two of its options (--epochs, --epsilon): "invalid choice: '1'" (review).
        (["--ep", "1", "train"], "--ep must come after the command: 'brainprop train "
         "--ep 1 ...'"),
        # --plugin stays before the command, where the advice sent it after (review).
        (["--epochs", "1", "--plugin", "os.path", "train"], "--epochs must come after the "
         "command: 'brainprop --plugin os.path train --epochs 1 ...'"),
        (["--plugin=os.path", "--epochs", "1", "train"], "--epochs must come after the "
         "command: 'brainprop --plugin=os.path train --epochs 1 ...'"),
    ],
)  # fmt: skip
def test_an_option_before_the_command_is_told_where_it_goes(
    capsys, monkeypatch, argv, told
) -> None:
    # The plugin these load stays loaded for this test alone, as in a process of its own.
    monkeypatch.setattr(plugins, "_LOADED", [])
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert capsys.readouterr().err == (f"brainprop: error: {told} (see 'brainprop train --help')\n")


# --- dataset files -----------------------------------------------------------------------------


def test_missing_dataset_file(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "mnist"
    assert _train(capsys, tmp_path) == (
        f"MNIST file {folder / 'train-images-idx3-ubyte'}(.gz) is missing: put the four official "
        f"IDX files (gzipped or not) in {folder} or run 'brainprop download mnist'"
    )


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("t10k-images-idx3-ubyte", b"", "is empty (0 bytes)"),
        ("t10k-images-idx3-ubyte", b"\x00\x00\x08", "is truncated (3 bytes, no IDX header)"),
        (
            "train-images-idx3-ubyte",
            idx_bytes(np.zeros((6, 28, 28), np.uint8))[:1000],
            "is truncated (expected 4704 bytes of data for dimensions 6x28x28, got 984)",
        ),
        # Cut inside its dimensions: found before they are compared with 28x28.
        (
            "train-images-idx3-ubyte",
            idx_bytes(np.zeros((6, 28, 28), np.uint8))[:10],
            "is truncated (10 bytes, header needs 16)",
        ),
        (
            "train-images-idx3-ubyte",
            idx_bytes(np.zeros(6, np.uint8)),
            "has magic number 0x00000801, expected 0x00000803: it is not the right IDX file;",
        ),
    ],
)
def test_broken_idx_file(tmp_path: Path, capsys, name: str, content: bytes, message: str) -> None:
    write_idx_dataset(tmp_path / "mnist", gz=False)
    path = tmp_path / "mnist" / name
    path.write_bytes(content)
    error = _train(capsys, tmp_path)
    assert error.startswith(f"MNIST file {path} {message}")
    assert error.endswith("delete it and run 'brainprop download mnist'")


def test_wrong_idx_dims(tmp_path: Path, capsys) -> None:
    write_idx_dataset(tmp_path / "mnist", gz=False)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((6, 32, 32), np.uint8)))
    assert _train(capsys, tmp_path) == (
        f"MNIST file {path} holds 32x32 images, expected 28x28: delete it and run "
        "'brainprop download mnist'"
    )


def test_mismatched_image_and_label_count(tmp_path: Path, capsys) -> None:
    write_idx_dataset(tmp_path / "mnist", gz=False)
    folder = tmp_path / "mnist"
    (folder / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(5, np.uint8)))
    assert _train(capsys, tmp_path) == (
        f"MNIST train split has 6 images in {folder / 'train-images-idx3-ubyte'} but 5 labels in "
        f"{folder / 'train-labels-idx1-ubyte'}: delete both and run 'brainprop download mnist'"
    )


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({b"data": np.zeros((3, 3072), np.uint8)}, "has no b'labels' entry"),
        (
            {b"data": np.zeros((3, 1024), np.uint8), b"labels": [0, 1, 2]},
            "has b'data' of uint8 [3, 1024], expected uint8 [N, 3072]",
        ),
    ],
)
def test_cifar_missing_key_or_wrong_shape(tmp_path: Path, capsys, entries, message) -> None:
    write_cifar10(tmp_path)
    path = tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(cifar_pickle(entries))
    assert _train(capsys, tmp_path, "--dataset", "cifar10") == (
        f"CIFAR file {path} {message}: delete it and run 'brainprop download cifar10'"
    )


def _tiny_imagenet_error(capsys, root: Path) -> str:
    return _train(capsys, root, "--dataset", "tiny-imagenet", "--arch", "deep")


def test_tiny_imagenet_missing_val_annotations(tmp_path: Path, capsys) -> None:
    folder = write_tiny_imagenet(tmp_path)
    (folder / "val" / "val_annotations.txt").unlink()
    assert _tiny_imagenet_error(capsys, tmp_path) == (
        f"Tiny ImageNet file {folder / 'val' / 'val_annotations.txt'} is missing: the tree is "
        f"damaged; delete {folder} and run 'brainprop download tiny-imagenet'"
    )


def test_tiny_imagenet_unknown_wnid(tmp_path: Path, capsys) -> None:
    folder = write_tiny_imagenet(tmp_path)
    annotations = folder / "val" / "val_annotations.txt"
    annotations.write_text(annotations.read_text().replace("n04067472", "n99999999"))
    assert _tiny_imagenet_error(capsys, tmp_path).startswith(
        f"Tiny ImageNet file {annotations} line 3 names class 'n99999999', which is not in "
        "wnids.txt: the tree is damaged"
    )


def test_tiny_imagenet_corrupt_jpeg(tmp_path: Path, capsys) -> None:
    folder = write_tiny_imagenet(tmp_path)
    jpeg = folder / "train" / "n04067472" / "images" / "n04067472_1.JPEG"
    jpeg.write_bytes(jpeg.read_bytes()[:300])
    assert _tiny_imagenet_error(capsys, tmp_path).startswith(
        f"Tiny ImageNet image {jpeg} cannot be decoded ("
    )


def test_no_traceback_from_a_real_process(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(256))
    for argv in (["train", "--data-dir", tmp_path, "--out", tmp_path], ["evaluate", garbage]):
        done = subprocess.run([sys.executable, "-m", "brainprop", *map(str, argv)],
                              capture_output=True, text=True)  # fmt: skip
        assert done.returncode == 2
        assert done.stderr.startswith("brainprop: error: ") and done.stderr.count("\n") == 1


# --- checkpoints -------------------------------------------------------------------------------


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (lambda p: p.write_bytes(b""), "is empty (0 bytes), not a checkpoint: use another"),
        (lambda p: p.write_bytes(os.urandom(512)), "is not a"),
        (lambda p: p.write_text('{"model": {}}'), "is not a"),
        (
            lambda p: torch.save({"model": torch.zeros(3)}, p),
            "is not a brainprop checkpoint (no 'brainprop-checkpoint-1' marker): pass a file "
            "written by 'brainprop train'",
        ),
    ],
)
def test_not_a_checkpoint(tmp_path: Path, capsys, write, message: str) -> None:
    path = tmp_path / "x.pt"
    write(path)
    assert _error(capsys, "evaluate", path).startswith(f"{path} {message}")


def test_unreadable_checkpoint_is_not_called_damaged(tmp_path: Path, monkeypatch) -> None:
    # Tests may run as root, whom file modes do not stop: fail the read itself.
    path = tmp_path / "x.pt"
    torch.save({"format": checkpoint.FORMAT}, path)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(checkpoint.torch, "load", refuse)
    with pytest.raises(BrainPropError) as info:
        checkpoint.load(path)
    assert str(info.value) == (
        f"cannot read {path} (Permission denied): fix its permissions or copy it somewhere readable"
    )


@pytest.mark.parametrize("command", ["datasets", "train", "download"])
def test_a_data_folder_that_cannot_be_entered_is_one_line(tmp_path, capsys, monkeypatch, command):
    """pathlib's is_file() and exists() raise where a folder on the way may not be entered
    (review: a traceback from all three commands; then datasets listed no other dataset).
    Tests may run as root, whom file modes do not stop, so the check itself fails."""
    write_idx_dataset(tmp_path / "mnist")
    denied = tmp_path / "mnist"
    real_stat = Path.stat

    def stat(self, *args, **kwargs):
        if self.parent == denied:
            raise PermissionError(13, "Permission denied", str(self))
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", stat)
    fix = f"cannot look inside {denied} (Permission denied): check its permissions"
    if command == "datasets":
        assert main(["datasets", "--data-dir", str(tmp_path)]) == 0
        rows = capsys.readouterr().out.splitlines()
        assert f"mnist            unreadable {denied}  ({fix})" in rows
        assert any(row.startswith("cifar10 ") for row in rows)
        return
    argv = {"download": ["download", "mnist"],
            "train": ["train", "--dataset", "mnist", "--arch", "dense", "--epochs", "1",
                      "--out", tmp_path / "runs"]}[command]  # fmt: skip
    message = _error(capsys, *argv, "--data-dir", tmp_path)
    if command == "download":
        assert message == fix
    else:
        assert message.startswith(f"cannot open {denied / 'train-images-idx3-ubyte'} (Permission ")
        assert message.endswith("): check its permissions")


@pytest.mark.parametrize(
    ("failure", "message"),
    [
        (OSError(5, "Input/output error"), "cannot read {path} (Input/output error): the disk or "
         "network filesystem failed, not necessarily the file; check it and try again"),
        (MemoryError(), "not enough memory to load {path}: free some (other jobs on this "
         "machine), then try again"),
        (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
                      "can't allocate memory: you tried to allocate 150000000 bytes. Error code "
                      "12 (Cannot allocate memory)"),  # as torch 2.13 raises it
         "not enough memory to load {path}: free some (other jobs on this machine), then try "
         "again"),
    ],
    ids=["EIO", "MemoryError", "torch's allocator"],
)  # fmt: skip
def test_a_failed_read_does_not_call_a_checkpoint_damaged(tmp_path, monkeypatch, failure, message):
    # "Use another checkpoint or retrain" would have a user throw away a sound last.pt.
    path = tmp_path / "last.pt"
    checkpoint.save(path, {"format": checkpoint.FORMAT})

    def fail(*args, **kw):
        raise failure

    monkeypatch.setattr(checkpoint.torch, "load", fail)
    with pytest.raises(BrainPropError) as info:
        checkpoint.load(path)
    assert str(info.value) == message.format(path=path)


def test_a_checkpoint_cut_short_is_damaged_whatever_torch_raises(tmp_path: Path) -> None:
    # Cut inside its zip directory, a small checkpoint makes torch raise OSError (EINVAL),
    # which must not pass for an unreadable but sound file.
    path = tmp_path / "x.pt"
    checkpoint.save(path, {"format": checkpoint.FORMAT, "model": {"w": torch.zeros(1000)}})
    whole = path.read_bytes()
    for cut in (len(whole) * 9 // 10, len(whole) - 100, len(whole) // 2):
        path.write_bytes(whole[:cut])
        with pytest.raises(BrainPropError) as info:
            checkpoint.load(path)
        assert "is not a readable checkpoint" in str(info.value), cut


def test_a_checkpoint_with_a_changed_byte_is_refused_by_its_checksums(
    tmp_path: Path, capsys, run_dir: Path
) -> None:
    """torch's reader does not check the CRC-32 of its zip entries: a flipped bit in a weight
    was scored (10.5% on MNIST), and resumed from (review)."""
    whole = bytearray((run_dir / "best.pt").read_bytes())
    state = checkpoint.load(run_dir / "best.pt")
    weights = max(state["model"].values(), key=torch.Tensor.numel)
    at = bytes(whole).index(weights.numpy().tobytes()[:64]) + 5  # inside the largest tensor
    whole[at] ^= 0x10
    path = tmp_path / "flipped.pt"
    path.write_bytes(whole)
    error = _error(capsys, "evaluate", path)
    assert re.fullmatch(
        rf"{re.escape(str(path))} is damaged: its entry \S+/data/\d+ fails its checksum \(a byte "
        r"changed since it was written\); use another checkpoint or retrain",
        error,
    ), error


def test_a_checkpoint_is_written_with_checksums_and_read_without_them(tmp_path: Path) -> None:
    """Whatever the caller set: torch.serialization.set_crc32_options(False) wrote none, and a
    file written so, by torch.save, is still read."""
    options = torch.serialization
    if not hasattr(options, "set_crc32_options"):
        pytest.skip("torch before 2.6 always writes them")
    options.set_crc32_options(False)
    try:
        checkpoint.save(tmp_path / "mine.pt", {"model": {"w": torch.ones(4)}})
        torch.save({"format": checkpoint.FORMAT, "w": torch.ones(4)}, tmp_path / "theirs.pt")
    finally:
        options.set_crc32_options(True)
    with zipfile.ZipFile(tmp_path / "mine.pt") as archive:
        assert all(info.CRC for info in archive.infolist() if info.file_size)
    assert torch.equal(checkpoint.load(tmp_path / "theirs.pt")["w"], torch.ones(4))


def test_a_checkpoint_whose_config_is_refused_names_its_file(
    tmp_path: Path, capsys, run_dir: Path
) -> None:
    """The config's own words named no file (review)."""
    state = checkpoint.load(run_dir / "best.pt")
    state["config"]["momentum"] = 0.9
    path = tmp_path / "edited.pt"
    checkpoint.save(path, {k: v for k, v in state.items() if k != "format"})
    assert _error(capsys, "evaluate", path) == (
        f"{path}: config has unknown keys ['momentum']: it was written by another version"
    )


def test_weights_of_another_dtype_are_refused_not_scored(
    tmp_path: Path, capsys, run_dir: Path
) -> None:
    """load_state_dict converted them: int8 weights were scored as zeros (review)."""
    state = checkpoint.load(run_dir / "best.pt")
    key = next(k for k, t in state["model"].items() if t.is_floating_point())
    state["model"][key] = state["model"][key].to(torch.int8)
    path = tmp_path / "int8.pt"
    checkpoint.save(path, {k: v for k, v in state.items() if k != "format"})
    assert _error(capsys, "evaluate", path) == (
        f"{path} does not match its own architecture ({key} is torch.int8, not torch.float32): "
        "the checkpoint is damaged or from another version"
    )


def test_checkpoint_carrying_a_pickled_object_is_refused_unexecuted(tmp_path: Path, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.FORMAT, "model": _Exploit(marker)}, path)
    error = _error(capsys, "evaluate", path)
    assert error.startswith(
        f"{path} is not a safe brainprop checkpoint (it holds pickled objects: posix.system), "
        "so it was not loaded"
    )
    assert error.endswith("only load checkpoints written by brainprop")
    assert not marker.exists()
    with pytest.raises(BrainPropError):  # resume reads last.pt through the same loader
        checkpoint.load(path)
    assert not marker.exists()


def _rewritten(run_dir: Path, tmp_path: Path, **changes) -> Path:
    state = checkpoint.load(run_dir / "best.pt")
    state = {k: v for k, v in state.items() if k != "format"}
    for key, value in changes.items():
        if key in state["config"]:
            state["config"] = {**state["config"], key: value}
        else:
            state[key] = value
    path = tmp_path / "changed.pt"
    checkpoint.save(path, state)
    return path


def test_checkpoint_of_another_architecture(tmp_path: Path, capsys, run_dir: Path) -> None:
    path = _rewritten(run_dir, tmp_path, arch="dense", dropout=[])
    error = _error(capsys, "evaluate", path)
    assert error.startswith(f"{path} does not match its own architecture (")
    assert error.endswith("): the checkpoint is damaged or from another version")


def test_a_checkpoint_with_a_weight_its_network_lacks_names_it(
    tmp_path: Path, capsys, run_dir: Path
) -> None:
    """It said "Error(s) in loading state_dict for Sequential:", torch's headline alone."""
    state = checkpoint.load(run_dir / "best.pt")
    state["model"]["extra"] = torch.zeros(1)
    path = tmp_path / "extra.pt"
    checkpoint.save(path, {k: v for k, v in state.items() if k != "format"})
    assert _error(capsys, "evaluate", path) == (
        f'{path} does not match its own architecture (Unexpected key(s) in state_dict: "extra"): '
        "the checkpoint is damaged or from another version"
    )


@OUT_OF_MEMORY
def test_a_checkpoint_too_large_to_build_is_not_called_damaged(
    run_dir: Path, monkeypatch, out_of_memory
) -> None:
    error = out_of_memory()

    def full(*_args):
        raise error

    monkeypatch.setattr(evaluation, "_build", full)
    with pytest.raises(type(error)) as raised:  # which the CLI reports as such, in one line
        load_model(run_dir / "best.pt")
    assert raised.value is error


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        (dict(dropout=None), "the config has no dropout: resolve() fills it"),
        (dict(lr=None), "the config has no lr: resolve() fills it"),
        (dict(dropout=[0.1]), "'conv' has 2 dropout sites but 1 rates were given"),
        (dict(input_shape=[28, 28, 1]), "input shape (28, 28, 1) looks channels-last"),
    ],
)
def test_a_checkpoint_config_without_a_setting_is_damaged(
    tmp_path: Path, capsys, run_dir: Path, changes: dict, why: str
) -> None:
    """Reviews: its settings checked as one's own code's, they named no file and suggested a
    fix to code the user never wrote."""
    path = _rewritten(run_dir, tmp_path, **changes)
    error = _error(capsys, "evaluate", path)
    assert error.startswith(f"{path} does not match its own architecture ({why}")
    assert error.endswith("): the checkpoint is damaged or from another version")


@pytest.mark.parametrize(
    "shape", [[None, torch.zeros(3, 1)], [1, 28], [1, 28, True], [1, 0, 28], "1,28,28"]
)
def test_a_checkpoint_declaring_no_input_size_is_refused_in_one_line(
    tmp_path: Path, capsys, run_dir: Path, shape
) -> None:
    """Found by the fuzz test: the layers named a damaged shape by its repr, a tensor's over
    several lines."""
    path = _rewritten(run_dir, tmp_path, input_shape=shape)
    assert _error(capsys, "evaluate", path) == (
        f"{path} does not match its own architecture (its input_shape or num_classes is not a "
        "size): the checkpoint is damaged or from another version"
    )


@pytest.mark.parametrize("epoch", [torch.tensor(2), b"x", -1])
def test_a_checkpoint_whose_epoch_is_no_count_is_refused_in_one_line(
    tmp_path: Path, capsys, run_dir: Path, epoch
) -> None:
    """Scored, then a traceback from writing the result's JSON line (review)."""
    path = _rewritten(run_dir, tmp_path, epoch=epoch)
    assert _error(capsys, "evaluate", path) == (
        f"{path} does not match its own architecture (its epoch is not a count): the "
        "checkpoint is damaged or from another version"
    )


def test_checkpoint_declaring_a_huge_network_is_refused_before_building_it(
    tmp_path: Path, capsys, run_dir: Path
) -> None:
    path = _rewritten(run_dir, tmp_path, input_shape=[1, 60000, 60000])
    error = _error(capsys, "evaluate", path)
    declared = r"\(it declares [\d,]{14,} weights but holds [\d,]{7}\): the checkpoint"
    assert re.search(declared, error)


def test_checkpoint_for_another_number_of_classes(run_dir: Path) -> None:
    with pytest.raises(BrainPropError) as info:
        evaluate(run_dir, dataset=make_tiny_dataset(classes=3))
    assert str(info.value) == (
        f"{run_dir} was trained on inputs (1, 8, 8) with 4 classes, but the data has "
        "(1, 8, 8) with 3: evaluate it on the dataset it was trained on"
    )


@pytest.fixture(scope="module")
def fixture_run(tmp_path_factory) -> tuple[Path, Path]:
    """(data root holding MNIST-format fixture files, a 1-epoch dense run read from them)."""
    root = tmp_path_factory.mktemp("data")
    write_idx_dataset(root / "mnist", n_train=40, n_test=12)
    config = tiny_config(root, arch="dense", epochs=1, batch_size=8, data_dir=str(root))
    return root, train(config, progress=False).dir


def _evaluate_on_it(root: Path) -> str:
    return (
        f"evaluate it on the dataset it was trained on ('--data-dir {root}', the folder it was "
        "read from; data of one's own as evaluate(run, dataset=...))"
    )


def test_a_dataset_without_training_images_is_refused(tmp_path: Path) -> None:
    """It said '--batch-size 32 is more than the 0 training images of mnist'."""
    ds = make_tiny_dataset()
    empty = Dataset.test_only("mine", ds.test_x, ds.test_y, ds.num_classes)
    with pytest.raises(BrainPropError) as info:
        train(tiny_config(tmp_path, epochs=1), dataset=empty, progress=False)
    assert str(info.value) == (
        "dataset 'mine' holds no training images: train on one that has a training split"
    )
    assert not (tmp_path / "run").exists()


def test_a_run_on_data_of_ones_own_is_not_evaluated_on_its_datasets_files(
    fixture_run: tuple[Path, Path], tmp_path: Path
) -> None:
    """It is named for config.dataset: evaluate loaded that dataset's files and scored the
    network on them. Now it is refused before any file is read (none are where it would look)."""
    root, _ = fixture_run
    ds = dataclasses.replace(load_dataset("mnist", root), name="mine")
    config = tiny_config(tmp_path, arch="dense", epochs=1, batch_size=8)
    run = train(config, dataset=ds, progress=False).dir
    with pytest.raises(BrainPropError) as info:
        evaluate(run, data_dir=str(tmp_path))
    assert str(info.value) == (
        f"{run} was trained on data of one's own, 'mine', not on mnist's files, which "
        "brainprop would load: pass that data again, as evaluate(run, dataset=...) (from "
        "Python: the command line loads only the dataset the run's config names, mnist)"
    )
    assert evaluate(run, dataset=ds)["dataset"] == "mine"


@pytest.mark.parametrize(
    ("seed", "n_test", "given"),
    [
        (0, 10, "'mnist' (10 test images)"),
        (
            1,
            12,
            "'mnist' (12 test images) with other numbers of images per class (class 0: 0 test "
            "images then, 1 now)",
        ),
    ],
)
def test_other_files_in_the_runs_data_folder_are_refused(
    fixture_run: tuple[Path, Path], tmp_path: Path, seed: int, n_test: int, given: str
) -> None:
    """The message names the folder the run read: it said "the folder it was read from"
    (review). So does a resume's."""
    root, run = fixture_run
    other = tmp_path / "other"
    write_idx_dataset(other / "mnist", n_train=40, n_test=n_test, seed=seed)
    with pytest.raises(BrainPropError) as info:
        evaluate(run, data_dir=str(other))
    assert str(info.value) == (
        f"{run} was trained on 'mnist' (12 test images), but the data now is {given}: "
        f"{_evaluate_on_it(root)}"
    )
    config = TrainConfig.from_dict(json.loads((run / "config.json").read_text()))
    with pytest.raises(BrainPropError, match=f"'--data-dir {re.escape(str(root))}', the folder"):
        train(dataclasses.replace(config, epochs=2), resume=run, data_dir=str(other))


def test_data_of_other_classes_but_the_same_counts_is_one_line() -> None:
    """A restart before the first checkpoint compares the records alone: the checkpoint's
    classes are not there to compare first."""
    recorded = {"name": "mine", "train": [3, 3], "test": [2, 2]}
    train_x, test_x = torch.zeros(6, 1, 4, 4, dtype=torch.uint8), torch.ones(4, 1, 4, 4)
    ds = Dataset("mine", train_x, torch.arange(6) % 3, test_x.byte(), torch.arange(4) % 3, 3)
    with pytest.raises(BrainPropError) as info:
        check_same_data(recorded, ds, "run", "resume with its data", "train(dataset=...)")
    assert "with other numbers of images per class (2 classes then, 3 now): " in str(info.value)
    # A data root the shell would split is quoted, as in every command a message gives (review).
    with pytest.raises(BrainPropError) as info:
        check_same_data(recorded, ds, "run", "resume with its data", "train()", "/my data")
    assert str(info.value).endswith(
        "resume with its data ('--data-dir \"/my data\"', the folder it was read from; data of "
        "one's own as train())"
    )


def test_data_of_another_name_but_the_same_counts_is_one_line() -> None:
    """Two datasets may hold as many images per class (balanced ones): the name tells."""
    recorded = {"name": "mine", "train": [3, 3], "test": [2, 2]}
    train_x, test_x = torch.zeros(6, 1, 4, 4, dtype=torch.uint8), torch.ones(4, 1, 4, 4)
    ds = Dataset("theirs", train_x, torch.arange(6) % 2, test_x.byte(), torch.arange(4) % 2, 2)
    with pytest.raises(BrainPropError) as info:
        check_same_data(recorded, ds, "run", "resume with its data", "train(dataset=...)")
    assert str(info.value).startswith(
        "run was trained on 'mine' (6 training, 4 test images), but the data now is 'theirs' "
        "(6 training, 4 test images): resume with its data"
    )


def test_the_same_files_elsewhere_and_in_another_order_are_the_same_data(
    fixture_run: tuple[Path, Path], tmp_path: Path
) -> None:
    """Copies of CIFAR-10 may hold its images in another order (this project's does)."""
    root, run = fixture_run
    ds = load_dataset("mnist", root)
    order = torch.randperm(len(ds.test_y), generator=torch.Generator().manual_seed(1))
    moved = tmp_path / "moved" / "mnist"
    moved.mkdir(parents=True)
    for name, array in (
        ("train-images-idx3-ubyte", ds.train_x[:, 0]),
        ("train-labels-idx1-ubyte", ds.train_y.to(torch.uint8)),
        ("t10k-images-idx3-ubyte", ds.test_x[order, 0]),
        ("t10k-labels-idx1-ubyte", ds.test_y[order].to(torch.uint8)),
    ):
        (moved / name).write_bytes(idx_bytes(array.numpy()))
    assert evaluate(run, data_dir=str(moved.parent)) == evaluate(run)


def test_a_checkpoint_from_before_the_data_was_recorded_is_evaluated(
    fixture_run: tuple[Path, Path], tmp_path: Path
) -> None:
    root, run = fixture_run
    other = tmp_path / "other"
    write_idx_dataset(other / "mnist", n_train=40, n_test=10)
    state = checkpoint.load(run / "best.pt")
    assert state["data"]["name"] == "mnist"
    path = tmp_path / "old.pt"
    checkpoint.save(path, {k: v for k, v in state.items() if k not in ("data", "format")})
    assert evaluate(path, data_dir=str(other))["test_size"] == 10


@pytest.mark.parametrize(
    "data",
    [
        "mnist",
        {"name": "mnist", "train": [1, 2], "test": [1, 2, 3, 4]},
        {"name": 3},
        {"name": "mnist", "train": [1, 2, 3, 4], "test": None},
    ],
)
def test_a_damaged_record_of_the_data_is_refused(tmp_path: Path, fixture_run, data) -> None:
    _, run = fixture_run
    path = _rewritten(run, tmp_path, data=data)
    with pytest.raises(BrainPropError) as info:
        evaluate(path)
    assert str(info.value) == (
        f"{path} records the data it was trained on in a damaged form: it is damaged or from "
        "another version; use another checkpoint, or start a new run"
    )


def test_a_run_without_best_pt_yet_is_named_as_such(tmp_path: Path, capsys, run_dir: Path) -> None:
    """A run stopped inside its first epoch, or killed as its first epoch's end was written
    (last.pt first), has last.pt (or nothing) but no best.pt yet. The command it suggests
    quotes a folder the shell would split."""
    run = tmp_path / "my run"
    shutil.copytree(run_dir, run)
    (run / "best.pt").unlink()
    assert _error(capsys, "evaluate", run) == (
        f"{run} has no best.pt yet: evaluate its latest state, {run / 'last.pt'}, or continue it "
        f"with 'brainprop train --resume \"{run}\"', which writes it"
    )
    assert evaluate(run / "last.pt", dataset=make_tiny_dataset())["epoch"] == 1
    (run / "last.pt").unlink()
    assert _error(capsys, "evaluate", run) == (
        f"{run} has no best.pt: it ended before an epoch did (summary.json says why), so there "
        "is nothing to evaluate"
    )
    for name in ("history.json", "history.csv", "summary.json"):
        (run / name).unlink()
    assert _error(capsys, "evaluate", run) == (
        f"{run} has no best.pt yet, as no epoch of it has ended: continue it with "
        f"'brainprop train --resume \"{run}\"'"
    )
    assert _error(capsys, "evaluate", "") == (
        "the checkpoint to evaluate is empty: pass a run directory or a .pt"
    )
    # "no checkpoint at .../best.pt: pass a run directory", for the folder passed (review).
    (run / "config.json").unlink()
    assert _error(capsys, "evaluate", run) == (
        f"{run} is no run directory (it has no config.json): pass a folder that 'brainprop "
        "train' made, or a .pt file"
    )


def test_a_run_stands_for_its_directory(tmp_path: Path) -> None:
    ds = make_tiny_dataset()
    run = train(tiny_config(tmp_path, epochs=1), dataset=ds, progress=False)
    assert evaluate(run, dataset=ds) == evaluate(run.dir, dataset=ds)
    assert load_model(run)[1]["epoch"] == 1
    # Finished: a resume gives the run back as it ended.
    assert train(resume=run, dataset=ds, progress=False).summary == run.summary
    assert train_stacked([run], dataset=ds, progress=False)[0].summary == run.summary


def test_arguments_of_the_wrong_kind_are_one_line(tmp_path: Path) -> None:
    """They were an AttributeError or TypeError from deep inside, or (a folder's name given as
    the stack) "run directory / is given twice" (a helper's walkthrough)."""
    ds, config = make_tiny_dataset(), tiny_config(tmp_path, epochs=1)
    dataset_kind = "takes dataset= a brainprop.Dataset (load_dataset(name) gives one, Dataset(...)"
    calls = [
        (lambda: train({"dataset": "mnist"}), "train takes a TrainConfig, not a dict: "
         "TrainConfig(dataset=..., arch=...) makes one, TrainConfig(**d) one of a dict"),
        (lambda: train("mnist"), "train takes a TrainConfig, not a str: "),
        (lambda: train(config, dataset="mnist"),
         f"train {dataset_kind} makes one of tensors), not a str; a dataset's name goes in the "
         "config"),
        (lambda: evaluate(tmp_path, dataset=ds.test_x), f"evaluate {dataset_kind}"),
        (lambda: evaluate(3), "the checkpoint to evaluate must be a path (text, a Path or a Run), "
         "not an int: pass a run directory or a .pt"),
        (lambda: train(resume=5), "--resume must be a path (text, a Path or a Run), not an int: "
         "pass the run directory to continue"),
        (lambda: train_stacked(str(tmp_path)), "train_stacked takes a list of members, each a "
         "TrainConfig or a run directory, not a str alone: pass [it], or train it alone"),
        (lambda: train_stacked(config), "not a TrainConfig alone"),
        (lambda: train_stacked(5), "train_stacked takes a list of members, each a TrainConfig or "
         "a run directory, not an int: pass a list of them"),
        (lambda: train_stacked([config, 5]), "a member of the stack must be a path (text, a Path "
         "or a Run), not an int: give each member as a TrainConfig or a run directory"),
        (lambda: train_stacked([config], dataset=(ds.train_x, ds.train_y)),
         f"train_stacked {dataset_kind}"),
    ]  # fmt: skip
    for call, said in calls:
        with pytest.raises(BrainPropError, match=re.escape(said)):
            call()
    assert not list(tmp_path.iterdir())


# --- the out directory and the disk ------------------------------------------------------------


def test_out_directory_that_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(BrainPropError) as info:
        train(tiny_config(blocker / "runs"), dataset=make_tiny_dataset(), progress=False)
    assert str(info.value) == (
        f"cannot write runs under {blocker / 'runs'} (Not a directory): pass a writable --out "
        "folder"
    )


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("file", "cannot write runs under {} (Not a directory): pass a writable --out folder"),
        ("file/sub", "cannot write runs under {} (Not a directory): pass a writable --out folder"),
        ("", "--out is empty: pass the folder for run directories, e.g. runs"),
    ],
)
def test_an_out_folder_that_cannot_be_written_is_refused_before_the_data_loads(
    tmp_path: Path, capsys, out: str, message: str
) -> None:
    (tmp_path / "file").write_text("not a folder")
    out_dir = tmp_path / out if out else ""
    # No data at all: the data's own error would come first if the data were loaded first.
    argv = ["train", "--data-dir", tmp_path, "--out", out_dir, "--quiet"]
    assert _error(capsys, *argv) == message.format(out_dir)
    assert _error(capsys, *argv, "--name", "") == (
        "--name must be one folder name (no '/' or control characters, at most 250 bytes), got "
        "'': pass e.g. --name my-run"
    )


@pytest.mark.parametrize("name", ["a/b", "..", "x" * 251, "two\nlines", "bell\a"])
def test_a_name_that_is_not_one_folder_is_refused_before_anything_is_written(
    tmp_path: Path, name: str
) -> None:
    (tmp_path / "runs" / "a").mkdir(parents=True)  # so "a/b" would have made a folder
    with pytest.raises(BrainPropError) as info:
        train(tiny_config(tmp_path / "runs", name=name), dataset=make_tiny_dataset(),
              progress=False)  # fmt: skip
    assert str(info.value) == (
        f"--name must be one folder name (no '/' or control characters, at most 250 bytes), got "
        f"{name!r}: pass e.g. --name my-run"
    )
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["a"]
    assert not any((tmp_path / "runs" / "a").iterdir())


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_directory(tmp_path: Path) -> None:
    out = tmp_path / "ro"
    out.mkdir(mode=0o500)
    with pytest.raises(BrainPropError, match=r"cannot write runs under .* \(Permission denied\)"):
        train(tiny_config(out), dataset=make_tiny_dataset(), progress=False)


def test_full_disk_is_detected_before_the_run_starts(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(
        "brainprop.rundir.shutil.disk_usage", lambda _p: type("U", (), {"free": 2**20})()
    )
    with pytest.raises(BrainPropError) as info:
        train(tiny_config(tmp_path / "runs"), dataset=make_tiny_dataset(), progress=False)
    assert str(info.value).startswith(
        f"only 1.0 MiB free in {tmp_path / 'runs'}, and the checkpoints of this run need about "
    )
    assert str(info.value).endswith("MiB: free disk space or pass another --out folder")
    assert not (tmp_path / "runs").exists()


def test_a_new_run_needs_room_for_four_checkpoints(tmp_path: Path, monkeypatch) -> None:
    """last.pt, best.pt, a stop's epoch_start.pt and a last.pt being written: room for three
    (and the 1 MiB of history and plots each is allowed) is refused, for four and a half
    taken."""
    sized = train(tiny_config(tmp_path, epochs=1, name="sized"), dataset=make_tiny_dataset(),
                  progress=False)  # fmt: skip
    one = (sized.dir / "last.pt").stat().st_size + 2**20
    for free, starts in ((3 * one, False), (4.5 * one, True)):
        monkeypatch.setattr(
            "brainprop.rundir.shutil.disk_usage", lambda _p, f=free: type("U", (), {"free": f})()
        )
        config = tiny_config(tmp_path, epochs=1, name=f"free-{starts}")
        if starts:
            train(config, dataset=make_tiny_dataset(), progress=False)
        else:
            with pytest.raises(BrainPropError, match="free disk space or pass another --out"):
                train(config, dataset=make_tiny_dataset(), progress=False)


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path: Path, monkeypatch):
    fsync, last_writes = os.fsync, []

    def fills_up(fd: int) -> None:
        if ".last.pt." in os.readlink(f"/proc/self/fd/{fd}"):
            last_writes.append(fd)
            if len(last_writes) == 2:  # epoch 2's checkpoint finds the disk full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    monkeypatch.setattr(files.os, "fsync", fills_up)
    with pytest.raises(BrainPropError) as info:
        train(tiny_config(tmp_path), dataset=make_tiny_dataset(), progress=False)
    last = tmp_path / "run" / "last.pt"
    assert str(info.value) == (
        f"cannot write {last} (No space left on device); last.pt keeps its previous content: "
        "free disk space or fix the folder's permissions, then continue the run with "
        f"'brainprop train --resume {last.parent}', or, where "
        "'brainprop reproduce' started it, with the same reproduce command"
    )
    assert checkpoint.load(last)["epoch"] == 1
    assert not list(last.parent.glob(".*.tmp"))


@pytest.mark.parametrize("code", [errno.EIO, errno.EINVAL])
def test_a_folder_that_fails_to_sync_is_an_error_unless_it_cannot_sync(
    tmp_path: Path, monkeypatch, code: int
) -> None:
    """EINVAL: a filesystem that cannot sync a folder, where the rename is as durable as it
    gets; EIO: a disk that may have lost it, which the user must hear of."""
    fsync = os.fsync

    def folder_fails(fd: int) -> None:
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(code, os.strerror(code))
        fsync(fd)

    monkeypatch.setattr(files.os, "fsync", folder_fails)
    path = tmp_path / "results.json"
    if code == errno.EINVAL:
        files.atomic_write_text(path, "{}")
    else:
        with pytest.raises(BrainPropError) as info:
            files.atomic_write_text(path, "{}")
        assert str(info.value) == (
            f"cannot sync {tmp_path} to disk (Input/output error): the new results.json may not "
            "survive a crash; check the disk, then run the command again"
        )
    assert path.read_text() == "{}"


def test_a_failed_write_outside_a_run_says_to_run_the_command_again(tmp_path: Path) -> None:
    def full(f) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(BrainPropError) as info:
        files.atomic_write(tmp_path / "bench.json", full)
    assert str(info.value) == (
        f"cannot write {tmp_path / 'bench.json'} (No space left on device); nothing was written: "
        "free disk space or fix the folder's permissions, then run the command again"
    )
    assert not list(tmp_path.iterdir())


# --- the command line's paths and output -------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["reproduce", "--out", ""],
        ["reproduce", "--report-only", "--readme", ""],
        # Cheap settings: were the path taken, a whole default bench would run.
        ["bench", "--presets", "mnist/dense", "--steps", "1", "--out", ""],
    ],
)
def test_an_empty_path_option_is_refused(capsys, argv) -> None:
    # Path("") is the working folder: reproduce wrote its results there, and --readme '' was
    # accepted and ignored.
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1
    assert f"argument {argv[-2]}: expected a path, got an empty value" in err


@pytest.mark.parametrize(
    "argv",
    [["train", "--arch", "dense", "--epochs", "1", "--out", "{long}"],
     ["train", "--arch", "dense", "--epochs", "1", "--data-dir", "{long}", "--out", "{tmp}"],
     ["datasets", "--data-dir", "{long}"],
     ["evaluate", "{long}"],
     ["train", "--resume", "{long}"],
     ["reproduce", "--report-only", "--out", "{long}"]],
)  # fmt: skip
def test_a_name_too_long_for_the_system_is_one_line(tmp_path, capsys, argv) -> None:
    """pathlib's exists() and is_dir() raise it (Python 3.11): it was a traceback (review)."""
    long = tmp_path / ("y" * 300)
    said = _error(capsys, *(a.format(long=long, tmp=tmp_path) for a in argv))
    # reproduce names the folder it looks for in it.
    assert said.startswith(f"cannot use {long}") and said.endswith(
        " (File name too long): pass a path whose every name is at most 255 bytes"
    )


def test_a_path_too_long_in_all_is_told_to_be_shorter(tmp_path, capsys) -> None:
    """Its every name within the limit, it was told to keep each name to 255 bytes (review)."""
    deep = tmp_path.joinpath(*["d" * 250] * 18)
    assert _error(capsys, "datasets", "--data-dir", deep) == (
        f"cannot use {deep} (File name too long): pass a shorter path"
    )


def test_a_file_opened_through_a_loop_of_links_is_one_line() -> None:
    e = OSError(errno.ELOOP, "Too many levels of symbolic links", "/data/mnist/x.gz")
    assert unusable_path(e) == (
        "cannot use /data/mnist/x.gz (Too many levels of symbolic links): pass a path without a "
        "loop of symbolic links"
    )
    assert unusable_path(OSError(errno.EIO, "Input/output error", "/x")) is None


def test_a_symbolic_link_that_leads_nowhere_is_named_not_called_a_file(tmp_path, capsys) -> None:
    """mkdir calls it "File exists" (review)."""
    write_idx_dataset(tmp_path / "mnist")
    (tmp_path / "runs").symlink_to(tmp_path / "gone")
    argv = ["train", "--arch", "dense", "--batch-size", "4", "--data-dir", tmp_path]
    said = _error(capsys, *argv, "--out", tmp_path / "runs")
    assert said == (
        f"cannot write runs under {tmp_path / 'runs'} ({tmp_path / 'runs'} is a symbolic link to "
        f"{tmp_path / 'gone'}, which leads nowhere): pass a writable --out folder"
    )
    said = _error(capsys, "download", "fashion-mnist", "--data-dir", tmp_path / "runs")
    assert f"({tmp_path / 'runs'} is a symbolic link to {tmp_path / 'gone'}, which leads" in said
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    said = _error(capsys, *argv, "--out", tmp_path / "a")
    assert f"{tmp_path / 'a'} is a symbolic link to {tmp_path / 'b'}, which leads into a" in said


def test_a_plugin_path_that_is_a_folder_or_a_loop_of_links_is_one_line(tmp_path, capsys) -> None:
    (tmp_path / "folder.py").mkdir()
    assert _error(capsys, "--plugin", tmp_path / "folder.py", "train") == (
        f"--plugin {tmp_path / 'folder.py'}: a folder, not a .py file"
    )
    (tmp_path / "a.py").symlink_to(tmp_path / "b.py")
    (tmp_path / "b.py").symlink_to(tmp_path / "a.py")
    said = _error(capsys, "--plugin", tmp_path / "a.py", "train")
    assert said.startswith(f"--plugin {tmp_path / 'a.py'}: cannot follow it (")
    assert said.endswith("): pass a .py file")


@pytest.mark.parametrize(
    ("argv", "said"),
    [(["download", "mnst"], "unknown dataset 'mnst': choose one of "),
     (["reproduce", "--datasets", "MNIST"], "dataset 'MNIST' is not in the paper's matrix: "),
     (["reproduce", "--archs", "dens"], "arch 'dens' is not in the paper's matrix: ")],
)  # fmt: skip
def test_a_misspelt_dataset_or_arch_of_the_matrix_is_told_the_one_meant(capsys, argv, said):
    error = _error(capsys, *argv)
    meant = "dense" if "dens" in argv else "mnist"
    assert error.startswith(said) and error.endswith(f"; did you mean {meant!r}?")


def test_an_empty_resume_is_refused(capsys) -> None:
    assert _error(capsys, "train", "--resume", "") == (
        "--resume is empty: pass the run directory to continue"
    )


def test_a_relative_data_dir_is_stored_as_the_folder_it_named(tmp_path, monkeypatch) -> None:
    # Resumed or evaluated from another folder, "data" would name that folder's data.
    monkeypatch.chdir(tmp_path)
    assert TrainConfig(data_dir="data").resolve().data_dir == str(tmp_path / "data")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert TrainConfig(data_dir="~/d").resolve().data_dir == str(tmp_path / "home" / "d")
    assert TrainConfig().resolve().data_dir is None  # the default root, found when it is read


def test_a_closed_output_pipe_ends_in_one_line(tmp_path) -> None:
    read, write = os.pipe()
    os.close(read)  # 'brainprop ... | head -c0': the reader is gone before the first line
    try:
        done = subprocess.run(
            [sys.executable, "-m", "brainprop", "datasets", "--data-dir", str(tmp_path)],
            stdout=write, stderr=subprocess.PIPE, timeout=120,
        )  # fmt: skip
    finally:
        os.close(write)
    assert done.stderr == b"brainprop: stopped: the output's reader went away (a closed pipe)\n"
    assert done.returncode == 128 + 13  # SIGPIPE


def test_a_run_whose_output_pipe_closed_resumes(tmp_path) -> None:
    write_idx_dataset(tmp_path / "mnist", n_train=40, n_test=12)
    argv = [sys.executable, "-m", "brainprop", "train", "--dataset", "mnist", "--arch", "dense",
            "--epochs", "1", "--batch-size", "8", "--data-dir", str(tmp_path), "--out",
            str(tmp_path / "runs"), "--name", "run"]  # fmt: skip
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(argv, stdout=write, stderr=subprocess.PIPE, timeout=300)
    finally:
        os.close(write)
    assert done.returncode == 128 + 13, done.stderr
    run = tmp_path / "runs" / "run"
    assert not (run / "summary.json").exists()
    # Where the run is and how to go on, as a signal's stop says (review).
    assert done.stderr.decode() == (
        "brainprop: stopped: the output's reader went away (a closed pipe); no checkpoint was "
        f"written yet, so a resume starts over: continue with 'brainprop train --resume {run}'\n"
    )
    again = subprocess.run(
        [*argv[:4], "--resume", str(run), "--quiet"], capture_output=True, timeout=300
    )
    assert again.returncode == 0, again.stderr
    assert json.loads((run / "summary.json").read_text())["epochs_run"] == 1
