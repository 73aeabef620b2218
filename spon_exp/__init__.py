"""spon-exp: activation sparsity + SPON experiment framework."""

__version__ = "0.1.0"


def load_sparse_model(folder, **kwargs):
    """A folder written by ``spon-exp-export`` (or its hub repository), loaded sparse: the same
    as ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, **kwargs)``."""
    from spon_exp.export import load_sparse_model as load

    return load(folder, **kwargs)
