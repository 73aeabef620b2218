"""TEAL greedy allocation, WINA, R-Sparse and LaRoSA: hand-computed masks and outputs,
measured sparsity on calibration data, SPON fold equivalence and saved-state round trips."""

import json
import math

import pytest
import torch
from torch import nn

from spon_exp.models.adapters import find_decoder_blocks
from spon_exp.sparsifiers import build_sparsifier
from spon_exp.sparsifiers.larosa import rotation_from_covariance, site_sparsities
from spon_exp.sparsifiers.rsparse import low_rank_factors, rsparse_keep_fraction, rsparse_rank
from spon_exp.sparsifiers.calibration import SiteRecorder, exact_threshold
from spon_exp.sparsifiers.greedy import BlockInputs, block_output_error, greedy_trajectory, relative_sizes
from spon_exp.spon import Spon, TrainConfig, fold_alpha, load_sparse_state, save_sparse_state, train_alpha
from tests.helpers import FAMILIES, random_ids, tiny


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ----------------------------------------------------------------------------- helpers
def toy_model(hidden: int, kv: int | None = None, intermediate: int | None = None) -> nn.Module:
    """One decoder-shaped block of bias-free linears (no forward: call projections directly)."""
    kv, intermediate = kv or hidden, intermediate or hidden
    attn, mlp = nn.Module(), nn.Module()
    attn.q_proj, attn.k_proj, attn.v_proj = nn.Linear(hidden, hidden, False), nn.Linear(hidden, kv, False), nn.Linear(hidden, kv, False)
    attn.o_proj = nn.Linear(hidden, hidden, False)
    mlp.gate_proj, mlp.up_proj = nn.Linear(hidden, intermediate, False), nn.Linear(hidden, intermediate, False)
    mlp.down_proj = nn.Linear(intermediate, hidden, False)
    block = nn.Module()
    block.self_attn, block.mlp = attn, mlp
    model = nn.Module()
    model.layers = nn.ModuleList([block])
    return model


def set_weight(linear: nn.Linear, rows) -> None:
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(rows, dtype=torch.float32))


def calibrated(name, family="llama", sparsity=0.5, **kwargs):
    lm = tiny(family)
    sp = build_sparsifier(name, sparsity=sparsity, **kwargs).attach(lm.model)
    ids = random_ids(8, 32)
    sp.calibrate(lm.model, ids.split(4))
    return lm, sp, ids


def measured(model, sp, ids) -> dict:
    with torch.no_grad(), sp.measuring():
        model(ids)
    return sp.measured_sparsity()


# ------------------------------------------------------------------------ TEAL greedy
def test_greedy_trajectory_hand_computed():
    # A (w=1, step 0.1) and B (w=2, step 0.05); error 10·sA² + 20·sB²; weighted (sA + 2 sB) / 3.
    rows = greedy_trajectory([1.0, 2.0], 0.1, 0.1, lambda s: 10 * s[0] ** 2 + 20 * s[1] ** 2)
    # step 1: A -> 0.1 costs 0.1, B -> 0.05 costs 0.05: B.  step 2: A (0.1, 0.05) 0.15 vs
    # B (0, 0.1) 0.2: A.  step 3: A (0.2, 0.05) 0.45 vs B (0.1, 0.1) 0.3: B. Weighted 0.1: stop.
    expected = [(1 / 30, 0.05, [0.0, 0.05]), (2 / 30, 0.15, [0.1, 0.05]), (0.1, 0.3, [0.1, 0.1])]
    assert len(rows) == 3
    for (f, e, s), (ef, ee, es) in zip(rows, expected):
        assert f == pytest.approx(ef) and e == pytest.approx(ee) and s == pytest.approx(es)
    # continuing from the last state extends the same path
    more = greedy_trajectory([1.0, 2.0], 0.1, 0.15, lambda s: 10 * s[0] ** 2 + 20 * s[1] ** 2, start=rows[-1][2])
    assert more[0][2] == pytest.approx([0.1, 0.15])  # A: 0.2 -> 0.4+0.2=0.6 vs B: 0.15 -> 0.1+0.45=0.55


def test_relative_sizes_come_from_module_shapes():
    blocks = find_decoder_blocks(tiny().model)  # hidden 64, 2 of 4 kv heads, intermediate 128
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert relative_sizes(blocks[0], names) == [1.0, 0.5, 0.5, 1.0, 2.0, 2.0, 2.0]


def test_greedy_beats_uniform_block_error_and_meets_target():
    sparsity = 0.5
    lm, sp, ids = calibrated("teal", sparsity=sparsity, allocation="greedy", greedy_sequences=4,
                             greedy_step=0.1, calibration_context="dense")
    assert abs(measured(lm.model, sp, ids)["model"] - sparsity) <= 0.01
    # independent check: block inputs and dense site values, uniform thresholds at the same
    # weighted sparsity, block error of both allocations on the same tokens
    capture = BlockInputs(sp.blocks, 4)
    recorder = SiteRecorder(sp.projections, 2**22, ids.numel())
    with torch.no_grad(), sp.disabled():  # the calibration batches: capture keeps the first 4 sequences
        for batch in ids.split(4):
            lm.model(batch)
    capture.remove()
    recorder.remove()
    greedy_thresholds = dict(sp.thresholds)
    for block in sp.blocks:
        with sp.disabled():
            targets = capture.outputs(block)
        greedy_error = block_output_error(capture.outputs(block), targets, 0.25)
        block_sparsity = float(sp.greedy_row(block.index)[0])
        assert abs(block_sparsity - sparsity) <= 0.01
        for p in block.projections.values():
            sp.thresholds[p.key] = exact_threshold(recorder.site_values((p.layer, p.site)), block_sparsity)
        sp._refresh_consumers()
        uniform_error = block_output_error(capture.outputs(block), targets, 0.25)
        sp.thresholds.update(greedy_thresholds)
        sp._refresh_consumers()
        assert greedy_error <= uniform_error
        report = sp.greedy_report[block.index]
        assert report["greedy_error"] == pytest.approx(greedy_error, rel=1e-4)
        assert report["uniform_error"] == pytest.approx(uniform_error, rel=1e-4)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("family", FAMILIES)
