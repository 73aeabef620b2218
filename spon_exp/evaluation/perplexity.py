"""Perplexity of the dense, sparse and sparse+SPON model on token data.

Two protocols:
- ``chunks`` (default): non-overlapping blocks of ``seq_len`` tokens, every token after
  the first of each block scored;
- ``sliding``: TEAL's sliding window over the token stream — each window scores
  ``window`` tokens with up to ``context`` earlier tokens as context and the next window
  starts where it ended (TEAL: 2048 context + 512 scored, stride 512).
Logits are computed in chunks from the final hidden states (never a full [B, T, V] copy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from spon_exp.spon.alpha import dense_mode
from spon_exp.spon.train import _head_and_softcap, _logits, final_hidden

PROTOCOLS = ("chunks", "sliding")


@dataclass
class PerplexityProtocol:
    protocol: str = "chunks"
    seq_len: int = 512  # chunks: block length
    context: int = 2048  # sliding: context tokens before the scored window
    window: int = 512  # sliding: scored tokens per window (= the stride)
    batch_size: int = 4
    logits_chunk_tokens: int = 2048

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"perplexity protocol must be one of {PROTOCOLS}, got {self.protocol!r}")


@torch.no_grad()
def _nll_sum(model: nn.Module, ids: torch.Tensor, score_from: int, chunk: int) -> tuple[float, int]:
    """Sum of next-token NLL over positions >= score_from (targets ids[:, score_from+1:])."""
    head, cap = _head_and_softcap(model)
    h = final_hidden(model, ids)[:, score_from:-1]
    h = h.reshape(-1, h.shape[-1])
    targets = ids[:, score_from + 1:].reshape(-1)
    total = 0.0
    for s in range(0, h.shape[0], chunk):
        z = _logits(head, h[s:s + chunk], cap)
        total += float(F.cross_entropy(z, targets[s:s + chunk].to(z.device), reduction="sum"))
    return total, targets.numel()


def perplexity_chunks(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4, chunk: int = 2048,
                      desc: str | None = None) -> float:
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    total, count = 0.0, 0
    for s in tqdm(range(0, blocks.shape[0], batch_size), desc=desc, disable=desc is None, leave=False):
        nll, n = _nll_sum(model, blocks[s:s + batch_size].to(device), 0, chunk)
        total, count = total + nll, count + n
    return math.exp(total / count)


def perplexity_sliding(model: nn.Module, stream: torch.Tensor, context: int = 2048, window: int = 512,
                       chunk: int = 2048, desc: str | None = None) -> float:
    """Every token of ``stream`` (after the first) scored exactly once, in windows of
    ``window`` targets, each predicted with up to ``context`` earlier tokens as context."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    stream = stream.reshape(-1).long()
    if stream.numel() < 2:
        raise ValueError("Token stream needs at least 2 tokens for perplexity")
    total, count = 0.0, 0
    for first in tqdm(range(1, stream.numel(), window), desc=desc, disable=desc is None, leave=False):
        last = min(first + window, stream.numel())  # targets are positions [first, last)
        begin = max(0, first - 1 - context)
        nll, n = _nll_sum(model, stream[begin:last].unsqueeze(0).to(device), first - 1 - begin, chunk)
        total, count = total + nll, count + n
    return math.exp(total / count)


def perplexity(model: nn.Module, data: torch.Tensor, protocol: PerplexityProtocol, desc: str | None = None) -> float:
    """Perplexity of the model in its current state (hooks as they are) on ``data``:
    ``[N, L]`` blocks for ``chunks``, a 1-D token stream for ``sliding``."""
    if protocol.protocol == "chunks":
        return perplexity_chunks(model, data, protocol.batch_size, protocol.logits_chunk_tokens, desc)
    return perplexity_sliding(model, data, protocol.context, protocol.window, protocol.logits_chunk_tokens, desc)


#: Below this relative gap between sparse and dense perplexity the gap closure is undefined
#: (None): a ratio over a gap of a few hundredths of a point is noise, not recovery.
MIN_RELATIVE_GAP = 0.01


def gap_closure(dense: float, sparse: float, spon: float) -> float | None:
    """(sparse − spon) / (sparse − dense): 1 = SPON recovers all of the loss, 0 = none.

    None when a value is missing or the sparse model is not worse than dense by more than
    :data:`MIN_RELATIVE_GAP` (1 %): there is no gap to close."""
    if sparse is None or spon is None or dense is None or sparse - dense <= MIN_RELATIVE_GAP * dense:
        return None
    return (sparse - spon) / (sparse - dense)


def perplexity_report(model: nn.Module, data: torch.Tensor, protocol: PerplexityProtocol, sparsifier=None,
                      spon=None, variants=("dense", "sparse", "spon")) -> dict:
    """Dense, sparse and sparse+SPON perplexity (switching hooks, one model) + gap closure.

    ``spon`` must be unfolded (hooks present) for the ``sparse`` variant to exclude it.
    """
    out: dict = {}
    if "dense" in variants:
        with dense_mode(sparsifier, spon):
            out["dense"] = perplexity(model, data, protocol, desc="perplexity (dense)")
    if "sparse" in variants and sparsifier is not None:
        with dense_mode(spon):
            out["sparse"] = perplexity(model, data, protocol, desc="perplexity (sparse)")
    if "spon" in variants and sparsifier is not None and spon is not None:
        out["spon"] = perplexity(model, data, protocol, desc="perplexity (sparse+SPON)")
    if {"dense", "sparse", "spon"} <= out.keys():
        out["gap_closure"] = gap_closure(out["dense"], out["sparse"], out["spon"])
    return out
