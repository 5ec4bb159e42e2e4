"""From raw timings to the numbers we report: bandwidth, floor, ratios; table, JSON, plot."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from bertopt.bench.harness import FLOOR_BYTES_PER_PARAM, PROBE, PROBE_BYTES_PER_ELEMENT, summarize
from bertopt.bench.methods import BASELINE, FAST_PATH, LAMB_FAST_PATH, METHODS, PEER_TARGETS, PPB

LAMB_TARGET = 1.35  # a LAMB step at most 1.35x a BertAdam step on the same tensors (issue 13)
# Bytes read per parameter: LAMB reads g (norm), p, g, m, v (pass 1), p, m, v (pass 2); BertAdam
# g, then p, g, m, v. Where a write costs little next to a read, this ratio is LAMB's floor
# (bench/fit.py fits the two costs to the passes timed by benchmarks/step_parts.py).
LAMB_READ_RATIO = 32 / 20


def analyse_size(size_name: str, raw: dict) -> dict:
    """Per-method medians and the derived figures for one model size.

    bandwidth  = 12 bytes * count / median(in-place add)
    floor      = 32 bytes * count / bandwidth
    GB/s       = 32 bytes * count / median(step)   (nominal: the floor's traffic)

    The ``*_paired`` figures pair each repetition with the probe (or the other method)
    timed in the same round, then take the median of the per-round ratios: when the
    machine's speed drifts during the run (other jobs, memory traffic of neighbours),
    both sides of a pair saw the same machine.
    """
    count = raw["params"]
    probe = summarize(raw["times"][PROBE])
    bandwidth = PROBE_BYTES_PER_ELEMENT * count / probe["median_s"]
    floor_s = FLOOR_BYTES_PER_PARAM * count / bandwidth
    methods = {}
    for name, times in raw["times"].items():
        if name == PROBE:
            continue
        s = summarize(times)
        s["nominal_GBps"] = FLOOR_BYTES_PER_PARAM * count / s["median_s"] / 1e9
        s["ratio_to_floor"] = s["median_s"] / floor_s
        s["algorithm_bytes_per_param"] = METHODS[name].nominal_bytes
        methods[name] = s
    probe_times = raw["times"][PROBE]
    floor_per_round = [t * FLOOR_BYTES_PER_PARAM / PROBE_BYTES_PER_ELEMENT for t in probe_times]
    for name, s in methods.items():
        s["speedup_vs_torch_fused"] = methods[BASELINE]["median_s"] / s["median_s"] if BASELINE in methods else None
        s["speedup_vs_ppb"] = methods[PPB]["median_s"] / s["median_s"] if PPB in methods else None
        s["ratio_to_floor_paired"] = paired_median_ratio(s["times_s"], floor_per_round)
        s["speedup_vs_torch_fused_paired"] = (
            paired_median_ratio(methods[BASELINE]["times_s"], s["times_s"]) if BASELINE in methods else None)
        s["speedup_vs_ppb_paired"] = (
            paired_median_ratio(methods[PPB]["times_s"], s["times_s"]) if PPB in methods else None)
    return {
        "size": size_name,
        "params": count,
        "param_bytes": 4 * count,
        "inplace_add": probe,
        "bandwidth_GBps": bandwidth / 1e9,
        "floor_s": floor_s,
        "methods": methods,
        "lamb_vs_bertadam": lamb_vs_bertadam(methods),
        "fast_path_vs_peers": fast_path_vs_peers(methods),
    }


def fast_path_vs_peers(methods: dict) -> dict:
    """How much faster BertAdam's fast path is than each peer that ran: ratio of medians,
    median of per-round ratios (peer / ours), and the target."""
    if FAST_PATH not in methods:
        return {}
    ours = methods[FAST_PATH]
    return {
        peer: {"speedup": methods[peer]["median_s"] / ours["median_s"],
               "speedup_paired": paired_median_ratio(methods[peer]["times_s"], ours["times_s"]),
               "target": target}
        for peer, target in PEER_TARGETS.items() if peer in methods
    }


def peers_line(result: dict) -> str | None:
    peers = result.get("fast_path_vs_peers") or {}
    if not peers:
        return None
    cells = [f"{peer} {v['speedup']:.2f}x (paired {v['speedup_paired']:.2f}x, target >= {v['target']:.2f}x: "
             f"{'met' if v['speedup_paired'] >= v['target'] else 'missed'})" for peer, v in peers.items()]
    floor = result["methods"][FAST_PATH]
    return (f"{FAST_PATH}: {floor['ratio_to_floor']:.2f}x the floor (paired {floor['ratio_to_floor_paired']:.2f}x); "
            "faster than " + "; ".join(cells))


def lamb_vs_bertadam(methods: dict) -> dict | None:
    """LAMB's fast path against BertAdam's on the same tensors, both clipping: the ratio of
    medians, the median of per-round ratios, the target, and the ratio of their bytes."""
    if LAMB_FAST_PATH not in methods or FAST_PATH not in methods:
        return None
    lamb, adam = methods[LAMB_FAST_PATH], methods[FAST_PATH]
    return {
        "ratio": lamb["median_s"] / adam["median_s"],
        "ratio_paired": paired_median_ratio(lamb["times_s"], adam["times_s"]),
        "target": LAMB_TARGET,
        "byte_ratio": METHODS[LAMB_FAST_PATH].nominal_bytes / METHODS[FAST_PATH].nominal_bytes,
        "read_ratio": LAMB_READ_RATIO,
    }


def lamb_line(result: dict) -> str | None:
    v = result.get("lamb_vs_bertadam")
    if v is None:
        return None
    verdict = "meets" if v["ratio_paired"] <= v["target"] else "misses"
    return (f"{LAMB_FAST_PATH} / {FAST_PATH}: {v['ratio']:.2f}x (paired by round {v['ratio_paired']:.2f}x), "
            f"{verdict} the target <= {v['target']:.2f}x; bytes moved {v['byte_ratio']:.3f}x, bytes read "
            f"{v.get('read_ratio', LAMB_READ_RATIO):.3f}x")


def paired_median_ratio(numerators: list[float], denominators: list[float]) -> float:
    """Median over rounds of numerator/denominator. Times are stored in round order and a
    method with k repetitions ran in rounds 0..k-1, so index i is round i for both lists."""
    return statistics.median(a / b for a, b in zip(numerators, denominators))


def table(result: dict, memory: dict | None = None) -> str:
    """One size as a text table, fastest first."""
    lines = [
        f"{result['size']}: {result['params']:,} float32 parameters; in-place add bandwidth "
        f"{result['bandwidth_GBps']:.1f} GB/s -> floor (32 B/param) {result['floor_s'] * 1e3:.2f} ms",
    ]
    header = f"{'method':<22}{'ms/step':>9}{'[q1..q3]':>18}{'reps':>5}{'GB/s@32B':>9}{'x floor':>8}{'vs torch':>9}{'vs ppb':>8}"
    if memory:
        header += f"{'extra mem':>10}"
    lines += [header, "-" * len(header)]
    for name, s in sorted(result["methods"].items(), key=lambda kv: kv[1]["median_s"]):
        spread = f"[{s['q1_s'] * 1e3:.1f}..{s['q3_s'] * 1e3:.1f}]"
        row = (f"{name:<22}{s['median_s'] * 1e3:>9.2f}{spread:>18}{s['reps']:>5}"
               f"{s['nominal_GBps']:>9.1f}{s['ratio_to_floor']:>8.2f}"
               f"{_x(s['speedup_vs_torch_fused']):>9}{_x(s['speedup_vs_ppb']):>8}")
        if memory:
            m = memory.get(name)
            cell = "" if m is None else f"{m['percent_of_param_bytes']:.1f}%"
            row += f"{cell:>10}"
        lines.append(row)
    for line in (lamb_line(result), peers_line(result)):
        if line:
            lines.append(line)
    return "\n".join(lines)


def sweep_table(results: list[dict]) -> str:
    """ms/step of every method at every size, plus the floor."""
    names = [n for n in METHODS if any(n in r["methods"] for r in results)]
    header = f"{'size':<12}{'params':>10}{'floor':>9}" + "".join(f"{n:>26}" for n in names)
    lines = ["ms per step (x floor)", header, "-" * len(header)]
    for r in results:
        row = f"{r['size']:<12}{r['params'] / 1e6:>9.1f}M{r['floor_s'] * 1e3:>9.2f}"
        for n in names:
            s = r["methods"].get(n)
            cell = "" if s is None else f"{s['median_s'] * 1e3:.2f} ({s['ratio_to_floor']:.2f})"
            row += f"{cell:>26}"
        lines.append(row)
    return "\n".join(lines)


def _x(value) -> str:
    return "" if value is None else f"{value:.2f}x"


def write_json(path: Path, report: dict) -> None:
    path.write_text(json.dumps(report, indent=1) + "\n")


def plot(path: Path, results: list[dict], title: str) -> None:
    """Time per step vs parameter count, log-log, one line per method plus the floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    counts = [r["params"] for r in results]
    for name in METHODS:
        points = [(r["params"], r["methods"][name]["median_s"] * 1e3) for r in results if name in r["methods"]]
        if not points:
            continue
        style = dict(linewidth=2.5, color="C3") if name == FAST_PATH else dict(linewidth=1.2)
        ax.plot(*zip(*points), marker="o", markersize=4, label=name, **style)
    ax.plot(counts, [r["floor_s"] * 1e3 for r in results], "k--", linewidth=1.2,
            label="floor: 32 B/param at in-place-add bandwidth")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters (BERT shapes)")
    ax.set_ylabel("ms per step (clip + Adam + decay), median")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(report: dict) -> str:
    """The run as Markdown: headline size in full, the sweep, memory, machine and load."""
    meta, sizes = report["meta"], report["sizes"]
    load = meta["load"]
    out = [
        f"Command: `{meta['command']}`  ",
        f"{meta['date_utc']}, commit {meta['git_commit']}, torch {meta['torch']}, {meta['cpu']}, "
        f"{meta['cpus']} CPUs, {meta['threads']} threads  ",
        f"Machine load: load average {load['loadavg_before']} before, {load['loadavg_after']} after; other "
        f"processes took {_pct(load['other_processes_cpu_share'])} of all CPU time during the run.",
        "",
    ]
    headline = next((r for r in sizes if r["size"] == "bert-base"), sizes[-1] if sizes else None)
    memory = (report.get("memory") or {}).get("methods", {})
    if headline:
        out += [
            f"**{headline['size']}** ({headline['params']:,} parameters): in-place add "
            f"{headline['bandwidth_GBps']:.1f} GB/s, floor {headline['floor_s'] * 1e3:.1f} ms "
            f"(32 bytes/parameter)",
            "",
            "| method | ms/step (median) | q1..q3 | GB/s at 32 B/param | x floor | vs torch fused | vs ppb "
            "| x floor, vs torch, vs ppb (paired by round) | peak extra memory |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, s in sorted(headline["methods"].items(), key=lambda kv: kv[1]["median_s"]):
            mem = memory.get(name)
            mem_cell = "" if mem is None else f"{mem['percent_of_param_bytes']:.2f}% of param bytes"
            out.append(
                f"| {name} | {s['median_s'] * 1e3:.1f} | {s['q1_s'] * 1e3:.1f}..{s['q3_s'] * 1e3:.1f} "
                f"| {s['nominal_GBps']:.1f} | {s['ratio_to_floor']:.2f} | {_x(s['speedup_vs_torch_fused'])} "
                f"| {_x(s['speedup_vs_ppb'])} | {s['ratio_to_floor_paired']:.2f}, "
                f"{_x(s['speedup_vs_torch_fused_paired'])}, {_x(s['speedup_vs_ppb_paired'])} | {mem_cell} |"
            )
        out.append("")
        for line in (lamb_line(headline), peers_line(headline)):
            if line:
                out += [line, ""]
    for r in sizes:
        if r is not headline and (line := peers_line(r)):
            out += [f"{r['size']}: {line}", ""]
    for note in meta.get("setup", []):
        out.append(f"setup (not timed): {note}  ")
    if len(sizes) > 1:
        names = [n for n in METHODS if any(n in r["methods"] for r in sizes)]
        with_lamb = any(r.get("lamb_vs_bertadam") for r in sizes)
        lamb_header = f" {LAMB_FAST_PATH} / {FAST_PATH} (paired) |" if with_lamb else ""
        out += ["ms per step (ratio to the floor):", "",
                "| size | params | floor ms | " + " | ".join(names) + " |" + lamb_header,
                "|---|---:|---:|" + "---:|" * (len(names) + with_lamb)]
        for r in sizes:
            cells = []
            for n in names:
                s = r["methods"].get(n)
                cells.append("" if s is None else f"{s['median_s'] * 1e3:.1f} ({s['ratio_to_floor']:.2f})")
            if with_lamb:
                v = r.get("lamb_vs_bertadam")
                cells.append("" if v is None else f"{v['ratio']:.2f}x ({v['ratio_paired']:.2f}x)")
            out.append(f"| {r['size']} | {r['params'] / 1e6:.1f}M | {r['floor_s'] * 1e3:.1f} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _pct(value) -> str:
    return "?" if value is None else f"{value:.0%}"


def reanalyse(report: dict) -> dict:
    """Recompute every derived figure of a saved report from its raw times (same measurement)."""
    sizes = []
    for s in report["sizes"]:
        raw = {"params": s["params"],
               "times": {PROBE: s["inplace_add"]["times_s"], **{n: m["times_s"] for n, m in s["methods"].items()}}}
        sizes.append(analyse_size(s["size"], raw))
    return {**report, "sizes": sizes}


if __name__ == "__main__":  # python -m bertopt.bench.results DIR: refresh DIR/bench.json and bench.md
    import sys

    directory = Path(sys.argv[1])
    refreshed = reanalyse(json.loads((directory / "bench.json").read_text()))
    write_json(directory / "bench.json", refreshed)
    (directory / "bench.md").write_text(markdown(refreshed) + "\n")
    print(f"refreshed {directory / 'bench.json'} and bench.md from their raw times")
