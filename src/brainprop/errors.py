"""The one error type users see, its case for a name this process has not registered, how
another error becomes part of its one line, and how that line suggests a command.

Anything that is the user's to fix (a missing file, a bad name, a nonsense hyperparameter)
raises :class:`BrainPropError` with a single line that says what was wrong and how to fix it.
The CLI prints that line and exits with status 2; any other exception is a bug.
"""

from __future__ import annotations

import errno
import functools
import inspect
import os
import re
import shlex
import sysconfig
import traceback
from collections.abc import Callable
from pathlib import Path

import torch


class BrainPropError(Exception):
    """A user-facing error whose message is one line: what went wrong, and the fix."""


class UnknownName(BrainPropError):
    """A rule, network, feedback pathway, preset table or dataset that is not registered in this
    process: a typo, or a registration of one's own whose code has not run here."""


#: The fix for a file or folder this user may not read: no damage, nothing to delete.
PERMISSIONS_FIX = "check its permissions"


def not_permitted(e: PermissionError, where: object) -> str:
    """``e`` in one line: the path it names (else ``where``), why, and the fix. Where a folder
    on the way to that path may not be entered, that folder is named: the file's own
    permissions, which the message would send the user to, are then not the cause."""
    # A call on an open file names its descriptor, a number: no path to walk.
    named = isinstance(e.filename, (str, bytes)) and e.filename
    path = Path(os.fsdecode(e.filename)) if named else None
    if path is not None and (barred := barred_folder(path)):
        return f"cannot look inside {barred} ({e.strerror or e}) to reach {path}: {PERMISSIONS_FIX}"
    return f"cannot open {path or where} ({e.strerror or e}): {PERMISSIONS_FIX}"


#: The longest name of a file or folder, in bytes, on the usual file systems (NAME_MAX).
NAME_MAX = 255


def unusable_path(e: OSError) -> str | None:
    """``e`` in one line where it says a path cannot be used at all, whatever the command did
    with it: too long (pathlib's exists() and is_dir() raise that, in Python 3.11, wherever a
    path is first looked at) or through a loop of symbolic links (a file opened); else None."""
    if e.errno not in (errno.ENAMETOOLONG, errno.ELOOP):
        return None
    named = isinstance(e.filename, (str, bytes))
    path = os.fsdecode(e.filename) if named else "a path given"
    if e.errno == errno.ELOOP:
        fix = "pass a path without a loop of symbolic links"
    elif named and any(len(os.fsencode(name)) > NAME_MAX for name in Path(path).parts):
        fix = f"pass a path whose every name is at most {NAME_MAX} bytes"
    else:
        fix = "pass a shorter path"
    return f"cannot use {path} ({e.strerror or e}): {fix}"


def barred_folder(path: Path) -> Path | None:
    """The outermost folder above ``path`` that this user may not enter, or None: looking a
    file up needs only its folders' permissions. Walked as given, as the kernel resolves it:
    a relative path from the working folder, which one may be inside without being allowed
    into the folders above it."""
    barred = [p for p in path.parents if not os.access(p, os.X_OK)]
    return barred[-1] if barred else None


def command(*words: object) -> str:
    """A command a message suggests, in the single quotes that mark it, each word as a shell
    must be given it: a folder the shell would split or expand (spaces, ``$``) goes in double
    quotes, with the characters double quotes leave to the shell escaped, so that the command
    pasted reaches the folder named."""
    return "'" + " ".join(_shell_word(str(w)) for w in words) + "'"


def _shell_word(text: str) -> str:
    if shlex.quote(text) == text:
        return text
    quoted = '"' + re.sub(r'([\\"$`])', r"\\\1", text) + '"'
    # An interactive shell expands ! (history) inside double quotes, and keeps a backslash
    # before it there: it goes outside them, escaped.
    return quoted.replace("!", '"\\!"')


def kind_of(value: object) -> str:
    """``value``'s type for a message, with its article: ``a list``, ``an int``."""
    name = type(value).__name__
    return f"{'an' if name[0].lower() in 'aeiou' else 'a'} {name}"


def reason(exc: BaseException) -> str:
    """The first line of ``exc``'s message (or its type name), safe to embed in one line."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def described(exc: Exception) -> str:
    """``exc`` in one line: brainprop's own errors in their words, which say what to do;
    another's after its type, which names it."""
    return (
        reason(exc) if isinstance(exc, BrainPropError) else f"{type(exc).__name__}: {reason(exc)}"
    )


#: Where the code lies that one's own code runs on: brainprop's, torch's, and the standard
#: library's (:func:`in_library`).
LIBRARIES = (Path(__file__).resolve().parent, Path(torch.__file__).resolve().parent)
_STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()


