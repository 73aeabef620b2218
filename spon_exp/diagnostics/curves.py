"""The always-kept curve of a keep mask (the paper's Figure 1) and the sequence lengths
a diagnosis reports it at."""

from __future__ import annotations

import math

import torch

GRID_POINTS = 64  # sequence lengths kept in the JSON (log-spaced, 1 and max_length included)


def length_grid(max_length: int, points: int = GRID_POINTS) -> list[int]:
    """Log-spaced sequence lengths 1 … max_length (each once)."""
    if max_length <= points:
        return list(range(1, max_length + 1))
    grid = {1, max_length}
    for i in range(points):
        grid.add(round(math.exp(math.log(max_length) * i / (points - 1))))
    return sorted(g for g in grid if 1 <= g <= max_length)


def always_kept_curve(mask: torch.Tensor, dense_head: int = 0) -> torch.Tensor:
    """``[T]``: for each t, the fraction of channels kept at every one of the first t tokens
    of ``mask`` (``[T, C]`` bool); the first ``dense_head`` tokens count as all kept."""
    if dense_head:
        mask = mask.clone()
        mask[:dense_head] = True
    return torch.cummin(mask.to(torch.uint8), dim=0).values.float().mean(dim=-1)
