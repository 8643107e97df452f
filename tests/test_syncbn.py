"""Synchronised BatchNorm in one process: a stand-in world of two identical ranks, whose
all-reduce doubles, must give what plain BatchNorm gives on the two shares side by side.
(The real 2-process runs are in test_distributed.py.)"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from brainprop import TrainConfig
from brainprop.distributed import Context
from brainprop.presets import BN_EPS, BN_MOMENTUM
from brainprop.syncbn import SyncBatchNorm2d, synchronise, synchronised


class TwoIdenticalRanks(Context):
    """Two ranks holding the same share: summing over them doubles, forward and backward."""

    def __init__(self) -> None:
        super().__init__(rank=0, world_size=2)

    def summed(self, t: torch.Tensor, what: str) -> torch.Tensor:
        return t * 2


def _layer(momentum: float | None = BN_MOMENTUM) -> nn.BatchNorm2d:
    layer = nn.BatchNorm2d(3, eps=BN_EPS, momentum=momentum)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
    return layer


@pytest.mark.parametrize("momentum", [BN_MOMENTUM, None], ids=["momentum", "cumulative"])
def test_a_rank_normalises_and_learns_as_plain_batchnorm_over_the_global_batch(momentum) -> None:
    torch.manual_seed(0)
    plain = _layer(momentum)
    synced = synchronise(copy.deepcopy(plain), TwoIdenticalRanks())
    assert isinstance(synced, SyncBatchNorm2d)
    x = (torch.randn(4, 3, 5, 5) * 2 + 3).requires_grad_()
    both = torch.cat([x.detach(), x.detach()]).requires_grad_()
    upstream = torch.randn(4, 3, 5, 5)
    for _ in range(2):  # the second step starts from updated running statistics
        out = synced(x)
        out_both = plain(both)
        torch.testing.assert_close(out, out_both[:4])
        (out * upstream).sum().backward()
        (out_both * torch.cat([upstream, upstream])).sum().backward()
    # Each rank's parameter gradient is its share: the two shares sum to the global one.
    torch.testing.assert_close(2 * synced.weight.grad, plain.weight.grad)
    torch.testing.assert_close(2 * synced.bias.grad, plain.bias.grad)
    torch.testing.assert_close(x.grad, both.grad[:4])
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(synced, name), getattr(plain, name))


def test_the_variance_survives_a_mean_far_larger_than_the_spread() -> None:
    torch.manual_seed(0)
    x = 1000 + 0.01 * torch.randn(8, 3, 4, 4)
    synced = synchronise(nn.BatchNorm2d(3), TwoIdenticalRanks())
    synced(x)
    exact = x.double().var(dim=(0, 2, 3), unbiased=False)
    unbiased = exact * (2 * x.numel() / 3) / (2 * x.numel() / 3 - 1)
    expected = 0.9 + 0.1 * unbiased  # from the initial running variance of 1
    torch.testing.assert_close(synced.running_var.double(), expected, rtol=1e-4, atol=0)


def test_an_empty_share_still_goes_forward_and_backward() -> None:
    synced = synchronise(_layer(), TwoIdenticalRanks())
    x = torch.zeros(0, 3, 5, 5, requires_grad=True)
    out = synced(x)
    assert out.shape == (0, 3, 5, 5)
    out.sum().backward()
    assert synced.weight.grad is not None and not synced.weight.grad.any()


def test_layout_and_dtype_are_kept() -> None:
    synced = synchronise(_layer(), TwoIdenticalRanks())
    x = torch.randn(2, 3, 5, 5).to(memory_format=torch.channels_last)
    assert synced(x).is_contiguous(memory_format=torch.channels_last)
    assert synced(x.bfloat16()).dtype == torch.bfloat16


def test_evaluation_and_a_world_of_one_are_plain_batchnorm() -> None:
    torch.manual_seed(0)
    plain = _layer()
    x = torch.randn(4, 3, 5, 5)
    alone = synchronise(copy.deepcopy(plain), Context())
    torch.testing.assert_close(alone(x), plain(x))
    plain.eval()
    synced = synchronise(copy.deepcopy(plain), TwoIdenticalRanks()).eval()
    torch.testing.assert_close(synced(x), plain(x))


def test_synchronise_keeps_the_parameters_and_the_state_dict() -> None:
    model = nn.Sequential(nn.Conv2d(1, 3, 3, bias=False), nn.BatchNorm2d(3), nn.Flatten(),
                          nn.LazyLinear(2), nn.BatchNorm1d(2))  # fmt: skip
    model(torch.zeros(2, 1, 5, 5))
    params, keys = list(model.parameters()), list(model.state_dict())
    assert not synchronised(model)
    synchronise(model, Context())
    assert not synchronised(model)  # a world of one talks to nobody
    synchronise(model, TwoIdenticalRanks())
    assert synchronised(model)
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    assert list(model.state_dict()) == keys
    assert isinstance(model[1], nn.BatchNorm2d) and isinstance(model[4], nn.BatchNorm1d)


def test_runs_synchronise_by_default_and_older_runs_resume_as_they_trained() -> None:
    config = TrainConfig(dataset="mnist", arch="conv").resolve()
    assert config.sync_batchnorm
    older = {k: v for k, v in config.to_dict().items() if k != "sync_batchnorm"}
    assert TrainConfig.from_dict(older).sync_batchnorm is False
