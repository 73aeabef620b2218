"""Sparse runtime of a spon-exp export: runs the exported model sparse, exactly as measured.

This file is copied verbatim into every folder ``spon-exp-export`` writes and is loaded by
``transformers`` with ``trust_remote_code=True``; it imports only torch, safetensors and
transformers (never spon_exp), so the export runs wherever transformers does:

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

``config.json``'s ``auto_map`` points ``AutoModelForCausalLM`` at :class:`SponSparseForCausalLM`,
whose ``from_pretrained`` loads the family's own class (Llama, Qwen3, Gemma3, ...) with the
exported weights and then :func:`attach_sparse_runtime` puts the masking on it:

- every projection listed in ``sparse_runtime.json`` is found by its module name and gets
  its folded SPON bias ``b' = b + W·Σα`` (from ``sparse_runtime.safetensors``); a layer
  whose architecture declares no bias (Gemma3, Qwen3, Llama without ``attention_bias`` /
  ``mlp_bias``) gets a bias parameter created for it, so ``config.json`` needs no bias flag;
- a run with ``spon.apply=sparsified`` (``"spon_apply": "sparsified"``) keeps two biases per
  projection and picks per token: a forward whose tokens are all sparsified (every decode
  token) computes with ``b'``; a forward whose leading tokens the token policy keeps dense (a
  prefill) computes with the original bias (``dense_bias.*``, none where the layer had none)
  and adds ``b' − b`` to its sparsified trailing rows, exactly as the run computed them;
- a forward pre-hook on each projection masks its input: a magnitude threshold
  (``hardshrink``), a score threshold or per-token top-k, on ``|x|`` or ``|x|·‖W[:, i]‖₂``;
  where the state holds a rotation ``Q`` for the projection's input site, the input is
  ``x·Q``, masked in that basis, and multiplied back by ``Qᵀ`` when the method keeps its
  rotation at run time (``rotate_back``); a method that folded ``Q`` into the consumer
  weights (``W·Q``, saved so in ``model.safetensors``) lists the site under
  ``folded_rotations``: a pre-hook on the site's container (the attention or MLP module)
  rotates its input once, always (the dense function needs it too), and the consumers mask
  the rotated input;
- R-Sparse's low-rank path for the dropped channels, ``U_r S_r V_rᵀ (x − x ⊙ m)``, is a
  forward hook that adds it to the projection's output;
- the token policy (which trailing tokens of a forward are sparsified) and the sharing of
  one masked input among the projections of a site are those of the run.

``model.sparse_runtime.disabled()`` runs the model dense (with the folded biases) inside a
``with`` block; ``model.sparse_runtime.detach()`` removes the hooks.
"""

from __future__ import annotations

import contextlib
import json
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

FORMAT = "spon-exp-sparse-runtime/1"
SPEC_FILE = "sparse_runtime.json"
STATE_FILE = "sparse_runtime.safetensors"


def sparsified_tokens(policy: dict, num_tokens: int) -> int:
    """How many trailing tokens of a forward of ``num_tokens`` are sparsified (a single
    decode token always is)."""
    kind = policy.get("kind", "all")
    if kind == "all" or num_tokens == 1:
        n = num_tokens
    else:
        share = num_tokens * (0.5 if kind == "last_half" else float(policy.get("fraction", 0.5)))
        n = max(1, math.floor(share) if policy.get("rounding") == "floor" else math.ceil(share))
    dense_first = float(policy.get("dense_first_fraction", 0.0))
    if dense_first > 0 and num_tokens > 1:
        n = min(n, int(num_tokens * (1.0 - dense_first)))
    return n


def topk_mask(score: torch.Tensor, keep: int, ties: str = "break") -> torch.Tensor:
    """The ``keep`` highest scores along the last dimension. Scores equal to the ``keep``-th
    largest at the cut: ``keep`` keeps them all; ``break`` keeps exactly ``keep``, taking the
    tied entries of lowest index."""
    width = score.shape[-1]
    if keep >= width:
        return torch.ones_like(score, dtype=torch.bool)
    if keep <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    kth = score.kthvalue(width - keep + 1, dim=-1, keepdim=True).values
    if ties == "keep":
        return score >= kth
    above, tied = score > kth, score == kth
    room = keep - above.sum(dim=-1, keepdim=True)
    return above | (tied & (tied.cumsum(dim=-1) <= room))


