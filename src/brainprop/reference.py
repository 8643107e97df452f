"""A neuron-level reference implementation of one BrainProp (or EBP) trial, read beside the paper.

Pozzi, Bohte & Roelfsema (NeurIPS 2020), "Attention-Gated Brain Propagation". For one trial or
a small batch of N trials, :func:`trial` computes, step by step and without autograd:

1. the **forward activities** a_0 = x, a_i = layer_i(a_{i-1});
2. the **chosen action** s: the class the network selects (given, or the argmax);
3. the **reward** r = [s == y] and the **reward-prediction error** delta = r - q_s;
4. the **attention feedback** arriving at each layer: the output unit s (and only s) sends
   feedback down through the feedback weights B; at every unit it is **gated by the unit's
   activity** (the derivative of its activation: 1 for an active ReLU, 0 for a silent one; the
   winning unit of a max-pool window; the kept units of a dropout mask; BatchNorm's gain);
5. the **three-factor update** dW = alpha * delta * pre * (gated feedback) for every forward
   synapse, and the same update for the feedback synapses B in ``reciprocal`` mode.

Sign convention: ``feedback`` is the direction that *increases* reward, fb = -N * dLoss/da, so
updates are added. The output error is eps = delta * onehot(s) for BrainProp (the chosen unit
carries delta, the others nothing) and eps = onehot(y) - softmax(q) for EBP. Because feedback
is linear, delta can ride along with the attention signal from the start; that is also the only
correct order once BatchNorm mixes trials (below). The batch update averages over trials:
dW = (alpha / N) * sum_n pre_n (x) fb_n.

Feedback modes (see :mod:`brainprop.feedback`): B = W (``symmetric``), the stored B
(``reciprocal``, ``random``), sign(W) * std(W) (``sign``), or, for ``direct``, no B: the
feedback arriving at a weight layer's input is e @ D with a fixed random D, where e is the
feedback at the last converted layer's output (eps where that layer gives q; through the layers
after it, such as a BatchNorm, a pooled conv head or layers left unconverted, otherwise).

Layers: ``nn.Linear``, ``nn.Conv2d`` / ``Conv2dSame`` (groups = dilation = 1),
``LocallyConnected2d``, ``nn.ReLU``, ``nn.MaxPool2d``, ``nn.Dropout`` (mask given or drawn),
``nn.BatchNorm1d/2d``, ``nn.Flatten``, ``nn.Identity``, in an ``nn.Sequential``.

**What is not local in BatchNorm (training mode).** The forward pass normalises each channel
with the mean and variance over the whole batch (and all positions), so a unit's output depends
on the other trials. The exact feedback through it is
fb_in = gamma / sigma * (fb - mean(fb) - xhat * mean(fb * xhat)), with the means over trials and
positions of one channel: a neuron would need the batch-averaged feedback and the batch-averaged
product of feedback and normalised activity, i.e. information from other trials. Everything
else, the gain gamma / sigma once the statistics are known, and the updates of gamma (sum of
fb * xhat) and beta (sum of fb), is local. In evaluation mode BatchNorm is a fixed per-channel
affine map and fully local.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from .errors import BrainPropError
from .feedback import PATHWAYS, direct_matrix, feedback_weight, layer_mode
from .layers import Conv2dSame, LocallyConnected2d

__all__ = ["Trial", "activity_derivative", "trial"]


def activity_derivative(pre: torch.Tensor) -> torch.Tensor:
    """The attention tag's gate at a ReLU unit: f'(pre) = 1 if the unit is active, else 0."""
    return (pre > 0).to(pre.dtype)


@dataclass
class Trial:
    """Everything one reference step computed.

    Attributes:
        activities: a_0 = x, then the output of every layer, in order ([N, ...] each).
        q: [N, K] output values (Q-values or logits).
        actions: [N] the chosen classes s.
        rewards: [N] r = [s == y].
        delta: [N] r - q_s (BrainProp); None for EBP.
        output_error: [N, K] eps, the signal the output layer sends down.
        feedback: per layer, the gated feedback arriving at its *output* ([N, ...], same shape
            as its activity), i.e. what multiplies the presynaptic activity in the update.
        updates: parameter name (as in ``model.state_dict()``) -> the update to add to it;
            a frozen parameter (``requires_grad`` False) has none, nor a learned B whose W is
            frozen, as its update is W's.
        masks: layer index -> the dropout mask used (1 = kept), drawn ones included.
    """

    activities: list[torch.Tensor]
    q: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    delta: torch.Tensor | None
    output_error: torch.Tensor
    feedback: list[torch.Tensor | None] = field(default_factory=list)
    updates: dict[str, torch.Tensor] = field(default_factory=dict)
    masks: dict[int, torch.Tensor] = field(default_factory=dict)


# --- patches: the presynaptic inputs of one output position ------------------------------------


def _patches(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, H_out, W_out, k_h, k_w]: the inputs each output unit sees."""
    return x.unfold(2, kernel[0], stride[0]).unfold(3, kernel[1], stride[1])


