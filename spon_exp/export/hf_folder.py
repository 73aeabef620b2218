"""Export a finished run as a Hugging Face folder that runs sparse without spon-exp.

``export_run(run_dir, out)`` loads the run's model, re-attaches the run's sparse state
(``export/sparse_state.*``: thresholds / rotations / factors and the folded SPON biases),
and writes:

- ``config.json`` (with ``auto_map`` -> ``modeling_spon_sparse.SponSparseForCausalLM``),
  ``model.safetensors`` (the model's own weights), tokenizer and generation config;
- ``modeling_spon_sparse.py``: the self-contained runtime (masking hooks and biases; it
  imports torch, safetensors and transformers only);
- ``sparse_runtime.json`` / ``sparse_runtime.safetensors``: per projection, found by module
  name, its mask and numbers, and every folded bias;
- ``README.md``: the model card (method, target and measured sparsity, the run's figures
  with their intervals, config hash, how to load);
- ``manifest.json``: size and sha256 of every file (the folder is written like a cache entry:
  whole or not at all).

Before the folder is installed, it is loaded back with ``trust_remote_code=True`` and its
logits on 2 x 64 token ids are compared with the run's folded sparse model: they must be
equal bit for bit (recorded in ``sparse_runtime.json`` as ``export_check``).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from spon_exp.export.run_folder import ExportError, check_run_files, read_run
from spon_exp.export.runtime_spec import NotExportableError, runtime_spec
from spon_exp.hub import load_sparse_model
from spon_exp.tracking.files import read_json
from spon_exp.tracking.store import write_entry

log = logging.getLogger(__name__)

RUNTIME_SOURCE = Path(__file__).with_name("modeling_spon_sparse.py")
RUNTIME_MODULE = "modeling_spon_sparse"
SPEC_FILE = "sparse_runtime.json"
STATE_FILE = "sparse_runtime.safetensors"
AUTO_MAP = {"AutoModelForCausalLM": f"{RUNTIME_MODULE}.SponSparseForCausalLM"}
DEFAULT_OUT = "hf_export"  # under the run folder
CHECK_SHAPE = (2, 64)


def check_out_dir(out: Path, config_hash: str) -> None:
    """Refuse an output folder that holds anything but an export of this run."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder; choose another --out")
    if not any(out.iterdir()):
        return
    previous = read_json(out / SPEC_FILE) or {}
    if (previous.get("run") or {}).get("config_hash") != config_hash:
        raise ExportError(f"{out} is not empty and does not hold an export of run {config_hash}; "
                          f"choose another --out (or remove that folder)")


def _exportable_run(run_dir: Path) -> tuple[dict, dict, Path]:
    """The run's results, config and sparse-state folder, or an :class:`ExportError` saying in
    one line why there is nothing to export."""
    results, config = read_run(run_dir)
    if results.get("pruner"):  # pruner=wanda / sparsegpt: the weights themselves are the result
        raise ExportError(f"The run in {run_dir} pruned its weights ({results['pruner'].get('label')}), it has no "
                          f"activation sparsity to export; its pruned model is a plain checkpoint: re-run the run's "
                          f"command with save_checkpoint=true (written to export/checkpoint, loads with from_pretrained)")
    if results.get("sparsifier") == "dense":
        raise ExportError(f"The run in {run_dir} is dense (sparsifier=dense): there is nothing sparse to export; "
                          f"the model itself is {config['model']['path']}")
    state_dir = run_dir / "export"
    if not (state_dir / "sparse_state.safetensors").is_file():
        raise ExportError(f"{run_dir} has no export/sparse_state.safetensors (was it run with save_export=false?); "
                          f"re-run it with save_export=true")
    check_run_files(run_dir)
    return results, config, state_dir


