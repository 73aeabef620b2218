"""spon-exp-export: the exported folder runs sparse in plain transformers, without spon-exp,
and reproduces the run's folded sparse model bit for bit (CPU, fp32)."""

from __future__ import annotations

import base64
import dataclasses
import json
import site
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from spon_exp.export import ExportError, export_run, load_sparse_model, push_folder
from spon_exp.export.cli import main as export_main
from spon_exp.sparsifiers import build_sparsifier
from spon_exp.sparsifiers.larosa import LarosaOptions
from spon_exp.sparsifiers.wina import WinaOptions
from spon_exp.spon import Spon, TrainConfig, fold_alpha, load_sparse_state, save_sparse_state, train_alpha
from tests.helpers import random_ids, tiny

METHODS = {
    "teal": ("teal", {}),
    "wina": ("wina", {}),
    "wina_threshold": ("wina", {"mode": "threshold", "norm_projections": "all"}),
    "rsparse": ("rsparse", {"sparse_share": 0.8}),
    "rsparse_last_fraction": ("rsparse", {"sparse_share": 0.8, "token_policy": "last_fraction",
                                          "token_fraction": 0.25}),
    "larosa": ("larosa", {}),
}
# WINA's transform (input map folded into the weights, like LaRoSA's folded rotation)
if "transform" in {f.name for f in dataclasses.fields(WinaOptions)}:
    METHODS["wina_transform"] = ("wina", {"transform": True})
# LaRoSA's rotation modes (folded: W·Q in the model, the container's input rotated; runtime:
# topk(x·Q)·Qᵀ in the hook) and tie rules, where this version has the options
if "rotation" in {f.name for f in dataclasses.fields(LarosaOptions)}:
    METHODS["larosa_runtime"] = ("larosa", {"rotation": "runtime"})
    METHODS["larosa_folded_break_shared_q"] = ("larosa", {"rotation": "folded", "ties": "break",
                                                          "mlp_rotation": "attention"})
FAMILIES = ("llama", "qwen3", "gemma3_text")
CASES = [(m, f) for m in METHODS for f in FAMILIES[:2]] + [("teal", "gemma3_text"), ("larosa", "gemma3_text")]
CHECK_IDS = random_ids(2, 48, seed=7)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_run(run_dir: Path, family: str, method: str) -> torch.Tensor:
    """A run folder as the runner leaves it (results.json, config.yaml, export/sparse_state.*)
    for a tiny model with calibrated state and trained, folded α; returns the folded sparse
    model's logits on CHECK_IDS (the model the run measured)."""
    name, kwargs = METHODS[method]
    lm = tiny(family)
    sp = build_sparsifier(name, sparsity=0.5, **kwargs).attach(lm.model)
    ids = random_ids(8, 32)
    sp.calibrate(lm.model, ids.split(4))
    spon = Spon(sp, 1)
    train_alpha(lm.model, sp, spon, ids, TrainConfig(lr=3e-2, steps=2, batch_size=4))
    biases = fold_alpha(spon)
    with torch.no_grad():
        logits = lm.model(CHECK_IDS).logits
    save_sparse_state(run_dir / "export", sp, biases, extra_meta={"model": f"tiny-random:{family}"})
    results = {"status": "ok", "config_hash": f"{method}-{family}", "sparsifier": name, "spon_count": 1,
               "model": {"path": f"tiny-random:{family}", "name": f"tiny-{family}", "dtype": "float32"},
               "sparsity": {"target": 0.5, "measured": 0.5, "measured_on": "random ids"},
               "ppl": {"wikipedia": {"dense": 250.0, "sparse": 260.0, "spon": 255.0}},
               "ppl_ci": {"wikipedia": {"dense": [240.0, 260.0], "sparse": [250.0, 270.0], "spon": [245.0, 265.0]}},
               "gap_closure": {"wikipedia": 0.5}, "gap_closure_ci": {"wikipedia": [0.3, 0.7]},
               "spon": {"count": 1, "steps": 2, "final_kl": 0.1}}
    (run_dir / "results.json").write_text(json.dumps(results))
    OmegaConf.save(OmegaConf.create({"model": results["model"]}), run_dir / "config.yaml")
    return logits


