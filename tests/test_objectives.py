"""The rule's semantics: who gets the gradient, the value of delta, and how actions are chosen."""

import inspect
import math
import re

import pytest
import torch
from torch import nn

from brainprop.errors import BrainPropError
from brainprop.objectives import EBP, OBJECTIVES, BrainProp, make_objective
from brainprop.step import train_step


def _q(batch=64, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, classes, generator=g, dtype=torch.float64).requires_grad_()


def test_gradient_reaches_only_the_chosen_unit_and_equals_minus_delta():
    q = _q()
    y = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(1))
    out = BrainProp(epsilon=0.5)(q, y, torch.Generator().manual_seed(2))
    out.loss.backward()
    chosen = torch.nn.functional.one_hot(out.actions, 10).bool()
    assert torch.all(q.grad[~chosen] == 0)
    delta = out.rewards - q.detach()[chosen]
    torch.testing.assert_close(q.grad[chosen], -delta / 64, rtol=0, atol=1e-15)


def test_reward_and_delta_values():
    q = torch.tensor([[0.1, 0.9, 0.0], [0.7, 0.2, 0.1]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, 1])
    out = BrainProp(epsilon=0.0)(q, y)
    assert out.actions.tolist() == [1, 0]
    assert out.rewards.tolist() == [1.0, 0.0]
    # delta = r - q_s: 1 - 0.9 and 0 - 0.7; loss = mean of delta^2 / 2
    assert out.loss.item() == pytest.approx((0.1**2 + 0.7**2) / 4)
    assert out.explored.tolist() == [False, False]  # one flag per trial, not per class


def test_a_trial_explores_where_its_draw_is_below_epsilon():
    # Keras explores at a draw of at most epsilon; a draw of exactly epsilon is the one place
    # the two differ (docs/reproduce.md), pinned here so that the difference stays known.
    q = torch.tensor([[0.0, 1.0]] * 3)
    explore = torch.tensor([0.25, 0.25, 0.9])
    explore[0] = torch.nextafter(explore[0], torch.tensor(0.0))  # the float32 just below
    uniform = torch.tensor([[0.999, 1e-30]] * 3)  # noise that makes unit 0 win where it applies
    actions, explored = BrainProp(epsilon=0.25).choose(q, explore, uniform)
    assert explored.tolist() == [True, False, False]
    assert actions.tolist() == [0, 1, 1]


def test_exploration_rate_matches_epsilon():
    n, eps = 200_000, 0.1
    q = torch.zeros(n, 4)
    q[:, 2] = 0.5  # a weak argmax: an exploring trial often picks another unit
    out = BrainProp(epsilon=eps)(
        q, torch.zeros(n, dtype=torch.long), torch.Generator().manual_seed(0)
    )
    rate = out.explored.double().mean().item()
    assert abs(rate - eps) < 5 * math.sqrt(eps * (1 - eps) / n)
    # Greedy choices are the argmax.
    assert torch.all(out.actions[~out.explored] == 2)
    # The choices themselves, not only the flag: another unit than the argmax with
    # probability eps * (1 - softmax(q)[2]).
    other = eps * (1 - torch.softmax(q[0], 0)[2].item())
    share = (out.actions != 2).double().mean().item()
    assert abs(share - other) < 5 * math.sqrt(other * (1 - other) / n)


def test_exploratory_choices_follow_the_boltzmann_distribution():
    n = 200_000
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0])
    q = logits.expand(n, 4)
    out = BrainProp(epsilon=1.0)(
        q, torch.zeros(n, dtype=torch.long), torch.Generator().manual_seed(3)
    )
    assert out.explored.all()
    freq = torch.bincount(out.actions, minlength=4).double() / n
    p = torch.softmax(logits.double(), 0)
    sd = torch.sqrt(p * (1 - p) / n)
    assert torch.all((freq - p).abs() < 5 * sd), (freq, p)


def _autograd_brainprop(q, y, generator, epsilon):
    """BrainProp as plain autograd ops, as it was written before its head was fused: the
    fused head must give the same choices, loss and gradient, bit for bit, so that every run
    measured before it is reproduced exactly."""
    q_detached = q.detach().float()
    greedy = q_detached.argmax(dim=1)
    explored = torch.rand(q.shape[0], generator=generator) < epsilon
    uniform = torch.rand(q.shape, generator=generator)
    gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(uniform.dtype).tiny)))
    actions = torch.where(explored, (q_detached + gumbel).argmax(dim=1), greedy)
    rewards = (actions == y).to(q.dtype)
    q_chosen = q.gather(1, actions.unsqueeze(1)).squeeze(1)
    return actions, 0.5 * (rewards - q_chosen).square().mean()


