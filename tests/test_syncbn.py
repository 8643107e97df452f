"""Synchronised BatchNorm in one process. Two ranks are two threads whose all-reduce is a
real exchange (forward and backward), so each can hold a different share; they must give what
plain BatchNorm gives on the two shares side by side. A stand-in whose all-reduce doubles (two
identical ranks) covers the rest. The real 2-process runs are in test_distributed.py."""

from __future__ import annotations

import copy
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from torch import nn

from brainprop import TrainConfig
from brainprop.distributed import Context
from brainprop.errors import BrainPropError
from brainprop.feedback import FEEDBACK_MODES, convert
from brainprop.presets import BN_EPS, BN_MOMENTUM, build_model, preset_hyperparameters
from brainprop.syncbn import SyncBatchNorm2d, alone, synchronise, synchronised


class TwoIdenticalRanks(Context):
    """Two ranks holding the same share: summing over them doubles, forward and backward."""

    def __init__(self) -> None:
        super().__init__(rank=0, world_size=2)

    def summed(self, t: torch.Tensor, what: str) -> torch.Tensor:
        return t * 2


class _Exchange:
    """An all-reduce between threads: each puts its tensor in, all take the same sum out."""

    def __init__(self, world: int) -> None:
        self.barrier = threading.Barrier(world, timeout=60)
        self.slots: list[Any] = [None] * world

    def sum(self, rank: int, t: torch.Tensor) -> torch.Tensor:
        self.slots[rank] = t.detach().clone()
        self.barrier.wait()
        total = sum(self.slots[1:], self.slots[0].clone())
        self.barrier.wait()  # nobody refills a slot before every rank has read them all
        return total


class _Summed(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, exchange: _Exchange, rank: int) -> torch.Tensor:
        ctx.exchange, ctx.rank = exchange, rank
        return exchange.sum(rank, t)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return ctx.exchange.sum(ctx.rank, grad), None, None


class ThreadRank(Context):
    """Rank ``rank`` of a world of threads sharing ``exchange``."""

    def __init__(self, rank: int, exchange: _Exchange) -> None:
        super().__init__(rank=rank, world_size=len(exchange.slots))
        self.exchange = exchange

    def summed(self, t: torch.Tensor, what: str) -> torch.Tensor:
        return _Summed.apply(t, self.exchange, self.rank)


def _layer(momentum: float | None = BN_MOMENTUM) -> nn.BatchNorm2d:
    layer = nn.BatchNorm2d(3, eps=BN_EPS, momentum=momentum)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
    return layer


@pytest.mark.parametrize("momentum", [BN_MOMENTUM, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("shares", [(3, 5), (4, 0)], ids=["uneven", "one-idle"])
def test_ranks_normalise_and_learn_as_plain_batchnorm_over_the_global_batch(
    momentum, shares
) -> None:
    torch.manual_seed(0)
    plain = _layer(momentum)
    exchange = _Exchange(len(shares))
    ranks = [synchronise(copy.deepcopy(plain), ThreadRank(r, exchange)) for r in range(2)]
    assert all(isinstance(layer, SyncBatchNorm2d) for layer in ranks)
    steps = [torch.randn(sum(shares), 3, 5, 5) * 2 + 3 for _ in range(2)]
    upstream = [torch.randn(sum(shares), 3, 5, 5) for _ in range(2)]

    def run(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        start, n = sum(shares[:rank]), shares[rank]
        results = []
        for x, u in zip(steps, upstream, strict=True):
            x = x[start : start + n].clone().requires_grad_()
            out = ranks[rank](x)
            (out * u[start : start + n]).sum().backward()
            results.append((out.detach(), x.grad))
        return results

    with ThreadPoolExecutor(2) as pool:
        outputs = list(pool.map(run, range(2)))
    for step, (x, u) in enumerate(zip(steps, upstream, strict=True)):
        x = x.clone().requires_grad_()
        out = plain(x)
        (out * u).sum().backward()
        torch.testing.assert_close(torch.cat([o[step][0] for o in outputs]), out.detach())
        torch.testing.assert_close(torch.cat([o[step][1] for o in outputs]), x.grad)
    # Each rank's parameter gradient is its share: the shares sum to the global one.
    for name in ("weight", "bias"):
        summed = sum(getattr(layer, name).grad for layer in ranks)
        torch.testing.assert_close(summed, getattr(plain, name).grad)
    for layer in ranks:
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(layer, name), getattr(plain, name))


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


def test_bf16_activations_are_normalised_with_fp32_statistics() -> None:
    """As plain BatchNorm on the same values in fp32: the running statistics to fp32's
    rounding, not bf16's (review: their sums taken in bf16 were 5e-3 off)."""
    torch.manual_seed(0)
    plain = _layer()
    synced = synchronise(copy.deepcopy(plain), TwoIdenticalRanks())
    x = (torch.randn(8, 3, 5, 5) * 2 + 30).bfloat16()
    out = synced(x)
    expected = plain(torch.cat([x, x]).float())[:8]
    torch.testing.assert_close(out, expected.bfloat16())
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(synced, name), getattr(plain, name))


@pytest.mark.parametrize(
    ("kind", "shape"),
    [(nn.BatchNorm1d, (4, 3)), (nn.BatchNorm1d, (4, 3, 6)), (nn.BatchNorm3d, (4, 3, 2, 3, 4))],
    ids=["1d", "1d-sequence", "3d"],
)
def test_every_kind_normalises_over_every_position_as_plain_batchnorm(kind, shape) -> None:
    torch.manual_seed(0)
    plain = kind(3, eps=BN_EPS, momentum=BN_MOMENTUM)
    synced = synchronise(copy.deepcopy(plain), TwoIdenticalRanks())
    x = torch.randn(*shape) * torch.linspace(1, 3, shape[-1]) + torch.linspace(0, 5, shape[-1])
    torch.testing.assert_close(synced(x), plain(torch.cat([x, x]))[: shape[0]])
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(synced, name), getattr(plain, name))