ISOLATED_SCRIPT = r"""
import json, sys
sys.path[:0] = json.loads(sys.argv[1])  # site-packages only: not the repository, not the editable install
try:
    import spon_exp
    spon_exp_importable = True
except ImportError:
    spon_exp_importable = False
import torch
from transformers import AutoModelForCausalLM
torch.set_num_threads(1)
ids = torch.load(sys.argv[2])
out = {"spon_exp_importable": spon_exp_importable,
       "modules": sorted(m for m in sys.modules if m.startswith("spon_exp"))}
logits = {}
for folder in json.loads(sys.argv[3]):
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        sparse = model(ids).logits
        with model.sparse_runtime.disabled():
            dense = model(ids).logits
    logits[folder] = {"sparse": sparse, "dense": dense, "class": type(model).__name__}
torch.save(logits, sys.argv[4])
print(json.dumps(out))
"""


def load_in_isolated_python(tmp_path: Path, folders: list[Path]) -> tuple[dict, dict]:
    """Load every export in a fresh ``python -I -S`` (no site hooks, so no editable install;
    sys.path = site-packages only) and return (its report, the logits per folder)."""
    torch.save(CHECK_IDS, tmp_path / "ids.pt")
    paths = [p for p in site.getsitepackages() if Path(p).is_dir()]
    script = tmp_path / "load_export.py"
    script.write_text(ISOLATED_SCRIPT)
    env = {"PATH": "/usr/bin:/bin", "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-I", "-S", str(script), json.dumps(paths), str(tmp_path / "ids.pt"),
                           json.dumps([str(f) for f in folders]), str(tmp_path / "logits.pt")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), torch.load(tmp_path / "logits.pt")


def test_export_runs_sparse_without_spon_exp_bit_for_bit(tmp_path):
    references, folders = {}, {}
    for method, family in CASES:
        run_dir = tmp_path / f"{method}-{family}"
        references[(method, family)] = make_run(run_dir, family, method)
        folders[(method, family)] = export_run(run_dir, check=False)
    report, logits = load_in_isolated_python(tmp_path, list(folders.values()))
    assert report == {"spon_exp_importable": False, "modules": []}
    for case, folder in folders.items():
        got = logits[str(folder)]
        assert got["class"].endswith("ForCausalLM") and "Spon" not in got["class"], case
        assert torch.equal(got["sparse"], references[case]), case  # bit for bit
        assert not torch.allclose(got["dense"], got["sparse"], atol=1e-3), case  # the hooks really sparsify
        spec = json.loads((folder / "sparse_runtime.json").read_text())
        assert len(spec["biases"]) == 14 and len(spec["projections"]) == 14, case
        rotated = [e for e in spec["projections"] if e.get("rotation")]  # rotated in the hook: q/k/v/gate/up
        larosa = METHODS[case[0]][0] == "larosa"
        if larosa and spec["sparsifier"].get("rotation", "runtime") == "folded" or spec["sparsifier"].get("transform"):
            assert not rotated and len(spec["folded_rotations"]) == 4, case  # attention + MLP input, 2 layers
        else:
            assert len(rotated) == (10 if larosa else 0) and not spec["folded_rotations"], case


def test_bias_free_families_get_their_biases_from_the_runtime(tmp_path):
    """Qwen3 declares no MLP biases and Gemma3 none at all: the runtime creates them, and
    without the runtime (plain from_pretrained, no remote code) the model has none."""
    from transformers import AutoModelForCausalLM

    make_run(tmp_path / "run", "gemma3_text", "teal")
    folder = export_run(tmp_path / "run")  # with the in-process check
    spec = json.loads((folder / "sparse_runtime.json").read_text())
    assert spec["export_check"]["max_abs_logit_diff"] == 0.0
    sparse = load_sparse_model(folder)
    plain = AutoModelForCausalLM.from_pretrained(folder)  # no trust_remote_code: the base model
    assert all(sparse.get_submodule(m).bias is not None for m in spec["biases"])
    assert all(plain.get_submodule(m).bias is None for m in spec["biases"])
    card = (folder / "README.md").read_text()
    assert "declare no biases" in card and "trust_remote_code=True" in card


