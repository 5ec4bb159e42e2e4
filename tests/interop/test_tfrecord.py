"""TFRecord framing and tf.train.Example without TensorFlow: against files TensorFlow wrote
(tests/interop/tfrecord/make_fixtures.py), round trips, and the errors for bad shards."""

import json
import os

import numpy as np
import pytest

from bertopt.errors import UsageError
from bertopt.interop import tfrecord as tfr
from bertopt.interop.crc32c import many as crc32c_many, mask, value as crc32c

HERE = os.path.dirname(os.path.abspath(__file__))
TF_FILE = os.path.join(HERE, "tfrecord", "tf_written.tfrecord")


def test_crc32c_known_values_and_many_equals_one_by_one():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert crc32c(b"") == 0
    rng = np.random.default_rng(0)
    buf = rng.integers(0, 256, 5000, dtype=np.uint8)
    offsets = rng.integers(0, 4000, 300)
    lengths = rng.integers(0, 1000, 300)
    lengths[:3] = [0, 1, 7]
    many = crc32c_many(buf, offsets, lengths)
    assert [int(c) for c in many] == [crc32c(buf[o:o + n].tobytes()) for o, n in zip(offsets, lengths)]
    assert mask(0) == 0xA282EAD8 and int(mask(np.array([0], np.uint32))[0]) == 0xA282EAD8


def test_reads_what_tensorflow_wrote_and_frames_it_byte_for_byte():
    with open(os.path.join(HERE, "tfrecord", "tf_written.json")) as f:
        expected = json.load(f)
    records = tfr.read_records(TF_FILE)
    assert len(records) == len(expected)
    for record, want in zip(records, expected):
        got = tfr.decode_example(record)
        assert got["ints"].tolist() == want["ints"]
        assert got["floats"].tolist() == np.asarray(want["floats"], np.float32).tolist()
        assert got["strings"] == [s.encode() for s in want["strings"]]
        assert got["empty"].tolist() == []
    with open(TF_FILE, "rb") as f:
        assert tfr.frame_records(records) == f.read()


def test_example_round_trip_and_unpacked_values():
    feats = {"a": (tfr.INT64, [5, -3, 2**40]), "b": (tfr.FLOAT, [1.5, -2.0]), "c": (tfr.BYTES, [b"x", b""])}
    got = tfr.decode_example(tfr.encode_example(feats))
    assert got["a"].tolist() == [5, -3, 2**40] and got["b"].tolist() == [1.5, -2.0] and got["c"] == [b"x", b""]
    # int64 values written unpacked (tag 0x08 per value) are legal protobuf: read them too
    inner = b"".join(b"\x08" + tfr._varint(v) for v in (1, 300))
    unpacked = tfr._field(1, tfr._field(1, tfr._field(1, b"a") + tfr._field(2, tfr._field(3, inner))))
    assert tfr.decode_example(unpacked)["a"].tolist() == [1, 300]


def _shards(n=50, seq_len=16, preds=4, seed=0, nsp=True):
    rng = np.random.default_rng(seed)
    return tfr.PretrainingShards(
        input_ids=rng.integers(0, 30522, (n, seq_len)).astype(np.int32),
        input_mask=rng.integers(0, 2, (n, seq_len)).astype(np.int8),
        segment_ids=rng.integers(0, 2, (n, seq_len)).astype(np.int8),
        masked_lm_positions=rng.integers(0, seq_len, (n, preds)).astype(np.int32),
        masked_lm_ids=rng.integers(0, 30522, (n, preds)).astype(np.int32),
        masked_lm_weights=rng.integers(0, 2, (n, preds)).astype(np.float32),
        next_sentence_labels=rng.integers(0, 2, n).astype(np.int8) if nsp else None,
        files=[], file_rows=np.array([0, n]))


def _assert_same(a, b):
    for name in tfr.PRETRAINING_FEATURES:
        x, y = getattr(a, name), getattr(b, name)
        if x is None or y is None:
            assert x is None and y is None, name
            continue
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), name


def test_pretraining_shards_round_trip_over_files_and_globs(tmp_path):
    a, b = _shards(30, seed=1), _shards(20, seed=2)
    tfr.write_pretraining_shard(str(tmp_path / "part-0.tfrecord"), a)
    tfr.write_pretraining_shard(str(tmp_path / "part-1.tfrecord"), b)
    got = tfr.read_pretraining_shards(str(tmp_path / "part-*.tfrecord"), seq_len=16, max_predictions=4)
    assert len(got) == 50 and got.seq_len == 16 and got.max_predictions == 4
    assert got.file_rows.tolist() == [0, 30, 50]
    assert [os.path.basename(f) for f in got.files] == ["part-0.tfrecord", "part-1.tfrecord"]
    both = _shards(50)
    for name in tfr.PRETRAINING_FEATURES:
        setattr(both, name, np.concatenate([getattr(a, name), getattr(b, name)]))
    _assert_same(got, both)
    # without next-sentence labels (masked-LM-only shards)
    mlm = _shards(5, nsp=False)
    tfr.write_pretraining_shard(str(tmp_path / "mlm.tfrecord"), mlm)
    _assert_same(tfr.read_pretraining_shards([tmp_path / "mlm.tfrecord"]), mlm)


