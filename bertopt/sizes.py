"""BERT's model sizes: one table for the trainer's presets and the benchmark's sweep.

Google's released sizes: base and large (Devlin et al. 2018) and the miniatures from tiny to
medium (Turc et al. 2019, "Well-Read Students Learn Better"). Below them two of ours: "nano"
for tests (``--preset nano``) and "h32", the ~1M-parameter bottom of ``bertopt bench``'s sweep.
The feed-forward size is 4 * hidden, as in BERT.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BertSize:
    layers: int
    hidden: int
    heads: int
    vocab: int = 30522  # bert-base-uncased's WordPiece vocabulary (the trainer uses its tokenizer's)
    max_positions: int = 512
    type_vocab: int = 2

    @property
    def intermediate(self) -> int:
        return 4 * self.hidden


BERT_SIZES: dict[str, BertSize] = {
    "h32": BertSize(layers=2, hidden=32, heads=1),
    "nano": BertSize(layers=2, hidden=64, heads=2),
    "tiny": BertSize(layers=2, hidden=128, heads=2),
    "mini": BertSize(layers=4, hidden=256, heads=4),
    "small": BertSize(layers=4, hidden=512, heads=8),
    "medium": BertSize(layers=8, hidden=512, heads=8),
    "base": BertSize(layers=12, hidden=768, heads=12),
    "large": BertSize(layers=24, hidden=1024, heads=16),
}
