"""Optimizers: BertAdam (and LAMB), their math in ``_adam`` and ``_lamb``, global clipping in ``clip``."""

from bertopt.optim.bert_adam import BertAdam
from bertopt.optim.clip import clip_coefficient, global_grad_norm
from bertopt.optim.lamb import Lamb

__all__ = ["BertAdam", "Lamb", "clip_coefficient", "global_grad_norm"]
