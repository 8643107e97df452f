"""The key claim: the fast feedback pathways and the neuron-level reference make the same update.

In float64, one training step of the fast path (convert + objective + loss.backward + SGD step)
changes every parameter, forward weights and feedback weights alike, by what
:func:`brainprop.reference.trial` computes without autograd, to 1e-10 relative error: for each
layer type, each feedback mode, both objectives, random shapes and several seeds, and the whole
``deep`` preset with its dropout masks fixed and BatchNorm in training mode.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch import nn

import brainprop.reference as reference
from brainprop import FEEDBACK_MODES, PATHWAYS, Pathway, convert
from brainprop.errors import BrainPropError
from brainprop.layers import Conv2dSame, LocallyConnected2d
from brainprop.objectives import EBP, BrainProp
from brainprop.presets import Hyperparameters, build_model

TOL = 1e-10
LR = 0.1
RULES = ("brainprop", "ebp")
SEEDS = (0, 1, 2)


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def _net(kind: str, seed: int) -> tuple[nn.Sequential, tuple[int, ...]]:
    """A small random-shaped network around one layer type, with the other layers it meets."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    k = rng.randint(3, 6)  # classes
    c, h, w = rng.randint(1, 3), rng.randint(6, 9), rng.randint(6, 9)
    bias = rng.random() < 0.5
    if kind == "linear":
        hidden = rng.randint(4, 12)
        layers = [
            nn.Flatten(),
            nn.Linear(c * h * w, hidden, bias=bias),
            nn.ReLU(),
            nn.BatchNorm1d(hidden),
            nn.Dropout(0.3),
            nn.Linear(hidden, hidden + 1, bias=not bias),
            nn.ReLU(),
            nn.Linear(hidden + 1, k, bias=False),
        ]
    elif kind == "conv":
        c1, c2 = rng.randint(2, 5), rng.randint(2, 5)
        stride = rng.randint(1, 2)
        conv = nn.Conv2d(
            c, c1, rng.choice([1, 3]), stride=stride, padding=rng.randint(0, 1), bias=bias
        )
        h1, w1 = conv(torch.zeros(1, c, h, w)).shape[-2:]
        layers = [
            conv,
            nn.ReLU(),
            # 3x3 stride 2 'same': asymmetric pads on even sizes, an F.pad before the conv.
            Conv2dSame(c1, c2, 3, stride=2, input_size=(h1, w1), bias=not bias),
            nn.ReLU(),
            nn.BatchNorm2d(c2),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Dropout(0.25),
            nn.Flatten(),
        ]
        layers.append(nn.Linear(nn.Sequential(*layers)(torch.zeros(2, c, h, w)).shape[1], k))
    else:
        c1, c2 = rng.randint(2, 4), rng.randint(2, 4)
        lc1 = LocallyConnected2d(
            c, c1, (h, w), 3, stride=rng.randint(1, 2), padding="same", bias=bias
        )
        lc2 = LocallyConnected2d(
            c1, c2, lc1.output_size, 2, stride=1, padding="valid", bias=not bias
        )
        n_out = c2 * lc2.output_size[0] * lc2.output_size[1]
        layers = [
            lc1,
            nn.ReLU(),
            nn.BatchNorm2d(c1),
            lc2,
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(n_out, k, bias=False),
        ]
    model = nn.Sequential(*layers)
    for m in model.modules():  # BatchNorm's affine parameters away from (1, 0)
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return model, (c, h, w)


def _fast_step(model, x, y, rule, masks, seed):
    """One training step exactly as the training loop does it; returns (updates, Output)."""
    hooks = [
        model[i].register_forward_hook(lambda m, inp, out, mask=mask: inp[0] * mask / (1 - m.p))
        for i, mask in masks.items()
    ]
    objective = BrainProp(epsilon=0.5) if rule == "brainprop" else EBP()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    out = objective(model(x), y, torch.Generator().manual_seed(seed))
    optimizer.zero_grad()
    out.loss.backward()
    optimizer.step()
    for hook in hooks:
        hook.remove()
    return {k: v.detach() - before[k] for k, v in model.named_parameters()}, out


def _compare(model, x, y, rule, seed) -> dict[str, float]:
    """Relative error of the fast step against the reference, per parameter."""
    model.train()
    drawn = reference.trial(model, x, y, generator=torch.Generator().manual_seed(seed)).masks
    snapshot = copy.deepcopy(model)
    fast, out = _fast_step(model, x, y, rule, drawn, seed)
    ref = reference.trial(snapshot, x, y, rule=rule, lr=LR, actions=out.actions, masks=drawn)
    assert set(ref.updates) == set(fast), (
        "the reference and the fast path update different parameters"
    )
    errors = {}
    for name, expected in ref.updates.items():
        scale = expected.norm()
        assert scale > 0, f"{name}: zero update, the comparison would be empty"
        errors[name] = float((fast[name] - expected).norm() / scale)
    return errors


