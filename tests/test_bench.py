"""``brainprop bench``: report contents, FLOP counts against hand counts, peak estimate, CLI.

Nothing here asserts a timing: the machine is shared, and the figures are for people to read.
"""

import copy
import gc
import importlib
import io
import json
import math
import os
import platform
import signal
import statistics
import weakref

import pytest
import torch
from data_fixtures import REPO

from brainprop import bench, devices, fastpath, files, memory
from brainprop.bench import (
    JSON_NAME,
    MARKDOWN_NAME,
    bench_preset,
    markdown,
    parse_preset,
    run_bench,
    synthetic_dataset,
)
from brainprop.cli import main
from brainprop.devices import (
    bf16_warning,
    cpuinfo,
    device_name,
    physical_cores,
    software,
    vector_units,
)
from brainprop.errors import BrainPropError
from brainprop.peaks import (
    GPU_PEAKS,
    Peak,
    Peaks,
    cpu_peak,
    device_peaks,
    gpu_board,
    op_precisions,
    precision_label,
    tf32_ops,
)
from brainprop.presets import build_model

train_module = importlib.import_module("brainprop.train")  # brainprop.train is the function

ROW_FIELDS = {
    "preset", "rule", "batch_size", "steps_per_epoch", "step_ms", "epoch_s", "images_per_s",
    "flops_per_step", "forward_flops_per_step", "tflops", "peak_fraction", "peak_memory_bytes",
    "host_rss_bytes", "eval_s", "eval_s_per_10k", "memory_held_before_bytes",
}  # fmt: skip
DENSE = (784 * 1500, 1500 * 1000, 1000 * 500, 500 * 10)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    said: list[str] = []
    rep = run_bench(
        ["mnist/dense"], ["brainprop", "ebp"], device="cpu", steps=3, warmup=0, batch_size=8,
        peak_tflops=1.0, eval_images=16, out=out, say=said.append,
    )  # fmt: skip
    return rep, out, said


