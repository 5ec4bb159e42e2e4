"""Google's ``create_optimizer``, wired from bertopt's pieces.

    optimizer, scheduler = bertopt.create_optimizer(model, 5e-5, num_train_steps, num_warmup_steps)
    ...
    loss.backward(); optimizer.step(); scheduler.step(); optimizer.zero_grad()
"""

from __future__ import annotations

from typing import Any, Iterable

from torch import nn

from bertopt.grouping import BERT_EXCLUDE, param_groups
from bertopt.optim.bert_adam import BertAdam
from bertopt.optim.lamb import Lamb
from bertopt.schedules import bert_schedule, polynomial_schedule

OPTIMIZERS = ("adam", "lamb")
# NVIDIA's BERT LAMB recipe (DeepLearningExamples PyTorch/LanguageModeling/BERT,
# PolyWarmUpScheduler): linear warmup, then (1 - step/T) ** 0.5, counted from step 0.
LAMB_DECAY_POWER = 0.5


def create_optimizer(
    model: nn.Module,
    init_lr: float,
    num_train_steps: int,
    num_warmup_steps: int | None = None,
    *,
    optimizer: str = "adam",
    weight_decay: float = 0.01,
    exclude: Iterable[str] = BERT_EXCLUDE,
    max_grad_norm: float | None = 1.0,
    schedule_style: str = "google",
    warmup_proportion: float = 0.1,
    **overrides: Any,
):
    """``(optimizer, scheduler)`` reproducing google-research/bert's ``create_optimizer``.

    BertAdam with weight decay 0.01 except for LayerNorm/bias parameters, betas
    (0.9, 0.999), eps 1e-6, no bias correction, gradients clipped by global norm 1.0,
    and the learning rate warmed up linearly from 0 over ``num_warmup_steps``, then
    decayed linearly to 0 at ``num_train_steps`` (``schedule_style="google"``: the decay
    counts from step 0; ``"rebased"``: it starts from the peak, as in transformers).
    ``num_warmup_steps=None`` means ``int(num_train_steps * warmup_proportion)``.
    Other keyword arguments go to the optimizer (e.g. ``foreach=True``, ``betas=...``).

    ``optimizer="lamb"`` is NVIDIA's BERT pretraining recipe instead: :class:`Lamb` with
    its defaults (apex FusedLAMB's: bias correction, eps 1e-6, trust ratio where weight
    decay applies), the same decay groups and clipping, and the LR warmed up linearly,
    then decayed as ``(1 - step / T) ** 0.5`` (power 0.5, counted from step 0 with the
    google style).
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    groups = param_groups(model, weight_decay=weight_decay, exclude=exclude)
    if optimizer == "lamb":
        mode = overrides.pop("weight_decay_mode", "decoupled")
        if mode != "decoupled":
            raise ValueError(
                f"weight_decay_mode={mode!r} is for optimizer='adam'; LAMB's weight decay is "
                "decoupled (part of the update the trust ratio scales)"
            )
        opt = Lamb(groups, lr=init_lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm, **overrides)
        scheduler = polynomial_schedule(
            opt, num_train_steps, num_warmup_steps, warmup_proportion,
            power=LAMB_DECAY_POWER, style=schedule_style,
        )
        return opt, scheduler
    opt = BertAdam(groups, lr=init_lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm, **overrides)
    scheduler = bert_schedule(
        opt, num_train_steps, num_warmup_steps=num_warmup_steps,
        warmup_proportion=warmup_proportion, style=schedule_style,
    )
    return opt, scheduler
