"""What data a run was trained on, and the checks that what continues or scores it (a resume,
``evaluate``, a stacked resume) is given that data again, and is that run's own checkpoint.

A checkpoint names the network's input shape and classes; a checkpoint and the run's data.json
record the data's name and images per class (:meth:`~brainprop.data.Dataset.fingerprint`), and
for a run that validates on held-out training images, a digest of those.
Each check raises one :class:`BrainPropError` line that says how to pass the right data.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .data import DATASETS, Dataset
from .errors import BrainPropError, command, reason

#: What a run's checkpoints and config.json may disagree on and still be one run: where the
#: data is (the first with --data-dir, or as a relative root an older version stored becomes
#: absolute), and a raised --epochs.
MAY_CHANGE = ("epochs", "data_dir")


def recorded_config(d: Any, source: Path, fix: str) -> TrainConfig:
    """The config ``d`` that ``source`` (a config.json, a checkpoint) records; a one-line
    BrainPropError naming ``source``, and ending in ``fix`` where its own words do not, for one
    that does not read."""
    if not isinstance(d, dict):
        raise BrainPropError(f"{source} holds no training config: {fix}")
    try:
        return TrainConfig.from_dict(d)
    except TypeError as e:
        raise BrainPropError(
            f"{source} holds an unreadable training config ({reason(e)}): {fix}"
        ) from None
    except BrainPropError as e:
        raise BrainPropError(f"{source}: {e}") from None


def check_same_run(path: Path, own: TrainConfig, stored: TrainConfig) -> None:
    """One-line BrainPropError unless the checkpoint at ``path``, of the config ``own``, is of
    the run whose config.json says ``stored``: one copied in from another run would otherwise
    be continued (last.pt) or scored (best.pt) as this run's, without a word."""
    differ = [
        f.name for f in fields(TrainConfig)
        if f.name not in MAY_CHANGE and getattr(own, f.name) != getattr(stored, f.name)
    ]  # fmt: skip
    if differ:
        name = differ[0]
        # Either file may be the stranger: a checkpoint copied in, a config.json edited.
        raise BrainPropError(
            f"{path} is not the run of the config.json beside it: its {name} is "
            f"{getattr(own, name)!r} but config.json says {getattr(stored, name)!r} "
            f"({len(differ)} settings differ); put back the run's own {path.name} and "
            "config.json as it wrote them, or start a new run"
        )


def check_trained_on(state: dict[str, Any], ds: Dataset, source: str, remedy: str) -> None:
    """One-line BrainPropError unless ``ds`` has the input shape and classes of ``state``, a
    checkpoint read from ``source``; ``remedy`` ends the message."""
    shape, classes = tuple(state["input_shape"]), state["num_classes"]
    if shape != ds.input_shape or classes != ds.num_classes:
        raise BrainPropError(
            f"{source} was trained on inputs {shape} with {classes} classes, but the data has "
            f"{ds.input_shape} with {ds.num_classes}: {remedy}"
        )


def check_same_data(
    recorded: Any, ds: Dataset, source: str, remedy: str, call: str, data_dir: str | None = None
) -> None:
    """One-line BrainPropError unless ``ds`` (of the shape and classes that
    :func:`check_trained_on` checked) is the data ``recorded``, a run's record of it read from
    ``source`` (a checkpoint's ``data``, or the run's data.json; None for runs from before
    either), describes: its name and images per class (:meth:`Dataset.fingerprint`), the
    training split's only where ``ds`` has one, and there the images it held out for
    validation, if it did. The message ends with ``remedy`` and how to pass the data: the
    data root the run was given, ``data_dir`` (None: the default one), or from Python ``call``.

    A run on data of one's own (``train(config, dataset=...)``) is named for
    ``config.dataset``, whose files a resume or evaluation would otherwise load in its place,
    as it would other files of the same shape at the run's data root."""
    if recorded is None:
        return
    _check_record(recorded, source)
    splits = ("train", "test") if len(ds.train_y) else ("test",)
    here = ds.fingerprint()
    if recorded["name"] != here["name"] or any(recorded[s] != here[s] for s in splits):
        then, now = _described(recorded, splits), _described(here, splits)
        if then == now:
            differ = _first_difference(recorded, here, splits)
            now += f" with other numbers of images per class ({differ})"
        name = recorded["name"]
        how = (
            f"its loader, DATASETS[{name!r}].load, must load what it loaded then"
            if name in DATASETS and name not in DATASETS.builtin
            else f"{_pass_root(data_dir)}; data of one's own as {call}"
        )
        raise BrainPropError(
            f"{source} was trained on {then}, but the data now is {now}: {remedy} ({how})"
        )
    held = recorded.get("held_out")
    if held is not None and len(ds.train_y) and ds.fingerprint(held["images"])["held_out"] != held:
        raise BrainPropError(
            f"{source} validated on {held['images']:,} training images held out of the data, "
            "and this copy of it holds other images in their places (the same images in "
            f"another order?), some of which the run trained on: {remedy}, in the order it "
            "had (the copy the run started on)"
        )


