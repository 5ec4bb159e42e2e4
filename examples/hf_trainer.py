"""Fine-tune with Hugging Face ``Trainer`` using bertopt's optimizer and schedule.

    python examples/hf_trainer.py                 # MiniLM-L6 on Rotten Tomatoes, 150 steps (minutes on 2 CPU cores)
    python examples/hf_trainer.py --tiny          # a tiny random BERT on 64 rows: a 10-second smoke run

The whole integration is one argument to ``Trainer``::

    optimizer, scheduler = bertopt.create_optimizer(model, lr, num_train_steps, num_warmup_steps)
    trainer = Trainer(model=model, args=TrainingArguments(..., max_steps=num_train_steps, max_grad_norm=0.0),
                      optimizers=(optimizer, scheduler), ...)

``max_grad_norm=0.0`` turns Trainer's own clipping off, so BertAdam's TF-style global clip (at 1.0)
is the one applied; ``num_train_steps`` must equal the number of optimizer steps Trainer will take
(``max_steps``, or epochs x batches per epoch / gradient_accumulation_steps). See docs/trainer.md.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything below loads from local files

import numpy as np
import torch
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, BertConfig,
                          BertForSequenceClassification, BertTokenizer, DataCollatorWithPadding, Trainer,
                          TrainingArguments)
from transformers.utils import logging as hf_logging

import bertopt
from bertopt.train import finetune_data as fd
from bertopt.train.finetune import default_model_dir


class EncodedDataset(torch.utils.data.Dataset):
    """Unpadded token ids + labels; DataCollatorWithPadding pads each batch to its longest row."""

    def __init__(self, input_ids, labels):
        self.input_ids, self.labels = input_ids, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        ids = self.input_ids[i]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": self.labels[i]}


def rotten_tomatoes(tokenizer, max_length: int, train_rows: int | None):
    splits = fd.load_splits()
    encoded = {name: fd.encode(tokenizer, getattr(splits, name), splits.label_to_id, max_length) for name in fd.SPLITS}
    train = encoded["train"]
    if train_rows:
        train = fd.EncodedSplit(train.input_ids[:train_rows], train.labels[:train_rows])
    return [EncodedDataset(e.input_ids, e.labels) for e in (train, encoded["dev"], encoded["test"])], splits.label_names


def tiny_setup():
    """A random 1-layer BERT and a synthetic task (is a 'good' word in the text?)."""
    import tempfile
    from pathlib import Path

    words = ["good", "great", "bad", "awful", "film", "plot", "the", "was"]
    directory = Path(tempfile.mkdtemp()) / "tiny"
    directory.mkdir()
    (directory / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words))
    tokenizer = BertTokenizer.from_pretrained(str(directory))
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=13, hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=64, num_labels=2))
    rng = np.random.default_rng(0)
    texts, labels = [], []
    for _ in range(96):
        label = int(rng.integers(2))
        filler = list(rng.choice(words[4:], size=3))
        texts.append(" ".join(filler + [str(rng.choice(words[:2] if label else words[2:4]))]))
        labels.append(label)
    ids = tokenizer(texts)["input_ids"]
    data = [EncodedDataset(ids[a:b], labels[a:b]) for a, b in ((0, 64), (64, 80), (80, 96))]
    return model, tokenizer, data


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random model + synthetic data (smoke test)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 150, tiny: 30)")
    parser.add_argument("--lr", type=float, default=None, help="peak LR (default: 1e-4, tiny: 3e-3)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-rows", type=int, default=None, help="use only the first N training rows")
    parser.add_argument("--out", default="runs/hf_trainer")
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()

    if args.tiny:
        model, tokenizer, (train, dev, test) = tiny_setup()
        steps, lr = args.steps or 30, args.lr or 3e-3
    else:
        tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
        (train, dev, test), label_names = rotten_tomatoes(tokenizer, max_length=64, train_rows=args.train_rows)
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(
            default_model_dir(), num_labels=len(label_names), id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)})
        steps, lr = args.steps or 150, args.lr or 1e-4

    # bertopt's recipe: BertAdam (no bias correction, eps 1e-6, decoupled decay 0.01 except
    # LayerNorm/bias, TF-style global clip 1.0) + Google's warmup (10%) / linear decay schedule.
    optimizer, scheduler = bertopt.create_optimizer(model, lr, num_train_steps=steps,
                                                    num_warmup_steps=int(0.1 * steps))
    training_args = TrainingArguments(
        output_dir=args.out,
        max_steps=steps,                   # must match num_train_steps above
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=128,
        max_grad_norm=0.0,                 # no torch clip before BertAdam's own (0, not None)
        logging_steps=max(1, steps // 10),
        eval_strategy="no",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        data_collator=DataCollatorWithPadding(tokenizer),
        optimizers=(optimizer, scheduler),
        compute_metrics=lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())},
    )
    trainer.train()
    results = {**trainer.evaluate(dev, metric_key_prefix="dev"), **trainer.evaluate(test, metric_key_prefix="test")}
    print(f"dev accuracy {results['dev_accuracy']:.4f}, test accuracy {results['test_accuracy']:.4f} "
          f"after {steps} steps of BertAdam under Trainer")
    return results


if __name__ == "__main__":
    main()
