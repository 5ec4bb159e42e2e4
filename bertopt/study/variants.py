"""The optimizer variants the study compares, each a change to the BERT recipe.

Every variant is the BERT recipe (BertAdam: no bias correction, decoupled decay 0.01 with
the LayerNorm/bias exclusions, global clip 1.0, 10% linear warmup, Google's linear decay)
with one thing changed, so a difference in the results is the effect of that one thing. The
learning rate is not part of a variant: each part of the study gives it (fixed, or chosen per
variant by a sweep on a seed of its own).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    optimizer: str = "adam"
    bias_correction: bool = False
    weight_decay_mode: str = "decoupled"
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0  # 0 = off
    warmup_proportion: float = 0.1

    def optim(self, lr: float):
        """The optimizer settings of this variant at ``lr`` (an OptimConfig; the rest is BERT's recipe)."""
        from bertopt.train.config import OptimConfig

        return OptimConfig(optimizer=self.optimizer, lr=lr, weight_decay=self.weight_decay,
                           max_grad_norm=self.max_grad_norm, warmup_proportion=self.warmup_proportion,
                           weight_decay_mode=self.weight_decay_mode if self.optimizer == "adam" else "decoupled",
                           bias_correction=True if self.optimizer == "adam" and self.bias_correction else None)


VARIANTS: tuple[Variant, ...] = (
    Variant("bert", "BertAdam (BERT recipe)"),
    Variant("adamw", "AdamW: BertAdam with bias correction", bias_correction=True),
    Variant("adam", "plain Adam: bias correction, no weight decay", bias_correction=True, weight_decay=0.0),
    Variant("lamb", "LAMB (NVIDIA's recipe: bias correction, trust ratio)", optimizer="lamb"),
    Variant("adam_l2", "Adam + L2 0.01 in the loss instead of decoupled decay", weight_decay_mode="l2"),
    Variant("bert_wd0.1", "BertAdam, decoupled weight decay 0.1", weight_decay=0.1),
    Variant("adam_l2_wd0.1", "Adam + L2 0.1 in the loss", weight_decay_mode="l2", weight_decay=0.1),
)

BY_NAME = {v.name: v for v in VARIANTS}
