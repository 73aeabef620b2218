"""Weight pruning (Wanda, SparseGPT): masks and weight updates against direct textbook
implementations of the published formulas, N:M patterns and exact sparsity, the layer-by-layer
calibration order, the cache, and the config rules."""

from __future__ import annotations

import math

import pytest
import torch

from spon_exp.models.adapters import PROJECTIONS, find_decoder_blocks
from spon_exp.pruning import build_pruner
from spon_exp.pruning.driver import prune_model
from spon_exp.pruning.sparsegpt import Hessian, sparsegpt_prune
from spon_exp.pruning.stage import calibration_windows, load_pruned, pack, unpack
from spon_exp.pruning.wanda import ColumnSquares, Wanda
from tests.helpers import random_ids, tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def fixed_layer(rows=6, columns=16, tokens=40, dead_column=3, seed=0):
    """A weight and calibration inputs (tokens x columns) with one input column always 0."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=g)
    x = torch.randn(tokens, columns, generator=g) * torch.linspace(0.2, 3.0, columns)
    x[:, dead_column] = 0
    return weight, x


# ----------------------------------------------------------------------------------- Wanda
def textbook_wanda(weight, x, sparsity, n=0, m=0):
    """Score |W_ij|·‖X_j‖₂ by explicit loops; per row the int(cols·s) lowest (N:M: the n lowest
    of each group of m) are pruned. Returns the prune mask as nested lists."""
    rows, cols = weight.shape
    norm = [math.sqrt(sum(float(x[t, j]) ** 2 for t in range(x.shape[0]))) for j in range(cols)]
    prune = [[False] * cols for _ in range(rows)]
    for i in range(rows):
        score = [abs(float(weight[i, j])) * norm[j] for j in range(cols)]
        groups = [list(range(g, g + m)) for g in range(0, cols, m)] if n else [list(range(cols))]
        count = n if n else int(cols * sparsity)
        for group in groups:
            for j in sorted(group, key=lambda j: (score[j], j))[:count]:
                prune[i][j] = True
    return prune


def wanda_result(weight, x, sparsity, **pattern):
    stat = ColumnSquares(x.shape[1], x.device)
    for part in x.split(7):  # accumulated over batches, as the driver feeds it
        stat.add(part[None])
    return Wanda(sparsity, **pattern).prune(weight, stat)


def test_wanda_hand_computed():
    weight = torch.tensor([[1.0, -2.0, 3.0, 0.5], [4.0, 1.0, -1.0, 2.0]])
    x = torch.tensor([[1.0, 2.0, 0.5, 4.0]])  # one token: column norms 1, 2, 0.5, 4
    # scores: row 0: 1, 4, 1.5, 2 -> prune columns 0, 2; row 1: 4, 2, 0.5, 8 -> prune columns 2, 1
    pruned, keep = wanda_result(weight, x, 0.5)
    assert keep.tolist() == [[False, True, False, True], [True, False, False, True]]
    assert pruned.tolist() == [[0.0, -2.0, 0.0, 0.5], [4.0, 0.0, 0.0, 2.0]]


@pytest.mark.parametrize("sparsity,pattern", [(0.5, {}), (0.25, {}), (0.7, {}), (0.5, dict(prune_n=2, prune_m=4)),
                                              (0.5, dict(prune_n=4, prune_m=8))])
def test_wanda_mask_matches_the_textbook_score(sparsity, pattern):
    weight, x = fixed_layer()
    pruned, keep = wanda_result(weight, x, sparsity, **pattern)
    expected = textbook_wanda(weight, x, sparsity, pattern.get("prune_n", 0), pattern.get("prune_m", 0))
    assert (~keep).tolist() == expected
    assert torch.equal(pruned, torch.where(keep, weight, torch.zeros(())))  # kept weights unchanged


# ------------------------------------------------------------------------------- SparseGPT
def textbook_sparsegpt(weight, x, sparsity, n=0, m=0, blocksize=8, percdamp=0.01):
    """OBS one column at a time in float64, with explicit inverses: H = 2XᵀX, a dead input
    column gets H_qq = 1 and weight 0, H += percdamp·mean(diag H)·I. Column q is processed with
    the inverse of H over the columns not yet processed, Finv = (H[q:, q:])⁻¹: a pruned weight w
    moves the rest of its row by −w / Finv[0,0] · Finv[0, :]. The mask: at each block start the
    int(rows·block·s) lowest saliencies w² / Finv_q[0,0] of the block (weights as the earlier
    blocks left them); N:M at each group's first column, the n lowest of the group per row."""
    W = weight.double().clone()
    H = 2 * x.double().T @ x.double()
    rows, cols = W.shape
    dead = [q for q in range(cols) if H[q, q] == 0]
    for q in dead:
        H[q, q] = 1
        W[:, q] = 0
    H += percdamp * torch.diagonal(H).mean() * torch.eye(cols, dtype=torch.float64)
    finv = [torch.linalg.inv(H[q:, q:]) for q in range(cols)]
    prune = torch.zeros(rows, cols, dtype=torch.bool)
    for b0 in range(0, cols, blocksize):
        block = list(range(b0, min(b0 + blocksize, cols)))
        if not n:
            saliency = [(float(W[i, q] ** 2 / finv[q][0, 0]), i * len(block) + (q - b0), i, q)
                        for i in range(rows) for q in block]
            for _, _, i, q in sorted(saliency)[:int(len(saliency) * sparsity)]:
                prune[i, q] = True
        for q in block:
            if n and (q - b0) % m == 0:
                for i in range(rows):
                    group = sorted(range(q, q + m), key=lambda j: (float(W[i, j] ** 2 / finv[j][0, 0]), j))
                    for j in group[:n]:
                        prune[i, j] = True
            for i in range(rows):
                if prune[i, q]:
                    W[i, q:] -= W[i, q] / finv[q][0, 0] * finv[q][0, :]
                    W[i, q] = 0.0
    return W, ~prune


