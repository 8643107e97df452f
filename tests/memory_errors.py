"""What running out of memory raises, for the tests that it is left to the out-of-memory
advice (lower the batch size, ...) and never called one's own code's failure or a damaged
file's: each entry makes a fresh error."""

import pytest
import torch

OUT_OF_MEMORY = pytest.mark.parametrize(
    "out_of_memory",
    [
        lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore"),
        # torch's CPU allocator says so only in a RuntimeError's message.
        lambda: RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] . DefaultCPUAllocator: can't allocate memory: "
            "you tried to allocate 360000000 bytes"
        ),
        MemoryError,
    ],
    ids=["cuda", "cpu-allocator", "python"],
)
