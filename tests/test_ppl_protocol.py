"""The perplexity protocol's options, each against a hand-computed case: the BOS policy
(none / chunk / stream / auto), the sliding protocol's unscored first window (TEAL's
reference loop re-implemented here), the WikiText-2 join, and the cache keys and results
that record them."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from spon_exp.data import corpora
from spon_exp.evaluation.perplexity import (PerplexityProtocol, _sliding_windows, block_nll, first_batch,
                                            resolve_bos)
from tests.helpers import random_ids, tiny

BOS = 256  # any id the tiny model knows (the byte tokenizer has no BOS of its own)


@pytest.fixture(scope="module")
def model():
    return tiny().model


def nll_of(model, ids: torch.Tensor, score_from: int = 0) -> float:
    """Summed next-token NLL of 1-D ``ids``, targets ids[score_from + 1:], one plain forward."""
    with torch.no_grad():
        logits = model(ids[None]).logits[0].double()
    return F.cross_entropy(logits[score_from:-1], ids[score_from + 1:], reduction="sum").item()


def with_bos(ids: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.tensor([BOS]), ids])


def test_chunks_bos_per_chunk_scores_every_token_after_a_bos(model):
    blocks = random_ids(3, 16)
    out = block_nll(model, blocks, PerplexityProtocol(seq_len=16, batch_size=2, bos="chunk", bos_token_id=BOS))
    assert out.tokens.tolist() == [16, 16, 16]  # the first text token is scored too, from BOS alone
    for i in range(3):
        assert float(out.nll[i]) == pytest.approx(nll_of(model, with_bos(blocks[i])), rel=1e-6)
    plain = block_nll(model, blocks, PerplexityProtocol(seq_len=16, batch_size=2))
    assert plain.tokens.tolist() == [15, 15, 15]
    assert float(plain.nll[1]) == pytest.approx(nll_of(model, blocks[1]), rel=1e-6)
    assert not torch.allclose(out.nll, plain.nll)


def test_chunks_bos_at_stream_start_tiles_like_the_references(model):
    """LaRoSA / GPTQ-style: encode the text with BOS, cut it into blocks of L: block 0 is
    BOS + 15 text tokens, block k starts at text token 16k - 1, the last text token is dropped."""
    blocks = random_ids(3, 16, seed=1)
    text = blocks.reshape(-1)
    out = block_nll(model, blocks, PerplexityProtocol(seq_len=16, batch_size=2, bos="stream", bos_token_id=BOS))
    assert out.tokens.tolist() == [15, 15, 15]
    assert float(out.nll[0]) == pytest.approx(nll_of(model, with_bos(text[:15])), rel=1e-6)
    assert float(out.nll[1]) == pytest.approx(nll_of(model, text[15:31]), rel=1e-6)
    assert float(out.nll[2]) == pytest.approx(nll_of(model, text[31:47]), rel=1e-6)
    first = first_batch(blocks, PerplexityProtocol(seq_len=16, batch_size=2, bos="stream", bos_token_id=BOS))
    assert first.tolist() == [with_bos(text[:15]).tolist(), text[15:31].tolist()]  # what the fold check sees


def test_sliding_windows_by_hand():
    # 10 text tokens, context 3, window 4: (first target, end, input begin, BOS in front)
    assert list(_sliding_windows(10, 3, 4, "none", True)) == [(1, 5, 0, False), (5, 9, 1, False), (9, 10, 5, False)]
    assert list(_sliding_windows(10, 3, 4, "none", False)) == [(4, 8, 0, False), (8, 10, 4, False)]
    assert list(_sliding_windows(10, 3, 4, "chunk", True)) == [(0, 4, 0, True), (4, 8, 0, True), (8, 10, 4, True)]
    # the stream is BOS + text: only a window whose context reaches back past text position 0 feeds it
    assert list(_sliding_windows(10, 3, 4, "stream", True)) == [(0, 4, 0, True), (4, 8, 0, False), (8, 10, 4, False)]
    assert list(_sliding_windows(10, 3, 4, "stream", False)) == [(3, 7, 0, True), (7, 10, 3, False)]


def test_sliding_unscored_first_window_is_teals_reference_loop(model):
    """TEAL's utils/eval_ppl.py, re-implemented: the text encoded with BOS, cut to a multiple
    of the stride, windows of context_size + window_size tokens, only the last window_size
    of each scored, perplexity = exp(mean of the window means)."""
    context_size, window_size = 8, 4
    text = random_ids(1, 19, seed=2).reshape(-1)
    encoded = with_bos(text)  # 20 tokens: a multiple of the stride, as TEAL truncates to
    means = []
    for begin in range(0, encoded.numel(), window_size):
        ids = encoded[begin:begin + context_size + window_size]
        means.append(nll_of(model, ids, ids.numel() - window_size - 1) / window_size)
        if begin + context_size + window_size >= encoded.numel():
            break
    teal = math.exp(sum(means) / len(means))
    ours = block_nll(model, text, PerplexityProtocol(protocol="sliding", context=context_size - 1, window=window_size,
                                                     bos="stream", bos_token_id=BOS, score_first_window=False))
    assert ours.tokens.tolist() == [4, 4, 4] and len(means) == 3
    assert ours.perplexity == pytest.approx(teal, rel=1e-6)


def test_sliding_unscored_first_window_without_bos(model):
    stream = random_ids(1, 30, seed=3).reshape(-1)
    out = block_nll(model, stream, PerplexityProtocol(protocol="sliding", context=5, window=10, score_first_window=False))
    # targets 6..29: windows [6, 16) from input 0..15 and [16, 26) from 10..25, [26, 30) from 20..29
    assert out.tokens.tolist() == [10, 10, 4]
    assert float(out.nll[0]) == pytest.approx(nll_of(model, stream[0:16], 5), rel=1e-6)
    assert float(out.nll[2]) == pytest.approx(nll_of(model, stream[20:30], 5), rel=1e-6)
    with pytest.raises(ValueError, match="too short"):
        block_nll(model, stream[:6], PerplexityProtocol(protocol="sliding", context=5, window=10,
                                                         score_first_window=False))


def test_resolve_bos_follows_the_tokenizer():
    adds = SimpleNamespace(bos_token_id=7, add_bos_token=True)
    adds_not = SimpleNamespace(bos_token_id=7, add_bos_token=False)
    no_bos = SimpleNamespace(bos_token_id=None, add_bos_token=False)
    assert resolve_bos("auto", "chunks", adds) == ("chunk", 7)
    assert resolve_bos("auto", "sliding", adds) == ("stream", 7)
    assert resolve_bos("auto", "chunks", adds_not) == ("none", None)
    assert resolve_bos("chunk", "chunks", adds_not) == ("chunk", 7)  # forced, though the tokenizer adds none
    assert resolve_bos("auto", "chunks", no_bos) == ("none", None)
    with pytest.raises(ValueError, match="has none; use eval.ppl.bos=none"):
        resolve_bos("chunk", "chunks", no_bos)
    assert resolve_bos("stream", "sliding", no_bos) == ("none", None)  # Qwen: the stream starts without one
    with pytest.raises(ValueError, match="needs the tokenizer's bos_token_id"):
        PerplexityProtocol(bos="chunk")
    assert PerplexityProtocol(protocol="sliding", bos="stream", bos_token_id=7, score_first_window=False).describe() == {
        "protocol": "sliding", "bos": "stream", "bos_token_id": 7, "context": 2048, "window": 512,
        "score_first_window": False}


def test_wikitext2_rows_joined_with_a_blank_line(monkeypatch):
    import datasets

    rows = ["", " = Valkyria Chronicles III = \n", "", " Senjō no Valkyria 3 \n"]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: {"text": rows})
    assert corpora.load_passages("wikitext2", "evaluation") == [
        "\n\n = Valkyria Chronicles III = \n\n\n\n\n Senjō no Valkyria 3 \n"]
    # the cached token stream of the earlier, differently joined text is never read back
    assert corpora._corpus_identity("wikitext2") != "wikitext2"
    assert corpora._corpus_identity("wikipedia") == "wikipedia"


def test_protocol_options_are_part_of_the_dense_key_and_validated(monkeypatch):
    from tests.test_app import SMALL, compose_cfg
    from spon_exp.config import ConfigError, validate
    from spon_exp.tracking.identity import dense_key, sparsifier_key

    base = dense_key(compose_cfg(SMALL))
    assert dense_key(compose_cfg(SMALL + ["eval.ppl.bos=none"])) != base
    assert dense_key(compose_cfg(SMALL + ["eval.ppl.score_first_window=false"])) != base
    paper = compose_cfg(SMALL + ["calib.corpus=wikitext2", "eval.ppl.corpora=[wikitext2]"])
    keys = sparsifier_key(paper), dense_key(paper)
    monkeypatch.setitem(corpora.BUILTIN_TEXT_VERSION, "wikitext2", "another-join")  # the text changes: new keys
    assert sparsifier_key(paper) != keys[0] and dense_key(paper) != keys[1]
    with pytest.raises(ConfigError, match="eval.ppl.bos=chunk needs a BOS token"):
        validate(compose_cfg(SMALL + ["eval.ppl.bos=chunk"]))  # the tiny models' byte tokenizer has none
    with pytest.raises(ConfigError, match="eval.ppl.bos must be"):
        validate(compose_cfg(SMALL + ["eval.ppl.bos=first"]))
    with pytest.raises(ConfigError, match="scores nothing"):
        validate(compose_cfg(SMALL + ["eval.ppl.protocol=sliding", "eval.ppl.context=64", "eval.ppl.window=16",
                                      "eval.ppl.score_first_window=false", "eval.ppl.max_tokens=60"]))
