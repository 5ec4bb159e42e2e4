"""`bertopt bench`: time one full BERT optimizer step against the alternatives.

For each model size (BERT shapes, ~1M to ~335M parameters) every method and an
in-place-add bandwidth probe run interleaved; the terminal shows medians, bytes per
second, the ratio to the 32-bytes-per-parameter floor and the speedups; ``bench.json``
``bench.png`` (time per step vs parameters, log-log) and ``bench.md`` (the tables in
Markdown) go to ``--out``.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
from pathlib import Path

HELP = "benchmark one BERT optimizer step (clip + Adam + decay; and LAMB) against torch and pytorch-pretrained-bert"

QUICK_SIZES = ["bert-h32", "bert-tiny"]
# Bytes per parameter the timing run holds at once: shared p, g, m, v (16), the probe's
# two arrays (8), and the largest temporaries of a method (foreach: ~3 lists, 12).
RUN_BYTES_PER_PARAM = 36


def add_arguments(parser) -> None:
    from bertopt.bench.methods import METHODS
    from bertopt.bench.shapes import SIZES

    parser.add_argument("--quick", action="store_true",
                        help=f"small sizes ({', '.join(QUICK_SIZES)}), few repetitions, no peers that compile "
                             "first (compiled, deepspeed-cpuadam) unless named: a smoke test in seconds")
    parser.add_argument("--sizes", default=None,
                        help=f"comma-separated model sizes, default all: {','.join(SIZES)}")
    parser.add_argument("--methods", default=None, help=f"comma-separated, default all: {','.join(METHODS)}")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per method (default 15; --quick 3)")
    parser.add_argument("--min-reps", type=int, default=None,
                        help="at least this many repetitions even for slow methods (default 5; --quick 2)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds per method and size that bound the repetitions of slow methods (default 8; --quick 0.3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--memory-size", default=None,
                        help="size at which to measure peak extra memory per method in a fresh process "
                             "(default bert-base; --quick bert-h32; 'none' to skip)")
    parser.add_argument("--out", default="bench-results", help="directory for bench.json, bench.md and bench.png")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")


def resolve_options(args) -> dict:
    """Defaults filled in and every value checked; ValueError names the bad option."""
    from bertopt.bench.methods import select
    from bertopt.bench.shapes import SIZES, size_by_name

    import torch

    quick = args.quick
    sizes = args.sizes.split(",") if args.sizes else (QUICK_SIZES if quick else list(SIZES))
    for name in sizes:
        size_by_name(name)
    methods = select(args.methods.split(",") if args.methods else None)
    if quick and not args.methods:  # a smoke test: no compiling of other projects' steps
        methods = [m for m in methods if not m.peer]
    reps = args.reps if args.reps is not None else (3 if quick else 15)
    min_reps = args.min_reps if args.min_reps is not None else (2 if quick else 5)
    budget = args.budget if args.budget is not None else (0.3 if quick else 8.0)
    threads = args.threads if args.threads is not None else torch.get_num_threads()
    memory_size = args.memory_size or ("bert-h32" if quick else "bert-base")
    if reps < 1:
        raise ValueError(f"--reps must be >= 1, got {reps}")
    if min_reps < 1:
        raise ValueError(f"--min-reps must be >= 1, got {min_reps}")
    min_reps = min(min_reps, reps)
    if budget <= 0:
        raise ValueError(f"--budget must be > 0 seconds, got {budget}")
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    if memory_size != "none":
        size_by_name(memory_size)
    return dict(sizes=sizes, methods=methods, reps=reps, min_reps=min_reps, budget=budget,
                threads=threads, memory_size=memory_size)


def command_line(args) -> str:
    """The `bertopt bench` command that reproduces this run, from the parsed options."""
    words = ["bertopt", "bench"]
    if args.quick:
        words.append("--quick")
    for option in ("sizes", "methods", "reps", "min_reps", "budget", "threads", "memory_size", "out"):
        value = getattr(args, option)
        if value is not None:
            words += ["--" + option.replace("_", "-"), str(value)]
    if args.no_plot:
        words.append("--no-plot")
    return " ".join(shlex.quote(w) for w in words)


def _available_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def run(args) -> int:
    import torch

    from bertopt.bench import harness, memory, results
    from bertopt.bench.methods import SETUP_NOTES, unavailable_reason
    from bertopt.bench.shapes import bert_parameter_shapes, parameter_count, size_by_name
    from bertopt.optim.native import build as native_build

    opts = resolve_options(args)
    torch.set_num_threads(opts["threads"])
    methods = []
    for m in opts["methods"]:
        reason = unavailable_reason(m.name)
        if reason:
            print(f"skipping {m.name}: {reason}")
        else:
            methods.append(m)
    native_build.library()  # compile before anything is timed
    print(f"bertopt bench: {len(methods)} methods, sizes {', '.join(opts['sizes'])}, "
          f"{opts['threads']} threads; native kernel: {native_build.status()}")

    monitor = harness.LoadMonitor()
    per_size, skipped, notes_seen = [], {}, []
    for size_name in opts["sizes"]:
        count = parameter_count(bert_parameter_shapes(size_by_name(size_name)))
        available = _available_memory_bytes()
        if available is not None and RUN_BYTES_PER_PARAM * count > 0.8 * available:
            skipped[size_name] = (f"needs ~{RUN_BYTES_PER_PARAM * count / 2**30:.1f} GiB, "
                                  f"{available / 2**30:.1f} GiB available")
            print(f"  {size_name}: skipped ({skipped[size_name]})")
            continue
        raw = harness.time_size(size_name, methods, reps=opts["reps"], min_reps=opts["min_reps"],
                                budget_s=opts["budget"])
        for note in SETUP_NOTES[len(notes_seen):]:
            note["size"] = size_name
            print(f"  setup, not timed: {note}")
        notes_seen = list(SETUP_NOTES)
        result = results.analyse_size(size_name, raw)
        per_size.append(result)
        print(results.table(result))
        print()

    mem = None
    if opts["memory_size"] != "none":
        reason = memory.available()
        if reason:
            print(f"peak memory not measured: {reason}")
        else:
            print(f"peak extra memory per step at {opts['memory_size']} (fresh process) ...")
            mem = {"size": opts["memory_size"],
                   "methods": memory.measure_in_subprocess(opts["memory_size"], [m.name for m in methods],
                                                           opts["threads"])}
            for name, m in mem["methods"].items():
                print(f"  {name:<22}{m['peak_extra_bytes'] / 2**20:>10.1f} MiB  "
                      f"{m['percent_of_param_bytes']:>6.1f}% of parameter bytes")
    load = monitor.stop()

    if per_size:
        print(results.sweep_table(per_size))
    print(f"machine load: loadavg before {load['loadavg_before']}, after {load['loadavg_after']}; "
          f"other processes used {load['other_processes_cpu_share']} of all CPU time during the run")

    report = {
        "meta": {
            "command": command_line(args),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": _git_commit(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu": _cpu_model(),
            "cpus": os.cpu_count(),
            "threads": opts["threads"],
            "native_kernel": native_build.status(),
            "options": {k: v for k, v in opts.items() if k != "methods"},
            "methods": {m.name: m.description for m in methods},
            "load": load,
            "setup": SETUP_NOTES,
            "definitions": {
                "bandwidth_GBps": "12 bytes * params / median time of an in-place add a += b (float32)",
                "floor_s": "32 bytes * params / bandwidth (read g for the norm; read p,g,m,v, write p,m,v)",
                "nominal_GBps": "32 bytes * params / median step time",
                "ratio_to_floor": "median step time / floor_s",
                "speedup_vs_torch_fused": "median of torch-adamw-fused / median of the method",
                "lamb_vs_bertadam": "bertopt-lamb-fused / bertopt-fused: ratio of medians and median of "
                                    "per-round ratios (target <= 1.35); byte_ratio = 44 / 32 bytes per parameter moved, "
                                    "read_ratio = 32 / 20 bytes read",
                "fast_path_vs_peers": "peer / bertopt-fused: ratio of medians and median of per-round ratios",
            },
        },
        "sizes": per_size,
        "skipped_sizes": skipped,
        "memory": mem,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results.write_json(out / "bench.json", report)
    (out / "bench.md").write_text(results.markdown(report) + "\n")
    written = [str(out / "bench.json"), str(out / "bench.md")]
    if per_size and not args.no_plot:
        title = (f"BERT optimizer step, {_cpu_model()}, {opts['threads']} threads, torch {torch.__version__}")
        results.plot(out / "bench.png", per_size, title)
        written.append(str(out / "bench.png"))
    print("wrote " + ", ".join(written))
    return 0
