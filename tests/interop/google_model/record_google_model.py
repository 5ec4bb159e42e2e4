"""Record a tiny Google BERT, trained and continued by Google's own code, into fixtures.

Runs google-research/bert's ``modeling.BertModel``, ``run_pretraining.get_masked_lm_output`` /
``get_next_sentence_output`` and ``optimization.create_optimizer`` (the ``bert-tensorflow`` 1.0.4
package, unchanged, under ``tensorflow.compat.v1`` in graph mode) on a tiny BERT with dropout off:

1. the "Google run": ``GOOGLE_RUN_STEPS`` training steps on the masked-LM + next-sentence loss from
   TF's own initialisation, saved with ``tf.train.Saver`` (weights, every ``adam_m``/``adam_v``
   slot, ``global_step``) as ``model.ckpt-<step>``;
2. in a new graph restored from that checkpoint: the outputs on a fixed eval batch (masked-LM and
   next-sentence log-probs, the three losses), then ``CONTINUATION_STEPS`` more training steps on
   recorded batches with each step's loss, learning rate, gradient norm and every variable after
   the last step (the "continuation").

TensorFlow 2.21 no longer has ``tf.contrib`` or (under Keras 3) ``tf.layers.dense``; modeling.py
gets stand-ins that create the same variables with the same initialisers and compute what the
originals computed (contrib's layer_norm: ``nn.moments`` + ``nn.batch_normalization`` with its
fixed ``variance_epsilon = 1e-12``). Run from the repository root with TensorFlow's Python, see
README.md beside this file; ``tests/interop/test_google_model.py`` reads the result with torch only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import types
from importlib import metadata
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent

BERT_CONFIG = {
    "vocab_size": 100,
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 32,
    "hidden_act": "gelu",
    # As in Google's released configs; the model is built with is_training=False, which turns
    # dropout off in the TF graph (and the tests run the torch model in eval mode).
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 32,
    "type_vocab_size": 2,
    # Larger than BERT's 0.02 so that a model this narrow has activations of order 1 (as a trained
    # BERT has): the GELU form, the LayerNorm epsilon and the attention mask then have effects
    # that can be measured.
    "initializer_range": 0.3,
}
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SETTINGS = {
    "seed": 20181011,
    "batch_size": 8,
    "seq_length": 24,
    "max_predictions_per_seq": 5,
    "init_lr": 5e-3,
    "num_train_steps": 10,
    "num_warmup_steps": 3,
    "google_run_steps": 5,  # the saved checkpoint is at global_step 5: past warmup
    "continuation_steps": 3,
}
FEATURES = ("input_ids", "input_mask", "segment_ids", "masked_lm_positions", "masked_lm_ids",
            "masked_lm_weights", "next_sentence_labels")


# --- TensorFlow 1 with Google's modules -------------------------------------------------------


def import_google_bert():
    """``(tf, modeling, run_pretraining, optimization)``: TF in v1 graph mode and Google's modules,
    with stand-ins for tf.contrib.layers.layer_norm and tf.layers.dense."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf2

    tf = tf2.compat.v1
    tf.disable_v2_behavior()
    tf.logging.set_verbosity(tf.logging.ERROR)

    def layer_norm(inputs, begin_norm_axis=-1, begin_params_axis=-1, scope=None):
        # tf.contrib.layers.layer_norm as of TF 1.15, for the last axis: same variables (beta,
        # then gamma, under scope "LayerNorm"), same ops, same fixed epsilon.
        assert begin_norm_axis == -1 and begin_params_axis == -1
        with tf.variable_scope(scope, default_name="LayerNorm"):
            shape = inputs.shape[-1:]
            beta = tf.get_variable("beta", shape=shape, initializer=tf.zeros_initializer())
            gamma = tf.get_variable("gamma", shape=shape, initializer=tf.ones_initializer())
            mean, variance = tf.nn.moments(inputs, [inputs.shape.ndims - 1], keep_dims=True)
            return tf.nn.batch_normalization(inputs, mean, variance, offset=beta, scale=gamma,
                                             variance_epsilon=CONTRIB_LAYER_NORM_EPSILON)

    def dense(inputs, units, activation=None, name=None, kernel_initializer=None):
        # tf.layers.dense on the rank-2 inputs modeling.py gives it: variables kernel [in, units]
        # and bias [units] (zeros) under the layer's name ("dense" by default).
        assert inputs.shape.ndims == 2
        with tf.variable_scope(name, default_name="dense"):
            kernel = tf.get_variable("kernel", [int(inputs.shape[-1]), units], initializer=kernel_initializer)
            bias = tf.get_variable("bias", [units], initializer=tf.zeros_initializer())
            outputs = tf.nn.bias_add(tf.matmul(inputs, kernel), bias)
            return outputs if activation is None else activation(outputs)

    contrib = types.ModuleType("tensorflow.contrib")
    contrib.layers = types.SimpleNamespace(layer_norm=layer_norm)
    sys.modules["tensorflow.contrib"] = contrib
    sys.modules["tensorflow.contrib.layers"] = contrib.layers
    from bert import modeling, optimization, run_pretraining

    class TF1WithLayers:
        """tensorflow.compat.v1 as modeling.py sees it, with ``layers.dense`` back."""
        layers = types.SimpleNamespace(dense=dense)

        def __getattr__(self, name):
            return getattr(tf, name)

    modeling.tf = run_pretraining.tf = TF1WithLayers()
    return tf, modeling, run_pretraining, optimization


