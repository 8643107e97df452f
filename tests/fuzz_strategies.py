"""Hypothesis strategies shared by the fuzz tests."""

from __future__ import annotations

from hypothesis import strategies as st


@st.composite
def mutated(draw: st.DrawFn, valid: bytes, hot: tuple[int, int] | None = None) -> bytes:
    """``valid`` with bytes overwritten, cut, inserted or truncated; positions fall in the
    ``hot`` byte range half of the time (where a format keeps its structure), else anywhere."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        lo, hi = hot if hot and draw(st.booleans()) else (0, len(data))
        pos = draw(st.integers(min(lo, len(data)), max(min(hi, len(data)) - 1, 0)))
        op = draw(st.sampled_from(["set", "cut", "insert", "truncate"]))
        if op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[pos : pos + draw(st.integers(1, 64))]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[pos:]
    return bytes(data)
