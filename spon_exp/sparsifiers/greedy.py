"""Greedy per-projection sparsity allocation (TEAL's ``greedyopt.py``; WINA's reference reuses it).

Per block, starting from 0, repeatedly raise the one projection's sparsity by ``step / w_p``
(``w_p`` = its parameter count relative to the block's q_proj, read from the module shapes)
that adds the least error to the block output over the last ``greedy_last_fraction`` of the
tokens, until the parameter-weighted block sparsity reaches the target. Every block gets the
same target. The search runs on dense block inputs (captured once, :class:`BlockInputs`); its
trajectory (per-projection sparsities as a function of block sparsity) is kept per block
(``greedy_lookup``, saved in the state) and re-used for any target it covers; a higher target
extends it from where it stopped.

A replay does only the work a candidate changes: o_proj and the MLP run on the scored tokens
only (:class:`SuffixReplay`), and the parts of the block whose upstream projections kept their
sparsity are taken from the step before (:class:`ReplayMemo`: an MLP candidate reuses the
attention, a k candidate reuses q and v). Both are exact: the lookup equals the full replays'.

A method opts in by mixing :class:`GreedyAllocation` into its sparsifier and
:class:`GreedyOptions` into its options, and by saying how a candidate's per-projection
sparsities take effect (``apply`` in :meth:`GreedyAllocation.greedy_search`): TEAL sets
thresholds at those quantiles of the dense site values, WINA sets the top-k counts.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from spon_exp.models.adapters import DecoderBlock, Projection
from spon_exp.sparsifiers.hooks import HookSet

log = logging.getLogger(__name__)

ALLOCATIONS = ("uniform", "greedy")


@dataclass
class GreedyOptions:
    """The allocation options (``sparsifier.allocation`` and ``sparsifier.greedy_*``)."""

    allocation: str = "uniform"  # uniform / greedy (block-wise search of per-projection sparsities)
    greedy_step: float = 0.05  # greedy: each step raises one projection by greedy_step / w_p
    greedy_last_fraction: float = 0.25  # greedy: block error over the last fraction of tokens
    greedy_sequences: Optional[int] = None  # greedy: calibration sequences searched on (null = all)
    greedy_max_sparsity: Optional[float] = None  # greedy: extend the lookup to this (null = the target)

    def __post_init__(self) -> None:
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if not 0.0 < self.greedy_step <= 1.0:
            raise ValueError(f"greedy_step must be in (0, 1], got {self.greedy_step}")
        if not 0.0 < self.greedy_last_fraction <= 1.0:
            raise ValueError(f"greedy_last_fraction must be in (0, 1], got {self.greedy_last_fraction}")
        if self.greedy_sequences is not None and self.greedy_sequences < 1:
            raise ValueError(f"greedy_sequences must be >= 1 or null (all calibration sequences), "
                             f"got {self.greedy_sequences}")
        if self.greedy_max_sparsity is not None and not 0.0 <= self.greedy_max_sparsity < 1.0:
            raise ValueError(f"greedy_max_sparsity must be in [0, 1) or null (the target), got {self.greedy_max_sparsity}")
        parent = super()
        if hasattr(parent, "__post_init__"):
            parent.__post_init__()


def relative_sizes(block: DecoderBlock, names: list[str]) -> list[float]:
    """Parameter count of each named projection relative to the block's q_proj (TEAL's
    ``w_p``: 1 for q, 1/4 for k/v and 3.5 for gate/up/down on Llama-3-8B)."""
    reference = block.projections["q_proj"].num_params
    return [block.projections[n].num_params / reference for n in names]


def weighted_sparsity(sparsities: list[float], weights: list[float]) -> float:
    return sum(s * w for s, w in zip(sparsities, weights)) / sum(weights)


def greedy_trajectory(weights: list[float], step: float, target: float,
                      block_error: Callable[[list[float]], float],
                      start: list[float] | None = None) -> list[tuple[float, float, list[float]]]:
    """TEAL's greedy search for one block.

    From ``start`` (default all 0), repeatedly try raising each projection's sparsity by
    ``step / w_p`` (capped at 1) and keep the one raise with the least ``block_error``,
    until the weighted sparsity reaches ``target``. Returns one row per step:
    ``(weighted sparsity, block error, per-projection sparsities)``.
    """
    current = list(start) if start is not None else [0.0] * len(weights)
    rows = []
    while weighted_sparsity(current, weights) < target - 1e-9:
        best: tuple[float, list[float]] | None = None
        for i, w in enumerate(weights):
            if current[i] >= 1.0:
                continue
            candidate = list(current)
            candidate[i] = min(1.0, current[i] + step / w)
            error = float(block_error(candidate))
            if best is None or error < best[0]:
                best = (error, candidate)
        if best is None:  # every projection fully sparse
            break
        current = best[1]
        rows.append((weighted_sparsity(current, weights), best[0], list(current)))
    return rows


#: Names under which transformers has passed a decoder block its KV cache (5.24 renamed
#: ``past_key_values`` to ``cache``). A kept cache would make every replay attend to, and
#: extend, the keys of earlier calls, so replays would not compute what the forward did.
CACHE_KWARGS = ("past_key_values", "past_key_value", "cache", "layer_past")


def _is_cache(name: str, value) -> bool:
    if name in CACHE_KWARGS:
        return True
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(value, Cache)


def _first_of_batch(value, batch: int, keep: int):
    """``value`` (tensors in tuples, lists and dicts) detached, with every tensor of two or more
    dimensions whose first is the batch cut to its first ``keep`` entries."""
    if torch.is_tensor(value):
        value = value.detach()
        return value[:keep] if keep < batch and value.dim() >= 2 and value.shape[0] == batch else value
    if type(value) in (tuple, list):
        return type(value)(_first_of_batch(v, batch, keep) for v in value)
    if isinstance(value, dict):
        return {k: _first_of_batch(v, batch, keep) for k, v in value.items()}
    return value


class BlockInputs:
    """The arguments each decoder block receives during forwards (hidden states, rotary
    embeddings, masks), kept for the first ``max_sequences`` sequences so a block can be
    re-run on its own (a batch that holds more is cut to them: every tensor argument with the
    batch as its first of two or more dimensions). KV caches are dropped: replays never
    extend a cache."""

    def __init__(self, blocks: list[DecoderBlock], max_sequences: int | None = None):
        self.calls: dict[int, list[tuple[tuple, dict]]] = {b.index: [] for b in blocks}
        self.sequences: dict[int, int] = dict.fromkeys(self.calls, 0)
        self.max_sequences = max_sequences
        self.hooks = HookSet()
        for b in blocks:
            self.hooks.pre(b.module, self._hook(b.index), with_kwargs=True, prepend=True)

    def _hook(self, index: int):
        def hook(module, args, kwargs):
            if self.max_sequences is not None and self.sequences[index] >= self.max_sequences:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            kwargs = {k: v for k, v in kwargs.items() if not _is_cache(k, v)}
            if "use_cache" in kwargs:
                kwargs["use_cache"] = False
            batch = keep = hidden.shape[0]
            if self.max_sequences is not None:
                keep = min(batch, self.max_sequences - self.sequences[index])
            args, kwargs = _first_of_batch((args, kwargs), batch, keep)
            self.calls[index].append((args, kwargs))
            self.sequences[index] += keep
            return None
        return hook

    def remove(self) -> None:
        self.hooks.remove()

    def outputs(self, block: DecoderBlock, on_call: Callable[[int], None] | None = None) -> list[torch.Tensor]:
        """Re-run ``block`` on every captured call (sparsifier hooks apply as set);
        ``on_call(i)`` runs before the ``i``-th."""
        outs = []
        with torch.no_grad():
            for i, (args, kwargs) in enumerate(self.calls[block.index]):
                if on_call is not None:
                    on_call(i)
                out = block.module(*args, **kwargs)
                outs.append(out[0] if isinstance(out, (tuple, list)) else out)
        return outs


class SuffixReplay:
    """While active, the per-token parts of every block after the attention (o_proj and the
    MLP) compute only the tokens the block error scores: the last ``T - int(T·(1 − f))``.

    Their outputs are padded back with zeros in front, so the block's output is exact on the
    scored tokens and meaningless before them. Attention still sees every token (the scored
    queries attend to all keys). The sparsifier's token policy keeps following the full
    forward's length. This saves most of a replay's work: on Llama shapes o_proj and the MLP
    hold most of a block's matmul work, and they now see only the scored tokens."""

    def __init__(self, sparsifier, blocks: list[DecoderBlock], last_fraction: float):
        self.sparsifier, self.last_fraction = sparsifier, last_fraction
        self.hooks = HookSet()
        for block in blocks:
            o_proj = block.projections.get("o_proj")
            mlp = block.containers.get("gate_up_input")
            for module in (o_proj.module if o_proj is not None else None, mlp):
                if module is not None:
                    self.hooks.pre(module, self._cut, prepend=True)
                    self.hooks.post(module, self._pad)
        self._lengths: list[int] = []

    def _cut(self, module, args):
        if not args or not torch.is_tensor(args[0]) or args[0].dim() < 3:
            self._lengths.append(0)
            return None
        x = args[0]
        length = x.shape[-2]
        self._lengths.append(length)
        self.sparsifier._sliced_from = length
        return (x[..., int(length * (1 - self.last_fraction)):, :], *args[1:])

    def _pad(self, module, args, output):
        length = self._lengths.pop()
        self.sparsifier._sliced_from = None
        if not length or not torch.is_tensor(output):
            return None
        front = output.new_zeros(*output.shape[:-2], length - output.shape[-2], output.shape[-1])
        return torch.cat([front, output], dim=-2)

    def __enter__(self) -> SuffixReplay:
        return self

    def __exit__(self, *exc) -> None:
        self.hooks.remove()
        self.sparsifier._sliced_from = None


