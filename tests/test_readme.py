"""The README's (and docs') library examples run as written and build what their comments say."""

import json
import os
import re
import shlex
import subprocess
import sys

import torch
from data_fixtures import REPO, write_idx_dataset
from torch import nn

from brainprop import (
    ARCHITECTURES,
    DATASETS,
    OBJECTIVES,
    PAPER,
    PATHWAYS,
    PRESETS,
    TrainConfig,
    build_model,
    load_dataset,
)
from brainprop.cli import build_parser


def _block_after(text: str, marker: str) -> str:
    """The first fenced python block after ``marker`` in ``text``."""
    rest = text[text.index(marker) :]
    match = re.search(r"```python\n(.*?)```", rest, re.DOTALL)
    assert match, f"no python block after {marker!r}"
    return match.group(1)


def test_the_pieces_example_runs_and_builds_the_published_network(monkeypatch) -> None:
    # The committed MNIST files, wherever the environment points the data root.
    monkeypatch.setenv("BRAINPROP_DATA", str(REPO / "data"))
    code = _block_after((REPO / "README.md").read_text(), "The pieces are usable on their own")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert torch.isfinite(scope["out"].loss)
    assert all(p.grad is not None for p in scope["model"].parameters())
    published = build_model("conv", (1, 28, 28), 10, PAPER["mnist", "conv"])

    def dropout(model: nn.Module) -> list[float]:
        return [m.p for m in model.modules() if isinstance(m, nn.Dropout)]

    assert dropout(scope["model"]) == dropout(published) == [0.3, 0.3]


def test_the_readme_table_of_presets_is_the_paper_table() -> None:
    """The README copies brainprop.presets.PAPER by hand: its rows must say what PAPER holds,
    row for row, and the networks' sizes as built."""
    text = (REPO / "README.md").read_text()
    start = text.index("| dataset | arch | lr | batch | σ | L2 | dropout | trainable parameters |")
    rows = text[start:].split("\n\n")[0].splitlines()[2:]
    datasets = {"MNIST": ("mnist",), "CIFAR-10 / CIFAR-100": ("cifar10", "cifar100"),
                "Tiny ImageNet": ("tiny-imagenet",)}  # fmt: skip
    shapes = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32), "cifar100": (3, 32, 32),
              "tiny-imagenet": (3, 64, 64)}  # fmt: skip
    classes = {"mnist": 10, "cifar10": 10, "cifar100": 100, "tiny-imagenet": 200}
    seen = set()
    for row in rows:
        name, arch, lr, batch, sigma, l2, dropout, params = (
            cell.strip() for cell in row.strip("|").split("|")
        )
        for family, count in zip(datasets[name], params.split(" / "), strict=True):
            hp = PAPER[family, arch]
            assert (float(lr), int(batch), float(sigma)) == (hp.lr, hp.batch_size, hp.init_std)
            assert (0.0 if l2 == "–" else float(l2)) == hp.l2, row
            assert dropout == (", ".join(map(str, hp.dropout)) or "–"), row
            model = build_model(arch, shapes[family], classes[family], hp)
            assert int(count.replace(",", "")) == sum(p.numel() for p in model.parameters()), row
            seen.add((family, arch))
    assert seen == set(PAPER)


