"""Where the spread between seeds comes from: calibration and α-training seeds crossed
(``calib.seed`` × ``spon.seed``), split by a two-way random-effects ANOVA, on grids whose
parts are known."""

from __future__ import annotations

import json

import pytest

from spon_exp.collect import main as collect_main
from spon_exp.evaluation.seeds import SeedRun
from spon_exp.evaluation.variance import crossed_seed_components
from tests.test_seeds import write_run


def grid(calib, train, rest=None) -> dict:
    return {(i, j): 10 + c + s + (rest[i][j] if rest else 0.0)
            for i, c in enumerate(calib) for j, s in enumerate(train)}


def test_additive_seeds_split_exactly():
    parts = crossed_seed_components(grid([-1.0, 0.0, 1.0], [0.5, -0.5, 0.0]))
    assert parts["levels"] == (3, 3) and parts["mean"] == pytest.approx(10.0)
    assert parts["sd"]["calibration"] == pytest.approx(1.0)  # the SD of (-1, 0, 1)
    assert parts["sd"]["training"] == pytest.approx(0.5)  # the SD of (0.5, -0.5, 0)
    assert parts["sd"]["interaction and rest"] == pytest.approx(0.0, abs=1e-12)
    assert parts["sd"]["one run"] == pytest.approx(1.25 ** 0.5)


def test_an_interaction_is_the_rest_and_is_taken_out_of_the_main_parts():
    # 2 x 2: the interaction ±e has mean square 4e², which the main effects' mean squares also carry
    e = 0.3
    parts = crossed_seed_components(grid([0.0, 2.0], [0.0, 0.0], rest=[[e, -e], [-e, e]]))
    assert parts["mean_squares"]["interaction and rest"] == pytest.approx(4 * e * e)
    assert parts["sd"]["interaction and rest"] == pytest.approx(2 * e)
    assert parts["sd"]["calibration"] ** 2 == pytest.approx((2 * 2.0 - 4 * e * e) / 2)  # (MS_C − MS_E) / J
    assert parts["sd"]["training"] == 0.0  # negative estimate: reported as none


def test_an_incomplete_grid_is_not_split():
    values = grid([0.0, 1.0], [0.0, 1.0])
    del values[(1, 1)]
    assert crossed_seed_components(values) is None
    assert crossed_seed_components(grid([0.0, 1.0, 2.0], [0.0])) is None


def test_collect_splits_a_crossed_sweep(tmp_path, capsys):
    from tests.test_seed_intervals import run, text

    folder = tmp_path / "crossed"
    calib_effect, train_effect = {0: 0.0, 1: 1.2}, {0: 0.0, 1: -0.4, 2: 0.4}
    for c, ce in calib_effect.items():
        for s, se in train_effect.items():
            r = run(0, {"dense": 24.0, "sparse": 36.0, "spon": 30.0 + ce + se}, text())
            write_run(folder, f"calib{c}_spon{s}", SeedRun(0, r.ppl, r.blocks), 0.5, "g" * 16)
            path = folder / f"calib{c}_spon{s}" / "results.json"
            results = json.loads(path.read_text())
            results.update(config_hash=f"h{c}{s}", seeds={"calib": c, "spon": s})
            path.write_text(json.dumps(results))
    out = tmp_path / "tables"
    assert collect_main([str(folder), "--out", str(out)]) == 0
    assert "| 0.50 | 6 |" in (out / "ppl_wikipedia.md").read_text()  # six seeds of one configuration
    lines = (out / "seed_variance_wikipedia.md").read_text().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, [c.strip() for c in line.strip("|").split("|")])) for line in lines[2:]]
    spon = next(r for r in rows if r["statistic"] == "+SPON perplexity")
    assert spon["seeds (calib × spon)"] == "2 × 3"
    assert float(spon["SD calibration"]) == pytest.approx(1.2 / 2 ** 0.5, abs=0.01)
    assert float(spon["SD α training"]) == pytest.approx(0.4, abs=0.01)
    assert "seed_variance_wikipedia" in capsys.readouterr().out
