"""The fast path changes the layout, not the numbers: it against ``--eager``, through training."""

from functools import partial

import pytest
import torch

from brainprop import fastpath
from brainprop.config import TrainConfig
from brainprop.errors import BrainPropError
from brainprop.evaluation import evaluate, load_model
from brainprop.presets import Hyperparameters, build_model
from brainprop.train import train

CL = torch.channels_last


def _model(arch, shape=(1, 8, 8), sites=2):
    hp, init = Hyperparameters(dropout=(0.0,) * sites), torch.Generator().manual_seed(0)
    return build_model(arch, shape, 4, hp, generator=init)


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
        out_dir=str(tmp_path or "runs"), seed=3,
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


class FrozenLrGraph:
    """A CPU stand-in for a CUDA graph: replay runs the captured step, with the learning rates
    it was captured with, as a real graph holds them as constants."""

    def __init__(self, optimizer):
        self.optimizer, self.step, self.lrs = optimizer, None, None

    def capture(self, step):
        self.step, self.lrs = step, [g["lr"] for g in self.optimizer.param_groups]

    def replay(self):
        now = [g["lr"] for g in self.optimizer.param_groups]
        for g, lr in zip(self.optimizer.param_groups, self.lrs, strict=True):
            g["lr"] = lr
        try:
            return self.step()
        finally:
            for g, lr in zip(self.optimizer.param_groups, now, strict=True):
                g["lr"] = lr


def _stepper(graphed, rule="brainprop", batch=16):
    from brainprop.objectives import make_objective
    from brainprop.step import make_optimizer, train_step

    model = fastpath.prepare(_model("conv"))
    objective = make_objective(rule, epsilon=0.3)  # explores often, so a stale draw would show
    optimizer = make_optimizer(model, _config(None, lr=0.05).resolve())
    generator = torch.Generator().manual_seed(0)
    if graphed:
        step = fastpath.GraphedStep(
            model, objective, optimizer, generator=generator, batch_size=batch,
            new_graph=lambda _: FrozenLrGraph(optimizer),
        )  # fmt: skip
    else:

        def step(x, y):
            return train_step(
                model, objective, optimizer, x, y, generator=generator, batch_size=batch
            )

    return model, optimizer, generator, step


def test_graphed_steps_train_exactly_as_eager_ones(tiny_dataset):
    x = tiny_dataset.train_x[:85].float() / 255
    y = tiny_dataset.train_y[:85]
    runs = [_stepper(graphed) for graphed in (False, True)]
    for epoch in range(3):
        for _, optimizer, _, _ in runs:  # the schedule halves the rate after epoch 1
            for g in optimizer.param_groups:
                g["lr"] = 0.05 if epoch < 2 else 0.025
        for xb, yb in zip(x.split(16), y.split(16), strict=True):  # 5 full batches + 5 images
            outs = [step(xb, yb) for *_, step in runs]
            assert torch.equal(outs[0].actions, outs[1].actions)
            assert torch.equal(outs[0].loss, outs[1].loss)
    (eager, _, eager_gen, _), (graphed, _, graphed_gen, step) = runs
    for name, p in eager.state_dict().items():
        assert torch.equal(p, graphed.state_dict()[name]), name
    assert torch.equal(eager_gen.get_state(), graphed_gen.get_state())
    # Warm-up took the first 3 full batches; one capture, and one more for the new rate.
    assert step.captures == 2


def test_cuda_graph_needs_cuda_one_process_and_not_eager(tmp_path, tiny_dataset):
    with pytest.raises(BrainPropError, match="--cuda-graph needs a CUDA device"):
        train(_config(tmp_path, cuda_graph=True, device="cpu"), dataset=tiny_dataset)
    with pytest.raises(BrainPropError, match="contradict"):
        _config(tmp_path, cuda_graph=True, eager=True).resolve()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_real_cuda_graph_trains_as_eager_and_explores_afresh(tiny_dataset):
    from brainprop.objectives import make_objective
    from brainprop.step import make_optimizer, train_step

    device = torch.device("cuda")
    x = (tiny_dataset.train_x[:128].float() / 255).to(device)
    y = tiny_dataset.train_y[:128].to(device)
    models, steps = [], []
    for graphed in (False, True):
        model = fastpath.prepare(_model("conv").to(device))
        objective = make_objective("brainprop", epsilon=0.0)
        optimizer = make_optimizer(model, _config(None, lr=0.05).resolve())
        generator = torch.Generator(device=device).manual_seed(0)
        if graphed:
            step = fastpath.GraphedStep(
                model, objective, optimizer, generator=generator, batch_size=16
            )
        else:
            step = partial(
                train_step, model, objective, optimizer, generator=generator, batch_size=16
            )
        models.append(model)
        steps.append(step)
    for xb, yb in zip(x.split(16), y.split(16), strict=True):
        for step in steps:
            step(xb, yb)
    for name, p in models[0].state_dict().items():
        torch.testing.assert_close(p, models[1].state_dict()[name], rtol=1e-3, atol=1e-4)
    # Exploration inside the graph draws new numbers at every replay.
    model = fastpath.prepare(_model("conv").to(device))
    optimizer = make_optimizer(model, _config(None, lr=0.0).resolve())
    step = fastpath.GraphedStep(
        model, make_objective("brainprop", epsilon=0.5), optimizer,
        generator=torch.Generator(device=device).manual_seed(0), batch_size=128,
    )  # fmt: skip
    explored = [step(x, y).explored.clone() for _ in range(10)][fastpath.WARMUP_STEPS + 1 :]
    assert not all(torch.equal(explored[0], e) for e in explored[1:])
    assert 0.35 < torch.stack(explored).float().mean().item() < 0.65