def test_the_command_line_examples_parse() -> None:
    """Each line of the README's command-line block names options the parser has."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Command line\n\n```bash\n(.*?)```", text, re.DOTALL)
    assert block, "no command-line block"
    parsed = 0
    for line in block.group(1).splitlines():
        words = shlex.split(line.split("  #")[0])
        words = words[words.index("brainprop") + 1 :]
        if "--help" in words or "--plugin" in words:  # help exits; a plugin needs its file
            continue
        args = build_parser().parse_args(words)
        assert args.command in words, line
        parsed += 1
    assert parsed >= 10


def test_the_extending_example_trains_a_new_rule_on_a_new_network(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("BRAINPROP_DATA", str(REPO / "data"))
    monkeypatch.chdir(tmp_path)  # where its run directory goes
    code = _block_after((REPO / "README.md").read_text(), "### Extending")
    registries = (OBJECTIVES, ARCHITECTURES, PRESETS)
    before = [set(r) for r in registries]
    scope: dict = {}
    try:
        exec(compile(code, "README.md", "exec"), scope)
    finally:
        for registry, kept in zip(registries, before, strict=True):
            for name in set(registry) - kept:
                del registry[name]
    run = scope["run"]
    assert run.config.rule == "squared-error" and run.config.lr == 0.05
    assert run.summary["epochs_run"] == 2 and run.summary["best_val_acc"] > 0.9
    assert [type(m).__name__ for m in run.model] == [
        "Flatten", "Linear", "ReLU", "Dropout", "Linear"
    ]  # fmt: skip


def test_the_extending_example_as_a_plugin_trains_and_evaluates_from_the_command(tmp_path) -> None:
    """In a command started afresh, as a user runs it: its registrations come from the file."""
    text = (REPO / "README.md").read_text()
    code = _block_after(text, "### Extending")
    (tmp_path / "mylab.py").write_text(code[: code.index("run = train(")])
    rest = text[text.index("Saved in a file of their own") :]
    block = re.search(r"```bash\n(.*?)```", rest, re.DOTALL)
    assert block, "no bash block after the plugin paragraph"
    train_line, evaluate_line = block.group(1).splitlines()
    env = {**os.environ, "BRAINPROP_DATA": str(REPO / "data")}

    def command(line: str, *extra: str) -> subprocess.CompletedProcess:
        words = line.split()
        assert words[:3] == ["brainprop", "--plugin", "mylab.py"], line
        argv = [sys.executable, "-m", "brainprop", *words[1:], *extra]
        return subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True)

    trained = command(train_line, "--epochs", "1", "--quiet", "--device", "cpu")
    assert trained.returncode == 0, trained.stderr
    summary = json.loads(trained.stdout.splitlines()[-1])
    assert summary["epochs_run"] == 1 and summary["best_val_acc"] > 0.8
    (run_dir,) = (tmp_path / "runs").iterdir()
    evaluated = command(evaluate_line.replace("runs/<run-dir>", str(run_dir)))
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout.splitlines()[-1])["test_acc"] == summary["test_acc_at_best"]


def test_the_dataset_example_registers_permuted_mnist(monkeypatch) -> None:
    monkeypatch.setenv("BRAINPROP_DATA", str(REPO / "data"))
    code = _block_after((REPO / "README.md").read_text(), "Data of one's own is")
    try:
        exec(compile(code, "README.md", "exec"), {})
        permuted, mnist = load_dataset("permuted-mnist", test_only=True), load_dataset("mnist")
        assert TrainConfig(dataset="permuted-mnist", arch="dense").resolve().init_std == 0.01
    finally:
        DATASETS.pop("permuted-mnist", None)
    assert permuted.name == "permuted-mnist" and len(permuted.train_y) == 0
    assert torch.equal(permuted.test_y, mnist.test_y)
    # One shuffle of the pixels, the same for every image.
    pixels = mnist.test_x.flatten(1)
    order = torch.randperm(28 * 28, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(permuted.test_x.flatten(1), pixels)
    assert torch.equal(permuted.test_x.flatten(1), pixels[:, order])


def test_the_dataset_example_added_to_the_plugin_trains_from_the_command(tmp_path) -> None:
    text = (REPO / "README.md").read_text()
    lab = _block_after(text, "### Extending")
    data = _block_after(text, "Data of one's own is")
    (tmp_path / "mylab.py").write_text(lab[: lab.index("run = train(")] + data)
    rest = text[text.index("Added to `mylab.py` above") :]
    block = re.search(r"```bash\n(.*?)```", rest, re.DOTALL)
    assert block, "no bash block after the dataset example"
    words = block.group(1).split()
    assert words[:3] == ["brainprop", "--plugin", "mylab.py"]
    argv = [sys.executable, "-m", "brainprop", *words[1:], "--epochs", "1", "--quiet"]
    env = {**os.environ, "BRAINPROP_DATA": str(REPO / "data")}
    trained = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert trained.returncode == 0, trained.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert json.loads((run_dir / "data.json").read_text())["name"] == "permuted-mnist"
    assert json.loads(trained.stdout.splitlines()[-1])["best_val_acc"] > 0.8


def test_the_pathway_example_of_the_biology_notes_trains(monkeypatch, tmp_path) -> None:
    # The example as written, on a few images in MNIST's files: on all of them it took 27 s.
    write_idx_dataset(tmp_path / "data" / "mnist", n_train=256, n_test=64)
    monkeypatch.setenv("BRAINPROP_DATA", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    code = _block_after((REPO / "docs" / "biology.md").read_text(), "### A pathway of one's own")
    before = set(PATHWAYS)
    scope: dict = {}
    try:
        exec(compile(code, "docs/biology.md", "exec"), scope)
    finally:
        for name in set(PATHWAYS) - before:
            del PATHWAYS[name]
    run = scope["run"]
    assert run.config.feedback == "noisy" and run.summary["epochs_run"] == 1
    # B is W plus a tenth of its spread in noise: close to W, not equal to it.
    assert all(0 < run.history[0][f"angle_wb/{i}"] < 20 for i in (1, 3, 5, 7))
