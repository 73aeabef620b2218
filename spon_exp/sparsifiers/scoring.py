"""Scoring and masking helpers shared by several methods (WINA, R-Sparse, LaRoSA)."""

from __future__ import annotations

import logging

import torch

from spon_exp.models.adapters import Projection

log = logging.getLogger(__name__)

TIES = ("break", "keep")


def kth_largest(score: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep``-th largest score of each row (shape ``[..., 1]``), by the device's fastest
    selection: ``kthvalue`` (a quickselect) on the CPU, ``topk(sorted=False)`` elsewhere."""
    if score.device.type == "cpu":
        return score.kthvalue(score.shape[-1] - keep + 1, dim=-1, keepdim=True).values
    return score.topk(keep, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)


def topk_mask(score: torch.Tensor, keep: int, ties: str = "break") -> torch.Tensor:
    """Boolean mask of the ``keep`` highest scores along the last dimension.

    ``ties="break"``: exactly ``keep`` per row (WINA's reference, ``topk`` + ``scatter``);
    where scores tie at the cut, the tied entries of lowest index are kept (``torch.topk``
    picks in no documented order; this rule is the CPU and GPU kernels' too, so every path
    gives the same mask). ``ties="keep"``: every score equal to the ``keep``-th largest is
    kept too (LaRoSA's reference, ``|x| >= kthvalue``), so a row may keep more.

    Both compare against the row's ``keep``-th largest score (one selection, no sort and no
    index scatter: less work than ``topk`` + ``scatter``); with ``break`` only the
    rows where a tie made the mask too wide are redone.
    """
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    width = score.shape[-1]
    if keep >= width:
        return torch.ones_like(score, dtype=torch.bool)
    if keep <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    cut = kth_largest(score, keep)
    mask = score >= cut
    if ties == "break":
        rows = mask.reshape(-1, width)
        wide = (rows.sum(dim=-1) > keep).nonzero().squeeze(-1)
        if wide.numel():
            wide_scores, wide_cut = score.reshape(-1, width)[wide], cut.reshape(-1, 1)[wide]
            above, tied = wide_scores > wide_cut, wide_scores == wide_cut
            room = keep - above.sum(dim=-1, keepdim=True)
            rows[wide] = above | (tied & (tied.cumsum(dim=-1) <= room))
    return mask


def magnitude_topk_mask(x: torch.Tensor, keep: int, ties: str = "break",
                        column_scale: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`topk_mask` of the score ``|x_i|·c_i`` (``c`` = ``column_scale`` or 1), in float32.

    On the CPU in float32 one fused kernel (:mod:`spon_exp.kernels.select`) scores, selects and
    masks each row in cache; elsewhere torch computes the score tensor and selects. With
    ``ties="break"`` the kernel takes the tied entries of lowest index, torch its own pick."""
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    from spon_exp.kernels.select import topk_mask_cpu

    mask = topk_mask_cpu(x, keep, ties, column_scale)
    if mask is not None:
        return mask
    score = x.detach().abs() if x.dtype == torch.float64 else x.detach().float().abs()  # float64 stays
    if column_scale is not None:
        score = score * column_scale.to(score.device)
    return topk_mask(score, keep, ties)


def topk_sparsify(x: torch.Tensor, keep: int, ties: str = "break", column_scale: torch.Tensor | None = None,
                  measure: bool = False) -> tuple[torch.Tensor, torch.Tensor | int | None]:
    """``x`` with all but its ``keep`` highest-scoring entries per row zeroed (score
    ``|x_i|·c_i``), and the number of zeroed entries if ``measure``. Without autograd one
    kernel pass writes the result (no mask tensor, no product): the C kernel on the CPU, the
    Triton kernel on a GPU where it is the faster (:func:`_gpu_topk_sparsify`); otherwise
    ``x * mask`` (:func:`magnitude_topk_mask`). Every path gives the same mask."""
    from spon_exp.kernels.select import topk_sparsify_cpu

    fused = topk_sparsify_cpu(x, keep, ties, column_scale)
    if (fused is None and x.device.type == "cuda" and not (x.requires_grad and torch.is_grad_enabled())
            and not torch.compiler.is_compiling()):  # a compiled graph traces torch's ops
        fused = _gpu_topk_sparsify(x, keep, ties, column_scale)
    if fused is not None:
        out, kept = fused
        return out, (x.numel() - kept if measure else None)
    mask = magnitude_topk_mask(x, keep, ties, column_scale)
    return x * mask.to(x.dtype), ((~mask).sum() if measure else None)


#: per (device, width, dtype, scaled): "triton" or "torch", whichever was faster on first use
_GPU_CHOICE: dict[tuple, str] = {}


def _torch_topk_sparsify(x: torch.Tensor, keep: int, ties: str, column_scale: torch.Tensor | None) -> torch.Tensor:
    return x * magnitude_topk_mask(x, keep, ties, column_scale).to(x.dtype)


def _gpu_topk_sparsify(x: torch.Tensor, keep: int, ties: str,
                       column_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The Triton kernel's ``(output, entries kept)`` on a CUDA tensor, or ``None`` to use
    torch: on the first call of a (device, width, dtype) both are timed on the input and the
    faster is kept (their masks are equal, so the choice changes the speed only); a kernel
    that fails to build leaves torch in place, with one warning."""
    key = (x.device, x.shape[-1], x.dtype, column_scale is not None)
    if _GPU_CHOICE.get(key) == "torch":
        return None
    try:
        from spon_exp.kernels import triton_select
    except ImportError:
        _GPU_CHOICE[key] = "torch"
        return None
    scale = column_scale.to(device=x.device, dtype=torch.float32) if column_scale is not None else None
    if not triton_select.applies(x, keep, scale):
        return None
    try:
        if key not in _GPU_CHOICE:
            _GPU_CHOICE[key] = _faster_on_gpu(
                {"triton": lambda: triton_select.topk_sparsify(x, keep, ties, scale),
                 "torch": lambda: _torch_topk_sparsify(x, keep, ties, column_scale)})
            log.info("top-k on %s (width %d, %s): %s is the faster", x.device, x.shape[-1], x.dtype, _GPU_CHOICE[key])
            if _GPU_CHOICE[key] == "torch":
                return None
        out, kept = triton_select.topk_sparsify(x, keep, ties, scale)
    except Exception as e:  # noqa: BLE001 - a kernel that does not build: torch selects
        log.warning("Triton top-k unavailable on %s, using torch: %s", x.device, e)
        _GPU_CHOICE[key] = "torch"
        return None
    return out, kept.sum()


def _faster_on_gpu(candidates: dict, repeats: int = 3) -> str:
    """The name of the fastest callable (after one warm-up call each; CUDA-synchronised)."""
    import time

    best = {}
    for name, fn in candidates.items():
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
        best[name] = time.perf_counter() - t0
    return min(best, key=best.get)


def keep_count(width: int, sparsity: float) -> int:
    """Channels kept per token by top-k at ``sparsity`` (the reference's ``int(in·(1−s))``)."""
    return max(0, min(width, int(width * (1.0 - sparsity))))


class ColumnNorms:
    """``‖W[:, i]‖₂`` of each projection's weight, computed once (float32, weight's device)."""

    def __init__(self):
        self._norms: dict[str, torch.Tensor] = {}

    def __call__(self, proj: Projection) -> torch.Tensor:
        norm = self._norms.get(proj.key)
        if norm is None:
            norm = proj.module.weight.detach().float().norm(dim=0)
            self._norms[proj.key] = norm
        return norm

    def clear(self) -> None:
        self._norms.clear()
