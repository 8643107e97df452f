"""Pieces of the one-line messages that :class:`BrainPropError` carries."""

from __future__ import annotations


def reason(exc: BaseException) -> str:
    """The first line of ``exc``'s message (or its type name), safe to embed in one line."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


#: How a quick file check words a file it could not open or read, which is no sign of damage.
UNREADABLE = "cannot be read"


def redownload(name: str) -> str:
    """The fix for a corrupt file of dataset ``name``."""
    return f"delete it and run 'brainprop download {name}'"
