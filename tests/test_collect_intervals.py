"""spon-exp-collect and the W&B summary show the 95 % intervals of results.json: ``x ± h``
cells in Markdown, exact interval ends in CSV, ``*_ci_low`` / ``*_ci_high`` keys on W&B;
results written before intervals existed still render, as plain numbers."""

from __future__ import annotations

import csv
import json

import pytest

from spon_exp.collect import main as collect_main
from spon_exp.tracking.wandb_logger import results_from_summary, summary_from_results

BASE = {"status": "ok", "error": None, "model": {"name": "m"}, "sparsifier": "teal", "calib_corpus": "wikipedia",
        "spon_count": 1, "seed": 0}

# gap closure (37.69 - 30.49) / (37.69 - 24.81) = 0.559; the spon interval is asymmetric about 30.49
NEW = {**BASE, "config_hash": "new", "sparsity": {"target": 0.5, "measured": 0.5},
       "ppl": {"wikipedia": {"dense": 24.81, "sparse": 37.69, "spon": 30.49}},
       "ppl_ci": {"wikipedia": {"dense": [24.1, 25.6], "sparse": [36.5, 38.9], "spon": [29.6, 31.4]}},
       "gap_closure": {"wikipedia": 0.559}, "gap_closure_ci": {"wikipedia": [0.52, 0.602]},
       "uncertainty": {"method": "paired bootstrap", "confidence": 0.95, "resamples": 1000, "seed": 0,
                       "blocks": {"wikipedia": 32}},
       "zeroshot": {"variants": {v: {"piqa": {"paper_metric": x}} for v, x in
                                 (("dense", 0.7), ("sparse", 0.65), ("spon", 0.68))},
                    "average": {"dense": 0.6512, "sparse": 0.6011, "spon": 0.6301}, "recovery": 0.579,
                    "ci": {"dense": {"piqa": [0.68, 0.72]}, "sparse": {"piqa": [0.63, 0.67]}},
                    "average_ci": {"dense": [0.64, 0.6624], "sparse": [0.59, 0.612], "spon": [0.62, 0.6402]},
                    "recovery_ci": [0.45, 0.71]},
       "fold": {"max_abs_logit_diff": 3.1e-06, "checked_on": "4 x 256 tokens of wikipedia"},
       "sensitivity": {"relative_perturbation": 1e-6, "corpus": "wikipedia", "sparse": 37.69,
                       "perturbed": {"+1e-06": 37.8, "-1e-06": 37.5}, "spread": 0.3, "relative_spread": 0.008},
       "cache": {"sparsifier": "hit", "alpha": "hit", "dense": "miss"}}
NEW_CELLS = ["24.81 ± 0.75", "37.69 ± 1.20", "30.49 ± 0.90", "55.9 % ± 4.1"]  # dense, sparse, +SPON, gap closure

# written before intervals existed: gap closure (45 - 33) / (45 - 24.81) = 0.594
OLD = {**BASE, "config_hash": "old", "sparsity": {"target": 0.6, "measured": 0.6},
       "ppl": {"wikipedia": {"dense": 24.81, "sparse": 45.0, "spon": 33.0}}, "gap_closure": {"wikipedia": 0.594},
       "zeroshot": {"variants": {"dense": {"piqa": {"paper_metric": 0.7}}},
                    "average": {"dense": 0.6512, "sparse": 0.55, "spon": 0.6}, "recovery": 0.5}}
OLD_CELLS = ["24.81", "45.00", "33.00", "59 %"]


def write_runs(folder, *runs):
    for results in runs:
        run_dir = folder / results["config_hash"]
        run_dir.mkdir(parents=True)
        (run_dir / "results.json").write_text(json.dumps(results))


def collect(tmp_path, *args):
    out = tmp_path / "tables"
    assert collect_main([*args, "--out", str(out)]) == 0
    return out


def md_rows(path) -> list[list[str]]:
    lines = path.read_text().splitlines()
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in lines[:1] + lines[2:]]


def ppl_cells(path) -> list[list[str]]:
    """Each configuration's dense / sparse / +SPON / gap closure cells of a ppl table."""
    header, *rows = md_rows(path)
    at = header.index("dense")
    return [row[at:at + 4] for row in rows]


def csv_rows(path) -> dict[str, dict]:
    with path.open(newline="") as f:
        return {row["config_hash"] if "config_hash" in row else row["source"].rsplit("/", 1)[-1]: row
                for row in csv.DictReader(f)}


