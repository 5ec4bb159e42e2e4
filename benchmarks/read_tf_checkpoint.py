"""Reading a BERT-base sized TensorFlow checkpoint with bertopt's reader against reading the same bytes with numpy.

Writes (with bertopt's writer, into a temporary directory, deleted at the end) the variables of Google's
BERT-base pre-training checkpoint: the 110M weights with their ``adam_m`` and ``adam_v`` slots and
``global_step``, 1.3 GB in one data file. Then, interleaved round by round, each variant reads every tensor
and touches all of its data (a sum per tensor):

- ``bertopt``: ``read_tf_checkpoint(prefix)`` (the index parsed, the shard memory-mapped, every tensor's
  CRC-32C verified), then the sums;
- ``bertopt_noverify``: the same with ``verify=False``;
- ``numpy_fromfile``: ``np.fromfile`` of the data file, then the sums over views at each tensor's offset
  (the offsets are given to numpy for free: parsed once, outside the timing);
- ``numpy_memmap``: one ``np.memmap`` per tensor, then the sums.

Warm rounds read from the page cache; with ``--cold-rounds N`` (root only) N more rounds drop the page
cache (``/proc/sys/vm/drop_caches``) before every read. Peak extra memory is measured in a separate,
untimed pass of each variant: Python/numpy allocations (tracemalloc: numpy reports its buffers to it) and
the growth of the process's anonymous resident memory (RssAnon; mapped file pages are page cache, counted
in RssFile, and are not the process's to keep).

    python benchmarks/read_tf_checkpoint.py --rounds 7 --cold-rounds 3 --out benchmarks/results/read_tf_checkpoint.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from bertopt.bench import harness
from bertopt.interop import crc32c
from bertopt.interop.tf_checkpoint import _read_index, data_filename, read_tf_checkpoint, write_tf_checkpoint


BERT_BASE = dict(num_hidden_layers=12, hidden_size=768, intermediate_size=3072, vocab_size=30522,
                 max_position_embeddings=512, type_vocab_size=2)


def google_bert_variables(config=BERT_BASE) -> dict:
    """Name -> shape of the float32 weights in Google's BERT checkpoints (modeling.py + run_pretraining.py),
    from the importer's own table (bertopt.interop.google)."""
    from bertopt.interop.google import _expected_shape, variable_table

    return {v.google: _expected_shape(v, config) for v in variable_table(config)}


def write_checkpoint(prefix: str) -> dict:
    rng = np.random.default_rng(0)
    tensors = {}
    for name, shape in google_bert_variables().items():
        for suffix in ("", "/adam_m", "/adam_v"):
            tensors[name + suffix] = rng.standard_normal(shape, dtype=np.float32)
    tensors["global_step"] = np.int64(100000)
    t0 = time.perf_counter()
    write_tf_checkpoint(prefix, tensors)
    seconds = time.perf_counter() - t0
    largest = max(tensors.values(), key=lambda a: a.nbytes)
    return {"tensors": len(tensors), "weights_parameters": sum(int(np.prod(s)) for s in google_bert_variables().values()),
            "data_bytes": os.path.getsize(data_filename(prefix, 0, 1)), "largest_tensor_bytes": int(largest.nbytes),
            "write_seconds": round(seconds, 2)}


def touch(arrays) -> float:
    return sum(float(a.sum()) for a in arrays)