def _convert(model, mode, seed):
    convert(model, mode, generator=torch.Generator().manual_seed(100 + seed))
    if mode == "reciprocal":  # B apart from W, so a swapped W/B would show
        for m in model.modules():
            if hasattr(m, "feedback_weight"):
                assert not torch.equal(m.feedback_weight, m.weight)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("mode", FEEDBACK_MODES)
@pytest.mark.parametrize("kind", ["linear", "conv", "loccon"])
def test_fast_path_matches_reference(kind, mode, rule, seed):
    model, shape = _net(kind, seed)
    _convert(model, mode, seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(5, *shape, generator=gen)
    y = torch.randint(0, model[-1].out_features, (5,), generator=gen)
    errors = _compare(model, x, y, rule, seed)
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("mode", FEEDBACK_MODES)
def test_deep_preset_matches_reference(mode, rule):
    hp = Hyperparameters(init_std=0.05, dropout=(0.3, 0.3, 0.5, 0.3))
    model = build_model("deep", (3, 8, 8), 7, hp, torch.Generator().manual_seed(3))
    _convert(model, mode, 3)
    gen = torch.Generator().manual_seed(4)
    x, y = torch.rand(4, 3, 8, 8, generator=gen), torch.randint(0, 7, (4,), generator=gen)
    errors = _compare(model, x, y, rule, 4)
    # Every conv, both dense layers, and every BatchNorm's gamma and beta were compared.
    assert sum(k.endswith(".weight") for k in errors) == 9 + 7
    assert max(errors.values()) < TOL, errors


#: Registered pathways: a fixed B read as W plus it, and a learned B started at W's double.
OWN_PATHWAYS = {
    "noisy": Pathway(
        make=lambda layer, scale, g: (
            0.3 * scale * torch.randn(layer.weight.shape, generator=g)
        ).to(layer.weight),
        read=lambda layer: layer.weight.detach() + layer.feedback_weight,
    ),
    "learned": Pathway(make=lambda layer, scale, g: nn.Parameter(2 * layer.weight.detach())),
}


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("mode", OWN_PATHWAYS)
@pytest.mark.parametrize("kind", ["linear", "conv", "loccon"])
def test_a_registered_pathway_matches_reference(kind, mode, rule, monkeypatch):
    monkeypatch.setitem(PATHWAYS, mode, OWN_PATHWAYS[mode])
    model, shape = _net(kind, 0)
    _convert(model, mode, 0)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(5, *shape, generator=gen)
    y = torch.randint(0, model[-1].out_features, (5,), generator=gen)
    errors = _compare(model, x, y, rule, 0)
    assert any(k.endswith("feedback_weight") for k in errors) == (mode == "learned")
    assert max(errors.values()) < TOL, errors


def test_reciprocal_feedback_weights_update_like_forward_weights():
    model, shape = _net("conv", 0)
    _convert(model, "reciprocal", 0)
    x, y = torch.rand(5, *shape), torch.zeros(5, dtype=torch.long)
    errors = _compare(model, x, y, "brainprop", 0)
    fb = [k for k in errors if k.endswith("feedback_weight")]
    assert len(fb) == 3 and max(errors.values()) < TOL


@pytest.mark.parametrize("mode", ["symmetric", "reciprocal"])
def test_frozen_parameters_have_no_update_and_the_rest_still_match(mode):
    """The reference gave a frozen W (and a reciprocal B, whose update is W's) an update the
    fast path never makes (review)."""
    model, shape = _net("conv", 0)
    _convert(model, mode, 0)
    frozen = {"0.weight", "4.weight"}  # the first conv, and the BatchNorm's gain
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name not in frozen)
    x, y = torch.rand(5, *shape), torch.zeros(5, dtype=torch.long)
    model.train()
    drawn = reference.trial(model, x, y, generator=torch.Generator().manual_seed(0)).masks
    snapshot = copy.deepcopy(model)
    fast, out = _fast_step(model, x, y, "brainprop", drawn, 0)
    ref = reference.trial(snapshot, x, y, lr=LR, actions=out.actions, masks=drawn)
    still = {k for k, v in snapshot.named_parameters() if v.requires_grad}
    if mode == "reciprocal":
        still.discard("0.feedback_weight")
        assert not fast["0.feedback_weight"].any()
    assert set(ref.updates) == still and not any(fast[k].any() for k in frozen)
    for name, expected in ref.updates.items():
        assert float((fast[name] - expected).norm() / expected.norm()) < TOL, name


