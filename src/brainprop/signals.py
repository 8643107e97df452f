"""Stopping a run cleanly on SIGINT (Ctrl-C) or SIGTERM (``kill``, a batch scheduler).

A first signal only sets a flag, which the training loop reads after every step: the step in
flight finishes, the state is checkpointed and :class:`Interrupted` carries the message saying
how to resume. A second signal raises ``KeyboardInterrupt`` at once, for someone who will not
wait for the checkpoint; the atomic writes still leave the previous checkpoint whole. A SIGTERM
within :data:`SAME_STOP_S` of a first SIGTERM is no second signal (see there).

:data:`RELAY` is how a process passes a stop on to the processes it started (``reproduce
--jobs``): it asks for the same stop as a first signal, and never quits at once. A batch
scheduler (SLURM's ``scancel``, systemd) sends SIGTERM to every process of a job: a worker
then gets the scheduler's SIGTERM and its parent's stop, which, were the stop a second
SIGTERM, would make it quit without its checkpoint. A worker holds a stop that comes outside its
handlers for the next one (:func:`hold_stops`); work with nothing to save yet quits at once
(:func:`quit_on_signals`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: A stop passed on by a parent process (SIGTERM where the platform has no SIGUSR1). It
#: stops as a first SIGTERM does, and the stop it reports is its own.
RELAY: signal.Signals = getattr(signal, "SIGUSR1", signal.SIGTERM)
#: A SIGTERM this soon after a first SIGTERM is the same stop, not a second signal: a scheduler
#: (SLURM, systemd) sends SIGTERM to every process of a job, and a launcher among them
#: (torchrun) passes its own on to its workers at once, so each gets two. No one typing
#: ``kill`` twice to quit at once is that quick, and Ctrl-C (SIGINT) is not delayed.
SAME_STOP_S = 5.0


class StopRequest:
    """Set by the first SIGINT/SIGTERM; the loop polls :attr:`requested` between steps."""

    def __init__(self) -> None:
        self.signum: int | None = None
        #: The second signal, which quits at once (``KeyboardInterrupt``) without the checkpoint
        #: unless :func:`stop_on_signals` was given ``on_again``.
        self.again: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "no signal"

    def interrupted(self, what: str) -> Interrupted:
        """The error that reports this request: "stopped by SIGTERM ``what``", with the exit
        status of that signal."""
        assert self.signum is not None, "no stop was requested"
        return Interrupted(f"stopped by {self.name} {what}", self.signum)

    def quit_at_once(self, what: str) -> Interrupted:
        """The error that reports the second signal's ``KeyboardInterrupt``: "stopped at once by
        a second signal; ``what``", with the exit status of that signal (SIGTERM twice from a
        scheduler is 143, not Ctrl-C's 130)."""
        return Interrupted(
            f"stopped at once by a second signal; {what}", self.again or signal.SIGINT
        )


def first_note(signum: int, doing: str) -> str:
    """The line that answers the first ``signum``: what the process is ``doing`` about it, and
    how to quit at once instead (send it again; a SIGTERM only after :data:`SAME_STOP_S`, as a
    sooner one is the same stop). A relayed stop has no such way: its sender waits for it."""
    name = signal.Signals(signum).name
    if signum == RELAY != signal.SIGTERM:
        return f"{name} (a stop passed on): {doing}"
    again = f" after {SAME_STOP_S:g} s" if signum == signal.SIGTERM else ""
    return f"{name}: {doing} (send it again{again} to quit at once)"