def test_report_has_both_rules_and_every_field(report):
    rep, out, _ = report
    assert [r["rule"] for r in rep["results"]] == ["brainprop", "ebp"]
    for row in rep["results"]:
        assert set(row) >= ROW_FIELDS
        assert row["step_ms"] > 0 and row["peak_memory_bytes"] > 0
        # What was held when the peak count restarted is its floor.
        assert 0 < row["memory_held_before_bytes"] <= row["peak_memory_bytes"]
        assert row["steps_per_epoch"] == -(-60_000 // 8)
        # --warmup 0, and the step that counted the FLOPs.
        assert row["warmup_steps"] == 1
    assert "- 3 timed steps after 1 untimed warm-up step;" in (out / MARKDOWN_NAME).read_text()
    # --steps 8 times 5 steps, in 5 blocks of one: the header says how many were timed.
    asked = copy.deepcopy(rep) | {"steps": 8}
    for row in asked["results"]:
        row["steps_timed"] = 5
    assert "- 5 timed steps after" in markdown(asked)
    for row in asked["results"]:
        row["steps_timed"] = 1
    assert "- 1 timed step after" in markdown(asked)
    # The ratio of each round's two blocks, moments apart, and their median.
    (ratio,) = rep["ratios"]
    bp, ebp = rep["results"]
    paired = [a / b for a, b in zip(bp["step_ms_blocks"], ebp["step_ms_blocks"], strict=True)]
    assert ratio["brainprop_over_ebp_blocks"] == pytest.approx(paired)
    assert ratio["brainprop_over_ebp"] == pytest.approx(statistics.median(paired))
    assert f"| {min(paired):.3f}-{max(paired):.3f} |" in (out / MARKDOWN_NAME).read_text()
    # The dense network has no convolution, so its fast path is eager and is timed once.
    assert "fast path" in rep["mode"]
    for row in rep["results"]:
        assert row["fast_path"] == [] and row["eager_ratio"] is None
    assert json.loads((out / JSON_NAME).read_text()) == json.loads(json.dumps(rep))
    md = (out / MARKDOWN_NAME).read_text()
    assert "| mnist/dense | 8 | brainprop |" in md and "| mnist/dense | 8 | ebp |" in md
    assert md.count(" | - |\n") == 2  # no eager ratio
    assert "BrainProp/EBP" in md and "1.000 TFLOP/s (given with --peak-tflops)" in md
    units = rep["device"]["vector_units"]
    assert units == vector_units(cpuinfo()) and (units is None or f", {units}, " in md)
    # The code benched, as a run's summary names it: the version number alone does not.
    assert rep["software"] == software(torch.device("cpu"))
    # By the name run summaries and the report give the machine (review: it lacked x86_64).
    assert f"- device: {device_name(torch.device('cpu'))}, fp32, torch" in md
    held = rep["results"][0]["memory_held_before_bytes"] / 2**20
    assert f"({held:,.0f}) |" in md and "peak mem MiB (held before)" in md


def test_dense_flops_match_a_hand_count(report):
    b, total = 8, sum(DENSE)
    forward = 2 * b * total
    # Backward: a weight gradient per layer, an input gradient for all but the first layer
    # (the images need none).
    backward = 2 * b * (2 * total - DENSE[0])
    for row in report[0]["results"]:
        assert row["forward_flops_per_step"] == forward
        assert row["flops_per_step"] == forward + backward


def test_each_rows_rates_follow_from_its_step_time(report):
    """images/s is the batch's, not the training set's; an epoch is its steps plus the one
    randperm; the evaluation is scaled to 10k images from the number scored."""
    for row in report[0]["results"]:
        step_s = row["step_ms"] / 1e3
        assert row["images_per_s"] == pytest.approx(row["batch_size"] / step_s)
        assert row["epoch_s"] == pytest.approx(
            row["steps_per_epoch"] * step_s + row["randperm_ms"] / 1e3
        )
        assert row["eval_images"] == 16
        assert row["eval_s_per_10k"] == pytest.approx(row["eval_s"] * 1e4 / 16)


def test_the_progress_line_gives_the_step_and_the_epoch_in_their_own_units(report):
    rep, _, said = report
    for row in rep["results"]:
        (line,) = [s for s in said if s.startswith(f"{row['preset']:<20} {row['rule']:<9} ")]
        assert f" {bench._time(row['step_ms'])} ms/step " in line
        assert f" {bench._time(row['epoch_s'])} s/epoch " in line


def test_rounds_alternate_their_order_and_each_step_keeps_the_loops_running_sums(monkeypatch):
    """Every other round backwards, so no rule's block always follows the same neighbour's;
    each step is followed by the training loop's bookkeeping, as in training."""
    order, tallied = [], []
    real_tallied, real_tally = bench._tallied, bench.tally
    names = iter(["brainprop", "ebp"])  # the order the rules are prepared in

    def tallied_step(run_step, batches, device, seeds):
        name, step = next(names), real_tallied(run_step, batches, device, seeds)
        return lambda: (order.append(name), step())

    def tally(*args):
        tallied.append(args[-1])  # the step's number in the run
        return real_tally(*args)

    monkeypatch.setattr(bench, "_tallied", tallied_step)
    monkeypatch.setattr(bench, "tally", tally)
    ds = synthetic_dataset("mnist", torch.device("cpu"))
    bench_preset(
        ds, "dense", ["brainprop", "ebp"], torch.device("cpu"), peak=Peak(1.0, "test"),
        steps=4, warmup=0, batch_size=4, eval_images=8,
    )  # fmt: skip
    # Untimed: one FLOP-counted step each as they are prepared; then 4 rounds of one step.
    assert order == ["brainprop", "ebp"] + ["brainprop", "ebp", "ebp", "brainprop"] * 2
    assert sorted(tallied) == sorted([0, 1, 2, 3, 4] * 2)


def test_with_a_graph_every_variant_takes_the_untimed_steps_its_capture_needs(monkeypatch):
    """The eager twin and the stack step the graphed step's batches as often before timing,
    so all are as warm. (The graph itself needs CUDA: the variants build without it here.)"""
    asked = []
    real_prepare, real_stack = bench._prepare, bench._prepare_stack

    def prepare(*args, warmup, eager, cuda_graph=False, **kwargs):
        asked.append(("eager" if eager else "fast", warmup))
        return real_prepare(*args, warmup=warmup, eager=eager, **kwargs)

    def prepare_stack(*args, warmup, cuda_graph, **kwargs):
        asked.append(("stack", warmup))
        return real_stack(*args, warmup=warmup, cuda_graph=False, **kwargs)

    monkeypatch.setattr(bench, "_prepare", prepare)
    monkeypatch.setattr(bench, "_prepare_stack", prepare_stack)
    ds = synthetic_dataset("mnist", torch.device("cpu"))
    (row,) = bench_preset(
        ds, "dense", ["ebp"], torch.device("cpu"), peak=Peak(1.0, "test"), steps=1, warmup=1,
        batch_size=4, eval_images=8, cuda_graph=True, stack=2,
    )  # fmt: skip
    graph_warmup = fastpath.WARMUP_STEPS + 1  # the capture's eager steps, the capture, a replay
    assert asked == [("fast", graph_warmup), ("eager", graph_warmup), ("stack", graph_warmup)]
    # Each records those and the FLOP-counted step as its untimed steps.
    assert row["warmup_steps"] == graph_warmup + 1


def test_locally_connected_bmm_is_counted():
    b = 4
    ds = synthetic_dataset("mnist", torch.device("cpu"))
    (row,) = bench_preset(
        ds, "loccon", ["brainprop"], torch.device("cpu"), peak=Peak(1.0, "test"), steps=1,
        warmup=0, batch_size=b, eval_images=8,
    )  # fmt: skip
    # 28x28 -> 26x26 (valid 3x3) -> 12x12 (stride 2), 32 channels, then 4608 -> 500 -> 10.
    layers = (26 * 26 * 9 * 32, 12 * 12 * 288 * 32, 4608 * 500, 500 * 10)
    assert row["forward_flops_per_step"] == 2 * b * sum(layers)
    assert row["flops_per_step"] == 2 * b * (3 * sum(layers) - layers[0])


def test_conv_flops_are_counted_apart(report):
    for row in report[0]["results"]:
        assert row["conv_flops_per_step"] == 0
        assert row["peak_tflops"] == 1.0 and row["peak_fraction"] == row["tflops"]
    ds = synthetic_dataset("mnist", torch.device("cpu"))
    mixed = Peaks(Peak(1.0, "matmul"), Peak(8.0, "conv"))
    (row,) = bench_preset(
        ds, "conv", ["ebp"], torch.device("cpu"), peak=mixed, steps=1, warmup=0,
        batch_size=2, eval_images=8,
    )  # fmt: skip
    flops, conv = row["flops_per_step"], row["conv_flops_per_step"]
    assert 0 < conv < flops
    assert row["peak_tflops"] == pytest.approx(flops / (conv / 8.0 + (flops - conv) / 1.0))
    assert row["peak_fraction"] == pytest.approx(row["tflops"] / row["peak_tflops"])
    # A convolution network takes the fast path, and its eager step is timed beside it.
    assert row["fast_path"] == ["channels_last"]
    assert row["eager_ratio"] == pytest.approx(row["eager_step_ms"] / row["step_ms"])
    assert f"| {row['eager_ratio']:.3f} |" in markdown({**report[0], "results": [row]})


@pytest.fixture
def tf32():
    """Set the CUDA TF32 flags (process-wide flags, set and read without a GPU) for a test;
    PyTorch's own defaults come back after it. (``monkeypatch`` cannot undo them: they are
    not plain attributes.)"""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn

    def set_flags(matmul_tf32: bool, conv_tf32: bool) -> None:
        matmul.allow_tf32, conv.allow_tf32 = matmul_tf32, conv_tf32

    before = (matmul.allow_tf32, conv.allow_tf32)
    yield set_flags
    set_flags(*before)


@pytest.mark.parametrize(
    ("matmul", "conv", "bf16", "label"),
    [
        (False, True, False, "matmul fp32, conv tf32 (cuDNN default)"),
        (False, False, False, "fp32"),
        (True, True, False, "tf32"),
        (True, False, False, "matmul tf32, conv fp32"),
        (False, True, True, "bf16"),
    ],
)
def test_precision_label_names_matmul_and_conv_apart(tf32, matmul, conv, bf16, label):
    tf32(matmul, conv)
    assert precision_label(*op_precisions(torch.device("cuda"), bf16)) == label
    assert precision_label(*op_precisions(torch.device("cpu"), bf16)) == (
        "bf16" if bf16 else "fp32"
    )


def test_a_runs_tf32_ops_are_those_it_has_and_that_ran_in_tf32(tf32):
    conv = build_model("conv", (1, 28, 28), 10)
    dense, loccon = build_model("dense", (1, 28, 28), 10), build_model("loccon", (1, 28, 28), 10)
    cuda = torch.device("cuda")
    tf32(False, True)  # PyTorch's defaults
    assert tf32_ops(cuda, False, conv) == ["convolutions"]
    # No convolution to run in TF32 (a locally connected layer is matmuls).
    assert tf32_ops(cuda, False, dense) == tf32_ops(cuda, False, loccon) == []
    assert tf32_ops(cuda, True, conv) == []  # bf16 autocast: another precision, named apart
    assert tf32_ops(torch.device("cpu"), False, conv) == []
    tf32(True, True)
    assert tf32_ops(cuda, False, conv) == ["matmuls", "convolutions"]
    assert tf32_ops(cuda, False, dense) == ["matmuls"]
    tf32(False, False)
    assert tf32_ops(cuda, False, conv) == []


def test_precisions_read_the_new_tf32_settings():
    # Once they are used, reading the old allow_tf32 flag raises (torch >= 2.9).
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = (matmul.fp32_precision, conv.fp32_precision, torch.backends.fp32_precision)
    try:
        matmul.fp32_precision, conv.fp32_precision = "tf32", "ieee"
        assert op_precisions(torch.device("cuda"), False) == ("tf32", "fp32")
        matmul.fp32_precision, conv.fp32_precision = "none", "none"
        torch.backends.fp32_precision = "tf32"  # the global setting, which "none" inherits
        assert op_precisions(torch.device("cuda"), False) == ("tf32", "tf32")
    finally:
        matmul.fp32_precision, conv.fp32_precision, torch.backends.fp32_precision = before


def test_gpu_peaks_follow_each_precision(tf32, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda _=None: "NVIDIA H200")
    cuda = torch.device("cuda")
    tf32(False, True)  # PyTorch's defaults
    peaks = device_peaks(cuda, False, None)
    assert (peaks.matmul.tflops, peaks.conv.tflops) == (66.9, 494.7)
    assert "fp32" in peaks.matmul.source and "tf32" in peaks.conv.source
    # A step that is all convolutions is held to the TF32 peak, all matmuls to the fp32 one.
    assert peaks.for_step(100, 100) == pytest.approx(494.7)
    assert peaks.for_step(100, 0) == pytest.approx(66.9)
    tf32(False, False)
    assert device_peaks(cuda, False, None).conv.tflops == 66.9
    bf16 = device_peaks(cuda, True, None)
    assert bf16.matmul.tflops == bf16.conv.tflops == 989.0
    given = device_peaks(cuda, False, 10.0)
    assert given.matmul.tflops == given.conv.tflops == 10.0


@pytest.mark.parametrize(
    ("name", "board"),
    [("NVIDIA H200", ("H200", "")), ("NVIDIA H100 80GB HBM3", ("H100", "")),
     ("NVIDIA H100 PCIe", ("H100", "PCIE")), ("NVIDIA A100-SXM4-80GB", ("A100", "")),
     ("NVIDIA A100-PCIE-40GB", ("A100", "PCIE")), ("NVIDIA H200 NVL", ("H200", "NVL")),
     ("NVIDIA GH200 480GB", None), ("NVIDIA RTX A1000 Laptop GPU", None),
     ("NVIDIA GeForce RTX 4090", None),
     # A slice of the board, not the whole one's peak (review).
     ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", None)],
)  # fmt: skip
def test_gpu_boards_are_matched_by_whole_words(name, board, monkeypatch):
    assert gpu_board(name) == board
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda _=None: name)
    if board in GPU_PEAKS:
        assert device_peaks(torch.device("cuda"), True, None).matmul.tflops > 100
    else:  # an NVL board's clocks differ from the SXM one's: not guessed
        with pytest.raises(BrainPropError, match=f"no peak FLOP/s known for '{name}': pass"):
            device_peaks(torch.device("cuda"), True, None)


@pytest.mark.parametrize("name", ["h200-bf16-graph.json", "h200-bf16-graph-stack10.json"])
def test_markdown_renders_the_reports_in_docs(name):
    """docs/performance.md says ``markdown`` turns a bench report back into its table; these
    predate the ``software`` field and keep torch's version at the top level."""
    report = json.loads((REPO / "docs" / "bench" / name).read_text())
    table = markdown(report)
    assert f", torch {report['torch']}\n" in table
    for row in report["results"]:
        assert f"| {row['preset']} | {row['batch_size']} | {row['rule']} | " in table


def test_markdown_shows_both_peaks_only_when_they_differ(report):
    rep = json.loads(json.dumps(report[0]))
    one = markdown(rep)
    assert "- peak: 1.000 TFLOP/s" in one and "peak TFLOP/s" not in one
    assert "- device: cpu (" in one and "), fp32, torch" in one
    gpu = json.loads(json.dumps(rep))
    gpu["device"] |= {"type": "cuda", "name": "NVIDIA H200", "vector_units": None}
    gpu["device"]["machine"] = "NVIDIA H200"
    assert "- device: NVIDIA H200, fp32, torch" in markdown(gpu)
    del gpu["device"]["machine"]  # as the reports in docs/bench/ have it
    assert "- device: cuda (NVIDIA H200), fp32, torch" in markdown(gpu)
    rep["device"] |= {
        "precision": "matmul fp32, conv tf32 (cuDNN default)",
        "conv_peak_tflops": 8.0,
        "conv_peak_source": "conv datasheet",
    }
    two = markdown(rep)
    assert "matmul fp32, conv tf32 (cuDNN default)" in two
    assert "convolutions 8.000 TFLOP/s (conv datasheet)" in two
    table = two[two.index("| preset | batch") :].splitlines()
    header, rule, first = table[:3]
    assert "| % of peak | peak TFLOP/s |" in header
    assert header.count("|") == rule.count("|") == first.count("|")
    assert "| 1.0 |" in first


def test_markdown_renders_each_rows_figures_in_their_own_columns(report):
    """Known figures, each in its column and unit: a slip of a scale or a swap of two columns
    still gives a table that reads well."""
    rep = copy.deepcopy(report[0])
    bp, ebp = rep["results"]
    mib = 2**20
    for row, step_ms in ((bp, 2.5), (ebp, 2.0)):
        row |= {
            "batch_size": 8, "steps_per_epoch": 7500, "step_ms": step_ms,
            "epoch_s": 7500 * step_ms / 1e3 + 0.01, "images_per_s": 8 / (step_ms / 1e3),
            "flops_per_step": 1_234_000_000, "tflops": 1.234e9 / (step_ms / 1e3) / 1e12,
            "peak_fraction": 1.234e9 / (step_ms / 1e3) / 1e12, "peak_memory_bytes": 30 * mib,
            "memory_held_before_bytes": 20 * mib, "host_rss_bytes": 100 * mib,
            "eval_s_per_10k": 0.1234, "eager_ratio": None,
        }  # fmt: skip
    ebp["eager_ratio"] = 1.5
    rep["ratios"] = [
        {"preset": "mnist/dense", "brainprop_step_ms": 2.5, "ebp_step_ms": 2.0,
         "brainprop_over_ebp": 1.25, "brainprop_over_ebp_blocks": [1.2, 1.25, 1.3]},
    ]  # fmt: skip
    lines = [line for line in markdown(rep).splitlines() if line.startswith("| mnist/dense |")]
    assert lines == [
        "| mnist/dense | 8 | brainprop | 2.50 | 18.76 | 3,200 | 1.23 | 0.4936 | 49.4 | 30 (20) "
        "| 100 | 0.123 | - |",
        "| mnist/dense | 8 | ebp | 2.00 | 15.01 | 4,000 | 1.23 | 0.6170 | 61.7 | 30 (20) | 100 "
        "| 0.123 | 1.500 |",
        "| mnist/dense | 2.50 | 2.00 | 1.250 | 1.200-1.300 |",
    ]


def test_synthetic_dataset_has_the_real_shape():
    ds = synthetic_dataset("cifar10", torch.device("cpu"))
    assert ds.train_x.shape == (50_000, 3, 32, 32) and ds.test_x.shape == (10_000, 3, 32, 32)
    assert ds.train_x.dtype == torch.uint8 and int(ds.train_y.max()) < 10


AMD = "vendor_id\t: AuthenticAMD\ncpu MHz\t\t: 2596.146\nflags\t\t: fpu sse avx fma avx2 avx512f\n"


def test_cpu_peak_estimate():
    amd = cpu_peak(2, AMD)
    assert amd is not None and amd.tflops == pytest.approx(2 * 8 * 2 * 2 * 2.596146e9 / 1e12)
    intel = cpu_peak(1, AMD.replace("AuthenticAMD", "GenuineIntel"))
    assert intel is not None and intel.tflops == pytest.approx(16 * 2 * 2 * 2.596146e9 / 1e12)
    assert "assumed" in amd.source
    # Zen 4 splits AVX-512 in two; Zen 5 server cores do not, and cpuinfo does not tell them
    # apart, so the width is said to be assumed.
    assert "(AVX-512 on 256-bit units, assumed)" in amd.source
    assert cpu_peak(2, "vendor_id\t: AuthenticAMD\nflags\t: avx2\n") is None
    # A bench divided by a clock of 0 after its timing, and reported a peak of nan (review).
    for clock in ("0.000", "nan", "inf", "-2596.146"):
        assert cpu_peak(2, AMD.replace("2596.146", clock)) is None, clock
    # Sandy and Ivy Bridge: 256-bit AVX without FMA.
    sandy = cpu_peak(1, "vendor_id\t: GenuineIntel\ncpu MHz\t\t: 2000.0\nflags\t\t: sse2 avx\n")
    assert sandy is not None and sandy.tflops == pytest.approx(8 * 1 * 2 * 2.0e9 / 1e12)
    assert "x 8 fp32 lanes (AVX) x 1 (FMA)" in sandy.source


def _cpu(processor: int, core: int, socket: int = 0) -> str:
    """/proc/cpuinfo's block of one logical CPU of the AMD above."""
    return f"processor\t: {processor}\nphysical id\t: {socket}\ncore id\t\t: {core}\n{AMD}"


def test_cpu_peak_counts_cores_not_hyperthreads():
    one_core = "\n".join([_cpu(0, 0), _cpu(1, 0)])  # two hyperthreads of core 0
    peak, per_core = cpu_peak(2, one_core), cpu_peak(1, AMD)
    assert peak is not None and per_core is not None and peak.tflops == per_core.tflops
    assert "1 cores (2 threads)" in peak.source
    two_cores = "\n".join([_cpu(0, 0), _cpu(1, 1)])
    assert physical_cores(two_cores) == 2 and physical_cores(one_core) == 1
    assert physical_cores(AMD) is None  # no topology: the threads count as cores
    here = physical_cores()  # this machine's own cpuinfo, read through its affinity
    assert here is None or 1 <= here <= (os.cpu_count() or 1)
    assert cpu_peak(2, two_cores).tflops == cpu_peak(2, AMD).tflops
    # A run of fewer threads than cores has as many cores as threads.
    assert cpu_peak(1, two_cores).tflops == cpu_peak(1, AMD).tflops
    # Core 0 of each of two sockets: two cores.
    assert physical_cores("\n".join([_cpu(0, 0, socket=0), _cpu(1, 0, socket=1)])) == 2


def test_physical_cores_are_those_of_the_cpus_this_process_may_use(monkeypatch):
    """Under taskset or SLURM the peak counts the cores given, not the machine's."""
    text = "\n".join(_cpu(i, i) for i in range(4))
    monkeypatch.setattr(devices, "open", lambda *a, **k: io.StringIO(text), raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2}, raising=False)
    assert physical_cores() == 2


