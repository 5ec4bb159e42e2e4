"""Make the TensorFlow checkpoint fixtures of tests/interop/test_tf_checkpoint.py, with real TensorFlow.

Run from the repository root with the TensorFlow venv's python (bertopt's own venv has no TensorFlow):

    /work/venvs/tf/bin/python tests/interop/tf_checkpoints/make_fixtures.py

Writes beside this file:

- ``dtypes/model.ckpt``: one tensor of every type (float32, float16, bfloat16, float64, int8..int64, uint8,
  uint16, bool, complex64, strings), a scalar, empty tensors, a string tensor with an empty, a non-ASCII
  and a 300-byte element; written by ``tf.raw_ops.SaveV2`` (TensorFlow's BundleWriter).
- ``sharded/model.ckpt``: two ``SaveV2`` bundles merged by ``tf.raw_ops.MergeV2Checkpoints``, which is how
  ``tf.train.Saver(sharded=True)`` makes one shard per device: 2 data files.
- ``sliced/model.ckpt``: partitioned variables (``SaveV2`` with slice specs, as ``Saver`` saves a variable made
  with a partitioner), split along rows and columns, with slice starts that take 1 to 3 bytes in the keys.
- ``bert/model.ckpt-1000`` + ``bert/checkpoint``: a tiny BERT's variable names with ``adam_m``/``adam_v`` slots
  and ``global_step``, saved by ``tf.compat.v1.train.Saver`` in a graph session (as google-research/bert's
  ``run_pretraining.py`` saves), with the ``checkpoint`` state file.
- ``ours/model.ckpt`` and ``ours_sharded/model.ckpt``: the ``dtypes`` tensors written by bertopt's writer
  (1 and 2 shards), then read back here by ``tf.train.load_checkpoint``.
- ``expected.json``: per fixture and tensor, dtype, shape and the sha256 of the bytes TensorFlow's
  ``get_tensor`` returns (string tensors: each element's hex); and TensorFlow's verdicts on our writer:
  every tensor equal bit for bit, ``tf.train.list_variables`` equal, and whether our ``.index``/``.data``
  files are byte-identical to what ``SaveV2`` writes for the same tensors; the same for a 3000-tensor
  checkpoint whose index spans several table blocks (not committed: its index's sha256 is).

The writer is loaded from bertopt/interop by file path (this venv has no torch, and bertopt's top-level
package imports torch; the interop package itself does not).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]


def load_interop():
    """bertopt/interop as a standalone package (without bertopt/__init__, which imports torch)."""
    init = REPO / "bertopt" / "interop" / "__init__.py"
    spec = importlib.util.spec_from_file_location("bertopt_interop", init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["bertopt_interop"] = module
    spec.loader.exec_module(module)
    return module


def dtype_tensors() -> dict[str, np.ndarray]:
    import ml_dtypes

    rng = np.random.default_rng(22)
    strings = np.array([b"", "gr\u00fc\u00dfe \u4e16\u754c".encode(), b"x" * 300, b"[CLS]"], dtype=object).reshape(2, 2)
    return {
        "float32": rng.standard_normal((3, 5)).astype(np.float32),
        "float16": rng.standard_normal((4, 3)).astype(np.float16),
        "bfloat16": rng.standard_normal((2, 7)).astype(ml_dtypes.bfloat16),
        "float64": rng.standard_normal((6,)),
        "int8": rng.integers(-128, 128, (5,), dtype=np.int8),
        "int16": rng.integers(-30000, 30000, (5,), dtype=np.int16),
        "int32": rng.integers(-2**31, 2**31, (2, 2, 2), dtype=np.int32),
        "int64": np.array([-(2**62), 0, 2**62 + 12345, -1], dtype=np.int64),
        "uint8": rng.integers(0, 256, (7,), dtype=np.uint8),
        "uint16": rng.integers(0, 65536, (3,), dtype=np.uint16),
        "bool": np.array([[True, False, True], [False, False, True]]),
        "complex64": (rng.standard_normal(3) + 1j * rng.standard_normal(3)).astype(np.complex64),
        "scalar": np.float32(3.25),
        "scalar_int64": np.int64(1000),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "strings": strings,
        "string_scalar": np.array(b"bert", dtype=object),
        "empty_strings": np.empty((0,), dtype=object),
        "nan_inf": np.array([np.nan, np.inf, -np.inf, -0.0], dtype=np.float32),
    }


BERT_SHAPES = {  # hidden 8, 2 heads, intermediate 16, vocab 12, 1 layer, max position 6
    "bert/embeddings/word_embeddings": (12, 8),
    "bert/embeddings/position_embeddings": (6, 8),
    "bert/embeddings/token_type_embeddings": (2, 8),
    "bert/embeddings/LayerNorm/gamma": (8,),
    "bert/embeddings/LayerNorm/beta": (8,),
    "bert/encoder/layer_0/attention/self/query/kernel": (8, 8),
    "bert/encoder/layer_0/attention/self/query/bias": (8,),
    "bert/encoder/layer_0/attention/output/dense/kernel": (8, 8),
    "bert/encoder/layer_0/intermediate/dense/kernel": (8, 16),
    "bert/encoder/layer_0/output/dense/kernel": (16, 8),
    "bert/pooler/dense/kernel": (8, 8),
    "cls/predictions/output_bias": (12,),
    "cls/seq_relationship/output_weights": (2, 8),
}


def many_tensors(count: int = 5000) -> dict[str, np.ndarray]:
    """Many small tensors with long, little-shared names: an index of ~0.4 MB, two 256 KiB table blocks."""
    return {f"{hashlib.sha256(str(i).encode()).hexdigest()[:48]}/layer_{i}/adam_m": np.full((i % 3,), i, np.float32)
            for i in range(count)}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def describe(value) -> dict:
    value = np.asarray(value)
    if value.dtype.kind == "S":  # get_tensor returns a scalar string as bytes
        value = np.array(value.item(), dtype=object)
    if value.dtype == object:
        return {"dtype": "string", "shape": list(value.shape), "elements": [bytes(x).hex() for x in value.reshape(-1)]}
    return {"dtype": str(value.dtype), "shape": list(value.shape), "sha256": sha256(np.ascontiguousarray(value).tobytes())}


def tf_values(tf, prefix: str) -> dict[str, dict]:
    reader = tf.train.load_checkpoint(prefix)
    return {name: describe(np.asarray(reader.get_tensor(name))) for name, _ in tf.train.list_variables(prefix)}


def save_v2(tf, prefix: str, tensors: dict) -> None:
    names = sorted(tensors)
    values = [tf.constant(tensors[n].astype(bytes) if tensors[n].dtype == object else tensors[n]) for n in names]
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names), tensors=values)


def files_of(prefix: Path) -> list[Path]:
    return sorted(prefix.parent.glob(prefix.name + ".*"))


def same_files(a: Path, b: Path) -> bool:
    fa, fb = files_of(a), files_of(b)
    return [p.name[len(a.name):] for p in fa] == [p.name[len(b.name):] for p in fb] and all(
        x.read_bytes() == y.read_bytes() for x, y in zip(fa, fb))


def main() -> None:
    import tensorflow as tf

    interop = load_interop()
    for sub in ("dtypes", "sharded", "sliced", "bert", "ours", "ours_sharded"):
        shutil.rmtree(HERE / sub, ignore_errors=True)
        (HERE / sub).mkdir()
    tensors = dtype_tensors()
    expected: dict = {"fixtures": {}, "writer": {}}

    save_v2(tf, str(HERE / "dtypes/model.ckpt"), tensors)

    with tempfile.TemporaryDirectory() as tmp:
        names = sorted(tensors)
        parts = [f"{tmp}/part-0", f"{tmp}/part-1"]
        save_v2(tf, parts[0], {n: tensors[n] for n in names[::2]})
        save_v2(tf, parts[1], {n: tensors[n] for n in names[1::2]})
        tf.raw_ops.MergeV2Checkpoints(checkpoint_prefixes=parts, destination_prefix=str(HERE / "sharded/model.ckpt"))

    # Partitioned variables: slices saved under TensorFlow's encoded slice keys (starts of 1, 2 and 3 bytes).
    wide = np.arange(600, dtype=np.float32).reshape(3, 200)
    part = np.arange(8, dtype=np.int32).reshape(4, 2)
    tf.raw_ops.SaveV2(
        prefix=str(HERE / "sliced/model.ckpt"),
        tensor_names=["part", "part", "wide", "wide", "huge_empty", "huge_empty", "whole"],
        shape_and_slices=["4 2 0,2:-", "4 2 2,2:-", "3 200 -:0,150", "3 200 -:150,50", "0 70000 -:0,65000",
                          "0 70000 -:65000,5000", ""],
        tensors=[part[:2], part[2:], wide[:, :150], wide[:, 150:], np.zeros((0, 65000), np.float32),
                 np.zeros((0, 5000), np.float32), np.float32(2.5)])

    rng = np.random.default_rng(7)
    graph = tf.Graph()
    with graph.as_default():
        v1 = tf.compat.v1
        for name, shape in BERT_SHAPES.items():
            for suffix in ("", "/adam_m", "/adam_v"):
                init = rng.standard_normal(shape).astype(np.float32) * (1.0 if suffix != "/adam_v" else 1e-3) ** 2
                v1.get_variable(name + suffix, initializer=tf.constant(init), use_resource=True)
        step = v1.train.get_or_create_global_step()
        assign = step.assign(1000)
        saver = v1.train.Saver(max_to_keep=1)
        with v1.Session(graph=graph) as sess:
            sess.run(v1.global_variables_initializer())
            sess.run(assign)
            saver.save(sess, str(HERE / "bert/model.ckpt"), global_step=1000, write_meta_graph=False)
    # Saver writes the absolute path into the state file; make it relative (as when a directory is copied).
    (HERE / "bert/checkpoint").write_text('model_checkpoint_path: "model.ckpt-1000"\n'
                                          'all_model_checkpoint_paths: "model.ckpt-1000"\n')

    for sub, prefix in (("dtypes", "dtypes/model.ckpt"), ("sharded", "sharded/model.ckpt"),
                        ("sliced", "sliced/model.ckpt"), ("bert", "bert/model.ckpt-1000")):
        expected["fixtures"][sub] = {"prefix": prefix, "files": [p.name for p in files_of(HERE / prefix)],
                                     "tensors": tf_values(tf, str(HERE / prefix))}

    # Our writer, read back by TensorFlow.
    written = {name: describe(value) for name, value in tensors.items()}
    for sub, shards in (("ours", 1), ("ours_sharded", 2)):
        prefix = str(HERE / sub / "model.ckpt")
        interop.write_tf_checkpoint(prefix, tensors, num_shards=shards, state_file=True)
        values = tf_values(tf, prefix)
        listed = {name: list(shape) for name, shape in tf.train.list_variables(prefix)}
        verdict = {
            "shards": shards,
            "tf_values_equal_written": values == written,
            "tf_list_variables_equal": listed == {n: list(np.shape(v)) for n, v in tensors.items()},
            "tf_latest_checkpoint": Path(tf.train.latest_checkpoint(str(HERE / sub))).name,
            "files": [p.name for p in files_of(Path(prefix))],
        }
        if shards == 1:
            verdict["files_identical_to_tf_savev2"] = same_files(Path(prefix), HERE / "dtypes/model.ckpt")
        expected["writer"][sub] = verdict

    with tempfile.TemporaryDirectory() as tmp:
        many = many_tensors()
        save_v2(tf, f"{tmp}/tf", many)
        interop.write_tf_checkpoint(f"{tmp}/ours", many)
        index = Path(f"{tmp}/tf.index").read_bytes()
        ours_values = tf_values(tf, f"{tmp}/ours")
        expected["writer"]["many_tensors"] = {
            "count": len(many),
            "tf_index_data_blocks": len(interop.tf_checkpoint.sstable.data_block_handles(index)),
            "tf_index_bytes": len(index),
            "tf_index_sha256": sha256(index),
            "tf_data_sha256": sha256(Path(f"{tmp}/tf.data-00000-of-00001").read_bytes()),
            "files_identical_to_tf_savev2": same_files(Path(f"{tmp}/ours"), Path(f"{tmp}/tf")),
            "tf_values_equal_written": ours_values == {n: describe(v) for n, v in many.items()},
        }

    expected["versions"] = {"tensorflow": tf.__version__, "numpy": np.__version__, "python": platform.python_version(),
                            "crc32c_backend": interop.tf_checkpoint.crc32c.BACKEND}
    (HERE / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    bad = [f"{sub}.{k}" for sub, v in expected["writer"].items() for k, ok in v.items()
           if isinstance(ok, bool) and not ok]
    print("TensorFlow's verdicts on our writer:", "all true" if not bad else f"FALSE: {bad}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
