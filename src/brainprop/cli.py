"""The ``brainprop`` command: argument parsing and one-line errors over the library.

Every sub-command is a thin call into the library (``train``, ``evaluate``, ``dataset_status``,
``download``, ``reproduce``, ``run_bench``).
A :class:`~brainprop.errors.BrainPropError` becomes one line on stderr and exit status 2; a run
stopped by SIGINT/SIGTERM prints how to resume it and exits with 128 + the signal number; a
training run that stopped on a NaN or inf (its summary and last good checkpoint written) exits
with :data:`EXIT_DIVERGED`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import plugins
from .errors import BrainPropError, not_permitted, unusable_path

#: The exit status of ``train`` when the run stopped on a NaN or inf: it ended and wrote its
#: summary, so neither 0 (a script would take the run as trained) nor 2 (nothing was wrong with
#: the input).
EXIT_DIVERGED = 3

CUDA_GRAPH_HELP = (
    "replay each full-batch training step from one captured CUDA graph (CUDA only; opt-in "
    "until its curve is compared with --eager on a GPU)"
)
DATA_DIR_HELP = (
    "data root (default: $BRAINPROP_DATA, else the source checkout's data/, else "
    "$XDG_CACHE_HOME/brainprop or ~/.cache/brainprop)"
)
BF16_HELP = "bf16 autocast (CUDA; on a CPU, fast only with AVX512_BF16, AMX or Arm bf16)"


#: How argparse's error begins for the options whose choices a plugin may add to (see
#: :mod:`brainprop.plugins`).
_REGISTERED_CHOICE_ERRORS = tuple(
    f"argument {option}:" for option in ("--dataset", "--rule", "--arch", "--feedback", "--preset")
)


#: Options one command spells otherwise: 'reproduce --max-epochs' caps every run of a matrix,
#: 'train --epochs' the one run, and each is easily typed for the other.
_CALLED_OTHERWISE = {
    ("train", "--max-epochs"): "--epochs",
    ("reproduce", "--epochs"): "--max-epochs",
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one line, not usage plus message."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Python 3.14's test for "a negative number, not an option": before it, argparse read
        # `--lr -1e-3` or `--lr -.5` (or `-inf`, which float() takes) as --lr missing its
        # value. No option here starts with a digit, 'inf' or 'nan', so nothing else is taken
        # for a number.
        self._negative_number_matcher = re.compile(r"-(\.?\d|inf|nan)", re.IGNORECASE)

    def error(self, message: str) -> None:  # type: ignore[override]
        if "invalid choice" in message and message.startswith(_REGISTERED_CHOICE_ERRORS):
            # "invalid choice: 'x' (choose from 'a', 'b')", quoted or not by Python's version.
            given = re.search(r"invalid choice: '?([^' ]*)'? \(choose from (.*)\)$", message)
            choices = [c.strip("'") for c in given.group(2).split(", ")] if given else []
            message += plugins.unknown_name_hint(given.group(1) if given else "", choices)
        self.exit(2, f"brainprop: error: {message} (see '{self.prog} --help')\n")


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def _val(text: str) -> str | int:
    if text == "test":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 'test' or a number of training images to hold out, got {text!r}"
        ) from None


#: train's options that are no TrainConfig field of the same name: ``_train`` maps the first
#: three to fields and acts on the other two itself.
OFF_CONFIG_OPTIONS = ("out", "local_batchnorm", "val_split", "resume", "quiet")


def _add_train(sub: argparse._SubParsersAction) -> None:
    from .config import MAX_NAN_RELOADS, ON_NAN, TrainConfig
    from .data import DATASETS
    from .feedback import feedback_modes
    from .objectives import OBJECTIVES
    from .presets import ARCHITECTURES, PRESETS

    # No option has a default of its own: one not given is None (False for switches), so that
    # _train knows what a --resume would drop, and TrainConfig's defaults are the only ones.
    default = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    p = sub.add_parser("train", help="train one network", description="Train one network.")
    p.add_argument(
        "--dataset", choices=list(DATASETS),
        help=f"one of brainprop's, or one registered in brainprop.DATASETS by a --plugin "
        f"(default {default['dataset']})",
    )  # fmt: skip
    p.add_argument("--arch", choices=list(ARCHITECTURES), help=f"default {default['arch']}")
    p.add_argument("--rule", choices=tuple(OBJECTIVES), help=f"default {default['rule']}")
    p.add_argument(
        "--epsilon", type=float,
        help=f"BrainProp exploration rate (default {default['epsilon']})",
    )  # fmt: skip
    p.add_argument(
        "--feedback", choices=feedback_modes(),
        help="feedback pathway: exact transpose, learned B, random B, sign(W), direct (DFA), or "
        "one registered in brainprop.PATHWAYS by a --plugin (default "
        f"{default['feedback']})",
    )  # fmt: skip
    hp = p.add_argument_group("hyperparameters (default: the preset's value for dataset and arch)")
    hp.add_argument(
        "--preset", choices=list(PRESETS),
        help="table to take hyperparameters from, for the dataset/arch pairs it has (the paper's "
        f"has every published one) (default {default['preset']})",
    )  # fmt: skip
    hp.add_argument("--lr", type=float, help="SGD learning rate (no momentum)")
    hp.add_argument("--lr-halving-epochs", type=int, help="halve the learning rate every N epochs")
    hp.add_argument("--batch-size", type=int, help="images per step (per process under torchrun)")
    hp.add_argument(
        "--global-batch", type=int, metavar="N",
        help="images per step over all torchrun processes, each taking N / world size "
        "(instead of --batch-size)",
    )  # fmt: skip
    hp.add_argument("--init-std", type=float, help="sigma of the N(0, sigma) weight initialisation")
    hp.add_argument("--l2", type=float, help="Keras l2(lambda) on the weights")
    hp.add_argument(
        "--dropout", type=_float_list,
        help="Keras dropout rates: one for every site, or comma-separated, one per site",
    )  # fmt: skip
    stop = p.add_argument_group("stopping and validation")
    stop.add_argument(
        "--epochs", type=int,
        help=f"maximum number of epochs (default {default['epochs']}; with --resume, the "
        "run's own)",
    )  # fmt: skip
    stop.add_argument("--patience", type=int, help=f"default {default['patience']}")
    stop.add_argument("--min-delta", type=float, help=f"default {default['min_delta']}")
    val = stop.add_mutually_exclusive_group()
    val.add_argument(
        "--val", type=_val,
        help="'test' (validate on the test set, as the paper) or N held-out training images "
        f"(default {default['val']})",
    )  # fmt: skip
    val.add_argument("--val-split", type=int, metavar="N", help="same as --val N")
    stop.add_argument(
        "--on-nan", choices=ON_NAN,
        help="when the loss or weights become NaN/inf: stop (keeping the last good "
        f"checkpoint; exit status {EXIT_DIVERGED}) or rewind to the end of the last finished "
        "epoch (or the start) at half the learning rate (at most "
        f"{MAX_NAN_RELOADS} times) (default {default['on_nan']})",
    )  # fmt: skip
    run = p.add_argument_group("run")
    run.add_argument("--seed", type=int, help=f"default {default['seed']}")
    run.add_argument("--device", help=f"auto, cpu, cuda or cuda:N (default {default['device']})")
    run.add_argument("--bf16", action="store_true", help=BF16_HELP)
    run.add_argument(
        "--eager", action="store_true",
        help="plain PyTorch, without the fast path's channels_last and, on CUDA, BrainProp's "
        "fused head (for debugging)",
    )  # fmt: skip
    run.add_argument("--cuda-graph", action="store_true", help=CUDA_GRAPH_HELP)
    run.add_argument(
        "--local-batchnorm", action="store_true",
        help="under torchrun, BatchNorm normalises with each process's share of the batch "
        "(as DDP without SyncBatchNorm) instead of the whole global batch",
    )  # fmt: skip
    run.add_argument("--data-dir", help=DATA_DIR_HELP)
    run.add_argument("--out", help=f"folder for run directories (default {default['out_dir']})")
    run.add_argument(
        "--name",
        help="run directory name (default: <dataset>-<arch>-<rule>-s<seed>-<time>); "
        "a name already taken in --out gets -2, -3, ...: the output names the folder it took",
    )
    run.add_argument(
        "--resume", metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last checkpoint (other settings come from the "
        "run; only --epochs may change, and --data-dir says where its data is now)",
    )  # fmt: skip
    run.add_argument(
        "--quiet", action="store_true",
        help="no progress bar or per-epoch lines; the run's folder (run_dir) and summary are "
        "printed as one JSON line at the end",
    )  # fmt: skip


def _train(args: argparse.Namespace) -> int:
    from .config import TrainConfig
    from .distributed import launched_main
    from .summary import DIVERGED
    from .train import train

    if args.resume is not None:
        keep = {"resume", "epochs", "data_dir", "quiet"}
        dropped = _given_options(args, keep)
        if dropped:
            them = "it" if len(dropped) == 1 else "them"
            raise BrainPropError(
                f"--resume continues {args.resume} with its own settings, so "
                f"{', '.join(dropped)} would be ignored: drop {them} (only --epochs may change), "
                "or start a new run"
            )
        # The run's own config decides everything but a raised --epochs; its data is read
        # from --data-dir where that is given (data that moved).
        config = None if args.epochs is None else TrainConfig(epochs=args.epochs)
    else:
        if args.epsilon is not None and args.rule == "ebp":
            raise BrainPropError(
                "--epsilon is BrainProp's exploration rate and --rule ebp does not explore: "
                "drop --epsilon or pass --rule brainprop"
            )
        if args.val_split is not None and args.val_split < 1:
            # TrainConfig would refuse it too, but as --val, which was not given.
            raise BrainPropError(
                f"--val-split must be a positive number of held-out images, got {args.val_split}"
            )
        # Each option sets the TrainConfig field of its name; these three of OFF_CONFIG_OPTIONS
        # map onto fields of other names.
        given = vars(args) | {
            "out_dir": args.out,
            "sync_batchnorm": not args.local_batchnorm,
            "val": args.val if args.val_split is None else args.val_split,
        }
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        config = TrainConfig(**{k: v for k, v in given.items() if k in fields and v is not None})
    data_dir = args.data_dir if args.resume is not None else None
    run = train(config, resume=args.resume, data_dir=data_dir, progress=not args.quiet)
    if args.quiet and launched_main():
        # The folder too: a taken --name gets -2, -3 ..., and a script must find the run.
        print(json.dumps({"run_dir": str(run.dir), **run.summary}))
    return EXIT_DIVERGED if run.summary["stop_reason"].startswith(DIVERGED) else 0


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate
    from .signals import quit_on_signals

    with quit_on_signals("while evaluating"):
        result = evaluate(args.target, data_dir=args.data_dir, device=args.device)
    acc, n, name = result["test_acc"], result["test_size"], result["dataset"]
    print(f"test accuracy {acc:.4f} on {n} {name} images")
    print(json.dumps(result))
    return 0


def _datasets(args: argparse.Namespace) -> int:
    from .data import DATASETS, data_root, dataset_status
    from .data.registry import own_datasets
    from .data.status import NAME_WIDTH

    root = data_root(args.data_dir)
    print(f"data root: {root}")
    width = max(NAME_WIDTH, *(len(name) + 1 for name in DATASETS))
    for status in dataset_status(root):
        print(status.row(width))
    for row in own_datasets(width):
        print(row)
    return 0


def _download(args: argparse.Namespace) -> int:
    from .data import download
    from .signals import quit_on_signals

    # A stop (SIGTERM from a job's time limit) raises, so the partial archive is removed.
    with quit_on_signals("while downloading"):
        path = download(args.name, args.data_dir)
    print(f"{args.name} is ready in {path}")
    return 0


def _folder(text: str) -> str:
    """A path option's value; an empty one is refused, as ``Path("")`` is the working folder."""
    if text == "":
        raise argparse.ArgumentTypeError("expected a path, got an empty value")
    return text


