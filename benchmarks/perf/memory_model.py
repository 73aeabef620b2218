"""Peak memory of SPON α training: measured parts and a model to extrapolate them.

Training holds, besides the runtime itself:

* the weights, once (the teacher is the same weights with the hooks switched off);
* α, its gradient and AdamW's two moments, float32: ``4 x 4 B`` per α entry, i.e.
  ``count x (6·H + I)`` entries per layer for all seven projections (q, k, v, gate, up read
  ``H`` inputs, o reads ``heads x head_dim`` = ``H`` in the usual models, down reads ``I``);
* the tensors autograd saves for the student's backward: measured exactly by
  :func:`saved_activation_bytes` (distinct storages packed by ``saved_tensors_hooks``,
  parameters excluded), and modelled as ``tokens x layers x 4 B x (a·H + b·I + c)``;
* the chunked head + KL: three ``[chunk, vocab]`` float32 buffers (``logits_chunk_tokens``
  tokens per chunk), never the full ``[tokens, vocab]`` logits;
* the teacher's final hidden states, one slot per training sequence (``cache_teacher``):
  ``sequences x seq_len x H x 4 B``, and the ``[tokens, H]`` gradient of the student's.

:func:`estimate_training_memory` adds these up for any model size; the coefficients
``a, b, c`` come from :func:`fit_activation_coefficients` over measured configurations
(``training_memory.py`` beside it fits them on tiny models and checks the fit on the packaged
model). Used by that script (``from memory_model import ...``) and by ``tests/test_memory.py``
(``from benchmarks.perf.memory_model import ...``, from the repository root).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from spon_exp.models.head import final_hidden

KL_CHUNK_BUFFERS = 3  # [chunk, vocab] float32 buffers alive at once in the chunked KL (4 with soft-capping)


def saved_activation_bytes(model: nn.Module, input_ids: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward of one forward of ``model`` (with hooks as they
    are: sparsifier and SPON on). Each storage counts once; parameters and buffers, which are
    resident anyway, do not count."""
    resident = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in resident:
            storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        h = final_hidden(model, input_ids)
    del h
    return sum(storages.values())


def fit_activation_coefficients(samples: list[dict]) -> tuple[float, float, float]:
    """Least-squares ``a, b, c`` in ``bytes / (tokens · layers · 4) = a·H + b·I + c`` over
    samples with keys ``bytes, tokens, layers, hidden, intermediate``."""
    rows = torch.tensor([[s["hidden"], s["intermediate"], 1.0] for s in samples], dtype=torch.float64)
    y = torch.tensor([s["bytes"] / (s["tokens"] * s["layers"] * 4) for s in samples], dtype=torch.float64)
    coef = torch.linalg.lstsq(rows, y[:, None]).solution[:, 0]
    return float(coef[0]), float(coef[1]), float(coef[2])


@dataclass
class MemoryEstimate:
    weights: float
    alpha_state: float
    activations: float
    kl_chunk: float
    teacher_cache: float
    hidden_grad: float

    @property
    def total(self) -> float:
        return sum(asdict(self).values())

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def estimate_training_memory(*, params: float, hidden: int, intermediate: int, layers: int, vocab: int,
                             batch: int, seq_len: int, coefficients: tuple[float, float, float],
                             weight_bytes: int = 4, activation_bytes: int = 4, spon_count: int = 1,
                             chunk_tokens: int = 1024, cached_sequences: int = 0,
                             gradient_checkpointing: bool = False) -> MemoryEstimate:
    """Bytes of each part of α training (see the module docstring).

    ``activation_bytes``: 4 for float32 activations, 2 for bf16/fp16 (the saved tensors scale
    with it; α, its optimiser state and the KL buffers stay float32). With
    ``gradient_checkpointing`` only each layer's input is kept, plus one layer's activations
    while it is recomputed.
    """
    a, b, c = coefficients
    tokens = batch * seq_len
    per_layer = tokens * (a * hidden + b * intermediate + c) * activation_bytes
    if gradient_checkpointing:
        activations = tokens * hidden * activation_bytes * layers + per_layer
    else:
        activations = per_layer * layers
    return MemoryEstimate(
        weights=params * weight_bytes,
        alpha_state=4 * 4 * spon_count * layers * (6 * hidden + intermediate),
        activations=activations,
        kl_chunk=KL_CHUNK_BUFFERS * min(chunk_tokens, tokens) * vocab * 4,
        teacher_cache=cached_sequences * seq_len * hidden * activation_bytes,
        hidden_grad=2 * tokens * hidden * 4,
    )
