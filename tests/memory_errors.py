"""What running out of memory raises, for the tests that it is left to the out-of-memory
advice (lower the batch size, ...) and never called one's own code's failure or a damaged
file's: each entry makes a fresh error."""

import pytest
import torch

#: The source line that torch 2.13's CPU allocator puts before what it says, and what it says.
ENFORCED = "[enforce fail at alloc_cpu.cpp:127] err == 0. "
CPU_ALLOCATOR = (
    "DefaultCPUAllocator: can't allocate memory: you tried to allocate 360000000 bytes. Error "
    "code 12 (Cannot allocate memory)"
)

#: Makers of each error, for a test that tries them all in one.
MAKERS = [
    lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore"),
    # torch's CPU allocator says so only in a RuntimeError's message.
    lambda: RuntimeError(f"{ENFORCED}{CPU_ALLOCATOR}"),
    MemoryError,
]

OUT_OF_MEMORY = pytest.mark.parametrize(
    "out_of_memory", MAKERS, ids=["cuda", "cpu-allocator", "python"]
)
