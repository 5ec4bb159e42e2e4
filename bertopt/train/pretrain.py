"""`bertopt pretrain`: masked-language-model pretraining of a BERT with BERT's optimizer.

With no arguments (``make run``) it trains a tiny BERT on the English Wikipedia sample that ships
in the gensim wheel: a WordPiece tokenizer is trained on the corpus (cached), the text is packed
into sequences of 64 tokens (cached), 15% of tokens are masked as in BERT, and BertAdam with
Google's warmup/decay schedule trains for a few minutes on two CPU cores. Outputs in ``--out``:
metrics.jsonl, summary.json, loss.png, lr.png, checkpoints/ and model/ (a Hugging Face model
directory with the tokenizer, which ``bertopt finetune --model`` accepts).

Multi-process: ``torchrun --nproc_per_node=N -m bertopt pretrain ...`` (DDP; ``--fsdp`` for FSDP2).
``--batch-size`` is the global batch, split evenly across processes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

HELP = "pretrain a BERT masked language model (default: tiny BERT on a Wikipedia sample, ~3 min on 2 CPUs)"

# The default run: measured on this project's 2-core machine at ~150 s wall time (held-out MLM loss
# 8.36 -> 6.37, accuracy 0 -> 0.125). Short sequences and a small vocabulary buy optimizer steps,
# and steps are what it takes to leave the unigram plateau (loss ~6.8, always guessing "the"):
# with 128-token sequences and 8192 words, 600 steps in the same time never left it.
DEFAULTS = {
    "preset": "tiny",
    "vocab_size": 4096,
    "seq_len": 64,
    "batch_size": 32,
    "steps": 1000,
    "lr": 1e-3,
}
# settings a checkpoint must share with the run that resumes it
RESUME_MUST_MATCH = ("model_config", "corpus_fingerprint", "vocab_size", "lowercase", "seq_len", "steps",
                     "optimizer", "lr", "batch_size", "warmup_proportion", "warmup_steps", "schedule_style",
                     "weight_decay", "weight_decay_mode", "bias_correction", "max_grad_norm", "seed", "mask_prob")
PLOTS = ("loss.png", "lr.png")


def _default_cache_dir() -> Path:
    if os.environ.get("BERTOPT_CACHE"):
        return Path(os.environ["BERTOPT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bertopt" / "pretrain"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from bertopt.train.optim_args import add_optimizer_arguments

    model = parser.add_argument_group("model")
    which = model.add_mutually_exclusive_group()
    which.add_argument("--preset", default=None,
                       help=f"model size: nano, tiny, mini, small, medium, base, large (default: {DEFAULTS['preset']})")
    which.add_argument("--config", type=Path, default=None, metavar="JSON",
                       help="a BertConfig JSON file instead of a preset (vocab_size is taken from the tokenizer)")
    model.add_argument("--dropout", type=float, default=None,
                       help="hidden and attention dropout (default: the preset's or config's, 0.1 in BERT)")

    data = parser.add_argument_group("data")
    data.add_argument("--corpus", nargs="+", type=Path, default=None, metavar="PATH",
                      help="text files or folders of .txt files (default: the Wikipedia sample in the gensim wheel)")
    data.add_argument("--line-per-document", action="store_true",
                      help="each line of --corpus is a document (default: blocks separated by blank lines)")
    data.add_argument("--vocab-size", type=int, default=DEFAULTS["vocab_size"],
                      help=f"WordPiece vocabulary size to train (default: {DEFAULTS['vocab_size']})")
    data.add_argument("--cased", action="store_true", help="keep case (default: lowercase, like BERT-uncased)")
    data.add_argument("--seq-len", type=int, default=DEFAULTS["seq_len"],
                      help=f"tokens per sequence (default: {DEFAULTS['seq_len']})")
    data.add_argument("--mask-prob", type=float, default=0.15, help="fraction of tokens to predict (default: 0.15)")
    data.add_argument("--eval-sequences", type=int, default=256,
                      help="held-out sequences to evaluate on (default: 256, or all there are)")
    data.add_argument("--cache-dir", type=Path, default=None,
                      help="where tokenizers and token ids are cached (default: $BERTOPT_CACHE or ~/.cache/bertopt/pretrain)")

    add_optimizer_arguments(parser, lr=DEFAULTS["lr"], batch_size=DEFAULTS["batch_size"])

    run = parser.add_argument_group("run")
    run.add_argument("--steps", type=int, default=DEFAULTS["steps"], help=f"optimizer steps (default: {DEFAULTS['steps']})")
    run.add_argument("--out", type=Path, default=Path("runs/pretrain"), help="output directory (default: runs/pretrain)")
    run.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                     help="continue from the newest valid checkpoint in <out>/checkpoints, or from CHECKPOINT")
    run.add_argument("--overwrite", action="store_true", help="replace an unfinished run in --out")
    run.add_argument("--log-every", type=int, default=10, help="steps per metrics.jsonl record (default: 10)")
    run.add_argument("--eval-every", type=int, default=100, help="evaluate every N steps; 0: only at the end (default: 100)")
    run.add_argument("--save-every", type=int, default=250, help="checkpoint every N steps; 0: only at the end (default: 250)")
    run.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints to keep; 0 keeps all (default: 2)")
    run.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 (under torchrun)")
    run.add_argument("--threads", type=int, default=0,
                     help="CPU threads per process; 0: automatic (fewer when the machine is busy)")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")


def validate_args(args: argparse.Namespace) -> None:
    """ValueError naming the flag and the allowed range, before anything expensive happens."""
    from bertopt.train.optim_args import validate_optimizer_args

    checks = [
        ("--steps", args.steps, args.steps >= 1, ">= 1"),
        ("--seq-len", args.seq_len, 8 <= args.seq_len <= 512, "between 8 and 512 (BERT's position embeddings)"),
        ("--vocab-size", args.vocab_size, 105 <= args.vocab_size <= 1_000_000, "between 105 and 1000000"),
        ("--dropout", args.dropout, args.dropout is None or 0 <= args.dropout < 1, "in [0, 1)"),
        ("--mask-prob", args.mask_prob, 0 < args.mask_prob < 1, "in (0, 1)"),
        ("--eval-sequences", args.eval_sequences, args.eval_sequences >= 1, ">= 1"),
        ("--log-every", args.log_every, args.log_every >= 1, ">= 1"),
        ("--eval-every", args.eval_every, args.eval_every >= 0, ">= 0"),
        ("--save-every", args.save_every, args.save_every >= 0, ">= 0"),
        ("--keep-checkpoints", args.keep_checkpoints, args.keep_checkpoints >= 0, ">= 0"),
    ]
    for flag, value, ok, allowed in checks:
        if not ok:
            raise ValueError(f"{flag} must be {allowed}; got {value}")
    validate_optimizer_args(args, args.steps)
    if args.resume not in (None, "auto") and not Path(args.resume).exists():
        raise ValueError(f"--resume {args.resume}: no such checkpoint file or directory; give <out>/checkpoints, "
                         "a step-*.json manifest, or --resume alone for the newest checkpoint in --out")
    # the model choice, before the (possibly long) data preparation
    from bertopt.train.presets import PRESETS, config_from_file

    if args.config is not None:
        config_from_file(args.config, vocab_size=args.vocab_size)
    elif args.preset is not None and args.preset not in PRESETS:
        raise ValueError(f"--preset must be one of {', '.join(PRESETS)}; got {args.preset!r}")


def default_args(**overrides) -> argparse.Namespace:
    """The parsed default flags with ``overrides`` (Python names: ``steps=100, lr=1e-3``), for calling
    :func:`main` in-process without building argument strings."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    unknown = set(overrides) - set(vars(args))
    if unknown:
        raise ValueError(f"unknown pretrain option(s): {', '.join(sorted(unknown))}")
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