def test_breaking_the_gating_breaks_the_agreement(monkeypatch):
    """The comparison can fail: a reference that ignores the ReLU gate disagrees."""
    model, shape = _net("conv", 1)
    x, y = torch.rand(5, *shape), torch.arange(5) % 3
    errors = _compare(copy.deepcopy(model), x, y, "brainprop", 1)
    assert max(errors.values()) < TOL
    monkeypatch.setattr(reference, "activity_derivative", lambda pre: torch.ones_like(pre))
    broken = _compare(model, x, y, "brainprop", 1)
    assert max(broken.values()) > 1e-3, broken


def test_breaking_the_feedback_weights_breaks_the_agreement(monkeypatch):
    """A reference that sends feedback through W instead of B disagrees in 'random' mode."""
    model, shape = _net("linear", 2)
    _convert(model, "random", 2)
    x, y = torch.rand(5, *shape), torch.arange(5) % 3
    monkeypatch.setattr(reference, "_feedback_weights", lambda layer: layer.weight.detach())
    broken = _compare(model, x, y, "ebp", 2)
    assert max(broken.values()) > 1e-3, broken


def test_trial_reports_the_steps_of_the_rule():
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.ReLU(), nn.Linear(3, 2, bias=False))
    x, y = torch.rand(1, 4), torch.tensor([1])
    t = reference.trial(model, x, y, actions=torch.tensor([1]))
    assert t.rewards.item() == 1.0
    assert t.delta.item() == pytest.approx(1.0 - t.q[0, 1].item())
    assert t.output_error[0, 0] == 0.0  # only the chosen unit sends feedback
    # The hidden layer's feedback is the chosen unit's weights, gated by the hidden activity.
    gate = (t.activities[1] > 0).to(x.dtype)
    expected = t.delta * model[2].weight[1] * gate
    assert torch.allclose(t.feedback[0], expected)
    assert torch.allclose(t.updates["0.weight"], expected.T @ x)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@pytest.mark.parametrize("kernel", [3, 4])
def test_padding_same_matches_reference_for_odd_and_even_kernels(kernel):
    """PyTorch pads an even kernel's 'same' conv one pixel more on the right and bottom."""
    gen = torch.Generator().manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(2, 3, kernel, padding="same", bias=False), nn.ReLU(), nn.Flatten(),
        nn.Linear(3 * 5 * 6, 4, bias=False),
    )  # fmt: skip
    for p in model.parameters():
        nn.init.normal_(p, 0.0, 0.3, generator=gen)
    x, y = torch.rand(3, 2, 5, 6, generator=gen), torch.randint(0, 4, (3,), generator=gen)
    errors = _compare(model, x, y, "brainprop", 5)
    assert max(errors.values()) < TOL, errors


def test_pads_and_strides_unlike_across_the_axes_match_reference():
    """The feedback sent below a weight layer is routed back per axis: a conv strided only
    across, and a locally connected layer padded only on one side of a row, above other weight
    layers (the networks above send nothing below their first layer, which is the input)."""
    gen = torch.Generator().manual_seed(6)
    lc = LocallyConnected2d(3, 3, (7, 8), 3, stride=2, padding="same", bias=False)
    left, right, top, bottom = lc.explicit_pad
    assert (left, right) != (top, bottom)  # the pads differ between the axes
    model = nn.Sequential(
        nn.Conv2d(2, 3, 1, bias=False), nn.ReLU(),
        lc, nn.ReLU(),
        nn.Conv2d(3, 2, 3, stride=(1, 2), padding=1, bias=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(2 * 4 * 2, 4, bias=False),
    )  # fmt: skip
    for p in model.parameters():
        nn.init.normal_(p, 0.0, 0.5, generator=gen)
    x, y = torch.rand(3, 2, 7, 8, generator=gen), torch.randint(0, 4, (3,), generator=gen)
    errors = _compare(model, x, y, "ebp", 6)
    assert set(errors) == {"0.weight", "2.weight", "4.weight", "7.weight"}
    assert max(errors.values()) < TOL, errors


def test_a_conv_as_large_as_its_input_is_taken():
    """A valid conv whose kernel covers the whole image gives one output per channel."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 3))
    t = reference.trial(model, torch.rand(2, 1, 3, 3), torch.tensor([0, 2]))
    assert t.activities[1].shape == (2, 2, 1, 1) and "0.weight" in t.updates


def test_a_learned_feedback_weight_read_through_a_transformation_gets_no_update(monkeypatch):
    """W's update is a learned B's only where B is used as it is: through a read, the fast
    path's gradient differs, which the reference does not model, so it claims none."""
    doubled = Pathway(
        make=lambda layer, scale, g: nn.Parameter(layer.weight.detach().clone()),
        read=lambda layer: 2 * layer.feedback_weight,
    )
    monkeypatch.setitem(PATHWAYS, "doubled", doubled)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    convert(model, "doubled", generator=torch.Generator().manual_seed(0))
    t = reference.trial(model, torch.rand(3, 4), torch.tensor([0, 1, 1]))
    assert "0.weight" in t.updates
    assert not any(k.endswith("feedback_weight") for k in t.updates)


def test_unsupported_layer_is_refused():
    with pytest.raises(BrainPropError, match="no layer Tanh"):
        reference.trial(
            nn.Sequential(nn.Tanh()), torch.rand(2, 3), torch.zeros(2, dtype=torch.long)
        )


def test_dropout_masks_are_drawn_on_the_inputs_device():
    # The meta device stands in for a GPU: a mask drawn on the CPU fails there.
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(4, 3, bias=False), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(3, 2, bias=False),
    ).to("meta")  # fmt: skip
    x = torch.rand(5, 1, 2, 2, device="meta")
    result = reference.trial(model.train(), x, torch.zeros(5, dtype=torch.long, device="meta"),
                             rule="ebp", lr=0.1)  # fmt: skip
    assert all(u.device.type == "meta" for u in result.updates.values())


