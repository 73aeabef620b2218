"""spon.apply: α on every token (all) or only on the tokens the token policy sparsified
(sparsified), trained that way, folded into two biases per projection, exported with both."""

from __future__ import annotations

import json
import site
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from spon_exp.config import ConfigError, validate
from spon_exp.models.head import final_hidden
from spon_exp.models.loading import load_model
from spon_exp.sparsifiers import build_sparsifier
from spon_exp.spon import Spon, TrainConfig, fold_alpha, fold_alpha_checked, load_sparse_state, save_sparse_state, train_alpha
from spon_exp.spon.alpha import dense_mode
from spon_exp.tracking.identity import RunIdentity, alpha_key, config_hash, dense_key, sparsifier_key
from tests.helpers import random_ids
from tests.test_app import compose_cfg

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

LAST_HALF = ("teal", {"token_policy": "last_half"})
POLICIES = {
    "teal_last_half": LAST_HALF,
    # R-Sparse's low-rank path is a second forward hook on the same projections
    "rsparse_last_fraction": ("rsparse", {"sparse_share": 0.8, "token_policy": "last_fraction", "token_fraction": 0.25}),
    "wina_dense_first": ("wina", {"dense_first_fraction": 0.3}),
}


def trained(family: str, policy: str = "teal_last_half", apply: str = "sparsified", dtype: str = "float32",
            steps: int = 3):
    """A tiny model with its sparsifier calibrated and α trained (lr high enough to move it)."""
    method, options = POLICIES[policy]
    lm = load_model(f"tiny-random:{family}", dtype=dtype)
    sp = build_sparsifier(method, sparsity=0.5, **options).attach(lm.model)
    ids = random_ids(8, 32)
    sp.calibrate(lm.model, ids.split(4))
    spon = Spon(sp, 1, apply=apply)
    train_alpha(lm.model, sp, spon, ids, TrainConfig(lr=3e-2, steps=steps, batch_size=4))
    return lm, sp, spon, ids


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: q/k/v have biases of their own
def test_dense_policy_positions_are_the_dense_models_bit_for_bit(family, dtype):
    """Under last_half with apply=sparsified, the leading half of every forward is the dense
    model's, trained and folded; the sparsified half carries α."""
    lm, sp, spon, ids = trained(family, dtype=dtype)
    tokens = ids.shape[1]
    head = tokens - sp.sparsified_tokens(tokens)
    assert 0 < head < tokens
    with torch.no_grad():
        with dense_mode(sp, spon):
            dense = final_hidden(lm.model, ids)
        with spon.disabled():
            sparse_only = final_hidden(lm.model, ids)
        trained_hidden = final_hidden(lm.model, ids)
    fold_alpha(spon)
    with torch.no_grad():
        folded = final_hidden(lm.model, ids)
    for hidden in (trained_hidden, folded):
        assert torch.equal(hidden[:, :head], dense[:, :head])
        assert not torch.equal(hidden[:, head:], sparse_only[:, head:])  # α acts on the sparsified tokens
    assert torch.equal(trained_hidden, folded)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("apply", ["all", "sparsified"])
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_fold_check_is_exact_in_both_modes(policy, apply, dtype):
    """The trained (hooked) and the folded model: the same logits, for whole forwards and for
    a prefill followed by one-token decode steps."""
    lm, sp, spon, ids = trained("llama", policy, apply, dtype)
    with torch.no_grad():
        before = lm.model(ids).logits
    decode_before = prefill_then_decode(lm.model, ids[:2], prompt=20)
    _, report = fold_alpha_checked(lm.model, spon, ids[:4], checked_on="test batch")
    with torch.no_grad():
        after = lm.model(ids).logits
    assert report["max_abs_logit_diff"] == 0.0
    assert torch.equal(before, after)
    assert torch.equal(decode_before, prefill_then_decode(lm.model, ids[:2], prompt=20))


def test_the_modes_differ_where_the_policy_keeps_tokens_dense():
    """The same α acting on every token and on the sparsified ones only: the dense-policy
    positions differ, and only apply=sparsified leaves them dense."""
    lm, sp, spon, ids = trained("llama", apply="all")
    alpha = spon.alpha_state()
    with torch.no_grad():
        all_tokens = final_hidden(lm.model, ids)
        with dense_mode(sp, spon):
            dense = final_hidden(lm.model, ids)
    spon.detach()
    gated = Spon(sp, 1, apply="sparsified")
    gated.load_alpha_state(alpha)
    with torch.no_grad():
        only_sparsified = final_hidden(lm.model, ids)
    head = ids.shape[1] - sp.sparsified_tokens(ids.shape[1])
    assert not torch.equal(all_tokens[:, :head], dense[:, :head])
    assert torch.equal(only_sparsified[:, :head], dense[:, :head])


