"""Shared helpers for the tests: tiny random models of each supported family."""

from __future__ import annotations

import torch

from spon_exp.models.loading import load_model

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"]


def tiny(family: str = "llama"):
    return load_model(f"tiny-random:{family}")


def random_ids(n: int = 4, length: int = 32, seed: int = 0, vocab: int = 250) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))
