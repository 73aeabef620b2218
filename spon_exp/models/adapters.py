"""Find, per decoder block, the seven projections and their four input sites.

Found by module structure: the decoder blocks are the entries of the model's largest
``nn.ModuleList`` whose entries contain ``nn.Linear`` children named like attention and
MLP projections. This serves Llama, Mistral, Qwen2, Qwen3, Gemma3 (and any family that
keeps the common q/k/v/o + gate/up/down naming) without touching their ``forward``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Input site of each projection: projections on one site see the same input tensor.
SITE_OF = {
    "q_proj": "qkv_input", "k_proj": "qkv_input", "v_proj": "qkv_input",
    "o_proj": "o_proj_input",
    "gate_proj": "gate_up_input", "up_proj": "gate_up_input",
    "down_proj": "down_proj_input",
}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")

# Other spellings of the same projections seen in public decoder families.
ALIASES = {
    "q_proj": ("q_proj", "query"), "k_proj": ("k_proj", "key"), "v_proj": ("v_proj", "value"),
    "o_proj": ("o_proj", "out_proj", "dense"),
    "gate_proj": ("gate_proj", "w1"), "up_proj": ("up_proj", "w3"), "down_proj": ("down_proj", "w2"),
}
ATTENTION_CONTAINERS = ("self_attn", "attention", "attn")
MLP_CONTAINERS = ("mlp", "feed_forward", "ffn")
# The norm whose output is a site's input (Gemma 3 normalises the MLP input with its
# pre_feedforward_layernorm; its post_attention_layernorm normalises the attention output).
NORMS = {
    "qkv_input": ("input_layernorm", "attention_norm", "ln_1"),
    "gate_up_input": ("pre_feedforward_layernorm", "post_attention_layernorm", "ffn_norm", "ln_2"),
}


class UnsupportedArchitectureError(ValueError):
    pass


@dataclass
class Projection:
    layer: int
    name: str  # canonical name, e.g. "q_proj"
    module: nn.Linear
    module_path: str  # dotted path inside the model

    @property
    def site(self) -> str:
        return SITE_OF[self.name]

    @property
    def key(self) -> str:
        return f"{self.layer}.{self.name}"

    @property
    def num_params(self) -> int:
        return self.module.weight.numel()


@dataclass
class DecoderBlock:
    index: int
    module: nn.Module
    module_path: str
    projections: dict[str, Projection] = field(default_factory=dict)
    #: the module whose input is a site's input, for the sites whose consumers all read the
    #: container's input (qkv_input: the attention module, gate_up_input: the MLP module)
    containers: dict[str, nn.Module] = field(default_factory=dict)
    #: the norm module producing the input of qkv_input / gate_up_input, where found
    norms: dict[str, nn.Module] = field(default_factory=dict)


def _find_child(parent: nn.Module, names: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    for n in names:
        child = getattr(parent, n, None)
        if isinstance(child, nn.Module):
            return n, child
    return None


def _block_projections(index: int, block: nn.Module, block_path: str) -> dict[str, Projection]:
    found: dict[str, Projection] = {}
    for containers, names in ((ATTENTION_CONTAINERS, ATTENTION), (MLP_CONTAINERS, MLP)):
        hit = _find_child(block, containers)
        if hit is None:
            continue
        cname, container = hit
        for canonical in names:
            lin = _find_child(container, ALIASES[canonical])
            if lin is not None and isinstance(lin[1], nn.Linear):
                found[canonical] = Projection(index, canonical, lin[1], f"{block_path}.{cname}.{lin[0]}")
    return found


def find_decoder_blocks(model: nn.Module) -> list[DecoderBlock]:
    """All decoder blocks with their seven projections, or one clear error."""
    best: tuple[str, nn.ModuleList] | None = None
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if _block_projections(0, module[0], path):
                if best is None or len(module) > len(best[1]):
                    best = (path, module)
    if best is None:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise UnsupportedArchitectureError(
            f"No decoder blocks with recognisable projections in {type(model).__name__}: expected "
            f"a ModuleList of blocks holding {'/'.join(PROJECTIONS)} linear layers, found linear "
            f"layers named {linears or 'none'}. Add the names to spon_exp.models.adapters.ALIASES."
        )
    path, layers = best
    blocks = []
    for i, block in enumerate(layers):
        projs = _block_projections(i, block, f"{path}.{i}")
        missing = [p for p in PROJECTIONS if p not in projs]
        if missing:
            raise UnsupportedArchitectureError(
                f"Decoder block {path}.{i} of {type(model).__name__} lacks projections {missing}; "
                f"found {sorted(projs)}."
            )
        containers = {site: hit[1] for site, names in (("qkv_input", ATTENTION_CONTAINERS), ("gate_up_input", MLP_CONTAINERS))
                      if (hit := _find_child(block, names)) is not None}
        norms = {site: hit[1] for site, names in NORMS.items() if (hit := _find_child(block, names)) is not None}
        blocks.append(DecoderBlock(i, block, f"{path}.{i}", projs, containers, norms))
    return blocks


PROJECTION_SETS = {
    "all": PROJECTIONS,
    "attention": ATTENTION,
    "mlp": MLP,
    "down_proj": ("down_proj",),
}


def projection_names(which: str | list[str] = "all") -> tuple[str, ...]:
    """The projection names of a set name (all/attention/mlp/down_proj) or a list of names."""
    if isinstance(which, str):
        if which not in PROJECTION_SETS:
            raise ValueError(f"Unknown projection set {which!r}; choose from {sorted(PROJECTION_SETS)} or list names from {PROJECTIONS}")
        return PROJECTION_SETS[which]
    names = tuple(which)
    bad = [n for n in names if n not in PROJECTIONS]
    if bad or not names:
        raise ValueError(f"Unknown projection names {bad}; valid names are {PROJECTIONS}" if bad
                         else f"An empty projection list selects nothing; list names from {PROJECTIONS}")
    return names


def select_projections(blocks: list[DecoderBlock], which: str | list[str] = "all") -> list[Projection]:
    """Projections of every block named by a set name (all/attention/mlp/down_proj) or a list."""
    names = projection_names(which)
    return [b.projections[n] for b in blocks for n in PROJECTIONS if n in names]
