"""Drop-ins for the BERT-era optimizers that went away, with their exact updates, faster.

``AdamW``     transformers' ``AdamW`` (removed in 4.50; ``correct_bias=False`` is BERT's Adam)
``BertAdam``  pytorch-pretrained-bert 0.6.2's ``BertAdam`` (per-tensor clipping, schedule inside)
              and its schedules (``WarmupLinearSchedule``, ...)

Change the import and nothing else::

    from transformers import AdamW                      ->  from bertopt.compat import AdamW
    from pytorch_pretrained_bert import BertAdam        ->  from bertopt.compat import BertAdam

docs/migrating.md says what each old optimizer becomes and what changes numerically.
"""

from bertopt.compat.adamw import AdamW
from bertopt.compat.bert_adam import BertAdam
from bertopt.compat.ppb_schedules import (
    SCHEDULES,
    ConstantLR,
    LRSchedule,
    WarmupConstantSchedule,
    WarmupCosineSchedule,
    WarmupCosineWithHardRestartsSchedule,
    WarmupCosineWithWarmupRestartsSchedule,
    WarmupLinearSchedule,
)

__all__ = [
    "SCHEDULES",
    "AdamW",
    "BertAdam",
    "ConstantLR",
    "LRSchedule",
    "WarmupConstantSchedule",
    "WarmupCosineSchedule",
    "WarmupCosineWithHardRestartsSchedule",
    "WarmupCosineWithWarmupRestartsSchedule",
    "WarmupLinearSchedule",
]