def _names(text: str) -> tuple[str, ...]:
    """Comma-separated names, each once; an empty entry ("mnist,,") is refused: a name lost to
    a slip of the keyboard would shrink the request unnoticed."""
    entries = [v.strip() for v in text.split(",")]
    if "" in entries:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated names, got {text!r}: drop the empty entry"
        )
    return tuple(dict.fromkeys(entries))


def _given_options(args: argparse.Namespace, keep: set[str]) -> list[str]:
    """The options of ``args.parser`` given on the command line, but those in ``keep``: none
    outside ``keep`` has a default of its own (see :func:`_add_train` and
    :func:`_add_reproduce`), so a given one differs from it."""
    # argparse has no public list of a parser's options; _actions is stable since Python 3.2.
    return [
        action.option_strings[0]
        for action in args.parser._actions
        if action.option_strings and action.dest not in keep | {"help"}
        and getattr(args, action.dest) != action.default
    ]  # fmt: skip


def _add_reproduce(sub: argparse._SubParsersAction) -> None:
    from .experiments import Request
    from .feedback import feedback_modes
    from .matrix import MAX_SEEDS
    from .objectives import OBJECTIVES
    from .presets import PRESETS

    # As for train, a run option not given is None (False for switches), so that _reproduce
    # knows which ones --report-only would ignore; Request's defaults are the only ones.
    default = {f.name: f.default for f in dataclasses.fields(Request)}

    p = sub.add_parser(
        "reproduce", help="run the paper's experiment matrix and report it",
        description="Run the paper's matrix (cells x rules x seeds) resumably in priority order, "
        "then write results.md/json/png under --out. Finished runs are skipped; interrupted "
        "ones resume.",
    )  # fmt: skip
    p.add_argument("--datasets", type=_names, help="comma-separated (default: all four)")
    p.add_argument("--archs", type=_names, help="comma-separated (default: every cell's)")
    p.add_argument(
        "--rules", type=_names,
        help=f"comma-separated, of {', '.join(OBJECTIVES)} (a rule of one's own is compared with "
        f"EBP; default: {','.join(default['rules'])})",
    )  # fmt: skip
    p.add_argument(
        "--seeds", type=int,
        help=f"seeds 0..N-1 per cell and rule (default {default['seeds']}, at most {MAX_SEEDS})",
    )  # fmt: skip
    p.add_argument("--max-epochs", type=int, help="cap every run (default: the paper's 500)")
    p.add_argument(
        "--preset", choices=list(PRESETS),
        help=f"hyperparameter table (default: {default['preset']}, the paper's); the others "
        "cover some cells only, so select those with --datasets and --archs",
    )  # fmt: skip
    p.add_argument("--val-split", type=int, metavar="N", help="validate on N held-out images")
    p.add_argument(
        "--feedback", choices=feedback_modes(),
        help=f"feedback pathway of every run (default: {default['feedback']}, the paper's "
        "exact transpose); runs through another are named -fb-<mode> and reported apart",
    )  # fmt: skip
    p.add_argument(
        "--budget-minutes", type=float,
        help="start only the runs whose estimated time fits the time left, in priority order; "
        "the clock starts when the first run comes up, and a run with no estimate yet (no run "
        "like it measured on this machine) starts while any time is left",
    )  # fmt: skip
    p.add_argument(
        "--jobs", type=int, help=f"runs at once on the device (default {default['jobs']})"
    )
    p.add_argument(
        "--stack", type=int, metavar="N",
        help="train up to N seeds of a cell side by side in one stacked network; "
        "'brainprop bench --stack N' measures whether that is faster on this device "
        f"(default {default['stack']})",
    )  # fmt: skip
    p.add_argument(
        "--bf16", action="store_true",
        help=f"{BF16_HELP}; runs are named -bf16 and reported apart from the paper's fp32",
    )  # fmt: skip
    p.add_argument(
        "--cuda-graph", action="store_true",
        help=f"{CUDA_GRAPH_HELP}; new runs only (a run resumes as it started); their seconds are "
        "reported apart",
    )  # fmt: skip
    p.add_argument(
        "--out", default="results", type=_folder, help="results folder (default: results)"
    )
    p.add_argument("--data-dir", help=DATA_DIR_HELP)
    p.add_argument("--device", help=f"auto, cpu, cuda or cuda:N (default {default['device']})")
    p.add_argument(
        "--report-only", action="store_true",
        help="only rewrite the report (and with --readme the README section): no run option",
    )  # fmt: skip
    p.add_argument("--readme", type=_folder, help="also rewrite this README's results section")
    p.add_argument("--quiet", action="store_true", help="no per-epoch progress")


