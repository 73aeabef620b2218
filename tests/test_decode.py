"""The sparse decode path gives the masked-dense model's logits (batch 1) and falls back
to the dense product for larger batches."""

import pytest
import torch
from torch import nn

from spon_exp.kernels.decode import SparseDecodeLinear, disable_sparse_decode, enable_sparse_decode
from spon_exp.sparsifiers import build_sparsifier
from spon_exp.spon import Spon, fold_alpha
from tests.helpers import random_ids, tiny


@pytest.fixture()
def sparse_model():
    lm = tiny("llama")
    sp = build_sparsifier("teal", sparsity=0.6).attach(lm.model)
    sp.calibrate(lm.model, [random_ids(4, 32)])
    spon = Spon(sp, 1)
    with torch.no_grad():
        for a in spon.alphas.values():
            a.normal_(std=0.05)
    fold_alpha(spon)
    return lm.model, sp


@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (1, 9), (2, 5)])
def test_same_logits_as_masked_dense(sparse_model, shape):
    model, sp = sparse_model
    ids = random_ids(*shape, seed=3)
    with torch.no_grad():
        masked = model(ids).logits
        assert enable_sparse_decode(sp) == len(sp.projections)
        assert all(type(p.module) is SparseDecodeLinear for p in sp.projections)
        fast = model(ids).logits
    assert torch.allclose(fast, masked, rtol=1e-5, atol=1e-5)
    disable_sparse_decode(sp)
    assert all(type(p.module) is nn.Linear and not hasattr(p.module, "weight_t") for p in sp.projections)


def test_greedy_decoding_emits_the_masked_dense_tokens(sparse_model):
    model, sp = sparse_model
    prompt = random_ids(1, 6, seed=5)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        reference = model.generate(prompt, **kwargs)
        enable_sparse_decode(sp)
        fast = model.generate(prompt, **kwargs)
    assert torch.equal(fast, reference)


