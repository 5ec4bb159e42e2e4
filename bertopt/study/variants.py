"""The optimizer variants the study compares, each a change to the BERT recipe.

Every variant is the BERT recipe (BertAdam: no bias correction, decoupled decay 0.01 with
the LayerNorm/bias exclusions, global clip 1.0, 10% linear warmup, Google's linear decay)
with one thing changed, so a difference in the results is the effect of that one thing.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    claim: str  # which claim it tests
    optimizer: str = "adam"
    bias_correction: bool = False
    weight_decay_mode: str = "decoupled"
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0  # 0 = off
    warmup_proportion: float = 0.1
    batch_multiplier: int = 1  # global batch = base batch * this; steps = base steps / this
    lr_multiplier: float = 1.0

    def optim(self, base_lr: float):
        """The optimizer settings of this variant (an OptimConfig; the rest is BERT's recipe)."""
        from bertopt.train.config import OptimConfig

        return OptimConfig(optimizer=self.optimizer, lr=base_lr * self.lr_multiplier, weight_decay=self.weight_decay,
                           max_grad_norm=self.max_grad_norm, warmup_proportion=self.warmup_proportion,
                           weight_decay_mode=self.weight_decay_mode if self.optimizer == "adam" else "decoupled",
                           bias_correction=True if self.optimizer == "adam" and self.bias_correction else None)

    def batch_and_steps(self, base_batch: int, base_steps: int) -> tuple[int, int]:
        """A larger batch trains for proportionally fewer steps (the same examples seen)."""
        return base_batch * self.batch_multiplier, max(1, base_steps // self.batch_multiplier)


BASELINE = "bert"

VARIANTS: tuple[Variant, ...] = (
    Variant("bert", "BertAdam (BERT recipe)", "baseline"),
    Variant("adamw", "AdamW (bias correction)", "2: bias correction can be dropped", bias_correction=True),
    Variant("adam_l2", "Adam + L2 (same strength)", "1: decoupled decay beats L2", weight_decay_mode="l2"),
    Variant("no_warmup", "BertAdam, no warmup", "3: warmup protects early training", warmup_proportion=0.0),
    Variant("no_clip", "BertAdam, no clipping", "clipping", max_grad_norm=0.0),
    Variant("adam", "Adam, no decay", "4: BERT's optimizer vs plain Adam", bias_correction=True, weight_decay=0.0),
    Variant("lamb", "LAMB", "5: LAMB matters only at large batch", optimizer="lamb"),
    Variant("bert_4x", "BertAdam, 4x batch", "5: LAMB matters only at large batch", batch_multiplier=4, lr_multiplier=2.0),
    Variant("lamb_4x", "LAMB, 4x batch", "5: LAMB matters only at large batch", optimizer="lamb", batch_multiplier=4, lr_multiplier=2.0),
    # Each optimizer at its own LR: the multipliers that did best in `python -m
    # bertopt.study.lr_sweep` (seed 100, not a study seed; pretraining by held-out loss,
    # fine-tuning by dev accuracy). LAMB: x10 in both tasks, x20 at 4x batch. BertAdam: x0.25
    # in both tasks and at both batch sizes.
    Variant("lamb_lr", "LAMB at its own LR", "5: LAMB matters only at large batch", optimizer="lamb",
            lr_multiplier=10.0),
    Variant("lamb_4x_lr", "LAMB, 4x batch, its own LR", "5: LAMB matters only at large batch", optimizer="lamb",
            batch_multiplier=4, lr_multiplier=20.0),
    Variant("bert_lr", "BertAdam at its own LR", "5: LAMB matters only at large batch", lr_multiplier=0.25),
    Variant("bert_4x_lr", "BertAdam, 4x batch, its own LR", "5: LAMB matters only at large batch",
            batch_multiplier=4, lr_multiplier=0.25),
)

BY_NAME = {v.name: v for v in VARIANTS}
