"""`bertopt bench`: the shapes it times, its timing and memory machinery, and a real
--quick run whose JSON and PNG we check."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time

import pytest
import torch

from bertopt import cli
from bertopt.bench import harness, memory, results
from bertopt.bench.fit import READ_WRITE, SINGLE_PASSES, read_write_fit
from bertopt.bench.methods import BASELINE, FAST_PATH, LAMB_FAST_PATH, METHODS, PPB, select, unavailable_reason
from bertopt.bench.shapes import SIZES, bert_parameter_shapes, decays, parameter_count


# --- shapes ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["bert-h32", "bert-base", "bert-large"])
def test_shapes_are_hugging_faces_bert_model(size):
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    s = SIZES[size]
    config = transformers.BertConfig(hidden_size=s.hidden, num_hidden_layers=s.layers,
                                     intermediate_size=s.intermediate, num_attention_heads=max(1, s.hidden // 64))
    with torch.device("meta"):  # shapes only, no memory
        model = transformers.BertModel(config)
    assert [(n, tuple(p.shape)) for n, p in model.named_parameters()] == bert_parameter_shapes(s)


def test_bert_base_count_and_decay_groups():
    shapes = bert_parameter_shapes(SIZES["bert-base"])
    assert parameter_count(shapes) == 109_482_240  # bert-base-uncased BertModel
    no_decay = [n for n, _ in shapes if not decays(n)]
    # every bias and LayerNorm parameter, nothing else: 2 + 12*(6 biases + 4 LayerNorm) + 1 pooler bias... counted:
    assert all("bias" in n or "LayerNorm" in n for n in no_decay)
    assert len(no_decay) == 2 + 12 * (6 + 4) + 1
    assert decays("encoder.layer.0.attention.self.query.weight")


def test_sweep_spans_one_to_three_hundred_million():
    counts = [parameter_count(bert_parameter_shapes(s)) for s in SIZES.values()]
    assert counts == sorted(counts)
    assert 0.9e6 < counts[0] < 1.1e6 and 330e6 < counts[-1] < 340e6


# --- timing ---------------------------------------------------------------------------


def test_interleaving_rotates_and_respects_repetitions():
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = harness.interleaved_times(steps, {"a": 3, "b": 1, "c": 3})
    assert [len(times[n]) for n in "abc"] == [3, 1, 3]
    # round r starts at method r; b has had its one repetition after round 0
    assert calls == ["a", "b", "c", "c", "a", "c", "a"]


def test_timings_are_real_wall_clock():
    steps = {"sleep20ms": lambda: time.sleep(0.02), "noop": lambda: None}
    times = harness.interleaved_times(steps, {"sleep20ms": 3, "noop": 3})
    assert all(0.02 <= t < 0.5 for t in times["sleep20ms"])
    assert all(t < 0.01 for t in times["noop"])


def test_derived_figures_follow_their_definitions():
    raw = {"params": 1_000_000, "times": {
        harness.PROBE: [0.002, 0.003, 0.004],  # median 3 ms -> 12e6 B / 3 ms = 4 GB/s
        BASELINE: [0.010, 0.012, 0.011],
        FAST_PATH: [0.009, 0.008, 0.010],
        PPB: [0.1, 0.09, 0.2],
        LAMB_FAST_PATH: [0.0117, 0.0120, 0.0108],
    }}
    r = results.analyse_size("bert-h32", raw)
    assert math.isclose(r["bandwidth_GBps"], 4.0)
    assert math.isclose(r["floor_s"], 32e6 / 4e9)  # 8 ms
    fast = r["methods"][FAST_PATH]
    assert math.isclose(fast["median_s"], 0.009) and fast["reps"] == 3
    assert math.isclose(fast["ratio_to_floor"], 0.009 / 0.008)
    assert math.isclose(fast["nominal_GBps"], 32e6 / 0.009 / 1e9)
    assert math.isclose(fast["speedup_vs_torch_fused"], 0.011 / 0.009)
    assert math.isclose(fast["speedup_vs_ppb"], 0.1 / 0.009)
    # paired by round: probe [2,3,4] ms -> floors [16/3, 8, 32/3] ms; fast [9,8,10] -> ratios 1.69, 1.0, 0.94
    assert math.isclose(fast["ratio_to_floor_paired"], 1.0)
    assert math.isclose(fast["speedup_vs_torch_fused_paired"], 0.010 / 0.009)  # ratios 1.11, 1.5, 1.1
    assert math.isclose(fast["speedup_vs_ppb_paired"], 0.09 / 0.008)  # ratios 11.1, 11.25, 20
    text = results.table(r)
    assert FAST_PATH in text and "1.12" in text  # the ratio to the floor is printed
    # LAMB against BertAdam: medians 11.7 / 9 ms = 1.30; per round 1.3, 1.5, 1.08 -> 1.3
    lamb = r["lamb_vs_bertadam"]
    assert math.isclose(lamb["ratio"], 0.0117 / 0.009) and math.isclose(lamb["ratio_paired"], 0.0117 / 0.009)
    assert lamb["target"] == 1.35 and math.isclose(lamb["byte_ratio"], 44 / 32) and lamb["read_ratio"] == 32 / 20
    assert "meets the target <= 1.35x; bytes moved 1.375x, bytes read 1.600x" in text
    raw["times"][LAMB_FAST_PATH] = [0.015, 0.016, 0.014]  # 1.67, 2.0, 1.4 -> 1.67
    assert "misses the target" in results.table(results.analyse_size("bert-h32", raw))


def test_every_method_performs_a_real_step():
    # Each method must change the parameters and (for all but ppb) share the moments it was given.
    for method in select(None):
        if unavailable_reason(method.name):  # optional: deepspeed, transformers-adamw (transformers < 4.50)
            continue
        tensors = harness.make_tensors("bert-h32")
        before = [p.detach().clone() for p in tensors.params[:3]]
        method.build(tensors.params, tensors.names, tensors.moments)()
        assert any(not torch.equal(b, p) for b, p in zip(before, tensors.params[:3])), method.name
        assert tensors.moments[0][0].abs().sum() > 0, method.name  # state written in place


# --- memory ---------------------------------------------------------------------------

needs_proc = pytest.mark.skipif(memory.available() is not None, reason=str(memory.available()))

CALIBRATION = """
import json, torch
from bertopt.bench.memory import peak_extra_bytes
out = {"none": peak_extra_bytes(lambda: None),
       "100MB": peak_extra_bytes(lambda: torch.empty(25_000_000).fill_(1.0))}