@pytest.mark.parametrize("sparsity,pattern", [(0.5, {}), (0.3, {}), (0.5, dict(prune_n=2, prune_m=4))])
def test_sparsegpt_mask_and_update_match_textbook_obs(sparsity, pattern):
    weight, x = fixed_layer()
    hessian = Hessian(x.shape[1], x.device)
    for part in x.split(8):
        hessian.add(part[None])  # H scaled by 2 / sequences, the textbook by 2: the result is scale-free
    pruned, keep = sparsegpt_prune(weight, hessian.matrix(), sparsity, blocksize=8, **pattern)
    expected, expected_keep = textbook_sparsegpt(weight, x, sparsity, pattern.get("prune_n", 0),
                                                 pattern.get("prune_m", 0), blocksize=8)
    assert torch.equal(keep, expected_keep)
    assert torch.allclose(pruned.double(), expected, rtol=1e-4, atol=1e-5)
    assert (pruned[:, 3] == 0).all()  # the dead input column
    # the OBS update is no mask alone: kept weights moved, lowering the layer's output error for that mask
    assert not torch.equal(pruned[keep], weight[keep])

    def error(w):
        return ((x @ (weight - w).T) ** 2).sum()

    assert error(pruned) < error(weight.masked_fill(~keep, 0))


def test_sparsegpt_hessian_accumulates_two_x_xt_per_sequence():
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(1))
    hessian = Hessian(4, x.device)
    hessian.add(x[:2])
    hessian.add(x[2:])
    flat = x.reshape(-1, 4)
    assert torch.allclose(hessian.matrix(), 2 / 3 * flat.T @ flat, rtol=1e-6)


