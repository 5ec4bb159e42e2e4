"""Build a plain-text corpus in Google's create_pretraining_data.py format (one sentence per line,
a blank line between documents) of a chosen size from the Wikipedia sample in the gensim wheel.

The sample has 106 articles (~2.7 M characters after bertopt.train.data.read_wiki_sample's
cleaning). Sentences are split at '. ', '! ', '? ' followed by an upper-case letter or a digit;
each paragraph-separated article is one document. The sample is repeated until the size is
reached; repetition r (r = 0, 1, ...) rotates every article's sentences by r positions and
shuffles the article order with random.Random(r), so documents and sentence pairs differ from one
repetition to the next while the text (and so the tokenizing work per byte) stays Wikipedia's.

    .venv/bin/python benchmarks/pretraining_corpus.py OUT.txt --mb 200
"""

import argparse
import random
import re

from bertopt.train.data import read_wiki_sample

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def article_sentences():
    docs = []
    for text in read_wiki_sample():
        sentences = [s.strip() for para in text.split("\n") for s in _SENTENCE_END.split(para) if s.strip()]
        if len(sentences) >= 2:
            docs.append(sentences)
    return docs


def write_corpus(path: str, megabytes: float) -> int:
    docs = article_sentences()
    limit = int(megabytes * 1e6)
    written, r = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < limit:
            order = list(range(len(docs)))
            random.Random(r).shuffle(order)
            for d in order:
                sents = docs[d]
                k = r % len(sents)
                block = "\n".join(sents[k:] + sents[:k]) + "\n\n"
                f.write(block)
                written += len(block.encode("utf-8"))
                if written >= limit:
                    break
            r += 1
    return written


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out")
    parser.add_argument("--mb", type=float, default=200.0)
    args = parser.parse_args()
    n = write_corpus(args.out, args.mb)
    print(f"wrote {args.out}: {n / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
