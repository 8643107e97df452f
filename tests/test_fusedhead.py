"""BrainProp's fused head: its kernels give the unfused head's results, and the objective uses
them only where they have been seen to, falling back with a warning otherwise."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from brainprop import TrainConfig, fastpath, fusedhead, train
from brainprop.objectives import BrainProp
from brainprop.presets import build_model

# The kernels against the unfused head, on CPU tensors through Triton's interpreter, which
# must be chosen before Triton is imported: hence a process of its own.
_KERNELS_AGAINST_THE_UNFUSED_HEAD = """
import torch
from brainprop import fusedhead
from brainprop.objectives import BrainProp

cases = [(128, 10, 0.02), (96, 200, 0.5), (7, 100, 1.0), (1, 10, 0.0), (300, 10, 0.3)]
for batch, classes, epsilon in cases:
    for trial in range(3):
        g = torch.Generator().manual_seed(trial)
        q = torch.randn(batch, classes, generator=g) * 10 * torch.rand((), generator=g)
        if trial == 2:
            q[0, 3] = float("nan")  # argmax takes the first NaN; the error is NaN
            q[-1, :] = float("-inf")
        y = torch.randint(0, classes, (batch,), generator=g)
        # The loop scales a short last batch's loss, which scales the gradient coming back.
        weight = 3 * torch.rand((), generator=g)
        objective = BrainProp(epsilon)
        plain_q, fused_q = q.clone().requires_grad_(), q.clone().requires_grad_()
        draws = objective.draw(q, torch.Generator().manual_seed(trial))
        plain = objective._unfused(plain_q, y, draws)
        loss, actions, explored, rewards = fusedhead.chosen_unit_head(fused_q, y, epsilon, *draws)
        (plain.loss * weight).backward()
        (loss * weight).backward()
        case = (batch, classes, epsilon, trial)
        assert torch.equal(actions, plain.actions), case
        assert torch.equal(explored, plain.explored), case
        assert torch.equal(rewards, plain.rewards), case
        assert torch.equal(fused_q.grad.nan_to_num(), plain_q.grad.nan_to_num()), case
        assert fused_q.grad.isnan().equal(plain_q.grad.isnan()), case
        assert loss.dtype == plain.loss.dtype and actions.dtype == torch.int64, case
        assert torch.allclose(loss, plain.loss, rtol=1e-6, atol=0, equal_nan=True), case
        assert explored.all() if epsilon == 1 else explored.any() == (epsilon > 0), case
print("kernels agree")
"""


def test_the_kernels_give_the_unfused_heads_results():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_KERNELS_AGAINST_THE_UNFUSED_HEAD)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "kernels agree" in done.stdout


def test_the_kernels_compile_for_an_h200_with_a_precise_log_and_division():
    """Built as Triton builds them for a GPU, down to the machine code (Triton's own ptxas), on
    any machine: what the interpreter cannot check. libdevice's logf is a polynomial (Triton's
    tl.log would be lg2.approx), and the gradient's division is correctly rounded."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from brainprop import headkernels

    h200 = GPUTarget("cuda", 90, 32)
    kinds = {"y_ptr": "*i64", "actions_ptr": "*i64", "explored_ptr": "*u8", "epsilon": "fp32",
             "tiny": "fp32", "q_row_stride": "i32", "rows": "i32", "classes": "i32"}  # fmt: skip

    def ptx(kernel, **constants):
        """The kernel's PTX, its other arguments fp32 pointers, its constants upper case."""
        signature = {
            name: "constexpr" if name.isupper() else kinds.get(name, "*fp32")
            for name in kernel.arg_names
        }
        source = ASTSource(kernel, signature, constexprs=constants)
        options = fusedhead._COMPILE
        return triton.compile(source, target=h200, options=options).asm["ptx"]

    for explore in (True, False):
        for classes in (10, 200):
            rows, block = fusedhead._blocks(classes)
            code = ptx(
                headkernels.choose, EXPLORE=explore, INTERPRETED=False, BLOCK_ROWS=rows,
                BLOCK_CLASSES=block,
            )  # fmt: skip
            assert "lg2.approx" not in code and "ex2.approx" not in code
    rows, block = fusedhead._blocks(10)
    code = ptx(headkernels.spread, BLOCK_ROWS=rows, BLOCK_CLASSES=block)
    assert "div.rn.f32" in code and "div.full" not in code and "div.approx" not in code


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernels compile for CUDA only")
def test_on_cuda_the_fused_head_runs_and_trains_as_the_unfused_one(monkeypatch, capsys):
    calls = []
    head = fusedhead.chosen_unit_head
    monkeypatch.setattr(fusedhead, "chosen_unit_head", lambda *a: calls.append(1) or head(*a))
    fused, plain = BrainProp(0.3, fused=True), BrainProp(0.3)
    for trial in range(5):
        g = torch.Generator(device="cuda").manual_seed(trial)
        q = torch.randn(128, 10, device="cuda", generator=g)
        y = torch.randint(0, 10, (128,), device="cuda", generator=g)
        outs, grads = [], []
        for objective in (fused, plain):
            leaf = q.clone().requires_grad_()
            outs.append(objective(leaf, y, torch.Generator(device="cuda").manual_seed(trial)))
            outs[-1].loss.backward()
            grads.append(leaf.grad)
        assert torch.equal(outs[0].actions, outs[1].actions)
        assert torch.equal(outs[0].explored, outs[1].explored)
        assert torch.equal(grads[0], grads[1])
    assert "warning" not in capsys.readouterr().err
    assert len(calls) == 1 + 5  # the first batch's check, then every batch


def _spy(monkeypatch, head):
    """Let the objective take CPU tensors for the fused head, computed by ``head``; returns
    the list of its calls."""
    calls = []
    monkeypatch.setattr(fusedhead, "unsupported", lambda q: None)
    monkeypatch.setattr(fusedhead, "chosen_unit_head", lambda *a: calls.append(1) or head(*a))
    return calls


def _unfused_head(q, y, epsilon, explore, uniform):
    out = BrainProp(epsilon)._unfused(q, y, (explore, uniform))
    return out.loss, out.actions, out.explored, out.rewards


def _batches(n=3):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(64, 10, generator=g), torch.randint(0, 10, (64,), generator=g))] * n


def test_a_head_that_agrees_on_the_first_batch_is_used_from_then_on(monkeypatch, capsys):
    calls = _spy(monkeypatch, _unfused_head)
    objective = BrainProp(0.5, fused=True)
    for q, y in _batches():
        with torch.no_grad():  # the check needs gradients, and makes its own
            objective(q, y, torch.Generator().manual_seed(1))
    assert len(calls) == 1 + 3 and not capsys.readouterr().err


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
    assert "fused BrainProp head gave other gradient, loss on cpu" in err and len(calls) == 1


def test_without_fused_the_kernels_are_never_tried(monkeypatch):
    calls = _spy(monkeypatch, _unfused_head)
    for q, y in _batches():
        BrainProp(0.5)(q, y)
    assert not calls


def test_the_kernels_are_for_fp32_rows_on_cuda_only():
    assert "cpu is not CUDA" in fusedhead.unsupported(torch.zeros(4, 10))
    model = build_model("dense", (1, 28, 28), 10)
    assert fastpath.FUSED_HEAD not in fastpath.features(model, rule="brainprop")
    if torch.cuda.is_available():
        assert "float64" in fusedhead.unsupported(torch.zeros(4, 10, device="cuda").double())
        assert fastpath.FUSED_HEAD in fastpath.features(model.cuda(), rule="brainprop")
        assert fastpath.FUSED_HEAD not in fastpath.features(model, rule="ebp")


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
