"""``brainprop bench``: report contents, FLOP counts against hand counts, peak estimate, CLI.

Nothing here asserts a timing: the machine is shared, and the figures are for people to read.
"""

import json

import pytest
import torch

from brainprop.bench import (
    DATASET_SHAPES,
    JSON_NAME,
    MARKDOWN_NAME,
    Peak,
    bench_preset,
    cpu_peak,
    parse_preset,
    run_bench,
    synthetic_dataset,
)
from brainprop.cli import main
from brainprop.errors import BrainPropError

ROW_FIELDS = {
    "preset", "rule", "batch_size", "steps_per_epoch", "step_ms", "epoch_s", "images_per_s",
    "flops_per_step", "forward_flops_per_step", "tflops", "peak_fraction", "peak_memory_bytes",
    "host_rss_bytes", "eval_s", "eval_s_per_10k",
}  # fmt: skip
DENSE = (784 * 1500, 1500 * 1000, 1000 * 500, 500 * 10)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rep = run_bench(
        ["mnist/dense"], ["brainprop", "ebp"], device="cpu", steps=2, warmup=0, batch_size=8,
        peak_tflops=1.0, eval_images=16, out=out, say=lambda _: None,
    )  # fmt: skip
    return rep, out


def test_report_has_both_rules_and_every_field(report):
    rep, out = report
    assert [r["rule"] for r in rep["results"]] == ["brainprop", "ebp"]
    for row in rep["results"]:
        assert set(row) >= ROW_FIELDS
        assert row["step_ms"] > 0 and row["peak_memory_bytes"] > 0
        assert row["steps_per_epoch"] == -(-60_000 // 8)
    (ratio,) = rep["ratios"]
    assert ratio["brainprop_over_ebp"] == pytest.approx(
        ratio["brainprop_step_ms"] / ratio["ebp_step_ms"]
    )
    assert rep["eager_ratio"] is None and "eager only" in rep["mode"]
    assert json.loads((out / JSON_NAME).read_text()) == json.loads(json.dumps(rep))
    md = (out / MARKDOWN_NAME).read_text()
    assert "| mnist/dense | 8 | brainprop |" in md and "| mnist/dense | 8 | ebp |" in md
    assert "BrainProp/EBP" in md and "1.000 TFLOP/s (given with --peak-tflops)" in md


def test_dense_flops_match_a_hand_count(report):
    b, total = 8, sum(DENSE)
    forward = 2 * b * total
    # Backward: a weight gradient per layer, an input gradient for all but the first layer
    # (the images need none).
    backward = 2 * b * (2 * total - DENSE[0])
    for row in report[0]["results"]:
        assert row["forward_flops_per_step"] == forward
        assert row["flops_per_step"] == forward + backward


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


def test_synthetic_dataset_has_the_real_shape():
    ds = synthetic_dataset("cifar10", torch.device("cpu"))
    assert ds.train_x.shape == (50_000, 3, 32, 32) and ds.test_x.shape == (10_000, 3, 32, 32)
    assert ds.train_x.dtype == torch.uint8 and int(ds.train_y.max()) < 10
    assert set(DATASET_SHAPES) >= {"mnist", "cifar10", "tiny-imagenet"}


AMD = "vendor_id\t: AuthenticAMD\ncpu MHz\t\t: 2596.146\nflags\t\t: fpu sse avx fma avx2 avx512f\n"


def test_cpu_peak_estimate():
    amd = cpu_peak(2, AMD)
    assert amd is not None and amd.tflops == pytest.approx(2 * 8 * 2 * 2 * 2.596146e9 / 1e12)
    intel = cpu_peak(1, AMD.replace("AuthenticAMD", "GenuineIntel"))
    assert intel is not None and intel.tflops == pytest.approx(16 * 2 * 2 * 2.596146e9 / 1e12)
    assert "assumed" in amd.source
    assert cpu_peak(2, "vendor_id\t: AuthenticAMD\nflags\t: avx2\n") is None


def test_bad_presets_and_rules_are_clear_errors():
    with pytest.raises(BrainPropError, match="dataset/arch"):
        parse_preset("mnist")
    with pytest.raises(BrainPropError, match="deep"):
        parse_preset("mnist/deep")
    with pytest.raises(BrainPropError, match="unknown rule"):
        run_bench(["mnist/dense"], ["sgd"], device="cpu", peak_tflops=1.0)


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
