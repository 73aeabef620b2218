"""spon-exp: activation sparsity + SPON experiment framework."""

__version__ = "0.1.0"
