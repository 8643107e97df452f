"""The published architectures: parameter counts, padding, layer order, and the table."""

import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import make_tiny_dataset
from memory_errors import OUT_OF_MEMORY
from torch import nn

from brainprop import TrainConfig, train
from brainprop.errors import BrainPropError
from brainprop.layers import Conv2dSame, LocallyConnected2d
from brainprop.presets import (
    ARCHITECTURES,
    PAPER,
    PRESETS,
    Hyperparameters,
    build_model,
    decayed_parameters,
    preset_hyperparameters,
)

SHAPES = {
    "mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
    "cifar100": (3, 32, 32),
    "tiny-imagenet": (3, 64, 64),
}
CLASSES = {"mnist": 10, "cifar10": 10, "cifar100": 100, "tiny-imagenet": 200}

# Trainable parameters of the Keras models, BatchNorm scale and shift included.
PUBLISHED_COUNTS = {
    ("mnist", "dense"): 3_181_000,
    ("mnist", "conv"): 3_150_632,
    ("cifar10", "conv"): 4_111_208,
    ("cifar100", "conv"): 4_156_208,
    ("mnist", "loccon"): 3_830_920,
    ("cifar10", "loccon"): 5_725_064,
    ("cifar100", "loccon"): 5_770_064,
    ("cifar10", "deep"): 1_732_680,
    ("cifar100", "deep"): 1_777_680,
    ("tiny-imagenet", "deep"): 4_899_680,
}


@pytest.mark.parametrize(("dataset", "arch"), sorted(PUBLISHED_COUNTS))
def test_parameter_counts_match_keras(dataset, arch):
    model = build_model(
        arch, SHAPES[dataset], CLASSES[dataset], preset_hyperparameters(dataset, arch)
    )
    assert (
        sum(p.numel() for p in model.parameters() if p.requires_grad)
        == PUBLISHED_COUNTS[(dataset, arch)]
    )


@pytest.mark.parametrize(("dataset", "arch"), sorted(PAPER))
def test_every_table_row_builds_and_runs(dataset, arch):
    model = build_model(arch, SHAPES[dataset], CLASSES[dataset], PAPER[(dataset, arch)])
    out = model(torch.rand(2, *SHAPES[dataset]))
    assert out.shape == (2, CLASSES[dataset])


def test_no_biases_and_keras_batchnorm():
    model = build_model("deep", (3, 32, 32), 10, PAPER[("cifar10", "deep")])
    for m in model.modules():
        if isinstance(m, nn.Linear | nn.Conv2d | LocallyConnected2d):
            assert m.bias is None
        if isinstance(m, nn.BatchNorm2d):
            assert m.momentum == pytest.approx(0.01) and m.eps == pytest.approx(1e-3)


def test_layer_order_conv_relu_batchnorm_and_deep_dropout():
    model = build_model("deep", (3, 32, 32), 10, PAPER[("cifar10", "deep")])
    kinds = [type(m) for m in model]
    for i, k in enumerate(kinds):
        if k is Conv2dSame:
            assert kinds[i + 1] is nn.ReLU and kinds[i + 2] is nn.BatchNorm2d
    rates = [m.p for m in model if isinstance(m, nn.Dropout)]
    assert rates == [0.3, 0.3, 0.8, 0.3]
    assert (
        isinstance(model[kinds.index(nn.Flatten) - 1], nn.Dropout)
        and model[kinds.index(nn.Flatten) - 1].p == 0.8
    )


def _layers(model: nn.Sequential) -> list[str]:
    """``model``'s layers in order, in short: what get_architecture.py's reader would check."""
    named = {nn.ReLU: "relu", nn.BatchNorm2d: "bn", nn.MaxPool2d: "pool", nn.Flatten: "flatten"}
    out = []
    for m in model:
        if isinstance(m, Conv2dSame | LocallyConnected2d):
            kind = "conv" if isinstance(m, Conv2dSame) else "lc"
            out.append(f"{kind}{m.out_channels}" + ("/2" if m.stride == (2, 2) else ""))
        elif isinstance(m, nn.Linear):
            out.append(f"dense{m.out_features}")
        elif isinstance(m, nn.Dropout):
            out.append(f"drop{m.p}")
        else:
            out.append(named[type(m)])
    return out