class Interrupted(KeyboardInterrupt):
    """Training stopped on a signal; the message says what was saved and how to resume.

    A ``KeyboardInterrupt``, as Ctrl-C's own: it passes ``except Exception`` and ``except
    BrainPropError``, so a loop of runs that skips the ones that fail still stops.
    ``exit_status`` is the shell convention for death by that signal, 128 + its number.
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_status = 128 + signum


class OutputClosed(BrokenPipeError):
    """A run's output lost its reader (``brainprop train ... | head``), which stops the run as
    a signal does, but with the checkpoint of the last finished epoch: the message says what the
    run keeps and how to continue it."""


@contextlib.contextmanager
def stop_on_signals(
    on_first: Callable[[int], None] | None = None,
    *,
    on_again: Callable[[int], None] | None = None,
) -> Iterator[StopRequest]:
    """Within the block, SIGINT and SIGTERM set the yielded flag instead of killing, and so
    does :data:`RELAY`, which never counts as a second signal; neither does a SIGTERM within
    :data:`SAME_STOP_S` of a first SIGTERM. A stop held for the block (:func:`hold_stops`) is its
    first signal.

    ``on_first(signum)`` runs on the first signal (to tell the user a checkpoint is coming).
    A second signal raises ``KeyboardInterrupt``, or, given ``on_again``, calls
    ``on_again(signum)`` instead (a process that must wait for others, whatever it is sent).
    The previous handlers come back on exit. An ignored SIGINT or SIGTERM stays ignored (see
    :func:`_watched`).
    Outside the main thread Python cannot install handlers, so there the flag never rises and
    the defaults stay in force.
    """
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    # The first signal sent to this process itself (not relayed), and when it came.
    first: tuple[int, float] | None = None

    def note(say: Callable[[int], None] | None, signum: int) -> None:
        if say is not None:
            # A signal that lands while the same stream is being written makes this print a
            # reentrant write, which Python refuses with RuntimeError; one whose reader went
            # away raises an OSError (a broken pipe), which the loop's next line of output
            # meets again. The note is a courtesy; the stop is recorded either way, and must
            # not turn into an error raised in whatever the loop was doing.
            with contextlib.suppress(RuntimeError, OSError):
                say(signum)

    def request(signum: int) -> None:
        stop.signum = signum
        note(on_first, signum)

    def handle(signum: int, _frame: object) -> None:
        nonlocal first
        now = time.monotonic()
        if first is not None:
            earlier, at = first
            if signum == earlier == signal.SIGTERM and now - at < SAME_STOP_S:
                return
            stop.again = signum
            if on_again is not None:
                note(on_again, signum)
                return
            raise KeyboardInterrupt
        first = (signum, now)
        if not stop.requested:
            request(signum)

    def relayed(signum: int, _frame: object) -> None:
        if not stop.requested:
            request(signum)

    def handler(signum: int) -> Callable[[int, object], None]:
        return handle if signum in SIGNALS else relayed

    with _handled(handler):
        held = _take_held()
        if held is not None:
            handler(held)(held, None)
        yield stop


@contextlib.contextmanager
def quit_on_signals(what: str) -> Iterator[None]:
    """Within the block, SIGINT, SIGTERM and :data:`RELAY` raise :class:`Interrupted` ("stopped
    by SIGUSR1 ``what``") at once, with that signal's exit status: for work with nothing to save
    (a worker loading its dataset), which a stop should end as a stop, not as a death by the
    signal that reads as a failure. A stop held for it (:func:`hold_stops`) raises on entry. The
    signals are those of :func:`stop_on_signals` (an ignored SIGINT or SIGTERM stays ignored),
    and outside the main thread nothing changes, as there."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stopped(signum: int, _frame: object) -> NoReturn:
        raise Interrupted(f"stopped by {signal.Signals(signum).name} {what}", signum)

    with _handled(lambda _signum: stopped):
        held = _take_held()
        if held is not None:
            stopped(held, None)
        yield


@contextlib.contextmanager
def _handled(handler: Callable[[int], Callable[[int, object], Any]]) -> Iterator[None]:
    """Within the block, each signal of :func:`_watched` goes to ``handler(signum)``; the
    previous handlers come back after it, every one of them, whatever signals come meanwhile.

    signal.signal() runs a pending signal's handler first, and one of ours raises: a stop
    that came as the block ended broke off the restore, and a signal left with our handler
    raised later, in code that expects none (review). So each previous handler is noted before
    ours replaces it, and the restore goes on to the last before the first stop it met is
    raised."""
    previous: dict[int, Any] = {}
    try:
        for s in _watched():
            previous[s] = signal.getsignal(s)
            signal.signal(s, handler(s))
        yield
    finally:
        stop: BaseException | None = None
        for s, old in previous.items():
            while True:
                try:
                    signal.signal(s, old)
                    break
                except BaseException as e:  # the stop a pending signal raised: taken below
                    stop = stop or e
        if stop is not None:
            raise stop


#: The stop a process got while it held stops (:func:`hold_stops`), for the next
#: :func:`stop_on_signals` or :func:`quit_on_signals` to take.
_held: int | None = None


def hold_stops() -> None:
    """Until :func:`end_holding`, a SIGTERM or :data:`RELAY` that comes outside
    :func:`stop_on_signals` and :func:`quit_on_signals` is held for the next of them to take,
    instead of killing the process; the two are unblocked, so one that came while they were
    blocked (:func:`~brainprop.processes.worker_signals`) is held now.

    For a ``reproduce --jobs`` worker, whose runs are stopped by these signals at any moment of
    its life: importing torch, between loading its dataset and training, between two runs. A
    blocked signal cannot cover those moments for good, as each thread has its own mask and
    torch's threads start with whatever the main thread's was then; a handler is the process's.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for s in _watched() - {signal.SIGINT}:
        signal.signal(s, _hold)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, RELAY})


def end_holding() -> int | None:
    """Ignore SIGTERM and :data:`RELAY` from now on, and return the stop held, if any, for the
    exit status. For a process about to exit, with nothing left to stop: interpreter shutdown
    sets every handled signal back to its default before torch's teardown (some hundred
    milliseconds), where a stop killed a worker whose run had ended, and the run read as
    failed."""
    if threading.current_thread() is not threading.main_thread():
        return None
    for s in {signal.SIGTERM, RELAY}:
        signal.signal(s, signal.SIG_IGN)
    return _take_held()


def _hold(signum: int, _frame: object) -> None:
    global _held
    if _held is None:
        _held = signum


def _take_held() -> int | None:
    global _held
    held, _held = _held, None
    return held


def _watched() -> set[int]:
    """The stop signals to handle: :data:`SIGNALS`, less those the process ignores, and
    :data:`RELAY`. An ignored signal stays ignored, as plain Python leaves it: a shell starts a
    background job ('brainprop train ... &' in a script) with SIGINT ignored, so that a Ctrl-C
    meant for the foreground does not stop it. RELAY is this project's own stop, which a
    worker inherits ignored from a parent started so (``trap '' USR1``): ignored, the parent's
    stop and its death would both pass unseen, and the worker train on for hours."""
    kept = {s for s in SIGNALS if signal.getsignal(s) != signal.SIG_IGN}
    return kept | ({RELAY} if RELAY not in SIGNALS else set())
