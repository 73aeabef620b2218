"""Per-row top-k masks on the GPU in one Triton kernel: score, select, write.

The CUDA counterpart of :mod:`spon_exp.kernels.select`. PyTorch's way (``topk`` of the score
tensor, its smallest value, a comparison, a product) reads and writes the activations several
times and sorts what it selects. Here a program owns ``ROWS`` rows, holds each row's scores
``|x_i|·c_i`` in registers and finds the ``keep``-th largest exactly by building its bit
pattern one bit at a time: for a non-negative float the bit pattern, read as an integer,
orders like the value, so the largest ``t`` with ``count(bits >= t) >= keep`` (31 counting
passes over registers, from the highest bit down) *is* the ``keep``-th largest score. Then it
writes ``x`` where the score is at least that (``ties="keep"``) or, with ``ties="break"``,
exactly ``keep`` entries, taking the tied ones of lowest index (a cumulative count of the
ties) -- the same masks as the CPU kernel and as :func:`~spon_exp.sparsifiers.scoring.topk_mask`.

Scores are ``|x|`` in float32 times the float32 scale, as torch computes them; NaN scores
order above everything (as in ``torch.topk``). Under ``TRITON_INTERPRET=1`` the kernel runs on
CPU tensors (how the test suite checks it without a GPU).

triton is imported at the top; :mod:`spon_exp.sparsifiers.scoring` imports this module only
for CUDA tensors, so the library runs without triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton import knobs

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Scores a program holds (rows x padded width); more rows per program for narrow rows.
TILE_ELEMENTS = 16384
MAX_WIDTH = 1 << 16


def _topk_rows(x_ptr, scale_ptr, out_ptr, kept_ptr, rows, width, stride_x, keep,
               HAS_SCALE: tl.constexpr, BREAK_TIES: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs_r = pid * ROWS + tl.arange(0, ROWS)
    offs_c = tl.arange(0, BLOCK)
    r_ok = offs_r < rows
    c_ok = offs_c < width
    ok = r_ok[:, None] & c_ok[None, :]
    ptrs = offs_r[:, None].to(tl.int64) * stride_x + offs_c[None, :]
    x = tl.load(x_ptr + ptrs, mask=ok, other=0.0)
    score = tl.abs(x.to(tl.float32))
    if HAS_SCALE:
        score = score * tl.load(scale_ptr + offs_c, mask=c_ok, other=0.0)[None, :]
    bits = score.to(tl.int32, bitcast=True)  # sign bit 0: integer order = float order
    bits = tl.where(ok, bits, -1)  # padding below every score
    # the keep-th largest bit pattern, highest bit first (bit 31 is the sign: always 0)
    cut = tl.zeros((ROWS,), dtype=tl.int32)
    for i in range(31):
        trial = cut | (1 << (30 - i))
        count = tl.sum((bits >= trial[:, None]).to(tl.int32), axis=1)
        cut = tl.where(count >= keep, trial, cut)
    on = bits >= cut[:, None]
    if BREAK_TIES:
        above = bits > cut[:, None]
        tied = on & ~above
        room = keep - tl.sum(above.to(tl.int32), axis=1)
        on = above | (tied & (tl.cumsum(tied.to(tl.int32), axis=1) <= room[:, None]))
    tl.store(out_ptr + offs_r[:, None].to(tl.int64) * width + offs_c[None, :], tl.where(on, x, 0.0), mask=ok)
    tl.store(kept_ptr + offs_r, tl.sum(on.to(tl.int32), axis=1), mask=r_ok)


_jitted: dict[bool, object] = {}


def _kernel():
    interpret = bool(knobs.runtime.interpret)
    if interpret not in _jitted:
        _jitted[interpret] = triton.jit(_topk_rows)
    return _jitted[interpret]


def applies(x: torch.Tensor, keep: int, scale: torch.Tensor | None) -> bool:
    """Whether the kernel takes this input: float16/bfloat16/float32 on CUDA (or any device
    under the interpreter), 0 < keep < width <= 65536, a float32 scale on the same device."""
    width = x.shape[-1] if x.dim() else 0
    if x.dtype not in SUPPORTED_DTYPES or not 0 < keep < width or width > MAX_WIDTH:
        return False
    if x.device.type != "cuda" and not (knobs.runtime.interpret and x.device.type == "cpu"):
        return False
    return scale is None or (scale.dtype == torch.float32 and scale.device == x.device and scale.numel() == width)


def topk_sparsify(x: torch.Tensor, keep: int, ties: str = "break",
                  scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x with all but its keep highest-scoring entries per row zeroed, entries kept per row)``.

    ``ties="keep"`` keeps every entry tied with the ``keep``-th largest score, ``"break"``
    exactly ``keep`` (the tied ones of lowest index). No autograd (the caller multiplies by a
    mask where a gradient is needed)."""
    if not applies(x, keep, scale):
        raise ValueError(f"the Triton top-k does not take {x.dtype} {tuple(x.shape)} on {x.device} with keep={keep}")
    width = x.shape[-1]
    rows2d = x.detach().reshape(-1, width)
    if rows2d.stride(-1) != 1:
        rows2d = rows2d.contiguous()
    rows = rows2d.shape[0]
    out = torch.empty((rows, width), dtype=x.dtype, device=x.device)
    kept = torch.empty(rows, dtype=torch.int32, device=x.device)
    if rows:
        block = triton.next_power_of_2(width)
        per_program = max(1, min(TILE_ELEMENTS // block, triton.next_power_of_2(rows)))
        scale_arg = scale.contiguous() if scale is not None else out
        _kernel()[(triton.cdiv(rows, per_program),)](
            rows2d, scale_arg, out, kept, rows, width, rows2d.stride(0), keep,
            HAS_SCALE=scale is not None, BREAK_TIES=ties == "break", ROWS=per_program, BLOCK=block,
            num_warps=max(1, min(16, per_program * block // 1024)))
    return out.reshape(x.shape), kept
