"""spon-exp: activation sparsity + SPON experiment framework.

``load_sparse_model(folder)`` loads a folder written by ``spon-exp-export`` (or its hub
repository) sparse, as ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``."""

from spon_exp.hub import load_sparse_model

__version__ = "0.1.0"

__all__ = ["load_sparse_model"]
