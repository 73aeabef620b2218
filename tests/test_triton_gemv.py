"""The Triton GEMV (CUDA backend of spon_exp::sparse_linear) in the Triton interpreter on CPU
tensors: it equals the masked-dense product for 1-8 tokens, skipping rows changes no bit,
and the op's CUDA registration routes to it. Skipped where triton is not installed."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from tests.triton_interpreter import interpreted_triton_or_skip

interpreted_triton_or_skip()

from spon_exp.kernels import ops, triton_gemv  # noqa: E402

# one unit in the last place of the output dtype, relative (the interpreter rounds fp32 ->
# bf16 toward zero, a GPU to nearest), plus the float32 accumulation of up to a few
# hundred products
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


def _problem(tokens: int, fin: int, fout: int, sparsity: float, dtype, seed: int = 0, bias: bool = True):
    """Weights, transposed weights, inputs with ``sparsity`` of each token's entries zeroed
    (a different subset per token), bias; all in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(fout, fin, generator=g).to(dtype)
    x = torch.randn(tokens, fin, generator=g)
    for row in x:
        row[torch.randperm(fin, generator=g)[: round(sparsity * fin)]] = 0.0
    b = torch.randn(fout, generator=g).to(dtype) if bias else None
    return w, w.t().contiguous(), x.to(dtype), b


def _check(y, x, w, b, dtype):
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    scale = x.double().abs() @ w.double().abs().t() + (0 if b is None else b.double().abs())
    err = (y.double() - ref).abs()
    assert y.dtype == dtype and y.shape == ref.shape
    assert bool((err <= RTOL[dtype] * ref.abs() + 1e-5 * scale + 1e-30).all()), float((err - RTOL[dtype] * ref.abs()).max())


@pytest.mark.parametrize("tokens", range(1, 9))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_masked_dense_and_skipping_changes_no_bit(tokens, dtype):
    shapes = [(96, 160), (200, 72), (37, 130)]
    fin, fout = shapes[tokens % 3]
    sparsity = (0.0, 0.5, 0.7, 0.9)[tokens % 4]
    w, wt, x, b = _problem(tokens, fin, fout, sparsity, dtype, seed=tokens, bias=tokens % 2 == 0)
    y = triton_gemv.sparse_linear(x, wt, b, programs=8)
    _check(y, x, w, b, dtype)
    assert torch.equal(y, triton_gemv.sparse_linear(x, wt, b, skip_zeros=False, programs=8))


@pytest.mark.parametrize("shape", [(1, 1), (5, 300), (300, 5), (130, 129)])
@pytest.mark.parametrize("sparsity", [0.0, 0.6, 1.0])
def test_shapes_and_sparsities_batch1(shape, sparsity):
    fin, fout = shape
    w, wt, x, b = _problem(1, fin, fout, sparsity, torch.bfloat16, seed=fin)
    y = triton_gemv.sparse_linear(x, wt, b, programs=8)
    _check(y, x, w, b, torch.bfloat16)
    if sparsity == 1.0:
        assert torch.equal(y[0], b)  # nothing read: the bias, exactly


def test_split_k_and_single_program_agree():
    _, wt, x, b = _problem(2, 300, 140, 0.5, torch.float32, seed=3)
    many = triton_gemv.sparse_linear(x, wt, b, programs=64)
    one = triton_gemv.sparse_linear(x, wt, b, programs=1)
    assert triton_gemv.launch_config(2, 300, 140, 64)["split_k"] > 1
    assert triton_gemv.launch_config(2, 300, 140, 1)["split_k"] == 1
    torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-5)
    assert torch.equal(many, triton_gemv.sparse_linear(x, wt, b, programs=64))  # no atomics: reproducible


@pytest.mark.parametrize("tokens,fin,fout,programs", [(1, 4096, 14336, 528), (4, 14336, 4096, 528),
                                                     (8, 4096, 1024, 528), (3, 100, 7, 1)])
def test_launch_config_covers_every_input_once(tokens, fin, fout, programs):
    cfg = triton_gemv.launch_config(tokens, fin, fout, programs)
    k_tiles = -(-fin // cfg["BLOCK_K"])
    assert cfg["BATCH"] >= tokens and cfg["BATCH"] * cfg["BLOCK_K"] * triton_gemv.BLOCK_N <= triton_gemv.TILE_ELEMENTS
    assert cfg["split_k"] * cfg["tiles_per_program"] >= k_tiles > (cfg["split_k"] - 1) * cfg["tiles_per_program"]


def test_union_of_kept_columns():
    # each token keeps a disjoint set of inputs: every row still gets exactly its own product
    w, wt, _, b = _problem(1, 64, 96, 0.0, torch.float32, seed=4)
    x = torch.zeros(4, 64)
    for t in range(4):
        x[t, t::4] = torch.randn(16)
    y = triton_gemv.sparse_linear(x, wt, b, programs=4)
    _check(y, x, w, b, torch.float32)


def test_nan_input_propagates_like_dense():
    _, wt, x, b = _problem(1, 64, 32, 0.5, torch.float32, seed=5)
    x[0, 1] = float("nan")
    assert bool(triton_gemv.sparse_linear(x, wt, b).isnan().all())


def test_bad_input_raises_one_clear_error(monkeypatch):
    _, wt, x, b = _problem(1, 16, 8, 0.5, torch.float32)
    with pytest.raises(ValueError, match="1 to 8 tokens"):
        triton_gemv.sparse_linear(torch.randn(9, 16), wt, b)
    with pytest.raises(ValueError, match="one dtype"):
        triton_gemv.sparse_linear(x.half(), wt, b)
    with pytest.raises(ValueError, match="contiguous"):
        triton_gemv.sparse_linear(x, torch.randn(8, 16).t(), b)
    with pytest.raises(ValueError, match="features"):
        triton_gemv.sparse_linear(torch.randn(1, 15), wt, b)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        triton_gemv.sparse_linear(x, wt, b)


def test_cuda_registration_routes_to_triton_and_falls_back_to_dense():
    # the op's CUDA implementation, run on CPU tensors under the interpreter
    _, wt, x, b = _problem(3, 64, 96, 0.5, torch.bfloat16, seed=6)
    lead = x.reshape(3, 1, 64)  # [batch, seq, in] as a decoder hands it over
    y = ops._cuda(lead, wt, b, "ordered")
    assert y.shape == (3, 1, 96)
    assert torch.equal(y.reshape(3, 96), triton_gemv.sparse_linear(x, wt, b))
    assert torch.equal(ops._cuda(lead, wt, b, "ordered_dense"), y)  # reads every row, same bits
    many = torch.randn(2, 9, 64, dtype=torch.bfloat16)  # 18 tokens: prefill, dense
    assert torch.equal(ops._cuda(many, wt, b, "ordered"), F.linear(many, wt.t(), b))
    x64 = x.double()  # no float64 Triton path: dense
    assert torch.equal(ops._cuda(x64, wt.double(), b.double(), "ordered"), F.linear(x64, wt.double().t(), b.double()))
