"""Feedback pathways: what carries the chosen unit's feedback down the network.

BrainProp's update for a synapse is ``alpha * delta * pre * (gated feedback)``. Autograd computes
the feedback through the *transpose of the forward weights*; this module makes the feedback
synapses explicit and lets them differ from the forward ones. :func:`convert` rewires, in place,
every ``nn.Linear``, ``nn.Conv2d`` (incl. :class:`~brainprop.layers.Conv2dSame`) and
:class:`~brainprop.layers.LocallyConnected2d` of any module:

* ``symmetric``: feedback through W itself, i.e. plain autograd (the default; converting to it
  restores plain layers, so results are bit-identical to an unconverted model).
* ``reciprocal``: separate feedback weights ``feedback_weight`` (an ``nn.Parameter`` shaped like
  W). B receives exactly W's local update (its ``.grad`` is W's gradient), so the optimizer
  applies the same step and, if B sits in the decayed group, the same weight decay. Initialised
  equal, B stays equal; a frozen W (``requires_grad`` off) gets no update, so B gets none. From
  a random start W - B never changes under the shared updates and shrinks only by weight decay,
  by (1 - lr * wd) per step (the Kolen-Pollack mechanism): with L2 off the angle between W and B
  still shrinks, but only because the shared updates outgrow the initial difference.
  :func:`convert` starts B at random; copy W into it to start equal.
* ``random``: a fixed random buffer ``feedback_weight`` (feedback alignment, Lillicrap 2016).
* ``sign``: B = sign(W) * std(W), recomputed from the current W at every step (sign symmetry).
  The scale std(W) gives B about the norm of W while W's mean is near 0, as a trained layer's
  is (for W ~ U(0, 1) it would be half).
* ``direct``: direct feedback alignment (Nokland 2016). The output error e ([N, E]: dL/dq,
  [N, K], where the output layer gives q; the gradient at the output layer's output, through
  the layers after it, otherwise) is sent straight to each layer's *input* through a fixed
  random matrix D ([E, input size]); it is then gated on the way into the layer below by that
  layer's activity derivative (ReLU, max-pool, BatchNorm, dropout) exactly as in the other
  modes. For BrainProp e is nonzero only
  at the chosen unit. D is regenerated on demand from a stored seed (buffer ``feedback_seed``)
  and scale (buffer ``feedback_scale``), so it costs no checkpoint space and needs no input
  size at conversion. The last converted layer in module order is the output layer, whose
  incoming gradient defines e; this is right for feed-forward stacks and for ResNets, whose
  last layer is the classifier.

``reciprocal``, ``random`` and ``sign`` are :class:`Pathway` entries of :data:`PATHWAYS`: how a
layer's B is made at conversion and read at each step. A new pathway through a B shaped like W
is one entry there, and then a mode like these.

Every random draw (``random`` and ``reciprocal`` B, ``direct`` D) is N(0, std(W)^2) of the
layer's forward weights at conversion, so the feedback starts at the forward pathway's scale.
Biases keep their exact, local gradient (the sum of the gated feedback).

Every mode but ``symmetric`` is a custom ``torch.autograd.Function`` per layer type whose
backward computes the weight gradient exactly as autograd does and the input gradient with B
instead of W, so the cost is one extra read of B; in ``direct`` mode the layer runs on a
detached input and a small identity function injects the projected error at the input.
"""

from __future__ import annotations

import contextlib
import re
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from . import plugins
from .devices import ran_out_of_memory
from .errors import (
    BrainPropError,
    UnknownName,
    defined_in,
    definition,
    kind_of,
    not_taking,
    raised,
)
from .layers import Conv2dSame, LocallyConnected2d
from .registry import Registry
from .rng import check_generator

__all__ = [
    "FEEDBACK_MODES",
    "PATHWAYS",
    "ConversionReport",
    "Pathway",
    "check_feedback",
    "convert",
    "direct_matrix",
    "exact_gradients",
    "feedback_modes",
    "feedback_weight",
    "layer_kind",
    "layer_mode",
]

#: The built-in modes; :func:`feedback_modes` adds those registered in :data:`PATHWAYS`.
FEEDBACK_MODES: tuple[str, ...] = ("symmetric", "reciprocal", "random", "sign", "direct")

#: Layers whose parameters act within one unit (a gain, a shift) and keep their exact gradient.
_UNIT_LOCAL = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
_FORCE = threading.local()


def _forced_symmetric() -> bool:
    return getattr(_FORCE, "depth", 0) > 0


@contextlib.contextmanager
def exact_gradients() -> Iterator[None]:
    """Within this block every converted layer backpropagates through W (symmetric feedback).

    Diagnostics use it to get the exact gradient (backpropagation's) of the same objective on
    the same batch.
    """
    _FORCE.depth = getattr(_FORCE, "depth", 0) + 1
    try:
        yield
    finally:
        _FORCE.depth -= 1


