"""The fast path (channels_last, the graphed step) against ``--eager``: the same numbers."""

import gc
import subprocess
import sys
import textwrap
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from memory_errors import MAKERS
from torch import nn

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
    fastpath.prepare(model, shape)
    assert list(model.parameters()) == params and list(model.state_dict()) == keys
    four_d = [p for p in params if p.dim() == 4]
    assert bool(four_d) == bool(wanted)
    assert all(p.is_contiguous(memory_format=CL) for p in four_d)
    # (A one-channel kernel is both layouts at once; the others show the change.)
    assert all(p.is_contiguous() for p in four_d) == (not wanted)


def test_eager_leaves_the_network_as_built():
    model = fastpath.prepare(_model("conv"), (1, 8, 8), eager=True)
    assert all(p.is_contiguous() for p in model.parameters())


class _ViewFlatten(nn.Module):
    def forward(self, x):
        return x.view(x.shape[0], -1)


class _Broken(nn.Module):
    def forward(self, x):
        raise TypeError("broken in any layout")


class _Checked(nn.Flatten):
    """Asserts the layout its own code assumes."""

    def forward(self, x):
        assert x.is_contiguous(), "wants contiguous activations"
        return super().forward(x)


def _with(module: nn.Module) -> nn.Sequential:
    """A network of 3 x 8 x 8 images: with one channel, a channels_last input would be
    contiguous as well."""
    return nn.Sequential(nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3), nn.Dropout(0.5), module,
                         nn.Linear(3 * 6 * 6, 4))  # fmt: skip


@pytest.mark.parametrize(
    ("module", "error"),
    [(_ViewFlatten(), "RuntimeError: view size is not compatible"),
     (_Checked(), "AssertionError: wants contiguous activations")],
)  # fmt: skip
def test_a_network_that_cannot_take_channels_last_is_refused_in_one_line(module, error):
    model = _with(module)
    model(torch.zeros(1, 3, 8, 8))  # contiguous, it runs
    with pytest.raises(BrainPropError) as refused:
        fastpath.prepare(model, (3, 8, 8))
    message = str(refused.value)
    assert "\n" not in message and "fails on channels_last inputs" in message
    # The line named is the network's own.
    assert error in message and f" at {__file__}:" in message
    assert message.endswith("instead of view, or train with --eager (eager=True)")
    fastpath.prepare(_with(module), (3, 8, 8), eager=True)


