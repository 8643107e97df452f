"""The command line, end to end on tiny data in the official formats."""

import dataclasses
import importlib
import inspect
import json
import os
import signal
import subprocess
import sys
import types

import pytest
import torch
from data_fixtures import write_idx_dataset
from memory_errors import CPU_ALLOCATOR, ENFORCED, OUT_OF_MEMORY

import brainprop
from brainprop import bench, checkpoint, cli, experiments
from brainprop.cli import OFF_CONFIG_OPTIONS, build_parser, main
from brainprop.config import TrainConfig
from brainprop.devices import MEMORY_DETAIL_CHARS, out_of_memory


@pytest.fixture
def data_dir(tmp_path):
    write_idx_dataset(tmp_path / "data" / "mnist", n_train=64, n_test=32)
    return tmp_path / "data"


def _train_args(data_dir, out, *extra):
    return ["train", "--dataset", "mnist", "--arch", "conv", "--epochs", "2", "--batch-size", "16",
            "--data-dir", str(data_dir), "--out", str(out), "--name", "cli", *extra]  # fmt: skip


def test_train_then_evaluate(data_dir, tmp_path, capsys):
    assert main(_train_args(data_dir, tmp_path / "runs")) == 0
    out = capsys.readouterr().out
    assert "epoch   2/2" in out and "done (max epochs)" in out
    run = tmp_path / "runs" / "cli"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs_run"] == 2
    for path in (data_dir / "mnist").glob("train-*"):
        path.unlink()  # scoring reads the test files alone
    moved = data_dir.rename(tmp_path / "moved")  # found only through --data-dir
    assert main(["evaluate", str(run), "--data-dir", str(moved)]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["test_acc"] == summary["test_acc_at_best"] and result["test_size"] == 32


def test_eager_is_recorded_with_the_run(data_dir, tmp_path):
    assert main(_train_args(data_dir, tmp_path / "runs", "--eager", "--quiet")) == 0
    assert json.loads((tmp_path / "runs" / "cli" / "config.json").read_text())["eager"] is True


def test_resume_from_the_command_line(data_dir, tmp_path, capsys):
    assert main(_train_args(data_dir, tmp_path / "runs")) == 0
    run = tmp_path / "runs" / "cli"
    assert main(["train", "--resume", str(run), "--epochs", "3", "--quiet"]) == 0
    line = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert line["epochs_run"] == 3 and line["run_dir"] == str(run)
    code = _exit_code(lambda: main(["train", "--resume", str(run), "--lr", "0.2", "--device",
                                    "cpu", "--epochs", "4"]))  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "--lr, --device would be ignored: drop them (only --epochs may change)" in err
    # Given at its default value, an option is as much a setting the run would not take.
    code = _exit_code(lambda: main(["train", "--resume", str(run), "--arch", "conv", "--seed",
                                    "0", "--val", "test", "--epochs", "4"]))  # fmt: skip
    assert code == 2 and "--arch, --val, --seed would be ignored" in capsys.readouterr().err


def test_a_run_stopped_on_a_nan_exits_with_its_own_status(data_dir, tmp_path, capsys):
    # At this rate the first update overflows the weights: the loss is inf within epoch 1.
    status = main(_train_args(data_dir, tmp_path / "runs", "--lr", "1e30"))
    assert status == cli.EXIT_DIVERGED != 0
    assert "stopped: the loss became NaN or inf at epoch 1" in capsys.readouterr().out
    summary = json.loads((tmp_path / "runs" / "cli" / "summary.json").read_text())
    assert summary["stop_reason"].startswith("non-finite loss at epoch 1")


def test_resume_reads_data_that_moved_from_data_dir(data_dir, tmp_path, capsys):
    assert main(_train_args(data_dir, tmp_path / "runs", "--quiet")) == 0
    run = tmp_path / "runs" / "cli"
    moved = data_dir.rename(tmp_path / "moved")
    assert main(["train", "--resume", str(run), "--epochs", "3", "--quiet"]) == 2
    assert f"data folder {data_dir} does not exist: pass the folder" in capsys.readouterr().err
    assert json.loads((run / "config.json").read_text())["epochs"] == 2  # a failed resume
    resumed = ["train", "--resume", str(run), "--epochs", "3", "--data-dir", str(moved), "--quiet"]
    assert main(resumed) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["epochs_run"] == 3


def test_an_older_run_that_stored_an_empty_data_dir_resumes(data_dir, tmp_path, monkeypatch):
    assert main(_train_args(data_dir, tmp_path / "runs", "--quiet")) == 0
    run = tmp_path / "runs" / "cli"
    config = json.loads((run / "config.json").read_text()) | {"data_dir": ""}
    (run / "config.json").write_text(json.dumps(config))
    last = checkpoint.load(run / "last.pt")
    checkpoint.save(run / "last.pt", last | {"config": last["config"] | {"data_dir": ""}})
    monkeypatch.setenv("BRAINPROP_DATA", str(data_dir))
    assert main(["train", "--resume", str(run), "--epochs", "3", "--quiet"]) == 0
    assert json.loads((run / "summary.json").read_text())["epochs_run"] == 3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["train", "--arch", "resnet"],
            "invalid choice: 'resnet' (choose from ",
        ),
        (
            ["train", "--dataset", "mnist", "--arch", "deep"],
            "no 'deep' network for mnist: choose --arch from conv, dense, loccon",
        ),
        (["train", "--lr", "-1"], "--lr must be > 0"),
        (["train", "--seed", "-1"], "--seed must lie in [0, 4294967295], got -1"),
        (
            ["train", "--rule", "ebp", "--epsilon", "0.3"],
            "--epsilon is BrainProp's exploration rate and --rule ebp does not explore",
        ),
        (["evaluate", "/nonexistent/run"], "no checkpoint at /nonexistent/run: pass"),
        (["download", "imagenet"], "unknown dataset 'imagenet'"),
        (["evaluate", "/nonexistent/run", "--device", "gpu"], "'gpu' is no device name: use"),
        (["train", "--device", "cuda:7"], "device 'cuda:7' is not available here: use"),
        (["train", "--val", "5", "--val-split", "7"], "--val-split: not allowed with argument"),
        (["train", "--val-split", "0"], "--val-split must be a positive number of held-out images"),
        (["bench", "--presets", ","], "--presets: expected comma-separated names, got ','"),
        (["bench", "--rules", " , "], "--rules: expected comma-separated names, got ' , '"),
        (["reproduce", "--rules", ","], "--rules: expected comma-separated names, got ','"),
    ],
)
def test_bad_input_is_one_line_and_status_2(argv, message, tmp_path, capsys):
    code = _exit_code(
        lambda: main([*argv, *(["--out", str(tmp_path)] if argv[0] == "train" else [])])
    )
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    ("command", "option", "value"),
    [("reproduce", "--datasets", "mnist,,"), ("reproduce", "--archs", ",dense"),
     ("reproduce", "--rules", "ebp,,"), ("bench", "--presets", "mnist/dense,,mnist/conv"),
     ("bench", "--rules", ",ebp")],
)  # fmt: skip
def test_an_empty_entry_in_a_list_is_refused(tmp_path, capsys, command, option, value):
    """Elsewhere an empty value is refused; an empty entry is as much a slip."""
    argv = [command, option, value, "--out", str(tmp_path / "r"), "--device", "cpu"]
    if command == "reproduce":
        argv += ["--data-dir", str(tmp_path / "empty")]
    assert _exit_code(lambda: main(argv)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"{option}: expected comma-separated names, got {value!r}: drop the empty entry" in err


def test_report_only_refuses_the_run_options_it_would_ignore(tmp_path, capsys):
    (tmp_path / "measurements").mkdir()
    report_only = ["reproduce", "--report-only", "--out", str(tmp_path), "--quiet"]
    # Given at its default value, an option is as much a setting the report would not take.
    code = _exit_code(lambda: main([*report_only, "--seeds", "10", "--max-epochs", "2", "--jobs",
                                    "1", "--bf16", "--datasets", "mnist"]))  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and not (tmp_path / "results.md").exists()
    assert (
        f"--report-only rewrites the report from the measurements in {tmp_path}, so --datasets, "
        "--seeds, --max-epochs, --jobs, --bf16 would be ignored: drop them, or drop --report-only"
    ) in err
    assert _exit_code(lambda: main([*report_only, "--device", "cpu"])) == 2
    assert "so --device would be ignored: drop it," in capsys.readouterr().err
    assert main(report_only) == 0 and (tmp_path / "results.md").exists()


@OUT_OF_MEMORY
def test_running_out_of_memory_is_one_line_and_status_2(monkeypatch, capsys, out_of_memory):
    error = out_of_memory()

    def too_big(_args):
        raise error

    monkeypatch.setitem(cli.COMMANDS, "bench", too_big)
    assert main(["bench"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    said = str(error).removeprefix(ENFORCED).splitlines()[0] if str(error) else "no details"
    assert f"ran out of memory ({said}): lower" in err


@pytest.mark.parametrize(
    "source_line",
    [ENFORCED, "[enforce fail at CPUAllocator.cpp:68] . "],
    ids=["torch-2.13", "earlier"],
)
def test_torchs_source_line_is_dropped_from_the_out_of_memory_line(source_line):
    said = str(out_of_memory(RuntimeError(source_line + CPU_ALLOCATOR)))
    assert said.startswith(f"the device ran out of memory ({CPU_ALLOCATOR}): lower")


def test_a_long_out_of_memory_message_is_cut_at_a_word():
    message = "CUDA out of memory. " + "1.25 GiB " * 40
    said = str(out_of_memory(torch.OutOfMemoryError(message)))
    detail = said[said.index("(") + 1 : said.index("): lower")]
    assert detail.endswith(" ...") and message.startswith(detail.removesuffix(" ...") + " ")
    assert MEMORY_DETAIL_CHARS - 10 < len(detail) <= MEMORY_DETAIL_CHARS + 4


def test_report_only_where_no_reproduce_ran_is_refused(tmp_path, capsys):
    """A mistyped --out got an empty report, in a folder made for it."""
    typo = tmp_path / "typo"
    assert main(["reproduce", "--report-only", "--out", str(typo)]) == 2
    assert capsys.readouterr().err == (
        f"brainprop: error: no measurements/ folder in {typo}: --report-only rewrites the "
        "report of an earlier reproduce, so pass its --out\n"
    )
    assert not typo.exists()


def test_a_file_the_command_may_not_open_is_one_line_and_status_2(tmp_path, monkeypatch, capsys):
    """Wherever the library did not name it itself (pathlib's is_file() raises it too)."""

    def barred(_args):
        raise PermissionError(13, "Permission denied", str(tmp_path / "mnist"))

    monkeypatch.setitem(cli.COMMANDS, "datasets", barred)
    assert main(["datasets"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"brainprop: error: cannot open {tmp_path / 'mnist'} (Permission denied): "
    )
    assert err.count("\n") == 1


def test_another_runtime_error_is_a_bug_with_its_traceback(monkeypatch):
    def bug(_args):
        raise RuntimeError("shapes cannot be multiplied")

    monkeypatch.setitem(cli.COMMANDS, "bench", bug)
    with pytest.raises(RuntimeError, match="^shapes cannot be multiplied$"):
        main(["bench"])


def test_missing_dataset_names_where_the_files_go(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(["train", "--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "mnist" in err and str(tmp_path / "empty") in err and err.count("\n") == 1


@pytest.mark.parametrize("command", ["train", "datasets"])
def test_a_data_dir_that_is_a_file_or_missing_is_one_line_and_status_2(tmp_path, capsys, command):
    command = [command, *(["--out", str(tmp_path / "runs")] if command == "train" else [])]
    (tmp_path / "file").write_text("not a folder")
    for given, state in (("file", "is a file, not a folder"), ("nope", "does not exist")):
        code = main([*command, "--data-dir", str(tmp_path / given)])
        err = capsys.readouterr().err
        assert code == 2, err
        assert err.startswith(f"brainprop: error: data folder {tmp_path / given} {state}: pass ")
    assert main([*command, "--data-dir", ""]) == 2
    assert capsys.readouterr().err.startswith("brainprop: error: --data-dir is empty: pass ")


def test_datasets_lists_what_is_present(data_dir, capsys):
    assert main(["datasets", "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    assert f"data root: {data_dir}" in out
    assert all(name in out for name in ("mnist", "cifar10", "cifar100", "tiny-imagenet"))


def test_python_dash_m_works():
    done = subprocess.run(
        [sys.executable, "-m", "brainprop", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0 and "train" in done.stdout and "evaluate" in done.stdout


def test_a_ctrl_c_while_the_package_imports_is_the_one_line_a_later_one_is(monkeypatch, capsys):
    import brainprop_command

    class Interrupting:
        """A Ctrl-C as the command imports the package (and torch with it)."""

        @staticmethod
        def find_spec(name, path=None, target=None):
            if name == "brainprop.cli":
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, "brainprop.cli")
    monkeypatch.setattr(sys, "meta_path", [Interrupting, *sys.meta_path])
    assert brainprop_command.main() == 130
    assert capsys.readouterr().err == "brainprop: interrupted\n"
    monkeypatch.undo()

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert main(["--help"]) == 130
    assert capsys.readouterr().err == "brainprop: interrupted\n"


def test_a_stop_is_said_by_one_process_even_where_rank_is_set_without_torchrun(
    tmp_path, sigterm_caught, monkeypatch, capsys
):
    """$RANK left in the environment without $WORLD_SIZE: a run of one process stopped
    without a word (review). Under torchrun rank 0 alone says it."""
    import brainprop.evaluation

    def stopped(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the signal stops the evaluation first")

    monkeypatch.setattr(brainprop.evaluation, "evaluate", stopped)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["evaluate", str(tmp_path)]) == 128 + signal.SIGTERM
    assert capsys.readouterr().err == "brainprop: stopped by SIGTERM while evaluating\n"
    monkeypatch.setenv("WORLD_SIZE", "")  # names no world: this process's own stop
    assert main(["evaluate", str(tmp_path)]) == 128 + signal.SIGTERM
    assert capsys.readouterr().err == "brainprop: stopped by SIGTERM while evaluating\n"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["evaluate", str(tmp_path)]) == 128 + signal.SIGTERM
    assert capsys.readouterr().err == ""


def test_a_stop_signal_ends_an_evaluation_in_one_line(
    tmp_path, sigterm_caught, monkeypatch, capsys
):
    """SIGTERM killed it without a word (review)."""
    import brainprop.evaluation

    def stopped(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the signal stops the evaluation first")

    monkeypatch.setattr(brainprop.evaluation, "evaluate", stopped)
    assert main(["evaluate", str(tmp_path)]) == 128 + signal.SIGTERM
    assert capsys.readouterr().err == "brainprop: stopped by SIGTERM while evaluating\n"


def test_the_installed_command_is_the_entry_point_that_catches_it():
    from importlib.metadata import entry_points

    [script] = entry_points(group="console_scripts", name="brainprop")
    assert script.value == "brainprop_command:main"
    assert script.load() is __import__("brainprop_command").main


def test_version(capsys):
    assert _exit_code(lambda: main(["--version"])) == 0
    assert capsys.readouterr().out == f"brainprop {brainprop.__version__}\n"


def _exit_code(fn):
    try:
        return fn()
    except SystemExit as e:
        return e.code


def test_the_options_of_other_names_reach_the_runs_config(monkeypatch):
    """--out, --val-split and --local-batchnorm set config fields of other names, and a list of
    dropout rates keeps every rate (one rate would be spread over every site)."""
    configs = []

    def fake_train(config, **_):
        configs.append(config)
        return types.SimpleNamespace(summary={"stop_reason": "max epochs"})

    monkeypatch.setattr(importlib.import_module("brainprop.train"), "train", fake_train)
    assert main(["train", "--out", "o", "--val-split", "500", "--dropout", "0.1,0.2"]) == 0
    assert main(["train", "--local-batchnorm"]) == 0
    given, local = configs
    assert (given.out_dir, given.val, given.dropout) == ("o", 500, (0.1, 0.2))
    assert given.sync_batchnorm and not local.sync_batchnorm and local.val == "test"


def test_reproduce_and_bench_pass_on_every_option(monkeypatch, tmp_path):
    """A flag dropped on its way to the library would do nothing, without a word."""
    requests, benches, library = [], [], inspect.signature(bench.run_bench).parameters
    monkeypatch.setattr(experiments, "reproduce", requests.append)
    monkeypatch.setattr(bench, "run_bench", lambda *a, **kw: benches.append(kw) or {})
    monkeypatch.setattr(bench, "markdown", lambda report: "")
    assert main(["reproduce", "--out", str(tmp_path), "--quiet"]) == 0
    assert main(["reproduce", "--out", str(tmp_path)]) == 0
    assert [r.progress for r in requests] == [False, True]
    assert main(["bench", "--out", str(tmp_path), "--bf16", "--peak-tflops", "3.5",
                 "--eval-images", "8", "--stack", "2"]) == 0  # fmt: skip
    assert main(["bench", "--out", str(tmp_path)]) == 0
    given, defaults = benches
    assert (given["bf16"], given["peak_tflops"], given["eval_images"], given["stack"]) == (
        True, 3.5, 8, 2
    )  # fmt: skip
    # The command's defaults are the library's, which docs/performance.md gives.
    for name in ("steps", "warmup", "bf16", "stack", "device"):
        assert defaults[name] == library[name].default, name


def test_every_train_option_is_a_config_field_or_handled_by_the_cli():
    """_train passes options to TrainConfig by name: one named otherwise would be dropped."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    args = build_parser().parse_args(["train"])
    options = {a.dest for a in args.parser._actions if a.option_strings} - {"help"}
    assert options - fields == set(OFF_CONFIG_OPTIONS)


@pytest.mark.parametrize(
    "folder", ["/data/plain", "/my data", '/a$HOME "b" `id` \\z', "/a!b", "/it's"]
)
def test_a_suggested_command_reaches_the_folder_it_names(folder: str) -> None:
    """Pasted into an interactive shell (which expands ! inside double quotes, review), the
    command a message suggests passes the folder as one word, unexpanded."""
    from brainprop.errors import command

    suggested = command("printf", "%s|", folder)
    assert suggested[0] == suggested[-1] == "'"
    script = f"set -H\n{suggested[1:-1]}\n"
    out = subprocess.run(
        ["bash", "--norc", "-i"], input=script, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.startswith(f"{folder}|"), out.stderr
