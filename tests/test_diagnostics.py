"""Diagnostics: angles and norm ratios, no side effects, history columns, plot, training run."""

from __future__ import annotations

import math

import pytest
import torch

from brainprop import BrainProp, Dataset, TrainConfig, build_model, convert, load_model, train
from brainprop.cli import build_parser
from brainprop.diagnostics import angle, diagnostics, plot_diagnostics
from brainprop.errors import BrainPropError
from brainprop.feedback import feedback_weight, layer_kind
from brainprop.presets import preset_hyperparameters


def _model(mode: str):
    model = build_model("conv", (1, 10, 10), 5, generator=torch.Generator().manual_seed(0))
    convert(model, mode, generator=torch.Generator().manual_seed(1))
    return model


def _batch():
    gen = torch.Generator().manual_seed(2)
    return torch.rand(16, 1, 10, 10, generator=gen), torch.randint(0, 5, (16,), generator=gen)


def test_angle():
    a = torch.tensor([1.0, 0.0])
    assert angle(a, a) == 0.0
    assert angle(a, torch.tensor([0.0, 2.0])) == pytest.approx(90.0)
    assert angle(a, -a) == pytest.approx(180.0)
    assert math.isnan(angle(a, torch.zeros(2)))


def test_symmetric_feedback_is_aligned():
    d = diagnostics(_model("symmetric"), *_batch(), BrainProp())
    assert {k.split("/")[0] for k in d} == {"angle_wb", "norm_ratio", "angle_update"}
    assert len([k for k in d if k.startswith("angle_update/")]) == 4
    assert all(v == pytest.approx(0.0, abs=1e-3) for k, v in d.items() if "angle" in k)
    assert all(v == pytest.approx(1.0) for k, v in d.items() if k.startswith("norm_ratio/"))


def test_norm_ratio_is_feedback_over_forward():
    # Symmetric feedback has ratio 1 either way up; only a B of another size tells |B| / |W|
    # (the documented 2) from |W| / |B| (0.5).
    model = _model("reciprocal")
    with torch.no_grad():
        for m in model.modules():
            if layer_kind(m) is not None:
                feedback_weight(m).copy_(2 * m.weight)
    d = diagnostics(model, *_batch(), BrainProp())
    ratios = {k: v for k, v in d.items() if k.startswith("norm_ratio/")}
    assert len(ratios) == 4 and all(v == pytest.approx(2.0) for v in ratios.values())
    assert all(v == pytest.approx(0.0, abs=1e-3) for k, v in d.items() if "angle_wb/" in k)


def test_random_feedback_is_orthogonal_and_output_layer_exact():
    d = diagnostics(_model("random"), *_batch(), BrainProp())
    assert 80 < d["angle_wb/3"] < 100  # independent random B: nearly orthogonal to W
    assert d["angle_update/11"] == pytest.approx(0.0, abs=1e-3)  # the output layer's update
    assert d["angle_update/3"] > 10


def test_a_partly_converted_model_has_update_angles():
    # Symmetric layers after the random ones do not make the whole model exact: the first
    # layer's delta still comes down through layer 3's random B.
    model = build_model("conv", (1, 10, 10), 5, generator=torch.Generator().manual_seed(0))
    convert(model[:4], "random", generator=torch.Generator().manual_seed(1))
    d = diagnostics(model, *_batch(), BrainProp())
    assert d["angle_update/0"] > 10
    assert d["angle_update/11"] == pytest.approx(0.0, abs=1e-3)


def test_direct_has_no_weight_angle_but_an_update_angle():
    d = diagnostics(_model("direct"), *_batch(), BrainProp())
    assert not any(k.startswith("angle_wb/") for k in d)
    assert d["angle_update/0"] > 10


def test_a_frozen_layer_has_no_update_angle():
    model = _model("random")
    model[3].weight.requires_grad_(False)
    d = diagnostics(model, *_batch(), BrainProp())
    assert math.isnan(d["angle_update/3"]) and d["angle_update/0"] > 10
    assert 80 < d["angle_wb/3"] < 100  # its feedback weights are still there to compare


