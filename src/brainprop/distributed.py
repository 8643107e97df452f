"""Data-parallel training over ``torch.distributed``, as launched by ``torchrun``.

``torchrun`` starts one process per device and tells each its place through the environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). :func:`joined`
reads it and joins the process group: gloo for CPU tensors and, where CUDA is present, NCCL
for CUDA tensors, with a bounded timeout (``BRAINPROP_DIST_TIMEOUT`` seconds, default 300) so
that a rank that died or hung makes the others fail with one line instead of waiting forever.
Without those variables, or with a world of one process, nothing is joined and every method
below is the identity: a run of one process is the plain single-process run, bit for bit.

The semantics, for a world of ``W`` processes and a global batch ``G`` (``--global-batch``, else
the per-process ``--batch-size`` times ``W``):

* Every rank draws each epoch's permutation from an *order* generator seeded identically on all
  ranks (and takes rank 0's, which differs only on mixed GPU models), splits it into global
  batches of ``G`` exactly as one process with batch ``G`` would, and trains on its own
  contiguous share of each (``tensor_split``: shares differ by at most
  one image, and a short last batch may leave a rank with none).
* Gradients are *summed* by one explicit all-reduce after ``backward``, each rank having
  weighted its loss by its share of the global loss: BrainProp's loss sums over the batch and
  divides by the nominal batch (the published Keras loss), so the weight is
  ``n_rank / G``; EBP's is a mean over the actual batch, so the weight is ``n_rank / n_batch``.
  The sum is then exactly the gradient one process computes on the whole global batch,
  short last batch included. DDP would divide by ``W`` whatever the shares are, which is
  wrong for a short last batch split unevenly and undefined for a rank with no images;
  it also renames every state-dict key (``module.``) that checkpoints and ``load_model`` use.
  The price is that communication does not overlap the backward pass.
* BrainProp's exploration and dropout draw from per-rank streams seeded from ``(seed, rank)``,
  so no two ranks explore alike, and the same seed and world size give the same run.
* BatchNorm normalises with the whole global batch's statistics (:mod:`brainprop.syncbn`),
  unless the run asks for each rank's own (``sync_batchnorm=False``, as DDP without
  SyncBatchNorm). Either way the running statistics of rank 0 are the model's: they are
  broadcast before every evaluation and checkpoint.
* Evaluation is sharded: each rank scores its part of the images and the counts are summed.
* Rank 0 alone writes files. Decisions that end or redirect the loop (a stop signal on any
  rank, a NaN, early stopping) are agreed through collectives, so every rank takes the same
  branch and none is left waiting in a collective the others never enter.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import importlib
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable

from . import rng
from .data.batches import to_float
from .devices import resolve_device
from .errors import BrainPropError
from .objectives import Objective, Output
from .signals import StopRequest
from .syncbn import synchronised

ENV_TIMEOUT = "BRAINPROP_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0

T = TypeVar("T")


class Context:
    """This process's place in the world, and the collectives the training loop needs.

    The default instance is a world of one process, whose methods change nothing.
    """

    def __init__(
        self, rank: int = 0, world_size: int = 1, local_rank: int = 0,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:  # fmt: skip
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.timeout_s = timeout_s
        # Images in the global batch being trained on; set by batches(), read by loss_weight().
        self._batch_images = 0
        self._global_batch = 0
        # Which parameters had gradients at this rank's last step with images, per group.
        self._used: dict[tuple[torch.dtype, torch.device], list[bool]] = {}

    @property
    def active(self) -> bool:
        """Whether there are other processes to talk to."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0

    # -- placement ------------------------------------------------------------------------

    def device(self, requested: str) -> torch.device:
        """The device this rank trains on, for a ``--device`` value.

        Under several processes ``auto`` and ``cuda`` mean ``cuda:LOCAL_RANK``, one GPU each.
        """
        if not self.active:
            return resolve_device(requested)
        if requested == "auto":
            requested = "cuda" if torch.cuda.is_available() else "cpu"
        if requested.startswith("cuda:"):
            raise BrainPropError(
                f"--device {requested} would put all {self.world_size} processes on one GPU: "
                "pass --device cuda (or auto) and each process takes GPU number LOCAL_RANK"
            )
        if requested == "cuda":
            if self.local_rank >= torch.cuda.device_count():
                raise BrainPropError(
                    f"process {self.rank} has LOCAL_RANK {self.local_rank} but this node has "
                    f"{torch.cuda.device_count()} GPUs: start at most that many processes per "
                    "node (--nproc_per_node), or pass --device cpu"
                )
            return torch.device("cuda", self.local_rank)
        return torch.device(requested)

    def seed(self, seed: int) -> int:
        """The seed of this rank's own random streams (exploration, dropout).

        One process keeps ``seed`` itself, so that it is the plain run. Several derive
        independent, well-mixed seeds from ``(seed, rank)`` with numpy's SeedSequence.
        """
        if not self.active:
            return seed
        # 32 bits: numpy's legacy global seed, which the loop also seeds, takes no more.
        return int(np.random.SeedSequence([seed % 2**63, self.rank]).generate_state(1)[0])

    def global_batch(self, batch_size: int, global_batch: int | None) -> int:
        """Images per optimizer step over all ranks: ``global_batch``, else ``batch_size`` per
        rank; raises for a global batch that does not split evenly over the ranks."""
        if global_batch is None:
            return batch_size * self.world_size
        if global_batch % self.world_size:
            raise BrainPropError(
                f"--global-batch {global_batch} does not split evenly over {self.world_size} "
                f"processes: pass a multiple of {self.world_size}, or start "
                "--nproc_per_node/--nnodes so that the world size divides it"
            )
        return global_batch

    # -- the step -------------------------------------------------------------------------

    def agreed_order(self, perm: torch.Tensor) -> torch.Tensor:
        """Rank 0's epoch order ``perm``, on every rank (in place).

        Every rank drew ``perm`` from the same seed, but a GPU's random numbers depend on its
        kernels' launch grid, which follows its number of SMs: ranks on different GPU models
        would draw different orders and train on overlapping shares.
        """
        if self.active:
            with self._collective("agreeing on the epoch's order"):
                dist.broadcast(perm, 0)
        return perm

    def batches(
        self, x: torch.Tensor, y: torch.Tensor, perm: torch.Tensor, global_batch: int,
        start: int = 0,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
        """This rank's share (images [b, C, H, W] in [0, 1], labels [b]) of each global batch
        of ``perm``, from global batch number ``start`` on. ``b`` may be 0 on a short last
        batch: pass that step to :meth:`idle_step`."""
        self._global_batch = global_batch
        for idx in perm.split(global_batch)[start:]:
            self._batch_images = len(idx)
            mine = idx.tensor_split(self.world_size)[self.rank]
            yield to_float(x[mine]), y[mine]

    def loss_weight(self, objective: Objective, images: int) -> float:
        """What this rank's mean loss over ``images`` images is multiplied by, so that the
        sum over ranks of the weighted losses is the loss of the whole global batch."""
        if objective.sums_over_nominal_batch:
            return images / self._global_batch
        return images / self._batch_images

    def reduce_gradients(self, model: nn.Module) -> None:
        """Sum every parameter's gradient over the ranks, in one all-reduce per dtype/device.

        A parameter without a gradient (unused by the forward pass) contributes zeros and
        keeps no gradient afterwards, so it is neither stepped nor decayed, as in one process.
        Which parameters are used is read on the host, not from the reduced values, so a step
        never waits for the device: an idle rank, which used none, takes the set its last step
        with images used (the models here use the same parameters whatever the batch).
        """
        if not self.active:
            return
        groups: dict[tuple[torch.dtype, torch.device], list[nn.Parameter]] = {}
        for p in model.parameters():
            if p.requires_grad:
                groups.setdefault((p.dtype, p.device), []).append(p)
        for key, members in groups.items():
            used = [p.grad is not None for p in members]
            if any(used):
                self._used[key] = used
            else:
                used = self._used.get(key, [True] * len(members))
            flat = torch.cat(
                [_flat(p.grad if p.grad is not None else torch.zeros_like(p), p) for p in members]
            )
            with self._collective("the gradient all-reduce"):
                dist.all_reduce(flat)
            grads = flat.split([p.numel() for p in members])
            for p, g, keep in zip(members, grads, used, strict=True):
                p.grad = _shaped_like(g, p) if keep else None

    def idle_step(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
        y: torch.Tensor,
    ) -> Output:  # fmt: skip
        """The step of a rank whose share ``x``, ``y`` of a short last batch is empty: it joins
        the gradient sum and applies the same update as the others.

        It needs no forward pass, unless layers of the model talk to the other ranks in theirs
        (synchronised BatchNorm): then the empty batch goes forward and backward, so that this
        rank enters the same collectives as the others, with zero gradients.
        """
        optimizer.zero_grad(set_to_none=True)
        if synchronised(model):
            model(x).sum().backward()
        self.reduce_gradients(model)
        optimizer.step()
        none = y[:0]
        return Output(
            loss=torch.zeros((), device=y.device),
            actions=none,
            rewards=none.float(),
            explored=none.bool(),
        )

    # -- agreement ------------------------------------------------------------------------

    def summed(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """``t`` summed over the ranks, as a step autograd can go back through: the gradient
        reaching each rank's ``t`` is the sum of all ranks' gradients of the result, since
        every rank's loss depends on every rank's ``t``. ``what`` names it in errors."""
        if not self.active:
            return t
        return _SumOverRanks.apply(t, self, what)

    def sum(self, values: list[torch.Tensor]) -> list[torch.Tensor]:
        """Scalar tensors summed over the ranks (in float64: they are per-epoch counts)."""
        if not self.active:
            return values
        flat = torch.stack([v.detach().double().reshape(()) for v in values])
        with self._collective("summing the epoch's totals"):
            dist.all_reduce(flat)
        return [f.to(v.dtype) for f, v in zip(flat, values, strict=True)]

    def settle(
        self, model: nn.Module, sums: list[torch.Tensor], first_bad: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Before an epoch's end or a mid-epoch checkpoint: the running sums over all ranks,
        the earliest non-finite step of any rank, and rank 0's buffers on every rank, so that
        each rank checks and records the same model and numbers."""
        self.broadcast_buffers(model)
        return self.sum(sums), self.first_bad(first_bad)

    def shares(self, sums: list[torch.Tensor]) -> dict[str, Any]:
        """Mid-epoch checkpoint entries holding every rank's own running sums (a collective),
        so that a resume on as many processes continues each rank's float sums exactly."""
        if not self.active:
            return {}
        return {"rank_sums": self.gather(torch.stack([s.detach() for s in sums]).cpu())}

    def own_share(self, partial: dict[str, Any], totals: list[torch.Tensor]) -> list[torch.Tensor]:
        """This rank's part of a mid-epoch checkpoint's running sums (``totals`` are all
        ranks' together): its own from :meth:`shares` when the world size is the same, else
        all of them on rank 0 and zero elsewhere, so the epoch's final sum counts them once."""
        if not self.active:
            return totals
        mine = partial.get("rank_sums")
        if isinstance(mine, list) and len(mine) == self.world_size:
            return [v.to(t) for v, t in zip(mine[self.rank].unbind(), totals, strict=True)]
        if self.is_main:
            return totals
        return [torch.zeros_like(t) for t in totals]

    def first_bad(self, first_bad: torch.Tensor) -> torch.Tensor:
        """The earliest step (0-based, -1 for none) at which any rank's loss was not finite."""
        if not self.active:
            return first_bad
        none = torch.iinfo(torch.int64).max
        value = torch.where(first_bad < 0, torch.full_like(first_bad, none), first_bad)
        with self._collective("agreeing on a NaN"):
            dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return torch.where(value == none, torch.full_like(value, -1), value)

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm's running statistics), as DDP does."""
        if not self.active:
            return
        with self._collective("broadcasting BatchNorm statistics"):
            for b in model.buffers():
                dist.broadcast(b, 0)

    def decide(self, value: bool) -> bool:
        """Rank 0's ``value`` on every rank."""
        if not self.active:
            return value
        flag = torch.tensor([int(value)])
        with self._collective("agreeing whether to stop"):
            dist.broadcast(flag, 0)
        return bool(flag.item())

    def evaluation_share(self, images: int) -> slice:
        """This rank's contiguous part of ``images`` images to score: ``tensor_split``'s, but
        over fewer ranks where that would leave a rank one image. A BatchNorm without running
        statistics normalises with the batch's in evaluation too, which one value per channel
        cannot give; one process folds such a batch into the one before, a rank cannot."""
        ranks = min(self.world_size, max(1, images // 2))
        if self.rank >= ranks:
            return slice(0, 0)
        sizes = [len(part) for part in torch.arange(images).tensor_split(ranks)]
        start = sum(sizes[: self.rank])
        return slice(start, start + sizes[self.rank])

    def accuracy(
        self, score: Callable[[torch.Tensor, torch.Tensor], float], x: torch.Tensor,
        y: torch.Tensor,
    ) -> float:  # fmt: skip
        """``score(x, y)`` (a fraction correct) over all of ``x``, each rank scoring its part."""
        if not self.active:
            return score(x, y)
        mine = self.evaluation_share(len(y))
        xs, ys = x[mine], y[mine]
        correct = torch.tensor([round(score(xs, ys) * len(ys)) if len(ys) else 0])
        with self._collective("summing the evaluation"):
            dist.all_reduce(correct)
        return int(correct.item()) / max(len(y), 1)

    def on_main(self, work: Callable[[], T]) -> T:
        """Run ``work`` on rank 0 only and return its result on every rank.

        A :class:`BrainPropError` there (a damaged checkpoint, a full disk) is raised on every
        rank with the same line, so none waits for a rank that has given up.
        """
        if not self.active:
            return work()
        box: list[Any] = [None]
        failure: BaseException | None = None
        if self.is_main:
            try:
                box[0] = ("ok", work())
            except BrainPropError as e:
                box[0], failure = ("error", str(e)), e
            except BaseException as e:
                box[0], failure = ("crash", f"{type(e).__name__}: {e}"), e
        with self._collective("receiving rank 0's result"):
            dist.broadcast_object_list(box, 0)
        if failure is not None:
            raise failure
        kind, value = box[0]
        if kind == "error":
            raise BrainPropError(value)
        if kind == "crash":
            raise BrainPropError(f"rank 0 failed ({value}); see its output above")
        return value

    def on_every(self, work: Callable[[], T], what: str) -> T:
        """Run ``work`` on every rank and return each its own result, once all have it.

        A rank that fails (a GPU its node lacks for its ``LOCAL_RANK``) fails every rank before
        any goes on (rank 0 would otherwise make the run directory and leave it behind): each
        failed rank with its own error, the others with the first failed rank's line. ``what``
        names the work in errors.
        """
        if not self.active:
            return work()
        result: Any = None
        line, failure = None, None
        try:
            result = work()
        except BrainPropError as e:
            line, failure = str(e), e
        except BaseException as e:
            line, failure = f"process {self.rank} failed ({type(e).__name__}: {e})", e
        every: list[Any] = [None] * self.world_size
        with self._collective(what):
            dist.all_gather_object(every, line)
        if failure is not None:
            raise failure
        if (first := next((other for other in every if other is not None), None)) is not None:
            raise BrainPropError(first)
        return result

    def check_alike(self, facts: dict[str, Any]) -> None:
        """Refuse, on every rank in the same line, ranks whose ``facts`` (settings, a digest of
        their data) differ from rank 0's: each would train another run, or wait for the others
        in a collective that never comes."""
        if not self.active:
            return
        every: list[Any] = [None] * self.world_size
        with self._collective("comparing the ranks' settings and data"):
            dist.all_gather_object(every, facts)
        first = every[0]
        ranks = [r for r, other in enumerate(every) if other != first]
        if ranks:
            keys = sorted({k for r in ranks for k in first.keys() | every[r].keys()
                           if every[r].get(k) != first.get(k)})  # fmt: skip
            raise BrainPropError(
                f"rank{'s' * (len(ranks) > 1)} {', '.join(map(str, ranks))} differ"
                f"{'s' * (len(ranks) == 1)} from rank 0 in {', '.join(keys)}: start every "
                "process with the same command, data and brainprop version"
            )

    def gather(self, value: T) -> list[T] | None:
        """Every rank's ``value`` in rank order, on rank 0; None elsewhere."""
        if not self.active:
            return [value]
        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        with self._collective("gathering the ranks' checkpoint entries"):
            dist.gather_object(value, out, 0)
        return out

    # -- checkpoints ----------------------------------------------------------------------

    def streams(self, generator: torch.Generator, order: torch.Generator) -> dict[str, Any]:
        """Checkpoint entries for the random streams of every rank (a collective: call it on
        all ranks). One process adds nothing: its checkpoint is the plain run's."""
        if not self.active:
            return {}
        return {
            "world_size": self.world_size,
            "order_generator": order.get_state(),
            "ranks": self.gather(rng.capture(generator)),
        }

    def restore_streams(
        self, state: dict[str, Any], generator: torch.Generator, order: torch.Generator,
        seed: int,
    ) -> None:  # fmt: skip
        """Set this rank's random streams from a checkpoint that the plain restore has already
        applied (its ``rng`` entry is rank 0's).

        With the world size it was written by, each rank takes back its own streams and the
        run continues bit-identically. Otherwise the order continues from the checkpoint's
        order stream and each rank starts a fresh exploration stream seeded from
        ``(seed, rank, world size, position)``, as the line :meth:`adapt_resume` returns says.
        """
        saved = state.get("world_size", 1)
        if not self.active:
            if saved > 1:
                generator.set_state(state["order_generator"])
            return
        order.set_state(state["order_generator"] if saved > 1 else state["rng"]["generator"])
        if saved == self.world_size:
            mine = state["ranks"][self.rank]
            # Checkpoints of earlier versions kept each rank's torch streams only.
            whole = isinstance(mine, dict) and "numpy" in mine
            (rng.restore if whole else rng.restore_torch)(mine, generator)
            return
        step = (state.get("partial") or {}).get("step", 0)
        fresh = np.random.SeedSequence(
            [seed % 2**63, self.rank, self.world_size, int(state["epoch"]), int(step)]
        ).generate_state(1, np.uint64)[0]
        # numpy's and python's too, which the plain restore set to rank 0's on every rank.
        rng.seed_all(int(fresh))
        generator.manual_seed(int(fresh))

    def adapt_resume(
        self, state: dict[str, Any], batch_size: int, global_batch: int | None
    ) -> str | None:
        """Fit a checkpoint written by another world size to this one; the line to print.

        The run continues, but it is no longer the run it was: the global batch changes unless
        ``--global-batch`` fixed it, the per-rank exploration streams are new, and a position
        inside an epoch moves to the next whole global batch of the new size (skipping fewer
        than one global batch of that epoch's images). None when the world size is the same.
        """
        saved = state.get("world_size", 1)
        if not isinstance(saved, int) or saved < 1:
            raise ValueError("its world size is malformed")
        if saved == self.world_size:
            return None
        old = global_batch if global_batch is not None else batch_size * saved
        new = self.global_batch(batch_size, global_batch)
        skipped = ""
        partial = state.get("partial")
        if isinstance(partial, dict) and isinstance(partial.get("step"), int) and old != new:
            done = partial["step"] * old
            partial["step"] = -(-done // new)
            if partial["step"] * new != done:
                skipped = (
                    f", and the interrupted epoch goes on from image {partial['step'] * new} "
                    f"instead of {done}"
                )
        batch = (
            f"the global batch stays {new}"
            if old == new
            else (
                f"the global batch changes from {old} to {new} (a run started with "
                "--global-batch keeps it on any number of processes)"
            )
        )
        return (
            f"warning: resuming a run of {saved} process(es) on {self.world_size}: {batch}, "
            f"each process explores with a new random stream{skipped}; the continuation is "
            f"deterministic but not the run {saved} process(es) would have made"
        )

    @contextlib.contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        try:
            yield
        except (RuntimeError, ValueError) as e:
            raise LostOthers(
                f"process {self.rank} of {self.world_size} lost the others during {what} "
                f"({_one_line(e)}): another process died or stalled for over {self.timeout_s:g}s "
                f"(${ENV_TIMEOUT})"
            ) from None


class LostOthers(BrainPropError):
    """A collective that failed because another process died or stalled; ``what`` says so.

    The message adds the generic way on; training, which knows its run directory and whether
    it holds a checkpoint yet, says instead which command continues it.
    """

    def __init__(self, what: str) -> None:
        super().__init__(
            f"{what}; start the command again, or where the run has a checkpoint continue it "
            "with 'torchrun ... brainprop train --resume RUN_DIR'"
        )
        self.what = what


class _SumOverRanks(torch.autograd.Function):
    """The all-reduce behind :meth:`Context.summed`; its backward pass is one too.

    ``torch.distributed.nn.functional.all_reduce`` is the same but deprecated (torch 2.13)
    for a private module, and it would not turn a lost rank into our one-line error.
    """

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, context: Context, what: str) -> torch.Tensor:
        ctx.context, ctx.what = context, what
        total = t.clone(memory_format=torch.contiguous_format)
        with context._collective(what):
            dist.all_reduce(total)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        total = grad.clone(memory_format=torch.contiguous_format)
        with ctx.context._collective(f"the backward pass through {ctx.what}"):
            dist.all_reduce(total)
        return total, None, None


def _channels_last(t: torch.Tensor) -> bool:
    return (
        t.dim() == 4
        and not t.is_contiguous()
        and t.is_contiguous(memory_format=torch.channels_last)
    )


# The fast path keeps convolution weights (and so their gradients) channels-last. Flattening
# in that memory order copies nothing before the all-reduce's one concatenation, and the
# summed gradients come back in the parameters' own layout, which SGD's multi-tensor update
# needs to stay on its fast path.
def _flat(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` (shaped as ``like``) as one vector, in the memory order of ``like``'s layout."""
    if _channels_last(like):
        return t.permute(0, 2, 3, 1).reshape(-1)
    return t.reshape(-1)


def _shaped_like(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_flat`: a view of ``flat`` with ``like``'s shape and layout."""
    if _channels_last(like):
        n, c, h, w = like.shape
        return flat.view(n, h, w, c).permute(0, 3, 1, 2)
    return flat.view_as(like)


class AgreedStop(StopRequest):
    """A stop request that every rank sees at the same read.

    The signal handler sets the local request at any moment, so two ranks reading their own
    flags after the same step can disagree, and the one that stops leaves the other blocked in
    the next all-reduce. Each read here is a collective returning the request of any rank
    (SIGTERM over SIGINT when both); the loop reads it at the same points on every rank.
    Once raised it stays raised without further collectives, on every rank alike.
    """

    def __init__(self, local: StopRequest, context: Context) -> None:
        super().__init__()
        self.local, self.context = local, context

    @property
    def requested(self) -> bool:
        if self.signum is None:
            if not self.context.active:
                self.signum = self.local.signum
            else:
                flag = torch.tensor([self.local.signum or 0])
                with self.context._collective("agreeing on a stop signal"):
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                self.signum = int(flag.item()) or None
        return self.signum is not None


_CURRENT = Context()


def current() -> Context:
    """The context :func:`joined` set up; a world of one process outside it."""
    return _CURRENT


def launched_main() -> bool:
    """Whether this process is rank 0 of its torchrun job (or not under torchrun at all)."""
    return os.environ.get("RANK", "0") == "0"


def _leave() -> None:
    """Leave the group :func:`joined` created, unless its user already has."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _one_line(e: BaseException) -> str:
    """A collective's error, whatever its line breaks, cut to fit in one line of ours: gloo and
    NCCL spread the cause over several lines, so the first alone may not hold it."""
    return " ".join(str(e).split())[:200]


def _unset(name: str) -> BrainPropError:
    return BrainPropError(
        f"${name} is not set: start several processes with torchrun, which sets it"
    )


def refuse_launched(what: str, fix: str) -> None:
    """One line for ``what`` (work of one process) started under torchrun, where each rank
    would do all of it, into the same folders; ``fix`` says what to do instead."""
    if current().active or launched_world() > 1:
        raise BrainPropError(f"{what} runs in one process: {fix}")


def launched_world() -> int:
    """How many processes torchrun started this one among (``$WORLD_SIZE``; 1 without it)."""
    return _env_int("WORLD_SIZE", 1)


def _env_int(name: str, default: int | None = None) -> int:
    text = os.environ.get(name)
    if text is None:
        if default is None:
            raise _unset(name)
        return default
    try:
        return int(text)
    except ValueError:
        raise BrainPropError(
            f"${name} is {text!r}, not a whole number: launch with torchrun"
        ) from None


def _timeout() -> float:
    text = os.environ.get(ENV_TIMEOUT)
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    # timedelta holds at most about 8.6e13 s and infinity not at all; 1e9 s is 32 years.
    if not 0 < value < 1e9:
        raise BrainPropError(
            f"${ENV_TIMEOUT} is {text!r}: give a positive number of seconds below 1e9"
        )
    return value


@contextlib.contextmanager
def joined() -> Iterator[Context]:
    """Join torchrun's process group (once per process) and yield the context for the block.

    The group outlives the block, until the process exits: a second ``train()`` in the same
    processes reuses it, where leaving and re-joining would race the ranks against rank 0's
    rendezvous store on the same port. A group someone else initialised with torchrun's
    variables set (a test harness) is used as it is; the ranks are always those variables':
    processes joined without them (``mp.spawn`` with a ``tcp://`` address) each train alone.
    """
    global _CURRENT
    world = launched_world()
    if world <= 1:
        yield _CURRENT
        return
    rank = _env_int("RANK")
    if not 0 <= rank < world:
        raise BrainPropError(f"$RANK is {rank} but $WORLD_SIZE is {world}: launch with torchrun")
    context = Context(rank, world, _env_int("LOCAL_RANK", rank), _timeout())
    if not dist.is_initialized():
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise _unset(name)
        cuda = torch.cuda.is_available() and dist.is_nccl_available()
        if cuda and context.local_rank < torch.cuda.device_count():
            # NCCL binds each communicator to the current device when it first talks.
            torch.cuda.set_device(context.local_rank)
        # torch._dynamo, imported lazily by the first torch.optim optimizer, keeps references
        # to a process group that already exists (torch 2.11 and 2.13), so destroy_process_group
        # could not free ours: gloo's worker threads then outlive Python, and under torch 2.11
        # one of them aborts the finished process now and then (SIGABRT). Imported before the
        # group exists, it holds none.
        importlib.import_module("torch._dynamo")

        try:
            dist.init_process_group(
                backend="cpu:gloo,cuda:nccl" if cuda else "gloo",
                rank=rank,
                world_size=world,
                timeout=datetime.timedelta(seconds=context.timeout_s),
            )
        except (RuntimeError, ValueError) as e:
            raise BrainPropError(
                f"process {rank} could not join the other {world - 1} at "
                f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within "
                f"{context.timeout_s:g}s ({_one_line(e)}): check that every node was started with "
                "the same --rdzv-endpoint and that the port is open"
            ) from None
        atexit.register(_leave)
    previous, _CURRENT = _CURRENT, context
    try:
        yield context
    finally:
        _CURRENT = previous