def test_ordered_mode_decodes_bit_identically_to_ordered_masked_dense(sparse_model):
    # the rows-grouped fast kernel matches masked dense to rounding only; the ordered pair is exact
    model, sp = sparse_model
    prompt = random_ids(1, 6, seed=7)
    kwargs = dict(max_new_tokens=16, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    runs = {}
    with torch.no_grad():
        for mode in ("ordered_dense", "ordered"):
            enable_sparse_decode(sp, mode=mode)
            assert all(p.module.decode_mode == mode for p in sp.projections)
            runs[mode] = model.generate(prompt, **kwargs)
    disable_sparse_decode(sp)
    assert torch.equal(runs["ordered"].sequences, runs["ordered_dense"].sequences)
    for a, b in zip(runs["ordered"].logits, runs["ordered_dense"].logits):
        assert torch.equal(a, b)
    with torch.no_grad():  # batch > 1 falls back to the dense product in every mode
        ids = random_ids(3, 4, seed=8)
        masked = model(ids).logits
        enable_sparse_decode(sp, mode="ordered")
        assert torch.allclose(model(ids).logits, masked, rtol=1e-5, atol=1e-5)
    disable_sparse_decode(sp)


def test_unknown_decode_mode_is_rejected(sparse_model):
    _, sp = sparse_model
    with pytest.raises(ValueError, match="ordered_dense"):
        enable_sparse_decode(sp, mode="turbo")


DECODE_METHODS = {"teal": ("teal", {}), "rsparse": ("rsparse", {}), "wina_threshold": ("wina", {"mode": "threshold"}),
                  "larosa_folded": ("larosa", {"rotation": "folded"})}


@pytest.mark.parametrize("method", sorted(DECODE_METHODS))
def test_every_threshold_method_decodes_through_the_op(method):
    # R-Sparse: the op computes the masked part, its forward hook still adds the low-rank term;
    # LaRoSA with Q folded into the weights: the op skips the zeroed rotated coordinates
    name, options = DECODE_METHODS[method]
    model = tiny("llama").model
    sp = build_sparsifier(name, sparsity=0.5, **options).attach(model)
    sp.calibrate(model, [random_ids(4, 32)])
    prompt = random_ids(1, 5, seed=11)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        masked = model.generate(prompt, **kwargs)
        with sp.measuring():
            model(prompt)
        assert sp.measured_sparsity()["model"] > 0.3  # the op really is handed zeros
        runs = {}
        for mode in ("ordered", "ordered_dense"):
            enable_sparse_decode(sp, mode=mode)
            runs[mode] = model.generate(prompt, **kwargs)
    disable_sparse_decode(sp)
    assert torch.equal(runs["ordered"].sequences, runs["ordered_dense"].sequences)
    assert all(torch.equal(a, b) for a, b in zip(runs["ordered"].logits, runs["ordered_dense"].logits))
    for a, b in zip(runs["ordered"].logits, masked.logits):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def test_compiled_decode_step_sees_one_op_per_projection(sparse_model):
    from transformers import StaticCache

    model, sp = sparse_model
    enable_sparse_decode(sp)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    cache = StaticCache(config=model.config, max_cache_len=16)
    prompt = random_ids(1, 6, seed=12)
    with torch.no_grad():
        token = model(prompt, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        eager_cache = StaticCache(config=model.config, max_cache_len=16)
        model(prompt, cache=eager_cache, use_cache=True)
        step = torch.compile(model.forward, backend=record, fullgraph=True)  # fullgraph: hooks trace too
        compiled = step(input_ids=token, cache=cache, use_cache=True).logits
        eager = model(input_ids=token, cache=eager_cache, use_cache=True).logits
    disable_sparse_decode(sp)
    targets = [str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert sum(t.startswith("spon_exp.sparse_linear") for t in targets) == len(sp.projections)
    assert torch.allclose(compiled, eager, rtol=1e-5, atol=1e-5)  # dynamo's own graph: rounding only


def test_dense_mode_is_nn_linear_and_switching_keeps_the_copies(sparse_model):
    model, sp = sparse_model
    ids = random_ids(1, 4, seed=13)
    with torch.no_grad():
        masked = model(ids).logits
        enable_sparse_decode(sp)
        copies = [p.module.weight_t for p in sp.projections]
        enable_sparse_decode(sp, mode="dense")
        dense_mode = model(ids).logits
        enable_sparse_decode(sp, mode="ordered")
    assert torch.equal(dense_mode, masked)  # nn.Linear's own product, bit for bit
    assert all(p.module.weight_t is c for p, c in zip(sp.projections, copies))  # a mode switch copies nothing
    disable_sparse_decode(sp)


def test_stand_ins_replace_the_projections_in_their_parents_and_give_them_back(sparse_model):
    model, sp = sparse_model
    originals = [p.module for p in sp.projections]
    keys = list(model.state_dict())
    ids = random_ids(1, 4, seed=14)
    enable_sparse_decode(sp)
    modules = dict(model.named_modules())
    for proj, lin in zip(sp.projections, originals):
        stand_in = modules[proj.module_path]
        assert stand_in is proj.module and type(stand_in) is SparseDecodeLinear and stand_in.original() is lin
        assert stand_in.weight is lin.weight and stand_in.bias is lin.bias  # shared, not copied
        assert stand_in._forward_pre_hooks is lin._forward_pre_hooks  # the sparsifier's hooks run on it
    assert not any(m in originals for m in modules.values())
    assert list(model.state_dict()) == keys  # weight_t is not persistent; names are unchanged
    with torch.no_grad():
        with sp.disabled():  # switched off, the stand-ins compute the dense model's product
            dense = model(ids).logits
        sp.detach()  # the handles still remove the hooks from the shared registries
        assert all(not p.module._forward_pre_hooks for p in sp.projections)
        assert torch.allclose(model(ids).logits, dense, rtol=1e-5, atol=1e-5)
    disable_sparse_decode(sp)
    modules = dict(model.named_modules())
    assert all(p.module is lin and modules[p.module_path] is lin for p, lin in zip(sp.projections, originals))
    assert not any(isinstance(m, SparseDecodeLinear) for m in modules.values())
    assert all(not hasattr(lin, "weight_t") for lin in originals)