def test_cpu_bf16_peak_follows_the_bf16_instructions():
    fp32 = cpu_peak(2, AMD)
    assert fp32 is not None
    # Without bf16 instructions bf16 runs as fp32: the same peak, and a warning to train.
    plain = cpu_peak(2, AMD, bf16=True)
    assert plain is not None and plain.tflops == fp32.tflops and "at the fp32 rate" in plain.source
    assert "slower than fp32" in (bf16_warning(torch.device("cpu"), AMD) or "")
    dot = AMD.replace("avx512f", "avx512f avx512_bf16")
    native = cpu_peak(2, dot, bf16=True)
    assert native is not None and native.tflops == pytest.approx(2 * fp32.tflops)
    assert "AVX512_BF16" in native.source and bf16_warning(torch.device("cpu"), dot) is None
    amx = cpu_peak(4, AMD.replace("avx512f", "avx512f amx_bf16"), bf16=True)
    assert amx is not None and amx.tflops == pytest.approx(4 * 1024 * 2.596146e9 / 1e12)
    assert bf16_warning(torch.device("cpu"), AMD.replace("avx512f", "amx_bf16")) is None
    # AMX multiplies bf16 alone: an fp32 run is held to the AVX-512 units' peak.
    intel_amx = AMD.replace("AuthenticAMD", "GenuineIntel").replace("avx512f", "avx512f amx_bf16")
    fp32_amx = cpu_peak(4, intel_amx)
    assert fp32_amx is not None and "AMX" not in fp32_amx.source
    assert fp32_amx.tflops == pytest.approx(4 * 16 * 2 * 2 * 2.596146e9 / 1e12)


