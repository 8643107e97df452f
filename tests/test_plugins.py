"""``brainprop --plugin``: registrations of one's own reach the command and its worker
processes; a plugin that cannot be imported is one line."""

import json
import sys
from pathlib import Path

import pytest
from data_fixtures import write_idx_dataset

from brainprop import (
    ARCHITECTURES,
    DATASETS,
    OBJECTIVES,
    PATHWAYS,
    PRESETS,
    TrainConfig,
    devices,
    plugins,
)
from brainprop.cli import main
from brainprop.errors import BrainPropError
from brainprop.experiments import Request, reproduce
from brainprop.matrix import Cell, plan
from brainprop.measurements import load_measurements

PLUGIN = """
from brainprop import ARCHITECTURES, EBP, OBJECTIVES, PRESETS, Hyperparameters

IMPORTS = globals().get("IMPORTS", 0) + 1


def tiny(net, num_classes, dropout):
    net.flatten()
    net.dense(32)
    net.dense(num_classes, relu=False)


OBJECTIVES["ebp-too"] = lambda epsilon, fused: EBP()
ARCHITECTURES["tiny"] = (tiny, 0)
PRESETS["mine"] = {
    ("mnist", "tiny"): Hyperparameters(lr=0.05, batch_size=16),
    ("mnist", "dense"): Hyperparameters(lr=0.05, batch_size=16, init_std=0.03),
}
"""

DATA_PLUGIN = """
import dataclasses

from brainprop import DATASETS, DatasetEntry, load_dataset


def load_small(root, test_only):
    ds = load_dataset("mnist", root, test_only=test_only)
    return dataclasses.replace(ds, name="mnist-small", train_x=ds.train_x[:48],
                               train_y=ds.train_y[:48])


def load_misnamed(root, test_only):
    return load_dataset("mnist", root, test_only=test_only)


DATASETS["mnist-small"] = DatasetEntry(load_small, family="mnist")
DATASETS["misnamed"] = DatasetEntry(load_misnamed, family="cifar10")
"""


@pytest.fixture(autouse=True)
def registries():
    """What a test's plugins register is gone after it, as in a fresh process."""
    kept = [(r, dict(r)) for r in (OBJECTIVES, ARCHITECTURES, PRESETS, PATHWAYS, DATASETS)]
    loaded, modules = list(plugins._LOADED), set(sys.modules)
    yield
    for registry, before in kept:
        for name in set(registry) - set(before):
            del registry[name]
    plugins._LOADED[:] = loaded
    for name in set(sys.modules) - modules:
        if name.startswith("lab"):
            del sys.modules[name]


@pytest.fixture
def data_dir(tmp_path):
    write_idx_dataset(tmp_path / "data" / "mnist", n_train=64, n_test=32)
    return tmp_path / "data"


@pytest.fixture
def plugin(tmp_path):
    path = tmp_path / "lab.py"
    path.write_text(PLUGIN)
    return path


def _train(data_dir, out, *extra):
    return ["train", "--dataset", "mnist", "--epochs", "1", "--data-dir", str(data_dir),
            "--out", str(out), "--name", "run", "--quiet", *extra]  # fmt: skip


