"""The fast path: how ``train``, ``evaluate`` and ``bench`` run a network, unless it was trained
with ``--eager``.

Eager is PyTorch exactly as the network was built. The fast path changes how the work is laid
out and launched, not what is computed: without dropout a run's numbers differ from eager only
by floating-point rounding (``tests/test_fastpath.py`` pins this on a small network); with
dropout the two layouts draw different, equally random, masks from the same stream.
``brainprop bench`` times both side by side and reports the ratio.

The rounding is not equally small everywhere: PyTorch's CPU BatchNorm kernel for channels-last
tensors sums a batch's statistics less precisely than its NCHW kernel, and at the published
initialisation BatchNorm's backward cancels most of its input, which magnifies that. So on CPU
a fast run and an eager run of one seed drift apart within a few steps, and compare only as
two runs (``benchmarks/batchnorm_channels_last.py`` measures it; docs/performance.md has the
sizes).

What it does:

* **channels_last** for every network with a 2-D convolution (on by default): its 4-D weights
  are stored channels-last, and PyTorch's convolutions (oneDNN on CPU, cuDNN on CUDA) then
  produce channels-last activations that ReLU, BatchNorm, pooling and dropout keep, so the
  inputs need no conversion. It avoids the layout reorders oneDNN otherwise makes around every
  convolution, and it is the layout tensor cores want. Dense and locally connected networks
  have no 4-D weight and are unchanged. A network of one's own that cannot take the layout
  (a ``view`` that flattens) is refused by :func:`prepare`, naming the line.
* **BrainProp's head in two kernels** on CUDA (:mod:`brainprop.fusedhead`, on by default where
  Triton is installed, as with PyTorch's CUDA wheels for Linux): the choice, reward, error and
  loss in one Triton kernel and the gradient in another: 5 kernels with the draws, where
  PyTorch's operators take 22. The same choices, rewards and gradient bit for bit, checked
  on the first batch.
* **one CUDA graph per training step** (``--cuda-graph``, opt-in, CUDA only):
  :class:`GraphedStep`. A small network's eager step is hundreds of kernel launches, each a
  few microseconds of CPU; replaying a captured graph launches them all at once. On an H200
  it ran the step 2.3 to 9 times as fast as eager and trained CIFAR-10 deep to the published
  accuracy (docs/performance.md). It stays opt-in until its accuracy curve for one seed has
  been compared with ``--eager`` on a GPU (``benchmarks/gpu_check.sh``, step 4).
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Callable, Sequence
from functools import cache, partial
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from . import distributed, fusedhead
from .devices import ran_out_of_memory
from .errors import BrainPropError, reason
from .feedback import layer_mode
from .objectives import BrainProp, Objective, Output
from .step import train_step

__all__ = ["GraphedStep", "features", "graphed", "make_step", "prepare"]

CHANNELS_LAST = "channels_last"
CUDA_GRAPH = "cuda_graph"
FUSED_HEAD = "fused_head"

#: Eager full-batch steps before the capture; CUDA graphs need the lazy initialisations
#: (cuDNN algorithm choice, the allocator's pools, autograd's buffers) done first.
WARMUP_STEPS = 3

Step = Callable[[torch.Tensor, torch.Tensor], Output]


def features(
    model: nn.Module, cuda_graph: bool = False, objective: Objective | None = None
) -> list[str]:
    """The fast-path changes that apply to ``model`` (already on its device) trained with
    ``objective`` (empty: the fast path is eager for it). A fused head is among them until its
    check on the first batch fails."""
    found = []
    if any(p.dim() == 4 for p in model.parameters()):
        found.append(CHANNELS_LAST)
    weight = next(model.parameters(), None)
    if (
        isinstance(objective, BrainProp)
        and weight is not None
        and fusedhead.unavailable(weight.device) is None
        and objective.fused_on(weight.device) is not False
    ):
        found.append(FUSED_HEAD)
    if cuda_graph:
        found.append(CUDA_GRAPH)
    return found


def prepare(model: nn.Module, input_shape: Sequence[int], *, eager: bool = False) -> nn.Module:
    """Put ``model`` (already on its device), which takes inputs of ``input_shape`` (C, H, W),
    on the fast path's layout, in place, unless ``eager``.

    Parameters stay the same objects, so an optimizer made before or after still holds them,
    and ``state_dict`` keys do not change; checkpoints load either way.

    Raises:
        BrainPropError: the network's forward (in eval mode) works on contiguous inputs but
            fails on channels_last ones (a module of one's own that flattens with ``view``).
    """
    if not eager and CHANNELS_LAST in features(model):
        model.to(memory_format=torch.channels_last)
        _check_layout(model, input_shape)
    return model


def _check_layout(model: nn.Module, input_shape: Sequence[int]) -> None:
    """One forward of two blank images in eval mode, channels_last: a layout the network's own
    code cannot take fails here in one line, and not as a traceback at its first step. A
    network that fails in both layouts is left to fail in its first step, in its own words.
    The network's buffers, mode and the random streams are left as they were."""
    weight = next(p for p in model.parameters() if p.is_floating_point())
    x = torch.zeros(2, *input_shape, dtype=weight.dtype, device=weight.device)
    mode, buffers = model.training, [b.clone() for b in model.buffers()]
    # No draw of the probe may shift a stream the run goes on to use.
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        model.eval()
        try:
            failure = _failure(model, x.to(memory_format=torch.channels_last))
            if failure is None:
                return
            # Channels-last weights make channels-last outputs whatever the input's layout.
            model.to(memory_format=torch.contiguous_format)
            fails_anyway = _failure(model, x) is not None
            model.to(memory_format=torch.channels_last)
            if fails_anyway:
                return
        finally:
            model.train(mode)
            for buffer, kept in zip(model.buffers(), buffers, strict=True):
                buffer.copy_(kept)
    raise BrainPropError(
        "the network fails on channels_last inputs, the fast path's layout for networks with "
        f"convolutions ({type(failure).__name__}: {reason(failure)}{_own_line(failure)}): "
        "flatten with reshape or nn.Flatten instead of view, or train with --eager (eager=True)"
    )


def _own_line(failure: BaseException) -> str:
    """`` at file:line`` where ``failure`` was raised: the last line of one's own code in its
    traceback, as that is the line to mend, else the last line of all; empty if none."""
    libraries = (str(Path(torch.__file__).parent), str(Path(__file__).parent))
    frames = traceback.extract_tb(failure.__traceback__)
    own = [f for f in frames if not f.filename.startswith(libraries)]
    frame = (own or frames)[-1] if frames else None
    return f" at {frame.filename}:{frame.lineno}" if frame is not None else ""


def _failure(model: nn.Module, x: torch.Tensor) -> Exception | None:
    try:
        model(x)
    except Exception as e:
        return e
    return None


class Graph(Protocol):
    """What :class:`GraphedStep` needs of a graph: record a step once, run it many times."""

    def capture(self, step: Callable[[], Output]) -> None: ...

    def replay(self) -> Output: ...


class CudaGraph:
    """A :class:`torch.cuda.CUDAGraph` of one step; ``generators`` are the step's own streams
    of random numbers besides the default one (BrainProp's exploration, one per stacked seed)."""

    def __init__(self, generators: Sequence[torch.Generator]) -> None:
        self.graph = torch.cuda.CUDAGraph()
        # Registered, a generator advances by the graph's draws at each replay, so every
        # replay explores afresh and the generator's state still saves and restores.
        for generator in generators:
            self.graph.register_generator_state(generator)
        self.out: Output | None = None

    def capture(self, step: Callable[[], Output]) -> None:
        with torch.cuda.graph(self.graph):
            self.out = step()

    def replay(self) -> Output:
        assert self.out is not None, "replay before capture"
        self.graph.replay()
        return self.out


class GraphedStep:
    """Training steps of full batches replayed from one captured graph.

    The first :data:`WARMUP_STEPS` full batches train with the plain ``step`` (on a side
    stream on CUDA, as capture requires). The next one is captured: ``step`` reading its batch
    from static buffers, i.e. forward, objective, backward and SGD update. From then on each
    full batch is copied into those buffers and the graph replayed. A short last batch
    (another shape) takes the plain step. The graph holds the learning rate as a constant, so a
    new rate in the optimizer's groups (the schedule's halving) is captured again; a NaN reload
    builds a new trainer, and with it a new step.

    The returned :class:`~brainprop.objectives.Output` is the graph's own: the next call
    overwrites it, so read it before calling again (the training loop does).

    Args:
        step: the plain step, ``step(x, y) -> Output``, e.g. a ``partial`` of
            :func:`~brainprop.step.train_step`; it must use ``optimizer`` and ``generators``.
            The batch is the last dimension of ``y``: ``[b]``, or ``[G, b]`` for a
            :mod:`~brainprop.stacked` step of G seeds.
        generators: the step's own random streams, all on the run's device.
        new_graph: makes the graph; default :class:`CudaGraph`. Tests pass a stand-in that
            replays by calling the step, to check this class's bookkeeping on a CPU.
    """

    def __init__(
        self,
        step: Step,
        optimizer: torch.optim.Optimizer,
        *,
        generators: Sequence[torch.Generator],
        batch_size: int,
        new_graph: Callable[[Sequence[torch.Generator]], Graph] = CudaGraph,
    ) -> None:
        self.plain, self.optimizer, self.generators = step, optimizer, list(generators)
        self.device = self.generators[0].device
        self.batch_size, self.new_graph = batch_size, new_graph
        self.warmed_up = 0
        self.graph: Graph | None = None
        self.captured_lrs: tuple[float, ...] = ()
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.captures = 0
        # Streams and graphs belong to the current device, which need not be the run's.
        cuda = self.device.type == "cuda"
        self.on_device = torch.cuda.device(self.device) if cuda else contextlib.nullcontext()

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> Output:
        """One training step on ``x`` ([b, C, H, W] float) and ``y`` ([b]), or on G stacked
        batches ([G, b, C, H, W] and [G, b])."""
        with self.on_device:
            if y.shape[-1] != self.batch_size:
                return self.plain(x, y)
            if self.warmed_up < WARMUP_STEPS:
                self.warmed_up += 1
                return self._on_side_stream(lambda: self.plain(x, y))
            lrs = tuple(float(g["lr"]) for g in self.optimizer.param_groups)
            if self.graph is None or lrs != self.captured_lrs:
                self._capture(x, y, lrs)
            assert self.x is not None and self.y is not None and self.graph is not None
            self.x.copy_(x)
            self.y.copy_(y)
            return self.graph.replay()

    def forget(self) -> None:
        """Drop the graph, whose replays would go on reading and writing the tensors it was
        captured on: call it when the step's weights move to other memory (a stack of seeds
        makes them views of its own). The next full batches warm up and capture anew."""
        self.graph, self.captured_lrs, self.warmed_up = None, (), 0

    def _capture(self, x: torch.Tensor, y: torch.Tensor, lrs: tuple[float, ...]) -> None:
        if self.x is None or self.y is None:
            self.x, self.y = torch.empty_like(x), torch.empty_like(y)
        x_static, y_static = self.x, self.y
        self.graph = None  # frees the old graph's memory before the new one takes its own
        graph = self.new_graph(self.generators)
        # Gradients made during capture live in the graph's memory, where every replay
        # writes them; the update inside the graph reads them there.
        self.optimizer.zero_grad(set_to_none=True)
        # A failure inside the capture makes ending the capture fail too, and that later
        # error is the one raised: the step's own is kept to be named.
        failed: list[Exception] = []

        def step() -> Output:
            try:
                return self.plain(x_static, y_static)
            except Exception as e:
                failed.append(e)
                raise

        try:
            graph.capture(step)
        except Exception as e:
            # brainprop's refusals say what is wrong in their own words, and running out of
            # memory, the likeliest failure of a capture, is the device's limit, which the
            # caller words (fewer --jobs).
            if failed and (isinstance(failed[0], BrainPropError) or ran_out_of_memory(failed[0])):
                raise failed[0] from None
            raise _capture_failed(failed[0] if failed else e) from e
        self.graph, self.captured_lrs = graph, lrs
        self.captures += 1

    def _on_side_stream(self, step: Callable[[], Output]) -> Output:
        if self.device.type != "cuda":
            return step()
        side, main = _warmup_stream(torch.cuda.current_device()), torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            out = step()
        main.wait_stream(side)
        return out


def _capture_failed(e: Exception) -> BrainPropError:
    """The one-line error for a step that ran eagerly (in the warm-up) but failed as it was
    captured: an operation a CUDA graph cannot hold, such as ``.item()``, ``print`` of a
    tensor or a tensor made on the CPU, most often in one's own network or rule."""
    return BrainPropError(
        "--cuda-graph could not capture the training step "
        f"({type(e).__name__}: {reason(e)}{_own_line(e)}): an operation in it "
        "waits for the GPU or uses the CPU (.item(), .cpu(), print, a new CPU tensor), which "
        "a CUDA graph cannot hold. Move it out of the step, or train without --cuda-graph "
        "(cuda_graph=False)"
    )


@cache
def _warmup_stream(device_index: int) -> torch.cuda.Stream:
    # One side stream per GPU for every warm-up in the process: PyTorch keeps a cuBLAS
    # workspace (32 MiB by default on Hopper) for each stream a matmul has run on, until the
    # process ends. A "new" stream is the next of a pool of 32 per GPU, so a fresh one per
    # warm-up step could leave up to 32 workspaces behind, about 1 GiB on Hopper.
    return torch.cuda.Stream(device_index)


def make_step(
    model: nn.Module,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    *,
    generator: torch.Generator,
    batch_size: int,
    bf16: bool = False,
    cuda_graph: bool = False,
    parallel: distributed.Context | None = None,
) -> Step:
    """The training step a run takes: ``step(x, y) -> Output``, graphed with ``cuda_graph``."""
    step: Step = partial(
        train_step, model, objective, optimizer,
        generator=generator, batch_size=batch_size, bf16=bf16, parallel=parallel,
    )  # fmt: skip
    if not cuda_graph:
        return step
    return graphed(step, optimizer, model, [generator], batch_size=batch_size, parallel=parallel)


def graphed(
    step: Step,
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    generators: Sequence[torch.Generator],
    *,
    batch_size: int,
    parallel: distributed.Context | None = None,
) -> GraphedStep:
    """``step`` (of ``model``, or of a stack of networks built like it) as a
    :class:`GraphedStep`; a one-line error where a graph cannot run."""
    refusal = None
    if any(layer_mode(m) == "direct" for m in model.modules()):
        # direct_matrix rebuilds its cached D whenever the seed buffer's version moves, and
        # a graph would go on reading the old, freed D.
        refusal = "--feedback direct regenerates its matrix between steps, which a graph cannot"
    elif generators[0].device.type != "cuda":
        refusal = f"it needs a CUDA device, and this run is on {generators[0].device.type}"
    elif parallel is not None and parallel.active:
        refusal = "it is for one process, and this run is under torchrun"
    if refusal:
        raise BrainPropError(
            f"--cuda-graph cannot run here: {refusal}. Start the run without --cuda-graph "
            "(a run started with it resumes only where it can run)"
        )
    return GraphedStep(step, optimizer, generators=generators, batch_size=batch_size)
