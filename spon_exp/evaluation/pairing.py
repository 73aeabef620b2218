"""What two sets of runs may be paired on, and what a comparison refuses to say.

- **Seeds**: a comparison pairs seed ``s`` of one side with seed ``s`` of the other on the
  seeds both sides ran; seeds only one side has are left out (and named), so one failed run
  does not turn the whole comparison unpaired. Sides that share fewer than two seeds are
  compared as independent draws.
- **Text**: blocks are paired only when every run was scored the same way: the same
  perplexity protocol, split and block length (results.json's ``ppl_protocol``) and the
  same number of scored tokens in every block. Otherwise block ``b`` of one side is other
  text than block ``b`` of the other, and the comparison is refused.
- **Verdicts**: with fewer than two seeds on a side the between-seed variance is unknown; the
  interval then covers the blocks only and no "excludes 0" verdict is given.
- **Duplicates**: one configuration and seed found twice (a run folder copied, one
  configuration run in two sweeps, a local folder read with its W&B project) is one seed.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import TypeVar

T = TypeVar("T")

#: results.json ``ppl_protocol`` keys that say which tokens were scored in which blocks (the BOS
#: policy is left to the tokens-per-block check: ``none`` and ``chunk`` score the same text)
TEXT_KEYS = ("protocol", "split", "seq_len", "context", "window", "score_first_window", "score", "sparse_tokens")


def _key(seed) -> str | None:
    return None if seed is None else str(seed)


def pair_seeds(baseline: Sequence[T], candidate: Sequence[T]) -> tuple[list[T], list[T], bool, dict]:
    """``(baseline, candidate, paired, left_out)``: paired on the seeds both sides ran, in the
    same order on both sides, when they share two or more (or each side is one run of the
    same seed); ``left_out`` lists the seeds each side ran that the other did not. Items have a
    ``seed``; a seed that a side has twice is an error (count duplicates once before)."""
    for side, runs in (("baseline", baseline), ("candidate", candidate)):
        keys = [_key(r.seed) for r in runs if r.seed is not None]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise ValueError(f"the {side} has seed {twice[0]} more than once: count each configuration and seed once")
    if any(r.seed is None for r in [*baseline, *candidate]):
        return list(baseline), list(candidate), False, {"baseline": [], "candidate": []}
    cand = {_key(r.seed): r for r in candidate}
    common = [r for r in baseline if _key(r.seed) in cand]
    if len(common) < 2 and not (len(common) == len(baseline) == len(candidate) == 1):
        return list(baseline), list(candidate), False, {"baseline": [], "candidate": []}
    shared = {_key(r.seed) for r in common}
    left_out = {"baseline": [r.seed for r in baseline if _key(r.seed) not in shared],
                "candidate": [r.seed for r in candidate if _key(r.seed) not in shared]}
    return common, [cand[_key(r.seed)] for r in common], True, left_out


def _text_settings(protocol: dict | None) -> dict | None:
    return None if protocol is None else {k: protocol[k] for k in TEXT_KEYS if k in protocol}


def check_same_text(runs: Sequence, blocks: bool = True) -> int | None:
    """The number of evaluation blocks the runs share (None without per-block data); a
    ValueError in one sentence where their protocols differ or their blocks cannot be the same
    text (another number of blocks, or of scored tokens in a block). Items have ``protocol``
    (or None: not recorded) and ``blocks`` (``{variant: BlockNLL}``)."""
    settings = [s for s in (_text_settings(getattr(r, "protocol", None)) for r in runs) if s is not None]
    for other in settings[1:]:
        if other != settings[0]:
            key = next(k for k in TEXT_KEYS if settings[0].get(k) != other.get(k))
            raise ValueError(f"the runs were scored differently (eval.ppl {key}: {settings[0].get(key)} against "
                             f"{other.get(key)}), so their blocks are not the same text; compare configurations "
                             f"scored with the same protocol, split and block length")
    if not blocks:
        return None
    tokens = [b.tokens for r in runs for b in r.blocks.values()]
    sizes = sorted({t.numel() for t in tokens})
    if len(sizes) > 1:
        raise ValueError(f"runs scored on different numbers of evaluation blocks ({sizes}): not the same evaluation "
                         f"data, so their blocks cannot be paired")
    if any(not bool((t == tokens[0]).all()) for t in tokens[1:]):
        raise ValueError("runs scored different numbers of tokens in the same block (another BOS policy or block "
                         "length): not the same evaluation text, so their blocks cannot be paired")
    return sizes[0] if sizes else None


def refusal(n_seeds: int, blocks: bool) -> str | None:
    """Why a comparison gives no verdict, or None when it can: with fewer than two seeds on a
    side the spread between seeds is unknown."""
    if n_seeds >= 2:
        return None
    if blocks:
        return f"n={n_seeds}: blocks only, run more seeds"
    return f"n={n_seeds}: no per-block data, run more seeds"


def duplicates(items: Iterable[T], identity: Callable[[T], Hashable | None]) -> list[tuple[T, T]]:
    """``(first, again)`` for every item whose identity (None: unknown, never a duplicate) an
    earlier item already had."""
    first: dict = {}
    out = []
    for item in items:
        key = identity(item)
        if key is None:
            continue
        if key in first:
            out.append((first[key], item))
        else:
            first[key] = item
    return out


def describe_left_out(left_out: dict) -> str | None:
    """``left out: baseline seeds 3 4; candidate seed 5`` or None."""
    parts = [f"{side} seed{'s' if len(seeds) > 1 else ''} {' '.join(map(str, seeds))}"
             for side, seeds in left_out.items() if seeds]
    return f"left out: {'; '.join(parts)}" if parts else None

