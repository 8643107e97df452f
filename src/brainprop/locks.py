"""Holding a folder for one process: an advisory lock that other brainprop processes respect.

A run directory is held while it trains, and a dataset folder while a download writes into it,
so that a second process doing the same meanwhile neither deletes the first one's files in
progress as leftovers nor writes over them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from .errors import BrainPropError

try:
    import fcntl
except ImportError:  # Windows: nothing is held there.
    fcntl = None  # type: ignore[assignment]


class Busy(BrainPropError):
    """Another process holds the folder (see :func:`held`)."""


#: The filesystems (st_dev) whose lack of locks this process has warned about.
_WARNED: set[int] = set()


@contextlib.contextmanager
def held(folder: Path, busy: str) -> Iterator[None]:
    """Hold ``folder`` until the block ends; raise :class:`Busy` (``busy``, the message) if
    another holds it.

    The lock is a ``flock`` on the folder itself, so it adds no file, and dies with its process
    however that ends. ``flock`` locks belong to one open file, so a second hold in the same
    process is refused too. Where ``fcntl`` has no locks (Windows) nothing is held; where the
    filesystem has none (some network mounts), nothing is held and a warning says so. An NFS
    mount with ``local_lock=flock`` gives locks that hold on one host only, and nothing here
    can tell: two hosts may then both hold a folder.
    """
    fd = _lockable(folder)
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise Busy(busy) from None
            except OSError as e:
                # A filesystem without locks (some network mounts): go on unheld rather than
                # not at all, but say so, once per filesystem (reproduce holds hundreds of
                # run directories).
                device = os.fstat(fd).st_dev
                if device not in _WARNED:
                    _WARNED.add(device)
                    print(
                        f"brainprop: warning: cannot lock {folder} ({e.strerror or e}): nothing "
                        "stops another brainprop process from using it (nor other folders on "
                        "its filesystem) meanwhile",
                        file=sys.stderr,
                    )
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _lockable(folder: Path) -> int | None:
    """An open descriptor of ``folder`` to lock, or None where there is nothing to hold: no
    ``fcntl``, or no such folder (the caller reports it in its own words). A folder that may be
    written and entered but not listed (mode 0300) cannot be opened to lock, yet a run trains
    in it: refused, as two processes trained one run there at once. So is one that cannot be
    opened for another reason (too many open files, say): not used unheld without a word."""
    if fcntl is None or not folder.is_dir():
        return None
    try:
        return os.open(folder, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):  # its path gone since the look above
        return None
    except OSError as e:
        fix = {
            errno.EACCES: "let yourself read it (chmod u+r)",
            errno.EPERM: "let yourself read it (chmod u+r)",
            errno.EMFILE: "let this process open more files (raise ulimit -n)",
            errno.ENFILE: "close other programs, or raise the system's fs.file-max",
        }.get(e.errno, "mend the cause")
        raise BrainPropError(
            f"cannot hold {folder} for this process ({e.strerror or e}): {fix}, then run the "
            "command again"
        ) from None
