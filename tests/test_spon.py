import pytest
import torch
import torch.nn.functional as F

from spon_exp.models.loading import load_model
from spon_exp.sparsifiers import build_sparsifier
from spon_exp.spon import (FoldMismatchError, Spon, TrainConfig, export_checkpoint, fold_alpha, fold_alpha_checked,
                           load_sparse_state, save_sparse_state, train_alpha)
from spon_exp.spon.alpha import dense_mode
from spon_exp.models.head import final_hidden
from spon_exp.spon.train import AlphaTrainingError, kl_loss
from tests.helpers import FAMILIES, random_ids, tiny


def setup(family="llama", sparsity=0.5, count=1, projections="all"):
    lm = tiny(family)
    sp = build_sparsifier("teal", sparsity=sparsity).attach(lm.model)
    ids = random_ids(8, 32)
    sp.calibrate(lm.model, ids.split(4))
    spon = Spon(sp, count, projections)
    return lm, sp, spon, ids


@pytest.mark.parametrize("projections,names", [
    ("all", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    ("attention", {"q_proj", "k_proj", "v_proj", "o_proj"}),
    ("mlp", {"gate_proj", "up_proj", "down_proj"}),
    ("down_proj", {"down_proj"}),
    (["q_proj", "gate_proj", "up_proj"], {"q_proj", "gate_proj", "up_proj"}),
])
def test_alpha_shapes_and_projection_choice(projections, names):
    lm, sp, spon, _ = setup(count=3, projections=projections)
    assert {p.name for p in spon.projections} == names
    for p in spon.projections:
        assert spon.alpha(p).shape == (3, p.module.in_features)


def test_spon_adds_w_times_sum_alpha():
    lm, sp, spon, ids = setup(count=2)
    p = spon.projections[0]
    with torch.no_grad():
        spon.alpha(p).normal_()
    x = torch.randn(3, p.module.in_features)
    with sp.disabled():
        out = p.module(x)
    expected = F.linear(x, p.module.weight, spon.original_bias(p)) + p.module.weight @ spon.alpha(p).sum(0)
    assert torch.allclose(out, expected, atol=1e-6)


def test_only_alpha_receives_gradients():
    lm, sp, spon, ids = setup()
    model = lm.model
    for prm in model.parameters():
        prm.requires_grad_(False)
    with torch.no_grad(), dense_mode(sp, spon):
        teacher = final_hidden(model, ids)
    for a in spon.alphas.values():
        a.requires_grad_(True)
    loss = kl_loss(model, final_hidden(model, ids), teacher, chunk_tokens=50)
    loss.backward()
    assert all(prm.grad is None for prm in model.parameters())
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in spon.alphas.values())


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_chunked_kl_matches_autograd_reference(family):
    lm, sp, spon, ids = setup(family)
    model = lm.model
    if family == "gemma3_text":
        model.config.final_logit_softcapping = 5.0  # exercise the soft-capping branch
    with torch.no_grad():
        for a in spon.alphas.values():
            a.normal_(std=0.1)
    with torch.no_grad(), dense_mode(sp, spon):
        teacher_logits = model(ids).logits
        teacher_h = final_hidden(model, ids)
    for a in spon.alphas.values():
        a.requires_grad_(True)
    ref = F.kl_div(F.log_softmax(model(ids).logits, -1).flatten(0, 1), F.log_softmax(teacher_logits, -1).flatten(0, 1),
                   log_target=True, reduction="batchmean")
    ref_grads = torch.autograd.grad(ref, list(spon.alphas.values()))
    ours = kl_loss(model, final_hidden(model, ids), teacher_h, chunk_tokens=37)
    our_grads = torch.autograd.grad(ours, list(spon.alphas.values()))
    assert ours.item() == pytest.approx(ref.item(), rel=1e-4)
    for g, r in zip(our_grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-3, atol=1e-7)


