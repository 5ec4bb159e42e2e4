"""Pretraining data: read a corpus, train a WordPiece tokenizer, pack token ids, mask like BERT.

The pipeline, each stage cached on disk under ``<cache>/<corpus key>/``::

    documents (iterator of str)  --train-->  tokenizer.json          (key: corpus + vocab + casing)
    documents  --encode, stream-->  train-L128.npy / eval-L128.npy   (uint16/int32 rows of seq_len)

With a given tokenizer (a published model's, ``bertopt pretrain --from``) nothing is trained: the
key is the corpus and the tokenizer's content (:func:`tokenizer_fingerprint`: its whole
serialisation, vocabulary and normalizer settings included, and its special token ids), and a copy
of it is kept as ``tokenizer.json`` beside the ids it made.

A row is ``[CLS] t1 ... t_{L-2} [SEP]`` cut from the stream of all documents' tokens, with a
``[SEP]`` between documents, so every row is full (no padding, no attention mask needed).
Documents are assigned to the held-out split by a hash of their text (about 1 in 20), so the
split does not depend on corpus order and no held-out text is seen in training.
Token ids are streamed to disk in chunks and read back as memory maps: corpora much larger than
memory work.

Masking (:func:`mask_tokens`) follows google-research/bert ``create_pretraining_data.py``:
round(15%) of the non-special positions of each row are selected, of these 80% become
``[MASK]``, 10% a random token, 10% stay; the loss is computed only at the selected positions.
With ``word_start=word_start_table(tokenizer)`` it masks whole words instead (``do_whole_word_mask``:
all ``##`` pieces of a chosen word together), as Google's later BERT models were trained. Either way
one call is a few vectorised numpy passes over the batch: for 256 x 128 tokens of the Wikipedia
sample about 2.5 ms per call, 3.8 ms with whole words (2 shared cores).

The default corpus is the English Wikipedia sample (about 200 pages, CC BY-SA) that ships inside
the ``gensim`` wheel as test data; it is located without importing gensim.
"""

from __future__ import annotations

import bz2
import hashlib
import html
import importlib.util
import json
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(len(SPECIAL_TOKENS))  # the trainer assigns them first
DATA_FORMAT = 1  # bump when reading/cleaning/packing changes: old caches are then ignored
WIKI_SAMPLE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
HELD_OUT_ONE_IN = 20


class CorpusError(ValueError):
    """The corpus cannot be used (missing, empty, unreadable); the message says what to do."""


@dataclass(frozen=True)
class SpecialIds:
    """The ids of a tokenizer's special tokens: a trained tokenizer's (the first five ids) by default,
    a published one's as its tokenizer says (BERT's own vocabulary: [PAD] 0, [UNK] 100, [CLS] 101,
    [SEP] 102, [MASK] 103)."""

    pad: int = PAD_ID
    unk: int = UNK_ID
    cls: int = CLS_ID
    sep: int = SEP_ID
    mask: int = MASK_ID

    def all(self) -> tuple[int, ...]:
        return (self.pad, self.unk, self.cls, self.sep, self.mask)


# --- the default corpus: Wikipedia sample from the gensim wheel -------------------------------


def wiki_sample_path() -> Path:
    """Path of the Wikipedia sample inside the installed gensim package (not imported)."""
    spec = importlib.util.find_spec("gensim")
    hint = ("The default corpus is the Wikipedia sample shipped in the gensim wheel; install it "
            "without its dependencies:  pip install --no-deps gensim   (or pass --corpus PATH)")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(f"gensim is not installed. {hint}")
    for root in spec.submodule_search_locations:
        path = Path(root) / "test" / "test_data" / WIKI_SAMPLE
        if path.is_file():
            return path
    raise CorpusError(f"gensim is installed but its test data file {WIKI_SAMPLE} is missing. {hint}")


