"""`bertopt import-tf` then `bertopt pretrain --out RUN_DIR --resume --data SHARD` continues Google's
run as TensorFlow did: the fixture of tests/interop/google_model/ (a tiny BERT trained 5 steps by
Google's code, then 3 more steps on recorded batches, every variable recorded after them; its
README) imported, the 3 recorded batches written as a shard in order, and 3 bertopt steps give
TensorFlow's weights within 1e-5 and its Adam moments within their scale. `bertopt export-tf` then
writes the trained run's newest checkpoint (weights, moments, step)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from bertopt.cli import main as cli  # noqa: E402
from bertopt.interop.google import google_variables  # noqa: E402
from bertopt.interop.tf_checkpoint import read_tf_checkpoint  # noqa: E402
from bertopt.interop.tfrecord import read_pretraining_shards, write_pretraining_shard, PretrainingShards  # noqa: E402
from bertopt.train import checkpoint as ckpt  # noqa: E402
from bertopt.train.google_objective import FEATURES  # noqa: E402

HERE = Path(__file__).parents[1] / "interop" / "google_model"
META = json.loads((HERE / "google_model.json").read_text())
RECORDED = np.load(HERE / "google_model.npz")
SETTINGS = META["settings"]
# Adam moments compared at their own scale (adam_m up to 0.076, adam_v up to 1.7e-4), as
# tests/interop/test_google_model.py does; the weights within the 1e-5.
TOLERANCE = {"weights": 1e-5, "adam_m": 1e-7, "adam_v": 1e-9}


def write_batches(path: Path, prefixes) -> str:
    """The recorded batches ``prefixes`` as one shard, in order."""
    columns = {name: np.concatenate([RECORDED[f"{p}/{name}"] for p in prefixes]) for name in FEATURES}
    shards = PretrainingShards(**{name: columns[name] for name in FEATURES[:-1]},
                               next_sentence_labels=columns["next_sentence_labels"][:, 0], files=[],
                               file_rows=np.array([0, len(columns["input_ids"])]))
    write_pretraining_shard(str(path), shards)
    return str(path)


def kind(name: str) -> str:
    return name.rsplit("/", 1)[-1] if name.endswith(("adam_m", "adam_v")) else "weights"


def test_pretrain_resume_continues_googles_run(tmp_path, capsys):
    run_dir = tmp_path / "run"
    settings = ["--lr", str(SETTINGS["init_lr"]), "--steps", str(SETTINGS["num_train_steps"]),
                "--warmup-steps", str(SETTINGS["num_warmup_steps"]), "--batch-size", str(SETTINGS["batch_size"])]
    assert cli(["import-tf", str(HERE / META["checkpoint"]), "--bert-config", str(HERE / "bert_config.json"),
                "--vocab", str(HERE / "vocab.txt"), "--out", str(run_dir), *settings]) == 0
    imported = ckpt.latest_checkpoint(run_dir / "checkpoints")
    assert imported.step == SETTINGS["google_run_steps"] and imported.meta["run"]["imported_step"] == 5
    steps = len(META["continuation"])
    shard = write_batches(tmp_path / "continuation.tfrecord", [f"step{i}" for i in range(steps)])
    held_out = write_batches(tmp_path / "eval.tfrecord", ["eval"])
    assert len(read_pretraining_shards(shard)) == steps * SETTINGS["batch_size"]
    args = ["pretrain", "--out", str(run_dir), "--resume", "--data", shard, "--eval-data", held_out,
            "--data-order", "sequential", "--dropout", "0", *settings, "--save-every", "1", "--keep-checkpoints", "0",
            "--log-every", "1", "--eval-every", "0", "--threads", "1", "--no-progress"]
    assert cli(args) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "(step 5)" in out

    # the losses and LRs of the continued steps are TensorFlow's
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for record, step in zip([r for r in records if "loss" in r][:steps], META["continuation"]):
        assert record["step"] == step["global_step_before"] + 1
        assert record["lr"] == pytest.approx(step["learning_rate"], rel=1e-6, abs=0)
        assert record["loss"] == pytest.approx(step["total_loss"], rel=2e-6, abs=0)
        assert record["train_nsp_loss"] == pytest.approx(step["next_sentence_loss"], rel=1e-5, abs=0)

    # every variable after global_step 8 equals TensorFlow's
    from transformers import BertConfig, BertForPreTraining

    after = ckpt.load_checkpoint(run_dir / "checkpoints" / f"step-{META['final_global_step']:08d}.json").state
    model = BertForPreTraining(BertConfig.from_pretrained(run_dir / "model"))
    model.load_state_dict(after["model"], strict=False)
    from bertopt.interop.export_command import by_name

    ours = google_variables(model, by_name(after["optimizer"]), after["loop"]["step"])
    assert int(ours["global_step"]) == META["final_global_step"]
    worst = {}
    for key in (k for k in RECORDED.files if k.startswith("final/")):
        name = key[len("final/"):]
        diff = float(np.abs(ours[name] - RECORDED[key]).max())
        worst[kind(name)] = max(worst.get(kind(name), 0.0), diff)
        assert diff <= TOLERANCE[kind(name)], (name, diff)
    assert set(worst) == set(TOLERANCE)
    print("max abs difference from TensorFlow after", steps, "steps:", worst)

    # export-tf writes the trained run's newest checkpoint (step 10), not what import-tf saved
    assert cli(["export-tf", str(run_dir), "--out", str(tmp_path / "back" / "model.ckpt")]) == 0
    back = read_tf_checkpoint(tmp_path / "back" / "model.ckpt")
    last = ckpt.load_checkpoint(run_dir / "checkpoints").state
    assert int(back["global_step"]) == last["loop"]["step"] == SETTINGS["num_train_steps"]
    word = "cls.predictions.decoder.weight"  # tied: the embeddings' moments
    moments = last["optimizer"]["state"]["bert.embeddings.word_embeddings.weight"]
    assert np.array_equal(back["bert/embeddings/word_embeddings/adam_v"], moments["exp_avg_sq"].numpy())
    assert np.array_equal(back["bert/embeddings/word_embeddings"], last["model"]["bert.embeddings.word_embeddings.weight"].numpy())
    assert word not in back


def test_resume_refuses_settings_other_than_the_imported_runs(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert cli(["import-tf", str(HERE / META["checkpoint"]), "--bert-config", str(HERE / "bert_config.json"),
                "--vocab", str(HERE / "vocab.txt"), "--out", str(run_dir), "--lr", "5e-3", "--steps", "10",
                "--warmup-steps", "3", "--batch-size", "8"]) == 0
    shard = write_batches(tmp_path / "c.tfrecord", ["step0", "step1", "step2"])
    code = cli(["pretrain", "--out", str(run_dir), "--resume", "--data", shard, "--eval-data", shard, "--lr", "1e-3",
                "--steps", "10", "--warmup-steps", "3", "--batch-size", "8", "--no-progress", "--threads", "1"])
    assert code == 1  # a checkpoint that does not fit (reliability table, row 86)
    assert "lr=0.005 but this run has lr=0.001" in capsys.readouterr().err
