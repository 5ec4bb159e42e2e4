"""Small synthetic English-like corpora for pretraining tests (written into tmp_path)."""

from __future__ import annotations

import random
from pathlib import Path

SUBJECTS = ["the cat", "a dog", "my sister", "the old man", "our teacher", "the river", "a small bird", "the king"]
VERBS = ["sees", "likes", "follows", "paints", "remembers", "carries", "finds", "watches"]
OBJECTS = ["the red ball", "a green tree", "the quiet house", "an open window", "the long road", "a bright star"]
ENDINGS = ["every morning", "in the garden", "after the rain", "near the bridge", "before dinner", "at night"]


def sentence(rng: random.Random) -> str:
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ENDINGS)}.".capitalize()


def write_corpus(directory: Path, *, documents: int = 200, sentences: int = 6, seed: int = 0,
                 files: int = 2) -> Path:
    """Documents (blocks separated by blank lines) of template sentences, spread over .txt files."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    docs = [" ".join(sentence(rng) for _ in range(sentences)) + f" Document number {i}." for i in range(documents)]
    for f in range(files):
        (directory / f"part{f}.txt").write_text("\n\n".join(docs[f::files]) + "\n", encoding="utf-8")
    return directory
