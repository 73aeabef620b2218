"""What the paper tables measure: perplexity that scores only tokens computed sparse
(``eval.ppl.score=sparsified``, experiment=paper), a validation error for a config that
would score dense-computed tokens, effective sparsity beside measured sparsity, one name
for a configuration's seeds, and the ``sparsifier.sparsity`` alias."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from spon_exp.config import ConfigError, scored_token_check, validate
from spon_exp.evaluation.perplexity import PerplexityProtocol, block_nll
from spon_exp.sparsifiers import build_sparsifier
from spon_exp.sparsifiers.base import TokenPolicy
from spon_exp.tracking.identity import RunIdentity, config_hash, dense_key, seed_group
from spon_exp.tracking.wandb_logger import grouping_keys
from tests.helpers import random_ids, tiny
from tests.test_app import SMALL, compose_cfg, strip_hydra
from tests.test_sweeps import REPO, compose_sweep, sweep_combinations


@pytest.fixture(scope="module")
def model():
    return tiny().model


def per_position_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """[rows, T - 1]: the NLL of target t + 1 at position t, one plain forward."""
    with torch.no_grad():
        logits = model(ids).logits.double()
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")


@pytest.mark.parametrize("policy,sparsified", [(TokenPolicy("last_fraction", 0.25), 8),
                                                (TokenPolicy("last_half", rounding="floor"), 16),
                                                (TokenPolicy("all"), 32)])
def test_sparsified_scoring_counts_exactly_the_policys_positions(model, policy, sparsified):
    blocks = random_ids(3, 32)
    assert policy.sparsified(32) == sparsified
    protocol = PerplexityProtocol(seq_len=32, batch_size=2, score="sparsified", sparse_tokens=policy)
    result = block_nll(model, blocks, protocol)
    first = 32 - sparsified  # positions first..30 predict targets first+1..31
    expected = per_position_nll(model, blocks)[:, first:].sum(1)
    assert result.tokens.tolist() == [31 - first] * 3
    assert torch.allclose(result.nll, expected, rtol=1e-6)
    assert protocol.describe()["score"] == "sparsified"


def test_sparsified_scoring_in_sliding_windows(model):
    stream = random_ids(1, 73).reshape(-1)  # 5 whole windows after the first 33 tokens
    policy = TokenPolicy("last_fraction", 0.1)  # a 41-token window (context 32 + 8 + 1) sparsifies its last 5
    protocol = PerplexityProtocol(protocol="sliding", context=32, window=8, score="sparsified", sparse_tokens=policy,
                                  score_first_window=False)
    result = block_nll(model, stream, protocol)
    assert policy.sparsified(41) == 5 and result.tokens.tolist() == [4] * len(result.tokens)


def test_the_sparse_forward_of_every_scored_token_is_sparsified(model):
    """With a sparsifier whose policy leaves the first 3/4 of a forward dense, the scored
    positions' NLLs under score=sparsified differ from dense ones only where inputs were sparse:
    scoring all positions and scoring the sparsified ones give the same sum over those."""
    blocks = random_ids(2, 32)
    sp = build_sparsifier("teal", sparsity=0.6, token_policy="last_fraction", token_fraction=0.25).attach(model)
    sp.calibrate(model, [blocks])
    try:
        scored = block_nll(model, blocks, PerplexityProtocol(seq_len=32, score="sparsified", sparse_tokens=sp.tokens))
        full = per_position_nll(model, blocks)
        assert torch.allclose(scored.nll, full[:, 24:].sum(1), rtol=1e-6)
        with sp.disabled():
            dense = per_position_nll(model, blocks)
        assert torch.allclose(dense[:, :24], full[:, :24], atol=1e-5)  # the unscored positions ran dense
        assert not torch.allclose(dense[:, 24:], full[:, 24:], atol=1e-3)  # the scored ones did not
    finally:
        sp.detach()


def test_effective_sparsity_counts_the_tokens_the_policy_kept_dense(model):
    blocks = random_ids(2, 40)
    sp = build_sparsifier("teal", sparsity=0.5, token_policy="last_fraction", token_fraction=0.25).attach(model)
    sp.calibrate(model, [blocks])
    try:
        with sp.measuring(), torch.no_grad():
            model(blocks)
        m = sp.measured_sparsity()
    finally:
        sp.detach()
    assert m["model"] == pytest.approx(0.5, abs=0.08)
    assert m["effective"] == pytest.approx(m["model"] * 10 / 40, rel=1e-6)  # 10 of 40 tokens sparsified


def test_rsparse_ref_run_reports_effective_sparsity_and_says_so(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "spon_exp.cli", "experiment=smoke", "sparsifier=rsparse_ref",
                           f"paths.outputs={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    measured, effective = results["sparsity"]["measured"], results["sparsity"]["effective"]
    assert measured > 0.4 and effective < measured / 4  # the last 10 % of each forward is sparsified
    assert f"effective {effective:.3f}" in proc.stdout
    assert "note: effective sparsity" in proc.stdout and "points below the measured" in proc.stdout
    assert "excludes training randomness" in proc.stdout  # a single seed's interval says what it covers


# ------------------------------------------------------------------ validation
PAPER_SWEEPS = [p.stem for p in sorted((REPO / "sweeps").glob("*.yaml"))
                if p.stem != "quality_cpu" and not p.stem.startswith("tune_spon")]


@pytest.mark.parametrize("sweep", PAPER_SWEEPS)
def test_every_paper_grid_point_scores_only_sparse_tokens(sweep):
    cfg = compose_sweep(sweep)
    combos = sweep_combinations(cfg)
    assert any(c.startswith("seed=") for combo in combos for c in combo)
    assert len({c for combo in combos for c in combo if c.startswith("seed=")}) == 3  # 3 seeds by default
    for combo in combos:
        point = compose_sweep(sweep, combo)
        assert point.eval.ppl.forbid_dense_scored and scored_token_check(point) is None
        if sweep.endswith("_cpu"):  # packaged model and corpora: the whole validation runs offline
            validate(point)


@pytest.mark.parametrize("preset", ["teal_ref", "wina_ref", "rsparse_ref", "larosa_ref"])
def test_each_reference_preset_under_the_paper_protocol_validates_and_scores_sparse(preset):
    cfg = compose_sweep("sparsifiers", [f"sparsifier={preset}"])
    assert cfg.eval.ppl.score == "sparsified" and scored_token_check(cfg) is None


def test_paper_config_that_would_score_dense_tokens_fails_with_one_line():
    cfg = compose_cfg(["experiment=paper", "model=smollm2_135m", "calib=wikipedia", "eval.ppl.corpora=[wikipedia]",
                       "sparsifier=rsparse_ref", "eval.ppl.score=all"])
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    message = str(e.value)
    assert "\n" not in message and "rsparse_ref" in message and "1843 tokens per forward" in message
    assert "eval.ppl.score=sparsified" in message
    # teal_ref with the whole chunk scored: its dense first half would be scored too
    cfg = compose_cfg(["experiment=paper", "model=smollm2_135m", "calib=wikipedia", "eval.ppl.corpora=[wikipedia]",
                       "sparsifier=teal_ref", "eval.ppl.score=all"])
    assert "1024 tokens per forward" in scored_token_check(cfg)
    # every token sparsified (the methods' defaults): nothing to refuse
    assert scored_token_check(compose_cfg(["experiment=paper", "sparsifier=teal", "eval.ppl.score=all"])) is None


def test_the_dense_cache_follows_the_scored_positions():
    a = compose_cfg(SMALL + ["sparsifier=teal_ref", "eval.ppl.score=sparsified"])
    b = compose_cfg(SMALL + ["sparsifier=rsparse_ref", "eval.ppl.score=sparsified"])
    c = compose_cfg(SMALL + ["sparsifier=teal_ref"])
    d = compose_cfg(SMALL + ["sparsifier=rsparse_ref"])
    assert dense_key(a) != dense_key(b)  # other positions scored: another dense baseline
    assert dense_key(c) == dense_key(d)  # all positions scored: one dense baseline for every sparsifier


# -------------------------------------------------------------------- identity
def test_seed_group_names_a_configuration_across_seeds():
    runs = {(seed, sparsity): compose_cfg(SMALL + [f"seed={seed}", f"sparsity={sparsity}"])
            for seed in (0, 1) for sparsity in (0.4, 0.6)}
    groups = {k: seed_group(cfg) for k, cfg in runs.items()}
    assert groups[(0, 0.4)] == groups[(1, 0.4)] != groups[(0, 0.6)] == groups[(1, 0.6)]
    assert config_hash(runs[(0, 0.4)]) != config_hash(runs[(1, 0.4)])
    assert RunIdentity.of(runs[(1, 0.6)]).seed_group == groups[(1, 0.6)]
    keys = grouping_keys(runs[(1, 0.4)])  # the W&B config key to group by
    assert keys["seed_group"] == groups[(0, 0.4)] and keys["seed"] == 1


def test_new_protocol_options_at_their_defaults_keep_every_name():
    plain = compose_cfg(SMALL)
    spelled = compose_cfg(SMALL + ["eval.ppl.score=all", "eval.ppl.forbid_dense_scored=false"])
    assert RunIdentity.of(plain) == RunIdentity.of(spelled)
    assert config_hash(compose_cfg(SMALL + ["eval.ppl.score=sparsified"])) != config_hash(plain)


def test_sparsifier_sparsity_is_the_sparsity_setting(tmp_path):
    from spon_exp.config import resolve_aliases

    alias = strip_hydra(compose_cfg(SMALL + ["sparsifier.sparsity=0.4"]))
    # named as sparsity=0.4 even before the alias is moved (the skip-finished launchers hash it so)
    assert RunIdentity.of(alias) == RunIdentity.of(compose_cfg(SMALL + ["sparsity=0.4"]))
    resolve_aliases(alias)
    assert alias.sparsity == 0.4 and alias.sparsifier.sparsity is None
    assert config_hash(alias) == config_hash(compose_cfg(SMALL + ["sparsity=0.4"]))
    both = strip_hydra(compose_cfg(SMALL + ["sparsifier.sparsity=0.4", "sparsity=0.6"]))
    with pytest.raises(ConfigError, match="give only sparsity=0.4"):
        resolve_aliases(both, explicit_sparsity=True)


def test_seeds_by_sparsity_sweep_collects_into_one_row_per_sparsity(tmp_path):
    """The issue's acceptance command, end to end: 3 seeds x 2 sparsities, then collect and compare."""
    from spon_exp.collect import main as collect_main

    proc = subprocess.run([sys.executable, "-m", "spon_exp.cli", "--multirun", "experiment=smoke", "seed=0,1,2",
                           "sparsifier.sparsity=0.4,0.6", f"paths.outputs={tmp_path}", "sweep_name=seeds"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sweep = tmp_path / "sweeps" / "seeds"
    targets = {json.loads(p.read_text())["sparsity"]["target"] for p in sweep.glob("*/results.json")}
    assert targets == {0.4, 0.6} and len(list(sweep.glob("*/results.json"))) == 6
    out = tmp_path / "tables"
    assert collect_main([str(sweep), "--out", str(out)]) == 0
    lines = (out / "ppl_wikipedia.md").read_text().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]
    assert [(r["sparsity"], r["n"]) for r in rows] == [("0.40", "3"), ("0.60", "3")]
    per_seed = json.loads((sweep / "seed=1,sparsifier.sparsity=0.6" / "results.json").read_text())
    assert per_seed["seed"] == 1 and per_seed["sparsity"]["target"] == 0.6
    assert collect_main([str(sweep), "--out", str(out), "--baseline", "sparsity=0.4", "--candidate",
                         "sparsity=0.6"]) == 0
    comparison = json.loads((out / "comparison.json").read_text())["corpora"]["wikipedia"]
    sparse = comparison["statistics"]["ppl/sparse"]
    assert comparison["paired"] and sparse["difference"] > 0 and sparse["ci"] is not None


# ---------------------------------------------------------- calibration BOS
def test_calibration_rows_with_a_bos_are_bos_plus_text(tmp_path):
    from spon_exp.data.corpora import token_blocks
    from spon_exp.data.tokenizer import byte_tokenizer

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(f"passage {i}: " + "some text of the passage " * 20 for i in range(40)))
    tok = byte_tokenizer()
    plain = token_blocks(tok, str(corpus), "calibration", 31, max_blocks=4)
    rows = token_blocks(tok, str(corpus), "calibration", 32, max_blocks=4, bos_token_id=256)
    assert rows.shape == (4, 32) and (rows[:, 0] == 256).all()
    assert torch.equal(rows[:, 1:], plain)  # the same text, one token shorter per row