# --- feedback matrices -------------------------------------------------------------------------


def layer_mode(layer: nn.Module) -> str:
    """The feedback mode of ``layer`` ('symmetric' for layers :func:`convert` did not touch,
    whatever attributes of their own they have)."""
    if _original(type(layer)) is type(layer):
        return "symmetric"
    return layer.feedback_mode


class ReadRefused(BrainPropError):
    """A pathway's ``read`` returned a B that no step can take. The fault is the pathway's, yet
    the read returned normally, so the innermost frame of one's own code is whatever called
    the layer (one's own network): :func:`brainprop.owncode.failure` names the pathway
    (``pathway``, e.g. ``feedback 'mine'``) from this mark instead."""

    def __init__(self, mode: str, read: Callable[[nn.Module], torch.Tensor], problem: str) -> None:
        where = definition(read)
        self.pathway = f"feedback {mode!r}"
        self.problem = problem + (f" ({where})" if where else "")
        super().__init__(f"{self.pathway} {self.problem}")


def feedback_weight(layer: nn.Module) -> torch.Tensor | None:
    """The feedback weights B of ``layer``, shaped like its ``weight``; None in ``direct`` mode.

    ``symmetric`` gives W itself; a :class:`Pathway` with a ``read`` (``sign``: sign(W) *
    std(W) of the current W) what its ``read`` gives; the other pathways their stored B.
    """
    mode = layer_mode(layer)
    if mode == "symmetric":
        return layer.weight
    if mode == "direct":
        return None
    pathway = PATHWAYS.get(mode)
    if pathway is None:
        # Its stored B alone could be a part of its B (the noise of W + noise): no guess.
        raise BrainPropError(
            f"a {_original(type(layer)).__name__} layer has feedback {mode!r}, which is not in "
            "brainprop.PATHWAYS: register it in this process before using the network"
        )
    if pathway.read is None:
        return layer.feedback_weight
    b, w = pathway.read(layer), layer.weight
    if not isinstance(b, torch.Tensor):
        got = "None" if b is None else kind_of(b)
        raise ReadRefused(
            mode, pathway.read,
            f"read {got} for a {_original(type(layer)).__name__} layer: its read must return "
            "a tensor, a B shaped like W",
        )  # fmt: skip
    # convert checked a stored B; a read one is new at every step. Its dtype may differ (a read
    # under autocast computes in bf16): the backward casts B to the gradient's anyway.
    if (b.shape, b.device) != (w.shape, w.device):
        raise ReadRefused(
            mode, pathway.read,
            f"read B {list(b.shape)} on {b.device} for a {_original(type(layer)).__name__} "
            f"layer whose weight is {list(w.shape)} on {w.device}: its read must return a B "
            "shaped like W, on its device",
        )  # fmt: skip
    if _reaches(b, w):
        # B's gradient (dB = dW, for a learned B) would flow on into W, which would then take
        # its update twice or more: silently wrong, where every mode keeps W's exact.
        raise ReadRefused(
            mode, pathway.read,
            f"read a B for a {_original(type(layer)).__name__} layer that autograd computed "
            "from W, so W's gradient would not stay exact: compute it from "
            "layer.weight.detach()",
        )  # fmt: skip
    return b


