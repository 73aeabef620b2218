"""Export a finished run as a Hugging Face folder that runs sparse without spon-exp:
``export_run(run_dir, out)`` (:mod:`.hf_folder`), reading the run through :mod:`.run_folder`;
the folder's runtime is :mod:`.modeling_spon_sparse`, its model card :mod:`.card`."""

from spon_exp.export.hf_folder import (AUTO_MAP, CHECK_SHAPE, DEFAULT_OUT, RUNTIME_MODULE, RUNTIME_SOURCE,
                                       SPEC_FILE, STATE_FILE, check_out_dir, export_run, push_folder)
from spon_exp.export.run_folder import EXPORT_INPUTS, ExportError, check_run_files, read_run
from spon_exp.hub import load_sparse_model

__all__ = ["AUTO_MAP", "CHECK_SHAPE", "DEFAULT_OUT", "EXPORT_INPUTS", "RUNTIME_MODULE", "RUNTIME_SOURCE", "SPEC_FILE",
           "STATE_FILE", "ExportError", "check_out_dir", "check_run_files", "export_run", "load_sparse_model",
           "push_folder", "read_run"]
