"""Timing: all methods and a bandwidth probe, interleaved round-robin, on shared tensors.

Interleaving (every repetition runs each method once, in a rotating order) means that
slow drifts of the machine (other processes, thermal state) hit every method alike, so
the medians compare like with like. The bandwidth probe is an in-place add ``a += b``
over as many float32 elements as the model has parameters: it reads two arrays and
writes one (12 bytes per element), the same read/write mix as an optimizer step, and it
is the floor's yardstick: one step cannot move its 32 bytes per parameter faster than
this add moves its 12.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from bertopt.bench.methods import Method
from bertopt.bench.shapes import bert_parameter_shapes, parameter_count, size_by_name

PROBE = "inplace-add"
PROBE_BYTES_PER_ELEMENT = 12  # reads a and b, writes a (float32)
FLOOR_BYTES_PER_PARAM = 32  # norm: read g (4); update: read p, g, m, v, write p, m, v (28)


@dataclass
class Tensors:
    names: list[str]
    params: list[nn.Parameter]
    moments: tuple[list[torch.Tensor], list[torch.Tensor]]
    count: int


def make_tensors(size_name: str, seed: int = 0, with_moments: bool = True) -> Tensors:
    """Parameters (BERT's init scale 0.02) with gradients of global norm 2, so the clip acts.

    The moments start at zero as in training. Values stay far from float32's denormal
    range over any number of steps: v tends to the mean g^2 = 4/count (> 1e-9 for every
    size here), and the clip keeps the gradients' global norm at about 1.
    """
    shapes = bert_parameter_shapes(size_by_name(size_name))
    count = parameter_count(shapes)
    gen = torch.Generator().manual_seed(seed)
    params = []
    grad_scale = 2.0 / math.sqrt(count)
    for _, shape in shapes:
        p = nn.Parameter(torch.randn(shape, generator=gen) * 0.02)
        p.grad = torch.randn(shape, generator=gen) * grad_scale
        params.append(p)
    moments = ([torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]) if with_moments else None
    return Tensors([n for n, _ in shapes], params, moments, count)


def inplace_add_probe(count: int) -> Callable[[], None]:
    a = torch.ones(count)
    b = torch.full((count,), 1e-7)  # a stays normal and finite for any number of adds

    def probe():
        a.add_(b)

    return probe


@dataclass
class LoadMonitor:
    """How busy the machine was with *other* processes while we measured (Linux)."""

    started: float = field(default_factory=time.perf_counter)
    loadavg_before: tuple[float, float, float] | None = None
    _busy0: float | None = None
    _own0: float = 0.0

    def __post_init__(self):
        self.loadavg_before = _loadavg()
        self._busy0 = _machine_busy_seconds()
        self._own0 = _own_cpu_seconds()

    def stop(self) -> dict:
        wall = time.perf_counter() - self.started
        busy1 = _machine_busy_seconds()
        own = _own_cpu_seconds() - self._own0
        other = None
        if self._busy0 is not None and busy1 is not None and wall > 0:
            other = max(0.0, (busy1 - self._busy0) - own) / (wall * (os.cpu_count() or 1))
        return {
            "wall_seconds": round(wall, 3),
            "loadavg_before": self.loadavg_before,
            "loadavg_after": _loadavg(),
            "cpus": os.cpu_count(),
            # Share of all CPUs' time spent by other processes during the run (0..1).
            "other_processes_cpu_share": None if other is None else round(other, 3),
        }


def _own_cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the memory measurement)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _loadavg():
    try:
        return tuple(round(x, 2) for x in os.getloadavg())
    except OSError:
        return None


def _machine_busy_seconds() -> float | None:
    try:
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    # user..steal; guest time is already counted in user
    return (sum(fields[:8]) - idle) / ticks


def interleaved_times(steps: dict[str, Callable[[], None]], reps: dict[str, int]) -> dict[str, list[float]]:
    """Seconds per call of each step, round-robin: round r runs every step with reps > r once.

    The order rotates by one each round so no method always follows the same other one.
    The garbage collector is off while timing.
    """
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    rounds = max(reps.values(), default=0)
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            for i in range(len(names)):
                name = names[(i + r) % len(names)]
                if len(times[name]) >= reps[name]:
                    continue
                t0 = time.perf_counter()
                steps[name]()
                times[name].append(time.perf_counter() - t0)
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def summarize(times: list[float]) -> dict:
    ordered = sorted(times)
    q = statistics.quantiles(ordered, n=4) if len(ordered) >= 2 else [ordered[0]] * 3
    return {
        "median_s": statistics.median(ordered),
        "min_s": ordered[0],
        "q1_s": q[0],
        "q3_s": q[2],
        "reps": len(ordered),
        "times_s": times,
    }


def time_size(size_name: str, methods: list[Method], *, reps: int, min_reps: int, budget_s: float,
              warmup: int = 1, log: Callable[[str], None] = print) -> dict:
    """Time every method and the probe on one model size; returns raw timings and counts."""
    tensors = make_tensors(size_name)
    steps: dict[str, Callable[[], None]] = {PROBE: inplace_add_probe(tensors.count)}
    for method in methods:
        steps[method.name] = method.build(tensors.params, tensors.names, tensors.moments)
    # Warm-up: first-touch page faults, lazy state, the native kernel's one-time compile.
    # It also estimates each step's cost to fit the slow ones into the time budget.
    estimate = {}
    for name, step in steps.items():
        for _ in range(warmup):
            t0 = time.perf_counter()
            step()
            estimate[name] = time.perf_counter() - t0
    n_reps = {
        name: max(min_reps, min(reps, int(budget_s / max(estimate[name], 1e-9)))) for name in steps
    }
    log(f"  {size_name}: {tensors.count / 1e6:.1f}M params, reps "
        + ", ".join(f"{n}={k}" for n, k in n_reps.items()))
    times = interleaved_times(steps, n_reps)
    del steps, tensors
    gc.collect()
    return {"times": times, "params": parameter_count(bert_parameter_shapes(size_by_name(size_name)))}


# --- the scripts in benchmarks/ ---------------------------------------------------------------


def timed_under_load(steps: dict[str, Callable[[], None]], rounds: int, *, warmup: int = 1
                     ) -> tuple[dict[str, list[float]], dict]:
    """The scripts' timing: ``warmup`` untimed calls of each step in turn (lazy state, first
    touch, the kernels' compile), then ``rounds`` interleaved rounds (``interleaved_times``)
    while a ``LoadMonitor`` watches the machine. Returns (seconds per call by step, the load)."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    monitor = LoadMonitor()
    times = interleaved_times(steps, {name: rounds for name in steps})
    return times, monitor.stop()


def paired_to(times: dict[str, list[float]], reference: str, ratio_key: str) -> dict[str, dict[str, float]]:
    """Per step: its median in ms and, under ``ratio_key``, the median over rounds of its time
    over ``reference``'s in the same round (round r of every list is one interleaved round)."""
    ref = times[reference]
    return {name: {"median_ms": statistics.median(t) * 1e3, ratio_key: statistics.median(a / b for a, b in zip(t, ref))}
            for name, t in times.items()}


def script_arguments(doc: str, argv: list[str] | None, *, reps: int) -> argparse.Namespace:
    """The options every script in ``benchmarks/`` takes, parsed; torch is set to ``--threads``."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--size", default="bert-base", help="model shapes to time (default: bert-base)")
    parser.add_argument("--reps", type=int, default=reps, help=f"rounds of interleaved timing (default: {reps})")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="threads for torch and the native kernels (default: torch's)")
    parser.add_argument("--out", default=None, help="JSON file for the raw times and the summary")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args


def write_script_report(args: argparse.Namespace, script: str, argv: list[str] | None, **fields) -> None:
    """With ``--out``: the command that made the file (``script``: the script's ``__file__``), the
    common options, then ``fields``, as JSON."""
    if args.out:
        report = {"command": f"python benchmarks/{Path(script).name} " + " ".join(argv or []), "size": args.size,
                  "threads": args.threads, "reps": args.reps, **fields}
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