def _write_examples(path, examples):
    tfr.write_records(str(path), [tfr.encode_example(e) for e in examples])


def _google_features(seq_len=8, preds=2, **change):
    feats = {"input_ids": (tfr.INT64, [1] * seq_len), "input_mask": (tfr.INT64, [1] * seq_len),
             "segment_ids": (tfr.INT64, [0] * seq_len), "masked_lm_positions": (tfr.INT64, [1] * preds),
             "masked_lm_ids": (tfr.INT64, [5] * preds), "masked_lm_weights": (tfr.FLOAT, [1.0] * preds),
             "next_sentence_labels": (tfr.INT64, [0])}
    feats.update(change)
    return {k: v for k, v in feats.items() if v is not None}


def test_bad_shards_name_file_record_and_feature(tmp_path):
    path = tmp_path / "s.tfrecord"
    _write_examples(path, [_google_features(), _google_features(masked_lm_ids=None)])
    with pytest.raises(UsageError, match=r"s\.tfrecord: record 1 has no feature 'masked_lm_ids'"):
        tfr.read_pretraining_shards(str(path))
    _write_examples(path, [_google_features(), _google_features(input_mask=(tfr.INT64, [1] * 7))])
    with pytest.raises(UsageError, match=r"feature 'input_mask' has 7 values in record 1 but 8 in record 0"):
        tfr.read_pretraining_shards(str(path))
    _write_examples(path, [_google_features(masked_lm_weights=(tfr.INT64, [1, 1]))])
    with pytest.raises(UsageError, match=r"record 0: feature 'masked_lm_weights' is a int64_list, expected a float_list"):
        tfr.read_pretraining_shards(str(path))
    _write_examples(path, [_google_features(seq_len=128)])
    with pytest.raises(UsageError, match=r"shards hold sequences of 128 tokens, --seq-len is 64"):
        tfr.read_pretraining_shards(str(path), seq_len=64)
    _write_examples(tmp_path / "t.tfrecord", [_google_features(seq_len=64)])
    with pytest.raises(UsageError, match=r"t\.tfrecord: feature 'input_ids' has 64 values per record, but .*s\.tfrecord holds sequences of 128 tokens"):
        tfr.read_pretraining_shards([str(path), str(tmp_path / "t.tfrecord")])
    with pytest.raises(UsageError, match=r"does not exist"):
        tfr.read_pretraining_shards(str(tmp_path / "nope.tfrecord"))
    with pytest.raises(UsageError, match=r"no file matches the shard pattern"):
        tfr.read_pretraining_shards(str(tmp_path / "nope-*.tfrecord"))


def test_corrupt_and_truncated_files_name_the_record(tmp_path):
    path = tmp_path / "s.tfrecord"
    _write_examples(path, [_google_features()] * 3)
    data = bytearray(path.read_bytes())
    size = len(data) // 3
    flipped = bytearray(data)
    flipped[size + 20] ^= 1  # a data byte of record 1
    path.write_bytes(bytes(flipped))
    with pytest.raises(UsageError, match=r"s\.tfrecord: record 1 has a wrong CRC32C of its data"):
        tfr.read_pretraining_shards(str(path))
    path.write_bytes(bytes(data[:-5]))
    with pytest.raises(UsageError, match=r"s\.tfrecord: truncated in record 2 .* 5 bytes short"):
        tfr.read_pretraining_shards(str(path))
    path.write_bytes(bytes(data[:2 * size + 3]))
    with pytest.raises(UsageError, match=r"truncated after record 2"):
        tfr.read_pretraining_shards(str(path))


def test_vectorized_parse_equals_record_by_record(tmp_path, monkeypatch):
    path = str(tmp_path / "s.tfrecord")
    tfr.write_pretraining_shard(path, _shards(40, seq_len=32, preds=5, seed=3))
    fast = tfr.read_pretraining_shards(path)
    monkeypatch.setattr(tfr, "_feature_spans_vectorized", lambda *a: None)
    _assert_same(tfr.read_pretraining_shards(path), fast)


def test_batch_encoding_and_framing_equal_record_by_record():
    rng = np.random.default_rng(5)
    ints = rng.integers(-2**40, 2**40, (7, 9))
    ints[0, :3] = [0, 127, 128]
    small = rng.integers(0, 300, (7, 1))
    floats = rng.standard_normal((7, 4)).astype(np.float32)
    data, lengths = tfr.encode_examples([("a", tfr.INT64, ints), ("bb", tfr.FLOAT, floats), ("c", tfr.INT64, small)])
    one_by_one = [tfr.encode_example({"a": (tfr.INT64, ints[i]), "bb": (tfr.FLOAT, floats[i]),
                                      "c": (tfr.INT64, small[i])}) for i in range(7)]
    assert data.tobytes() == b"".join(one_by_one) and lengths.tolist() == [len(r) for r in one_by_one]
    assert tfr.frame_many(data, lengths) == tfr.frame_records(one_by_one)
