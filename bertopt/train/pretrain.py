"""`bertopt pretrain`: masked-language-model pretraining of a BERT with BERT's optimizer.

With no arguments (``make run``) it trains a small BERT on the English Wikipedia sample that ships
in the gensim wheel: a WordPiece tokenizer is trained on the corpus (cached), the text is packed
into sequences (cached), 15% of tokens are masked as in BERT, and BertAdam with Google's
warmup/decay schedule trains for a few minutes on two CPU cores. Outputs in ``--out``:
metrics.jsonl, summary.json, loss.png, lr.png, checkpoints/ and model/ (a Hugging Face model
directory with the tokenizer, which ``bertopt finetune --model`` and ``--from`` accept).

``--from MODEL`` continues pretraining a published BERT or a finished run instead (model, size and
tokenizer from MODEL, nothing trained before the first step; :mod:`bertopt.train.published`).

This module supplies the task, the model and its export (:func:`build_job`); the command skeleton
(:mod:`bertopt.train.command`) does the rest. Multi-process: ``torchrun --nproc_per_node=N -m
bertopt pretrain ...`` (DDP; ``--fsdp`` for FSDP2); ``--batch-size`` is the global batch.
"""

from __future__ import annotations

from pathlib import Path

from bertopt import cache
from bertopt.errors import UsageError
from bertopt.train.config import PretrainConfig

HELP = "pretrain a BERT masked language model (default: a small BERT on a Wikipedia sample, ~3 min on 2 CPUs)"

# settings a checkpoint must share with the run that resumes it (not the number of processes,
# micro-batches or the precision: a run may continue with others)
RESUME_MUST_MATCH = ("model_config", "corpus_fingerprint", "vocab_size", "lowercase", "seq_len", "steps",
                     "optimizer", "lr", "batch_size", "warmup_proportion", "warmup_steps", "schedule_style",
                     "weight_decay", "weight_decay_mode", "bias_correction", "max_grad_norm", "seed", "mask_prob",
                     "whole_word_masking", "from_model", "from_model_sha256")


def default_cache_dir() -> Path:
    return cache.cache_dir("pretrain")


# --- the objective ----------------------------------------------------------------------------