CONTRIB_LAYER_NORM_EPSILON = 1e-12  # tf.contrib.layers.layer_norm: `variance_epsilon = 1e-12`, not an argument


# --- data -------------------------------------------------------------------------------------


def make_batch(rng: np.random.RandomState, settings: dict = SETTINGS) -> dict[str, np.ndarray]:
    """Seven pretraining features as Google's create_pretraining_data makes them: [CLS] A [SEP]
    B [SEP], padding; some masked positions replaced by [MASK] or a random token, the rest of the
    max_predictions_per_seq slots zero with weight 0; next_sentence_labels 0 or 1."""
    batch, seq, preds = settings["batch_size"], settings["seq_length"], settings["max_predictions_per_seq"]
    vocab = BERT_CONFIG["vocab_size"]
    first_word = len(SPECIAL_TOKENS)
    out = {name: np.zeros((batch, preds if name.startswith("masked") else seq), np.int32) for name in FEATURES}
    out["masked_lm_weights"] = np.zeros((batch, preds), np.float32)
    out["next_sentence_labels"] = np.zeros((batch, 1), np.int32)
    for i in range(batch):
        length = seq if i == 0 else rng.randint(9, seq + 1)  # one full row, the others padded
        len_a = rng.randint(1, length - 3 - 1 + 1)
        len_b = length - 3 - len_a
        tokens = [2] + list(rng.randint(first_word, vocab, len_a)) + [3] + list(rng.randint(first_word, vocab, len_b)) + [3]
        segments = [0] * (len_a + 2) + [1] * (len_b + 1)
        candidates = [j for j, t in enumerate(tokens) if t >= first_word]
        count = min(preds, max(1, int(round(length * 0.15))), len(candidates))
        if i == 1:
            count = preds  # one row with every prediction slot used
        positions = sorted(rng.choice(candidates, count, replace=False))
        labels = [tokens[j] for j in positions]
        for j in positions:
            draw = rng.rand()
            tokens[j] = 4 if draw < 0.8 else (tokens[j] if draw < 0.9 else rng.randint(first_word, vocab))
        out["input_ids"][i, :length] = tokens
        out["input_mask"][i, :length] = 1
        out["segment_ids"][i, :length] = segments
        out["masked_lm_positions"][i, :count] = positions
        out["masked_lm_ids"][i, :count] = labels
        out["masked_lm_weights"][i, :count] = 1.0
        out["next_sentence_labels"][i, 0] = rng.randint(0, 2)
    return out


# --- the graph --------------------------------------------------------------------------------