#: Networks whose last weight layer does not give q: layers after it shape what direct feedback
#: sends down (the fast path takes the error at that layer's output).
HEADS = {
    "pooled-conv": (
        lambda: nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 1),
                              nn.MaxPool2d(4), nn.Flatten()),
        (3, 4, 4),
    ),
    # Without a bias before the BatchNorm, which gets no gradient: its update would be rounding.
    "batchnorm": (
        lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(),
                              nn.Linear(8, 4, bias=False), nn.BatchNorm1d(4)),
        (3, 2, 2),
    ),
    "dropout": (
        lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4),
                              nn.Dropout(0.3)),
        (3, 2, 2),
    ),
}  # fmt: skip


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("mode", FEEDBACK_MODES)
@pytest.mark.parametrize("head", HEADS)
def test_layers_after_the_last_weight_layer_match_reference(head, mode, rule):
    """Direct mode sent the error at q through D, where the fast path sends the one at the last
    weight layer's output: 1.8 relative error under a pooled conv head, 6 under a BatchNorm
    (review)."""
    make, shape = HEADS[head]
    torch.manual_seed(3)
    model = make()
    _convert(model, mode, 3)
    gen = torch.Generator().manual_seed(3)
    x, y = torch.rand(5, *shape, generator=gen), torch.randint(0, 4, (5,), generator=gen)
    errors = _compare(model, x, y, rule, 3)
    assert max(errors.values()) < TOL, errors


def _linear_net() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3, bias=False), nn.ReLU(),
                         nn.Linear(3, 2, bias=False))  # fmt: skip


class _Mine(nn.Module):
    def forward(self, x):
        return x


def _labels(*shape: int) -> torch.Tensor:
    return torch.zeros(*shape, dtype=torch.long)


