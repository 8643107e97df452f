"""Modules of one's own that register rules, networks, feedback pathways or preset tables, for
the ``brainprop`` command: ``brainprop --plugin MODULE train ...``.

A registration (an entry of ``OBJECTIVES``, ``ARCHITECTURES``, ``PATHWAYS`` or ``PRESETS``)
lives in the process that made it. The command imports each ``--plugin`` before it reads its
other options, so their choices take the new names; ``reproduce`` imports them again in each
worker process it starts (:func:`loaded` says which); under ``torchrun`` each process parses
the command, ``--plugin`` included. A script that calls ``reproduce`` with several jobs needs
none of this for registrations at its top level, which each worker makes again as it imports
the script (the "spawn" start), but does for ones made elsewhere: :func:`load` their module.
A plugin is the user's own code, run as such: nothing here imports a module named by a file
or a checkpoint.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import traceback
from collections.abc import Iterable
from pathlib import Path

from .errors import BrainPropError

#: Appended to an "unknown name" error: the name may be a registration this process lacks.
HINT = (
    "; a name registered by your own code needs that code run first: import it before the call "
    "(library), or pass its module with 'brainprop --plugin MODULE' (command)"
)

# In the order imported, each once: what a worker process imports again.
_LOADED: list[str] = []


def load(spec: str) -> None:
    """Import ``spec``, a module name (``mylab.rules``, found on ``sys.path``) or the path of a
    ``.py`` file (imported as a module named for the file's stem); once per process.

    Raises:
        BrainPropError: no such module or file, or the module failed as it ran (its error and
            where it was raised, in one line).
    """
    is_file = spec.endswith(".py") or "/" in spec or "\\" in spec
    key = str(Path(spec).absolute()) if is_file else spec
    if key in _LOADED:
        return
    if is_file:
        _load_file(spec, Path(key))
    else:
        _import(spec)
    _LOADED.append(key)


def load_all(specs: Iterable[str]) -> None:
    """:func:`load` each of ``specs`` in turn."""
    for spec in specs:
        load(spec)


def loaded() -> tuple[str, ...]:
    """The plugins this process imported through :func:`load`, files as absolute paths (a
    worker process may start in another folder)."""
    return tuple(_LOADED)


def _import(name: str) -> None:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is not None and (name == e.name or name.startswith(f"{e.name}.")):
            raise BrainPropError(
                f"--plugin {name}: no module of that name on Python's path: pass the path of its "
                ".py file instead, or install the package that has it"
            ) from None
        raise _failed(name, e, _origin(name)) from None
    except Exception as e:
        raise _failed(name, e, _origin(name)) from None


def _origin(name: str) -> Path | None:
    """The file of module ``name``, which failed as it ran (so it was found)."""
    try:
        found = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    return Path(found.origin) if found is not None and found.origin else None


def _load_file(spec: str, path: Path) -> None:
    if path.suffix != ".py":
        raise BrainPropError(f"--plugin {spec}: a plugin file is Python source, ending in .py")
    if not path.is_file():
        raise BrainPropError(f"--plugin {spec}: no such file")
    name = path.stem
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None or not name.isidentifier():
        raise BrainPropError(
            f"--plugin {spec}: not importable as a module; name the file as a Python module "
            "(letters, digits and underscores, ending in .py)"
        )
    if name in sys.modules:
        raise BrainPropError(
            f"--plugin {spec}: a module named {name!r} is imported already; rename the file"
        )
    module = importlib.util.module_from_spec(module_spec)
    # Registered before it runs, as an import would: classes it defines then pickle by name.
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise _failed(spec, e, path) from None


def _failed(spec: str, e: Exception, path: Path | None) -> BrainPropError:
    """One line for a plugin that raised as it ran: the error, and where in the plugin (else
    where at all) it was raised; a SyntaxError says its line itself."""
    frames = traceback.extract_tb(e.__traceback__)
    own = [f for f in frames if path is not None and Path(f.filename) == path]
    where = (own or frames)[-1] if frames and not isinstance(e, SyntaxError) else None
    at = f" ({where.filename}:{where.lineno})" if where is not None else ""
    return BrainPropError(f"--plugin {spec} failed as it was imported: {type(e).__name__}: {e}{at}")
