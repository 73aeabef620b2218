"""The one writer of files that must never be half-written, and the owner of cache entries.

``write_atomic(path, write)``: ``write(tmp)`` fills a temp file next to ``path``; it is
fsynced and renamed over ``path``, so a reader sees the old file or the new one, never a
torn one (results.json, run-folder files; ``tracking.files.write_json_atomic`` is built on it).

A **cache entry** is a folder holding one artefact's files plus ``manifest.json`` (size
and sha256 of every file). ``write_entry(folder, fill)``: ``fill(tmp)`` writes the files
into a temp folder next to ``folder``; the manifest is written last, everything is fsynced
and the temp folder is renamed into place in one step, so a reader sees a whole entry or
none. A failed write (a full disk) removes the temp folder and raises one clear
``OSError``: no partial entry is left. Two processes writing the same entry: the first
whole one stays (same key, same content) and the other's copy is dropped, unless
``replace=True`` (a training checkpoint, rewritten as training goes on).

``read_entry(folder, read, what)`` returns ``read(folder)``, or None for a miss: when the
entry does not exist (silently) or when it is damaged -- no manifest, a file missing, a
size or a checksum that differs, or ``read`` raising (it could not parse the file) -- in
which case the folder is moved aside to ``<name>.corrupt-<UTC time>`` with one warning
naming it, and the caller recomputes the artefact and writes it again. Files in an entry
folder that its manifest does not list are ignored. Entries written before checksums
existed have no manifest: they are moved aside once and recomputed. A writer killed
mid-write leaves a ``.<name>.<pid>.<random>.tmp`` folder beside the entry, which readers
never mistake for the entry; delete such folders (and ``*.corrupt-*``) to reclaim space.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

from spon_exp.tracking.disk import FULL, DiskFullError, as_os_error, disk_full_error

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = 1
T = TypeVar("T")
# errors of the disk rather than of the caller: reported as "could not write <path>"
_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}
_TAKEN = {errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR}


def _temp_name(path: Path, suffix: str) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.{suffix}")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a file system that cannot open folders: the rename is all we have
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_error(target: Path, e: OSError) -> OSError:
    """One sentence naming ``target``; a full disk also says how much is free there (the
    partial write is already removed when this is called)."""
    if e.errno in FULL:
        return disk_full_error(target, e)
    return OSError(e.errno, f"Could not write {target} ({e.strerror or e}); check the disk and that the folder "
                            f"is writable and run again")


def write_atomic(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Write ``path`` through ``write(tmp)`` + fsync + rename: never a torn file. A write that
    fails on the disk (safetensors' ``SafetensorError`` included) raises one clear ``OSError``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path, "tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        os_error = as_os_error(e)
        if os_error is not None and os_error.errno in _DISK_ERRORS and not isinstance(e, DiskFullError):
            raise _write_error(path, os_error) from e
        raise
    _fsync_dir(path.parent)
    return path


def _hash_file(path: Path, sync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
        if sync:
            os.fsync(fh.fileno())
    return digest.hexdigest()


def _seal(folder: Path) -> None:
    """Checksum and fsync every file of a filled temp folder; write its manifest last."""
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p != folder / MANIFEST:
            files[p.relative_to(folder).as_posix()] = {"bytes": p.stat().st_size, "sha256": _hash_file(p, sync=True)}
    manifest = {"format": FORMAT, "written_at": datetime.now(timezone.utc).isoformat(), "files": files}
    with open(folder / MANIFEST, "w") as fh:
        fh.write(json.dumps(manifest, indent=1))
        fh.flush()
        os.fsync(fh.fileno())
    for d in sorted({p.parent for p in folder.rglob("*")} | {folder}):
        _fsync_dir(d)


def damage(folder: str | Path) -> str | None:
    """Why the entry ``folder`` is not whole (one phrase), or None when every file its
    manifest lists is there with the recorded size and sha256."""
    folder = Path(folder)
    if not folder.is_dir():
        return "it is not a folder" if os.path.lexists(folder) else "it is missing"
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
        listed = [(str(name), int(f["bytes"]), str(f["sha256"])) for name, f in files.items()]
    except FileNotFoundError:
        return f"it has no {MANIFEST} (a partial write, or written before entries were checksummed)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"its {MANIFEST} is unreadable"
    for name, size, sha256 in listed:
        path = folder / name
        try:  # a file can go while it is checked (a replaced entry being deleted): then it is missing
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} has {path.stat().st_size} bytes where {size} were written"
            if _hash_file(path) != sha256:
                return f"{name} fails its sha256 checksum"
        except FileNotFoundError:
            return f"{name} is missing"
    return None


def move_aside(folder: str | Path, what: str, reason: str) -> Path | None:
    """Move a damaged entry to ``<name>.corrupt-<UTC time>`` with one warning; None when
    another process moved it first."""
    folder = Path(folder)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    aside = folder.with_name(f"{folder.name}.corrupt-{stamp}")
    try:
        os.rename(folder, aside)
    except FileNotFoundError:
        return None
    log.warning("The cached %s %s is damaged (%s): moved it to %s and computing it again", what, folder, reason,
                aside.name)
    return aside


_PINNED_DIRS = Path("/proc/self/fd")  # Linux: a path to the folder an open descriptor holds


def read_entry(folder: str | Path, read: Callable[[Path], T], what: str) -> T | None:
    """``read(folder)`` of a whole entry; None when it is missing or damaged (moved aside).
    ``read`` returns the artefact (the folder itself when it only checks it), never None.

    Safe beside writers of the same entry, ``replace=True`` ones included: the entry is
    checked and read through a descriptor of the folder as it was when opened (on Linux), so
    a writer swapping in a new entry meanwhile cannot mix its files into this read; and an
    entry that reads as damaged is moved aside only if it is still the folder that was read
    (a swapped-in entry is read again instead)."""
    folder = Path(folder)
    for _ in range(5):
        if not os.path.lexists(folder):
            return None
        try:
            fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except FileNotFoundError:  # removed or swapped between the two calls: look again
            continue
        except OSError:  # not a folder: damaged
            move_aside(folder, what, "it is not a folder")
            return None
        try:
            stat = os.fstat(fd)
            identity = stat.st_ino, stat.st_dev
            pinned = _PINNED_DIRS / str(fd) if _PINNED_DIRS.is_dir() else folder
            reason = damage(pinned)
            if reason is None:
                try:
                    result = read(pinned)
                    return folder if isinstance(result, Path) and result == pinned else result  # type: ignore[return-value]
                except MemoryError:
                    raise
                except Exception as e:  # noqa: BLE001 - whatever the parser says, the entry is unusable
                    reason = f"reading it failed: {type(e).__name__}: {e}"
            if _same_folder(folder, identity):
                move_aside(folder, what, reason)
                return None
        finally:
            os.close(fd)
        # another writer replaced the entry while it was read: read the new one
    return None


def _same_folder(folder: Path, identity: tuple[int, int]) -> bool:
    try:
        st = os.stat(folder)
    except FileNotFoundError:
        return False
    return (st.st_ino, st.st_dev) == identity


def write_entry(folder: str | Path, fill: Callable[[Path], object], replace: bool = False) -> Path:
    """Write the entry ``folder``: ``fill(tmp)`` writes its files into a temp folder, which is
    sealed (checksums, manifest, fsync) and renamed into place. A whole entry already there
    wins unless ``replace``; a damaged one is moved aside."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(folder, "tmp")
    try:
        tmp.mkdir()
        fill(tmp)
        _seal(tmp)
        _install(tmp, folder, replace)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # first: the free space reported is then a retry's
        os_error = as_os_error(e)
        if os_error is not None and os_error.errno in _DISK_ERRORS and not isinstance(e, DiskFullError):
            raise _write_error(folder, os_error) from e
        raise
    shutil.rmtree(tmp, ignore_errors=True)  # gone already once installed
    return folder


def _install(tmp: Path, folder: Path, replace: bool) -> None:
    replaced: list[Path] = []
    try:
        for _ in range(5):  # another writer can take the name between two attempts
            try:
                os.rename(tmp, folder)  # onto nothing or an empty folder; a full one refuses
                _fsync_dir(folder.parent)
                return
            except OSError as e:
                if e.errno not in _TAKEN:
                    raise
            if replace:
                replaced.append(_temp_name(folder, "old"))
                with contextlib.suppress(FileNotFoundError):
                    os.rename(folder, replaced[-1])
                continue
            reason = damage(folder)
            if reason is None:
                log.debug("Cache entry %s was written by another process meanwhile; keeping that one", folder)
                return
            move_aside(folder, "entry", reason)
        raise OSError(errno.EEXIST, f"Could not install cache entry {folder}: other writers keep replacing it")
    finally:
        for old in replaced:  # deleted only once the new entry is in place
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


def remove_entry(folder: str | Path) -> None:
    """Delete an entry that is no longer needed (renamed away first: no reader sees half of it)."""
    folder = Path(folder)
    old = _temp_name(folder, "old")
    try:
        os.rename(folder, old)
    except FileNotFoundError:
        return
    shutil.rmtree(old, ignore_errors=True)
