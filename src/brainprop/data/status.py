"""Whether one of the library's datasets is ready under a data root: a row of
``brainprop datasets``, found by its format's quick look at the files."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from brainprop.errors import PERMISSIONS_FIX

from .messages import NOT_FILES, UNREADABLE, download_command, move_away, redownload

#: The name column of ``brainprop datasets``, wide enough for the library's own names; one's
#: own may widen it.
NAME_WIDTH = 16


@dataclass(frozen=True)
class DatasetStatus:
    """Whether one dataset is available under a data root (for ``brainprop datasets``).

    Attributes:
        name: the dataset name.
        present: all files the loader needs exist, and none looks damaged by its size and
            header (their content is checked only on load).
        path: the folder the loader reads, or would read once the files are there.
        how_to_get: one line on obtaining the files.
        note: where a present dataset comes from when not the data root itself, or cache state.
        damaged: what is wrong with the first existing file that looks damaged (its path,
            what, and the fix), else "": also where other files are missing, so that a
            download does not fetch them beside a damaged one the loader would read.
        unreadable: what ``damaged`` says is a file or folder this user may not read, which
            is no damage.
    """

    name: str
    present: bool
    path: Path
    how_to_get: str
    note: str = ""
    damaged: str = ""
    unreadable: bool = False

    def __str__(self) -> str:
        return self.row()

    def row(self, name_width: int = NAME_WIDTH) -> str:
        """One table row: name (in a column ``name_width`` wide), present/unreadable/damaged/
        missing, folder, then the note, what is wrong, or how to get it."""
        state = "present" if self.present else "missing"
        if self.damaged:
            state = "unreadable" if self.unreadable else "damaged"
        extra = self.note if self.present else self.damaged or self.how_to_get
        return table_row(self.name, state, str(self.path), extra, name_width)


def table_row(name: str, state: str, where: str, extra: str, name_width: int) -> str:
    """A row of ``brainprop datasets``: the name in a column ``name_width`` wide, the state,
    where the data is read from, and ``extra`` in brackets where there is any."""
    return f"{name:<{name_width}} {state:<10} {where}" + (f"  ({extra})" if extra else "")


def first_damage(
    problems: Iterable[tuple[Path, str | None]],
    download_name: str,
    root: Path,
    fix: str | None = None,
) -> tuple[str, bool]:
    """The first problem of ``problems`` (path, problem or None) in the data root ``root``, as
    one line with its fix (``fix``, by default :func:`redownload`'s; for something standing
    in a file's place, moving it away), and whether it is one of permissions; ``""`` where
    there is none."""
    for path, problem in problems:
        if problem is not None:
            # Permissions, not damage, are the usual reason a file cannot be opened.
            unreadable = problem.startswith(UNREADABLE)
            if unreadable:
                fix = PERMISSIONS_FIX
            elif problem in NOT_FILES:
                fix = move_away(f"run {download_command(download_name, root)}")
            elif fix is None:
                fix = redownload(download_name, root)
            return f"{path} {problem}: {fix}", unreadable
    return "", False
