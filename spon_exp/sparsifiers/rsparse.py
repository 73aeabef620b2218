"""R-Sparse (ICLR 2025, arXiv 2504.19449): sparse channels plus a low-rank path.

``y = W(x ⊙ m) + U_r S_r V_rᵀ (x ⊙ (1 − m))``: the channels the mask drops are not lost but
go through a rank-``r`` approximation of ``W`` (one SVD per matrix, cached). The mask keeps
channels whose score ``|x_i|·‖W[:, i]‖₂`` exceeds a calibrated threshold ``tau`` (one per
projection; exact quantile on calibration scores, refined on sparse activations as TEAL).

Budget at sparsity ``s`` with sparse share ``ρ`` (``sparse_share``, default 0.95): the
dense cost ``in·out·(1−s)`` is split into ``ρ`` for kept channels and ``1−ρ`` for the rank
path, ``r = ⌊in·out·(1−s)·(1−ρ) / (in+out)⌋`` (s=0.5, ρ=0.95, 4096² → r=51). Because ``r``
is rounded down, the kept-channel share is set to spend the rest exactly:
``keep = (1−s) − r·(in+out)/(in·out)`` (≈ ``(1−s)·ρ``). ``ρ = 1`` is plain sparsity (r = 0).

Hooks: the pre-hook returns ``x ⊙ m`` like every method (so SPON's ``W·Σα`` stays in the
original input space and folds into ``b' = b + W·Σα``); a forward hook adds the low-rank
term computed from the original input, ``x − x ⊙ m``.

Sparsity accounting: the rank path spends ``r·(in+out)/out`` input-equivalents per token,
so a token counts ``in − kept − r·(in+out)/out`` dropped entries (the budget it saves).

The reference evaluation sparsifies only the last 10 % of the tokens:
``token_policy=last_fraction token_fraction=0.1``.

Per-module shares (``sparse_share_file``): the authors' released evolutionary search
(VITA-Group/R-Sparse ``config/llama3_sparsity_50_evolutionary_search.npy``, read there with
``np.loadtxt`` although named ``.npy``) is a flat list of ``(share α, sparsity s)`` pairs,
one per linear layer in module order: for each decoder layer q, k, v, o, gate, up, down
(32 layers × 7 × 2 = 448 numbers for Llama-3-8B). spon-exp reads that text layout, a real
``.npy`` array of the same numbers (flat or ``[modules, 2]``), or a ``.json`` holding the
same list or ``{"<layer>.<projection>": [α, s]}``. Its sparsities must equal the run's.

Where a module's share is 1 the reference runs plain sparsity: mask ``|x_i| > tau`` with no
column norms and no rank path (``full_share_scoring=magnitude``, the default; ``norm`` keeps
the norm-weighted score). ``budget=reference`` computes the budget as the reference does:
kept channels ``max(int(in·(1−s)·α), 1)`` (the threshold's target), rank
``max(int((in·out·(1−s) − channels·out) / (in+out)), 1)`` with every attention projection
sized hidden × hidden (so k/v, whose true output is smaller, get the rank of q).
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from spon_exp.models.adapters import PROJECTIONS, Projection
from spon_exp.sparsifiers.base import Sparsifier
from spon_exp.sparsifiers.calibration import CalibratedOptions, calibration_passes, exact_threshold, record_inputs
from spon_exp.sparsifiers.registry import register
from spon_exp.sparsifiers.scoring import ColumnNorms


def rsparse_rank(in_features: int, out_features: int, sparsity: float, sparse_share: float) -> int:
    """Rank of the low-rank path: ``(in·out·(1−s) − in·(1−s)·ρ·out) / (in+out)``, rounded down."""
    budget = in_features * out_features * (1.0 - sparsity) * (1.0 - sparse_share)
    rank = int(budget / (in_features + out_features) + 1e-9)
    return max(0, min(rank, in_features, out_features))


def rsparse_keep_fraction(in_features: int, out_features: int, sparsity: float, rank: int) -> float:
    """Fraction of input channels kept so that channels + rank path spend ``in·out·(1−s)``."""
    return max(0.0, (1.0 - sparsity) - rank * (in_features + out_features) / (in_features * out_features))


#: Below this share of the smaller dimension a randomised SVD computes the rank-r factors
#: (a full SVD of a 4096 x 14336 matrix to keep 79 singular vectors is most of R-Sparse's setup).
RANDOMISED_MAX_SHARE = 0.125
RANDOMISED_OVERSAMPLE = 16
RANDOMISED_POWER_ITERATIONS = 6


def low_rank_factors(weight: torch.Tensor, rank: int, method: str = "auto",
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(V_rᵀ, U_r S_r)`` of ``W = U S Vᵀ`` (float32, on the weight's device): ``W ≈ (U_r S_r) V_rᵀ``.

    ``method``: ``exact`` (full SVD), ``randomized`` (Halko et al.: a rank-(r + 16) range
    finder with 6 power iterations, ``torch.svd_lowrank``; its rank-r approximation error is
    within a fraction of a percent of the optimum, tests/test_sparsifiers.py) or ``auto``
    (randomised when r is below 1/8 of the smaller dimension)."""
    w = weight.detach().float()
    small = min(w.shape)
    if rank <= 0:
        return w.new_zeros(0, w.shape[1]), w.new_zeros(w.shape[0], 0)
    if method == "auto":
        method = "randomized" if rank + RANDOMISED_OVERSAMPLE < RANDOMISED_MAX_SHARE * small else "exact"
    if method == "exact":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return vh[:rank].contiguous(), (u[:, :rank] * s[:rank]).contiguous()
    if method != "randomized":
        raise ValueError(f"SVD method must be auto, exact or randomized, got {method!r}")
    # svd_lowrank draws its test matrix from the global generator: seed it, leave it as it was
    with torch.random.fork_rng(devices=[w.device] if w.device.type == "cuda" else []):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(w, q=rank + RANDOMISED_OVERSAMPLE, niter=RANDOMISED_POWER_ITERATIONS)
    return v[:, :rank].T.contiguous(), (u[:, :rank] * s[:rank]).contiguous()


