"""BrainProp's fused head: its kernels give the unfused head's results, and the objective uses
them only where they have been seen to, falling back with a warning otherwise."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from packaging.version import Version
from torch.utils._python_dispatch import TorchDispatchMode

from brainprop import TrainConfig, fastpath, fusedhead, objectives, train
from brainprop.errors import BrainPropError
from brainprop.objectives import BrainProp, _unfused_head
from brainprop.presets import build_model


class _OperatorLog(TorchDispatchMode):
    """The PyTorch operators that do work (a kernel each on a GPU), as dispatched."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if not func.is_view and name not in {"empty", "empty_strided", "detach"}:
            self.names.append(name)
        return func(*args, **(kwargs or {}))


def compare_heads(device: str) -> None:
    """The fused head against the unfused one on ``device``, in shapes and values training
    meets and some it should not (NaN, -inf), with the gradient weighted as a short last
    batch's is. Run on CPU tensors through Triton's interpreter, and on a GPU."""
    # 17 classes: one past a power of two, the classes' block rounds up to 32.
    cases = [(128, 10, 0.02), (96, 200, 0.5), (7, 100, 1.0), (1, 10, 0.0), (300, 10, 0.3),
             (5, 17, 0.5)]  # fmt: skip
    for batch, classes, epsilon in cases:
        for trial in range(3):
            g = torch.Generator().manual_seed(trial)
            wide = torch.randn(batch, classes + 3 * trial, generator=g)
            wide = (wide * 10 * torch.rand((), generator=g)).to(device)
            q = wide[:, :classes]  # rows apart (review: a product of the slice was dense)
            y = torch.randint(0, classes, (batch,), generator=g).to(device)
            if trial == 1:
                # Errors of exactly 0, whose gradient is +0.0 as autograd's (not -0.0): the
                # greedy choice of a row of ones rewarded, of a row of zeros not.
                q[0, :], y[0] = 1.0, 0
                q[-1, :], y[-1] = 0.0, classes - 1
            if trial == 2:
                q[0, 3] = float("nan")  # argmax takes the first NaN; the error is NaN
                q[-1, :] = float("-inf")
            # A short last batch's loss is weighted by n / B, which scales the gradient.
            weight = 3 * torch.rand((), generator=g).item()
            objective = BrainProp(epsilon)
            # The fused head takes the rows as they lie, its gradient back into them.
            plain_q, fused_wide = q.clone().requires_grad_(), wide.clone().requires_grad_()
            fused_q = fused_wide[:, :classes]
            draws = objective.draw(q, torch.Generator(device=device).manual_seed(trial))
            plain = objective._unfused(plain_q, y, draws)
            loss, actions, explored, rewards = fusedhead.chosen_unit_head(
                fused_q, y, epsilon, *draws
            )
            (plain.loss * weight).backward()
            (loss * weight).backward()
            case = (batch, classes, epsilon, trial)
            assert torch.equal(actions, plain.actions), case
            assert torch.equal(explored, plain.explored), case
            assert torch.equal(rewards, plain.rewards), case
            assert fused_q.stride(0) == classes + 3 * trial, case
            assert _same_bits(fused_wide.grad[:, :classes], plain_q.grad), case
            assert not fused_wide.grad[:, classes:].any(), case
            assert loss.dtype == plain.loss.dtype and actions.dtype == torch.int64, case
            assert torch.allclose(loss, plain.loss, rtol=1e-6, atol=0, equal_nan=True), case
            assert explored.all() if epsilon == 1 else explored.any() == (epsilon > 0), case
    # Draws that are views, as a caller may slice them: the kernels read them as dense blocks
    # (review). And rewards may be changed in place before the backward, as the unfused
    # head's may: they shared a version counter with the errors saved for it.
    q = torch.randn(6, 8, device=device)
    y = torch.arange(6, device=device) % 8
    explore = torch.rand(12, device=device)[::2]
    uniform = torch.rand(6, 16, device=device)[:, :8]
    plain = BrainProp(0.5)._unfused(q, y, (explore, uniform))
    fused_q = q.clone().requires_grad_()
    loss, actions, _, rewards = fusedhead.chosen_unit_head(fused_q, y, 0.5, explore, uniform)
    assert torch.equal(actions, plain.actions)
    rewards.sub_(rewards.mean())
    loss.backward()
    # Draws at their edges, which torch.rand gives (in 2^24 each): an explore draw equal to
    # epsilon does not explore (explore < epsilon), and a uniform of 0 is taken as the
    # smallest normal number, not log(0); and a row of two NaN takes the first (review).
    q = torch.zeros(4, 8, device=device)
    q[:, 5], q[3, 2], q[3, 6] = 10.0, float("nan"), float("nan")
    y = torch.full((4,), 5, device=device)
    explore = torch.tensor([0.5, 0.25, 0.0, 0.0], device=device)
    uniform = torch.full((4, 8), 0.5, device=device)
    uniform[0, 1] = 1 - 2**-24  # Gumbel noise of 16.6: row 0 would choose 1 if it explored
    uniform[:, 5] = 0.0  # noise of -4.5 from the smallest normal: rows 1 and 2 still choose 5
    plain_q, fused_q = q.clone().requires_grad_(), q.clone().requires_grad_()
    plain = BrainProp(0.5)._unfused(plain_q, y, (explore, uniform))
    loss, actions, explored, rewards = fusedhead.chosen_unit_head(fused_q, y, 0.5, explore, uniform)
    assert plain.actions.tolist() == [5, 5, 5, 2]
    assert torch.equal(actions, plain.actions) and torch.equal(explored, plain.explored)
    assert torch.equal(rewards, plain.rewards)
    plain.loss.backward()
    loss.backward()
    assert _same_bits(fused_q.grad, plain_q.grad)
    # Past the draws, PyTorch itself launches only autograd's seed gradient. (Triton's
    # interpreter copies the tensors a kernel takes in and out, with PyTorch operators.)
    q = torch.randn(128, 10, device=device, requires_grad=True)
    y = torch.zeros(128, dtype=torch.long, device=device)
    draws = BrainProp(0.02).draw(q)
    with _OperatorLog() as log:
        fusedhead.chosen_unit_head(q, y, 0.02, *draws)[0].backward()
    copies = {"new_empty", "set_", "copy_"} if device == "cpu" else set()
    assert [name for name in log.names if name not in copies] == ["ones_like"], log.names


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, NaN to any NaN (allclose takes -0.0 for +0.0); fp32 only."""
    nan = a.isnan() & b.isnan()
    return torch.equal(a.view(torch.int32)[~nan], b.view(torch.int32)[~nan])


def test_the_check_before_the_kernels_are_relied_on_compares_bit_for_bit():
    """It compared with allclose, which takes -0.0 for +0.0 (review); NaN still matches NaN,
    and the loss, summed in another order, matches to rounding."""
    same = fusedhead._same
    assert not same("gradient", torch.tensor([-0.0]), torch.tensor([0.0]))
    assert same("gradient", torch.tensor([float("nan"), 1.0]), torch.tensor([float("nan"), 1.0]))
    assert not same("gradient", torch.tensor([1.0]), torch.tensor([1.0 + 2**-23]))
    assert same("loss", torch.tensor(1.0), torch.tensor(1.0 + 2**-23))
    assert not same("gradient", torch.tensor([1.0]), torch.tensor([1.0, 1.0]))
    # NaN matches NaN only: a head that gives NaN where the other gives a number differs.
    assert not same("gradient", torch.tensor([float("nan"), 1.0]), torch.tensor([1.0, 1.0]))
    assert not same("gradient", torch.tensor([1.0]), torch.tensor([float("nan")]))
    assert not same("loss", torch.tensor(1.0), torch.tensor(1.001))


def test_the_kernels_give_the_unfused_heads_results():
    """On CPU tensors through Triton's interpreter, which must be chosen before Triton is
    imported: hence a process of its own."""
    triton = pytest.importorskip("triton")
    numpy = pytest.importorskip("numpy")
    triton_version, numpy_version = Version(triton.__version__), Version(numpy.__version__)
    if triton_version.release < (3, 7) and numpy_version.release >= (2, 4):
        pytest.skip(
            f"Triton {triton.__version__}'s interpreter fails under NumPy {numpy.__version__} "
            "(triton-lang/triton#9171, mended in Triton 3.7); the kernels' sm_90 test still runs"
        )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    script = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
    script += "import test_fusedhead; test_fusedhead.compare_heads('cpu')"
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_kernels_compile_for_an_h200_with_a_precise_log_and_division():
    """Built as Triton builds them for a GPU, down to machine code (Triton's own ptxas), on any
    machine: what the interpreter cannot check. Their PTX shows libdevice's logf, a polynomial
    (Triton's tl.log would be lg2.approx), and a correctly rounded division."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from brainprop import headkernels

    h200 = GPUTarget("cuda", 90, 32)
    kinds = {"y_ptr": "*i64", "actions_ptr": "*i64", "explored_ptr": "*u8", "epsilon": "fp32",
             "tiny": "fp32", "q_row_stride": "i32", "rows": "i32", "classes": "i32"}  # fmt: skip

    def ptx(kernel, options, **constants):
        """The kernel's PTX, its other arguments fp32 pointers, its constants upper case."""
        signature = {
            name: "constexpr" if name.isupper() else kinds.get(name, "*fp32")
            for name in kernel.arg_names
        }
        source = ASTSource(kernel, signature, constexprs=constants)
        return triton.compile(source, target=h200, options=options).asm["ptx"]

    for explore in (True, False):
        for classes in (10, 200):
            rows, block = fusedhead._blocks(classes)
            code = ptx(
                headkernels.choose, fusedhead._FUSE_CHOOSE, EXPLORE=explore, INTERPRETED=False,
                BLOCK_ROWS=rows, BLOCK_CLASSES=block,
            )  # fmt: skip
            assert "lg2.approx" not in code and "ex2.approx" not in code
    rows, block = fusedhead._blocks(10)
    code = ptx(
        headkernels.spread, fusedhead._FUSE_SPREAD, INTERPRETED=False, BLOCK_ROWS=rows,
        BLOCK_CLASSES=block,
    )  # fmt: skip
    # The scale: the reciprocal of -B correctly rounded, as PyTorch's CUDA division by a
    # number takes it; products not contracted into the additions that follow.
    assert "div.rn.f32" in code and "div.full" not in code and "div.approx" not in code
    assert "fma" not in code


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernels compile for CUDA only")
def test_on_cuda_the_kernels_give_the_unfused_heads_results():
    compare_heads("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernels compile for CUDA only")
def test_on_cuda_the_objective_checks_the_fused_head_then_runs_it(monkeypatch, capsys):
    calls = []
    head = fusedhead.chosen_unit_head
    monkeypatch.setattr(fusedhead, "chosen_unit_head", lambda *a: calls.append(1) or head(*a))
    objective = BrainProp(0.02, fused=True)
    q = torch.randn(128, 10, device="cuda", requires_grad=True)
    for _ in range(5):
        objective(q, torch.zeros(128, dtype=torch.long, device="cuda")).loss.backward()
    assert "warning" not in capsys.readouterr().err
    # The first batch's check (three ways, see fusedhead.disagreement), then every batch.
    assert len(calls) == 3 + 5 and objective.fused_on(q.device)


def _spy(monkeypatch, head):
    """Let the objective take CPU tensors for the fused head, computed by ``head``; returns
    the list of its calls."""
    calls = []
    monkeypatch.setattr(fusedhead, "unsupported", lambda q: None)
    monkeypatch.setattr(fusedhead, "chosen_unit_head", lambda *a: calls.append(1) or head(*a))
    return calls


def _batches(n=3):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(64, 10, generator=g), torch.randint(0, 10, (64,), generator=g))] * n