def _unpatch(
    fb_patches: torch.Tensor, size: tuple[int, int], stride: tuple[int, int]
) -> torch.Tensor:
    """Inverse routing of :func:`_patches`: sum each input unit's feedback over every output
    position that sees it. [N, C, H_out, W_out, k_h, k_w] -> [N, C, H, W]."""
    n, c, h_out, w_out, k_h, k_w = fb_patches.shape
    out = fb_patches.new_zeros(n, c, *size)
    for i in range(k_h):
        for j in range(k_w):
            rows = slice(i, i + stride[0] * (h_out - 1) + 1, stride[0])
            cols = slice(j, j + stride[1] * (w_out - 1) + 1, stride[1])
            out[:, :, rows, cols] += fb_patches[..., i, j]
    return out


def _conv_pads(layer: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero pads of a conv, Conv2dSame's asymmetric ones included."""
    if isinstance(layer, Conv2dSame) and layer.explicit_pad:
        return tuple(layer.explicit_pad)  # type: ignore[return-value]
    if isinstance(layer.padding, str):
        if layer.padding == "valid":
            return 0, 0, 0, 0
        # PyTorch's 'same' puts an even kernel's extra pixel on the right and at the bottom.
        (top, left), (kh, kw) = ((k - 1) // 2 for k in layer.kernel_size), layer.kernel_size
        return left, kw - 1 - left, top, kh - 1 - top
    ph, pw = layer.padding
    return pw, pw, ph, ph


def _feedback_weights(layer: nn.Module) -> torch.Tensor:
    """B for the modes that have one, written out rather than taken from the fast path (a
    registered :class:`~brainprop.feedback.Pathway` has only its own definition)."""
    mode = layer_mode(layer)
    w = layer.weight.detach()
    if mode == "symmetric":
        return w
    if mode == "sign":
        return torch.sign(w) * w.std() if w.numel() > 1 else w
    if mode in ("reciprocal", "random"):
        return layer.feedback_weight.detach()
    return feedback_weight(layer).detach()


# --- one trial ---------------------------------------------------------------------------------


@torch.no_grad()
def trial(
    model: nn.Sequential,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    rule: str = "brainprop",
    lr: float = 1.0,
    actions: torch.Tensor | None = None,
    masks: dict[int, torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> Trial:
    """One step of the learning rule on the batch ``x`` ([N, ...]) with labels ``y`` ([N]).

    Args:
        model: an ``nn.Sequential`` of the supported layers, possibly converted by
            :func:`brainprop.convert`. BatchNorm uses batch statistics in training mode.
        rule: 'brainprop' or 'ebp'.
        lr: alpha, the learning rate.
        actions: [N] chosen classes; default the argmax of q (the greedy choice).
        masks: dropout masks (1 = kept) by layer index; missing ones are drawn with
            ``generator`` when the model is training.

    Returns:
        a :class:`Trial`; ``updates`` are what one SGD step of the fast path adds to a full
        batch without weight decay (the fast path also scales BrainProp's step on a short
        last batch by its length over the nominal batch, and adds ``2 * l2 * w``).
    """
    if rule not in ("brainprop", "ebp"):
        raise BrainPropError(f"unknown rule {rule!r}: choose brainprop or ebp")
    _check_batch(model, x)
    layers = list(model)
    masks = dict(masks or {})

    # (1) Forward activities.
    acts = [x]
    stats: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # BN: (xhat, 1 / sigma)
    pool_winners: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(layers):
        a = acts[-1]
        _check_input(layer, i, a)
        if isinstance(layer, nn.Linear):
            out = torch.einsum("nk,ok->no", a, layer.weight)
            if layer.bias is not None:
                out = out + layer.bias
        elif isinstance(layer, nn.Conv2d):
            _check_conv(layer)
            p = _patches(F.pad(a, _conv_pads(layer)), layer.kernel_size, layer.stride)
            out = torch.einsum("nchwij,ocij->nohw", p, layer.weight)
            if layer.bias is not None:
                out = out + layer.bias[:, None, None]
        elif isinstance(layer, LocallyConnected2d):
            out = torch.einsum("nlk,lko->nol", _lc_inputs(layer, a), layer.weight)
            out = out.reshape(a.shape[0], layer.out_channels, *layer.output_size)
            if layer.bias is not None:
                out = out + layer.bias
        elif isinstance(layer, nn.ReLU):
            out = a.clamp_min(0)
        elif isinstance(layer, nn.MaxPool2d):
            out, pool_winners[i] = F.max_pool2d(
                a, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                ceil_mode=layer.ceil_mode, return_indices=True,
            )  # fmt: skip
        elif isinstance(layer, nn.Dropout):
            if layer.training and layer.p > 0 and i not in masks:
                keep = (
                    torch.rand(a.shape, generator=generator, dtype=a.dtype, device=a.device)
                    >= layer.p
                )
                masks[i] = keep.to(a.dtype)
            out = a * masks[i] / (1 - layer.p) if layer.training and layer.p > 0 else a
        elif isinstance(layer, nn.BatchNorm1d | nn.BatchNorm2d):
            out, stats[i] = _batchnorm(layer, a)
        elif isinstance(layer, nn.Flatten):
            out = a.flatten(layer.start_dim, layer.end_dim)
        elif isinstance(layer, nn.Identity):
            out = a
        else:
            raise BrainPropError(
                f"the reference implementation has no layer {type(layer).__name__} (index {i})"
            )
        acts.append(out)
    q = acts[-1]
    n = q.shape[0]
    if q.dim() != 2:
        raise BrainPropError(
            f"the network's output is {list(q.shape)}, not [N, classes]: end it in a Linear "
            "layer or a Flatten"
        )
    y = _classes(y, "y", n, q)

    # (2) Chosen action, (3) reward and reward-prediction error.
    if actions is None:
        actions = q.argmax(dim=1)
    actions = _classes(actions, "actions", n, q)
    rewards = (actions == y).to(q.dtype)
    if rule == "brainprop":
        delta = rewards - q.gather(1, actions[:, None])[:, 0]
        eps = delta[:, None] * F.one_hot(actions, q.shape[1]).to(q.dtype)
    else:
        delta = None
        eps = F.one_hot(y, q.shape[1]).to(q.dtype) - torch.softmax(q, dim=1)

    # (4) Attention feedback, top to bottom, and (5) the three-factor updates.
    result = Trial(acts, q, actions, rewards, delta, eps, [None] * len(layers), {}, masks)
    direct = [i for i, layer in enumerate(layers) if layer_mode(layer) == "direct"]
    fb, error = eps, eps
    for i in reversed(range(len(layers))):
        layer, pre = layers[i], acts[i]
        result.feedback[i] = fb
        if direct and i == direct[-1]:
            # Direct feedback sends on what reaches the last converted layer's output, as the
            # fast path takes it there (feedback._DirectInject): q's error only where that
            # layer gives q.
            error = fb.flatten(1)
        if isinstance(layer, _WEIGHT_LAYERS):
            fb = _weight_layer(layer, str(i), pre, fb, error, lr / n, result.updates)
        elif isinstance(layer, nn.ReLU):
            fb = fb * activity_derivative(pre)  # the unit's gate: silent units learn nothing
        elif isinstance(layer, nn.MaxPool2d):
            # Only the winner of each window passed its activity on, so only it gets feedback.
            routed = torch.zeros_like(pre).flatten(2)
            routed.scatter_add_(2, pool_winners[i].flatten(2), fb.flatten(2))
            fb = routed.view_as(pre)
        elif isinstance(layer, nn.Dropout):
            if layer.training and layer.p > 0:
                fb = fb * masks[i] / (1 - layer.p)
        elif isinstance(layer, nn.BatchNorm1d | nn.BatchNorm2d):
            fb = _batchnorm_feedback(layer, str(i), fb, *stats[i], lr / n, result.updates)
        elif isinstance(layer, nn.Flatten):
            fb = fb.reshape(pre.shape)
    return result


_WEIGHT_LAYERS = (nn.Linear, nn.Conv2d, LocallyConnected2d)


def _check_batch(model: nn.Module, x: torch.Tensor) -> None:
    """One line for a model or batch the steps below would fail on inside torch, or, for a
    width they broadcast, compute a wrong update of."""
    if not isinstance(model, nn.Sequential):
        raise BrainPropError(
            f"trial takes an nn.Sequential of the layers it covers, not {type(model).__name__}: "
            "for a network of one's own, train it with brainprop.train, whose diagnostics "
            "measure its feedback"
        )
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2 or not len(x):
        got = f"{x.dtype} {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise BrainPropError(
            f"x must be a float batch [N, ...] of at least one trial, got {got}: images as "
            "uint8 go in as x.float() / 255, one trial as x[None]"
        )
    dtypes = {p.dtype for p in model.parameters()}
    if len(dtypes) > 1:
        raise BrainPropError(
            f"the network's weights are of several dtypes ({', '.join(sorted(map(str, dtypes)))}"
            "): give them one, model.to(dtype)"
        )
    if dtypes and dtypes != {x.dtype}:
        raise BrainPropError(f"x is {x.dtype} and the network's weights {dtypes.pop()}: pass "
                             "x.to(the weights' dtype)")  # fmt: skip


def _check_input(layer: nn.Module, i: int, a: torch.Tensor) -> None:
    """One line for an input of another width than ``layer`` (index ``i``) takes."""
    if isinstance(layer, nn.Linear):
        shape: tuple[int | str, ...] = ("N", layer.in_features)
    elif isinstance(layer, nn.Conv2d):
        shape = ("N", layer.in_channels, "H", "W")
    elif isinstance(layer, LocallyConnected2d):
        shape = ("N", layer.in_channels, *layer.input_size)
    elif isinstance(layer, nn.BatchNorm1d | nn.BatchNorm2d):
        spatial = ("H", "W") if isinstance(layer, nn.BatchNorm2d) else ()
        shape = ("N", layer.num_features, *spatial)
    elif isinstance(layer, nn.MaxPool2d):
        shape = ("N", "C", "H", "W")
    else:
        return
    fits = a.dim() == len(shape) and all(
        isinstance(want, str) or got == want for got, want in zip(a.shape, shape, strict=True)
    )
    if isinstance(layer, nn.Conv2d) and fits:
        left, right, top, bottom = _conv_pads(layer)
        kh, kw = layer.kernel_size
        fits = a.shape[2] + top + bottom >= kh and a.shape[3] + left + right >= kw
    if isinstance(layer, nn.MaxPool2d) and fits:
        k, pad, dilation = (_pair(v) for v in (layer.kernel_size, layer.padding, layer.dilation))
        fits = all(a.shape[2 + j] + 2 * pad[j] >= dilation[j] * (k[j] - 1) + 1 for j in (0, 1))
    if not fits:
        raise BrainPropError(
            f"layer {i} ({type(layer).__name__}) takes [{', '.join(map(str, shape))}] inputs, "
            f"got {list(a.shape)}: give x the shape the network was built for"
        )
    batch_statistics = isinstance(layer, nn.BatchNorm1d | nn.BatchNorm2d) and (
        layer.training or layer.running_mean is None
    )
    if batch_statistics and a[:, 0].numel() == 1:
        running = " (or model.eval(), for its running statistics)" if layer.training else ""
        raise BrainPropError(
            f"layer {i} ({type(layer).__name__}) would normalise one value per channel with the "
            f"batch's statistics, as torch refuses to: pass more trials{running}"
        )


def _classes(t: object, name: str, n: int, q: torch.Tensor) -> torch.Tensor:
    """``t`` as int64 classes, one per trial of ``q`` ([n, K]); one line for what is none."""
    integer = isinstance(t, torch.Tensor) and not (
        t.is_floating_point() or t.is_complex() or t.dtype == torch.bool
    )
    if not integer or t.shape != (n,):
        got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise BrainPropError(f"{name} must be [{n}] integer classes, one per trial, got {got}")
    if t.device != q.device:
        raise BrainPropError(
            f"{name} is on {t.device} and the network's output on {q.device}: pass "
            f"{name}.to(x.device)"
        )
    # A meta tensor (a test's stand-in for a GPU) holds no values to check.
    if t.device.type != "meta" and not bool(((t >= 0) & (t < q.shape[1])).all()):
        raise BrainPropError(f"{name} holds classes outside [0, {q.shape[1]}), the network's")
    return t.long()


def _learns_b(layer: nn.Module, mode: str) -> bool:
    """Whether ``layer``'s B is a learned one used as it is (reciprocal's, or a registered
    pathway's without a read), whose update is then W's. A read that transforms a learned B
    passes W's gradient to it through that transformation, which this reference does not model:
    the comparison with the fast path then names the parameter."""
    if mode not in PATHWAYS:  # symmetric and direct have no B of their own
        return False
    b = getattr(layer, "feedback_weight", None)
    learned = isinstance(b, nn.Parameter) and b.requires_grad
    return learned and PATHWAYS[mode].read is None


def _check_conv(layer: nn.Conv2d) -> None:
    if layer.groups != 1 or layer.dilation != (1, 1) or layer.padding_mode != "zeros":
        raise BrainPropError(
            "the reference implementation covers convs with groups=1, dilation=1 and zero padding"
        )


def _lc_inputs(layer: LocallyConnected2d, a: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, L, K]: per output position l, its patch in Keras (k_h, k_w, C) order."""
    padded = F.pad(a, layer.explicit_pad) if layer.explicit_pad else a
    p = _patches(padded, layer.kernel_size, layer.stride)  # [N, C, H_out, W_out, k_h, k_w]
    n, c, h_out, w_out, k_h, k_w = p.shape
    return p.permute(0, 2, 3, 4, 5, 1).reshape(n, h_out * w_out, k_h * k_w * c)


def _weight_layer(
    layer: nn.Module,
    name: str,
    pre: torch.Tensor,
    fb: torch.Tensor,
    error: torch.Tensor,
    alpha: float,
    updates: dict[str, torch.Tensor],
) -> torch.Tensor:
    """Updates of one weight layer from its presynaptic activity ``pre`` and the gated
    feedback ``fb`` at its output; returns the feedback it sends to its input (in ``direct``
    mode, ``error`` [N, E] through the layer's D)."""
    mode = layer_mode(layer)
    b = None if mode == "direct" else _feedback_weights(layer)
    if isinstance(layer, nn.Linear):
        dw = alpha * torch.einsum("no,nk->ok", fb, pre)
        fb_in = None if b is None else torch.einsum("no,ok->nk", fb, b)
        bias_sum = (0,)
    elif isinstance(layer, nn.Conv2d):
        left, right, top, bottom = _conv_pads(layer)
        padded = F.pad(pre, (left, right, top, bottom))
        p = _patches(padded, layer.kernel_size, layer.stride)
        dw = alpha * torch.einsum("nohw,nchwij->ocij", fb, p)
        fb_in = None
        if b is not None:
            fb_patches = torch.einsum("nohw,ocij->nchwij", fb, b)
            full = _unpatch(fb_patches, padded.shape[-2:], layer.stride)
            fb_in = full[..., top : full.shape[-2] - bottom, left : full.shape[-1] - right]
        bias_sum = (0, 2, 3)
    else:  # LocallyConnected2d
        fb_flat = fb.flatten(2)  # [N, O, L]
        dw = alpha * torch.einsum("nol,nlk->lko", fb_flat, _lc_inputs(layer, pre))
        fb_in = None
        if b is not None:
            fb_cols = torch.einsum("nol,lko->nlk", fb_flat, b)  # [N, L, K], K in (k_h, k_w, C)
            (h_out, w_out), (k_h, k_w) = layer.output_size, layer.kernel_size
            fb_patches = fb_cols.reshape(pre.shape[0], h_out, w_out, k_h, k_w, -1)
            fb_patches = fb_patches.permute(0, 5, 1, 2, 3, 4)
            left, right, top, bottom = layer.explicit_pad or (0, 0, 0, 0)
            size = (pre.shape[-2] + top + bottom, pre.shape[-1] + left + right)
            full = _unpatch(fb_patches, size, layer.stride)
            fb_in = full[..., top : size[0] - bottom, left : size[1] - right]
        bias_sum = (0,)
    if layer.weight.requires_grad:
        updates[f"{name}.weight"] = dw
        if _learns_b(layer, mode):
            updates[f"{name}.feedback_weight"] = dw  # the feedback synapse learns what W learns
    if layer.bias is not None and layer.bias.requires_grad:
        updates[f"{name}.bias"] = alpha * fb.sum(bias_sum)
    if mode == "direct":
        # DFA: the output error goes straight to this layer's input through fixed D.
        d = direct_matrix(layer, error.shape[1], pre[0].numel(), error.dtype, error.device)
        fb_in = torch.einsum("nk,kj->nj", error, d).reshape(pre.shape)
    return fb_in


def _bn_axes(a: torch.Tensor) -> tuple[int, ...]:
    return (0,) if a.dim() == 2 else (0, 2, 3)


def _per_channel(v: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return v if a.dim() == 2 else v[:, None, None]


def _batchnorm(layer: nn.modules.batchnorm._BatchNorm, a: torch.Tensor):
    """BatchNorm forward; returns (output, (xhat, 1 / sigma))."""
    if layer.training or layer.running_mean is None:  # torch's rule for batch statistics
        axes = _bn_axes(a)
        mean = a.mean(axes)
        var = a.var(axes, unbiased=False)  # the batch's own spread: the non-local part
    else:
        mean, var = layer.running_mean, layer.running_var
    inv_sigma = _per_channel(1.0 / torch.sqrt(var + layer.eps), a)
    xhat = (a - _per_channel(mean, a)) * inv_sigma
    out = xhat
    if layer.affine:
        out = xhat * _per_channel(layer.weight, a) + _per_channel(layer.bias, a)
    return out, (xhat, inv_sigma)


def _batchnorm_feedback(
    layer: nn.modules.batchnorm._BatchNorm,
    name: str,
    fb: torch.Tensor,
    xhat: torch.Tensor,
    inv_sigma: torch.Tensor,
    alpha: float,
    updates: dict[str, torch.Tensor],
) -> torch.Tensor:
    """Updates of gamma and beta, and the feedback through BatchNorm to its input."""
    axes = _bn_axes(fb)
    gain = inv_sigma
    if layer.affine:
        if layer.weight.requires_grad:
            updates[f"{name}.weight"] = alpha * (fb * xhat).sum(axes)
        if layer.bias.requires_grad:
            updates[f"{name}.bias"] = alpha * fb.sum(axes)
        gain = gain * _per_channel(layer.weight, fb)
    if not layer.training and layer.running_mean is not None:
        return fb * gain
    # Non-local: the batch means of the feedback and of feedback x normalised activity.
    mean_fb = fb.mean(axes, keepdim=True)
    mean_fb_xhat = (fb * xhat).mean(axes, keepdim=True)
    return gain * (fb - mean_fb - xhat * mean_fb_xhat)
