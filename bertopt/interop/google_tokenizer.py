"""Google BERT's ``tokenization.FullTokenizer``, exactly, fast: the Rust ``tokenizers`` BERT pipeline
for ordinary lines, and a line-by-line Python port of Google's code for the lines where the two
could differ.

Google's pipeline (bert/tokenization.py): drop U+0000, U+FFFD and control characters (categories
Cc, Cf except tab/newline/CR), map whitespace (space, tab, newline, CR, category Zs) to a space,
put spaces around CJK ideographs, split on whitespace, then per word: lower-case and strip
accents (NFD, drop category Mn) if ``do_lower_case``, split off punctuation (ASCII non-alphanumerics
and categories P*), then WordPiece, greedy longest match first, ``[UNK]`` for a word that cannot be
matched or is longer than 200 characters.

``tokenizers``' ``BertNormalizer`` + ``BertPreTokenizer`` + ``WordPiece`` implement the same
steps, with differences at the edges (measured by sweeping every code point through both; see
tests/interop/test_google_pairs.py): its "control" also drops unassigned (Cn), private-use (Co) and
surrogate (Cs) code points, which Google keeps; it lower-cases after stripping accents, and per
character, not per word (Python's ``str.lower`` maps a final capital sigma to 'ς' by context);
and its Unicode tables need not be Python's (a sweep of every code point with Python 3.11 and
tokenizers 0.23 found ~550,000 private-use and ~3,000 other characters that differ in some
context). So every non-ASCII character, the first time it is seen, goes through both pipelines
alone and in a few contexts (:data:`_CONTEXTS`); a line with a character on which they differ is
tokenized by the Python port. That adapts to the running Python's Unicode tables and the
installed ``tokenizers``.
"""

from __future__ import annotations

import unicodedata

import numpy as np

from bertopt.errors import UsageError

SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[MASK]", "[UNK]")
MAX_INPUT_CHARS_PER_WORD = 200


