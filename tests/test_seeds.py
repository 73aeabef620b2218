"""Figures over seeds (spon_exp.evaluation.seeds, spon-exp-collect): a configuration's mean over
its seeds with a two-level interval (seeds and blocks), the between-seed SD, paired
comparisons; on constructed per-block NLLs where the answer is known."""

from __future__ import annotations

import csv
import json
import math
import statistics

import pytest
import torch
from safetensors.torch import save_file

from spon_exp.collect import main as collect_main
from spon_exp.evaluation.perplexity import BlockNLL
from spon_exp.evaluation.seeds import SeedRun, aggregate, compare
from spon_exp.evaluation.uncertainty import Bootstrap, perplexity_intervals

BLOCKS, TOKENS = 32, 255


def block_nll(ppl: float, spread: float, g: torch.Generator) -> BlockNLL:
    """Blocks whose mean per-token NLL is log(ppl), each block's own level varying by ``spread``."""
    per_token = math.log(ppl) + spread * torch.randn(BLOCKS, generator=g, dtype=torch.float64)
    tokens = torch.full((BLOCKS,), TOKENS, dtype=torch.int64)
    return BlockNLL(per_token * TOKENS, tokens)


def seed_run(seed: int, sparse: float, spon: float, text: torch.Tensor, dense: float = 24.0) -> SeedRun:
    """One seed on the shared text ``text`` (a per-block offset every variant and seed sees)."""
    blocks = {}
    for variant, ppl in (("dense", dense), ("sparse", sparse), ("spon", spon)):
        per_token = math.log(ppl) + text
        blocks[variant] = BlockNLL(per_token * TOKENS, torch.full((BLOCKS,), TOKENS, dtype=torch.int64))
    return SeedRun(seed, {v: b.perplexity for v, b in blocks.items()}, blocks)


