"""The library path (models, sparsifiers, SPON, perplexity, kernels) imports without Hydra,
OmegaConf, W&B, lm-eval or datasets: a GPU node may have only torch and transformers."""

import subprocess
import sys

LIBRARY = ["spon_exp", "spon_exp.models.loading", "spon_exp.data.corpora", "spon_exp.sparsifiers",
           "spon_exp.spon", "spon_exp.evaluation.perplexity", "spon_exp.kernels.decode", "spon_exp.hub"]
ABSENT = ["hydra", "omegaconf", "wandb", "lm_eval", "datasets"]

PROBE = f"""
import importlib, importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ABSENT!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (hidden, as on a GPU node)")
sys.meta_path.insert(0, Absent())
for module in {LIBRARY!r}:
    importlib.import_module(module)
print("ok")
"""


def test_library_path_imports_without_the_experiment_stack():
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_the_probe_fails_when_a_hidden_package_is_imported():
    proc = subprocess.run([sys.executable, "-c", PROBE.replace(repr(LIBRARY), repr(["spon_exp.config"]))],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "hidden, as on a GPU node" in proc.stderr