def test_training_lowers_kl_and_records_curve():
    lm, sp, spon, ids = setup()
    steps = []
    plain = dict(warmup_steps=0, weight_decay=0.0, average="none")  # the optimiser alone, not the default recipe
    result = train_alpha(lm.model, sp, spon, ids, TrainConfig(lr=3e-2, steps=25, batch_size=4, **plain),
                         on_step=lambda s, loss, lr: steps.append(s))
    assert len(result.losses) == 25 and steps == list(range(25))
    assert sum(result.losses[-5:]) < sum(result.losses[:5])
    assert all(not p.requires_grad for p in lm.model.parameters())


def test_epochs_set_the_step_count():
    lm, sp, spon, ids = setup()
    result = train_alpha(lm.model, sp, spon, ids, TrainConfig(lr=1e-3, steps=None, epochs=1.5, batch_size=2))
    assert result.steps == 6  # 8 sequences / batch 2 = 4 steps per epoch


@pytest.mark.parametrize("option", ["gradient_checkpointing", "cache_teacher"])
def test_memory_and_speed_options_give_the_same_alpha(option):
    alphas = []
    for on in (False, True):
        lm, sp, spon, ids = setup()
        train_alpha(lm.model, sp, spon, ids, TrainConfig(lr=1e-2, steps=3, batch_size=2, **{option: on}))
        alphas.append(torch.cat([a.detach().flatten() for a in spon.alphas.values()]))
    assert torch.allclose(alphas[0], alphas[1], atol=1e-6)


def test_nan_loss_raises_a_clear_error():
    lm, sp, spon, ids = setup()
    with pytest.raises(AlphaTrainingError, match="lower spon.lr"):
        train_alpha(lm.model, sp, spon, ids, TrainConfig(lr=float("inf"), steps=3))


def test_resumed_training_matches_uninterrupted(tmp_path):
    cfg = TrainConfig(lr=1e-2, steps=8, batch_size=2, checkpoint_every=3)
    lm, sp, spon, ids = setup()
    full = train_alpha(lm.model, sp, spon, ids, cfg)
    reference = spon.alpha_state()

    lm, sp, spon, ids = setup()
    ckpt = tmp_path / "alpha.ckpt"

    class Interrupt(Exception):
        pass

    def stop_at_5(step, loss, lr):
        if step == 4:
            raise Interrupt
    with pytest.raises(Interrupt):
        train_alpha(lm.model, sp, spon, ids, cfg, on_step=stop_at_5, checkpoint_path=ckpt)
    assert ckpt.exists()
    lm, sp, spon, ids = setup()
    resumed = train_alpha(lm.model, sp, spon, ids, cfg, checkpoint_path=ckpt)
    assert resumed.resumed_from == 3
    assert resumed.losses == pytest.approx(full.losses, rel=1e-6)
    for k, v in spon.alpha_state().items():
        assert torch.allclose(v, reference[k], atol=1e-7)


@pytest.mark.parametrize("average", ["ema", "polyak"])
def test_iterate_average_is_the_average_of_the_iterates(average):
    cfg = TrainConfig(lr=1e-2, steps=6, batch_size=2, average=average, ema_decay=0.8, average_from=0.5)
    lm, sp, spon, ids = setup()
    iterates = []
    train_alpha(lm.model, sp, spon, ids, cfg,
                on_step=lambda *_: iterates.append({k: v.clone() for k, v in spon.alpha_state().items()}))
    got = spon.alpha_state()
    for key in got:
        seq = [it[key] for it in iterates]  # alpha after each step
        if average == "polyak":  # the mean of steps 3, 4, 5
            expected = torch.stack(seq[3:]).mean(0)
        else:
            expected = seq[0].clone()
            for x in seq[1:]:
                expected = 0.8 * expected + 0.2 * x
        assert torch.allclose(got[key], expected, atol=1e-6)
    last = torch.cat([v.flatten() for v in iterates[-1].values()])
    assert not torch.allclose(torch.cat([v.flatten() for v in got.values()]), last, atol=1e-6)  # not the last iterate


