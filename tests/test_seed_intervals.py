"""The interval over seeds and blocks, and what a comparison refuses, on constructed data where
each variant has its own block noise (so the gap closure moves from one block resample to the
next) and the answer is known in closed form. Each statistical test here fails on a known
wrong bootstrap: seeds drawing their own blocks, no small-n correction, gap closure as a ratio
of means, a comparison that is not paired."""

from __future__ import annotations

import json
import math
import shutil
import statistics

import pytest
import torch

from spon_exp.collect import main as collect_main
from spon_exp.evaluation.perplexity import BlockNLL
from spon_exp.evaluation.seed_intervals import Part, satterthwaite_df
from spon_exp.evaluation.seeds import SeedRun, aggregate, compare
from spon_exp.evaluation.uncertainty import Bootstrap
from tests.test_seeds import write_run

BLOCKS, TOKENS = 32, 255
T_975 = {2: 4.302652729911275, 4: 2.7764451051977987}  # Student t quantiles, 97.5 %, by degrees of freedom


def noise(seed: int, spread: float) -> torch.Tensor:
    """Per-block noise of mean exactly zero (the run's perplexity is then the level given)."""
    g = torch.Generator().manual_seed(seed)
    x = spread * torch.randn(BLOCKS, generator=g, dtype=torch.float64)
    return x - x.mean()


def run(seed, ppl: dict[str, float], block_noise: dict[str, torch.Tensor], protocol: dict | None = None) -> SeedRun:
    """One seed: each variant's per-token NLL is log(ppl) plus its own per-block noise."""
    blocks = {v: BlockNLL((math.log(p) + block_noise.get(v, torch.zeros(BLOCKS, dtype=torch.float64))) * TOKENS,
                          torch.full((BLOCKS,), TOKENS, dtype=torch.int64)) for v, p in ppl.items()}
    return SeedRun(seed, {v: b.perplexity for v, b in blocks.items()}, blocks, protocol)


def text(seed: int = 0) -> dict[str, torch.Tensor]:
    """The shared text: a difficulty every variant sees, plus sparse's and +SPON's own terms."""
    shared = noise(seed, 0.2)
    return {"dense": shared, "sparse": shared + noise(seed + 1, 0.05), "spon": shared + noise(seed + 2, 0.05)}


def width(ci) -> float:
    return ci[1] - ci[0]


def test_agreeing_seeds_give_the_interval_of_the_text_alone():
    runs = [run(s, {"dense": 24.0, "sparse": 36.0, "spon": 30.0}, text()) for s in range(3)]
    boot = Bootstrap()
    three, one = aggregate(runs, boot)["statistics"], aggregate(runs[:1], boot)["statistics"]
    for name in ("gap_closure", "ppl/spon", "ppl/sparse"):
        assert three[name]["parts"]["seeds"] == 0.0
        assert width(one[name]["ci"]) > 0.01  # the text moves it: the comparison below says something
        # every seed sees the same blocks: three copies are as uncertain as one (seeds drawing
        # their own blocks would shrink it by √3)
        assert three[name]["ci"] == pytest.approx(one[name]["ci"], rel=1e-9)


def test_over_seeds_alone_the_interval_is_students_t():
    values = (28.0, 30.0, 33.0)
    mean, sd = statistics.mean(values), statistics.stdev(values)
    expected = [mean - T_975[2] * sd / math.sqrt(3), mean + T_975[2] * sd / math.sqrt(3)]
    without_blocks = [SeedRun(s, {"dense": 24.0, "sparse": 36.0, "spon": p}) for s, p in enumerate(values)]
    flat_text = [run(s, {"dense": 24.0, "sparse": 36.0, "spon": p}, {}) for s, p in enumerate(values)]
    for runs in (without_blocks, flat_text):  # blocks that do not move the figure add nothing
        spon = aggregate(runs, Bootstrap())["statistics"]["ppl/spon"]
        assert spon["ci"] == pytest.approx(expected, rel=1e-9) and spon["df"] == pytest.approx(2)