def _reproduce(args: argparse.Namespace) -> int:
    from . import locks
    from .experiments import Request, reproduce
    from .matrix import select_cells
    from .measurements import MEASUREMENTS
    from .report import check_readme, write_report

    out = Path(args.out)
    if args.readme:
        check_readme(Path(args.readme))
    if args.report_only:
        ignored = _given_options(args, {"out", "readme", "quiet", "report_only"})
        if ignored:
            them = "it" if len(ignored) == 1 else "them"
            raise BrainPropError(
                f"--report-only rewrites the report from the measurements in {out}, so "
                f"{', '.join(ignored)} would be ignored: drop {them}, or drop --report-only to run"
            )
        if not (out / MEASUREMENTS).is_dir():
            raise BrainPropError(
                f"no {MEASUREMENTS}/ folder in {out}: --report-only rewrites the report of an "
                "earlier reproduce, so pass its --out"
            )
        # A run of reproduce on the folder rewrites the report as it ends; beside it, the two
        # could leave results.json and results.md of different measurements.
        busy = (
            f"{out} is in use by a 'brainprop reproduce', which rewrites its report as it ends: "
            f"wait for that, or read each finished run's measurement in {out / MEASUREMENTS}"
        )
        with locks.held(out, busy):
            print(f"report: {write_report(out)}")
            if args.readme:
                _rewrite_readme(Path(args.readme), out)
        return 0
    defaulted = {"rules": args.rules, "seeds": args.seeds, "preset": args.preset,
                 "device": args.device, "jobs": args.jobs, "stack": args.stack,
                 "feedback": args.feedback}  # fmt: skip
    request = Request(
        cells=tuple(select_cells(args.datasets, args.archs)),
        val=args.val_split,
        max_epochs=args.max_epochs,
        out=out,
        data_dir=args.data_dir,
        budget_minutes=args.budget_minutes,
        bf16=args.bf16,
        cuda_graph=args.cuda_graph,
        progress=not args.quiet,
        **{k: v for k, v in defaulted.items() if v is not None},
    )
    reproduce(request)
    if args.readme:
        _rewrite_readme(Path(args.readme), out)
    return 0