def test_a_head_that_agrees_on_the_first_batch_is_used_from_then_on(monkeypatch, capsys):
    calls = _spy(monkeypatch, _unfused_head)
    objective = BrainProp(0.5, fused=True)
    with torch.inference_mode():  # the check needs gradients, so it waits for a batch that has
        objective(*_batches(1)[0], torch.Generator().manual_seed(1))
    assert not calls and objective.fused_on(torch.device("cpu")) is None
    for q, y in _batches():
        with torch.no_grad():  # the check makes its own gradients
            objective(q, y, torch.Generator().manual_seed(1))
    # The check (three ways, see fusedhead.disagreement), then each batch.
    assert len(calls) == 3 + 3 and not capsys.readouterr().err
    assert objective.fused_on(torch.device("cpu")) is True


def test_a_subclass_runs_the_unfused_head_which_calls_its_own_policy(monkeypatch):
    """The kernels compute BrainProp's choice: a subclass's own would be checked against
    BrainProp's unfused head, agree, and be replaced on the GPU alone."""

    class Greedy(BrainProp):
        def choose(self, q, explore, uniform):
            return q.detach().argmin(dim=1), torch.zeros_like(q[:, 0], dtype=torch.bool)

    calls = _spy(monkeypatch, _unfused_head)
    objective = Greedy(1.0, fused=True)
    for q, y in _batches():
        out = objective(q, y, torch.Generator().manual_seed(1))
        assert torch.equal(out.actions, q.argmin(dim=1))
    assert not calls and objective.fused_on(torch.device("cpu")) is False
    assert torch.equal(objective.select(q)[0], q.argmin(dim=1))


