"""The spon_exp::sparse_linear op: its registrations pass torch's op checks, the CPU backend is
the C kernel, and the library (CPU op included) works without triton installed."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from spon_exp.kernels import ops, sparse_matvec


def _problem(lead, fin=48, fout=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, fin, generator=g)
    x[x.abs() < 0.6] = 0.0
    return x, torch.randn(fin, fout, generator=g), torch.randn(fout, generator=g)


@pytest.mark.parametrize("lead", [(1,), (1, 1), (3, 2)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck(lead, with_bias):
    x, wt, b = _problem(lead)
    torch.library.opcheck(torch.ops.spon_exp.sparse_linear.default, (x, wt, b if with_bias else None, "ordered"))


def test_cpu_backend_is_the_c_kernel_for_one_token_and_dense_otherwise():
    x, wt, b = _problem((1, 1))
    for mode in ("ordered", "auto"):
        assert torch.equal(ops.sparse_linear(x, wt, b, mode), sparse_matvec(x, wt, b, mode=mode))
    xs, _, _ = _problem((2, 3))
    assert torch.equal(ops.sparse_linear(xs, wt, b, "ordered"), F.linear(xs, wt.t(), b))


def test_grad_is_computed_densely():
    x, wt, b = _problem((1,))
    wt.requires_grad_(True)
    ops.sparse_linear(x, wt, b).sum().backward()
    torch.testing.assert_close(wt.grad, x.reshape(-1, 1).expand_as(wt))


def test_bad_arguments_raise_one_clear_error():
    x, wt, b = _problem((1,))
    with pytest.raises(ValueError, match="mode must be one of"):
        ops.sparse_linear(x, wt, b, "fastest")
    with pytest.raises(ValueError, match="input features"):
        ops.sparse_linear(torch.randn(1, 47), wt, b)
    with pytest.raises(ValueError, match="bias has"):
        ops.sparse_linear(x, wt, torch.randn(39))
    with pytest.raises(ValueError, match="2-D"):
        ops.sparse_linear(x, wt[None])


def test_library_and_cpu_op_work_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # `import triton` now raises ImportError
        "import torch\n"
        "from spon_exp.kernels.decode import enable_sparse_decode\n"
        "from spon_exp.kernels import sparse_linear\n"
        "x = torch.zeros(1, 8); x[0, 3] = 1.0\n"
        "y = sparse_linear(x, torch.eye(8), None, 'ordered')\n"
        "assert torch.equal(y, x), y\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