@pytest.mark.parametrize(
    ("arch", "expected"),
    [
        ("dense", "flatten dense1500 relu dense1000 relu dense500 relu dense10"),
        ("conv", "conv32 relu bn conv32/2 relu bn drop0.1 flatten dense500 relu drop0.2 dense10"),
        ("loccon", "lc32 relu bn lc32/2 relu bn drop0.1 flatten dense500 relu drop0.2 dense10"),
        (
            "deep",
            "conv64 relu bn conv64 relu bn pool drop0.1 conv128 relu bn conv128 relu bn pool "
            "drop0.2 conv128 relu bn conv128 relu bn conv128 relu bn pool drop0.3 flatten "
            "dense500 relu drop0.4 dense10",
        ),
    ],
)
def test_each_network_is_get_architectures_layer_for_layer(arch, expected):
    # Rates that differ at every site pin which site takes which; the output layer is linear
    # (Q-values of any sign), every hidden one a ReLU.
    sites = ARCHITECTURES[arch][1]
    hp = Hyperparameters(dropout=(0.1, 0.2, 0.3, 0.4)[:sites])
    shape = (1, 28, 28) if arch == "dense" else (3, 32, 32)
    assert " ".join(_layers(build_model(arch, shape, 10, hp))) == expected
    # Without a row, no dropout: every site keeps all its units.
    assert {m.p for m in build_model(arch, shape, 10) if isinstance(m, nn.Dropout)} <= {0.0}


def test_initialisation_is_normal_with_the_table_sigma():
    model = build_model(
        "dense", (1, 28, 28), 10, PAPER[("mnist", "dense")], torch.Generator().manual_seed(0)
    )
    w = model[1].weight.detach()
    assert w.mean().abs() < 1e-4
    assert w.std().item() == pytest.approx(0.01, rel=0.01)


@pytest.mark.parametrize("arch", ["loccon", "conv", "deep"])
def test_every_kernel_is_drawn_with_the_table_sigma(arch):
    """Locally connected kernels too: PyTorch's own init of them is uniform, far wider."""
    hp = PAPER[("cifar10", arch)]
    model = build_model(arch, (3, 32, 32), 10, hp, torch.Generator().manual_seed(0))
    kernels = [
        m.weight.detach()
        for m in model.modules()
        if isinstance(m, nn.Linear | nn.Conv2d | LocallyConnected2d)
    ]
    assert len(kernels) >= 3
    assert any(isinstance(m, LocallyConnected2d) for m in model.modules()) == (arch == "loccon")
    for w in kernels:
        assert w.std().item() == pytest.approx(hp.init_std, rel=0.05)


def test_the_table_holds_the_published_values():
    assert PAPER[("mnist", "dense")].init_std == 0.01
    assert PAPER[("mnist", "conv")].init_std == 0.005
    assert PAPER[("cifar10", "loccon")].batch_size == 32
    assert PAPER[("cifar10", "deep")].l2 == 5e-4 and PAPER[("cifar10", "conv")].l2 == 0
    assert {row.lr for row in PAPER.values()} == {0.1}
    assert {row.lr_halving_epochs for row in PAPER.values()} == {100}


def test_a_run_stops_as_the_paper_did_by_default():
    """Keras's EarlyStopping(patience=45, min_delta=0.001) within 500 epochs, the exploration
    rate 0.02 and the test set for validation, unless told otherwise."""
    config = TrainConfig(dataset="mnist", arch="conv").resolve()
    assert (config.epochs, config.patience, config.min_delta) == (500, 45, 0.001)
    assert (config.epsilon, config.val) == (0.02, "test")


def test_only_weights_are_decayed():
    model = build_model("deep", (3, 32, 32), 10, PAPER[("cifar10", "deep")])
    decay, rest = decayed_parameters(model)
    assert all(p.dim() >= 2 for p in decay) and all(p.dim() == 1 for p in rest)
    assert len(decay) == 9 and len(rest) == 14


def test_a_weight_tied_between_layers_takes_one_step_and_one_decay():
    """Listed once per layer holding it, a tied weight stepped at twice the learning rate."""
    from brainprop.step import make_optimizer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3, bias=False), nn.ReLU(), nn.Linear(3, 3, bias=False))
    model[2].weight = model[0].weight
    decay, rest = decayed_parameters(model)
    assert [id(p) for p in decay] == [id(model[0].weight)] and rest == []
    model(torch.randn(4, 3)).square().sum().backward()
    before, grad = model[0].weight.detach().clone(), model[0].weight.grad.clone()
    config = TrainConfig(dataset="mnist", arch="dense", lr=0.1, l2=0.005).resolve()
    make_optimizer(model, config).step()
    torch.testing.assert_close(model[0].weight.detach(), before - 0.1 * (grad + 0.01 * before))