def _reaches(t: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether a gradient of ``t`` would flow into what W learns from: the leaves its own
    graph accumulates into (W itself, or what a W computed in the graph is made of, as a
    parametrization's ``original``, rebuilt at each access); never into a frozen W."""
    if not w.requires_grad:
        return False
    learns = _leaves(w)
    return any(leaf is target for leaf in _leaves(t) for target in learns)


def _leaves(t: torch.Tensor) -> list[torch.Tensor]:
    """The tensors whose ``.grad`` a gradient of ``t`` accumulates into."""
    if t.grad_fn is None:
        return [t] if t.requires_grad else []
    found, todo, seen = [], [t.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            found.append(variable)
        todo.extend(next_node for next_node, _ in node.next_functions)
    return found


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    # An empty or meta tensor has no memory (its pointer is 0) to share.
    pointers = a.untyped_storage().data_ptr(), b.untyped_storage().data_ptr()
    return pointers[0] == pointers[1] != 0


def sign_feedback(w: torch.Tensor) -> torch.Tensor:
    """sign(W) * std(W); a single weight, which has no spread, is its own feedback."""
    return torch.sign(w) * w.std() if w.numel() > 1 else w.clone()


@dataclass(frozen=True)
class Pathway:
    """A feedback pathway that sends each layer's input gradient through a matrix B shaped
    like its weight W (the weight and bias gradients stay exact, as in every mode).

    Attributes:
        make: called by :func:`convert` for each layer, with the layer, std(W) (the scale the
            built-in random draws take) and the conversion's generator; returns the B to
            store as the layer's ``feedback_weight``: an ``nn.Parameter``, which receives W's
            gradient and so, from the optimizer, W's update (``reciprocal``); another tensor,
            kept as a fixed buffer (``random``); or None, to store nothing (``sign``). Its own
            memory, not W's, and not computed from W by autograd.
        read: this step's B of a layer (``sign``: from the current W); None reads the stored
            ``feedback_weight``. Computed from ``layer.weight.detach()``, not W itself: a
            gradient autograd would pass from B into W is refused at the step.
    """

    make: Callable[[nn.Module, float, torch.Generator | None], torch.Tensor | None]
    read: Callable[[nn.Module], torch.Tensor] | None = None


def _pathway_problem(entry: object) -> str | None:
    if not isinstance(entry, Pathway):
        return f"must be a brainprop.Pathway, not {kind_of(entry)}"
    # Refused as registered: a read called with the wrong arguments failed mid-epoch, in a
    # traceback with no line of one's own to name (review).
    for part, args, takes in (
        ("make", (nn.Identity(), 1.0, None), "(layer, scale, generator)"),
        ("read", (nn.Identity(),), "(layer)"),
    ):
        code = getattr(entry, part)
        if code is None and part == "read":
            continue
        if not callable(code):
            return f"has a {part} that is {kind_of(code)}, not a function of {takes}"
        if (called := not_taking(code, *args)) is not None:
            return f"has a {part}, {called}, that is no function of {takes}"
    return None


_NO_PATHWAY = "a built-in mode that is no pathway through a B"


#: The feedback pathways through a matrix B, by name. A new one is one entry, e.g.
#: ``PATHWAYS["sparse"] = Pathway(make=...)``; then ``convert(model, "sparse")`` and
#: ``TrainConfig(feedback="sparse")`` use it, as does the command given its module with
#: ``brainprop --plugin`` (:mod:`brainprop.plugins`).
PATHWAYS: Registry[Pathway] = Registry(
    "PATHWAYS",
    "pathway",
    {
        "reciprocal": Pathway(
            make=lambda layer, scale, g: nn.Parameter(_random_like(layer.weight, scale, g))
        ),
        "random": Pathway(make=lambda layer, scale, g: _random_like(layer.weight, scale, g)),
        "sign": Pathway(
            make=lambda layer, scale, g: None,
            read=lambda layer: sign_feedback(layer.weight.detach()),
        ),
    },
    check=_pathway_problem,
    reserved={"symmetric": _NO_PATHWAY, "direct": _NO_PATHWAY},
)


def feedback_modes() -> tuple[str, ...]:
    """Every mode :func:`convert` takes: ``symmetric``, the :data:`PATHWAYS`, ``direct``."""
    return ("symmetric", *PATHWAYS, "direct")


def check_feedback(mode: str) -> None:
    """One-line BrainPropError unless ``mode`` is one of :func:`feedback_modes`."""
    if mode not in feedback_modes():
        modes = feedback_modes()
        hint = plugins.unknown_name_hint(mode, modes)
        raise UnknownName(f"unknown feedback {mode!r}: choose one of {', '.join(modes)}{hint}")


def direct_matrix(
    layer: nn.Module, num_outputs: int, input_size: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The fixed DFA matrix D ([num_outputs, input_size]) of a ``direct``-mode layer.

    Drawn in float64 on the CPU from the layer's seed, so it is the same on every device and in
    every dtype; cached on the layer until the seed buffer is written (e.g. by
    ``load_state_dict``) or the requested shape changes. The cache key uses the buffer's version
    counter rather than its value, so a step on the GPU never waits to read the seed back.
    """
    seed_buffer = layer.feedback_seed
    key = (seed_buffer.data_ptr(), seed_buffer._version, num_outputs, input_size, dtype, device)
    cache = layer.__dict__.get("_direct_cache")
    if cache is None or cache[0] != key:
        gen = torch.Generator().manual_seed(int(seed_buffer))
        d = torch.randn(num_outputs, input_size, generator=gen, dtype=torch.float64)
        d = (d * float(layer.feedback_scale)).to(dtype=dtype, device=device)
        layer.__dict__["_direct_cache"] = (key, d)
        return d
    return cache[1]


# --- autograd functions ------------------------------------------------------------------------
#
# Under autocast (--bf16) a forward op runs in bf16 but these functions save its inputs as they
# came (the first layer's in fp32), so each backward casts what it saved to the precision of
# the incoming gradient: the precision autocast ran the forward op in, as autograd's own
# backward of an autocast op does. Without autocast the casts are no-ops.


def _like(g: torch.Tensor, *saved: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(g.dtype) for t in saved]


class _LinearFeedback(torch.autograd.Function):
    """y = x W^T + b; backward: dx = g B, dW = g^T x (exact), dB = dW (used by 'reciprocal';
    a frozen W, with no update, gives B none either)."""

    @staticmethod
    def forward(ctx, x, weight, bias, fb):
        ctx.save_for_backward(x, fb)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, fb = _like(g, *ctx.saved_tensors)
        need_x, need_w, _, need_fb = ctx.needs_input_grad[:4]
        gx = g.matmul(fb) if need_x else None
        gw = None
        if need_w:
            gw = g.reshape(-1, g.shape[-1]).t().matmul(x.reshape(-1, x.shape[-1]))
        gb = g.reshape(-1, g.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, gw if need_fb else None


class _ConvFeedback(torch.autograd.Function):
    """2-D convolution whose input gradient goes through B; weight and bias gradients exact."""

    @staticmethod
    def forward(ctx, x, weight, bias, fb, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight, fb)
        ctx.conf = (stride, padding, dilation, groups)
        ctx.bias_sizes = None if bias is None else [bias.shape[0]]
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, g):
        x, weight, fb = _like(g, *ctx.saved_tensors)
        stride, padding, dilation, groups = ctx.conf
        need_x, need_w, need_b, need_fb = ctx.needs_input_grad[:4]
        conv_bw = torch.ops.aten.convolution_backward
        gx = gw = gb = None
        if need_x:
            gx = conv_bw(
                g, x, fb, None, stride, padding, dilation, False, [0, 0], groups,
                [True, False, False],
            )[0]  # fmt: skip
        if need_w or need_b:
            _, gw, gb = conv_bw(
                g, x, weight, ctx.bias_sizes, stride, padding, dilation, False, [0, 0], groups,
                [False, need_w, need_b],
            )  # fmt: skip
            # The CPU's kernel computes W's gradient for the bias's even where the mask leaves
            # it out: a frozen W's must not reach a reciprocal B.
            gw = gw if need_w else None
        return gx, gw, gb, gw if need_fb else None, None, None, None, None


class _BmmFeedback(torch.autograd.Function):
    """Per-position matmul of :class:`LocallyConnected2d`: y = cols @ W ([L, N, K] @ [L, K, O])."""

    @staticmethod
    def forward(ctx, cols, weight, fb):
        ctx.save_for_backward(cols, fb)
        return torch.bmm(cols, weight)

    @staticmethod
    def backward(ctx, g):
        cols, fb = _like(g, *ctx.saved_tensors)
        need_x, need_w, need_fb = ctx.needs_input_grad[:3]
        gx = torch.bmm(g, fb.transpose(1, 2)) if need_x else None
        gw = torch.bmm(cols.transpose(1, 2), g) if need_w else None
        return gx, gw, gw if need_fb else None


class _DirectLink:
    """Shared by the layers of one ``direct``-mode network: holds the output error e, from
    the output layer's backward to the lower layers', one error at a time (docs/biology.md).

    The first layer (in module order), whose backward is the pass's last, drops it: an output
    layer converted back or replaced by a new head sends none, and the one left behind is an
    earlier step's. An error a layer below will read is ``open``, tagged with the backward
    (autograd's graph task) that sent it, until a layer below runs its backward: an output
    layer that finds one open in its own backward is the second of two passes backpropagated
    together whose layers below autograd runs after both output layers' (forwards interleaved
    layer by layer, a siamese pair), which would take one pass's error for both. Passes whose
    backwards autograd interleaves otherwise (one a layer ahead of the other) are not told
    apart: docs/biology.md. A forward does not drop the error: non-reentrant gradient
    checkpointing runs the output layer's forward again inside the backward, after its error
    was sent.
    """

    def __init__(self, first: nn.Module, output: nn.Module) -> None:
        self.first, self.output = first, output
        self.error: torch.Tensor | None = None
        #: The graph task of the backward whose error no layer below has run since, or None.
        self.open: int | None = None


class _DirectInject(torch.autograd.Function):
    """Identity on the layer's output; on the way back it passes the layer's own gradient
    through unchanged (for its weight update) and hands the layer's input D^T e instead of the
    transposed-weight feedback."""

    @staticmethod
    def forward(ctx, out, x, layer):
        ctx.layer, ctx.x_shape = layer, x.shape
        # A copy, not a view: autograd forbids in-place ops (ReLU(inplace=True), as in
        # torchvision's VGG) on a view a custom Function returns.
        return out.clone()

    @staticmethod
    def backward(ctx, g):
        layer = ctx.layer
        link: _DirectLink = layer._direct_link
        if link.output is layer:
            # Private, but what torch.utils.checkpoint itself tells backwards apart by.
            task = torch._C._current_graph_task_id()
            if link.open == task:
                raise BrainPropError(
                    "direct feedback got the output errors of two forward passes in one "
                    "backward (or of an output layer used twice in one pass), which it holds "
                    "one at a time: backpropagate each pass on its own"
                )
            link.error = g.flatten(1)
            # Open only where a layer below will read it: passes that end at the output layer
            # (its input detached or constant, or no layer below it) mix nothing.
            below = ctx.needs_input_grad[1] and link.first is not layer
            link.open = task if below else None
        else:
            link.open = None
        gx = None
        if ctx.needs_input_grad[1]:
            if link.error is None:
                raise BrainPropError(
                    "direct feedback reached a layer with no output error to take: the last "
                    "converted layer in module order must be the network's output, in direct "
                    "mode (convert the network again after replacing it), and two forward "
                    "passes are backpropagated one at a time"
                )
            e = link.error
            d = direct_matrix(layer, e.shape[1], ctx.x_shape[1:].numel(), e.dtype, e.device)
            gx = e.matmul(d).reshape(ctx.x_shape)
        if link.first is layer:
            link.error = None
        return g, gx, None


# --- converted layer classes -------------------------------------------------------------------


def _active(layer: nn.Module) -> bool:
    # No-grad forwards (evaluation runs under inference_mode) take the plain op: feedback only
    # matters for a backward. A frozen weight does not: the layers below it still learn from
    # the feedback it passes down (a fixed random readout is a usual feedback-alignment setup).
    mode = layer.feedback_mode
    return torch.is_grad_enabled() and mode != "symmetric" and not _forced_symmetric()


def _plain(layer: nn.Module) -> bool:
    """Whether ``layer`` takes the plain op in this forward. A ``direct``-mode output layer
    that does sends no error in the coming backward, so the one it holds, an earlier step's,
    is dropped: the layers below must not take it for this step's."""
    if _active(layer):
        return False
    link = getattr(layer, "_direct_link", None)
    if link is not None and link.output is layer:
        link.error = None
    return True


def _direct(layer: nn.Module, x: torch.Tensor, op) -> torch.Tensor:
    if x.dim() < 2:
        # D sends each sample's output error to that sample's input: it needs the samples.
        raise BrainPropError(
            f"direct feedback takes a batch, an input [N, ...], not one of shape "
            f"{tuple(x.shape)}: add a batch dimension (x.unsqueeze(0))"
        )
    return _DirectInject.apply(op(x.detach()), x, layer)


class _LinearMixin:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., in] -> [..., out]`` with the layer's feedback pathway."""
        if _plain(self):
            return F.linear(x, self.weight, self.bias)
        if self.feedback_mode == "direct":
            return _direct(self, x, lambda xd: F.linear(xd, self.weight, self.bias))
        return _LinearFeedback.apply(x, self.weight, self.bias, feedback_weight(self))


def _conv_padding(layer: nn.Conv2d) -> tuple[int, int]:
    if isinstance(layer.padding, str):
        if layer.padding == "valid":
            return 0, 0
        totals = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size, strict=True)]
        return totals[0] // 2, totals[1] // 2
    return layer.padding


class _ConvMixin:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C_in, H, W] -> [N, C_out, H_out, W_out]`` with the layer's feedback pathway;
        ``[C_in, H, W] -> [C_out, H_out, W_out]`` as ``nn.Conv2d``."""
        if x.dim() == 3 and _active(self):
            # The feedback functions compute per sample of a batch.
            return self.forward(x.unsqueeze(0)).squeeze(0)
        if not _plain(self) and self.feedback_mode == "direct":
            # Inject at the layer's own input, before any explicit pad (Conv2dSame).
            return _direct(self, x, super().forward)
        return super().forward(x)

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        if not _active(self) or self.feedback_mode == "direct":
            return super()._conv_forward(x, weight, bias)
        conf = (self.stride, _conv_padding(self), self.dilation, self.groups)
        return _ConvFeedback.apply(x, weight, bias, feedback_weight(self), *conf)


class _LocallyConnectedMixin:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C_in, H, W] -> [N, C_out, H_out, W_out]`` with the layer's feedback pathway."""
        if _plain(self):
            return super().forward(x)
        if self.feedback_mode == "direct":
            return _direct(self, x, super().forward)
        # LocallyConnected2d.forward with the bmm swapped for _BmmFeedback.
        cols = self.patches(x)
        y = self.image(_BmmFeedback.apply(cols, self.weight, feedback_weight(self)))
        return y if self.bias is None else y + self.bias