def test_block_replay_equals_the_forward_bit_for_bit(family, use_cache):
    """The greedy search's replay of a captured block call computes exactly what the normal
    forward computed, however often it is replayed (a KV cache kept in the captured kwargs,
    e.g. transformers 5.24's ``cache=``, would make later replays attend to earlier ones)."""
    lm = tiny(family)
    blocks = find_decoder_blocks(lm.model)
    capture = BlockInputs(blocks)
    forward_outputs = {}

    def keep_output(module, args, output, index):
        forward_outputs[index] = (output[0] if isinstance(output, (tuple, list)) else output).clone()

    handles = [b.module.register_forward_hook(lambda m, a, o, i=b.index: keep_output(m, a, o, i)) for b in blocks]
    with torch.no_grad():
        lm.model(random_ids(4, 32), use_cache=use_cache)
    for h in handles:
        h.remove()
    capture.remove()
    for block in blocks:
        for _ in range(3):
            (replayed,) = capture.outputs(block)
            assert torch.equal(replayed, forward_outputs[block.index]), (family, block.index)


@pytest.mark.parametrize("family", FAMILIES)
def test_block_inputs_keep_exactly_the_sequences_asked_for(family):
    """greedy_sequences=N searches on N sequences even when a calibration batch holds more: the
    batch is cut, and the replay of the cut call is the forward's on those sequences."""
    lm = tiny(family)
    blocks = find_decoder_blocks(lm.model)
    capture = BlockInputs(blocks, max_sequences=3)
    forward_outputs = {}

    def keep_output(module, args, output, index):
        forward_outputs.setdefault(index, []).append((output[0] if isinstance(output, (tuple, list)) else output).clone())

    handles = [b.module.register_forward_hook(lambda m, a, o, i=b.index: keep_output(m, a, o, i)) for b in blocks]
    with torch.no_grad():
        for batch in random_ids(8, 24).split(2):  # batches of 2: the second is cut to 1
            lm.model(batch)
    for h in handles:
        h.remove()
    capture.remove()
    for block in blocks:
        assert capture.sequences[block.index] == 3
        replayed = capture.outputs(block)
        assert [r.shape[0] for r in replayed] == [2, 1]
        expected = [forward_outputs[block.index][0], forward_outputs[block.index][1][:1]]
        for got, want in zip(replayed, expected):
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (family, block.index)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
@pytest.mark.parametrize("policy", ["all", "last_half"])
def test_suffix_replay_equals_the_full_replay_on_the_scored_tokens(family, policy):
    from spon_exp.sparsifiers.greedy import SuffixReplay

    lm = tiny(family)
    sp = build_sparsifier("teal", sparsity=0.5, token_policy=policy).attach(lm.model)
    sp.calibrate(lm.model, random_ids(4, 32, seed=2).split(2))
    capture = BlockInputs(sp.blocks)
    with torch.no_grad():
        lm.model(random_ids(2, 33, seed=4))
    capture.remove()
    for block in sp.blocks:
        (full,) = capture.outputs(block)
        with SuffixReplay(sp, sp.blocks, 0.25):
            (cut,) = capture.outputs(block)
        start = int(33 * 0.75)
        assert torch.allclose(cut[:, start:], full[:, start:], atol=1e-5, rtol=1e-5), (family, policy, block.index)
        assert block_output_error([cut], [full], 0.25) < 1e-5
    assert sp._sliced_from is None


@pytest.mark.parametrize("method,family,options", [("teal", "llama", {}), ("teal", "gemma3_text", {}),
                                                   ("teal", "qwen3", {"projections": "mlp"}),
                                                   ("wina", "llama", {"transform": True})])
def test_greedy_reuse_gives_the_search_without_it_bit_for_bit(method, family, options, monkeypatch):
    """ReplayMemo skips only work whose inputs a candidate did not change: the lookup (every step's
    choice and block error) equals the one computed without reuse, with several captured calls."""
    import spon_exp.sparsifiers.greedy as greedy

    def search(reuse):
        original = greedy.ReplayMemo.__init__
        monkeypatch.setattr(greedy.ReplayMemo, "__init__",
                            lambda self, block, names, calls, reuse_=True: original(self, block, names, calls, reuse))
        counts = []
        exit_ = greedy.ReplayMemo.__exit__
        monkeypatch.setattr(greedy.ReplayMemo, "__exit__",
                            lambda self, *exc: (counts.append((self.hits, self.misses)), exit_(self, *exc))[1])
        lm, sp, _ = calibrated(method, family, allocation="greedy", greedy_step=0.1, refine_passes=0, **options)
        monkeypatch.undo()
        leftovers = [m for m in lm.model.modules() if isinstance(m, greedy._Memoised)]
        return sp, counts, leftovers

    reused, counts, leftovers = search(True)
    plain, plain_counts, _ = search(False)  # every part recomputed
    assert not leftovers  # the model is restored after the search
    assert all(hits > misses for hits, misses in counts)  # most parts come from the memo
    assert all(hits == 0 for hits, _ in plain_counts)
    for layer, lookup in plain.greedy_lookup.items():
        assert torch.equal(reused.greedy_lookup[layer], lookup), layer
    assert reused.greedy_report == plain.greedy_report


