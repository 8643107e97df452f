"""The fast path changes the layout, not the numbers: it against ``--eager``, through training."""

import pytest
import torch

from brainprop import fastpath
from brainprop.config import TrainConfig
from brainprop.evaluation import evaluate, load_model
from brainprop.presets import Hyperparameters, build_model
from brainprop.train import train

CL = torch.channels_last


def _model(arch, shape=(1, 8, 8), sites=2):
    return build_model(arch, shape, 4, Hyperparameters(dropout=(0.0,) * sites))


@pytest.mark.parametrize(
    ("arch", "sites", "wanted"),
    [("conv", 2, ["channels_last"]), ("deep", 4, ["channels_last"]), ("dense", 0, []),
     ("loccon", 2, [])],
)  # fmt: skip
def test_channels_last_is_for_networks_with_convolutions(arch, sites, wanted):
    shape = (3, 32, 32) if arch == "deep" else (1, 8, 8)
    model = _model(arch, shape, sites)
    params, keys = list(model.parameters()), list(model.state_dict())
    assert fastpath.features(model) == wanted
    fastpath.prepare(model)
    assert list(model.parameters()) == params and list(model.state_dict()) == keys
    four_d = [p for p in params if p.dim() == 4]
    assert bool(four_d) == bool(wanted)
    assert all(p.is_contiguous(memory_format=CL) for p in four_d)
    # (A one-channel kernel is both layouts at once; the others show the change.)
    assert all(p.is_contiguous() for p in four_d) == (not wanted)


def test_eager_leaves_the_network_as_built():
    model = fastpath.prepare(_model("conv"), eager=True)
    assert all(p.is_contiguous() for p in model.parameters())


def _config(tmp_path, **kw):
    base = dict(
        dataset="mnist", arch="conv", epochs=2, batch_size=16, dropout=(0.0, 0.0),
        out_dir=str(tmp_path), seed=3,
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("rule", ["brainprop", "ebp"])
def test_fast_and_eager_training_agree_to_rounding(tmp_path, tiny_dataset, rule):
    # Without dropout: its masks are drawn in memory order, so the two layouts draw different
    # (equally random) masks. Exploration draws per output row and is the same in both.
    runs = {}
    for eager in (False, True):
        config = _config(tmp_path, rule=rule, eager=eager, name=f"{rule}-{eager}")
        runs[eager] = train(config, dataset=tiny_dataset, progress=False)
    fast, eager = runs[False], runs[True]
    assert not fast.model[3].weight.is_contiguous()  # the second convolution
    assert eager.model[3].weight.is_contiguous()
    for name, p in fast.model.state_dict().items():
        torch.testing.assert_close(p, eager.model.state_dict()[name], rtol=1e-4, atol=1e-5)
    for a, b in zip(fast.history, eager.history, strict=True):
        assert a["train_reward"] == b["train_reward"] and a["val_acc"] == b["val_acc"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)


def test_checkpoints_move_between_the_paths(tmp_path, tiny_dataset):
    run = train(_config(tmp_path, name="fast"), dataset=tiny_dataset, progress=False)
    model, state = load_model(run.dir)
    assert state["config"]["eager"] is False
    torch.testing.assert_close(model.state_dict(), run.model.state_dict())
    assert evaluate(run.dir, dataset=tiny_dataset, device="cpu")["test_acc"] == pytest.approx(
        run.summary["best_val_acc"]
    )
    # A config written before the switch existed has no "eager": it takes the fast path.
    old = {k: v for k, v in run.config.to_dict().items() if k != "eager"}
    assert TrainConfig.from_dict(old).eager is False