def test_a_cpus_machine_name_carries_its_vector_instructions():
    """Two "AMD EPYC" of different generations must not share a report row."""
    cpu = torch.device("cpu")
    assert ", AVX-512, " in device_name(cpu, AMD)
    assert ", AVX-512 BF16, " in device_name(cpu, AMD.replace("avx512f", "avx512f avx512_bf16"))
    assert ", AMX, " in device_name(cpu, AMD.replace("avx512f", "avx512f amx_bf16"))
    avx2 = "model name\t: AMD EPYC\n" + AMD.replace("avx512f", "")
    assert device_name(cpu, avx2).startswith(f"cpu (AMD EPYC, {platform.machine()}, AVX2, ")
    assert vector_units({"flags": "fpu sse2"}) is None and vector_units({}) is None


def test_bf16_warning_on_a_gpu_follows_its_compute_capability(monkeypatch):
    capability = {"major": 9}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda _d: (capability["major"], 0))
    assert bf16_warning(torch.device("cuda"), AMD) is None  # an H100/H200: bf16 tensor cores
    capability["major"] = 8  # an A100 has them too
    assert bf16_warning(torch.device("cuda"), AMD) is None
    capability["major"] = 7  # a V100 or T4 emulates bf16
    assert "compute capability 7.0" in (bf16_warning(torch.device("cuda"), AMD) or "")