def test_block_and_seed_parts_add_up_with_satterthwaites_degrees_of_freedom():
    assert satterthwaite_df([Part("a", 1.0, 2), Part("b", 1.0, 2)]) == pytest.approx(4)
    assert satterthwaite_df([Part("a", 1.0, 2), Part("b", 0.0, 31)]) == pytest.approx(2)
    runs = [run(s, {"dense": 24.0, "sparse": 36.0, "spon": p}, text()) for s, p in enumerate((29.0, 30.0, 31.5))]
    gap = aggregate(runs, Bootstrap())["statistics"]["gap_closure"]
    blocks, seeds = gap["parts"]["blocks"], gap["parts"]["seeds"]
    assert seeds == pytest.approx(statistics.variance(gap["values"]) / 3)
    plain = satterthwaite_df([Part("seeds", seeds, 2), Part("blocks", blocks, BLOCKS - 1)])
    # the seed part enters the degrees of freedom at its 75 % upper bound, 2 / χ²₂(0.25) = 3.48 times
    bounded = satterthwaite_df([Part("seeds", seeds * 3.4760595, 2), Part("blocks", blocks, BLOCKS - 1)])
    assert 2 < gap["df"] < plain < 2 + 31 and gap["df"] == pytest.approx(bounded, rel=1e-6)
    assert width(gap["ci"]) > 2 * 1.96 * math.sqrt(blocks + seeds)  # a t quantile, wider than the normal one


def test_gap_closure_is_the_mean_of_each_seeds_ratio():
    # two seeds with the same gap closure (0.5) but gaps of 12 and 2 points; only +SPON's blocks
    # vary, alike for both. A seed's gap closure moves with the blocks' shift ε as +SPON / gap:
    # -2.5 ε and -12.5 ε. The part of the mean's block variance that the seeds share is the
    # covariance of the two, 2.5 × 12.5 Var(ε): the geometric mean of the seeds' own variances.
    # A ratio of the seeds' mean perplexities would move (27.5 / 7) ε, for (27.5 / 7)² Var(ε).
    shift = {"spon": noise(5, 0.05)}
    wide = run(0, {"dense": 24.0, "sparse": 36.0, "spon": 30.0}, shift)
    narrow = run(1, {"dense": 24.0, "sparse": 26.0, "spon": 25.0}, shift)
    boot = Bootstrap()
    both = aggregate([wide, narrow], boot)["statistics"]["gap_closure"]
    each = [aggregate([r], boot)["statistics"]["gap_closure"]["parts"]["blocks"] for r in (wide, narrow)]
    assert both["mean"] == pytest.approx(0.5) and both["parts"]["seeds"] == pytest.approx(0, abs=1e-20)
    assert each[1] / each[0] == pytest.approx(25.0, rel=0.02)  # (12.5 / 2.5)²
    assert both["parts"]["blocks"] == pytest.approx(math.sqrt(each[0] * each[1]), rel=0.02)


def test_what_the_text_does_to_each_seed_alone_is_counted_once():
    # no text effect that the seeds share: each seed has its own block noise (seed × block). It
    # moves each seed's figure, so it is in the between-seed variance already; the block part,
    # the text every seed shares, must come out near zero rather than count it again.
    runs = [run(s, {"dense": 24.0, "sparse": 36.0, "spon": 30.0},
                {"sparse": noise(10 + s, 0.05) + 0.01 * s, "spon": noise(20 + s, 0.05)}) for s in range(4)]
    boot = Bootstrap()
    spon = aggregate(runs, boot)["statistics"]["ppl/spon"]
    own = statistics.mean(aggregate([r], boot)["statistics"]["ppl/spon"]["parts"]["blocks"] for r in runs)
    assert own > 0.01  # each seed alone moves with its blocks
    assert spon["parts"]["blocks"] < 0.1 * own / 4  # the seed mean's resample variance would be about own / 4


def shifted_pair(seed_effects, improvement: float):
    """Baseline and candidate over the same seeds: large seed effects both sides share, each
    side's own block noise, the candidate's +SPON better by ``improvement``."""
    t = text()
    base, cand = [], []
    for s, e in enumerate(seed_effects):
        base.append(run(s, {"dense": 24.0, "sparse": 36.0, "spon": 30.0 + e}, t))
        own = {**t, "spon": t["spon"] + noise(50 + s, 0.01)}
        cand.append(run(s, {"dense": 24.0, "sparse": 36.0, "spon": 30.0 + e - improvement}, own))
    return base, cand


