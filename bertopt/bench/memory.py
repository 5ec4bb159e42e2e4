"""Peak extra memory of one optimizer step, measured in a fresh process (Linux).

tracemalloc cannot see torch's allocations, and the peak RSS of a long-lived process
says nothing about one step. So a child process, for each method in turn: builds the
parameters and gradients, runs one step (which allocates the optimizer state), reads its
resident set size (``VmRSS``), resets the kernel's peak counter (``echo 5 >
/proc/self/clear_refs``), runs a second step, and reads the peak (``VmHWM``). The
difference is the memory the step itself needed at its worst moment: temporaries.

glibc would otherwise keep freed memory in its heap and hand it out again without the
RSS moving, hiding the second step's temporaries; ``MALLOC_MMAP_THRESHOLD_=65536``
makes every allocation above 64 KiB its own mapping, returned to the system on free,
so the RSS follows live memory. Run as ``python -m bertopt.bench.memory``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _status_bytes() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_extra_bytes(step) -> int:
    """Peak resident memory above the current level while ``step()`` runs."""
    gc.collect()
    before = _status_bytes()["VmRSS"]
    reset_peak()
    step()
    return max(0, _status_bytes()["VmHWM"] - before)


def measure_here(size_name: str, method_names: list[str]) -> dict:
    """In this process: peak extra bytes of each method's second step (see module doc)."""
    from bertopt.bench.harness import make_tensors
    from bertopt.bench.methods import select

    results = {}
    for method in select(method_names):
        tensors = make_tensors(size_name, with_moments=False)
        step = method.build(tensors.params, tensors.names, None)
        step()  # allocates the optimizer state
        extra = peak_extra_bytes(step)
        param_bytes = 4 * tensors.count
        results[method.name] = {"peak_extra_bytes": extra, "percent_of_param_bytes": 100.0 * extra / param_bytes}
        del step, tensors
        gc.collect()
    return results


def measure_in_subprocess(size_name: str, method_names: list[str], threads: int, timeout: float = 1800) -> dict:
    """Run ``measure_here`` in a fresh Python with the malloc settings above."""
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, **CHILD_ENV}
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "bertopt.bench.memory", "--size", size_name,
           "--methods", ",".join(method_names), "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def available() -> str | None:
    """None if this system supports the measurement, else why not."""
    if not (os.path.exists("/proc/self/status") and os.path.exists("/proc/self/clear_refs")):
        return "needs Linux /proc/self/status and /proc/self/clear_refs"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", required=True)
    parser.add_argument("--methods", required=True, help="comma-separated method names")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(json.dumps(measure_here(args.size, args.methods.split(","))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
