"""Record optax.lamb trajectories for tests/optim/test_lamb_reference.py.

Needs jax and optax (CPU is enough), e.g. in a throwaway venv:
    python -m venv /tmp/jaxenv && /tmp/jaxenv/bin/pip install optax
    /tmp/jaxenv/bin/python tests/optim/lamb_reference/record_optax_lamb.py
Writes tests/optim/lamb_reference/optax_lamb_trajectory.json (float32 throughout).
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import version
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).parent))
from problem import LR, SHAPES, WEIGHT_DECAY, decayed, make_problem, to_lists  # noqa: E402

CONFIGS = {
    # name: (description, transformation)
    "clip1_masked_decay": (
        "optax.chain(optax.clip_by_global_norm(1.0), optax.lamb(lr, weight_decay=0.01, mask=decay_mask))",
        optax.chain(optax.clip_by_global_norm(1.0),
                    optax.lamb(LR, weight_decay=WEIGHT_DECAY, mask={n: decayed(n) for n in SHAPES})),
    ),
    "no_clip_no_decay": (
        "optax.lamb(lr)  (weight_decay=0, no clipping)",
        optax.lamb(LR),
    ),
}


def run(transformation, init, grads):
    params = {n: jnp.asarray(a) for n, a in init.items()}
    state = transformation.init(params)
    trajectory = []
    for g in grads:
        updates, state = transformation.update({n: jnp.asarray(a) for n, a in g.items()}, state, params)
        params = optax.apply_updates(params, updates)
        trajectory.append(to_lists({n: np.asarray(p) for n, p in params.items()}))
    return trajectory


def main():
    init, grads = make_problem()
    out = {
        "source": f"optax {version('optax')}, jax {version('jax')} on {jax.default_backend()}, float32",
        "command": "python tests/optim/lamb_reference/record_optax_lamb.py",
        "lr": LR,
        "init": to_lists(init),
        "grads": [to_lists(g) for g in grads],
        "configs": {name: {"optax": desc, "trajectory": run(t, init, grads)} for name, (desc, t) in CONFIGS.items()},
    }
    path = Path(__file__).parent / "optax_lamb_trajectory.json"
    path.write_text(json.dumps(out))
    print("wrote", path)


if __name__ == "__main__":
    main()
