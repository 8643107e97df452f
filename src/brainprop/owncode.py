"""The code of a run that is the user's own (a registered rule, feedback pathway ``read``,
network and its modules), and an error it raised in the run, in one line.

The library tries such code before a run starts, on one made-up batch at most; what fails only
later (on a batch the try never saw, in an evaluation) stops the run with a
:class:`~brainprop.errors.BrainPropError` worded here, naming the line of the user's code,
rather than a traceback that reads as a bug of the library's. An error raised in the library's
code (or torch's) keeps its traceback: that is a bug to report. An error is the user's where a
frame of its traceback lies in the user's code; where the user's code only returned something
that the library's code later failed on, no frame does, and the traceback stays.
"""

from __future__ import annotations

import hashlib
import inspect
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .config import TrainConfig
from .devices import ran_out_of_memory
from .distributed import LostOthers
from .errors import BrainPropError, in_library, raised, source_file, source_lines, wrapping
from .feedback import PATHWAYS, ReadRefused
from .objectives import OBJECTIVES, Objective, make_objective
from .presets import ARCHITECTURES


class OwnCodeFailed(BrainPropError):
    """A run stopped by an error of its own code: ``failure`` names it (:func:`failure`), the
    message adds how to continue the run once the code is mended, which a caller that runs the
    run (``reproduce``) may word in its own terms."""

    def __init__(self, failure: str, how_to_continue: str) -> None:
        super().__init__(f"{failure}: fix it; {how_to_continue}")
        self.failure = failure


@dataclass(frozen=True)
class OwnCode:
    """One piece of a run's own code: what it is (``rule 'mine'``), its file, and the lines
    of that file it spans (a rule and a network may share a file)."""

    what: str
    path: Path
    lines: range


def of_run(config: TrainConfig, objective: Objective, model: nn.Module) -> list[OwnCode]:
    """The own code a run of ``config`` runs: its rule (``objective``), its pathway's
    ``read``, its network's builder and the classes of ``model``'s modules, where they are not
    the library's (:func:`~brainprop.errors.in_library`: an error raised in it, with none of
    the user's frames on the way, is the library's, and a rule registered as ``BrainProp(0.2)``
    is the library's code under a name of one's own)."""
    pieces: list[tuple[str, Callable[..., object]]] = []
    if config.rule not in OBJECTIVES.builtin:
        pieces.append((f"rule {config.rule!r}", objective))
    pathway = PATHWAYS.get(config.feedback)
    if config.feedback not in PATHWAYS.builtin and pathway is not None and pathway.read is not None:
        pieces.append((f"feedback {config.feedback!r}", pathway.read))
    if config.arch not in ARCHITECTURES.builtin:
        network = f"network {config.arch!r}"
        pieces.append((network, ARCHITECTURES[config.arch][0]))
        pieces.extend((network, type(m)) for m in model.modules())
    return _own(pieces)


def _own(pieces: list[tuple[str, Callable[..., object]]]) -> list[OwnCode]:
    """The lines of each ``(what, code)`` that are not the library's, each span once; all of
    its file where they cannot be told."""
    own: list[OwnCode] = []
    for what, code in pieces:
        for source in _sources(code):
            path = source_file(source)
            if path is None or in_library(path):
                continue
            lines = source_lines(source)
            piece = OwnCode(what, path, range(1, 2**31) if lines is None else lines)
            if piece not in own:
                own.append(piece)
    return own


def changed(before: dict[str, str], now: dict[str, str]) -> str | None:
    """The first piece (``rule 'mine'``) whose :func:`digests` differ between ``before`` and
    ``now``, a piece present in one only included; None where none does."""
    return next(
        (w for w in sorted(before.keys() | now.keys()) if before.get(w) != now.get(w)), None
    )


def digests(rule: str, feedback: str) -> dict[str, str]:
    """What ``reproduce`` knows a rule and a feedback pathway of one's own by besides their
    names, so that runs measured with other code under the same name are not taken for this
    code's: for each of the two that is one's own (``rule 'mine'``, ``feedback 'sparse'``), a
    digest of the lines of its code, where they are not the library's. A rule's are those of
    the function registered and of the objective it makes (its class and its own bases); a
    pathway's, those of its ``make`` and ``read``. Not the files' paths, so that measurements
    merged in from another machine compare; nor the lines of helpers that code calls, whose
    changes go unseen. Empty where both are the library's (or typed into the interpreter).

    The lines are read from the files as they are now, by the line numbers of the code
    imported: taken as a session starts, before a file can be edited under it."""
    pieces: list[tuple[str, Callable[..., object]]] = []
    if rule not in OBJECTIVES.builtin:
        what = f"rule {rule!r}"
        # The objective reproduce's runs make: the fast path's (it has no --eager).
        pieces += [(what, OBJECTIVES[rule]), (what, make_objective(rule, fused=True))]
    pathway = PATHWAYS.get(feedback)
    if feedback not in PATHWAYS.builtin and pathway is not None:
        what = f"feedback {feedback!r}"
        pieces += [(what, code) for code in (pathway.make, pathway.read) if code is not None]
    files: dict[Path, list[str]] = {}
    texts: dict[str, list[str]] = {}
    for piece in _own(pieces):
        if piece.path not in files:
            # Lines as Python numbers them: splitlines() would split at a form feed too.
            files[piece.path] = piece.path.read_text(encoding="utf-8", errors="replace").split("\n")
        text = "\n".join(files[piece.path][piece.lines.start - 1 : piece.lines.stop - 1])
        if text not in texts.setdefault(piece.what, []):
            texts[piece.what].append(text)
    return {
        what: hashlib.blake2b("\n\0".join(parts).encode(), digest_size=8).hexdigest()
        for what, parts in texts.items()
    }


def _sources(code: Callable[..., object]) -> list[Callable[..., object]]:
    """What holds the lines ``code`` runs: each function of it and what it wraps
    (:func:`~brainprop.errors.wrapping`: one's own decorator and the function it decorates);
    a class, or a callable object's class, with every class it inherits from, whose methods
    (those of one's own base class) it runs too."""
    sources: list[Callable[..., object]] = []
    for part in wrapping(code):
        if inspect.isfunction(part) or inspect.ismethod(part):
            sources.append(part)
        else:
            sources.extend((part if isinstance(part, type) else type(part)).__mro__)
    return sources


def failure(own: list[OwnCode], e: Exception, when: str) -> str | None:
    """``e``, which a run raised ``when``, in one line naming what of ``own`` failed and the
    line of its code that raised it; None where none of ``own`` was running (the library's
    code failed), or the machine ran out of memory, the output's reader went away or the other
    processes did (a collective inside one's own network), which the callers word.

    The innermost frame in ``own``'s lines names the piece, or for a B that a pathway's read
    returned and the library refused, the pathway. An error raised while handling
    another (a CUDA graph's capture ended by the user's error) is the user's where the first
    is."""
    if ran_out_of_memory(e) or isinstance(e, BrokenPipeError | LostOthers):
        return None
    if isinstance(e, ReadRefused) and any(piece.what == e.pathway for piece in own):
        return f"{e.pathway} failed {when}: {e.problem}"
    seen: set[int] = set()
    error: BaseException | None = e
    while isinstance(error, Exception) and id(error) not in seen:
        seen.add(id(error))
        for frame in reversed(traceback.extract_tb(error.__traceback__)):
            path = Path(frame.filename).resolve()
            for piece in own:
                if piece.path == path and frame.lineno in piece.lines:
                    return f"{piece.what} failed {when}: {raised(error, path)}"
        # A context put aside (raise ... from None) was replaced by a message of its own.
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return None