def test_ppl_cells_show_half_widths_and_csv_the_exact_ends(tmp_path):
    write_runs(tmp_path / "runs", NEW, OLD)
    out = collect(tmp_path, str(tmp_path / "runs"))
    header, new_row, old_row = md_rows(out / "ppl_wikipedia.md")
    assert header[:6] == ["model", "sparsifier", "calib_corpus", "spon_count", "sparsity", "n"]
    assert new_row[:6] == ["m", "teal", "wikipedia", "1", "0.50", "1"] and old_row[4:6] == ["0.60", "1"]
    assert ppl_cells(out / "ppl_wikipedia.md") == [NEW_CELLS, OLD_CELLS]
    with (out / "ppl_wikipedia.csv").open(newline="") as f:
        new_group, old_group = list(csv.DictReader(f))  # one configuration each, its one run's own interval
    assert (new_group["spon"], new_group["spon_ci_low"], new_group["spon_ci_high"]) == ("30.49", "29.6", "31.4")
    assert new_group["n"] == "1" and new_group["gap_closure_sd"] == "" and old_group["spon_ci_low"] == ""
    rows = csv_rows(out / "ppl_wikipedia_seeds.csv")
    new, old = rows["new"], rows["old"]
    assert (new["dense"], new["dense_ci_low"], new["dense_ci_high"]) == ("24.81", "24.1", "25.6")
    assert (new["spon"], new["spon_ci_low"], new["spon_ci_high"]) == ("30.49", "29.6", "31.4")
    assert (new["gap_closure_ci_low"], new["gap_closure_ci_high"]) == ("0.52", "0.602")
    assert float(new["gap_closure"]) == pytest.approx(7.2 / 12.88)  # recomputed, as a fraction
    assert (old["spon"], old["spon_ci_low"], old["spon_ci_high"]) == ("33.0", "", "")
    assert old["gap_closure_ci_low"] == "" and new["sparsity"] == "0.5" and new["status"] == "ok"


def test_zeroshot_table_shows_intervals_of_averages_and_recovery(tmp_path):
    write_runs(tmp_path / "runs", NEW, OLD)
    out = collect(tmp_path, str(tmp_path / "runs"))
    header, new, old = md_rows(out / "zeroshot.md")  # one configuration each, one run: its own intervals
    assert header[-8:] == ["n", "dense", "sparse", "+SPON", "recovery", "recovery SD (pts)", "interval over", "not ok"]
    assert new[-8:-3] == ["1", "0.6512 ± 0.0112", "0.6011 ± 0.0110", "0.6301 ± 0.0101", "57.9 % ± 13.0"]
    assert old[-8:-3] == ["1", "0.6512", "0.5500", "0.6000", "49 %"]  # recomputed from the averages, as gap closure
    with (out / "zeroshot.csv").open(newline="") as f:
        new_csv, old_csv = list(csv.DictReader(f))
    assert (new_csv["spon"], new_csv["spon_ci_low"], new_csv["spon_ci_high"]) == ("0.6301", "0.62", "0.6402")
    assert (new_csv["recovery_ci_low"], new_csv["recovery_ci_high"]) == ("0.45", "0.71")
    assert float(new_csv["recovery"]) == pytest.approx((0.6301 - 0.6011) / (0.6512 - 0.6011))  # from the averages
    assert (old_csv["recovery_ci_low"], old_csv["dense_ci_high"], old_csv["n"]) == ("", "", "1")


def test_runs_table_shows_fold_check_and_sensitivity(tmp_path):
    write_runs(tmp_path / "runs", NEW, OLD)
    out = collect(tmp_path, str(tmp_path / "runs"))
    rows = csv_rows(out / "runs.csv")
    assert rows["new"]["fold_max_abs_logit_diff"] == "3.1e-06"
    assert rows["new"]["sensitivity_relative_spread"] == "0.008"
    assert rows["old"]["fold_max_abs_logit_diff"] == "-" and rows["old"]["sensitivity_relative_spread"] == "-"
    assert "| fold_max_abs_logit_diff | sensitivity_relative_spread |" in (out / "runs.md").read_text()


def test_old_results_alone_render_as_before(tmp_path):
    write_runs(tmp_path / "runs", OLD)
    out = collect(tmp_path, str(tmp_path / "runs"))
    assert ppl_cells(out / "ppl_wikipedia.md") == [OLD_CELLS]
    assert "±" not in (out / "zeroshot.md").read_text() + (out / "ppl_wikipedia.md").read_text()
    assert (out / "ppl_vs_sparsity_wikipedia.png").stat().st_size > 1000


def test_a_null_interval_shows_the_plain_number(tmp_path):
    no_gap = {**NEW, "config_hash": "nogap", "gap_closure_ci": {"wikipedia": None},
              "ppl_ci": {"wikipedia": {"dense": [24.1, 25.6]}}}
    write_runs(tmp_path / "runs", no_gap)
    out = collect(tmp_path, str(tmp_path / "runs"))
    assert ppl_cells(out / "ppl_wikipedia.md") == [["24.81 ± 0.75", "37.69", "30.49", "56 %"]]