@pytest.mark.parametrize(
    ("arch", "size", "message"),
    [
        # Built, the pool would fail only as the network first ran.
        ("deep", 5, "images of 5x5 pixels are too small for this network: its model[25], a 2x2 "
         "max-pool, would get 1x1 and needs 2x2 or more; use larger images, or another network"),
        ("loccon", 4, "images of 4x4 pixels are too small for this network: its model[3], a 3x3 "
         "locally connected layer, would get 2x2 and needs 3x3 or more"),
        ("loccon", 2, "its model[0], a 3x3 locally connected layer, would get 2x2"),
    ],
)  # fmt: skip
def test_images_too_small_for_a_network_are_refused_as_it_is_built(arch, size, message):
    with pytest.raises(BrainPropError) as info:
        build_model(arch, (3, size, size), 10)
    assert message in str(info.value)
    side = {"deep": 8, "loccon": 5}[arch]  # the smallest it takes
    model = build_model(arch, (3, side, side), 10)
    assert model(torch.zeros(2, 3, side, side)).shape == (2, 10)
    named = int(re.search(r"model\[(\d+)\]", message)[1])  # the layer the message names
    assert isinstance(model[named], nn.MaxPool2d if "pool" in message else LocallyConnected2d)


def test_unpublished_pairs_and_unknown_names_are_one_line_errors(monkeypatch):
    with pytest.raises(BrainPropError) as refused:
        preset_hyperparameters("mnist", "deep")
    # A network of one's own (a registered builder) is told where its row goes.
    assert str(refused.value) == (
        "preset 'paper' has no 'deep' network for mnist: choose --arch from conv, dense, loccon, "
        "or add PRESETS['<name>'] = {('mnist', 'deep'): Hyperparameters(...)} and pass "
        "--preset <name>"
    )
    # A table of one's own is told to take the row itself.
    monkeypatch.setitem(PRESETS, "mine", {("mnist", "dense"): PAPER[("mnist", "dense")]})
    with pytest.raises(BrainPropError, match=r"or add PRESETS\['mine'\]\[\('mnist', 'conv'\)\] = "
                       r"Hyperparameters\(...\)$"):  # fmt: skip
        preset_hyperparameters("mnist", "conv", "mine")
    with pytest.raises(BrainPropError, match="unknown architecture 'resnet'"):
        preset_hyperparameters("mnist", "resnet")
    with pytest.raises(BrainPropError, match="2 dropout sites"):
        build_model("conv", (1, 28, 28), 10, PAPER[("mnist", "dense")])


def test_quickstart_preset_covers_only_mnist_dense():
    row = preset_hyperparameters("mnist", "dense", "quickstart")
    assert (row.lr, row.init_std, row.batch_size) == (0.5, 0.03, 64)
    with pytest.raises(BrainPropError, match="preset 'quickstart' has no 'conv' network for mnist"):
        preset_hyperparameters("mnist", "conv", "quickstart")
    with pytest.raises(BrainPropError, match="preset 'quickstart' has no row for cifar10"):
        preset_hyperparameters("cifar10", "deep", "quickstart")
    with pytest.raises(
        BrainPropError,
        match="unknown preset 'fast': choose one of paper, quickstart, tuned, tuned-lr1.25; a name "
        "of your own is known once its code has run",
    ):
        preset_hyperparameters("mnist", "dense", "fast")


def test_tuned_is_the_quickstart_at_lr_1_and_tuned_lr125_at_lr_125():
    # docs/reproduce.md compares the two as one change of learning rate.
    tuned = preset_hyperparameters("mnist", "dense", "tuned")
    assert preset_hyperparameters("mnist", "dense", "tuned-lr1.25") == replace(tuned, lr=1.25)
    # And tuned is the quick start at lr 1, the rate its committed measurements ran at.
    quickstart = preset_hyperparameters("mnist", "dense", "quickstart")
    assert tuned == replace(quickstart, lr=1.0)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (dict(batch_size=64.0), r"batch_size must be of type int, got a float \(64.0\)$"),
        (dict(dropout=0.1), r"got a float \(0.1\): a tuple of one rate per dropout site"),
        (dict(lr="0.1"), r"lr must be of type float, got a str \('0.1'\)$"),
        (dict(dropout=(0.3, "0.3")), "dropout must be of type tuple"),
    ],
)
def test_a_row_of_the_wrong_types_is_refused_as_it_is_written(row, message):
    """Before, a float batch size failed in torch's split after the run's folder was made, and
    a lone dropout rate in len() (a helper's walkthrough)."""
    with pytest.raises(BrainPropError, match=message):
        Hyperparameters(**row)


