"""``bertopt pretrain --from MODEL``: continue pretraining a published BERT (domain-adaptive
pretraining, as Hugging Face's ``run_mlm.py --model_name_or_path`` does) or a finished run.

MODEL is a Hugging Face model directory of a BERT (``BertForMaskedLM``, ``BertForPreTraining`` or a
bare ``BertModel`` such as the sentence-transformers all-MiniLM-L6-v2), or a ``bertopt pretrain``
or ``bertopt import-tf`` run directory (its ``model/``). The model, its size and its tokenizer come
from it: :func:`read_model` checks what MODEL is before any data is read, :func:`load_masked_lm`
builds the ``BertForMaskedLM`` to train. A masked-LM head MODEL has is used as it is, so the
held-out loss at step 0 is the published model's own; a missing head (a bare encoder) is
initialised as BERT initialises one (transformers' ``_init_weights``: normal(0, initializer_range)
for the dense layer, LayerNorm 1 and 0, bias 0) with the decoder tied to the word embeddings. A
TensorFlow checkpoint (``*.index``) is not read here: ``bertopt import-tf`` turns it into a run
directory first.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bertopt.errors import UsageError
from bertopt.train.data import SpecialIds

HEAD_PREFIX = "cls.predictions."  # BertForMaskedLM's (and BertForPreTraining's) masked-LM head
TIED_DECODER = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")  # tied, never stored apart


@dataclass
class PublishedModel:
    """What ``--from`` names, checked: where its files are, its config and its tokenizer."""

    given: Path  # as the user gave it
    directory: Path  # the Hugging Face model directory (``<run>/model`` for a run directory)
    config: Any  # transformers.BertConfig
    tokenizer: Any  # the transformers fast tokenizer, saved with the exported model
    special_ids: SpecialIds
    lowercase: bool | None  # the tokenizer's normalizer lowercases (None: cannot tell)
    content_sha256: str  # of the directory's files: a resumed run must start from the same model

    @property
    def backend(self):
        """The ``tokenizers.Tokenizer`` that encodes the corpus: MODEL's, without the padding and
        truncation its tokenizer.json may switch on (sentence-transformers' cut every text at 128
        tokens and pad it), since whole documents are packed into rows."""
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(self.tokenizer.backend_tokenizer.to_str())
        backend.no_padding()
        backend.no_truncation()
        return backend

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def save_tokenizer(self, directory: Path) -> None:
        """MODEL's tokenizer, unchanged, into an exported model directory; its vocab.txt too, which
        transformers 5 no longer writes but Google's code and older readers need."""
        import shutil

        self.tokenizer.save_pretrained(str(directory))
        if (self.directory / "vocab.txt").is_file() and not (Path(directory) / "vocab.txt").exists():
            shutil.copy2(self.directory / "vocab.txt", Path(directory) / "vocab.txt")


def model_directory(path: Path) -> Path:
    """The Hugging Face model directory ``--from PATH`` means, or UsageError saying what PATH is."""
    from bertopt.train.report import finished_summary

    path = Path(path)
    if not path.exists():
        raise UsageError(f"--from {path}: no such directory. Give a Hugging Face BERT model directory (with "
                         "config.json and its tokenizer files) or the --out directory of a finished `bertopt "
                         "pretrain` run")
    if path.is_file():
        raise UsageError(f"--from {path}: a file, not a model directory. Give the directory that holds config.json "
                         "(and the weights and tokenizer files), or a `bertopt pretrain` --out directory")
    if (path / "config.json").is_file():
        return path
    # a finished run, or what `bertopt import-tf` wrote (model/ and no training summary)
    if (path / "model" / "config.json").is_file() and (
            finished_summary(path) is not None or not (path / "summary.json").exists()):
        return path / "model"
    if (path / "summary.json").is_file() or (path / "checkpoints").is_dir():
        raise UsageError(
            f"--from {path}: not a finished `bertopt pretrain` run (expected summary.json with all steps "
            "completed and model/config.json). Give the --out directory of a pretraining run that finished, or "
            "finish it first with --resume")
    if any(path.glob("*.index")):
        raise UsageError(
            f"--from {path}: a TensorFlow checkpoint ({next(path.glob('*.index')).name}), not a Hugging Face model "
            "directory. Convert it first with `bertopt import-tf CKPT --bert-config bert_config.json --vocab "
            "vocab.txt --out RUN_DIR`, then pass --from RUN_DIR")
    raise UsageError(f"--from {path}: no config.json in it, so it is not a Hugging Face model directory. Give the "
                     "directory a model's save_pretrained() wrote (config.json, weights, tokenizer files) or a "
                     "finished `bertopt pretrain` --out directory")


