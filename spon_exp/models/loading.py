"""Load a causal LM and its tokenizer from a hub id, a local folder, a ``.gguf`` file,
the packaged default model, or a tiny randomly initialised config (for tests)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from spon_exp.assets import SMOLLM2, cache_dir, packaged_path

log = logging.getLogger(__name__)

PACKAGED = "packaged:smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


class ModelNotFoundError(FileNotFoundError):
    pass


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    path: str  # what the user asked for
    source: str  # resolved folder / file actually loaded


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {sorted(set(DTYPES))}") from None


def _looks_like_hub_id(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not path.startswith((".", "/", "~"))


def check_model_path(path: str) -> None:
    """Fail fast (before any heavy work) on a local path that does not exist."""
    if path == PACKAGED or path.startswith("tiny-random:"):
        return
    p = Path(path).expanduser()
    if p.exists():
        if p.is_file() and p.suffix != ".gguf":
            raise ModelNotFoundError(f"Model file {path!r} is not a .gguf file; give a model folder, a .gguf file or a hub id.")
        return
    if path.endswith(".gguf") or not _looks_like_hub_id(path):
        raise ModelNotFoundError(
            f"Model path {path!r} does not exist; give an existing folder, a .gguf file, a hub id "
            f"like 'meta-llama/Meta-Llama-3-8B', or {PACKAGED!r} for the packaged default model."
        )


def _clear_quantizer_marks(model: torch.nn.Module) -> None:
    # transformers refuses save_pretrained on a GGUF-loaded (dequantized) model otherwise.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def packaged_model_dir() -> Path:
    """Safetensors copy of the packaged SmolLM2-135M-Instruct, converted once from GGUF."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = packaged_path(SMOLLM2, SMOLLM2_GGUF)
    log.info("Converting packaged model %s to safetensors (once) in %s", gguf.name, target)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    _clear_quantizer_marks(model)
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if target.exists():
        import shutil
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def tiny_random_config(family: str, **overrides):
    """A tiny config of a supported family, for tests and smoke runs."""
    from transformers import AutoConfig

    base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                tie_word_embeddings=False)
    family_specific = {
        "llama": {},
        "mistral": {"sliding_window": None},
        "qwen2": {},
        "qwen3": {"head_dim": 16},
        "gemma3_text": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 64},
    }
    if family not in family_specific:
        raise ValueError(f"No tiny config for family {family!r}; choose from {sorted(family_specific)}")
    kwargs = {**base, **family_specific[family], **overrides}
    return AutoConfig.for_model(family, **kwargs)


def _load_tiny_random(spec: str, dtype: torch.dtype, seed: int = 0) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    from spon_exp.data.tokenizer import BYTE_VOCAB_SIZE, byte_tokenizer

    family = spec.split(":", 1)[1] or "llama"
    config = tiny_random_config(family, vocab_size=BYTE_VOCAB_SIZE)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    return LoadedModel(model, byte_tokenizer(), spec, spec)


def load_model(path: str = PACKAGED, dtype: str | torch.dtype = "float32", device: str = "cpu",
               device_map: str | None = None) -> LoadedModel:
    """Load a causal LM with its tokenizer.

    ``path`` is ``packaged:smollm2-135m-instruct`` (offline default), ``tiny-random:<family>``,
    a hub id, a local model folder or a ``.gguf`` file. ``device_map="auto"`` spreads a
    model larger than one GPU (accelerate); otherwise the model is moved to ``device``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_path(path)
    torch_dtype = resolve_dtype(dtype)
    if path.startswith("tiny-random:"):
        loaded = _load_tiny_random(path, torch_dtype)
        loaded.model.to(device)
        return loaded
    kwargs: dict = {"dtype": torch_dtype}
    if device_map:
        kwargs["device_map"] = device_map
    if path == PACKAGED:
        folder, gguf_file = packaged_model_dir(), None
    else:
        p = Path(path).expanduser()
        if p.is_file():
            folder, gguf_file = p.parent, p.name
        else:
            folder, gguf_file = (p if p.exists() else path), None
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    log.info("Loading model %s", path)
    tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs, **extra)
    if gguf_file:
        _clear_quantizer_marks(model)
    if not device_map:
        model.to(device)
    model.eval()
    return LoadedModel(model, tokenizer, path, str(Path(folder) / gguf_file) if gguf_file else str(folder))


def model_fingerprint(loaded: LoadedModel) -> str:
    """What identifies the weights for caching: the resolved source plus its config."""
    cfg = loaded.model.config.to_dict()
    keep = {k: cfg.get(k) for k in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")}
    return json.dumps({"source": loaded.path, **keep}, sort_keys=True)
