"""Seeds side by side: several runs of one configuration trained as one stacked network.

One seed of a paper network is a small load for a large GPU: each of a step's hundreds of
kernels leaves most of the chip idle. :func:`train_stacked` trains G seeds at once. Their
weights are stacked into tensors ``[G, ...]``, and one step, ``torch.vmap`` over
:func:`torch.func.functional_call`, runs every member's forward and backward pass through the
network in the same kernels, each G times larger; the epoch's evaluation scores every member
in one pass too. The objective (each member draws its exploration from its own generator) and
the update still run per member and per stacked tensor. Whether that beats G runs in sequence
depends on the device and the network: ``brainprop bench --stack G`` measures it side by side.

Each member stays an ordinary run, with its own :class:`~brainprop.train.Trainer` (model,
generator, history, early stopping), run directory, checkpoints and summary. Its module's
parameters and buffers are views of its slice of the stacked tensors, so it evaluates,
checkpoints and resumes like a run of its own; ``brainprop train --resume`` continues a
member alone. A member leaves the stack when it stops (early stopping, its epoch cap, a NaN),
and the others are restacked; the last one left trains as a run of its own.

What differs from G separate runs: the dropout masks (vmap draws them for all members at once
from the global stream, so a member's masks depend on its place in the stack and on the seeds
beside it; the same stack repeats them) and floating-point rounding (batched kernels). Each
member's shuffle order and BrainProp's exploration come from the member's own generator, as
in a run of its own. Without dropout a member thus follows its seed alone to rounding in
``dense``; in the networks with BatchNorm (conv, loccon, deep) those layers amplify that
rounding within tens of steps on real data (as :mod:`brainprop.fastpath` says of its layout,
which on a CPU differs too: a stack runs channels-first), so a stacked seed of those is
another run of that seed, not the same one.

Limits: one process (no torchrun); symmetric feedback (the other pathways are autograd
Functions without a vmap rule); a network of one's own that vmap can run (no Python branch
on a tensor's value); a stop signal is honoured at the end of the epoch.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, stack_module_state
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from tqdm.auto import tqdm

from . import distributed, fastpath, memory, owncode, plugins, rng, rundir, signals
from .config import VAL_TEST, TrainConfig
from .data import Dataset, given_dataset, load_dataset
from .data.batches import num_batches, ordered_batches, permuted_batches
from .devices import autocast, resolve_device, warn_if_slow_bf16
from .errors import BrainPropError, kind_of
from .evaluation import EVAL_BATCH
from .objectives import Objective, Output, batch_scale
from .presets import decayed_parameters
from .provenance import check_loadable, check_same_data
from .resume import RESUME_REMEDY, checkpoint_and_config, data_record, reopen, restore
from .step import decay_groups, objective_input, tally
from .summary import EARLY_STOPPING, summarize
from .train import (
    NonFinite,
    Run,
    Scores,
    Trainer,
    create_run,
    data_label,
    done_line,
    end_epoch,
    facts,
    gave_up,
    machine_facts,
    printer,
    ready_to_continue,
    rewind,
    save_last,
    write_results,
)

__all__ = ["Stack", "StackedSGD", "train_stacked"]

#: Config fields in which the members of one stack may differ. Where the runs are written, and
#: the data folder they name, do not change how they train (the first member's data is loaded).
MEMBER_FIELDS = ("seed", "name", "epochs", "out_dir", "data_dir")


class StackedSGD(torch.optim.Optimizer):
    """Plain SGD, without momentum, on stacked parameters ``[G, ...]``, each member at its own
    learning rate.

    ``rates`` ([G], on the parameters' device) holds the members' rates. It is changed in place
    between steps, so a step captured in a CUDA graph reads the new rates without a new
    capture; each group's ``lr`` stays 1 and multiplies them. ``weight_decay`` (of the
    ``decayed`` parameters) adds ``weight_decay * w`` to the gradient, as
    :class:`torch.optim.SGD` does.
    """

    def __init__(
        self, decayed: list[torch.Tensor], rest: list[torch.Tensor], weight_decay: float,
        rates: torch.Tensor,
    ) -> None:  # fmt: skip
        super().__init__(
            decay_groups(decayed, rest, weight_decay), {"lr": 1.0, "weight_decay": 0.0}
        )
        self.rates = rates

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            decay, rates = group["weight_decay"], group["lr"] * self.rates
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad if decay == 0 else p.grad.add(p, alpha=decay)
                p.sub_(d * rates.view(-1, *(1,) * (p.dim() - 1)))


class Stack:
    """The members' weights as stacked tensors, and one training step for all of them.

    Building a stack copies the members' parameters and buffers into tensors ``[G, ...]`` and
    makes each member's own tensors views of its slice; :meth:`release` gives them their own
    storage back. The members must be built alike (one config but for the seed) on one device.

    Args:
        models: the members' networks, in training mode.
        generators: each member's own random stream (BrainProp's exploration), on the device.
        objective: the rule, shared by all members.
        weight_decay: SGD weight decay (Keras's ``2 * l2``) of the decayed weights.
        batch_size: the nominal batch (BrainProp scales a short last batch's step by it).
        bf16: run the forward pass under bf16 autocast.
        cuda_graph: replay full-batch steps from one CUDA graph
            (:class:`~brainprop.fastpath.GraphedStep`).
    """

    def __init__(
        self,
        models: Sequence[nn.Module],
        generators: Sequence[torch.Generator],
        objective: Objective,
        *,
        weight_decay: float,
        batch_size: int,
        bf16: bool = False,
        cuda_graph: bool = False,
    ) -> None:
        self.models, self.generators = list(models), list(generators)
        self.objective, self.batch_size, self.bf16 = objective, batch_size, bf16
        # Stacking makes every tensor contiguous; release gives each its layout back (a
        # channels-last weight, say), or a member left alone would round as its run does not.
        self._strides = [[t.stride() for t in _tensors(m)] for m in self.models]
        # A structure-only copy: functional_call supplies every tensor, so it holds none. Made
        # before the members become views, or it would copy the whole stack first.
        self.base = copy.deepcopy(self.models[0]).to("meta").train()
        for module in self.base.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.forward = _without_cudnn(module.forward)
        params, self.buffers = stack_module_state(self.models)
        # Each weight's own requires_grad: a frozen one gets no gradient, so no step, as alone.
        self.params = {k: v.detach().requires_grad_(v.requires_grad) for k, v in params.items()}
        for g, model in enumerate(self.models):
            for name, t in [*model.named_parameters(), *model.named_buffers()]:
                stacked = self.params[name] if name in self.params else self.buffers[name]
                t.data = stacked.detach()[g]
        decayed_ids = {id(p) for p in decayed_parameters(self.models[0])[0]}
        names = dict(self.models[0].named_parameters())
        decayed = [self.params[n] for n, p in names.items() if id(p) in decayed_ids]
        rest = [self.params[n] for n, p in names.items() if id(p) not in decayed_ids]
        self.rates = torch.zeros(len(self.models), device=self.generators[0].device)
        self.optimizer = StackedSGD(decayed, rest, weight_decay, self.rates)
        self._forward = torch.vmap(self._member_forward, randomness="different")
        self.step: Callable[[torch.Tensor, torch.Tensor], Output] = self.plain_step
        if cuda_graph:
            self.step = fastpath.graphed(
                self.plain_step, self.optimizer, self.models[0], self.generators,
                batch_size=batch_size,
            )  # fmt: skip

    def _member_forward(
        self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor
    ) -> torch.Tensor:
        return functional_call(self.base, (params, buffers), (x,))

    def plain_step(self, x: torch.Tensor, y: torch.Tensor) -> Output:
        """One SGD step of every member on its own batch: ``x`` [G, b, C, H, W] float, ``y``
        [G, b]. Returns the members' outputs stacked: ``loss`` [G] (each the unscaled batch
        mean), ``actions``, ``rewards`` and ``explored`` [G, b]."""
        with _vmapped_autocast(x.device, self.bf16):
            q = self._forward(self.params, self.buffers, x)
        q = objective_input(q)
        outs = [self.objective(q[g], y[g], gen) for g, gen in enumerate(self.generators)]
        loss = torch.stack([o.loss for o in outs])
        total = loss.sum()
        if (scale := batch_scale(self.objective, y.shape[1], self.batch_size)) != 1:
            total = total * scale
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        return Output(
            loss=loss,
            actions=torch.stack([o.actions for o in outs]),
            rewards=torch.stack([o.rewards for o in outs]),
            explored=torch.stack([o.explored for o in outs]),
        )

    @torch.inference_mode()
    def accuracies(self, x: torch.Tensor, y: torch.Tensor) -> list[float]:
        """Each member's fraction of ``x`` (uint8 [N, C, H, W]) whose argmax output equals
        ``y`` ([N]), all members in one vmapped pass per batch."""
        forward = torch.vmap(self._member_forward, in_dims=(0, 0, None))
        correct = torch.zeros(len(self.models), dtype=torch.int64, device=x.device)
        # G members at EVAL_BATCH // G images each hold the activations of one run's batch.
        batch = max(1, EVAL_BATCH // len(self.models))
        self.base.eval()
        try:
            with _vmapped_autocast(x.device, self.bf16):
                for xb, yb in ordered_batches(x, y, batch):
                    q = forward(self.params, self.buffers, xb)
                    correct += (q.argmax(dim=-1) == yb).sum(dim=-1)
        finally:
            self.base.train()
        # Divided in Python, as a run of its own divides, so that early stopping compares the
        # same floats.
        return [c / max(len(y), 1) for c in correct.tolist()]

    def holds(self, models: Sequence[nn.Module]) -> bool:
        """Whether the stack's members are exactly ``models``, in this order."""
        return len(models) == len(self.models) and all(
            a is b for a, b in zip(models, self.models, strict=True)
        )

    def release(self) -> None:
        """Give every member its own copy of its weights; the stack is unusable afterwards."""
        for model, strides in zip(self.models, self._strides, strict=True):
            for t, stride in zip(_tensors(model), strides, strict=True):
                own = torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device)
                t.data = own.copy_(t.data)
        self.models, self.params, self.buffers = [], {}, {}
        # The step (and a CUDA graph's) and the vmapped forward refer back to this stack: a
        # cycle that would keep the stacked weights, gradients and the graph's memory pool
        # until Python's cycle collector happened to run.
        del self.step, self._forward, self.optimizer


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