# --- the objective ----------------------------------------------------------------------------


def masked_lm_objective(mlm):
    """A module with the same parameter names as ``mlm`` (a BertForMaskedLM) whose forward computes
    the MLM loss at the masked positions only: the encoder runs on all tokens, the prediction head
    (vocabulary projection) only on the selected ones."""
    import torch
    import torch.nn.functional as F

    class MaskedLMObjective(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = mlm.bert  # same submodules: names (bert.*, cls.*) and tied weights preserved
            self.cls = mlm.cls

        def forward(self, input_ids, rows, cols, labels):
            hidden = self.bert(input_ids=input_ids).last_hidden_state  # full rows: no attention mask
            logits = self.cls(hidden[rows, cols])
            loss_sum = F.cross_entropy(logits.float(), labels, reduction="sum")
            correct = (logits.argmax(dim=-1) == labels).sum()
            return loss_sum, correct

    return MaskedLMObjective()


class MaskedLMTask:
    """Batches of step s: global batch rows from an epoch-shuffled order, masked with a generator
    seeded by (seed, s) over the whole global batch, then this rank's share. So the masks, and
    hence the losses, do not depend on the number of processes, and resuming replays them."""

    def __init__(self, train, eval_rows, *, vocab_size, batch_size, mask_prob, seed, ctx):
        import numpy as np

        from bertopt.train.data import mask_tokens
        from bertopt.train.loop import EpochBatchSampler

        self.train = train
        self.vocab_size = vocab_size
        self.mask_prob = mask_prob
        self.seed = seed
        self.ctx = ctx
        self.sampler = EpochBatchSampler(len(train), batch_size, seed=seed)  # global order
        self.share = batch_size // ctx.world_size
        eval_masked = mask_tokens(np.asarray(eval_rows), np.random.default_rng([seed, 2**31 - 1]),
                                  vocab_size=vocab_size, mask_prob=mask_prob)
        self.eval_batches = self._split(eval_masked, 64)

    @staticmethod
    def _slice(masked, lo, hi):
        import torch

        keep = (masked.rows >= lo) & (masked.rows < hi)
        return (torch.from_numpy(masked.input_ids[lo:hi]), torch.from_numpy(masked.rows[keep] - lo),
                torch.from_numpy(masked.cols[keep]), torch.from_numpy(masked.labels[keep]))

    def _split(self, masked, size):
        n = len(masked.input_ids)
        return [self._slice(masked, lo, min(n, lo + size)) for lo in range(0, n, size)]

    def batch(self, step):
        import numpy as np

        from bertopt.train.data import mask_tokens

        rows = np.asarray(self.train[self.sampler.global_indices(step)])
        masked = mask_tokens(rows, np.random.default_rng([self.seed, step]), vocab_size=self.vocab_size,
                             mask_prob=self.mask_prob)
        lo = self.ctx.rank * self.share
        return self._slice(masked, lo, lo + self.share)

    def forward(self, model, batch):
        from bertopt.train.loop import StepOutput

        device = self.ctx.device
        input_ids, rows, cols, labels = (t.to(device) for t in batch)
        loss_sum, correct = model(input_ids, rows, cols, labels)
        return StepOutput(loss_sum, count=len(labels), tokens=input_ids.numel(), sums={"accuracy": correct.item()})

    def evaluate(self, model):
        loss_sum = correct = count = 0.0
        for batch in self.eval_batches:
            input_ids, rows, cols, labels = (t.to(self.ctx.device) for t in batch)
            batch_loss, batch_correct = model(input_ids, rows, cols, labels)
            loss_sum += float(batch_loss)
            correct += float(batch_correct)
            count += len(labels)
        return {"eval_loss": loss_sum / count, "eval_accuracy": correct / count}

    def data_position(self, step):
        return self.sampler.position(step)


# --- run ------------------------------------------------------------------------------------


class UsageError(ValueError):
    """A problem with how the command was called (exit code 2)."""


def _prepare_out_dir(out: Path, args) -> None:
    """Refuse to silently replace an unfinished run; clear a finished one for a fresh start."""
    from bertopt.train.checkpoint import latest_checkpoint

    if args.resume is not None:
        return
    latest = latest_checkpoint(out / "checkpoints")
    if latest is None:
        return
    summary_file = out / "summary.json"
    finished = False
    if summary_file.exists():
        try:
            summary = json.loads(summary_file.read_text())
            finished = summary.get("steps_completed") == summary.get("total_steps") and not summary.get("stopped_by")
        except (OSError, ValueError):
            pass
    if not finished and not args.overwrite:
        total = latest.meta.get("run", {}).get("steps", "?")
        raise UsageError(
            f"{out} holds an unfinished run (last checkpoint at step {latest.step} of {total}). "
            "Continue it with --resume, start over with --overwrite (deletes it), or choose another --out."
        )
    for name in ("checkpoints", "model"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("metrics.jsonl", "summary.json", *PLOTS):
        (out / name).unlink(missing_ok=True)


def ensure_writable_dir(path: Path, flag: str) -> None:
    """Create ``path`` if needed and prove it writable by creating and removing a file in it (more
    reliable than ``os.access``, which says yes to root on read-only or immutable directories).
    UsageError naming the flag, before any work is done."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".bertopt-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise UsageError(f"{flag} {path}: cannot write there ({reason}); choose a directory you can write to") from None


def run(args: argparse.Namespace) -> int:
    """CLI entry: :func:`main` plus one-paragraph errors and exit codes (0 done, 1 failed,
    2 bad input, 130/143 stopped by SIGINT/SIGTERM after saving a checkpoint); see bertopt.cli."""
    from bertopt.cli import run_training_command

    return run_training_command("pretrain", main, args)


def _log(ctx):
    def log(message: str) -> None:
        if ctx.is_main:
            print(message, flush=True)
    return log


def main(args: argparse.Namespace) -> dict:
    """Pretrain as the flags say; returns the summary (also in <out>/summary.json; empty on ranks
    other than 0). Raises ValueError / CorpusError for bad input, CheckpointError / TrainingError
    when training cannot go on. For in-process use: ``main(default_args(steps=100, lr=1e-3))``."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for a hub: everything here is local
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    validate_args(args)
    import torch

    from bertopt.train import data as data_mod
    from bertopt.train.distributed import choose_threads, init_distributed, teardown_distributed, wrap_model
    from bertopt.train.loop import LoopConfig, run_training
    from bertopt.train.optim_args import build_optimizer, optimizer_settings
    from bertopt.train.presets import build_config

    wall_start = time.perf_counter()
    ctx = init_distributed(args.device)
    log = _log(ctx)
    threads = choose_threads(args.threads, world_size=ctx.world_size)
    threads_before = torch.get_num_threads()  # restored at the end: main() may run inside a bigger program
    torch.set_num_threads(threads)
    try:
        if args.batch_size % ctx.world_size:
            raise UsageError(f"--batch-size {args.batch_size} must be divisible by the number of processes "
                             f"({ctx.world_size})")
        out: Path = args.out
        cache_dir = args.cache_dir or _default_cache_dir()
        if ctx.is_main:
            _prepare_out_dir(out, args)
            ensure_writable_dir(out, "--out")
            ensure_writable_dir(cache_dir, "--cache-dir")
        ctx.barrier()

        # data: rank 0 builds the cache, the others read it
        corpus = data_mod.text_corpus(args.corpus, line_per_document=args.line_per_document) if args.corpus \
            else data_mod.wiki_corpus()
        prepared = None
        if ctx.is_main:
            prepared = data_mod.prepare_data(corpus, cache_dir, vocab_size=args.vocab_size, seq_len=args.seq_len,
                                             lowercase=not args.cased, log=log)
        ctx.barrier()
        if not ctx.is_main:
            prepared = data_mod.prepare_data(corpus, cache_dir, vocab_size=args.vocab_size, seq_len=args.seq_len,
                                             lowercase=not args.cased, log=lambda m: None)
        train_rows, eval_rows = prepared.train, prepared.eval
        if len(eval_rows) == 0:  # too few documents to hold one out: hold out the end of the stream
            n_eval = max(1, len(train_rows) // 20)
            train_rows, eval_rows = train_rows[:-n_eval], train_rows[-n_eval:]
            log(f"note: no held-out document in a corpus of {prepared.stats['documents']}; "
                f"evaluating on the last {n_eval} training-stream sequences, which are not trained on")
        if len(train_rows) < args.batch_size:
            raise data_mod.CorpusError(
                f"the corpus gives {len(train_rows)} training sequences of {args.seq_len} tokens, fewer than one "
                f"batch (--batch-size {args.batch_size}); use a bigger corpus, a smaller --batch-size or --seq-len")
        eval_rows = eval_rows[:args.eval_sequences]

        # model
        dropout = {} if args.dropout is None else {"hidden_dropout_prob": args.dropout,
                                                   "attention_probs_dropout_prob": args.dropout}
        config = build_config(preset=None if args.config else (args.preset or DEFAULTS["preset"]),
                              config_file=args.config, vocab_size=prepared.vocab_size, **dropout)
        if args.seq_len > config.max_position_embeddings:
            raise UsageError(f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings "
                             f"{config.max_position_embeddings}")
        from transformers import BertForMaskedLM

        torch.manual_seed(args.seed)
        mlm = BertForMaskedLM(config)
        n_params = sum(p.numel() for p in mlm.parameters())
        objective = masked_lm_objective(mlm)
        model = wrap_model(objective, ctx, fsdp=args.fsdp, shard_modules=mlm.bert.encoder.layer)
        optimizer, scheduler = build_optimizer(model, args, args.steps)
        torch.manual_seed(args.seed + 1 + ctx.rank)  # dropout stream, distinct per process

        task = MaskedLMTask(train_rows, eval_rows, vocab_size=prepared.vocab_size, batch_size=args.batch_size,
                            mask_prob=args.mask_prob, seed=args.seed, ctx=ctx)
        model_name = args.config.name if args.config else (args.preset or DEFAULTS["preset"])
        run_info = {
            "command": "pretrain", "model": model_name, "parameters": n_params,
            "model_config": config.to_diff_dict() | {"vocab_size": config.vocab_size},
            "corpus": corpus.name, "corpus_fingerprint": corpus.fingerprint,
            "tokenizer": str(prepared.tokenizer_file), "vocab_size": prepared.vocab_size,
            "lowercase": not args.cased, "seq_len": args.seq_len, "steps": args.steps,
            **optimizer_settings(args), "mask_prob": args.mask_prob,
            "fsdp": bool(args.fsdp and ctx.enabled), "processes": ctx.world_size,
            "train_sequences": len(train_rows), "eval_sequences": len(eval_rows),
        }
        run_info["model_config"].pop("transformers_version", None)
        log(f"model: BERT {model_name}, {n_params / 1e6:.2f}M parameters, vocab {prepared.vocab_size}; "
            f"{len(train_rows):,} training / {len(eval_rows)} held-out sequences of {args.seq_len} tokens; "
            f"{args.steps} steps of {args.batch_size} sequences, {args.optimizer} lr {args.lr:g} "
            f"({args.schedule_style} schedule, warmup {args.warmup_proportion:g})"
            + f"; {threads} thread{'s' if threads > 1 else ''}"
            + (f"; {ctx.world_size} processes ({'FSDP2' if args.fsdp else 'DDP'}, {ctx.backend})" if ctx.enabled else ""))

        loop_config = LoopConfig(
            out_dir=out, total_steps=args.steps, log_every=args.log_every, eval_every=args.eval_every,
            save_every=args.save_every, keep_checkpoints=args.keep_checkpoints, resume=args.resume,
            progress=not args.no_progress, title=f"pretrain BERT-{model_name}", run_info=run_info,
            resume_must_match=RESUME_MUST_MATCH, eval_at_start=True, on_nonfinite=args.on_nonfinite)
        result = run_training(model, optimizer, scheduler, task, loop_config, ctx)

        from bertopt.train.loop import get_model_state

        model_state = get_model_state(model)  # collective under FSDP2: every rank takes part
        if ctx.is_main:
            model_dir = None
            if result.stopped_by is None:
                model_dir = save_model_dir(model_state, config, prepared.tokenizer_file, out / "model",
                                           lowercase=not args.cased)
            summary = dict(result.summary)
            summary["data"] = prepared.stats
            summary["model_dir"] = str(model_dir) if model_dir else None
            summary["wall_time_s_this_process"] = round(time.perf_counter() - wall_start, 1)
            from bertopt.train.report import write_summary

            write_summary(out / "summary.json", summary)
            _print_report(summary, out, log)
        else:
            summary = {}
        ctx.barrier()
        if result.stopped_by:
            log(f"stopped by {result.stopped_by} after step {result.step}; checkpoint saved: "
                f"{result.checkpoint}. Continue with: bertopt pretrain --resume (and the same flags)")
        return summary if ctx.is_main else {}
    finally:
        torch.set_num_threads(threads_before)
        teardown_distributed(ctx)


def save_model_dir(model_state: dict, config, tokenizer_file: Path, directory: Path, *, lowercase: bool) -> Path:
    """A Hugging Face model directory (BertForMaskedLM + tokenizer), replaced atomically."""
    from transformers import BertForMaskedLM
    from transformers.utils import logging as hf_logging

    from bertopt.train.data import save_hf_tokenizer

    hf_logging.disable_progress_bar()
    model = BertForMaskedLM(config)
    missing, unexpected = model.load_state_dict(model_state, strict=False)
    missing = [k for k in missing if k != "cls.predictions.decoder.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"model state does not match BertForMaskedLM: missing {missing}, unexpected {unexpected}")
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    save_hf_tokenizer(tokenizer_file, tmp, lowercase=lowercase)
    old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def _print_report(summary: dict, out: Path, log) -> None:
    def fmt(value, spec=".3f"):
        return format(value, spec) if isinstance(value, (int, float)) else "n/a"

    log("")
    log(f"pretraining report ({out}):")
    log(f"  steps              {summary['steps_completed']} / {summary['total_steps']}"
        + (f" (resumed from {summary['resumed_from']})" if summary.get("resumed_from") is not None else ""))
    log(f"  train MLM loss     {fmt(summary.get('first_logged_loss'))} (first log) -> "
        f"{fmt(summary.get('last_logged_loss'))} (last log)")
    if "eval_loss" in summary:
        start = (f"{fmt(summary['eval_loss_at_start'])} -> " if "eval_loss_at_start" in summary else "")
        log(f"  held-out MLM loss  {start}{fmt(summary['eval_loss'])}")
        start = (f"{fmt(summary['eval_accuracy_at_start'])} -> " if "eval_accuracy_at_start" in summary else "")
        log(f"  held-out accuracy  {start}{fmt(summary['eval_accuracy'])} (masked tokens predicted exactly)")
    log(f"  time               {fmt(summary.get('train_time_s'), '.0f')} s training, "
        f"{fmt(summary.get('wall_time_s_this_process'), '.0f')} s in total")
    log(f"  files              metrics.jsonl, summary.json, {', '.join(PLOTS)}, checkpoints/"
        + (", model/" if summary.get("model_dir") else ""))
