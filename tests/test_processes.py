"""The plumbing of ``reproduce``'s worker processes: whole tagged lines, death with the parent,
SIGINT ignored from the start, from any thread."""

import io
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from brainprop import processes


class _Writes(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def test_tagged_lines_go_out_whole_each_in_one_write():
    stream = _Writes()
    tagged = processes.TaggedLines(stream, "run")
    print("two", "words", file=tagged)  # its text and its newline come in two writes
    tagged.write("a\nb\nthe start")
    assert stream.writes == ["run: two words\n", "run: a\nrun: b\n"]
    tagged.write(" and the end\n")
    assert stream.writes[-1] == "run: the start and the end\n"


def test_a_flushed_partial_line_goes_out_and_its_end_follows_untagged():
    stream = _Writes()
    tagged = processes.TaggedLines(stream, "run")
    tagged.write("waiting")
    tagged.flush()
    tagged.write("... done\nnext\n")
    tagged.flush()  # nothing held: nothing written
    assert stream.writes == ["run: waiting", "... done\nrun: next\n"]
    assert stream.getvalue().splitlines() == ["run: waiting... done", "run: next"]


def test_workers_can_be_started_from_another_thread():
    # signal.signal works in the main thread only: reproduce(jobs > 1) from a thread failed.
    failed: list[BaseException] = []

    def start() -> None:
        try:
            with processes.sigint_ignored():
                pass
        except BaseException as e:  # any failure is the finding
            failed.append(e)

    thread = threading.Thread(target=start)
    thread.start()
    thread.join()
    assert failed == []


_ORPHAN = """
import os, signal, sys, time
from pathlib import Path
from brainprop.processes import die_with_parent
from brainprop.signals import RELAY

out = Path(sys.argv[1])
if os.fork() == 0:  # started after its parent died: exits at once
    die_with_parent(os.getppid() + 1)
    os._exit(0)
(out / "late").write_text(str(os.waitstatus_to_exitcode(os.wait()[1])))
child = os.fork()
if child == 0:
    def checkpoint(signum, frame):
        (out / "stopped").write_text("checkpointed")
        os._exit(0)
    signal.signal(RELAY, checkpoint)
    die_with_parent(os.getppid())
    (out / "ready").write_text("")
    time.sleep(60)
    os._exit(1)
(out / "child").write_text(str(child))
while not (out / "ready").exists():
    time.sleep(0.01)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_worker_gets_the_stop_when_its_parent_is_killed(tmp_path):
    script = tmp_path / "orphan.py"
    script.write_text(_ORPHAN)
    parent = subprocess.run([sys.executable, str(script), str(tmp_path)], timeout=120)
    assert parent.returncode == -signal.SIGKILL
    assert (tmp_path / "late").read_text() == str(128 + signal.SIGTERM)
    child = int((tmp_path / "child").read_text())
    deadline = time.monotonic() + 20
    while not (tmp_path / "stopped").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not (tmp_path / "stopped").exists():
        os.kill(child, signal.SIGKILL)
    assert (tmp_path / "stopped").read_text() == "checkpointed"