@dataclass
class _Member:
    """One run of a stack: its trainer and run directory, for a run cut short in an epoch the
    random streams its checkpoint saved, which that epoch's end alone draws from, and for a
    finished run the machine facts of the sessions that trained it (train.machine_facts)."""

    trainer: Trainer
    run_path: Path
    streams: dict[str, Any] | None = None
    trained_on: dict[str, Any] | None = None

    def tagged(self, line: str) -> str:
        """``line`` marked as this seed's, for the output the stack's seeds share."""
        return f"seed {self.trainer.config.seed}: {line}"


#: What vmap runs outside autocast that the library's networks call (torch 2.13; it casts
#: ``F.linear``, ``matmul`` and ``bmm``, not ``addmm``, ``baddbmm``, ``F.prelu`` or the other
#: norms, which a stacked network of one's own then computes in fp32).
_CONVOLUTIONS = frozenset({
    F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
})  # fmt: skip
_BATCH_NORM = F.batch_norm


class _ConvolutionsInBF16(TorchFunctionMode):
    """Autocast's cast of a convolution's floating-point inputs to bf16, which ``torch.vmap``
    skips: under bf16 autocast a vmapped ``F.conv2d`` computes in fp32, so a stack's
    convolutions ran in fp32 where its members' runs alone ran them in bf16 (their weights 3 to
    12% apart after 2 epochs, and no bf16 speed). At the level of torch functions, so that a
    network of one's own that calls ``F.conv2d`` itself is cast too.

    BatchNorm then gets bf16 activations, which alone it normalises in fp32 against its fp32
    weights and returns in bf16; vmap's rule for it refuses the two types ("expected scalar
    type BFloat16 but found Float"), so it is given the activations in fp32 and its output
    is rounded back: what it computes alone, up to rounding (one bf16 step on a few
    elements), which the BatchNorm layers of ``deep`` amplify one after the other.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func in _CONVOLUTIONS:
            args = tuple(map(_bf16, args))
            kwargs = {k: _bf16(v) for k, v in kwargs.items()}
        elif func is _BATCH_NORM and args and args[0].dtype == torch.bfloat16:
            return func(args[0].float(), *args[1:], **kwargs).to(torch.bfloat16)
        return func(*args, **kwargs)


def _bf16(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(torch.bfloat16)
    return value


def _vmapped_autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """:func:`~brainprop.devices.autocast` for a vmapped pass: its convolutions too."""
    stack = contextlib.ExitStack()
    stack.enter_context(autocast(device, bf16))
    if bf16:
        stack.enter_context(_ConvolutionsInBF16())
    return stack


def _without_cudnn(forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """``forward`` (a BatchNorm layer's) with cuDNN's BatchNorm turned off while it runs.

    In fp32 on CUDA, cuDNN's BatchNorm asks its input for its memory format, which a vmapped
    tensor cannot answer ("NYI: querying is_contiguous inside of vmap", seen on an H200 with
    torch 2.11). PyTorch's own BatchNorm kernel has a vmap rule. Under bf16 too a stack's
    BatchNorm gets fp32 activations (:class:`_ConvolutionsInBF16`). The convolutions keep
    cuDNN: only BatchNorm reads the flag here (``F.batch_norm`` passes it on). Not
    ``torch.backends.cudnn.flags(enabled=False)``: meanwhile that puts every other setting it
    knows back to its default (benchmark, deterministic, TF32, and the fp32 precision of all
    CUDA operators), where this changes the one flag.
    """

    def wrapped(x: torch.Tensor) -> torch.Tensor:
        enabled = torch.backends.cudnn.enabled
        torch.backends.cudnn.enabled = False
        try:
            return forward(x)
        finally:
            torch.backends.cudnn.enabled = enabled

    return wrapped


def train_stacked(
    members: Iterable[TrainConfig | str | os.PathLike[str]],
    *,
    dataset: Dataset | None = None,
    progress: bool = True,
    tag: str | None = None,
) -> list[Run]:
    """Train several seeds of one configuration side by side (see the module's docstring).

    Args:
        members: each a config to start (as ``train(config)`` would) or a run directory to
            continue (as ``train(resume=...)`` would). The configs may differ only in
            :data:`MEMBER_FIELDS`: the seed, the name, the epoch cap and where they are kept.
        dataset: use this dataset instead of loading the configs' (data of one's own, tests,
            notebooks); as with ``train``, members that continue a run on data of one's own
            need it passed again.
        progress: a progress bar per epoch and one line per member and epoch.
        tag: put ``"<tag>: "`` before every line and show no progress bar: for stacks that
            share a terminal (``reproduce --jobs``), whose bars would overwrite one another.

    Returns:
        The members' runs, in the order given.

    Raises:
        BrainPropError: configs that cannot share a stack, or what ``train`` would raise.
        Interrupted: a stop signal arrived; every member saved its state at the end of the
            epoch, and a call with their run directories continues them. A signal in the
            epoch that ended the last members raises it too, once their runs are complete.
    """
    distributed.refuse_launched(
        "a stack of seeds", "start it without torchrun, or train the seeds one by one under it"
    )
    whole = (
        "train_stacked takes a list of members, each a TrainConfig or a run directory, "
        f"not {kind_of(members)}"
    )
    if isinstance(members, TrainConfig | str | os.PathLike):
        # A string would be taken for a list of one-letter folders.
        raise BrainPropError(f"{whole} alone: pass [it], or train it alone with train()")
    try:
        given = iter(members)
    except TypeError:
        raise BrainPropError(f"{whole}: pass a list of them") from None
    members = list(given)  # a generator would be used up by the first pass over it
    if not members:
        raise BrainPropError("train_stacked needs at least one member")
    fix = "give each member as a TrainConfig or a run directory"
    dirs = [
        rundir.given_path(m, "a member of the stack", fix).resolve()
        for m in members
        if not isinstance(m, TrainConfig)
    ]
    dataset = given_dataset(dataset, "train_stacked")
    if twice := next((d for d in dirs if dirs.count(d) > 1), None):
        raise BrainPropError(
            f"run directory {twice} is given twice: give each member of a stack its own run"
        )
    with contextlib.ExitStack() as held:
        return _train_held(members, dataset, progress, tag, held)


def _train_held(
    members: Sequence[TrainConfig | str | Path],
    dataset: Dataset | None,
    progress: bool,
    tag: str | None,
    held: contextlib.ExitStack,
) -> list[Run]:
    """:func:`train_stacked`, holding every member's run directory in ``held`` as it goes."""
    loaded = [_member_state(m, held) for m in members]
    config = _common_config([c for _, c, _ in loaded])
    records = [
        data_record(run_path, state) if run_path else (None, "") for state, _, run_path in loaded
    ]
    if dataset is None:
        for recorded, where in records:
            check_loadable(recorded, config.dataset, where, STACK_CALL)
    ds = dataset if dataset is not None else load_dataset(config.dataset, config.data_dir)
    # On the device before any member is built, so that the members find it there, not copy it.
    ds = ds.to(resolve_device(config.device))
    say = printer(progress, tag)
    built: list[tuple[Trainer, Path | None, dict[str, Any] | None]] = []
    # Each Trainer seeds, and each restore sets, the global streams that draw the whole stack's
    # dropout masks, so the last member's win. Members of one stack checkpoint the same streams
    # at each epoch's end, so a stack resumed whole goes on as it would have run. A member cut
    # short in an epoch keeps its own, for that epoch's end alone.
    for (state, member_config, run_path), (recorded, where) in zip(loaded, records, strict=True):
        # The held-out split is the same for every seed (split_validation draws it with seed
        # 0), so one copy serves all: a step then gathers every member's batch in one indexing.
        shared = built[0][0] if built else None
        trainer = Trainer(member_config, ds, progress=False, data_of=shared)
        streams = None
        if state is None:
            # A new member, or one killed before its first checkpoint, which starts over on the
            # data it began on.
            check_same_data(recorded, ds, where, RESUME_REMEDY, STACK_CALL, member_config.data_dir)
        else:
            assert run_path is not None
            restore(trainer, state, ds, run_path, call=STACK_CALL)
            ready_to_continue(trainer, run_path, state)
            if trainer.resume_note:
                print(
                    f"brainprop: seed {member_config.seed}: {trainer.resume_note}", file=sys.stderr
                )
            if trainer.partial is not None:
                streams = rng.capture(trainer.generator)
        built.append((trainer, run_path, streams))
    # Only once every member is built and restored: a bad checkpoint leaves no new run behind.
    # The new runs' directories first: one that cannot be made leaves no resumed run marked
    # unfinished.
    stacked = [
        _Member(trainer, run_path or _created(trainer, held), streams)
        for trainer, run_path, streams in built
    ]
    for m, (trainer, run_path, _) in zip(stacked, built, strict=True):
        if run_path is not None:
            reopen(run_path, trainer.config, trainer.stop_reason())
            m.trained_on = machine_facts(trainer, run_path)
    warn_if_slow_bf16(stacked[0].trainer.device, config.bf16)
    say(
        f"training {len(stacked)} seeds of {config.arch} on {data_label(config, ds.name)} with "
        f"{config.rule} stacked on {stacked[0].trainer.device}, run dirs in "
        f"{stacked[0].run_path.parent}"
    )
    runs = _StackedRun(stacked, ds, config, say, bar=progress and tag is None).run()
    return [runs[id(m)] for m in stacked]


#: How a stack's members are given data of one's own again.
STACK_CALL = "train_stacked(runs, dataset=...)"


def _member_state(
    member: TrainConfig | str | Path, held: contextlib.ExitStack
) -> tuple[dict[str, Any] | None, TrainConfig, Path | None]:
    """(checkpoint to restore or None, resolved config, run directory or None: a new run); a
    run directory to continue is held in ``held`` (:func:`brainprop.rundir.claimed`)."""
    if isinstance(member, TrainConfig):
        config = member.resolve()
        rundir.check_new(config.out_dir, config.name)
        return None, config, None
    run_path = Path(member)
    held.enter_context(rundir.claimed(run_path))
    state, config = checkpoint_and_config(run_path, None)
    return state, config, run_path


def _created(trainer: Trainer, held: contextlib.ExitStack) -> Path:
    """A new run directory for ``trainer``, held in ``held``."""
    run_path = create_run(trainer)
    held.enter_context(rundir.claimed(run_path))
    return run_path


def stack_key(config: TrainConfig) -> tuple[Any, ...]:
    """What ``config`` must share with every other config of its stack: all its fields but
    :data:`MEMBER_FIELDS`."""
    return tuple(
        getattr(config, f.name) for f in dataclasses.fields(TrainConfig)
        if f.name not in MEMBER_FIELDS
    )  # fmt: skip


def _common_config(configs: Sequence[TrainConfig]) -> TrainConfig:
    """The first config, once every other has been checked to differ from it only in
    :data:`MEMBER_FIELDS`."""
    first = configs[0]
    for other in configs[1:]:
        for f in dataclasses.fields(TrainConfig):
            if f.name not in MEMBER_FIELDS and getattr(other, f.name) != getattr(first, f.name):
                raise BrainPropError(
                    f"seeds {first.seed} and {other.seed} differ in {f.name} "
                    f"({getattr(first, f.name)!r} and {getattr(other, f.name)!r}), so they "
                    "cannot share a stack: stack only seeds of one configuration"
                )
    seeds = [c.seed for c in configs]
    if len(set(seeds)) != len(seeds):
        raise BrainPropError(f"seeds {seeds} repeat: give each member of a stack its own seed")
    if first.feedback != "symmetric":
        raise BrainPropError(
            f"--feedback {first.feedback} cannot be stacked (its autograd functions do not "
            "batch under vmap): train those seeds one by one"
        )
    return first


class _StackedRun:
    """The epoch loop of one stack; :func:`train_stacked` is its only user."""

    def __init__(
        self, members: list[_Member], ds: Dataset, config: TrainConfig,
        say: Callable[[str], None], *, bar: bool,
    ) -> None:  # fmt: skip
        self.members, self.ds, self.config, self.say = list(members), ds, config, say
        self.show_bar = bar
        self.runs: dict[int, Run] = {}
        self.device = members[0].trainer.device

    def run(self) -> dict[int, Run]:
        def warn(signum: int) -> None:
            self.say(
                signals.first_note(
                    signum, "finishing this epoch, then saving every seed's checkpoint"
                )
            )

        with signals.stop_on_signals(warn) as stop:
            try:
                for m in [m for m in self.members if m.trainer.partial is not None]:
                    self._epoch_alone(m)
                self._leave_finished()
                self._epochs(stop)
            except signals.Interrupted:
                raise  # the first signal's stop, every seed's state saved
            except Exception as e:
                if (failed := self._own_code_failure(e)) is None:
                    raise
                raise owncode.OwnCodeFailed(failed, self._how_to_continue()) from e
            except KeyboardInterrupt:
                # A second signal: whatever write it cut short left the previous file whole.
                kept = [(m.run_path / rundir.LAST).is_file() for m in self.members]
                saved = (
                    "every seed's last.pt is whole" if all(kept)
                    else "each seed's last.pt is whole, and those without one start afresh"
                    if any(kept)
                    else "no seed had reached a checkpoint, so they start afresh"
                )  # fmt: skip
                raise stop.quit_at_once(f"{saved}: {self._how_to_continue()}") from None
            if stop.requested:
                # It came in the epoch that ended the last members: their runs are whole, and
                # a loop of stacks around this one (reproduce --stack) must stop too.
                done = ", ".join(str(run.dir) for run in self.runs.values())
                raise stop.interrupted(
                    f"as the last seeds ended; every seed's run is complete: results in {done}"
                )
        return self.runs

    def _own_code_failure(self, e: Exception) -> str | None:
        """``e`` in one line where the members' own code raised it (:mod:`brainprop.owncode`),
        else None."""
        if not self.members:
            return None  # the last members' ends, the library's code alone
        epochs = sorted({len(m.trainer.history) + 1 for m in self.members})
        first = self.members[0].trainer
        own = owncode.of_run(self.config, first.objective, first.model)
        return owncode.failure(own, e, f"in epoch {'/'.join(map(str, epochs))} of a stack")

    def _epochs(self, stop: signals.StopRequest) -> None:
        """Stacked epochs until every member has stopped. One stack (and, with
        ``--cuda-graph``, one capture) serves as long as the members stay the same; a member
        that stops or is rewound after a NaN means a new stack of the others, and the last
        member left trains as a run of its own."""
        stack: Stack | None = None
        try:
            while self.members:
                if stop.requested:
                    raise self._interrupted(stop)
                models = [m.trainer.model for m in self.members]
                if stack is not None and not stack.holds(models):
                    stack.release()
                    # Released once: a failure to build the next must reach the caller, not a
                    # second release's AttributeError.
                    stack = None
                if len(self.members) == 1:
                    # A stack of one is a run of its own, whose own step draws the dropout
                    # masks that `train --resume` (and reproduce, resuming a lone seed so)
                    # would draw from its checkpoint: vmapped, they would differ.
                    lone = self.members[0]
                    lone.trainer.progress = self.show_bar  # the bar the stack's epochs had
                    self._epoch_alone(lone)
                else:
                    stack = stack or self._stack()
                    self._epoch(stack)
                self._leave_finished()
        finally:
            if stack is not None:
                stack.release()

    def _stack(self) -> Stack:
        config, trainers = self.config, [m.trainer for m in self.members]
        for t in trainers:
            # Its weights become the stack's views: a graph its own step captured (finishing a
            # cut-short epoch) must not be replayed once it trains alone again.
            if isinstance(t.step, fastpath.GraphedStep):
                t.step.forget()
        return Stack(
            [t.model for t in trainers], [t.generator for t in trainers], trainers[0].objective,
            weight_decay=config.weight_decay, batch_size=config.batch_size, bf16=config.bf16,
            cuda_graph=config.cuda_graph,
        )  # fmt: skip

    def _epoch(self, stack: Stack) -> None:
        """One pass of every member over the training set, then each member's epoch end."""
        trainers = [m.trainer for m in self.members]
        assert all(t.partial is None for t in trainers), "a cut-short epoch ends alone"
        stack.rates.copy_(torch.tensor([t.set_lr(len(t.history)) for t in trainers]))
        counted = memory.reset_peak(self.device)
        t0 = time.perf_counter()
        train = trainers[0].train_set
        n, b = len(train.train_y), self.config.batch_size
        perms = torch.stack(
            [torch.randperm(n, device=self.device, generator=t.generator) for t in trainers]
        )
        sums = torch.zeros(3, len(trainers), device=self.device)
        first_bad = torch.full((len(trainers),), -1, dtype=torch.int64, device=self.device)
        epochs = sorted({len(t.history) + 1 for t in trainers})
        bar = tqdm(
            enumerate(permuted_batches(train.train_x, train.train_y, perms, b)),
            total=num_batches(n, b), leave=False,
            desc=f"epoch {'/'.join(map(str, epochs))}, {len(trainers)} seeds",
            disable=not self.show_bar or None, unit="batch",
        )  # fmt: skip
        for step, (x, y) in bar:
            first_bad = tally(sums, first_bad, stack.step(x, y), y.shape[1], step)
        # Read back before the clock stops: on a GPU the epoch's steps are still queued until
        # something waits for them. Divided in Python's float64, as a run of its own divides.
        totals = [[v / n for v in row] for row in sums.tolist()]
        seconds = time.perf_counter() - t0
        scores = self._scores(stack)
        last_step = num_batches(n, b) - 1
        for g, m in enumerate(list(self.members)):
            m.trainer.memory_counted = counted
            try:
                m.trainer.check_finite(len(m.trainer.history), first_bad[g], last_step)
            except NonFinite as bad:
                self._non_finite(m, bad)
                continue
            metrics = {
                "train_loss": totals[0][g],
                "train_reward": totals[1][g],
                "explore_rate": totals[2][g],
                "seconds": seconds,
                "stack_size": len(trainers),
            }
            self._end_epoch(m, metrics, scores[g])

    def _scores(self, stack: Stack) -> list[Scores]:
        """Every member's accuracies, measured together; the seconds are the stack's, as the
        training pass's are."""
        t0 = time.perf_counter()
        first = self.members[0].trainer
        val = stack.accuracies(first.val_x, first.val_y)
        test = (
            val
            if self.config.val == VAL_TEST
            else stack.accuracies(first.train_set.test_x, first.train_set.test_y)
        )
        seconds = time.perf_counter() - t0
        return [Scores(v, t, seconds) for v, t in zip(val, test, strict=True)]

    def _epoch_alone(self, m: _Member) -> None:
        """An epoch of ``m`` outside any stack, as ``train --resume`` would train it: the one
        its run was stopped in, from the random streams it saved, or any epoch of a member
        left alone. The streams of a stack with others are left as they were."""
        t = m.trainer
        try:
            with self._streams_kept():
                if m.streams is not None:
                    rng.restore(m.streams, t.generator)
                m.streams = None
                metrics = t.train_epoch(len(t.history), signals.StopRequest())
        except NonFinite as bad:
            self._non_finite(m, bad)
            return
        assert metrics is not None  # a StopRequest never raised runs the epoch to its end
        self._end_epoch(m, metrics)

    def _end_epoch(
        self, m: _Member, metrics: dict[str, float], scores: Scores | None = None
    ) -> None:
        """A finite epoch's end, as a run of its own has it: evaluate (unless ``scores`` are
        measured), record, checkpoint."""
        if end_epoch(m.trainer, m.run_path, metrics, lambda line: self.say(m.tagged(line)), scores):
            self._finish(m, EARLY_STOPPING)

    def _non_finite(self, m: _Member, bad: NonFinite) -> None:
        """What a run of its own does on a NaN (see ``train``): rewind or stop."""
        t = m.trainer
        if t.may_rewind():
            # The global streams (dropout masks) are the whole stack's: rewinding one member's
            # must not replay the others' masks.
            with self._streams_kept():
                # The rewound trainer keeps the old one's data, which the stack shares.
                m.trainer = rewind(t, self.ds, m.run_path)
                if m.trainer.partial is not None:
                    m.streams = rng.capture(m.trainer.generator)
            self.say(m.tagged(bad.rewound(m.trainer)))
            if m.trainer.partial is not None:
                # Rewound into an epoch (a run directory with no epoch_start.pt, see rewind):
                # finish it alone, as the run would on its own.
                self._epoch_alone(m)
            return
        self.say(m.tagged(gave_up(bad, t.config, m.run_path)))
        self._finish(m, bad.stop_reason())

    def _streams_kept(self) -> contextlib.AbstractContextManager[None]:
        """Keeps the global streams while other members draw from them too; a member alone
        draws from them as a run of its own."""
        if len(self.members) > 1:
            return rng.global_streams_kept(self.device)
        return contextlib.nullcontext()

    def _leave_finished(self) -> None:
        """Let go of members that reached their epoch cap or patience before this epoch."""
        for m in list(self.members):
            if (ended := m.trainer.stop_reason()) is not None:
                self._finish(m, ended)

    def _finish(self, m: _Member, stop_reason: str) -> None:
        t = m.trainer
        summary = summarize(t.history, facts(t, m.trained_on), stop_reason)
        write_results(t, m.run_path, summary)
        if t.history:
            self.say(m.tagged(done_line(summary, m.run_path)))
        self.runs[id(m)] = Run(m.run_path, t.config, t.model, t.history, summary)
        self.members.remove(m)

    def _interrupted(self, stop: signals.StopRequest) -> signals.Interrupted:
        """Checkpoint every member (a NaN rewind since its last epoch changed its state) and
        say how to continue."""
        for m in self.members:
            save_last(m.trainer, m.run_path)
        return stop.interrupted(
            "at the end of an epoch; every seed saved its state in its run directory: "
            f"{self._how_to_continue()}"
        )

    def _how_to_continue(self) -> str:
        dirs = ", ".join(str(m.run_path) for m in self.members)
        return (
            f"train_stacked([{dirs}]) (or the same 'brainprop reproduce' command) continues "
            f"them all, and {plugins.resume_command(Path('DIR'))} one alone"
        )