def _pass_root(data_dir: str | None) -> str:
    """How to pass again the data root a run was given: named where the run named one."""
    if data_dir is None:
        return "--data-dir the folder it was read from"
    return f"{command('--data-dir', data_dir)}, the folder it was read from"


def check_loadable(recorded: Any, dataset: str, source: str, call: str) -> None:
    """One-line BrainPropError, before any file is read, if ``recorded`` (as in
    :func:`check_same_data`) names data of one's own, which loading ``dataset``, the run's
    ``config.dataset``, would not give: ``call`` says how to pass that data again."""
    if recorded is None:
        return
    _check_record(recorded, source)
    if recorded["name"] != dataset:
        raise BrainPropError(
            f"{source} was trained on data of one's own, {recorded['name']!r}, not on "
            f"{dataset}'s files, which brainprop would load: pass that data again, as {call} "
            f"(from Python: the command line loads only the dataset the run's config names, "
            f"{dataset})"
        )


def _check_record(recorded: Any, source: str) -> None:
    counts = (
        [recorded.get(split) for split in ("train", "test")] if isinstance(recorded, dict) else []
    )
    held = recorded.get("held_out") if isinstance(recorded, dict) else None
    ok = (
        len(counts) == 2
        and isinstance(recorded.get("name"), str)
        and all(isinstance(c, list) and c for c in counts)
        and len(counts[0]) == len(counts[1])
        and all(type(n) is int and n >= 0 for c in counts for n in c)
        and (
            held is None
            or isinstance(held, dict)
            and held.keys() == {"images", "sha256"}
            and type(held["images"]) is int
            and 1 <= held["images"] < sum(counts[0])
            and isinstance(held["sha256"], str)
        )
    )
    if not ok:
        raise BrainPropError(
            f"{source} records the data it was trained on in a damaged form: it is damaged or "
            "from another version; use another checkpoint, or start a new run"
        )


def _described(fingerprint: dict[str, Any], splits: tuple[str, ...]) -> str:
    """``'mnist' (60000 training, 10000 test images)``."""
    sizes = ", ".join(
        f"{sum(fingerprint[s])} {'training' if s == 'train' else 'test'}" for s in splits
    )
    return f"{fingerprint['name']!r} ({sizes} images)"


def _first_difference(
    recorded: dict[str, Any], here: dict[str, Any], splits: tuple[str, ...]
) -> str:
    """Where two records of the same name and sizes, not the same counts, first differ in
    ``splits``: ``class 3: 104 training images then, 98 now``, or the number of classes."""
    then, now = len(recorded[splits[0]]), len(here[splits[0]])
    if then != now:
        return f"{then} classes then, {now} now"
    return next(
        f"class {label}: {then} {'training' if split == 'train' else 'test'} images then, {now} now"
        for split in splits
        for label, (then, now) in enumerate(zip(recorded[split], here[split], strict=True))
        if then != now
    )


def declares_sizes(state: dict[str, Any]) -> bool:
    """Whether the checkpoint ``state`` names its input shape as three positive sizes and its
    classes as a positive count: a network can be built for them."""
    shape, classes = state.get("input_shape"), state.get("num_classes")
    return (
        isinstance(shape, list)
        and len(shape) == 3
        and all(type(n) is int and n > 0 for n in shape)
        and type(classes) is int
        and classes > 0
    )
