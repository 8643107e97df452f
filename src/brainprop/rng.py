"""Every random source a run draws from, seeded at once and saved as checkpointable values.

The state goes into a ``weights_only`` checkpoint, so it is held as tensors, numbers and
strings only (numpy's own state object would be refused on load).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from . import checkpoint
from .errors import BrainPropError, kind_of


def seed_all(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and python ``random``.

    Nothing in the loop draws from numpy or python ``random`` today; seeding and saving them
    keeps a future user of them (an augmentation, a custom objective) reproducible on resume.
    """
    torch.manual_seed(seed)
    random.seed(seed)
    # numpy takes 32-bit seeds only; a run's own seed is one (TrainConfig checks it), a derived
    # one (a torchrun resume on another world size) may be wider.
    np.random.seed(seed % 2**32)


def check_generator(generator: object, call: str) -> None:
    """One line unless ``generator``, an argument of ``call``, is None or a torch.Generator
    (torch's own TypeError lists every overload of the op it reaches)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise BrainPropError(
            f"{call} takes generator= a torch.Generator (torch.Generator().manual_seed(0)) or "
            f"None, not {kind_of(generator)}"
        )


def capture_torch(generator: torch.Generator) -> dict[str, Any]:
    """The torch streams: the global CPU generator, the global generator of the run's GPU (in
    a one-entry list; none on a CPU) and the loop's ``generator``, which lives on the run's
    device.

    These are the ones that differ between the processes of a torchrun job, which each keep
    their own (see :mod:`brainprop.distributed`). Only the run's own GPU counts: its dropout
    draws from that GPU's stream, a resume may see fewer GPUs, and a CPU run must not start
    CUDA on every GPU of the machine to save their states.
    """
    return {
        "torch": torch.get_rng_state(),
        "cuda": _cuda_states(generator.device),
        "generator": generator.get_state(),
    }


def restore_torch(state: dict[str, Any], generator: torch.Generator) -> None:
    """Put back what :func:`capture_torch` returned; TypeError for a state that is not one."""
    cuda = _dict(state, "random state")["cuda"]
    if not isinstance(cuda, list):
        raise TypeError(f"the CUDA random states are {kind_of(cuda)}, not a list")
    torch.set_rng_state(_bytes(state["torch"]))
    _set_cuda_states(cuda, generator.device)
    generator.set_state(_bytes(state["generator"]))


def _cuda_states(device: torch.device) -> list[torch.Tensor]:
    return [torch.cuda.get_rng_state(device)] if device.type == "cuda" else []


def _set_cuda_states(states: list[Any], device: torch.device) -> None:
    if not states or device.type != "cuda":
        return
    # Checkpoints of earlier versions hold every visible GPU's state, in device order.
    index = 0 if len(states) == 1 else device.index or 0
    if index >= len(states):
        raise TypeError(f"the checkpoint holds no random state for GPU {index}")
    torch.cuda.set_rng_state(_bytes(states[index]), device)


def _dict(value: Any, what: str) -> dict[str, Any]:
    # A tensor in a dict's place would take the string keys as a sequence of indices, with a
    # deprecation warning, before failing.
    if not isinstance(value, dict):
        raise TypeError(f"the {what} is {kind_of(value)}, not a dict")
    return value


def _section(state: dict[str, Any], name: str) -> dict[str, Any]:
    return _dict(state[name], f"{name} random state")


def _bytes(value: Any) -> torch.Tensor:
    # torch would take some other values (a list, say) with a deprecation warning, or crash.
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8:
        kind = f"a {value.dtype} tensor" if isinstance(value, torch.Tensor) else kind_of(value)
        raise TypeError(f"a random state is a uint8 tensor, not {kind}")
    return value


def capture(generator: torch.Generator) -> dict[str, Any]:
    """The state of every global generator and of the loop's own ``generator``."""
    py_version, py_internal, py_gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    return {
        **capture_torch(generator),
        "numpy": {
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "python": {
            "version": py_version,
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss": py_gauss,
        },
    }


def restore(state: dict[str, Any], generator: torch.Generator) -> None:
    """Put back what :func:`capture` returned, all of it or, where a section is damaged,
    none of it: a caller that catches the error goes on with the streams it had."""
    _dict(state, "random state")
    numpy, python = _section(state, "numpy"), _section(state, "python")
    put_back = _put_back(generator.device, generator)
    try:
        restore_torch(state, generator)
        # Both hold a "gauss": the message says whose is missing or damaged.
        with checkpoint.entry("the numpy state"):
            keys = numpy["keys"].numpy().astype(np.uint32)
            np.random.set_state(("MT19937", keys, numpy["pos"], numpy["has_gauss"], numpy["gauss"]))
        with checkpoint.entry("the python state"):
            random.setstate(
                (python["version"], tuple(python["internal"].tolist()), python["gauss"])
            )
    except BaseException:
        put_back()
        raise


@contextmanager
def global_streams_kept(device: torch.device) -> Iterator[None]:
    """Put the global streams (torch CPU and ``device``'s, numpy, python ``random``) back as
    they were on entry, whatever the body seeded or restored."""
    put_back = _put_back(device)
    try:
        yield
    finally:
        put_back()


def _put_back(device: torch.device, generator: torch.Generator | None = None) -> Callable[[], None]:
    """What sets the global streams (and ``generator``, if given) back to their state now."""
    cpu, cuda = torch.get_rng_state(), _cuda_states(device)
    numpy, python = np.random.get_state(), random.getstate()
    own = None if generator is None else generator.get_state()

    def put_back() -> None:
        torch.set_rng_state(cpu)
        _set_cuda_states(cuda, device)
        np.random.set_state(numpy)
        random.setstate(python)
        if generator is not None and own is not None:
            generator.set_state(own)

    return put_back
