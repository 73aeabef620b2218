"""The dense baseline, computed once and reused by every run that evaluates the same way.

The dense model's perplexity and zero-shot scores depend only on the model, the evaluation
data and the evaluation settings (``spon_exp.tracking.identity.dense_key``), not on the
sparsifier, the sparsity or SPON. A sweep therefore evaluates the dense model in its first
run and reads it back in all others (``results.json`` ``cache.dense: hit``). The per-block
NLLs and per-document scores are stored, not just the totals, so the paired intervals of a
later run resample the very same dense units.

A file that cannot be read (truncated, from an older version) is a miss, not an error: the
baseline is recomputed and the entry rewritten.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from safetensors.torch import load_file, save_file

from spon_exp.evaluation.perplexity import BlockNLL
from spon_exp.tracking.files import read_json, write_json_atomic

log = logging.getLogger(__name__)

BLOCKS_FILE = "blocks.safetensors"
META_FILE = "dense.json"
FORMAT = 1


def load_dense(directory: Path, corpora: list[str], want_zeroshot: bool) -> tuple[dict[str, BlockNLL], dict | None] | None:
    """``(blocks per corpus, zero-shot result or None)``, or None when the entry is missing,
    incomplete or unreadable."""
    directory = Path(directory)
    meta = read_json(directory / META_FILE)
    if meta is None:
        return None
    try:
        if meta.get("format") != FORMAT or sorted(meta["corpora"]) != sorted(corpora):
            raise ValueError(f"format {meta.get('format')} / corpora {meta.get('corpora')}")
        if want_zeroshot and meta.get("zeroshot") is None:
            return None
        state = load_file(str(directory / BLOCKS_FILE))
        blocks = {c: BlockNLL.from_state(state, c) for c in corpora}
    except Exception as e:  # noqa: BLE001 - any damage means: recompute
        log.warning("Dense baseline cache %s is unreadable (%s: %s); recomputing it", directory, type(e).__name__, e)
        return None
    return blocks, meta.get("zeroshot") if want_zeroshot else None


def save_dense(directory: Path, blocks: dict[str, BlockNLL], zeroshot: dict | None) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {}
    for corpus, b in blocks.items():
        state.update(b.state(corpus))
    tmp = directory / f".{BLOCKS_FILE}.{os.getpid()}.tmp"
    save_file(state, str(tmp))
    os.replace(tmp, directory / BLOCKS_FILE)
    # the JSON last: its presence marks a complete entry
    write_json_atomic(directory / META_FILE, {"format": FORMAT, "corpora": list(blocks),
                                              "ppl": {c: b.perplexity for c, b in blocks.items()},
                                              "zeroshot": zeroshot})
