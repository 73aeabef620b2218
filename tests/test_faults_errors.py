"""One line for every user error that Hydra or a damaged run folder used to answer with many.

Hydra's compose errors (a wrong type, an unknown key, a bad value in a multirun list) end in one
``spon-exp: error:`` line and exit code 2, and ``--verbose`` / ``HYDRA_FULL_ERROR=1`` still
give the full output; ``spon-exp-diagnose`` refuses a truncated α or sparse state in one line.

(Bad values spon-exp validates itself: tests/test_faults_inputs.py.)
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from spon_exp.diagnostics.cli import main as diagnose_main
from spon_exp.runner import run
from spon_exp.tracking import store
from tests.test_app import SMALL, compose_cfg, strip_hydra

SMOKE = ["experiment=smoke", "logger=none"]


def cli(args, tmp_path, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spon_exp.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})}, cwd=tmp_path)


@pytest.mark.parametrize("args,line", [
    (["sparsity=abc"], "spon-exp: error: sparsity=abc: sparsity must be a number, got 'abc'"),
    (["seed=abc"], "spon-exp: error: seed=abc: seed must be a whole number, got 'abc'"),
    (["foo=1"], "spon-exp: error: there is no config key foo: check its spelling (`spon-exp --cfg job` prints every "
                "key and its value)"),
    (["--multirun", "seed=0,abc"], "spon-exp: error: seed=abc: seed must be a whole number, got 'abc'"),
    (["seed=["], "spon-exp: error: seed=[: no viable alternative at input '['"),
])
def test_hydra_compose_errors_are_one_line_with_exit_2(args, line, tmp_path):
    flags = [a for a in args if a.startswith("--")]  # before the overrides, as argparse wants
    overrides = [a for a in args if a not in flags]
    proc = cli([*flags, *SMOKE, *overrides, f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
               tmp_path)
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(line), proc.stderr[-3000:]
    assert "HYDRA_FULL_ERROR" not in proc.stderr and "full_key" not in proc.stderr
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob("sweep/*/results.json"))  # nothing ran


@pytest.mark.parametrize("how", [["--verbose"], "HYDRA_FULL_ERROR"])
def test_verbose_still_gives_hydras_full_output(how, tmp_path):
    flag, env = (how, {}) if isinstance(how, list) else ([], {how: "1"})
    proc = cli([*flag, *SMOKE, "sparsity=abc", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, env)
    assert proc.returncode != 0 and "Traceback" in proc.stderr
    assert "Error merging override sparsity=abc" in proc.stderr and "full_key: sparsity" in proc.stderr


# ------------------------------------------------------------------ spon-exp-diagnose

@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("finished")
    run(strip_hydra(compose_cfg([*SMALL, "logger=none"], root)), root / "run")
    return root / "run"


@pytest.mark.parametrize("name", ["alpha.safetensors", "export/sparse_state.safetensors"])
def test_diagnose_refuses_a_truncated_file_in_one_line(name, finished, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    path = run_dir / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert diagnose_main([str(run_dir), "--no-wandb"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"spon-exp-diagnose: error: {path} is damaged ("), err
    assert not (run_dir / "diagnostics").exists()


def test_diagnose_on_a_full_disk_is_one_line(finished, tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)

    def full(folder: Path) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store, "_seal", full)
    assert diagnose_main([str(run_dir), "--no-wandb", "--max-length", "32", "--sequences", "1"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "it/s]" not in line]  # no bars
    assert err == [err[0]] and err[0].startswith(f"spon-exp-diagnose: error: Could not write {run_dir / 'diagnostics'}")
    assert "No space left on device" in err[0] and not list(run_dir.glob(".diagnostics*"))


def test_collect_on_a_full_disk_is_one_line(finished, tmp_path, capsys, monkeypatch):
    from spon_exp.collect import cli as collect_cli

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "tables" / "ppl.md"))

    monkeypatch.setattr(collect_cli, "write_tables", full)
    assert collect_cli.main([str(finished.parent), "--out", str(tmp_path / "tables")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [err[0]] and err[0].startswith(f"spon-exp-collect: error: Could not write {tmp_path / 'tables' / 'ppl.md'}")