def test_a_comparison_pairs_seeds_so_what_they_share_cancels():
    base, cand = shifted_pair([0.0, 2.0, -1.5, 1.0], improvement=0.5)
    comp = compare(base, cand, Bootstrap())
    final = comp["statistics"]["ppl/final"]
    assert comp["paired"] and comp["refused"] is None
    assert final["difference"] == pytest.approx(-0.5, abs=0.05) and final["excludes_zero"] and final["ci"][1] < 0
    # the seed effects (SD 1.5) dwarf the difference, but cancel seed by seed
    assert final["parts"]["seeds"] < 0.01 and final["df"] < 4 + 31
    other_seeds = [SeedRun(r.seed + 10, r.ppl, r.blocks) for r in cand]
    loose = compare(base, other_seeds, Bootstrap())
    assert not loose["paired"] and not loose["statistics"]["ppl/final"]["excludes_zero"]


def test_identical_configurations_share_every_block_draw():
    runs = [run(s, {"dense": 24.0, "sparse": 36.0, "spon": p}, text()) for s, p in enumerate((29.0, 30.0, 31.5))]
    same = compare(runs, [SeedRun(r.seed, r.ppl, r.blocks) for r in runs], Bootstrap())["statistics"]
    for name in ("gap_closure", "ppl/spon", "ppl/sparse"):
        assert same[name]["ci"] == [0.0, 0.0] and same[name]["excludes_zero"] is False


def test_the_percentile_method_scales_the_seed_draw():
    # 3 seeds without blocks: the 2.5 % quantile falls on "seed 0 drawn three times" (1 in 27),
    # whose deviation from the mean the method scales by √(3/2) (unbiased variance of the mean)
    values = (28.0, 30.0, 33.0)
    runs = [SeedRun(s, {"dense": 24.0, "sparse": 36.0, "spon": p}) for s, p in enumerate(values)]
    ci = aggregate(runs, Bootstrap(), method="percentile")["statistics"]["ppl/spon"]["ci"]
    mean = statistics.mean(values)
    assert ci == pytest.approx([mean + math.sqrt(1.5) * (28 - mean), mean + math.sqrt(1.5) * (33 - mean)])


# ------------------------------------------------------- what a comparison refuses
def test_a_missing_seed_leaves_the_others_paired():
    base, cand = shifted_pair([0.0, 2.0, -1.5, 1.0], improvement=0.5)
    comp = compare(base, cand[:3], Bootstrap())
    assert comp["paired"] and comp["n_baseline"] == comp["n_candidate"] == 3
    assert comp["left_out"] == {"baseline": [3], "candidate": []}
    assert comp["statistics"] == compare(base[:3], cand[:3], Bootstrap())["statistics"]
    assert comp["statistics"]["ppl/final"]["excludes_zero"]


def test_one_seed_on_a_side_gives_no_verdict():
    base, cand = shifted_pair([0.0, 2.0, -1.5], improvement=3.0)
    for one in (cand[:1], [SeedRun(7, cand[0].ppl, cand[0].blocks)]):
        comp = compare(base, one, Bootstrap())
        assert comp["refused"] == "n=1: blocks only, run more seeds" and comp["covers"] == "blocks"
        for st in comp["statistics"].values():
            assert st["excludes_zero"] is None
    both_one = compare(base[:1], cand[:1], Bootstrap())
    assert both_one["paired"] and both_one["refused"] == "n=1: blocks only, run more seeds"
    without_blocks = compare([SeedRun(0, base[0].ppl)], [SeedRun(0, cand[0].ppl)], Bootstrap())
    assert without_blocks["refused"] == "n=1: no per-block data, run more seeds"
    assert without_blocks["statistics"]["ppl/final"]["ci"] is None