class _Noisy(nn.Flatten):
    """Draws from the global stream and counts its calls in a buffer, in any mode."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        return super().forward(x) + 0 * torch.rand_like(x).flatten(1)


def test_the_layout_check_leaves_the_network_and_the_random_streams_as_they_were():
    model = _with(_Noisy())
    model(torch.rand(4, 3, 8, 8))
    buffers = [b.clone() for b in model.buffers()]
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    fastpath.prepare(model, (3, 8, 8))
    assert torch.equal(torch.rand(3), expected) and model.training
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))
    assert model[3].calls == 1
    fastpath.prepare(model.eval(), (3, 8, 8))
    assert not model.training


def test_a_network_that_fails_in_any_layout_is_left_to_fail_in_its_own_words():
    model = _with(_Broken())
    fastpath.prepare(model, (3, 8, 8))
    # Left in the fast path's layout, which the run's header names, all the same.
    assert model[0].weight.is_contiguous(memory_format=CL) and not model[0].weight.is_contiguous()
    with pytest.raises(TypeError, match="broken in any layout"):
        model(torch.zeros(2, 3, 8, 8))


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
    # A config written before the fast path existed has no "eager": that run trained eager,
    # and resumes so.
    old = {k: v for k, v in run.config.to_dict().items() if k != "eager"}
    assert TrainConfig.from_dict(old).eager is True


class FrozenLrGraph:
    """A CPU stand-in for a CUDA graph: replay runs the captured step, with the learning rates
    it was captured with, as a real graph holds them as constants. ``calls[0]`` (the test's
    step count) is noted at each capture."""

    def __init__(self, optimizer, calls, captured_at):
        self.optimizer, self.calls, self.captured_at = optimizer, calls, captured_at
        self.step, self.lrs = None, None

    def capture(self, step):
        self.step, self.lrs = step, [g["lr"] for g in self.optimizer.param_groups]
        self.captured_at.append(self.calls[0])

    def replay(self):
        now = [g["lr"] for g in self.optimizer.param_groups]
        for g, lr in zip(self.optimizer.param_groups, self.lrs, strict=True):
            g["lr"] = lr
        try:
            return self.step()
        finally:
            for g, lr in zip(self.optimizer.param_groups, now, strict=True):
                g["lr"] = lr


def _stepper(graphed, device="cpu", new_graph=None, epsilon=0.3, fused=False):
    """(model, optimizer, generator, step) of the conv preset, batch 16; ``epsilon`` high, so
    that a stale exploration draw would show; ``fused``: the head a run takes on a GPU."""
    from brainprop.objectives import make_objective
    from brainprop.step import make_optimizer, train_step

    model = fastpath.prepare(_model("conv").to(device), (1, 8, 8))
    optimizer = make_optimizer(model, _config(None, lr=0.05).resolve())
    generator = torch.Generator(device=device).manual_seed(0)
    objective = make_objective("brainprop", epsilon=epsilon, fused=fused)
    step = partial(train_step, model, objective, optimizer, generator=generator, batch_size=16)
    if graphed:
        extra = {} if new_graph is None else {"new_graph": lambda _: new_graph(optimizer)}
        step = fastpath.GraphedStep(step, optimizer, generators=[generator], batch_size=16, **extra)
    return model, optimizer, generator, step


def _three_epochs(runs, x, y, calls=None):
    """85 images = 5 full batches and 5 images an epoch; the rate halves after epoch 2."""
    for epoch in range(3):
        for _, optimizer, _, _ in runs:
            for g in optimizer.param_groups:
                g["lr"] = 0.05 if epoch < 2 else 0.025
        for xb, yb in zip(x[:85].split(16), y[:85].split(16), strict=True):
            if calls is not None:
                calls[0] += 1
            yield [step(xb, yb) for *_, step in runs]


def test_graphed_steps_train_exactly_as_eager_ones(tiny_dataset):
    calls, captured_at = [0], []
    runs = [
        _stepper(False),
        _stepper(True, new_graph=lambda opt: FrozenLrGraph(opt, calls, captured_at)),
    ]
    x, y = tiny_dataset.train_x.float() / 255, tiny_dataset.train_y
    for eager, graphed in _three_epochs(runs, x, y, calls):
        assert torch.equal(eager.actions, graphed.actions)
        assert torch.equal(eager.loss, graphed.loss)
    (eager, _, eager_gen, _), (graphed, _, graphed_gen, step) = runs
    for name, p in eager.state_dict().items():
        assert torch.equal(p, graphed.state_dict()[name]), name
    assert torch.equal(eager_gen.get_state(), graphed_gen.get_state())
    # 3 warm-up steps, the capture at the 4th full batch; again at the new rate (step 13).
    assert captured_at == [4, 13] and step.captures == 2


def test_cuda_graph_refuses_where_it_cannot_run(tmp_path, tiny_dataset):
    with pytest.raises(BrainPropError, match="needs a CUDA device, and this run is on cpu"):
        train(_config(tmp_path, cuda_graph=True, device="cpu"), dataset=tiny_dataset)
    with pytest.raises(BrainPropError, match="contradict"):
        _config(tmp_path, cuda_graph=True, eager=True).resolve()
    from brainprop.feedback import convert
    from brainprop.objectives import make_objective

    model = _model("conv")
    convert(model, "direct")
    with pytest.raises(BrainPropError, match="--feedback direct"):
        fastpath.make_step(
            model, make_objective("brainprop"), torch.optim.SGD(model.parameters(), lr=0.1),
            generator=torch.Generator(), batch_size=16, cuda_graph=True,
        )  # fmt: skip


def test_a_step_that_a_graph_cannot_hold_is_refused_in_one_line_naming_its_line(tiny_dataset):
    from brainprop.objectives import make_objective
    from brainprop.step import make_optimizer, train_step

    capturing, raises = [False], [RuntimeError("operation not permitted when stream is capturing")]

    class Syncs(nn.Module):
        """Stands for ``.item()`` in one's own forward: fine eagerly, illegal in a capture."""

        def forward(self, x):
            if capturing[0]:
                raise raises[0]
            return x

    class CaptureEndFails:
        """As torch.cuda.graph: a failure inside the capture makes ending it fail too."""

        def __init__(self, generators):
            pass

        def capture(self, step):
            capturing[0] = True
            try:
                step()
            except RuntimeError:
                failed = "operation failed due to a previous error during capture"
                raise RuntimeError(failed) from None
            finally:
                capturing[0] = False

        def replay(self):
            raise AssertionError("never captured")

    model = fastpath.prepare(nn.Sequential(Syncs(), _model("conv")), (1, 8, 8))
    optimizer = make_optimizer(model, _config(None, lr=0.05).resolve())
    generator = torch.Generator().manual_seed(0)
    step = partial(
        train_step, model, make_objective("brainprop"), optimizer,
        generator=generator, batch_size=16,
    )  # fmt: skip
    graphed = fastpath.GraphedStep(
        step, optimizer, generators=[generator], batch_size=16, new_graph=CaptureEndFails
    )
    x, y = tiny_dataset.train_x[:16].float() / 255, tiny_dataset.train_y[:16]
    for _ in range(fastpath.WARMUP_STEPS):
        graphed(x, y)
    line = Syncs.forward.__code__.co_firstlineno + 2
    with pytest.raises(BrainPropError) as caught:
        graphed(x, y)
    assert str(caught.value) == (
        "--cuda-graph could not capture the training step (RuntimeError: operation not "
        f"permitted when stream is capturing at {__file__}:{line}): an operation in it waits "
        "for the GPU or uses the CPU (.item(), .cpu(), print, a new CPU tensor), which a CUDA "
        "graph cannot hold. Move it out of the step, or train without --cuda-graph "
        "(cuda_graph=False)"
    )
    # brainprop's own refusals say what is wrong in their own words, and running out of memory
    # stays itself, for the caller's hint (a review: it was called a forbidden operation).
    raises[0] = BrainPropError("refused in its own words")
    with pytest.raises(BrainPropError, match="^refused in its own words$"):
        graphed(x, y)
    for out_of_memory in MAKERS:
        raises[0] = out_of_memory()
        with pytest.raises(type(raises[0])) as raised:
            graphed(x, y)
        assert raised.value is raises[0]