def test_greedy_lookup_is_reused_across_targets_and_saved(monkeypatch):
    lm, sp, ids = calibrated("teal", sparsity=0.25, allocation="greedy", greedy_sequences=2, greedy_step=0.1,
                             refine_passes=0)
    lookup = {k: v.clone() for k, v in sp.greedy_lookup.items()}
    import spon_exp.sparsifiers.greedy as greedy

    calls = []
    original = greedy.greedy_trajectory
    monkeypatch.setattr(greedy, "greedy_trajectory", lambda *a, **k: (calls.append(1), original(*a, **k))[1])
    sp.sparsity = 0.15  # covered by the lookup: no new search
    sp.calibrate(lm.model, ids.split(4))
    assert not calls and all(torch.equal(sp.greedy_lookup[k], v) for k, v in lookup.items())
    sp.sparsity = 0.35  # beyond it: the search continues from where it stopped
    sp.calibrate(lm.model, ids.split(4))
    assert len(calls) == len(sp.blocks)
    for k, v in lookup.items():
        assert torch.equal(sp.greedy_lookup[k][: len(v)], v) and float(sp.greedy_lookup[k][-1, 0]) >= 0.35 - 1e-9
    fresh = build_sparsifier("teal", **{k: v for k, v in sp.describe().items() if k != "name"}).attach(tiny().model)
    fresh.load_state_dict(sp.state_dict())
    assert fresh.thresholds == sp.thresholds
    assert all(torch.equal(fresh.greedy_lookup[k], v) for k, v in sp.greedy_lookup.items())
    assert fresh.target_sparsity(fresh.projections[0]) == sp.target_sparsity(sp.projections[0])


