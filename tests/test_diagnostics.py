"""spon-exp-diagnose on the smoke experiment: Figure-1 curves, drift, KL curve, sparsity per
projection, PNGs + JSON in the run folder, the run's W&B run, and collect side by side."""

from __future__ import annotations

import csv
import glob
import json
from pathlib import Path

import pytest
import torch

from spon_exp.diagnostics import always_kept_curve, length_grid
from spon_exp.diagnostics.cli import main as diagnose_main
from tests.wandb_offline import read_offline_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_always_kept_curve_and_grid_hand_computed():
    mask = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 1], [0, 1, 1, 1]], dtype=torch.bool)
    # channels kept at every token so far: t=1 {0,1,3}, t=2 {0,3}, t=3 {3}
    assert always_kept_curve(mask).tolist() == [0.75, 0.5, 0.25]
    assert always_kept_curve(mask, dense_head=1).tolist() == [1.0, 0.5, 0.25]  # first token kept dense
    grid = length_grid(2048)
    assert grid[0] == 1 and grid[-1] == 2048 and grid == sorted(set(grid)) and 50 <= len(grid) <= 64
    assert length_grid(10) == list(range(1, 11))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    from spon_exp.runner import run
    from tests.test_app import compose_cfg, strip_hydra

    tmp = tmp_path_factory.mktemp("diagnose")
    run_dir = tmp / "run"
    results = run(strip_hydra(compose_cfg(["experiment=smoke", "logger=wandb_offline"], tmp)), run_dir)
    return run_dir, results