# ------------------------------------------------------------- patterns, exact sparsity
@pytest.mark.parametrize("name", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", [{}, dict(prune_n=2, prune_m=4), dict(prune_n=4, prune_m=8)])
def test_every_projection_is_pruned_exactly_with_its_pattern(name, pattern):
    lm = tiny("llama")
    head = lm.model.lm_head.weight.clone()
    embed = lm.model.get_input_embeddings().weight.clone()
    keeps = {}
    pruner = build_pruner(name, 0.5, blocksize=32, **pattern) if name == "sparsegpt" else build_pruner(name, 0.5, **pattern)
    fractions = prune_model(lm.model, random_ids(8, 32).split(4), pruner,
                            on_pruned=lambda p, keep: keeps.__setitem__(p.key, keep.clone()))
    blocks = find_decoder_blocks(lm.model)
    assert sorted(fractions) == sorted(f"{b.index}.{n}" for b in blocks for n in PROJECTIONS)
    for b in blocks:
        for n in PROJECTIONS:
            keep, weight = keeps[f"{b.index}.{n}"], b.projections[n].module.weight
            assert (weight[~keep] == 0).all() and fractions[f"{b.index}.{n}"] == 0.5
            rows, cols = keep.shape
            if pattern:
                m = pattern["prune_m"]
                assert ((~keep).reshape(rows, cols // m, m).sum(-1) == pattern["prune_n"]).all()
            elif name == "wanda":  # compared within each output row
                assert ((~keep).sum(1) == cols // 2).all()
            else:  # adaptive selection: exactly half of every block of 32 columns
                assert ((~keep).reshape(rows, cols // 32, 32).sum((0, 2)) == rows * 16).all()
    assert torch.equal(lm.model.lm_head.weight, head) and torch.equal(lm.model.get_input_embeddings().weight, embed)


# ---------------------------------------------------------------- layer-by-layer order
def input_squares(model, block, name, ids) -> torch.Tensor:
    """Σ over tokens of x² of one projection's input, from a forward of ``model`` as it is."""
    stat = ColumnSquares(block.projections[name].module.in_features, ids.device)
    handle = block.projections[name].module.register_forward_pre_hook(lambda m, args: stat.add(args[0]))
    with torch.no_grad():
        for part in ids.split(4):
            model(part)
    handle.remove()
    return stat.sum


def test_each_block_is_calibrated_on_the_outputs_of_the_pruned_blocks_before_it():
    lm = tiny("llama")
    ids = random_ids(8, 32)
    blocks = find_decoder_blocks(lm.model)
    dense_qkv = input_squares(lm.model, blocks[1], "q_proj", ids)
    seen = {}
    prune_model(lm.model, ids.split(4), Wanda(0.5), on_statistics=lambda b, stats: seen.__setitem__(b.index, stats))
    # block 1's q/k/v input: block 0 pruned (as the final model computes it, block 1 reads it before its own pruning)
    pruned_qkv = input_squares(lm.model, blocks[1], "q_proj", ids)
    assert torch.allclose(seen[1]["qkv_input"].sum, pruned_qkv, rtol=1e-5)
    assert not torch.allclose(seen[1]["qkv_input"].sum, dense_qkv, rtol=1e-2)
    # inside block 1, the MLP input comes from block 1's attention before block 1 was pruned
    dense_block = find_decoder_blocks(tiny("llama").model)[1]
    with torch.no_grad():
        for n in PROJECTIONS:
            blocks[1].projections[n].module.weight.copy_(dense_block.projections[n].module.weight)
    assert torch.allclose(seen[1]["gate_up_input"].sum, input_squares(lm.model, blocks[1], "gate_proj", ids), rtol=1e-5)


# ------------------------------------------------------------------ calibration, cache
def test_calibration_windows_are_seeded_random_offsets_with_the_bos_policy():
    from spon_exp.data.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    a = calibration_windows(tok, "wikipedia", 16, 6, seed=0)
    assert a.shape == (6, 16) and torch.equal(a, calibration_windows(tok, "wikipedia", 16, 6, seed=0))
    assert not torch.equal(a, calibration_windows(tok, "wikipedia", 16, 6, seed=1))
    row = calibration_windows(tok, "wikipedia", 16, 6, seed=0, bos_token_id=1)
    assert row.shape == (6, 16) and (row[:, 0] == 1).all()
    assert torch.equal(row[:, 1:], calibration_windows(tok, "wikipedia", 15, 6, seed=0))


def test_mask_bits_round_trip():
    keep = torch.rand(7, 13, generator=torch.Generator().manual_seed(0)) > 0.5
    bits = pack(keep)
    assert bits.dtype == torch.uint8 and bits.numel() == math.ceil(91 / 8)
    assert torch.equal(unpack(bits, [7, 13]), keep)


# --------------------------------------------------------------------- runs and config
def small_pruned(tmp_path, *extra, pruner=("pruner=sparsegpt", "pruner.blocksize=32")):
    from tests.test_app import SMALL, compose_cfg, strip_hydra

    return strip_hydra(compose_cfg([*SMALL, "logger=none", *pruner, "pruner.calib_sequences=6", *extra], tmp_path))


@pytest.fixture(scope="module")
def pruned_runs(tmp_path_factory):
    """Two runs of one pruned config (other folders, one cache) and one of another seed."""
    from spon_exp.runner import run

    root = tmp_path_factory.mktemp("pruned")
    return root, {name: run(small_pruned(root, *extra), root / name)
                  for name, extra in (("a", ()), ("b", ()), ("seed1", ("seed=1",)))}


def test_a_second_run_restores_the_pruned_weights_from_the_cache(pruned_runs):
    root, runs = pruned_runs
    a, b, other = runs["a"], runs["b"], runs["seed1"]
    assert (a["cache"]["pruner"], b["cache"]["pruner"], other["cache"]["pruner"]) == ("miss", "hit", "miss")
    assert a["status"] == "ok" and b["ppl"] == a["ppl"] and b["ppl_ci"] == a["ppl_ci"]
    assert set(a["ppl"]["wikipedia"]) == {"dense", "sparse"}  # no SPON on a pruned model
    assert a["pruner"]["label"] == "pruned: sparsegpt" and a["sparsity"]["measured"] == 0.5
    assert a["sparsity"]["measured_on"] == "weights" and a["spon_count"] == 0
    assert a["ppl"]["wikipedia"]["sparse"] != a["ppl"]["wikipedia"]["dense"]
    assert other["ppl"]["wikipedia"]["sparse"] != a["ppl"]["wikipedia"]["sparse"]  # other calibration windows
    assert other["ppl"]["wikipedia"]["dense"] == a["ppl"]["wikipedia"]["dense"]
    entry = root / "outputs" / "cache" / "pruned" / a["cache"]["pruner_key"]
    assert {p.name for p in entry.iterdir()} == {"masks.safetensors", "values.safetensors", "pruning.json",
                                                 "manifest.json"}


def test_a_mismatched_entry_raises_before_any_weight_changes(pruned_runs, tmp_path):
    import json
    import shutil

    root, runs = pruned_runs
    entry = tmp_path / "entry"
    shutil.copytree(root / "outputs" / "cache" / "pruned" / runs["a"]["cache"]["pruner_key"], entry)
    info = json.loads((entry / "pruning.json").read_text())
    info["projections"]["1.down_proj"]["kept"] += 1  # the last projection: every earlier one would apply first
    (entry / "pruning.json").write_text(json.dumps(info))
    model = tiny("llama").model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="1.down_proj"):
        load_pruned(entry, model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_export_and_diagnose_say_why_a_pruned_run_is_not_theirs(pruned_runs):
    from spon_exp.diagnostics import DiagnoseError, diagnose
    from spon_exp.export import ExportError, export_run

    root, _ = pruned_runs
    with pytest.raises(ExportError, match="pruned its weights.*save_checkpoint=true"):
        export_run(root / "a")
    with pytest.raises(DiagnoseError, match="pruned its weights"):
        diagnose(root / "a", log_to_wandb=False)


def test_a_pruned_run_saves_its_pruned_model_as_a_plain_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    from spon_exp.runner import run

    results = run(small_pruned(tmp_path, "save_checkpoint=true", pruner=["pruner=wanda_2of4"]), tmp_path / "run")
    loaded = AutoModelForCausalLM.from_pretrained(results["checkpoint"])
    for b in find_decoder_blocks(loaded):
        for n in PROJECTIONS:
            weight = b.projections[n].module.weight
            assert ((weight == 0).reshape(weight.shape[0], -1, 4).sum(-1) == 2).all()


def test_without_a_pruner_a_run_keeps_its_hash():
    from omegaconf import open_dict

    from spon_exp.tracking.identity import RunIdentity
    from tests.test_app import compose_cfg, strip_hydra

    cfg = strip_hydra(compose_cfg([]))
    before = RunIdentity.of(cfg)
    with open_dict(cfg):
        del cfg["pruner"]  # a config written before the pruner group existed
    assert RunIdentity.of(cfg) == before and before.pruner_key is None
    assert RunIdentity.of(strip_hydra(compose_cfg(["pruner.calib_sequences=3"]))) == before
    pruned = RunIdentity.of(strip_hydra(compose_cfg(["pruner=wanda"])))
    assert pruned.config_hash != before.config_hash and pruned.pruner_key is not None
    assert RunIdentity.of(strip_hydra(compose_cfg(["pruner=wanda", "eval.ppl.max_sequences=2"]))).pruner_key \
        == pruned.pruner_key  # the evaluation does not change the pruned weights


@pytest.mark.parametrize("overrides,message", [
    (["pruner=wanda", "sparsifier=teal"], "side by side, not stacked"),
    (["pruner=wanda", "spon.count=1"], "use spon.count=0"),
    (["pruner=wanda_2of4", "sparsity=0.6"], "set sparsity=0.5"),
    (["pruner=sparsegpt", "pruner.prune_n=4", "pruner.prune_m=2"], "0 < N < M"),
    (["pruner=sparsegpt_2of4", "pruner.blocksize=6"], "multiple of prune_m"),
    (["pruner=wanda", "pruner.calib_sequences=0"], "calib_sequences must be >= 1"),
])
def test_a_pruner_config_that_cannot_work_fails_in_one_sentence(overrides, message):
    from spon_exp.config import ConfigError, validate
    from tests.test_app import SMALL, compose_cfg, strip_hydra

    with pytest.raises(ConfigError, match=message):
        validate(strip_hydra(compose_cfg([*SMALL, *overrides])))


def test_collect_writes_the_method_table_and_pairs_spon_with_a_pruner(tmp_path, capsys):
    import subprocess
    import sys

    from spon_exp.collect import main as collect_main

    proc = subprocess.run([sys.executable, "-m", "spon_exp.cli", "--multirun", "experiment=smoke", "seed=0,1",
                           "pruner=none,wanda", "pruner.calib_sequences=6", f"paths.outputs={tmp_path}",
                           "sweep_name=p"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sweep, out = tmp_path / "sweeps" / "p", tmp_path / "tables"
    assert collect_main([str(sweep), "--out", str(out)]) == 0
    lines = (out / "methods_wikipedia.md").read_text().splitlines()[2:]
    assert [line.split(" | ")[1] for line in lines] == ["dense", "teal", "teal + SPON", "pruned: wanda"]
    assert all(" | 2 | " in line and "±" in line and "seeds and blocks" in line for line in lines)
    assert "| pruned: wanda | wikipedia | 0 |" in (out / "ppl_wikipedia.md").read_text()
    assert collect_main([str(sweep), "--out", str(out / "cmp"), "--candidate", "sparsifier=teal",
                         "--baseline", "pruner.name=wanda"]) == 0
    comparison = (out / "cmp" / "comparison.md").read_text()
    assert "| wikipedia | ppl/final |" in comparison and "paired, n=2" in comparison


def test_a_missing_pruned_run_of_a_sweep_is_its_own_row():
    from spon_exp.collect.runs import _fields_from_dirname

    assert _fields_from_dirname("pruner=wanda_2of4,seed=1") == {"sparsifier": "pruned: wanda_2of4",
                                                                "pruner": "pruned: wanda_2of4", "spon_count": 0}
    assert _fields_from_dirname("pruner=none,seed=1") == {}
