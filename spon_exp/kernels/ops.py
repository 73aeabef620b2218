"""``spon_exp::sparse_linear``: the decode matvec as one torch op with a CPU and a CUDA backend.

``torch.ops.spon_exp.sparse_linear(x, weight_t, bias, mode)`` computes ``x @ weight_t + bias``
(``weight_t = W.T`` contiguous, ``[in, out]``) and skips the rows of ``weight_t`` whose
input is zero. Registered with :func:`torch.library.custom_op`, so ``torch.compile`` sees
one op (with a fake implementation for shapes) instead of an opaque ``ctypes`` or Triton
call, and CUDA graphs capture it like any other op.

- **CPU**: the C kernel of :mod:`spon_exp.kernels.sparse_matvec` (float32, one token;
  ``mode`` picks its split strategy, ``ordered`` / ``ordered_dense`` being the bit-identical
  pair); other dtypes and more than one token are dense ``F.linear``.
- **CUDA**: the Triton GEMV of :mod:`spon_exp.kernels.triton_gemv` (float16 / bfloat16 /
  float32, fp32 accumulation, 1 to 8 tokens over the union of their kept inputs; fixed
  summation order, so ``ordered_dense``, which reads every row, is its bit-identical
  masked-dense reference and the other modes skip). More than 8 tokens (prefill) or another
  dtype: dense ``F.linear``. triton is imported at the first CUDA call, so the library and
  the CPU op work without it.
- any other device: dense ``F.linear``.

:func:`sparse_linear` is the entry point the decode path calls: it checks shapes and mode
and computes densely when autograd needs a backward (the op has none).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from spon_exp.kernels import sparse_matvec as cpu_kernel

MODES = ("auto", "output", "split_k", "ordered", "ordered_dense")


def _dense(x: torch.Tensor, weight_t: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return F.linear(x, weight_t.t(), bias)


@torch.library.custom_op("spon_exp::sparse_linear", mutates_args=())
def sparse_linear_op(x: torch.Tensor, weight_t: torch.Tensor, bias: Optional[torch.Tensor], mode: str) -> torch.Tensor:
    """Devices without a sparse kernel: the dense product."""
    return _dense(x, weight_t, bias)


@sparse_linear_op.register_kernel("cpu")
def _cpu(x: torch.Tensor, weight_t: torch.Tensor, bias: Optional[torch.Tensor], mode: str) -> torch.Tensor:
    if x.numel() == weight_t.shape[0]:  # one token: the C kernel (dense fallback inside for other dtypes)
        return cpu_kernel.sparse_matvec(x, weight_t, bias, mode=mode)
    return _dense(x, weight_t, bias)


@sparse_linear_op.register_kernel("cuda")
def _cuda(x: torch.Tensor, weight_t: torch.Tensor, bias: Optional[torch.Tensor], mode: str) -> torch.Tensor:
    from spon_exp.kernels import triton_gemv

    in_features, out_features = weight_t.shape
    tokens = x.numel() // in_features if in_features else 0
    usable = (1 <= tokens <= triton_gemv.MAX_TOKENS and x.dtype in triton_gemv.SUPPORTED_DTYPES
              and weight_t.dtype == x.dtype and (bias is None or bias.dtype == x.dtype) and weight_t.is_contiguous())
    if not usable:
        return _dense(x, weight_t, bias)
    y = triton_gemv.sparse_linear(x.reshape(tokens, in_features), weight_t, bias, skip_zeros=mode != "ordered_dense")
    return y.reshape(*x.shape[:-1], out_features)


@sparse_linear_op.register_fake
def _fake(x: torch.Tensor, weight_t: torch.Tensor, bias: Optional[torch.Tensor], mode: str) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight_t.shape[1]))


def sparse_linear(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None = None,
                  mode: str = "auto") -> torch.Tensor:
    """Decode-time linear layer with a transposed weight: ``x @ weight_t + bias`` through the op.

    ``x`` has shape ``[..., in]``. The CPU backend skips zero inputs for exactly one token,
    the CUDA backend for up to 8; anything larger is the dense product (correct for any batch).
    """
    if weight_t.dim() != 2:
        raise ValueError(f"weight_t must be 2-D [in, out], got shape {tuple(weight_t.shape)}")
    if x.dim() == 0 or x.shape[-1] != weight_t.shape[0]:
        raise ValueError(f"x has shape {tuple(x.shape)}, weight_t expects {weight_t.shape[0]} input features")
    if bias is not None and bias.numel() != weight_t.shape[1]:
        raise ValueError(f"bias has {bias.numel()} entries, expected {weight_t.shape[1]}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight_t, bias)):
        return _dense(x, weight_t, bias)  # the op has no backward
    return sparse_linear_op(x, weight_t, bias, mode)
