"""`bertopt pretrain` against Hugging Face `Trainer`'s MLM recipe, tokens/s (issue 12, item 7).

Same model config (preset ``mini``: 4 layers, hidden 256, BertForMaskedLM, the same WordPiece
vocabulary), same packed 128-token sequences of the Wikipedia sample, batch 32, 2 threads:

- bertopt: ``python -m bertopt pretrain --preset mini --seq-len 128 --batch-size 32 --threads 2
  --steps N ...`` as a subprocess; steady-state tokens/s from ``<out>/metrics.jsonl`` (field
  ``tokens_per_s``, one record per ``--log-every`` steps), the windows after step ``--skip``.
- Trainer: ``BertForMaskedLM`` + ``DataCollatorForLanguageModeling(mlm_probability=0.15)`` on the
  same rows, ``TrainingArguments(per_device_train_batch_size=32, max_steps=N, bf16=..., use_cpu=True)``
  with Trainer's default optimizer (fused AdamW for torch >= 2.8), no eval, no saving, no logging,
  ``dataloader_num_workers=0``, torch threads 2, also as a subprocess; tokens/s from the time between
  the ends of steps ``--skip`` and N (a ``TrainerCallback``), so data collation, forward, backward,
  clipping and the optimizer step are all inside, as they are in bertopt's windows.

Rounds are interleaved (Trainer fp32, bertopt fp32, Trainer bf16, bertopt bf16, repeated) so that
the load of this shared machine hits all four alike; the report gives medians, the ratio of the
medians and the per-round paired ratios. bf16 for bertopt needs ``bertopt pretrain --precision``;
where the CLI does not know the flag yet the row says "not available".

    python benchmarks/trainer_mlm.py                         # 3 rounds of 50 steps, fp32 and bf16
    python benchmarks/trainer_mlm.py --rounds 5 --steps 60
    python benchmarks/trainer_mlm.py --profile               # where one step's time goes, fp32

Writes ``benchmarks/results/trainer/trainer_mlm.json`` and ``.md`` (``--profile``:
``profile.json`` / ``profile.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bertopt.cache import cache_dir

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "trainer"
PRESET, SEQ_LEN, BATCH, THREADS = "mini", 128, 32, 2
VOCAB_SIZE = 4096  # bertopt pretrain's default --vocab-size
TARGETS = {"fp32": 1.4, "bf16": 1.5}  # issue 12: bertopt / Trainer tokens/s


def prepare(cache_dir: Path):
    from bertopt.train.data import prepare_data, wiki_corpus

    return prepare_data(wiki_corpus(), cache_dir, vocab_size=VOCAB_SIZE, seq_len=SEQ_LEN, log=lambda m: None)


# --- machine load -------------------------------------------------------------------------------


class Load:
    """bertopt.bench.harness.LoadMonitor around one measurement (a child run, or --profile's own
    work; both count as ours), its fields named as this script's results have them."""

    def __init__(self):
        from bertopt.bench.harness import LoadMonitor

        self.monitor = LoadMonitor()

    def stop(self) -> dict:
        load = self.monitor.stop()
        before, after = load["loadavg_before"], load["loadavg_after"]
        return {"wall_s": round(load["wall_seconds"], 1), "loadavg_before": before[0] if before else None,
                "loadavg_after": after[0] if after else None,
                "other_processes_cpu_share": load["other_processes_cpu_share"]}


# --- the two contenders --------------------------------------------------------------------------


def hf_tokenizer(tokenizer_file: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)


class RowsDataset:
    """The packed rows as the ``{"input_ids": ...}`` examples Trainer's collators expect."""

    def __init__(self, rows):
        import numpy as np

        self.rows = np.asarray(rows, dtype=np.int64)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        import torch

        return {"input_ids": torch.from_numpy(self.rows[i])}


