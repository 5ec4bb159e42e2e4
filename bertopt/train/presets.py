"""BERT model sizes by name, or from a ``BertConfig`` JSON file.

The presets are the sizes of ``bertopt.sizes`` (google-research/bert's released models from
"tiny" to "base"/"large", and "nano", smaller still, for tests).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from bertopt.sizes import BERT_SIZES, BertSize

# layers, hidden size, attention heads of every size but the benchmark's "h32"; the
# feed-forward size is 4 * hidden, as in BERT
PRESETS: dict[str, dict[str, int]] = {
    name: {"num_hidden_layers": size.layers, "hidden_size": size.hidden, "num_attention_heads": size.heads}
    for name, size in BERT_SIZES.items() if name != "h32"
}

# BERT's defaults for everything a preset does not set
_COMMON = {
    "max_position_embeddings": BertSize.max_positions,
    "type_vocab_size": BertSize.type_vocab,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "initializer_range": 0.02,
}


def preset_config(name: str, vocab_size: int, **overrides: Any) -> dict[str, Any]:
    """The ``BertConfig`` keyword arguments of preset ``name`` for a vocabulary of ``vocab_size``."""
    if name not in PRESETS:
        raise ValueError(f"--preset must be one of {', '.join(PRESETS)}; got {name!r}")
    return {**_COMMON, **PRESETS[name], "intermediate_size": BERT_SIZES[name].intermediate, "vocab_size": vocab_size,
            **overrides}


def config_from_file(path: str | os.PathLike, vocab_size: int, **overrides: Any) -> dict[str, Any]:
    """``BertConfig`` keyword arguments from a JSON file (a Hugging Face ``config.json`` works);
    ``vocab_size`` is always that of the trained tokenizer."""
    path = Path(path)
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"--config {path}: not a readable JSON file ({exc})") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a JSON object of BertConfig fields")
    if values.get("model_type", "bert") != "bert":
        raise ValueError(f"--config {path}: model_type is {values['model_type']!r}; only 'bert' is supported")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(values.get(key), int) or values[key] < 1:
            raise ValueError(f"--config {path}: {key} must be a positive integer, got {values.get(key)!r}")
    if values["hidden_size"] % values["num_attention_heads"]:
        raise ValueError(f"--config {path}: hidden_size {values['hidden_size']} is not divisible by "
                         f"num_attention_heads {values['num_attention_heads']}")
    values = {k: v for k, v in values.items() if not k.startswith("_") and k not in ("architectures", "transformers_version")}
    return {**_COMMON, "intermediate_size": 4 * values["hidden_size"], **values, "vocab_size": vocab_size, **overrides}


def build_config(*, preset: str | None, config_file: str | os.PathLike | None, vocab_size: int, **overrides: Any):
    """A ``transformers.BertConfig`` from a preset name or a config file (exactly one)."""
    from transformers import BertConfig

    if config_file is not None:
        values = config_from_file(config_file, vocab_size, **overrides)
    else:
        values = preset_config(preset or "tiny", vocab_size, **overrides)
    return BertConfig(**values)