def export_run(run_dir: str | Path, out: str | Path | None = None, device: str = "cpu",
               push_to_hub: str | None = None, private: bool = True, check: bool = True) -> Path:
    """Write the Hugging Face export of the run in ``run_dir`` to ``out`` (default
    ``<run_dir>/hf_export``); with ``push_to_hub``, upload it to that repository.

    ``check`` loads the written folder back (a second copy of the weights in memory) and
    requires its logits to equal the run's folded sparse model's bit for bit."""
    from spon_exp.models.loading import load_model
    from spon_exp.spon import load_sparse_state
    from spon_exp.spon.fold import read_sparse_state

    run_dir = Path(run_dir)
    results, config, state_dir = _exportable_run(run_dir)
    chash = results["config_hash"]
    out = Path(out) if out is not None else run_dir / DEFAULT_OUT
    check_out_dir(out, chash)

    model_cfg = config["model"]
    log.info("Loading %s and the run's sparse state", model_cfg["path"])
    loaded = load_model(model_cfg["path"], model_cfg.get("dtype", "float32"), device)
    model = loaded.model
    own_keys = set(model.state_dict())  # the architecture's own tensors (biases it declares included)
    sparsifier = load_sparse_state(model, state_dir)
    _, _, biases = read_sparse_state(state_dir)
    try:
        spec, tensors = runtime_spec(sparsifier, biases)
    except NotExportableError as e:
        raise ExportError(str(e)) from None
    spec["run"] = {"config_hash": chash, "run_folder": run_dir.resolve().name, "model": model_cfg["path"],
                   "spon_exp_version": results.get("spon_exp_version")}
    ids = torch.randint(0, model.config.vocab_size, CHECK_SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids.to(next(model.parameters()).device)).logits.cpu()

    dtype = next(model.parameters()).dtype

    def fill(folder: Path) -> None:
        from safetensors.torch import save_file

        from spon_exp.export.card import model_card

        model.config.auto_map = dict(AUTO_MAP)
        weights = {k: v for k, v in model.state_dict().items() if k in own_keys}
        model.save_pretrained(folder, state_dict=weights)
        if hasattr(loaded.tokenizer, "save_pretrained"):
            loaded.tokenizer.save_pretrained(folder)
        shutil.copyfile(RUNTIME_SOURCE, folder / f"{RUNTIME_MODULE}.py")
        save_file(tensors, str(folder / STATE_FILE))
        (folder / SPEC_FILE).write_text(json.dumps(spec, indent=2))
        if check:  # the runtime ignores this key; it records the check
            spec["export_check"] = _check(folder, reference, ids, device, dtype)
            (folder / SPEC_FILE).write_text(json.dumps(spec, indent=2))
        (folder / "README.md").write_text(model_card(results, config, spec, repo_id=push_to_hub))

    written = write_entry(out, fill, replace=True)
    sparsifier.detach()
    log.info("Exported run %s to %s%s", chash, written, " (logits checked equal bit for bit)" if check else "")
    if push_to_hub:
        push_folder(written, push_to_hub, private=private, message=f"spon-exp export of run {chash}")
    return written


def _check(folder: Path, reference: torch.Tensor, ids: torch.Tensor, device: str, dtype: torch.dtype) -> dict:
    """Load the written folder as a user would and compare its logits with the run's model."""
    model = load_sparse_model(folder, dtype=dtype)
    model.to(device)
    with torch.no_grad():
        logits = model(ids.to(device)).logits.cpu()
    diff = float((logits.float() - reference.float()).abs().max())
    if diff != 0.0:
        raise RuntimeError(f"The exported model's logits differ from the run's folded sparse model by up to "
                           f"{diff:.3g} on {ids.shape[0]} x {ids.shape[1]} token ids (a bug; please report it)")
    del model
    return {"max_abs_logit_diff": diff, "checked_on": f"{ids.shape[0]} x {ids.shape[1]} random token ids",
            "device": device}


def push_folder(folder: Path, repo_id: str, private: bool = True, message: str = "spon-exp export") -> str:
    """Upload an export folder to the hub repository ``repo_id`` (created if needed);
    returns the commit URL. Needs a token (``HF_TOKEN`` or ``hf auth login``)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=message)
    log.info("Pushed %s to %s", folder, repo_id)
    return str(getattr(info, "commit_url", info))