#: what each memoised part of a block reads, as the projections whose sparsity changes it: the
#: q/k/v inputs are the block's (dense, captured) normalised input, the attention output depends
#: on q/k/v/o, and gate/up read the residual after the attention (every supported family is
#: sequential: attention, then MLP). down_proj and the MLP depend on all seven: never reused.
UPSTREAM = {
    "q_proj": ("q_proj",), "k_proj": ("k_proj",), "v_proj": ("v_proj",),
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gate_proj": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"),
    "up_proj": ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj"),
}


class _Memoised(nn.Module):
    """Stands in for one submodule of a block during the greedy search: returns the output
    computed before for the same captured call and the same sparsities of the projections it
    depends on, else runs the module (with all its hooks) and keeps the output, least recently
    used first out. A step asks for at most ``len(deps) + 1`` keys per captured call (the
    current allocation and each upstream projection raised) and the next step reuses some of
    them while it adds its own: two steps' worth, ``2·(len(deps) + 1)``, are kept per call."""

    def __init__(self, inner: nn.Module, memo: ReplayMemo, deps: tuple[int, ...], capacity: int):
        super().__init__()
        self.inner, self.memo, self.deps, self.capacity = inner, memo, deps, capacity
        self.cache: OrderedDict = OrderedDict()

    def forward(self, *args, **kwargs):
        key = (self.memo.call, tuple(self.memo.state[i] for i in self.deps))
        out = self.cache.get(key)
        if out is not None:
            self.cache.move_to_end(key)
            self.memo.hits += 1
            return out
        out = self.inner(*args, **kwargs)
        self.cache[key] = out
        if len(self.cache) > self.capacity:
            self.cache.popitem(last=False)
        self.memo.misses += 1
        return out

    def __getattr__(self, name):  # the block may read the module's attributes (weight, config)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)