@pytest.mark.parametrize(
    ("affine", "track"), [(False, True), (True, False)], ids=["no-affine", "no-running-stats"]
)
def test_layers_without_parameters_or_running_statistics_are_synchronised(affine, track) -> None:
    """nn.BatchNorm2d(affine=False) or (track_running_stats=False) of one's own network: no
    weight to scale by, no running statistics to update (review: both raised)."""
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(3, eps=BN_EPS, affine=affine, track_running_stats=track)
    synced = synchronise(copy.deepcopy(plain), TwoIdenticalRanks())
    x = torch.randn(4, 3, 5, 5) * 2 + 1
    torch.testing.assert_close(synced(x), plain(torch.cat([x, x]))[:4])
    torch.testing.assert_close(synced.state_dict(), plain.state_dict())


class OneImageOnAnotherRank(Context):
    """Rank 1 of two, the other holding nothing: the sum over the ranks is this rank's."""

    def __init__(self) -> None:
        super().__init__(rank=1, world_size=2)

    def summed(self, t: torch.Tensor, what: str) -> torch.Tensor:
        return t.clone()


def test_one_value_per_channel_in_the_global_batch_keeps_the_running_variance_finite() -> None:
    """A short last batch of one image over all ranks, in a BatchNorm1d: plain BatchNorm
    refuses it, which would need the count on the host; here its unbiased variance takes
    n - 1 as at least 1, and the running variance stays a number."""
    bn = synchronise(nn.BatchNorm1d(3, eps=BN_EPS, momentum=BN_MOMENTUM), OneImageOnAnotherRank())
    bn.load_state_dict(_layer().state_dict())
    before = bn.running_var.clone()
    out = bn(torch.randn(1, 3))
    assert torch.isfinite(out).all() and torch.isfinite(bn.running_var).all()
    torch.testing.assert_close(bn.running_var, (1 - BN_MOMENTUM) * before)


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


@pytest.mark.parametrize("feedback", FEEDBACK_MODES)
@pytest.mark.parametrize(
    ("dataset", "arch", "shape"),
    [("mnist", "dense", (1, 28, 28)), ("mnist", "conv", (1, 28, 28)),
     ("mnist", "loccon", (1, 28, 28)), ("cifar10", "deep", (3, 32, 32))],
    ids=["dense", "conv", "loccon", "deep"],
)  # fmt: skip
def test_every_network_runs_an_idle_ranks_empty_batch(dataset, arch, shape, feedback) -> None:
    """A rank with no images in a short last batch runs the empty batch forward and backward
    to join the BatchNorm collectives: every network and feedback pathway must take it."""
    model = build_model(arch, shape, 10, preset_hyperparameters(dataset, arch))
    convert(model, feedback, generator=torch.Generator().manual_seed(0))
    synchronise(model, TwoIdenticalRanks())
    out = model(torch.zeros(0, *shape))
    assert out.shape == (0, 10)
    out.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is None or not p.grad.any(), name


def test_alone_uses_the_ranks_own_statistics_for_the_block() -> None:
    model = synchronise(nn.Sequential(_layer()), TwoIdenticalRanks())
    with alone(model):
        assert not synchronised(model)
    assert synchronised(model)


def test_a_cumulative_average_keeps_a_float64_layers_precision() -> None:
    torch.manual_seed(0)
    plain = _layer(momentum=None).double()
    synced = synchronise(copy.deepcopy(plain), TwoIdenticalRanks())
    for _ in range(3):  # 1/3 is not a float32 number
        x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
        synced(x)
        plain(torch.cat([x, x]))  # what the two identical ranks hold between them
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(synced, name), getattr(plain, name), rtol=1e-14, atol=0)


class _OwnBatchNorm(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


@pytest.mark.parametrize(
    ("layer", "kind"),
    [(_OwnBatchNorm(3), "_OwnBatchNorm"), (nn.LazyBatchNorm2d(), "LazyBatchNorm2d")],
    ids=["subclass", "lazy"],
)
def test_a_batchnorm_it_cannot_synchronise_is_refused_before_any_changes(layer, kind) -> None:
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Sequential(layer))
    with pytest.raises(BrainPropError) as e:
        synchronise(model, TwoIdenticalRanks())
    assert str(e.value).startswith(f"layer 1.0 is a {kind}, whose statistics")
    assert "--local-batchnorm" in str(e.value)
    assert type(model[0]) is nn.BatchNorm2d


def test_a_synchronised_layer_built_directly_is_plain_batchnorm() -> None:
    torch.manual_seed(0)
    plain = _layer()
    direct = SyncBatchNorm2d(3, eps=BN_EPS, momentum=BN_MOMENTUM)
    direct.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(direct(x), plain(x))
    assert not synchronised(nn.Sequential(direct))
