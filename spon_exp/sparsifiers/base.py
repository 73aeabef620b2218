"""The sparsifier interface: forward pre-hooks on the projections of every decoder block.

Lifecycle (as in llm-compressor's modifiers): ``attach(model)`` -> ``calibrate(batches)``
-> use (switch on/off with ``enabled`` / ``disabled()``; the dense teacher is the same
model with sparsity off) -> ``detach()``.

A method implements ``sparsify(proj, x, measure)`` for one projection's input and
``share_key(proj)``: projections of one input site whose keys are equal get the same
sparsified tensor, so the mask of q/k/v (or gate/up) is computed once, not per consumer.

A method's options are one dataclass (``Options``, extending :class:`SparsifierOptions`):
defaults, comments and range checks (``__post_init__``) live there once; the Hydra schema
(:mod:`spon_exp.config`), the constructor and ``describe()`` all derive from it.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn

from spon_exp.models.adapters import DecoderBlock, Projection, find_decoder_blocks, select_projections
from spon_exp.sparsifiers.hooks import HookSet, Switchable

TOKEN_POLICIES = ("all", "last_half", "last_fraction")
TOKEN_ROUNDINGS = ("ceil", "floor")


def check_sparsity(sparsity: float) -> float:
    if not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r} (e.g. sparsity=0.5 for 50 %)")
    return float(sparsity)


@dataclass
class SparsifierOptions:
    """Options every sparsifier takes (``sparsifier.*`` in the config)."""

    projections: str = "all"  # all / attention / mlp / down_proj (from Python also a list of names)
    token_policy: str = "all"  # all / last_half / last_fraction (prefill tokens sparsified)
    token_fraction: float = 0.5  # for last_fraction
    token_rounding: str = "ceil"  # ceil(T·f) / floor(T·f) tokens sparsified (TEAL's reference: floor(T/2))

    def __post_init__(self) -> None:
        if self.token_policy not in TOKEN_POLICIES:
            raise ValueError(f"token_policy must be one of {TOKEN_POLICIES}, got {self.token_policy!r}")
        if self.token_rounding not in TOKEN_ROUNDINGS:
            raise ValueError(f"token_rounding must be one of {TOKEN_ROUNDINGS}, got {self.token_rounding!r}")
        if not 0.0 < self.token_fraction <= 1.0:
            raise ValueError(f"token_fraction must be in (0, 1], got {self.token_fraction}")


@dataclass(frozen=True)
class TokenPolicy:
    """Which tokens of a forward are sparsified: a trailing run of them; a single (decode)
    token always is.

    ``kind``: ``all``; ``last_half``; ``last_fraction`` (the last ``ceil(T·fraction)``, at
    least one; ``rounding="floor"`` takes ``floor(T·fraction)``, at least one: TEAL's
    reference sparsifies the last ``⌊T/2⌋``). ``dense_first_fraction`` ``f`` also keeps the leading tokens of a
    multi-token forward dense by sparsifying at most the last ``int(T·(1 − f))`` (WINA's
    reference prefill, f = 0.01); the fewer sparsified tokens win.
    """

    kind: str = "all"
    fraction: float = 0.5
    dense_first_fraction: float = 0.0
    rounding: str = "ceil"

    @classmethod
    def from_options(cls, options) -> TokenPolicy:
        """The policy a sparsifier's options (an ``Options`` instance or its fields as a dict)
        declare; ``dense_first_fraction`` where the method has it (WINA)."""
        get = options.get if isinstance(options, dict) else lambda k, d=None: getattr(options, k, d)
        return cls(get("token_policy", "all"), get("token_fraction", 0.5), get("dense_first_fraction", 0.0) or 0.0,
                   get("token_rounding", "ceil"))

    def sparsified(self, num_tokens: int) -> int:
        """How many trailing tokens of a forward of ``num_tokens`` are sparsified."""
        if self.kind == "all" or num_tokens == 1:
            n = num_tokens
        else:
            share = num_tokens * (0.5 if self.kind == "last_half" else float(self.fraction))
            n = max(1, math.floor(share) if self.rounding == "floor" else math.ceil(share))
        if self.dense_first_fraction > 0 and num_tokens > 1:
            n = min(n, int(num_tokens * (1.0 - self.dense_first_fraction)))
        return n


class _SharedInput:
    """A site's sparsified input, kept until every consumer sharing it has used it."""

    __slots__ = ("x", "key", "out", "remaining", "dropped", "seen", "evaluated")

    def __init__(self, x, key, out, remaining, dropped, seen, evaluated):
        self.x, self.key, self.out, self.remaining = x, key, out, remaining
        self.dropped, self.seen, self.evaluated = dropped, seen, evaluated