def test_plot_draws_error_bars_only_where_intervals_exist(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    calls, errorbar = [], Axes.errorbar
    monkeypatch.setattr(Axes, "errorbar", lambda self, *a, **k: calls.append((a, k)) or errorbar(self, *a, **k))
    write_runs(tmp_path / "old", OLD)
    collect(tmp_path, str(tmp_path / "old"))
    assert calls == []
    write_runs(tmp_path / "both", NEW, OLD)
    out = collect(tmp_path, str(tmp_path / "both"))
    assert len(calls) == 3  # sparse, +SPON, gap closure; each only at the 0.5 run
    (xs, ys), kwargs = calls[1]
    assert xs == [50.0] and ys == [30.49] and kwargs["yerr"] == [[pytest.approx(0.89)], [pytest.approx(0.91)]]
    gap = 7.2 / 12.88  # recomputed from the perplexities; bars in percent
    assert calls[2][1]["yerr"] == [[pytest.approx((gap - 0.52) * 100)], [pytest.approx((0.602 - gap) * 100)]]
    assert (out / "ppl_vs_sparsity_wikipedia.png").stat().st_size > 1000


def test_wandb_summary_carries_interval_ends():
    summary = summary_from_results(NEW)
    expected = {
        "ppl/wikipedia/dense_ci_low": 24.1, "ppl/wikipedia/dense_ci_high": 25.6,
        "ppl/wikipedia/spon_ci_low": 29.6, "ppl/wikipedia/spon_ci_high": 31.4,
        "gap_closure/wikipedia": 0.559, "gap_closure/wikipedia_ci_low": 0.52, "gap_closure/wikipedia_ci_high": 0.602,
        "zeroshot/dense/piqa_ci_low": 0.68, "zeroshot/dense/piqa_ci_high": 0.72,
        "zeroshot/spon/avg_ci_low": 0.62, "zeroshot/spon/avg_ci_high": 0.6402,
        "zeroshot/recovery": 0.579, "zeroshot/recovery_ci_low": 0.45, "zeroshot/recovery_ci_high": 0.71,
        "fold/max_abs_logit_diff": 3.1e-06, "sensitivity/relative_spread": 0.008,
    }
    assert {k: summary.get(k) for k in expected} == expected
    assert "zeroshot/spon/piqa" in summary and "zeroshot/spon/piqa_ci_low" not in summary  # no interval stored
    old = summary_from_results(OLD)
    assert not [k for k in old if "_ci_" in k or k.startswith(("fold/", "sensitivity/"))]
    assert old["ppl/wikipedia/spon"] == 33.0 and old["zeroshot/recovery"] == 0.5


def test_wandb_summary_round_trips_through_collect(tmp_path, monkeypatch):
    import wandb

    class FakeRun:
        def __init__(self, results):
            self.id, self.state = results["config_hash"], "finished"
            self.summary = json.loads(json.dumps(summary_from_results(results)))
            self.config = {"model_name": "m", "sparsifier_name": "teal", "calib_corpus": "wikipedia", "spon_count": 1,
                           "seed": 0, "target_sparsity": results["sparsity"]["target"]}

    class FakeApi:
        def runs(self, project):
            assert project == "me/spon"
            return [FakeRun(NEW), FakeRun(OLD)]

    monkeypatch.setattr(wandb, "Api", FakeApi)
    back = results_from_summary(FakeRun(NEW).summary, FakeRun(NEW).config)
    assert back["ppl_ci"] == NEW["ppl_ci"] and back["gap_closure_ci"] == NEW["gap_closure_ci"]
    assert back["zeroshot"]["average_ci"] == NEW["zeroshot"]["average_ci"]
    assert back["zeroshot"]["ci"] == NEW["zeroshot"]["ci"] and back["zeroshot"]["recovery_ci"] == [0.45, 0.71]
    out = collect(tmp_path, str(tmp_path / "no_local_runs"), "--wandb-project", "me/spon")
    assert ppl_cells(out / "ppl_wikipedia.md") == [NEW_CELLS, OLD_CELLS]
    assert md_rows(out / "zeroshot.md")[1][-4] == "57.9 % ± 13.0"
    assert csv_rows(out / "runs.csv")["new"]["fold_max_abs_logit_diff"] == "3.1e-06"
    assert csv_rows(out / "ppl_wikipedia_seeds.csv")["new"]["spon_ci_high"] == "31.4"
