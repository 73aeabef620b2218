"""SPON spontaneous neurons: per sparsified projection an input-independent alpha.

``y = W·S(x) + W·Σ_j α_j (+ b)``. α ∈ R^{k×in} lives in the projection's *input* space
(k = SPON count), is not masked, and after training folds into the bias:
``b' = b + W·Σα`` (see :mod:`spon_exp.spon.fold`).

α enters as a *parametrised bias*: while SPON is on, the projection's own linear call
receives ``b + W·Σα`` as its bias (``torch.nn.utils.parametrize``), exactly the tensor that
folding later stores. Adding ``W·Σα`` to the output instead rounds differently from a GEMM
with that bias, and a thresholded model turns such last-bit differences into flipped
threshold decisions that cascade (benchmarks/perf/fold_exactness.py measures it). So the
trained, evaluated and folded models compute bit-identical logits in every dtype.

``apply="sparsified"`` (``spon.apply``) gates that bias by the sparsifier's token policy:
α acts only on the tokens whose inputs were sparsified (:mod:`spon_exp.spon.gating`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from spon_exp.models.adapters import Projection, select_projections
from spon_exp.sparsifiers.base import Sparsifier, run_batches
from spon_exp.sparsifiers.hooks import HookSet, Switchable
from spon_exp.spon.gating import RowSplit, add_to_trailing_rows, bias_delta, check_apply

INITS = ("zero", "mean_dropped")


def _param_name(key: str) -> str:
    return key.replace(".", "__")


class _SponBias(nn.Module):
    """The parametrisation of one projection's bias: ``b + W·Σα`` while SPON is on, the
    original bias (``None`` where the layer had none) while it is off."""

    def __init__(self, spon: Spon, proj: Projection, had_bias: bool):
        super().__init__()
        # plain attributes in a list: registering the Spon as a submodule would put the
        # alphas among the model's own parameters
        self._owner = [spon, proj]
        self.had_bias = had_bias

    def forward(self, original: torch.Tensor) -> torch.Tensor | None:
        spon, proj = self._owner
        bias = original if self.had_bias else None
        if not spon.enabled or (spon.rows is not None and not spon.rows.every_row_sparsified(proj.key)):
            return bias  # apply=sparsified: a forward with dense rows keeps the original (gating's post-hook)
        return spon.bias(proj, bias)


class Spon(nn.Module, Switchable):
    """Holds the α parameters; while attached, each projection's bias is ``b + W·Σα`` (with
    ``apply="sparsified"``, on the tokens the sparsifier's token policy sparsified only)."""

    def __init__(self, sparsifier: Sparsifier, count: int = 1, projections: str | list[str] = "all",
                 apply: str = "all"):
        super().__init__()
        self.apply = check_apply(apply)
        if count < 1:
            raise ValueError(f"SPON count must be >= 1 to build alphas (0 means SPON off), got {count}")
        if not sparsifier.attached:
            raise RuntimeError("Attach the sparsifier before building SPON alphas")
        self.count = count
        self.projection_set = projections
        sparsified = {p.key for p in sparsifier.projections}
        self.projections: list[Projection] = [
            p for p in select_projections(sparsifier.blocks, projections) if p.key in sparsified
        ]
        if not self.projections:
            raise ValueError(f"SPON projections {projections!r} select none of the sparsified projections")
        self.alphas = nn.ParameterDict({
            _param_name(p.key): nn.Parameter(torch.zeros(count, p.module.in_features, device=p.module.weight.device))
            for p in self.projections
        })
        self.sparsifier = sparsifier
        # apply=sparsified: each projection's current split into dense and sparsified rows
        self.rows = RowSplit(sparsifier) if apply == "sparsified" else None
        self.hooks = HookSet()
        self.enabled = True
        self.folded = False
        self.attached = False
        self.attach()

    def alpha(self, proj: Projection) -> torch.Tensor:
        return self.alphas[_param_name(proj.key)]

    def offset(self, proj: Projection) -> torch.Tensor:
        """``W·Σα`` for one projection, in the weight's dtype."""
        w = proj.module.weight
        return F.linear(self.alpha(proj).sum(0).to(w.dtype), w)

    def bias(self, proj: Projection, original: torch.Tensor | None) -> torch.Tensor:
        """The bias the projection computes with while SPON is on, and the one folding stores."""
        offset = self.offset(proj)
        return offset if original is None else original + offset.to(original.dtype)

    def original_bias(self, proj: Projection) -> torch.Tensor | None:
        """The projection's bias without SPON (None where it has none)."""
        lin = proj.module
        if not parametrize.is_parametrized(lin, "bias"):
            return lin.bias
        return lin.parametrizations["bias"].original if lin.parametrizations["bias"][0].had_bias else None

    # ------------------------------------------------------------------ lifecycle
    def attach(self) -> Spon:
        """Parametrise every projection's bias (a zero-length placeholder stands in for a
        missing bias, so the layer still computes without one while SPON is off)."""
        if self.attached:
            raise RuntimeError("These SPON alphas are already attached")
        if self.folded:
            raise RuntimeError("These alphas are folded into the biases; build a new Spon")
        for p in self.projections:
            lin = p.module
            had_bias = lin.bias is not None
            if not had_bias:
                lin.bias = nn.Parameter(lin.weight.new_empty(0), requires_grad=False)
            parametrize.register_parametrization(lin, "bias", _SponBias(self, p, had_bias), unsafe=True)
            if self.rows is not None:
                self.hooks.pre(lin, self._record_rows(p))
                self.hooks.post(lin, self._add_to_sparsified_rows(p))
        self.attached = True
        return self

    def _record_rows(self, proj: Projection):
        def hook(module, args):
            if args:
                self.rows.record(proj.key, args[0])
        return hook

    def _add_to_sparsified_rows(self, proj: Projection):
        """A mixed forward computed with the original bias: its sparsified rows get ``b' − b``."""
        def hook(module, args, output):
            rows = self.rows.mixed(proj.key)
            if not self.enabled or not rows:
                return None
            original = self.original_bias(proj)
            return add_to_trailing_rows(output, bias_delta(self.bias(proj, original), original), rows)
        return hook

    def detach(self) -> None:
        """Give every projection back its original bias (or none)."""
        self.hooks.remove()
        for p in self.projections:
            lin = p.module
            if not parametrize.is_parametrized(lin, "bias"):
                continue
            had_bias = lin.parametrizations["bias"][0].had_bias
            parametrize.remove_parametrizations(lin, "bias", leave_parametrized=False)
            if not had_bias:
                lin.bias = None
        self.attached = False

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.alphas.values())

    # ------------------------------------------------------------- initialisation
    @torch.no_grad()
    def init_mean_dropped(self, model: nn.Module, sparsifier: Sparsifier, batches: Iterable[torch.Tensor]) -> None:
        """Training-free baseline: α₀ = E[x − S(x)], the mean of what the sparsifier drops
        (split evenly over the k spontaneous neurons)."""
        sums = {p.key: torch.zeros(p.module.in_features, dtype=torch.float64) for p in self.projections}
        counts = dict.fromkeys(sums, 0)

        def make(proj):
            def pre_hook(module, args):
                x = args[0]
                n = sparsifier.sparsified_tokens(x.shape[-2])
                part = x[..., x.shape[-2] - n:, :]
                sparse, _ = sparsifier.sparsify(proj, part, False)
                resid = (part - sparse).reshape(-1, part.shape[-1])
                sums[proj.key] += resid.double().sum(0).cpu()
                counts[proj.key] += resid.shape[0]
            return pre_hook

        with HookSet() as hooks, self.disabled():
            for p in self.projections:
                hooks.pre(p.module, make(p), prepend=True)
            run_batches(model, batches, desc="SPON mean-dropped init")
        for p in self.projections:
            mean = (sums[p.key] / max(counts[p.key], 1)).float()
            self.alpha(p).copy_((mean / self.count).expand(self.count, -1).to(self.alpha(p).device))

    def initialise(self, init: str, model: nn.Module, sparsifier: Sparsifier, batches) -> None:
        if init == "zero":
            for a in self.alphas.values():
                a.data.zero_()
        elif init == "mean_dropped":
            self.init_mean_dropped(model, sparsifier, batches)
        else:
            raise ValueError(f"Unknown SPON init {init!r}; choose from {INITS}")

    # ------------------------------------------------------------------ state
    def alpha_state(self) -> dict[str, torch.Tensor]:
        return {f"alpha.{p.key}": self.alpha(p).detach().cpu().contiguous() for p in self.projections}

    def load_alpha_state(self, state: dict[str, torch.Tensor]) -> None:
        for p in self.projections:
            key = f"alpha.{p.key}"
            if key not in state:
                raise ValueError(f"Saved alphas lack {key} (model / projection set mismatch)")
            if tuple(state[key].shape) != tuple(self.alpha(p).shape):
                raise ValueError(f"Saved {key} has shape {tuple(state[key].shape)}, expected {tuple(self.alpha(p).shape)}")
            with torch.no_grad():
                self.alpha(p).copy_(state[key].to(self.alpha(p).device))


@contextlib.contextmanager
def dense_mode(*controllers) -> Iterator[None]:
    """Switch off every given sparsifier / SPON (None entries are ignored): the dense teacher."""
    with contextlib.ExitStack() as stack:
        for c in controllers:
            if c is not None:
                stack.enter_context(c.disabled())
        yield
