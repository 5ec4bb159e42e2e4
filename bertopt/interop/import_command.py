"""`bertopt import-tf`: a Google BERT checkpoint into a run directory (`bertopt export-tf`: export_command.py).

    bertopt import-tf model.ckpt-100000 --bert-config bert_config.json --vocab vocab.txt --out runs/google
    bertopt export-tf runs/google --out exported/model.ckpt-100000

``import-tf`` writes ``RUN_DIR/model`` (a transformers ``BertForPreTraining`` directory with its
WordPiece tokenizer) and ``RUN_DIR/google_optimizer.pt``: Google's Adam moments under the torch
parameter names (BertAdam's ``exp_avg``/``exp_avg_sq``) and ``global_step``, read by
:func:`load_imported_state` (until the run's bertopt checkpoint holds them, so that
``bertopt pretrain --resume`` continues the run). ``export-tf`` writes the model of RUN_DIR (and
those moments and step, if present) as a TF checkpoint that Google's code reads.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

HELP = "import a Google BERT TF checkpoint (weights, Adam slots, global step) into a run directory"
OPTIMIZER_FILE = "google_optimizer.pt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="the checkpoint prefix (model.ckpt-N) or its .index file")
    parser.add_argument("--bert-config", required=True, type=Path, help="the bert_config.json of the checkpoint")
    parser.add_argument("--vocab", required=True, type=Path, help="the vocab.txt of the checkpoint")
    parser.add_argument("--out", required=True, type=Path, help="run directory to write (model/ and %s)" % OPTIMIZER_FILE)
    parser.add_argument("--do-lower-case", action=argparse.BooleanOptionalAction, default=None,
                        help="lower-case text before WordPiece (default: guessed from the vocabulary)")
    parser.add_argument("--gelu", choices=("tanh", "erf"), default="tanh",
                        help="GELU form: tanh (google-research/bert's modeling.py since 2019, default) or erf "
                             "(the 2018 code that trained the first released BERT-Base/Large)")


def run(args: argparse.Namespace) -> int:
    import torch

    from bertopt.errors import UsageError
    from bertopt.interop.google import import_tf_checkpoint
    from bertopt.interop.tf_checkpoint import resolve_prefix

    if (args.out / "model").exists():
        raise UsageError(f"--out {args.out}: holds a model directory already; choose a new --out directory")
    prefix = resolve_prefix(args.checkpoint)
    imported = import_tf_checkpoint(prefix, args.bert_config, args.vocab, args.out,
                                    do_lower_case=args.do_lower_case, gelu=args.gelu)
    tmp = args.out / f".{OPTIMIZER_FILE}.tmp-{os.getpid()}"
    torch.save({"global_step": imported.global_step, "slots": imported.slots, "notes": imported.notes,
                "model_digest": model_digest(args.out / "model")}, tmp)
    os.replace(tmp, args.out / OPTIMIZER_FILE)  # whole or absent, never half-written
    print(f"imported {prefix}: {args.out / 'model'} (BertForPreTraining, hidden_act {imported.config.hidden_act}), "
          f"global_step {imported.global_step}, Adam slots {'imported' if imported.slots else 'absent'}")
    for note in imported.notes:
        print(f"  note: {note}")
    return 0


def model_digest(model_dir) -> str:
    """sha256 of a model directory's weight files: tells export-tf whether model/ is still the
    model whose Adam slots and global_step import-tf saved beside it."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).glob("*.safetensors")) + sorted(Path(model_dir).glob("*.bin")):
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def load_imported_state(run_dir) -> dict:
    """``{"global_step", "slots", "notes", "model_digest"}`` that ``import-tf`` saved in ``run_dir``."""
    import torch

    return torch.load(Path(run_dir) / OPTIMIZER_FILE, weights_only=True)
