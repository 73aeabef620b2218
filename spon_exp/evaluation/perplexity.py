"""Perplexity of the dense, sparse and sparse+SPON model on token data.

Two protocols:
- ``chunks`` (default): non-overlapping blocks of ``seq_len`` tokens, every token after
  the first of each block scored;
- ``sliding``: TEAL's sliding window over the token stream — each window scores
  ``window`` tokens with up to ``context`` earlier tokens (plus the token just before the
  window) as context and the next window starts where it ended. ``score_first_window=False``
  leaves the first ``context + 1`` tokens of the stream unscored, so every scored token
  sees a full context: TEAL's reference (``utils/eval_ppl.py``: 2560-token windows, the
  last 512 scored) is ``context=2047, window=512, score_first_window=False, bos=stream``.
  TEAL also drops the stream's tail beyond the last multiple of 512 tokens; spon-exp scores
  it as a shorter last window.

A BOS policy says where a beginning-of-sequence token goes (it is fed, never scored):
- ``none``: nowhere (blocks and windows start with text);
- ``chunk``: before every ``chunks`` block and every ``sliding`` window, as a tokenizer that
  adds BOS does when each chunk is encoded on its own; the first text token of each chunk
  is then scored too (predicted from BOS alone);
- ``stream``: once, before the first text token of the evaluation stream (the text encoded
  as one sequence, as TEAL, LaRoSA and the GPTQ / SparseGPT / Wanda WikiText scripts do):
  ``chunks`` cuts that stream (BOS + text) into blocks of ``seq_len``, so the first block is
  BOS + ``seq_len - 1`` text tokens, the others shift by one and the stream's last token is
  dropped (as the references' tiling does); ``sliding`` feeds the BOS to the windows whose
  context reaches the stream start.
- ``auto`` (the config default) follows the tokenizer's own ``add_bos_token``: ``chunk``
  for ``chunks``, ``stream`` for ``sliding`` when it adds one, ``none`` otherwise
  (:func:`resolve_bos`). With ``none`` and ``chunk`` the text blocks are the same, so those
  perplexities differ only by what the BOS does (and the first token of a block being scored).
Which tokens are scored (``score``): ``all`` the protocol's targets, or ``sparsified`` only
the positions the sparsifier's token policy sparsifies in that forward (its trailing tokens:
TEAL's reference sparsifies the last ⌊T/2⌋ of a prefill, R-Sparse's the last 10 %), so no
scored token is computed from dense inputs. The dense and +SPON variants score the same
positions, so the three stay paired.
Logits are computed in chunks from the final hidden states (never a full [B, T, V] copy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from spon_exp.evaluation.gap import MIN_RELATIVE_GAP, gap_closure  # noqa: F401 - re-exported
from spon_exp.spon.alpha import dense_mode
from spon_exp.models.head import chunked_logits, final_hidden
from spon_exp.sparsifiers.base import TokenPolicy

PROTOCOLS = ("chunks", "sliding")
SCORES = ("all", "sparsified")
BOS_POLICIES = ("none", "chunk", "stream")  # as resolved; the config also accepts "auto"


@dataclass
class PerplexityProtocol:
    protocol: str = "chunks"
    seq_len: int = 512  # chunks: block length
    context: int = 2048  # sliding: context tokens before the scored window
    window: int = 512  # sliding: scored tokens per window (= the stride)
    batch_size: int = 4
    logits_chunk_tokens: int = 2048
    bos: str = "none"  # none / chunk / stream (resolve "auto" with resolve_bos first)
    bos_token_id: int | None = None  # needed unless bos == "none"
    score_first_window: bool = True  # sliding: False leaves the first context + 1 tokens unscored (TEAL)
    score: str = "all"  # all / sparsified (only the positions ``sparse_tokens`` sparsifies)
    sparse_tokens: TokenPolicy | None = None  # the sparsifier's token policy, for score="sparsified"

    def __post_init__(self):
        if self.score not in SCORES:
            raise ValueError(f"perplexity score must be one of {SCORES}, got {self.score!r}")
        if self.score == "sparsified" and self.sparse_tokens is None:
            raise ValueError("score='sparsified' needs the sparsifier's token policy (sparse_tokens)")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"perplexity protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.bos not in BOS_POLICIES:
            raise ValueError(f"BOS policy must be one of {BOS_POLICIES} (resolve 'auto' with resolve_bos), got {self.bos!r}")
        if self.bos != "none" and self.bos_token_id is None:
            raise ValueError(f"BOS policy {self.bos!r} needs the tokenizer's bos_token_id; this tokenizer has none "
                             f"(use bos='none')")

    def describe(self) -> dict:
        """What results.json records about how perplexity was computed."""
        out = {"protocol": self.protocol, "bos": self.bos, "bos_token_id": self.bos_token_id}
        if self.protocol == "chunks":
            out["seq_len"] = self.seq_len
        else:
            out.update(context=self.context, window=self.window, score_first_window=self.score_first_window)
        if self.score != "all":
            out["score"] = self.score
            out["sparse_tokens"] = vars(self.sparse_tokens)
        return out

    def first_scored(self, length: int, score_from: int) -> int:
        """The first scored position of a forward of ``length`` tokens whose protocol scores
        from ``score_from``: later where ``score="sparsified"`` and the policy leaves the
        forward's leading tokens dense."""
        if self.score == "sparsified":
            return max(score_from, length - self.sparse_tokens.sparsified(length))
        return score_from


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts a BOS token in front of a text it encodes."""
    if getattr(tokenizer, "bos_token_id", None) is None:
        return False
    flag = getattr(tokenizer, "add_bos_token", None)
    if flag is not None:
        return bool(flag)
    ids = tokenizer("a")["input_ids"]  # no flag (some fast tokenizers): ask the tokenizer itself
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def resolve_bos(policy: str, protocol: str, tokenizer) -> tuple[str, int | None]:
    """``(none | chunk | stream, bos_token_id)`` for a configured policy: ``auto`` follows the
    tokenizer's ``add_bos_token`` (``chunk`` for ``chunks``, ``stream`` for ``sliding``).
    ``stream`` is the stream as the references encode it, so a tokenizer without a BOS token
    (Qwen's) starts it with none; ``chunk`` asks for a BOS per chunk and needs one."""
    if policy not in ("auto", *BOS_POLICIES):
        raise ValueError(f"eval.ppl.bos must be auto, none, chunk or stream, got {policy!r}")
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if policy == "auto":
        policy = ("chunk" if protocol == "chunks" else "stream") if tokenizer_adds_bos(tokenizer) else "none"
    if policy == "stream" and bos_id is None:
        return "none", None
    if policy != "none" and bos_id is None:
        raise ValueError(f"eval.ppl.bos={policy} needs a BOS token, and this tokenizer has none; use eval.ppl.bos=none")
    return policy, (int(bos_id) if policy != "none" else None)


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


def _with_bos(ids: torch.Tensor, bos_token_id: int) -> torch.Tensor:
    """``ids`` ([rows, T]) with a BOS column in front."""
    return torch.cat([torch.full_like(ids[:, :1], bos_token_id), ids], dim=1)


def _chunk_batches(blocks: torch.Tensor, batch_size: int, bos: str, bos_token_id: int | None):
    """``(input ids, score_from)`` of each forward over ``[N, L]`` blocks under a BOS policy:
    with a BOS in front of a block all its L tokens are targets, without it L - 1. ``stream``
    re-tiles BOS + the blocks' tokens into the same number of blocks (the last token dropped)."""
    blocks = blocks.long()
    if bos == "stream" and blocks.numel():
        stream = torch.cat([torch.full_like(blocks[0, :1], bos_token_id), blocks.reshape(-1)])
        blocks, bos = stream[: blocks.numel()].reshape(blocks.shape), "none"
    for s in range(0, blocks.shape[0], batch_size):
        rows = blocks[s:s + batch_size]
        yield (_with_bos(rows, bos_token_id), 0) if bos == "chunk" else (rows, 0)


def _all_scored(length: int, score_from: int) -> int:
    return score_from


def block_nll_chunks(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4, chunk: int = 2048,
                     desc: str | None = None, bos: str = "none", bos_token_id: int | None = None,
                     first_scored=_all_scored) -> BlockNLL:
    """Each ``[N, L]`` block's summed NLL; its scored tokens are L - 1, or L where ``bos``
    puts a BOS in front of it (``chunk``); ``stream``: see :func:`_chunk_batches`.
    ``first_scored(length, score_from)``: where scoring starts (:meth:`PerplexityProtocol.first_scored`)."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    batches = list(_chunk_batches(blocks, batch_size, bos, bos_token_id))
    sums, tokens = [], []
    for ids, score_from in tqdm(batches, desc=desc, disable=desc is None, leave=False):
        score_from = first_scored(ids.shape[1], score_from)
        sums.append(_nll_rows(model, ids.to(device), score_from, chunk))
        tokens += [ids.shape[1] - 1 - score_from] * ids.shape[0]
    return BlockNLL(torch.cat(sums), torch.tensor(tokens, dtype=torch.int64))


def _sliding_windows(n: int, context: int, window: int, bos: str, score_first_window: bool):
    """``(first, last, begin, bos_in_front)`` of every window over a stream of ``n`` text tokens
    (BOS not counted): targets are positions [first, last) and the input is the text
    [begin, last), with a BOS in front where ``bos_in_front``."""
    has_bos_start = bos != "none"  # a BOS before position 0 makes the first text token a target
    start = 0 if has_bos_start else 1
    if not score_first_window:  # the first context + 1 tokens (counting a stream-start BOS) are context only
        start = context + (0 if bos == "stream" else 1)
    for first in range(start, n, window):
        last = min(first + window, n)
        if bos == "stream":  # the stream is BOS + text: the BOS is the token at text position -1
            begin = first - 1 - context
            yield first, last, max(0, begin), begin < 0
        else:
            yield first, last, max(0, first - 1 - context), bos == "chunk"


def block_nll_sliding(model: nn.Module, stream: torch.Tensor, context: int = 2048, window: int = 512,
                      chunk: int = 2048, desc: str | None = None, bos: str = "none", bos_token_id: int | None = None,
                      score_first_window: bool = True, first_scored=_all_scored) -> BlockNLL:
    """Every token of ``stream`` scored exactly once (the first only after a BOS), in windows
    of ``window`` targets, each predicted with up to ``context`` earlier tokens (and the one
    just before the window) as context; ``bos`` as in the module docstring. Without
    ``score_first_window`` the first ``context + 1`` stream tokens (a stream-start BOS
    counted) are context only."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    stream = stream.reshape(-1).long()
    windows = list(_sliding_windows(stream.numel(), context, window, bos, score_first_window))
    if not windows:
        need = (f"more than {context + 1} tokens, as the first context + 1 are unscored (score_first_window=false)"
                if not score_first_window else "at least 2 tokens")
        raise ValueError(f"Token stream of {stream.numel()} tokens is too short for sliding perplexity: it needs {need}")
    nll, tokens = [], []
    for first, last, begin, bos_in_front in tqdm(windows, desc=desc, disable=desc is None, leave=False):
        ids = stream[begin:last].unsqueeze(0)
        score_from = first - 1 - begin
        if bos_in_front:
            ids, score_from = _with_bos(ids, bos_token_id), score_from + 1
        score_from = first_scored(ids.shape[1], score_from)
        nll.append(_nll_rows(model, ids.to(device), score_from, chunk))
        tokens.append(ids.shape[1] - 1 - score_from)
    return BlockNLL(torch.cat(nll), torch.tensor(tokens, dtype=torch.int64))


def block_nll(model: nn.Module, data: torch.Tensor, protocol: PerplexityProtocol, desc: str | None = None) -> BlockNLL:
    """Per-block NLL of the model in its current state (hooks as they are) on ``data``:
    ``[N, L]`` blocks for ``chunks``, a 1-D token stream for ``sliding``."""
    p = protocol
    if p.protocol == "chunks":
        return block_nll_chunks(model, data, p.batch_size, p.logits_chunk_tokens, desc, p.bos, p.bos_token_id,
                                p.first_scored)
    return block_nll_sliding(model, data, p.context, p.window, p.logits_chunk_tokens, desc, p.bos, p.bos_token_id,
                             p.score_first_window, p.first_scored)


def first_batch(data: torch.Tensor, protocol: PerplexityProtocol) -> torch.Tensor:
    """The first forward an evaluation makes (the fold check runs on it), BOS included."""
    p = protocol
    if p.protocol == "chunks":
        return next(_chunk_batches(data[: p.batch_size], p.batch_size, p.bos, p.bos_token_id))[0]
    stream = data.reshape(-1).long()
    first, last, begin, bos_in_front = next(_sliding_windows(stream.numel(), p.context, p.window, p.bos,
                                                             p.score_first_window))
    ids = stream[begin:last].unsqueeze(0)
    return _with_bos(ids, p.bos_token_id) if bos_in_front else ids


def perplexity(model: nn.Module, data: torch.Tensor, protocol: PerplexityProtocol, desc: str | None = None) -> float:
    """Perplexity of the model in its current state on ``data`` (see :func:`block_nll`)."""
    return block_nll(model, data, protocol, desc).perplexity


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