def trainer_worker(args) -> None:
    """One Trainer run (in its own process); writes its timings to ``args.json``."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch

    torch.set_num_threads(THREADS)
    from transformers import (BertForMaskedLM, DataCollatorForLanguageModeling, Trainer, TrainerCallback,
                              TrainingArguments)
    from transformers.utils import logging as hf_logging

    from bertopt.train.presets import build_config

    hf_logging.set_verbosity_error()
    prepared = prepare(args.cache_dir)
    config = build_config(preset=PRESET, config_file=None, vocab_size=prepared.vocab_size)
    torch.manual_seed(0)
    model = BertForMaskedLM(config)
    collator = DataCollatorForLanguageModeling(tokenizer=hf_tokenizer(prepared.tokenizer_file), mlm_probability=0.15)

    marks: dict[str, list[float]] = {"begin": [], "pre_optimizer": [], "optimizer": [], "end": []}

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            marks["begin"].append(time.perf_counter())

        def on_pre_optimizer_step(self, *a, **k):
            marks["pre_optimizer"].append(time.perf_counter())

        def on_optimizer_step(self, *a, **k):
            marks["optimizer"].append(time.perf_counter())

        def on_step_end(self, *a, **k):
            marks["end"].append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        training_args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=BATCH, max_steps=args.steps, learning_rate=1e-3,
            warmup_steps=0.1, weight_decay=0.01, bf16=args.precision == "bf16", use_cpu=True,
            eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
            dataloader_num_workers=0, dataloader_pin_memory=False, seed=0)
        trainer = Trainer(model=model, args=training_args, train_dataset=RowsDataset(prepared.train),
                          data_collator=collator, callbacks=[Clock()])
        trainer.train()
        optimizer = type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer)
        defaults = getattr(trainer.optimizer, "defaults", {})
    end, skip = marks["end"], args.skip
    steps = len(end) - skip
    seconds = end[-1] - end[skip - 1]

    def per_step(a, b, offset=0):  # median seconds between two marks of the same measured step
        return statistics.median(marks[b][i] - marks[a][i - offset] for i in range(skip, len(end)))

    result = {
        "tokens_per_s": steps * BATCH * SEQ_LEN / seconds, "steps_timed": steps, "seconds_timed": seconds,
        "median_step_s": {
            "data_and_callbacks": statistics.median(marks["begin"][i] - end[i - 1] for i in range(skip, len(end))),
            "forward_backward_clip": per_step("begin", "pre_optimizer"),
            "optimizer": per_step("pre_optimizer", "optimizer"),
            "after_optimizer": per_step("optimizer", "end"),
        },
        "optimizer": f"{optimizer.__module__}.{optimizer.__name__} (optim={training_args.optim}, "
                     f"fused={defaults.get('fused')}, foreach={defaults.get('foreach')})",
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "threads": torch.get_num_threads(),
    }
    Path(args.json).write_text(json.dumps(result, indent=1))


def run_trainer(precision: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        steps, skip = args.schedule[precision]
        command = [sys.executable, __file__, "--worker", "trainer", "--precision", precision, "--steps",
                   str(steps), "--skip", str(skip), "--cache-dir", str(args.cache_dir), "--json", str(out)]
        load = Load()
        proc = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, cwd=REPO)
        info = load.stop()
        if proc.returncode != 0:
            return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}", **info}
        return {**json.loads(out.read_text()), **info}


def bertopt_command(precision: str, steps: int, skip: int, out: Path, cache_dir: Path) -> list[str]:
    command = [sys.executable, "-m", "bertopt", "pretrain", "--preset", PRESET, "--seq-len", str(SEQ_LEN),
               "--batch-size", str(BATCH), "--threads", str(THREADS), "--steps", str(steps), "--eval-every", "0",
               "--save-every", "0", "--eval-sequences", "32", "--no-progress", "--out", str(out),
               "--cache-dir", str(cache_dir)]
    if skip != 10:  # windows must end at the last untimed step (10 is the default --log-every)
        command += ["--log-every", str(skip)]
    if precision != "fp32":
        command += ["--precision", precision]
    return command


def run_bertopt(precision: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        steps, skip = args.schedule[precision]
        load = Load()
        proc = subprocess.run(bertopt_command(precision, steps, skip, out, args.cache_dir), capture_output=True,
                              text=True, timeout=args.timeout, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        info = load.stop()
        if proc.returncode != 0:
            if precision != "fp32" and "--precision" in proc.stderr:
                return {"error": "not available: this bertopt pretrain does not accept --precision", **info}
            return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}", **info}
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        tokens = seconds = 0.0
        previous = 0
        for record in records:
            if "tokens_per_s" not in record:  # e.g. an evaluation-only record
                continue
            window_tokens = (record["step"] - previous) * BATCH * SEQ_LEN
            if previous >= skip:
                tokens += window_tokens
                seconds += window_tokens / record["tokens_per_s"]
            previous = record["step"]
        if seconds == 0:
            return {"error": f"no metrics window after step {skip} in {len(records)} records", **info}
        return {"tokens_per_s": tokens / seconds, "steps_timed": int(tokens // (BATCH * SEQ_LEN)),
                "seconds_timed": seconds, "window_tokens_per_s": [r.get("tokens_per_s") for r in records], **info}


# --- the benchmark ------------------------------------------------------------------------------


def versions() -> dict:
    import numpy
    import tokenizers
    import torch
    import transformers

    try:
        import accelerate
        accelerate_version = accelerate.__version__
    except ImportError:
        accelerate_version = None
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=REPO).stdout.strip()
    return {"torch": torch.__version__, "transformers": transformers.__version__, "accelerate": accelerate_version,
            "tokenizers": tokenizers.__version__, "numpy": numpy.__version__, "python": platform.python_version(),
            "git_commit": commit, "git_dirty": bool(dirty), "cpus": os.cpu_count(), "machine": platform.machine()}


def median_or_none(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def benchmark(args) -> dict:
    prepared = prepare(args.cache_dir)  # build the shared cache once, outside any timing
    rounds = []
    for r in range(args.rounds):
        row = {}
        for precision in args.precisions:
            for name, runner in (("trainer", run_trainer), ("bertopt", run_bertopt)):
                result = runner(precision, args)
                row[f"{name}_{precision}"] = result
                shown = (f"{result['tokens_per_s']:,.0f} tokens/s" if "tokens_per_s" in result
                         else result["error"].splitlines()[0][:200])
                print(f"round {r + 1}/{args.rounds}  {name:8s} {precision}: {shown}  "
                      f"(load {result['loadavg_before']:.2f}, wall {result['wall_s']:.0f} s)", flush=True)
        rounds.append(row)

    summary = {}
    for precision in args.precisions:
        tr = [rd[f"trainer_{precision}"].get("tokens_per_s") for rd in rounds]
        bo = [rd[f"bertopt_{precision}"].get("tokens_per_s") for rd in rounds]
        paired = [b / t for b, t in zip(bo, tr) if b and t]
        med_t, med_b = median_or_none(tr), median_or_none(bo)
        summary[precision] = {
            "trainer_median": med_t, "bertopt_median": med_b,
            "ratio_of_medians": med_b / med_t if med_b and med_t else None,
            "paired_ratios": paired, "paired_ratio_median": median_or_none(paired),
            "target": TARGETS.get(precision),
            "bertopt_error": None if med_b else rounds[0][f"bertopt_{precision}"].get("error"),
            "trainer_error": None if med_t else rounds[0][f"trainer_{precision}"].get("error"),
        }
    loads = [run["loadavg_before"] for rd in rounds for run in rd.values()]
    others = [run["other_processes_cpu_share"] for rd in rounds for run in rd.values()
              if run.get("other_processes_cpu_share") is not None]
    example_trainer = next((rd[f"trainer_{p}"] for rd in rounds for p in args.precisions
                            if "optimizer" in rd[f"trainer_{p}"]), {})
    return {
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO), *args.argv]),
        "bertopt_command": " ".join(shlex.quote(a) for a in bertopt_command("fp32", *args.schedule["fp32"],
                                                                           Path("<tmp>"), Path("<cache>"))),
        "setup": {"preset": PRESET, "seq_len": SEQ_LEN, "batch_size": BATCH, "threads": THREADS,
                  "vocab_size": prepared.vocab_size,
                  "timed_steps": {p: f"{skip + 1}..{steps} of {steps}" for p, (steps, skip) in args.schedule.items()
                                  if p in args.precisions},
                  "rounds": args.rounds, "order": [f"{n} {p}" for p in args.precisions for n in ("trainer", "bertopt")],
                  "train_sequences": len(prepared.train), "trainer_optimizer": example_trainer.get("optimizer"),
                  "trainer_attn_implementation": example_trainer.get("attn_implementation")},
        "versions": versions(),
        "load": {"loadavg_1min_median": median_or_none(loads), "loadavg_1min_range": [min(loads), max(loads)],
                 "other_processes_cpu_share_median": median_or_none(others)},
        "summary": summary,
        "rounds": rounds,
    }


def _fmt(x, spec=",.0f"):
    return "n/a" if x is None else format(x, spec)


def write_markdown(result: dict, path: Path) -> None:
    s, v, load = result["setup"], result["versions"], result["load"]
    lines = [
        "# bertopt pretrain vs Hugging Face Trainer (MLM), tokens/s",
        "",
        f"BERT-{s['preset']} ({s['vocab_size']}-token WordPiece vocabulary), {s['seq_len']}-token packed rows of the "
        f"Wikipedia sample, batch {s['batch_size']}, {s['threads']} threads; timed steps per run: "
        + ", ".join(f"{p} {t}" for p, t in s["timed_steps"].items())
        + f"; {s['rounds']} interleaved rounds ({', '.join(s['order'])}).",
        f"Trainer: BertForMaskedLM + DataCollatorForLanguageModeling(mlm_probability=0.15), optimizer "
        f"{s['trainer_optimizer']}, attention {s['trainer_attn_implementation']}.",
        "",
        "| precision | Trainer tokens/s (median) | bertopt tokens/s (median) | ratio of medians | paired ratios (per round) | target |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for precision, row in result["summary"].items():
        bertopt = _fmt(row["bertopt_median"]) if row["bertopt_median"] else (row["bertopt_error"] or "n/a").split(":")[0]
        ratio = f"{row['ratio_of_medians']:.2f}x" if row["ratio_of_medians"] else "n/a"
        paired = ", ".join(f"{x:.2f}" for x in row["paired_ratios"]) or "n/a"
        lines.append(f"| {precision} | {_fmt(row['trainer_median'])} | {bertopt} | {ratio} | {paired} | "
                     f">= {row['target']}x |")
    lines += ["", "Per run (tokens/s; 1-minute load average before the run):", "",
              "| round | " + " | ".join(result["rounds"][0]) + " |",
              "|---|" + "---:|" * len(result["rounds"][0])]
    for i, rd in enumerate(result["rounds"]):
        cells = [(f"{_fmt(run.get('tokens_per_s'))} (load {run['loadavg_before']:.1f})" if run.get("tokens_per_s")
                  else "n/a") for run in rd.values()]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    lines += ["",
              f"Load: 1-minute load average median {load['loadavg_1min_median']:.2f} "
              f"(range {load['loadavg_1min_range'][0]:.2f}-{load['loadavg_1min_range'][1]:.2f}) on {v['cpus']} CPUs; "
              f"other processes used a median {_fmt(load['other_processes_cpu_share_median'], '.0%')} "
              "of the CPUs during the runs (shared machine).",
              f"Versions: torch {v['torch']}, transformers {v['transformers']}, accelerate {v['accelerate']}, "
              f"tokenizers {v['tokenizers']}, numpy {v['numpy']}, Python {v['python']}; git {v['git_commit'][:12]}"
              + (" (with uncommitted changes)" if v["git_dirty"] else "") + ".",
              "", "Command:", "", f"    {result['command']}", "",
              "bertopt runs (fp32; bf16 adds `--precision bf16`):", "", f"    {result['bertopt_command']}", ""]
    path.write_text("\n".join(lines))


# --- where the time goes: one step of each, by phase -----------------------------------------------


def profile(args) -> dict:
    """Median seconds per phase of a bertopt step and a Trainer-recipe step, fp32, interleaved step by
    step in one process: data (masking / collator), forward split into encoder and MLM head + loss,
    backward split the same way (a hook on the encoder output marks where the head's backward
    ends), optimizer (bertopt: BertAdam, which clips inside; Trainer recipe: torch's
    clip_grad_norm_ + the fused AdamW Trainer picks)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import BertForMaskedLM, DataCollatorForLanguageModeling

    import bertopt
    from bertopt.train.data import mask_tokens
    from bertopt.train.presets import build_config
    from bertopt.train.pretrain import masked_lm_objective

    torch.set_num_threads(THREADS)
    prepared = prepare(args.cache_dir)
    config = build_config(preset=PRESET, config_file=None, vocab_size=prepared.vocab_size)
    rows = np.asarray(prepared.train, dtype=np.int64)
    steps = args.profile_steps
    torch.manual_seed(0)
    ours = BertForMaskedLM(config)
    torch.manual_seed(0)
    theirs = BertForMaskedLM(config)
    ours_opt, _ = bertopt.create_optimizer(ours, 1e-3, 1000, 100)
    objective = masked_lm_objective(ours)  # bertopt pretrain's forward: last layer at masked positions
    theirs_opt = torch.optim.AdamW(theirs.parameters(), lr=1e-3, weight_decay=0.01, fused=True)
    collator = DataCollatorForLanguageModeling(tokenizer=hf_tokenizer(prepared.tokenizer_file), mlm_probability=0.15)
    dataset = RowsDataset(rows)
    rng = np.random.default_rng(0)
    phases = ("data", "forward_encoder", "forward_head_loss", "backward_head_loss", "backward_encoder", "clip",
              "optimizer")
    times = {name: {p: [] for p in phases} for name in ("bertopt", "trainer_recipe")}

    def bertopt_step(index):
        t0 = time.perf_counter()
        m = mask_tokens(rows[index], np.random.default_rng([0, len(times["bertopt"]["data"])]),
                        vocab_size=prepared.vocab_size)
        input_ids, r, c, labels = (torch.from_numpy(x) for x in (m.input_ids, m.rows, m.cols, m.labels))
        t1 = time.perf_counter()
        hidden = objective.encode_at(input_ids, r, c)  # the masked positions' final hidden states
        t2 = time.perf_counter()
        logits = ours.cls(hidden)
        loss = F.cross_entropy(logits.float(), labels, reduction="sum") / len(labels)
        (logits.argmax(-1) == labels).sum().item()  # bertopt's accuracy, as in its objective
        t3 = time.perf_counter()
        mark = []
        hidden.register_hook(lambda g: mark.append(time.perf_counter()))
        loss.backward()
        t4 = time.perf_counter()
        ours_opt.step()  # the global-norm clip is inside BertAdam's step
        ours_opt.zero_grad(set_to_none=True)
        t5 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2, mark[0] - t3, t4 - mark[0], 0.0, t5 - t4

    def trainer_step(index):
        t0 = time.perf_counter()
        batch = collator([dataset[i] for i in index])
        t1 = time.perf_counter()
        out = theirs.bert(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
        hidden = out.last_hidden_state
        t2 = time.perf_counter()
        logits = theirs.cls(hidden)  # BertForMaskedLM.forward: the head on every position
        loss = F.cross_entropy(logits.view(-1, config.vocab_size), batch["labels"].view(-1))
        t3 = time.perf_counter()
        mark = []
        hidden.register_hook(lambda g: mark.append(time.perf_counter()))
        loss.backward()
        t4 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
        t5 = time.perf_counter()
        theirs_opt.step()
        theirs_opt.zero_grad(set_to_none=True)
        t6 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2, mark[0] - t3, t4 - mark[0], t5 - t4, t6 - t5

    ours.train()
    theirs.train()
    load = Load()
    for step in range(args.profile_warmup + steps):
        index = rng.integers(0, len(rows), BATCH)
        for name, fn in (("bertopt", bertopt_step), ("trainer_recipe", trainer_step))[:: 1 if step % 2 else -1]:
            parts = fn(index)
            if step >= args.profile_warmup:
                for p, t in zip(phases, parts):
                    times[name][p].append(t)
    medians = {name: {p: statistics.median(v) for p, v in per.items()} for name, per in times.items()}
    for per in medians.values():
        per["total"] = sum(per.values())
    return {"command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO), *args.argv]),
            "steps_timed": steps, "warmup_steps": args.profile_warmup, "threads": THREADS,
            "median_seconds": medians, "versions": versions(), "load": load.stop(),
            "positions_through_head": {"bertopt": "masked only (~15%, 19 of 126 per row)",
                                       "trainer_recipe": f"all {BATCH * SEQ_LEN}"}}


def write_profile_markdown(result: dict, path: Path) -> None:
    m = result["median_seconds"]
    labels = {"data": "data (bertopt mask_tokens / DataCollatorForLanguageModeling)",
              "forward_encoder": "forward: encoder (embeddings + 4 layers)",
              "forward_head_loss": "forward: MLM head + loss",
              "backward_head_loss": "backward: MLM head + loss",
              "backward_encoder": "backward: encoder",
              "clip": "clip (recipe: torch clip_grad_norm_; bertopt: inside BertAdam's step)",
              "optimizer": "optimizer step + zero_grad (bertopt: BertAdam incl. clip; recipe: fused AdamW)",
              "total": "total"}
    lines = ["# Where one BERT-mini fp32 step's time goes: bertopt vs the Trainer recipe", "",
             f"Batch {BATCH} x {SEQ_LEN}, {THREADS} threads; median over {result['steps_timed']} steps after "
             f"{result['warmup_steps']} warm-up steps, the two recipes alternating step by step in one process "
             "(same model config and weights at the start). bertopt's step is its objective's: the last layer "
             "and the MLM head at the masked positions only. The Trainer recipe is what Trainer runs per step, "
             "written out: collator, BertForMaskedLM's forward (MLM head on every position), backward, "
             "torch clip_grad_norm_, fused AdamW (Trainer's own bookkeeping is not included here; "
             "the tokens/s table includes it).", "",
             "| phase | bertopt ms | Trainer recipe ms | difference ms |", "|---|---:|---:|---:|"]
    for phase, label in labels.items():
        a, b = m["bertopt"][phase] * 1e3, m["trainer_recipe"][phase] * 1e3
        lines.append(f"| {label} | {a:.1f} | {b:.1f} | {b - a:+.1f} |")
    load = result["load"]
    lines += ["", f"Load average before/after: {load['loadavg_before']:.2f} / {load['loadavg_after']:.2f}; "
              f"other processes' CPU share {load['other_processes_cpu_share']}.",
              f"Versions: torch {result['versions']['torch']}, transformers {result['versions']['transformers']}; "
              f"git {result['versions']['git_commit'][:12]}.", "", "Command:", "", f"    {result['command']}", ""]
    path.write_text("\n".join(lines))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps per run (default: 50)")
    parser.add_argument("--skip", type=int, default=10, help="warm-up steps not timed (default: 10)")
    parser.add_argument("--bf16-steps", type=int, default=None,
                        help="steps per bf16 run (default: --steps; bf16 matmuls are slow on CPUs without bf16 units)")
    parser.add_argument("--bf16-skip", type=int, default=None, help="warm-up steps of bf16 runs (default: --skip)")
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    # bertopt pretrain's own default cache, so the benchmark reuses (or builds once) its data
    parser.add_argument("--cache-dir", type=Path, default=cache_dir("pretrain"))
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results directory (default: {RESULTS.relative_to(REPO)})")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one run may take (default: 900)")
    parser.add_argument("--profile", action="store_true", help="time the phases of one step of each instead")
    parser.add_argument("--profile-steps", type=int, default=20)
    parser.add_argument("--profile-warmup", type=int, default=5)
    parser.add_argument("--worker", choices=("trainer",), help=argparse.SUPPRESS)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.schedule = {"fp32": (args.steps, args.skip),
                     "bf16": (args.bf16_steps or args.steps, args.bf16_skip or args.skip)}
    if args.worker:
        args.schedule[args.precision] = (args.steps, args.skip)
    for steps, skip in args.schedule.values():
        if not 0 < skip < steps or steps % skip:
            parser.error(f"warm-up steps ({skip}) must be positive and divide the steps ({steps}): "
                         "bertopt's metrics windows (--log-every) must end at the last untimed step")
    if args.worker == "trainer":
        return trainer_worker(args)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.profile:
        result = profile(args)
        (args.out / "profile.json").write_text(json.dumps(result, indent=1) + "\n")
        write_profile_markdown(result, args.out / "profile.md")
        print((args.out / "profile.md").read_text())
        return
    result = benchmark(args)
    (args.out / "trainer_mlm.json").write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(result, args.out / "trainer_mlm.md")
    print((args.out / "trainer_mlm.md").read_text())


if __name__ == "__main__":
    main()
