"""Log a run's diagnostics to the run's own W&B run (images and tables), when it used W&B.

The run's W&B id is read from the run folder (``wandb/offline-run-<time>-<id>`` or
``wandb/run-<time>-<id>``: the id the run was logged under, whatever rule made it).
Online, that run is resumed (``resume="allow"``) and the diagnostics land on its page.
Offline, a second offline folder with the run's id would, once synced, replace the run's
history, so the diagnostics go to their own run ``<id>-diagnostics`` (same project and
group, ``job_type=diagnostics``, ``config.diagnoses = <id>``) under the run's ``wandb/``.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

DIAGNOSTICS_SUFFIX = "-diagnostics"  # offline: the diagnostics' own W&B run
RUN_FOLDER = re.compile(r"(?:offline-)?run-\d{8}_\d{6}-(?P<id>[A-Za-z0-9_-]+)$")


def wandb_run_id(run_dir: Path) -> str | None:
    """The id of the W&B run the run folder was logged to (its newest W&B folder), or None."""
    folders = sorted((p for p in (run_dir / "wandb").glob("*run-*") if p.is_dir() and RUN_FOLDER.match(p.name)
                      and not p.name.endswith(DIAGNOSTICS_SUFFIX)), key=lambda p: p.name.split("-", 2)[-1])
    return RUN_FOLDER.match(folders[-1].name)["id"] if folders else None


def log_diagnostics(run_dir: Path, config: dict, d: dict, folder: Path) -> dict | None:
    """Images (every PNG, ``diagnostics/plots/<name>``) and tables (``diagnostics/tables/``: drift
    per layer, Figure-1 average, KL curve, sparsity per projection) in the run's W&B run;
    returns ``{"id", "mode"}``, or None when the run did not use W&B."""
    logger = config.get("logger") or {}
    if logger.get("backend") != "wandb":
        return None
    run_id = wandb_run_id(run_dir)
    if run_id is None:
        log.warning("The run used W&B but %s/wandb holds no run folder: diagnostics not logged to W&B", run_dir)
        return None
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    mode = logger.get("mode", "offline")
    common = {"project": logger.get("project"), "entity": logger.get("entity"), "dir": str(run_dir), "mode": mode}
    if mode == "online":
        run = wandb.init(id=run_id, resume="allow", **common)
    else:
        run_id = f"{run_id}{DIAGNOSTICS_SUFFIX}"
        run = wandb.init(id=run_id, resume="allow", job_type="diagnostics", name=run_id,
                         group=logger.get("group") or config.get("sweep_name"),
                         config={"diagnoses": run_id.removesuffix(DIAGNOSTICS_SUFFIX), **d["run"]}, **common)
    try:
        data = {f"diagnostics/plots/{name}": wandb.Image(str(folder / Path(path).name))
                for name, path in d["plots"].items()}
        rows = [[v, layer, rel, cos] for v, x in d["drift"].items()
                for layer, rel, cos in zip(x["layer"], x["rel_l2"], x["cosine"])]
        data["diagnostics/tables/drift"] = wandb.Table(columns=["variant", "layer", "rel_l2", "cosine"], data=rows)
        f1 = d["figure1"]
        data["diagnostics/tables/figure1"] = wandb.Table(
            columns=["variant", "length", "always_kept"],
            data=[[v, t, c] for v, curve in f1["average"].items() for t, c in zip(f1["length"], curve)])
        kl = d["kl_curve"]
        data["diagnostics/tables/kl_curve"] = wandb.Table(columns=["step", "kl"],
                                                          data=[[s, k] for s, k in zip(kl["step"], kl["kl"])])
        data["diagnostics/tables/sparsity"] = wandb.Table(
            columns=["projection", "measured_sparsity"],
            data=[[k, v] for k, v in d["sparsity"]["per_projection"].items()])
        run.log(data)
    finally:
        run.finish()
    return {"id": run_id, "mode": mode}
