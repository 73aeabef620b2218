"""What an export reads of a finished run folder: its results and resolved config, and the
sparse state files, each checked whole before any model loads (one clear error per problem)."""

from __future__ import annotations

import json
from pathlib import Path

from spon_exp.tracking.files import RESULTS, read_json


class ExportError(ValueError):
    """A user error: the run folder cannot be exported, or the output folder is taken."""


def read_run(run_dir: Path) -> tuple[dict, dict]:
    """``(results, config)`` of a finished run, or one clear error."""
    from omegaconf import OmegaConf

    if not run_dir.is_dir():
        raise ExportError(f"{run_dir} is not a folder; give a run folder written by spon-exp")
    results = read_json(run_dir / RESULTS)
    if results is None:
        raise ExportError(f"{run_dir} has no {RESULTS}: give the folder of a spon-exp run")
    if results.get("status") != "ok":
        raise ExportError(f"The run in {run_dir} did not finish (status {results.get('status')!r}); "
                          f"finish it by re-running its command first")
    if not (run_dir / "config.yaml").is_file():
        raise ExportError(f"{run_dir} has no config.yaml (the run's resolved config)")
    try:
        config = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True)
    except Exception as e:  # noqa: BLE001 - a damaged YAML: one line, not a parser traceback
        raise ExportError(f"{run_dir / 'config.yaml'} is damaged ({type(e).__name__}); run the run's command again into a "
                          f"new folder (hydra.run.dir=...) to write it again") from None
    return results, config


#: What an export reads of a run folder (besides results.json and config.yaml): the thresholds
#: and the folded biases. ``alpha.safetensors`` is not among them: its α is in the biases.
EXPORT_INPUTS = ("export/sparse_state.safetensors", "export/sparse_state.json")


def check_run_files(run_dir: Path) -> None:
    """Every file the export reads, checked whole before the model loads: one clear error
    naming a truncated or damaged one (a finished run is never written again: its command, run into a new
    folder, writes them anew)."""
    from spon_exp.models.loading import safetensors_problem

    for name in EXPORT_INPUTS:
        path = run_dir / name
        if not path.is_file():
            raise ExportError(f"{path} is missing; run the run's command again with save_export=true into a new folder "
                              f"(hydra.run.dir=...) to write it")
        problem = safetensors_problem(path) if path.suffix == ".safetensors" else _json_problem(path)
        if problem:
            raise ExportError(f"{path} is damaged ({problem}); run the run's command again into a new folder "
                              f"(hydra.run.dir=...) to write it again")


def _json_problem(path: Path) -> str | None:
    try:
        json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"not valid JSON: {type(e).__name__}: {e}"
    return None