def masked_lm_objective(mlm):
    """A module with the same parameter names as ``mlm`` (a BertForMaskedLM) whose forward computes
    the MLM loss at the masked positions only. Only their outputs are used, so the last layer runs
    its queries, attention output and feed-forward at those positions alone (keys and values still
    come from every token), and the prediction head (vocabulary projection) too: the same loss as
    the full forward (``tests/train/test_pretrain_objective.py``) for about 30% of the last layer's
    matrix work at 15% masking (keys and values, 2/12 of it, at every token; the rest at 15%)."""
    import torch
    import torch.nn.functional as F

    from bertopt.train.last_layer import before_last_layer, last_layer_at, prunable

    class MaskedLMObjective(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = mlm.bert  # same submodules: names (bert.*, cls.*) and tied weights preserved
            self.cls = mlm.cls

        def forward(self, input_ids, rows, cols, labels):
            hidden = self.encode_at(input_ids, rows, cols)
            logits = self.cls(hidden)
            loss_sum = F.cross_entropy(logits.float(), labels, reduction="sum")
            correct = (logits.argmax(dim=-1) == labels).sum()
            return loss_sum, correct

        def encode_at(self, input_ids, rows, cols):
            """The encoder's last hidden states at (rows, cols): full rows, no attention mask."""
            if not prunable(self.bert):
                return self.bert(input_ids=input_ids).last_hidden_state[rows, cols]
            return last_layer_at(self.bert.encoder.layer[-1], before_last_layer(self.bert, input_ids), rows, cols)

    return MaskedLMObjective()


class MaskedLMTask:
    """Batches of step s: global batch rows from an epoch-shuffled order, masked with a generator
    seeded by (seed, s) over the whole global batch, then this rank's share (and, for gradient
    accumulation, micro-batches of it). So the masks, and hence the losses, do not depend on the
    number of processes or micro-batches, and resuming replays them."""

    def __init__(self, train, eval_rows, *, vocab_size, batch_size, mask_prob, seed, ctx, word_start=None,
                 special_ids=None):
        import numpy as np

        from bertopt.train import data as data_mod
        from bertopt.train.data import mask_tokens
        from bertopt.train.sampler import EpochBatchSampler

        self.train = train
        self.vocab_size = vocab_size
        self.mask_prob = mask_prob
        self.seed = seed
        self.ctx = ctx
        self.word_start = word_start  # whole-word masking: token id -> begins a word
        self.special_ids = special_ids or data_mod.SpecialIds()  # a published tokenizer's are not the first ids
        self.sampler = EpochBatchSampler(len(train), batch_size, seed=seed)  # global order
        self.share = batch_size // ctx.world_size
        eval_masked = mask_tokens(np.asarray(eval_rows), np.random.default_rng([seed, 2**31 - 1]),
                                  **self._mask_options())
        n = len(eval_masked.input_ids)
        self.eval_batches = [_rows(eval_masked, lo, min(n, lo + 64)) for lo in range(0, n, 64)]

    def _mask_options(self) -> dict:
        options = {"vocab_size": self.vocab_size, "mask_prob": self.mask_prob,
                   "special_ids": self.special_ids.all(), "mask_id": self.special_ids.mask}
        if self.word_start is not None:
            options["word_start"] = self.word_start
        return options

    def batch(self, step):
        import numpy as np

        from bertopt.train.data import mask_tokens

        rows = np.asarray(self.train[self.sampler.global_indices(step)])
        masked = mask_tokens(rows, np.random.default_rng([self.seed, step]), **self._mask_options())
        lo = self.ctx.rank * self.share
        return _rows(masked, lo, lo + self.share)

    @staticmethod
    def split(batch, parts):
        """``parts`` micro-batches of equal numbers of sequences (for --grad-accum-steps)."""
        size = len(batch.input_ids) // parts
        return [_rows(batch, lo, lo + size) for lo in range(0, size * parts, size)]

    def run_model(self, model, batch):
        """``(loss_sum, correct)`` of ``model`` on a MaskedBatch."""
        import torch

        input_ids, rows, cols, labels = (torch.from_numpy(a).to(self.ctx.device)
                                         for a in (batch.input_ids, batch.rows, batch.cols, batch.labels))
        return model(input_ids, rows, cols, labels)

    def forward(self, model, batch):
        from bertopt.train.job import StepOutput

        loss_sum, correct = self.run_model(model, batch)
        return StepOutput(loss_sum, count=len(batch.labels), tokens=batch.input_ids.size,
                          sums={"accuracy": correct.item()})

    def evaluate(self, model):
        loss_sum = correct = count = 0.0
        for batch in self.eval_batches:
            batch_loss, batch_correct = self.run_model(model, batch)
            loss_sum += float(batch_loss)
            correct += float(batch_correct)
            count += len(batch.labels)
        return {"eval_loss": loss_sum / count, "eval_accuracy": correct / count}

    def data_position(self, step):
        return self.sampler.position(step)


def _rows(masked, lo: int, hi: int):
    """Sequences ``lo:hi`` of a MaskedBatch, with their selected positions (row numbers rebased)."""
    from bertopt.train.data import MaskedBatch

    keep = (masked.rows >= lo) & (masked.rows < hi)
    return MaskedBatch(input_ids=masked.input_ids[lo:hi], rows=masked.rows[keep] - lo, cols=masked.cols[keep],
                       labels=masked.labels[keep])


# --- the job --------------------------------------------------------------------------------


def build_job(config: PretrainConfig, ctx, log):
    """The data (rank 0 builds the cache, the others read it), the model, the task and the export."""
    import torch

    from bertopt.train import data as data_mod
    from bertopt.train.checkpoint import ensure_writable_dir
    from bertopt.train.job import Job
    from bertopt.train.presets import build_config, config_from_file

    if config.data is not None:  # pretraining shards: BERT's pairs, masks and loss
        from bertopt.train.shard_pretrain import build_shard_job

        return build_shard_job(config, ctx, log)
    published = None
    if config.from_model is not None:  # its checks before the data preparation
        from bertopt.train.published import read_model

        published = read_model(config.from_model, seq_len=config.seq_len)
    elif config.config_file is not None:
        config_from_file(config.config_file, vocab_size=config.vocab_size)  # its errors before the data
    cache_dir = config.cache_dir or default_cache_dir()
    if ctx.is_main:
        ensure_writable_dir(cache_dir, "--cache-dir")
    corpus = data_mod.text_corpus(config.corpus, line_per_document=config.line_per_document) if config.corpus \
        else data_mod.wiki_corpus()
    prepared = None
    for building in (True, False):  # rank 0 first, then the others from its cache
        if ctx.is_main == building:
            tokenizer_source = {"vocab_size": config.vocab_size, "lowercase": config.lowercase} if published is None \
                else {"tokenizer": published.backend, "special_ids": published.special_ids,
                      "lowercase": published.lowercase}
            prepared = data_mod.prepare_data(corpus, cache_dir, seq_len=config.seq_len,
                                             log=log if building else (lambda m: None), **tokenizer_source)
        ctx.barrier()
    train_rows, eval_rows = prepared.train, prepared.eval
    if len(eval_rows) == 0:  # too few documents to hold one out: hold out the end of the stream
        n_eval = max(1, len(train_rows) // 20)
        train_rows, eval_rows = train_rows[:-n_eval], train_rows[-n_eval:]
        log(f"note: no held-out document in a corpus of {prepared.stats['documents']}; "
            f"evaluating on the last {n_eval} training-stream sequences, which are not trained on")
    batch_size = config.run.batch_size
    if len(train_rows) < batch_size:
        raise data_mod.CorpusError(
            f"the corpus gives {len(train_rows)} training sequences of {config.seq_len} tokens, fewer than one "
            f"batch (--batch-size {batch_size}); use a bigger corpus, a smaller --batch-size or --seq-len")
    eval_rows = eval_rows[:config.eval_sequences]

    torch.manual_seed(config.run.seed)  # a new model's (or a missing head's) initialisation
    tokenizer = prepared.load_tokenizer()
    head_initialised: list[str] = []
    if published is not None:
        from bertopt.train.published import load_masked_lm

        mlm, head_initialised = load_masked_lm(published, dropout=config.dropout)
        bert_config = mlm.config
    else:
        from transformers import BertForMaskedLM

        dropout = {} if config.dropout is None else {"hidden_dropout_prob": config.dropout,
                                                     "attention_probs_dropout_prob": config.dropout}
        bert_config = build_config(preset=None if config.config_file else config.model_name,
                                   config_file=config.config_file, vocab_size=prepared.vocab_size, **dropout)
        mlm = BertForMaskedLM(bert_config)
    if config.seq_len > bert_config.max_position_embeddings:
        raise UsageError(f"--seq-len {config.seq_len} exceeds the model's max_position_embeddings "
                         f"{bert_config.max_position_embeddings}")
    n_params = sum(p.numel() for p in mlm.parameters())
    word_start = data_mod.word_start_table(tokenizer) if config.whole_word_masking else None
    task = MaskedLMTask(train_rows, eval_rows, vocab_size=prepared.vocab_size, batch_size=batch_size,
                        mask_prob=config.mask_prob, seed=config.run.seed, ctx=ctx, word_start=word_start,
                        special_ids=prepared.special_ids)
    torch.manual_seed(config.run.seed + 1 + ctx.rank)  # dropout stream, distinct per process
    model_name = config.model_name
    model_config = bert_config.to_diff_dict() | {"vocab_size": bert_config.vocab_size}
    model_config.pop("transformers_version", None)
    model_config.pop("_name_or_path", None)
    optim = config.optim
    run_info = {
        "command": "pretrain", "model": model_name, "parameters": n_params, "model_config": model_config,
        "corpus": corpus.name, "corpus_fingerprint": corpus.fingerprint,
        "tokenizer": str(prepared.tokenizer_file), "vocab_size": prepared.vocab_size,
        "lowercase": prepared.stats.get("lowercase"), "seq_len": config.seq_len, "steps": config.steps,
        **optim.settings(), "batch_size": batch_size, "seed": config.run.seed, "mask_prob": config.mask_prob,
        "whole_word_masking": config.whole_word_masking,
        "from_model": str(published.directory) if published else None,
        "from_model_sha256": published.content_sha256 if published else None,
        "head_initialised": head_initialised if published else None,
        "grad_accum_steps": config.run.grad_accum_steps, "precision": config.run.precision,
        "fsdp": bool(config.run.fsdp and ctx.enabled), "processes": ctx.world_size,
        "train_sequences": len(train_rows), "eval_sequences": len(eval_rows),
    }
    log(f"model: BERT {model_name}, {n_params / 1e6:.2f}M parameters, vocab {prepared.vocab_size}; "
        f"{len(train_rows):,} training / {len(eval_rows)} held-out sequences of {config.seq_len} tokens; "
        f"{config.steps} steps of {batch_size} sequences, {optim.optimizer} lr {optim.lr:g} "
        f"({optim.schedule_style} schedule, warmup {optim.warmup_proportion:g})"
        + (f"; {ctx.world_size} processes ({'FSDP2' if config.run.fsdp else 'DDP'}, {ctx.backend})" if ctx.enabled else ""))

    mlm_head = {}
    if published is not None:
        whole = len(head_initialised) == sum(1 for name, _ in mlm.cls.named_parameters() if "decoder" not in name)
        lacks = "no masked-LM head (a bare BertModel)" if whole else "part of its masked-LM head missing"
        mlm_head["mlm_head"] = (f"initialised as BERT does ({published.given} has {lacks})" if head_initialised
                                else f"{published.given}'s own")
        if head_initialised:
            log(f"note: {published.given} has {lacks}; initialised it as BERT does (normal(0, "
                f"{bert_config.initializer_range:g}) dense, LayerNorm 1/0, bias 0; decoder tied to the word "
                f"embeddings): {', '.join(head_initialised)}")

    def save_tokenizer(directory: Path) -> None:
        if published is not None:  # the published files as they are: the vocabulary does not change
            published.save_tokenizer(directory)
        else:
            data_mod.save_hf_tokenizer(prepared.tokenizer_file, directory, lowercase=config.lowercase)

    def export(model_state: dict, directory: Path) -> None:
        save_model_dir(model_state, bert_config, save_tokenizer, directory)

    def report(summary: dict, out: Path) -> None:
        _print_report(summary, out, log)
        if summary.get("model_dir"):
            print_fill_mask_examples(Path(summary["model_dir"]), eval_rows, tokenizer, log,
                                     mask_id=prepared.special_ids.mask)

    return Job(model=masked_lm_objective(mlm), task=task, total_steps=config.steps,
               title=f"pretrain BERT-{model_name}", run_info=run_info, resume_must_match=RESUME_MUST_MATCH,
               export=export, shard_modules=mlm.bert.encoder.layer,
               summary={"data": prepared.stats, **mlm_head}, report=report)


def save_model_dir(model_state: dict, config, save_tokenizer, directory: Path) -> Path:
    """A Hugging Face model directory (BertForMaskedLM + tokenizer, ``save_tokenizer(directory)``)
    written into ``directory``."""
    from transformers import BertForMaskedLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = BertForMaskedLM(config)
    missing, unexpected = model.load_state_dict(model_state, strict=False)
    missing = [k for k in missing if k != "cls.predictions.decoder.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"model state does not match BertForMaskedLM: missing {missing}, unexpected {unexpected}")
    model.save_pretrained(directory)
    save_tokenizer(directory)
    return directory


def print_fill_mask_examples(model_dir: Path, eval_rows, tokenizer, log, *, mask_id: int, count: int = 5,
                             seed: int = 0) -> None:
    """A few held-out sentences with one word masked: the true word and the trained model's top 3."""
    import numpy as np
    import torch
    from transformers import BertForMaskedLM

    model = BertForMaskedLM.from_pretrained(model_dir, local_files_only=True).eval()
    rng = np.random.default_rng(seed)
    shown = 0
    log("  fill-mask examples (held-out text; true word; model's top 3):")
    for row in rng.permutation(len(eval_rows))[:50]:
        ids = np.asarray(eval_rows[row], dtype=np.int64)
        # a whole word (no ## piece before or after it) of letters, in the middle of the row
        pieces = [tokenizer.id_to_token(int(i)) for i in ids]
        choices = [j for j in range(8, len(ids) - 8)
                   if pieces[j].isalpha() and len(pieces[j]) > 2 and not pieces[j + 1].startswith("##")]
        if not choices:
            continue
        j = int(rng.choice(choices))
        masked = ids.copy()
        masked[j] = mask_id
        with torch.no_grad():
            logits = model(input_ids=torch.from_numpy(masked)[None]).logits[0, j]
        top = [tokenizer.id_to_token(int(i)) for i in logits.topk(3).indices]
        start = max(0, j - 10)
        while start < j and pieces[start].startswith("##"):  # begin the context at a whole word
            start += 1
        context = tokenizer.decode([int(i) for i in masked[start:j + 8]], skip_special_tokens=False)
        log(f"    {context.replace('[MASK]', '____')!s}\n      true: {pieces[j]:<12} model: {', '.join(top)}")
        shown += 1
        if shown == count:
            break


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
    log("  files              metrics.jsonl, summary.json, loss.png, lr.png, checkpoints/"
        + (", model/" if summary.get("model_dir") else ""))
