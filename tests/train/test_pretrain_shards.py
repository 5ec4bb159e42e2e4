"""`bertopt pretrain --data SHARDS`: BERT's pretraining on TFRecord shards (written here with
bertopt.interop.tfrecord's writer: tests/train/_shards.py) with Google's MLM + NSP loss: it learns,
its first loss is google_objective's on the same batch, K micro-batches and 2 processes give the
one-batch run, a resumed run continues the uninterrupted curve, and bad input gets a clear error."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from _shards import make_shards, write_shards, write_vocab  # noqa: E402
from _torchrun import torchrun  # noqa: E402
from bertopt.cli import main as cli  # noqa: E402
from bertopt.interop.tfrecord import (INT64, TFRecordWriter, encode_examples,  # noqa: E402
                                      read_pretraining_shards, write_pretraining_shard)
from bertopt.train.report import read_metrics  # noqa: E402

# float32 sums in another order (micro-batches, processes) agree to rounding: as test_pretrain_distributed
REL_TOL = 1e-5
MODEL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
         "max_position_embeddings": 64, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("shards")
    config = base / "bert.json"
    config.write_text(json.dumps(MODEL))
    return {"base": base, "config": config, "vocab": write_vocab(base / "vocab.txt"),
            "shards": write_shards(base / "data", n=200, files=2)}


def argv(data, out, *extra, steps=8):
    return ["pretrain", "--data", str(data["base"] / "data" / "part-*.tfrecord"), "--vocab-file", str(data["vocab"]),
            "--config", str(data["config"]), "--batch-size", "8", "--steps", str(steps), "--lr", "1e-2",
            "--warmup-steps", "2", "--log-every", "1", "--eval-every", "4", "--eval-sequences", "32",
            "--save-every", "4", "--keep-checkpoints", "0", "--threads", "1", "--no-progress", "--out", str(out), *extra]


def assert_same_curve(records, reference, keys=("loss", "grad_norm", "lr", "eval_loss", "train_mlm_accuracy",
                                                 "train_nsp_accuracy", "eval_mlm_accuracy")):
    assert [r["step"] for r in records] == [r["step"] for r in reference]
    for got, want in zip(records, reference):
        for key in keys:
            if key in want:
                assert got[key] == pytest.approx(want[key], rel=REL_TOL, abs=1e-7), (key, got, want)


@pytest.fixture(scope="module")
def reference(data):
    out = data["base"] / "reference"
    assert cli(argv(data, out)) == 0
    return read_metrics(out / "metrics.jsonl")


def test_trains_logs_both_accuracies_and_exports_a_bert_for_pretraining(data, tmp_path):
    out = tmp_path / "run"
    assert cli(argv(data, out, "--steps", "60", "--eval-every", "60", "--log-every", "10")) == 0
    records = read_metrics(out / "metrics.jsonl")
    start, end = records[0], records[-1]
    assert set(start) == {"step", "lr", "eval_loss", "eval_mlm_loss", "eval_mlm_accuracy", "eval_nsp_loss",
                          "eval_nsp_accuracy"}
    assert end["eval_loss"] < start["eval_loss"] - 0.3, (start, end)  # measured 4.57 -> ~3.9
    assert {"train_mlm_accuracy", "train_nsp_accuracy", "train_mlm_loss", "train_nsp_loss"} <= set(end)
    assert end["loss"] == pytest.approx(end["train_mlm_loss"] + end["train_nsp_loss"], rel=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run"]["objective"] == "mlm+nsp" and summary["run"]["data_order"] == "shuffled"
    from transformers import AutoTokenizer, BertForPreTraining

    model = BertForPreTraining.from_pretrained(out / "model")
    assert model.config.vocab_size == 48
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    assert tokenizer.convert_tokens_to_ids("[MASK]") == 4 and (out / "model" / "vocab.txt").is_file()


def test_first_loss_is_googles_on_the_same_batch(data, reference):
    from transformers import BertConfig, BertForPreTraining

    from bertopt.train.google_objective import MlmNspObjective, features_to_tensors, google_losses
    from bertopt.train.sampler import EpochBatchSampler

    shards = read_pretraining_shards(data["shards"])
    n_train = len(shards) - 20  # the last min(32, 200 // 10) instances are held out
    rows = EpochBatchSampler(n_train, 8, seed=0).global_indices(0)
    features = {name: getattr(shards, name)[rows].astype(np.float32 if name == "masked_lm_weights" else np.int64)
                for name in ("input_ids", "input_mask", "segment_ids", "masked_lm_positions", "masked_lm_ids",
                             "masked_lm_weights", "next_sentence_labels")}
    torch.manual_seed(0)  # --seed 0: the run's initialisation
    model = BertForPreTraining(BertConfig(vocab_size=48, **MODEL))
    with torch.no_grad():
        total = google_losses(MlmNspObjective(model, shortcut=False)(**features_to_tensors(features)))[2]
    assert reference[1]["step"] == 1
    assert reference[1]["loss"] == pytest.approx(float(total), rel=1e-6, abs=0)


def test_micro_batches_give_the_one_batch_run(data, reference, tmp_path):
    out = tmp_path / "k2"
    assert cli(argv(data, out, "--grad-accum-steps", "2")) == 0
    assert_same_curve(read_metrics(out / "metrics.jsonl"), reference)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_give_the_one_process_run(data, reference, tmp_path):
    records, stdout = torchrun(argv(data, tmp_path / "unused")[:-2], tmp_path / "ddp")  # torchrun adds --out
    assert "2 processes (DDP, gloo)" in stdout
    assert_same_curve(records, reference)


def test_resume_mid_run_continues_the_uninterrupted_curve(data, reference, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(data["base"] / "reference", out)
    assert cli(argv(data, out, "--resume", str(out / "checkpoints" / "step-00000004.json"))) == 0
    assert_same_curve(read_metrics(out / "metrics.jsonl"), reference)


def test_from_a_model_continues_on_the_shards(data, reference, tmp_path, capsys):
    """--from a finished run (its BertForPreTraining and tokenizer): the held-out loss before the
    first step is that run's last; a --vocab-file other than the model's vocabulary is refused."""
    args = argv(data, tmp_path / "from", "--steps", "2")
    at = args.index("--config")
    args[at:at + 2] = ["--from", str(data["base"] / "reference")]
    assert cli(args) == 0
    records = read_metrics(tmp_path / "from" / "metrics.jsonl")
    assert records[0]["eval_loss"] == pytest.approx(reference[-1]["eval_loss"], rel=1e-6)
    assert (tmp_path / "from" / "model" / "vocab.txt").read_text() == data["vocab"].read_text()
    other = tmp_path / "other-vocab.txt"
    lines = data["vocab"].read_text().splitlines()
    other.write_text("\n".join(lines[:5] + lines[6:] + lines[5:6]) + "\n")
    args[args.index("--vocab-file") + 1] = str(other)
    capsys.readouterr()
    args[args.index("--out") + 1] = str(tmp_path / "from2")
    assert cli(args) == 2
    assert "is not the vocabulary of --from" in capsys.readouterr().err


def test_mlm_objective_on_shards_without_next_sentence_labels(data, tmp_path):
    shard = write_shards(tmp_path / "mlm", n=120, files=1, nsp=False)[0]
    out = tmp_path / "run"
    args = argv(data, out, "--steps", "4")
    args[args.index("--data") + 1] = shard
    assert cli(args) == 0
    records = read_metrics(out / "metrics.jsonl")
    assert "eval_nsp_accuracy" not in records[-1] and "train_nsp_accuracy" not in records[-1]
    assert records[-1]["loss"] == pytest.approx(records[-1]["train_mlm_loss"], rel=1e-6)
    assert json.loads((out / "summary.json").read_text())["run"]["objective"] == "mlm"


def _shard_without(path, feature):
    shards = make_shards(16)
    columns = [(name, INT64, value) for name, value in (
        ("input_ids", shards.input_ids), ("input_mask", shards.input_mask), ("segment_ids", shards.segment_ids),
        ("masked_lm_positions", shards.masked_lm_positions), ("masked_lm_ids", shards.masked_lm_ids))
        if name != feature]
    with TFRecordWriter(str(path)) as writer:
        writer.write_many(*encode_examples(columns))
    return str(path)


@pytest.mark.parametrize("case, message", [
    ("missing feature", "has no feature 'masked_lm_weights'"),
    ("seq len", "shards hold sequences of 24 tokens, --seq-len is 32"),
    ("vocabulary", "has 48 tokens. The shards were made with another vocabulary"),
    ("corpus flags", "--data trains on pretraining shards, which are already tokenized and masked, so --corpus, "
                     "--vocab-size"),
    ("no vocabulary", "--data needs the vocabulary the shards were made with"),
    ("nsp without labels", "--objective mlm+nsp needs next_sentence_labels"),
    ("data flags without data", "--objective, --vocab-file go with --data (pretraining shards)"),
], ids=["missing-feature", "seq-len", "vocabulary", "corpus-flags", "no-vocabulary", "nsp-without-labels",
        "data-flags-without-data"])
def test_bad_input_is_one_clear_paragraph(data, tmp_path, capsys, case, message):
    args = argv(data, tmp_path / "run")
    data_at = args.index("--data") + 1
    if case == "missing feature":
        args[data_at] = _shard_without(tmp_path / "bad.tfrecord", "masked_lm_weights")
    elif case == "seq len":
        args += ["--seq-len", "32"]
    elif case == "vocabulary":
        path = tmp_path / "big.tfrecord"
        write_pretraining_shard(str(path), make_shards(40, vocab_size=61))
        args[data_at] = str(path)
    elif case == "corpus flags":
        args += ["--corpus", "x.txt", "--vocab-size", "300"]
    elif case == "no vocabulary":
        at = args.index("--vocab-file")
        del args[at:at + 2]
    elif case == "nsp without labels":
        args[data_at] = write_shards(tmp_path / "mlm", n=40, files=1, nsp=False)[0]
        args += ["--objective", "mlm+nsp"]
    else:
        del args[data_at - 1:data_at + 1]
        args += ["--objective", "mlm"]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err
