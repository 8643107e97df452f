"""Pieces of the one-line messages that :class:`BrainPropError` carries."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from ..errors import command

#: How a quick file check words a file it could not open or read, which is no sign of damage.
UNREADABLE = "cannot be read"


#: What :func:`not_a_file` finds in a file's place, by its type's test.
_KINDS = {
    stat.S_ISDIR: "a folder",
    stat.S_ISFIFO: "a named pipe",
    stat.S_ISSOCK: "a socket",
    stat.S_ISCHR: "a device",
    stat.S_ISBLK: "a device",
}
#: How :func:`not_a_file` words it; what it holds may be the user's, so the fix is to move or
#: remove it, never to delete it as damage.
NOT_FILES = tuple(
    f"is {kind}, not a file" for kind in dict.fromkeys([*_KINDS.values(), "a special file"])
)
#: What pathlib's ``exists()`` takes for "not there", as :func:`not_a_file` does, and a name
#: too long for any file (a listed name is the data's, not the filesystem's).
ABSENT = (errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP, errno.ENAMETOOLONG)


def not_a_file(*paths: Path) -> tuple[Path, str] | None:
    """The first of ``paths`` that exists but is no regular file, with what it is instead
    (one of :data:`NOT_FILES`), or None: a loader that calls it missing sends the user looking
    for a file that seems to be there, and reading a named pipe would wait for a writer for
    ever. A name no file can have (a NUL in it, too long) is not there; an error that says
    nothing of the name (permissions, a failing disk) is raised."""
    for path in paths:
        mode = _mode(path)
        if mode is not None and not stat.S_ISREG(mode):
            return path, f"is {_kind(mode)}, not a file"
    return None


def not_a_folder(path: Path) -> str | None:
    """What stands at ``path``, where a folder goes, if it is no folder nor a link to one
    (``"is a file, not a folder"``), else None; a name that is not there as :func:`not_a_file`
    takes it. A download that replaces the tree around a file of one's own loses it."""
    mode = _mode(path)
    if mode is None or stat.S_ISDIR(mode):
        return None
    return f"is {'a file' if stat.S_ISREG(mode) else _kind(mode)}, not a folder"


def _mode(path: Path) -> int | None:
    """``path``'s file mode, links followed, or None where nothing is there (:data:`ABSENT`, a
    NUL in the name); an error that says nothing of the name (permissions) is raised."""
    try:
        return path.stat().st_mode
    except OSError as exc:
        if exc.errno in ABSENT:
            return None
        raise
    except ValueError:  # a NUL in the name
        return None


def _kind(mode: int) -> str:
    return next((k for is_kind, k in _KINDS.items() if is_kind(mode)), "a special file")


def move_away(then: str) -> str:
    """The fix for something standing in a file's place (:func:`not_a_file`), ``then`` what
    to do next: what it holds may be the user's, so it is moved, never deleted as damage."""
    return f"move or remove it, then {then}"


def missing(what: str, shown: object, hint: str, *paths: Path) -> str:
    """The message for the file ``what`` ``shown`` (e.g. ``"MNIST file"``, a path) that a
    loader did not find as a regular file under any of its names ``paths``, ending with
    ``hint`` on getting it, or, where something else stands in its place, on clearing that
    first."""
    if found := not_a_file(*paths):
        path, instead = found
        return f"{what} {path} {instead}: {move_away(hint)}"
    return f"{what} {shown} is missing: {hint}"


def download_command(name: str, root: Path) -> str:
    """The command, quoted, that downloads dataset ``name`` into the data root ``root``: with
    ``--data-dir`` unless ``root`` is where it goes without one (the advice would otherwise
    fill the default root and leave this one as it was)."""
    from .root import resolve_data_root

    if _real(root) == _real(resolve_data_root()):
        return command("brainprop", "download", name)
    return command("brainprop", "download", name, "--data-dir", root.expanduser().absolute())


def _real(path: Path) -> str:
    # realpath, unlike Path.resolve, gives up on a symlink loop instead of raising.
    return os.path.realpath(path.expanduser())


def inside_root(root: Path, wanted: Path, *variants: Path) -> str | None:
    """The fix where the data root named, ``root``, is a folder inside the one meant
    (``--data-dir data/mnist`` for ``data``): ``root`` is a folder on the way to ``wanted``
    (a path relative to a data root) and the folder above holds ``wanted`` (or one of
    ``variants``). None where it is not. Downloading into ``root``, the usual advice, would
    nest a second copy there."""
    root = root.absolute()
    for up in range(1, len(wanted.parts)):
        if root.parts[-up:] == wanted.parts[:up]:
            above = root.parents[up - 1]
            if any((above / w).is_file() for w in (wanted, *variants)):
                return (
                    f"{root} is a folder inside the data root: pass "
                    f"{command('--data-dir', above)} instead"
                )
    return None


def redownload(name: str, root: Path, files: str = "it") -> str:
    """The fix for a corrupt file (or ``files``) of dataset ``name`` in the data root ``root``."""
    return f"delete {files} and run {download_command(name, root)}"


def unpacked_too_high(root: Path, folder: Path, marker: str) -> str | None:
    """How to move a tree extracted one folder too high into ``folder``, where brainprop looks
    for it, or None where it is not: ``folder`` lacks ``marker``, a file at the top of every
    such tree, and the data root ``root`` holds the archive's top folder (``root/<folder's
    name>``, as ``tar xzf`` or ``unzip`` in the root makes it), or ``folder``'s parent holds
    the tree's files. Called missing, the tree would be downloaded again beside itself."""
    if (folder / marker).exists():
        return None
    loose = root / folder.name
    if loose != folder and (loose / marker).is_file():
        # Named in full: 'mv' into a folder not yet made would rename the tree to it.
        return (
            f"move {loose} to {folder} (make {folder.parent} first), where brainprop looks for it"
        )
    if (folder.parent / marker).is_file():
        return (
            f"move the archive's files in {folder.parent} into a folder {folder}, where "
            "brainprop looks for them"
        )
    return None


def unpacked_too_deep(folder: Path, marker: str) -> str | None:
    """How to move a tree unpacked one folder too deep (``folder/<folder's name>``, as
    unpacking an archive into its own top folder makes it) up into ``folder``, or None where it
    is not: the nested folder holds ``marker``, a file at the top of every such tree, and
    ``folder`` does not. The advice must not be to delete, and download again, a whole tree."""
    nested = folder / folder.name
    if (folder / marker).exists() or not (nested / marker).is_file():
        return None
    return f"move what {nested} holds up into {folder}, where brainprop looks for it"