def test_calibration_bos_names_the_calibration_artefacts_not_the_dense_baseline():
    none = compose_cfg(SMALL + ["calib.bos=none"])
    row = RunIdentity.of(compose_cfg(SMALL + ["calib.bos=row"]))
    auto_cfg = compose_cfg(SMALL)  # the default: auto
    before, auto = RunIdentity.of(none), RunIdentity.of(auto_cfg)
    assert row.sparsifier_key != before.sparsifier_key and row.alpha_key != before.alpha_key
    assert row.dense_key == before.dense_key == auto.dense_key and row.config_hash != before.config_hash
    assert auto.config_hash not in (before.config_hash, row.config_hash)  # the run says it asked for auto
    # once resolved, auto's calibration artefacts are the spelled-out policy's (shared caches)
    for spelled, resolved in ((before, auto.with_calib_bos(auto_cfg, "none")), (row, auto.with_calib_bos(auto_cfg, "row"))):
        assert (resolved.sparsifier_key, resolved.alpha_key) == (spelled.sparsifier_key, spelled.alpha_key)
        assert resolved.config_hash == auto.config_hash


def test_calibration_bos_none_keeps_the_names_of_runs_made_before_the_option():
    from spon_exp.tracking.identity import _identity_config

    assert "bos" not in _identity_config(compose_cfg(SMALL + ["calib.bos=none"]))["calib"]
    assert _identity_config(compose_cfg(SMALL))["calib"]["bos"] == "auto"


