"""Google BERT's ``create_pretraining_data.py``, exactly, in bounded memory.

Same instances in the same order as Google's script for the same input, vocabulary, seed and
options: every draw of its ``random.Random(seed)`` is made here too, in the same order and by the
same methods (``shuffle``; ``randint(a, b)`` as ``a + _randbelow(b - a + 1)``, which is what
``randint`` does; ``random()``): the document shuffle, per document the short-target draw, the
split point ``a_end``, the random-next coin, the random document (up to 10 tries to avoid the same
one) and its start sentence, ``truncate_seq_pair``'s front/back coins, the masking's candidate
shuffle (of whole words with ``do_whole_word_mask``, as in Google's later version of the script),
the 80/10/10 draws and the random word, and the final shuffle of all instances.

Memory: Google holds every instance of every dupe pass as Python objects until its final
shuffle. Here the tokenized documents live in one token file read with ``pread`` (sentence and
document offsets beside it: the random next segment needs any document at any time), each
instance goes to a fixed-size record of a temporary file as it is made, and the final shuffle runs on an array of
instance numbers (4 bytes each) with the same draws as ``random.shuffle``. The output files are
then written in that order, round-robin over the files as Google's
``write_instance_to_example_files`` does.
"""

from __future__ import annotations

import array
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from bertopt.errors import UsageError
from bertopt.interop import tfrecord
from bertopt.interop.google_tokenizer import GoogleTokenizer, load_vocab

LINES_PER_BATCH = 1024  # lines tokenized together (tokenizers keeps ~250 bytes per token of a batch)
INSTANCES_PER_BLOCK = 8192  # instance records made between two writes to the temporary file
WRITE_BLOCK = 2048  # Examples encoded at once (the vectorized encoder needs ~25 bytes per output byte)
LONG_DOCUMENT_LINES = 100_000  # a "document" this long is most likely a file without blank lines


@dataclass
class PairOptions:
    """Google's flags, same names and defaults."""

    max_seq_length: int = 128
    max_predictions_per_seq: int = 20
    masked_lm_prob: float = 0.15
    random_seed: int = 12345
    dupe_factor: int = 10
    short_seq_prob: float = 0.1
    do_lower_case: bool = True
    do_whole_word_mask: bool = False

    def check(self) -> None:
        if self.max_seq_length < 5:
            raise UsageError(
                f"--max-seq-length {self.max_seq_length} is too small: an instance is [CLS] A [SEP] B [SEP] with at "
                "least one token in each segment, so it needs at least 5 (Google's script fails below that; "
                "BERT used 128 and 512).")
        if self.max_predictions_per_seq < 1:
            raise UsageError("--max-predictions-per-seq must be at least 1 (Google masks at least one token "
                             "per instance; BERT used 20 at length 128 and 80 at 512).")
        if not 0.0 <= self.masked_lm_prob <= 1.0 or not 0.0 <= self.short_seq_prob <= 1.0:
            raise UsageError("--masked-lm-prob and --short-seq-prob are probabilities: give values in [0, 1] "
                             "(Google's defaults are 0.15 and 0.1).")
        if self.dupe_factor < 1:
            raise UsageError("--dupe-factor must be at least 1 (it is the number of passes over the corpus, each "
                             "with different masks; Google's default is 10).")


class Corpus:
    """Tokenized documents. The token file holds every sentence's ids back to back; sentence k is
    tokens ``sentence_starts[k]:sentence_starts[k + 1]``; document d is sentences
    ``doc_starts[d]:doc_starts[d + 1]``. Tokens are read with ``pread``, not a memory map: instance
    making reads any document at random, and mapped pages would count in the resident set (the
    kernel maps pages around each one touched), read pages only sit in the page cache."""

    def __init__(self, path: str, dtype, sentence_starts, doc_starts, lines: int = 0, python_lines: int = 0):
        self.path, self.dtype = path, np.dtype(dtype)
        self.sentence_starts, self.doc_starts = sentence_starts, doc_starts
        self.lines, self.python_lines = lines, python_lines
        self._fd = os.open(path, os.O_RDONLY)

    @property
    def documents(self) -> int:
        return len(self.doc_starts) - 1

    def tokens(self, start: int, stop: int) -> list[int]:
        size = self.dtype.itemsize
        return np.frombuffer(os.pread(self._fd, (stop - start) * size, start * size), dtype=self.dtype).tolist()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# --- reading and tokenizing ---------------------------------------------------------------------


