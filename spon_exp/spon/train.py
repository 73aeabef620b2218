"""Train SPON alphas: model frozen, KL(dense ‖ sparse) over the final logits.

The teacher is the same model with sparsity and SPON switched off, so no second copy of
the weights exists. Logits are never materialised for the whole batch: the final hidden
states of teacher and student go through a fused, chunked head + KL whose backward is
computed chunk by chunk in the forward pass (one chunk of logits alive at a time).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from spon_exp.interrupts import signals_deferred
from spon_exp.models.head import final_hidden, head_and_softcap
from spon_exp.sparsifiers.base import Sparsifier
from spon_exp.spon.alpha import Spon, dense_mode
from spon_exp.tracking.store import read_entry, write_entry

log = logging.getLogger(__name__)

SCHEDULES = ("constant", "cosine", "linear")
AVERAGES = ("none", "ema", "polyak")


@dataclass
class TrainOptions:
    """The training settings a config chooses (``spon.*``: :class:`spon_exp.config.SponConfig`
    extends this class, and :meth:`TrainConfig.from_options` reads them back)."""

    # The defaults are the recipe `spon-exp` trains (conf/spon/tuned.yaml selects them; the Optuna
    # study of sweeps/tune_spon_cpu.yaml found them on the validation split, benchmarks/RESULTS.md
    # "SPON recipe search"), so the library and the CLI train the same α. conf/spon/default.yaml
    # spells out the earlier recipe (lr 3e-4, no warm-up, no weight decay, no averaging).
    lr: float = 0.0006466422717414558  # the value the study tried, unrounded
    steps: Optional[int] = 150  # optimiser steps; null -> use epochs
    epochs: Optional[float] = None
    batch_size: int = 1
    weight_decay: float = 0.01
    schedule: str = "constant"  # constant / cosine / linear
    warmup_steps: int = 10
    # the α that training returns: the last iterate (none), an exponential moving average of the
    # iterates (ema, decay ema_decay per step), or their plain mean from step average_from·steps on (polyak)
    average: str = "ema"
    ema_decay: float = 0.98
    average_from: float = 0.5
    max_grad_norm: Optional[float] = None
    gradient_checkpointing: bool = False
    logits_chunk_tokens: int = 1024
    # Keep the teacher's final hidden states of each training sequence (computed, dense, the first
    # time the sequence is drawn): a revisit costs no teacher forward, for N x L x hidden floats
    # (N = calib.num_sequences, L = calib.seq_len). Off for corpora too large to hold: the teacher
    # then runs every step.
    cache_teacher: bool = True
    checkpoint_every: int = 0  # steps between resumable training checkpoints; 0 = none


@dataclass
class TrainConfig(TrainOptions):
    betas: tuple[float, float] = (0.9, 0.999)
    seed: int = 0
    log_every: int = 1

    @classmethod
    def from_options(cls, options, **extra) -> TrainConfig:
        """The :class:`TrainOptions` fields of ``options`` (a ``spon`` config node) plus ``extra``
        (``seed=cfg.seed``)."""
        return cls(**{f.name: getattr(options, f.name) for f in fields(TrainOptions)}, **extra)


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    resumed_from: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class AlphaTrainingError(FloatingPointError):
    pass


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: the step reached and the step a re-run resumes from (the
    last checkpoint's, or where this attempt started)."""

    def __init__(self, step: int, resume_step: int):
        self.step, self.resume_step = step, resume_step
        super().__init__(f"interrupted at step {step}; re-run the same command to resume from step {resume_step}")


