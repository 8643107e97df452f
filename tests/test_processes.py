"""The plumbing of ``reproduce``'s worker processes: whole tagged lines, death with the parent,
SIGINT ignored from the start, from any thread."""

import io
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from brainprop import processes
from brainprop.signals import RELAY


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
    tagged.write("epoch")  # after another flushed start, the end's write is whole lines again
    tagged.flush()
    tagged.write(" 2 done\n")
    tagged.write("last\n")
    assert stream.getvalue().splitlines() == [
        "run: waiting... done",
        "run: next",
        "run: epoch 2 done",
        "run: last",
    ]


def test_workers_can_be_started_from_another_thread():
    # signal.signal works in the main thread only: reproduce(jobs > 1) from a thread failed.
    failed: list[BaseException] = []

    def start() -> None:
        try:
            with processes.worker_signals():
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


_SPAWN = """
import multiprocessing, signal
from brainprop import processes

def child(send):
    send.send(sorted(signal.pthread_sigmask(signal.SIG_BLOCK, [])))

if __name__ == "__main__":
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)  # as experiments does: a Queue starts the tracker
    with processes.worker_signals():
        ctx.Process(target=child, args=(send,)).start()
    print(*(s.name for s in receive.recv()))
"""


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="POSIX signal masks")
def test_the_first_worker_a_process_spawns_starts_with_its_stops_blocked(tmp_path):
    """multiprocessing's resource tracker, started with a process's first child, unblocked
    SIGTERM on its way out, so the first worker of a session could still be killed by one."""
    script = tmp_path / "spawn.py"  # spawn imports the main module again: it needs a file
    script.write_text(_SPAWN)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert set(out.stdout.split()) >= {RELAY.name, "SIGTERM"}, out.stderr


_SLOW_START = """
import os, signal, sys, time
from brainprop.signals import RELAY, Interrupted, hold_stops, quit_on_signals, stop_on_signals

if sys.argv[1] != "between":  # a worker still importing torch when the stop comes
    while not {RELAY, signal.SIGTERM} & signal.sigpending():
        time.sleep(0.01)
hold_stops()
if sys.argv[1] == "between":  # a stop after one handler and before the next
    with stop_on_signals():
        pass
    os.kill(os.getpid(), RELAY)
    time.sleep(0.2)
if sys.argv[1] == "train":
    with stop_on_signals() as stop:
        print(f"stopped by {stop.name}")
else:
    try:
        with quit_on_signals("before its training began"):
            time.sleep(60)  # loading its dataset
    except Interrupted as e:
        print(e, e.exit_status)
masked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
print("blocked" if {RELAY, signal.SIGTERM} & masked else "free")
"""


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="POSIX signal masks")
@pytest.mark.parametrize(
    ("sent", "stage", "says"),
    [
        (RELAY, "train", f"stopped by {RELAY.name}"),
        (signal.SIGTERM, "train", "stopped by SIGTERM"),
        (RELAY, "load", f"stopped by {RELAY.name} before its training began {128 + RELAY}"),
        (signal.SIGTERM, "load", "stopped by SIGTERM before its training began 143"),
        (None, "between", f"stopped by {RELAY.name} before its training began {128 + RELAY}"),
    ],
)
def test_a_stop_while_a_worker_starts_or_between_its_handlers_is_held_for_the_next(
    sent, stage, says
):
    """A stop before a worker's first handler (it imports torch for seconds) killed it by the
    signal's default action, and a scheduler's SIGTERM made its run read as failed; one between
    two handlers did the same. Now each is held: training's handler stops the run, and the one
    around loading the dataset ends the worker at once, as a stop."""
    with processes.worker_signals():
        child = subprocess.Popen(
            [sys.executable, "-c", _SLOW_START, stage], stdout=subprocess.PIPE, text=True
        )
    if sent is not None:
        os.kill(child.pid, sent)
    out, _ = child.communicate(timeout=120)
    assert (child.returncode, out.split("\n")) == (0, [says, "free", ""])
    # The parent's mask is back.
    assert not {RELAY, signal.SIGTERM} & signal.pthread_sigmask(signal.SIG_BLOCK, [])


_EXITING = """
import signal, sys, time
from brainprop.signals import RELAY, end_holding, hold_stops

class Teardown:  # torch's, at the interpreter's shutdown, after it has reset the handlers
    def __del__(self):
        print("tearing down", flush=True)
        sys.stdin.readline()  # until the parent has sent its stops

hold_stops()
signal.raise_signal(RELAY)  # a stop after the last run's handler
print("held", end_holding() == RELAY, flush=True)
teardown = Teardown()
"""


def test_a_worker_that_exits_hands_back_its_held_stop_and_is_not_killed():
    """A stop in the worker's shutdown killed it once its run had ended (the run then read as
    failed); one held after the last run is handed back, for the worker's exit status to tell
    the parent, which then stops too."""
    child = subprocess.Popen(
        [sys.executable, "-c", _EXITING], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout.readline() == "held True\n"
    assert child.stdout.readline() == "tearing down\n"
    os.kill(child.pid, signal.SIGTERM)
    os.kill(child.pid, RELAY)
    child.stdin.close()
    assert child.wait(timeout=60) == 0
    child.stdout.close()


@pytest.mark.parametrize(
    "text", ["a short error", "é" * 40_000, "x" + "é" * 40_000], ids=["short", "long", "cut-in-é"]
)
def test_an_error_is_sent_whole_or_cut_to_fit_an_unread_pipe(text):
    """The parent reads the pipe only once the worker ended: a send must never wait for it."""
    receive, send = multiprocessing.Pipe(duplex=False)
    sender = threading.Thread(target=processes.send_error, args=(send, text), daemon=True)
    sender.start()
    sender.join(timeout=30)
    try:
        assert not sender.is_alive(), "the send waited for its reader"
    finally:
        sent = processes.error_sent(receive)
    if len(text) < 100:
        assert sent == text
    else:
        assert sent.lstrip("x").startswith("ééé") and sent.endswith(" bytes more]")
        assert len(sent.encode()) <= processes.ERROR_BYTES
        kept = sent.removesuffix(" bytes more]").rsplit(" [... ", 1)
        assert len(kept[0].encode()) + int(kept[1]) == len(text.encode())
    send.close()
    assert processes.error_sent(receive) is None


def test_an_error_naming_a_path_of_undecodable_bytes_is_sent():
    """Paths come from argv and the file system, decoded with surrogateescape: a strict encode
    raised, and the worker ended in a traceback instead of its one line (review)."""
    receive, send = multiprocessing.Pipe(duplex=False)
    processes.send_error(send, "no run directory at " + os.fsdecode(b"/runs/caf\xe9"))
    assert processes.error_sent(receive) == "no run directory at /runs/caf\\udce9"
