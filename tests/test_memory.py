"""The host-memory figures of bench and the training history, with and without /proc."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import pytest
import torch

from brainprop import memory


def test_without_proc_the_peak_is_read_in_the_platforms_unit(monkeypatch):
    monkeypatch.setattr(memory, "_proc_bytes", lambda field, source=None: None)
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    linux = memory.host_rss()
    assert linux >= kib * 1024 > 2**20  # at least torch's libraries, a MiB and more
    monkeypatch.setattr(sys, "platform", "darwin")  # where ru_maxrss counts bytes
    assert kib <= memory.host_rss() < linux


def test_the_hosts_available_and_total_memory_are_read_from_proc_or_unknown(monkeypatch, tmp_path):
    cpu = torch.device("cpu")
    if Path("/proc/meminfo").is_file():
        # MemTotal, not sysconf's page count: a container may show its own /proc/meminfo.
        assert 2**20 < memory.available(cpu) <= memory.host_total()
    monkeypatch.setattr(memory, "Path", lambda _: tmp_path / "no-proc")
    assert memory.available(cpu) is None and memory.host_total() is None


def test_a_reset_restarts_the_hosts_peak():
    """bench's peak per rule and the history's per epoch must not carry an earlier high."""
    cpu = torch.device("cpu")
    big = torch.ones(256 * 2**20 // 4)  # written, so resident
    high = memory.host_rss()
    del big
    if not memory.reset_peak(cpu):
        pytest.skip("this kernel does not let a process reset its peak (VmHWM)")
    after, what = memory.peak(cpu, True)
    assert after < high - 128 * 2**20, (after, high)
    assert what == "peak RSS of the process since the reset (VmHWM)"


def test_a_gpus_available_memory_counts_what_the_caching_allocator_holds_unused(monkeypatch):
    """The GPU counts the allocator's cached blocks as taken, though this process can reuse
    them: once the single steps' memory went back to the cache, bench would refuse a stack
    that fits (review)."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (3 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 5 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 2 * 2**30)
    assert memory.available(torch.device("cuda")) == 6 * 2**30


@pytest.fixture
def fake_proc(tmp_path, monkeypatch):
    """/proc/self/status and /proc/meminfo with known figures, in kB."""
    (tmp_path / "status").write_text("Name:\tpython\nVmHWM:\t  500 kB\nVmRSS:\t  100 kB\n")
    (tmp_path / "meminfo").write_text(
        "MemTotal:       1000 kB\nMemFree:         200 kB\nMemAvailable:    700 kB\n"
    )
    files = {"/proc/self/status": tmp_path / "status", "/proc/meminfo": tmp_path / "meminfo"}
    monkeypatch.setattr(memory, "Path", lambda p: files.get(str(p), tmp_path / "none"))


def test_proc_figures_are_the_fields_asked_for_in_kib(fake_proc):
    cpu = torch.device("cpu")
    # The RSS now, not its peak: the history shows growth from epoch to epoch.
    assert memory.host_rss() == memory.held(cpu) == 100 * 1024
    assert memory.host_total() == 1000 * 1024
    # MemAvailable counts the page cache that would be given up; MemFree would refuse stacks
    # that fit.
    assert memory.available(cpu) == 700 * 1024
    assert memory.peak(cpu, True) == (500 * 1024, "peak RSS of the process since the reset (VmHWM)")
    # Without a reset, the peak is the whole process's, data loading included.
    assert memory.peak(cpu, False)[1] == memory.SINCE_START