class Sparsifier(Switchable):
    """Base class: hook management, shared-input caching, token policy, sparsity accounting.

    ``Sparsifier(sparsity, options)`` with ``options`` an instance of the class's ``Options``,
    or ``Sparsifier(sparsity, **fields of Options)``: ``TealSparsifier(0.5, allocation="greedy")``.
    """

    name = "base"
    Options: type[SparsifierOptions] = SparsifierOptions
    #: False for the dense no-op: its sparse model is the dense one, so a run evaluates only
    #: the dense variant and trains no SPON
    sparsifies: bool = True

    def __init__(self, sparsity: float = 0.5, options: SparsifierOptions | None = None, seed: int = 0, **kwargs):
        self.sparsity = check_sparsity(sparsity)
        if options is None:
            options = self.Options(**kwargs)
        elif kwargs:
            raise TypeError(f"Pass {self.Options.__name__} or its fields as keywords, not both (got {sorted(kwargs)})")
        elif not isinstance(options, self.Options):
            raise TypeError(f"{self.name} sparsifier options must be {self.Options.__name__}, got {type(options).__name__}")
        self.options = options
        self.seed = seed  # calibration sampling
        self.tokens = TokenPolicy.from_options(options)
        self.hooks = HookSet()
        self._attached = False
        self.blocks: list[DecoderBlock] = []
        self.projections: list[Projection] = []
        self._shared: dict[tuple[int, str], _SharedInput] = {}
        self._consumers: dict[tuple[int, str, Hashable], int] = {}
        self._measuring = False
        self._sliced_from: int | None = None  # a replay's per-token parts see only the last tokens of this many
        self._dropped: dict[str, float] = defaultdict(float)
        self._seen: dict[str, float] = defaultdict(float)  # entries of the sparsified tokens
        self._evaluated: dict[str, float] = defaultdict(float)  # entries of every token, dense-policy ones included
        # a folded spon.apply=sparsified model's two biases per projection (spon_exp.spon.gating.GatedBiases),
        # whose hooks are among this sparsifier's
        self.bias_gate = None
        self._init_state()

    def _init_state(self) -> None:
        """A method's own per-instance state (thresholds, rotations, ...), set up once the
        options are in place: methods override this rather than ``__init__``."""

    # ----------------------------------------------------------------- lifecycle
    @property
    def enabled(self) -> bool:  # switching the sparsifier switches its hooks (``disabled()``)
        return self.hooks.enabled

    @enabled.setter
    def enabled(self, on: bool) -> None:
        self.hooks.enabled = on

    def attach(self, model: nn.Module) -> Sparsifier:
        if self._attached:
            raise RuntimeError(f"{self.name} sparsifier is already attached; detach() it first")
        self.blocks = find_decoder_blocks(model)
        self.projections = select_projections(self.blocks, self.options.projections)
        self.register_hooks()
        self._refresh_consumers()
        self._attached = True
        return self

    def register_hooks(self) -> None:
        """Put the method's hooks (into :attr:`hooks`) on the selected projections."""
        for proj in self.projections:
            self.hooks.pre(proj.module, self._make_hook(proj))

    def detach(self) -> None:
        self.hooks.remove()
        self.bias_gate = None  # its hooks were among these; the projections keep their original biases
        self._shared.clear()
        self._attached = False

    @property
    def attached(self) -> bool:
        return self._attached

    def calibrate(self, model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
        """Fit the method's statistics on calibration token batches. Default: nothing to fit."""

    # ------------------------------------------------------------- method API
    def share_key(self, proj: Projection) -> Hashable:
        """Projections on one site with equal keys receive the same sparsified input."""
        return proj.name  # default: nothing is shared

    def sparsify(self, proj: Projection, x: torch.Tensor, measure: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return the sparsified input and, if ``measure``, the number of dropped entries
        (the equivalent dense budget saved: zeroed channels for plain masking)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"{self.name} sparsifier has no state, got keys {sorted(state)[:5]}")
        self._refresh_consumers()

    @contextlib.contextmanager
    def thresholds_scaled(self, factor: float) -> Iterator[int]:
        """Inside, every calibrated threshold (state entries ``threshold.*``) is multiplied by
        ``factor``; yields how many there are (0 for a method without thresholds, e.g.
        top-k). The numerical sensitivity check: ``factor = 1 + 1e-6``."""
        state = self.state_dict()
        keys = [k for k in state if k.startswith("threshold.")]
        if keys:
            self.load_state_dict({**state, **{k: state[k] * factor for k in keys}})
        try:
            yield len(keys)
        finally:
            if keys:
                self.load_state_dict(state)

    def describe(self) -> dict:
        """Name, sparsity and options: ``build_sparsifier(**describe())`` rebuilds it (an export's meta)."""
        return {"name": self.name, "sparsity": self.sparsity, **asdict(self.options)}

    # ------------------------------------------------------------------ hooks
    def _refresh_consumers(self) -> None:
        """Count the projections sharing each (layer, site, key): the cache entry is freed
        once that many consumers have used it, so no activation outlives its forward."""
        counts: dict = defaultdict(int)
        for p in self.projections:
            counts[(p.layer, p.site, self.share_key(p))] += 1
        self._consumers = dict(counts)

    def sparsified_tokens(self, num_tokens: int) -> int:
        """How many trailing tokens of a forward are sparsified (a decode token always is)."""
        return self.tokens.sparsified(num_tokens)

    def sparsified_rows(self, x: torch.Tensor) -> tuple[int, int]:
        """``(tokens, n)`` for a projection input ``x``: its token count and how many of its
        trailing tokens this forward sparsifies (0 while the sparsifier is switched off)."""
        tokens = x.shape[-2] if x.dim() >= 2 else 1
        if not self.enabled:
            return tokens, 0
        # an input cut to the trailing tokens of a longer forward (the greedy search's replays)
        # follows the policy of that forward: its sparsified tokens are the trailing ones
        return tokens, min(self.sparsified_tokens(self._sliced_from or tokens), tokens)

    def _apply(self, proj: Projection, x: torch.Tensor) -> torch.Tensor:
        tokens, n_sparse = self.sparsified_rows(x)
        if n_sparse == tokens:
            out, dropped = self.sparsify(proj, x, self._measuring)
            part = x
        else:
            part = x[..., tokens - n_sparse:, :]
            sparse_part, dropped = self.sparsify(proj, part, self._measuring)
            out = torch.cat([x[..., : tokens - n_sparse, :], sparse_part], dim=-2)
        if self._measuring:
            self._dropped[proj.key] += float(dropped)
            self._seen[proj.key] += float(part.numel())
            self._evaluated[proj.key] += float(x.numel())
        return out

    def _make_hook(self, proj: Projection):
        def hook(module, args):
            if not args:
                return None
            x = args[0]
            key = self.share_key(proj)
            site = (proj.layer, proj.site)
            shared = self._shared.get(site)
            if shared is not None and shared.x is x and shared.key == key:
                shared.remaining -= 1
                if shared.remaining <= 0:
                    del self._shared[site]
                if self._measuring:  # every consumer's matrix skips the same columns
                    self._dropped[proj.key] += shared.dropped
                    self._seen[proj.key] += shared.seen
                    self._evaluated[proj.key] += shared.evaluated
                return (shared.out, *args[1:])
            before = (self._dropped[proj.key], self._seen[proj.key], self._evaluated[proj.key])
            out = self._apply(proj, x)
            consumers = self._consumers.get((proj.layer, proj.site, key), 1)
            if consumers > 1:
                self._shared[site] = _SharedInput(x, key, out, consumers - 1, self._dropped[proj.key] - before[0],
                                                  self._seen[proj.key] - before[1],
                                                  self._evaluated[proj.key] - before[2])
            return (out, *args[1:])

        return hook

    # ------------------------------------------------------------- measuring
    @contextlib.contextmanager
    def measuring(self) -> Iterator[None]:
        """Count dropped input entries of every sparsified projection while inside."""
        self._dropped.clear()
        self._seen.clear()
        self._evaluated.clear()
        self._measuring = True
        try:
            yield
        finally:
            self._measuring = False

    def measured_sparsity(self) -> dict:
        """Measured sparsity per projection, per layer and model-wide (parameter-weighted), over
        the tokens the token policy sparsified; ``effective``: model-wide over every token the
        projections saw, the ones the policy kept dense counted as not sparsified."""
        per_proj = {p.key: self._dropped[p.key] / self._seen[p.key] for p in self.projections if self._seen.get(p.key)}
        if not per_proj:
            return {"model": None, "effective": None, "per_layer": {}, "per_projection": {}}
        weights = {p.key: p.num_params for p in self.projections if p.key in per_proj}
        effective = {k: self._dropped[k] / self._evaluated[k] for k in per_proj}
        per_layer: dict[int, list] = defaultdict(lambda: [0.0, 0.0])
        for p in self.projections:
            if p.key in per_proj:
                per_layer[p.layer][0] += per_proj[p.key] * weights[p.key]
                per_layer[p.layer][1] += weights[p.key]
        model = sum(per_proj[k] * w for k, w in weights.items()) / sum(weights.values())
        return {
            "model": model,
            "effective": sum(effective[k] * w for k, w in weights.items()) / sum(weights.values()),
            "per_layer": {str(layer): s / w for layer, (s, w) in sorted(per_layer.items())},
            "per_projection": per_proj,
        }


def run_batches(model: nn.Module, batches: Iterable[torch.Tensor], desc: str | None = None) -> None:
    """Forward token batches through the decoder blocks without gradients (calibration
    passes). The LM head is skipped: hooks only read the blocks, and a large vocabulary's
    logits are a sizeable share of a small model's forward."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    body = model.get_decoder() if hasattr(model, "get_decoder") else model
    batches = list(batches)
    with torch.no_grad():
        for batch in tqdm(batches, desc=desc, disable=desc is None, leave=False):
            body(input_ids=batch.to(device), use_cache=False)
