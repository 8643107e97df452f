"""Fetching datasets from their official hosts (`brainprop download`): checksum first, then
extract safely, then rename.

Nothing lands at its final path until it is complete and verified: archives stream to a temp
file beside the destination, their md5 is checked before extraction, every member path is
checked to stay inside the destination (no zip/tar slip, no links), and the extracted folder
is renamed into place in one step.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from tqdm import tqdm

from brainprop import locks
from brainprop.errors import BrainPropError, reason
from brainprop.files import make_folder, usual_permissions

from .catalog import CATALOG
from .messages import not_a_folder, unpacked_too_deep, unpacked_too_high
from .registry import check_name, data_dir, dataset_status, inside_data_root, load_dataset
from .root import data_root

CHUNK = 1 << 20
URL_SCHEMES = ("http", "https", "file")
URL_FIX = "the base URL must start with http://, https:// or file://"
TIMEOUT_S = 60


def download(
    name: str, root: str | Path | None = None, *, base_url: str | None = None, progress: bool = True
) -> Path:
    """Download dataset ``name`` into ``root`` (``None``: :func:`~.root.resolve_data_root`).

    Args:
        name: one of ``DATASET_NAMES``.
        root: the data root.
        base_url: replaces the official host (and path), e.g. for a mirror or a test server.
        progress: show a tqdm progress bar per file.

    Returns:
        The folder the loader reads, e.g. ``root/cifar10/cifar-10-batches-py``. Nothing is
        fetched when the data root already has the dataset.
    """
    check_name(name)
    if base_url is not None and urllib.parse.urlsplit(base_url).scheme not in URL_SCHEMES:
        raise BrainPropError(f"base URL {base_url!r} is not a URL: {URL_FIX}")
    root = data_root(root, may_be_new=True)
    source = CATALOG[name].source
    dest = root / source.folder
    if (here := _present_in(name, root, dest)) is not None:
        return here
    # A second copy nested inside the first is no download anyone wants.
    if inside := inside_data_root(name, root):
        raise BrainPropError(f"{name} is already in the data root above: {inside}")
    _refuse_in_the_way(dest, name)
    if source.marker is not None:
        top = dest / source.top
        # The download would keep that tree as files of one's own, inside a second copy.
        if move := unpacked_too_deep(top, source.marker):
            raise BrainPropError(f"{name} is unpacked one folder too deep: {move}")
        # Or fetch it again, beside the tree.
        if move := unpacked_too_high(root, top, source.marker):
            raise BrainPropError(f"{name} is extracted one folder too high: {move}")
    created = not dest.exists()
    make_folder(dest, "choose a writable data root with --data-dir or BRAINPROP_DATA")
    busy = f"{dest} is being downloaded into by another process: wait for it to end"
    with locks.held(dest, busy), contextlib.ExitStack() as held:
        # Another process may have finished a download between the check above and the hold.
        if (here := _present_in(name, root, dest)) is not None:
            return here
        _remove_leftovers(dest)
        if source.top is not None:
            place = _place(dest / source.top)
            if place.parent.resolve() != dest.resolve() and place.parent.is_dir():
                # A link's target: another data root's link may lead there too, and its
                # download would take this one's work folder for a killed one's (review).
                beside = f"{place.parent} is being extracted into by another process"
                held.enter_context(locks.held(place.parent, f"{beside}: wait for it to end"))
            _remove_work(place)
            _recover_aside(place)
            _refuse_in_the_way(dest / source.top, name)
        try:
            for remote in source.files:
                url = (base_url or source.base_url).rstrip("/") + "/" + remote.name
                by_hand = f"put it in {dest}" if source.top is None else f"extract it into {dest}"
                part = _fetch(url, dest, remote.md5, 2 * remote.size, by_hand, progress)
                try:
                    if source.top is None:
                        _put_in_place(part, dest / remote.name)
                    else:
                        extract_archive(
                            part, dest, source.top, archive_name=remote.name, progress=progress
                        )
                finally:
                    part.unlink(missing_ok=True)
        except BaseException:
            # A failed first download leaves no empty folder to confuse `brainprop datasets`;
            # only while held, so never one another process is downloading into.
            if created and not any(dest.iterdir()):
                dest.rmdir()
            raise
    return data_dir(name, root)


def _copy_own_files(old: Path, new: Path) -> None:
    """Copy into the fresh tree ``new`` each file of the incomplete copy ``old`` that the
    archive did not bring: a user's, which replacing ``old`` would otherwise delete. Copied,
    not moved, so that until the swap ``old`` stays whole. Hidden files and folders are left:
    brainprop's own (Tiny ImageNet's decoded cache, 1.2 GB, and temporaries) and a desktop's
    (macOS's ``._*``), none of them anyone's notes."""
    for path in sorted(old.rglob("*")):
        relative = path.relative_to(old)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if not path.is_file() or path.is_symlink():
            continue
        kept = new / relative
        if kept.is_dir():
            # Left behind as if the archive's own, it would go with the old copy unsaid.
            raise BrainPropError(
                f"{path} is a file, where the download has a folder: move it out of {old}, "
                "then run the command again"
            )
        if kept.exists():
            continue
        try:
            kept.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:
            # A folder of one's own where the archive has a file: keeping either loses
            # the other, and the extraction's own advice (disk space) would mislead.
            clash = next((p for p in kept.parents if p.is_file()), None)
            if clash is None:
                raise
            raise BrainPropError(
                f"{old / clash.relative_to(new)} is a folder, where the download has a "
                f"file: move it out of {old}, then run the command again"
            ) from exc
        shutil.copy2(path, kept)


def _refuse_in_the_way(folder: Path, name: str) -> None:
    """Refuse, before anything is fetched, what stands where ``folder``, a folder of dataset
    ``name``, goes: a link to a disk not mounted (the data belongs there, so the link is not
    replaced by a folder here) or a file of one's own (the archive's tree, swapped in for its
    top folder, deleted it without a word)."""
    if folder.is_symlink() and not folder.exists():
        raise BrainPropError(
            f"{folder} links to {os.readlink(folder)}, which is not there: mount or create it, "
            "or remove the link, then run the command again"
        )
    if instead := not_a_folder(folder):
        raise BrainPropError(
            f"{name}'s folder {folder} {instead}: move or remove it, then run the command again"
        )


def _put_in_place(source: Path, target: Path, blocking: Path | None = None) -> None:
    """Rename ``source`` to ``target``; what is in the way (``blocking``, by default
    ``target``: a folder where a file goes, one that may not be written) is the user's to
    move, so it is named, not removed."""
    try:
        os.replace(source, target)
    except OSError as exc:
        raise _put_in_place_error(target if blocking is None else blocking, exc) from exc


def _put_in_place_error(where: Path, exc: OSError) -> BrainPropError:
    return BrainPropError(
        f"cannot put the download in place at {where} ({reason(exc)}): move or remove {where}, "
        "then run the command again"
    )


def _present_in(name: str, root: Path, dest: Path) -> Path | None:
    """The dataset's folder if the data root holds it whole under ``dest``, else None. A copy
    elsewhere (a system package's folder) does not count: the user asked for one here.

    Files already there are read as training reads them (a gzip's CRC included) before they
    are called ready, and a damaged one is refused, naming it, rather than replaced: they are
    the user's. Not by md5: the committed MNIST's training images are gzipped anew, and the
    shared CIFAR-10 batches hold the official images in another order. A format whose loading
    takes long (Tiny ImageNet's 110,000 JPEGs) is only checked to be there.
    """
    [status] = dataset_status(root, [name])
    if not status.path.is_relative_to(dest):
        return None
    if status.damaged:
        raise BrainPropError(status.damaged)
    if not status.present:
        return None
    if CATALOG[name].format.verified_by_loading:
        load_dataset(name, root)
    return status.path


def _remove_leftovers(dest: Path) -> None:
    """Delete the partial archives (as large as the archive) that downloads killed mid-way
    (SIGKILL, power loss) left in ``dest``, and the work folders of versions before
    :func:`_work_prefix` named them for their place. Only called while ``dest`` is held, so
    none of them can belong to a download still running."""
    for part in dest.glob(".*.part"):
        part.unlink(missing_ok=True)
    for work in dest.glob(".extract-*"):
        shutil.rmtree(work, ignore_errors=True)


def _work_prefix(place: Path) -> str:
    """The name's start of the folders an extraction for ``place`` works in, beside it: named
    for ``place``, as beside a link's target (on another disk) other folders may work too."""
    return f".{place.name}.extract-"


def _remove_work(place: Path) -> None:
    """Delete the half-extracted trees that extractions for ``place`` killed mid-way left beside
    it: beside a link's target too, where they went unseen (a review). Only called while the
    dataset's folder, and a link's target's folder, are held, so none of them can belong to an
    extraction still running."""
    for work in _beside(place, _work_prefix(place)):
        shutil.rmtree(work, ignore_errors=True)


def _beside(place: Path, prefix: str) -> list[Path]:
    """What lies beside ``place`` under a name that starts with ``prefix``, sorted. Not a glob:
    a link's target may have any name, "[" included. A folder that cannot be listed (a link to
    an unmounted disk) has none: the steps after say in one line what is wrong with it."""
    try:
        return sorted(p for p in place.parent.iterdir() if p.name.startswith(prefix))
    except OSError:
        return []


def _recover_aside(place: Path) -> None:
    """Deal with an old tree that a download stopped between its two renames
    (:func:`_replace_tree`) left aside, beside ``place``. With nothing at ``place`` it goes
    back, so that this download takes the user's files from it again. Beside a tree in place
    it is kept, and named: it may be one a failed rename could not put back."""
    for aside in _beside(place, f"{place.name}.old-"):
        old = aside / place.name
        if not old.exists() and not any(aside.iterdir()):
            aside.rmdir()  # made, and the download stopped before it moved the tree in
            continue
        if place.exists() or place.is_symlink() or not old.exists():
            print(
                f"brainprop: {aside} holds an older copy of {place} that a stopped download put "
                "aside: keep what of it is yours, then remove it",
                file=sys.stderr,
            )
            continue
        try:
            os.replace(old, place)
        except OSError as exc:
            raise BrainPropError(
                f"cannot put back {place} from {old}, where a stopped download put it aside "
                f"({reason(exc)}): move it back, then run the command again"
            ) from exc
        shutil.rmtree(aside, ignore_errors=True)  # emptied by the rename


def _place(target: Path) -> Path:
    """Where the tree at ``target`` lies: where it links to, if it is a link (to a folder on
    another disk, say), for the data belongs where the link says."""
    if not target.is_symlink():
        return target
    try:
        return target.resolve()
    except (RuntimeError, OSError):
        # A loop of links (RuntimeError before Python 3.13): the link itself, which
        # _refuse_in_the_way names as leading nowhere.
        return target


def _read_chunk(response: BinaryIO, url: str, by_hand: str) -> bytes:
    try:
        return response.read(CHUNK)
    except (OSError, http.client.HTTPException) as exc:
        raise _offline(url, exc, by_hand) from exc


def _offline(url: str, exc: BaseException, by_hand: str) -> BrainPropError:
    if url.startswith("file:"):
        # A local mirror that is not where the URL says is a wrong path, not a lost network.
        return BrainPropError(
            f"cannot read {url} ({reason(exc)}): check the path in the base URL, or download it "
            f"by hand and {by_hand}"
        )
    return BrainPropError(
        f"cannot download {url} ({reason(exc)}): this machine seems offline; "
        f"download it by hand and {by_hand}"
    )


def _fetch(
    url: str, dest: Path, expected_md5: str, max_bytes: int, by_hand: str, progress: bool
) -> Path:
    """Stream ``url`` into a temp file in ``dest`` and return it once its md5 matches; refuse
    a body of more than ``max_bytes``."""
    file_name = url.rsplit("/", 1)[-1]
    try:
        fd, tmp = tempfile.mkstemp(dir=dest, prefix=f".{file_name}.", suffix=".part")
    except OSError as exc:
        raise _disk_error(dest, exc) from exc
    part = Path(tmp)
    digest = hashlib.md5()
    try:
        with os.fdopen(fd, "wb") as out:
            usual_permissions(fd)
            try:
                response = urllib.request.urlopen(url, timeout=TIMEOUT_S)
            except urllib.error.HTTPError as exc:
                exc.close()  # it holds the open error response
                raise BrainPropError(
                    f"cannot download {url} (HTTP {exc.code} {exc.reason}): "
                    f"download it by hand and {by_hand}"
                ) from exc
            except (OSError, http.client.HTTPException) as exc:
                raise _offline(url, exc, by_hand) from exc
            except ValueError as exc:
                raise BrainPropError(f"cannot download {url} ({reason(exc)}): {URL_FIX}") from exc
            with response:
                total = _length(response.headers.get("Content-Length"))
                with tqdm(
                    total=total, unit="B", unit_scale=True, desc=file_name, disable=not progress
                ) as bar:
                    received = 0
                    while chunk := _read_chunk(response, url, by_hand):
                        received += len(chunk)
                        if received > max_bytes:
                            raise BrainPropError(
                                f"{url} sent more than {max_bytes:,} bytes, twice the published "
                                "file's size, so it is some other file: check the base URL, or "
                                f"download it by hand and {by_hand}"
                            )
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
            # On disk before it is renamed into place: after a power cut the name must not
            # stand for a file of fewer bytes.
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != expected_md5:
            raise BrainPropError(
                f"downloaded {url} has md5 {digest.hexdigest()}, expected {expected_md5}: "
                f"the download is damaged; run the command again or download it by hand and "
                f"{by_hand}"
            )
    except OSError as exc:
        # Network OSErrors were already turned into BrainPropError, so this one is local.
        part.unlink(missing_ok=True)
        raise _disk_error(dest, exc) from exc
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return part


def _length(header: str | None) -> int | None:
    """The body's size from a ``Content-Length`` header; None when absent or malformed (a
    proxy's "12, 12"), which only costs the progress bar its total."""
    try:
        length = int(header or "")
    except ValueError:
        return None
    return length if length > 0 else None


def _disk_error(dest: Path, exc: OSError) -> BrainPropError:
    return BrainPropError(
        f"cannot write into {dest} ({reason(exc)}): check free disk space and permissions"
    )


def _member_path(work: Path, member: str, archive_name: str) -> Path:
    """Where ``member`` goes inside ``work``; refuses names that would land outside it."""
    posix = PurePosixPath(member.replace("\\", "/"))
    parts = [p for p in posix.parts if p not in ("", ".")]
    if posix.is_absolute() or ".." in parts or (parts and ":" in parts[0]) or not parts:
        raise BrainPropError(
            f"archive {archive_name} has a member {member!r} that points outside its folder: "
            "refusing to extract it; download the official file again"
        )
    return work.joinpath(*parts)


def _refuse_member(archive_name: str, member: str, kind: str) -> BrainPropError:
    return BrainPropError(
        f"archive {archive_name} has a {kind} member {member!r}: refusing to extract it; "
        "download the official file again"
    )


# By hand rather than tarfile's extraction filter ('data'): it refuses every link, where the
# filter allows those that stay inside the folder, it works on every Python this package
# supports (the filter came in 3.10.12), and zip archives take the same checks and messages.
def _extract_tar(archive: Path, work: Path, archive_name: str, progress: bool) -> None:
    with tarfile.open(archive, "r:*") as tar:
        for member in tqdm(
            tar, desc=f"extracting {archive_name}", unit="file", disable=not progress
        ):
            target = _member_path(work, member.name, archive_name)
            if member.issym() or member.islnk():
                raise _refuse_member(archive_name, member.name, "link")
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
            elif member.isfile():
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                assert src is not None  # regular files always have a stream
                with src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
            else:
                raise _refuse_member(archive_name, member.name, "special-file")


def _extract_zip(archive: Path, work: Path, archive_name: str, progress: bool) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info in tqdm(
            zf.infolist(), desc=f"extracting {archive_name}", unit="file", disable=not progress
        ):
            target = _member_path(work, info.filename, archive_name)
            # Unix mode bits live in the high 16 bits of external_attr; 0o12 is a symlink.
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise _refuse_member(archive_name, info.filename, "link")
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    src = zf.open(info)
                except (NotImplementedError, RuntimeError) as exc:
                    # zipfile's errors for a compression method it lacks and for encryption;
                    # the latter's message is a whole ZipInfo repr, too long for one line.
                    raise BrainPropError(
                        f"archive {archive_name} has a member {info.filename!r} that is encrypted "
                        "or compressed in a way Python cannot read: download the official file "
                        "again"
                    ) from exc
                with src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)


def _sync_filesystem(folder: Path) -> None:
    """Put what was written under ``folder`` on disk before the tree is renamed into place, as
    a download's file is: one sync of its filesystem (Linux's syncfs), not an fsync per file
    (Tiny ImageNet has 120,000 of them), nor os.sync(), which would wait on every other
    filesystem of the machine (a hung network mount included). Elsewhere os.sync(), where
    there is one."""
    libc = ctypes.CDLL(None, use_errno=True) if os.name == "posix" else None
    syncfs = getattr(libc, "syncfs", None)
    if syncfs is None:
        if hasattr(os, "sync"):
            os.sync()
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        if syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(folder))
    finally:
        os.close(fd)


def extract_archive(
    archive: Path, dest: Path, top: str, *, archive_name: str, progress: bool = False
) -> Path:
    """Extract ``archive`` (zip or tar, any compression) and move its ``top`` folder to
    ``dest/top`` in one rename. Returns ``dest/top``.

    A leftover ``dest/top`` (an earlier, incomplete copy) is replaced; files in it that the
    archive does not hold (notes of one's own) are kept. Where ``dest/top`` is a link (to a
    folder on another disk, say), the link stays and the folder it points to is replaced: the
    data belongs where the link says.
    """
    target = dest / top
    place = _place(target)
    # Beside its place, so that putting it there is one rename on one filesystem.
    try:
        work = Path(tempfile.mkdtemp(dir=place.parent, prefix=_work_prefix(place)))
    except OSError as exc:
        raise BrainPropError(
            f"cannot extract {archive_name} into {place.parent} ({reason(exc)}): "
            "check its permissions, then run the command again"
        ) from exc
    try:
        try:
            if archive_name.endswith(".zip"):
                _extract_zip(archive, work, archive_name, progress)
            else:
                _extract_tar(archive, work, archive_name, progress)
            extracted = work / top
            if not extracted.is_dir():
                raise BrainPropError(
                    f"archive {archive_name} has no {top}/ folder: download the official file again"
                )
            if place.is_dir():
                _copy_own_files(place, extracted)
            _sync_filesystem(work)
        except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
            raise BrainPropError(
                f"cannot extract {archive_name} into {dest} ({reason(exc)}): check free disk "
                "space and permissions, then run the command again"
            ) from exc
        _replace_tree(extracted, place)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _replace_tree(new: Path, place: Path) -> None:
    """Put the tree ``new`` at ``place`` in two renames, the old tree there first aside.

    Aside means beside ``place``, under a name no download removes as a leftover: until the
    new tree is in, the old one is the only copy of what of the user's it holds. Where the new
    one cannot take its place, the old one goes back; where that fails too, it stays aside,
    and the message says where."""
    if not place.exists():
        _put_in_place(new, place)
        return
    try:
        aside = Path(tempfile.mkdtemp(dir=place.parent, prefix=f"{place.name}.old-")) / place.name
    except OSError as exc:
        raise _put_in_place_error(place, exc) from exc
    try:
        _put_in_place(place, aside, blocking=place)
    except BrainPropError:
        shutil.rmtree(aside.parent, ignore_errors=True)  # made empty a moment ago
        raise
    try:
        os.replace(new, place)
    except OSError as exc:
        try:
            os.replace(aside, place)
        except OSError as back:
            raise BrainPropError(
                f"cannot put the download in place at {place} ({reason(exc)}), nor the old copy "
                f"back ({reason(back)}): it is kept at {aside}; move it back to {place}, then "
                "run the command again"
            ) from exc
        shutil.rmtree(aside.parent, ignore_errors=True)
        raise BrainPropError(
            f"cannot put the download in place at {place} ({reason(exc)}); the old copy is back "
            f"there: check the permissions of {place.parent}, then run the command again"
        ) from exc
    shutil.rmtree(aside.parent, ignore_errors=True)