def test_resumed_training_keeps_the_iterate_average(tmp_path):
    cfg = TrainConfig(lr=1e-2, steps=8, batch_size=2, checkpoint_every=3, average="ema", ema_decay=0.7)
    lm, sp, spon, ids = setup()
    train_alpha(lm.model, sp, spon, ids, cfg)
    reference = spon.alpha_state()
    lm, sp, spon, ids = setup()
    ckpt = tmp_path / "alpha.ckpt"

    def stop(step, loss, lr):
        if step == 4:
            raise RuntimeError("stop")
    with pytest.raises(RuntimeError):
        train_alpha(lm.model, sp, spon, ids, cfg, on_step=stop, checkpoint_path=ckpt)
    lm, sp, spon, ids = setup()
    assert train_alpha(lm.model, sp, spon, ids, cfg, checkpoint_path=ckpt).resumed_from == 3
    for k, v in spon.alpha_state().items():
        assert torch.allclose(v, reference[k], atol=1e-7)


def test_mean_dropped_init_is_mean_of_dropped_entries():
    lm, sp, spon, ids = setup(count=2)
    spon.initialise("mean_dropped", lm.model, sp, [ids])
    p = next(p for p in spon.projections if p.name == "q_proj" and p.layer == 0)
    captured = {}
    h = p.module.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]), prepend=True)
    with torch.no_grad(), dense_mode(sp, spon):
        lm.model(ids)
    h.remove()
    x = captured["x"].reshape(-1, p.module.in_features)
    dropped = torch.where(x.abs() > sp.thresholds[p.key], torch.zeros_like(x), x)
    assert torch.allclose(spon.alpha(p).sum(0), dropped.mean(0), atol=1e-5)