@pytest.mark.parametrize("evaluation_bos, calibration", [("chunk", "row"), ("stream", "none"), ("none", "none")])
def test_calibration_bos_auto_follows_the_evaluation(evaluation_bos, calibration):
    from spon_exp.runner import calibration_bos

    assert calibration_bos("auto", evaluation_bos) == calibration
    assert calibration_bos("row", evaluation_bos) == "row" and calibration_bos("none", evaluation_bos) == "none"


def test_calibration_bos_without_a_bos_token_fails_early():
    with pytest.raises(ConfigError, match="calib.bos=row needs a BOS token"):
        validate(compose_cfg(SMALL + ["calib.bos=row"]))


@pytest.mark.parametrize("calib_bos, warned, rows", [("none", True, False), ("row", False, True), ("auto", False, True)])
def test_an_evaluation_bos_without_a_calibration_bos_is_flagged(calib_bos, warned, rows, tmp_path, caplog):
    # Gemma-3: thresholds and α fitted without a BOS, evaluated with one, close a fraction of the
    # gap; calib.bos=auto (the default) gives BOS rows here, named as calib.bos=row's
    from types import SimpleNamespace

    from spon_exp.models.loading import load_model
    from spon_exp.runner import Timer, _load_data
    from spon_exp.tracking.files import MetricsWriter

    cfg = compose_cfg([*SMALL, "eval.ppl.bos=chunk", f"calib.bos={calib_bos}"], tmp_path)
    lm = load_model("tiny-random:llama")
    lm.tokenizer.bos_token = lm.tokenizer.eos_token  # the tiny tokenizer has no BOS of its own
    metrics = MetricsWriter(tmp_path / "metrics.jsonl")
    ctx = SimpleNamespace(cfg=cfg, timer=Timer(metrics), metrics=metrics, identity=RunIdentity.of(cfg), results={})
    with caplog.at_level("WARNING", logger="spon_exp.runner"):
        calib, evaluation = _load_data(ctx, lm.model, lm.tokenizer)
    assert evaluation.protocol.bos == "chunk"
    assert ("set calib.bos=auto or row" in caplog.text) == warned
    assert (calib[:, 0] == lm.tokenizer.bos_token_id).all() == rows
    assert ctx.results["calib_bos"] == ("row" if rows else "none")
    spelled = RunIdentity.of(compose_cfg([*SMALL, "eval.ppl.bos=chunk", f"calib.bos={ctx.results['calib_bos']}"], tmp_path))
    assert (ctx.identity.sparsifier_key, ctx.identity.alpha_key) == (spelled.sparsifier_key, spelled.alpha_key)