_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF = re.compile(r"<ref[^>/]*?/>|<ref[^>]*?>.*?</ref>", re.S | re.I)
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)
_INNER_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_EXTERNAL_LINK = re.compile(r"\[(?:https?|ftp)://[^\s\]]+\s*([^\]]*)\]")
_TAG = re.compile(r"<[^>]+>")
_HEADING = re.compile(r"^=+\s*(.*?)\s*=+\s*$")
_DROP_LINK_PREFIXES = ("file:", "image:", "category:", "media:", "wikt:")
# sections after which an article is only references and link lists
_STOP_SECTIONS = {"references", "external links", "see also", "further reading", "notes", "bibliography",
                  "sources", "footnotes", "notes and references"}
_SHORT_LINE_WORDS = 4


def _replace_link(match: re.Match) -> str:
    target = match.group(1)
    head = target.split("|", 1)[0].strip().lower()
    if head.startswith(_DROP_LINK_PREFIXES) or re.match(r"^[a-z\-]{2,12}:", head):  # files, interwiki
        return ""
    return target.rsplit("|", 1)[-1]


def _remove_nested(pattern: re.Pattern, text: str, repl="") -> str:
    while True:
        text, n = pattern.subn(repl, text)
        if n == 0:
            return text


def clean_wikitext(text: str) -> str:
    """Plain prose from MediaWiki markup: paragraphs separated by blank lines.

    Drops templates, tables, references, files, categories, headings, list markup and
    everything from the References / External links sections on; keeps link texts.
    A small regex cleaner, not a MediaWiki parser: good enough for language-model text.
    """
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _remove_nested(_TEMPLATE, text)
    text = _remove_nested(_TABLE, text)
    text = _remove_nested(_INNER_LINK, text, _replace_link)
    text = _EXTERNAL_LINK.sub(r"\1", text)
    text = text.replace("'''", "").replace("''", "")
    text = _TAG.sub("", text)
    text = html.unescape(text).replace("\xa0", " ")
    paragraphs, current = [], []
    for line in text.split("\n"):
        line = line.strip()
        heading = _HEADING.match(line)
        if heading:
            if heading.group(1).strip().lower() in _STOP_SECTIONS:
                break
            line = ""
        line = line.lstrip("*#:;|!").strip()
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)  # "( )" left where templates were removed
        line = re.sub(r"\s+", " ", line)
        if len(line.split()) < _SHORT_LINE_WORDS or line.startswith(("{", "}", "[")):
            if current:
                paragraphs.append(" ".join(current))
                current = []
            continue
        current.append(line)
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(p.replace(" ,", ",").replace(" .", ".") for p in paragraphs)


def read_wiki_sample(path: str | os.PathLike | None = None) -> Iterator[str]:
    """Articles of a MediaWiki XML dump (.bz2 or plain) as cleaned documents; redirects and
    non-article namespaces skipped."""
    path = Path(path) if path else wiki_sample_path()
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rb") as f:
        for _, element in ET.iterparse(f):
            if element.tag.rsplit("}", 1)[-1] != "page":
                continue
            ns = element.findtext("{*}ns")
            raw = element.findtext("{*}revision/{*}text") or ""
            element.clear()  # keep memory flat on big dumps
            if ns != "0" or raw.lstrip().upper().startswith("#REDIRECT"):
                continue
            text = clean_wikitext(raw)
            if text:
                yield text


# --- user corpora -----------------------------------------------------------------------------