def build(tf, modeling, run_pretraining, optimization, settings: dict):
    """run_pretraining.model_fn's graph for training (dropout off): placeholders for the seven
    features, the losses and log-probs, Google's train op, its LR and pre-clip gradient norm."""
    batch, seq, preds = settings["batch_size"], settings["seq_length"], settings["max_predictions_per_seq"]
    ph = {name: tf.placeholder(tf.int32, [batch, preds if name.startswith("masked") else seq], name=name)
          for name in FEATURES if name not in ("masked_lm_weights", "next_sentence_labels")}
    ph["masked_lm_weights"] = tf.placeholder(tf.float32, [batch, preds], name="masked_lm_weights")
    ph["next_sentence_labels"] = tf.placeholder(tf.int32, [batch, 1], name="next_sentence_labels")
    config = modeling.BertConfig.from_dict(BERT_CONFIG)
    model = modeling.BertModel(config=config, is_training=False, input_ids=ph["input_ids"],
                               input_mask=ph["input_mask"], token_type_ids=ph["segment_ids"],
                               use_one_hot_embeddings=False)
    masked_lm_loss, _, masked_lm_log_probs = run_pretraining.get_masked_lm_output(
        config, model.get_sequence_output(), model.get_embedding_table(), ph["masked_lm_positions"],
        ph["masked_lm_ids"], ph["masked_lm_weights"])
    next_sentence_loss, _, next_sentence_log_probs = run_pretraining.get_next_sentence_output(
        config, model.get_pooled_output(), ph["next_sentence_labels"])
    total_loss = masked_lm_loss + next_sentence_loss

    # Observe (not alter) the optimizer create_optimizer builds, to fetch its LR tensor.
    seen = {}
    original_apply = optimization.AdamWeightDecayOptimizer.apply_gradients

    def observing_apply(self, grads_and_vars, global_step=None, name=None):
        seen["learning_rate"] = self.learning_rate
        seen["decayed"] = self._do_use_weight_decay
        return original_apply(self, grads_and_vars, global_step, name)

    optimization.AdamWeightDecayOptimizer.apply_gradients = observing_apply
    try:
        train_op = optimization.create_optimizer(total_loss, settings["init_lr"], settings["num_train_steps"],
                                                 settings["num_warmup_steps"], use_tpu=False)
    finally:
        optimization.AdamWeightDecayOptimizer.apply_gradients = original_apply
    return {
        "placeholders": ph,
        "outputs": {"masked_lm_log_probs": masked_lm_log_probs, "next_sentence_log_probs": next_sentence_log_probs,
                    "masked_lm_loss": masked_lm_loss, "next_sentence_loss": next_sentence_loss,
                    "total_loss": total_loss},
        "train_op": train_op,
        "learning_rate": seen["learning_rate"],
        "decayed": seen["decayed"],
        "grad_norm": tf.get_default_graph().get_tensor_by_name("global_norm/global_norm:0"),
        "global_step": tf.train.get_global_step(),
    }


def session(tf, graph):
    # One thread each way, so that a rerun reproduces the recording bit for bit.
    return tf.Session(graph=graph, config=tf.ConfigProto(inter_op_parallelism_threads=1,
                                                         intra_op_parallelism_threads=1))


