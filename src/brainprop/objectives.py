"""Learning rules as output objectives: BrainProp and error-backpropagation (EBP).

Both take the network's linear outputs ``q`` ([B, K]) and integer labels ``y`` ([B]) and
return an :class:`Output`. ``loss.backward()`` then delivers each rule's weight update through
whichever feedback pathway the layers use, so the rule lives entirely in the loss.

BrainProp (Pozzi, Bohte & Roelfsema, NeurIPS 2020): the network *chooses* one class s (the
argmax with probability 1 - epsilon, else a sample from softmax(q)), receives reward
r = [s == y], and the reward-prediction error delta = r - q_s is the only error it sees. The
loss 1/2 (r - q_s)^2 on the chosen unit alone has gradient -delta at unit s and zero elsewhere,
so backpropagating it sends exactly the attention-gated feedback of the paper: only the chosen
unit's feedback travels down, gated at each layer by the units' activity derivative.

A new rule is an :class:`Objective` registered by name in :data:`OBJECTIVES`.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import fusedhead, rng
from .devices import ran_out_of_memory
from .errors import BrainPropError, defined_in, definition, kind_of, not_taking, raised
from .registry import Registry

#: The published exploration rate: the chance that BrainProp samples its action from
#: softmax(q) instead of taking the argmax.
DEFAULT_EPSILON = 0.02


@dataclass(frozen=True)
class Output:
    """What one objective call produces.

    Attributes:
        loss: scalar to call ``backward()`` on, averaged over the batch.
        actions: [B] int64, the class the network chose (EBP: its argmax).
        rewards: [B] float, 1.0 where the chosen class was right, else 0.0 (the built-in
            rules'; one's own may give others): their mean is the history's ``train_reward``.
        explored: [B] bool, True where the choice was an exploratory sample, not the argmax.
    """

    loss: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    explored: torch.Tensor


#: The CUDA devices this process has said cannot build the fused head (_tell_missing).
_TOLD_MISSING: set[torch.device] = set()


class BrainProp:
    """Reward-based, attention-gated objective.

    Args:
        epsilon: probability of exploring, i.e. of sampling the action from softmax(q)
            instead of taking the argmax. 0 makes the choice greedy.
        fused: on CUDA, compute the head with :mod:`brainprop.fusedhead`'s two kernels
            instead of 22 PyTorch operators, where it can (fp32 outputs, Triton installed):
            the same choices, rewards and gradient, bit for bit. The first batch on each device
            checks that; where they differ, or the kernels fail to build (Triton missing or
            broken included), a one-line warning says so and the unfused head runs. A subclass
            always runs the unfused head, which calls its methods (:meth:`draw`, :meth:`choose`,
            :meth:`reward`): the kernels compute this class's.

    Selection stays on the device and never reads a value back to the host (but for the fused
    head's one check on each device's first batch), so a training step runs without
    synchronisation and can be captured whole.
    """

    # The published Keras loss sums 1/2 (r - q_s)^2 over the batch and divides by the *nominal*
    # batch size, so a short last batch takes a proportionally smaller step. The training loop
    # reproduces that by scaling this objective's (mean) loss (see batch_scale).
    sums_over_nominal_batch = True

    def __init__(self, epsilon: float = DEFAULT_EPSILON, fused: bool = False) -> None:
        if not 0.0 <= epsilon <= 1.0:
            raise BrainPropError(
                f"epsilon must lie in [0, 1], got {epsilon}: pass e.g. --epsilon 0.02"
            )
        self.epsilon, self.fused = epsilon, fused
        # Per device: whether the fused head agreed with the unfused one there.
        self._fused_agrees: dict[torch.device, bool] = {}

    def draw(
        self, q: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        """The uniform draws that decide the choice for ``q`` ([B, K]): which rows explore
        ([B], those below epsilon) and the Gumbel noise of those that do ([B, K]); none when
        epsilon is 0."""
        if self.epsilon == 0.0:
            return None, None
        explore = torch.rand(q.shape[0], device=q.device, generator=generator)
        return explore, torch.rand(q.shape, device=q.device, generator=generator)

    def select(
        self, q: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose one action per row of ``q`` ([B, K]), as training does; returns (actions [B],
        explored [B])."""
        return self.choose(q, *self.draw(q, generator))

    def choose(
        self, q: torch.Tensor, explore: torch.Tensor | None, uniform: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The actions [B] and whether each explored [B] for ``q`` ([B, K]) given
        :meth:`draw`'s draws: the exploration policy, which a subclass may change."""
        # bf16 and fp16 choose in fp32, as the Gumbel noise needs; fp64 keeps its own, whose
        # argmax rounding to fp32 could change (and EBP's, taken in fp64, then differ).
        q = q.detach() if q.dtype == torch.float64 else q.detach().float()
        if explore is None or uniform is None:
            return q.argmax(dim=1), torch.zeros(q.shape[0], dtype=torch.bool, device=q.device)
        explored = explore < self.epsilon
        # Gumbel-max draws from softmax(q) with one uniform per class and no host sync
        # (torch.multinomial would also do, but it syncs on CUDA to validate its input).
        # q plus Gumbel noise -log(-log(u)), subtracted rather than negated and added, and one
        # argmax over the rows that explore (noisy) and those that do not (plain q): each saves
        # an operator, i.e. a kernel on a GPU, and gives the same choices.
        noisy = q - torch.log(-torch.log(uniform.clamp_min(torch.finfo(uniform.dtype).tiny)))
        return torch.where(explored.unsqueeze(1), noisy, q).argmax(dim=1), explored

    def reward(self, actions: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The reward of each chosen class of ``actions`` ([B]) against the labels ``y``
        ([B]): 1 where it is right, else 0, as in the paper; a subclass may give others (-1
        for a wrong choice, say), which δ = r - q_s then learns toward."""
        return (actions == y).float()

    def __call__(
        self, q: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> Output:
        """Choose an action per row of ``q`` ([B, K]), reward it against ``y`` ([B]) and return
        the :class:`Output` whose loss, 1/2 mean((r - q_s)^2), trains the chosen units alone;
        ``generator`` draws the exploration. Labels must lie in [0, K): checking their values
        would wait for the device at every step (``train`` checks its dataset's once)."""
        check_head_inputs(type(self).__name__, q, y)
        draws = self.draw(q, generator)
        if self._runs_fused(q, y, draws):
            loss, actions, explored, rewards = fusedhead.chosen_unit_head(
                q, y, self.epsilon, *draws
            )
            return Output(loss=loss, actions=actions, rewards=rewards, explored=explored)
        return self._unfused(q, y, draws)

    def _unfused(
        self, q: torch.Tensor, y: torch.Tensor, draws: tuple[torch.Tensor | None, ...]
    ) -> Output:
        actions, explored = self.choose(q, *draws)
        if actions.shape != y.shape:
            raise BrainPropError(
                f"{type(self).__name__}.choose gave actions {list(actions.shape)} for a batch of "
                f"{len(y)}: give one action per row, shaped [B]"
            )
        # A subclass's one reward for the whole batch may be a number, or a CPU tensor beside
        # a GPU's Q-values: it is every row's.
        rewards = torch.as_tensor(self.reward(actions, y), dtype=q.dtype, device=q.device)
        # [B, 1] rewards would broadcast δ to [B, B] and fail in the backward.
        try:
            rewards = rewards.expand(y.shape)
        except RuntimeError:
            raise BrainPropError(
                f"{type(self).__name__}.reward gave rewards {list(rewards.shape)} for a batch of "
                f"{len(y)}: give one reward per row, shaped [B] (or one for all)"
            ) from None
        loss = _ChosenUnitError.apply(q, actions, rewards)
        return Output(loss=loss, actions=actions, rewards=rewards, explored=explored)

    def fused_on(self, device: torch.device) -> bool | None:
        """Whether the head runs fused on ``device``: None until a batch there has been checked
        (or where the kernels cannot run), then the check's verdict; False unless ``fused``,
        and for a subclass."""
        return self._fused_agrees.get(device) if self._fusable else False

    @property
    def _fusable(self) -> bool:
        return self.fused and type(self) is BrainProp

    def _runs_fused(
        self, q: torch.Tensor, y: torch.Tensor, draws: tuple[torch.Tensor | None, ...]
    ) -> bool:
        if not self._fusable:
            return False
        if fusedhead.unsupported(q) is not None:
            if fusedhead.unavailable(q.device) is None:
                # The kernels run here, but not on these outputs (fp64, say), as on none of the
                # run's: fastpath.features, which lists the head until its check fails, drops it.
                self._fused_agrees[q.device] = False
            self._tell_missing(q.device)
            return False
        agrees = self._fused_agrees.get(q.device)
        if agrees is None:
            # The check reads results back to the host, which a CUDA graph's capture forbids,
            # and differentiates, which inference mode forbids: the unfused head serves until
            # a batch can be checked.
            capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
            if capturing or torch.is_inference_mode_enabled():
                return False
            agrees = self._fused_agrees[q.device] = self._check_fused(q, y, draws)
        return agrees

    def _tell_missing(self, device: torch.device) -> None:
        """Warn where a CUDA device cannot build the kernels (Triton missing or broken): a run
        there would otherwise be slower than its fused head promises, unexplained. Once per
        process and device, as what it lacks is the process's: not again for each run of a
        ``reproduce``, or each objective an ``--on-nan reload`` makes."""
        if device in _TOLD_MISSING or (why := fusedhead.missing(device)) is None:
            return
        _TOLD_MISSING.add(device)
        print(
            f"brainprop: warning: the fused BrainProp head cannot run on {device}: {why}; the "
            "unfused head runs instead, which gives the same updates in more kernels",
            file=sys.stderr,
        )

    def _check_fused(
        self, q: torch.Tensor, y: torch.Tensor, draws: tuple[torch.Tensor | None, ...]
    ) -> bool:
        """Whether the fused head gives this device the unfused head's results, with a warning
        if not (see :func:`brainprop.fusedhead.disagreement`)."""
        problem = fusedhead.disagreement(q, y, self.epsilon, draws, _unfused_head)
        if problem:
            print(
                f"brainprop: warning: the fused BrainProp head {problem} on {q.device}; training "
                "uses the unfused head, which gives the same updates in more kernels",
                file=sys.stderr,
            )
        return not problem

    def __repr__(self) -> str:
        fused = ", fused=True" if self.fused else ""
        return f"BrainProp(epsilon={self.epsilon}{fused})"


def _unfused_head(
    q: torch.Tensor,
    y: torch.Tensor,
    epsilon: float,
    explore: torch.Tensor | None,
    uniform: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """BrainProp's head on PyTorch operators, as :func:`brainprop.fusedhead.chosen_unit_head`
    takes and gives it: the reference its kernels are checked against."""
    out = BrainProp(epsilon)._unfused(q, y, (explore, uniform))
    return out.loss, out.actions, out.explored, out.rewards


class _ChosenUnitError(torch.autograd.Function):
    """``1/2 mean((r - q_s)^2)`` over the batch, where ``q_s`` is each row's chosen output.

    The gradient is autograd's, bit for bit (``tests/test_objectives.py`` compares them), in
    four operators instead of eight: with the whole step in one CUDA graph a small network's
    step is bound by its kernels' count, and this head is BrainProp's extra cost over EBP.
    autograd computes ``-(fl(fl(g * 0.5) / B) * 2d)``; as halving and doubling are exact in
    floating point, that is ``fl(g / -B) * d``, except where they are not: subnormal and
    overflowing values, which training does not reach.
    """

    @staticmethod
    def forward(
        ctx: Any, q: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor
    ) -> torch.Tensor:
        error = rewards - q.gather(1, actions.unsqueeze(1)).squeeze(1)
        ctx.save_for_backward(actions, error)
        ctx.q_shape, ctx.q_dtype = q.shape, q.dtype
        return 0.5 * error.square().mean()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        actions, error = ctx.saved_tensors
        # In the loss's precision (autocast squares a bf16 error in fp32), as autograd's chain
        # computes it, then in q's, as autograd's cast back gives it.
        chosen = (error.to(grad.dtype) * (grad / -error.numel())).to(ctx.q_dtype)
        q_grad = grad.new_zeros(ctx.q_shape, dtype=ctx.q_dtype).scatter_add_(
            1, actions.unsqueeze(1), chosen.unsqueeze(1)
        )
        return q_grad, None, None


def check_head_inputs(rule: str, q: torch.Tensor, y: torch.Tensor, *, int64: bool = False) -> None:
    """One line for Q-values and labels of shapes or kinds ``rule``'s head cannot take, as
    one's own training loop may pass them: a forgotten flatten gave a shape error out of
    ``gather``, and float labels no reward at all. ``int64``: the head takes no other integers
    (cross-entropy's)."""
    kind = "int64" if int64 else "integer"
    integers = (
        y.dtype == torch.int64
        if int64
        else not (y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool)
    )
    if q.dim() != 2:
        fix = "flatten the network's output to one row of K Q-values per image (nn.Flatten())"
    elif y.shape != q.shape[:1]:
        fix = "pass one label per row of Q-values"
    elif not integers:
        fix = f"pass the labels as class indices, an {kind} tensor (y.long())"
    else:
        return
    raise BrainPropError(
        f"{rule} takes Q-values [B, K] and {kind} labels [B], got Q-values {list(q.shape)} and "
        f"labels {list(y.shape)} {str(y.dtype).removeprefix('torch.')}: {fix}"
    )


class EBP:
    """Error-backpropagation baseline: softmax + cross-entropy over all outputs."""

    sums_over_nominal_batch = False

    def __call__(
        self, q: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> Output:
        """Softmax cross-entropy of ``q`` ([B, K]) against ``y`` ([B]), averaged; the actions
        are the argmax (no exploration), ``generator`` unused."""
        check_head_inputs(type(self).__name__, q, y, int64=True)
        loss = F.cross_entropy(q, y)
        actions = q.detach().argmax(dim=1)
        rewards = (actions == y).to(q.dtype)
        return Output(
            loss=loss, actions=actions, rewards=rewards, explored=torch.zeros_like(y, dtype=bool)
        )

    def __repr__(self) -> str:
        return "EBP()"


class Objective(Protocol):
    """What training asks of a learning rule: turn Q-values ``q`` [B, K] and labels ``y`` [B]
    into an :class:`Output` whose ``loss``, a mean over the batch, is differentiable with
    respect to ``q``, drawing what it draws from ``generator`` (each run's own stream, so that
    a resume draws the same). ``sums_over_nominal_batch`` says whether a short last batch's
    mean loss is scaled by its share of the nominal batch (:func:`batch_scale`).

    An objective must keep no state from call to call: a checkpoint would not save it, and
    the members of a stack of seeds (:mod:`brainprop.stacked`) share one objective."""

    sums_over_nominal_batch: bool

    def __call__(
        self, q: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> Output: ...


def _factory_problem(factory: object) -> str | None:
    # What it makes is checked when a run makes it (make_objective): calling it here would run
    # the user's code at registration.
    if callable(factory):
        return None
    return (
        f"must be a function of (epsilon, fused) that makes the objective, not {kind_of(factory)}"
    )


def rule_name_problem(name: str) -> str | None:
    """What is wrong with ``name`` as a rule's, beyond a registry's common rule, or None."""
    # A run of the matrix is named <dataset>-<arch>-<rule>-s<seed>[-<preset>...]
    # (brainprop.matrix.RunSpec.name): a rule with a seed-like part would give two runs one
    # name ('x-s1' seed 0 and 'x' seed 1 under a preset 's0'), and one would be skipped as done.
    # Either case: on a disk that ignores it, 'x-S1' names the folder of 'x-s1'.
    seeds = [p for p in name.split("-") if re.fullmatch(r"s\d+", p, re.IGNORECASE)]
    if seeds:
        return f"its part {seeds[0]!r} reads as the seed of a run's name (-s<N>)"
    return None


#: The learning rules by name, each a function of (epsilon, fused) that makes its objective.
#: A new rule is one entry, e.g. ``OBJECTIVES["mine"] = lambda epsilon, fused: Mine()``; then
#: ``TrainConfig(rule="mine")`` trains with it, as does the command given its module with
#: ``brainprop --plugin`` (:mod:`brainprop.plugins`).
OBJECTIVES: Registry[Callable[[float, bool], Objective]] = Registry(
    "OBJECTIVES",
    "rule",
    {"brainprop": BrainProp, "ebp": lambda epsilon, fused: EBP()},
    check=_factory_problem,
    name_check=rule_name_problem,
)

#: The most labels :func:`check_rule` tries a rule on: a batch of one row per label grows as
#: their square.
CHECKED_LABELS = 256

#: The paper's two rules, in the order its comparisons put them.
RULES = ("brainprop", "ebp")


def batch_scale(objective: Objective, n: int, batch_size: int) -> float:
    """What ``objective``'s mean loss over a batch of ``n`` is multiplied by: ``n / batch_size``
    for one that sums over the nominal ``batch_size`` (BrainProp, as the Keras loss), so that a
    short last batch takes a proportionally smaller step; 1 for a mean (EBP)."""
    return n / batch_size if objective.sums_over_nominal_batch else 1.0


def make_objective(rule: str, epsilon: float = DEFAULT_EPSILON, fused: bool = False) -> Objective:
    """Build the objective :data:`OBJECTIVES` names ``rule``; ``fused``: BrainProp's head in
    fused kernels where it can (see :class:`BrainProp`)."""
    OBJECTIVES.require(rule)
    factory = OBJECTIVES[rule]
    if hasattr(factory, "sums_over_nominal_batch") and not isinstance(factory, type):
        raise BrainPropError(
            f"OBJECTIVES[{rule!r}] is an objective itself: register a function that makes it, "
            "e.g. lambda epsilon, fused: Mine()"
        )
    if not callable(factory) or not_taking(factory, epsilon, fused) is not None:
        raise BrainPropError(
            f"OBJECTIVES[{rule!r}] cannot be called as (epsilon, fused): register a function "
            "that makes the objective, e.g. lambda epsilon, fused: Mine()"
        )
    try:
        objective = factory(epsilon, fused)
    except Exception as e:
        # The machine's limit, which the caller words; the library's bug, which keeps its
        # traceback.
        if isinstance(e, BrainPropError) or ran_out_of_memory(e) or rule in OBJECTIVES.builtin:
            raise
        raise BrainPropError(
            f"rule {rule!r} failed as it was made: {raised(e, defined_in(factory), factory)}"
        ) from e
    # A registered rule is the user's code: what it made is checked here, in one line, rather
    # than failing as an AttributeError in the middle of the first step.
    flag = getattr(objective, "sums_over_nominal_batch", None)
    if not isinstance(flag, bool) or not callable(objective) or isinstance(objective, type):
        made = (
            f"the class {objective.__name__}" if isinstance(objective, type) else kind_of(objective)
        )
        raise BrainPropError(
            f"rule {rule!r} made {made}, which is no Objective: make an instance "
            "with a boolean sums_over_nominal_batch and a __call__(q, y, generator) that "
            "returns an Output (see brainprop.Objective)"
        )
    return objective


def check_rule(rule: str, objective: Objective, classes: int, device: torch.device) -> None:
    """Try ``objective``, a rule of one's own made for this alone, on a made-up batch before a
    run starts: labels from the first of the ``classes`` to the last (each, up to
    :data:`CHECKED_LABELS`), random Q-values on ``device``, a backward pass through its loss.
    Its draws come from a generator of its own and the global streams are put back after it,
    so that the run draws what it would have drawn without it.

    A rule that raises there, or returns what training cannot take, is one ``BrainPropError``
    line naming the line that raised, or where the rule is defined, before any run directory
    is made; it would otherwise end the first step in a traceback. An error that only some
    later batch brings is worded, as one line too, by :mod:`brainprop.owncode` as it stops the
    run.
    """
    rows = min(classes, CHECKED_LABELS)
    with rng.global_streams_kept(device):
        generator = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(rows, classes, device=device, generator=generator, requires_grad=True)
        y = torch.linspace(0, classes - 1, rows, device=device).round().long()
        try:
            out = objective(q, y, generator)
            problem = _output_problem(out, rows)
            if problem is None:
                out.loss.backward()
        except Exception as e:
            if ran_out_of_memory(e):
                raise  # the machine's limit, which the caller words, not the rule's fault
            raise BrainPropError(
                f"rule {rule!r} failed on a test batch of {rows} Q-values and labels: "
                f"{raised(e, defined_in(objective), objective)}"
            ) from e
    if problem is not None:
        where = definition(objective)
        raise BrainPropError(
            f"rule {rule!r}{f' ({where})' if where else ''} returned {problem}: return an "
            "Output of a scalar loss with a gradient, and [B] int64 actions, float rewards and "
            "bool explored (see brainprop.Output)"
        )


def _output_problem(out: object, batch: int) -> str | None:
    """What is wrong with ``out`` as a training step takes an :class:`Output` of ``batch``
    examples, or None."""
    if not isinstance(out, Output):
        return f"{kind_of(out)}, not a brainprop.Output"
    loss = out.loss
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
        shape = list(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        return f"a loss of {shape}, not a float scalar (a mean over the batch)"
    if not loss.requires_grad:
        return "a loss without a gradient to the Q-values"
    kinds = {
        "actions": (out.actions, lambda t: t.dtype == torch.int64, "int64"),
        "rewards": (out.rewards, torch.Tensor.is_floating_point, "float"),
        "explored": (out.explored, lambda t: t.dtype == torch.bool, "bool"),
    }
    for field, (value, right, kind) in kinds.items():
        if not isinstance(value, torch.Tensor) or value.shape != (batch,) or not right(value):
            got = (
                f"{list(value.shape)} {value.dtype}"
                if isinstance(value, torch.Tensor)
                else type(value).__name__
            )
            return f"{field} {got}, not [{batch}] {kind}"
    return None
