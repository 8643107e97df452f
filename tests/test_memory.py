"""The host-memory figures of bench and the training history, where /proc is missing."""

from __future__ import annotations

import resource
import sys

from brainprop import memory


def test_without_proc_the_peak_is_read_in_the_platforms_unit(monkeypatch):
    monkeypatch.setattr(memory, "_proc_status_bytes", lambda field: None)
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    linux = memory.host_rss()
    assert linux >= kib * 1024 > 2**20  # at least torch's libraries, a MiB and more
    monkeypatch.setattr(sys, "platform", "darwin")  # where ru_maxrss counts bytes
    assert kib <= memory.host_rss() < linux
