"""``brainprop bench``: training throughput per preset and rule, on CPU or CUDA.

Every preset (``dataset/arch``, hyperparameters from the paper's table) runs the very step the
training loop runs (:func:`brainprop.fastpath.make_step`), on synthetic uint8 images of the
dataset's real size and shape, so nothing needs downloading and an epoch is exactly
``ceil(N_train / batch)`` steps. Each timed step includes the on-device gather and scaling of
its batch and the loop's running sums after it (:func:`brainprop.step.tally`); the epoch figure
adds the one ``randperm`` per epoch.

The FLOP count is measured, not typed in: :class:`torch.utils.flop_counter.FlopCounterMode`
counts the matmuls and convolutions (``LocallyConnected2d``'s ``bmm`` included) of one real
step. Elementwise work (ReLU, BatchNorm, the SGD update) is not counted, as is usual. On CUDA
the matmuls and the convolutions may run in different precisions (by default fp32 matmuls but
TF32 cuDNN convolutions), so each is compared against its own precision's peak.

The figures are the fast path's, the one ``train`` takes (:mod:`brainprop.fastpath`). Where the
fast path changes a network, the same step is also timed in eager mode, side by side (their
blocks alternate), and each row gives the ratio. With ``stack`` G > 1 the step of G seeds in
one stacked network (:mod:`brainprop.stacked`) takes its turn too, and each row gives its
time and its speed-up over G single steps: above 1, ``reproduce --stack G`` pays.
"""

from __future__ import annotations

import gc
import itertools
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from . import distributed, fastpath, memory
from .config import TrainConfig
from .data import Dataset
from .data.batches import num_batches, permuted_batches
from .data.catalog import CATALOG
from .devices import (
    bf16_warning,
    cpuinfo,
    device_name,
    resolve_device,
    software,
    vector_units,
)
from .errors import BrainPropError
from .evaluation import EVAL_BATCH, accuracy
from .files import atomic_write_json, atomic_write_text, make_folder
from .objectives import OBJECTIVES, Objective, Output, make_objective
from .peaks import Peak, Peaks, device_peaks, op_precisions, precision_label
from .presets import (
    PAPER,
    PAPER_PRESET,
    build_model,
    table_archs,
    table_row,
)
from .stacked import Stack
from .step import tally
from .train import build_step

#: The presets the speed targets are stated for, plus the CPU target's MNIST dense.
DEFAULT_PRESETS = (
    "mnist/dense",
    "mnist/conv",
    "cifar10/deep",
    "cifar10/loccon",
    "tiny-imagenet/deep",
)
#: Timed steps are split into this many blocks (fewer if there are fewer steps); the reported
#: step time is the median block's, so a burst of load from another process moves it little.
BLOCKS = 5
#: Timed passes of the evaluation, of which the median is reported.
EVAL_REPEATS = 3
_EPOCH_NOTE = (
    "ceil(N_train / batch) times the median step (each including its batch's gather), plus one "
    "randperm."
)
JSON_NAME = "bench.json"
MARKDOWN_NAME = "bench.md"
FAST_MODE = (
    "fast path (brainprop.fastpath, what train runs): channels_last where the network has a "
    "2-D convolution{graph}; on CUDA, BrainProp's fused head (each row's fast_path lists what "
    "ran); 'eager ratio' is the eager step's time over the fast one's, timed side by side; '-' "
    "where the fast path is eager for that network"
)


def parse_preset(spec: str) -> tuple[str, str]:
    """``"dataset/arch"`` -> (dataset, arch), checked against the datasets and the table."""
    dataset, sep, arch = spec.partition("/")
    if not sep or dataset not in CATALOG:
        raise BrainPropError(
            f"preset {spec!r} is not dataset/arch with one of brainprop's datasets, whose sizes "
            f"bench times on random images: e.g. mnist/dense; datasets are "
            f"{', '.join(CATALOG)}"
        )
    if table_row(PAPER_PRESET, dataset, arch) is None:
        archs = table_archs(PAPER_PRESET, dataset)
        raise BrainPropError(
            f"--presets {spec!r}: the paper has no {arch!r} network for {dataset}; choose "
            f"from {', '.join(f'{dataset}/{a}' for a in archs)}"
        )
    return dataset, arch