#: Each converted class by the class it was made from, and the other way round.
_CLASSES: dict[type, type] = {}
_ORIGINALS: dict[type, type] = {}


def _converted_name(cls: type) -> str:
    """``Feedback<Name>``, the same in every process (a pickled model finds its class by it
    once ``convert`` has made it there); a class from outside torch.nn and brainprop adds its
    module, so that a user's ``Linear`` never takes torch's name."""
    if cls.__module__.startswith(("torch.nn.", "brainprop.")):
        return f"Feedback{cls.__qualname__}"
    return "Feedback_" + re.sub(r"\W", "_", f"{cls.__module__}.{cls.__qualname__}")


def _original(cls: type) -> type:
    """The class a converted class was made from; ``cls`` itself if it is none. A subclass
    of a converted class (the class torch's ``parametrize`` gives a layer parametrized after
    its conversion) is converted too: its forward is the converted one."""
    return next((_ORIGINALS[c] for c in cls.__mro__ if c in _ORIGINALS), cls)


def _converted_class(cls: type) -> type:
    """A subclass of ``cls`` with the feedback forward; registered here so models pickle."""
    if cls not in _CLASSES:
        mixin = (
            _LinearMixin
            if issubclass(cls, nn.Linear)
            else _ConvMixin
            if issubclass(cls, nn.Conv2d)
            else _LocallyConnectedMixin
        )
        name = _converted_name(cls)
        new = type(name, (mixin, cls), {"__module__": __name__, "__qualname__": name})
        setattr(sys.modules[__name__], name, new)
        _CLASSES[cls] = new
        _ORIGINALS[new] = cls
    return _CLASSES[cls]