class _ChunkedKL(torch.autograd.Function):
    """sum_t KL(softmax(head(h_t)) ‖ softmax(head(h_s))) with dL/dh_s computed chunk-wise
    in the forward pass (the head weight is frozen, so h_s is the only input needing grad)."""

    @staticmethod
    def forward(ctx, h_student, h_teacher, weight, bias, cap, chunk):
        total = h_student.new_zeros((), dtype=torch.float32)
        grad = torch.empty_like(h_student)
        # at most three [chunk, vocab] float32 buffers alive at once (four with soft-capping)
        for start in range(0, h_student.shape[0], chunk):
            hs, ht = h_student[start:start + chunk], h_teacher[start:start + chunk]
            zs = F.linear(hs, weight, bias).float()
            ts = None
            if cap:
                ts = torch.tanh(zs / cap)
                zs = ts * cap
            log_ps = F.log_softmax(zs, -1)
            del zs
            zt = F.linear(ht, weight, bias).float()
            if cap:
                zt = torch.tanh(zt / cap) * cap
            log_pt = F.log_softmax(zt, -1)
            del zt
            pt = log_pt.exp()
            total += torch.dot(pt.view(-1), log_pt.sub_(log_ps).view(-1))  # sum p_t (log p_t - log p_s)
            del log_pt
            gz = log_ps.exp_().sub_(pt)  # d KL / d z_student = p_s - p_t
            del pt
            if ts is not None:
                gz.mul_(1 - ts * ts)
            grad[start:start + chunk] = (gz.to(weight.dtype) @ weight).to(grad.dtype)
            del gz, ts
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None, None, None


