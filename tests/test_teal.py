import pytest
import torch

from spon_exp.models.adapters import Projection
from spon_exp.sparsifiers import build_sparsifier
from spon_exp.sparsifiers.base import check_sparsity
from spon_exp.sparsifiers.calibration import exact_threshold, histogram_threshold
from spon_exp.sparsifiers.teal import TealSparsifier
from tests.helpers import FAMILIES, random_ids, tiny


def calibrated(family="llama", sparsity=0.5, **kwargs):
    lm = tiny(family)
    sp = build_sparsifier("teal", sparsity=sparsity, **kwargs).attach(lm.model)
    ids = random_ids(8, 32)
    sp.calibrate(lm.model, ids.split(4))
    return lm.model, sp, ids


def test_hand_computed_mask():
    x = torch.tensor([[0.1, -0.5, 0.3, -0.05, 2.0, -0.3]])
    # |x| sorted: 0.05 0.1 0.3 0.3 0.5 2.0; 50 % -> third smallest = 0.3, kept strictly above
    tau = exact_threshold(x, 0.5)
    assert tau == pytest.approx(0.3)
    sp = TealSparsifier(sparsity=0.5)
    proj = Projection(0, "q_proj", torch.nn.Linear(6, 2), "x")
    sp.thresholds = {proj.key: tau}
    out, dropped = sp.sparsify(proj, x, True)
    assert torch.equal(out, torch.tensor([[0.0, -0.5, 0.0, 0.0, 2.0, 0.0]]))
    assert int(dropped) == 4  # both 0.3-magnitude entries sit at the threshold and are dropped


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.7])
def test_measured_sparsity_meets_target_on_calibration_data(family, sparsity):
    model, sp, ids = calibrated(family, sparsity)
    with torch.no_grad(), sp.measuring():
        model(ids)
    measured = sp.measured_sparsity()
    assert abs(measured["model"] - sparsity) <= 0.01
    assert len(measured["per_layer"]) == model.config.num_hidden_layers
    assert all(abs(v - sparsity) <= 0.03 for v in measured["per_layer"].values())


def test_histogram_mode_matches_icdf_on_symmetric_data():
    values = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    for s in (0.3, 0.5, 0.7):
        exact, hist = exact_threshold(values, s), histogram_threshold(values, s)
        assert hist == pytest.approx(exact, rel=0.02)
    # on skewed data the icdf(0.5 + s/2) rule drifts from the exact |x| quantile
    skewed = values.abs() + 0.5
    assert (skewed <= histogram_threshold(skewed, 0.5)).float().mean() > 0.55


def test_histogram_mode_calibrates_every_projection():
    model, sp, ids = calibrated(threshold_mode="histogram")
    assert len(sp.thresholds) == len(sp.projections) and all(t > 0 for t in sp.thresholds.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_mode_reproduces_untouched_logits_exactly(family):
    lm = tiny(family)
    ids = random_ids()
    with torch.no_grad():
        reference = lm.model(ids).logits
        sp = build_sparsifier("teal", sparsity=0.5).attach(lm.model)
        sp.calibrate(lm.model, [ids])
        sparse = lm.model(ids).logits
        with sp.disabled():
            teacher = lm.model(ids).logits
        sp.detach()
        detached = lm.model(ids).logits
    assert not torch.equal(sparse, reference)
    assert torch.equal(teacher, reference)
    assert torch.equal(detached, reference)


def test_shared_inputs_are_sparsified_once_per_site():
    model, sp, ids = calibrated()
    calls = []
    original = sp.sparsify
    sp.sparsify = lambda proj, x, measure: (calls.append(proj.name), original(proj, x, measure))[1]
    with torch.no_grad():
        model(ids[:1])
    per_layer = len(calls) / model.config.num_hidden_layers
    assert per_layer == 4  # q/k/v share one mask, gate/up another; o and down their own
    assert not sp._shared  # nothing kept alive after the forward


def test_different_thresholds_on_one_site_are_not_shared():
    model, sp, ids = calibrated()
    k_key = next(p.key for p in sp.projections if p.layer == 0 and p.name == "k_proj")
    sp.thresholds[k_key] *= 2
    sp._refresh_consumers()
    calls = []
    original = sp.sparsify
    sp.sparsify = lambda proj, x, measure: (calls.append(proj.key), original(proj, x, measure))[1]
    with torch.no_grad():
        model(ids[:1])
    assert k_key in calls and calls.count(k_key) == 1
    assert len(calls) == 4 * model.config.num_hidden_layers + 1


@pytest.mark.parametrize("policy,fraction,dense_tokens", [("last_half", 0.5, 16), ("last_fraction", 0.25, 24)])
def test_token_policy_keeps_leading_tokens_dense(policy, fraction, dense_tokens):
    model, sp, ids = calibrated(token_policy=policy, token_fraction=fraction)
    seen = {}
    proj = sp.projections[0]
    proj.module.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]), prepend=True)
    proj.module.register_forward_hook(lambda m, a, o: seen.setdefault("sparse", a[0]))
    with torch.no_grad():
        model(ids[:1])
    x, sparse = seen["x"], seen["sparse"]
    assert torch.equal(sparse[:, :dense_tokens], x[:, :dense_tokens])
    assert (sparse[:, dense_tokens:] == 0).float().mean() > 0.3
    assert sp.sparsified_tokens(1) == 1  # a decode token is always sparsified


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "half"])
def test_bad_sparsity_is_rejected_early(bad):
    with pytest.raises(ValueError, match="sparsity must be a number in \\[0, 1\\)"):
        check_sparsity(bad)
    with pytest.raises(ValueError):
        TealSparsifier(sparsity=bad)


def test_state_round_trip():
    model, sp, ids = calibrated()
    state = sp.state_dict()
    fresh = build_sparsifier("teal", sparsity=0.5).attach(tiny().model)
    fresh.load_state_dict(state)
    assert fresh.thresholds == sp.thresholds
    with pytest.raises(ValueError, match="lack projections"):
        fresh.load_state_dict({})