# ------------------------------------------------------------------------------- WINA
def wina_toy(**kwargs):
    model = toy_model(4, kv=2)
    attn = model.layers[0].self_attn
    set_weight(attn.q_proj, [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    set_weight(attn.k_proj, [[4, 0, 0, 0.1], [0, 0.5, 1, 0]])  # column norms 4, 0.5, 1, 0.1
    sp = build_sparsifier("wina", sparsity=0.5, projections=["q_proj", "k_proj"], **kwargs).attach(model)
    return attn, sp


def test_wina_hand_computed_topk():
    attn, sp = wina_toy()  # reference: column norm on k_proj only
    x = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    # q: |x| = 1, 2, 0.5, 3 -> keep 2 of 4: channels 3 and 1
    assert torch.equal(attn.q_proj(x), torch.tensor([[0.0, -2.0, 0.0, 3.0]]))
    # k: |x|·‖W[:,i]‖ = 4, 1, 0.5, 0.3 -> keep channels 0 and 1: W_k [1, -2, 0, 0] = [4, -1]
    assert torch.allclose(attn.k_proj(x), torch.tensor([[4.0, -1.0]]))
    with sp.measuring():
        attn.q_proj(x)
    assert sp._dropped["0.q_proj"] == 2
    assert sp.column_norms(sp.projections[1]) is sp.column_norms(sp.projections[1])  # cached


def test_wina_hand_computed_threshold_and_all_norms():
    attn, sp = wina_toy(mode="threshold", norm_projections="all")
    sp.thresholds = {"0.q_proj": 1.5, "0.k_proj": 0.4}
    sp._refresh_consumers()
    x = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    # q (unit column norms): scores 1, 2, 0.5, 3 > 1.5 -> channels 1, 3
    assert torch.equal(attn.q_proj(x), torch.tensor([[0.0, -2.0, 0.0, 3.0]]))
    # k: scores 4, 1, 0.5, 0.3 > 0.4 -> channels 0, 1, 2: W_k [1, -2, 0.5, 0] = [4, -0.5]
    assert torch.allclose(attn.k_proj(x), torch.tensor([[4.0, -0.5]]))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("mode", ["topk", "threshold"])
def test_wina_measured_sparsity_meets_target(family, mode):
    lm, sp, ids = calibrated("wina", family, 0.5, mode=mode)
    assert abs(measured(lm.model, sp, ids)["model"] - 0.5) <= 0.01


def test_wina_masks_shared_only_between_norm_free_projections():
    lm, sp, ids = calibrated("wina")
    calls = []
    original = sp.sparsify
    sp.sparsify = lambda proj, x, measure: (calls.append(proj.name), original(proj, x, measure))[1]
    with torch.no_grad():
        lm.model(ids[:1])
    # q/v share |x|; k (norm) its own; o; gate (norm) and up separately; down
    assert len(calls) == 6 * lm.model.config.num_hidden_layers and "v_proj" not in calls


def test_wina_reference_prefill_keeps_first_tokens_dense():
    sp = build_sparsifier("wina", sparsity=0.5, dense_first_fraction=0.01)
    assert sp.sparsified_tokens(256) == 253 and sp.sparsified_tokens(32) == 31 and sp.sparsified_tokens(1) == 1


# ---------------------------------------------------------------------------- R-Sparse
def test_rsparse_budget():
    assert rsparse_rank(4096, 4096, 0.5, 0.95) == 51
    assert rsparse_rank(4096, 4096, 0.5, 1.0) == 0
    keep = rsparse_keep_fraction(4096, 4096, 0.5, 51)
    assert keep == pytest.approx(0.5 - 51 * 8192 / 4096**2) and keep == pytest.approx(0.5 * 0.95, abs=1e-3)


def test_rsparse_hand_computed_sparse_plus_low_rank():
    model = toy_model(4, kv=3)
    attn = model.layers[0].self_attn
    set_weight(attn.k_proj, [[4, 0, 0, 0], [0, 2, 0, 0], [0, 0, 1, 0]])  # SVD: S = 4, 2, 1 on e1, e2, e3
    # s = 0.25, rho = 0.1: r = floor(4·3·0.75·0.9 / 7) = 1
    sp = build_sparsifier("rsparse", sparsity=0.25, sparse_share=0.1, projections=["k_proj"]).attach(model)
    proj = sp.projections[0]
    assert sp.rank(proj) == 1
    down, up = low_rank_factors(attn.k_proj.weight, 1)
    sp.load_state_dict({"threshold.0.k_proj": torch.tensor(1.0), "factor_down.0.k_proj": down, "factor_up.0.k_proj": up})
    x = torch.tensor([[0.1, 1.0, 0.2, 5.0]])
    # scores |x|·‖W[:,i]‖ = 0.4, 2, 0.2, 0 -> only channel 1 kept: W(x⊙m) = [0, 2, 0]
    # dropped part [0.1, 0, 0.2, 5] through the rank-1 path 4·e1·e1ᵀ: [0.4, 0, 0]
    with sp.measuring():
        y = attn.k_proj(x)
    assert torch.allclose(y, torch.tensor([[0.4, 2.0, 0.0]]), atol=1e-6)
    with sp.disabled():
        assert torch.allclose(attn.k_proj(x), torch.tensor([[0.4, 2.0, 0.2]]), atol=1e-6)
    # 3 channels zeroed, minus the rank path's r·(in+out)/out = 7/3 input-equivalents
    assert sp._dropped["0.k_proj"] == pytest.approx(3 - 7 / 3)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
@pytest.mark.parametrize("share", [0.95, 0.8])
def test_rsparse_measured_sparsity_meets_target(family, share):
    lm, sp, ids = calibrated("rsparse", family, 0.5, sparse_share=share)
    if share == 0.8:
        assert all(sp.rank(p) > 0 for p in sp.projections)
    assert abs(measured(lm.model, sp, ids)["model"] - 0.5) <= 0.01
    with torch.no_grad(), sp.disabled():
        teacher = lm.model(ids).logits
    sp.detach()
    with torch.no_grad():
        assert torch.equal(teacher, lm.model(ids).logits)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen3"])
def test_wina_transform_keeps_the_dense_function_and_orthogonalises(family):
    lm = tiny(family)
    ids = random_ids(2, 16)
    original = {k: v.clone() for k, v in lm.model.state_dict().items()}
    with torch.no_grad():
        dense = lm.model(ids).logits
    sp = build_sparsifier("wina", sparsity=0.5, transform=True).attach(lm.model)
    sp.calibrate(lm.model, [random_ids(2, 16, seed=3)])
    with torch.no_grad(), sp.disabled():
        transformed = lm.model(ids).logits
    assert torch.allclose(transformed, dense, atol=1e-4, rtol=1e-4)
    for block in sp.blocks:  # k_proj's and gate_proj's columns are orthogonal in the new basis
        for name in ("k_proj", "gate_proj"):
            w = block.projections[name].module.weight.double()
            gram = w.T @ w
            off = gram - torch.diag(gram.diagonal())
            assert off.abs().max() <= 1e-4 * gram.diagonal().max(), (family, block.index, name)
    fresh = build_sparsifier("wina", sparsity=0.5, transform=True)
    state = sp.state_dict()
    sp.detach()
    assert all(torch.equal(v, original[k]) for k, v in lm.model.state_dict().items())  # restored exactly
    fresh.attach(lm.model).load_state_dict(state)
    with torch.no_grad(), fresh.disabled():
        assert torch.allclose(lm.model(ids).logits, dense, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="transform=true"):
        build_sparsifier("wina", sparsity=0.5).attach(tiny(family).model).load_state_dict(state)


def test_wina_greedy_in_threshold_mode_calibrates_each_allocated_sparsity():
    lm, sp, ids = calibrated("wina", sparsity=0.5, mode="threshold", allocation="greedy", greedy_sequences=2,
                             greedy_step=0.1, refine_passes=0)
    per = measured(lm.model, sp, ids)["per_projection"]
    for p in sp.projections:  # thresholds at each projection's own allocated sparsity (calibration data)
        assert abs(per[p.key] - sp.target_sparsity(p)) < 0.12, p.key


def test_wina_greedy_allocates_per_projection_top_k():
    lm, sp, ids = calibrated("wina", sparsity=0.5, allocation="greedy", greedy_sequences=2, greedy_step=0.1)
    layer = sp.blocks[0].index
    sparsities = {p.name: sp.target_sparsity(p) for p in sp.projections if p.layer == layer}
    assert len(set(sparsities.values())) > 1  # not uniform
    block = sp.blocks[0]
    sizes = {n: block.projections[n].num_params for n in sparsities}
    weighted = sum(sparsities[n] * sizes[n] for n in sizes) / sum(sizes.values())
    assert abs(weighted - 0.5) <= 0.1 / 2  # within one step of the target
    per = measured(lm.model, sp, ids)["per_projection"]
    for p in sp.projections:  # top-k: exactly int(in·(1-s_p)) kept per token
        keep = int(p.module.in_features * (1 - sp.target_sparsity(p)))
        assert per[p.key] == pytest.approx(1 - keep / p.module.in_features), p.key


def test_rsparse_share_file_plain_magnitude_where_the_share_is_one(tmp_path):
    lm = tiny("llama")
    blocks = find_decoder_blocks(lm.model)
    n = len(blocks) * 7
    shares = [1.0 if i % 2 == 0 else 0.5 for i in range(n)]  # q, v, gate, down of layer 0 at 1 ...
    path = tmp_path / "search.npy"
    path.write_text("\n".join(f"{v:.18e}" for a in shares for v in (a, 0.5)))  # the authors' text layout
    sp = build_sparsifier("rsparse", sparsity=0.5, sparse_share_file=str(path)).attach(lm.model)
    sp.calibrate(lm.model, random_ids(4, 32).split(2))
    q, k = blocks[0].projections["q_proj"], blocks[0].projections["k_proj"]
    assert sp.share(q) == 1.0 and sp.share(k) == 0.5
    assert sp.rank(q) == 0 and sp.factors[q.key][0].shape[0] == 0 and sp.rank(k) > 0
    x = torch.randn(3, 5, q.module.in_features, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sp.score(q, x), x.abs())  # plain |x|, no column norms
    assert torch.equal(sp.score(k, x), x.abs() * k.module.weight.float().norm(dim=0))
    masked, _ = sp.sparsify(q, x, False)
    assert torch.equal(masked, x * (x.abs() > sp.thresholds[q.key]))
    path.write_text("\n".join(f"{v}" for a in shares for v in (a, 0.4)))
    with pytest.raises(ValueError, match="searched at sparsity"):
        build_sparsifier("rsparse", sparsity=0.5, sparse_share_file=str(path)).attach(tiny("llama").model)
    path.write_text("1.0\n0.5\n")
    with pytest.raises(ValueError, match="holds 2 numbers"):
        build_sparsifier("rsparse", sparsity=0.5, sparse_share_file=str(path)).attach(tiny("llama").model)
    as_json = tmp_path / "search.json"
    as_json.write_text(json.dumps({f"{p.layer}.{p.name}": [0.8, 0.5] for p in sp.projections}))
    from_json = build_sparsifier("rsparse", sparsity=0.5, sparse_share_file=str(as_json)).attach(tiny("llama").model)
    assert set(from_json.shares.values()) == {0.8}


@pytest.mark.parametrize("method,options", [("rsparse", {"sparse_share": 0.8}), ("wina", {}), ("larosa", {}),
                                            ("rsparse", {"sparse_share": 0.8, "token_policy": "last_half"})])
def test_fused_kernels_give_the_torch_path_bit_for_bit(method, options, monkeypatch):
    from spon_exp.kernels import select

    if not select.available():
        pytest.skip("no C compiler")
    lm, sp, ids = calibrated(method, **options)
    fused = measured(lm.model, sp, ids)
    with torch.no_grad():
        fused_logits = lm.model(ids).logits
    monkeypatch.setattr(select, "_lib", None)  # no kernel: torch's masks and products
    torch_path = measured(lm.model, sp, ids)
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, fused_logits)
    assert fused["per_projection"] == pytest.approx(torch_path["per_projection"], abs=1e-12)


def test_rsparse_reference_budget_formula():
    lm = tiny("llama")
    sp = build_sparsifier("rsparse", sparsity=0.5, sparse_share=0.8, budget="reference").attach(lm.model)
    block = sp.blocks[0]
    hidden = block.projections["q_proj"].module.in_features
    k = block.projections["k_proj"]
    # k as hidden × hidden: channels = max(int(h·0.5·0.8), 1); rank = int((h²·0.5 − channels·h) / 2h)
    channels = max(int(hidden * 0.5 * 0.8), 1)
    expected = max(int((hidden * hidden * 0.5 - channels * hidden) / (2 * hidden)), 1)
    assert sp.rank(k) == min(expected, k.module.out_features, hidden)
    assert sp.keep_fraction(k) == pytest.approx(0.4)
    down = block.projections["down_proj"]
    d_in, d_out = down.module.in_features, down.module.out_features
    channels = max(int(d_in * 0.5 * 0.8), 1)
    assert sp.rank(down) == max(int((d_in * d_out * 0.5 - channels * d_out) / (d_in + d_out)), 1)


# ----------------------------------------------------------------------------- LaRoSA
def test_larosa_hand_computed_rotated_topk():
    model = toy_model(2)
    attn = model.layers[0].self_attn
    set_weight(attn.q_proj, [[1, 0], [0, 1]])
    set_weight(attn.k_proj, [[1, 1], [1, -1]])
    set_weight(attn.o_proj, [[1, 0], [0, 1]])
    sp = build_sparsifier("larosa", sparsity=0.5, split="even", rotation="runtime",
                          projections=["q_proj", "k_proj", "o_proj"]).attach(model)
    c = 1 / math.sqrt(2)
    sp.load_state_dict({"rotation.0.qkv_input": torch.tensor([[c, -c], [c, c]])})
    x = torch.tensor([[1.0, 0.8]])
    # xQ = [1.8c, -0.2c]; keep 1 of 2 -> [1.8c, 0]; back: 1.8c·[c, c] = [0.9, 0.9]
    with sp.measuring():
        assert torch.allclose(attn.q_proj(x), torch.tensor([[0.9, 0.9]]), atol=1e-6)
        assert torch.allclose(attn.k_proj(x), torch.tensor([[1.8, 0.0]]), atol=1e-6)  # same sparsified input
    assert sp._dropped["0.q_proj"] == 1 and sp._dropped["0.k_proj"] == 1
    # o_proj input is top-k'd unrotated: [0.3, -2] -> [0, -2]
    assert torch.allclose(attn.o_proj(torch.tensor([[0.3, -2.0]])), torch.tensor([[0.0, -2.0]]))


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_larosa_folded_rotation_equals_runtime_and_restores_weights(family):
    """W' = W·Q with the input rotated once computes what topk(x·Q)·Qᵀ into W does; switched
    off it is the dense model; detach() puts the original weights back bit for bit. In float64:
    a top-k model is chaotic, and float32 rounding differences flip a near-tied coordinate."""
    lm = tiny(family)
    lm.model.double()
    ids = random_ids(2, 16)
    original = {k: v.clone() for k, v in lm.model.state_dict().items()}
    with torch.no_grad():
        dense = lm.model(ids).logits
    runtime = build_sparsifier("larosa", sparsity=0.5, rotation="runtime", rotation_dtype="float64").attach(lm.model)
    runtime.calibrate(lm.model, [random_ids(2, 32, seed=5)])
    with torch.no_grad():
        expected = lm.model(ids).logits
    state = runtime.state_dict()
    runtime.detach()
    folded = build_sparsifier("larosa", sparsity=0.5, rotation_dtype="float64").attach(lm.model)
    folded.load_state_dict(state)
    q_weight = lm.model.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(q_weight, original["model.layers.0.self_attn.q_proj.weight"])  # folded in
    assert torch.equal(lm.model.model.layers[0].self_attn.o_proj.weight, original["model.layers.0.self_attn.o_proj.weight"])
    with torch.no_grad():
        got = lm.model(ids).logits
        with folded.disabled():
            folded_dense = lm.model(ids).logits
    assert torch.allclose(got, expected, atol=1e-10, rtol=1e-10)
    assert torch.allclose(folded_dense, dense, atol=1e-10, rtol=1e-10)
    folded.detach()
    for k, v in lm.model.state_dict().items():
        assert torch.equal(v, original[k]), k


def test_larosa_attention_rotation_for_the_mlp():
    lm = tiny("llama")
    sp = build_sparsifier("larosa", sparsity=0.5, mlp_rotation="attention").attach(lm.model)
    sp.calibrate(lm.model, [random_ids(2, 32, seed=5)])
    for layer in range(len(sp.blocks)):
        assert torch.equal(sp.rotations[(layer, "gate_up_input")], sp.rotations[(layer, "qkv_input")])


def test_topk_mask_ties():
    from spon_exp.sparsifiers.scoring import topk_mask

    score = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.5], [5.0, 4.0, 3.0, 2.0, 1.0]])
    # keep 2: row 0 ties at the cut (2.0, 2.0)
    assert topk_mask(score, 2, "keep").tolist() == [[True, False, True, True, False], [True, True, False, False, False]]
    broken = topk_mask(score, 2, "break")  # the tie at the cut goes to the lowest index
    assert broken.tolist() == [[True, False, True, False, False], [True, True, False, False, False]]
    assert topk_mask(score, 5).all() and not topk_mask(score, 0).any()
    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    reference = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, x.abs().topk(40, dim=-1).indices, True)
    assert torch.equal(topk_mask(x.abs(), 40), reference)


