"""Why SPON works, measured on a finished run: ``diagnose(run_dir)`` (:mod:`.report`, which
describes what is measured), its forward passes (:mod:`.measure`), the always-kept curves
(:mod:`.curves`), the plots (:mod:`.plots`) and their W&B logging (:mod:`.wandb_log`)."""

from spon_exp.diagnostics.curves import GRID_POINTS, always_kept_curve, length_grid
from spon_exp.diagnostics.report import (DEFAULT_MAX_LENGTH, DEFAULT_SEQUENCES, FOLDER, JSON_FILE, DiagnoseError,
                                         diagnose, load_diagnostics, read_kl_curve)

__all__ = ["DEFAULT_MAX_LENGTH", "DEFAULT_SEQUENCES", "FOLDER", "GRID_POINTS", "JSON_FILE", "DiagnoseError",
           "always_kept_curve", "diagnose", "length_grid", "load_diagnostics", "read_kl_curve"]
