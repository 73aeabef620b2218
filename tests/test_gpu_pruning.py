"""On CUDA, in bf16: Wanda and SparseGPT prune every family's tiny model with the exact pattern
and sparsity, and the float32 masks on CUDA agree with the CPU's. Skipped without a GPU."""

import pytest
import torch

from spon_exp.models.loading import load_model
from spon_exp.pruning import build_pruner
from spon_exp.pruning.driver import prune_model
from tests.helpers import FAMILIES, random_ids

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PATTERNS = {"unstructured": {}, "2:4": {"prune_n": 2, "prune_m": 4}}


def masks(family: str, method: str, pattern: dict, dtype: str, device: str) -> tuple[dict, torch.Tensor]:
    lm = load_model(f"tiny-random:{family}", dtype=dtype, device=device)
    ids = random_ids(8, 32).to(device)
    keeps = {}
    prune_model(lm.model, ids.split(4), build_pruner(method, 0.5, **pattern),
                on_pruned=lambda p, keep: keeps.__setitem__(p.key, keep.cpu()))
    with torch.no_grad():
        logits = lm.model(ids).logits.float().cpu()
    return keeps, logits


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_bf16_pruning_keeps_the_pattern(family, method, pattern):
    keeps, logits = masks(family, method, PATTERNS[pattern], "bfloat16", "cuda")
    assert torch.isfinite(logits).all()
    assert len(keeps) == 7 * 2  # every projection of the two tiny blocks
    for keep in keeps.values():
        assert (~keep).sum() == keep.numel() // 2
        if pattern == "2:4":
            assert ((~keep).reshape(keep.shape[0], -1, 4).sum(-1) == 2).all()


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_cuda_float32_masks_agree_with_the_cpu(method):
    cuda, _ = masks("llama", method, {}, "float32", "cuda")
    cpu, _ = masks("llama", method, {}, "float32", "cpu")
    differing = sum(int((cuda[k] != cpu[k]).sum()) for k in cpu)
    total = sum(k.numel() for k in cpu.values())
    assert differing <= 0.001 * total  # summation order differs; a wrong device path would differ everywhere