def test_the_two_modes_are_one_model_under_token_policy_all():
    """Every token sparsified: α trains to the same values and the models give the same logits."""
    results = {}
    for apply in ("all", "sparsified"):
        lm = load_model("tiny-random:llama")
        sp = build_sparsifier("teal", sparsity=0.5).attach(lm.model)
        ids = random_ids(8, 32)
        sp.calibrate(lm.model, ids.split(4))
        spon = Spon(sp, 1, apply=apply)
        train_alpha(lm.model, sp, spon, ids, TrainConfig(lr=3e-2, steps=3, batch_size=4))
        fold_alpha(spon)
        with torch.no_grad():
            results[apply] = (spon.alpha_state(), lm.model(ids).logits)
    (alpha_all, logits_all), (alpha_gated, logits_gated) = results["all"], results["sparsified"]
    assert alpha_all.keys() == alpha_gated.keys()
    assert all(torch.equal(alpha_all[k], alpha_gated[k]) for k in alpha_all)
    assert torch.equal(logits_all, logits_gated)


def prefill_then_decode(model, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits of a prefill of ``prompt`` tokens, then one token per forward through the KV cache."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        logits = [model(ids[:, :prompt], cache=cache, use_cache=True).logits]
        for t in range(prompt, ids.shape[1]):
            logits.append(model(ids[:, t:t + 1], cache=cache, use_cache=True).logits)
    return torch.cat(logits, dim=1)


def test_prefill_keeps_the_original_bias_and_decode_tokens_get_the_folded_one():
    lm, sp, spon, ids = trained("qwen2")
    biases = fold_alpha(spon)
    gate = sp.bias_gate
    seen: dict[int, list] = {}
    proj = next(p for p in sp.projections if p.name == "q_proj")  # a projection with its own bias

    def record(module, args):  # after the gate's pre-hook: the bias the product computes with
        seen.setdefault(args[0].shape[-2], []).append(module.bias.detach().clone())

    handle = proj.module.register_forward_pre_hook(record)
    with torch.no_grad():
        prefill_then_decode(lm.model, ids[:1], prompt=20)
    handle.remove()
    assert set(seen) == {20, 1}
    assert torch.equal(seen[20][0], gate.dense[proj.key]) and not torch.equal(seen[20][0], biases[proj.key])
    assert all(torch.equal(b, biases[proj.key]) for b in seen[1])  # every decode step
    assert torch.equal(proj.module.bias, gate.dense[proj.key])  # between forwards: the original


@pytest.mark.parametrize("apply", ["all", "sparsified"])
def test_saved_state_reattaches_both_biases(apply, tmp_path):
    lm, sp, spon, ids = trained("qwen2", apply=apply)
    biases = fold_alpha(spon)
    save_sparse_state(tmp_path, sp, biases)
    with torch.no_grad():
        folded = lm.model(ids).logits
        folded_decode = prefill_then_decode(lm.model, ids[:2], prompt=20)
    fresh = load_model("tiny-random:qwen2")
    loaded = load_sparse_state(fresh.model, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh.model(ids).logits, folded)
        assert torch.equal(prefill_then_decode(fresh.model, ids[:2], prompt=20), folded_decode)
    assert (loaded.bias_gate is not None) == (apply == "sparsified")
    meta = json.loads((tmp_path / "sparse_state.json").read_text())
    assert meta.get("spon_apply", "all") == apply


def test_apply_all_is_no_part_of_a_runs_identity():
    """apply=all, spelled out or absent (a config.yaml written before the option), names the
    same run and artefacts; apply=sparsified trains other α under another name."""
    base = compose_cfg([])
    identity = RunIdentity.of(base)
    assert RunIdentity.of(compose_cfg(["spon.apply=all"])) == identity
    older = OmegaConf.create(OmegaConf.to_container(base))
    with open_dict(older):
        del older.spon["apply"]
    assert RunIdentity.of(older) == identity
    gated = compose_cfg(["spon.apply=sparsified"])
    assert config_hash(gated) != config_hash(base) and alpha_key(gated) != alpha_key(base)
    assert sparsifier_key(gated) == sparsifier_key(base) and dense_key(gated) == dense_key(base)


def test_a_bad_apply_is_one_line_before_the_model_loads():
    with pytest.raises(ConfigError, match="spon.apply must be all .* or sparsified"):
        validate(compose_cfg(["spon.apply=dense"]))
    lm = load_model("tiny-random:llama")
    sp = build_sparsifier("teal", sparsity=0.5).attach(lm.model)
    with pytest.raises(ValueError, match="spon.apply must be one of"):
        Spon(sp, 1, apply="tokens")


# ------------------------------------------------------------------------------- export
ISOLATED_SCRIPT = r"""
import json, sys
sys.path[:0] = json.loads(sys.argv[1])  # site-packages only: not the repository, not the editable install
import torch
from transformers import AutoModelForCausalLM, DynamicCache
torch.set_num_threads(1)
ids = torch.load(sys.argv[2])
prompt = int(sys.argv[5])
out = {}
for folder in json.loads(sys.argv[3]):
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        prefill = model(ids).logits
        cache = DynamicCache(config=model.config)
        decode = [model(ids[:, :prompt], cache=cache, use_cache=True).logits]
        for t in range(prompt, ids.shape[1]):  # one token per forward through the KV cache
            decode.append(model(ids[:, t:t + 1], cache=cache, use_cache=True).logits)
        with model.sparse_runtime.disabled():
            dense = model(ids).logits
    out[folder] = {"prefill": prefill, "decode": torch.cat(decode, dim=1), "dense": dense,
                   "spon_exp_loaded": any(m.startswith("spon_exp") for m in sys.modules)}
torch.save(out, sys.argv[4])
"""

CHECK_IDS = random_ids(2, 48, seed=7)
PROMPT = 30


def make_run(run_dir: Path, family: str, policy: str, apply: str) -> dict:
    """A run folder with a folded sparse state (as the runner leaves it); returns the folded
    model's prefill and decode logits and its dense logits."""
    lm, sp, spon, _ = trained(family, policy, apply, steps=2)
    biases = fold_alpha(spon)
    with torch.no_grad():
        reference = {"prefill": lm.model(CHECK_IDS).logits,
                     "decode": prefill_then_decode(lm.model, CHECK_IDS, PROMPT)}
        with sp.disabled():
            reference["dense"] = lm.model(CHECK_IDS).logits
    save_sparse_state(run_dir / "export", sp, biases, extra_meta={"model": f"tiny-random:{family}"})
    results = {"status": "ok", "config_hash": f"{policy}-{apply}-{family}", "sparsifier": POLICIES[policy][0],
               "spon_count": 1, "model": {"path": f"tiny-random:{family}", "name": f"tiny-{family}", "dtype": "float32"},
               "sparsity": {"target": 0.5, "measured": 0.5, "measured_on": "random ids"},
               "ppl": {"wikipedia": {"dense": 250.0, "sparse": 260.0, "spon": 255.0}},
               "spon": {"count": 1, "steps": 2, "final_kl": 0.1, "apply": apply}}
    (run_dir / "results.json").write_text(json.dumps(results))
    OmegaConf.save(OmegaConf.create({"model": results["model"]}), run_dir / "config.yaml")
    return reference


def test_export_prefill_and_decode_equal_the_run_in_both_modes(tmp_path):
    from spon_exp.export import export_run

    cases = [(policy, apply, family) for policy in ("teal_last_half", "rsparse_last_fraction")
             for apply in ("all", "sparsified") for family in ("llama", "qwen2")]
    references, folders = {}, {}
    for case in cases:
        run_dir = tmp_path / "-".join(case)
        references[case] = make_run(run_dir, case[2], case[0], case[1])
        folders[case] = export_run(run_dir, check=False)
    torch.save(CHECK_IDS, tmp_path / "ids.pt")
    (tmp_path / "load.py").write_text(ISOLATED_SCRIPT)
    paths = [p for p in site.getsitepackages() if Path(p).is_dir()]
    env = {"PATH": "/usr/bin:/bin", "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-I", "-S", str(tmp_path / "load.py"), json.dumps(paths),
                           str(tmp_path / "ids.pt"), json.dumps([str(f) for f in folders.values()]),
                           str(tmp_path / "logits.pt"), str(PROMPT)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = torch.load(tmp_path / "logits.pt")
    for case, folder in folders.items():
        out = got[str(folder)]
        assert not out["spon_exp_loaded"], case
        for path in ("prefill", "decode", "dense"):
            assert torch.equal(out[path], references[case][path]), (case, path)  # bit for bit
        spec = json.loads((folder / "sparse_runtime.json").read_text())
        assert spec.get("spon_apply", "all") == case[1], case
        card = (folder / "README.md").read_text()
        assert ("every decode token" in card) == (case[1] == "sparsified"), case


def test_a_run_with_apply_sparsified_folds_exactly_and_exports_both_biases(tmp_path):
    """The runner end to end (teal_ref: last floor(T/2) tokens sparsified): the fold check on the
    first evaluation batch, results.json's spon.apply, and an export whose in-process logit
    check passes."""
    from spon_exp.export import export_run
    from spon_exp.runner import run
    from tests.test_app import strip_hydra

    cfg = compose_cfg(["experiment=smoke", "sparsifier=teal_ref", "spon.steps=2", "spon.apply=sparsified"], tmp_path)
    results = run(strip_hydra(cfg), tmp_path / "run")
    assert results["status"] == "ok" and results["spon"]["apply"] == "sparsified"
    assert results["fold"]["max_abs_logit_diff"] == 0.0
    meta = json.loads((tmp_path / "run" / "export" / "sparse_state.json").read_text())
    assert meta["spon_apply"] == "sparsified"
    folder = export_run(tmp_path / "run", tmp_path / "export")
    spec = json.loads((folder / "sparse_runtime.json").read_text())
    assert spec["spon_apply"] == "sparsified" and spec["export_check"]["max_abs_logit_diff"] == 0.0
    assert len(spec["dense_biases"]) == 0 and len(spec["biases"]) == 14  # the tiny Llama has no biases of its own
