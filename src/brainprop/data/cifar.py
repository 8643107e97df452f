"""CIFAR-10 and CIFAR-100 from the official python pickles, read without executing code.

The pickles are protocol 2 dicts with bytes keys. ``data`` is uint8 ``[N, 3072]`` where each
row is the 32x32 red plane, then green, then blue, so a plain reshape gives ``[N, 3, 32, 32]``.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from brainprop.errors import PERMISSIONS_FIX, BrainPropError, kind_of, reason

from .dataset import Dataset
from .messages import (
    UNREADABLE,
    download_command,
    inside_root,
    missing,
    not_a_file,
    redownload,
    unpacked_too_high,
)
from .status import DatasetStatus, first_damage

ROW_BYTES = 3 * 32 * 32
#: Far more than any official pickle holds (CIFAR-100's training file, the largest, is 155 MB):
#: a larger file is damaged, and read whole it could take all the memory first.
MAX_FILE_BYTES = 2**30


# --- the restricted unpickler ------------------------------------------------------------------
#
# The official files reference three globals: numpy's ``_reconstruct``, ``ndarray`` and ``dtype``
# (an array is ``_reconstruct(ndarray, (0,), b'b')`` filled by a BUILD of its shape, dtype and
# bytes); Python 3 re-pickles add ``_codecs.encode`` and ``bytes`` (how protocol 2 spells bytes).
# Handing the pickle numpy's own callables would let a crafted file drive their constructors and
# ``__setstate__`` with any state: a dtype can be rebuilt to read an object pointer from the file
# (a segfault at best), an array can claim more bytes than the file holds. So the pickle gets
# stand-ins instead, which accept only what those files contain, and real arrays are made
# afterwards from exactly the bytes the file carries.

#: The dtypes a CIFAR file's arrays use (uint8 pixels; int64 labels in re-pickles), and kin.
PLAIN_DTYPES = frozenset({"u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f4", "f8"})


class _Refused(pickle.UnpicklingError):
    pass


class _Dtype:
    """Stands for ``numpy.dtype(code, align, copy)`` and the BUILD of its byte order."""

    __slots__ = ("code", "order")

    def __init__(self, code: object, align: object = 0, copy: object = 1) -> None:
        code = code.decode("ascii", "replace") if isinstance(code, bytes) else code
        # Typed before hashed or shown: a crafted tuple can take 2^80 steps to hash or repr.
        if not (isinstance(code, str) and code in PLAIN_DTYPES) or not (
            type(align) in (int, bool) and align in (0, False)
            and type(copy) in (int, bool) and copy in (1, True)
        ):  # fmt: skip
            raise _Refused(f"dtype({_shown(code)}, ...) is no plain numeric dtype")
        self.code, self.order = code, "|"

    def __setstate__(self, state: object) -> None:
        # (version 3, byte order, no subarray, no names, no fields, -1, -1, no flags)
        if not isinstance(state, tuple) or len(state) != 8:
            raise _Refused("a dtype's state is not numpy's")
        order = state[1].decode("ascii", "replace") if isinstance(state[1], bytes) else state[1]
        if state[0] != 3 or order not in ("<", ">", "|", "=") or state[2:] != (
            None, None, None, -1, -1, 0,
        ):  # fmt: skip
            raise _Refused("a dtype's state is not that of a plain numeric dtype")
        self.order = order

    def resolve(self) -> np.dtype:
        return np.dtype(self.code).newbyteorder("=" if self.order in "|=" else self.order)


def _shown(value: object) -> str:
    """``value``'s repr if it is a short plain value, else its type's name."""
    # Sized before repr: an int of 80,000 bits has no repr here (Python's digit limit).
    short = (
        isinstance(value, str | bytes) and len(value) <= 40
        or isinstance(value, int) and value.bit_length() <= 64
        or isinstance(value, float | None)
    )  # fmt: skip
    return repr(value) if short else type(value).__name__


class _Marker:
    """Stands for ``numpy.ndarray``: the one type ``_reconstruct`` may make; never called."""

    __slots__ = ()

    def __setstate__(self, state: object) -> None:
        raise _Refused("numpy.ndarray itself has no state")


_NDARRAY = _Marker()


class _Budget:
    """The bytes the stand-ins of one file may still make.

    A pickle can name one large memoised bytes or str object again and again, a few bytes a
    time; copying it for each name would take memory quadratic in the file's size, enough for
    the kernel to kill this process (or a training beside it) before Python raised
    MemoryError. A file's own arrays take at most twice its size: a protocol 2 array's
    latin-1 text becomes bytes, which become the array.
    """

    __slots__ = ("left",)

    def __init__(self, file_bytes: int) -> None:
        self.left = 2 * file_bytes

    def take(self, n: int) -> None:
        if n > self.left:
            raise _Refused("its arrays take more bytes than the file holds")
        self.left -= n


#: numpy's own limit on an array's dimensions.
_MAX_DIMENSIONS = 64


class _Array:
    """Stands for ``_reconstruct(ndarray, (0,), b'b')``; its BUILD state (version, shape,
    dtype, Fortran order, bytes) becomes a copy of exactly the bytes the file carries, drawn
    from ``budget``."""

    __slots__ = ("budget", "value")

    def __init__(self, budget: _Budget, subtype: object, shape: object, typecode: object) -> None:
        if subtype is not _NDARRAY or shape != (0,) or typecode != b"b":
            raise _Refused("an array is not reconstructed as numpy pickles a plain ndarray")
        self.budget = budget

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, tuple) or len(state) != 5:
            raise _Refused("an array's state is not numpy's")
        _, shape, dtype, fortran, raw = state
        if not (
            isinstance(dtype, _Dtype)
            and isinstance(shape, tuple)
            # Counted first: multiplying a million dimensions took hours.
            and len(shape) <= _MAX_DIMENSIONS
            and all(type(n) is int and 0 <= n < 2**63 for n in shape)
            and fortran in (0, 1)
            and isinstance(raw, bytes | str)
        ):
            raise _Refused("an array's state is not that of a plain numeric array")
        if isinstance(raw, str):
            self.budget.take(len(raw))
        data = raw.encode("latin1") if isinstance(raw, str) else raw
        kind = dtype.resolve()
        if len(data) != math.prod(shape) * kind.itemsize:
            shown = shape if len(shape) <= 4 else f"of {len(shape)} dimensions"
            raise _Refused(f"an array of shape {shown} comes with {len(data)} bytes")
        self.budget.take(len(data))
        order = "F" if fortran else "C"
        self.value = np.frombuffer(data, kind).reshape(shape, order=order).copy()


class _Latin1:
    """Stands for ``_codecs.encode(text, 'latin1')``: how protocol 2 spells bytes in Python 3;
    the bytes are drawn from ``budget``."""

    __slots__ = ("budget",)

    def __init__(self, budget: _Budget) -> None:
        self.budget = budget

    def __call__(self, text: object, encoding: object) -> bytes:
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise _Refused("_codecs.encode is used for something other than bytes")
        self.budget.take(len(text))
        return text.encode("latin1")

    def __setstate__(self, state: object) -> None:
        raise _Refused("_codecs.encode has no state")


class _EmptyBytes:
    """Stands for ``bytes()``: how protocol 2 spells an empty bytes object (an array of no
    rows) in Python 3."""

    __slots__ = ()

    def __call__(self) -> bytes:
        return b""

    def __setstate__(self, state: object) -> None:
        raise _Refused("bytes has no state")


def stand_ins(budget: _Budget) -> dict[tuple[str, str], object]:
    """What each global a CIFAR file may name stands for; those that make bytes draw on
    ``budget``."""
    return {
        ("__builtin__", "bytes"): _EmptyBytes(),
        ("builtins", "bytes"): _EmptyBytes(),
        ("numpy.core.multiarray", "_reconstruct"): functools.partial(_Array, budget),
        ("numpy._core.multiarray", "_reconstruct"): functools.partial(_Array, budget),
        ("numpy", "ndarray"): _NDARRAY,
        ("numpy", "dtype"): _Dtype,
        ("_codecs", "encode"): _Latin1(budget),
    }


def _refuse_sets(self: pickle.Unpickler) -> None:
    raise _Refused("a set, which a CIFAR file never holds")


# The pure-Python unpickler (``pickle._Unpickler``), not the C one, for two reasons a crafted
# file of a few bytes makes plain. Its memo is a dict, where the C one allocates an array up to
# the largest index it is given (64 GiB for a 9-byte file). And its dispatch table lets dict
# keys be checked before they are hashed: tuples nested through memo references, a few hundred
# bytes, take 2^80 steps to hash. Most of a file's bytes are its pixels, one opcode: CIFAR-10's
# six files (about 20,000 opcodes each) load as fast as with the C one; a file shaped like
# CIFAR-100's train file (about 150,000) took 1.4 times as long, 1.5 s.
class RestrictedUnpickler(pickle._Unpickler):
    """An unpickler of ``data`` that resolves only the globals of :func:`stand_ins`, to those
    stand-ins, so that no pickled code runs and no numpy internals see the file's state; that
    takes only bytes and str as dict keys, and no sets, as CIFAR files hold."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes, *, source: str) -> None:
        super().__init__(io.BytesIO(data), encoding="bytes")
        self.source = source
        self.stand_ins = stand_ins(_Budget(len(data)))

    def _check_keys(self, keys: list[Any]) -> None:
        if not all(type(k) in (bytes, str) for k in keys):
            raise _Refused("a dict key that is no bytes or str, which a CIFAR file never has")

    def load_setitem(self) -> None:
        self._check_keys(self.stack[-2:-1])
        super().load_setitem()

    def load_setitems(self) -> None:
        # After a MARK the stack holds just the items, key first.
        self._check_keys(self.stack[::2])
        super().load_setitems()

    def load_dict(self) -> None:
        # Protocols 0 and 1 build a dict whole from the items after a MARK.
        self._check_keys(self.stack[::2])
        super().load_dict()

    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems
    dispatch[pickle.DICT[0]] = load_dict
    for _opcode in (pickle.EMPTY_SET, pickle.ADDITEMS, pickle.FROZENSET):
        dispatch[_opcode[0]] = _refuse_sets
    del _opcode

    def find_class(self, module: str, name: str) -> Any:
        if name == "_frombuffer" and module.startswith("numpy"):
            raise BrainPropError(
                f"{self.source} was pickled with protocol 5, whose arrays this reader does not "
                "take: use the official file, or pickle it again with protocol 4 or lower"
            )
        if (module, name) not in self.stand_ins:
            # Protocol 4 names may hold any text, line breaks included: shown escaped.
            named = f"{module}.{name}"
            if not named.isprintable() or len(named) > 80:
                named = repr(named[:80])
            raise BrainPropError(
                f"{self.source} references {named}, which a CIFAR file never does: "
                "refusing to load it; replace it with the official file"
            )
        return self.stand_ins[(module, name)]


