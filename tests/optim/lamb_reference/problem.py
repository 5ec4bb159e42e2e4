"""The small problem both LAMB fixtures are recorded on (imports numpy only).

Tensors named like BERT's (so the usual exclusion list applies), one that starts at
zero (||p|| = 0: the trust ratio falls back to 1) and one whose gradient is always zero
(||u|| = 0 without decay). Gradients alternate between small and large, so a global
clip at 1.0 triggers on some steps and not on others.
"""

from __future__ import annotations

import numpy as np

SHAPES = {
    "encoder.dense.weight": (6, 5),
    "encoder.dense.bias": (6,),
    "encoder.LayerNorm.weight": (6,),
    "encoder.LayerNorm.bias": (6,),
    "pooler.dense.weight": (4, 6),  # starts at zero
    "cls.weight": (3, 4),
    "unused.bias": (2,),  # gradient always zero
}
STEPS = 12
LR = 0.02
WEIGHT_DECAY = 0.01
EXCLUDE = ("LayerNorm", "layer_norm", "bias")


def decayed(name: str) -> bool:
    return not any(word in name for word in EXCLUDE)


def make_problem(seed: int = 0):
    """(initial params, per-step gradients): dicts of float32 arrays."""
    rng = np.random.default_rng(seed)
    init = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
    init["encoder.LayerNorm.weight"] = (1.0 + 0.1 * rng.standard_normal(6)).astype(np.float32)
    init["pooler.dense.weight"][:] = 0.0
    grads = []
    for step in range(STEPS):
        scale = 0.05 if step % 3 == 0 else 1.5  # global norm ~0.3 or ~9
        g = {n: (scale * rng.standard_normal(s)).astype(np.float32) for n, s in SHAPES.items()}
        g["unused.bias"][:] = 0.0
        grads.append(g)
    return init, grads


def to_lists(arrays: dict) -> dict:
    return {n: np.asarray(a, dtype=np.float32).tolist() for n, a in arrays.items()}