def _split_badly():
    return torch.split(torch.zeros(3), [1, 1])  # fails inside PyTorch's own Python


def test_the_line_named_is_ones_own_not_pytorchs():
    """An error raised in PyTorch's Python code (torch.cuda.synchronize() in a capture, say)
    is named at the line of one's own that called it, the line to mend (review)."""
    with pytest.raises(RuntimeError) as raised:
        _split_badly()
    assert "torch" in raised.traceback[-1].path.parts  # PyTorch's frame is the last
    line = _split_badly.__code__.co_firstlineno + 1
    assert fastpath._own_line(raised.value) == f" at {__file__}:{line}"


class _CountingGraph:
    """A CPU stand-in for a CUDA graph that counts its captures and replays."""

    def __init__(self, counts):
        self.counts = counts

    def capture(self, step):
        self.step = step
        self.counts["captures"] += 1

    def replay(self):
        self.counts["replays"] += 1
        return self.step()


def _counted(batch_size=16):
    """A graphed step of a step that records the shapes of the labels it is given."""
    counts, seen = {"captures": 0, "replays": 0}, []
    optimizer = SimpleNamespace(param_groups=[{"lr": 0.1}], zero_grad=lambda set_to_none: None)
    step = fastpath.GraphedStep(
        lambda x, y: seen.append(tuple(y.shape)), optimizer,
        generators=[torch.Generator()], batch_size=batch_size,
        new_graph=lambda _: _CountingGraph(counts),
    )  # fmt: skip
    return step, counts, seen


def test_a_stack_of_seeds_full_batches_are_replayed_and_its_short_one_is_not():
    """A stack of G seeds' batches is [G, b]: the batch is y's last dimension (review: taken
    from the first, no full batch of a stack was ever replayed)."""
    step, counts, seen = _counted()
    full, short = torch.zeros(3, 16, dtype=torch.long), torch.zeros(3, 5, dtype=torch.long)
    for _ in range(fastpath.WARMUP_STEPS + 2):
        step(torch.zeros(3, 16, 1, 8, 8), full)
    step(torch.zeros(3, 5, 1, 8, 8), short)
    assert counts == {"captures": 1, "replays": 2}
    assert seen == [(3, 16)] * (fastpath.WARMUP_STEPS + 2) + [(3, 5)]


def test_a_forgotten_graph_warms_up_again_before_its_next_capture():
    """After forget (the weights moved to other memory), the next full batches run eagerly
    again before the capture, as a first capture does: a CUDA graph needs the lazy
    initialisations of the new tensors done outside it."""
    step, counts, _ = _counted()
    x, y = torch.zeros(16, 1, 8, 8), torch.zeros(16, dtype=torch.long)
    for _ in range(fastpath.WARMUP_STEPS + 1):
        step(x, y)
    assert counts == {"captures": 1, "replays": 1}
    step.forget()
    for _ in range(fastpath.WARMUP_STEPS):
        step(x, y)
    assert counts == {"captures": 1, "replays": 1}
    step(x, y)
    assert counts == {"captures": 2, "replays": 2}