@dataclass
class RSparseOptions(CalibratedOptions):
    """R-Sparse's options (``sparsifier=rsparse``)."""

    sparse_share: float = 0.95  # rho: budget share of kept channels; 1 = plain sparsity, no rank path
    sparse_share_file: Optional[str] = None  # per-module (share, sparsity) pairs, the authors' search layout
    full_share_scoring: str = "magnitude"  # where the share is 1: magnitude |x| (reference) / norm |x|·‖W_i‖
    budget: str = "exact"  # exact (true shapes, rank from the share) / reference (the authors' formula)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.sparse_share <= 1.0:
            raise ValueError(f"sparse_share must be in (0, 1] (1 = plain sparsity, no low-rank path), "
                             f"got {self.sparse_share}")
        if self.full_share_scoring not in ("magnitude", "norm"):
            raise ValueError(f"full_share_scoring must be magnitude or norm, got {self.full_share_scoring!r}")
        if self.budget not in ("exact", "reference"):
            raise ValueError(f"budget must be exact or reference, got {self.budget!r}")
        if self.sparse_share_file is not None and not Path(self.sparse_share_file).expanduser().is_file():
            raise ValueError(f"sparse_share_file {self.sparse_share_file!r} does not exist: give the path of the "
                             f"(share, sparsity) list (.npy text or array, or .json)")


def read_share_file(path: str | Path, projections: list[Projection]) -> dict[str, tuple[float, float]]:
    """``{projection key: (share, sparsity)}`` from a share file (layouts: module docstring)."""
    import numpy as np

    path = Path(path).expanduser()
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            try:
                pairs = {k: (float(v[0]), float(v[1])) for k, v in data.items()}
            except (TypeError, ValueError, IndexError) as e:
                raise ValueError(f"{path}: a JSON object must map '<layer>.<projection>' to [share, sparsity] ({e})")
            missing = [p.key for p in projections if p.key not in pairs]
            if missing:
                raise ValueError(f"{path} has no (share, sparsity) for {missing[:5]}")
            return {p.key: pairs[p.key] for p in projections}
        values = np.asarray(data, dtype=np.float64).reshape(-1)
    else:
        try:
            values = np.load(path, allow_pickle=False).astype(np.float64).reshape(-1)
        except (ValueError, OSError):  # the authors' file is text despite its name
            values = np.loadtxt(path, dtype=np.float64).reshape(-1)
    layers = sorted({p.layer for p in projections})
    expected = 2 * len(PROJECTIONS) * len(layers)
    if values.size != expected:
        raise ValueError(f"{path} holds {values.size} numbers; this model needs {expected} "
                         f"({len(layers)} layers × {len(PROJECTIONS)} projections × (share, sparsity))")
    order = {(layer, name): i for i, (layer, name) in enumerate((lay, n) for lay in layers for n in PROJECTIONS)}
    return {p.key: (float(values[2 * order[(p.layer, p.name)]]), float(values[2 * order[(p.layer, p.name)] + 1]))
            for p in projections}