def test_a_head_that_fails_to_build_is_named_and_the_unfused_one_runs(monkeypatch, capsys):
    def broken(*args):
        raise RuntimeError("PTX assembly failed\nptxas fatal: ...")

    calls = _spy(monkeypatch, broken)
    objective, plain = BrainProp(0.5, fused=True), BrainProp(0.5)
    for q, y in _batches():
        got = objective(q, y, torch.Generator().manual_seed(1))
        want = plain(q, y, torch.Generator().manual_seed(1))
        assert torch.equal(got.actions, want.actions) and torch.equal(got.loss, want.loss)
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "fused BrainProp head failed (RuntimeError: PTX assembly failed) on cpu" in err
    assert len(calls) == 1


def test_a_head_that_gives_other_results_is_named_and_the_unfused_one_runs(monkeypatch, capsys):
    def doubled(*args):
        loss, actions, explored, rewards = _unfused_head(*args)
        return 2 * loss, actions, explored, rewards

    calls = _spy(monkeypatch, doubled)
    objective = BrainProp(0.5, fused=True)
    for q, y in _batches():
        objective(q, y, torch.Generator().manual_seed(1))
    err = capsys.readouterr().err
    assert "fused BrainProp head gave other gradient, loss on cpu" in err and len(calls) == 3
    assert objective.fused_on(torch.device("cpu")) is False