def test_bf16_warning_reads_arm_features_and_stays_quiet_without_a_list():
    arm = "processor\t: 0\nFeatures\t: fp asimd sve"
    assert bf16_warning(torch.device("cpu"), arm) is not None
    assert bf16_warning(torch.device("cpu"), arm + " bf16 i8mm") is None
    assert bf16_warning(torch.device("cpu"), "processor\t: 0\n") is None


def test_bad_presets_and_rules_are_clear_errors():
    with pytest.raises(BrainPropError, match="dataset/arch"):
        parse_preset("mnist")
    # In bench's own terms: there is no --arch flag to point at.
    with pytest.raises(
        BrainPropError,
        match=r"^--presets 'mnist/deep': the paper has no 'deep' "
        r"network for mnist; choose from mnist/conv, mnist/dense, mnist/loccon$",
    ):
        parse_preset("mnist/deep")
    assert parse_preset("cifar100-coarse/deep") == ("cifar100-coarse", "deep")
    with pytest.raises(BrainPropError, match="unknown rule"):
        run_bench(["mnist/dense"], ["sgd"], device="cpu", peak_tflops=1.0)


@pytest.mark.parametrize("size", [0, 60_001])
def test_a_batch_no_epoch_can_hold_is_refused_before_anything_is_built(tmp_path, size):
    """A batch above the training set would be cut to it while the row kept the size asked
    for, overstating images/s."""
    with pytest.raises(BrainPropError, match=r"^--batch-size must be 1 to 60,000 \(mnist's "):
        run_bench(["mnist/dense"], ["ebp"], device="cpu", batch_size=size, out=tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("asked", "message"),
    [({"steps": 0}, r"^--steps must be >= 1 "), ({"warmup": -1}, r"--warmup >= 0, got 1 and -1$"),
     ({"eval_images": 0}, r"^--eval-images must be >= 1, got 0$")],
)  # fmt: skip
def test_counts_out_of_range_are_refused_before_anything_is_built(tmp_path, asked, message):
    """--steps 0 divided by zero once the networks were built; --eval-images 0 timed the
    whole test set; a negative --warmup is no count of steps."""
    said = []
    kwargs = {"steps": 1, "warmup": 0, "batch_size": 4, "eval_images": 8} | asked
    with pytest.raises(BrainPropError, match=message):
        run_bench(
            ["mnist/dense"], ["ebp"], device="cpu", peak_tflops=1.0, out=tmp_path / "o",
            say=said.append, **kwargs,
        )  # fmt: skip
    assert said == [] and not (tmp_path / "o").exists()