def kl_loss(model: nn.Module, h_student: torch.Tensor, h_teacher: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """Mean over tokens of KL(teacher ‖ student) from final hidden states, chunked."""
    head, cap = head_and_softcap(model)
    hs = h_student.reshape(-1, h_student.shape[-1])
    ht = h_teacher.reshape(-1, h_teacher.shape[-1])
    total = _ChunkedKL.apply(hs, ht, head.weight, head.bias, cap, chunk_tokens)
    return total / hs.shape[0]


def _lr_factor(cfg: TrainConfig, step: int, total: int) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "linear":
        return 1.0 - progress
    raise ValueError(f"Unknown schedule {cfg.schedule!r}; choose from {SCHEDULES}")


def total_steps(cfg: TrainConfig, num_sequences: int) -> int:
    per_epoch = math.ceil(num_sequences / cfg.batch_size)
    if cfg.steps is not None:
        return int(cfg.steps)
    if cfg.epochs is None:
        raise ValueError("Set spon steps or epochs")
    return max(1, int(round(cfg.epochs * per_epoch)))


def batch_indices(step: int, num_sequences: int, batch_size: int, seed: int) -> torch.Tensor:
    """Sequences of one step: a seeded permutation per epoch, so a resumed run sees the
    same batches as an uninterrupted one without restoring any RNG."""
    per_epoch = math.ceil(num_sequences / batch_size)
    epoch, within = divmod(step, per_epoch)
    perm = torch.randperm(num_sequences, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[within * batch_size:(within + 1) * batch_size]


class _TeacherCache:
    """The dense teacher's final hidden states, computed the first time a sequence is drawn
    and kept (``keep=True``) for later epochs: a sequence never drawn costs nothing, one drawn
    e times costs one teacher forward instead of e."""

    def __init__(self, model: nn.Module, sparsifier: Sparsifier, spon: Spon, sequences: torch.Tensor,
                 device: torch.device, keep: bool):
        self.model, self.sparsifier, self.spon, self.sequences, self.device = model, sparsifier, spon, sequences, device
        self.keep = keep
        self.states: torch.Tensor | None = None  # [N, L, hidden], allocated at the first step
        self.filled = torch.zeros(sequences.shape[0], dtype=torch.bool)

    @torch.no_grad()
    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        with dense_mode(self.sparsifier, self.spon):
            return final_hidden(self.model, ids)

    def hidden(self, idx: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if not self.keep:
            return self._forward(ids)
        missing = idx[~self.filled[idx]]
        if len(missing):
            h = self._forward(self.sequences[missing].to(self.device))
            if self.states is None:
                self.states = h.new_empty((self.sequences.shape[0], *h.shape[1:]))
            self.states[missing.to(h.device)] = h
            self.filled[missing] = True
        return self.states[idx.to(self.states.device)]


CHECKPOINT_FILE = "train.ckpt"


class IterateAverage:
    """The average of α over training's iterates (``TrainOptions.average``): ``ema`` with
    ``decay`` per step from the first iterate on, ``polyak`` the plain mean of the iterates of
    steps ``>= start``. ``state()`` / ``load()`` carry it through a checkpoint."""

    def __init__(self, kind: str, decay: float, start: int):
        if kind not in AVERAGES:
            raise ValueError(f"spon.average must be one of {AVERAGES}, got {kind!r}")
        self.kind, self.decay, self.start = kind, decay, start
        self.values: dict[str, torch.Tensor] | None = None
        self.count = 0

    def update(self, step: int, alpha_state: Callable[[], dict[str, torch.Tensor]]) -> None:
        if self.kind == "none" or (self.kind == "polyak" and step < self.start):
            return
        alpha = alpha_state()
        if self.values is None:
            self.values, self.count = {k: v.detach().clone() for k, v in alpha.items()}, 1
            return
        self.count += 1
        weight = (1.0 - self.decay) if self.kind == "ema" else 1.0 / self.count
        for k, v in alpha.items():
            self.values[k].add_(v.detach() - self.values[k], alpha=weight)

    def state(self) -> dict:
        return {"values": self.values, "count": self.count}

    def load_into(self, spon) -> None:
        """Give ``spon`` the averaged α (nothing without averaging)."""
        if self.values is not None:
            spon.load_alpha_state({k: v.clone() for k, v in self.values.items()})

    def load(self, state: dict | None) -> None:
        if state:
            self.values, self.count = state["values"], state["count"]


def _read_checkpoint(folder: Path, spon: Spon, optimizer: torch.optim.Optimizer) -> dict:
    """Load a checkpoint entry into ``spon`` and ``optimizer``; raises, changing neither,
    when it does not fit them (the store then moves it aside)."""
    state = torch.load(folder / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    expected = {k: tuple(v.shape) for k, v in spon.alpha_state().items()}
    if {k: tuple(v.shape) for k, v in state["alpha"].items()} != expected:
        raise ValueError("its alphas do not match this model's projections")
    if not len(state["losses"]) == len(state["lrs"]) == state["step"]:
        raise ValueError(f"its loss curve does not match its step {state['step']}")
    optimizer.load_state_dict(state["optimizer"])  # checks the groups before changing anything
    spon.load_alpha_state(state["alpha"])
    return state


def _set_checkpointing(model: nn.Module, on: bool) -> None:
    # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_*
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def _only_alpha_trainable(model: nn.Module, spon: Spon) -> list[torch.nn.Parameter]:
    """Freeze the model; the alphas are the only parameters that get gradients."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(spon.alphas.values())
    for p in params:
        p.requires_grad_(True)
    return params


def _step(model: nn.Module, teacher: _TeacherCache, optimizer: torch.optim.Optimizer, params: list, idx: torch.Tensor,
          ids: torch.Tensor, lr: float, cfg: TrainConfig, step: int) -> float:
    """One optimiser step on the KL of the sequences ``idx``; returns the loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    h_teacher = teacher.hidden(idx, ids)
    loss = kl_loss(model, final_hidden(model, ids), h_teacher, cfg.logits_chunk_tokens)
    value = float(loss.detach())
    if not math.isfinite(value):
        raise AlphaTrainingError(
            f"SPON training loss became {value} at step {step} (lr {lr:g}); lower spon.lr or use bf16→fp32")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    optimizer.step()
    if not all(torch.isfinite(p).all() for p in params):
        raise AlphaTrainingError(f"SPON alphas became non-finite at step {step} (lr {lr:g}); lower spon.lr")
    return value


def _save_checkpoint(ckpt: Path, spon: Spon, optimizer: torch.optim.Optimizer, next_step: int,
                     result: TrainResult, average: IterateAverage) -> int:
    """Write the resumable state (α, optimiser, the step to resume at, the curve so far, the
    iterate average)."""
    state = {"alpha": spon.alpha_state(), "optimizer": optimizer.state_dict(), "step": next_step,
             "losses": result.losses, "lrs": result.lrs, "average": average.state()}
    write_entry(ckpt, lambda d: torch.save(state, d / CHECKPOINT_FILE), replace=True)
    return next_step


def _resumed(ckpt: Path | None, spon: Spon, optimizer, average: IterateAverage) -> TrainResult:
    """A fresh result, or the one a checkpoint in ``ckpt`` holds (α, optimiser state and the
    iterate average loaded from it as well)."""
    result = TrainResult()
    state = None if ckpt is None else read_entry(ckpt, lambda d: _read_checkpoint(d, spon, optimizer),
                                                 "SPON training checkpoint")
    if state is not None:
        result.losses, result.lrs = state["losses"], state["lrs"]
        result.resumed_from = state["step"]
        average.load(state.get("average"))
        log.info("Resuming SPON training from step %d (%s)", result.resumed_from, ckpt)
    return result


def _check_sequences(sequences: torch.Tensor) -> None:
    if sequences.dim() != 2 or sequences.shape[0] == 0:
        raise ValueError(f"Training sequences must be a non-empty [N, L] token tensor, got shape {tuple(sequences.shape)}")


def _checkpoint_due(ckpt: Path | None, cfg: TrainConfig, step: int, steps: int) -> bool:
    """Whether a resumable checkpoint is written after ``step`` (not after the last one)."""
    return ckpt is not None and bool(cfg.checkpoint_every) and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps


def train_alpha(model: nn.Module, sparsifier: Sparsifier, spon: Spon, sequences: torch.Tensor,
                cfg: TrainConfig, on_step: Callable[[int, float, float], None] | None = None,
                checkpoint_path: str | Path | None = None,
                on_start: Callable[[int], None] | None = None) -> TrainResult:
    """Train ``spon``'s alphas on token ``sequences`` [N, L]; returns the loss curve.

    With ``checkpoint_path`` (a cache entry folder, ``tracking.store``) the α, optimiser
    state, step and curve are saved every ``cfg.checkpoint_every`` steps, and a run finding a
    checkpoint there resumes from it; a damaged checkpoint is moved aside with a warning and
    training starts from step 0.
    """
    from tqdm.auto import tqdm

    _check_sequences(sequences)
    device = next(model.parameters()).device
    params = _only_alpha_trainable(model, spon)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    steps = total_steps(cfg, sequences.shape[0])
    average = IterateAverage(cfg.average, cfg.ema_decay, int(cfg.average_from * steps))
    ckpt = Path(checkpoint_path) if checkpoint_path else None
    result = _resumed(ckpt, spon, optimizer, average)
    start_step = result.resumed_from
    if on_start is not None:  # the step training (re)starts from: 0, or the checkpoint's
        on_start(start_step)

    teacher = _TeacherCache(model, sparsifier, spon, sequences, device, cfg.cache_teacher)
    if cfg.gradient_checkpointing:
        _set_checkpointing(model, True)
    was_training = model.training
    model.train(cfg.gradient_checkpointing)  # HF checkpointing is active only in train mode; no dropout in these models
    t0 = time.perf_counter()
    reached = checkpointed = start_step  # for the message of a Ctrl-C
    try:
        bar = tqdm(range(start_step, steps), desc="SPON training", initial=start_step, total=steps)
        for step in bar:
            reached = step
            lr = cfg.lr * _lr_factor(cfg, step, steps)
            idx = batch_indices(step, sequences.shape[0], cfg.batch_size, cfg.seed)
            value = _step(model, teacher, optimizer, params, idx, sequences[idx].to(device), lr, cfg, step)
            average.update(step, spon.alpha_state)
            result.losses.append(value)
            result.lrs.append(lr)
            bar.set_postfix(kl=f"{value:.4f}")
            if on_step is not None and (step % cfg.log_every == 0 or step == steps - 1):
                on_step(step, value, lr)
            if _checkpoint_due(ckpt, cfg, step, steps):
                with signals_deferred():  # a Ctrl-C or SIGTERM meanwhile: the step its message names is on disk
                    checkpointed = _save_checkpoint(ckpt, spon, optimizer, step + 1, result, average)
    except KeyboardInterrupt:
        raise TrainingInterrupted(reached, checkpointed) from None
    finally:
        if cfg.gradient_checkpointing:
            _set_checkpointing(model, False)
        model.train(was_training)
        for p in params:
            p.requires_grad_(False)
    average.load_into(spon)  # training returns the averaged α
    result.steps = steps
    result.seconds = time.perf_counter() - t0
    return result
