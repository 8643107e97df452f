"""Where datasets live on disk: the data root and how it is chosen."""

from __future__ import annotations

import os
from pathlib import Path

from brainprop.errors import BrainPropError

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
    try:
        base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    except RuntimeError:  # no $HOME, and no passwd entry to find one by (some containers)
        raise BrainPropError(
            "this user has no home folder to keep data in ($HOME is unset): pass --data-dir, "
            f"or set ${ENV_VAR} or $XDG_CACHE_HOME"
        ) from None
    return base / "brainprop"


def resolve_data_root(explicit: str | Path | None = None) -> Path:
    """Pick the data root: ``explicit``, else ``$BRAINPROP_DATA``, else the checkout's
    ``data/`` folder when running from a source checkout, else the per-user cache.

    The folder need not exist (:func:`data_root` checks one that was named); loaders report
    what is missing and where it must go. An empty ``$BRAINPROP_DATA`` counts as unset, the
    way ``BRAINPROP_DATA= brainprop ...`` is written to unset it; an empty ``explicit`` is
    refused, as ``Path("")`` would be the working directory.
    """
    if explicit is not None:
        if str(explicit) == "":
            raise BrainPropError(
                "--data-dir is empty: pass the folder that holds the datasets, or leave "
                "--data-dir out for the default"
            )
        return Path(explicit).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    checkout = checkout_data_dir(Path(__file__))
    if checkout is not None:
        return checkout
    return user_cache_dir()


def data_root(explicit: str | Path | None = None, *, may_be_new: bool = False) -> Path:
    """:func:`resolve_data_root`, refusing a root that was named (``explicit`` or
    ``$BRAINPROP_DATA``) but is a file, or, unless ``may_be_new`` (a download makes it), does
    not exist: each dataset in it would otherwise be reported missing, file by file.

    The default root may be missing: the messages of what is missing then say where it goes.
    """
    root = resolve_data_root(explicit)
    # An explicit root is not always the user's --data-dir: a resumed or evaluated run passes
    # the one its config.json stored, so the message names the folder, not a flag.
    named = "" if explicit is not None else f" (${ENV_VAR})" if os.environ.get(ENV_VAR) else None
    if named is None or root.is_dir() or (may_be_new and not root.exists()):
        return root
    state = "does not exist" if not root.exists() else "is a file, not a folder"
    raise BrainPropError(
        f"data folder {root}{named} {state}: pass the folder that holds the datasets as "
        "--data-dir ('brainprop download NAME --data-dir FOLDER' fetches them into one)"
    )
