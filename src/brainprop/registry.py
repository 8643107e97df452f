"""The named entries a user extends: rules (``OBJECTIVES``), networks (``ARCHITECTURES``),
hyperparameter tables (``PRESETS``), feedback pathways (``PATHWAYS``) and datasets
(``DATASETS``).

Each is a :class:`Registry`: a mapping that checks an entry as it is made, by any route
(``update`` and ``setdefault`` go through ``__setitem__`` here, as they would not on a dict), so
a wrong one is one line at the line that made it, not a traceback in some later run; and whose
built-in entries stay as they are, so that a result labelled ``brainprop`` or ``conv`` is the
library's rule or network.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import TypeVar

from . import plugins
from .errors import BrainPropError, UnknownName, kind_of

V = TypeVar("V")

# Names become parts of run-directory names, items of comma-separated option values and
# option values themselves (so no leading '-', '.' or '+').
NAME = re.compile(r"[^\W][\w.+-]*")


class Registry(MutableMapping[str, V]):
    """Entries by name, each checked as it is made; the library's own stay as they are.

    ``clear()`` removes one's own entries and keeps the library's. ``copy.copy`` makes an
    independent registry; ``dict(registry)`` a plain snapshot.

    Args:
        label: the registry's name in messages (``PATHWAYS``).
        kind: what an entry is, in the message for a name it lacks (``rule``).
        builtin: the library's entries, which cannot be replaced or removed.
        check: what is wrong with an entry, as the end of a sentence about it, or None.
        reserved: names no entry may take, each with why (a mode that is no entry here).
        name_check: what is wrong with a name beyond the common rule, or None.
    """

    def __init__(
        self,
        label: str,
        kind: str,
        builtin: Mapping[str, V],
        check: Callable[[object], str | None],
        reserved: Mapping[str, str] | None = None,
        name_check: Callable[[str], str | None] = lambda name: None,
    ) -> None:
        self.label, self.kind = label, kind
        self._check, self._reserved = check, dict(reserved or {})
        self._name_check = name_check
        self._entries: dict[str, V] = {}
        # The library's entries go in through the same checks as any, before they are marked
        # as the library's (which would refuse them).
        self.builtin: tuple[str, ...] = ()
        self.update(builtin)
        self.builtin = tuple(builtin)

    def name_problem(self, name: str) -> str | None:
        """What keeps ``name`` from naming an entry here, or None (whether or not it does)."""
        if not isinstance(name, str) or not NAME.fullmatch(name):
            return (
                "a name starts with a letter, digit or _, then letters, digits and . _ + - "
                "(e.g. 'my-net')"
            )
        if name in self._reserved:
            return f"{name!r} is {self._reserved[name]}"
        # Names become folder and file names: on a disk that ignores case (macOS, Windows) two
        # that differ only in it would be one run directory and one measurement file. Folded,
        # not lowered: 'ß' is 'ss' to such a disk.
        twins = [
            n for n in (*self._entries, *self._reserved)
            if n != name and n.casefold() == name.casefold()
        ]  # fmt: skip
        if twins:
            return f"it differs from {twins[0]!r} only in case"
        return self._name_check(name)

    def __setitem__(self, name: str, entry: V) -> None:
        problem = self.name_problem(name)
        if problem is not None:
            raise BrainPropError(f"{self.label}[{name!r}]: {problem}; give the entry another name")
        self._refuse_builtin(name)
        problem = self._check(entry)
        if problem is not None:
            raise BrainPropError(f"{self.label}[{name!r}] {problem}")
        self._entries[name] = entry

    def __getitem__(self, name: str) -> V:
        return self._entries[name]

    def __delitem__(self, name: str) -> None:
        self._refuse_builtin(name)
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"{self.label}({self._entries!r})"

    def __copy__(self) -> Registry[V]:
        twin = object.__new__(type(self))
        twin.__dict__.update(self.__dict__, _entries=dict(self._entries))
        return twin

    def clear(self) -> None:
        """Remove one's own entries; the library's stay."""
        for name in self._own():
            del self._entries[name]

    def popitem(self) -> tuple[str, V]:
        """Remove and return one's own entry made last; the library's stay (``KeyError`` where
        there is none of one's own). A mapping's would try the first entry, the library's."""
        own = self._own()
        if not own:
            raise KeyError(f"{self.label} holds no entry of one's own to pop")
        return own[-1], self._entries.pop(own[-1])

    def require(self, name: str) -> None:
        """One-line :class:`UnknownName` unless ``name`` is registered."""
        choices = f"choose one of {', '.join(self)}"
        if not isinstance(name, str):
            raise UnknownName(f"{self.kind} names are text, not {kind_of(name)}: {choices}")
        if name not in self._entries:
            raise UnknownName(
                f"unknown {self.kind} {name!r}: {choices}{plugins.unknown_name_hint(name, self)}"
            )

    def _own(self) -> list[str]:
        return [n for n in self._entries if n not in self.builtin]

    def _refuse_builtin(self, name: str) -> None:
        if name in self.builtin:
            raise BrainPropError(
                f"{self.label}[{name!r}] is the library's own and stays as it is (results "
                "carry its name): register yours under another name"
            )