@pytest.mark.parametrize("width,keep", [(96, 40), (7, 1), (7, 6), (576, 288)])
def test_fused_topk_kernel_equals_torch(width, keep):
    from spon_exp.kernels import select
    from spon_exp.sparsifiers.scoring import magnitude_topk_mask, topk_mask

    if not select.available():
        pytest.skip("no C compiler")
    g = torch.Generator().manual_seed(width)
    x = torch.randn(3, 50, width, generator=g)
    x[0, 0, :4] = 1.5  # ties at and around the cut
    x[0, 1] = x[0, 1].round()  # many ties
    scale = torch.rand(width, generator=g) + 0.5
    for c in (None, scale):
        score = x.abs() * (c if c is not None else 1.0)
        kernel = select.topk_mask_cpu(x, keep, "keep", c)
        assert torch.equal(kernel, topk_mask(score, keep, "keep"))
        exact = select.topk_mask_cpu(x, keep, "break", c)
        assert (exact.sum(-1) == keep).all()
        assert torch.equal(exact & ~kernel, torch.zeros_like(exact))  # a subset of the tie-keeping mask
        assert torch.equal(exact, topk_mask(score, keep, "break"))  # ties: lowest index first, as torch's path
        cut = score.masked_fill(~exact, float("inf")).amin(-1, keepdim=True)
        assert (score.masked_fill(exact, float("-inf")) <= cut).all()  # nothing left out beats a kept one
        assert torch.equal(magnitude_topk_mask(x, keep, "keep", c), kernel)
    assert select.topk_mask_cpu(x.double(), keep, "keep") is None  # not float32: torch selects
    from spon_exp.sparsifiers.scoring import topk_sparsify

    for ties in ("keep", "break"):  # one pass writes x·mask and counts what it zeroed
        mask = select.topk_mask_cpu(x, keep, ties, scale)
        out, dropped = topk_sparsify(x, keep, ties, scale, measure=True)
        assert torch.equal(out, x * mask) and dropped == int((~mask).sum())
    needs_grad = x.clone().requires_grad_(True)  # autograd: the product in torch carries the gradient
    out, _ = topk_sparsify(needs_grad, keep, "keep", scale)
    assert out.grad_fn is not None and select.topk_sparsify_cpu(needs_grad, keep, "keep") is None