def test_update_angles_replay_the_dropout_masks_and_actions():
    # B copied from W: the two passes make the same update only if both draw the same dropout
    # masks and, with every action exploratory, the same actions.
    model = build_model(
        "conv", (1, 10, 10), 5, preset_hyperparameters("mnist", "conv"),
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    convert(model, "reciprocal", generator=torch.Generator().manual_seed(1))
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
    with torch.no_grad():
        for m in model.modules():
            if layer_kind(m) is not None:
                feedback_weight(m).copy_(m.weight)
    model.eval()
    grads = [torch.ones_like(p) for p in model.parameters()]
    for p, g in zip(model.parameters(), grads, strict=True):
        p.grad = g
    d = diagnostics(model, *_batch(), BrainProp(epsilon=1.0))
    updates = [v for k, v in d.items() if k.startswith("angle_update/")]
    assert len(updates) == 4 and all(v == pytest.approx(0.0, abs=1e-3) for v in updates)
    assert not any(m.training for m in model.modules())
    assert all(p.grad is g for p, g in zip(model.parameters(), grads, strict=True))


def test_a_frozen_layer_of_a_symmetric_model_has_no_update_angle():
    model = _model("symmetric")
    model[3].weight.requires_grad_(False)
    d = diagnostics(model, *_batch(), BrainProp())
    assert math.isnan(d["angle_update/3"]) and d["angle_update/0"] == 0.0


def test_diagnostics_leave_training_state_alone():
    model = _model("reciprocal")
    x, y = _batch()
    buffers = [b.clone() for b in model.buffers()]
    rng = torch.get_rng_state()
    diagnostics(model, x, y, BrainProp())
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))
    assert torch.equal(rng, torch.get_rng_state())
    assert all(p.grad is None for p in model.parameters())


def test_update_angles_are_measured_in_train_mode():
    # The update to compare is the one training makes: with dropout and BatchNorm's batch
    # statistics, whatever mode the caller left the model in; the caller's modes come back.
    model = _model("random")
    model.eval()
    model[2].train()
    modes = [m.training for m in model.modules()]
    seen: list[tuple[torch.nn.Module, bool]] = []

    def record(module, args, output):
        seen.append((module, module.training))

    for m in model.modules():
        m.register_forward_hook(record)
    diagnostics(model, *_batch(), BrainProp())
    assert {m for m, _ in seen} == set(model.modules()) and all(t for _, t in seen)
    assert [m.training for m in model.modules()] == modes


def test_plot_writes_a_png(tmp_path):
    rows = [
        {"epoch": e, "angle_wb/0": 90.0 - e, "norm_ratio/0": 1.0, "angle_update/0": 40.0}
        for e in (1, 2)
    ]
    plot_diagnostics(rows, tmp_path / "d.png", "title")
    assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_panels_have_their_labels_and_the_history_epochs(tmp_path, monkeypatch):
    # The x axis is the rows' own epochs, not row numbers: a history (a slice of one, say) need
    # not start at epoch 1.
    figures = []
    monkeypatch.setattr(
        "brainprop.diagnostics.atomic_write_figure", lambda path, fig, dpi: figures.append(fig)
    )
    rows = [
        {"epoch": e, "angle_wb/0": 80.0 + e, "angle_update/0": 30.0 + e, "norm_ratio/0": 1.0 + e}
        for e in (4, 5, 6)
    ]
    plot_diagnostics(rows, tmp_path / "d.png")
    (fig,) = figures
    panels = [
        ("angle(W, B) [deg]", [84.0, 85.0, 86.0]),
        ("angle(update, exact gradient) [deg]", [34.0, 35.0, 36.0]),
        ("|B| / |W|", [5.0, 6.0, 7.0]),
    ]
    assert len(fig.axes) == len(panels)
    for ax, (ylabel, values) in zip(fig.axes, panels, strict=True):
        assert ax.get_ylabel() == ylabel and ax.get_xlabel() == "epoch"
        (line,) = ax.get_lines()
        assert line.get_label() == "0"
        assert [float(v) for v in line.get_xdata()] == [4.0, 5.0, 6.0]
        assert [float(v) for v in line.get_ydata()] == values


def _tiny_mnist() -> Dataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (96, 1, 8, 8), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 10, (96,), generator=gen)
    return Dataset("mnist", x[:64], y[:64], x[64:], y[64:], 10)


def test_training_logs_diagnostics_and_reloads(tmp_path):
    config = TrainConfig(
        arch="dense", feedback="reciprocal", epochs=2, batch_size=32, device="cpu",
        out_dir=str(tmp_path), name="run", l2=1e-3,
    )  # fmt: skip
    run = train(config, dataset=_tiny_mnist(), progress=False)
    assert {"angle_wb/1", "norm_ratio/1", "angle_update/1"} <= set(run.history[-1])
    assert (run.dir / "diagnostics.png").exists()
    model, _ = load_model(run.dir)
    assert "1.feedback_weight" in model.state_dict()


def test_feedback_option():
    args = build_parser().parse_args(["train", "--feedback", "sign"])
    assert args.feedback == "sign"
    with pytest.raises(BrainPropError, match="^unknown feedback 'transpose': choose one of "):
        TrainConfig(feedback="transpose").resolve()