@pytest.mark.parametrize(
    ("row", "problem"),
    [(dict(lr=-1.0), "lr -1.0, which must be > 0"),
     (dict(lr=float("nan")), "lr nan, which must be > 0"),
     (dict(batch_size=0), "batch_size 0, which must be >= 1"),
     (dict(lr_halving_epochs=0), "lr_halving_epochs 0, which must be >= 1"),
     (dict(init_std=0.0), "init_std 0.0, which must be > 0"),
     (dict(l2=-1e-4), "l2 -0.0001, which must be >= 0"),
     (dict(dropout=(0.3, 1.5)), "dropout (0.3, 1.5), whose rates must lie in [0, 1)"),
     (dict(lr=float("inf")), "lr inf, which must lie in [1.175e-38, 3.403e+38], the float32 "
                             "range training computes in"),
     (dict(init_std=1e-50), "init_std 1e-50, which must lie in [1.175e-38, 3.403e+38], the "
                            "float32 range training computes in"),
     (dict(l2=1e-46), "l2 1e-46, which must be 0 or lie in [5.877e-39, 1.701e+38] (SGD's "
                      "float32 weight decay is twice it)")],
)  # fmt: skip
def test_a_row_of_ones_own_out_of_range_is_refused_as_it_is_registered(monkeypatch, row, problem):
    """A run blamed the value on a flag it was not given: "--lr must be > 0" (review)."""
    with pytest.raises(BrainPropError) as e:
        monkeypatch.setitem(PRESETS, "mine", {("mnist", "dense"): Hyperparameters(**row)})
    assert str(e.value) == f"PRESETS['mine'] has the row ('mnist', 'dense') with {problem}"


@pytest.mark.parametrize(
    ("arch", "rates", "fix"),
    [("dense", (0.5,), "give that row no rates, dropout=()"),
     ("conv", (0.5,), "give that row 2 rates, or pass --dropout")],
)  # fmt: skip
def test_a_row_of_ones_own_with_rates_for_another_network_is_named_not_a_flag(
    monkeypatch, arch, rates, fix
):
    """It said "give 0 comma-separated rates or one for all", for a --dropout not given."""
    monkeypatch.setitem(PRESETS, "mine", {("mnist", arch): Hyperparameters(dropout=rates)})
    with pytest.raises(BrainPropError) as e:
        TrainConfig(dataset="mnist", arch=arch, preset="mine").resolve()
    sites = 0 if arch == "dense" else 2
    assert str(e.value) == (
        f"preset 'mine' gives {arch} on mnist 1 dropout rates, but {arch!r} has {sites} dropout "
        f"sites: {fix}"
    )
    given = () if arch == "dense" else (0.1,)
    assert TrainConfig(dataset="mnist", arch=arch, preset="mine", dropout=given).resolve()


def test_a_row_takes_numbers_of_any_kind_and_a_list_of_rates():
    row = Hyperparameters(
        lr=np.float64(0.5), batch_size=np.int64(64), dropout=[np.float64(0.3), 0.3]
    )
    assert (type(row.lr), type(row.batch_size), row.dropout) == (float, int, (0.3, 0.3))
    assert type(row.dropout[0]) is float
    whole = Hyperparameters(lr=1, dropout=[0, 1])
    assert (type(whole.lr), [type(rate) for rate in whole.dropout]) == (float, [float, float])
    model = build_model("conv", (1, 28, 28), 10, row)
    assert [m.p for m in model if isinstance(m, nn.Dropout)] == [0.3, 0.3]
    # So are a shape and a class count of numpy's.
    assert build_model("conv", np.array([1, 28, 28]), np.int64(10))[-1].out_features == 10


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (dict(hp={"lr": 0.1}), r"^build_model takes hp= a Hyperparameters row \(PAPER\[dataset, "
         r"arch\]\), not a dict: Hyperparameters\(\*\*d\) makes one$"),
        (dict(generator=1), r"^build_model takes generator= a torch.Generator .+, not an int$"),
        (dict(input_shape=(28, 28, 1)),
         r"^input shape \(28, 28, 1\) looks channels-last \(H, W, C\): pass \(C, H, W\), "
         r"\(1, 28, 28\)$"),
        (dict(num_classes=-1), r"^num_classes must be a whole number >= 2, got -1$"),
        (dict(num_classes=2.5), r"^num_classes must be a whole number >= 2, got 2\.5$"),
        (dict(num_classes=0), r"^num_classes must be a whole number >= 2, got 0$"),
        (dict(input_shape=(0, 28, 28)),
         r"^input shape must be \(C, H, W\), whole numbers >= 1, got \(0, 28, 28\)$"),
        (dict(input_shape=28), r"^input shape must be \(C, H, W\), whole numbers >= 1, got 28$"),
        (dict(input_shape=np.array(28)),
         r"^input shape must be \(C, H, W\), whole numbers >= 1, got array\(28\)$"),
        (dict(input_shape=torch.tensor(28)),
         r"^input shape must be \(C, H, W\), whole numbers >= 1, got tensor\(28\)$"),
    ],
)  # fmt: skip
def test_build_model_given_arguments_of_the_wrong_kind_says_so_in_one_line(args, said):
    """An AttributeError, torch's list of overloads, a traceback about a tensor's negative
    dimension, or (channels last, no class, no channel) a network built without a word (a
    helper's walkthrough)."""
    with pytest.raises(BrainPropError, match=said):
        build_model(**{"arch": "conv", "input_shape": (1, 28, 28), "num_classes": 10, **args})


