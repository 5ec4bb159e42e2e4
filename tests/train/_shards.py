"""Tiny BERT pretraining shards for tests, written with bertopt.interop.tfrecord's writer: a vocabulary
of 5 special tokens and 43 words; sentence pairs of words drawn from a skewed (Zipf) distribution,
the actual next segment made of the first one's words (so MLM and NSP can be learned), with
Google's seven features, padding included."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bertopt.interop.tfrecord import PretrainingShards, write_pretraining_shard

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [f"w{i}" for i in range(43)]


def write_vocab(path: Path) -> Path:
    path.write_text("\n".join(SPECIAL + WORDS) + "\n")
    return path


def make_shards(n: int, *, seq_len: int = 24, max_predictions: int = 4, seed: int = 0, nsp: bool = True,
                vocab_size: int | None = None) -> PretrainingShards:
    rng = np.random.default_rng(seed)
    first = len(SPECIAL)
    top = (vocab_size or first + len(WORDS)) - first
    ids = np.zeros((n, seq_len), np.int32)
    mask = np.zeros((n, seq_len), np.int8)
    segments = np.zeros((n, seq_len), np.int8)
    positions = np.zeros((n, max_predictions), np.int32)
    labels = np.zeros((n, max_predictions), np.int32)
    weights = np.zeros((n, max_predictions), np.float32)
    is_random = rng.integers(0, 2, n).astype(np.int8)
    zipf = 1.0 / np.arange(1, top + 1) ** 1.5
    zipf /= zipf.sum()
    for i in range(n):
        length = seq_len if rng.random() < 0.7 else int(rng.integers(seq_len // 2, seq_len))
        a_len = (length - 3) // 2
        b_len = length - 3 - a_len
        a = list(first + rng.choice(top, size=a_len, p=zipf))
        # the actual next segment repeats A's words; a random one is drawn anew (NSP can be learned)
        b = list(rng.choice(a, size=b_len)) if not is_random[i] else list(first + rng.choice(top, size=b_len, p=zipf))
        row = [2, *a, 3, *b, 3]
        ids[i, :length] = row
        mask[i, :length] = 1
        segments[i, a_len + 2:length] = 1
        candidates = [j for j in range(length) if row[j] >= first]
        k = min(max_predictions, max(1, round(0.15 * length)))
        chosen = sorted(rng.choice(candidates, size=k, replace=False))
        positions[i, :k] = chosen
        labels[i, :k] = ids[i, chosen]
        weights[i, :k] = 1.0
        ids[i, chosen] = 4  # [MASK]
    return PretrainingShards(ids, mask, segments, positions, labels, weights, is_random if nsp else None,
                             files=[], file_rows=np.array([0, n]))


def write_shards(directory: Path, n: int = 96, files: int = 2, **options) -> list[str]:
    """``files`` shard files holding ``n`` instances in all; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    shards = make_shards(n, **options)
    paths = []
    for k, rows in enumerate(np.array_split(np.arange(n), files)):
        path = directory / f"part-{k}.tfrecord"
        write_pretraining_shard(str(path), shards, rows)
        paths.append(str(path))
    return paths
