"""The dense baseline, computed once and reused by every run that evaluates the same way.

The dense model's perplexity and zero-shot scores depend only on the model, the evaluation
data and the evaluation settings (``spon_exp.tracking.identity.dense_key``), not on the
sparsifier, the sparsity or SPON. A sweep therefore evaluates the dense model in its first
run and reads it back in all others (``results.json`` ``cache.dense: hit``). The per-block
NLLs and per-document scores are stored, not just the totals, so the paired intervals of a
later run resample the very same dense units.

Each baseline is a cache entry (``spon_exp.tracking.store``): checksummed when written, and
one that cannot be read (truncated, altered, from an older version) is moved aside with a
warning and is a miss, not an error: the baseline is recomputed and the entry rewritten.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from spon_exp.evaluation.perplexity import BlockNLL
from spon_exp.tracking.store import read_entry, write_entry

BLOCKS_FILE = "blocks.safetensors"
META_FILE = "dense.json"
FORMAT = 1


def load_dense(directory: Path, corpora: list[str], want_zeroshot: bool) -> tuple[dict[str, BlockNLL], dict | None] | None:
    """``(blocks per corpus, zero-shot result or None)``, or None when the entry is missing
    or damaged (then moved aside)."""

    def read(folder: Path):
        meta = json.loads((folder / META_FILE).read_text())
        if meta.get("format") != FORMAT or sorted(meta["corpora"]) != sorted(corpora):
            raise ValueError(f"format {meta.get('format')} / corpora {meta.get('corpora')}")
        if want_zeroshot and meta.get("zeroshot") is None:  # the key includes the tasks: never written so
            raise ValueError("no zero-shot scores")
        state = load_file(str(folder / BLOCKS_FILE))
        return {c: BlockNLL.from_state(state, c) for c in corpora}, meta.get("zeroshot") if want_zeroshot else None

    return read_entry(directory, read, "dense baseline")


def save_dense(directory: Path, blocks: dict[str, BlockNLL], zeroshot: dict | None) -> None:
    state = {}
    for corpus, b in blocks.items():
        state.update(b.state(corpus))
    meta = {"format": FORMAT, "corpora": list(blocks), "ppl": {c: b.perplexity for c, b in blocks.items()},
            "zeroshot": zeroshot}

    def fill(folder: Path) -> None:
        save_file(state, str(folder / BLOCKS_FILE))
        (folder / META_FILE).write_text(json.dumps(meta, indent=2, default=str))

    write_entry(directory, fill)