def test_a_network_of_ones_own_that_fails_as_it_is_built_is_one_line_naming_its_line(
    monkeypatch, tmp_path
):
    """It was an IndexError's traceback out of the builder (a helper's walkthrough)."""

    def two_rates(net, num_classes, dropout):
        net.flatten()
        net.add(nn.Dropout(dropout[1]))  # one site declared, two rates read
        net.dense(num_classes, relu=False)

    monkeypatch.setitem(ARCHITECTURES, "two-rates", (two_rates, 1))
    monkeypatch.setitem(PRESETS, "mine", {("mnist", "two-rates"): Hyperparameters(dropout=(0.1,))})
    line = two_rates.__code__.co_firstlineno + 2
    said = (
        r"^network 'two-rates' failed as it was built for inputs \(1, 8, 8\): IndexError: tuple "
        rf"index out of range \(.+test_presets\.py:{line}\)$"
    )
    config = TrainConfig(dataset="mnist", arch="two-rates", preset="mine", out_dir=tmp_path)
    with pytest.raises(BrainPropError, match=said):
        train(config, dataset=make_tiny_dataset(), progress=False)
    assert not list(tmp_path.iterdir())


@OUT_OF_MEMORY
def test_a_network_of_ones_own_that_runs_out_of_memory_is_left_to_the_advice(
    monkeypatch, out_of_memory
):
    error = out_of_memory()

    def too_big(net, num_classes, dropout):
        raise error

    monkeypatch.setitem(ARCHITECTURES, "too-big", (too_big, 0))
    with pytest.raises(type(error)) as raised:
        build_model("too-big", (1, 8, 8), 3)
    assert raised.value is error


def test_the_published_table_is_read_only():
    with pytest.raises(TypeError):
        PAPER["mnist", "dense"] = replace(PAPER["mnist", "dense"], lr=1.0)  # type: ignore[index]
    assert PAPER["mnist", "dense"].lr == 0.1


def test_a_module_of_ones_own_takes_its_place_in_a_layer_stack(monkeypatch):
    def mine(net, num_classes, dropout):
        net.add(
            nn.Sequential(
                nn.Conv2d(1, 4, 3, stride=2, bias=False), nn.Flatten(), nn.BatchNorm1d(676)
            )
        )
        net.dense(num_classes, relu=False)  # sized by the shape the block outputs

    monkeypatch.setitem(ARCHITECTURES, "mine", (mine, 0))
    hp = replace(PAPER[("mnist", "dense")], dropout=())
    model = build_model("mine", (1, 28, 28), 10, hp)
    assert model[1].weight.shape == (10, 676)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    # Sized in eval mode: a batch of one was no error, and the running statistics stayed.
    norm = model[0][2]
    assert norm.training and norm.num_batches_tracked == 1  # the forward above, not the sizing
    with torch.device("meta"):  # as load_model sizes a checkpoint's network
        assert build_model("mine", (1, 28, 28), 10, hp)[1].weight.shape == (10, 676)
    # Its outputs are the Q-values: one per class, however the builder ends.
    monkeypatch.setitem(ARCHITECTURES, "headless", (lambda net, k, d: net.add(nn.Flatten()), 0))
    said = "'headless' outputs (784,) per image, not (10,), one Q-value per class: end it with "
    with pytest.raises(BrainPropError, match=re.escape(said) + "a flatten and a dense layer"):
        build_model("headless", (1, 28, 28), 10, hp)
    with pytest.raises(BrainPropError, match="has 0 dropout sites but 1 rates were given: give "
                       r"its row dropout=\(\)$"):  # fmt: skip
        build_model("mine", (1, 28, 28), 10, replace(hp, dropout=(0.1,)))
