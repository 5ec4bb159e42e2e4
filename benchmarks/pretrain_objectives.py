"""What the ways to pretrain cost per step: `bertopt pretrain` on packed rows with dynamic masks
(masked-LM, what `make run` trains) against `bertopt pretrain --data` on Google's sentence pairs
(`create-pretraining-data` shards: static masks, MLM + NSP, BertForPreTraining), same model (the
tiny preset), same vocabulary, batch and sequence length, one process. Rounds interleave the two;
each run's time per step leaves out its first step (warm-up). Writes
benchmarks/results/pretrain_objectives.json.

    .venv/bin/python benchmarks/pretrain_objectives.py [--rounds 3] [--steps 40]

The corpus of both is the Wikipedia sample that ships in the gensim wheel: the packed run reads it
as `make run` does (and trains its WordPiece vocabulary, cached); for the pairs, the same
documents are written in Google's format (one sentence a line, split after . ! ?; a blank line
between documents) and `create-pretraining-data` makes shards of them with that vocabulary.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BERTOPT = [sys.executable, "-m", "bertopt"]


def run(args: list[str]) -> None:
    subprocess.run([*BERTOPT, *args], check=True, capture_output=True, text=True)


def per_step(out: Path, steps: int) -> float:
    """Seconds per step after the first of a finished run."""
    summary = json.loads((out / "summary.json").read_text())
    return (summary["train_time_s"] - summary["first_step_s"]) / (steps - 1)


def google_format(documents, path: Path, max_documents: int) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for document in documents:
            sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", document.replace("\n", " ")) if s.strip()]
            if len(sentences) < 2:
                continue
            f.write("\n".join(sentences) + "\n\n")
            n += 1
            if n == max_documents:
                break
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--documents", type=int, default=2000)
    args = parser.parse_args()
    from bertopt.interop.tfrecord import read_pretraining_shards
    from bertopt.train.data import wiki_corpus

    work = Path(tempfile.mkdtemp(prefix="bertopt-objectives-"))
    cache = work / "cache"
    common = ["--preset", "tiny", "--batch-size", str(args.batch_size), "--steps", str(args.steps),
              "--log-every", "5", "--eval-every", "0", "--eval-sequences", "64", "--save-every", "0",
              "--threads", "2", "--no-progress"]
    packed = ["pretrain", *common, "--seq-len", str(args.seq_len), "--cache-dir", str(cache)]
    run([*packed, "--out", str(work / "warm"), "--steps", "2"])  # tokenizer and packed rows, cached
    tokenizer_file = next(cache.rglob("tokenizer*.json"))
    vocab = json.loads(tokenizer_file.read_text())["model"]["vocab"]
    (work / "vocab.txt").write_text("\n".join(sorted(vocab, key=vocab.get)) + "\n", encoding="utf-8")
    documents = google_format(wiki_corpus().open(), work / "wiki.txt", args.documents)
    started = time.perf_counter()
    run(["create-pretraining-data", "--input-file", str(work / "wiki.txt"), "--vocab-file", str(work / "vocab.txt"),
         "--output-file", str(work / "pairs.tfrecord"), "--max-seq-length", str(args.seq_len),
         "--max-predictions-per-seq", "20", "--dupe-factor", "1"])
    pairs_seconds = time.perf_counter() - started
    shards = ["pretrain", *common, "--data", str(work / "pairs.tfrecord"), "--vocab-file", str(work / "vocab.txt")]

    load_before = Path("/proc/loadavg").read_text().split()[:3]
    times = {"packed_mlm": [], "pairs_mlm_nsp": []}
    for r in range(args.rounds):
        for name, argv in (("packed_mlm", packed), ("pairs_mlm_nsp", shards)):
            out = work / f"{name}-{r}"
            run([*argv, "--out", str(out)])
            seconds = per_step(out, args.steps)
            times[name].append(seconds)
            print(f"round {r}: {name:14s} {seconds * 1000:.1f} ms/step", flush=True)
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "what": "seconds per optimizer step (first step left out), tiny preset, one process, 2 threads",
        "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps, "vocab_size": len(vocab),
        "seconds_per_step": times, "median_seconds_per_step": medians,
        "pairs_over_packed": medians["pairs_mlm_nsp"] / medians["packed_mlm"],
        "pairs_over_packed_per_round": [p / q for p, q in zip(times["pairs_mlm_nsp"], times["packed_mlm"])],
        "input_tokens_per_step": args.batch_size * args.seq_len,  # padding included (the pairs' input_mask)
        "pairs_real_token_fraction": float(read_pretraining_shards(str(work / "pairs.tfrecord")).input_mask.mean()),
        "pairs_documents": documents,
        "create_pretraining_data_seconds": round(pairs_seconds, 2),
        "loadavg_before": load_before, "loadavg_after": load_after,
        "machine": "AMD EPYC (AVX-512, bf16), 2 cores shared with other agents' work",
    }
    path = ROOT / "benchmarks" / "results" / "pretrain_objectives.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
