"""The batch-1 sparse matvec kernel matches masked dense F.linear; other cases fall back."""

from __future__ import annotations

import importlib
import logging

import pytest
import torch
import torch.nn.functional as F

from spon_exp.kernels import cbuild
from spon_exp.kernels import choose_mode, kernel_available, kernel_info, sparse_linear, sparse_matvec

sm_mod = importlib.import_module("spon_exp.kernels.sparse_matvec")

RTOL = ATOL = 1e-4


def _problem(fin: int, fout: int, sparsity: float, seed: int = 0, bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(fout, fin, generator=g)
    x = torch.randn(fin, generator=g)
    k = round(sparsity * fin)
    if k:
        x[torch.randperm(fin, generator=g)[:k]] = 0.0
    b = torch.randn(fout, generator=g) if bias else None
    return w, w.t().contiguous(), x, b


@pytest.fixture
def fresh_kernel_state(monkeypatch, tmp_path):
    """Forget the loaded kernel for one test (its own cache dir), then restore it."""
    saved = (sm_mod._lib, sm_mod._load_attempted, dict(sm_mod._lib_info), set(sm_mod._warned))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("SPON_EXP_DISABLE_SPARSE_KERNEL", raising=False)

    def reset():
        sm_mod._lib, sm_mod._load_attempted = None, False
        sm_mod._lib_info = {}
        sm_mod._warned = set()

    reset()
    yield reset
    sm_mod._lib, sm_mod._load_attempted, sm_mod._lib_info, sm_mod._warned = saved


def test_kernel_builds():
    if not kernel_available():
        pytest.skip("no working C compiler: the dense fallback is tested below")
    info = kernel_info()
    assert info["path"].endswith(".so")


@pytest.mark.parametrize("shape", [(37, 53), (53, 37), (1, 1), (301, 997), (997, 301)])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_masked_dense(shape, sparsity, bias):
    fin, fout = shape
    w, wt, x, b = _problem(fin, fout, sparsity, bias=bias)
    ref = F.linear(x, w, b)
    for mode in ("auto", "output", "split_k"):
        y = sparse_matvec(x, wt, b, mode=mode)
        assert y.shape == (fout,)
        torch.testing.assert_close(y, ref, rtol=RTOL, atol=ATOL)
    # [1, in] input keeps its leading dim
    y2 = sparse_matvec(x[None], wt, b)
    assert y2.shape == (1, fout)
    torch.testing.assert_close(y2[0], ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("mode", ["output", "split_k"])
@pytest.mark.parametrize("num_threads", [1, 2, 3, 5])
def test_thread_counts(mode, num_threads):
    # more threads requested than the pool has: work must still all be done
    w, wt, x, b = _problem(513, 1031, 0.5, seed=1)
    y = sparse_matvec(x, wt, b, mode=mode, num_threads=num_threads)
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("shape", [(37, 53), (301, 997), (997, 301), (64, 4096)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("num_threads", [1, 2, 3])
def test_ordered_mode_is_bit_identical_to_ordered_dense(shape, sparsity, num_threads):
    # skipping the zero inputs changes nothing at all in the ordered kernel, whatever the threads
    fin, fout = shape
    w, wt, x, b = _problem(fin, fout, sparsity, seed=2)
    x[x != 0] *= torch.logspace(-3, 3, int((x != 0).sum()))  # wide dynamic range: rounding matters
    sparse = sparse_matvec(x, wt, b, mode="ordered", num_threads=num_threads)
    dense = sparse_matvec(x, wt, b, mode="ordered_dense", num_threads=1)
    assert torch.equal(sparse, dense)
    torch.testing.assert_close(sparse, F.linear(x, w, b), rtol=RTOL, atol=1e-3 * float(x.abs().max()))


def test_unknown_mode_raises():
    _, wt, x, b = _problem(8, 8, 0.5)
    if not kernel_available():
        pytest.skip("no kernel: modes are only read by the compiled path")
    with pytest.raises(ValueError, match="ordered_dense"):
        sparse_matvec(x, wt, b, mode="fastest")


def test_full_sparsity_is_bias_exactly():
    _, wt, x, b = _problem(300, 700, 1.0)
    assert torch.equal(sparse_matvec(x, wt, b), b)
    assert torch.equal(sparse_matvec(x, wt), torch.zeros(700))


def test_masked_input_like_teal():
    # threshold mask as TEAL applies it: zeros are exact, the kept values untouched
    w, wt, x, b = _problem(600, 400, 0.0, seed=2)
    tau = x.abs().quantile(0.6)
    xm = x * (x.abs() > tau)
    torch.testing.assert_close(sparse_matvec(xm, wt, b), F.linear(xm, w, b), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("lead", [(1,), (1, 1), ()])
def test_sparse_linear_single_token(lead):
    w, wt, x, b = _problem(64, 96, 0.5, seed=3)
    xs = x.reshape(*lead, 64)
    y = sparse_linear(xs, wt, b)
    assert y.shape == (*lead, 96)
    torch.testing.assert_close(y, F.linear(xs, w, b), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("lead", [(4,), (2, 3), (1, 5), (3, 1)])
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_batches_fall_back_to_dense_exactly(lead, bias):
    w, wt, _, b = _problem(37, 53, 0.0, seed=4, bias=bias)
    x = torch.randn(*lead, 37)
    x[x.abs() < 0.7] = 0.0
    y = sparse_linear(x, wt, b)
    assert torch.equal(y, F.linear(x, wt.t(), b))
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes_fall_back(dtype):
    w, wt, x, b = _problem(37, 53, 0.5, seed=5)
    w, wt, x, b = (t.to(dtype) for t in (w, wt, x, b))
    assert torch.equal(sparse_matvec(x, wt, b), F.linear(x, wt.t(), b))


def test_noncontiguous_weight_and_grad_fall_back():
    w, wt, x, b = _problem(37, 53, 0.5, seed=6)
    torch.testing.assert_close(sparse_matvec(x, w.t(), b), F.linear(x, w, b))
    wg = w.clone().requires_grad_(True)
    y = sparse_matvec(x, wg.t(), b)
    y.sum().backward()
    assert wg.grad is not None


def test_bad_shapes_raise():
    _, wt, x, b = _problem(37, 53, 0.5)
    with pytest.raises(ValueError):
        sparse_matvec(torch.randn(2, 37), wt)
    with pytest.raises(ValueError):
        sparse_matvec(x, wt, torch.randn(52))
    with pytest.raises(ValueError):
        sparse_linear(torch.randn(3, 36), wt)
    with pytest.raises(ValueError):
        sparse_matvec(x, wt, mode="diagonal")


def test_choose_mode_heuristic():
    assert choose_mode(4096, 14336, 2) == "split_k"
    assert choose_mode(14336, 4096, 2) == "split_k"
    assert choose_mode(4096, 1024, 2) == "split_k"
    assert choose_mode(4096, 1024, 1) == "output"  # one thread: the modes are the same loop
    assert choose_mode(1024, 131072, 2) == "output"


def test_build_failure_falls_back_with_warning(fresh_kernel_state, monkeypatch, caplog):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setattr(cbuild.shutil, "which", lambda name: None)
    w, wt, x, b = _problem(37, 53, 0.5)
    with caplog.at_level(logging.WARNING, logger=sm_mod.__name__):
        y = sparse_matvec(x, wt, b)
        sparse_matvec(x, wt, b)
    assert not kernel_available()
    assert torch.equal(y, F.linear(x, wt.t(), b))
    msgs = [r.getMessage() for r in caplog.records if "falling back to dense" in r.getMessage()]
    assert len(msgs) == 1


def test_compiled_library_is_cached(fresh_kernel_state):
    if cbuild.compiler() is None:
        pytest.skip("no C compiler")
    assert kernel_available()
    assert kernel_info()["built"] is True
    fresh_kernel_state()  # forget the loaded library, keep the cache dir
    assert kernel_available()
    assert kernel_info()["built"] is False
    w, wt, x, b = _problem(37, 53, 0.5)
    torch.testing.assert_close(sparse_matvec(x, wt, b), F.linear(x, w, b), rtol=RTOL, atol=ATOL)


def test_autotune_pins_a_mode(monkeypatch):
    monkeypatch.setattr(sm_mod, "_mode_overrides", {})
    best = sm_mod.autotune(301, 997, 0.5, num_threads=2, repeats=2)
    assert best in ("output", "split_k")
    assert choose_mode(301, 997, 2) == best
    w, wt, x, b = _problem(301, 997, 0.5)
    torch.testing.assert_close(sparse_matvec(x, wt, b, num_threads=2), F.linear(x, w, b),
                               rtol=RTOL, atol=ATOL)