# --- conversion --------------------------------------------------------------------------------


@dataclass
class ConversionReport:
    """What :func:`convert` did.

    Attributes:
        mode: the feedback mode.
        converted: ``(name, layer type, weight shape)`` of every layer now using ``mode``.
        exact: ``(name, layer type)`` of layers with unit-local parameters (norms) that keep
            their exact gradient.
        added: number of new parameter/buffer elements (B, seeds, scales).
    """

    mode: str
    converted: list[tuple[str, str, tuple[int, ...]]] = field(default_factory=list)
    exact: list[tuple[str, str]] = field(default_factory=list)
    added: int = 0

    def __str__(self) -> str:
        if self.mode == "symmetric":
            head = f"feedback 'symmetric': {len(self.converted)} layers use exact autograd (W^T)"
        else:
            head = (
                f"feedback {self.mode!r}: converted {len(self.converted)} layers, "
                f"added {self.added:,} feedback values"
            )
        rows = [
            f"  {name or '<root>'}: {kind} {list(shape)}" for name, kind, shape in self.converted
        ]
        if self.exact:
            rows.append(f"  exact gradient kept for {len(self.exact)} norm layers")
        return "\n".join([head, *rows])


def layer_kind(module: nn.Module) -> str | None:
    """'linear' / 'conv' / 'loccon' for the kinds of layer :func:`convert` gives a feedback
    pathway, else None."""
    if isinstance(module, LocallyConnected2d):
        return "loccon"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv"
    return None