def _real(value: Any, done: dict[int, Any] | None = None) -> Any:
    """``value`` with every stand-in array replaced by its numpy array.

    ``done`` maps each container already copied (by ``id``) to its copy: a pickle can refer
    to one object many times, and a file of a few hundred bytes that nests such references
    would otherwise take exponential time here.
    """
    done = {} if done is None else done
    if isinstance(value, _Array):
        if not hasattr(value, "value"):
            raise _Refused("an array without its state")
        return value.value
    if isinstance(value, _Dtype | _Marker | _Latin1 | _EmptyBytes):
        raise _Refused(f"a stray {type(value).__name__.strip('_')}")
    if not isinstance(value, dict | list | tuple):
        return value
    if id(value) not in done:
        if isinstance(value, dict):
            done[id(value)] = {_real(k, done): _real(v, done) for k, v in value.items()}
        else:
            done[id(value)] = type(value)(_real(v, done) for v in value)
    return done[id(value)]


def unpickle_restricted(data: bytes, *, source: str, fix: str) -> Any:
    """Unpickle ``data`` (bytes keys kept as bytes) allowing only plain numpy arrays."""
    if len(data) == 0:
        raise BrainPropError(f"{source} is empty (0 bytes): {fix}")
    unpickler = RestrictedUnpickler(data, source=source)
    try:
        return _real(unpickler.load())
    except BrainPropError:
        raise
    except MemoryError:
        # The stand-ins make at most twice the file's bytes (_Budget), so a file this size is
        # readable with more memory.
        raise BrainPropError(
            f"not enough memory to read {source} ({len(data):,} bytes): free some and try again"
        ) from None
    except Exception as exc:
        # Nothing but the stand-ins can run here, so anything raised (UnpicklingError,
        # EOFError, a refused state, ...) just means the bytes are corrupt or crafted.
        raise BrainPropError(
            f"{source} is not a valid CIFAR pickle ({reason(exc)}): {fix}"
        ) from exc