def test_an_unknown_rule_is_refused_before_any_rule_is_built(tmp_path):
    """Found as the rules were built in turn, it came after the folder was made and the
    rules before it were built and warmed up."""
    said = []
    with pytest.raises(BrainPropError, match="^unknown rule 'nope'"):
        run_bench(
            ["mnist/dense"], ["ebp", "nope"], device="cpu", peak_tflops=1.0, steps=1, warmup=0,
            batch_size=4, eval_images=8, out=tmp_path / "o", say=said.append,
        )  # fmt: skip
    assert said == [] and not (tmp_path / "o").exists()


def test_a_batch_of_the_whole_training_set_is_admitted():
    # One step an epoch, with no short batch: the largest batch an epoch holds.
    checked = bench._checked_presets(["mnist/dense"], ["ebp"], 1, 0, 60_000, None, 1)
    assert checked == [("mnist", "dense")]


def test_a_graph_off_cuda_is_refused_before_anything_is_made(tmp_path, capsys):
    """It was refused only as the first preset was built, after the folder was made and the
    warnings printed, in words about a run's resume (review)."""
    with pytest.raises(BrainPropError) as info:
        run_bench(["mnist/dense"], ["ebp"], device="cpu", cuda_graph=True, out=tmp_path / "o")
    assert str(info.value) == (
        "--cuda-graph needs a CUDA device, and this bench would run on cpu (--device cpu): "
        "drop --cuda-graph"
    )
    assert not (tmp_path / "o").exists() and capsys.readouterr() == ("", "")


def test_a_step_of_no_flops_has_the_matmul_peak():
    # Its share of convolution FLOPs is 0 / 0.
    assert Peaks(Peak(1.0, "matmul"), Peak(2.0, "conv")).for_step(0, 0) == 1.0