def trained(family):
    lm, sp, spon, ids = setup(family)
    train_alpha(lm.model, sp, spon, ids, TrainConfig(lr=3e-2, steps=5, batch_size=4))
    return lm, sp, spon, ids


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("method", ["teal", "wina", "rsparse", "larosa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_folded_model_computes_the_trained_models_logits_bit_for_bit(family, method, dtype):
    """α enters as the bias that folding stores: the model SPON was trained and evaluated
    with and the folded model give identical logits (a difference in the last bit would be
    amplified by the thresholds)."""
    lm = load_model(f"tiny-random:{family}", dtype=dtype)
    sp = build_sparsifier(method, sparsity=0.5).attach(lm.model)
    ids = random_ids(8, 32)
    sp.calibrate(lm.model, ids.split(4))
    spon = Spon(sp, 2)
    train_alpha(lm.model, sp, spon, ids, TrainConfig(lr=3e-2, steps=3, batch_size=4))
    with torch.no_grad():
        before = lm.model(ids).logits
        with spon.disabled():
            sparse_only = lm.model(ids).logits
    biases, report = fold_alpha_checked(lm.model, spon, ids[:4], checked_on="test batch")
    with torch.no_grad():
        after = lm.model(ids).logits
    assert not torch.equal(before, sparse_only)  # alpha really did something
    assert torch.equal(before, after)
    assert report == {"max_abs_logit_diff": 0.0, "checked_on": "test batch"}
    for p in spon.projections:  # plain layers again, holding the stored biases
        assert type(p.module) is torch.nn.Linear and torch.equal(p.module.bias, biases[p.key])
        assert p.module.bias.dtype == p.module.weight.dtype


def test_fold_check_fails_loudly_when_logits_differ(monkeypatch):
    lm, sp, spon, ids = trained("llama")
    import spon_exp.spon.fold as fold

    original = fold.fold_alpha

    def off_by_one_ulp(s):
        biases = original(s)
        for p in s.projections:
            p.module.bias.data = torch.nextafter(p.module.bias.data, torch.full_like(p.module.bias.data, 1e9))
        return biases

    monkeypatch.setattr(fold, "fold_alpha", off_by_one_ulp)
    with pytest.raises(FoldMismatchError, match="changed the logits"):
        fold_alpha_checked(lm.model, spon, ids[:4])


def test_spon_detach_restores_the_original_layers():
    lm = load_model("tiny-random:qwen2")  # q/k/v carry biases, the rest none
    sp = build_sparsifier("teal", sparsity=0.5).attach(lm.model)
    before = {n: (None if m.bias is None else m.bias.clone()) for n, m in lm.model.named_modules()
              if isinstance(m, torch.nn.Linear)}
    spon = Spon(sp, 1)
    with torch.no_grad():
        for a in spon.alphas.values():
            a.normal_()
    spon.detach()
    after = {n: m.bias for n, m in lm.model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert before.keys() == after.keys()
    for n, b in before.items():
        assert (b is None and after[n] is None) or torch.equal(b, after[n]), n
    assert all(type(p.module) is torch.nn.Linear for p in spon.projections)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_and_reattach_reproduce_folded_logits(family, tmp_path):
    lm, sp, spon, ids = trained(family)
    biases = fold_alpha(spon)
    save_sparse_state(tmp_path, sp, biases)
    with torch.no_grad():
        folded = lm.model(ids).logits
    fresh = tiny(family)  # same seed -> same random weights
    load_sparse_state(fresh.model, tmp_path)
    with torch.no_grad():
        reloaded = fresh.model(ids).logits
    assert torch.equal(folded, reloaded)


def test_complete_checkpoint_loads_with_plain_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    lm, sp, spon, ids = trained("llama")
    biases = fold_alpha(spon)
    save_sparse_state(tmp_path / "state", sp, biases)
    with torch.no_grad():
        folded = lm.model(ids).logits
    out = export_checkpoint(lm.model, lm.tokenizer, tmp_path / "checkpoint")
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert plain.config.attention_bias and plain.config.mlp_bias
    load_sparse_state(plain, tmp_path / "state")
    with torch.no_grad():
        reloaded = plain(ids).logits
    assert torch.allclose(folded, reloaded, atol=1e-6)


def test_checkpoint_export_is_skipped_where_config_has_no_bias_flags(tmp_path):
    lm, sp, spon, ids = trained("qwen3")
    fold_alpha(spon)
    if hasattr(lm.model.config, "mlp_bias"):
        pytest.skip("this transformers version gives Qwen3 an mlp_bias flag")
    assert export_checkpoint(lm.model, lm.tokenizer, tmp_path / "c") is None


def test_spon_requires_attached_sparsifier():
    from spon_exp.sparsifiers import TealSparsifier

    with pytest.raises(RuntimeError, match="Attach the sparsifier"):
        Spon(TealSparsifier(0.5), 1)
    lm = load_model("tiny-random:llama")
    sp = build_sparsifier("teal", sparsity=0.5).attach(lm.model)
    with pytest.raises(ValueError, match="SPON count must be >= 1"):
        Spon(sp, 0)


def test_train_config_takes_the_spon_config_training_settings():
    import dataclasses

    from omegaconf import OmegaConf

    from spon_exp.config import SponConfig
    from spon_exp.spon.train import TrainOptions

    node = OmegaConf.structured(SponConfig(lr=0.01, steps=None, epochs=2.0, schedule="cosine", count=3))
    tcfg = TrainConfig.from_options(node, seed=7)
    assert (tcfg.lr, tcfg.steps, tcfg.epochs, tcfg.schedule, tcfg.seed) == (0.01, None, 2.0, "cosine", 7)
    assert tcfg.checkpoint_every == 20 and TrainConfig().checkpoint_every == 0  # a run checkpoints, the library not
    assert all(getattr(tcfg, f.name) == node[f.name] for f in dataclasses.fields(TrainOptions))
