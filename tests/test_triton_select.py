"""The Triton top-k (the GPU path of WINA's and LaRoSA's masks) in the Triton interpreter on CPU
tensors: its masks equal torch's and the CPU kernel's for both tie rules, in every supported
dtype, and the GPU dispatch in spon_exp.sparsifiers.scoring keeps whichever path is faster and
falls back to torch when the kernel fails. Skipped where triton is not installed."""

from __future__ import annotations

import logging

import pytest
import torch

from tests.triton_interpreter import interpreted_triton_or_skip

interpreted_triton_or_skip()

from spon_exp.kernels import select, triton_select  # noqa: E402
from spon_exp.sparsifiers import scoring  # noqa: E402
from spon_exp.sparsifiers.scoring import topk_mask  # noqa: E402


def awkward(rows: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=g) * torch.logspace(-2, 2, rows).unsqueeze(-1)
    x[0, :4] = 1.5  # ties around the cut
    x[1 % rows] = x[1 % rows].round()  # many ties
    x[2 % rows] = 0.0  # all tied at zero
    # adjacent floats (one unit in the last place apart), shuffled: every bit of the cut matters
    x[3 % rows] = (torch.tensor(0x3F800000, dtype=torch.int32) - torch.randperm(width, generator=g).int()).view(torch.float32)
    return x


@pytest.mark.parametrize("width,keep,rows", [(96, 40, 7), (7, 1, 3), (7, 6, 3), (576, 288, 5), (1000, 999, 2),
                                             (33, 16, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_topk_equals_torch(width, keep, rows, dtype):
    x = awkward(rows, width, seed=width).to(dtype)
    scale = torch.rand(width, generator=torch.Generator().manual_seed(1)) + 0.5
    for c in (None, scale):
        score = x.float().abs() * (c if c is not None else 1.0)
        for ties in ("keep", "break"):
            mask = topk_mask(score, keep, ties)
            out, kept = triton_select.topk_sparsify(x, keep, ties, c)
            assert out.dtype == dtype and out.shape == x.shape
            assert torch.equal(out, x * mask.to(dtype)), (ties, c is not None)
            assert torch.equal(kept, mask.sum(-1).int())
            if dtype == torch.float32 and select.available():  # the CPU kernel: the same masks
                assert torch.equal(select.topk_mask_cpu(x, keep, ties, c), mask)


def test_triton_topk_takes_batched_strided_input():
    x = awkward(12, 80, seed=3).reshape(3, 4, 80)
    view = torch.cat([x, x], dim=-1)[..., :80]  # rows strided by 160
    out, kept = triton_select.topk_sparsify(view, 30, "break")
    assert out.shape == (3, 4, 80) and torch.equal(out, x * topk_mask(x.abs(), 30, "break"))
    assert (kept == 30).all()
    assert not triton_select.applies(x, 0, None) and not triton_select.applies(x, 80, None)
    assert not triton_select.applies(x.double(), 30, None)


def test_gpu_dispatch_keeps_the_faster_path_and_falls_back(monkeypatch, caplog):
    x = awkward(6, 50, seed=5)
    expected = x * topk_mask(x.abs(), 20, "break")
    monkeypatch.setattr(scoring, "_GPU_CHOICE", {})
    picks = []
    monkeypatch.setattr(scoring, "_faster_on_gpu", lambda c: (picks.append(sorted(c)), "triton")[1])
    out, kept = scoring._gpu_topk_sparsify(x, 20, "break", None)
    assert torch.equal(out, expected) and int(kept) == 6 * 20
    scoring._gpu_topk_sparsify(x, 20, "break", None)
    assert picks == [["torch", "triton"]]  # timed once per (device, width, dtype, scaled)
    monkeypatch.setattr(scoring, "_GPU_CHOICE", {})
    monkeypatch.setattr(scoring, "_faster_on_gpu", lambda c: "torch")
    assert scoring._gpu_topk_sparsify(x, 20, "break", None) is None  # torch was faster: the caller selects
    monkeypatch.setattr(scoring, "_GPU_CHOICE", {})
    monkeypatch.setattr(scoring, "_faster_on_gpu", lambda c: "triton")

    def broken(*args, **kwargs):
        raise RuntimeError("no PTX for this GPU")

    monkeypatch.setattr(triton_select, "topk_sparsify", broken)
    with caplog.at_level(logging.WARNING, logger="spon_exp.sparsifiers.scoring"):
        assert scoring._gpu_topk_sparsify(x, 20, "break", None) is None
    assert "Triton top-k unavailable" in caplog.text and set(scoring._GPU_CHOICE.values()) == {"torch"}