def variants(prefix: str) -> dict:
    path = data_filename(prefix, 0, 1)
    layout = [(e.offset, e.shape, np.float32 if e.dtype == 1 else np.int64) for _, e in _read_index(prefix)[1]]

    def views(buf):
        return [buf[off:off + int(np.prod(shape)) * np.dtype(dt).itemsize].view(dt).reshape(shape)
                for off, shape, dt in layout]

    return {
        "bertopt": lambda: touch(read_tf_checkpoint(prefix).values()),
        "bertopt_noverify": lambda: touch(read_tf_checkpoint(prefix, verify=False).values()),
        "numpy_fromfile": lambda: touch(views(np.fromfile(path, dtype=np.uint8))),
        "numpy_memmap": lambda: touch(np.memmap(path, dtype=dt, mode="r", offset=off, shape=shape)
                                      for off, shape, dt in layout),
    }


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_memory(run) -> dict:
    """Extra memory while reading and touching everything, everything kept alive until measured."""
    before = rss_anon()
    tracemalloc.start()
    kept = []
    run_and_keep = run(kept)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    grown = rss_anon() - before
    del kept, run_and_keep
    return {"tracemalloc_peak_bytes": peak, "rss_anon_growth_bytes": grown}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def drop_page_cache() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="warm interleaved rounds (default: 7)")
    parser.add_argument("--cold-rounds", type=int, default=0, help="rounds after dropping the page cache (root)")
    parser.add_argument("--dir", default=None, help="where to write the temporary checkpoint (default: $TMPDIR)")
    parser.add_argument("--out", default=None, help="JSON file for the raw times and the summary")
    args = parser.parse_args(argv)
    load = harness.LoadMonitor()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        prefix = f"{tmp}/model.ckpt-100000"
        checkpoint = write_checkpoint(prefix)
        print("wrote", checkpoint, flush=True)
        steps = variants(prefix)
        for step in steps.values():  # warm the page cache and the code paths
            step()
        warm = harness.interleaved_times(steps, {name: args.rounds for name in steps})
        cold = {name: [] for name in steps}
        for r in range(args.cold_rounds):
            for i in range(len(steps)):
                name = list(steps)[(i + r) % len(steps)]
                drop_page_cache()
                t0 = time.perf_counter()
                steps[name]()
                cold[name].append(time.perf_counter() - t0)
        memory = {}
        path = data_filename(prefix, 0, 1)
        for name, read in (("bertopt", lambda: read_tf_checkpoint(prefix)),
                           ("numpy_fromfile", lambda: np.fromfile(path, dtype=np.uint8))):
            def run(kept, read=read):
                result = read()
                kept.append(result)
                touch(result.values() if isinstance(result, dict) else [result])
            memory[name] = peak_memory(run)
    report = {
        "command": "python benchmarks/read_tf_checkpoint.py " + " ".join(argv if argv is not None else os.sys.argv[1:]),
        "checkpoint": checkpoint,
        "crc32c_backend": crc32c.BACKEND,
        "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(),
                    "note": "shared with other agents' work (see load)"},
        "load": load.stop(),
        "warm": {name: harness.summarize(t) | {"times_s": t} for name, t in warm.items()},
        "cold": {name: harness.summarize(t) | {"times_s": t} for name, t in cold.items() if t},
        "peak_extra_memory": memory,
    }
    summary = {}
    for kind in ("warm", "cold"):
        medians = {name: statistics.median(t) for name, t in (warm if kind == "warm" else cold).items() if t}
        if medians:
            fastest_numpy = min(medians["numpy_fromfile"], medians["numpy_memmap"])
            times = warm if kind == "warm" else cold
            paired = [a / min(b, c) for a, b, c in zip(times["bertopt"], times["numpy_fromfile"], times["numpy_memmap"])]
            summary[kind] = {f"{name}_median_s": round(m, 3) for name, m in medians.items()} | {
                "bertopt_over_fastest_numpy": round(medians["bertopt"] / fastest_numpy, 3),
                "bertopt_over_fastest_numpy_paired_median": round(statistics.median(paired), 3),
                "bertopt_noverify_over_fastest_numpy": round(medians["bertopt_noverify"] / fastest_numpy, 3)}
    summary["bertopt_peak_extra_over_largest_tensor"] = round(
        max(memory["bertopt"].values()) / checkpoint["largest_tensor_bytes"], 3)
    report["summary"] = summary
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
