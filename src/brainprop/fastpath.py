"""The fast path: how ``train``, ``evaluate`` and ``bench`` run a network unless told ``--eager``.

Eager is PyTorch exactly as the network was built. The fast path changes how the work is laid
out, never what is computed, so a run's numbers differ from eager only by floating-point
rounding (``tests/test_fastpath.py`` pins this). ``brainprop bench`` times both side by side and
reports the ratio.

What it does:

* **channels_last** for every network with a 2-D convolution: its 4-D weights are stored
  channels-last, and PyTorch's convolutions (oneDNN on CPU, cuDNN on CUDA) then produce
  channels-last activations that ReLU, BatchNorm, pooling and dropout keep, so the inputs need
  no conversion. It avoids the layout reorders oneDNN otherwise makes around every
  convolution, and it is the layout tensor cores want. Dense and locally connected networks
  have no 4-D weight and are unchanged.

Not built yet: whole-step capture (a CUDA graph of forward, objective, backward and update);
see ``docs/performance.md``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["features", "prepare"]

CHANNELS_LAST = "channels_last"


def features(model: nn.Module) -> list[str]:
    """The fast-path changes that apply to ``model`` (empty: the fast path is eager for it)."""
    has_4d_weight = any(p.dim() == 4 for p in model.parameters())
    return [CHANNELS_LAST] if has_4d_weight else []


def prepare(model: nn.Module, eager: bool = False) -> nn.Module:
    """Put ``model`` (already on its device) on the fast path, in place, unless ``eager``.

    Parameters stay the same objects, so an optimizer made before or after still holds them,
    and ``state_dict`` keys do not change; checkpoints load either way.
    """
    if not eager and CHANNELS_LAST in features(model):
        model.to(memory_format=torch.channels_last)
    return model