def _line_batches(paths: list[str]):
    """Stripped lines of every file, in batches, as Google reads them (split at '\\n' only)."""
    batch: list[str] = []
    for path in paths:
        with open(path, "rb") as f:
            rest = b""
            number = 0
            while True:
                block = f.read(1 << 20)
                if not block:
                    break
                parts = (rest + block).split(b"\n")
                rest = parts.pop()
                for raw in parts:
                    number += 1
                    batch.append(_decode(raw, path, number).strip())
                    if len(batch) >= LINES_PER_BATCH:
                        yield batch
                        batch = []
            if rest:
                batch.append(_decode(rest, path, number + 1).strip())
    if batch:
        yield batch


def _decode(raw: bytes, path: str, number: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(
            f"{path}, line {number}: not UTF-8 ({e.reason} at byte {e.start} of the line). Google's script "
            "reads UTF-8 text and stops on this too; convert the file (e.g. iconv -f latin1 -t utf-8) or drop "
            "the bad bytes (iconv -c -f utf-8 -t utf-8).") from None


_worker_tokenizer: GoogleTokenizer | None = None


def _init_worker(vocab, do_lower_case):
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = GoogleTokenizer(vocab, do_lower_case)


def _tokenize_batch(lines: list[str]):
    """(ids of all lines back to back, per-line lengths, empty-line flags, python lines)."""
    tok = _worker_tokenizer
    before = tok.python_lines
    ids = tok.tokenize_lines(lines)
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.concatenate(ids) if ids else np.zeros(0, np.int32)
    empty = np.fromiter((not line for line in lines), dtype=bool, count=len(lines))
    return flat, lengths, empty, tok.python_lines - before


def read_corpus(paths: list[str], vocab: dict[str, int], do_lower_case: bool, workdir: str,
                workers: int = 1) -> Corpus:
    """Google's reading loop: a blank line starts a new document, lines without tokens are skipped,
    empty documents dropped. Tokens go to ``workdir/tokens.bin``."""
    token_dtype = np.uint16 if len(vocab) <= 1 << 16 else np.int32
    token_path = os.path.join(workdir, "tokens.bin")
    sentence_lengths = array.array("q")
    doc_sentence_counts = array.array("q", [0])  # Google's all_documents = [[]]
    doc_first_line = array.array("q", [1])  # line number (over all files) where each document starts
    lines_seen = python_lines = 0
    line_file = _line_origin(paths)
    batches = _line_batches(paths)
    if workers > 1:
        import multiprocessing as mp
        pool = mp.get_context("fork").Pool(workers, _init_worker, (vocab, do_lower_case))
        results = pool.imap(_tokenize_batch, batches)
    else:
        pool = None
        _init_worker(vocab, do_lower_case)
        results = map(_tokenize_batch, batches)
    try:
        with open(token_path, "wb") as out:
            for flat, lengths, empty, py in results:
                python_lines += py
                keep = lengths > 0
                flat.astype(token_dtype).tofile(out)
                # Document breaks: each empty line appends a new document.
                if empty.any():
                    breaks = np.flatnonzero(empty)
                    segments = np.split(keep, breaks)
                    doc_sentence_counts[-1] += int(segments[0].sum())
                    for b, seg in zip(breaks.tolist(), segments[1:]):
                        doc_sentence_counts.append(int(seg[1:].sum()))
                        if doc_sentence_counts[-2] > LONG_DOCUMENT_LINES:
                            _warn_long(line_file(doc_first_line[-1]), doc_sentence_counts[-2])
                        doc_first_line.append(lines_seen + b + 2)
                else:
                    doc_sentence_counts[-1] += int(keep.sum())
                sentence_lengths.extend(lengths[keep].tolist())
                lines_seen += len(lengths)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    counts = np.frombuffer(doc_sentence_counts, dtype=np.int64)
    if counts[-1] > LONG_DOCUMENT_LINES:
        _warn_long(line_file(doc_first_line[-1]), int(counts[-1]))
    nonempty = counts[counts > 0]
    doc_starts = np.concatenate([[0], np.cumsum(nonempty)])
    sentence_starts = np.concatenate([[0], np.cumsum(np.frombuffer(sentence_lengths, dtype=np.int64))])
    if len(nonempty) < 2:
        raise UsageError(
            f"the input has {len(nonempty)} document{'s' if len(nonempty) != 1 else ''} ({lines_seen} lines in "
            f"{', '.join(paths)}): the next-sentence task draws its random second segments from *other* "
            "documents, so it needs at least two. The format is Google's: one sentence per line, and a blank "
            "line between documents (e.g. between articles or books). Add the blank lines.")
    return Corpus(token_path, token_dtype, sentence_starts, doc_starts, lines_seen, python_lines)


def _line_origin(paths):
    """Line number (1-based, over all files) -> (file, line in that file); counted lazily."""
    counts: list[int] = []

    def origin(n):
        if not counts:  # lines as _line_batches yields them: a last line without "\n" counts too
            for p in paths:
                newlines, last = 0, b"\n"
                with open(p, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        newlines += block.count(b"\n")
                        last = block[-1:]
                counts.append(newlines + (last != b"\n"))
        for p, c in zip(paths, counts):
            if n <= c:
                return p, n
            n -= c
        return paths[-1], n
    return origin


def _warn_long(first, lines):
    path, line = first
    warnings.warn(
        f"{path}: the document starting at line {line} has {lines} lines with no blank line: documents are "
        "separated by blank lines (one sentence per line). If this file has no document breaks, the "
        "next-sentence pairs and random segments will not be what BERT expects; add blank lines between "
        "documents.", stacklevel=2)


# --- instances ----------------------------------------------------------------------------------

_BITS = [n.bit_length() for n in range(1 << 12)]


def _shuffler(rng):
    """``rng.shuffle``, or the same draws made inline (about twice as fast) when ``rng`` is a plain
    ``random.Random``, whose ``_randbelow(n)`` is ``getrandbits(n.bit_length())`` until below n."""
    import random as _random

    if not (type(rng) is _random.Random
            and getattr(_random.Random, "_randbelow", None) is getattr(_random.Random, "_randbelow_with_getrandbits", 0)):
        return rng.shuffle
    getrandbits, bits = rng.getrandbits, _BITS

    def shuffle(x):
        for i in range(len(x) - 1, 0, -1):
            n = i + 1
            k = bits[n] if n < 4096 else n.bit_length()
            j = getrandbits(k)
            while j >= n:
                j = getrandbits(k)
            x[i], x[j] = x[j], x[i]
    return shuffle



def _record_dtype(options: PairOptions, token_dtype) -> np.dtype:
    return np.dtype([("ids", token_dtype, (options.max_seq_length,)), ("length", np.uint16),
                     ("segment_a", np.uint16), ("positions", np.uint16, (options.max_predictions_per_seq,)),
                     ("labels", token_dtype, (options.max_predictions_per_seq,)), ("n_masked", np.uint16),
                     ("random_next", np.uint8)])


class InstanceMaker:
    """Google's create_instances_from_document and create_masked_lm_predictions on a Corpus,
    drawing from ``rng`` exactly as they do; instances go to fixed-size records of a file."""

    def __init__(self, corpus: Corpus, vocab: dict[str, int], options: PairOptions, rng, out):
        self.corpus, self.options, self.rng, self.out = corpus, options, rng, out
        self.cls, self.sep, self.mask = vocab["[CLS]"], vocab["[SEP]"], vocab["[MASK]"]
        self.vocab_size = len(vocab)
        self.continues_word = [w.startswith("##") for w in vocab]  # vocab ids are dense in line order
        self.dtype = _record_dtype(options, corpus.dtype)
        self.block = np.zeros(INSTANCES_PER_BLOCK, dtype=self.dtype)
        self.shuffle = _shuffler(rng)
        self.filled = 0
        self.count = 0
        # array.array: Python-speed indexing at 8 bytes per sentence (a list would take ~36)
        self.sentence_starts = array.array("q", corpus.sentence_starts.astype(np.int64).tobytes())
        self.doc_starts = array.array("q", corpus.doc_starts.astype(np.int64).tobytes())

    def flush(self) -> None:
        self.block[:self.filled].tofile(self.out)
        self.block[:self.filled] = 0
        self.filled = 0

    def document(self, doc_order: list[int], document_index: int) -> None:
        """All instances of the document at ``document_index`` of the shuffled list."""
        rng, opts = self.rng, self.options
        random, randbelow = rng.random, rng._randbelow
        sstarts, dstarts = self.sentence_starts, self.doc_starts
        doc = doc_order[document_index]
        first, n_sentences = dstarts[doc], dstarts[doc + 1] - dstarts[doc]
        n_docs = len(doc_order)
        max_num_tokens = opts.max_seq_length - 3
        target_seq_length = max_num_tokens
        if random() < opts.short_seq_prob:
            target_seq_length = 2 + randbelow(max_num_tokens - 1)  # randint(2, max_num_tokens)
        chunk_first, chunk_size, current_length = 0, 0, 0
        i = 0
        while i < n_sentences:
            if chunk_size == 0:
                chunk_first = i
            chunk_size += 1
            current_length += sstarts[first + i + 1] - sstarts[first + i]
            if i == n_sentences - 1 or current_length >= target_seq_length:
                a_end = 1
                if chunk_size >= 2:
                    a_end = 1 + randbelow(chunk_size - 1)  # randint(1, len(current_chunk) - 1)
                a_start = sstarts[first + chunk_first]
                a_stop = sstarts[first + chunk_first + a_end]
                if chunk_size == 1 or random() < 0.5:
                    is_random_next = True
                    target_b_length = target_seq_length - (a_stop - a_start)
                    for _ in range(10):
                        random_document_index = randbelow(n_docs)  # randint(0, len(all_documents) - 1)
                        if random_document_index != document_index:
                            break
                    rdoc = doc_order[random_document_index]
                    r_first, r_count = dstarts[rdoc], dstarts[rdoc + 1] - dstarts[rdoc]
                    random_start = randbelow(r_count)  # randint(0, len(random_document) - 1)
                    b_start = sstarts[r_first + random_start]
                    b_stop = b_start
                    for j in range(random_start, r_count):
                        b_stop = sstarts[r_first + j + 1]
                        if b_stop - b_start >= target_b_length:
                            break
                    i -= chunk_size - a_end  # the unused sentences are put back
                else:
                    is_random_next = False
                    b_start = a_stop
                    b_stop = sstarts[first + chunk_first + chunk_size]
                # truncate_seq_pair, on the two token ranges
                while (a_stop - a_start) + (b_stop - b_start) > max_num_tokens:
                    if a_stop - a_start > b_stop - b_start:
                        if random() < 0.5:
                            a_start += 1
                        else:
                            a_stop -= 1
                    elif random() < 0.5:
                        b_start += 1
                    else:
                        b_stop -= 1
                self._instance(a_start, a_stop, b_start, b_stop, is_random_next)
                chunk_size, current_length = 0, 0
            i += 1

    def _instance(self, a_start, a_stop, b_start, b_stop, is_random_next):
        rng, opts = self.rng, self.options
        random, randbelow = rng.random, rng._randbelow
        tokens = self.corpus.tokens
        ids = [self.cls]
        ids += tokens(a_start, a_stop)
        ids.append(self.sep)
        segment_a = len(ids)
        ids += tokens(b_start, b_stop)
        ids.append(self.sep)
        n = len(ids)
        sep_b = segment_a - 1
        # candidates: every position but [CLS] and the two [SEP]s
        if opts.do_whole_word_mask:
            cont = self.continues_word
            cand = []
            for p in range(1, n - 1):
                if p == sep_b:
                    continue
                if cand and cont[ids[p]]:
                    cand[-1].append(p)
                else:
                    cand.append([p])
        else:
            cand = list(range(1, sep_b)) + list(range(segment_a, n - 1))
        self.shuffle(cand)
        num_to_predict = min(opts.max_predictions_per_seq, max(1, int(round(n * opts.masked_lm_prob))))
        output = list(ids)
        masked = []
        mask_id, vocab_size = self.mask, self.vocab_size
        if not opts.do_whole_word_mask:
            cand = [(index,) for index in cand[:num_to_predict]]  # the loop below stops there anyway
        for index_set in cand:
            if len(masked) >= num_to_predict:
                break
            if len(masked) + len(index_set) > num_to_predict:
                continue
            for index in index_set:
                # 80% [MASK], 10% the original token, 10% a random vocabulary word
                if random() < 0.8:
                    output[index] = mask_id
                elif random() >= 0.5:
                    output[index] = randbelow(vocab_size)  # vocab_words[rng.randint(0, len(vocab_words) - 1)]
                masked.append(index)
        masked.sort()
        row = self.block[self.filled]
        row["ids"][:n] = output
        row["length"] = n
        row["segment_a"] = segment_a
        row["positions"][:len(masked)] = masked
        row["labels"][:len(masked)] = [ids[p] for p in masked]
        row["n_masked"] = len(masked)
        row["random_next"] = is_random_next
        self.filled += 1
        self.count += 1
        if self.filled == INSTANCES_PER_BLOCK:
            self.flush()


def shuffle_order(rng, n: int) -> np.ndarray:
    """The permutation ``rng.shuffle`` applies to a list of n items (same draws), as int32/int64."""
    code = "i" if n < 2**31 else "q"
    order = array.array(code, range(n))
    _shuffler(rng)(order)
    return np.frombuffer(order, dtype=np.int32 if code == "i" else np.int64)


# --- writing ------------------------------------------------------------------------------------


def _encoded(records: np.ndarray, options: PairOptions) -> tuple[np.ndarray, np.ndarray]:
    """Serialized Examples of instance records, as Google's write_instance_to_example_files pads them."""
    L, P = options.max_seq_length, options.max_predictions_per_seq
    positions = np.arange(L)
    lengths = records["length"].astype(np.int64)[:, None]
    segment_a = records["segment_a"].astype(np.int64)[:, None]
    return tfrecord.encode_examples(tfrecord.pretraining_columns(
        input_ids=records["ids"], input_mask=positions < lengths,
        segment_ids=(positions >= segment_a) & (positions < lengths),
        masked_lm_positions=records["positions"], masked_lm_ids=records["labels"],
        masked_lm_weights=(np.arange(P) < records["n_masked"].astype(np.int64)[:, None]).astype(np.float32),
        next_sentence_labels=records["random_next"]))


def _read_records(fd: int, dtype: np.dtype, idx: np.ndarray) -> np.ndarray:
    """Records ``idx`` of the instance file, by ``pread`` (see :class:`Corpus` on memory maps)."""
    size = dtype.itemsize
    return np.frombuffer(b"".join([os.pread(fd, size, i * size) for i in idx.tolist()]), dtype=dtype)


def write_outputs(instances_path: str, dtype: np.dtype, order: np.ndarray, options: PairOptions,
                  output_files: list[str]) -> list[int]:
    """Instance ``order[k]`` of the record file goes to ``output_files[k % len(output_files)]``."""
    writers = [tfrecord.TFRecordWriter(p) for p in output_files]
    fd = os.open(instances_path, os.O_RDONLY)
    try:
        for start in range(0, len(order), WRITE_BLOCK):
            block = _read_records(fd, dtype, order[start:start + WRITE_BLOCK])
            for f, writer in enumerate(writers):  # Google's round robin: instance k to file k % files
                writer.write_many(*_encoded(block[(f - start) % len(writers)::len(writers)], options))
    finally:
        os.close(fd)
        for w in writers:
            w.close()
    return [w.count for w in writers]


# --- the whole run ------------------------------------------------------------------------------


@dataclass
class PairsSummary:
    documents: int
    lines: int
    python_lines: int
    instances: int
    per_file: list[int]
    seconds: dict = field(default_factory=dict)


def create_pretraining_data(input_files: list[str], vocab_file: str, output_files: list[str],
                            options: PairOptions | None = None, workers: int = 1,
                            tmp_dir: str | None = None) -> PairsSummary:
    """Google's create_pretraining_data.py main(): same output files, same instances, same order."""
    import random as _random

    options = options or PairOptions()
    options.check()
    for p in input_files:
        if not os.path.isfile(p):
            raise UsageError(f"input file {p!r} does not exist: pass text files with one sentence per line and "
                             "a blank line between documents (Google's create_pretraining_data.py format).")
    if not output_files:
        raise UsageError("no --output-file given: pass one or more TFRecord paths (instances go to them in turn).")
    for p in output_files:
        parent = os.path.dirname(os.path.abspath(p))
        if not os.path.isdir(parent):
            raise UsageError(f"the folder of the output file {p!r} does not exist: create it first.")
    vocab = load_vocab(vocab_file)
    workdir = tempfile.mkdtemp(prefix="bertopt-pairs-", dir=tmp_dir)
    seconds = {}
    corpus = None
    try:
        t0 = time.perf_counter()
        corpus = read_corpus(input_files, vocab, options.do_lower_case, workdir, workers)
        seconds["tokenize"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        rng = _random.Random(options.random_seed)
        doc_order = list(range(corpus.documents))
        _shuffler(rng)(doc_order)
        instances_path = os.path.join(workdir, "instances.bin")
        with open(instances_path, "wb") as out:
            maker = InstanceMaker(corpus, vocab, options, rng, out)
            for _ in range(options.dupe_factor):
                for document_index in range(len(doc_order)):
                    maker.document(doc_order, document_index)
            maker.flush()
        seconds["instances"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        order = shuffle_order(rng, maker.count)
        seconds["shuffle"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        per_file = write_outputs(instances_path, maker.dtype, order, options, output_files)
        seconds["write"] = time.perf_counter() - t0
        return PairsSummary(corpus.documents, corpus.lines, corpus.python_lines, maker.count, per_file, seconds)
    finally:
        if corpus is not None:
            corpus.close()
        shutil.rmtree(workdir, ignore_errors=True)


def main_summary(summary: PairsSummary, output_files: list[str], elapsed: float) -> str:
    files = ", ".join(f"{p} ({n})" for p, n in zip(output_files, summary.per_file))
    parts = " + ".join(f"{k} {v:.1f}" for k, v in summary.seconds.items())
    return (f"{summary.documents} documents ({summary.lines} lines, {summary.python_lines} tokenized by the "
            f"Python port) -> {summary.instances} instances in {files}; {elapsed:.1f} s ({parts} s)")


if __name__ == "__main__":  # pragma: no cover - the CLI is `bertopt create-pretraining-data`
    sys.exit("use: bertopt create-pretraining-data --help")