class _Unweighted(torch.autograd.Function):
    """The loss as it is, but its gradient as if nothing had weighted it."""

    @staticmethod
    def forward(ctx, loss):
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.ones_like(grad)


def test_a_head_that_ignores_the_gradient_coming_back_is_found(monkeypatch, capsys):
    """A short last batch's loss is weighted by n / B; the check weights it too."""

    def unweighted(*args):
        loss, *rest = _unfused_head(*args)
        return _Unweighted.apply(loss), *rest

    _spy(monkeypatch, unweighted)
    BrainProp(0.5, fused=True)(*_batches(1)[0])
    assert "fused BrainProp head gave other gradient on cpu" in capsys.readouterr().err


def test_a_first_batch_with_nan_is_no_disagreement(monkeypatch, capsys):
    _spy(monkeypatch, _unfused_head)
    q, y = _batches(1)[0]
    q = q.clone()
    q[5, 2] = float("nan")
    objective = BrainProp(0.5, fused=True)
    objective(q, y)
    assert objective.fused_on(torch.device("cpu")) and not capsys.readouterr().err


def test_the_check_draws_nothing_from_the_runs_random_streams(monkeypatch):
    _spy(monkeypatch, _unfused_head)
    q, y = _batches(1)[0]
    states, fused = [], BrainProp(0.5, fused=True)
    for objective in (fused, BrainProp(0.5)):
        torch.manual_seed(3)
        generator = torch.Generator().manual_seed(4)
        out = objective(q, y, generator)
        states.append((torch.get_rng_state(), generator.get_state(), out.actions))
    assert fused.fused_on(torch.device("cpu"))  # checked, and ran fused
    assert all(torch.equal(a, b) for a, b in zip(*states, strict=True))