x = [torch.empty(100_000).fill_(1.0) for _ in range(200)]; del x  # freed small blocks
out["after_free"] = peak_extra_bytes(lambda: [torch.empty(100_000).fill_(1.0) for _ in range(100)])
print(json.dumps(out))
"""


@needs_proc
def test_peak_memory_sees_a_known_temporary():
    env = {**os.environ, **memory.CHILD_ENV}
    out = subprocess.run([sys.executable, "-c", CALIBRATION], capture_output=True, text=True, env=env, check=True)
    got = json.loads(out.stdout)
    assert got["none"] < 2e6
    assert 100e6 <= got["100MB"] < 104e6
    # 100 live blocks of 400 kB = 40 MB even though a heap could have reused freed ones
    assert 39e6 <= got["after_free"] < 44e6


# --- the command ------------------------------------------------------------------------


def test_quick_run_writes_json_and_png(tmp_path, capsys):
    # One thread: on a machine shared with other jobs torch's two-thread parallel regions
    # can stall for milliseconds, which would make this smoke test slow, not wrong.
    assert cli.main(["bench", "--quick", "--threads", "1", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "x floor" in printed and "machine load" in printed
    report = json.loads((tmp_path / "bench.json").read_text())
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "bench.md").read_text()
    assert "bertopt bench --quick" in md and f"| {FAST_PATH} |" in md and "| bert-tiny |" in md
    assert f"{LAMB_FAST_PATH} / {FAST_PATH} (paired) |" in md  # the LAMB target's column in the sweep

    meta = report["meta"]
    assert meta["threads"] == 1 and meta["torch"] == torch.__version__
    assert 0 <= meta["load"]["other_processes_cpu_share"] <= 1
    assert set(meta["load"]) >= {"loadavg_before", "loadavg_after", "other_processes_cpu_share"}
    assert [r["size"] for r in report["sizes"]] == ["bert-h32", "bert-tiny"]
    for r in report["sizes"]:
        assert r["params"] == parameter_count(bert_parameter_shapes(SIZES[r["size"]]))
        assert 0.1 < r["bandwidth_GBps"] < 10_000
        # --quick: no peers, and only the methods this environment has
        assert set(r["methods"]) == {n for n, m in METHODS.items() if not m.peer and not unavailable_reason(n)}
        for name, s in r["methods"].items():
            assert 2 <= s["reps"] == len(s["times_s"]) <= 3
            assert all(t > 0 for t in s["times_s"]), name
            assert s["median_s"] == statistics.median(s["times_s"])
            assert math.isclose(s["ratio_to_floor"], s["median_s"] / r["floor_s"])
        # the slow per-tensor loops are slower than one fused pass, whatever the load
        assert r["methods"][PPB]["median_s"] > r["methods"][FAST_PATH]["median_s"]
    # more parameters take longer: ~4.3x the work from bert-h32 to bert-tiny
    small, large = report["sizes"]
    assert large["methods"][FAST_PATH]["min_s"] > small["methods"][FAST_PATH]["min_s"]

    # every derived figure is a function of the raw times stored alongside it
    assert results.reanalyse(report)["sizes"] == report["sizes"]

    mem = report["memory"]
    if memory.available() is None:
        assert mem["size"] == "bert-h32" and set(mem["methods"]) == {
            n for n, m in METHODS.items() if not m.peer and not unavailable_reason(n)}
        # one pass, no temporaries; foreach keeps list-sized temporaries
        assert mem["methods"][FAST_PATH]["percent_of_param_bytes"] < 5
        assert mem["methods"][LAMB_FAST_PATH]["percent_of_param_bytes"] < 5  # u is recomputed in pass 2: no workspace
        assert mem["methods"]["bertopt-foreach"]["percent_of_param_bytes"] > 50


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--reps", "0"], "--reps must be >= 1"),
        (["--sizes", "bert-huge"], "size must be one of"),
        (["--methods", "sgd"], "methods must be among"),
        (["--budget", "0"], "--budget must be > 0"),
        (["--memory-size", "x"], "size must be one of"),
    ],
)
def test_bad_options_raise_clear_errors(argv, words, tmp_path, capsys):
    with pytest.raises(ValueError, match=words):  # with --debug the ValueError itself surfaces
        cli.main(["--debug", "bench", "--out", str(tmp_path), *argv])
    assert cli.main(["bench", "--out", str(tmp_path), *argv]) != 0  # without: a one-line error
    assert words in capsys.readouterr().err
    assert not (tmp_path / "bench.json").exists()


def test_read_write_fit_recovers_the_costs_it_is_given():
    count = 1000
    read, write = 2e-10, 3e-11  # seconds per byte

    def seconds(name, slower=1.0):
        r, w = READ_WRITE[name]
        return (r * read + w * write) * count * slower

    # three rounds that agree: the intervals collapse onto the point
    times = {name: [seconds(name)] * 3 for name in READ_WRITE}
    times["lamb-step"] = [seconds("lamb-step", slower=1.1)] * 3
    fit = read_write_fit(times, count, resamples=50)
    assert fit["ns_per_read_byte"] == pytest.approx(read * 1e9) and fit["ns_per_write_byte"] == pytest.approx(write * 1e9)
    assert fit["x_fitted"]["update-pass"] == pytest.approx(1.0) and fit["x_fitted"]["lamb-step"] == pytest.approx(1.1)
    assert fit["lamb_over_bertadam"] == pytest.approx((32 * read + 12 * write) / (20 * read + 12 * write))
    assert fit["lamb_over_bertadam_90"] == pytest.approx([fit["lamb_over_bertadam"]] * 2)
    assert fit["write_over_read_unconstrained_90"] == pytest.approx([write / read] * 2)
    assert not fit["write_cost_clamped_to_zero"]
    # times that would fit a negative write cost: the write cost is 0 and reads alone are fitted
    times = {name: [r * read * count * (0.8 if w else 1.0)] * 3 for name, (r, w) in READ_WRITE.items()}
    fit = read_write_fit(times, count, resamples=50)
    reads = [READ_WRITE[n][0] * count for n in SINGLE_PASSES]
    least_squares_read = sum(r * times[n][0] for r, n in zip(reads, SINGLE_PASSES)) / sum(r * r for r in reads)
    assert fit["write_cost_clamped_to_zero"] and fit["write_over_read_unconstrained"] < 0
    assert fit["ns_per_write_byte"] == 0.0 and fit["ns_per_read_byte"] == pytest.approx(least_squares_read * 1e9)
    assert fit["lamb_over_bertadam"] == pytest.approx(32 / 20)
    # rounds that disagree give an interval around the point
    times = {name: [seconds(name, slower=1 + 0.05 * k) for k in (0, 1, 2, 3)] for name in READ_WRITE}
    fit = read_write_fit(times, count, resamples=200)
    low, high = fit["lamb_over_bertadam_90"]
    assert low <= fit["lamb_over_bertadam"] <= high


def test_scripts_warm_up_time_under_load_and_pair_by_round():
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in "ab"}
    times, load = harness.timed_under_load(steps, 3, warmup=2)
    assert calls[:4] == ["a", "a", "b", "b"] and len(calls) == 4 + 6  # warm-up untimed, then 3 rounds
    assert {name: len(t) for name, t in times.items()} == {"a": 3, "b": 3} and "loadavg_before" in load
    summary = harness.paired_to({"ref": [1.0, 2.0, 4.0], "x": [2.0, 2.0, 12.0]}, "ref", "vs_ref")
    assert summary["x"] == {"median_ms": 2000.0, "vs_ref": 2.0}  # round ratios 2, 1, 3
    assert summary["ref"]["vs_ref"] == 1.0


def test_benchmark_scripts_share_options_and_report(tmp_path):
    args = harness.script_arguments("What it times.\n\nMore.", ["--size", "bert-tiny", "--threads", "1", "--out",
                                                                 str(tmp_path / "r.json")], reps=7)
    previous = torch.get_num_threads()
    try:
        assert (args.size, args.reps, args.threads, torch.get_num_threads()) == ("bert-tiny", 7, 1, 1)
    finally:
        torch.set_num_threads(previous)
    harness.write_script_report(args, "/somewhere/benchmarks/x.py", ["--size", "bert-tiny"], summary={"a": 1})
    report = json.loads((tmp_path / "r.json").read_text())
    assert report == {"command": "python benchmarks/x.py --size bert-tiny", "size": "bert-tiny", "threads": 1,
                      "reps": 7, "summary": {"a": 1}}