def parse_cifar_batch(
    data: bytes, *, label_key: bytes, num_classes: int, source: str, fix: str
) -> tuple[np.ndarray, np.ndarray]:
    """Parse one CIFAR pickle.

    Returns:
        uint8 images ``[N, 3, 32, 32]`` and int64 labels ``[N]``.
    """
    batch = unpickle_restricted(data, source=source, fix=fix)
    if not isinstance(batch, dict):
        raise BrainPropError(f"{source} holds {kind_of(batch)}, expected a dict: {fix}")
    # The official files hold Python 2 strings, read as bytes; a file pickled again by Python 3
    # holds str keys, and the same entries.
    batch = {k.encode() if isinstance(k, str) and k.isascii() else k: v for k, v in batch.items()}
    for key in (b"data", label_key):
        if key not in batch:
            raise BrainPropError(f"{source} has no {key!r} entry: {fix}")
    pixels = batch[b"data"]
    if (
        not isinstance(pixels, np.ndarray)
        or pixels.dtype != np.uint8
        or pixels.ndim != 2
        or pixels.shape[1] != ROW_BYTES
    ):
        what = (
            f"{pixels.dtype} {list(pixels.shape)}"
            if isinstance(pixels, np.ndarray)
            else type(pixels).__name__
        )
        raise BrainPropError(f"{source} has b'data' of {what}, expected uint8 [N, 3072]: {fix}")
    if not len(pixels):
        raise BrainPropError(f"{source} holds no images: {fix}")
    raw_labels = batch[label_key]
    if isinstance(raw_labels, np.ndarray):
        integers = raw_labels.ndim == 1 and raw_labels.dtype.kind in "iu"
    else:
        integers = isinstance(raw_labels, list) and all(
            type(v) is int and -(2**63) <= v < 2**63 for v in raw_labels
        )
    if not integers:
        raise BrainPropError(f"{source} has {label_key!r} that is not a list of integers: {fix}")
    labels = np.asarray(raw_labels, dtype=np.int64)
    if labels.shape[0] != pixels.shape[0]:
        raise BrainPropError(
            f"{source} has {pixels.shape[0]} images but {labels.shape[0]} {label_key!r}: {fix}"
        )
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise BrainPropError(
            f"{source} has label {labels[bad[0]]} at index {bad[0]}, "
            f"expected 0..{num_classes - 1}: {fix}"
        )
    return np.ascontiguousarray(pixels.reshape(-1, 3, 32, 32)), labels