def test_fused_topk_kernel_exact_on_awkward_rows():
    """The kernel bins each row's scores by octaves below the row's largest: rows of any scale,
    all-zero and constant rows, ties across the cut and a cut more than 16 octaves below the
    largest score (the last, catch-all bin) must all give torch's mask exactly."""
    from spon_exp.kernels import select
    from spon_exp.sparsifiers.scoring import topk_mask

    if not select.available():
        pytest.skip("no C compiler")
    g = torch.Generator().manual_seed(1)
    width, keep = 300, 120
    x = torch.randn(400, width, generator=g)
    x *= torch.logspace(-3, 3, 400).unsqueeze(-1)[torch.randperm(400, generator=g)]  # jumps of any size
    x[10:20] *= torch.linspace(0.5, 2.0, width)  # a drifting shape
    x[50] = 0.0
    x[51] = 2.5  # one value: everything ties
    x[52, :keep + 3] = 1.0  # a tie across the cut
    x[53:60] = x[53:60].round()
    x[60] = torch.logspace(-12, 6, width)[torch.randperm(width, generator=g)]  # cut far below the top
    x[61, : width - keep + 5] = 1e-30  # the cut among near-zero scores
    order = x[62].abs().argsort(descending=True)  # a few ties at the cut inside one small bin
    x[62, order[keep - 3: keep + 3]] = x[62, order[keep - 1]].item()
    scale = torch.rand(width, generator=g) + 0.5
    for c in (None, scale):
        score = x.abs() * (c if c is not None else 1.0)
        assert torch.equal(select.topk_mask_cpu(x, keep, "keep", c), topk_mask(score, keep, "keep"))
        exact = select.topk_mask_cpu(x, keep, "break", c)
        assert torch.equal(exact, topk_mask(score, keep, "break")) and (exact.sum(-1) == keep).all()


def test_fused_kernels_portable_build_equals_the_avx2_one(monkeypatch, tmp_path):
    """The kernels are built with -mavx2 where the CPU has it; the portable build (no AVX2)
    must give the same masks, outputs and counts."""
    import ctypes

    from spon_exp.kernels import cbuild, select

    if not select.available():
        pytest.skip("no C compiler")
    for capability, flags in (("AVX512", ["-mavx2"]), ("AVX2", ["-mavx2"]), ("DEFAULT", [])):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert cbuild.avx2_flags() == flags
    monkeypatch.undo()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 300, generator=g) * torch.logspace(-2, 2, 64).unsqueeze(-1)
    x[0, :130] = 1.0  # ties across the cut
    scale = torch.rand(300, generator=g) + 0.5
    native = [(select.topk_mask_cpu(x, 120, ties, c), select.topk_sparsify_cpu(x, 120, ties, c),
               select.threshold_split_cpu(x, 0.8, c)) for ties in ("keep", "break") for c in (None, scale)]
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    portable = select.bind(cbuild.build(cbuild.TOPK_SELECT, portable=True)[0])
    assert isinstance(portable, ctypes.CDLL)
    monkeypatch.setattr(select, "_lib", portable)
    again = [(select.topk_mask_cpu(x, 120, ties, c), select.topk_sparsify_cpu(x, 120, ties, c),
              select.threshold_split_cpu(x, 0.8, c)) for ties in ("keep", "break") for c in (None, scale)]
    for (mask, (out, kept), (k, r, n)), (mask2, (out2, kept2), (k2, r2, n2)) in zip(native, again):
        assert torch.equal(mask, mask2) and torch.equal(out, out2) and kept == kept2
        assert torch.equal(k, k2) and torch.equal(r, r2) and n == n2