class ReplayMemo:
    """Reuse what a greedy candidate does not change: while active, the q/k/v projections, the
    attention module and gate/up of one block are :class:`_Memoised`, keyed by the captured
    call and the candidate sparsities of their upstream projections (:data:`UPSTREAM`).

    A step raises one projection, so most parts repeat from the previous step: an MLP candidate
    reuses the attention, a k candidate reuses q and v. The replays compute exactly what the
    full ones do (the same modules on the same inputs; only the work is not redone), a large
    part of it on a Llama-shaped block. Memory: per captured call, up to 4 outputs of each of
    q/k/v, 10 of the attention and 12 of gate and of up (gate/up on the scored tokens only), so
    it grows with the calibration tokens and the model's widths. ``reuse=False`` keeps nothing
    (every part recomputed)."""

    def __init__(self, block: DecoderBlock, names: list[str], calls: int, reuse: bool = True):
        self.state: tuple[float, ...] = ()
        self.call = 0
        self.hits = self.misses = 0
        self._swapped: list[tuple[nn.Module, str, nn.Module]] = []
        index = {n: i for i, n in enumerate(names)}
        parts = {n: block.projections[n].module for n in UPSTREAM if n in block.projections}
        if "qkv_input" in block.containers:
            parts["attention"] = block.containers["qkv_input"]
        for part, module in parts.items():
            parent, attr = _parent_of(block.module, module)
            if parent is None:
                continue
            deps = tuple(index[n] for n in UPSTREAM[part] if n in index)
            capacity = 2 * (len(deps) + 1) * max(1, calls) if reuse else 0
            parent._modules[attr] = _Memoised(module, self, deps, capacity)
            self._swapped.append((parent, attr, module))

    def begin_call(self, i: int) -> None:
        self.call = i

    def restore(self) -> None:
        for parent, attr, module in reversed(self._swapped):
            parent._modules[attr] = module
        self._swapped.clear()

    def __enter__(self) -> ReplayMemo:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def _parent_of(root: nn.Module, target: nn.Module) -> tuple[nn.Module | None, str]:
    for module in root.modules():
        for attr, child in module._modules.items():
            if child is target:
                return module, attr
    return None, ""


