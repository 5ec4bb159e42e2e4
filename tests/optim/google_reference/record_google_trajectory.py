"""Record the trajectory of Google's original BERT optimizer into a fixture.

Runs `bert.optimization.create_optimizer` from the `bert-tensorflow` package
(google-research/bert's optimization.py) unchanged, under
`tensorflow.compat.v1` in graph mode, on a few float32 variables with BERT
names, and writes every step's learning rate, pre-clip global gradient norm and
parameter values to `google_trajectory.json` beside this file.

It needs TensorFlow, which bertopt's own venv does not have; see README.md in
this folder for the commands. The test `tests/optim/test_google_parity.py` replays
the fixture with `bertopt.create_optimizer` and needs only torch.

Before writing, the script checks the recording itself: it is reproducible,
the learning rate at step 0 is 0, clipping triggers on some steps but not on
others, and a float32 numpy transcription of Google's algorithm reproduces it
only when the excluded variables are left undecayed.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from importlib import metadata
from pathlib import Path

import numpy as np

FIXTURE_PATH = Path(__file__).with_name("google_trajectory.json")

# Names as in a BERT checkpoint. Google's exclusion regexes ("LayerNorm",
# "layer_norm", "bias") are searched in these names, so three kinds occur:
# plain weights (decayed), biases and LayerNorm gamma/beta (not decayed).
VARIABLES = (
    ("bert/embeddings/word_embeddings", (10, 8)),
    ("bert/encoder/layer_0/attention/self/query/kernel", (8, 6)),
    ("bert/encoder/layer_0/attention/self/query/bias", (6,)),
    ("bert/encoder/layer_0/attention/output/LayerNorm/gamma", (6,)),
    ("bert/encoder/layer_0/attention/output/LayerNorm/beta", (6,)),
    ("cls/predictions/output_bias", (10,)),
)

SETTINGS = {
    "init_lr": 0.03,
    "num_train_steps": 60,
    "num_warmup_steps": 10,
    # A few steps past num_train_steps show polynomial_decay's clamp (LR 0).
    "num_steps": 64,
    "seed": 20181031,
    # Per-step loss factors are log-uniform in this range; with these
    # parameters the global gradient norm then falls on both sides of 1.0.
    "factor_range": [0.02, 0.4],
}

LOSS_FORMULA = "factor[step] * sum_i sum(c_i * sin(p_i) + 0.5 * d_i * p_i**2)"


def make_problem(settings: dict) -> dict:
    """Initial values, loss coefficients and per-step factors, all float32."""
    rng = np.random.RandomState(settings["seed"])
    variables = []
    for name, shape in VARIABLES:
        if name.endswith("LayerNorm/gamma"):
            initial = 1.0 + rng.uniform(-0.2, 0.2, size=shape)
        else:
            initial = rng.uniform(-1.0, 1.0, size=shape)
        variables.append(
            {
                "name": name,
                "shape": list(shape),
                "initial": initial.astype(np.float32),
                "c": rng.normal(0.0, 1.0, size=shape).astype(np.float32),
                "d": rng.uniform(0.2, 1.0, size=shape).astype(np.float32),
            }
        )
    low, high = settings["factor_range"]
    factors = np.exp(
        rng.uniform(np.log(low), np.log(high), size=settings["num_steps"])
    ).astype(np.float32)
    return {"variables": variables, "factors": factors}


def _import_google_optimization():
    """TF in v1 graph mode and the package's optimization module, unchanged."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf2

    tf = tf2.compat.v1
    tf.disable_v2_behavior()
    tf.logging.set_verbosity(tf.logging.ERROR)
    # bert-tensorflow 1.0.4 does `import tensorflow.compat.v1 as tf` itself;
    # older copies of the same file do `import tensorflow as tf`, so point
    # that name at compat.v1 while importing to run either version as TF1.
    saved = sys.modules.get("tensorflow")
    sys.modules["tensorflow"] = tf
    try:
        from bert import optimization
    finally:
        sys.modules["tensorflow"] = saved
    return tf, optimization