#: The forwards of the layers convert handles. A subclass with another would lose it (Linear,
#: LocallyConnected2d, whose pathway replaces the forward), or, a Conv2d whose forward might
#: not go through _conv_forward, keep exact feedback unnoticed: both are refused.
_PLAIN_FORWARDS = {
    "linear": (nn.Linear.forward,),
    "conv": (nn.Conv2d.forward, Conv2dSame.forward),
    "loccon": (LocallyConnected2d.forward,),
}


def _check(name: str, module: nn.Module) -> None:
    label = f"layer {name or '<root>'} ({type(module).__name__})"
    kind = layer_kind(module)
    if kind is None:
        if isinstance(module, _UNIT_LOCAL) or not list(module.parameters(recurse=False)):
            return
        if isinstance(module, parametrize.ParametrizationList):
            owner, _, tensor = name.rpartition(".")
            owner = owner.removesuffix("parametrizations").rstrip(".")
            raise BrainPropError(
                f"layer {owner or '<root>'} has its {tensor} parametrized "
                "(torch.nn.utils.parametrize), which convert does not take: convert the "
                "network first, then parametrize it"
            )
        raise BrainPropError(
            f"cannot give {label} a separate feedback pathway: only Linear, Conv2d and "
            "LocallyConnected2d weights (and norm layers) are supported; use feedback='symmetric'"
        )
    if any(nn.parameter.is_lazy(p) for p in module.parameters(recurse=False)):
        raise BrainPropError(
            f"{label} has no weights yet (a lazy layer): run one batch through the network "
            "first, then convert it"
        )
    base = _original(type(module))  # converted before: judge the class it was made from
    own = [n for n in _STATE if _holds(module, n)] if base is type(module) else []
    if own:  # never converted, so the layer's own
        raise BrainPropError(
            f"{label} has a {own[0]} of its own, which convert would replace: rename it, or "
            "use feedback='symmetric' for it"
        )
    if base.forward not in _PLAIN_FORWARDS[kind] or (
        kind == "conv" and base._conv_forward is not nn.Conv2d._conv_forward
    ):
        raise BrainPropError(
            f"{label} computes its own forward, which a feedback pathway would replace or "
            "bypass: convert supports Linear, Conv2d (and Conv2dSame) and LocallyConnected2d "
            "as they are; use feedback='symmetric' for it"
        )
    if kind == "conv":
        if module.padding_mode != "zeros":
            raise BrainPropError(
                f"{label} uses padding_mode={module.padding_mode!r}: only zero padding is "
                "supported; pad explicitly with F.pad before the conv"
            )
        if module.padding == "same" and any(
            d * (k - 1) % 2 for d, k in zip(module.dilation, module.kernel_size, strict=True)
        ):
            raise BrainPropError(
                f"{label} uses padding='same' with an even kernel (asymmetric pad): use "
                "brainprop.layers.Conv2dSame or explicit padding"
            )


