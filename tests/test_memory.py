"""The training-memory model: measured saved activations are linear in tokens and in the
layer widths, and the fitted estimate predicts a configuration it was not fitted on."""

import torch
from transformers import AutoModelForCausalLM

from spon_exp.models.loading import tiny_random_config
from spon_exp.sparsifiers import build_sparsifier
from spon_exp.spon import Spon

from benchmarks.perf.memory_model import estimate_training_memory, fit_activation_coefficients, saved_activation_bytes


def _student(hidden: int, inter: int, layers: int = 2):
    cfg = tiny_random_config("llama", hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                             vocab_size=300)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    sp = build_sparsifier("teal", sparsity=0.5, calibration_context="dense").attach(model)
    sp.calibrate(model, [torch.randint(0, 300, (2, 32))])
    for p in model.parameters():
        p.requires_grad_(False)
    spon = Spon(sp, 1)
    for a in spon.alphas.values():
        a.requires_grad_(True)
    model.spon = spon  # plain attribute (not a module): lets a test switch the alphas' grad off
    return model


def _sample(hidden, inter, seq_len, layers=2):
    ids = torch.randint(0, 300, (1, seq_len), generator=torch.Generator().manual_seed(1))
    return {"hidden": hidden, "intermediate": inter, "layers": layers, "tokens": seq_len,
            "bytes": saved_activation_bytes(_student(hidden, inter, layers), ids)}


def test_saved_activations_linear_in_tokens_and_nothing_saved_without_alpha_grad():
    a, b = _sample(64, 128, 32), _sample(64, 128, 64)
    assert a["bytes"] > 0 and b["bytes"] == 2 * a["bytes"]
    model = _student(64, 128)
    for p in model.spon.alphas.values():
        p.requires_grad_(False)  # nothing trainable: autograd keeps nothing
    assert saved_activation_bytes(model, torch.randint(0, 300, (1, 16))) == 0


def test_fit_predicts_an_unseen_configuration():
    samples = [_sample(h, i, 32) for h, i in [(64, 128), (64, 256), (128, 128), (128, 512)]]
    coef = fit_activation_coefficients(samples)
    unseen = _sample(96, 384, 48, layers=3)
    est = estimate_training_memory(params=0, hidden=96, intermediate=384, layers=3, vocab=300, batch=1, seq_len=48,
                                   coefficients=coef).activations
    assert abs(est / unseen["bytes"] - 1) < 0.05


def test_estimate_parts():
    e = estimate_training_memory(params=1e9, hidden=100, intermediate=400, layers=10, vocab=1000, batch=2, seq_len=50,
                                 coefficients=(1.0, 0.0, 0.0), weight_bytes=2, chunk_tokens=64, cached_sequences=8)
    assert e.weights == 2e9
    assert e.alpha_state == 16 * 10 * (6 * 100 + 400)
    assert e.activations == 100 * 100 * 4 * 10
    assert e.kl_chunk == 3 * 64 * 1000 * 4
    assert e.teacher_cache == 8 * 50 * 100 * 4
    full, ckpt = (estimate_training_memory(params=1e9, hidden=100, intermediate=400, layers=10, vocab=1000, batch=2,
                                           seq_len=50, coefficients=(6.75, 4.0, 6.0), gradient_checkpointing=c)
                  for c in (False, True))
    assert ckpt.activations == 100 * 100 * 4 * 10 + full.activations / 10
    assert e.total == sum(v for k, v in e.to_dict().items() if k != "total")
