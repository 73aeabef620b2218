import pytest
import torch
from torch import nn

from spon_exp.models.adapters import (PROJECTIONS, SITE_OF, UnsupportedArchitectureError, find_decoder_blocks,
                                      select_projections)
from spon_exp.sparsifiers import build_sparsifier
from tests.helpers import FAMILIES, tiny


@pytest.mark.parametrize("family", FAMILIES)
def test_hooks_sit_on_exactly_the_seven_projections(family):
    model = tiny(family).model
    sp = build_sparsifier("teal", sparsity=0.5).attach(model)
    hooked = {name for name, m in model.named_modules() if m._forward_pre_hooks}
    n_layers = model.config.num_hidden_layers
    expected = set()
    for i in range(n_layers):
        expected |= {f"model.layers.{i}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
        expected |= {f"model.layers.{i}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    assert hooked == expected
    assert len(sp.projections) == 7 * n_layers
    sp.detach()
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_sites_group_shared_inputs():
    blocks = find_decoder_blocks(tiny().model)
    sites = {p.site for p in blocks[0].projections.values()}
    assert sites == {"qkv_input", "o_proj_input", "gate_up_input", "down_proj_input"}
    assert SITE_OF["q_proj"] == SITE_OF["k_proj"] == SITE_OF["v_proj"]
    assert SITE_OF["gate_proj"] == SITE_OF["up_proj"] != SITE_OF["down_proj"]


def test_projection_sets():
    blocks = find_decoder_blocks(tiny().model)
    assert [p.name for p in select_projections(blocks, "down_proj")] == ["down_proj"] * len(blocks)
    assert {p.name for p in select_projections(blocks, "attention")} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert {p.name for p in select_projections(blocks, "mlp")} == {"gate_proj", "up_proj", "down_proj"}
    assert len(select_projections(blocks, "all")) == 7 * len(blocks)
    with pytest.raises(ValueError, match="Unknown projection set"):
        select_projections(blocks, "everything")


def test_unsupported_architecture_names_what_was_found():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedArchitectureError, match="found linear layers named") as err:
        find_decoder_blocks(model)
    assert "q_proj" in str(err.value)


def test_block_missing_a_projection_is_reported():
    model = tiny().model
    model.model.layers[1].mlp.down_proj = nn.Identity()
    with pytest.raises(UnsupportedArchitectureError, match="lacks projections \\['down_proj'\\]"):
        find_decoder_blocks(model)
    assert PROJECTIONS[-1] == "down_proj"
    assert torch.is_tensor(model.model.layers[0].mlp.down_proj.weight)
