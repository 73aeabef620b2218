"""Dense perplexity under each BOS policy (``eval.ppl.bos``), on the same text blocks.

``chunk`` also scores each block's first text token (predicted from BOS alone), which moves
the figure by itself; so besides the three policies' perplexities this reports the one
comparison that isolates what the BOS does to the model: the NLL of the *same* targets
(text tokens 1 .. L-1 of every block) without and with a BOS in front of the block. Run on
the packaged SmolLM2 (its tokenizer adds no BOS) and on any other model path, e.g. a
Gemma-family GGUF (its tokenizer adds one):

    python benchmarks/quality/bos_policy.py
    python benchmarks/quality/bos_policy.py --model /path/gemma-3-270m-q4_k_m.gguf --name gemma3-270m

Writes ``benchmarks/results/bos_policy_<name>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import torch.nn.functional as F

from spon_exp.data.corpora import token_blocks
from spon_exp.evaluation.perplexity import PerplexityProtocol, block_nll, tokenizer_adds_bos
from spon_exp.models.head import chunked_logits, final_hidden
from spon_exp.models.loading import PACKAGED, load_model

RESULTS = Path(__file__).resolve().parents[1] / "results"


def token_nll(model, ids: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Next-token NLL at every position of ``ids`` ([rows, T]) -> float64 [rows, T - 1]."""
    h = final_hidden(model, ids)[:, :-1]
    rows, length = h.shape[0], h.shape[1]
    h, targets = h.reshape(-1, h.shape[-1]), ids[:, 1:].reshape(-1)
    out = torch.empty(h.shape[0], dtype=torch.float64)
    for s, z in chunked_logits(model, h, chunk):
        out[s:s + chunk] = F.cross_entropy(z, targets[s:s + chunk], reduction="none").double()
    return out.view(rows, length)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=PACKAGED)
    ap.add_argument("--name", default="smollm2-135m")
    ap.add_argument("--corpus", default="wikipedia")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--blocks", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    lm = load_model(args.model)
    tok, model = lm.tokenizer, lm.model
    bos_id = tok.bos_token_id
    if bos_id is None:
        raise SystemExit(f"{args.model}: the tokenizer has no BOS token; nothing to compare")
    blocks = token_blocks(tok, args.corpus, "evaluation", args.seq_len, args.blocks)
    out = {"model": args.model, "name": args.name, "corpus": args.corpus, "blocks": list(blocks.shape),
           "bos_token": tok.convert_ids_to_tokens(bos_id), "tokenizer_adds_bos": tokenizer_adds_bos(tok),
           "perplexity": {}}
    with torch.no_grad():
        # one forward per policy: none and chunk also give the same-target comparison
        nll = {"none": 0.0, "chunk": 0.0, "chunk_first_tokens": 0.0}
        for rows in blocks.split(args.batch_size):
            nll["none"] += float(token_nll(model, rows).sum())  # targets: text tokens 1 .. L-1
            with_bos = token_nll(model, torch.cat([torch.full_like(rows[:, :1], bos_id), rows], dim=1))
            nll["chunk"] += float(with_bos.sum())  # targets: text tokens 0 .. L-1
            nll["chunk_first_tokens"] += float(with_bos[:, 0].sum())
        n, length = blocks.shape
        out["perplexity"]["none"] = math.exp(nll["none"] / (n * (length - 1)))
        out["perplexity"]["chunk"] = math.exp(nll["chunk"] / (n * length))
        stream = PerplexityProtocol(seq_len=args.seq_len, batch_size=args.batch_size, bos="stream", bos_token_id=bos_id)
        out["perplexity"]["stream"] = block_nll(model, blocks, stream, desc="bos=stream").perplexity
        out["same_targets"] = {  # text tokens 1 .. L-1 of every block, without and with a BOS in front
            "without_bos": out["perplexity"]["none"],
            "with_bos": math.exp((nll["chunk"] - nll["chunk_first_tokens"]) / (n * (length - 1))),
            "targets": n * (length - 1)}
        out["first_token_of_a_block_from_bos_alone"] = math.exp(nll["chunk_first_tokens"] / n)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"bos_policy_{args.name}.json"
    path.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
