"""A child process that shares the terminal with others, as ``reproduce --jobs`` starts them:
its lines tagged with whose they are, its death with its parent, no SIGINT from its start, and
no stop lost before it can take one.

Nothing here knows about training: :mod:`brainprop.experiments` runs its worker processes with
these.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any, TextIO


def tag_stderr(tag: str) -> None:
    """Start each line this process writes to stderr through Python (print, warnings, logging,
    a traceback) with ``tag``. Logging handlers made before (torch's, on import) hold the old
    stream and are pointed at the new one; what C++ code writes to file descriptor 2 is not
    tagged."""
    old = sys.stderr
    sys.stderr = TaggedLines(old, tag)
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):
            if isinstance(handler, logging.StreamHandler) and handler.stream is old:
                handler.setStream(sys.stderr)


class TaggedLines(io.TextIOBase):
    """A text stream that writes each line to ``stream`` after ``"<tag>: "``, in one write and
    a flush, so that processes sharing a terminal or file never cut into each other's lines.

    A line is held until its end (``print`` writes its text and its newline apart); a flush
    writes what there is of it, and the rest follows untagged.
    """

    def __init__(self, stream: TextIO, tag: str) -> None:
        self._stream, self._lead = stream, f"{tag}: "
        self._held = ""
        self._midline = False  # a flush wrote the start of the current line, tag and all

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *lines, self._held = (self._held + text).split("\n")
        if lines:
            whole = f"\n{self._lead}".join(lines) + "\n"
            self._put(whole if self._midline else self._lead + whole)
            self._midline = False
        return len(text)

    def flush(self) -> None:
        if self._held:
            self._put(("" if self._midline else self._lead) + self._held)
            self._held, self._midline = "", True
        else:
            self._stream.flush()

    def _put(self, text: str) -> None:
        self._stream.write(text)
        self._stream.flush()

    # Those who ask (faulthandler, a library checking for a terminal, code that writes bytes
    # to the buffer, untagged) get the stream's own.
    def fileno(self) -> int:
        return self._stream.fileno()

    def isatty(self) -> bool:
        return self._stream.isatty()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._stream.encoding

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return self._stream.errors

    def __getattr__(self, name: str) -> Any:
        if name == "_stream":  # asked before __init__ set it: no endless recursion
            raise AttributeError(name)
        return getattr(self._stream, name)


def die_with_parent(parent: int) -> None:
    """On Linux, have this process get a stop (:data:`~brainprop.signals.RELAY`) when
    ``parent`` (the pid that started it) dies.

    Out of the terminal's process group, a worker would outlive a SIGKILLed parent and keep
    writing its run directory while a rerun resumes that same directory in a second process.
    The stop makes it checkpoint and end, as a first SIGTERM does, even where a scheduler's
    SIGTERM reached it too. Elsewhere nothing is done.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    from .signals import RELAY

    pr_set_pdeathsig = 1  # from <linux/prctl.h>
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, int(RELAY), 0, 0, 0)
    # A parent that died before prctl sends nothing: this process was already handed to another.
    if os.getppid() != parent:
        sys.exit(128 + signal.SIGTERM)


#: The most bytes of its error's text a worker sends (:func:`send_error`).
ERROR_BYTES = 2048


def send_error(send: Connection, error: str) -> None:
    """Send the parent ``error``, the one line that says why this worker failed, cut to
    :data:`ERROR_BYTES`: the parent reads it only once the worker has ended, and a message
    larger than the pipe holds (64 KiB; 4 KiB where a user is over Linux's
    pipe-user-pages-soft) would wait for that reader for good, and the worker never end."""
    # A path of bytes that are not UTF-8 reaches Python as lone surrogates (PEP 383), which a
    # strict encode refuses: the worker would end in a traceback, its one line lost.
    data = error.encode(errors="backslashreplace")
    error = data.decode()
    if len(data) > ERROR_BYTES:
        head = data[: ERROR_BYTES - 64].decode(errors="ignore")  # room for the note of the cut
        error = f"{head} [... {len(data) - len(head.encode())} bytes more]"
    send.send(error)


def error_sent(receive: Connection) -> str | None:
    """The error a worker sent before exiting, if any (end of file: it sent none)."""
    try:
        return receive.recv() if receive.poll() else None
    except EOFError:
        return None


@contextlib.contextmanager
def worker_signals() -> Iterator[None]:
    """Processes started within the block ignore SIGINT for good, and start with SIGTERM and
    :data:`~brainprop.signals.RELAY` blocked.

    - SIGINT: an ignored signal stays ignored through exec, and training keeps it so. A worker
      is in the terminal's process group until it has imported torch and left it, and a Ctrl-C
      there killed it with a traceback while the parent was stopping it properly. The parent's
      handler is back right after the start; a Ctrl-C in those milliseconds is lost.
    - SIGTERM and RELAY: a stop in the seconds before the worker's first handler (importing
      torch) killed it by the signal's default action, and a scheduler's SIGTERM that reached
      it before its parent made its run read as failed ("killed by SIGTERM"). A blocked signal
      stays blocked through exec and waits, pending, for the worker to hold its stops
      (:func:`~brainprop.signals.hold_stops`), which ends it before its run begins or stops
      the run with its checkpoint.
    """
    from multiprocessing import resource_tracker

    from .signals import RELAY

    # multiprocessing starts its resource tracker with the first process and unblocks SIGTERM
    # after (it unblocks what it blocked instead of restoring the mask): started within the
    # block, it would leave the first worker's SIGTERM unblocked.
    resource_tracker.ensure_running()
    held = None
    if hasattr(signal, "pthread_sigmask"):
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, RELAY})
    try:
        if threading.current_thread() is not threading.main_thread():
            # Python installs handlers in the main thread only; a reproduce run from another
            # thread leaves SIGINT to that thread's program (signals.stop_on_signals does too).
            yield
            return
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
    finally:
        if held is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
