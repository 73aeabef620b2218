"""Triton GEMV for 1-8 tokens that skips the weight rows of inputs that are zero in every token.

``y[b] = x[b] @ weight_t + bias`` with ``weight_t = W.T`` stored contiguous (``[in, out]``): the
column of ``W`` that input ``k`` multiplies is row ``k`` of ``weight_t``, one contiguous run
of memory, the layout TEAL's kernel reads. A program owns ``BLOCK_N`` outputs and a slice
of the inputs (split-K); for each tile of ``BLOCK_K`` inputs it loads the tokens' inputs,
keeps the inputs that are nonzero in *any* token (the union of kept columns, so batches of
2-8 share one pass over the weights) and loads only those rows of ``weight_t`` (masked-off
rows are never fetched). Products are summed in float32 for float16 / bfloat16 / float32
inputs.

Fixed summation order, no atomics: every program writes its float32 partial sums to a
``[split_k, tokens, out]`` buffer and a second kernel adds the partials in increasing
``k`` order, then the bias, and rounds once to the output dtype. A skipped row adds exact
zeros in the dense order, so the result is bit-identical to the same kernel reading every
row (``skip_zeros=False``, the masked-dense product summed in this kernel's order) and does
not change from run to run; tests/test_triton_gemv.py checks both under the interpreter.

Under ``TRITON_INTERPRET=1`` the same launcher runs the kernels on CPU tensors (the test
suite's way of checking them without a GPU). The interpreter rounds float32 -> bfloat16
toward zero where a GPU rounds to nearest even: interpreted bfloat16 outputs may differ
from a GPU's by one unit in the last place.

This module imports triton at the top; nothing in the library imports it except the CUDA
implementation of ``spon_exp::sparse_linear`` (:mod:`spon_exp.kernels.ops`), at its first call.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton import knobs

#: Most tokens one call accepts; the op computes larger batches densely.
MAX_TOKENS = 8
#: Outputs per program. 128 bf16 outputs = one 256-byte contiguous run per kept input row.
BLOCK_N = 128
#: Accumulator tile (tokens x inputs x outputs), kept at 8192 fp32 values (64 registers a
#: thread with 4 warps) whatever the number of tokens.
TILE_ELEMENTS = 8192
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _partials(x_ptr, wt_ptr, part_ptr, tokens, in_features, out_features, stride_x, tiles_per_program,
              BATCH: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, SKIP_ZEROS: tl.constexpr):
    """part[pid_k, b, n] = sum over this program's inputs k of x[b, k] * weight_t[k, n], in fp32."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = tl.arange(0, BATCH)
    n_ok = offs_n < out_features
    b_ok = offs_b < tokens
    # one accumulator per (token, input lane, output): the loop only multiplies and adds
    # elementwise, and the lanes are summed once at the end
    acc = tl.zeros((BATCH, BLOCK_K, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * tiles_per_program * BLOCK_K
    for t in range(tiles_per_program):
        offs_k = k_start + t * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = offs_k < in_features
        xs = tl.load(x_ptr + offs_b[:, None] * stride_x + offs_k[None, :],
                     mask=b_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        if SKIP_ZEROS:  # `!= 0` keeps NaN inputs (masked dense propagates them)
            keep = k_ok & (tl.sum((xs != 0.0).to(tl.int32), axis=0) > 0)
        else:
            keep = k_ok
        w = tl.load(wt_ptr + offs_k[:, None].to(tl.int64) * out_features + offs_n[None, :],
                    mask=keep[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        acc += xs[:, :, None] * w[None, :, :]
    tl.store(part_ptr + (pid_k * tokens + offs_b[:, None]) * out_features + offs_n[None, :], tl.sum(acc, axis=1),
             mask=b_ok[:, None] & n_ok[None, :])


def _reduce(part_ptr, bias_ptr, y_ptr, tokens, out_features, split_k,
            HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """y[b, n] = (sum_s part[s, b, n] in order s = 0, 1, ...) + bias[n], rounded once."""
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    offs = pid_n * BLOCK + tl.arange(0, BLOCK)
    ok = offs < out_features
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(split_k):
        acc += tl.load(part_ptr + (s * tokens + b) * out_features + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + b * out_features + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)


_jitted: dict[bool, tuple] = {}


def _kernels() -> tuple:
    """The two kernels, jitted (or interpreted, under TRITON_INTERPRET=1) on first use."""
    interpret = bool(knobs.runtime.interpret)
    if interpret not in _jitted:
        _jitted[interpret] = (triton.jit(_partials), triton.jit(_reduce))
    return _jitted[interpret]


def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: few programs, a fast test


def launch_config(tokens: int, in_features: int, out_features: int, programs: int) -> dict:
    """Tile sizes and split-K for ``tokens`` x ``[in, out]``, aiming at about ``programs`` programs."""
    batch = triton.next_power_of_2(tokens)
    block_k = max(8, TILE_ELEMENTS // (batch * BLOCK_N))
    n_blocks = triton.cdiv(out_features, BLOCK_N)
    k_tiles = triton.cdiv(in_features, block_k)
    split_k = max(1, min(k_tiles, programs // n_blocks))
    tiles_per_program = triton.cdiv(k_tiles, split_k)
    split_k = triton.cdiv(k_tiles, tiles_per_program)  # no program without work
    return {"BATCH": batch, "BLOCK_K": block_k, "n_blocks": n_blocks, "split_k": split_k,
            "tiles_per_program": tiles_per_program}


def sparse_linear(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None = None, *,
                  skip_zeros: bool = True, programs: int | None = None) -> torch.Tensor:
    """``x @ weight_t + bias`` for ``x`` of shape ``[tokens, in]`` (1 <= tokens <= 8).

    ``skip_zeros=False`` reads every row: the masked-dense reference, bit-identical to the
    skipping result. ``programs``: the number of programs to aim for (default 4 per
    multiprocessor); tests set it to force split-K on small shapes.
    """
    if x.dim() != 2 or weight_t.dim() != 2:
        raise ValueError(f"x must be [tokens, in] and weight_t [in, out], got {tuple(x.shape)} and {tuple(weight_t.shape)}")
    tokens, in_features = x.shape
    out_features = weight_t.shape[1]
    if weight_t.shape[0] != in_features:
        raise ValueError(f"x has {in_features} features, weight_t expects {weight_t.shape[0]}")
    if not 1 <= tokens <= MAX_TOKENS:
        raise ValueError(f"the Triton GEMV takes 1 to {MAX_TOKENS} tokens, got {tokens}; use F.linear for more")
    if x.dtype not in SUPPORTED_DTYPES or weight_t.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(f"x, weight_t and bias must share one dtype of {SUPPORTED_DTYPES}, got "
                         f"{x.dtype}, {weight_t.dtype}, {None if bias is None else bias.dtype}")
    if bias is not None and bias.numel() != out_features:
        raise ValueError(f"bias has {bias.numel()} entries, expected {out_features}")
    if not weight_t.is_contiguous():
        raise ValueError("weight_t must be contiguous (store W.T.contiguous())")
    if len({x.device, weight_t.device} | ({bias.device} if bias is not None else set())) != 1:
        raise ValueError("x, weight_t and bias must be on one device")
    if x.device.type == "cpu" and not knobs.runtime.interpret:
        raise RuntimeError("the Triton GEMV runs on CPU tensors only in the interpreter: set TRITON_INTERPRET=1")
    x = x.contiguous()
    cfg = launch_config(tokens, in_features, out_features, programs or 4 * _multiprocessors(x.device))
    partials = torch.empty((cfg["split_k"], tokens, out_features), dtype=torch.float32, device=x.device)
    y = torch.empty((tokens, out_features), dtype=x.dtype, device=x.device)
    if out_features == 0:
        return y
    partials_kernel, reduce_kernel = _kernels()
    if in_features == 0:
        partials.zero_()
    else:
        partials_kernel[(cfg["n_blocks"], cfg["split_k"])](
            x, weight_t, partials, tokens, in_features, out_features, x.stride(0), cfg["tiles_per_program"],
            BATCH=cfg["BATCH"], BLOCK_K=cfg["BLOCK_K"], BLOCK_N=BLOCK_N, SKIP_ZEROS=skip_zeros, num_warps=4)
    b = bias.reshape(out_features).contiguous() if bias is not None else y
    reduce_kernel[(triton.cdiv(out_features, 1024), tokens)](
        partials, b, y, tokens, out_features, cfg["split_k"], HAS_BIAS=bias is not None, BLOCK=1024, num_warps=4)
    return y