def corpus_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (``*.txt``, recursively, sorted) into a list of files."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not found:
                raise CorpusError(f"--corpus {path}: the folder contains no .txt files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise CorpusError(f"--corpus {path}: no such file or folder")
    if not files:
        raise CorpusError("--corpus: no files given")
    return files


def read_text_files(files: Iterable[Path], *, line_per_document: bool = False) -> Iterator[str]:
    """Documents from UTF-8 text files: blocks separated by blank lines, or one per line."""
    for path in files:
        try:
            with open(path, "rb") as f:
                head = f.read(8192)
            if b"\x00" in head:
                raise CorpusError(f"--corpus {path}: looks like a binary file (NUL bytes); give UTF-8 text files")
            with open(path, encoding="utf-8") as f:
                block: list[str] = []
                for line in f:
                    line = line.strip()
                    if line_per_document:
                        if line:
                            yield line
                    elif line:
                        block.append(line)
                    elif block:
                        yield " ".join(block)
                        block = []
                if block:
                    yield " ".join(block)
        except UnicodeDecodeError as exc:
            raise CorpusError(
                f"--corpus {path}: not valid UTF-8 (byte {exc.start} of a line: {exc.reason}); "
                "convert it, e.g. iconv -f latin1 -t utf-8"
            ) from None
        except OSError as exc:
            raise CorpusError(f"--corpus {path}: cannot be read ({exc.strerror or exc})") from None


@dataclass
class Corpus:
    """A re-readable source of documents and a fingerprint of its content."""

    name: str
    fingerprint: str
    open: Callable[[], Iterator[str]]


def _hash_files(files: list[Path], salt: str) -> str:
    digest = hashlib.sha256(salt.encode())
    for path in files:
        digest.update(f"\0{path.name}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def wiki_corpus(path: str | os.PathLike | None = None) -> Corpus:
    path = Path(path) if path else wiki_sample_path()
    return Corpus(name=f"wikipedia sample ({path.name})",
                  fingerprint=_hash_files([path], f"wiki-v{DATA_FORMAT}"),
                  open=lambda: read_wiki_sample(path))


def text_corpus(paths: Iterable[str | os.PathLike], *, line_per_document: bool = False) -> Corpus:
    files = corpus_files(paths)
    salt = f"text-v{DATA_FORMAT}-{'lines' if line_per_document else 'blocks'}"
    name = str(files[0]) if len(files) == 1 else f"{len(files)} text files"
    return Corpus(name=name, fingerprint=_hash_files(files, salt),
                  open=lambda: read_text_files(files, line_per_document=line_per_document))


def is_held_out(document: str) -> bool:
    """About one document in HELD_OUT_ONE_IN, chosen by content (stable under reordering)."""
    return int.from_bytes(hashlib.blake2b(document.encode(), digest_size=4).digest(), "little") % HELD_OUT_ONE_IN == 0


# --- tokenizer ----------------------------------------------------------------------------------


def train_tokenizer(documents: Iterable[str], vocab_size: int, *, lowercase: bool = True):
    """A BERT WordPiece tokenizer (``tokenizers.Tokenizer``) trained on ``documents``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if vocab_size < len(SPECIAL_TOKENS) + 100:
        raise ValueError(f"--vocab-size must be >= {len(SPECIAL_TOKENS) + 100}, got {vocab_size}")
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=None if lowercase else False)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                        min_frequency=2, show_progress=False)
    tokenizer.train_from_iterator(documents, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", CLS_ID), ("[SEP]", SEP_ID)])
    for i, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != i:
            raise RuntimeError(f"tokenizer put {token} at id {tokenizer.token_to_id(token)}, expected {i}")
    return tokenizer


def save_hf_tokenizer(tokenizer_file: str | os.PathLike, directory: str | os.PathLike, *, lowercase: bool = True) -> None:
    """Save the tokenizer so that ``transformers.AutoTokenizer.from_pretrained(directory)`` loads it."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   do_lower_case=lowercase, model_max_length=512)
    fast.save_pretrained(str(directory))


def tokenizer_fingerprint(tokenizer, special_ids: SpecialIds) -> str:
    """A hash of what decides a ``tokenizers.Tokenizer``'s ids: its full serialisation (vocabulary,
    normalizer and pre-tokenizer settings, model options) and the special ids packing uses."""
    digest = hashlib.sha256(tokenizer.to_str().encode())
    digest.update(repr(special_ids.all()).encode())
    return digest.hexdigest()


# --- packing ------------------------------------------------------------------------------------


def _id_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def _stream_ids(tokenizer, documents: Iterable[str], train_file, eval_file, dtype, sep_id: int,
                chunk_docs: int = 512) -> tuple[int, int, int]:
    """Write the token ids of train / held-out documents (each followed by [SEP]) to two flat
    binary files. Returns (documents, held-out documents, tokens)."""
    n_docs = n_eval = n_tokens = 0
    batch: list[str] = []

    def flush():
        nonlocal n_tokens
        encodings = tokenizer.encode_batch(batch, add_special_tokens=False)
        for doc, enc in zip(batch, encodings):
            ids = np.asarray(enc.ids + [sep_id], dtype=dtype)
            (eval_file if is_held_out(doc) else train_file).write(ids.tobytes())
            n_tokens += len(ids)
        batch.clear()

    for doc in documents:
        n_docs += 1
        n_eval += is_held_out(doc)
        batch.append(doc)
        if len(batch) >= chunk_docs:
            flush()
    if batch:
        flush()
    return n_docs, n_eval, n_tokens


def _pack(flat_path: Path, out_path: Path, seq_len: int, dtype, specials: SpecialIds) -> int:
    """Rows ``[CLS] chunk [SEP]`` from a flat id file, written as a .npy (atomically)."""
    flat = np.memmap(flat_path, dtype=dtype, mode="r") if flat_path.stat().st_size else np.zeros(0, dtype)
    body = seq_len - 2
    rows = len(flat) // body
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    try:
        packed = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(rows, seq_len))
        step = max(1, (1 << 22) // seq_len)  # ~4M ids per chunk
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            packed[start:stop, 0] = specials.cls
            packed[start:stop, 1:-1] = np.asarray(flat[start * body:stop * body]).reshape(-1, body)
            packed[start:stop, -1] = specials.sep
        packed.flush()
        del packed, flat
        os.replace(tmp, out_path)
    except BaseException:  # Ctrl-C, full disk: leave no half-written file in the cache
        tmp.unlink(missing_ok=True)
        raise
    return rows


@dataclass
class PretrainingData:
    directory: Path
    tokenizer_file: Path
    vocab_size: int
    seq_len: int
    train: np.ndarray  # (rows, seq_len) memory map
    eval: np.ndarray
    stats: dict
    special_ids: SpecialIds = SpecialIds()

    def load_tokenizer(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self.tokenizer_file))


def prepare_data(corpus: Corpus, cache_dir: str | os.PathLike, *, seq_len: int, vocab_size: int | None = None,
                 lowercase: bool | None = True, tokenizer=None, special_ids: SpecialIds | None = None,
                 log: Callable[[str], None] = print, _rebuilt: bool = False) -> PretrainingData:
    """Tokenizer and packed sequences for ``corpus``, built once and then read from the cache.

    The tokenizer is trained (``vocab_size``, ``lowercase``) unless one is given: ``tokenizer``, a
    ``tokenizers.Tokenizer``, with its ``special_ids`` (``lowercase`` is then only recorded)."""
    import time

    from tokenizers import Tokenizer

    if not 8 <= seq_len <= 4096:
        raise ValueError(f"--seq-len must be between 8 and 4096, got {seq_len}")
    if tokenizer is None:
        specials = SpecialIds()
        key_text = f"{corpus.fingerprint}|{vocab_size}|{int(lowercase)}|{DATA_FORMAT}"
    else:
        if special_ids is None:
            raise ValueError("prepare_data: a given tokenizer needs its special_ids")
        specials = special_ids
        key_text = f"{corpus.fingerprint}|given:{tokenizer_fingerprint(tokenizer, specials)}|{DATA_FORMAT}"
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    directory = Path(cache_dir) / key
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer_file = directory / "tokenizer.json"
    meta_file = directory / f"meta-L{seq_len}.json"
    train_file, eval_file = directory / f"train-L{seq_len}.npy", directory / f"eval-L{seq_len}.npy"

    given = tokenizer is not None
    if given and not tokenizer_file.exists():  # the record of which tokenizer made these ids
        tmp = directory / f".tokenizer.json.tmp-{os.getpid()}"
        tokenizer.save(str(tmp))
        os.replace(tmp, tokenizer_file)
    if not given and tokenizer_file.exists():
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # damaged outside bertopt (it writes atomically): build it again
            log(f"note: the cached tokenizer {tokenizer_file} cannot be read ({exc}); training it again")
            for stale in (tokenizer_file, *directory.glob("meta-L*.json")):
                stale.unlink(missing_ok=True)
    if tokenizer is None:  # train one (a trained tokenizer's key has no tokenizer content in it)
        start = time.perf_counter()
        tokenizer = train_tokenizer(corpus.open(), vocab_size, lowercase=lowercase)
        if tokenizer.get_vocab_size() <= len(SPECIAL_TOKENS):
            raise CorpusError(f"corpus {corpus.name} is empty: no text to train a tokenizer on")
        tmp = directory / f".tokenizer.json.tmp-{os.getpid()}"
        tokenizer.save(str(tmp))
        os.replace(tmp, tokenizer_file)
        log(f"trained a WordPiece tokenizer ({tokenizer.get_vocab_size()} tokens) on {corpus.name} "
            f"in {time.perf_counter() - start:.1f}s -> {tokenizer_file}")
    actual_vocab = tokenizer.get_vocab_size()
    dtype = _id_dtype(actual_vocab)

    if not (meta_file.exists() and train_file.exists() and eval_file.exists()):
        start = time.perf_counter()
        flat_train, flat_eval = directory / f".train-ids.tmp-{os.getpid()}", directory / f".eval-ids.tmp-{os.getpid()}"
        try:
            with open(flat_train, "wb") as ft, open(flat_eval, "wb") as fe:
                n_docs, n_eval_docs, n_tokens = _stream_ids(tokenizer, corpus.open(), ft, fe, dtype, specials.sep)
            if n_docs == 0:
                raise CorpusError(f"corpus {corpus.name} contains no documents (all files empty?)")
            train_rows = _pack(flat_train, train_file, seq_len, dtype, specials)
            eval_rows = _pack(flat_eval, eval_file, seq_len, dtype, specials)
        finally:
            flat_train.unlink(missing_ok=True)
            flat_eval.unlink(missing_ok=True)
        stats = {"corpus": corpus.name, "documents": n_docs, "held_out_documents": n_eval_docs,
                 "tokens": n_tokens, "train_sequences": train_rows, "eval_sequences": eval_rows,
                 "seq_len": seq_len, "vocab_size": actual_vocab, "lowercase": lowercase}
        tmp = meta_file.with_name(f".{meta_file.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(stats, indent=1))
        os.replace(tmp, meta_file)
        log(f"tokenized {n_docs} documents ({n_tokens:,} tokens) into {train_rows:,} training and "
            f"{eval_rows:,} held-out sequences of {seq_len} tokens in {time.perf_counter() - start:.1f}s")
    try:
        stats = json.loads(meta_file.read_text())
        train, held_out = np.load(train_file, mmap_mode="r"), np.load(eval_file, mmap_mode="r")
        if train.ndim != 2 or train.shape[1:] != (seq_len,) or held_out.shape[1:] != (seq_len,) \
                or len(train) != stats["train_sequences"] or len(held_out) != stats["eval_sequences"]:
            raise ValueError(f"shapes {train.shape} / {held_out.shape} do not match {meta_file.name}")
    except (OSError, ValueError, KeyError, EOFError) as exc:
        if _rebuilt:
            raise
        # damaged outside bertopt (it writes atomically): drop this sequence length's files, build them again
        log(f"note: the cached sequences in {directory} cannot be read ({exc}); building them again")
        for stale in (meta_file, train_file, eval_file):
            stale.unlink(missing_ok=True)
        return prepare_data(corpus, cache_dir, vocab_size=vocab_size, seq_len=seq_len, lowercase=lowercase,
                            tokenizer=tokenizer if given else None, special_ids=special_ids, log=log, _rebuilt=True)
    return PretrainingData(directory=directory, tokenizer_file=tokenizer_file, vocab_size=actual_vocab,
                           seq_len=seq_len, train=train, eval=held_out, stats=stats, special_ids=specials)


# --- masking ------------------------------------------------------------------------------------


@dataclass
class MaskedBatch:
    input_ids: np.ndarray  # (B, L) int64, with [MASK] / random / kept tokens at selected positions
    rows: np.ndarray  # (M,) row of each selected position
    cols: np.ndarray  # (M,) column of each selected position
    labels: np.ndarray  # (M,) original token at each selected position


def word_start_table(tokenizer) -> np.ndarray:
    """For whole-word masking: a boolean array indexed by token id, True where the token begins a
    word and False for a WordPiece continuation piece (``##ing``). Special tokens count as word
    starts (:func:`mask_tokens` never selects them anyway).

    ``tokenizer`` is a ``tokenizers.Tokenizer`` or a transformers fast tokenizer (such as a published
    BERT's ``BertTokenizerFast``), or anything with ``get_vocab()``: token -> id; the continuation
    prefix is the WordPiece model's (``continuing_subword_prefix``), ``##`` otherwise."""
    vocab = tokenizer.get_vocab()
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)  # what a transformers fast tokenizer wraps
    prefix = getattr(getattr(backend, "model", None), "continuing_subword_prefix", None)
    prefix = prefix if isinstance(prefix, str) and prefix else "##"
    size = max(vocab.values(), default=-1) + 1
    if hasattr(tokenizer, "get_vocab_size"):
        size = max(size, tokenizer.get_vocab_size())
    table = np.ones(size, dtype=bool)
    table[[i for token, i in vocab.items() if token.startswith(prefix)]] = False
    return table


def mask_tokens(ids: np.ndarray, rng: np.random.Generator, *, vocab_size: int, mask_prob: float = 0.15,
                special_ids: tuple[int, ...] = SpecialIds().all(), mask_id: int = MASK_ID,
                word_start: np.ndarray | None = None) -> MaskedBatch:
    """BERT's masking: per row, round(mask_prob * candidates) positions (at least 1) chosen among
    the non-special tokens; 80% replaced by [MASK] (``mask_id``), 10% by a random token above the
    special ids, 10% kept.

    ``word_start`` (from :func:`word_start_table`: a boolean array indexed by token id, True where a
    token begins a word) turns on whole-word masking, as ``create_pretraining_data.py`` does with
    ``do_whole_word_mask``: a word is a token and the ``##`` pieces that follow it; the words of a
    row are shuffled and taken in that order while they fit, a word that would exceed the row's
    number of predictions is skipped (a later, shorter one may still fit), so every piece of a
    chosen word is predicted and a row gets at most that number (possibly fewer, even none when no
    word is short enough). The 80/10/10 replacement is still decided per token. A continuation
    piece with no word start before it in the row (a word split across packed rows, or one
    right after [CLS]/[SEP]) counts as a word of its own. With ``word_start=None`` the result,
    and the random numbers drawn, are exactly those of plain token masking.
    """
    if not 0.0 < mask_prob < 1.0:
        raise ValueError(f"--mask-prob must be in (0, 1), got {mask_prob}")
    ids = np.asarray(ids, dtype=np.int64)
    candidates = ~np.isin(ids, special_ids)
    n_candidates = candidates.sum(axis=1)
    n_select = np.minimum(n_candidates, np.maximum(1, np.round(n_candidates * mask_prob))).astype(np.int64)
    scores = rng.random(ids.shape)
    if word_start is None:
        scores[~candidates] = 2.0  # never chosen while a candidate remains
        order = np.argsort(scores, axis=1, kind="stable")
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.broadcast_to(np.arange(ids.shape[1]), ids.shape), axis=1)
        selected = rank < n_select[:, None]
    else:
        selected = _select_whole_words(ids, candidates, n_select, scores, word_start)

    action = rng.random(ids.shape)
    inputs = ids.copy()
    inputs[selected & (action < 0.8)] = mask_id
    randomize = selected & (action >= 0.8) & (action < 0.9)
    first_regular = max(special_ids) + 1  # a trained tokenizer's specials are its first ids; BERT's end at 103
    inputs[randomize] = rng.integers(first_regular, vocab_size, size=int(randomize.sum()))
    rows, cols = np.nonzero(selected)
    return MaskedBatch(input_ids=inputs, rows=rows, cols=cols, labels=ids[rows, cols])