def _rewrite_readme(readme: Path, out: Path) -> None:
    from .report import update_readme

    update_readme(readme, out)
    print(f"results section of {readme} rewritten")


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from .bench import DEFAULT_PRESETS
    from .objectives import RULES

    p = sub.add_parser(
        "bench", help="time the training step per preset and rule",
        description="Time the training step (synthetic data of each dataset's real size) for "
        "each preset and rule; print and write bench.json and bench.md.",
    )  # fmt: skip
    p.add_argument(
        "--presets", type=_names, default=",".join(DEFAULT_PRESETS),
        help="comma-separated dataset/arch pairs, hyperparameters from the paper's table "
        "(default %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--rules", type=_names, default=",".join(RULES),
        help="comma-separated rules (default %(default)s)",
    )  # fmt: skip
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument(
        "--steps", type=int, default=30,
        help="timed steps per preset and rule, in min(5, N) equal blocks (so above 5, rounded "
        "down to a multiple of 5) (default %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--warmup", type=int, default=5,
        help="untimed steps before timing, besides the one that counts FLOPs; with --cuda-graph "
        "at least as many as the graph's capture and its first replay take (default "
        "%(default)s)",
    )  # fmt: skip
    p.add_argument("--batch-size", type=int, help="override every preset's batch size")
    p.add_argument("--bf16", action="store_true", help=BF16_HELP)
    p.add_argument("--cuda-graph", action="store_true", help=CUDA_GRAPH_HELP)
    p.add_argument(
        "--peak-tflops", type=float,
        help="the device's peak TFLOP/s (default: a table for known GPUs, an estimate for CPUs)",
    )  # fmt: skip
    p.add_argument(
        "--eval-images", type=int,
        help="time evaluation on this many test images (default: all 10k) and scale to 10k; "
        "fewer than 1000 (one evaluation batch) overstate it, by its fixed cost",
    )  # fmt: skip
    p.add_argument(
        "--stack", type=int, default=1, metavar="N",
        help="also time one step of N seeds stacked (reproduce --stack N) against N single steps "
        "(default %(default)s: none)",
    )  # fmt: skip
    p.add_argument(
        "--out", default="runs/bench", type=_folder,
        help="folder for bench.json and bench.md (default %(default)s)",
    )  # fmt: skip


