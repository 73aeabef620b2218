"""A full disk, said in one line: which folder, how much is free there and how much is needed.

Every writer that can meet a full disk (``store.write_atomic``, ``store.write_entry``, the wheel
download in ``spon_exp.assets``) turns the error into a :class:`DiskFullError`, an ``OSError``
(errno ENOSPC or EDQUOT) whose message is the sentence the CLI prints after ``spon-exp: error:``
and results.json records. safetensors reports a failed write as ``SafetensorError``, which is not
an ``OSError``; :func:`as_os_error` recovers the ``OSError`` it wraps.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

FULL = (errno.ENOSPC, errno.EDQUOT)
_WRAPPED_OS_ERROR = re.compile(r"\(os error (\d+)\)|\[Errno (\d+)\]")


class DiskFullError(OSError):
    """No space, or no quota, left where spon-exp writes; ``str()`` is one sentence that says
    where and how much to free."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def as_os_error(e: BaseException) -> OSError | None:
    """``e`` itself when it is an ``OSError``; the ``OSError`` behind a safetensors write error
    (``SafetensorError('... (os error 28)')``); else None."""
    if isinstance(e, OSError):
        return e
    if type(e).__name__ == "SafetensorError":
        m = _WRAPPED_OS_ERROR.search(str(e))
        if m:
            code = int(m.group(1) or m.group(2))
            return OSError(code, os.strerror(code))
    return None


def is_disk_full(e: BaseException) -> bool:
    os_error = as_os_error(e)
    return os_error is not None and os_error.errno in FULL


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the file system holding ``path`` (or its nearest existing parent)."""
    probe = Path(path)
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def human(n: int | None) -> str:
    if n is None:
        return "an unknown amount"
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


def disk_full_error(target: str | Path, e: OSError, needed: int | None = None) -> DiskFullError:
    """The one-line error for ``e`` (ENOSPC / EDQUOT) while writing ``target``; ``needed`` is the
    size of what was being written, where known. Call it once the partial write is removed:
    the free space it reports is then what a retry would have."""
    target = Path(target)
    folder = target.parent
    if e.errno == errno.EDQUOT:  # the file system's free space says nothing about a quota
        need = f" (it needs {human(needed)})" if needed is not None else ""
        return DiskFullError(e.errno, f"Could not write {target} in {folder}: the disk quota is exceeded{need}; free "
                                      f"some space within your quota and run again")
    free = free_bytes(folder)
    if needed is None:
        need, todo = f"{human(free)} free there, not enough for it", "free some disk space there"
    else:
        need = f"it needs {human(needed)}, {human(free)} free there"
        short = needed - (free or 0)
        todo = f"free at least {human(short)} there" if short > 0 else "free some disk space there"
    return DiskFullError(e.errno, f"Could not write {target} in {folder}: No space left on device ({need}); {todo} "
                                  f"and run again")


def as_disk_full(e: BaseException, where: str | Path) -> DiskFullError | None:
    """``e`` as a :class:`DiskFullError` when it is a full disk or quota (any ``OSError``, or a
    safetensors write error), naming its file, else ``where``; None for any other error."""
    if isinstance(e, DiskFullError):
        return e
    os_error = as_os_error(e)
    if os_error is None or os_error.errno not in FULL:
        return None
    return disk_full_error(getattr(os_error, "filename", None) or where, os_error)


def one_line_errors(program: str, user_errors: tuple[type[BaseException], ...], folder: str | Path, verbose: bool,
                    call):
    """``(0, call())``, or ``(2, None)`` after one ``<program>: error:`` line when ``call``
    raised one of ``user_errors`` or met a full disk under ``folder``; anything else, and
    everything with ``verbose``, is raised with its traceback. What the command-line tools
    besides ``spon-exp`` share."""
    import sys

    try:
        return 0, call()
    except user_errors as e:
        if verbose:
            raise
        print(f"{program}: error: {' '.join(str(e).split())}", file=sys.stderr)
    except Exception as e:
        full = as_disk_full(e, Path(folder))  # a full disk or quota: one line naming the folder
        if full is None or verbose:
            raise
        print(f"{program}: error: {full}", file=sys.stderr)
    return 2, None
