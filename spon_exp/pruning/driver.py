"""Layer-by-layer calibration, the order of both reference codes (Wanda's ``prune_wanda`` /
``prune_sparsegpt``, SparseGPT's ``llama_sequential``):

1. one forward of the decoder over the calibration batches records block 0's input hidden
   states and the other arguments every block receives (rotary embeddings, masks; KV caches
   dropped), so a block can be run on its own;
2. for each block in order: one forward of the block on its inputs fills each projection
   input's statistic (q/k/v share one input, gate/up another: one statistic each); then all
   seven projections are pruned; then the block, now pruned, runs again on the same inputs,
   and its outputs are the next block's inputs.

So block ``k`` is calibrated on what the already pruned blocks ``0 … k−1`` produce, while the
projections inside one block see that block's unpruned activations (neither reference prunes
inside a block sequentially by default; SparseGPT's ``--true-sequential`` is not offered).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
from torch import nn

from spon_exp.models.adapters import PROJECTIONS, DecoderBlock, Projection, find_decoder_blocks
from spon_exp.pruning.base import Pruner
from spon_exp.sparsifiers.hooks import HookSet

log = logging.getLogger(__name__)

#: Names under which transformers passes a decoder block its KV cache: never replayed
CACHE_KWARGS = ("past_key_values", "past_key_value", "cache", "layer_past")


def _is_cache(name: str, value) -> bool:
    from transformers.cache_utils import Cache

    return name in CACHE_KWARGS or isinstance(value, Cache)


def _to(value, device: torch.device):
    """``value`` (tensors in tuples, lists and dicts) on ``device``."""
    if torch.is_tensor(value):
        return value.to(device)
    if type(value) in (tuple, list):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


class BlockCalls:
    """Per calibration batch: block 0's input hidden states, and each block's other arguments."""

    def __init__(self, model: nn.Module, blocks: list[DecoderBlock], batches: Iterable[torch.Tensor]):
        self.hidden: list[torch.Tensor] = []
        self.arguments: list[dict[int, tuple[bool, tuple, dict]]] = []
        current: dict[int, tuple[bool, tuple, dict]] = {}

        def hook(index: int):
            def record(module, args, kwargs):
                positional = bool(args)
                hidden = args[0] if positional else kwargs["hidden_states"]
                if index == 0:
                    self.hidden.append(hidden.detach())
                rest = {k: v for k, v in kwargs.items() if k != "hidden_states" and not _is_cache(k, v)}
                if "use_cache" in rest:
                    rest["use_cache"] = False
                current[index] = (positional, tuple(args[1:]), rest)
            return record

        body = model.get_decoder() if hasattr(model, "get_decoder") else model  # no LM head
        device = next(model.parameters()).device
        with HookSet() as hooks, torch.no_grad():
            for b in blocks:
                hooks.pre(b.module, hook(b.index), with_kwargs=True)
            for batch in batches:
                body(input_ids=batch.to(device), use_cache=False)
                self.arguments.append(dict(current))
                current.clear()

    def run(self, block: DecoderBlock, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """``block`` on each batch's ``hidden`` with the arguments it received; its outputs."""
        device = block.projections["q_proj"].module.weight.device
        outputs = []
        for h, arguments in zip(hidden, self.arguments):
            positional, args, kwargs = _to(arguments[block.index], device)
            h = h.to(device)
            out = block.module(h, *args, **kwargs) if positional else block.module(hidden_states=h, **kwargs)
            outputs.append((out[0] if isinstance(out, (tuple, list)) else out).detach())
        return outputs


def block_statistics(pruner: Pruner, block: DecoderBlock, calls: BlockCalls, hidden: list[torch.Tensor]) -> dict:
    """``{site: statistic}`` of the block's projection inputs over one forward of the block."""
    stats: dict = {}
    with HookSet() as hooks:
        for name in PROJECTIONS:
            p = block.projections[name]
            if p.site not in stats:  # q/k/v (gate/up) read one tensor: its statistic is computed once
                stat = stats[p.site] = pruner.statistic(p.module.in_features, p.module.weight.device)
                hooks.pre(p.module, lambda module, args, stat=stat: stat.add(args[0]))
        calls.run(block, hidden)
    return stats


@torch.no_grad()
def prune_model(model: nn.Module, batches: Iterable[torch.Tensor], pruner: Pruner,
                on_pruned: Callable[[Projection, torch.Tensor], None] | None = None,
                on_statistics: Callable[[DecoderBlock, dict], None] | None = None) -> dict[str, float]:
    """Prune every projection of every decoder block in place (see the module docstring);
    returns each projection's pruned fraction by key (``"3.q_proj"``). ``on_pruned(proj, keep)``
    receives each keep mask; ``on_statistics(block, stats)`` each block's statistics."""
    from tqdm.auto import tqdm

    blocks = find_decoder_blocks(model)
    calls = BlockCalls(model, blocks, batches)
    hidden, calls.hidden = calls.hidden, []  # block 0's inputs: kept once, as the loop's list
    pruned: dict[str, float] = {}
    for block in tqdm(blocks, desc=f"pruning ({pruner.label})", leave=False):
        stats = block_statistics(pruner, block, calls, hidden)
        if on_statistics is not None:
            on_statistics(block, stats)
        for name in PROJECTIONS:
            p = block.projections[name]
            try:
                weight, keep = pruner.prune(p.module.weight, stats[p.site])
            except torch.linalg.LinAlgError as e:
                raise RuntimeError(f"{pruner.label}: pruning {p.module_path} failed ({e}); its calibration "
                                   f"inputs may hold inf/nan (try float32 or more calibration windows)") from None
            p.module.weight.copy_(weight)
            pruned[p.key] = 1.0 - keep.float().mean().item()
            if on_pruned is not None:
                on_pruned(p, keep)
        del stats
        hidden = calls.run(block, hidden)  # the pruned block's outputs feed the next block
        log.debug("block %d pruned: %s", block.index, {n: round(pruned[f"{block.index}.{n}"], 4) for n in PROJECTIONS})
    return pruned
