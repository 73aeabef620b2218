"""Paired bootstrap intervals: coverage, pairing, undefined statistics, formatting."""

import math

import pytest
import torch

from spon_exp.evaluation.perplexity import BlockNLL
from spon_exp.evaluation.uncertainty import Bootstrap, perplexity_intervals, zeroshot_intervals
from spon_exp.tracking.intervals import format_with_interval


def blocks_from(per_token_nll: torch.Tensor, tokens: int = 50) -> BlockNLL:
    return BlockNLL(per_token_nll.double() * tokens, torch.full((per_token_nll.numel(),), tokens, dtype=torch.int64))


def test_perplexity_interval_covers_the_true_value_about_95_percent_of_the_time():
    g = torch.Generator().manual_seed(0)
    true_mean = 3.0  # blocks' mean NLL per token ~ N(3, 0.3): true perplexity e^3
    boot = Bootstrap(resamples=400)
    covered = 0
    trials = 150
    for _ in range(trials):
        ci = perplexity_intervals({"dense": blocks_from(true_mean + 0.3 * torch.randn(40, generator=g))}, boot)
        lo, hi = ci["ppl"]["dense"]
        covered += lo <= math.exp(true_mean) <= hi
    assert 0.88 <= covered / trials <= 0.99


def test_intervals_shrink_with_more_blocks_and_are_reproducible():
    g = torch.Generator().manual_seed(1)
    few, many = blocks_from(3 + 0.3 * torch.randn(25, generator=g)), blocks_from(3 + 0.3 * torch.randn(400, generator=g))
    boot = Bootstrap()
    width = {n: (lambda ci: ci[1] - ci[0])(perplexity_intervals({"dense": b}, boot)["ppl"]["dense"])
             for n, b in (("few", few), ("many", many))}
    assert 2.5 < width["few"] / width["many"] < 6  # ~ sqrt(400 / 25) = 4
    assert perplexity_intervals({"dense": few}, boot) == perplexity_intervals({"dense": few}, boot)


def test_pairing_gives_the_gap_closure_a_tight_interval_when_the_variants_move_together():
    # block difficulty varies a lot, but every block's sparse and SPON losses sit at fixed
    # offsets from its dense loss: the gap closure is nearly constant across resamples
    g = torch.Generator().manual_seed(2)
    dense = 3 + 0.5 * torch.randn(60, generator=g)
    blocks = {"dense": blocks_from(dense), "sparse": blocks_from(dense + 0.4), "spon": blocks_from(dense + 0.2)}
    ci = perplexity_intervals(blocks, Bootstrap())
    lo, hi = ci["gap_closure"]
    assert hi - lo < 0.05 and lo < 0.55 < hi + 0.05
    ppl_lo, ppl_hi = ci["ppl"]["sparse"]
    assert ppl_hi - ppl_lo > 2  # while each perplexity on its own is uncertain


def test_gap_closure_interval_is_none_without_a_gap_and_variants_must_share_blocks():
    dense = blocks_from(torch.full((20,), 3.0) + torch.linspace(-0.1, 0.1, 20))
    same = {"dense": dense, "sparse": dense, "spon": dense}
    assert perplexity_intervals(same, Bootstrap())["gap_closure"] is None
    with pytest.raises(ValueError, match="same blocks"):
        perplexity_intervals({"dense": dense, "sparse": blocks_from(torch.ones(5))}, Bootstrap())


def test_zeroshot_intervals_per_task_average_and_recovery():
    g = torch.Generator().manual_seed(3)
    dense = {"piqa": (torch.rand(300, generator=g) < 0.7).double(), "arc": (torch.rand(200, generator=g) < 0.5).double()}
    sparse = {t: v * (torch.rand(v.numel(), generator=g) < 0.8) for t, v in dense.items()}  # loses ~20 % of hits
    spon = {t: torch.maximum(sparse[t], dense[t] * (torch.rand(v.numel(), generator=g) < 0.5)) for t, v in dense.items()}
    out = zeroshot_intervals({"dense": dense, "sparse": sparse, "spon": spon}, Bootstrap())
    for variant, items in (("dense", dense), ("sparse", sparse), ("spon", spon)):
        for task, scores in items.items():
            lo, hi = out["ci"][variant][task]
            assert lo < float(scores.mean()) < hi
        avg = sum(float(s.mean()) for s in items.values()) / 2
        assert out["average_ci"][variant][0] < avg < out["average_ci"][variant][1]
    lo, hi = out["recovery_ci"]
    assert 0 < lo < hi < 1
    no_gap = zeroshot_intervals({"dense": dense, "sparse": dense, "spon": spon}, Bootstrap())
    assert no_gap["recovery_ci"] is None


def test_format_with_interval():
    assert format_with_interval(30.58, [29.7, 31.5]) == "30.580 ± 0.900"
    assert format_with_interval(0.559, [0.52, 0.602], digits=1, scale=100, suffix=" %") == "55.9 % ± 4.1"
    assert format_with_interval(30.58, None) == "30.580"
    assert format_with_interval(None, None) == "-"
