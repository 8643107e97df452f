"""Rules of a user's own, as the tests register them in ``OBJECTIVES``: in a file of their
own, as a plugin's would be, so that the messages naming their lines name this file."""

import functools
import typing

import torch
from own_decorators import counted

from brainprop.objectives import Output
from brainprop.presets import ARCHITECTURES

T = typing.TypeVar("T")


class SquaredError:
    """A rule of the user's own: squared error of every output against the one-hot label."""

    sums_over_nominal_batch = False

    def __call__(self, q, y, generator=None):
        loss = ((q - torch.nn.functional.one_hot(y, q.shape[1]).to(q.dtype)) ** 2).sum(1).mean()
        actions = q.detach().argmax(1)
        rewards = (actions == y).to(q.dtype)
        return Output(loss, actions, rewards, torch.zeros_like(y, dtype=torch.bool))


class FailsLater(SquaredError):
    """The squared-error rule that divides by zero on its ``at``-th call: on a batch that
    trying it before the run never sees."""

    def __init__(self, at):
        self.calls, self.at = 0, at

    def __call__(self, q, y, generator=None):
        self.calls += 1
        if self.calls == self.at:
            return 1 / 0
        return super().__call__(q, y, generator)


class Doubling(torch.nn.Module):
    """A layer of the user's own, in the rules' file: ``[B, ...] -> [B, ...]``, twice its input;
    raises ``error`` (a ValueError where None) on its ``at``-th forward pass in training."""

    def __init__(self, at=0, error=None):
        super().__init__()
        self.calls, self.at, self.error = 0, at, error

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                raise self.error or ValueError("a doubling too many")
        return 2 * x


def doubling_net(net, num_classes, dropout):
    """A network of the user's own: a flattened input, doubled, then the output layer."""
    net.flatten()
    net.add(Doubling())
    net.dense(num_classes, relu=False)


class KeepsAFunction(FailsLater):
    """FailsLater holding a function in ``func``, as a ``partial`` does: it is not one."""

    def __init__(self, at):
        super().__init__(at)
        self.func = torch.nn.functional.mse_loss


@torch.no_grad()
def fails_decorated(q, y, generator=None):
    """A rule of the user's own under a decorator of torch's: it divides by zero."""
    return 1 / 0


fails_decorated.sums_over_nominal_batch = False


class DoublingByItsBase(Doubling):
    """A layer of the user's own whose forward is its base class's."""


def inheriting_net(net, num_classes, dropout):
    """A network of the user's own whose layer runs only inherited code."""
    net.flatten()
    net.add(DoublingByItsBase())
    net.dense(num_classes, relu=False)


@functools.wraps(ARCHITECTURES["dense"][0])
def wrapped_dense(net, num_classes, dropout):
    """The library's dense network under a wrapper of one's own, which asks what it lacks."""
    net.flatten()
    net.dense(num_classes, relu=False, bogus=1)


class TypedRule(FailsLater, typing.Generic[T]):
    """FailsLater with bases from the standard library, whose code is nobody's own."""


@counted
def counted_net(net, num_classes, dropout):
    """A network of the user's own under a decorator of the user's own, from another file,
    which asks what it lacks."""
    net.flatten()
    net.dense(num_classes, relu=False, unasked=1)
