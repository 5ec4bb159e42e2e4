"""Record the old-checkpoint fixture: a tiny `bertopt pretrain` run made with the code of main at
904a424 (before issue 25's training-layer rework), kept so later code must still resume it.

Run from the repository root with bertopt's venv (one thread, CPU):

    .venv/bin/python tests/train/old_checkpoint/make_old_checkpoint.py

It pretrains a 1-layer, 16-wide BERT (model.json) for 8 steps on the synthetic corpus of
tests/train/_corpus.py (40 documents, vocabulary 160), checkpointing at steps 4 and 8, and keeps
here: the step-4 checkpoint (checkpoints/), the metrics.jsonl of the uninterrupted run, the argv
it used (run.json) and its data cache (cache/: the WordPiece tokenizer and token ids; training a
tokenizer this small again may break ties differently, giving other token ids). test_old_checkpoint.py resumes the step-4 checkpoint with today's code
and compares the rest of the curve with the recorded one.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/train, for _corpus

from _corpus import write_corpus  # noqa: E402

from bertopt.cli import main  # noqa: E402

DOCUMENTS = 40


def argv(corpus: Path, cache: Path, out: Path, *extra: str) -> list[str]:
    """The run's flags (the test rebuilds the corpus and passes the same ones with --resume)."""
    return ["pretrain", "--config", str(HERE / "model.json"), "--corpus", str(corpus), "--cache-dir", str(cache),
            "--vocab-size", "160", "--seq-len", "32", "--batch-size", "4", "--steps", "8", "--lr", "3e-3",
            "--log-every", "2", "--eval-every", "4", "--eval-sequences", "8", "--save-every", "4",
            "--keep-checkpoints", "0", "--threads", "1", "--no-progress", "--out", str(out), *extra]


def record() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = write_corpus(tmp / "corpus", documents=DOCUMENTS)
        out = tmp / "run"
        args = argv(corpus, tmp / "cache", out)
        if main(args) != 0:
            raise SystemExit("the fixture run failed")
        shutil.rmtree(HERE / "checkpoints", ignore_errors=True)
        (HERE / "checkpoints").mkdir()
        for path in (out / "checkpoints").glob("step-00000004*"):
            shutil.copy(path, HERE / "checkpoints" / path.name)
        shutil.copy(out / "metrics.jsonl", HERE / "metrics.jsonl")
        shutil.rmtree(HERE / "cache", ignore_errors=True)
        shutil.copytree(tmp / "cache", HERE / "cache")
        (HERE / "run.json").write_text(json.dumps({"argv": argv(Path("CORPUS"), Path("CACHE"), Path("OUT")),
                                                   "documents": DOCUMENTS}, indent=1) + "\n")


if __name__ == "__main__":
    record()
