"""``bertopt pretrain --data SHARDS``: BERT's own pretraining, on the instances of TFRecord shards
(``bertopt create-pretraining-data`` or Google's ``create_pretraining_data.py``) with the static
masks they hold, and Google's loss (:mod:`bertopt.train.google_objective`): ``--objective mlm+nsp``
(masked-LM + next-sentence, the default when the shards have ``next_sentence_labels``) or ``mlm``
(the masked-LM term alone, Google's weighted form; the pooler and next-sentence head are frozen).

The model is a ``BertForPreTraining`` (``--preset``/``--config`` with ``--vocab-file``, the
vocabulary the shards were made with; or ``--from MODEL``, with MODEL's tokenizer, whose ids
the shards must fit) run through :class:`MlmNspObjective` (the last layer only at
the masked positions and [CLS]). A run directory written by ``bertopt import-tf`` is continued
with ``--out RUN_DIR --resume``: its checkpoint is Google's run at ``global_step`` (weights, Adam
moments, schedule), and the model's config and tokenizer are ``RUN_DIR/model``'s.

Batches (:class:`ShardTask`) are a pure function of the step: the global batch's rows (an
epoch-shuffled order, or the shards' own with ``--data-order sequential``), its totals
(:func:`batch_totals`: examples and masked-LM weight sum) taken before it is cut into ranks'
shares and micro-batches, so every split gives the one-batch loss and gradient.

What the log reports per window (the loop divides each sum by the examples): ``train_mlm_loss``
and ``train_nsp_loss`` (the two terms, adding up to ``loss``), ``train_nsp_accuracy`` per example,
and ``train_mlm_accuracy`` per masked token: each micro-batch reports its correct predictions
(weighted) times ``B / W`` of its global batch, so a step's share is its accuracy over masked
tokens, averaged over the window's steps like the loss (no change to the generic loop).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bertopt.errors import UsageError
from bertopt.train.config import PretrainConfig
from bertopt.train.google_objective import BatchTotals, MASKED_LM_EPSILON, batch_totals

# settings a checkpoint must share with the run that resumes it (as pretrain.RESUME_MUST_MATCH)
RESUME_MUST_MATCH = ("model_config", "data_fingerprint", "eval_data_fingerprint", "objective", "data_order",
                     "vocab_size", "seq_len", "steps", "optimizer", "lr", "batch_size", "warmup_proportion",
                     "warmup_steps", "schedule_style", "weight_decay", "weight_decay_mode", "bias_correction",
                     "max_grad_norm", "seed", "imported_from", "from_model_sha256")
# what `bertopt import-tf` records of Google's run, checked when its checkpoint is continued
IMPORTED_MUST_MATCH = ("imported_from", "objective", "steps", "lr", "batch_size", "warmup_steps", "optimizer",
                       "schedule_style", "weight_decay", "max_grad_norm")
EVAL_BATCH = 64
FEATURE_NAMES = ("input_ids", "input_mask", "segment_ids", "masked_lm_positions", "masked_lm_ids",
                 "masked_lm_weights", "next_sentence_labels")


@dataclass
class ShardBatch:
    features: dict[str, np.ndarray]  # the seven features of some rows
    totals: BatchTotals  # of the whole global batch these rows belong to


def _rows(shards, index) -> dict[str, np.ndarray]:
    """The seven features of rows ``index`` (labels 0 where the shards have none: MLM-only data)."""
    features = {name: getattr(shards, name)[index] for name in FEATURE_NAMES[:-1]}
    labels = shards.next_sentence_labels
    features["next_sentence_labels"] = (np.zeros(len(features["input_ids"]), np.int8) if labels is None
                                        else labels[index])
    return features


def _slice(features: dict[str, np.ndarray], lo: int, hi: int) -> dict[str, np.ndarray]:
    return {name: value[lo:hi] for name, value in features.items()}


class ShardTask:
    """The training task of ``--data``: see the module docstring. ``start_step`` is the step the
    data begins at (the imported ``global_step`` when a Google run is continued, else 0)."""

    def __init__(self, train, eval_features, *, objective: str, batch_size: int, seed: int, shuffle: bool, ctx,
                 start_step: int = 0):
        from bertopt.train.sampler import EpochBatchSampler

        self.train = train
        self.objective = objective
        self.ctx = ctx
        self.start_step = start_step
        self.sampler = EpochBatchSampler(len(train), batch_size, seed=seed, shuffle=shuffle)  # global order
        self.share = batch_size // ctx.world_size
        n = len(eval_features["input_ids"])
        self.eval_batches = [_slice(eval_features, lo, min(n, lo + EVAL_BATCH)) for lo in range(0, n, EVAL_BATCH)]

    def batch(self, step: int) -> ShardBatch:
        rows = _rows(self.train, self.sampler.global_indices(step - self.start_step))
        lo = self.ctx.rank * self.share
        return ShardBatch(_slice(rows, lo, lo + self.share), batch_totals(rows))

    @staticmethod
    def split(batch: ShardBatch, parts: int) -> list[ShardBatch]:
        """``parts`` micro-batches of equal numbers of sequences, each with the global batch's totals."""
        size = len(batch.features["input_ids"]) // parts
        return [ShardBatch(_slice(batch.features, lo, lo + size), batch.totals) for lo in range(0, size * parts, size)]

    def _terms(self, model, features):
        from bertopt.train.google_objective import features_to_tensors

        # the shards' compact int8/int32 columns as the int64 indices embeddings take
        as_int64 = {name: value if value.dtype == np.float32 else value.astype(np.int64)
                    for name, value in features.items()}
        return model(**features_to_tensors(as_int64, device=self.ctx.device))

    def forward(self, model, batch: ShardBatch):
        from bertopt.train.job import StepOutput

        terms = self._terms(model, batch.features)
        examples, weight_sum = batch.totals
        # Google's terms of the global batch, as sums over its examples (google_objective's docstring):
        # each is divided by the global count (examples) once all micro-batches are added up.
        mlm_sum = terms.masked_lm_numerator * (examples / (np.float32(weight_sum) + np.float32(MASKED_LM_EPSILON)))
        per_token = examples / weight_sum if weight_sum > 0 else 0.0  # accuracy per masked token of the step
        sums = {"mlm_loss": float(mlm_sum.detach()), "mlm_accuracy": float(terms.masked_lm_correct) * per_token}
        if self.objective == "mlm+nsp":
            loss_sum = terms.next_sentence_sum + mlm_sum
            sums |= {"nsp_loss": float(terms.next_sentence_sum.detach()),
                     "nsp_accuracy": float(terms.next_sentence_correct)}
        else:
            loss_sum = mlm_sum
        return StepOutput(loss_sum, count=terms.examples, tokens=batch.features["input_ids"].size, sums=sums)

    def evaluate(self, model) -> dict[str, float]:
        """run_pretraining.py's eval metrics: masked-LM loss and accuracy weighted by
        masked_lm_weights over all held-out slots, next-sentence loss and accuracy per example;
        eval_loss their sum (the masked-LM loss alone with --objective mlm)."""
        numerator = weights = correct = nsp_sum = nsp_correct = examples = 0.0
        for features in self.eval_batches:
            terms = self._terms(model, features)
            numerator += float(terms.masked_lm_numerator)
            weights += float(terms.masked_lm_weight_sum)
            correct += float(terms.masked_lm_correct)
            nsp_sum += float(terms.next_sentence_sum)
            nsp_correct += float(terms.next_sentence_correct)
            examples += terms.examples
        mlm_loss = numerator / weights if weights else 0.0
        result = {"eval_mlm_loss": mlm_loss, "eval_mlm_accuracy": correct / weights if weights else 0.0}
        if self.objective == "mlm+nsp":
            result |= {"eval_nsp_loss": nsp_sum / examples, "eval_nsp_accuracy": nsp_correct / examples}
        return {"eval_loss": mlm_loss + result.get("eval_nsp_loss", 0.0), **result}

    def data_position(self, step: int) -> dict:
        return self.sampler.position(step - self.start_step)