def _scale(layer: nn.Module) -> float:
    """std(W); for a constant W (e.g. zeros) the default init scale 1/sqrt(fan_in) instead."""
    w = layer.weight.detach()
    std = float(w.double().std()) if w.numel() > 1 else 0.0
    # A LocallyConnected2d weight is [positions, fan_in, out]; the others lead with the outputs.
    fan_in = w.shape[1] if isinstance(layer, LocallyConnected2d) else w[0].numel()
    return std if std > 0 else 1.0 / max(fan_in, 1) ** 0.5


def _random_like(w: torch.Tensor, scale: float, generator: torch.Generator | None) -> torch.Tensor:
    noise = torch.randn(w.shape, generator=generator, dtype=torch.float64)
    return (noise * scale).to(dtype=w.dtype, device=w.device)


#: What a conversion adds to a layer: parameters or buffers, and a plain attribute.
_STORED = ("feedback_weight", "feedback_seed", "feedback_scale")
_STATE = (*_STORED, "feedback_mode")


def _holds(layer: nn.Module, name: str) -> bool:
    return name in layer._parameters or name in layer._buffers or name in layer.__dict__


def _strip(layer: nn.Module) -> None:
    """Remove a previous conversion's state so the layer can take a new mode; a layer
    :func:`convert` never converted keeps its own attributes, whatever their names."""
    if _original(type(layer)) is type(layer):
        return
    for name in _STORED:
        layer._parameters.pop(name, None)
        layer._buffers.pop(name, None)
    for name in ("feedback_mode", "_direct_link", "_direct_cache"):
        layer.__dict__.pop(name, None)
    layer.__class__ = _original(type(layer))


def convert(
    module: nn.Module, feedback: str, *, generator: torch.Generator | None = None
) -> ConversionReport:
    """Give every Linear/Conv2d/LocallyConnected2d in ``module`` the ``feedback`` pathway, in place.

    Forward weights stay the same Parameters (their state_dict keys do not change); the modes
    with stored feedback add ``<layer>.feedback_weight`` (``reciprocal``: a Parameter;
    ``random``: a buffer) or ``<layer>.feedback_seed`` and ``<layer>.feedback_scale``
    (``direct``). Converting to ``symmetric`` restores plain layers. Nothing is changed if any
    layer is refused. Convert before making the optimizer: a ``reciprocal`` B it was not given
    gets gradients but never changes. A state_dict does not record the mode, and ``random``
    and ``reciprocal`` store B under the same key, so either loads into the other: convert to
    the mode the state was saved in before loading it (brainprop's loaders take it from the
    run's config).

    Args:
        module: any network, e.g. a preset or a ResNet.
        feedback: one of :func:`feedback_modes`: the built-in :data:`FEEDBACK_MODES` and the
            pathways registered in :data:`PATHWAYS`.
        generator: CPU generator for the random feedback weights (reproducible conversions).

    Raises:
        BrainPropError: unknown mode, or a layer with weights it cannot handle (ConvTranspose,
            Bilinear, Embedding, attention, recurrent, Conv1d/3d, non-zero padding modes).
    """
    if not isinstance(module, nn.Module):
        raise BrainPropError(f"convert takes a network, an nn.Module, not {kind_of(module)}")
    if not isinstance(feedback, str):
        raise BrainPropError(
            f"convert takes feedback= a mode's name ({', '.join(feedback_modes())}), not "
            f"{kind_of(feedback)}"
        )
    check_feedback(feedback)
    check_generator(generator, "convert")
    if generator is not None and generator.device.type != "cpu":
        # B and D are drawn on the CPU, so that a seed gives the same ones on any device.
        raise BrainPropError(
            f"convert takes a CPU generator= (torch.Generator().manual_seed(0)), not one on "
            f"{generator.device}"
        )
    named = list(module.named_modules())
    for name, m in named:
        if type(m) not in _ORIGINALS and _original(type(m)) is not type(m):
            # Its class is torch's subclass of the converted one: undoing the conversion
            # would undo the parametrization too.
            raise BrainPropError(
                f"layer {name or '<root>'} ({_original(type(m)).__name__}) was parametrized "
                "after its conversion, which convert cannot undo: remove its parametrization "
                "(torch.nn.utils.parametrize.remove_parametrizations) before converting it "
                "again, and parametrize it after"
            )
    if feedback != "symmetric":
        for name, m in named:
            _check(name, m)
    report = ConversionReport(feedback)
    layers = [(name, m) for name, m in named if layer_kind(m) is not None]
    link = _DirectLink(layers[0][1], layers[-1][1]) if feedback == "direct" and layers else None
    made = _made_feedback_weights(feedback, layers, generator)
    _check_untied(feedback, layers, made)
    seeds = {
        name: torch.randint(0, 2**62, (), generator=generator)
        for name, _ in (layers if feedback == "direct" else [])
    }
    for name, m in named:
        if layer_kind(m) is None:
            if isinstance(m, _UNIT_LOCAL) and list(m.parameters(recurse=False)):
                report.exact.append((name, type(m).__name__))
            continue
        _strip(m)
        report.converted.append((name, type(m).__name__, tuple(m.weight.shape)))
        if feedback == "symmetric":
            continue
        m.__class__ = _converted_class(type(m))
        m.feedback_mode = feedback
        if feedback == "direct":
            w, scale = m.weight, _scale(m)
            m.register_buffer("feedback_seed", seeds[name].to(device=w.device))
            m.register_buffer(
                "feedback_scale", torch.tensor(scale, dtype=torch.float64, device=w.device)
            )
            m._direct_link = link
            report.added += 2
            continue
        b = made[name]
        if b is None:
            continue
        if isinstance(b, nn.Parameter):
            m.feedback_weight = b
        else:
            m.register_buffer("feedback_weight", b)
        report.added += b.numel()
    return report


