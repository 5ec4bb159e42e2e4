"""`bertopt create-pretraining-data`: Google BERT's create_pretraining_data.py (same flags,
hyphenated; same output, instance for instance), in bounded memory. See docs/pretraining-data.md.

Example: ``bertopt create-pretraining-data --input-file corpus.txt --vocab-file vocab.txt
--output-file part-0.tfrecord part-1.tfrecord --max-seq-length 128 --dupe-factor 10``
"""

from __future__ import annotations

import argparse
import glob
import time

from bertopt.errors import UsageError

HELP = ("BERT's sentence-pair pretraining data (masked LM + next sentence) as TFRecord files, exactly as "
        "Google's create_pretraining_data.py makes them, in bounded memory")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-file", nargs="+", required=True, metavar="FILE",
                        help="text files (or glob patterns): one sentence per line, a blank line between documents")
    parser.add_argument("--vocab-file", required=True, help="the BERT model's vocab.txt (one WordPiece token per line)")
    parser.add_argument("--output-file", nargs="+", required=True, metavar="OUT",
                        help="TFRecord files to write; instances go to them in turn, as in Google's script")
    parser.add_argument("--do-lower-case", action=argparse.BooleanOptionalAction, default=True,
                        help="lower-case and strip accents (uncased models; default) or not (cased models)")
    parser.add_argument("--do-whole-word-mask", action="store_true",
                        help="mask all WordPieces of a word together (Google's later version of the script)")
    parser.add_argument("--max-seq-length", type=int, default=128, help="tokens per instance (default: 128)")
    parser.add_argument("--max-predictions-per-seq", type=int, default=20,
                        help="masked positions per instance at most (default: 20)")
    parser.add_argument("--masked-lm-prob", type=float, default=0.15, help="share of tokens masked (default: 0.15)")
    parser.add_argument("--random-seed", type=int, default=12345, help="seed of random.Random (default: 12345)")
    parser.add_argument("--dupe-factor", type=int, default=10,
                        help="passes over the corpus, each with different masks (default: 10)")
    parser.add_argument("--short-seq-prob", type=float, default=0.1,
                        help="probability of a shorter target length (default: 0.1)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes that tokenize (the output is the same for any number; default: 1)")
    parser.add_argument("--tmp-dir", default=None,
                        help="folder for the temporary token and instance files (default: the system's)")


def _expand_inputs(patterns: list[str]) -> list[str]:
    files = []
    for p in patterns:
        if any(ch in p for ch in "*?["):
            matched = sorted(glob.glob(p))
            if not matched:
                raise UsageError(f"no input file matches {p!r}: check the pattern (quote it so the shell leaves it).")
            files += matched
        else:
            files.append(p)
    return files


def run(args: argparse.Namespace) -> int:
    from bertopt.interop.google_pairs import PairOptions, create_pretraining_data, main_summary

    if args.workers < 1:
        raise UsageError("--workers must be at least 1.")
    options = PairOptions(max_seq_length=args.max_seq_length, max_predictions_per_seq=args.max_predictions_per_seq,
                          masked_lm_prob=args.masked_lm_prob, random_seed=args.random_seed,
                          dupe_factor=args.dupe_factor, short_seq_prob=args.short_seq_prob,
                          do_lower_case=args.do_lower_case, do_whole_word_mask=args.do_whole_word_mask)
    start = time.perf_counter()
    summary = create_pretraining_data(_expand_inputs(args.input_file), args.vocab_file, args.output_file,
                                      options, workers=args.workers, tmp_dir=args.tmp_dir)
    print(main_summary(summary, args.output_file, time.perf_counter() - start))
    return 0
