"""``spon_exp::sparse_linear``: the decode matvec as one torch op with a CPU and a CUDA backend.

``torch.ops.spon_exp.sparse_linear(x, weight_t, bias, mode)`` computes ``x @ weight_t + bias``
(``weight_t = W.T`` contiguous, ``[in, out]``) and skips the rows of ``weight_t`` whose
input is zero. Registered through :mod:`torch.library` (schema, a CPU and a CUDA kernel, a
fake implementation for shapes), so ``torch.compile`` sees one op instead of an opaque
``ctypes`` or Triton call, and CUDA graphs capture it like any other op.

- **CPU**: the C kernel of :mod:`spon_exp.kernels.sparse_matvec` (float32, one token;
  ``mode`` picks its split strategy, ``ordered`` / ``ordered_dense`` being the bit-identical
  pair); other dtypes and more than one token are dense ``F.linear``.
- **CUDA**: the Triton GEMV of :mod:`spon_exp.kernels.triton_gemv` (float16 / bfloat16 /
  float32, fp32 accumulation, 1 to 8 tokens over the union of their kept inputs; fixed
  summation order, so ``ordered_dense``, which reads every row, is its bit-identical
  masked-dense reference and the other modes skip). More than 8 tokens (prefill) or another
  dtype: dense ``F.linear``. triton is imported at the first CUDA call, so the library and
  the CPU op work without it.
- any other device: dense ``F.linear`` (in :func:`sparse_linear`, before the op).

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


# torch.library's low-level registration rather than torch.library.custom_op, whose Python
# autograd layer and checks make every call several times dearer: a decode step makes one
# call per projection, about 200 on small models. Inference only: no autograd kernel
# (sparse_linear below computes densely whenever a gradient is needed).
_library = torch.library.Library("spon_exp", "FRAGMENT")
_library.define("sparse_linear(Tensor x, Tensor weight_t, Tensor? bias, str mode) -> Tensor")


def _cpu(x: torch.Tensor, weight_t: torch.Tensor, bias: Optional[torch.Tensor], mode: str) -> torch.Tensor:
    if x.numel() == weight_t.shape[0]:  # one token: the C kernel (dense fallback inside for other dtypes)
        return cpu_kernel.sparse_matvec(x, weight_t, bias, mode=mode)
    return _dense(x, weight_t, bias)


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


_library.impl("sparse_linear", _cpu, "CPU")
_library.impl("sparse_linear", _cuda, "CUDA")


@torch.library.register_fake("spon_exp::sparse_linear")
def _fake(x: torch.Tensor, weight_t: torch.Tensor, bias: Optional[torch.Tensor], mode: str) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight_t.shape[1]))


sparse_linear_op = torch.ops.spon_exp.sparse_linear.default


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
    if x.device.type not in ("cpu", "cuda") or (
            torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight_t, bias))):
        return _dense(x, weight_t, bias)  # no kernel on this device, or a backward is needed
    return sparse_linear_op(x, weight_t, bias, mode)