def _check_untied(
    feedback: str, layers: list[tuple[str, nn.Module]], made: dict[str, torch.Tensor | None]
) -> None:
    """Refuse a learned B (an nn.Parameter, as ``reciprocal``'s) for layers that share one W:
    each B takes only its own layer's share of W's gradient, so none would follow W."""
    first: dict[int, str] = {}
    for name, m in layers:
        other = first.setdefault(id(m.weight), name)
        if other != name and isinstance(made.get(name), nn.Parameter):
            raise BrainPropError(
                f"layers {other or '<root>'} and {name} share one weight, and feedback "
                f"{feedback!r} learns each layer's B from that layer's share of its gradient, "
                "so neither B would follow W: untie the weights, or choose another feedback"
            )


def _made_feedback_weights(
    feedback: str, layers: list[tuple[str, nn.Module]], generator: torch.Generator | None
) -> dict[str, torch.Tensor | None]:
    """Each layer's B as the pathway ``feedback`` makes it (none for the modes that are no
    :class:`Pathway`), all made before any layer changes: a B of the wrong shape refuses the
    conversion, which then changes nothing."""
    if feedback not in PATHWAYS:  # symmetric and direct store no B
        return {}
    pathway, made = PATHWAYS[feedback], {}
    for name, m in layers:
        label = f"layer {name or '<root>'} ({type(m).__name__})"
        try:
            b = pathway.make(m, _scale(m), generator)
        except Exception as e:
            if feedback in PATHWAYS.builtin or ran_out_of_memory(e):
                raise
            # One's own code: one line naming its line, as a dataset's loader that fails.
            failed = raised(e, defined_in(pathway.make), pathway.make)
            raise BrainPropError(f"PATHWAYS[{feedback!r}].make failed for {label}: {failed}") from e
        if b is None and pathway.read is None:
            raise BrainPropError(
                f"feedback {feedback!r} made no B for {label} and has no read: give its "
                "Pathway one of them"
            )
        w = m.weight
        if b is not None and not isinstance(b, torch.Tensor):
            raise BrainPropError(
                f"feedback {feedback!r} made {kind_of(b)} for {label}: make returns a tensor "
                "like W (e.g. torch.as_tensor(b).to(layer.weight)), an nn.Parameter, or None"
            )
        if b is not None and (b.shape, b.dtype, b.device) != (w.shape, w.dtype, w.device):
            raise BrainPropError(
                f"feedback {feedback!r} made B {list(b.shape)} {b.dtype} on {b.device} for "
                f"{label}, whose weight is {list(w.shape)} {w.dtype} on {w.device}: make B "
                "like W (e.g. .to(layer.weight))"
            )
        if b is not None and _shares_memory(b, w):
            raise BrainPropError(
                f"feedback {feedback!r} made a B for {label} that shares W's memory, so it "
                "would follow W instead of staying as made: return a copy "
                "(layer.weight.detach().clone())"
            )
        if b is not None and not isinstance(b, nn.Parameter) and b.requires_grad:
            whence = "autograd computed from W" if _reaches(b, w) else "carries autograd's graph"
            raise BrainPropError(
                f"feedback {feedback!r} made a B for {label} that {whence}, which the steps "
                "would backpropagate through: make it without gradients (from "
                "layer.weight.detach(), under torch.no_grad()), or return an nn.Parameter to "
                "learn it"
            )
        made[name] = b
    return made
