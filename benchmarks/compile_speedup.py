"""`bertopt pretrain --compile` against eager: compile time and steady-state tokens/s (issue 12, item 3).

BERT-mini, 128 tokens, batch 32, 2 threads, fp32 (the setting of ``trainer_mlm.py``), each run a
``python -m bertopt pretrain`` subprocess. Rounds interleave eager and compiled runs, so the load
of a shared machine hits both alike; the report gives medians and the per-round paired ratio.

- steady-state tokens/s: from ``metrics.jsonl`` windows after the first ``--skip`` steps;
- compile time: the compiled run's first step (``summary.json`` ``first_step_s``) minus the eager
  run's first step of the same round.

    python benchmarks/compile_speedup.py --rounds 3 --steps 40
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trainer_mlm import BATCH, REPO, SEQ_LEN, bertopt_command, versions  # noqa: E402

from bertopt.cache import cache_dir  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "compile"


def run(compiled: bool, steps: int, skip: int, cache_dir: Path, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        command = bertopt_command("fp32", steps, skip, out, cache_dir) + (["--compile"] if compiled else [])
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if proc.returncode != 0:
            return {"error": proc.stderr.strip()[-2000:]}
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        summary = json.loads((out / "summary.json").read_text())
    tokens = seconds = 0.0
    previous = 0
    for record in records:
        if "tokens_per_s" not in record:
            continue
        window = (record["step"] - previous) * BATCH * SEQ_LEN
        if previous >= skip:
            tokens, seconds = tokens + window, seconds + window / record["tokens_per_s"]
        previous = record["step"]
    return {"tokens_per_s": tokens / seconds, "first_step_s": summary["first_step_s"], "load": os.getloadavg()[0]}


def summarize(rounds: list[dict]) -> dict:
    """Medians over the rounds where both runs finished. Compile time per round: the first round
    compiles cold; later ones find inductor's on-disk cache (torch's default) and compile warm."""
    ok = [r for r in rounds if "error" not in r["eager"] and "error" not in r["compiled"]]
    if not ok:
        return {}
    return {
        "eager_tokens_per_s": statistics.median(r["eager"]["tokens_per_s"] for r in ok),
        "compiled_tokens_per_s": statistics.median(r["compiled"]["tokens_per_s"] for r in ok),
        "paired_speedup": statistics.median(r["compiled"]["tokens_per_s"] / r["eager"]["tokens_per_s"] for r in ok),
        "compile_time_s_per_round": [round(r["compiled"]["first_step_s"] - r["eager"]["first_step_s"], 2) for r in ok],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip", type=int, default=10)
    parser.add_argument("--cache-dir", type=Path, default=cache_dir("pretrain"))
    parser.add_argument("--timeout", type=float, default=1200)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rounds = []
    for i in range(args.rounds):
        eager = run(False, args.steps, args.skip, args.cache_dir, args.timeout)
        compiled = run(True, args.steps, args.skip, args.cache_dir, args.timeout)
        rounds.append({"eager": eager, "compiled": compiled})
        print(f"round {i + 1}: eager {eager}, compiled {compiled}", flush=True)
    result = {
        "command": "python benchmarks/compile_speedup.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "setting": f"BERT-mini, {SEQ_LEN} tokens, batch {BATCH}, 2 threads, fp32, {args.steps} steps, first "
                   f"{args.skip} not timed",
        "versions": versions(), "cpu_count": os.cpu_count(), "rounds": rounds, **summarize(rounds),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compile_speedup.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("rounds", "versions")}, indent=1))


if __name__ == "__main__":
    main()