@pytest.mark.parametrize("batch", [128, 96, 7, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_the_heads_own_backward_is_autograd_bit_for_bit(batch, dtype):
    """BrainProp's unfused head (its own autograd Function for the chosen unit's error, four
    operators instead of eight) against plain autograd. The fused head, two Triton kernels
    that run on CUDA only, is tested in tests/test_fusedhead.py. Training passes fp32 outputs;
    a caller of the library may pass others, under autocast."""
    for trial in range(20):
        g = torch.Generator().manual_seed(trial)
        q = (torch.randn(batch, 10, generator=g) * 10 * torch.rand((), generator=g)).to(dtype)
        y = torch.randint(0, 10, (batch,), generator=g)
        # The loop scales a short last batch's loss, which scales the gradient coming back.
        weight = 3 * torch.rand((), generator=g)
        q_fused, q_plain = q.clone().requires_grad_(), q.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = BrainProp(0.5)(q_fused, y, torch.Generator().manual_seed(trial))
            rule = _autograd_brainprop(q_plain, y, torch.Generator().manual_seed(trial), 0.5)
        (out.loss * weight).backward()
        (rule[1] * weight).backward()
        assert torch.equal(out.actions, rule[0]) and torch.equal(out.loss, rule[1])
        assert q_fused.grad.dtype == dtype and torch.equal(q_fused.grad, q_plain.grad)


def test_a_float64_network_chooses_its_own_argmax():
    """Q-values were rounded to float32 first: 1 + 1e-12 tied 1, and the first won (review)."""
    q = torch.tensor([[1.0, 1.0 + 1e-12, 0.0]], dtype=torch.float64)
    assert BrainProp(0.0).select(q)[0].tolist() == [1]
    assert BrainProp(0.0).select(q.float())[0].tolist() == [0]  # the tie fp32 makes of it


def test_selection_is_reproducible_with_a_seeded_generator():
    q = torch.randn(1000, 10)
    a = BrainProp(0.5).select(q, torch.Generator().manual_seed(7))[0]
    b = BrainProp(0.5).select(q, torch.Generator().manual_seed(7))[0]
    assert torch.equal(a, b)


def test_brainprop_step_equals_explicit_attention_gated_update():
    """One SGD step equals delta x pre-synaptic activity x gated feedback, computed by hand."""
    torch.manual_seed(0)
    batch, n_in, n_hid, n_out, lr = 8, 5, 7, 4, 0.3
    w1 = torch.randn(n_hid, n_in, dtype=torch.float64) * 0.5
    w2 = torch.randn(n_out, n_hid, dtype=torch.float64) * 0.5
    x = torch.randn(batch, n_in, dtype=torch.float64)
    y = torch.randint(0, n_out, (batch,))

    def network() -> nn.Sequential:
        net = nn.Sequential(
            nn.Linear(n_in, n_hid, bias=False), nn.ReLU(), nn.Linear(n_hid, n_out, bias=False)
        ).double()
        with torch.no_grad():
            net[0].weight.copy_(w1)
            net[2].weight.copy_(w2)
        return net

    net = network()
    out = BrainProp(epsilon=0.3)(net(x), y, torch.Generator().manual_seed(5))
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    out.loss.backward()
    opt.step()

    # By hand: forward activities, the chosen unit's feedback, gating, three-factor update.
    pre = x @ w1.T
    h = pre.clamp_min(0)
    q = h @ w2.T
    s = out.actions
    delta = out.rewards - q[torch.arange(batch), s]
    d_w2 = torch.zeros_like(w2)
    d_w1 = torch.zeros_like(w1)
    for b in range(batch):
        d_w2[s[b]] += delta[b] * h[b]  # output synapses of the chosen unit
        feedback = w2[s[b]]  # only unit s sends feedback
        gated = feedback * (pre[b] > 0).double()  # the attention tag: f'(activity)
        d_w1 += delta[b] * torch.outer(gated, x[b])  # delta x gated feedback x pre
    torch.testing.assert_close(
        net[2].weight.detach(), w2 + lr * d_w2 / batch, rtol=1e-12, atol=1e-14
    )
    torch.testing.assert_close(
        net[0].weight.detach(), w1 + lr * d_w1 / batch, rtol=1e-12, atol=1e-14
    )
    # The training loop's step takes the same one, keeping a float64 network's precision.
    stepped = network()
    optimizer = torch.optim.SGD(stepped.parameters(), lr=lr)
    train_step(stepped, BrainProp(epsilon=0.3), optimizer, x, y,
               generator=torch.Generator().manual_seed(5), batch_size=batch)  # fmt: skip
    for a, b in zip(stepped.parameters(), net.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_ebp_is_softmax_cross_entropy():
    q = _q(16, 5)
    y = torch.arange(16) % 5
    out = EBP()(q, y)
    expected = -torch.log_softmax(q.detach(), 1)[torch.arange(16), y].mean()
    assert out.loss.item() == pytest.approx(expected.item())
    assert torch.equal(out.actions, q.detach().argmax(1))
    # Its reward, the training accuracy an epoch's line reports, is that of the argmax; EBP
    # never explores.
    wrong = (out.actions + 1) % 5
    out = EBP()(q, torch.where(torch.arange(16) % 2 == 0, out.actions, wrong))
    assert out.rewards.tolist() == [1.0, 0.0] * 8 and not out.explored.any()


class _Mean:
    sums_over_nominal_batch = False

    def __call__(self, q, y, generator=None):
        return EBP()(q, y)


@pytest.mark.parametrize(
    ("entry", "said"),
    [
        (_Mean(), re.escape("OBJECTIVES['mine'] is an objective itself: register a function that "
                            "makes it, e.g. lambda epsilon, fused: Mine()")),
        (_Mean, re.escape("OBJECTIVES['mine'] cannot be called as (epsilon, fused): register a "
                          "function that makes the objective, e.g. lambda epsilon, fused: Mine()")),
    ],
)  # fmt: skip
def test_an_objective_registered_in_place_of_its_factory_is_named_as_such(monkeypatch, entry, said):
    monkeypatch.setitem(OBJECTIVES, "mine", entry)
    with pytest.raises(BrainPropError, match=f"^{said}$"):
        make_objective("mine")
    monkeypatch.setitem(OBJECTIVES, "mine", lambda epsilon, fused: _Mean())
    assert isinstance(make_objective("mine"), _Mean)
    # A fault inside a factory that takes (epsilon, fused) is its own, not the registration's:
    # one line naming its line (it was a traceback).
    monkeypatch.setitem(OBJECTIVES, "mine", lambda epsilon, fused: _Mean(epsilon))
    line = inspect.currentframe().f_lineno - 1
    with pytest.raises(BrainPropError) as e:
        make_objective("mine")
    assert str(e.value) == (
        "rule 'mine' failed as it was made: TypeError: _Mean() takes no arguments "
        f"({__file__}:{line})"
    )


def test_an_objective_says_what_it_is():
    assert repr(BrainProp()) == "BrainProp(epsilon=0.02)"
    assert repr(BrainProp(epsilon=0.1, fused=True)) == "BrainProp(epsilon=0.1, fused=True)"
    assert repr(EBP()) == "EBP()"


def test_bad_rule_and_epsilon_are_clear_errors():
    with pytest.raises(BrainPropError, match="choose one of brainprop, ebp"):
        make_objective("hebb")
    with pytest.raises(BrainPropError, match=r"epsilon must lie in \[0, 1\]"):
        BrainProp(epsilon=1.5)


def test_an_epochs_running_sums_add_each_steps_loss_times_its_images_rewards_and_explorations():
    """The history's loss, reward and exploration rate come from these sums; fast and eager,
    stacked and single runs share them, so only a count by hand can check them (review)."""
    from brainprop.objectives import Output
    from brainprop.step import tally

    sums, first_bad = torch.zeros(3), torch.tensor(-1)
    steps = [
        (0.5, [1.0, 0.0, 1.0, 1.0], [False, True, False, False]),
        (0.25, [0.0, 1.0], [True, True]),
        (math.nan, [1.0, 1.0], [False, False]),
        (math.inf, [0.0, 0.0], [False, False]),
    ]
    for step, (loss, rewards, explored) in enumerate(steps):
        out = Output(torch.tensor(loss), torch.zeros(len(rewards), dtype=torch.long),
                     torch.tensor(rewards), torch.tensor(explored))  # fmt: skip
        first_bad = tally(sums, first_bad, out, len(rewards), step)
        if step == 1:
            assert sums.tolist() == [0.5 * 4 + 0.25 * 2, 4.0, 3.0]
    assert first_bad.item() == 2  # the first step whose loss was not finite
    # Step 0 is a step too: a loss bad from the start stays marked there.
    bad = Output(torch.tensor(math.nan), torch.zeros(2, dtype=torch.long), torch.zeros(2),
                 torch.zeros(2, dtype=torch.bool))  # fmt: skip
    first_bad = tally(torch.zeros(3), torch.tensor(-1), bad, 2, 0)
    assert tally(torch.zeros(3), first_bad, bad, 2, 1).item() == 0
    # A stack of two: one sum per member, from [G]-shaped losses and [G, B] rewards.
    stack = torch.zeros(3, 2)
    out = Output(torch.tensor([0.5, 2.0]), torch.zeros(2, 3, dtype=torch.long),
                 torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]),
                 torch.tensor([[True, False, False], [True, True, True]]))  # fmt: skip
    tally(stack, torch.tensor([-1, -1]), out, 3, 0)
    assert stack.tolist() == [[1.5, 6.0], [2.0, 1.0], [1.0, 3.0]]


def test_a_subclass_gives_its_own_rewards_which_delta_learns_toward():
    class Punishing(BrainProp):
        def reward(self, actions, y):
            return torch.where(actions == y, 1.0, -1.0)

    q = torch.tensor([[0.2, 0.9, 0.1], [0.5, 0.3, 0.4]], requires_grad=True)
    y = torch.tensor([1, 2])
    out = Punishing(epsilon=0.0)(q, y)
    assert out.actions.tolist() == [1, 0] and out.rewards.tolist() == [1.0, -1.0]
    out.loss.backward()
    # d/dq_s of 1/2 mean((r - q_s)^2) is -(r - q_s) / B at each row's chosen unit alone.
    expected = torch.zeros(2, 3)
    expected[0, 1], expected[1, 0] = -(1.0 - 0.9) / 2, -(-1.0 - 0.5) / 2
    assert torch.allclose(q.grad, expected)
    plain = BrainProp(epsilon=0.0)(q.detach(), y)
    assert plain.rewards.tolist() == [1.0, 0.0]


@pytest.mark.parametrize("rule", [BrainProp(), EBP()], ids=repr)
@pytest.mark.parametrize(
    ("q_shape", "y", "fix"),
    [
        ((8, 10, 1, 1), torch.zeros(8, dtype=torch.long), "flatten the network's output"),
        ((8, 10), torch.zeros(7, dtype=torch.long), "pass one label per row of Q-values"),
        ((8, 10), torch.zeros(8), "pass the labels as class indices, an (integer|int64) tensor"),
    ],
)
def test_q_values_or_labels_a_head_cannot_take_are_one_line(rule, q_shape, y, fix):
    """From one's own training loop, which ``train``'s checks do not cover: a forgotten flatten
    was a shape error out of ``gather``, float labels earned no reward (a helper's walkthrough)."""
    said = rf"^{type(rule).__name__} takes Q-values \[B, K\] and (integer|int64) labels \[B\], "
    with pytest.raises(BrainPropError, match=said + rf"got Q-values \[{q_shape[0]}, 10.*: {fix}"):
        rule(torch.zeros(q_shape, requires_grad=True), y)


def test_ebp_takes_int64_labels_alone_where_brainprop_takes_any_integers():
    """cross_entropy refuses int32 targets in its own words (a review)."""
    q, y = torch.zeros(4, 3, requires_grad=True), torch.zeros(4, dtype=torch.int32)
    with pytest.raises(BrainPropError, match=r"^EBP takes .+ int64 labels .+: pass the labels as"):
        EBP()(q, y)
    assert BrainProp(epsilon=0.0)(q, y).rewards.tolist() == [1.0] * 4


def test_a_subclass_reward_of_another_shape_is_one_line_and_one_for_all_is_every_rows():
    class Column(BrainProp):
        def reward(self, actions, y):
            return (actions == y).float().unsqueeze(1)  # [B, 1]: delta would broadcast to [B, B]

    class Batch(BrainProp):
        def reward(self, actions, y):
            return (actions == y).float().mean()  # one for all, which trained before the check

    class Flat(BrainProp):
        def choose(self, q, explore, uniform):
            return q.argmax().unsqueeze(0), torch.zeros(q.shape[0], dtype=torch.bool)

    q, y = torch.zeros(4, 3, requires_grad=True), torch.tensor([0, 0, 1, 2])
    said = r"^Column\.reward gave rewards \[4, 1\] for a batch of 4: give one reward per row"
    with pytest.raises(BrainPropError, match=said):
        Column(epsilon=0.0)(q, y)
    with pytest.raises(BrainPropError, match=r"^Flat\.choose gave actions \[1\] for a batch of 4"):
        Flat(epsilon=0.0)(q, y)
    assert Batch(epsilon=0.0)(q, y).rewards.tolist() == [0.5] * 4

    class Number(BrainProp):
        def reward(self, actions, y):
            return 0.5

    class HostTensor(BrainProp):
        def reward(self, actions, y):
            return torch.tensor(0.5)  # on the CPU whatever the Q-values' device (a review)

    assert Number(epsilon=0.0)(q, y).rewards.tolist() == [0.5] * 4
    on_meta = HostTensor(epsilon=0.0)(q.to("meta"), y.to("meta"))
    assert on_meta.rewards.device.type == "meta" and on_meta.rewards.shape == (4,)