@register
class RSparseSparsifier(Sparsifier):
    name = "rsparse"
    Options = RSparseOptions

    def _init_state(self) -> None:
        self.thresholds: dict[str, float] = {}
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.column_norms = ColumnNorms()
        self._inputs: dict[str, torch.Tensor] = {}  # original input, pre-hook -> forward hook
        self._lows: dict[str, torch.Tensor] = {}  # down · (x ⊙ (1 − m))ᵀ where the fused kernel split it off
        self.shares: dict[str, float] = {}  # per projection, from sparse_share_file

    # ----------------------------------------------------------------- budget
    def share(self, proj: Projection) -> float:
        return self.shares.get(proj.key, self.options.sparse_share)

    def _reference_shape(self, proj: Projection) -> tuple[int, int]:
        """The (in, out) the authors' budget uses: hidden × hidden for every attention projection."""
        if proj.site in ("qkv_input", "o_proj_input"):
            hidden = self.blocks[0].projections["q_proj"].module.in_features
            return hidden, hidden
        return proj.module.in_features, proj.module.out_features

    def rank(self, proj: Projection) -> int:
        lin, share = proj.module, self.share(proj)
        if self.options.budget == "exact" or share >= 1.0:
            return rsparse_rank(lin.in_features, lin.out_features, self.sparsity, share)
        n_in, n_out = self._reference_shape(proj)
        channels = max(int(n_in * (1.0 - self.sparsity) * share), 1)
        rank = max(int((n_in * n_out * (1.0 - self.sparsity) - channels * n_out) / (n_in + n_out)), 1)
        return min(rank, lin.in_features, lin.out_features)

    def keep_fraction(self, proj: Projection) -> float:
        lin = proj.module
        if self.options.budget == "reference":
            return (1.0 - self.sparsity) * self.share(proj)
        return rsparse_keep_fraction(lin.in_features, lin.out_features, self.sparsity, self.rank(proj))

    def uses_norm(self, proj: Projection) -> bool:
        return not (self.share(proj) >= 1.0 and self.options.full_share_scoring == "magnitude")

    def share_key(self, proj: Projection) -> Hashable:
        return proj.name  # column norms differ per matrix: every projection has its own mask

    def score(self, proj: Projection, x: torch.Tensor) -> torch.Tensor:
        s = x.detach().float().abs()
        return s * self.column_norms(proj).to(x.device) if self.uses_norm(proj) else s

    # ------------------------------------------------------------------ hooks
    def attach(self, model: nn.Module) -> RSparseSparsifier:
        self.column_norms.clear()
        super().attach(model)
        self.shares = {}
        if self.options.sparse_share_file is not None:
            pairs = read_share_file(self.options.sparse_share_file, self.projections)
            off = sorted({s for _, s in pairs.values() if abs(s - self.sparsity) > 1e-6})
            if off:
                raise ValueError(f"{self.options.sparse_share_file} was searched at sparsity {off[:3]}, but this run "
                                 f"asks sparsity={self.sparsity}: use a share file searched at the run's sparsity")
            bad = sorted({a for a, _ in pairs.values() if not 0.0 <= a <= 1.0})
            if bad:
                raise ValueError(f"{self.options.sparse_share_file}: shares must be in [0, 1], found {bad[:3]}")
            self.shares = {k: a for k, (a, _) in pairs.items()}
        return self

    def register_hooks(self) -> None:
        super().register_hooks()
        for proj in self.projections:  # prepend: stash the input before the masking pre-hook changes it
            self.hooks.pre(proj.module, self._stash_hook(proj), prepend=True)
            self.hooks.post(proj.module, self._low_rank_hook(proj))

    def detach(self) -> None:
        super().detach()
        self._inputs.clear()
        self._lows.clear()

    def _stash_hook(self, proj: Projection):
        def hook(module, args):
            if args and proj.key in self.factors and self.factors[proj.key][0].shape[0] > 0:
                self._inputs[proj.key] = args[0]
            return None
        return hook

    def _low_rank_hook(self, proj: Projection):
        def hook(module, args, output):
            x = self._inputs.pop(proj.key, None)
            low_t = self._lows.pop(proj.key, None)
            if x is None:
                return None
            down, up = self.factors[proj.key]
            down, up = down.to(x.dtype), up.to(x.dtype)
            if (output.requires_grad and torch.is_grad_enabled()) or not output.is_contiguous():
                dropped_part = x - args[0]  # x ⊙ (1 − m); zero on tokens the token policy keeps dense
                return output + F.linear(F.linear(dropped_part, down), up)
            # inference: (down · restᵀ)ᵀ (one wide product, which CPU matmul kernels run better
            # than the skinny rest · downᵀ), accumulated into the projection's output in place
            if low_t is None:
                low_t = self._low_t(down, x - args[0])
            output.view(-1, output.shape[-1]).addmm_(low_t.T, up.T)
            return output
        return hook

    @staticmethod
    def _low_t(down: torch.Tensor, dropped_part: torch.Tensor) -> torch.Tensor:
        return down @ dropped_part.reshape(-1, dropped_part.shape[-1]).T

    # ------------------------------------------------------------ calibration
    def compute_factors(self) -> None:
        """SVD of every sparsified matrix (once; kept in the state)."""
        for p in self.projections:
            rank = self.rank(p)
            if p.key not in self.factors or self.factors[p.key][0].shape[0] != rank:
                self.factors[p.key] = low_rank_factors(p.module.weight, rank, seed=self.seed)

    def calibrate(self, model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
        batches = list(batches)
        self.compute_factors()
        passes = calibration_passes(self.options.calibration_context, self.options.refine_passes)
        for i in range(passes):
            recorder = record_inputs(self, model, batches, dense=(i == 0), desc=f"R-Sparse calibration {i + 1}/{passes}",
                                     max_values=self.options.max_calibration_values, seed=self.seed,
                                     score=self.score, group=lambda p: p.key)
            for p in self.projections:
                self.thresholds[p.key] = exact_threshold(recorder.site_values(p.key), 1.0 - self.keep_fraction(p))
            self._refresh_consumers()

    # ---------------------------------------------------------------- masking
    def sparsify(self, proj, x, measure):
        tau = self.thresholds.get(proj.key)
        if tau is None or proj.key not in self.factors:
            raise RuntimeError(f"R-Sparse state for {proj.key} is missing: call calibrate() or load_state_dict() first")
        from spon_exp.kernels.select import threshold_split_cpu

        has_rank = self.factors[proj.key][0].shape[0] > 0
        norms = self.column_norms(proj).to(x.device) if self.uses_norm(proj) else None
        fused = threshold_split_cpu(x, tau, norms, rest=has_rank)  # one pass, no autograd needed
        if fused is not None:
            out, rest, kept = fused
            if rest is not None and proj.key in self._inputs and self._inputs[proj.key].shape == x.shape:
                # the rank path's first product now, while the split-off rest is still in cache
                # (after the projection's matmul it is read back from memory)
                self._lows[proj.key] = self._low_t(self.factors[proj.key][0].to(x.dtype), rest)
            n_dropped = x.numel() - kept
        else:
            mask = self.score(proj, x) > tau
            out = x * mask.to(x.dtype)
            n_dropped = (~mask).sum() if measure else None
        dropped = None
        if measure:
            lin = proj.module
            tokens = x.numel() // x.shape[-1]
            rank_cost = self.factors[proj.key][0].shape[0] * (lin.in_features + lin.out_features) / lin.out_features
            dropped = torch.as_tensor(n_dropped).double() - rank_cost * tokens
        return out, dropped

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"threshold.{k}": torch.tensor(v, dtype=torch.float64) for k, v in self.thresholds.items()}
        for k, (down, up) in self.factors.items():
            state[f"factor_down.{k}"] = down.detach().cpu().contiguous()
            state[f"factor_up.{k}"] = up.detach().cpu().contiguous()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.thresholds = {k.removeprefix("threshold."): float(v) for k, v in state.items() if k.startswith("threshold.")}
        self.factors = {}
        for p in self.projections:
            down, up = state.get(f"factor_down.{p.key}"), state.get(f"factor_up.{p.key}")
            if p.key not in self.thresholds or down is None or up is None:
                raise ValueError(f"Saved R-Sparse state lacks {p.key} (model/projection mismatch)")
            if down.shape[0] != self.rank(p) or down.shape[1] != p.module.in_features or up.shape[0] != p.module.out_features:
                raise ValueError(f"Saved R-Sparse factors of {p.key} have shapes {tuple(down.shape)}/{tuple(up.shape)}, "
                                 f"expected rank {self.rank(p)} for sparsity {self.sparsity} and sparse_share {self.options.sparse_share}")
            device = p.module.weight.device
            self.factors[p.key] = (down.float().to(device), up.float().to(device))
        self.column_norms.clear()
        self._refresh_consumers()
