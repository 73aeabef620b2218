"""Load a causal LM and its tokenizer from a hub id, a local folder, a ``.gguf`` file,
the packaged default model, or a tiny randomly initialised config (for tests)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from spon_exp import hub
from spon_exp.assets import SMOLLM2, cache_dir, packaged_path
from spon_exp.tracking.store import read_entry, write_entry

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


def is_hub_id(path: str) -> bool:
    """Whether ``model.path`` names a hub repository (not a local path, not packaged / tiny-random)."""
    return (not path.startswith(("packaged:", "tiny-random:")) and not Path(path).expanduser().exists()
            and _looks_like_hub_id(path))


GGUF_MAGIC = b"GGUF"


def check_model_path(path: str) -> None:
    """Fail fast (before any heavy work) on a local path that is not a model: one that does
    not exist, a folder without ``config.json``, a file that is not GGUF."""
    if path == PACKAGED or path.startswith("tiny-random:"):
        return
    p = Path(path).expanduser()
    if p.exists():
        if p.is_dir() and not (p / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is not a model folder: it has no config.json; give a folder written by "
                                     f"save_pretrained, a .gguf file or a hub id.")
        if p.is_dir():
            _check_model_folder(p)
        if p.is_file() and p.suffix != ".gguf":
            raise ModelNotFoundError(f"Model file {path!r} is not a .gguf file; give a model folder, a .gguf file or a hub id.")
        if p.is_file():
            with p.open("rb") as f:
                magic = f.read(len(GGUF_MAGIC))
            if magic != GGUF_MAGIC:
                raise ModelNotFoundError(f"{path} is not a GGUF file: it does not start with the bytes 'GGUF' "
                                         f"(a damaged or partial download?); give a valid .gguf file, a model folder or a hub id.")
        return
    if path.endswith(".gguf") or not _looks_like_hub_id(path):
        raise ModelNotFoundError(
            f"Model path {path!r} does not exist; give an existing folder, a .gguf file, a hub id "
            f"like 'meta-llama/Meta-Llama-3-8B', or {PACKAGED!r} for the packaged default model."
        )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "sentencepiece.bpe.model")


def _check_model_folder(folder: Path) -> None:
    """A model folder needs a tokenizer and intact weights: checked from the files alone (the
    safetensors headers against the file sizes), before anything loads. An unreadable
    config.json is left to the check that reads it (:func:`model_context_length`)."""
    import json

    try:
        json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelNotFoundError(f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the "
                                 f"tokenizer into it too (tokenizer.save_pretrained({str(folder)!r})).")
    for weights in sorted(folder.glob("*.safetensors")):
        problem = safetensors_problem(weights)
        if problem:
            raise ModelNotFoundError(f"{weights} is damaged ({problem}); download or save the model again.")


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole safetensors file (a truncated download, another format), or
    None: its 8-byte header length, JSON header and the tensors' byte ranges against its size."""
    import json

    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{size} bytes: shorter than a safetensors header"
            n = int.from_bytes(head, "little")
            if n > size - 8 or n > 100_000_000:
                return f"its header claims {n} bytes and the file has {size}: truncated or not safetensors"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        return f"unreadable header: {type(e).__name__}"
    if not isinstance(header, dict):
        return "its header is not a table of tensors"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
            and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2]
    if ends and max(ends) > size - 8 - n:
        return f"its tensors need {8 + n + max(ends)} bytes and the file has {size}: truncated"
    return None


def _clear_quantizer_marks(model: torch.nn.Module) -> None:
    # transformers refuses save_pretrained on a GGUF-loaded (dequantized) model otherwise.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def packaged_copy_dir() -> Path:
    """Where :func:`packaged_model_dir` keeps the converted copy (it may not exist yet)."""
    return cache_dir() / "models" / "smollm2-135m-instruct"


def packaged_model_dir() -> Path:
    """Safetensors copy of the packaged SmolLM2-135M-Instruct, converted once from GGUF (a
    ``tracking.store`` entry: a damaged copy is moved aside and converted again)."""
    target = packaged_copy_dir()
    if read_entry(target, _check_model_copy, "converted packaged model") is None:
        log.info("Converting packaged model %s to safetensors (once) in %s", SMOLLM2_GGUF, target)
        write_entry(target, _convert_packaged)
    return target


