"""From the decoder's final hidden states to logits: the one place that knows where the LM
head is, applies its soft-capping, and computes logits a chunk of tokens at a time (so no
``[tokens, vocab]`` tensor is ever held). Perplexity, the fold check and SPON's KL use it."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn


def final_hidden(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Last hidden states before the LM head (the base model's output, final norm applied)."""
    out = model.get_decoder()(input_ids=input_ids, use_cache=False)
    return out.last_hidden_state


def head_and_softcap(model: nn.Module) -> tuple[nn.Module, float | None]:
    """The output embedding and the config's final-logit soft-capping (Gemma), if any."""
    return model.get_output_embeddings(), getattr(model.config, "final_logit_softcapping", None)


def logits(head: nn.Module, h: torch.Tensor, cap: float | None) -> torch.Tensor:
    """float32 logits of hidden states ``h``, soft-capped where the model caps them."""
    z = head(h).float()
    if cap:
        z = torch.tanh(z / cap) * cap
    return z


def chunked_logits(model: nn.Module, hidden: torch.Tensor, chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, logits of hidden[start:start + chunk])`` over the rows of 2-D ``hidden``."""
    head, cap = head_and_softcap(model)
    for start in range(0, hidden.shape[0], chunk):
        yield start, logits(head, hidden[start:start + chunk], cap)
