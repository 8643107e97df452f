"""Modules of one's own that register rules, networks, feedback pathways, preset tables or
datasets, for the ``brainprop`` command: ``brainprop --plugin MODULE train ...``.

A registration (an entry of ``OBJECTIVES``, ``ARCHITECTURES``, ``PATHWAYS``, ``PRESETS`` or
``DATASETS``) lives in the process that made it. The command imports each ``--plugin`` before
it reads its other options, so their choices take the new names; ``reproduce`` imports them
again in each worker process it starts (:func:`loaded` says which); under ``torchrun`` each
process parses the command, ``--plugin`` included. A script that calls ``reproduce`` with
several jobs needs none of this for registrations at its top level, which each worker makes
again as it imports the script (the "spawn" start), but does for ones made elsewhere:
:func:`load` their module.
A plugin is the user's own code, run as such: nothing here imports a module named by a file
or a checkpoint.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from .errors import BrainPropError, command, raised

#: Appended to an "unknown name" error: the name may be a registration this process lacks.
HINT = (
    "; a name of your own is known once its code has run: import it first, or give its module "
    "to the command with 'brainprop --plugin MODULE'"
)

T = TypeVar("T")


def unknown_name_hint(name: str, names: Iterable[str]) -> str:
    """What follows an error naming the unknown ``name`` among the registered ``names``: the
    one meant, where it is that close (a typo, the case), else :data:`HINT`."""
    return did_you_mean(name, names) or HINT


def did_you_mean(name: str, names: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` where one of ``names`` is that close to ``name`` (a typo, the
    case), else empty."""
    by_case = {n.lower(): n for n in names}
    # Close enough that the two are not both meant: "bp" is not taken for "ebp".
    close = difflib.get_close_matches(name.lower(), by_case, n=1, cutoff=0.85)
    return f"; did you mean {by_case[close[0]]!r}?" if close else ""


# In the order imported, each once: what a worker process imports again.
_LOADED: list[str] = []


def load(spec: str) -> None:
    """Import ``spec``, a module name (``mylab.rules``, found on ``sys.path``) or the path of a
    ``.py`` file (imported as a module named for the file's stem); once per process.

    Raises:
        BrainPropError: no such module or file, a file whose name is another module's, or a
            module that failed as it ran (its error and where it was raised, in one line).
    """
    if not spec:
        raise BrainPropError("--plugin takes a module name or the path of a .py file, got ''")
    is_file = spec.endswith(".py") or "/" in spec or "\\" in spec
    try:
        key = str(Path(spec).resolve()) if is_file else spec
    except (RuntimeError, OSError) as e:  # a loop of symbolic links (RuntimeError to 3.12)
        raise BrainPropError(f"--plugin {spec}: cannot follow it ({e}): pass a .py file") from None
    if key in _LOADED:
        return
    if is_file:
        _load_file(spec, Path(key))
    else:
        _import(spec)
    _LOADED.append(key)


def load_all(specs: Iterable[str]) -> None:
    """:func:`load` each of ``specs`` in turn.

    Raises:
        BrainPropError: as :func:`load` does, and where a plugin replaces an entry an earlier
            one registered under the same name: the command would run the later one's
            without a word, whichever the user meant.
    """
    from .data import DATASETS
    from .feedback import PATHWAYS
    from .objectives import OBJECTIVES
    from .presets import ARCHITECTURES, PRESETS

    registries = (OBJECTIVES, ARCHITECTURES, PRESETS, PATHWAYS, DATASETS)
    # An entry registered before the plugins (by a script of one's own) may be replaced once.
    before = {(r.label, name): entry for r in registries for name, entry in r.items()}
    made_by: dict[tuple[str, str], tuple[object, str]] = {}
    for spec in specs:
        load(spec)
        for registry in registries:
            for name, entry in registry.items():
                key = (registry.label, name)
                if before.get(key) is entry:
                    continue
                earlier, by = made_by.setdefault(key, (entry, spec))
                if earlier is not entry:
                    raise BrainPropError(
                        f"--plugin {spec} registers {registry.label}[{name!r}], which --plugin "
                        f"{by} registered too: the command would run the last one's; rename one"
                    )


