"""Per-row top-k masks on the CPU in one pass: score, select, compare.

WINA's and LaRoSA's masks keep, per token, the ``keep`` entries of highest score
``|x_i|·c_i`` (``c`` a per-column scale, e.g. WINA's column norms, or none). In PyTorch that
is a score tensor, a ``kthvalue`` (which copies its input), a comparison and, for exact-k
ties, a count: each a pass over the activations in memory. This kernel (``select.c`` beside
this module) does it all per row in cache: the scores into a scratch row (and their largest);
the ``keep``-th largest by a histogram of keys -- how many 1/16 octaves each score lies below
the row's largest, read off the float's bits -- to find the bin that holds it, then the k-th
largest of that bin's few scores; then the output (and mask) written and counted in one pass
without branches (whether an entry is kept is a coin toss the branch predictor cannot
learn). Rows are split between OpenMP threads.

The scores are computed as ``fabsf(x) * c`` in float32, the same single rounding as
``x.float().abs() * c`` in torch, so the masks equal torch's. Ties at the cut: ``keep``
keeps every entry equal to the ``keep``-th largest; ``break`` keeps exactly ``keep``,
taking the tied entries of lowest index (as :func:`~spon_exp.sparsifiers.scoring.topk_mask`
and the GPU kernel, :mod:`spon_exp.kernels.triton_select`, do).

Built with ``-mavx2`` where the CPU has AVX2 (:func:`~spon_exp.kernels.cbuild.avx2_flags`:
the keys and the compares run eight to a register). Its FMA rule is *none*
(``-ffp-contract=off``, never ``-mfma``: nothing rounds differently from torch), stated at the
top of ``select.c`` and in :mod:`~spon_exp.kernels.cbuild`. Float32 inputs only; anything else
(and a machine without a C compiler, or ``SPON_EXP_DISABLE_SPARSE_KERNEL=1``) returns ``None``
and the caller uses torch.

``threshold_split_cpu`` is the threshold counterpart for R-Sparse: one pass writes the kept
part ``x·[|x|·c > τ]`` and the rest ``x − kept`` (the low-rank path's input), where torch
makes five temporaries.
"""

from __future__ import annotations

import ctypes
import logging
import threading

import torch

from spon_exp.kernels import cbuild

log = logging.getLogger(__name__)

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the kernels' signatures on a loaded build of ``select.c``."""
    fn = lib.spon_topk_mask_f32
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.spon_threshold_split_f32.restype = None
    lib.spon_threshold_split_f32.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                             ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    return lib


def _load() -> ctypes.CDLL | None:
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            try:
                _lib = bind(cbuild.build(cbuild.TOPK_SELECT)[0])
            except Exception as e:  # noqa: BLE001 - torch does the selection instead
                log.warning("top-k selection kernel unavailable, using torch: %s", e)
                _lib = None
            _tried = True
    return _lib


def available() -> bool:
    return _load() is not None


def _kernel_for(x: torch.Tensor, scale: torch.Tensor | None, writes_product: bool) -> ctypes.CDLL | None:
    """The loaded kernels if they apply to ``x`` (a float32 CPU tensor, ``scale`` none or the
    same), else ``None``; a kernel that writes the masked product does not apply where
    autograd needs that product (torch computes it then, carrying the gradient)."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return None
    if scale is not None and (scale.dtype != torch.float32 or scale.device.type != "cpu"):
        return None
    if writes_product and x.requires_grad and torch.is_grad_enabled():
        return None
    return _load()


def _call(x: torch.Tensor, keep: int, ties: str, scale: torch.Tensor | None, mask: torch.Tensor | None,
          out: torch.Tensor | None) -> int:
    lib = _load()
    rows = x.detach().reshape(-1, x.shape[-1]).contiguous()
    scale = scale.contiguous() if scale is not None else None
    kept = ctypes.c_int64(0)
    if lib.spon_topk_mask_f32(rows.data_ptr(), scale.data_ptr() if scale is not None else None, rows.shape[0],
                              rows.shape[1], keep, 0 if ties == "keep" else 1,
                              mask.data_ptr() if mask is not None else None,
                              out.data_ptr() if out is not None else None, ctypes.byref(kept)):
        raise MemoryError("top-k selection kernel could not allocate its scratch rows")
    return kept.value


def topk_mask_cpu(x: torch.Tensor, keep: int, ties: str, scale: torch.Tensor | None = None) -> torch.Tensor | None:
    """Boolean mask of the ``keep`` largest ``|x|·scale`` per row (last dimension), or ``None``
    when the kernel does not apply (not a float32 CPU tensor, ``keep`` outside ``(0, width)``,
    no kernel)."""
    if not 0 < keep < x.shape[-1] or _kernel_for(x, scale, writes_product=False) is None:
        return None
    mask = torch.empty(x.shape, dtype=torch.bool)
    _call(x, keep, ties, scale, mask, None)
    return mask


def topk_sparsify_cpu(x: torch.Tensor, keep: int, ties: str,
                      scale: torch.Tensor | None = None) -> tuple[torch.Tensor, int] | None:
    """``(x with all but the kept entries zeroed, number kept)`` in one pass, without a mask
    tensor; ``None`` where the kernel does not apply or autograd needs the product (then
    ``x * mask`` in torch carries the gradient)."""
    if not 0 < keep < x.shape[-1] or _kernel_for(x, scale, writes_product=True) is None:
        return None
    out = torch.empty(x.shape, dtype=x.dtype)
    return out, _call(x, keep, ties, scale, None, out)


def threshold_split_cpu(x: torch.Tensor, tau: float, scale: torch.Tensor | None = None,
                        rest: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, int] | None:
    """``(kept, rest, number kept)`` with ``kept = x·[|x|·scale > tau]`` and ``rest = x − kept``
    in one pass; ``None`` where it does not apply (as :func:`topk_sparsify_cpu`). The score is
    ``fabsf(x)·scale`` in float32 and compared with ``tau`` as a float32, as torch compares a
    float32 score tensor with a Python float."""
    lib = _kernel_for(x, scale, writes_product=True)
    if lib is None:
        return None
    rows = x.detach().reshape(-1, x.shape[-1]).contiguous()
    kept_out = torch.empty(x.shape, dtype=x.dtype)
    rest_out = torch.empty(x.shape, dtype=x.dtype) if rest else None
    count = ctypes.c_int64(0)
    scale = scale.contiguous() if scale is not None else None
    lib.spon_threshold_split_f32(rows.data_ptr(), scale.data_ptr() if scale is not None else None, rows.shape[0],
                                 rows.shape[1], tau, kept_out.data_ptr(),
                                 rest_out.data_ptr() if rest_out is not None else None, ctypes.byref(count))
    return kept_out, rest_out, count.value