def synthetic_dataset(name: str, device: torch.device, seed: int = 0) -> Dataset:
    """Random uint8 images and labels with the real dataset's sizes, on ``device``."""
    row = CATALOG[name]
    image, classes = row.format.image, row.format.classes
    g = torch.Generator(device=device).manual_seed(seed)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randint(0, 256, (n, *image), dtype=torch.uint8, device=device, generator=g)
        y = torch.randint(0, classes, (n,), device=device, generator=g)
        return x, y

    (train_x, train_y), (test_x, test_y) = split(row.n_train), split(row.n_test)
    return Dataset(name, train_x, train_y, test_x, test_y, classes)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn: Callable[[], object], device: torch.device, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _full_batches(
    ds: Dataset, batch_size: int, generators: list[torch.Generator]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of one permutation per generator, over and over, as the training loop gathers
    them (:func:`permuted_batches`): [b, ...] for one generator, [G, b, ...] for a stack of G.
    Full batches only, so every timed step does the same work; the epoch figure counts the
    short last batch as a full one."""
    n = len(ds.train_y)
    perms = [torch.randperm(n, device=ds.train_x.device, generator=g) for g in generators]
    perm = perms[0] if len(perms) == 1 else torch.stack(perms)
    perm = perm[..., : max(n // batch_size, 1) * batch_size]
    while True:
        yield from permuted_batches(ds.train_x, ds.train_y, perm, batch_size)


def _tallied(
    run_step: Callable[[torch.Tensor, torch.Tensor], Output],
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    seeds: tuple[int, ...],
) -> Callable[[], None]:
    """A step on the next batch followed, as in training, by the loop's running sums (for
    ``seeds`` = () one network's, (G,) a stack's): on a GPU they are about fifteen small
    kernels per step, a measurable share of the smallest networks' graphed steps."""
    sums = torch.zeros(3, *seeds, device=device)
    first_bad = torch.full(seeds, -1, dtype=torch.int64, device=device)
    count = itertools.count()

    def step() -> None:
        nonlocal first_bad
        x, y = next(batches)
        first_bad = tally(sums, first_bad, run_step(x, y), y.shape[-1], next(count))

    return step


