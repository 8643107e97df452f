"""A device's peak FLOP/s: the yardstick of the achieved TFLOP/s that ``brainprop bench``
reports.

A GPU's peaks come from its datasheet (:data:`GPU_PEAKS`), one per precision, since a step's
matmuls and convolutions may run in different ones (:func:`op_precisions`). A CPU's is
estimated from ``/proc/cpuinfo`` (:func:`cpu_peak`). ``--peak-tflops`` overrides both.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from .devices import cpuinfo, native_bf16, physical_cores
from .errors import BrainPropError
from .summary import TF32_OPS

_HOPPER_SXM = {"bf16": 989.0, "tf32": 494.7, "fp32": 66.9}
_A100 = {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}

#: Dense (no sparsity) peak TFLOP/s by (model, board), from NVIDIA's datasheets: bf16 and TF32
#: tensor cores, and plain fp32. The board is "" for SXM, else the word CUDA's device name
#: carries ("PCIE", "NVL"); boards not listed here have other clocks and are not guessed.
GPU_PEAKS: dict[tuple[str, str], dict[str, float]] = {
    ("H200", ""): _HOPPER_SXM,
    ("H100", ""): _HOPPER_SXM,
    ("H100", "PCIE"): {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2},
    ("A100", ""): _A100,
    ("A100", "PCIE"): _A100,
}
_BOARDS = ("PCIE", "NVL")


def gpu_board(name: str) -> tuple[str, str] | None:
    """(model, board) of a CUDA device name, e.g. "NVIDIA A100-PCIE-40GB" -> ("A100", "PCIE");
    None for a model :data:`GPU_PEAKS` does not know, or a MIG slice ("NVIDIA H100 80GB HBM3
    MIG 1g.10gb"), which has a share of the board's units. Whole words only: "GH200" is a Grace
    Hopper superchip and "RTX A1000" a laptop GPU, neither an H200 or an A100."""
    words = re.split(r"[\s\-_]+", name.upper())
    if "MIG" in words:
        return None
    models = {model for model, _ in GPU_PEAKS}
    model = next((w for w in words if w in models), None)
    if model is None:
        return None
    return model, next((w for w in words if w in _BOARDS), "")


@dataclass(frozen=True)
class Peak:
    """A device's peak TFLOP/s for the precision benchmarked, and how it was obtained."""

    tflops: float
    source: str


@dataclass(frozen=True)
class Peaks:
    """The peaks a step's matmuls (``mm``, ``addmm``, ``bmm``: cuBLAS) and its convolutions
    (cuDNN) run against: on CUDA they may run in different precisions (fp32 matmuls next to
    TF32 convolutions is PyTorch's default), and their peaks differ up to sevenfold."""

    matmul: Peak
    conv: Peak

    @classmethod
    def same(cls, peak: Peak) -> Peaks:
        return cls(peak, peak)

    def for_step(self, flops: int, conv_flops: int) -> float:
        """The peak TFLOP/s of a step of ``flops``, ``conv_flops`` of them in convolutions:
        the rate at which it would take the time its matmuls and its convolutions each need
        at their own peak. It is the one peak when both are the same."""
        if self.matmul.tflops == self.conv.tflops or flops <= 0:
            return self.matmul.tflops
        seconds = conv_flops / self.conv.tflops + (flops - conv_flops) / self.matmul.tflops
        return flops / seconds


def cpu_peak(threads: int, cpuinfo_text: str | None = None, bf16: bool = False) -> Peak | None:
    """Estimated fp32 (or ``bf16``) peak of ``threads`` threads from ``/proc/cpuinfo`` (or
    ``cpuinfo_text``); None if unreadable.

    The threads count as at most as many cores as they can run on (hyperthreads of one core
    share its vector units; :func:`~brainprop.devices.physical_cores`).

    fp32: cores x fp32 lanes x 2 (FMA) x 2 FMA pipes x clock. The lanes follow the widest
    vector flag, except that AMD cores are taken to run AVX-512 as two 256-bit halves, as Zen 4
    does (cpuinfo does not tell Zen 5 server cores, which have full 512-bit units and twice
    this peak, from those; the label says it is assumed: pass ``--peak-tflops``); two FMA pipes
    is what recent x86 server and desktop cores have (an assumption: cpuinfo does not say); the
    clock is cpuinfo's ``cpu MHz``, the nominal clock on a VM (turbo may beat it).

    bf16: AVX512_BF16's dot product multiplies two bf16 pairs per fp32 lane, twice the fp32
    rate; AMX tiles do 1024 bf16 FLOP per cycle and core (Intel's figure); a CPU with neither
    converts bf16 to fp32, so its fp32 peak stands.
    """
    fields = cpuinfo(cpuinfo_text)
    try:
        mhz = float(fields["cpu MHz"])
    except (KeyError, ValueError):
        return None
    # A VM may say 0 (or nan): no peak then, rather than a fraction of it divided by zero.
    if not 0 < mhz < math.inf:
        return None
    flags = set(fields.get("flags", "").split())
    clock = f"{mhz / 1000:.2f} GHz (cpuinfo)"
    cores = min(threads, physical_cores(cpuinfo_text) or threads)
    shared = f" ({threads} threads)" if threads > cores else ""
    if bf16 and "amx_bf16" in flags:
        return Peak(
            cores * 1024 * mhz * 1e6 / 1e12,
            f"estimated: {cores} cores{shared} x 1024 bf16 FLOP/cycle (AMX) x {clock}",
        )
    vendor = fields.get("vendor_id", "")
    if "avx512f" in flags and vendor != "AuthenticAMD":
        lanes, isa = 16, "AVX-512"
    elif "avx512f" in flags:
        lanes, isa = 8, "AVX-512 on 256-bit units, assumed"
    elif "avx2" in flags or "avx" in flags:
        lanes, isa = 8, "AVX2" if "avx2" in flags else "AVX"
    else:
        lanes, isa = 4, "SSE"
    fma = 2 if "fma" in flags or "avx512f" in flags else 1
    pairs, factor, note = 1, "", ""
    if bf16 and native_bf16(fields):
        pairs, factor = 2, " x 2 bf16 pairs per lane (AVX512_BF16, assumed at full rate)"
    elif bf16:
        note = "; no bf16 instructions, so bf16 runs at the fp32 rate"
    tflops = cores * lanes * pairs * fma * 2 * mhz * 1e6 / 1e12
    return Peak(
        tflops,
        f"estimated: {cores} cores{shared} x {lanes} fp32 lanes ({isa}){factor} x {fma} (FMA) x 2 "
        f"pipes (assumed) x {clock}{note}",
    )


def _conv_allows_tf32() -> bool:
    """Whether cuDNN convolutions may run in TF32 (PyTorch's default: yes)."""
    conv = getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None)
    if conv is None:  # before torch 2.9: one flag for all of cuDNN
        return bool(torch.backends.cudnn.allow_tf32)
    # torch >= 2.9: per-operator settings, "none" inheriting from cuDNN's, then the global one
    # (reading the old cudnn.allow_tf32 raises once the conv and RNN settings differ).
    for setting in (conv, torch.backends.cudnn.fp32_precision, torch.backends.fp32_precision):
        if setting != "none":
            return setting == "tf32"
    return False