def test_an_index_past_the_last_gpu_is_not_available(monkeypatch):
    """A one-line error, not torch's traceback once the run starts."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert devices.device_problem("cuda:0") is None
    assert "device 'cuda:1' is not available here" in (devices.device_problem("cuda:1") or "")


def test_a_cpu_run_records_no_cuda_version(monkeypatch):
    # On a CUDA build of torch too: the run used none.
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    assert "cuda" not in software(torch.device("cpu"))
    assert software(torch.device("cuda"))["cuda"] == "12.4"


@pytest.mark.parametrize("peak", [0.0, -1.0, math.nan, math.inf, 1e-300, 2e5])
def test_a_peak_that_no_device_has_is_refused(peak):
    """A slip of an exponent too, which printed a share of the peak 300 digits long."""
    with pytest.raises(BrainPropError, match="^--peak-tflops must be a number of TFLOP/s from "):
        device_peaks(torch.device("cpu"), False, peak)


def test_a_bad_peak_is_refused_before_the_folder_is_made(tmp_path):
    """As every other bad setting: the folder was left behind, empty (a review)."""
    with pytest.raises(BrainPropError, match="^--peak-tflops must be a number of TFLOP/s from "):
        run_bench(["mnist/dense"], ["ebp"], device="cpu", peak_tflops=0.0, out=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_no_rules_is_refused_before_anything_is_built(tmp_path):
    """The CLI's parser refuses an empty list; the library wrote a report of no rows."""
    with pytest.raises(BrainPropError, match="^no rules to bench: name at least one"):
        run_bench(["mnist/dense"], [], device="cpu", peak_tflops=1.0, out=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_a_bench_says_each_phase_as_it_begins(report):
    """A large preset takes minutes on a CPU before its rows, which came silent (review)."""
    said = report[2]
    phases = [line for line in said if line.startswith("mnist/dense: ")]
    assert phases == [
        "mnist/dense: building and warming up brainprop's step",
        "mnist/dense: building and warming up ebp's step",
        "mnist/dense: timing 2 kinds of step in turn, 3 steps each",  # 3 blocks of 1
        "mnist/dense: timing brainprop's evaluation of 16 images",
        "mnist/dense: timing ebp's evaluation of 16 images",
    ]
    assert said.index(phases[-1]) < min(i for i, line in enumerate(said) if " ms/step " in line)


@pytest.mark.parametrize("stopped_in", ["mnist/dense", "mnist/conv"])
def test_a_stop_signal_ends_a_bench_in_one_line_saying_what_it_kept(
    tmp_path, sigterm_caught, capsys, monkeypatch, stopped_in
):
    """SIGTERM killed it without a word; Ctrl-C said only "interrupted". A report left by an
    earlier bench in the folder is not said to hold this one's presets (review)."""
    real = bench.bench_preset

    def stopped(ds, arch, *args, **kwargs):
        if f"{ds.name}/{arch}" == stopped_in:
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("the signal stops the bench first")
        return real(ds, arch, *args, **kwargs)

    monkeypatch.setattr(bench, "bench_preset", stopped)
    (tmp_path / JSON_NAME).write_text('{"an": "earlier bench"}')
    argv = ["bench", "--presets", "mnist/dense,mnist/conv", "--rules", "ebp", "--device", "cpu"]
    argv += ["--peak-tflops", "1", "--steps", "1", "--warmup", "0", "--batch-size", "4"]
    assert main([*argv, "--eval-images", "8", "--out", str(tmp_path)]) == 128 + signal.SIGTERM
    kept = (
        "no preset had ended, so it wrote no report"
        if stopped_in == "mnist/dense"
        else f"the presets benched before it are in {tmp_path / JSON_NAME}"
    )
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"brainprop: stopped by SIGTERM while benchmarking; {kept}"
    )


def test_a_stack_too_large_for_memory_is_refused_before_any_timing(tmp_path, monkeypatch):
    # mnist/dense: 3,181,000 weights of 4 bytes; a stack of 100 needs 3 copies of each.
    monkeypatch.setattr(memory, "available", lambda device: 3 * 100 * 3_181_000 * 4 - 1)
    said = []
    with pytest.raises(BrainPropError, match=r"^--stack 100 needs about 3\.6 GiB for 100 "
                       r"mnist/dense networks' weights and gradients, more than the 3\.6 GiB "
                       r"cpu has free: pass a smaller --stack$"):  # fmt: skip
        run_bench(
            ["mnist/dense"], ["ebp"], device="cpu", peak_tflops=1.0, stack=100,
            out=tmp_path / "b", say=said.append,
        )  # fmt: skip
    assert said == [] and not (tmp_path / "b").exists()


def test_stacks_whose_steps_would_not_fit_are_refused_before_they_are_built(monkeypatch):
    """The weights alone were checked: a step's activations, the largest part, and a stack
    per rule, all held at once, ran out of memory after the networks were built (review)."""
    weights = 3_181_000 * 4
    monkeypatch.setattr(memory, "available", lambda device: 3 * 2 * weights + 1)
    # Each single step takes 1 GiB above what was held before it.
    monkeypatch.setattr(memory, "peak", lambda device, reset: (memory.held(device) + 2**30, "t"))
    said = []
    # Two stacks of two seeds, each seed 1 GiB and three copies of its weights, about 4.1 GiB
    # (what was held grew by a little as the step's peak was read).
    with pytest.raises(
        BrainPropError,
        match=r"^--stack 2 needs about 4\.[12] GiB for 2 mnist/dense networks' steps "
        r"\(activations, weights and gradients\), a stack for each of 2 rules, more than the "
        r"0\.1 GiB cpu has free: pass a smaller --stack$",
    ):
        run_bench(
            ["mnist/dense"], ["ebp", "brainprop"], device="cpu", peak_tflops=1.0, stack=2,
            steps=1, warmup=0, batch_size=4, eval_images=8, say=said.append,
        )  # fmt: skip
    assert not any(line.startswith("mnist/dense: timing") for line in said), said


def test_cli_bench_prints_markdown_and_writes_files(tmp_path, capsys):
    args = [
        "bench", "--presets", "mnist/dense", "--rules", "ebp", "--device", "cpu", "--steps",
        "1", "--warmup", "0", "--batch-size", "4", "--eval-images", "8", "--peak-tflops", "1",
        "--out", str(tmp_path),
    ]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("# brainprop bench") and "| mnist/dense | 4 | ebp |" in out
    assert (tmp_path / JSON_NAME).is_file() and (tmp_path / MARKDOWN_NAME).is_file()
    assert main(["bench", "--presets", "mnist/nope", "--device", "cpu"]) == 2
    assert "'nope'" in capsys.readouterr().err
    # A rule named twice is benched once, beside its own eager step.
    assert main([*args[:4], "ebp,ebp", *args[5:]]) == 0
    assert capsys.readouterr().out.count("| mnist/dense | 4 | ebp |") == 1
    assert main([*args[:-1], str(tmp_path / JSON_NAME)]) == 2
    err = capsys.readouterr().err
    assert "cannot create the folder" in err and err.count("\n") == 1 and "load" not in err


def test_an_out_folder_that_takes_no_files_is_refused_before_any_timing(
    tmp_path, capsys, monkeypatch
):
    # A read-only folder, as root (who may write anywhere) cannot make one.
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(files.tempfile, "TemporaryFile", refuse)
    argv = ["bench", "--presets", "mnist/dense", "--device", "cpu", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        f"brainprop: error: cannot write into {tmp_path} (Permission denied): pass as --out a "
        "folder you can write to, not a file\n"
    )