def test_larosa_rotation_is_the_covariance_eigenbasis():
    x = torch.randn(500, 6, generator=torch.Generator().manual_seed(0)) * torch.tensor([5.0, 1, 1, 0.5, 0.2, 3])
    h = x.double().T @ x.double()
    q = rotation_from_covariance(h, 0.01)
    assert torch.allclose(q.T @ q, torch.eye(6, dtype=torch.float64), atol=1e-10)
    d = q.T @ h @ q
    assert torch.allclose(d - torch.diag(d.diagonal()), torch.zeros(6, 6, dtype=torch.float64), atol=1e-8)


def test_larosa_splits():
    assert site_sparsities(0.5, "reference", 3, 1) == pytest.approx((0.4, 0.6))
    assert site_sparsities(0.5, "even", 3, 1) == (0.5, 0.5)
    rotated, other = site_sparsities(0.5, "balanced", 3, 1)
    assert rotated / other == pytest.approx(0.8 / 1.2) and (3 * rotated + other) / 4 == pytest.approx(0.5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_larosa_measured_sparsity(family):
    lm, sp, ids = calibrated("larosa", family, 0.5, split="even", ties="break")
    assert abs(measured(lm.model, sp, ids)["model"] - 0.5) <= 0.01
    # reference split: sparsity 0.4 on q/k/v/gate/up keeps int(64·0.6) = 38 of 64;
    # 0.6 on o/down keeps int(64·0.4) = 25 of 64 (o) and int(128·0.4) = 51 of 128 (down)
    sp.options.split = "reference"
    sp._layer_sparsities.clear()
    per = measured(lm.model, sp, ids)["per_projection"]
    assert per["0.q_proj"] == pytest.approx(26 / 64) and per["0.o_proj"] == pytest.approx(39 / 64)
    assert per["0.down_proj"] == pytest.approx(77 / 128)
    # the reference's ties: a query head group's first token repeats its value heads, so the
    # o_proj input has exact ties at the cut, which "keep" keeps (lower measured sparsity)
    sp.options.ties = "keep"
    assert measured(lm.model, sp, ids)["per_projection"]["0.o_proj"] < 39 / 64


# ------------------------------------------------------------------ SPON fold + export
METHODS = {
    "teal_greedy": ("teal", {"allocation": "greedy", "greedy_sequences": 2, "greedy_step": 0.1, "refine_passes": 1}),
    "wina": ("wina", {}),
    "wina_threshold": ("wina", {"mode": "threshold", "norm_projections": "all"}),
    "wina_ref": ("wina", {"transform": True, "allocation": "greedy", "greedy_sequences": 2, "greedy_step": 0.1}),
    "rsparse": ("rsparse", {"sparse_share": 0.8}),
    "larosa": ("larosa", {}),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_spon_folds_exactly_and_export_round_trips(method, tmp_path):
    name, kwargs = METHODS[method]
    lm, sp, ids = calibrated(name, **kwargs)
    spon = Spon(sp, 1)
    train_alpha(lm.model, sp, spon, ids, TrainConfig(lr=3e-2, steps=4, batch_size=4))
    with torch.no_grad():
        before = lm.model(ids).logits
        with spon.disabled():
            sparse_only = lm.model(ids).logits
        biases = fold_alpha(spon)
        after = lm.model(ids).logits
    assert not torch.allclose(before, sparse_only, atol=1e-4)  # alpha really did something
    assert (before - after).abs().max() <= 1e-4
    save_sparse_state(tmp_path, sp, biases)
    fresh = tiny()  # same seed -> same random weights
    loaded = load_sparse_state(fresh.model, tmp_path)
    assert loaded.describe() == sp.describe()
    with torch.no_grad():
        assert torch.allclose(fresh.model(ids).logits, after, atol=1e-6)


@pytest.mark.parametrize("method,thresholds", [("teal", 14), ("wina", 0), ("rsparse", 14), ("larosa", 0)])
def test_thresholds_scaled_perturbs_every_threshold_and_restores_them(method, thresholds):
    lm, sp, ids = calibrated(method)
    state = sp.state_dict()
    with torch.no_grad():
        base = lm.model(ids).logits
    with sp.thresholds_scaled(1.0) as count, torch.no_grad():
        assert count == thresholds
        assert torch.equal(lm.model(ids).logits, base)  # scaling by 1 changes nothing
    with sp.thresholds_scaled(1.5) as count:
        if count:
            scaled = sp.state_dict()
            assert all(float(scaled[k]) == pytest.approx(1.5 * float(v)) for k, v in state.items()
                       if k.startswith("threshold."))
            with torch.no_grad():
                assert not torch.equal(lm.model(ids).logits, base)
    after = sp.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, base)


@pytest.mark.parametrize("shape,rank", [((256, 768), 12), ((768, 256), 20)])
def test_randomised_low_rank_factors_match_the_exact_svd_for_the_kept_rank(shape, rank):
    # a spectrum that decays like a trained weight's, plus noise (random-init weights are flat)
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(shape[0], shape[0], generator=g))
    v, _ = torch.linalg.qr(torch.randn(shape[1], shape[1], generator=g))
    k = min(shape)
    s = 1.0 / torch.arange(1, k + 1).float() ** 0.7
    w = (u[:, :k] * s) @ v[:, :k].T + 1e-3 * torch.randn(*shape, generator=g)
    exact_down, exact_up = low_rank_factors(w, rank, method="exact")
    fast_down, fast_up = low_rank_factors(w, rank, method="randomized")
    assert fast_down.shape == exact_down.shape == (rank, shape[1]) and fast_up.shape == (shape[0], rank)
    optimum = torch.linalg.norm(w - exact_up @ exact_down)
    assert torch.linalg.norm(w - fast_up @ fast_down) <= optimum * 1.005
    # same subspace: the rank-r approximations agree closely
    approx_diff = torch.linalg.norm(exact_up @ exact_down - fast_up @ fast_down) / torch.linalg.norm(exact_up @ exact_down)
    assert approx_diff < 0.02
    assert torch.equal(low_rank_factors(w, rank, method="randomized")[0], fast_down)  # seeded: reproducible
    # "auto" takes the randomised path for a rank this small relative to the matrix
    assert torch.equal(low_rank_factors(w, rank)[0], fast_down) == (rank + 16 < 0.125 * k)


