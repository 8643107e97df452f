"""Where datasets live on disk: the data root and how it is chosen."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "BRAINPROP_DATA"


def checkout_data_dir(module_file: Path) -> Path | None:
    """Return ``<repo>/data`` when ``module_file`` is ``<repo>/src/brainprop/data/<x>.py``.

    Only a source checkout has that shape (``src/`` beside ``pyproject.toml`` and ``data/``);
    an installed wheel lives in site-packages and gets ``None``.
    """
    package_dir = module_file.resolve().parent.parent
    src = package_dir.parent
    repo = src.parent
    if src.name != "src" or not (repo / "pyproject.toml").is_file():
        return None
    data = repo / "data"
    return data if data.is_dir() else None


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/brainprop``, or ``~/.cache/brainprop`` when that is unset."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "brainprop"


def resolve_data_root(explicit: str | Path | None = None) -> Path:
    """Pick the data root: ``explicit``, else ``$BRAINPROP_DATA``, else the checkout's
    ``data/`` folder when running from a source checkout, else the per-user cache.

    The folder need not exist; loaders report what is missing and where it must go.
    """
    if explicit is not None and str(explicit) != "":
        return Path(explicit).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    checkout = checkout_data_dir(Path(__file__))
    if checkout is not None:
        return checkout
    return user_cache_dir()
