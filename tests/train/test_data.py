"""Corpus reading, Wikipedia cleaning, tokenizer + packing cache, BERT masking."""

from __future__ import annotations

import bz2
import importlib.util

import numpy as np
import pytest

from _corpus import write_corpus
from bertopt.train import data


def test_clean_wikitext_keeps_prose_and_drops_markup():
    raw = """{{Infobox thing|name={{nested|x}}|size=3}}
'''Albedo''' ({{IPAc-en|æ|l}}) is the [[diffuse reflection|diffuse reflectivity]] of a [[surface]].<ref name="a">{{cite web|url=x}}</ref> It is measured from zero to one.<ref name="b"/>
[[File:Albedo.svg|thumb|Caption with a [[link]] inside it]]
{| class="wikitable"
|-
| Fresh asphalt || 0.04
|}
== History ==
The term was introduced by [[Johann Heinrich Lambert]] in 1760 in [http://example.org his book] Photometria &amp; more.<!-- hidden comment -->
* a list item that is long enough to keep
* [http://bare.example.org]
[[Category:Climatology]]
== References ==
Everything from here on is dropped even though it is a long sentence.
"""
    text = data.clean_wikitext(raw)
    paragraphs = text.split("\n\n")
    assert paragraphs[0] == ("Albedo is the diffuse reflectivity of a surface. It is measured from zero to one.")
    assert paragraphs[1] == ("The term was introduced by Johann Heinrich Lambert in 1760 in his book Photometria & more."
                             " a list item that is long enough to keep")
    assert len(paragraphs) == 2
    for junk in ("{{", "}}", "[[", "<ref", "Caption", "asphalt", "Category", "References", "http", "'''", "hidden"):
        assert junk not in text


def test_read_wiki_dump_skips_redirects_and_other_namespaces(tmp_path):
    page = '<page><title>{t}</title><ns>{ns}</ns><revision><text>{body}</text></revision></page>'
    xml = ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">'
           + page.format(t="A", ns=0, body="Alpha is the first letter of the Greek alphabet.")
           + page.format(t="B", ns=0, body="#REDIRECT [[A]]")
           + page.format(t="Talk:A", ns=1, body="This talk page is not an article at all.")
           + page.format(t="C", ns=0, body="Gamma is the third letter of the Greek alphabet.")
           + "</mediawiki>")
    path = tmp_path / "dump.xml.bz2"
    path.write_bytes(bz2.compress(xml.encode()))
    assert list(data.read_wiki_sample(path)) == ["Alpha is the first letter of the Greek alphabet.",
                                                 "Gamma is the third letter of the Greek alphabet."]


def test_default_corpus_is_found_without_importing_gensim():
    import sys

    path = data.wiki_sample_path()
    assert path.name == data.WIKI_SAMPLE and path.stat().st_size > 1_000_000
    assert "gensim" not in sys.modules


def test_missing_gensim_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(data.CorpusError, match="pip install --no-deps gensim"):
        data.wiki_sample_path()


