"""The Hugging Face hub: whether it answers, asked once per process with a short timeout,
and :func:`load_sparse_model`, which loads a spon-exp export from a folder or a hub repository.

Offline, the hub clients retry for a long while before failing; callers that can do without
the hub (lm-eval's offline task copies, the context-length check of a hub model) ask here
first. ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` set to 1 mean unreachable without a try.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)

_HUB_REACHABLE: bool | None = None


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0, refresh: bool = False) -> bool:
    """Whether the Hugging Face hub answers (once per process unless ``refresh``).

    ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` set to 1 mean unreachable without a try.
    """
    global _HUB_REACHABLE
    if _HUB_REACHABLE is not None and not refresh:
        return _HUB_REACHABLE
    if _env_true("HF_HUB_OFFLINE") or _env_true("HF_DATASETS_OFFLINE"):
        _HUB_REACHABLE = False
        log.info("HF hub treated as unreachable (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE set)")
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    req = urllib.request.Request(endpoint + "/api/datasets?limit=1", method="HEAD")
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout):
            ok = True
    except urllib.error.HTTPError as exc:  # an HTTP answer: the server is there
        ok = exc.code < 500
    except Exception:  # noqa: BLE001 - DNS failure, refused, timeout, proxy error ...
        ok = False
    _HUB_REACHABLE = ok
    log.info("HF hub at %s %s (%.1f s)", endpoint, "reachable" if ok else "unreachable",
             time.perf_counter() - t0)
    return ok


def load_sparse_model(folder: str | Path, **kwargs):
    """The exported sparse model in ``folder`` (or a hub repository id), loaded exactly as a
    user without spon-exp would: ``AutoModelForCausalLM.from_pretrained(folder,
    trust_remote_code=True, **kwargs)``. ``model.sparse_runtime.disabled()`` runs it dense."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, **kwargs)
