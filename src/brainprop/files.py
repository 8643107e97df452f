"""Writing files so that nothing is lost: atomic writes, folders checked before long work.

A write goes to a temporary file in the same folder, is fsynced, then renamed over the target
and the folder fsynced: a crash at any instant leaves either the old file or the new one, never
half of one. Every file brainprop writes (checkpoints, a run's records, reports, measurements,
caches) goes through :func:`atomic_write`.
"""

from __future__ import annotations

import errno
import io
import json
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import plugins
from .errors import BrainPropError


def make_folder(
    folder: Path, fix: str = "pass as --out a folder you can write to, not a file"
) -> None:
    """Create ``folder`` and its parents and check that it takes files, or say in one line why
    it cannot and ``fix``: callers make it before long work, which should not end unwritten."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BrainPropError(f"cannot create the folder {folder} ({why(e)}): {fix}") from None
    try:
        probe_write(folder)
    except OSError as e:
        raise BrainPropError(f"cannot write into {folder} ({e.strerror or e}): {fix}") from None


def why(e: OSError) -> str:
    """``e``'s reason for a message; where a folder could not be made because a symbolic link
    that leads nowhere, or into a loop of links, holds its name (which the system calls "File
    exists"), that link."""
    if e.errno == errno.EEXIST and isinstance(e.filename, (str, bytes)):
        path = Path(os.fsdecode(e.filename))
        for link in (path, *path.parents):
            if link.is_symlink() and not link.exists():
                try:
                    os.path.realpath(link, strict=True)
                except OSError as broken:
                    looped = broken.errno == errno.ELOOP
                else:
                    looped = False
                where = "into a loop of links" if looped else "nowhere"
                return f"{link} is a symbolic link to {os.readlink(link)}, which leads {where}"
    return e.strerror or str(e)


def probe_write(folder: Path) -> None:
    """Make a file in ``folder`` and leave no trace of it; OSError where it cannot be made."""
    # An unnamed file (O_TMPFILE on Linux) that vanishes on close: a write, and no trace.
    with tempfile.TemporaryFile(dir=folder):
        pass


#: What the names of :func:`atomic_write`'s temporary files match.
TEMPORARIES = ".*.tmp"


def atomic_write(
    path: str | Path, write: Callable[[io.BufferedWriter], None], *, keep_mode: bool = False
) -> None:
    """Write ``path`` through ``write(file)`` so that readers see the old or the new file only.
    The new file gets the permissions of any new file under the umask or, with ``keep_mode``,
    those of the file it replaces where there is one: a file of one's own that brainprop
    rewrites in part, such as a README, keeps the permissions its owner gave it."""
    path = Path(path)
    try:
        mode = stat.S_IMODE(path.stat().st_mode) if keep_mode else None
    except FileNotFoundError:
        mode = None
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is None:
                usual_permissions(fd)
            else:
                os.fchmod(fd, mode)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _write_error(path, e) from None
        raise
    _fsync_dir(path)


def usual_permissions(fd: int) -> None:
    """Give a file that ``mkstemp`` made owner-only the permissions of any new file under the
    umask: a run's results or a shared data root stay readable to whom they usually are."""
    os.fchmod(fd, 0o666 & ~_umask())


def _umask() -> int:
    # Linux says it in /proc; elsewhere reading the umask means setting it, for a moment in
    # which another thread's new files would get none.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def atomic_write_figure(path: str | Path, fig: Any, dpi: int) -> None:
    """Write a matplotlib figure as a PNG, atomically like every other file of a run."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def copy(source: str | Path, target: str | Path) -> None:
    """Copy the file ``source`` to ``target`` atomically."""
    data = Path(source).read_bytes()
    atomic_write(target, lambda f: f.write(data))


def remove_temporaries(folder: str | Path) -> None:
    """Delete the temporary files that writers killed mid-write (SIGKILL, power loss) left in
    ``folder``; each may be as large as a checkpoint. A folder of that name is no writer's, and
    is left; a file that cannot be deleted is a one-line error (a traceback before, review)."""
    for tmp in Path(folder).glob(TEMPORARIES):
        if tmp.is_dir() and not tmp.is_symlink():
            continue
        try:
            tmp.unlink(missing_ok=True)
        except OSError as e:
            raise BrainPropError(
                f"cannot delete {tmp}, a file left by a write that was cut short "
                f"({e.strerror or e}): delete it, then run the command again"
            ) from None


def _write_error(path: Path, e: OSError) -> BrainPropError:
    # A full disk (ENOSPC, or EDQUOT past a quota) is the common case on long runs.
    kept = f"{path.name} keeps its previous content" if path.exists() else "nothing was written"
    return BrainPropError(
        f"cannot write {path} ({e.strerror or e}); {kept}: free disk space or fix the folder's "
        f"permissions, then {_then(path)}"
    )


def _then(path: Path) -> str:
    """What to do once a failed write of ``path`` is fixed: a run directory (every one holds
    its config.json, rundir.CONFIG) continues where it stopped; a bench, report or download is
    simply run again."""
    if (path.parent / "config.json").is_file():
        resume = plugins.resume_command(path.parent)
        return (
            f"continue the run with {resume}, or, where "
            "'brainprop reproduce' started it, with the same reproduce command"
        )
    return "run the command again"


#: What fsync of a directory raises where the filesystem cannot sync one (some network and
#: FUSE filesystems): no failure of the write, which the rename made as durable as it can be.
_NO_DIRECTORY_SYNC = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF}


def _fsync_dir(path: Path) -> None:
    """Sync the folder of ``path``, just renamed into place: the rename itself is durable only
    once the directory entry is on disk."""
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return  # a folder one may write in but not list: its entry syncs with the filesystem
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _NO_DIRECTORY_SYNC:
            raise BrainPropError(
                f"cannot sync {path.parent} to disk ({e.strerror or e}): the new {path.name} may "
                f"not survive a crash; check the disk, then {_then(path)}"
            ) from None
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str, *, keep_mode: bool = False) -> None:
    atomic_write(path, lambda f: f.write(text.encode()), keep_mode=keep_mode)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