def record(out_dir: Path, settings: dict = SETTINGS) -> dict:
    tf, modeling, run_pretraining, optimization = import_google_bert()
    rng = np.random.RandomState(settings["seed"])
    run_batches = [make_batch(rng, settings) for _ in range(settings["google_run_steps"])]
    eval_batch = make_batch(rng, settings)
    continuation_batches = [make_batch(rng, settings) for _ in range(settings["continuation_steps"])]

    def feed(g, batch):
        return {g["placeholders"][name]: batch[name] for name in FEATURES}

    # 1. The Google run: TF's initialisation, a few steps, tf.train.Saver.
    prefix = out_dir / f"model.ckpt-{settings['google_run_steps']}"
    graph = tf.Graph()
    with graph.as_default():
        tf.enable_resource_variables()  # reads are snapshots: update k uses LR(k) (see tests/optim/google_reference)
        tf.set_random_seed(settings["seed"])
        g = build(tf, modeling, run_pretraining, optimization, settings)
        saver = tf.train.Saver()
        with session(tf, graph) as sess:
            sess.run(tf.global_variables_initializer())
            run_losses = []
            for batch in run_batches:
                _, loss = sess.run([g["train_op"], g["outputs"]["total_loss"]], feed(g, batch))
                run_losses.append(float(loss))
            assert sess.run(g["global_step"]) == settings["google_run_steps"]
            saver.save(sess, str(out_dir / "model.ckpt"), global_step=g["global_step"], write_meta_graph=False)
    (out_dir / "checkpoint").unlink()  # the state file holds absolute paths; the prefix is all we need

    # 2. A new graph restored from the checkpoint: eval outputs, then the continuation.
    graph = tf.Graph()
    with graph.as_default():
        tf.enable_resource_variables()
        g = build(tf, modeling, run_pretraining, optimization, settings)
        trainable = tf.trainable_variables()
        slots = [v for v in tf.global_variables() if v.op.name.endswith(("/adam_m", "/adam_v"))]
        with session(tf, graph) as sess:
            tf.train.Saver().restore(sess, str(prefix))
            evaluated = sess.run(g["outputs"], feed(g, eval_batch))
            steps = []
            for batch in continuation_batches:
                step_before = int(sess.run(g["global_step"]))
                _, lr, norm, loss = sess.run([g["train_op"], g["learning_rate"], g["grad_norm"],
                                              g["outputs"]], feed(g, batch))
                steps.append({"global_step_before": step_before, "learning_rate": float(lr),
                              "grad_norm": float(norm), **{k: float(loss[k]) for k in
                                                           ("masked_lm_loss", "next_sentence_loss", "total_loss")},
                              "variables": dict(zip([v.op.name for v in trainable], sess.run(trainable)))})
            final_slots = dict(zip([v.op.name for v in slots], sess.run(slots)))
            final_step = int(sess.run(g["global_step"]))
        decayed = {v.op.name: bool(g["decayed"](v.op.name)) for v in trainable}

    import tensorflow as tf2

    return {
        "prefix": prefix,
        "run_losses": run_losses,
        "eval_batch": eval_batch,
        "evaluated": evaluated,
        "continuation_batches": continuation_batches,
        "steps": steps,
        "final_slots": final_slots,
        "final_step": final_step,
        "decayed": decayed,
        "trainable": [v.op.name for v in trainable],
        "versions": {"tensorflow": tf2.__version__, "bert-tensorflow": metadata.version("bert-tensorflow"),
                     "numpy": np.__version__, "python": platform.python_version()},
    }


# --- writing ----------------------------------------------------------------------------------


def write(out_dir: Path, rec: dict, settings: dict = SETTINGS) -> None:
    (out_dir / "bert_config.json").write_text(json.dumps(BERT_CONFIG, indent=2) + "\n")
    words = [f"w{i:02d}" for i in range(BERT_CONFIG["vocab_size"] - len(SPECIAL_TOKENS))]
    (out_dir / "vocab.txt").write_text("\n".join(SPECIAL_TOKENS + words) + "\n")
    arrays = {f"eval/{k}": v for k, v in rec["eval_batch"].items()}
    arrays.update({f"eval/{k}": np.asarray(v) for k, v in rec["evaluated"].items()})
    for i, batch in enumerate(rec["continuation_batches"]):
        arrays.update({f"step{i}/{k}": v for k, v in batch.items()})
    # Every variable after the last continuation step (weights and Adam slots): the fixture stays
    # small, and k steps compound any per-step difference.
    arrays.update({f"final/{k}": v for k, v in rec["steps"][-1]["variables"].items()})
    arrays.update({f"final/{k}": v for k, v in rec["final_slots"].items()})
    np.savez_compressed(out_dir / "google_model.npz", **arrays)
    meta = {
        "checkpoint": rec["prefix"].name,
        "settings": settings,
        "contrib_layer_norm_epsilon": CONTRIB_LAYER_NORM_EPSILON,
        "google_run_losses": rec["run_losses"],
        "continuation": [{k: v for k, v in step.items() if k != "variables"} for step in rec["steps"]],
        "final_global_step": rec["final_step"],
        "trainable_variables": rec["trainable"],
        "decayed": rec["decayed"],
        "versions": rec["versions"],
    }
    (out_dir / "google_model.json").write_text(json.dumps(meta, indent=1) + "\n")


