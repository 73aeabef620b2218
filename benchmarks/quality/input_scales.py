"""Per projection type, averaged over the decoder blocks: the RMS and the median |x| (TEAL's 50 %
threshold) of its input on 4 x 256 calibration tokens, for the packaged SmolLM2-135M and the
Gemma-3-270M GGUF (benchmarks/RESULTS.md, "SPON recipe search", says how to fetch it).

    python benchmarks/quality/input_scales.py [OUT.json]
"""
import json
import sys

import torch
from spon_exp.models.loading import load_model
from spon_exp.models.adapters import find_decoder_blocks, PROJECTIONS
from spon_exp.data.corpora import token_blocks
torch.set_num_threads(1)
out = {}
for name, path in [("smollm2", "packaged:smollm2-135m-instruct"), ("gemma3", "/tmp/gemma/gemma-3-270m-q4_k_m.gguf")]:
    lm = load_model(path)
    blocks = find_decoder_blocks(lm.model)
    x = token_blocks(lm.tokenizer, "wikipedia", "calibration", seq_len=256, max_blocks=4)
    stats = {n: [] for n in PROJECTIONS}
    hooks = []
    for b in blocks:
        for n, p in b.projections.items():
            def hook(mod, args, n=n):
                a = args[0].detach().float().flatten()
                stats[n].append((a.pow(2).mean().sqrt().item(), a.abs().median().item()))
            hooks.append(p.module.register_forward_pre_hook(hook))
    with torch.no_grad():
        lm.model(x[:4])
    for h in hooks:
        h.remove()
    out[name] = {n: {"rms": sum(s[0] for s in v) / len(v), "median_abs": sum(s[1] for s in v) / len(v),
                     "max_layer_rms": max(s[0] for s in v)} for n, v in stats.items() if v}
    norms = sorted({k for b in blocks for k in b.norms})
    out[name]["norm_sites"] = norms
    print(name, json.dumps(out[name], indent=1))
with open(sys.argv[1] if len(sys.argv) > 1 else "input_scales.json", "w") as f:
    json.dump(out, f, indent=1)