def test_text_files_blocks_lines_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("first doc line one\nline two\n\n\nsecond doc\n")
    assert list(data.read_text_files([tmp_path / "a.txt"])) == ["first doc line one line two", "second doc"]
    assert list(data.read_text_files([tmp_path / "a.txt"], line_per_document=True)) == [
        "first doc line one", "line two", "second doc"]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("third\n")
    (tmp_path / "sub" / "ignored.csv").write_text("x\n")
    assert [p.name for p in data.corpus_files([tmp_path])] == ["a.txt", "b.txt"]
    with pytest.raises(data.CorpusError, match="no such file"):
        data.corpus_files([tmp_path / "missing.txt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.CorpusError, match="no .txt files"):
        data.corpus_files([tmp_path / "empty"])
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(data.CorpusError, match="latin1.txt: not valid UTF-8.*iconv"):
        list(data.read_text_files([tmp_path / "latin1.txt"]))
    (tmp_path / "blob.txt").write_bytes(b"PK\x03\x04\x00\x00binary")
    with pytest.raises(data.CorpusError, match="binary"):
        list(data.read_text_files([tmp_path / "blob.txt"]))


def test_prepare_data_packs_rows_holds_out_documents_and_caches(tmp_path, monkeypatch):
    corpus_dir = write_corpus(tmp_path / "corpus", documents=1200, sentences=2)  # > one encode chunk
    corpus = data.text_corpus([corpus_dir])
    prepared = data.prepare_data(corpus, tmp_path / "cache", vocab_size=200, seq_len=32, log=lambda m: None)
    assert prepared.train.dtype == np.uint16 and prepared.train.shape[1] == 32
    assert (prepared.train[:, 0] == data.CLS_ID).all() and (prepared.train[:, -1] == data.SEP_ID).all()
    stats = prepared.stats
    assert stats["documents"] == 1200 and 20 < stats["held_out_documents"] < 110  # about 1 in 20
    body = 30
    assert stats["train_sequences"] + stats["eval_sequences"] >= stats["tokens"] // body - 1
    # held-out documents' numbers ("document number 17") never occur in training rows
    tokenizer = prepared.load_tokenizer()
    held_out = [d for d in corpus.open() if data.is_held_out(d)]
    train_text = tokenizer.decode(np.asarray(prepared.train).ravel().tolist())
    eval_text = tokenizer.decode(np.asarray(prepared.eval).ravel().tolist())
    number = held_out[0].rsplit(" ", 1)[-1].rstrip(".")
    assert f"number {number} " in eval_text.replace(".", " ") and f"number {number} " not in train_text.replace(".", " ")
    assert "the cat" in train_text
    # second call: everything from the cache, no training or tokenizing
    monkeypatch.setattr(data, "train_tokenizer", lambda *a, **k: pytest.fail("tokenizer retrained"))
    monkeypatch.setattr(data, "_stream_ids", lambda *a, **k: pytest.fail("corpus re-tokenized"))
    again = data.prepare_data(corpus, tmp_path / "cache", vocab_size=200, seq_len=32, log=lambda m: None)
    assert np.array_equal(again.train, prepared.train)
    # a changed file is a different corpus
    (corpus_dir / "part0.txt").write_text("Something new entirely.\n")
    assert data.text_corpus([corpus_dir]).fingerprint != corpus.fingerprint


def test_empty_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(data.CorpusError, match="empty"):
        data.prepare_data(data.text_corpus([tmp_path / "empty.txt"]), tmp_path / "cache", vocab_size=200,
                          seq_len=32, log=lambda m: None)


def test_masking_follows_bert():
    rng = np.random.default_rng(0)
    vocab = 1000
    ids = rng.integers(5, vocab, size=(400, 128))
    ids[:, 0], ids[:, -1], ids[:, 60] = data.CLS_ID, data.SEP_ID, data.SEP_ID  # specials: never chosen
    masked = data.mask_tokens(ids, np.random.default_rng(1), vocab_size=vocab)
    per_row = np.bincount(masked.rows, minlength=400)
    assert (per_row == round(125 * 0.15)).all()  # 19 of the 125 candidates in every row
    assert not np.isin(masked.cols, [0, 60, 127]).any()
    assert np.array_equal(masked.labels, ids[masked.rows, masked.cols])
    chosen = masked.input_ids[masked.rows, masked.cols]
    frac_mask = np.mean(chosen == data.MASK_ID)
    frac_kept = np.mean(chosen == masked.labels)
    frac_random = 1 - frac_mask - frac_kept
    # 7600 selections: binomial standard deviations are <= 0.005, tolerance 0.02 is 4 sigma
    assert abs(frac_mask - 0.8) < 0.02 and abs(frac_kept - 0.1) < 0.02 and abs(frac_random - 0.1) < 0.02
    assert chosen[chosen != data.MASK_ID].min() >= 5  # random tokens are never special tokens
    unselected = np.ones(ids.shape, bool)
    unselected[masked.rows, masked.cols] = False
    assert np.array_equal(masked.input_ids[unselected], ids[unselected])
    again = data.mask_tokens(ids, np.random.default_rng(1), vocab_size=vocab)
    assert np.array_equal(again.input_ids, masked.input_ids)
    with pytest.raises(ValueError, match="mask-prob"):
        data.mask_tokens(ids, rng, vocab_size=vocab, mask_prob=1.5)


def test_short_rows_mask_at_least_one_token():
    ids = np.array([[data.CLS_ID, 7, 8, data.SEP_ID]])
    masked = data.mask_tokens(ids, np.random.default_rng(0), vocab_size=50)
    assert len(masked.rows) == 1 and masked.cols[0] in (1, 2)