def _check_model_copy(folder: Path) -> Path:
    from safetensors import safe_open

    json.loads((folder / "config.json").read_text())
    json.loads((folder / "tokenizer.json").read_text())
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        f.keys()
    return folder


def _convert_packaged(folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = packaged_path(SMOLLM2, SMOLLM2_GGUF)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    _clear_quantizer_marks(model)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


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


# Config fields that hold a model's number of positions, in order of preference.
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def _context_of(config) -> int | None:
    if hasattr(config, "get_text_config"):  # multimodal configs: the language model's part
        config = config.get_text_config()
    for name in CONTEXT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _gguf_context(path: Path) -> int | None:
    from gguf import GGUFReader

    try:
        fields = GGUFReader(str(path)).fields
        arch = fields["general.architecture"].contents()
        context = fields.get(f"{arch}.context_length")
        return int(context.contents()) if context is not None else None
    except Exception as e:  # noqa: BLE001 - whatever the parser trips on, the file is unusable
        raise ModelNotFoundError(f"{path} is not a readable GGUF file: its metadata is damaged or truncated "
                                 f"(a partial download?); give a valid .gguf file, a model folder or a hub id.") from e


def model_context_length(path: str) -> int | None:
    """The model's number of positions (``max_position_embeddings``), read from its config
    without loading weights; None when it cannot be known (a hub id while offline)."""
    from transformers import AutoConfig

    if path.startswith("tiny-random:"):
        return _context_of(tiny_random_config(path.split(":", 1)[1] or "llama"))
    if path == PACKAGED:
        copy = packaged_copy_dir()
        if (copy / "config.json").exists():
            return _context_of(AutoConfig.from_pretrained(copy))
        return _gguf_context(packaged_path(SMOLLM2, SMOLLM2_GGUF))
    check_model_path(path)
    p = Path(path).expanduser()
    if p.is_file():
        return _gguf_context(p)
    if p.is_dir():
        try:
            return _context_of(AutoConfig.from_pretrained(p))
        except Exception as e:  # noqa: BLE001 - a config.json transformers cannot read
            raise ModelNotFoundError(f"{p / 'config.json'} is not a model config transformers can read "
                                     f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    try:  # a hub id: the cached config, else the hub's (skipped offline)
        return _context_of(AutoConfig.from_pretrained(path, local_files_only=True))
    except Exception:  # noqa: BLE001
        pass
    if not hub.hub_reachable():
        log.info("Hub unreachable: the sequence lengths are not checked against %s's context", path)
        return None
    try:
        return _context_of(AutoConfig.from_pretrained(path))
    except Exception:  # noqa: BLE001 - gated / missing repos fail later, when the model loads
        return None


def check_device(device: str) -> None:
    """Fail fast on a device this machine does not have (``cuda`` without CUDA, ``cuda:3`` of 2)."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"Unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if d.type == "cpu":
        return
    backend = getattr(torch, d.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise ValueError(f"Device {device!r} is not available on this machine (torch {torch.__version__}); "
                         f"use model.device=cpu or run where {d.type} is available")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if d.index is not None and d.index >= count:
        raise ValueError(f"Device {device!r} does not exist: this machine has {count} {d.type} device(s), "
                         f"{d.type}:0 to {d.type}:{count - 1}")


def tokenizer_without_weights(path: str):
    """The model's tokenizer when it can be had cheaply (no weights, no network), else None:
    the byte tokenizer of tiny models, the packaged model's converted copy, a local folder's."""
    if path.startswith("tiny-random:"):
        from spon_exp.data.tokenizer import byte_tokenizer

        return byte_tokenizer()
    if path == PACKAGED:
        folder = packaged_copy_dir()
        if not (folder / "tokenizer.json").exists():
            return None
    else:
        folder = Path(path).expanduser()
        if not folder.is_dir():
            return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception:  # noqa: BLE001 - loading the model will report it properly
        return None


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

