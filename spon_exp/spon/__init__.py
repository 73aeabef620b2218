"""SPON: alpha parameters, training, folding and export."""

from spon_exp.spon.alpha import INITS, Spon, dense_mode
from spon_exp.spon.fold import (FoldMismatchError, export_checkpoint, fold_alpha, fold_alpha_checked,
                                 load_sparse_state, save_sparse_state)
from spon_exp.spon.train import TrainConfig, TrainResult, train_alpha

__all__ = ["INITS", "FoldMismatchError", "Spon", "TrainConfig", "TrainResult", "dense_mode", "export_checkpoint",
           "fold_alpha", "fold_alpha_checked", "load_sparse_state", "save_sparse_state", "train_alpha"]