def _matmul_allows_tf32() -> bool:
    """Whether cuBLAS fp32 matmuls may run in TF32 (PyTorch's default: no)."""
    matmul = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if matmul is None:  # before torch 2.9
        return bool(torch.backends.cuda.matmul.allow_tf32)
    # torch >= 2.9: "none" inherits the global setting (reading the old allow_tf32 raises once
    # the new settings were used).
    for setting in (matmul, torch.backends.fp32_precision):
        if setting != "none":
            return setting == "tf32"
    return False


def op_precisions(device: torch.device, bf16: bool) -> tuple[str, str]:
    """(matmul, convolution) precision of a step: bf16 under autocast, else on CUDA TF32 or
    fp32 per PyTorch's TF32 settings for cuBLAS matmuls (off by default) and for cuDNN
    convolutions (on by default), and fp32 on a CPU."""
    if bf16:
        return "bf16", "bf16"
    if device.type != "cuda":
        return "fp32", "fp32"
    matmul = "tf32" if _matmul_allows_tf32() else "fp32"
    return matmul, "tf32" if _conv_allows_tf32() else "fp32"


def tf32_ops(device: torch.device, bf16: bool, model: torch.nn.Module) -> list[str]:
    """Which of ``model``'s fp32 ops ran in TF32 on ``device`` ("matmuls", "convolutions"):
    a 10-bit mantissa instead of fp32's 23, so not the paper's fp32 (its GTX 1080 Ti had no
    TF32). PyTorch's default on CUDA gives convolutions TF32 and matmuls fp32."""
    matmul, conv = op_precisions(device, bf16)
    convolutions = any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in model.modules())
    ran = (matmul == "tf32", convolutions and conv == "tf32")
    return [name for name, tf32 in zip(TF32_OPS, ran, strict=True) if tf32]


def precision_label(matmul: str, conv: str) -> str:
    """One precision when both agree, e.g. ``fp32``; else each, e.g.
    ``matmul fp32, conv tf32 (cuDNN default)``."""
    if matmul == conv:
        return matmul
    return f"matmul {matmul}, conv {conv}" + (" (cuDNN default)" if conv == "tf32" else "")


#: The peaks ``--peak-tflops`` may give, in TFLOP/s: from a tenth of a GFLOP/s to 100 PFLOP/s.
PEAK_TFLOPS_RANGE = (1e-4, 1e5)


def device_peaks(device: torch.device, bf16: bool, override: float | None) -> Peaks:
    """The peaks to compare against; raises when one is unknown and not given.

    ``--peak-tflops`` is taken for matmuls and convolutions alike. On CUDA each is looked up
    for its own precision; a CPU runs both in one precision, against one estimated peak.
    """
    if override is not None:
        # Bounds no device comes near, so that a slip of an exponent is caught, not printed as
        # a share of the peak hundreds of digits long.
        if not PEAK_TFLOPS_RANGE[0] <= override <= PEAK_TFLOPS_RANGE[1]:
            low, high = PEAK_TFLOPS_RANGE
            raise BrainPropError(
                f"--peak-tflops must be a number of TFLOP/s from {low:g} to {high:g}, "
                f"got {override}"
            )
        return Peaks.same(Peak(override, "given with --peak-tflops"))
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        matmul, conv = op_precisions(device, bf16)
        board = gpu_board(name)
        if board in GPU_PEAKS:
            peaks, label = GPU_PEAKS[board], " ".join(w for w in board if w)
            return Peaks(
                Peak(peaks[matmul], f"{label} {matmul} dense datasheet peak"),
                Peak(peaks[conv], f"{label} {conv} dense datasheet peak"),
            )
        raise BrainPropError(
            f"no peak FLOP/s known for {name!r}: pass --peak-tflops with its {matmul} peak"
        )
    peak = cpu_peak(torch.get_num_threads(), bf16=bf16)
    if peak is None:
        raise BrainPropError(
            "cannot estimate this CPU's peak from /proc/cpuinfo: pass --peak-tflops "
            "(cores x fp32 lanes x 2 x FMA pipes x GHz / 1000; twice that for --bf16 on a CPU "
            "with bf16 dot products)"
        )
    return Peaks.same(peak)