def _select_whole_words(ids: np.ndarray, candidates: np.ndarray, n_select: np.ndarray, scores: np.ndarray,
                        word_start: np.ndarray) -> np.ndarray:
    """The (B, L) selection of whole-word masking (see :func:`mask_tokens`). A word's random score
    is that of its first piece: sorting the scores shuffles the words of each row. Google's greedy
    pass (take a word if it still fits, else skip it) is a cumulative sum up to each row's first
    misfit, then a loop over the later words of the rows that still have room."""
    word_start = np.asarray(word_start, dtype=bool)
    if word_start.ndim != 1:
        raise ValueError(f"word_start must be a 1-D boolean array indexed by token id, got shape {word_start.shape}")
    if ids.size and int(ids.max()) >= len(word_start):
        raise ValueError(f"token id {int(ids.max())} is outside word_start (covers {len(word_start)} ids): "
                         "build it from the tokenizer that produced the ids (word_start_table)")
    n_rows, n_cols = ids.shape
    starts = candidates & word_start[ids]
    starts[:, 0] = candidates[:, 0]
    starts[:, 1:] |= candidates[:, 1:] & ~candidates[:, :-1]  # a piece after a special token starts a word
    word_of = np.cumsum(starts, axis=1) - 1  # index of each position's word in its row (-1 before the first)
    np.maximum(word_of, 0, out=word_of)  # only used at candidate positions, which always have a word
    flat_word = word_of + (np.arange(n_rows) * n_cols)[:, None]
    word_len = np.bincount(flat_word[candidates], minlength=n_rows * n_cols).reshape(n_rows, n_cols)

    order = np.argsort(np.where(starts, scores, 2.0), axis=1, kind="stable")  # start columns, shuffled
    shuffled_word = np.take_along_axis(word_of, order, axis=1)
    shuffled_len = np.where(np.take_along_axis(starts, order, axis=1),
                            np.take_along_axis(word_len, shuffled_word, axis=1), 0)
    # Google's greedy pass: take each word while it fits, skip one that would exceed n_select. Up to a
    # row's first misfit that is a prefix of the cumulative lengths; after it, a loop over the later
    # words of the rows with room left, which ends when every row is full or out of words.
    fitting = np.cumsum(shuffled_len, axis=1) <= n_select[:, None]
    first_misfit = np.where(fitting.all(axis=1), n_cols, np.argmin(fitting, axis=1))
    taken = fitting & (shuffled_len > 0)  # past a row's words (length 0) nothing is taken
    room = n_select - np.where(taken, shuffled_len, 0).sum(axis=1)
    n_words = starts.sum(axis=1)
    active = np.flatnonzero((room > 0) & (first_misfit + 1 < n_words))
    k = int(first_misfit[active].min()) + 1 if active.size else n_cols  # a misfit never fits later
    while active.size and k < n_cols:
        length = shuffled_len[active, k]  # 0 past a row's last word
        fits = (k > first_misfit[active]) & (length > 0) & (length <= room[active])
        taken[active[fits], k] = True
        room[active[fits]] -= length[fits]
        k += 1
        active = active[(room[active] > 0) & (n_words[active] > k)]

    word_taken = np.zeros((n_rows, n_cols), dtype=bool)  # (row, word index within the row)
    taken_rows, taken_k = np.nonzero(taken)
    word_taken[taken_rows, shuffled_word[taken_rows, taken_k]] = True
    return candidates & np.take_along_axis(word_taken, word_of, axis=1)
