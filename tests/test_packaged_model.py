"""End-to-end checks on the real packaged SmolLM2-135M (slow: run with ``-m slow``)."""

from __future__ import annotations

import pytest
import torch

from spon_exp.assets import SMOLLM2, packaged_path
from spon_exp.data.corpora import token_blocks
from spon_exp.evaluation.perplexity import PerplexityProtocol, perplexity_report
from spon_exp.models.loading import SMOLLM2_GGUF, load_model
from spon_exp.sparsifiers import build_sparsifier
from spon_exp.spon import Spon, TrainConfig, train_alpha

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def packaged():
    return load_model()


def test_packaged_model_is_the_expected_llama(packaged):
    cfg = packaged.model.config
    assert type(packaged.model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size) == (30, 576, 1536, 49152)


def test_gguf_file_loads_with_the_same_logits_as_the_cached_copy(packaged):
    gguf = load_model(str(packaged_path(SMOLLM2, SMOLLM2_GGUF)))
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(gguf.model(ids).logits, packaged.model(ids).logits)


def test_teal_raises_perplexity_and_spon_lowers_it_on_the_evaluation_split(packaged):
    torch.manual_seed(0)
    model, tok = packaged.model, packaged.tokenizer
    calib = token_blocks(tok, "wikipedia", "calibration", 128, 24)
    evaluation = token_blocks(tok, "wikipedia", "evaluation", 128, 12)
    sp = build_sparsifier("teal", sparsity=0.5).attach(model)
    sp.calibrate(model, calib[:8].split(4))
    spon = Spon(sp, 1)
    train_alpha(model, sp, spon, calib, TrainConfig(lr=3e-4, steps=24, batch_size=2))
    report = perplexity_report(model, evaluation, PerplexityProtocol(seq_len=128, batch_size=4), sp, spon)
    print(report)
    assert report["sparse"] > report["dense"] * 1.2
    assert report["dense"] < report["spon"] < report["sparse"]
    assert report["gap_closure"] > 0.05
    sp.detach()
    spon.detach()