# ------------------------------------------------ options, hooks, dense, token policy
def test_options_are_the_schema_constructor_and_description():
    import dataclasses

    from spon_exp.config import TealConfig
    from spon_exp.sparsifiers import TealOptions, TealSparsifier

    schema = {f.name: f.default for f in dataclasses.fields(TealConfig)}
    assert schema == {"name": "teal", "label": None, "sparsity": None, **dataclasses.asdict(TealOptions())}
    sp = build_sparsifier("teal", sparsity=0.4, allocation="greedy", greedy_step=0.1)
    assert sp.options == TealOptions(allocation="greedy", greedy_step=0.1)
    assert sp.describe() == {"name": "teal", "sparsity": 0.4, **dataclasses.asdict(sp.options)}
    assert TealSparsifier(0.4, TealOptions(allocation="greedy", greedy_step=0.1)).options == sp.options
    with pytest.raises(ValueError, match="greedy_step must be in"):
        TealOptions(greedy_step=0)  # range checks live in the options
    with pytest.raises(TypeError):
        build_sparsifier("teal", sparsity=0.5, alocation="greedy")


@pytest.mark.parametrize("tokens,ceil_n,floor_n", [(7, 4, 3), (8, 4, 4), (2, 1, 1), (1, 1, 1)])
def test_last_half_floor_sparsifies_exactly_floor_half(tokens, ceil_n, floor_n):
    """TEAL's reference sparsifies the last floor(T/2) tokens of a multi-token forward."""
    lm = tiny("llama")
    for rounding, expected in (("ceil", ceil_n), ("floor", floor_n)):
        sp = build_sparsifier("teal", sparsity=0.5, token_policy="last_half", token_rounding=rounding).attach(lm.model)
        sp.load_state_dict({f"threshold.{p.key}": torch.tensor(1e9) for p in sp.projections})  # drop everything
        q = sp.blocks[0].projections["q_proj"].module
        x = torch.ones(1, tokens, q.in_features)
        seen = []
        with torch.no_grad(), HookSetFor(q, seen):
            q(x)
        zero_rows = int((seen[0][0] == 0).all(-1).sum())
        assert zero_rows == expected and bool((seen[0][0, : tokens - expected] == 1).all()), rounding
        sp.detach()


class HookSetFor:
    """Record the input a module's forward receives after its pre-hooks."""

    def __init__(self, module, seen):
        self.module, self.seen = module, seen

    def __enter__(self):
        self.handle = self.module.register_forward_pre_hook(lambda m, args: self.seen.append(args[0].clone()))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_hook_set_switches_off_and_removes_every_hook():
    from spon_exp.sparsifiers import HookSet

    lin, calls = nn.Linear(3, 3), []
    with HookSet() as hooks:
        hooks.pre(lin, lambda m, args: calls.append("pre"))
        hooks.post(lin, lambda m, args, out: calls.append("post"), prepend=True)
        lin(torch.zeros(1, 3))
        with hooks.disabled():
            lin(torch.zeros(1, 3))
        assert calls == ["pre", "post"] and len(hooks) == 2
    lin(torch.zeros(1, 3))
    assert calls == ["pre", "post"] and not lin._forward_pre_hooks and not lin._forward_hooks


def test_dense_sparsifier_is_a_no_op():
    lm, ids = tiny(), random_ids()
    with torch.no_grad():
        base = lm.model(ids).logits
    sp = build_sparsifier("dense", sparsity=0.5).attach(lm.model)
    assert sp.attached and not sp.sparsifies and len(sp.hooks) == 0 and sp.projections
    sp.calibrate(lm.model, [ids])
    with sp.measuring(), torch.no_grad():
        assert torch.equal(lm.model(ids).logits, base)
    measured = sp.measured_sparsity()
    assert measured["model"] == 0.0 and set(measured["per_projection"]) == {p.key for p in sp.projections}


@pytest.mark.parametrize("policy,fraction,dense_first", [("all", 0.5, 0.0), ("last_half", 0.9, 0.0),
                                                          ("last_fraction", 0.3, 0.0), ("all", 0.5, 0.01),
                                                          ("last_fraction", 0.999, 0.05)])
def test_token_policy_is_one_mechanism(policy, fraction, dense_first):
    from spon_exp.sparsifiers import TokenPolicy

    kept_fraction = 0.5 if policy == "last_half" else fraction
    sp = build_sparsifier("wina", sparsity=0.5, token_policy=policy, token_fraction=fraction,
                          dense_first_fraction=dense_first)
    assert sp.tokens == TokenPolicy(policy, fraction, dense_first)
    for tokens in (1, 2, 7, 32, 100, 256):
        expected = tokens if policy == "all" or tokens == 1 else max(1, math.ceil(tokens * kept_fraction))
        if dense_first and tokens > 1:
            expected = min(expected, int(tokens * (1 - dense_first)))
        assert sp.sparsified_tokens(tokens) == expected