def test_a_stack_is_timed_beside_the_single_step(tmp_path):
    rep = run_bench(
        ["mnist/dense"], ["ebp"], device="cpu", steps=2, warmup=0, batch_size=4,
        peak_tflops=1.0, eval_images=8, stack=3, out=tmp_path, say=lambda _: None,
    )  # fmt: skip
    (row,) = rep["results"]
    assert row["stack_size"] == 3 and row["stack_step_ms"] > 0
    assert row["stack_speedup"] == pytest.approx(3 * row["step_ms"] / row["stack_step_ms"])
    assert row["stack_peak_memory_bytes"] > 0 and row["stack_eval_s_per_10k"] > 0
    assert 0 < row["stack_memory_held_before_bytes"] <= row["stack_peak_memory_bytes"]
    md = (tmp_path / MARKDOWN_NAME).read_text()
    assert "stack of 3 ms | stack speed-up | stack eval 10k s |" in md
    assert md.splitlines()[-1].startswith("Stack: 3 seeds in one stacked network")
    with pytest.raises(BrainPropError, match="--stack must be >= 1"):
        run_bench(["mnist/dense"], ["ebp"], device="cpu", peak_tflops=1.0, stack=0)


def test_a_bench_stopped_part_way_keeps_the_presets_done(tmp_path, monkeypatch):
    real = bench.bench_preset

    def stopped_at_the_second(ds, arch, *args, **kwargs):
        if arch == "conv":
            raise KeyboardInterrupt
        return real(ds, arch, *args, **kwargs)

    monkeypatch.setattr(bench, "bench_preset", stopped_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        run_bench(
            ["mnist/dense", "mnist/conv"], ["ebp"], device="cpu", steps=1, warmup=0,
            batch_size=4, peak_tflops=1.0, eval_images=8, out=tmp_path, say=lambda _: None,
        )  # fmt: skip
    kept = json.loads((tmp_path / JSON_NAME).read_text())
    assert [r["preset"] for r in kept["results"]] == ["mnist/dense"]
    assert "| mnist/dense | 4 | ebp |" in (tmp_path / MARKDOWN_NAME).read_text()


def test_a_preset_frees_its_networks_once_it_is_done(monkeypatch):
    """Nothing of a preset may count in the next one's memory: every network it built (fast,
    eager and stacked) is gone after the collection ``run_bench`` makes between presets."""
    built = []
    real = bench.build_model

    def build(*args, **kwargs):
        model = real(*args, **kwargs)
        built.append(weakref.ref(model))
        return model

    # The fast and eager steps are built as training builds them (train.build_step), the
    # stacks by bench itself.
    monkeypatch.setattr(train_module, "build_model", build)
    monkeypatch.setattr(bench, "build_model", build)
    device = torch.device("cpu")
    bench.bench_preset(
        bench.synthetic_dataset("mnist", device), "conv", ["brainprop", "ebp"], device,
        peak=device_peaks(device, False, 1.0), steps=1, warmup=0, batch_size=8,
        eval_images=16, stack=2,
    )  # fmt: skip
    gc.collect()
    assert len(built) == 8 and not any(ref() for ref in built)


def test_steps_are_timed_in_whole_blocks_as_the_progress_line_says():
    """The line said --steps 7 where 5 were timed (review)."""
    assert [bench._blocks(n) for n in (3, 7, 12)] == [(3, 1), (5, 1), (5, 2)]


def test_more_images_than_the_test_set_are_reported_as_those_scored(tiny_dataset):
    """Asking for 20,000 on a 10,000-image test set reported 20,000, and halved eval 10k s."""
    (row,) = bench_preset(
        tiny_dataset, "dense", ["ebp"], torch.device("cpu"), peak=Peak(1.0, "test"), steps=1,
        warmup=0, batch_size=8, eval_images=1000,
    )  # fmt: skip
    n_test = len(tiny_dataset.test_y)
    assert row["eval_images"] == n_test
    assert row["eval_s_per_10k"] == pytest.approx(row["eval_s"] * 1e4 / n_test)


@pytest.mark.parametrize(("load", "warned"), [(2.9, False), (3.1, True)])
def test_a_load_above_three_quarters_of_the_cpus_is_warned_of(tmp_path, monkeypatch, load, warned):
    monkeypatch.setattr(os, "getloadavg", lambda: (load, 0.5, 0.5))
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    # The warning comes before any preset: none needs building to hear it.
    monkeypatch.setattr(bench, "synthetic_dataset", lambda name, device: None)
    monkeypatch.setattr(bench, "bench_preset", lambda *args, **kwargs: [])
    said = []
    rep = run_bench(["mnist/dense"], ["ebp"], device="cpu", peak_tflops=1.0, say=said.append)
    warning = (
        f"warning: 1-minute load average {load:.2f} on 4 CPUs: other processes compete for the "
        "CPU, so these timings understate the speed"
    )
    assert said == ([warning] if warned else [])
    assert rep["load_average_before"] == [load, 0.5, 0.5]


def test_times_below_one_keep_three_decimals():
    """A graphed step of 0.124 ms must not print as a target of 0.12 it misses."""
    assert bench._time(0.124) == "0.124" and bench._time(0.9994) == "0.999"
    # What rounds to 1 at three decimals is printed as 1 or more.
    assert bench._time(0.9996) == "1.00" and bench._time(1.234) == "1.23"
    assert bench._time(12.345) == "12.35"
