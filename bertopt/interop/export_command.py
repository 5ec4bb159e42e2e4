"""`bertopt export-tf`: a run directory's BertForPreTraining, with its Adam slots and global step,
as a TF checkpoint Google's code reads (``tf.train.load_checkpoint``,
``run_pretraining.py --init_checkpoint``). The state is that of the run's newest checkpoint (a
trained run, or the one ``import-tf`` writes), else ``model/`` with the slots of ``google_optimizer.pt``."""

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
    exported = export_tf(args.run_dir, args.out, global_step=args.global_step)
    if exported["source"] is not None:
        print(f"exporting {exported['source']} (step {exported['global_step']})")
    step = exported["global_step"]
    print(f"wrote {args.out}.index and data: weights{', Adam slots' if exported['slots'] else ''}"
          f"{f', global_step {step}' if step is not None else ''}")
    if exported["left_out"]:
        print(f"  note: {args.run_dir / 'model'} has no {', '.join(exported['left_out'])}: left out of the checkpoint")
    return 0


def export_tf(run_dir, prefix, *, global_step: int | None = None) -> dict:
    """Write ``run_dir``'s model as a Google TF checkpoint at ``prefix`` (``bertopt.export_tf``): the weights,
    Adam moments and step of the run's newest checkpoint (a trained run, or the one ``import-tf`` writes),
    else ``model/`` with the slots of ``google_optimizer.pt``. Returns what was written: ``global_step``,
    ``slots`` (bool), ``left_out`` (weights model/ lacks) and ``source`` (the checkpoint manifest, or None)."""
    from transformers import BertForPreTraining

    from bertopt.errors import UsageError
    from bertopt.interop.google import export_tf_checkpoint

    run_dir = Path(run_dir)
    model_dir = run_dir / "model"
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"{run_dir}: no model/config.json; give a run directory written by bertopt "
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
    optimizer_state, step, source = None, global_step, None
    trained = newest_checkpoint(run_dir)
    if trained is not None:  # the run's own state: weights, BertAdam's moments and step of its newest checkpoint
        missing, unexpected = model.load_state_dict(trained.state["model"], strict=False)
        if unexpected:
            raise UsageError(f"{trained.info.manifest_path} holds {unexpected[0]} ({len(unexpected)} weights), which "
                             f"{model_dir}/config.json's BertForPreTraining has not: the checkpoint and model/ belong "
                             "to different models")
        fresh = {k for k in missing if k != "cls.predictions.decoder.weight"}  # tied to the word embeddings
        # no moments yet (a checkpoint imported without Adam slots): weights only, as from google_optimizer.pt
        optimizer_state = by_name(trained.state["optimizer"]) if trained.state["optimizer"]["state"] else None
        step = int(trained.state["loop"]["step"]) if step is None else step
        source = str(trained.info.manifest_path)
    elif (run_dir / OPTIMIZER_FILE).is_file():
        saved = load_imported_state(run_dir)
        if saved.get("model_digest") not in (None, model_digest(model_dir)):
            raise UsageError(
                f"{model_dir} is not the model that import-tf wrote (it was trained or replaced since), so the Adam "
                f"slots and global_step in {run_dir / OPTIMIZER_FILE} do not belong to it. Delete that file to "
                "export the weights only (with --global-step N if you know the step)")
        step = saved["global_step"] if step is None else step
        if saved["slots"] is not None:
            # Parameters without imported slots (heads the Google checkpoint lacked) have zero moments.
            names = [name for name, _ in model.named_parameters()]
            optimizer_state = {"param_groups": [{"params": list(range(len(names))), "param_names": names}],
                               "state": {i: saved["slots"][name] for i, name in enumerate(names)
                                         if name in saved["slots"]}}
    export_tf_checkpoint(model, optimizer_state, step, prefix, leave_out=fresh)
    return {"global_step": step, "slots": optimizer_state is not None, "left_out": sorted(fresh), "source": source}


def newest_checkpoint(run_dir: Path):
    """The newest checkpoint of ``run_dir/checkpoints`` that verifies (a LoadedCheckpoint), or None."""
    from bertopt.train import checkpoint as ckpt

    if not ckpt.list_checkpoints(run_dir / "checkpoints"):
        return None
    return ckpt.load_checkpoint(run_dir / "checkpoints")


def by_name(optimizer_state: dict) -> dict:
    """A checkpoint's optimizer state (keyed by parameter names, as torch's distributed state-dict
    helpers save it) in the form google_variables reads: param groups with ``param_names``."""
    names = [name for group in optimizer_state["param_groups"] for name in group["params"]]
    return {"param_groups": [{"params": names, "param_names": names}], "state": optimizer_state["state"]}