def check(rec: dict, settings: dict = SETTINGS) -> None:
    """The recording shows what it should: non-trivial slots, LR of Google's schedule, padding."""
    init_lr, total, warmup = settings["init_lr"], settings["num_train_steps"], settings["num_warmup_steps"]
    for step in rec["steps"]:
        k = step["global_step_before"]
        expected = init_lr * k / warmup if k < warmup else init_lr * (1 - min(k, total) / total)
        assert abs(step["learning_rate"] - expected) <= 1e-9 + 1e-6 * expected, (k, step["learning_rate"], expected)
    assert rec["final_step"] == settings["google_run_steps"] + settings["continuation_steps"]
    assert all(np.abs(v).max() > 0 for v in rec["final_slots"].values()), "an Adam slot stayed zero"
    weights = rec["eval_batch"]["masked_lm_weights"]
    assert (weights == 0).any() and (rec["eval_batch"]["input_mask"] == 0).any(), "no padding to test"


def check_export(prefix: str, out_dir: Path = HERE, settings: dict = SETTINGS) -> dict:
    """Google's code on a checkpoint that bertopt exported (``bertopt export-tf``): every variable
    read by ``tf.train.load_checkpoint`` equals the recorded checkpoint's, and a graph initialised
    from it as ``run_pretraining.py --init_checkpoint`` initialises (``get_assignment_map_from_checkpoint``
    + ``tf.train.init_from_checkpoint``) gives the recorded eval outputs."""
    tf, modeling, run_pretraining, optimization = import_google_bert()
    ours, original = tf.train.load_checkpoint(prefix), tf.train.load_checkpoint(str(out_dir / "model.ckpt-5"))
    names = sorted(original.get_variable_to_shape_map())
    assert sorted(ours.get_variable_to_shape_map()) == names
    unequal = [n for n in names if not np.array_equal(ours.get_tensor(n), original.get_tensor(n))]
    assert not unequal, unequal
    recorded = np.load(out_dir / "google_model.npz")
    graph = tf.Graph()
    with graph.as_default():
        tf.enable_resource_variables()
        g = build(tf, modeling, run_pretraining, optimization, settings)
        assignment_map, initialized = modeling.get_assignment_map_from_checkpoint(tf.trainable_variables(), prefix)
        tf.train.init_from_checkpoint(prefix, assignment_map)
        with session(tf, graph) as sess:
            sess.run(tf.global_variables_initializer())
            outputs = sess.run(g["outputs"], {g["placeholders"][k]: recorded[f"eval/{k}"] for k in FEATURES})
    differences = {k: float(np.abs(np.asarray(v) - recorded[f"eval/{k}"]).max()) for k, v in outputs.items()}
    assert max(differences.values()) == 0.0, differences
    return {"variables_equal": len(names), "initialized_by_init_checkpoint": len(initialized) // 2,
            "eval_output_differences": differences}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--check-export", metavar="PREFIX",
                        help="instead of recording: check a checkpoint bertopt exported from the recorded one "
                             "(bertopt export-tf) with TensorFlow and Google's code")
    args = parser.parse_args(argv)
    if args.check_export:
        print(json.dumps(check_export(args.check_export, args.out), indent=1))
        return
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("model.ckpt-*"):
        old.unlink()
    rec = record(out)
    check(rec)
    write(out, rec)
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    print(json.dumps({"sizes": sizes, "total_bytes": sum(sizes.values()),
                      "continuation": [{k: v for k, v in s.items() if k != "variables"} for s in rec["steps"]]},
                     indent=1))


if __name__ == "__main__":
    main()