def _bench(args: argparse.Namespace) -> int:
    from .bench import JSON_NAME, markdown, run_bench
    from .signals import Interrupted, quit_on_signals

    # A stop has nothing to save: each preset's rows were written as it ended, so the report
    # holds them if it changed; one from before is another bench's.
    written = Path(args.out) / JSON_NAME
    before = _modified(written)
    try:
        with quit_on_signals("while benchmarking"):
            report = run_bench(
                list(args.presets),
                list(args.rules),
                device=args.device,
                steps=args.steps,
                warmup=args.warmup,
                batch_size=args.batch_size,
                bf16=args.bf16,
                cuda_graph=args.cuda_graph,
                peak_tflops=args.peak_tflops,
                eval_images=args.eval_images,
                stack=args.stack,
                out=args.out,
                say=lambda line: print(line, file=sys.stderr),
            )
    except Interrupted as e:
        kept = (
            f"the presets benched before it are in {written}"
            if _modified(written) != before
            else "no preset had ended, so it wrote no report"
        )
        raise Interrupted(f"{e}; {kept}", e.exit_status - 128) from None
    print(markdown(report), end="")
    return 0


def _modified(path: Path) -> int | None:
    """``path``'s modification time in nanoseconds; None where there is no such file."""
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .data import DATASET_NAMES

    # No abbreviations of the top options: main reads --plugin before argparse does.
    parser = _Parser(
        prog="brainprop", description="BrainProp and EBP training for PyTorch.", allow_abbrev=False
    )
    parser.add_argument("--version", action="version", version=f"brainprop {__version__}")
    parser.add_argument(
        "--plugin", action="append", metavar="MODULE",
        help="import MODULE (a module name, or the path of a .py file) before the command, "
        "which then takes the rules, networks, feedback pathways, preset tables and datasets "
        "it registers (reproduce its rules, preset tables and feedback pathways, its networks "
        "and datasets being the paper's; bench its rules); repeatable, and given before the "
        "command",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train(sub)
    p = sub.add_parser(
        "evaluate", help="test accuracy of a run or checkpoint",
        description="Test accuracy of a run's best network, or of a checkpoint; prints it in "
        "a line, then the whole result as one line of JSON.",
    )  # fmt: skip
    p.add_argument("target", help="a run directory (uses its best.pt) or a checkpoint file")
    p.add_argument(
        "--data-dir",
        help="data root (default: the one the run trained on, as its checkpoint says; where "
        f"that is not set, the {DATA_DIR_HELP[len('data root (') : -1]})",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p = sub.add_parser(
        "datasets", help="which datasets are present, and how to get the rest",
        description="List each dataset: present, unreadable, damaged or missing, where, and how "
        "to get it; then the datasets of one's own that plugins registered.",
    )  # fmt: skip
    p.add_argument("--data-dir", help=DATA_DIR_HELP)
    p = sub.add_parser(
        "download", help="fetch a dataset's official archives",
        description="Fetch a dataset's official archives into the data root, checksum-verified.",
    )  # fmt: skip
    p.add_argument("name", help=f"one of {', '.join(DATASET_NAMES)}")
    p.add_argument("--data-dir", help=DATA_DIR_HELP)
    _add_reproduce(sub)
    _add_bench(sub)
    # Each command's own parser: main reports an unknown option through it, and _train reads
    # its options to tell which settings a --resume would drop.
    for command_parser in sub.choices.values():
        command_parser.set_defaults(parser=command_parser)
    return parser


def _plugin_specs(argv: Sequence[str]) -> list[str]:
    """The values of the ``--plugin`` options before the command. They are read before the
    parser is made, whose choices (rules, networks, ...) must include what they register."""
    specs = []
    for i, arg in enumerate(argv):
        if arg in COMMANDS:
            late = [a for a in argv[i + 1 :] if a.split("=")[0] == "--plugin"]
            if late:
                raise BrainPropError(
                    f"--plugin must come before the command: 'brainprop --plugin MODULE {arg} ...'"
                )
            break
        option = arg.split("=")[0]
        if len(option) > 2 and "--plugin".startswith(option) and option != "--plugin":
            raise BrainPropError(f"{option}: write --plugin in full (it is read before the rest)")
        if option == "--plugin":
            _, given_with_it, value = arg.partition("=")
            if not given_with_it:
                value = argv[i + 1] if i + 1 < len(argv) else ""
            if value in COMMANDS or value.startswith("-") or not value:
                raise BrainPropError(
                    "--plugin takes a module name or the path of a .py file: "
                    "'brainprop --plugin MODULE COMMAND ...'"
                )
            specs.append(value)
    return specs


def _check_order(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """Refuse a command's options given before it. argparse would report "--epochs=1 train" as
    an unknown option and "--epochs 1 train" as an unknown command "1"."""
    command = next((a for a in argv if a in COMMANDS), None)
    if command is None:
        return
    before = argv[: argv.index(command)]
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    known = {s for action in commands.choices[command]._actions for s in action.option_strings}
    known.discard("-h")
    known.discard("--help")

    def taken(arg: str) -> bool:
        # The command's parser takes a long option's unique prefix too ("--epo" for --epochs),
        # and says an ambiguous one ("--ep") is ambiguous once it is in its place.
        name = arg.split("=")[0]
        return name in known or (
            len(name) > 2 and name.startswith("--") and any(k.startswith(name) for k in known)
        )

    plugins, rest = _split_plugins(before)
    misplaced = [a for a in rest if taken(a)]
    if misplaced:
        # Reported through the command's parser: the top one's help lists no command's options.
        # --plugin stays before the command, where it must be.
        start = " ".join(["brainprop", *plugins, command, *rest[rest.index(misplaced[0]) :]])
        commands.choices[command].error(
            f"{' '.join(misplaced)} must come after the command: '{start} ...'"
        )


def _split_plugins(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """``args`` as the ``--plugin`` options among them (with their values) and the rest."""
    plugins: list[str] = []
    rest: list[str] = []
    values = iter(args)
    for arg in values:
        if arg == "--plugin":
            plugins += [arg, next(values, "")]
        elif arg.startswith("--plugin="):
            plugins.append(arg)
        else:
            rest.append(arg)
    return plugins, rest


COMMANDS = {
    "train": _train,
    "evaluate": _evaluate,
    "datasets": _datasets,
    "download": _download,
    "reproduce": _reproduce,
    "bench": _bench,
}


def main(argv: Sequence[str] | None = None) -> int:
    from .devices import out_of_memory, ran_out_of_memory
    from .signals import Interrupted, OutputClosed

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        plugins.load_all(_plugin_specs(argv))
        parser = build_parser()
        _check_order(parser, argv)
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            # Reported through the command's parser: the top one's help lists no command's
            # options.
            called = [
                f"; {args.command} calls it {ours}"
                for (command, theirs), ours in _CALLED_OTHERWISE.items()
                if command == args.command and any(u.split("=")[0] == theirs for u in unknown)
            ]
            args.parser.error(f"unrecognized arguments: {' '.join(unknown)}{''.join(called)}")
        return COMMANDS[args.command](args)
    except Interrupted as e:
        from .distributed import launched_main, launched_world

        # Under torchrun every rank stops alike, with the same line: rank 0 says it.
        try:
            another_rank = launched_world() > 1 and not launched_main()
        except BrainPropError:  # a $WORLD_SIZE that names no world: this process's own stop
            another_rank = False
        if not another_rank:
            print(f"brainprop: {e}", file=sys.stderr)
        return e.exit_status
    except BrainPropError as e:
        print(f"brainprop: error: {e}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:
        if not ran_out_of_memory(e):
            raise
        print(f"brainprop: error: {out_of_memory(e)}", file=sys.stderr)
        return 2
    except PermissionError as e:
        # Wherever a folder or file the command needs cannot be entered or read (a data root of
        # another user's, say): pathlib's exists() and is_file() raise this too.
        print(f"brainprop: error: {not_permitted(e, 'a file it needs')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("brainprop: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError as e:
        # The reader of stdout went away ('brainprop train ... | head'); a run stopped this way
        # keeps its last checkpoint. Python would print a second error as it flushed stdout.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        run = f"; {e}" if isinstance(e, OutputClosed) else ""
        print(f"brainprop: stopped: the output's reader went away (a closed pipe){run}",
              file=sys.stderr)  # fmt: skip
        return 128 + signal.SIGPIPE
    # After its subclasses above, which this would catch first and re-raise past them.
    except OSError as e:
        if (unusable := unusable_path(e)) is None:
            raise
        print(f"brainprop: error: {unusable}", file=sys.stderr)
        return 2