def test_runs_scored_on_other_text_are_refused():
    chunks = {"protocol": "chunks", "seq_len": 256, "split": "evaluation", "bos": "none"}
    base = [run(s, {"dense": 24.0, "sparse": 36.0}, text(), chunks) for s in range(2)]
    longer = [run(s, {"dense": 24.0, "sparse": 35.0}, text(), {**chunks, "seq_len": 512}) for s in range(2)]
    with pytest.raises(ValueError, match=r"scored differently \(eval.ppl seq_len: 256 against 512\)"):
        compare(base, longer, Bootstrap())
    other_split = [run(s, {"dense": 24.0, "sparse": 35.0}, text(), {**chunks, "split": "validation"}) for s in range(2)]
    with pytest.raises(ValueError, match="split: evaluation against validation"):
        compare(base, other_split, Bootstrap())
    # the BOS policy alone is no mismatch, but the tokens it scores are
    with_bos = [run(s, {"dense": 24.0, "sparse": 35.0}, text(), {**chunks, "bos": "chunk"}) for s in range(2)]
    assert compare(base, with_bos, Bootstrap())["paired"]
    for r in with_bos:
        for b in r.blocks.values():
            b.tokens += 1
    with pytest.raises(ValueError, match="different numbers of tokens in the same block"):
        compare(base, with_bos, Bootstrap())


# ------------------------------------------------------------ spon-exp-collect
@pytest.fixture
def sweep(tmp_path):
    """Two configurations (sparsity 0.4 and 0.6) over seeds 0, 1, 2, scored with one protocol."""
    folder = tmp_path / "sweep"
    base, cand = shifted_pair([0.0, 2.0, -1.5], improvement=3.0)
    for name, sparsity, runs in (("a", 0.4, base), ("b", 0.6, cand)):
        for r in runs:
            write_run(folder, f"{name}{r.seed}", r, sparsity, name * 12)
            path = folder / f"{name}{r.seed}" / "results.json"
            results = json.loads(path.read_text())
            results["ppl_protocol"] = {"protocol": "chunks", "seq_len": 256, "split": "evaluation", "bos": "none"}
            path.write_text(json.dumps(results))
    return folder


def comparison(tmp_path, folder, *extra) -> dict:
    assert collect_main([str(folder), "--out", str(tmp_path / "cmp"), "--baseline", "sparsity=0.4",
                         "--candidate", "sparsity=0.6", *extra]) == 0
    return json.loads((tmp_path / "cmp" / "comparison.json").read_text())["corpora"]["wikipedia"]


def test_collect_counts_a_copied_run_once(sweep, tmp_path, capsys):
    shutil.copytree(sweep / "a0", sweep / "again" / "a0")
    out = tmp_path / "tables"
    assert collect_main([str(sweep), "--out", str(out)]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "found twice" in line]
    assert len(err) == 1 and str(sweep / "a0") in err[0] and str(sweep / "again" / "a0") in err[0]
    table = (out / "ppl_wikipedia.md").read_text()
    assert "| 0.40 | 3 |" in table and "1 duplicate" in table
    assert "duplicate" in (out / "runs.md").read_text()
    comp = comparison(tmp_path, sweep)
    assert comp["paired"] and comp["n_baseline"] == 3


def test_collect_pairs_on_the_common_seeds_and_names_the_rest(sweep, tmp_path, capsys):
    shutil.rmtree(sweep / "b2")
    comp = comparison(tmp_path, sweep)
    assert comp["paired"] and comp["n_baseline"] == 2 and comp["left_out"] == {"baseline": [2], "candidate": []}
    assert "paired, n=2 (left out: baseline seed 2)" in (tmp_path / "cmp" / "comparison.md").read_text()


def test_collect_gives_no_verdict_with_one_seed_on_a_side(sweep, tmp_path):
    for s in (1, 2):
        shutil.rmtree(sweep / f"b{s}")
    comp = comparison(tmp_path, sweep)
    assert comp["refused"] == "n=1: blocks only, run more seeds"
    rows = [line for line in (tmp_path / "cmp" / "comparison.md").read_text().splitlines() if "ppl/" in line]
    assert rows and all("| n=1: blocks only, run more seeds |" in line for line in rows)
    assert not any("| yes |" in line or "| no |" in line for line in rows)


def test_collect_refuses_to_pair_other_protocols_in_one_line(sweep, tmp_path, capsys):
    for s in range(3):
        path = sweep / f"b{s}" / "results.json"
        results = json.loads(path.read_text())
        results["ppl_protocol"]["seq_len"] = 512
        path.write_text(json.dumps(results))
    assert collect_main([str(sweep), "--out", str(tmp_path / "x"), "--baseline", "sparsity=0.4",
                         "--candidate", "sparsity=0.6"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "seq_len: 256 against 512" in err