def in_library(path: Path) -> bool:
    """Whether the file ``path`` (resolved) is the library's: under :data:`LIBRARIES`, or
    Python's own, less the packages installed beside it (/usr/lib/python3.X/site-packages on
    some systems), which are one's own as much as any."""
    if any(path.is_relative_to(library) for library in LIBRARIES):
        return True
    installed = {"site-packages", "dist-packages"} & set(path.parts)
    return path.is_relative_to(_STDLIB) and not installed


def _defining(code: object) -> object:
    """What holds ``code``'s source: a function, method or class itself; a callable object's
    class."""
    if inspect.isfunction(code) or inspect.ismethod(code) or isinstance(code, type):
        return code
    return type(code)


def source_file(code: object) -> Path | None:
    """The file that defines ``code`` itself (a callable object: its class), not what it wraps;
    None for a built-in, or code typed into the interpreter (its "file" is ``<stdin>``)."""
    try:
        source = inspect.getsourcefile(_defining(code))  # type: ignore[arg-type]
    except TypeError:
        return None
    return Path(source).resolve() if source and Path(source).is_file() else None


def source_lines(code: object) -> range | None:
    """The lines of its file that ``code`` (a function, a method, a class; a callable object:
    its class) spans, decorators included; None where its source cannot be read. Unlike
    ``inspect.getsourcelines``, a function's own lines, not those of what it wraps."""
    code = _defining(code)
    code = getattr(code, "__func__", code)  # a bound method
    try:
        lines, first = inspect.getsourcelines(getattr(code, "__code__", code))
    except (OSError, TypeError):
        return None
    return range(max(first, 1), max(first, 1) + len(lines))


def wrapping(code: Callable[..., object]) -> list[Callable[..., object]]:
    """``code`` and what it wraps, outermost first: a ``partial``'s function, and what each
    decorator (``functools.wraps``' ``__wrapped__``) wraps."""
    while isinstance(code, functools.partial):
        code = code.func
    chain = [code]
    while hasattr(chain[-1], "__wrapped__"):
        inner = chain[-1].__wrapped__
        if any(inner is seen for seen in chain):  # a wrapper that wraps itself, in the end
            break
        chain.append(inner)
    return chain


def unwrapped(code: Callable[..., object]) -> Callable[..., object]:
    """One's own ``code`` past what wraps it: the innermost of :func:`wrapping` that is not the
    library's (:func:`in_library`), where one's own lines are; the innermost where all are.
    Past a library's decorator (``@torch.no_grad()``) to one's own function, past one's own
    decorator to the function it decorates, but not past one's own wrapper of the library's
    code (``functools.wraps(dense)``), whose error would name the library's line."""
    chain = wrapping(code)
    own = [f for f in chain if (path := source_file(f)) is not None and not in_library(path)]
    return (own or chain)[-1]


def defined_in(code: Callable[..., object]) -> Path | None:
    """The file that defines ``code``, one's own function or callable object (a ``partial``'s
    function, a decorated function, a callable object's class), if there is one: where
    :func:`raised` looks."""
    return source_file(unwrapped(code))


def not_taking(code: Callable[..., object], *args: object, **kwargs: object) -> str | None:
    """``code`` as its name and signature (``load(root)``) where that signature cannot take
    ``args`` and ``kwargs``: asked as one's own code is registered, before any call. None where
    it can, or where it has no signature to read (some built-ins): its call tells then."""
    try:
        signature = inspect.signature(code)
    except (TypeError, ValueError):
        return None
    try:
        signature.bind(*args, **kwargs)
    except TypeError:
        return f"{getattr(code, '__name__', type(code).__name__)}{signature}"
    return None


def definition(code: Callable[..., object]) -> str | None:
    """``file:line`` where one's own ``code`` (as :func:`defined_in` finds it) is defined."""
    code = unwrapped(code)
    path, lines = source_file(code), source_lines(code)
    return f"{path}:{lines.start}" if path is not None and lines is not None else None


def raised(e: Exception, path: Path | None, code: Callable[..., object] | None = None) -> str:
    """What one's own code (a plugin, a dataset's loader) raised, in one line: the error, and
    where in the file ``path`` (else where at all) it was raised; a SyntaxError says its line
    itself. An error with no frame in ``path`` came from calling ``code`` (where given) or
    from what it returned: then the line that defines ``code`` is named beside it."""
    frames = traceback.extract_tb(e.__traceback__)
    own = [f for f in frames if path is not None and Path(f.filename).resolve() == path]
    where = (own or frames)[-1] if frames and not isinstance(e, SyntaxError) else None
    at = f" ({where.filename}:{where.lineno})" if where is not None else ""
    defined = definition(code) if code is not None and not own and where is not None else None
    if defined is not None:
        at = (
            f" ({where.filename}:{where.lineno}, calling the code {defined} defines: check its "
            "parameters and what it returns)"
        )
    # brainprop's own errors (an entry a registry refused) say what is wrong in their words.
    return described(e) + at