# Made in the test, under the float64 default the fixture sets: (model, x, y, message).
BAD_INPUT = {
    "no Sequential": lambda: (_Mine(), torch.rand(2, 4), _labels(2),
                              "trial takes an nn.Sequential of the layers it covers, not _Mine"),
    "uint8 images": lambda: (_linear_net(), torch.zeros(2, 1, 2, 2, dtype=torch.uint8), _labels(2),
                             r"x must be a float batch \[N, ...\]"),
    "no batch": lambda: (_linear_net(), torch.rand(4), _labels(1),
                         r"x must be a float batch \[N, ...\] of at least one trial, got "
                         r"torch.float64 \[4\]"),
    "empty batch": lambda: (_linear_net(), torch.rand(0, 4), _labels(0),
                            r"of at least one trial, got torch.float64 \[0, 4\]"),
    "other dtype": lambda: (_linear_net(), torch.rand(2, 4, dtype=torch.float32), _labels(2),
                            "x is torch.float32 and the network's weights torch.float64"),
    # Broadcast by einsum, these computed updates of another shape than the weights'.
    "other width": lambda: (_linear_net(), torch.rand(2, 5), _labels(2),
                            r"layer 1 \(Linear\) takes \[N, 4\] inputs, got \[2, 5\]"),
    "other channels": lambda: (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()),
                               torch.rand(2, 3, 4, 4), _labels(2),
                               r"layer 0 \(Conv2d\) takes \[N, 1, H, W\] inputs"),
    "too small": lambda: (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()), torch.rand(2, 1, 2, 2),
                          _labels(2), r"layer 0 \(Conv2d\) takes \[N, 1, H, W\] inputs, got "
                          r"\[2, 1, 2, 2\]"),
    "too small to pool": lambda: (nn.Sequential(nn.Conv2d(1, 2, 1), nn.MaxPool2d(4), nn.Flatten()),
                                  torch.rand(2, 1, 2, 2), _labels(2),
                                  r"layer 1 \(MaxPool2d\) takes \[N, C, H, W\] inputs, got "
                                  r"\[2, 2, 2, 2\]"),
    # BrainProp gave every trial a reward of 0, without a word.
    "label out of range": lambda: (_linear_net(), torch.rand(2, 4), torch.tensor([0, 2]),
                                   r"y holds classes outside \[0, 2\), the network's"),
    "labels [N, 1]": lambda: (_linear_net(), torch.rand(2, 4), _labels(2, 1),
                              r"y must be \[2\] integer classes, one per trial, got torch.int64 "
                              r"\[2, 1\]"),
    "float labels": lambda: (_linear_net(), torch.rand(2, 4), torch.zeros(2),
                             r"y must be \[2\] integer classes, one per trial, got "
                             r"torch.float64 \[2\]"),
    "labels elsewhere": lambda: (_linear_net().to("meta"), torch.rand(2, 4, device="meta"),
                                 _labels(2), "y is on cpu and the network's output on meta: "
                                 r"pass y.to\(x.device\)"),
    "weights of two dtypes": lambda: (nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2).float()),
                                      torch.rand(2, 4), _labels(2),
                                      r"the network's weights are of several dtypes \(torch."
                                      r"float32, torch.float64\): give them one"),
    "one value per channel": lambda: (nn.Sequential(nn.Linear(4, 2), nn.BatchNorm1d(2)),
                                      torch.rand(1, 4), _labels(1),
                                      r"layer 1 \(BatchNorm1d\) would normalise one value per "
                                      "channel"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUT)
def test_input_a_trial_cannot_take_is_one_line(case):
    """Each failed inside torch, or, where einsum broadcast a width of one, returned updates
    of another shape than the weights' (review)."""
    model, x, y, said = BAD_INPUT[case]()
    with pytest.raises(BrainPropError, match=said):
        reference.trial(model.train(), x, y)


def test_actions_a_trial_cannot_take_are_one_line():
    with pytest.raises(BrainPropError, match=r"actions holds classes outside \[0, 2\)"):
        reference.trial(_linear_net(), torch.rand(2, 4), torch.zeros(2, dtype=torch.long),
                        actions=torch.tensor([0, 5]))  # fmt: skip


def test_batchnorm_without_running_statistics_normalises_with_the_batchs_in_eval_mode():
    """As torch does; the reference took the missing running statistics (None) and failed."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2),
                          nn.BatchNorm1d(2, track_running_stats=False))  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(5, 4, generator=gen), torch.randint(0, 2, (5,), generator=gen)
    model.eval()
    ref = reference.trial(copy.deepcopy(model), x, y, rule="ebp", lr=LR)
    fast, _ = _fast_step(model, x, y, "ebp", {}, 0)
    for name, expected in ref.updates.items():
        assert torch.allclose(fast[name], expected, rtol=1e-10, atol=1e-14), name


def test_integer_labels_of_any_width_are_taken():
    """BrainProp compares them with the actions alone: uint8 labels worked, and were refused
    for a while (review)."""
    model, x = _linear_net(), torch.rand(3, 4)
    wide = reference.trial(model, x, torch.tensor([0, 1, 1]))
    narrow = reference.trial(model, x, torch.tensor([0, 1, 1], dtype=torch.uint8))
    for name, update in wide.updates.items():
        assert torch.equal(narrow.updates[name], update), name


@pytest.mark.parametrize("rule", RULES)
def test_direct_feedback_of_a_network_converted_in_part_matches_reference(rule):
    """The fast path takes the error at the last converted layer's output, here below a head
    left unconverted: the reference took it at the last weight layer's (review)."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(),
                          nn.Linear(6, 4))  # fmt: skip
    convert(model[0:4], "direct", generator=torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(4)
    x, y = torch.rand(5, 3, 2, 2, generator=gen), torch.randint(0, 4, (5,), generator=gen)
    errors = _compare(model, x, y, rule, 4)
    assert max(errors.values()) < TOL, errors