def test_cli_exports_a_smoke_run_and_guards_folders(tmp_path, capsys):
    from spon_exp.runner import run
    from tests.test_app import compose_cfg, strip_hydra

    run_dir = tmp_path / "run"
    results = run(strip_hydra(compose_cfg(["experiment=smoke", "sparsifier=rsparse"], tmp_path)), run_dir)
    assert export_main([str(run_dir)]) == 0
    folder = run_dir / "hf_export"
    spec = json.loads((folder / "sparse_runtime.json").read_text())
    assert spec["run"]["config_hash"] == results["config_hash"] and spec["export_check"]["max_abs_logit_diff"] == 0.0
    card = (folder / "README.md").read_text()
    measured = results["sparsity"]["measured"]
    assert results["config_hash"] in card and f"{measured:.4f}" in card and "R-Sparse" in card
    assert f"{results['ppl']['wikipedia']['spon']:.3f} ±" in card  # the run's figure with its interval
    # the library one-liner = the run's folded sparse model (fresh load + the run's sparse state)
    from spon_exp.models.loading import load_model

    fresh = load_model("tiny-random:llama")
    load_sparse_state(fresh.model, run_dir / "export")
    with torch.no_grad():
        assert torch.equal(load_sparse_model(folder)(CHECK_IDS).logits, fresh.model(CHECK_IDS).logits)
    # an earlier export of the same run is replaced; anything else is refused
    assert export_main([str(run_dir), "--no-check"]) == 0
    other = tmp_path / "taken"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert export_main([str(run_dir), "--out", str(other)]) == 2
    assert "is not empty and does not hold an export of run" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "mine"
    assert export_main([str(tmp_path / "taken")]) == 2
    assert "has no results.json" in capsys.readouterr().err
    with pytest.raises(ExportError, match="dense"):
        dense = tmp_path / "dense"
        dense.mkdir()
        (dense / "results.json").write_text(json.dumps({"status": "ok", "config_hash": "x", "sparsifier": "dense"}))
        (dense / "config.yaml").write_text("model: {path: tiny-random:llama}\n")
        export_run(dense)


def test_push_to_hub_uploads_the_folder_through_the_hub_api(tmp_path, monkeypatch):
    """huggingface_hub's real client against a mocked HTTP layer: the files that arrive in the
    commit are the export's, byte for byte."""
    import httpx2
    from huggingface_hub.utils import _http

    make_run(tmp_path / "run", "llama", "larosa")
    folder = export_run(tmp_path / "run", check=False)
    received, calls = {}, []

    def handler(request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        calls.append((request.method, path))
        if path == "/api/repos/create":
            body = json.loads(request.content)
            assert body["name"] == "sparse-llama" and body["organization"] == "someone"
            return httpx2.Response(200, json={"url": "https://huggingface.co/someone/sparse-llama"})
        if path == "/api/validate-yaml":
            return httpx2.Response(200, json={})
        if path.endswith("/preupload/main"):
            files = json.loads(request.content)["files"]
            return httpx2.Response(200, json={"files": [{"path": f["path"], "uploadMode": "regular",
                                                         "shouldIgnore": False} for f in files]})
        if path.endswith("/commit/main"):
            for line in request.content.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    received[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            return httpx2.Response(200, json={"commitUrl": "https://huggingface.co/someone/sparse-llama/commit/1",
                                              "commitOid": "1" * 40})
        return httpx2.Response(404, json={"error": f"unexpected {request.method} {path}"})

    monkeypatch.setenv("HF_TOKEN", "hf_test_token_not_real")
    _http.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(handler)))
    _http.close_session()
    try:
        url = push_folder(folder, "someone/sparse-llama")
    finally:
        _http.set_client_factory(_http.default_client_factory)
        _http.close_session()
    assert url.endswith("/commit/1")
    local = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    assert received == local and "modeling_spon_sparse.py" in received
    assert ("POST", "/api/models/someone/sparse-llama/commit/main") in calls