def test_the_check_puts_every_row_through_the_exploring_choice(monkeypatch, capsys):
    """A run's first batch has few exploring rows (2 % of them), or none (epsilon 0): a head
    wrong only where rows explore is found all the same."""

    def greedy(q, y, epsilon, explore, uniform):
        return _unfused_head(q, y, epsilon, None, None)

    _spy(monkeypatch, greedy)
    objective = BrainProp(0.0, fused=True)
    objective(*_batches(1)[0])
    assert "gave other actions, explored, rewards, gradient, loss" in capsys.readouterr().err


def test_without_fused_the_kernels_are_never_tried(monkeypatch):
    calls = _spy(monkeypatch, _unfused_head)
    for q, y in _batches():
        BrainProp(0.5)(q, y)
    assert not calls


def test_a_cuda_device_that_cannot_build_the_kernels_is_named_once(monkeypatch, capsys):
    """Triton missing on a GPU makes a run slower than the fused head promises: it is said, on
    one line per device, and the unfused head runs."""
    for q, y in _batches():
        BrainProp(0.5, fused=True)(q, y, torch.Generator().manual_seed(1))
    assert fusedhead.missing(torch.device("cpu")) is None and not capsys.readouterr().err
    why = "Triton is not installed (No module named 'triton')"
    monkeypatch.setattr(fusedhead, "missing", lambda device: why)
    monkeypatch.setattr(objectives, "_TOLD_MISSING", set())
    plain = BrainProp(0.5)
    for _ in range(2):  # a second run in the process, or a reload, is not told again
        objective = BrainProp(0.5, fused=True)
        for q, y in _batches():
            got = objective(q, y, torch.Generator().manual_seed(1))
            want = plain(q, y, torch.Generator().manual_seed(1))
            assert torch.equal(got.actions, want.actions) and torch.equal(got.loss, want.loss)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot run on cpu: {why}; the unfused head" in err, err


def test_the_kernels_are_for_fp32_rows_on_cuda_only():
    assert "cpu is not CUDA" in fusedhead.unsupported(torch.zeros(4, 10))
    model = build_model("dense", (1, 28, 28), 10)
    assert fastpath.FUSED_HEAD not in fastpath.features(model, objective=BrainProp(fused=True))
    if torch.cuda.is_available():
        assert "float64" in fusedhead.unsupported(torch.zeros(4, 10, device="cuda").double())
        model.cuda()
        assert fastpath.FUSED_HEAD in fastpath.features(model, objective=BrainProp(fused=True))
        assert fastpath.FUSED_HEAD not in fastpath.features(model, objective=BrainProp())


def test_on_cuda_the_kernels_take_nonempty_fp32_rows_only(monkeypatch):
    """What they refuse, the unfused head takes (review: checked on CUDA alone, so not where
    the suite runs): fp64 or bf16 outputs, columns apart, an empty batch (an idle rank's share
    of a short last batch)."""
    monkeypatch.setattr(fusedhead, "unavailable", lambda device: None)  # as on a GPU
    assert fusedhead.unsupported(torch.zeros(4, 10)) is None
    assert fusedhead.unsupported(torch.zeros(4, 13)[:, :10]) is None  # rows apart
    for q in (torch.zeros(4, 10).double(), torch.zeros(4, 10).bfloat16()):
        assert f"the outputs are {q.dtype} of shape (4, 10), not fp32" in fusedhead.unsupported(q)
    for q in (torch.zeros(0, 10), torch.zeros(10, 4).t(), torch.zeros(4, 10, 2)):
        assert "not fp32 rows [B, K]" in fusedhead.unsupported(q), q.shape


_Q, _Y = torch.zeros(8, 10), torch.zeros(8, dtype=torch.long)
_EXPLORE, _UNIFORM = torch.rand(8), torch.rand(8, 10)