def text(seed: int = 0, spread: float = 0.2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return spread * torch.randn(BLOCKS, generator=g, dtype=torch.float64)


def width(ci) -> float:
    return ci[1] - ci[0]


def test_mean_is_the_mean_of_the_seeds_and_sd_their_spread():
    t = text()
    runs = [seed_run(s, 36.0, spon, t) for s, spon in enumerate((30.0, 29.0, 31.5))]
    agg = aggregate(runs, Bootstrap())
    gaps = [(r.ppl["sparse"] - r.ppl["spon"]) / (r.ppl["sparse"] - r.ppl["dense"]) for r in runs]
    gap = agg["statistics"]["gap_closure"]
    assert agg["n"] == 3 and agg["seeds"] == [0, 1, 2] and agg["covers"] == "seeds and blocks"
    assert gap["mean"] == pytest.approx(statistics.mean(gaps))
    assert gap["sd"] == pytest.approx(statistics.stdev(gaps))
    assert gap["values"] == pytest.approx(gaps)
    spon = agg["statistics"]["ppl/spon"]
    assert spon["mean"] == pytest.approx(statistics.mean(r.ppl["spon"] for r in runs))


def test_disagreeing_seeds_widen_the_interval_beyond_every_single_seed_one():
    t, boot = text(), Bootstrap()
    runs = [seed_run(s, 36.0, spon, t) for s, spon in enumerate((28.0, 30.0, 33.0))]
    two_level = aggregate(runs, boot)["statistics"]["gap_closure"]["ci"]
    for r in runs:
        single = perplexity_intervals(r.blocks, boot)["gap_closure"]
        assert width(two_level) > 2 * width(single)
    # the interval reaches across the seeds' values, which no single-seed interval does
    assert two_level[0] < 12 / 12 - (33 - 28) / 12 and two_level[1] > (36 - 30) / 12


def test_without_blocks_the_interval_covers_seeds_only():
    runs = [SeedRun(s, {"dense": 24.0, "sparse": 36.0, "spon": spon}) for s, spon in enumerate((28.0, 30.0, 33.0))]
    agg = aggregate(runs, Bootstrap())
    assert agg["covers"] == "seeds"
    lo, hi = agg["statistics"]["ppl/spon"]["ci"]
    assert lo < 30.33 < hi and agg["statistics"]["ppl/dense"]["ci"] == [24.0, 24.0]
    assert aggregate(runs[:1], Bootstrap())["statistics"]["ppl/spon"]["ci"] is None  # nothing to resample


def test_paired_comparison_finds_a_shift_that_the_seeds_share():
    t, boot = text(spread=0.3), Bootstrap()
    seed_effect = [0.0, 1.5, -1.0]  # large between-seed differences that both sides share
    base = [seed_run(s, 36.0, 30.0 + e, t) for s, e in enumerate(seed_effect)]
    better = [seed_run(s, 36.0, 29.5 + e, t) for s, e in enumerate(seed_effect)]
    comp = compare(base, better, boot)
    final = comp["statistics"]["ppl/final"]
    assert comp["paired"] and final["difference"] == pytest.approx(-0.5, abs=0.05)
    assert final["excludes_zero"] and final["ci"][1] < 0
    assert final["per_seed_differences"] == pytest.approx([-0.5] * 3, abs=0.05)
    # unpaired (other seeds): the shared seed effect no longer cancels, so the interval spans zero
    shifted = [SeedRun(s + 10, r.ppl, r.blocks) for s, r in enumerate(better)]
    loose = compare(base, shifted, boot)["statistics"]["ppl/final"]
    assert not compare(base, shifted, boot)["paired"] and not loose["excludes_zero"]
    assert width(loose["ci"]) > 3 * width(final["ci"])


def test_identical_configurations_do_not_differ():
    t, boot = text(), Bootstrap()
    runs = [seed_run(s, 36.0, spon, t) for s, spon in enumerate((28.0, 30.0, 33.0))]
    same = compare(runs, [SeedRun(r.seed, r.ppl, r.blocks) for r in runs], boot)["statistics"]
    assert same["gap_closure"]["difference"] == 0 and same["gap_closure"]["ci"] == [0.0, 0.0]
    assert same["gap_closure"]["excludes_zero"] is False


def test_runs_on_different_blocks_are_refused():
    t = text()
    a = seed_run(0, 36.0, 30.0, t)
    b = SeedRun(0, a.ppl, {v: BlockNLL(x.nll[:16], x.tokens[:16]) for v, x in a.blocks.items()})
    with pytest.raises(ValueError, match="not the same evaluation data"):
        compare([a], [b], Bootstrap())


# ------------------------------------------------------------ spon-exp-collect
def write_run(folder, name: str, run: SeedRun, sparsity: float, group: str, spon_count: int = 1) -> None:
    run_dir = folder / name
    run_dir.mkdir(parents=True)
    ppl = {v: x for v, x in run.ppl.items() if spon_count or v != "spon"}
    results = {"status": "ok", "config_hash": f"{group}-{run.seed}", "seed_group": group, "seed": run.seed,
               "model": {"name": "m"}, "sparsifier": "teal", "calib_corpus": "wikipedia", "spon_count": spon_count,
               "sparsity": {"target": sparsity, "measured": sparsity, "effective": sparsity / 2},
               "ppl": {"wikipedia": ppl}, "ppl_ci": {}, "gap_closure": {}, "gap_closure_ci": {}}
    (run_dir / "results.json").write_text(json.dumps(results))
    state = {}
    for v in ppl:
        state.update(run.blocks[v].state(f"wikipedia.{v}"))
    save_file(state, str(run_dir / "eval_units.safetensors"))


@pytest.fixture
def two_configurations(tmp_path):
    t = text()
    folder = tmp_path / "sweep"
    runs = {"a": [seed_run(s, 36.0, spon, t) for s, spon in enumerate((28.0, 30.0, 33.0))],
            "b": [seed_run(s, 40.0, spon + 2, t) for s, spon in enumerate((28.0, 30.0, 33.0))]}
    for name, sparsity in (("a", 0.4), ("b", 0.6)):
        for run in runs[name]:
            write_run(folder, f"{name}{run.seed}", run, sparsity, name * 12)
    return folder, runs


def read_csv(path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def gap(run: SeedRun) -> float:
    return (run.ppl["sparse"] - run.ppl["spon"]) / (run.ppl["sparse"] - run.ppl["dense"])


def test_collect_aggregates_each_configuration_over_its_seeds(two_configurations, tmp_path, capsys):
    folder, runs = two_configurations
    out = tmp_path / "tables"
    assert collect_main([str(folder), "--out", str(out)]) == 0
    lines = (out / "ppl_wikipedia.md").read_text().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert len(rows) == 2 and [r[header.index("n")] for r in rows] == ["3", "3"]
    first = dict(zip(header, rows[0]))
    spons = [r.ppl["spon"] for r in runs["a"]]
    assert first["+SPON"].startswith(f"{statistics.mean(spons):.2f} ± ")
    gaps = [gap(r) for r in runs["a"]]
    assert gaps == pytest.approx([(36 - x) / 12 for x in (28.0, 30.0, 33.0)])  # the text shifts every variant alike
    assert first["gap closure"].startswith(f"{statistics.mean(gaps) * 100:.1f} % ± ")
    assert first["gap SD (pts)"] == f"{statistics.stdev(gaps) * 100:.1f}"
    assert first["interval over"] == "seeds and blocks" and first["effective"] == "0.200"
    aggregated = read_csv(out / "ppl_wikipedia.csv")
    assert [r["n"] for r in aggregated] == ["3", "3"] and aggregated[0]["seeds"] == "0 1 2"
    assert float(aggregated[0]["gap_closure"]) == pytest.approx(statistics.mean(gaps))
    assert float(aggregated[0]["gap_closure_ci_low"]) < min(gaps) + 0.01
    per_seed = read_csv(out / "ppl_wikipedia_seeds.csv")
    assert sorted(float(r["spon"]) for r in per_seed if r["sparsity"] == "0.4") == pytest.approx(sorted(spons))


def test_plot_draws_the_aggregated_interval(two_configurations, tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    calls, errorbar = [], Axes.errorbar
    monkeypatch.setattr(Axes, "errorbar", lambda self, *a, **k: calls.append((a, k)) or errorbar(self, *a, **k))
    folder, runs = two_configurations
    assert collect_main([str(folder), "--out", str(tmp_path / "t")]) == 0
    (xs, ys), kwargs = calls[1]  # +SPON: the mean over seeds at both sparsities, bars reaching the seeds' spread
    assert xs == [40.0, 60.0] and ys[0] == pytest.approx(statistics.mean(r.ppl["spon"] for r in runs["a"]))
    low, high = kwargs["yerr"][0][0], kwargs["yerr"][1][0]
    assert low > 1.0 and high > 1.0


def test_collect_compares_two_configurations(two_configurations, tmp_path, capsys):
    out = tmp_path / "cmp"
    folder, runs = two_configurations
    expected = statistics.mean(b.ppl["spon"] - a.ppl["spon"] for a, b in zip(runs["a"], runs["b"]))
    assert collect_main([str(folder), "--out", str(out), "--baseline", "sparsity=0.4",
                         "--candidate", "sparsity=0.6"]) == 0
    printed = capsys.readouterr().out
    assert "candidate (sparsity=0.6) − baseline (sparsity=0.4)" in printed
    result = json.loads((out / "comparison.json").read_text())["corpora"]["wikipedia"]
    final = result["statistics"]["ppl/final"]
    assert result["paired"] and final["difference"] == pytest.approx(expected)
    assert final["excludes_zero"] and final["ci"][0] > 0
    assert "| wikipedia | ppl/final |" in (out / "comparison.md").read_text()


def test_comparison_errors_are_one_line(two_configurations, tmp_path, capsys):
    args = [str(two_configurations[0]), "--out", str(tmp_path / "x")]
    assert collect_main([*args, "--baseline", "seed=0", "--candidate", "sparsity=0.6"]) == 2
    err = capsys.readouterr().err
    assert "matches 2 configurations" in err and "seed_group=" in err and len(err.strip().splitlines()) == 1
    assert collect_main([*args, "--baseline", "sparsity=0.5", "--candidate", "sparsity=0.6"]) == 2
    assert "matches no finished run; the finished runs have sparsity = 0.4, 0.6" in capsys.readouterr().err
    # model= takes the name the tables print; a config group's name matches nothing, and the error says what does
    assert collect_main([*args, "--baseline", "model=tiny_random", "sparsity=0.4", "--candidate", "sparsity=0.6"]) == 2
    assert "the finished runs have model = m" in capsys.readouterr().err
    assert collect_main([*args, "--baseline", "model=m", "sparsity=0.4", "--candidate", "sparsity=0.6"]) == 0
    assert collect_main([*args, "--baseline", "seed_group=aaaaaaaa", "--candidate", "seed_group=bbbbbbbb"]) == 0


def zeroshot_run(seed: int, accuracy: dict[str, float], docs: int = 200) -> "ZeroshotSeedRun":
    from spon_exp.evaluation.seeds import ZeroshotSeedRun

    g = torch.Generator().manual_seed(123)  # the same documents' difficulty for every seed
    base = torch.rand(docs, generator=g, dtype=torch.float64)
    items = {v: {"piqa": (base < acc).double(), "arc": (base < acc - 0.05).double()} for v, acc in accuracy.items()}
    average = {v: float(torch.stack([t.mean() for t in items[v].values()]).mean()) for v in items}
    return ZeroshotSeedRun(seed, average, items)


def test_zeroshot_figures_over_seeds_are_the_seeds_mean_with_a_wider_interval_when_they_disagree():
    from spon_exp.evaluation.seeds import aggregate_zeroshot

    boot = Bootstrap()
    runs = [zeroshot_run(s, {"dense": 0.70, "sparse": 0.60, "spon": spon}) for s, spon in enumerate((0.62, 0.66, 0.69))]
    agg = aggregate_zeroshot(runs, boot)
    rec = agg["statistics"]["recovery"]
    expected = [(r.average["spon"] - r.average["sparse"]) / (r.average["dense"] - r.average["sparse"]) for r in runs]
    assert agg["covers"] == "seeds and documents" and rec["mean"] == pytest.approx(statistics.mean(expected))
    assert rec["sd"] == pytest.approx(statistics.stdev(expected))
    single = aggregate_zeroshot(runs[1:2], boot)["statistics"]["recovery"]["ci"]
    assert width(rec["ci"]) > 1.5 * width(single)
    same = aggregate_zeroshot([zeroshot_run(s, {"dense": 0.70, "sparse": 0.60, "spon": 0.66}) for s in range(3)], boot)
    assert same["statistics"]["recovery"]["ci"] == pytest.approx(single, abs=1e-9)


def test_collect_names_the_settings_that_tell_configurations_apart(tmp_path):
    t = text()
    folder = tmp_path / "sweep"
    for name, lr in (("base", 0.0003), ("cand", 0.001), ("bare", None)):
        for s, spon in enumerate((28.0, 30.0)):
            write_run(folder, f"{name}{s}", seed_run(s, 36.0, spon, t), 0.4, name * 6)
            if lr is not None:  # the seed, the logger and the sweep differ too, and are no setting
                config = {"seed": s, "sparsity": 0.4, "sweep_name": name, "logger": {"name": f"w{s}"},
                          "model": {"name": "m", "path": "/data/models/m"}, "spon": {"lr": lr, "steps": 150}}
                (folder / f"{name}{s}" / "config.yaml").write_text(json.dumps(config))
    out = tmp_path / "tables"
    assert collect_main([str(folder), "--out", str(out)]) == 0
    lines = (out / "ppl_wikipedia.md").read_text().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    settings = {row["seed_group"][:4]: row["settings"]
                for row in (dict(zip(header, [c.strip() for c in line.strip("|").split("|")])) for line in lines[2:])}
    assert settings == {"base": "spon.lr=0.0003", "cand": "spon.lr=0.001", "bare": "-"}
    assert {r["seed_group"][:4]: r["settings"] for r in read_csv(out / "ppl_wikipedia.csv")} == settings
    # another sparsifier's row is told apart by its column: its settings are not compared with teal's
    for s in (0, 1):
        written = folder / f"cand{s}" / "results.json"
        written.write_text(json.dumps({**json.loads(written.read_text()), "sparsifier": "wina"}))
    assert collect_main([str(folder), "--out", str(out)]) == 0
    assert {r["seed_group"][:4]: r["settings"] for r in read_csv(out / "ppl_wikipedia.csv")} == \
        {"base": "-", "cand": "-", "bare": "-"}
