"""Tiny "published" models for `bertopt pretrain --from` tests, written into tmp_path: a WordPiece
vocabulary in BERT's own layout (special tokens not at the first ids, "##" pieces) for the
sentences of _corpus.py, and BERT / GPT-2 model directories as save_pretrained() writes them."""

from __future__ import annotations

import string
from pathlib import Path

from _corpus import ENDINGS, OBJECTS, SUBJECTS, VERBS

# [PAD] 0, [UNK] 3, [CLS] 4, [SEP] 5, [MASK] 6: like BERT's vocab.txt (0, 100-103), not a trained one's 0-4
SPECIALS = ["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def vocabulary() -> list[str]:
    words = sorted({w for phrase in SUBJECTS + VERBS + OBJECTS + ENDINGS for w in phrase.split()} | {"document", "number"})
    letters = list(string.ascii_lowercase + string.digits)
    return SPECIALS + list(".,") + words + [c for c in letters if c not in words] + [f"##{c}" for c in letters]


def write_tokenizer(directory: Path) -> None:
    from transformers import BertTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    vocab = {token: i for i, token in enumerate(vocabulary())}
    BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=64).save_pretrained(str(directory))
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")  # as published BERTs ship it


def bert_config(**overrides):
    from transformers import BertConfig

    return BertConfig(**{"vocab_size": len(vocabulary()), "hidden_size": 32, "num_hidden_layers": 2,
                         "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 48,
                         **overrides})


def write_bert(directory: Path, kind: str = "BertForMaskedLM", seed: int = 0) -> Path:
    """A random tiny BERT of class ``kind`` with the tokenizer. Its MLM head (if any) is moved away
    from BERT's initialisation, so a test can tell it was used as it is."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, kind)(bert_config())
    if hasattr(model, "cls"):
        with torch.no_grad():
            model.cls.predictions.bias.normal_(0.0, 1.0)
            model.cls.predictions.transform.LayerNorm.weight.uniform_(0.5, 1.5)
    model.save_pretrained(str(directory))
    write_tokenizer(directory)
    return directory


def write_gpt2(directory: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2)).save_pretrained(
        str(directory))
    return directory


def write_bert_with_bpe_tokenizer(directory: Path) -> Path:
    """A BERT directory whose tokenizer.json is a byte-level BPE tokenizer (as RoBERTa's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import BertModel, PreTrainedTokenizerFast

    BertModel(bert_config()).save_pretrained(str(directory))
    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    bpe.train_from_iterator(["the cat sees the dog"] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(str(directory))
    return directory