def cifar_file_problem(path: Path) -> str | None:
    """What is wrong with the CIFAR pickle ``path`` as its size and last byte tell, without
    reading it; None when they look whole. A pickle ends with its STOP opcode, ``.``: one cut
    short almost never does."""
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            if f.tell() == 0:
                return "is empty (0 bytes)"
            f.seek(-1, 2)
            last = f.read(1)
    except OSError as exc:
        return f"{UNREADABLE} ({reason(exc)})"
    return None if last == b"." else "is cut short (a pickle ends with '.')"


@dataclass(frozen=True)
class CifarPickles:
    """The format of a CIFAR variant in the official python pickles under
    ``root/<folder>/<subdir>/``: a :class:`~.catalog.Format`.

    Attributes:
        folder: its folder under the data root (CIFAR-100's two label sets share one).
        subdir: the archive's top folder.
        train_files, test_files: the pickles of each split, in order.
        label_key: the labels' key in each pickle's dict.
        classes: how many labels there are.
        download_name: the dataset ``brainprop download`` fetches these files as.
    """

    folder: str
    subdir: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    classes: int
    download_name: str

    image: ClassVar[tuple[int, int, int]] = (3, 32, 32)
    verified_by_loading: ClassVar[bool] = True

    def dataset_dir(self, name: str, root: Path) -> Path:
        """The folder holding the pickles, e.g. ``root/cifar10/cifar-10-batches-py``."""
        return root / self.folder / self.subdir

    def inside_hint(self, name: str, root: Path) -> str | None:
        """The fix where ``root`` is a folder inside the data root that holds the pickles
        (:func:`~.messages.inside_root`), else None."""
        first = self.dataset_dir(name, root) / self.train_files[0]
        return inside_root(root, first.relative_to(root))

    def how_to_get(self, name: str, root: Path) -> str:
        """A one-line hint on obtaining the pickles into the data root ``root``."""
        return (
            self.inside_hint(name, root)
            or unpacked_too_high(root, self.dataset_dir(name, root), self.train_files[0])
            or f"run {download_command(self.download_name, root)} or extract the official "
            f"python archive into {root / self.folder}"
        )

    def status(self, name: str, root: Path) -> DatasetStatus:
        """Present where every pickle exists and ends as a pickle does."""
        folder = self.dataset_dir(name, root)
        paths = [folder / f for f in self.train_files + self.test_files]
        present = all(p.is_file() for p in paths)
        damaged, unreadable = first_damage(
            (not_a_file(p) or (p, cifar_file_problem(p)) for p in paths if p.exists()),
            self.download_name,
            root,
        )
        return DatasetStatus(
            name, present and not damaged, folder, self.how_to_get(name, root),
            damaged=damaged, unreadable=unreadable,
        )  # fmt: skip

    def load(self, name: str, root: Path, *, test_only: bool = False) -> Dataset:
        """Load the variant from its pickles.

        Returns a :class:`Dataset` with ``train_x`` uint8 ``[50000, 3, 32, 32]`` and
        ``test_x`` ``[10000, 3, 32, 32]`` for the official files, in file order;
        ``test_only``: the training files are not read and the training split is empty.
        """
        if test_only:
            return Dataset.test_only(name, *self._split(name, root, self.test_files), self.classes)
        # Dataset refuses training images that are the test images only where the two splits
        # are one file each; CIFAR-10 trains on five, any of which a copy could replace.
        read: dict[bytes, Path] = {}
        train_x, train_y = self._split(name, root, self.train_files, read)
        test_x, test_y = self._split(name, root, self.test_files, read)
        return Dataset(name, train_x, train_y, test_x, test_y, self.classes)

    def _split(
        self, name: str, root: Path, files: tuple[str, ...], read: dict[bytes, Path] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The images and labels of ``files``. ``read`` maps the digests of the files read so
        far to their paths: a file with the bytes of one of them is refused, and added."""
        folder = self.dataset_dir(name, root)
        xs, ys = [], []
        for file_name in files:
            path = folder / file_name
            if not path.is_file():
                raise BrainPropError(missing("CIFAR file", path, self.how_to_get(name, root), path))
            data = self._read(path, redownload(self.download_name, root))
            if read is not None:
                first = read.setdefault(hashlib.blake2b(data, digest_size=16).digest(), path)
                if first != path:
                    raise BrainPropError(
                        f"CIFAR files {first} and {path} hold the same bytes: one was copied "
                        "over the other (a network would train on its test images, or on one "
                        f"batch twice); {redownload(self.download_name, root, 'both')}"
                    )
            source = f"CIFAR file {path}"
            x, y = parse_cifar_batch(
                data,
                label_key=self.label_key,
                num_classes=self.classes,
                source=source,
                fix=redownload(self.download_name, root),
            )
            xs.append(x)
            ys.append(y)
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))

    @staticmethod
    def _read(path: Path, fix: str) -> bytes:
        """The bytes of the CIFAR file ``path``; ``fix`` is the advice for a damaged one."""
        source = f"CIFAR file {path}"
        try:
            size = path.stat().st_size
            if size > MAX_FILE_BYTES:
                raise BrainPropError(
                    f"{source} is {size:,} bytes, more than any CIFAR file holds: it is "
                    f"damaged; {fix}"
                )
            return path.read_bytes()
        except OSError as exc:
            raise BrainPropError(
                f"{source} cannot be read ({reason(exc)}): {PERMISSIONS_FIX}"
            ) from exc
        except MemoryError:
            raise BrainPropError(
                f"not enough memory to read {source} ({size:,} bytes): free some and try again"
            ) from None
