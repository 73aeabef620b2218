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
from spon_exp.models.head import chunked_logits, final_hidden

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


@dataclass
class BlockNLL:
    """Summed next-token NLL and scored-token count of every evaluation block (a ``chunks``
    block or a ``sliding`` window): the perplexity, and the unit its bootstrap resamples."""

    nll: torch.Tensor  # [blocks] float64
    tokens: torch.Tensor  # [blocks] int64

    @property
    def perplexity(self) -> float:
        return math.exp(float(self.nll.sum()) / int(self.tokens.sum()))

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.nll": self.nll.contiguous(), f"{prefix}.tokens": self.tokens.contiguous()}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], prefix: str) -> BlockNLL:
        return cls(state[f"{prefix}.nll"].to(torch.float64), state[f"{prefix}.tokens"].to(torch.int64))


@torch.no_grad()
def _nll_rows(model: nn.Module, ids: torch.Tensor, score_from: int, chunk: int) -> torch.Tensor:
    """Per row of ``ids``, the summed next-token NLL over positions >= score_from
    (targets ids[:, score_from+1:]), as float64 [rows]."""
    h = final_hidden(model, ids)[:, score_from:-1]
    rows, length = h.shape[0], h.shape[1]
    h = h.reshape(-1, h.shape[-1])
    targets = ids[:, score_from + 1:].reshape(-1)
    losses = torch.empty(h.shape[0], dtype=torch.float64)
    for s, z in chunked_logits(model, h, chunk):
        losses[s:s + chunk] = F.cross_entropy(z, targets[s:s + chunk].to(z.device), reduction="none").double().cpu()
    return losses.view(rows, length).sum(1)


def block_nll_chunks(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4, chunk: int = 2048,
                     desc: str | None = None) -> BlockNLL:
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    sums = [_nll_rows(model, blocks[s:s + batch_size].to(device), 0, chunk)
            for s in tqdm(range(0, blocks.shape[0], batch_size), desc=desc, disable=desc is None, leave=False)]
    nll = torch.cat(sums)
    return BlockNLL(nll, torch.full_like(nll, blocks.shape[1] - 1, dtype=torch.int64))


def block_nll_sliding(model: nn.Module, stream: torch.Tensor, context: int = 2048, window: int = 512,
                      chunk: int = 2048, desc: str | None = None) -> BlockNLL:
    """Every token of ``stream`` (after the first) scored exactly once, in windows of
    ``window`` targets, each predicted with up to ``context`` earlier tokens as context."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    stream = stream.reshape(-1).long()
    if stream.numel() < 2:
        raise ValueError("Token stream needs at least 2 tokens for perplexity")
    nll, tokens = [], []
    for first in tqdm(range(1, stream.numel(), window), desc=desc, disable=desc is None, leave=False):
        last = min(first + window, stream.numel())  # targets are positions [first, last)
        begin = max(0, first - 1 - context)
        nll.append(_nll_rows(model, stream[begin:last].unsqueeze(0).to(device), first - 1 - begin, chunk))
        tokens.append(last - first)
    return BlockNLL(torch.cat(nll), torch.tensor(tokens, dtype=torch.int64))


def block_nll(model: nn.Module, data: torch.Tensor, protocol: PerplexityProtocol, desc: str | None = None) -> BlockNLL:
    """Per-block NLL of the model in its current state (hooks as they are) on ``data``:
    ``[N, L]`` blocks for ``chunks``, a 1-D token stream for ``sliding``."""
    if protocol.protocol == "chunks":
        return block_nll_chunks(model, data, protocol.batch_size, protocol.logits_chunk_tokens, desc)
    return block_nll_sliding(model, data, protocol.context, protocol.window, protocol.logits_chunk_tokens, desc)


def first_batch(data: torch.Tensor, protocol: PerplexityProtocol) -> torch.Tensor:
    """The first forward an evaluation makes (the fold check runs on it)."""
    if protocol.protocol == "chunks":
        return data[: protocol.batch_size]
    stream = data.reshape(-1)
    return stream[: min(stream.numel(), 1 + protocol.window)].unsqueeze(0)


def perplexity(model: nn.Module, data: torch.Tensor, protocol: PerplexityProtocol, desc: str | None = None) -> float:
    """Perplexity of the model in its current state on ``data`` (see :func:`block_nll`)."""
    return block_nll(model, data, protocol, desc).perplexity


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