def _forward_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward pass, in eval mode so that BatchNorm's running statistics and the
    dropout draws stay untouched (neither is a matmul, so the count is the training one's)."""
    model.eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train()
    return counter.get_total_flops()


def _conv_flops(counter: FlopCounterMode) -> int:
    """The counted FLOPs of convolutions, forward and backward (the rest are matmuls)."""
    counts = counter.get_flop_counts().get("Global", {})
    return sum(n for op, n in counts.items() if "convolution" in str(op))


@dataclass
class _Rule:
    """One rule's network, ready to step, and what was measured while preparing it."""

    rule: str
    config: TrainConfig
    model: nn.Module
    objective: Objective
    step: Callable[[], None]
    generator: torch.Generator
    forward_flops: int
    step_flops: int
    conv_flops: int
    peak_memory: tuple[int, str]
    block_seconds: list[float]
    #: Steps run before the timing: ``--warmup`` and what the preparation adds.
    untimed_steps: int
    #: Scores the network (every member of a stack) on a test set, reading the counts back.
    score: Callable[[torch.Tensor, torch.Tensor], object]
    stack: int = 1
    #: Bytes the process held when the peak count restarted: its floor.
    held_memory: int = 0


def _config(
    ds: Dataset, arch: str, rule: str, device: torch.device, batch_size: int | None, bf16: bool
) -> TrainConfig:
    """The paper's config of ``arch`` on ``ds`` for ``rule``, as ``train`` would resolve it."""
    sizes = {} if batch_size is None else {"batch_size": batch_size}
    return TrainConfig(
        dataset=ds.name, arch=arch, rule=rule, device=str(device), bf16=bf16, **sizes
    ).resolve()


def _timed(report: dict[str, Any]) -> int:
    """The steps each rule timed: ``--steps`` rounded down to whole blocks (``steps_timed``)."""
    return next((r["steps_timed"] for r in report["results"]), report["steps"])


def _untimed(report: dict[str, Any]) -> str:
    """The untimed steps each rule ran before its timing, e.g. "6 untimed warm-up steps":
    ``--warmup``, one more that counted the FLOPs, more for a CUDA graph's capture."""
    counts = sorted({r["warmup_steps"] for r in report["results"]}) or [report["warmup"]]
    n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return f"{n} untimed warm-up step{'' if n == '1' else 's'}"


def _warmup_steps(warmup: int, cuda_graph: bool) -> int:
    """Untimed steps before timing: with a CUDA graph at least the eager warm-up, the capture
    and one replay more, which keeps the first (slower) replay out of the timing."""
    return max(warmup, fastpath.WARMUP_STEPS + 1) if cuda_graph else warmup


def _prepare(
    ds: Dataset, arch: str, rule: str, device: torch.device, *, warmup: int,
    batch_size: int | None, bf16: bool, eager: bool, cuda_graph: bool = False,
) -> _Rule:  # fmt: skip
    """Build ``rule``'s network and step as training does (with ``eager``, as ``train --eager``
    does), count one step's FLOPs, take ``warmup`` steps more (the caller's
    :func:`_warmup_steps`, enough for a CUDA graph's capture), and record the peak memory of
    those steps."""
    config = replace(
        _config(ds, arch, rule, device, batch_size, bf16), eager=eager, cuda_graph=cuda_graph
    )
    parts = build_step(config, ds.input_shape, ds.num_classes, device, distributed.Context())
    model = parts.model.train()
    batches = _full_batches(ds, config.batch_size, [parts.generator])
    step = _tallied(parts.step, batches, device, ())
    x, _ = next(batches)
    forward = _forward_flops(model, x)
    held = memory.held(device)
    was_reset = memory.reset_peak(device)
    # The first step, since a graph's replays run no operators to count. On CUDA it also runs
    # the fused head's check against the unfused head: elementwise work, which is not counted.
    with FlopCounterMode(display=False) as counter:
        step()
    for _ in range(warmup):
        step()
    untimed = warmup + 1  # the FLOP-counted step is untimed too
    _sync(device)
    peak = memory.peak(device, was_reset)
    # The gradients are rebuilt by the next step: freeing them keeps them out of the next
    # rule's peak memory (a graph's stay in its own memory pool whatever happens here).
    parts.optimizer.zero_grad(set_to_none=True)
    return _Rule(
        rule, config, model, parts.objective, step, parts.generator, forward,
        counter.get_total_flops(), _conv_flops(counter), peak, [], untimed,
        lambda x, y: accuracy(model, x, y, bf16), held_memory=held,
    )  # fmt: skip


def _weight_bytes(model: nn.Module) -> int:
    """The float32 bytes of ``model``'s weights and buffers."""
    return sum(t.numel() * 4 for t in (*model.parameters(), *model.buffers()))


def _check_stack_fits(dataset: str, arch: str, device: torch.device, size: int) -> None:
    """Refuse, before any data is loaded, a stack whose weights alone would not fit, instead
    of building networks for minutes until memory runs out."""
    row = CATALOG[dataset]
    hp = PAPER[row.family, arch]  # parse_preset admitted only the table's rows
    with torch.device("meta"):
        model = build_model(arch, row.format.image, row.format.classes, hp)
    # The members' own weights, their stacked copy and its gradients.
    what = f"{size} {dataset}/{arch} networks' weights and gradients"
    _refuse_stack(size, 3 * size * _weight_bytes(model), what, device)


def _check_stacks_fit(
    single: _Rule, size: int, stacks: int, preset: str, device: torch.device
) -> None:
    """Refuse, before they are built, ``stacks`` stacks of ``size`` seeds (one per rule yet
    to be benched) that would not fit: each seed needs what ``single``'s step took above what
    was held before it (activations, the largest part, known only once a step has run) beside
    three copies of its weights (:func:`_check_stack_fits`)."""
    taken, source = single.peak_memory
    if source == memory.SINCE_START:  # the whole process's peak, not the step's
        return
    seed = max(taken - single.held_memory, 0) + 3 * _weight_bytes(single.model)
    what = f"{size} {preset} networks' steps (activations, weights and gradients)" + (
        f", a stack for each of {stacks} rules" if stacks > 1 else ""
    )
    _refuse_stack(size, stacks * size * seed, what, device)


def _refuse_stack(size: int, need: int, what: str, device: torch.device) -> None:
    free = memory.available(device)
    if free is not None and need > free:
        raise BrainPropError(
            f"--stack {size} needs about {need / 2**30:.1f} GiB for {what}, more than the "
            f"{free / 2**30:.1f} GiB {device} has free: pass a smaller --stack"
        )


def _prepare_stack(
    ds: Dataset, arch: str, rule: str, device: torch.device, size: int, *, warmup: int,
    batch_size: int | None, bf16: bool, cuda_graph: bool,
) -> _Rule:  # fmt: skip
    """Build ``size`` seeds of ``rule``'s network as one :class:`~brainprop.stacked.Stack`,
    stepping on batches gathered as the stacked training loop gathers them, and warm it up.
    A rule of one's own was tried already, as :func:`_prepare` built its single network."""
    config = _config(ds, arch, rule, device, batch_size, bf16)
    models, generators = [], []
    for seed in range(size):
        model = build_model(
            arch, ds.input_shape, ds.num_classes, config.hyperparameters(),
            torch.Generator().manual_seed(seed),
        )  # fmt: skip
        models.append(fastpath.prepare(model.to(device), ds.input_shape).train())
        generators.append(torch.Generator(device=device).manual_seed(seed))
    stack = Stack(
        models, generators, make_objective(rule, config.epsilon, fused=True),
        weight_decay=config.weight_decay, batch_size=config.batch_size, bf16=bf16,
        cuda_graph=cuda_graph,
    )  # fmt: skip
    stack.rates.fill_(config.lr)
    step = _tallied(stack.step, _full_batches(ds, config.batch_size, generators), device, (size,))
    # As many as a single step takes with its FLOP-counted one, so that with a CUDA graph both
    # time from the same replay on (and at least one, for the peak memory).
    untimed = warmup + 1
    held = memory.held(device)
    was_reset = memory.reset_peak(device)
    for _ in range(untimed):
        step()
    _sync(device)
    peak = memory.peak(device, was_reset)
    stack.optimizer.zero_grad(set_to_none=True)
    return _Rule(
        rule, config, models[0], stack.objective, step, generators[0], 0, 0, 0, peak, [], untimed,
        stack.accuracies, size, held_memory=held,
    )  # fmt: skip


def bench_preset(
    ds: Dataset,
    arch: str,
    rules: list[str],
    device: torch.device,
    *,
    peak: Peak | Peaks,
    steps: int,
    warmup: int,
    batch_size: int | None = None,
    bf16: bool = False,
    cuda_graph: bool = False,
    eval_images: int | None = None,
    stack: int = 1,
    say: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Time each rule's training step for ``arch`` on ``ds``; one JSON-ready row per rule.

    The timed blocks alternate (rule A, rule B, then B, A, ...: every other round backwards),
    so a change in load or clock during the run hits every rule alike and their ratio stays
    fair (:func:`rule_ratios` pairs each round's blocks). Where the fast path
    changes the network, each rule's eager step takes its turn among them too, and its row
    gives ``eager_step_ms`` and ``eager_ratio`` (eager over fast). With ``stack`` > 1, so does
    a step of that many stacked seeds: ``stack_step_ms`` and ``stack_speedup`` (``stack``
    single steps' time over the stacked step's). ``peak`` is one peak for all work, or the
    matmul and convolution peaks (:meth:`Peaks.for_step`). ``say`` is told each phase as it
    begins: a large preset takes minutes on a CPU before its first row.
    """
    peaks = peak if isinstance(peak, Peaks) else Peaks.same(peak)
    preset = f"{ds.name}/{arch}"

    def phase(what: str) -> None:
        if say is not None:
            say(f"{preset}: {what}")

    # Every variant (fast, eager, stacked) takes the same untimed steps: with a graph, those
    # its capture needs. So the eager twin steps the fast step's batches and is as warm.
    warmup = _warmup_steps(warmup, cuda_graph)
    variants = _Variants()
    unique = list(dict.fromkeys(rules))  # a rule named twice would pair with the wrong eager
    for rule in unique:
        phase(f"building and warming up {rule}'s step")
        fast = _prepare(
            ds, arch, rule, device, warmup=warmup, batch_size=batch_size, bf16=bf16,
            eager=False, cuda_graph=cuda_graph,
        )  # fmt: skip
        variants.fast.append(fast)
        if fastpath.features(fast.model, cuda_graph, fast.objective):
            variants.eager[rule] = _prepare(
                ds, arch, rule, device, warmup=warmup, batch_size=batch_size, bf16=bf16,
                eager=True,
            )  # fmt: skip
        if stack > 1:
            stacks = len(unique) - len(variants.stacked)  # this rule's and those after it
            _check_stacks_fit(fast, stack, stacks, preset, device)
            variants.stacked[rule] = _prepare_stack(
                ds, arch, rule, device, stack, warmup=warmup, batch_size=batch_size, bf16=bf16,
                cuda_graph=cuda_graph,
            )  # fmt: skip
    in_turn = variants.in_turn()
    blocks, per_block = _blocks(steps)
    phase(
        f"timing {len(in_turn)} kind{'s' * (len(in_turn) != 1)} of step in turn, "
        f"{blocks * per_block} steps each"
    )
    steps_timed = _time_interleaved(in_turn, steps, device)
    n_eval = min(eval_images or len(ds.test_y), len(ds.test_y))
    timed = {"device": device, "peaks": peaks, "cuda_graph": cuda_graph, "n_eval": n_eval,
             "steps_timed": steps_timed}  # fmt: skip
    rows = []
    for r in variants.fast:
        phase(f"timing {r.rule}'s evaluation of {n_eval:,} images")
        rows.append(_row(ds, arch, r, variants, **timed))
    return rows


@dataclass
class _Variants:
    """What :func:`bench_preset` times for each rule: its fast step, and where there is one,
    its eager twin and its stack of seeds."""

    fast: list[_Rule] = field(default_factory=list)
    eager: dict[str, _Rule] = field(default_factory=dict)
    stacked: dict[str, _Rule] = field(default_factory=dict)

    def in_turn(self) -> list[_Rule]:
        """Every variant, each rule's together."""
        out = []
        for r in self.fast:
            out += [r, *(v[r.rule] for v in (self.eager, self.stacked) if r.rule in v)]
        return out


def _blocks(steps: int) -> tuple[int, int]:
    """How ``steps`` asked for are timed: (blocks, steps per block), whole blocks only."""
    blocks = min(BLOCKS, steps)
    return blocks, max(steps // blocks, 1)


def _time_interleaved(variants: list[_Rule], steps: int, device: torch.device) -> int:
    """Append to each variant's ``block_seconds`` the mean step time of each of its blocks;
    returns the steps each variant took, timed."""
    blocks, per_block = _blocks(steps)
    for block in range(blocks):
        # Every other round backwards: what a block leaves behind (clocks, caches) then falls
        # on each variant's block from both sides, not always on the same neighbour's.
        for r in variants if block % 2 == 0 else variants[::-1]:
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(per_block):
                r.step()
            _sync(device)
            r.block_seconds.append((time.perf_counter() - t0) / per_block)
    return blocks * per_block


def _row(
    ds: Dataset,
    arch: str,
    r: _Rule,
    variants: _Variants,
    *,
    device: torch.device,
    peaks: Peaks,
    cuda_graph: bool,
    n_eval: int,
    steps_timed: int,
) -> dict[str, Any]:
    """The JSON-ready row of rule ``r``'s timed fast step, beside its eager twin and stack."""
    step_s = statistics.median(r.block_seconds)
    eager = variants.eager.get(r.rule)
    eager_s = statistics.median(eager.block_seconds) if eager else None
    stacked = variants.stacked.get(r.rule)
    stack_s = statistics.median(stacked.block_seconds) if stacked else None
    n_train = len(ds.train_y)
    randperm_s = _median_seconds(
        lambda: torch.randperm(n_train, device=device, generator=r.generator), device
    )
    test_x, test_y = ds.test_x[:n_eval], ds.test_y[:n_eval]
    eval_s = _eval_seconds(r, test_x, test_y)
    stack_eval_s = _eval_seconds(stacked, test_x, test_y) if stacked else None
    batch = r.config.batch_size
    steps_per_epoch = num_batches(n_train, batch)
    achieved = r.step_flops / step_s / 1e12
    row_peak = peaks.for_step(r.step_flops, r.conv_flops)
    stack = stacked.stack if stacked else 1
    return {
        "preset": f"{ds.name}/{arch}",
        "dataset": ds.name,
        "arch": arch,
        "rule": r.rule,
        "batch_size": batch,
        "n_train": n_train,
        "steps_per_epoch": steps_per_epoch,
        "steps_timed": steps_timed,
        "warmup_steps": r.untimed_steps,
        "step_ms": step_s * 1e3,
        "step_ms_blocks": [s * 1e3 for s in r.block_seconds],
        "fast_path": fastpath.features(r.model, cuda_graph, r.objective),
        "eager_step_ms": None if eager_s is None else eager_s * 1e3,
        "eager_ratio": None if eager_s is None else eager_s / step_s,
        "randperm_ms": randperm_s * 1e3,
        "epoch_s": steps_per_epoch * step_s + randperm_s,
        "images_per_s": batch / step_s,
        "flops_per_step": r.step_flops,
        "forward_flops_per_step": r.forward_flops,
        "backward_flops_per_step": r.step_flops - r.forward_flops,
        "conv_flops_per_step": r.conv_flops,
        "tflops": achieved,
        "peak_tflops": row_peak,
        "peak_fraction": achieved / row_peak,
        "peak_memory_bytes": r.peak_memory[0],
        "peak_memory_source": r.peak_memory[1],
        "memory_held_before_bytes": r.held_memory,
        "host_rss_bytes": memory.host_rss(),
        "eval_images": n_eval,
        "eval_s": eval_s,
        "eval_s_per_10k": eval_s * 10_000 / n_eval,
        "stack_size": stack,
        "stack_step_ms": None if stack_s is None else stack_s * 1e3,
        "stack_speedup": None if stack_s is None else stack * step_s / stack_s,
        "stack_peak_memory_bytes": None if stacked is None else stacked.peak_memory[0],
        "stack_memory_held_before_bytes": None if stacked is None else stacked.held_memory,
        "stack_eval_s_per_10k": None if stack_eval_s is None else stack_eval_s * 10_000 / n_eval,
    }


def _eval_seconds(r: _Rule, x: torch.Tensor, y: torch.Tensor) -> float:
    """Median seconds of :data:`EVAL_REPEATS` passes of ``r`` scoring ``x``, after a warm-up
    on the shapes of its batches (the first, and the short last one)."""
    batch = max(1, EVAL_BATCH // r.stack)  # a stack's members share a batch (Stack.accuracies)
    r.score(x[:batch], y[:batch])
    if tail := len(y) % batch:
        r.score(x[-tail:], y[-tail:])
    times = []
    for _ in range(EVAL_REPEATS):
        t0 = time.perf_counter()
        r.score(x, y)  # reads its counts back: the device is done when it returns
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _device_info(device: torch.device, bf16: bool, peaks: Peaks) -> dict[str, Any]:
    units = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        fields = cpuinfo()
        name = fields.get("model name") or platform.processor() or platform.machine()
        # The model name alone does not tell a cloud CPU's generation (see device_name).
        units = vector_units(fields)
    matmul, conv = op_precisions(device, bf16)
    return {
        "type": device.type,
        "name": name,
        # The name run summaries and the report give this machine (older reports lack it).
        "machine": device_name(device),
        "vector_units": units,
        "threads": torch.get_num_threads(),
        "precision": precision_label(matmul, conv),
        "matmul_precision": matmul,
        "conv_precision": conv,
        "peak_tflops": peaks.matmul.tflops,
        "peak_source": peaks.matmul.source,
        "conv_peak_tflops": peaks.conv.tflops,
        "conv_peak_source": peaks.conv.source,
        "host_memory_bytes": memory.host_total(),
    }


def run_bench(
    presets: list[str],
    rules: list[str],
    *,
    device: str = "auto",
    steps: int = 30,
    warmup: int = 5,
    batch_size: int | None = None,
    bf16: bool = False,
    cuda_graph: bool = False,
    peak_tflops: float | None = None,
    eval_images: int | None = None,
    stack: int = 1,
    out: str | Path | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Benchmark every preset with every rule; write bench.json and bench.md into ``out``.

    Returns the JSON-ready report: ``results`` (one row per preset and rule), ``ratios``
    (BrainProp/EBP step time per preset, where both rules ran), the device and its peaks, and
    the load average before and after (timings taken under load are not to be trusted).
    """
    distributed.refuse_launched("'brainprop bench'", "start it without torchrun")
    parsed = _checked_presets(presets, rules, steps, warmup, batch_size, eval_images, stack)
    dev = resolve_device(device)
    if cuda_graph and dev.type != "cuda":
        # As reproduce refuses it: before the folder is made and any warning is printed.
        raise BrainPropError(
            f"--cuda-graph needs a CUDA device, and this bench would run on {dev.type} "
            f"(--device {device}): drop --cuda-graph"
        )
    if stack > 1:
        for dataset, arch in parsed:
            _check_stack_fits(dataset, arch, dev, stack)
    peaks = device_peaks(dev, bf16, peak_tflops)
    if out is not None:
        make_folder(Path(out))  # before minutes of timing, not after
    slow_bf16 = bf16_warning(dev) if bf16 else None
    if slow_bf16:
        say(f"warning: {slow_bf16}")
    load_before = os.getloadavg()
    if load_before[0] > 0.75 * (os.cpu_count() or 1):
        say(
            f"warning: 1-minute load average {load_before[0]:.2f} on {os.cpu_count()} CPUs: "
            "other processes compete for the CPU, so these timings understate the speed"
        )
    results: list[dict[str, Any]] = []
    done: dict[str, Any] = {}
    # What does not change from preset to preset, read once.
    fixed = {
        "software": software(dev),
        "device": _device_info(dev, bf16, peaks),
        "mode": FAST_MODE.format(
            graph=", each step replayed from a CUDA graph (--cuda-graph)" if cuda_graph else ""
        ),
        "steps": steps,
        "warmup": warmup,
        "stack": stack,
        "load_average_before": list(load_before),
    }

    def report() -> dict[str, Any]:
        return fixed | {
            "load_average_after": list(os.getloadavg()),
            "results": results,
            "ratios": rule_ratios(results),
        }

    for dataset, arch in parsed:
        ds = synthetic_dataset(dataset, dev)
        rows = bench_preset(
            ds, arch, rules, dev, peak=peaks, steps=steps, warmup=warmup,
            batch_size=batch_size, bf16=bf16, cuda_graph=cuda_graph, eval_images=eval_images,
            stack=stack, say=say,
        )  # fmt: skip
        for row in rows:
            stacked = "" if stack == 1 else f" stack {stack} speed-up {row['stack_speedup']:.3f}"
            say(
                f"{row['preset']:<20} {row['rule']:<9} {_time(row['step_ms']):>9} ms/step "
                f"{_time(row['epoch_s']):>8} s/epoch {row['tflops']:.4f} TFLOP/s "
                f"eager ratio {_ratio(row['eager_ratio'])}{stacked}"
            )
        results += rows
        done = report()
        if out is not None:  # after every preset, so that a bench stopped part-way keeps them
            atomic_write_json(Path(out) / JSON_NAME, done)
            atomic_write_text(Path(out) / MARKDOWN_NAME, markdown(done))
        del ds
        # A stack refers to itself (its step is its own method): collect this preset's
        # networks now, or they would count in the next preset's peak memory.
        gc.collect()
    if out is not None:
        say(f"wrote {Path(out) / JSON_NAME} and {Path(out) / MARKDOWN_NAME}")
    return done


def _checked_presets(
    presets: list[str],
    rules: list[str],
    steps: int,
    warmup: int,
    batch_size: int | None,
    eval_images: int | None,
    stack: int,
) -> list[tuple[str, str]]:
    """The (dataset, arch) of each preset; a one-line BrainPropError for any argument of
    :func:`run_bench` that is out of range, before anything is built or timed."""
    if not presets:
        raise BrainPropError("no presets to bench: name at least one dataset/arch")
    if not rules:
        raise BrainPropError("no rules to bench: name at least one, such as brainprop")
    if steps < 1 or warmup < 0:
        raise BrainPropError(f"--steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}")
    if eval_images is not None and eval_images < 1:
        raise BrainPropError(f"--eval-images must be >= 1, got {eval_images}")
    if stack < 1:
        raise BrainPropError(f"--stack must be >= 1 seeds, got {stack}")
    for rule in rules:
        OBJECTIVES.require(rule)
    parsed = [parse_preset(p) for p in presets]
    if batch_size is not None:
        for dataset, _ in parsed:
            n_train = CATALOG[dataset].n_train
            if not 1 <= batch_size <= n_train:
                raise BrainPropError(
                    f"--batch-size must be 1 to {n_train:,} ({dataset}'s training images), "
                    f"got {batch_size}"
                )
    return parsed


def rule_ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """BrainProp/EBP step-time ratio for each preset that ran both rules: the median of the
    ratios of the two rules' blocks of one round, which ran moments apart, and their range
    (the ratio of the two medians could pair blocks of different rounds, under other load)."""
    by_preset: dict[str, dict[str, dict[str, Any]]] = {}
    for row in results:
        by_preset.setdefault(row["preset"], {})[row["rule"]] = row
    ratios = []
    for preset, rows in by_preset.items():
        if not {"brainprop", "ebp"} <= rows.keys():
            continue
        bp, ebp = rows["brainprop"], rows["ebp"]
        paired = [a / b for a, b in zip(bp["step_ms_blocks"], ebp["step_ms_blocks"], strict=True)]
        ratios.append(
            {
                "preset": preset,
                "brainprop_step_ms": bp["step_ms"],
                "ebp_step_ms": ebp["step_ms"],
                "brainprop_over_ebp": statistics.median(paired),
                "brainprop_over_ebp_blocks": paired,
            }
        )
    return ratios


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f}"


def _peak_mib(row: dict[str, Any]) -> str:
    """The peak, and what was held when its count started (absent from older reports)."""
    held = row.get("memory_held_before_bytes")
    peak = _mib(row["peak_memory_bytes"])
    return peak if held is None else f"{peak} ({_mib(held)})"


def _ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.3f}"


def _ratio_range(r: dict[str, Any]) -> str:
    """The lowest and highest of a ratio's rounds (absent from reports before 2026-11-30)."""
    rounds = r.get("brainprop_over_ebp_blocks")
    return f"{min(rounds):.3f}-{max(rounds):.3f}" if rounds else "-"


def _time(v: float) -> str:
    """Milliseconds or seconds to 3 decimals below 1, else 2: a graphed step of 0.124 ms or an
    epoch of 0.124 s must not print as the target it misses (0.12)."""
    return f"{v:.3f}" if round(v, 3) < 1 else f"{v:.2f}"


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: the device line, one row per preset and rule, the ratios.

    Where matmuls and convolutions ran against different peaks (fp32 matmuls, TF32
    convolutions), the header gives both and a column each row's own peak, which its
    "% of peak" is against.
    """
    dev = report["device"]
    before, after = report["load_average_before"][0], report["load_average_after"][0]
    conv_peak = dev.get("conv_peak_tflops", dev["peak_tflops"])
    two_peaks = conv_peak != dev["peak_tflops"]
    if two_peaks:
        peak_line = (
            f"- peaks: matmuls {dev['peak_tflops']:.3f} TFLOP/s ({dev['peak_source']}), "
            f"convolutions {conv_peak:.3f} TFLOP/s ({dev['conv_peak_source']}); each row's "
            "% of peak is against its own peak (column 'peak TFLOP/s'): the rate that does "
            "its matmul FLOPs at the matmul peak and its convolution FLOPs at the convolution "
            "peak"
        )
    else:
        peak_line = f"- peak: {dev['peak_tflops']:.3f} TFLOP/s ({dev['peak_source']})"
    peak_head, peak_rule = (" peak TFLOP/s |", " ---: |") if two_peaks else ("", "")
    stack = report.get("stack", 1)
    stack_head, stack_rule = (
        (f" stack of {stack} ms | stack speed-up | stack eval 10k s |", " ---: | ---: | ---: |")
        if stack > 1
        else ("", "")
    )
    what = [dev["name"]]
    if dev["type"] == "cpu":  # a GPU's figures do not depend on the host's threads
        threads = dev["threads"]
        what += [dev["vector_units"]] * bool(dev.get("vector_units"))
        what.append(f"{threads} thread{'s' if threads != 1 else ''}")
    machine = dev.get("machine") or f"{dev['type']} ({', '.join(what)})"
    # Reports written before `software` existed, such as those in docs/bench/, keep the
    # torch version at the top level.
    torch_version = report["software"]["torch"] if "software" in report else report["torch"]
    lines = [
        "# brainprop bench",
        "",
        f"- device: {machine}, {dev['precision']}, torch {torch_version}",
        peak_line,
        f"- {report['mode']}",
        f"- {_timed(report)} timed step{'s' * (_timed(report) != 1)} after {_untimed(report)}; "
        f"1-minute load average {before:.2f} before, {after:.2f} after",
        "",
        "| preset | batch | rule | step ms | s/epoch | images/s | GFLOP/step | TFLOP/s "
        f"| % of peak |{peak_head} peak mem MiB (held before) | host RSS MiB | eval 10k s "
        f"| eager ratio |"
        f"{stack_head}",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
        f"{peak_rule} ---: | ---: | ---: | ---: |{stack_rule}",
    ]
    for r in report["results"]:
        row_peak = f" {r['peak_tflops']:.1f} |" if two_peaks else ""
        row_stack = (
            f" {_time(r['stack_step_ms'])} | {r['stack_speedup']:.3f} "
            f"| {r['stack_eval_s_per_10k']:.3f} |"
            if stack > 1
            else ""
        )
        lines.append(
            f"| {r['preset']} | {r['batch_size']} | {r['rule']} | {_time(r['step_ms'])} "
            f"| {_time(r['epoch_s'])} | {r['images_per_s']:,.0f} | {r['flops_per_step'] / 1e9:.2f} "
            f"| {r['tflops']:.4f} | {100 * r['peak_fraction']:.1f} |{row_peak}"
            f" {_peak_mib(r)} | {_mib(r['host_rss_bytes'])} "
            f"| {r['eval_s_per_10k']:.3f} | {_ratio(r['eager_ratio'])} |{row_stack}"
        )
    if report["ratios"]:
        lines += [
            "",
            "| preset | BrainProp step ms | EBP step ms | BrainProp/EBP | range over rounds |",
            "| --- | ---: | ---: | ---: | --- |",
        ]
        lines += [
            f"| {r['preset']} | {_time(r['brainprop_step_ms'])} | {_time(r['ebp_step_ms'])} "
            f"| {r['brainprop_over_ebp']:.3f} | {_ratio_range(r)} |"
            for r in report["ratios"]
        ]
    if report["results"]:
        source = report["results"][0]["peak_memory_source"]
        lines += [
            "",
            f"Peak memory: {source}, and in brackets what the process held when that count "
            f"started (the dataset, the rule's network, what earlier rules left). s/epoch: "
            f"{_EPOCH_NOTE}",
        ]
        if stack > 1:
            lines.append(
                f"Stack: {stack} seeds in one stacked network (brainprop.stacked), one step "
                f"each; speed-up: {stack} single steps' time over the stacked step's; stack "
                f"eval: all {stack} seeds scored together."
            )
    return "\n".join(lines) + "\n"