@pytest.mark.parametrize(
    ("args", "said"),
    [((_Q, _Y[:4], _EXPLORE, _UNIFORM), "labels of shape (4,) on cpu: Q-values of shape (8, 10) "
      "on cpu take labels of shape (8,) there"),
     ((_Q, _Y, _EXPLORE, None), "one draw without the other: pass explore and uniform, or "
      "neither (epsilon 0)"),
     ((_Q, _Y, _EXPLORE, _UNIFORM[:, :5]), "uniform of shape (8, 5) on cpu: "),
     ((_Q, _Y, _EXPLORE[:1], _UNIFORM), "explore of shape (1,) on cpu: "),
     ((_Q, _Y.to("meta"), _EXPLORE, _UNIFORM), "labels of shape (8,) on meta: "),
     ((_Q, _Y.float(), _EXPLORE, _UNIFORM), "labels of torch.float32: it takes integer labels"),
     ((_Q, _Y.bool(), None, None), "labels of torch.bool: it takes integer labels"),
     ((_Q, _Y, _EXPLORE.double(), _UNIFORM), "explore of torch.float64: it takes float32 explore"),
     ((_Q.double(), _Y, None, None), "Q-values torch.float64 of shape (8, 10): it takes fp32 "
      "rows [B, K]"),
     ((_Q.t(), _Y, None, None), "Q-values torch.float32 of shape (10, 8): it takes fp32 rows")],
)  # fmt: skip
def test_the_kernels_refuse_what_they_would_read_past_in_one_line(args, said):
    """They index every tensor by the Q-values' shape: shorter labels ran, read past their end
    and gave rewards of nothing, and explore without uniform failed in Triton (review)."""
    with pytest.raises(BrainPropError, match=f"^chosen_unit_head cannot take {re.escape(said)}"):
        fusedhead.chosen_unit_head(args[0], args[1], 0.5, *args[2:])


def test_outputs_the_kernels_cannot_take_drop_the_fused_head_from_the_fast_path(monkeypatch):
    """An fp64 network's head ran unfused, with the run's header and bench's fast_path still
    naming the fused head (review)."""
    monkeypatch.setattr(fusedhead, "unavailable", lambda device: None)
    model, objective = build_model("dense", (1, 28, 28), 10).double(), BrainProp(fused=True)
    assert fastpath.features(model, objective=objective) == [fastpath.FUSED_HEAD]
    q, y = _batches(1)[0]
    objective(q.double(), y)
    assert fastpath.features(model, objective=objective) == []


def test_a_fused_head_that_fell_back_is_not_called_part_of_the_fast_path(monkeypatch, capsys):
    def broken(*args):
        raise RuntimeError("no")

    _spy(monkeypatch, broken)
    monkeypatch.setattr(fusedhead, "unavailable", lambda device: None)
    model, objective = build_model("dense", (1, 28, 28), 10), BrainProp(fused=True)
    assert fastpath.features(model, objective=objective) == [fastpath.FUSED_HEAD]
    objective(*_batches(1)[0])
    assert fastpath.features(model, objective=objective) == []


@pytest.mark.parametrize("eager", [False, True])
def test_training_uses_the_fused_head_unless_eager(
    tmp_path, tiny_dataset, monkeypatch, capsys, eager
):
    calls = _spy(monkeypatch, _unfused_head)
    monkeypatch.setattr(fusedhead, "unavailable", lambda device: None)
    config = TrainConfig(
        dataset="mnist", arch="dense", epochs=1, batch_size=16, out_dir=str(tmp_path), eager=eager
    )
    train(config, dataset=tiny_dataset)
    header = capsys.readouterr().out.splitlines()[0]
    assert bool(calls) != eager and ("fused_head" in header) != eager, header


def test_an_error_of_the_unfused_head_is_not_blamed_on_the_fused_one(monkeypatch, capsys):
    _spy(monkeypatch, _unfused_head)
    q, y = _batches(1)[0]
    objective = BrainProp(0.5, fused=True)
    with pytest.raises(RuntimeError):
        objective(q, y.to("meta"))
    assert not capsys.readouterr().err and objective.fused_on(torch.device("cpu")) is None