# --- the data ------------------------------------------------------------------------------------


def shard_fingerprint(files) -> str:
    """sha256 of the shards' resolved paths, sizes and modification times, in order: a resumed run
    must read the same files."""
    listing = [(str(Path(f).resolve()), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def _file_of(shards, row: int) -> str:
    return shards.files[int(np.searchsorted(shards.file_rows, row, side="right")) - 1]


def check_ids(shards, vocab_size: int, vocab_source: str) -> None:
    """UsageError naming the shard when a token id is outside the model's vocabulary or a masked
    position outside the sequence."""
    for name in ("input_ids", "masked_lm_ids"):
        values = getattr(shards, name)
        bad = np.argwhere(values >= vocab_size)
        if len(bad):
            row, col = (int(x) for x in bad[0])
            raise UsageError(
                f"{_file_of(shards, row)}: {name} holds id {int(values[row, col])} (instance {row} of --data, "
                f"{len(np.unique(bad[:, 0]))} instances in all), but {vocab_source} has {vocab_size} tokens. The "
                "shards were made with another vocabulary: give the vocab.txt they were made with (--vocab-file), "
                "or make the shards again with this one")
    positions = shards.masked_lm_positions
    if positions.size and int(positions.max()) >= shards.seq_len:
        row = int(np.argwhere(positions >= shards.seq_len)[0][0])
        raise UsageError(f"{_file_of(shards, row)}: masked_lm_positions point past the sequence of {shards.seq_len} "
                         f"tokens (instance {row}): the shard is corrupt; make it again")


def load_shards(config: PretrainConfig, log):
    """``(train, eval_features, eval_note, files_of_eval)`` of --data / --eval-data."""
    from bertopt.interop.tfrecord import read_pretraining_shards

    train = read_pretraining_shards(config.data, seq_len=config.seq_len)
    if config.eval_data is not None:
        held = read_pretraining_shards(config.eval_data, seq_len=train.seq_len, max_predictions=train.max_predictions)
        if (held.next_sentence_labels is None) != (train.next_sentence_labels is None):
            raise UsageError("--eval-data and --data differ in next_sentence_labels (one has them, the other not): "
                             "evaluate on shards made like the training shards")
        n = min(len(held), config.eval_sequences)
        note = f"evaluating on the first {n} instances of --eval-data ({len(held.files)} files)"
        return train, _rows(held, np.arange(n)), note, held
    n = min(config.eval_sequences, len(train) // 10)
    if n < 1:
        raise UsageError(f"--data holds {len(train)} instances: too few to hold out the last --eval-sequences "
                         "for evaluation; give --eval-data SHARDS, or more data")
    note = f"evaluating on the last {n} instances of --data, which are not trained on (--eval-data to choose)"
    eval_features = _rows(train, np.arange(len(train) - n, len(train)))
    train = _head(train, len(train) - n)
    return train, eval_features, note, None


def _head(shards, n: int):
    """The first ``n`` instances of ``shards`` (views)."""
    import dataclasses

    labels = shards.next_sentence_labels
    return dataclasses.replace(
        shards, **{name: getattr(shards, name)[:n] for name in FEATURE_NAMES[:-1]},
        next_sentence_labels=None if labels is None else labels[:n],
        file_rows=np.minimum(shards.file_rows, n))


# --- the model and its source --------------------------------------------------------------------


def imported_run_info(config: PretrainConfig) -> dict[str, Any] | None:
    """The run info of the checkpoint ``--resume`` continues when it comes from ``bertopt import-tf``
    (its record of Google's run), else None."""
    from bertopt.train import checkpoint as ckpt

    resume = config.run.resume
    if resume is None:
        return None
    path = config.run.out / "checkpoints" if str(resume) == "auto" else Path(resume)
    if path.is_dir():
        latest = ckpt.latest_checkpoint(path)
        meta = latest.meta if latest else {}
    elif path.suffix == ".json":
        meta = json.loads(path.read_text())
    else:  # a payload: its manifest beside it names it
        manifests = [json.loads(m.read_text()) for m in path.parent.glob("step-*.json")]
        meta = next((m for m in manifests if m.get("payload") == path.name), {})
    run = meta.get("meta", meta).get("run", {})
    return run if run.get("imported_from") else None


def _tokenizer_from_vocab(vocab_file: Path, max_length: int):
    from transformers import BertTokenizerFast

    from bertopt.interop.google import _read_vocab, guess_do_lower_case

    tokens = _read_vocab(vocab_file)
    return BertTokenizerFast(vocab={token: i for i, token in enumerate(tokens)},
                             do_lower_case=guess_do_lower_case(tokens), model_max_length=max_length)


def _same_vocabulary(vocab_file: Path, tokenizer, model) -> None:
    """UsageError unless ``vocab_file`` lists the model tokenizer's tokens, id for id."""
    from bertopt.interop.google import _read_vocab

    theirs = _read_vocab(vocab_file)
    ours = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    if theirs != ours:
        first = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
        raise UsageError(f"--vocab-file {vocab_file} ({len(theirs)} tokens) is not the vocabulary of --from {model} "
                         f"({len(ours)} tokens; they differ from id {first} on). The shards must be made with the "
                         "model's own vocab.txt: make them again with it, or leave out --vocab-file")


def build_shard_job(config: PretrainConfig, ctx, log):
    """The Job of ``pretrain --data``: shards, BertForPreTraining + MlmNspObjective, task, export."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForPreTraining

    from bertopt.train.google_objective import MlmNspObjective
    from bertopt.train.job import Job
    from bertopt.train.presets import build_config

    imported = imported_run_info(config)
    dropout = {} if config.dropout is None else {"hidden_dropout_prob": config.dropout,
                                                 "attention_probs_dropout_prob": config.dropout}
    published = None
    if config.from_model is not None and imported is None:  # a published BERT or a finished run
        from bertopt.train.published import read_model

        published = read_model(config.from_model, seq_len=config.seq_len or 0)  # the shards' length: below
        tokenizer = published.tokenizer
        bert_config = published.config
        for key, value in dropout.items():
            setattr(bert_config, key, value)
        vocab_source = f"--from {config.from_model}'s tokenizer"
        vocab_txt = published.directory / "vocab.txt"
        if config.vocab_file is not None:
            _same_vocabulary(config.vocab_file, tokenizer, config.from_model)
    elif imported is not None:  # a Google run that `bertopt import-tf` wrote into --out
        model_dir = config.run.out / "model"
        if any(value is not None for value in (config.preset, config.config_file, config.vocab_file,
                                               config.from_model)):
            raise UsageError(f"--resume continues the Google run imported into {config.run.out}: the model and its "
                             "vocabulary are its model/; leave out --preset, --config, --vocab-file and --from")
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        bert_config = BertConfig.from_pretrained(model_dir, local_files_only=True, **dropout)
        vocab_source = f"{model_dir}'s vocabulary"
        vocab_txt = model_dir / "vocab.txt"
    else:
        if config.vocab_file is None:
            raise UsageError("--data needs the vocabulary the shards were made with: give --vocab-file VOCAB (the "
                             "vocab.txt of `bertopt create-pretraining-data` or Google's script), or continue a "
                             "run imported with `bertopt import-tf` with --out RUN_DIR --resume")
        tokenizer = _tokenizer_from_vocab(config.vocab_file, 512)
        bert_config = build_config(preset=None if config.config_file else config.model_name,
                                   config_file=config.config_file, vocab_size=len(tokenizer), **dropout)
        vocab_source = f"--vocab-file {config.vocab_file}"
        vocab_txt = config.vocab_file
    train, eval_features, eval_note, held = load_shards(config, log)
    seq_len = train.seq_len
    if seq_len > bert_config.max_position_embeddings:
        raise UsageError(f"the shards hold sequences of {seq_len} tokens, more than the model's "
                         f"max_position_embeddings {bert_config.max_position_embeddings}: use a bigger model "
                         "config, or make shards with a smaller --max-seq-length")
    check_ids(train, bert_config.vocab_size, vocab_source)
    if held is not None:
        check_ids(held, bert_config.vocab_size, vocab_source)
    has_nsp = train.next_sentence_labels is not None
    objective = config.objective or ("mlm+nsp" if has_nsp else "mlm")
    if objective == "mlm+nsp" and not has_nsp:
        raise UsageError(f"--objective mlm+nsp needs next_sentence_labels, which the shards lack ({train.files[0]}): "
                         "use --objective mlm, or make sentence-pair shards with `bertopt create-pretraining-data`")
    batch_size = config.run.batch_size
    if len(train) < batch_size:
        raise UsageError(f"--data gives {len(train)} training instances, fewer than one batch (--batch-size "
                         f"{batch_size}); use a smaller --batch-size or more shards")

    torch.manual_seed(config.run.seed)  # the initialisation (replaced by the checkpoint when resuming)
    if published is not None:
        model, loading = BertForPreTraining.from_pretrained(published.directory, config=bert_config,
                                                            local_files_only=True, output_loading_info=True)
        fresh = sorted(set(loading["missing_keys"]) - {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"})
        if any(not key.startswith(("cls.", "bert.pooler.")) for key in fresh):
            raise UsageError(f"--from {config.from_model}: the weights lack encoder tensors ({fresh[0]}, ...): give a "
                             "complete BERT model directory")
        if fresh:
            log(f"note: {published.given} has no {', '.join(fresh)}; initialised as BERT initialises them")
    else:
        model = BertForPreTraining(bert_config)
    if objective == "mlm":  # Google's pooler and next-sentence head get no gradient: not trained
        for module in (model.bert.pooler, model.cls.seq_relationship):
            module.requires_grad_(False)
    start_step = int(imported.get("imported_step", 0)) if imported else 0
    task = ShardTask(train, eval_features, objective=objective, batch_size=batch_size, seed=config.run.seed,
                     shuffle=config.data_order == "shuffled", ctx=ctx, start_step=start_step)
    torch.manual_seed(config.run.seed + 1 + ctx.rank)  # dropout stream, distinct per process
    model_config = bert_config.to_diff_dict() | {"vocab_size": bert_config.vocab_size}
    for key in ("transformers_version", "_name_or_path"):
        model_config.pop(key, None)
    optim = config.optim
    model_name = f"imported into {config.run.out}" if imported else config.model_name
    source = {"from_model": str(published.directory), "from_model_sha256": published.content_sha256} \
        if published is not None else {}
    run_info = {
        "command": "pretrain", "model": model_name, "parameters": sum(p.numel() for p in model.parameters()),
        "model_config": model_config, "data": list(train.files), "data_fingerprint": shard_fingerprint(train.files),
        "eval_data_fingerprint": shard_fingerprint(held.files) if held is not None else None,
        "objective": objective, "data_order": config.data_order, "vocab_size": bert_config.vocab_size,
        "seq_len": seq_len, "max_predictions": train.max_predictions, "steps": config.steps, **optim.settings(),
        "batch_size": batch_size, "seed": config.run.seed,
        "imported_from": imported["imported_from"] if imported else None, "imported_step": start_step or None,
        "from_model": None, "from_model_sha256": None, **source,
        "grad_accum_steps": config.run.grad_accum_steps, "precision": config.run.precision,
        "fsdp": bool(config.run.fsdp and ctx.enabled), "processes": ctx.world_size,
        "train_sequences": len(train), "eval_sequences": len(eval_features["input_ids"]),
    }
    must_match = RESUME_MUST_MATCH
    if imported is not None and imported.get("data_fingerprint") is None:  # import-tf's own checkpoint
        must_match = tuple(key for key in IMPORTED_MUST_MATCH if key in imported)
    log(f"model: BERT {model_name} (BertForPreTraining), {run_info['parameters'] / 1e6:.2f}M parameters, vocab "
        f"{bert_config.vocab_size}; {len(train):,} training instances of {seq_len} tokens from {len(train.files)} "
        f"shard file{'s' if len(train.files) > 1 else ''} ({config.data_order}); objective {objective}; "
        f"{config.steps} steps of {batch_size}, {optim.optimizer} lr {optim.lr:g}"
        + (f"; {ctx.world_size} processes ({'FSDP2' if config.run.fsdp else 'DDP'}, {ctx.backend})" if ctx.enabled else ""))
    log(eval_note)

    def export(model_state: dict, directory: Path) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        exported = BertForPreTraining(bert_config)
        missing, unexpected = exported.load_state_dict(model_state, strict=False)
        missing = [k for k in missing if k != "cls.predictions.decoder.weight"]  # tied to the embeddings
        if missing or unexpected:
            raise RuntimeError(f"model state does not match BertForPreTraining: missing {missing}, unexpected "
                               f"{unexpected}")
        exported.save_pretrained(directory)
        if published is not None:  # the published files as they are: the vocabulary does not change
            published.save_tokenizer(directory)
            return
        tokenizer.save_pretrained(directory)
        if vocab_txt.is_file():  # Google's code and older readers need vocab.txt; transformers 5 omits it
            shutil.copy2(vocab_txt, Path(directory) / "vocab.txt")

    return Job(model=MlmNspObjective(model), task=task, total_steps=config.steps,
               title=f"pretrain BERT-{model_name} ({objective})", run_info=run_info, resume_must_match=must_match,
               export=export, shard_modules=model.bert.encoder.layer, plot_eval_metric="eval_mlm_accuracy",
               summary={"data": {"files": list(train.files), "instances": len(train), "seq_len": seq_len,
                                 "eval": eval_note}})
