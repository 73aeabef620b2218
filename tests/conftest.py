"""Shared pytest fixtures."""

from __future__ import annotations

import os

# Tests run tiny models, where a second OpenMP thread only adds synchronisation (and on a
# shared 2-core machine, oversubscription): one thread per process, subprocesses included.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Without CUDA the Triton GEMV is tested in Triton's interpreter (tests/test_triton_gemv.py),
# which must be on before anything imports triton (torch._dynamo does, at collection): triton
# jits its own library functions when first imported. With CUDA the gpu tests run the
# compiled kernel instead.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: threads only add overhead (and contend on shared CPUs). A module opts in
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

# --- slurm_cluster: a real local SLURM cluster (slurm/start_local_cluster.sh) ---
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

_REPO = Path(__file__).resolve().parents[1]
_SLURM_BINARIES = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd", "sbatch", "sacct")


def _slurm_missing() -> list[str]:
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [b for b in _SLURM_BINARIES if shutil.which(b, path=path) is None]


def _recorded_alive(state_dir: Path, name: str) -> bool:
    try:
        pid = (state_dir / "pid" / f"{name}.pid").read_text().strip()
        proc = Path(f"/proc/{pid}")
        zombie = "zombie" in (proc / "status").read_text()  # a PID 1 that doesn't reap
        return (proc / "comm").read_text().strip() == name and not zombie
    except (OSError, ValueError):
        return False


@pytest.fixture(scope="module")
def slurm_cluster():
    """Start the local SLURM cluster with the project's script; export SLURM_CONF.

    Skips (with the reason) when the Slurm packages are missing, we are not root
    or the cluster cannot start -- unless SPON_EXP_REQUIRE_SLURM is set (CI),
    where missing packages are installed with slurm/install_deps.sh and any
    failure is a test failure. Stops the cluster at teardown, unless it was
    already running before (someone else's cluster is left alone).
    """
    require = bool(os.environ.get("SPON_EXP_REQUIRE_SLURM"))
    give_up = pytest.fail if require else pytest.skip
    state_dir = Path(os.environ.get("SPON_EXP_SLURM_DIR", "/tmp/spon-exp-slurm"))

    if os.geteuid() != 0:
        give_up("local SLURM cluster needs root (SlurmUser=root, munge socket in /run)")
    missing = _slurm_missing()
    if missing and require and shutil.which("apt-get"):
        subprocess.run(["bash", str(_REPO / "slurm/install_deps.sh")], check=False, timeout=1800)
        missing = _slurm_missing()
    if missing:
        give_up(f"Slurm packages not installed (missing {', '.join(missing)}); "
                "run `bash slurm/install_deps.sh` as root (Debian/Ubuntu apt)")

    was_running = _recorded_alive(state_dir, "slurmctld")
    res = subprocess.run(["bash", str(_REPO / "slurm/start_local_cluster.sh"), str(state_dir)],
                         capture_output=True, text=True, timeout=600)
    lines = res.stdout.splitlines()
    if res.returncode != 0 or len(lines) != 1 or not lines[0].startswith("export SLURM_CONF="):
        give_up(f"slurm/start_local_cluster.sh failed (rc {res.returncode}):\n"
                f"stdout: {res.stdout}\nstderr tail:\n{res.stderr[-4000:]}")
    conf = lines[0].split("=", 1)[1]

    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf  # sinfo/sbatch/submitit in this process read it
    try:
        yield SimpleNamespace(conf=Path(conf), state_dir=state_dir.resolve())
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        if not was_running:
            subprocess.run(["bash", str(_REPO / "slurm/stop_local_cluster.sh"), str(state_dir)],
                           check=False, timeout=300)
# --- end slurm_cluster ---