def load_vocab(path: str) -> dict[str, int]:
    """Google's ``load_vocab``: one token per line, stripped, ids in line order.

    A token repeated on two lines is refused: Google's two published versions of tokenization.py
    give it different ids (the first line in one, the last in the other)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UsageError(f"cannot read the vocabulary file {path!r} ({e.strerror}): pass the vocab.txt of "
                         "the BERT model (one WordPiece token per line).") from None
    vocab: dict[str, int] = {}
    lines = raw.decode("utf-8", "ignore").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the text after the last newline, when there is none
    for number, line in enumerate(lines, 1):
        token = line.strip()
        if token in vocab:
            raise UsageError(
                f"the vocabulary {path} has the token {token!r} twice (lines {vocab[token] + 1} and {number}): "
                "Google's tokenization.py versions disagree on its id, so the output would not be "
                "reproducible. Remove the repeated line (blank lines count as the empty token).")
        vocab[token] = len(vocab)
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise UsageError(
            f"the vocabulary {path} has no {', '.join(missing)} token{'s' if len(missing) > 1 else ''}: "
            "BERT's pretraining data needs [CLS] and [SEP] around the two segments, [MASK] for masked "
            "positions and [UNK] for words WordPiece cannot spell. Pass the vocab.txt of a BERT model "
            "(one token per line).")
    return vocab


# --- Google's code, ported line by line (the exact reference) -----------------------------------


def _is_whitespace(ch: str) -> bool:
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
    return ch not in "\t\n\r" and unicodedata.category(ch) in ("Cc", "Cf")


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_chinese_char(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def basic_tokenize(text: str, do_lower_case: bool) -> list[str]:
    """Google's ``BasicTokenizer.tokenize`` (without the preserve_unused_tokens option, off by default)."""
    cleaned = []
    for ch in text:
        cp = ord(ch)
        if cp == 0 or cp == 0xFFFD or _is_control(ch):
            continue
        if _is_whitespace(ch):
            cleaned.append(" ")
        elif _is_chinese_char(cp):
            cleaned.append(f" {ch} ")
        else:
            cleaned.append(ch)
    words = []
    for word in "".join(cleaned).split():
        if do_lower_case:
            word = word.lower()
            word = "".join(c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn")
        piece = []
        for ch in word:
            if _is_punctuation(ch):
                if piece:
                    words.append("".join(piece))
                    piece = []
                words.append(ch)
            else:
                piece.append(ch)
        if piece:
            words.append("".join(piece))
    return " ".join(words).split()


def wordpiece(word: str, vocab: dict[str, int]) -> list[int]:
    """Google's ``WordpieceTokenizer`` on one word, as ids."""
    if len(word) > MAX_INPUT_CHARS_PER_WORD:
        return [vocab["[UNK]"]]
    ids, start = [], 0
    while start < len(word):
        end = len(word)
        while start < end:
            sub = word[start:end] if start == 0 else "##" + word[start:end]
            if sub in vocab:
                ids.append(vocab[sub])
                break
            end -= 1
        else:
            return [vocab["[UNK]"]]
        start = end
    return ids


def python_tokenize(text: str, vocab: dict[str, int], do_lower_case: bool) -> list[int]:
    """Google's ``FullTokenizer(...).tokenize`` followed by ``convert_tokens_to_ids``."""
    ids = []
    for word in basic_tokenize(text, do_lower_case):
        ids += wordpiece(word, vocab)
    return ids


# --- the fast path ------------------------------------------------------------------------------


# Each new non-ASCII character is tried alone and in these contexts, through both pipelines; a line
# with any character on which they differ goes the Python way. Contexts: inside a word, at the end
# of one (final sigma), doubled, before a combining accent, between punctuation.
_CONTEXTS = ("{c}", "Ab{c}Cd {c}x", "Ab{c} x", "{c}{c}", "x{c}\u0301 ", "({c}.")


class GoogleTokenizer:
    """Lines of text -> WordPiece ids, as Google's FullTokenizer (see the module docstring)."""

    def __init__(self, vocab: dict[str, int], do_lower_case: bool = True):
        self.vocab = vocab
        self.do_lower_case = do_lower_case
        self._fast = _rust_tokenizer(vocab, do_lower_case)
        self._safe: dict[str, bool] = {}
        self.python_lines = 0  # lines that took the Python path (for the summary and tests)

    def _needs_python(self, line: str) -> bool:
        if line.isascii():
            return False
        cache = self._safe
        for ch in set(line):
            ok = cache.get(ch)
            if ok is None:
                ok = cache[ch] = ch.isascii() or self._agree_on(ch)
            if not ok:
                return True
        return False

    def _agree_on(self, ch: str) -> bool:
        normalize, pre_tokenize = self._fast.normalizer.normalize_str, self._fast.pre_tokenizer.pre_tokenize_str
        for context in _CONTEXTS:
            text = context.format(c=ch)
            if basic_tokenize(text, self.do_lower_case) != [w for w, _ in pre_tokenize(normalize(text))]:
                return False
        return True

    def tokenize_lines(self, lines: list[str]) -> list[np.ndarray]:
        """Ids of every line (lines already stripped, as Google's reader does)."""
        out: list = [None] * len(lines)
        fast_rows, fast_text = [], []
        for i, line in enumerate(lines):
            if self._needs_python(line):
                out[i] = np.asarray(python_tokenize(line, self.vocab, self.do_lower_case), dtype=np.int32)
                self.python_lines += 1
            else:
                fast_rows.append(i)
                fast_text.append(line)
        if fast_text:
            for i, enc in zip(fast_rows, self._fast.encode_batch(fast_text, add_special_tokens=False)):
                out[i] = np.asarray(enc.ids, dtype=np.int32)
        return out


def _rust_tokenizer(vocab: dict[str, int], do_lower_case: bool):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]",
                                     max_input_chars_per_word=MAX_INPUT_CHARS_PER_WORD))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=do_lower_case, lowercase=do_lower_case)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tok
