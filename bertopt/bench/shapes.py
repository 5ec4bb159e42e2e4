"""Parameter shapes of BERT models, for timing optimizer steps without building the models.

``bert_parameter_shapes`` lists the parameters of ``BertModel`` (embeddings, encoder,
pooler) in ``named_parameters()`` order with Hugging Face's names, so Google's decay
exclusion (``LayerNorm``/``bias``) applies to them as it would to the real model.
bert-base-uncased gives 109,482,240 parameters. The sizes are ``bertopt.sizes``'.
"""

from __future__ import annotations

import math
import re
from bertopt.grouping import BERT_EXCLUDE
from bertopt.sizes import BERT_SIZES, BertSize


# The sweep: every size of the table but the test model "nano", named "bert-<size>".
SIZES: dict[str, BertSize] = {f"bert-{name}": size for name, size in BERT_SIZES.items() if name != "nano"}


def bert_parameter_shapes(size: BertSize) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter of a BertModel of this size."""
    h, inter = size.hidden, size.intermediate
    shapes = [
        ("embeddings.word_embeddings.weight", (size.vocab, h)),
        ("embeddings.position_embeddings.weight", (size.max_positions, h)),
        ("embeddings.token_type_embeddings.weight", (size.type_vocab, h)),
        ("embeddings.LayerNorm.weight", (h,)),
        ("embeddings.LayerNorm.bias", (h,)),
    ]
    for i in range(size.layers):
        layer = f"encoder.layer.{i}."
        for dense in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            shapes += [(layer + dense + ".weight", (h, h)), (layer + dense + ".bias", (h,))]
        shapes += [
            (layer + "attention.output.LayerNorm.weight", (h,)),
            (layer + "attention.output.LayerNorm.bias", (h,)),
            (layer + "intermediate.dense.weight", (inter, h)),
            (layer + "intermediate.dense.bias", (inter,)),
            (layer + "output.dense.weight", (h, inter)),
            (layer + "output.dense.bias", (h,)),
            (layer + "output.LayerNorm.weight", (h,)),
            (layer + "output.LayerNorm.bias", (h,)),
        ]
    shapes += [("pooler.dense.weight", (h, h)), ("pooler.dense.bias", (h,))]
    return shapes


def parameter_count(shapes: list[tuple[str, tuple[int, ...]]]) -> int:
    return sum(math.prod(shape) for _, shape in shapes)


def decays(name: str, exclude=BERT_EXCLUDE) -> bool:
    """Google's rule: no decay for names matching any pattern (``re.search``)."""
    return not any(re.search(pattern, name) for pattern in exclude)


def size_by_name(name: str) -> BertSize:
    if name not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}; got {name!r}")
    return SIZES[name]