def test_a_plugin_file_registers_a_rule_a_network_and_a_preset_for_the_command(
    plugin, data_dir, tmp_path, capsys
):
    args = _train(data_dir, tmp_path / "runs", "--arch", "tiny", "--preset", "mine", "--rule",
                  "ebp-too")  # fmt: skip
    assert main(["--plugin", str(plugin), *args]) == 0
    config = json.loads((tmp_path / "runs" / "run" / "config.json").read_text())
    assert (config["arch"], config["rule"], config["lr"]) == ("tiny", "ebp-too", 0.05)
    capsys.readouterr()
    assert main(["--plugin", str(plugin), "evaluate", str(tmp_path / "runs" / "run")]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["test_size"] == 32


@pytest.fixture
def data_plugin(tmp_path):
    path = tmp_path / "lab_data.py"
    path.write_text(DATA_PLUGIN)
    return path


def _train_small(data_dir, run):
    """train's arguments for one epoch of the data plugin's dataset into the folder ``run``."""
    return ["train", "--dataset", "mnist-small", "--arch", "dense", "--batch-size", "16",
            "--epochs", "1", "--data-dir", str(data_dir), "--out", str(run.parent),
            "--name", run.name, "--quiet"]  # fmt: skip


def _forget_data_plugin():
    """As in a command started afresh: without the data plugin's registrations and module."""
    del DATASETS["mnist-small"], DATASETS["misnamed"], sys.modules["lab_data"]
    plugins._LOADED.clear()


def test_a_plugin_dataset_trains_resumes_and_evaluates_by_its_name(
    tmp_path, data_plugin, data_dir, capsys
):
    run = tmp_path / "runs" / "run"
    args = _train_small(data_dir, run)
    assert main(["--plugin", str(data_plugin), *args]) == 0
    assert json.loads((run / "config.json").read_text())["dataset"] == "mnist-small"
    data = json.loads((run / "data.json").read_text())
    assert (data["name"], sum(data["train"]), sum(data["test"])) == ("mnist-small", 48, 32)
    capsys.readouterr()
    _forget_data_plugin()
    resume = ["train", "--resume", str(run), "--epochs", "2", "--quiet"]
    for argv in (resume, ["evaluate", str(run)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "unknown dataset 'mnist-small': choose one of " in err
        assert err.rstrip().endswith("with 'brainprop --plugin MODULE'"), err
    with pytest.raises(SystemExit, match="2"):
        main(args)
    assert "invalid choice: 'mnist-small'" in capsys.readouterr().err
    assert main(["--plugin", str(data_plugin), *resume]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["epochs_run"] == 2
    assert main(["--plugin", str(data_plugin), "evaluate", str(run)]) == 0
    scores = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (scores["dataset"], scores["test_size"]) == ("mnist-small", 32)


def test_a_plugin_dataset_takes_its_familys_rows_and_is_loaded_under_its_own_name(
    tmp_path, data_plugin, data_dir, capsys
):
    plugins.load(str(data_plugin))
    assert TrainConfig(dataset="misnamed", arch="deep").resolve().l2 == 5e-4  # CIFAR-10's row
    with pytest.raises(BrainPropError, match="no 'deep' network for mnist-small: choose --arch "):
        TrainConfig(dataset="mnist-small", arch="deep").resolve()
    out = tmp_path / "runs"
    argv = ["train", "--dataset", "misnamed", "--arch", "conv", "--epochs", "1", "--data-dir",
            str(data_dir), "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        "brainprop: error: DATASETS['misnamed'].load returned a Dataset named 'mnist': name it "
        "'misnamed', as runs that load it by that name record it\n"
    )
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["reproduce", "--datasets", "mnist-small"],
         "dataset 'mnist-small' is not in the paper's matrix: choose from "),
        (["bench", "--presets", "mnist-small/dense"], "preset 'mnist-small/dense' is not "
         "dataset/arch with one of brainprop's datasets, whose sizes bench times on random "),
        (["download", "mnist-small"], "'mnist-small' is a dataset of one's own, whose files its "
         "loader reads: brainprop fetches and checks only its own, mnist, "),
    ],
)  # fmt: skip
def test_a_plugin_dataset_is_no_cell_of_the_paper_nor_files_brainprop_fetches(
    data_plugin, capsys, argv, message
):
    assert main(["--plugin", str(data_plugin), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_datasets_lists_a_plugin_dataset_after_the_files_brainprop_checks(
    data_plugin, data_dir, capsys
):
    assert main(["--plugin", str(data_plugin), "datasets", "--data-dir", str(data_dir)]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert [r.split()[0] for r in rows[-3:]] == ["tiny-imagenet", "mnist-small", "misnamed"]
    assert rows[-2] == (
        f"mnist-small      own        loaded by DATASETS['mnist-small'].load from "
        f"{data_plugin.resolve()}  (mnist's settings; its loader reads and checks its files)"
    )


def test_a_long_name_of_ones_own_widens_the_name_column_for_every_row(
    data_plugin, data_dir, capsys, monkeypatch
):
    main(["--plugin", str(data_plugin), "datasets", "--data-dir", str(data_dir)])
    capsys.readouterr()
    monkeypatch.setitem(DATASETS, "small-shuffled-mnist", DATASETS["mnist-small"])
    assert main(["datasets", "--data-dir", str(data_dir)]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert rows[0].startswith("mnist                 present ")
    assert rows[-1].startswith("small-shuffled-mnist  own ")
    # The state column starts at one offset in every row.
    assert len({len(r) - len(r[r.index(" ") :].lstrip()) for r in rows}) == 1


def test_a_plan_of_a_cell_outside_the_paper_names_the_matrix_not_the_preset(data_plugin):
    """As reproduce's Python API takes it: a registered dataset takes the rows of a family the
    paper's table has, and a built-in cell outside the matrix has no row."""
    plugins.load(str(data_plugin))
    for cell in (Cell("mnist-small", "dense"), Cell("mnist", "deep")):
        with pytest.raises(BrainPropError) as info:
            plan([cell])
        assert str(info.value).startswith(
            f"{cell.dataset}/{cell.arch} is no cell of the paper's matrix, which is mnist/dense, "
        )


def test_a_plugin_dataset_that_loads_other_data_now_is_named_as_the_cause(
    tmp_path, data_plugin, data_dir, capsys
):
    run = tmp_path / "runs" / "run"
    args = _train_small(data_dir, run)
    assert main(["--plugin", str(data_plugin), *args]) == 0
    capsys.readouterr()
    data_plugin.write_text(DATA_PLUGIN.replace("[:48]", "[:40]"))
    _forget_data_plugin()
    resume = ["train", "--resume", str(run), "--epochs", "2"]
    assert main(["--plugin", str(data_plugin), *resume]) == 2
    assert capsys.readouterr().err.endswith(
        "was trained on 'mnist-small' (48 training, 32 test images), but the data now is "
        "'mnist-small' (40 training, 32 test images): resume with the dataset it was trained "
        "on (its loader, DATASETS['mnist-small'].load, must load what it loaded then)\n"
    )


def test_a_run_resumes_with_its_own_settings_after_its_dataset_moved_to_another_family(
    tmp_path, data_plugin, data_dir
):
    """Its config.json holds every setting: the row it came from is needed no more (CIFAR-10's
    family has no dense row), as a fresh run of the same config would need it."""
    run = tmp_path / "runs" / "run"
    assert main(["--plugin", str(data_plugin), *_train_small(data_dir, run)]) == 0
    before = json.loads((run / "config.json").read_text())
    data_plugin.write_text(DATA_PLUGIN.replace('small, family="mnist"', 'small, family="cifar10"'))
    _forget_data_plugin()
    resume = ["train", "--resume", str(run), "--epochs", "2", "--quiet"]
    assert main(["--plugin", str(data_plugin), *resume]) == 0
    assert json.loads((run / "config.json").read_text()) == before | {"epochs": 2}
    with pytest.raises(BrainPropError, match="no 'dense' network for mnist-small"):
        TrainConfig(dataset="mnist-small", arch="dense").resolve()


def test_a_run_resumes_with_its_own_settings_after_its_preset_row_was_removed(
    plugin, data_dir, tmp_path
):
    args = _train(data_dir, tmp_path / "runs", "--arch", "dense", "--preset", "mine")
    assert main(["--plugin", str(plugin), *args]) == 0
    plugin.write_text(PLUGIN.replace('("mnist", "dense")', '("mnist", "dense-old")'))
    del PRESETS["mine"], sys.modules["lab"]
    plugins._LOADED.clear()
    run = tmp_path / "runs" / "run"
    resume = ["train", "--resume", str(run), "--epochs", "2", "--quiet"]
    assert main(["--plugin", str(plugin), *resume]) == 0
    config = json.loads((run / "config.json").read_text())
    assert (config["lr"], config["init_std"], config["epochs"]) == (0.05, 0.03, 2)


def test_a_module_is_imported_once_however_often_it_is_named(plugin, monkeypatch):
    (plugin.parent / "sub").mkdir()
    monkeypatch.chdir(plugin.parent / "sub")
    monkeypatch.syspath_prepend(str(plugin.parent))
    plugins.load_all([str(plugin), "../lab.py", "lab", str(plugin)])
    assert sys.modules["lab"].IMPORTS == 1
    assert plugins.loaded() == (str(plugin), "lab")
    # By module name first, then by path: the same file still.
    del sys.modules["lab"]
    plugins._LOADED.clear()
    plugins.load_all(["lab", str(plugin)])
    assert sys.modules["lab"].IMPORTS == 1


def test_a_module_on_the_path_is_imported_by_name(plugin, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin.parent))
    plugins.load("lab")
    assert "tiny" in ARCHITECTURES and plugins.loaded()[-1] == "lab"


def test_an_unregistered_name_says_how_to_register_it(data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit, match="2"):
        main(_train(data_dir, tmp_path / "runs", "--rule", "ebp-too"))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice: 'ebp-too'" in err
    assert err.rstrip().endswith("with 'brainprop --plugin MODULE' (see 'brainprop train --help')")
    with pytest.raises(BrainPropError, match="unknown rule 'ebp-too': .*--plugin MODULE'$"):
        TrainConfig(rule="ebp-too").resolve()


def test_a_run_of_a_plugin_network_evaluated_without_it_names_the_plugin_option(
    plugin, data_dir, tmp_path, capsys
):
    args = _train(data_dir, tmp_path / "runs", "--arch", "tiny", "--preset", "mine")
    assert main(["--plugin", str(plugin), *args]) == 0
    del ARCHITECTURES["tiny"]  # as in a command started afresh
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "runs" / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown architecture 'tiny'" in err, err
    assert "'brainprop --plugin MODULE'" in err


@pytest.mark.parametrize(
    ("source", "argv", "message"),
    [
        (None, ["--plugin", "{dir}/none.py", "datasets"], "--plugin {dir}/none.py: no such file"),
        (None, ["--plugin", "lab_nowhere", "datasets"],
         "--plugin lab_nowhere: no module of that name on Python's path: pass the path of its "
         ".py file instead"),
        (None, ["--plugin", "{dir}/lab.txt", "datasets"], "a plugin file is Python source"),
        ("x = 1 / 0\n", ["--plugin={dir}/lab.py", "datasets"],
         "--plugin {dir}/lab.py failed as it was imported: ZeroDivisionError: division by zero "
         "({dir}/lab.py:1)"),
        ("import lab_missing_dependency\n", ["--plugin", "{dir}/lab.py", "datasets"],
         "failed as it was imported: ModuleNotFoundError: No module named "
         "'lab_missing_dependency' ({dir}/lab.py:1)"),
        ("\n\nx = (\n", ["--plugin", "{dir}/lab.py", "datasets"],
         "failed as it was imported: SyntaxError: '(' was never closed (lab.py, line 3)"),
        ("from brainprop import PATHWAYS\nPATHWAYS['direct'] = None\n",
         ["--plugin", "{dir}/lab.py", "datasets"], "PATHWAYS"),
        (None, ["datasets", "--plugin", "x"], "--plugin must come before the command"),
        (None, ["--plugin", "datasets"], "--plugin takes a module name or the path of a .py file"),
        (None, ["--plugin"], "--plugin takes a module name or the path of a .py file"),
        (None, ["--plugin=", "datasets"], "--plugin takes a module name or the path of a .py file"),
        ("import sys\nsys.exit(0)\n", ["--plugin", "{dir}/lab.py", "datasets"],
         "--plugin {dir}/lab.py exited (sys.exit(0)) as it was imported"),
        # Abbreviated, it would be read by argparse alone, after the command's choices were made.
        (None, ["--plug", "{dir}/lab.py", "datasets"], "--plug: write --plugin in full"),
    ],
)  # fmt: skip
def test_a_plugin_that_cannot_be_imported_is_one_line(tmp_path, capsys, source, argv, message):
    if source is not None:
        (tmp_path / "lab.py").write_text(source)
    argv = [a.format(dir=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.format(dir=tmp_path) in err, err
    assert "lab" not in sys.modules


def test_reproduce_workers_import_the_plugins_of_the_command(plugin, tmp_path, monkeypatch):
    """A worker is a process of its own: without the plugin there, its run of the plugin's
    rule or preset table would fail as it started."""
    monkeypatch.setattr(devices, "usable_cpus", lambda: 2)
    write_idx_dataset(tmp_path / "data" / "mnist", n_train=32, n_test=16)
    plugins.load(str(plugin))
    request = Request(
        cells=(Cell("mnist", "dense"),), rules=("ebp-too", "ebp"), seeds=1, max_epochs=1,
        preset="mine", out=tmp_path / "r", data_dir=str(tmp_path / "data"), device="cpu",
        jobs=2, progress=False,
    )  # fmt: skip
    outcome = reproduce(request, say=lambda _: None)
    assert sorted(outcome.ran) == ["mnist-dense-ebp-s0-mine-e1", "mnist-dense-ebp-too-s0-mine-e1"]
    assert {m.preset for m in load_measurements(request.out)} == {"mine"}
    report = (request.out / "results.md").read_text()
    assert "| MNIST dense, rule ebp-too, mine settings |" in report


def test_a_plugin_file_named_as_another_module_is_refused(tmp_path, capsys):
    """Registered under its name, it would stand in for that module wherever it was imported
    later: tabnanny, of the standard library, is imported by nothing here."""
    (tmp_path / "tabnanny.py").write_text(PLUGIN)
    assert "tabnanny" not in sys.modules
    assert main(["--plugin", str(tmp_path / "tabnanny.py"), "datasets"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the name 'tabnanny' is another module's (" in err, err
    assert err.rstrip().endswith("; rename the file") and "tiny" not in ARCHITECTURES


def test_a_plugin_file_named_as_a_built_in_module_is_refused(tmp_path, capsys):
    """A built-in module has no file to name beside the refusal."""
    name = next(n for n in sys.builtin_module_names if n not in sys.modules and n.isidentifier())
    (tmp_path / f"{name}.py").write_text(PLUGIN)
    assert main(["--plugin", str(tmp_path / f"{name}.py"), "datasets"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"brainprop: error: --plugin {tmp_path / name}.py: the name {name!r} is another "
        "module's; rename the file\n"
    )


def test_a_plain_folder_of_the_files_name_on_the_path_is_no_module_it_would_hide(
    plugin, monkeypatch, capsys
):
    """A folder with no __init__.py (a project's lab/ beside the working folder, on the path
    under ``python -m``) imports as a namespace package that loads nothing."""
    (plugin.parent / "src").mkdir()
    moved = plugin.rename(plugin.parent / "src" / plugin.name)
    (plugin.parent / "lab").mkdir()
    monkeypatch.syspath_prepend(str(plugin.parent))
    assert main(["--plugin", str(moved), "datasets"]) == 0, capsys.readouterr().err
    assert "tiny" in ARCHITECTURES


@pytest.mark.parametrize("name", [".rules", "lab rules", "os.path.x.y", "os.foo"])
def test_what_is_no_module_name_or_no_module_is_said_so(name, capsys):
    assert main(["--plugin", name, "datasets"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "importlib" not in err, err
    said = "not a module name" if " " in name or name.startswith(".") else "no module of that"
    assert err.startswith(f"brainprop: error: --plugin {name}: {said}"), err


def test_a_module_name_of_a_file_in_the_working_folder_is_told_to_pass_the_file(
    plugin, monkeypatch, capsys
):
    monkeypatch.chdir(plugin.parent)  # not on sys.path, as for the installed command
    assert main(["--plugin", "lab", "datasets"]) == 2
    assert "--plugin lab: no module of that name on Python's path: pass ./lab.py (" in (
        capsys.readouterr().err
    )


def test_a_plugin_that_registers_a_name_an_earlier_one_did_is_refused(tmp_path, capsys):
    """The command would run the later one's dataset without a word."""
    for name in ("lab_a", "lab_b"):
        (tmp_path / f"{name}.py").write_text(
            "from brainprop import DATASETS, DatasetEntry, load_dataset\n"
            "def load(root, test_only):\n"
            "    return load_dataset('mnist', root, test_only=test_only)\n"
            "DATASETS['twice'] = DatasetEntry(load, family='mnist')\n"
        )
    a, b = str(tmp_path / "lab_a.py"), str(tmp_path / "lab_b.py")
    assert main(["--plugin", a, "--plugin", b, "datasets"]) == 2
    assert capsys.readouterr().err == (
        f"brainprop: error: --plugin {b} registers DATASETS['twice'], which --plugin {a} "
        "registered too: the command would run the last one's; rename one\n"
    )
    # As in a command started afresh: one module named twice is imported once.
    del DATASETS["twice"], sys.modules["lab_a"], sys.modules["lab_b"]
    plugins._LOADED.clear()
    assert main(["--plugin", a, "--plugin", a, "datasets"]) == 0
    # What was registered before this command's plugins (here by a's, as by a script of one's
    # own) a plugin may replace.
    assert main(["--plugin", b, "datasets"]) == 0
    assert DATASETS["twice"].load.__module__ == "lab_b"


def test_a_ctrl_c_while_a_plugin_is_imported_is_an_interruption(tmp_path, capsys):
    (tmp_path / "lab.py").write_text("raise KeyboardInterrupt\n")
    assert main(["--plugin", str(tmp_path / "lab.py"), "datasets"]) == 130
    assert capsys.readouterr().err == "brainprop: interrupted\n"


def test_a_plugin_run_resumes_with_its_plugin_and_without_it_says_what_is_missing(
    plugin, data_dir, tmp_path, capsys
):
    args = _train(data_dir, tmp_path / "runs", "--rule", "ebp-too", "--batch-size", "16")
    assert main(["--plugin", str(plugin), *args]) == 0
    # As in a command started afresh.
    del OBJECTIVES["ebp-too"], sys.modules["lab"]
    plugins._LOADED.clear()
    run = tmp_path / "runs" / "run"
    resume = ["train", "--resume", str(run), "--epochs", "2", "--quiet"]
    assert main(resume) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"brainprop: error: {run / 'config.json'}: unknown rule 'ebp-too': ")
    assert err.count("\n") == 1 and "invalid config" not in err, err
    assert main(["--plugin", str(plugin), *resume]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["epochs_run"] == 2


def test_a_suggested_resume_of_a_plugin_run_names_the_plugins_it_needs(
    plugin, data_dir, tmp_path, capsys
):
    args = _train(data_dir, tmp_path / "runs", "--rule", "ebp-too", "--batch-size", "16")
    assert main(["--plugin", str(plugin), *args]) == 0
    run = tmp_path / "runs" / "run"
    (run / "best.pt").unlink()  # as a run stopped inside its first epoch has none
    capsys.readouterr()
    assert main(["--plugin", str(plugin), "evaluate", str(run)]) == 2
    resume = f"'brainprop --plugin {plugin.resolve()} train --resume {run}'"
    err = capsys.readouterr().err.rstrip()
    assert err.endswith(f"or continue it with {resume}, which writes it")


FLAKY_PLUGIN = """
from torch import nn

from brainprop import ARCHITECTURES, EBP, OBJECTIVES, PRESETS, Hyperparameters


class Mine(EBP):
    pass


class Flaky(nn.Module):
    calls = 0

    def forward(self, x):
        if self.training:
            Flaky.calls += 1
            if Flaky.calls == 7:
                raise ValueError("flaky")
        return x


def flaky(net, num_classes, dropout):
    net.flatten()
    net.add(Flaky())
    net.dense(num_classes, relu=False)


OBJECTIVES["mine"] = lambda epsilon, fused: Mine()
ARCHITECTURES["flaky"] = (flaky, 0)
PRESETS["flaky"] = {("mnist", "flaky"): Hyperparameters(batch_size=16)}
"""


def test_a_plugins_code_that_fails_later_in_a_run_is_one_line_naming_the_plugin_to_resume_with(
    data_dir, tmp_path, capsys
):
    """A rule and a network in one file: the network's line is named as the network's. Four
    steps an epoch: the seventh forward pass in training is in epoch 2."""
    lab = tmp_path / "lab_flaky.py"
    lab.write_text(FLAKY_PLUGIN)
    args = _train(data_dir, tmp_path / "runs", "--rule", "mine", "--arch", "flaky", "--preset",
                  "flaky", "--epochs", "3")  # fmt: skip
    assert main(["--plugin", str(lab), *args]) == 2
    run = tmp_path / "runs" / "run"
    line = FLAKY_PLUGIN.splitlines().index('                raise ValueError("flaky")') + 1
    resume = f"'brainprop --plugin {lab.resolve()} train --resume {run}'"
    assert capsys.readouterr().err == (
        f"brainprop: error: network 'flaky' failed in epoch 2: ValueError: flaky ({lab}:{line}): "
        f"fix it; {run / 'last.pt'} keeps the last good state: continue with {resume}\n"
    )


def test_a_module_of_a_package_is_imported_and_its_packages_errors_are_its_own(
    tmp_path, monkeypatch, capsys
):
    for package, init in (("labpkg", ""), ("labbroken", "import lab_missing_dependency\n")):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text(init)
        (tmp_path / package / "rules.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins.load("labpkg.rules")
    assert "tiny" in ARCHITECTURES
    assert main(["--plugin", "labnowhere.rules", "datasets"]) == 2
    assert "--plugin labnowhere.rules: no module of that name" in capsys.readouterr().err
    assert main(["--plugin", "labbroken.rules", "datasets"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "--plugin labbroken.rules failed as it was imported: ModuleNotFoundError: " in err
    assert f"({tmp_path / 'labbroken' / '__init__.py'}:1)" in err


def test_the_resume_command_a_stop_suggests_launches_the_processes_the_run_had(monkeypatch):
    """Under torchrun it suggested 'brainprop train --resume RUN', one process: another global
    batch and other random streams (review)."""
    monkeypatch.setattr(plugins, "_LOADED", ["lab.py"])
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    run = Path("runs/a b")
    assert plugins.resume_command(run) == (
        "'brainprop --plugin lab.py train --resume \"runs/a b\"'"
    )
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert plugins.resume_command(run, "/data") == (
        "'torchrun --standalone --nproc_per_node=4 -m brainprop --plugin lab.py train --resume "
        '"runs/a b" --data-dir /data\''
    )
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert plugins.resume_command(run) == (
        "'torchrun ... -m brainprop --plugin lab.py train --resume \"runs/a b\"' on each of the "
        "job's nodes, with its 4 processes as before"
    )