def test_cuda_graph_refuses_a_run_under_torchrun():
    from brainprop.distributed import Context

    model = _model("conv")
    on_cuda = SimpleNamespace(device=torch.device("cuda"))  # what a CUDA run's generator says
    with pytest.raises(BrainPropError, match="it is for one process, and this run is under torch"):
        fastpath.graphed(
            lambda x, y: None, SimpleNamespace(param_groups=[]), model, [on_cuda],
            batch_size=16, parallel=Context(rank=0, world_size=2),
        )  # fmt: skip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_real_cuda_capture_of_item_is_refused_in_one_line_naming_its_line(tmp_path):
    # In a process of its own: a failed capture must not be able to upset this one's CUDA.
    own = tmp_path / "own.py"
    own.write_text(
        textwrap.dedent(
            """\
            import torch
            from torch import nn
            from brainprop import fastpath
            from brainprop.errors import BrainPropError
            from brainprop.objectives import make_objective

            class Logs(nn.Module):
                def forward(self, x):
                    self.last = x.abs().max().item()
                    return x

            model = nn.Sequential(Logs(), nn.Flatten(), nn.Linear(64, 4, bias=False)).cuda()
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            step = fastpath.make_step(
                model, make_objective("brainprop"), optimizer,
                generator=torch.Generator("cuda"), batch_size=16, cuda_graph=True,
            )
            x, y = torch.rand(16, 1, 8, 8, device="cuda"), torch.randint(4, (16,), device="cuda")
            try:
                for _ in range(fastpath.WARMUP_STEPS + 1):
                    step(x, y)
            except BrainPropError as e:
                print(e)
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(own)], capture_output=True, text=True, timeout=300, check=True
    )
    assert done.stdout.startswith("--cuda-graph could not capture the training step ("), done
    assert f" at {own}:9): an operation in it waits for the GPU" in done.stdout, done


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fused", [False, True], ids=["unfused-head", "fused-head"])
def test_a_real_cuda_graph_trains_as_eager_and_explores_afresh(tiny_dataset, fused):
    # Fused: the head a run on a GPU captures unless --eager; its kernels and their generators
    # must replay inside the graph, where no fallback to the unfused head is left.
    device = torch.device("cuda")
    runs = [_stepper(graphed, device, fused=fused) for graphed in (False, True)]
    x = (tiny_dataset.train_x.float() / 255).to(device)
    y = tiny_dataset.train_y.to(device)
    for _ in _three_epochs(runs, x, y):
        pass
    (eager, _, eager_gen, _), (graphed, _, graphed_gen, step) = runs
    assert step.captures == 2
    if fused and not step.plain.args[1].fused_on(device):
        pytest.skip("the fused head fell back to the unfused one here (its warning says why)")
    for name, p in eager.state_dict().items():
        torch.testing.assert_close(p, graphed.state_dict()[name], rtol=1e-3, atol=1e-4)
    # Replays advance the registered generator as the eager steps advance theirs.
    assert torch.equal(eager_gen.get_state(), graphed_gen.get_state())
    # Exploration inside the graph draws new numbers at every replay.
    _, optimizer, _, step = _stepper(True, device, epsilon=0.5, fused=fused)
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    explored = [step(x[:16], y[:16]).explored.clone() for _ in range(40)]
    explored = explored[fastpath.WARMUP_STEPS + 1 :]
    assert not all(torch.equal(explored[0], e) for e in explored[1:])
    assert 0.35 < torch.stack(explored).float().mean().item() < 0.65


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphed_steps_made_one_after_another_leave_no_memory_behind(tiny_dataset):
    """PyTorch keeps a cuBLAS workspace (32 MiB by default on Hopper) for every stream a
    matmul has run on: warm-ups on a fresh stream each could leave one behind per step, up to
    the 32 streams of PyTorch's pool. Run in a process of its own (gpu_check.sh does): one
    that has cycled through the pool already has them all."""
    device = torch.device("cuda")
    x = (tiny_dataset.train_x[:16].float() / 255).to(device)
    y = tiny_dataset.train_y[:16].to(device)

    def train() -> None:
        *_, step = _stepper(True, device)
        for _ in range(fastpath.WARMUP_STEPS + 2):
            step(x, y)
        torch.cuda.synchronize()

    def held_after_training() -> int:
        train()
        gc.collect()
        return torch.cuda.memory_allocated(device)

    first = held_after_training()  # after the lazy initialisations, which stay
    assert [held_after_training() - first for _ in range(3)] == [0, 0, 0]