def resume_command(run: Path, data_dir: str | Path | None = None) -> str:
    """The command, quoted, that continues the run in the folder ``run``, for a message to
    suggest: with a ``--plugin`` for each plugin this process imported, in order, which the
    run's rules, networks or data need again (``brainprop --plugin lab.py train --resume
    RUN``), and ``--data-dir data_dir`` where given: the data's new root, which the run's
    config.json does not record. Under torchrun, the command launches as many processes: on
    fewer, the run's global batch and random streams would change."""
    plugins = [word for spec in _LOADED for word in ("--plugin", spec)]
    moved = () if data_dir is None else ("--data-dir", data_dir)
    words = (*plugins, "train", "--resume", run, *moved)
    # torchrun's variables, read here: brainprop.distributed imports the registries, which
    # import this module.
    world, local = (_launched(name) for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"))
    if world <= 1:
        return command("brainprop", *words)
    if local == world:
        return command("torchrun", "--standalone", f"--nproc_per_node={world}", "-m",
                       "brainprop", *words)  # fmt: skip
    return (
        command("torchrun", "...", "-m", "brainprop", *words)
        + f" on each of the job's nodes, with its {world} processes as before"
    )


def _launched(name: str) -> int:
    text = os.environ.get(name, "1")
    return int(text) if text.isdigit() else 1


def loaded() -> tuple[str, ...]:
    """The plugins this process imported through :func:`load`, files as absolute paths (a
    worker process may start in another folder)."""
    return tuple(_LOADED)


def _import(name: str) -> None:
    if not all(part.isidentifier() for part in name.split(".")):
        raise BrainPropError(
            f"--plugin {name}: not a module name: pass a module's dotted name (mylab.rules), "
            "or the path of a .py file"
        )
    # Finding a dotted name imports its parent packages: their errors are the plugin's too.
    found, source = _run(name, lambda: _find(name), lambda: None)
    if found is None:
        local = Path(f"{name}.py")
        fix = (
            f"pass ./{local} (the folder the command runs in is not on Python's path)"
            if local.is_file()
            else "pass the path of its .py file instead, or install the package that has it"
        )
        raise BrainPropError(f"--plugin {name}: no module of that name on Python's path: {fix}")
    _run(name, lambda: importlib.import_module(name), lambda: source)


def _find(name: str) -> tuple[importlib.machinery.ModuleSpec | None, Path | None]:
    """Module ``name``'s spec and source file; None for what is not there (a module, or a
    parent package of a dotted name, that cannot be found; a module that is no file)."""
    try:
        found = importlib.util.find_spec(name)
    except ModuleNotFoundError as e:
        # A parent package that is not there, or a parent that is no package ('os.foo'; then
        # the error names the module itself), as opposed to one that imports what is not.
        if e.name is not None and (e.name == name or name.startswith(f"{e.name}.")):
            return None, None
        raise
    except ValueError:  # in sys.modules without a spec
        return None, None
    # A built-in or frozen module's origin is a word ('built-in'), not a file.
    if found is None or not found.has_location or not found.origin:
        return found, None
    return found, Path(found.origin).resolve()


def _load_file(spec: str, path: Path) -> None:
    if path.suffix != ".py":
        raise BrainPropError(f"--plugin {spec}: a plugin file is Python source, ending in .py")
    if path.is_dir():
        raise BrainPropError(f"--plugin {spec}: a folder, not a .py file")
    if not path.is_file():
        raise BrainPropError(f"--plugin {spec}: no such file")
    name = path.stem
    if not name.isidentifier():
        raise BrainPropError(
            f"--plugin {spec}: not importable as a module; name the file as a Python module "
            "(letters, digits and underscores, ending in .py)"
        )
    imported = sys.modules.get(name)
    if imported is not None and _file_of(imported) == path:
        return  # the same file, named once by module name and once by path
    # Registered under its stem, the plugin would stand in for a module of that name that is
    # imported later (by brainprop or a library it uses), breaking it.
    if imported is not None:
        taken, other = True, _file_of(imported)
    else:
        found, other = _find(name)
        # A module with no origin is a namespace package: a folder on the path, nothing loaded.
        taken = found is not None and found.origin is not None and other != path
    if taken:
        where = f" ({other})" if other is not None else ""
        raise BrainPropError(
            f"--plugin {spec}: the name {name!r} is another module's{where}; rename the file"
        )
    module_spec = importlib.util.spec_from_file_location(name, path)
    assert module_spec is not None and module_spec.loader is not None  # a .py file has both
    module = importlib.util.module_from_spec(module_spec)
    # Registered before it runs, as an import would: a dataclass it defines looks itself up.
    sys.modules[name] = module
    try:
        _run(spec, lambda: module_spec.loader.exec_module(module), lambda: path)
    except BaseException:
        del sys.modules[name]
        raise


def _file_of(module: object) -> Path | None:
    file = getattr(module, "__file__", None)
    return Path(file).resolve() if file else None


def _run(spec: str, body: Callable[[], T], source_of: Callable[[], Path | None]) -> T:
    """Run a plugin's code, whose file is ``source_of()``: an error, or an exit, becomes one
    line."""
    try:
        return body()
    except SystemExit as e:
        raise BrainPropError(
            f"--plugin {spec} exited (sys.exit({e.code!r})) as it was imported: a plugin "
            "registers names and returns"
        ) from None
    except Exception as e:
        raise BrainPropError(
            f"--plugin {spec} failed as it was imported: {raised(e, source_of())}"
        ) from None