def test_diagnose_smoke_run(smoke_run, capsys):
    run_dir, results = smoke_run
    assert diagnose_main([str(run_dir), "--max-length", "128", "--sequences", "2"]) == 0
    printed = capsys.readouterr().out
    assert "drift sparse" in printed and "layer 0:" in printed and "layer 1:" in printed
    folder = run_dir / "diagnostics"
    d = json.loads((folder / "diagnostics.json").read_text())
    assert d["variants"] == ["dense", "sparse", "spon"] and d["data"]["max_length"] == 128
    for name in ("figure1", "figure1_per_layer", "drift", "kl_curve", "sparsity"):
        assert (folder / f"{name}.png").read_bytes()[:8] == PNG_MAGIC, name

    f1 = d["figure1"]
    assert f1["length"] == length_grid(128) and f1["length"][0] == 1 and f1["length"][-1] == 128
    for variant, curve in f1["average"].items():
        assert all(0.0 <= c <= 1.0 for c in curve) and all(a >= b for a, b in zip(curve, curve[1:])), variant
    # TEAL at 50 %: about half the channels of one token are kept, far fewer for all 128
    assert 0.3 < f1["average"]["sparse"][0] < 0.7 and f1["average"]["sparse"][-1] < f1["average"]["sparse"][0] / 2
    # the first block's q/k/v input does not depend on sparsity: the dense and sparse masks agree exactly
    assert f1["per_site"]["dense"]["0.qkv_input"] == f1["per_site"]["sparse"]["0.qkv_input"]
    assert set(f1["per_layer"]["sparse"]) == {"0", "1"} and len(f1["per_site"]["sparse"]) == 8
    assert all(0.0 < s <= 1.0 for s in f1["alpha_support"].values())  # trained α is non-zero somewhere

    drift = d["drift"]
    assert drift["dense"]["rel_l2"] == [0.0, 0.0]
    assert all(r > 0 for r in drift["sparse"]["rel_l2"]) and all(r > 0 for r in drift["spon"]["rel_l2"])
    assert all(-1.0 <= c < 1.0 for c in drift["sparse"]["cosine"])
    assert drift["sparse"]["rel_l2"] != drift["spon"]["rel_l2"]  # the folded biases are in the +SPON pass

    kl = d["kl_curve"]
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert kl["source"] == "metrics.jsonl" and kl["step"] == [0, 1, 2, 3]
    assert kl["kl"] == [e["kl"] for e in events if e["event"] == "train"]
    assert d["sparsity"]["per_projection"] == results["sparsity"]["per_projection"]
    assert len(d["sparsity"]["per_projection"]) == 14 and d["sparsity"]["source"].startswith("results.json")

    # offline: images and tables in a W&B run of their own beside the run's (whose folder is untouched)
    files = sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*" / "*.wandb")))
    run_ids = {Path(f).parent.name.split("-", 3)[-1] for f in files}
    run_id = min(run_ids, key=len)  # the id the run itself was logged under
    assert run_ids == {run_id, f"{run_id}-diagnostics"}
    assert f"W&B: logged to run {run_id}-diagnostics (offline)" in printed
    diagnosis = read_offline_run(next(f for f in files if f.endswith(f"{run_id}-diagnostics.wandb")))
    assert diagnosis["config"]["diagnoses"] == run_id and diagnosis["config"]["config_hash"] == results["config_hash"]
    assert diagnosis["summary"]["diagnostics/tables/figure1/_type"] == "table-file"
    assert diagnosis["summary"]["diagnostics/tables/drift/_type"] == "table-file"
    assert all(diagnosis["summary"][f"diagnostics/plots/{name}/_type"] == "image-file" for name in d["plots"])
    run_summary = read_offline_run(next(f for f in files if f.endswith(f"-{run_id}.wandb")))["summary"]
    assert "ppl/wikipedia/spon" in run_summary and not any(k.startswith("diagnostics/") for k in run_summary)

    # spon-exp-collect puts the runs' curves side by side
    from spon_exp.collect import main as collect_main

    out = run_dir.parent / "tables"
    assert collect_main([str(run_dir), "--out", str(out)]) == 0
    assert (out / "diagnostics_drift.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "diagnostics_figure1.png").read_bytes()[:8] == PNG_MAGIC
    with open(out / "diagnostics_drift.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {r["variant"] for r in rows} == {"dense", "sparse", "spon"}
    assert float(rows[2]["rel_l2"]) == pytest.approx(drift["sparse"]["rel_l2"][0])

    # diagnosing again replaces the earlier diagnosis, and logs to the same diagnostics run; a
    # results.json from before per-projection values were kept: measured on the diagnosis sequences
    older = {**results, "sparsity": {k: v for k, v in results["sparsity"].items() if k != "per_projection"}}
    (run_dir / "results.json").write_text(json.dumps(older))
    capsys.readouterr()
    assert diagnose_main([str(run_dir), "--max-length", "32", "--sequences", "1"]) == 0
    assert f"W&B: logged to run {run_id}-diagnostics (offline)" in capsys.readouterr().out
    again = json.loads((folder / "diagnostics.json").read_text())
    assert again["data"] == {"corpus": "wikipedia", "split": "evaluation", "sequences": 1, "max_length": 32}
    assert again["sparsity"]["source"].startswith("measured by spon-exp-diagnose")
    assert again["sparsity"]["per_projection"].keys() == results["sparsity"]["per_projection"].keys()
    assert all(0.2 < v < 0.8 for v in again["sparsity"]["per_projection"].values())


def test_diagnose_refuses_a_folder_without_a_run(tmp_path, capsys):
    assert diagnose_main([str(tmp_path)]) == 2
    assert "has no results.json" in capsys.readouterr().err


def test_diagnose_refuses_a_length_beyond_the_context(smoke_run, capsys):
    run_dir, _ = smoke_run
    assert diagnose_main([str(run_dir), "--max-length", "100000", "--no-wandb"]) == 2
    assert "--max-length must be in [2, 512]" in capsys.readouterr().err


def test_diagnose_a_dense_run_has_only_the_dense_variant(tmp_path):
    from spon_exp.runner import run
    from tests.test_app import compose_cfg, strip_hydra

    run_dir = tmp_path / "run"
    run(strip_hydra(compose_cfg(["experiment=smoke", "sparsifier=dense"], tmp_path)), run_dir)
    assert diagnose_main([str(run_dir), "--max-length", "32", "--sequences", "1"]) == 0
    d = json.loads((run_dir / "diagnostics" / "diagnostics.json").read_text())
    assert d["variants"] == ["dense"] and d["figure1"]["average"] == {} and d["drift"]["dense"]["rel_l2"] == [0.0, 0.0]
    assert not (run_dir / "diagnostics" / "figure1.png").exists()