def rotate(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``x·Q`` computed in ``Q``'s dtype, returned in ``x``'s."""
    return (x.to(q.dtype) @ q.to(x.device)).to(x.dtype)


class _Site:
    """One projection's masking, as listed in ``sparse_runtime.json``."""

    def __init__(self, entry: dict, module: nn.Linear, tensors: dict, rotate_back: bool):
        self.name = entry["module"]
        self.site = entry["site"]
        self.share = entry["share"]
        self.mask = entry["mask"]  # hardshrink / threshold / topk
        self.threshold = entry.get("threshold")
        self.keep = entry.get("keep")
        self.ties = entry.get("ties", "break")
        self.score_float32 = bool(entry.get("score_float32", False))
        device = module.weight.device
        self.column_norm = tensors[entry["column_norm"]].to(device) if entry.get("column_norm") else None
        self.rotation = tensors[entry["rotation"]].to(device) if entry.get("rotation") else None
        self.rotate_back = rotate_back
        self.low_rank = None
        if entry.get("low_rank"):
            down, up = entry["low_rank"]
            self.low_rank = (tensors[down].float().to(device), tensors[up].float().to(device))
        if self.mask not in ("hardshrink", "threshold", "topk"):
            raise ValueError(f"{SPEC_FILE}: unknown mask {self.mask!r} for {self.name}; this runtime knows "
                             f"hardshrink, threshold and topk (export it again with the same spon-exp version)")

    def _rotated_mask(self, x: torch.Tensor):
        """``(Q or None, input in the mask's basis, kept channels)`` for threshold and top-k masks."""
        if self.rotation is not None:
            q = self.rotation.to(x.device)
            z = x.to(q.dtype) @ q
        else:
            q, z = None, x
        score = z.detach()
        if self.score_float32:
            score = score.float()
        score = score.abs()
        if self.column_norm is not None:
            score = score * self.column_norm.to(score.device)
        mask = topk_mask(score, self.keep, self.ties) if self.mask == "topk" else score > self.threshold
        return q, z, mask

    def keep_mask(self, x: torch.Tensor) -> torch.Tensor:
        """The channels this projection keeps of input ``x`` (in the rotated basis where the site
        is rotated), every token sparsified; for diagnostics."""
        if self.mask == "hardshrink":
            return x.abs() > self.threshold if self.threshold > 0 else torch.ones_like(x, dtype=torch.bool)
        return self._rotated_mask(x)[2]

    def sparsify(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask == "hardshrink":  # keeps x where |x| > tau
            return F.hardshrink(x, self.threshold) if self.threshold > 0 else x
        q, z, mask = self._rotated_mask(x)
        out = z * mask.to(z.dtype)
        if q is not None and self.rotate_back:
            out = out @ q.T
        return out.to(x.dtype)


class SparseRuntime:
    """The hooks and biases of one export on one model."""

    def __init__(self, model: nn.Module, spec: dict, tensors: dict[str, torch.Tensor]):
        if spec.get("format") != FORMAT:
            raise ValueError(f"{SPEC_FILE} has format {spec.get('format')!r}, this runtime reads {FORMAT!r}")
        self.model, self.spec = model, spec
        self.policy = spec["token_policy"]
        self.enabled = True
        self._handles: list = []
        self._shared: dict[str, list] = {}
        self._stash: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        missing = [e["module"] for e in spec["projections"] + spec.get("folded_rotations", [])
                   if e["module"] not in modules]
        if missing:
            raise ValueError(f"The model has no modules {missing[:3]} named in {SPEC_FILE}: it is not the model "
                             f"this state was exported from")
        self.sites = [(_Site(e, modules[e["module"]], tensors, bool(spec["rotate_back"])), modules[e["module"]])
                      for e in spec["projections"]]
        self._consumers: dict[tuple[str, str], int] = {}
        for site, _ in self.sites:
            key = (site.site, site.share)
            self._consumers[key] = self._consumers.get(key, 0) + 1
        self.spon_apply = spec.get("spon_apply", "all")
        self._rows: dict[str, tuple[int, int]] = {}
        self._set_biases(modules, tensors)
        for folded in spec.get("folded_rotations", []):  # always on: the weights are W·Q
            container = modules[folded["module"]]
            q = tensors[folded["rotation"]].to(next(container.parameters()).device)
            self._handles.append(container.register_forward_pre_hook(self._rotation_hook(q), with_kwargs=True))
        for site, module in self.sites:
            if site.low_rank is not None:  # stash the input before it is masked
                self._handles.append(module.register_forward_pre_hook(self._stash_hook(site)))
            self._handles.append(module.register_forward_pre_hook(self._mask_hook(site)))
            if site.low_rank is not None:
                self._handles.append(module.register_forward_hook(self._low_rank_hook(site)))
        for name, (dense, sparse) in self._gated.items():  # after the masks and low-rank paths, as in the run
            module = modules[name]
            self._handles.append(module.register_forward_pre_hook(self._bias_choice_hook(name, dense, sparse)))
            self._handles.append(module.register_forward_hook(self._sparsified_rows_hook(name, dense, sparse)))

    @torch.no_grad()
    def _set_biases(self, modules: dict, tensors: dict) -> None:
        """apply=all: each folded bias becomes its projection's bias. apply=sparsified: the
        projection holds its original bias (or none) and :attr:`_gated` keeps both."""
        self._gated: dict[str, tuple] = {}
        for name in self.spec.get("biases", []):
            lin = modules[name]
            b = tensors[f"bias.{name}"].to(device=lin.weight.device, dtype=lin.weight.dtype)
            if self.spon_apply == "sparsified":
                dense = tensors.get(f"dense_bias.{name}")
                dense = None if dense is None else dense.to(device=lin.weight.device, dtype=lin.weight.dtype)
                lin.bias = None if dense is None else nn.Parameter(dense.clone(), requires_grad=False)
                self._gated[name] = (lin.bias, nn.Parameter(b.clone(), requires_grad=False))
            elif lin.bias is None:
                lin.bias = nn.Parameter(b.clone(), requires_grad=False)
            else:
                lin.bias.copy_(b)

    def _bias_choice_hook(self, name: str, dense, sparse):
        """apply=sparsified: a forward whose rows are all sparsified computes with ``b'``."""
        def hook(module, args):
            if not args:
                return None
            x = args[0]
            tokens = x.shape[-2] if x.dim() >= 2 else 1
            n = min(sparsified_tokens(self.policy, tokens), tokens) if self.enabled else 0
            self._rows[name] = (tokens, n)
            if n == tokens:
                module.bias = sparse
            return None
        return hook

    def _sparsified_rows_hook(self, name: str, dense, sparse):
        """apply=sparsified: the original bias back; a mixed forward's sparsified rows get ``b' − b``."""
        delta = sparse.detach() if dense is None else sparse.detach() - dense.detach()

        def hook(module, args, output):
            module.bias = dense
            tokens, n = self._rows.pop(name, (1, 0))
            if not 0 < n < tokens:
                return None
            if output.requires_grad and torch.is_grad_enabled():
                head, tail = output[..., : tokens - n, :], output[..., tokens - n:, :]
                return torch.cat([head, tail + delta], dim=-2)
            output[..., tokens - n:, :] += delta
            return output
        return hook

    @contextlib.contextmanager
    def disabled(self):
        """Inside, the model runs dense (every hook passes its input through)."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._shared.clear()
        self._stash.clear()

    def _apply(self, site: _Site, x: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[-2] if x.dim() >= 2 else 1
        n_sparse = sparsified_tokens(self.policy, tokens)
        if n_sparse == tokens:
            return site.sparsify(x)
        head, tail = x[..., : tokens - n_sparse, :], x[..., tokens - n_sparse:, :]
        return torch.cat([head, site.sparsify(tail)], dim=-2)

    def _mask_hook(self, site: _Site):
        def hook(module, args):
            if not self.enabled or not args:
                return None
            x = args[0]
            shared = self._shared.get(site.site)
            if shared is not None and shared[0] is x and shared[1] == site.share:
                shared[3] -= 1
                if shared[3] <= 0:
                    del self._shared[site.site]
                return (shared[2], *args[1:])
            out = self._apply(site, x)
            consumers = self._consumers[(site.site, site.share)]
            if consumers > 1:  # q/k/v (gate/up) read one input: mask it once for all of them
                self._shared[site.site] = [x, site.share, out, consumers - 1]
            return (out, *args[1:])
        return hook

    @staticmethod
    def _rotation_hook(q: torch.Tensor):
        def hook(module, args, kwargs):
            if args:
                return (rotate(args[0], q), *args[1:]), kwargs
            if "hidden_states" in kwargs:
                return args, {**kwargs, "hidden_states": rotate(kwargs["hidden_states"], q)}
            raise RuntimeError(f"{type(module).__name__} was called without hidden states to rotate")
        return hook

    def _stash_hook(self, site: _Site):
        def hook(module, args):
            if self.enabled and args:
                self._stash[site.name] = args[0]
        return hook

    def _low_rank_hook(self, site: _Site):
        def hook(module, args, output):
            x = self._stash.pop(site.name, None)
            if not self.enabled or x is None:
                return None
            down, up = site.low_rank
            down, up = down.to(x.dtype), up.to(x.dtype)
            dropped_part = x - args[0]  # x ⊙ (1 − m); zero on tokens kept dense
            if (output.requires_grad and torch.is_grad_enabled()) or not output.is_contiguous():
                return output + F.linear(F.linear(dropped_part, down), up)
            # inference: (down · restᵀ)ᵀ accumulated into the output in place, as spon-exp computes it
            low_t = down @ dropped_part.reshape(-1, dropped_part.shape[-1]).T
            output.view(-1, output.shape[-1]).addmm_(low_t.T, up.T)
            return output
        return hook


def _export_file(folder: str, filename: str, **hub_kwargs) -> str:
    """A file of the export: in the local folder, else from the hub repository (cached)."""
    if os.path.isdir(folder):
        return os.path.join(folder, filename)
    from transformers.utils import cached_file

    keep = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")
    return cached_file(folder, filename, **{k: v for k, v in hub_kwargs.items() if k in keep and v is not None})


def attach_sparse_runtime(model: nn.Module, folder: str, **hub_kwargs) -> SparseRuntime:
    """Set the folded biases and the masking hooks of the export in ``folder`` (a local folder
    or a hub repository id) on ``model``; the runtime is also ``model.sparse_runtime``."""
    from safetensors.torch import load_file

    with open(_export_file(folder, SPEC_FILE, **hub_kwargs), encoding="utf-8") as f:
        spec = json.load(f)
    tensors = load_file(_export_file(folder, STATE_FILE, **hub_kwargs))
    runtime = SparseRuntime(model, spec, tensors)
    model.sparse_runtime = runtime
    return runtime


class SponSparseForCausalLM:
    """``auto_map`` target: the family's own causal-LM class, loaded as usual, with the sparse
    runtime attached. The object returned is that class's instance (``LlamaForCausalLM``,
    ``Qwen3ForCausalLM``, ...) with ``sparse_runtime`` set."""

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModelForCausalLM"):
        """Nothing to register: :meth:`from_pretrained` returns the family's own class."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        for key in ("trust_remote_code", "adapter_kwargs", "code_revision"):
            kwargs.pop(key, None)
        if config is None:
            config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **kwargs)
        base = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
        model = base.from_pretrained(pretrained_model_name_or_path, *model_args, config=config, **kwargs)
        attach_sparse_runtime(model, str(pretrained_model_name_or_path), **kwargs)
        return model
