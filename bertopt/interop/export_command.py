"""`bertopt export-tf`: a run directory's BertForPreTraining, with the Adam slots and global step
that `bertopt import-tf` saved, as a TF checkpoint Google's code reads (``tf.train.load_checkpoint``,
``run_pretraining.py --init_checkpoint``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from bertopt.interop.import_command import OPTIMIZER_FILE, load_imported_state, model_digest

HELP = "export a run directory's BertForPreTraining (with imported Adam slots and step) as a Google TF checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a run directory holding model/ (e.g. written by import-tf)")
    parser.add_argument("--out", required=True, help="checkpoint prefix to write, e.g. out/model.ckpt-100000")
    parser.add_argument("--global-step", type=int, default=None,
                        help="global_step to store (default: the imported one, if any)")


def run(args: argparse.Namespace) -> int:
    from transformers import BertForPreTraining

    from bertopt.errors import UsageError
    from bertopt.interop.google import export_tf_checkpoint

    model_dir = args.run_dir / "model"
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"{args.run_dir}: no model/config.json; give a run directory written by bertopt "
                         "(import-tf or pretrain)")
    model, loading = BertForPreTraining.from_pretrained(model_dir, output_loading_info=True)
    # Weights the directory does not hold (e.g. the pooler and next-sentence head of a BertForMaskedLM)
    # were initialised at random just now: leave them out, as Google's code initialises what it lacks.
    fresh = set(loading["missing_keys"])
    encoder = sorted(k for k in fresh if not k.startswith(("cls.", "bert.pooler.")))
    if encoder:
        raise UsageError(f"{model_dir} is not a BERT model directory: it has no {encoder[0]} ({len(encoder)} encoder "
                         "weights missing). export-tf writes a BERT (BertModel, BertForMaskedLM or BertForPreTraining "
                         "directory, as import-tf and pretrain write them); give such a run directory")
    optimizer_state, step = None, args.global_step
    if (args.run_dir / OPTIMIZER_FILE).is_file():
        saved = load_imported_state(args.run_dir)
        if saved.get("model_digest") not in (None, model_digest(model_dir)):
            raise UsageError(
                f"{model_dir} is not the model that import-tf wrote (it was trained or replaced since), so the Adam "
                f"slots and global_step in {args.run_dir / OPTIMIZER_FILE} do not belong to it. Delete that file to "
                "export the weights only (with --global-step N if you know the step)")
        step = saved["global_step"] if step is None else step
        if saved["slots"] is not None:
            # Parameters without imported slots (heads the Google checkpoint lacked) have zero moments.
            names = [name for name, _ in model.named_parameters()]
            optimizer_state = {"param_groups": [{"params": list(range(len(names))), "param_names": names}],
                               "state": {i: saved["slots"][name] for i, name in enumerate(names)
                                         if name in saved["slots"]}}
    export_tf_checkpoint(model, optimizer_state, step, args.out, leave_out=fresh)
    print(f"wrote {args.out}.index and data: weights{', Adam slots' if optimizer_state else ''}"
          f"{f', global_step {step}' if step is not None else ''}")
    if fresh:
        print(f"  note: {model_dir} has no {', '.join(sorted(fresh))}: left out of the checkpoint")
    return 0
