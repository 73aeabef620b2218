"""On CUDA: the compiled Triton GEMV behind spon_exp::sparse_linear equals the masked-dense
product, skipping changes no bit, it captures into a CUDA graph, and sparse decoding works for
every threshold method. Skipped without a GPU (the interpreter tests run everywhere)."""

import pytest
import torch
import torch.nn.functional as F

from spon_exp.kernels import sparse_linear
from spon_exp.kernels.decode import disable_sparse_decode, enable_sparse_decode
from spon_exp.models.loading import load_model
from spon_exp.sparsifiers import build_sparsifier
from tests.helpers import random_ids

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _problem(tokens, fin, fout, sparsity, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, fin, generator=g)
    for row in x:
        row[torch.randperm(fin, generator=g)[: round(sparsity * fin)]] = 0.0
    w = torch.randn(fout, fin, generator=g) / fin ** 0.5
    b = torch.randn(fout, generator=g)
    return (t.to("cuda", dtype) for t in (x, w, b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 2, 4, 8])
@pytest.mark.parametrize("shape", [(4096, 1024), (1024, 4096), (333, 517)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_triton_gemv_matches_masked_dense(dtype, tokens, shape, sparsity):
    from spon_exp.kernels import triton_gemv

    x, w, b = _problem(tokens, *shape, sparsity, dtype)
    wt = w.t().contiguous()
    y = sparse_linear(x, wt, b, "ordered")
    assert torch.equal(y, triton_gemv.sparse_linear(x, wt, b))  # the op's CUDA backend is the Triton GEMV
    assert torch.equal(y, sparse_linear(x, wt, b, "ordered_dense"))  # skipping rows changes no bit
    ref = F.linear(x.double(), w.double(), b.double())
    ulp = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10
    assert bool(((y.double() - ref).abs() <= ulp * ref.abs() + 1e-4).all())


def test_op_captures_into_a_cuda_graph():
    x, w, b = _problem(1, 4096, 4096, 0.5, torch.bfloat16)
    wt = w.t().contiguous()
    expected = sparse_linear(x, wt, b)
    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        sparse_linear(static_x, wt, b)  # warm-up (jit) outside the capture
        with torch.cuda.graph(graph, stream=stream):
            out = sparse_linear(static_x, wt, b)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expected)


@pytest.mark.parametrize("name,options", [("teal", {}), ("rsparse", {}), ("wina", {"mode": "threshold"})])
def test_every_threshold_method_decodes_on_cuda(name, options):
    lm = load_model("tiny-random:llama", dtype="bfloat16", device="cuda")
    model = lm.model
    sp = build_sparsifier(name, sparsity=0.5, **options).attach(model)
    sp.calibrate(model, random_ids(8, 64).cuda().split(4))
    prompt = random_ids(1, 6, seed=3).cuda()
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        masked = model.generate(prompt, **kwargs)
        runs = {}
        for mode in ("ordered", "ordered_dense"):
            enable_sparse_decode(sp, mode=mode)
            runs[mode] = model.generate(prompt, **kwargs)
        batch = random_ids(4, 6, seed=4).cuda()  # 4 sequences: the union-of-kept-inputs path
        batched = model.generate(batch, **kwargs)
        enable_sparse_decode(sp, mode="ordered")
        batched_again = model.generate(batch, **kwargs)
    disable_sparse_decode(sp)
    # the Triton GEMV sums in one fixed order: skipping or reading every row, the same bits
    assert torch.equal(runs["ordered"].sequences, runs["ordered_dense"].sequences)
    assert all(torch.equal(a, b) for a, b in zip(runs["ordered"].logits, runs["ordered_dense"].logits))
    assert torch.equal(batched.sequences, batched_again.sequences)
    # against cuBLAS's masked-dense product (another order), bf16 rounding only: first step's logits
    first, reference = runs["ordered"].logits[0].float(), masked.logits[0].float()
    assert (first - reference).abs().max() <= 0.05 * reference.abs().max()
