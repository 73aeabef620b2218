"""Run-folder files: atomic JSON, the metrics stream and the environment record."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from spon_exp.tracking.store import write_atomic

RESULTS = "results.json"
METRICS = "metrics.jsonl"
ENV = "env.json"
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NAME", "SLURM_JOB_PARTITION",
              "SLURM_NODELIST", "SLURM_RESTART_COUNT")
PACKAGES = ("spon-exp", "torch", "transformers", "accelerate", "datasets", "hydra-core", "omegaconf", "wandb",
            "lm-eval", "submitit", "hydra-submitit-launcher", "safetensors", "gguf", "numpy")


def write_json_atomic(path: Path, data) -> None:
    """Write JSON through the one atomic writer (``store.write_atomic``): never half a file."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str))


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class MetricsWriter:
    """Appends one JSON object per line, flushed at once (survives a crash)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, event: str, **fields) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"event": event, "time": time.time(), **fields}, default=str) + "\n")

    def forget_steps(self, event: str, from_step: int) -> int:
        """Drop the ``event`` lines of step >= ``from_step`` (an earlier attempt's steps that a
        resumed run redoes), so the file holds each step once; returns how many were dropped.
        A torn last line (a killed writer) is dropped too."""
        if not self.path.exists():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if record.get("event") == event and record.get("step", -1) >= from_step:
                dropped += 1
                continue
            kept.append(line)
        if dropped:
            write_text_atomic(self.path, "".join(f"{line}\n" for line in kept))
        return dropped


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def environment() -> dict:
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    from spon_exp.tracking.lock import lock_status

    env = {
        "packages": versions,
        "lock": lock_status(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "git_commit": _git_commit(),
        "argv": sys.argv,
        "slurm": {k: os.environ[k] for k in SLURM_VARS if k in os.environ},
    }
    try:
        import torch

        env["torch"] = {"threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
                        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    except ImportError:
        pass
    from spon_exp.tracking.machine import cpu_info, gpu_info

    env["cpu"], env["gpu"] = cpu_info(), gpu_info()  # what a sparse figure's last bits depend on
    return env