def read_model(path: Path, *, seq_len: int) -> PublishedModel:
    """Check that ``--from PATH`` is a BERT with a WordPiece tokenizer that fits ``seq_len``; reads
    config and tokenizer only (the weights are loaded later by :func:`load_masked_lm`)."""
    from transformers import AutoTokenizer, BertConfig

    _quiet_transformers()
    directory = model_directory(path)
    try:
        raw = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"--from {path}: {directory / 'config.json'} cannot be read as JSON ({exc}); the model "
                         "directory is damaged: copy it again") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type != "bert":
        architectures = ", ".join(raw.get("architectures") or []) if isinstance(raw, dict) else ""
        raise UsageError(
            f"--from {path}: a {model_type or 'model of unknown type'} model"
            + (f" ({architectures})" if architectures else "")
            + ", not a BERT (config.json has model_type "
            f"{model_type!r}, expected 'bert'). --from continues BERT pretraining (masked LM with a WordPiece "
            "tokenizer): give a BERT directory (BertForMaskedLM, BertForPreTraining or BertModel)")
    config = BertConfig.from_pretrained(directory, local_files_only=True)
    if seq_len > config.max_position_embeddings:
        raise UsageError(f"--seq-len {seq_len} exceeds {path}'s max_position_embeddings "
                         f"({config.max_position_embeddings}): the model has no position embeddings beyond that. "
                         f"Use --seq-len {config.max_position_embeddings} or less")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for missing/damaged files
        raise UsageError(f"--from {path}: its tokenizer cannot be loaded ({type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}). The model "
                         "directory needs its tokenizer files (tokenizer.json, or vocab.txt for WordPiece)") from None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    kind = type(backend.model).__name__ if backend is not None else type(tokenizer).__name__
    if kind != "WordPiece":
        raise UsageError(
            f"--from {path}: its tokenizer is a {kind} tokenizer, not WordPiece. bertopt continues BERT's "
            "pretraining, whose masking (and whole-word masking, by '##' pieces) is defined on WordPiece "
            "vocabularies; give a BERT whose tokenizer.json (or vocab.txt) is WordPiece")
    ids = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("pad", "unk", "cls", "sep", "mask")}
    if None in ids.values():
        absent = ", ".join(f"[{name.upper()}]" for name, value in ids.items() if value is None)
        raise UsageError(f"--from {path}: the tokenizer has no {absent} token; masked-LM pretraining needs "
                         "[PAD], [UNK], [CLS], [SEP] and [MASK] (BERT's special tokens) in its vocabulary")
    if len(tokenizer) > config.vocab_size:
        raise UsageError(f"--from {path}: the tokenizer has {len(tokenizer)} tokens but the model only "
                         f"{config.vocab_size} embeddings (vocab_size in config.json); the tokenizer files do not "
                         "belong to these weights")
    return PublishedModel(given=Path(path), directory=directory, config=config, tokenizer=tokenizer,
                          special_ids=SpecialIds(**ids), lowercase=_lowercases(backend),
                          content_sha256=directory_sha256(directory))


def load_masked_lm(published: PublishedModel, *, dropout: float | None = None):
    """``(model, head_initialised)``: a BertForMaskedLM with MODEL's weights; ``head_initialised``
    names the masked-LM head parameters MODEL lacked, which transformers initialised as BERT does
    (seed the torch RNG before). UsageError if MODEL lacks encoder weights."""
    from transformers import BertForMaskedLM

    _quiet_transformers()
    overrides = {} if dropout is None else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    model, info = BertForMaskedLM.from_pretrained(published.directory, local_files_only=True,
                                                  output_loading_info=True, **overrides)
    missing = sorted(set(info.get("missing_keys", [])) - set(TIED_DECODER))
    encoder_missing = [key for key in missing if not key.startswith(HEAD_PREFIX)]
    if encoder_missing:
        raise UsageError(f"--from {published.given}: the weights lack {len(encoder_missing)} tensors a BERT encoder "
                         f"needs (e.g. {', '.join(encoder_missing[:3])}); the weight file is incomplete or not a "
                         "BERT's: give a complete BERT model directory")
    if model.cls.predictions.decoder.weight is not model.bert.embeddings.word_embeddings.weight:
        model.tie_weights()  # BERT's decoder is the word embedding matrix (a config may say otherwise)
    return model, missing


def directory_sha256(directory: Path) -> str:
    """A hash of the names and contents of the files directly in ``directory`` (not its subfolders)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(directory).iterdir() if p.is_file()):
        digest.update(f"\0{path.name}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def _lowercases(backend) -> bool | None:
    """Whether the tokenizer lowercases its input (BertNormalizer's flag, or a Lowercase step)."""
    normalizer = json.loads(backend.to_str()).get("normalizer") or {}
    steps = normalizer.get("normalizers", [normalizer]) if normalizer.get("type") == "Sequence" else [normalizer]
    for step in steps:
        if step.get("type") == "Lowercase" or (step.get("type") == "BertNormalizer" and step.get("lowercase")):
            return True
    return False if normalizer else None


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the load report lists the missing head: we say it ourselves
    hf_logging.disable_progress_bar()