def record(settings: dict = SETTINGS, resource_variables: bool = True) -> dict:
    """Run Google's optimizer and return the trajectory as fixture data.

    `resource_variables` picks the kind of tf.Variable (the global step's
    among them). create_optimizer increments the global step with an assign
    that has no ordering against the learning-rate computation reading it
    (google-research/bert issue #1050). With TF1's reference variables the
    read aliases the variable's buffer, the assign writes it in place first,
    and every update uses the LR of the *next* step (LR at step 0 is
    init_lr/W, not 0). Resource variables read a snapshot, and the LR of step k
    is used at step k, as the code intends and as on TPU, where BERT was
    trained. The fixture uses resource variables; the reference-variable LRs
    are kept beside it to document the race.
    """
    tf, optimization = _import_google_optimization()
    problem = make_problem(settings)

    graph = tf.Graph()
    with graph.as_default():
        if resource_variables:
            tf.enable_resource_variables()
        else:
            tf.disable_resource_variables()
        factor = tf.placeholder(tf.float32, shape=[], name="factor")
        tf_vars, terms = [], []
        for spec in problem["variables"]:
            var = tf.get_variable(
                spec["name"],
                initializer=tf.constant(spec["initial"]),
                dtype=tf.float32,
            )
            c = tf.constant(spec["c"])
            d = tf.constant(spec["d"])
            terms.append(tf.reduce_sum(c * tf.sin(var) + 0.5 * d * tf.square(var)))
            tf_vars.append(var)
        loss = factor * tf.add_n(terms)

        # Observe (not alter) the optimizer create_optimizer builds, to fetch
        # its learning-rate tensor and ask it which variables it decays.
        seen = {}
        optimizer_cls = optimization.AdamWeightDecayOptimizer
        original_apply = optimizer_cls.apply_gradients

        def observing_apply(self, grads_and_vars, global_step=None, name=None):
            grads_and_vars = list(grads_and_vars)
            seen["optimizer"] = self
            seen["learning_rate"] = self.learning_rate
            return original_apply(self, grads_and_vars, global_step, name)

        optimizer_cls.apply_gradients = observing_apply
        try:
            train_op = optimization.create_optimizer(
                loss,
                settings["init_lr"],
                settings["num_train_steps"],
                settings["num_warmup_steps"],
                use_tpu=False,
            )
        finally:
            optimizer_cls.apply_gradients = original_apply

        # tf.clip_by_global_norm computes the pre-clip norm under this name
        # (create_optimizer throws it away, so read it from the graph).
        grad_norm = graph.get_tensor_by_name("global_norm/global_norm:0")
        global_step = tf.train.get_global_step()
        learning_rate = seen["learning_rate"]
        decayed = [
            bool(seen["optimizer"]._do_use_weight_decay(spec["name"]))
            for spec in problem["variables"]
        ]
        assert [v.op.name for v in tf.trainable_variables()] == [
            name for name, _ in VARIABLES
        ]

        # One thread each way, so the run is reproducible (checked below).
        config = tf.ConfigProto(
            inter_op_parallelism_threads=1, intra_op_parallelism_threads=1
        )
        steps = []
        with tf.Session(graph=graph, config=config) as sess:
            sess.run(tf.global_variables_initializer())
            for step in range(settings["num_steps"]):
                step_before = int(sess.run(global_step))
                # One run: the fetched LR and norm are the values this update used.
                _, lr_used, norm = sess.run(
                    [train_op, learning_rate, grad_norm],
                    feed_dict={factor: problem["factors"][step]},
                )
                params = sess.run(tf_vars)
                steps.append(
                    {
                        "step": step,
                        "global_step_before": step_before,
                        "global_step_after": int(sess.run(global_step)),
                        "learning_rate": np.float32(lr_used),
                        "grad_norm": np.float32(norm),
                        "params": [np.asarray(p, np.float32) for p in params],
                    }
                )

    import tensorflow as tf2

    return {
        "versions": {
            "tensorflow": tf2.__version__,
            "bert-tensorflow": metadata.version("bert-tensorflow"),
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "settings": dict(settings),
        "resource_variables": resource_variables,
        "global_step_type": type(global_step).__name__,
        "problem": problem,
        "decayed": decayed,
        "steps": steps,
    }


# ---------------------------------------------------------------------------
# Sanity checks of the recording


def numpy_transcription(problem: dict, settings: dict, decayed: list) -> list:
    """Google's create_optimizer written out in float32 numpy.

    Returns per step (lr, grad_norm, params). Only a cross-check of the TF
    recording: the fixture itself always comes from TF.
    """
    f32 = np.float32
    init_lr = f32(settings["init_lr"])
    total = f32(settings["num_train_steps"])
    warmup = settings["num_warmup_steps"]
    params = [spec["initial"].copy() for spec in problem["variables"]]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    out = []
    for step in range(settings["num_steps"]):
        s = f32(step)
        decay_lr = init_lr * (f32(1) - np.minimum(s, total) / total)
        warm_lr = init_lr * (s / f32(warmup))
        lr = warm_lr if step < warmup else decay_lr
        factor = problem["factors"][step]
        grads = [
            factor * (spec["c"] * np.cos(p) + spec["d"] * p)
            for spec, p in zip(problem["variables"], params)
        ]
        norm = np.sqrt(sum(np.sum(g * g, dtype=np.float32) for g in grads)).astype(f32)
        scale = f32(1) / max(norm, f32(1))
        grads = [g * scale for g in grads]
        for i, g in enumerate(grads):
            m[i] = f32(0.9) * m[i] + f32(0.1) * g
            v[i] = f32(0.999) * v[i] + f32(0.001) * g * g
            update = m[i] / (np.sqrt(v[i]) + f32(1e-6))
            if decayed[i]:
                update = update + f32(0.01) * params[i]
            params[i] = params[i] - lr * update
        out.append((lr, norm, [p.copy() for p in params]))
    return out


def float32_lr_form(settings: dict, lrs: list) -> str:
    """Which float32 evaluation of the schedule reproduces the recorded LRs bit for bit.

    Google's graph computes in float32: init_lr * (k / W) in warmup and
    (init_lr - 0) * (1 - min(k, T) / T)**1 + 0 after. TF's graph optimizer
    (grappler: constant folding and arithmetic optimization, on by default)
    rewrites the divisions by constants into multiplications by folded
    constants, which rounds differently ("folded"); with those passes off the
    graph evaluates as written ("as_written").
    """
    f32 = np.float32
    lr0, total, warmup = f32(settings["init_lr"]), f32(settings["num_train_steps"]), f32(settings["num_warmup_steps"])
    forms = {
        "folded": lambda k: (lr0 / warmup) * k if k < warmup else lr0 * (f32(1) - np.minimum(k, total) * (f32(1) / total)),
        "as_written": lambda k: lr0 * (k / warmup) if k < warmup else lr0 * (f32(1) - np.minimum(k, total) / total),
    }
    for name, form in forms.items():
        if all(form(f32(k)) == f32(lr) for k, lr in enumerate(lrs)):
            return name
    return "other"


def _max_param_diff(steps_a, steps_b) -> list:
    """Per variable, the max abs difference over all steps."""
    n = len(steps_a[0])
    return [
        max(float(np.max(np.abs(a[i] - b[i]))) for a, b in zip(steps_a, steps_b))
        for i in range(n)
    ]


def check_recording(rec: dict, rerun: dict | None = None) -> dict:
    """Assert the properties the fixture is meant to exercise; return a summary."""
    settings, steps = rec["settings"], rec["steps"]
    lrs = [float(s["learning_rate"]) for s in steps]
    norms = [float(s["grad_norm"]) for s in steps]

    if rerun is not None:
        for a, b in zip(steps, rerun["steps"]):
            assert a["learning_rate"] == b["learning_rate"]
            assert a["grad_norm"] == b["grad_norm"]
            assert all(np.array_equal(x, y) for x, y in zip(a["params"], b["params"]))

    assert rec["global_step_type"] == "ResourceVariable"
    # global_step is incremented by create_optimizer's own assign, once a run;
    # the LR of run k is computed from global_step == k (read before the +1).
    assert [s["global_step_before"] for s in steps] == list(range(len(steps)))
    assert [s["global_step_after"] for s in steps] == list(range(1, len(steps) + 1))
    assert lrs[0] == 0.0, "Google's warmup starts at LR 0"
    init_lr, total, warmup = (
        settings["init_lr"], settings["num_train_steps"], settings["num_warmup_steps"],
    )
    for k, lr in enumerate(lrs):
        expected = init_lr * k / warmup if k < warmup else init_lr * (1 - min(k, total) / total)
        assert abs(lr - expected) <= 2e-7 * init_lr, (k, lr, expected)
    assert lrs[warmup] < lrs[warmup - 1], "LR drops at the end of warmup"
    assert all(lr == 0.0 for lr in lrs[total:]), "LR is 0 from num_train_steps on"

    clipped = [n > 1.0 for n in norms]
    assert any(clipped) and not all(clipped), "need steps with and without clipping"
    assert any(rec["decayed"]) and not all(rec["decayed"])
    assert min(abs(n - 1.0) for n in norms) > 1e-4, "a norm too close to the clip"

    # The float32 transcription agrees with TF only with Google's exclusions.
    tf_params = [s["params"] for s in steps]
    problem = rec["problem"]
    google = numpy_transcription(problem, settings, rec["decayed"])
    lr_form = float32_lr_form(settings, [s["learning_rate"] for s in steps])
    diff_google = _max_param_diff(tf_params, [p for _, _, p in google])
    assert max(diff_google) < 1e-5, diff_google
    assert max(abs(float(n) - norms[k]) / norms[k] for k, (_, n, _) in enumerate(google)) < 1e-5
    all_decayed = numpy_transcription(problem, settings, [True] * len(rec["decayed"]))
    diff_all = _max_param_diff(tf_params, [p for _, _, p in all_decayed])
    none_decayed = numpy_transcription(problem, settings, [False] * len(rec["decayed"]))
    diff_none = _max_param_diff(tf_params, [p for _, _, p in none_decayed])
    for i, is_decayed in enumerate(rec["decayed"]):
        wrong = diff_none[i] if is_decayed else diff_all[i]
        assert wrong > 100 * max(diff_google), (problem["variables"][i]["name"], wrong)

    return {
        "lr_float32_form": lr_form,
        "clipped_steps": sum(clipped),
        "unclipped_steps": len(clipped) - sum(clipped),
        "grad_norm_range": [min(norms), max(norms)],
        "closest_norm_to_clip": min(abs(n - 1.0) for n in norms),
        "max_param_move": max(
            float(np.max(np.abs(steps[-1]["params"][i] - spec["initial"])))
            for i, spec in enumerate(problem["variables"])
        ),
        "numpy_vs_tf_max_abs_diff": max(diff_google),
        "numpy_all_decayed_vs_tf": max(diff_all),
        "numpy_none_decayed_vs_tf": max(diff_none),
    }


# ---------------------------------------------------------------------------
# Fixture file: JSON, float32 values written in their shortest round-trip form


def _floats(values) -> list:
    return [float(str(np.float32(x))) for x in np.asarray(values, np.float32).ravel()]


def to_json_text(rec: dict) -> str:
    problem = rec["problem"]
    header = {
        "description": (
            "Trajectory of google-research/bert optimization.create_optimizer "
            "(bert-tensorflow, run unchanged under tensorflow.compat.v1), "
            "recorded by record_google_trajectory.py"
        ),
        "versions": rec["versions"],
        "settings": rec["settings"],
        "global_step_type": rec["global_step_type"],
        "loss": LOSS_FORMULA,
        "dtype": "float32",
        "factors": _floats(problem["factors"]),
        "variables": [
            {
                "name": spec["name"],
                "shape": spec["shape"],
                "decayed": decayed,
                "initial": _floats(spec["initial"]),
                "c": _floats(spec["c"]),
                "d": _floats(spec["d"]),
            }
            for spec, decayed in zip(problem["variables"], rec["decayed"])
        ],
    }
    if "checks" in rec:
        header["recording_checks"] = rec["checks"]
    if "ref_variable_learning_rates" in rec:
        header["ref_variable_race"] = {
            "note": (
                "LR used per step when the global step is a TF1 reference "
                "variable: create_optimizer's unordered global_step assign runs "
                "first, so step k uses the LR of step k+1 (bert issue #1050). "
                "Not used by the parity test; the trajectory above uses "
                "resource variables (LR of step k at step k, as on TPU)."
            ),
            "learning_rate": _floats(rec["ref_variable_learning_rates"]),
        }
    steps = [
        {
            "step": s["step"],
            "global_step_before": s["global_step_before"],
            "learning_rate": _floats([s["learning_rate"]])[0],
            "grad_norm": _floats([s["grad_norm"]])[0],
            "params": [_floats(p) for p in s["params"]],
        }
        for s in rec["steps"]
    ]

    def compact(value) -> str:
        return json.dumps(value, separators=(",", ":"))

    # One top-level key, variable or step per line: small, and diffs stay readable.
    lines = [f" {compact(key)}: {compact(value)}" for key, value in header.items()]
    for key, items in (("variables", header.pop("variables")), ("steps", steps)):
        lines = [line for line in lines if not line.startswith(f' "{key}"')]
        lines.append(f" {compact(key)}: [\n  " + ",\n  ".join(map(compact, items)) + "\n ]")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=FIXTURE_PATH)
    parser.add_argument(
        "--check-only", action="store_true",
        help="record and check, but do not write the fixture",
    )
    args = parser.parse_args(argv)

    rec = record()
    summary = check_recording(rec, rerun=record())
    racy = record(resource_variables=False)
    rec["ref_variable_learning_rates"] = [s["learning_rate"] for s in racy["steps"]]
    summary["ref_variable_lr_is_next_steps_lr"] = all(
        racy_lr == next_step["learning_rate"]
        for racy_lr, next_step in zip(rec["ref_variable_learning_rates"], rec["steps"][1:])
    )
    print(json.dumps({"versions": rec["versions"], "checks": summary}, indent=1))
    if not args.check_only:
        rec["checks"] = summary
        text = to_json_text(rec)
        json.loads(text)  # well-formed
        args.output.write_text(text)
        print(f"wrote {args.output} ({len(text)} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