@pytest.mark.parametrize("ties", ["keep", "break"])
def test_runtime_topk_equals_the_methods_mask_also_on_ties(ties):
    """The runtime's top-k (torch only) against the mask the methods use (the fused CPU kernel
    where it is built, else torch), on scores with many exact ties at the cut."""
    from spon_exp.export.modeling_spon_sparse import topk_mask
    from spon_exp.sparsifiers.scoring import magnitude_topk_mask

    x = torch.randint(-4, 5, (64, 96), generator=torch.Generator().manual_seed(1)).float() / 4
    scale = torch.rand(96, generator=torch.Generator().manual_seed(2))
    for keep, c in ((30, None), (48, scale), (1, None), (95, None)):
        expected = magnitude_topk_mask(x, keep, ties, c)
        score = x.abs() if c is None else x.abs() * c
        got = topk_mask(score, keep, ties)
        assert torch.equal(got, expected), (keep, ties)
        if ties == "break":
            assert (got.sum(-1) == keep).all()


@pytest.mark.parametrize("damage", ["truncated_state", "random_state", "truncated_meta", "bad_config"])
def test_export_of_a_run_with_a_damaged_file_is_one_line(damage, tmp_path, capsys):
    from spon_exp.runner import run
    from tests.test_app import compose_cfg, strip_hydra

    run_dir = tmp_path / "run"
    run(strip_hydra(compose_cfg(["experiment=smoke"], tmp_path)), run_dir)
    state, meta = run_dir / "export" / "sparse_state.safetensors", run_dir / "export" / "sparse_state.json"
    if damage == "truncated_state":
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    elif damage == "random_state":
        state.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    elif damage == "truncated_meta":
        meta.write_text(meta.read_text()[:20])
    else:
        (run_dir / "config.yaml").write_text("model: {path: [unclosed\n")
    capsys.readouterr()
    assert export_main([str(run_dir), "--no-check"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("spon-exp-export: error: ") and "damaged" in err[0]
    assert not (run_dir / "hf_export").exists()


def test_the_export_does_not_read_alpha(tmp_path):
    """alpha.safetensors is folded into the exported biases: a damaged copy does not matter,
    and EXPORT_INPUTS says which files do."""
    from spon_exp.export import EXPORT_INPUTS
    from spon_exp.runner import run
    from tests.test_app import compose_cfg, strip_hydra

    run_dir = tmp_path / "run"
    run(strip_hydra(compose_cfg(["experiment=smoke"], tmp_path)), run_dir)
    (run_dir / "alpha.safetensors").write_bytes(b"\x00" * 10)
    assert "alpha.safetensors" not in " ".join(EXPORT_INPUTS)
    assert export_main([str(run_dir), "--no-check"]) == 0


def test_model_card_template_is_package_data_and_fully_filled():
    """The card is spon_exp/export/model_card.md, shipped as package data, with every
    placeholder filled (a missing value fails loudly: string.Template.substitute)."""
    import fnmatch
    import tomllib
    from string import Template

    from spon_exp.export.card import TEMPLATE, model_card

    config = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["spon_exp.export"]
    assert any(fnmatch.fnmatch(TEMPLATE.name, p) for p in patterns)
    names = {m.group("named") or m.group("braced")
             for m in Template.pattern.finditer(TEMPLATE.read_text(encoding="utf-8"))}
    assert "method" in names and "figures" in names
    spec = {"sparsifier": {"name": "teal", "sparsity": 0.5}, "projections": [], "token_policy": {"kind": "all"}}
    results = {"config_hash": "abc", "ppl": {"wikipedia": {"dense": 10.0}}}
    card = model_card(results, {"model": {"path": "some/model"}}, spec)
    assert "$" not in card and card.startswith("---\nlibrary_name: transformers\n") and card.endswith("|\n")