def block_output_error(outputs: list[torch.Tensor], targets: list[torch.Tensor], last_fraction: float) -> float:
    """TEAL's block error: L2 norm over the last ``last_fraction`` of the tokens, averaged
    over sequences and hidden channels (and over captured batches)."""
    errors = []
    for out, ref in zip(outputs, targets):
        start = int(out.shape[-2] * (1 - last_fraction))
        errors.append((out[..., start:, :].float() - ref[..., start:, :].float()).norm(dim=-2).mean())
    return float(torch.stack(errors).mean())



class GreedyAllocation:
    """Per-block lookup of greedy allocations, for a :class:`~spon_exp.sparsifiers.base.Sparsifier`
    whose options are :class:`GreedyOptions`."""

    def _init_greedy(self) -> None:
        # per layer: rows (block sparsity, block error, sparsity of each greedy_names entry)
        self.greedy_lookup: dict[int, torch.Tensor] = {}
        self.greedy_report: dict[int, dict[str, float]] = {}

    @property
    def greedy(self) -> bool:
        return self.options.allocation == "greedy"

    def greedy_names(self, layer: int) -> list[str]:
        """Projections of one block that the greedy search allocates (lookup column order)."""
        return [p.name for p in self.projections if p.layer == layer]

    def greedy_row(self, layer: int) -> torch.Tensor:
        """The lookup row whose block sparsity is closest to the target (TEAL's rule)."""
        lookup = self.greedy_lookup.get(layer)
        if lookup is None:
            raise RuntimeError(f"No greedy lookup for layer {layer}: call calibrate() or load_state_dict() first")
        if float(lookup[-1, 0]) < self.sparsity - 1e-6:
            raise RuntimeError(f"The greedy lookup of layer {layer} stops at block sparsity {float(lookup[-1, 0]):.3f}, "
                               f"below the target {self.sparsity}: call calibrate() to extend it")
        return lookup[int(torch.argmin((lookup[:, 0] - self.sparsity).abs()))]

    def target_sparsity(self, proj: Projection) -> float:
        """The projection's own sparsity: the target (uniform) or its greedy allocation."""
        if not self.greedy:
            return self.sparsity
        row = self.greedy_row(proj.layer)
        return float(row[2 + self.greedy_names(proj.layer).index(proj.name)])

    def greedy_search(self, capture: BlockInputs, apply: Callable[[list[Projection], list[float]], None]) -> None:
        """Build (or extend) each block's lookup on the captured dense block inputs;
        ``apply(projections, sparsities)`` makes a candidate allocation take effect."""
        goal = max(self.sparsity, self.options.greedy_max_sparsity or 0.0)
        with SuffixReplay(self, self.blocks, self.options.greedy_last_fraction):
            self._greedy_blocks(capture, apply, goal)

    def _greedy_blocks(self, capture: BlockInputs, apply, goal: float) -> None:
        from tqdm.auto import tqdm

        for block in tqdm(self.blocks, desc=f"{self.name} greedy allocation", leave=False):
            names = self.greedy_names(block.index)
            if names:
                self._greedy_block(capture, apply, block, names, goal)
        self._shared.clear()
        if self.greedy_report:
            reports = list(self.greedy_report.values())
            log.info("%s greedy allocation: mean block error %.4g (uniform at the same block sparsity: %.4g)", self.name,
                     sum(r["greedy_error"] for r in reports) / len(reports),
                     sum(r["uniform_error"] for r in reports) / len(reports))

    def _greedy_block(self, capture: BlockInputs, apply, block: DecoderBlock, names: list[str], goal: float) -> None:
        """Extend one block's lookup to ``goal`` and report its error against uniform."""
        projs = [block.projections[n] for n in names]
        with self.disabled():
            targets = capture.outputs(block)
        with ReplayMemo(block, names, len(capture.calls[block.index])) as memo:

            def error(sparsities: list[float]) -> float:
                apply(projs, sparsities)
                self._refresh_consumers()
                self._shared.clear()
                memo.state = tuple(sparsities)
                return block_output_error(capture.outputs(block, memo.begin_call), targets,
                                          self.options.greedy_last_fraction)

            self._extend_lookup(block, names, error, goal)
        log.debug("%s greedy layer %d: %d parts reused, %d computed", self.name, block.index, memo.hits, memo.misses)

    def _extend_lookup(self, block: DecoderBlock, names: list[str], error: Callable[[list[float]], float],
                       goal: float) -> None:
        lookup = self.greedy_lookup.get(block.index)
        if lookup is None or lookup.shape[1] != 2 + len(names):
            lookup = torch.zeros(1, 2 + len(names), dtype=torch.float64)
        if float(lookup[-1, 0]) < goal - 1e-9:
            rows = greedy_trajectory(relative_sizes(block, names), self.options.greedy_step, goal, error,
                                     start=lookup[-1, 2:].tolist())
            if rows:
                extra = torch.tensor([[f, e, *s] for f, e, s in rows], dtype=torch.float64)
                lookup = torch.cat([lookup, extra])
        self.greedy_lookup[block.index] = lookup
        row = self.greedy_row(block.index)
        achieved = float(row[0])
        self.greedy_report[block.index] = {
            "block_sparsity": achieved,
            "greedy_error": error(row[2:].tolist()),
            "uniform_error": error([achieved] * len(names)),
        }

    def greedy_state(self) -> dict[str, torch.Tensor]:
        return {f"greedy_lookup.{layer}": t.clone() for layer, t in self.greedy_lookup.items()}

    def load_greedy_state(self, state: dict[str, torch.Tensor]) -> None:
        self.greedy_lookup = {int(k.removeprefix("greedy_lookup.")): v.to(torch.float64).clone()
                              for k, v in state.items() if k.startswith("greedy_lookup.")}
