"""TFRecord files of ``tf.train.Example`` without TensorFlow: framing, Example encode/decode, and
the reader of BERT pretraining shards (the seven features of Google's ``create_pretraining_data.py``).

TFRecord framing, per record: uint64 length (little endian), masked CRC32C of those 8 bytes,
the data, masked CRC32C of the data. ``tf.train.Example`` is a protobuf: ``Features features = 1``;
``Features`` is ``map<string, Feature> feature = 1`` (entries: ``key = 1``, ``value = 2``);
``Feature`` is a oneof ``bytes_list = 1`` / ``float_list = 2`` / ``int64_list = 3``, each a message
with ``repeated value = 1`` (packed by TensorFlow; unpacked is accepted when reading).

Reading and writing are vectorized over records with numpy: the CRCs
(:func:`bertopt.interop.crc32c.many`), the Examples' field headers (when all records have the
same fields, as shards do; else record by record) and the packed varints. Measured: ~25 MB/s read
with CRCs checked, on the 2 loaded cores of the development machine.
"""

from __future__ import annotations

import glob
import os
import struct
from dataclasses import dataclass

import numpy as np

from bertopt.errors import UsageError
from bertopt.interop.crc32c import many as crc32c_many, mask
from bertopt.interop.sstable import get_varint

BYTES, FLOAT, INT64 = 1, 2, 3  # Feature's oneof field numbers
KIND_NAMES = {BYTES: "bytes_list", FLOAT: "float_list", INT64: "int64_list"}

# Google's seven features: name -> (kind, per-row width key, dtype in PretrainingShards)
PRETRAINING_FEATURES = {
    "input_ids": (INT64, "seq_len", np.int32),
    "input_mask": (INT64, "seq_len", np.int8),
    "segment_ids": (INT64, "seq_len", np.int8),
    "masked_lm_positions": (INT64, "max_predictions", np.int32),
    "masked_lm_ids": (INT64, "max_predictions", np.int32),
    "masked_lm_weights": (FLOAT, "max_predictions", np.float32),
    "next_sentence_labels": (INT64, "one", np.int8),
}
OPTIONAL_FEATURES = ("next_sentence_labels",)
# Map entries are written in the order of Google's script. TensorFlow's own serializer writes them
# in a hash order that changes from process to process, so files are compared feature by feature.
SERIALIZED_ORDER = tuple(PRETRAINING_FEATURES)  # masked-LM-only shards (the objective follows)


class TFRecordError(UsageError):
    """A TFRecord file that is truncated, corrupt (CRC) or not what the reader expects."""


# --- framing ------------------------------------------------------------------------------------


def _frame_offsets(buf: bytes, path: str) -> tuple[np.ndarray, np.ndarray]:
    """Offsets and lengths of every record's data in one file's bytes (framing checked, CRCs not)."""
    offsets, lengths = [], []
    pos, size = 0, len(buf)
    unpack = struct.unpack_from
    while pos < size:
        if pos + 12 > size:
            raise TFRecordError(
                f"{path}: truncated after record {len(offsets)} (a record header needs 12 bytes, "
                f"{size - pos} are left at byte {pos}). The file was cut short (an interrupted copy or "
                "write?): copy or create it again.")
        (length,) = unpack("<Q", buf, pos)
        end = pos + 12 + length + 4
        if end > size:
            raise TFRecordError(
                f"{path}: truncated in record {len(offsets)} (its header says {length} bytes of data, "
                f"the file ends {end - size} bytes short). The file was cut short (an interrupted copy "
                "or write?), or it is not a TFRecord file: copy or create it again.")
        offsets.append(pos + 12)
        lengths.append(length)
        pos = end
    return np.asarray(offsets, dtype=np.int64), np.asarray(lengths, dtype=np.int64)


def _check_crcs(buf: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, path: str) -> None:
    length_crc = buf[(offsets - 4)[:, None] + np.arange(4)].copy().view("<u4")[:, 0]
    data_crc = buf[(offsets + lengths)[:, None] + np.arange(4)].copy().view("<u4")[:, 0]
    for what, stored, computed in (
            ("length header", length_crc, mask(crc32c_many(buf, offsets - 12, np.full(len(offsets), 8)))),
            ("data", data_crc, mask(crc32c_many(buf, offsets, lengths)))):
        bad = np.flatnonzero(stored != computed)
        if len(bad):
            raise TFRecordError(
                f"{path}: record {int(bad[0])} has a wrong CRC32C of its {what} ({len(bad)} bad record(s) "
                f"of {len(offsets)}): the file is corrupt or not a TFRecord file (TFRecord files that "
                "are compressed, e.g. GZIP, must be decompressed first). Create or copy it again.")


def read_records(path: str, check_crc: bool = True) -> list[bytes]:
    """Every record of one TFRecord file, as bytes."""
    buf, offsets, lengths = _read_framed(path, check_crc)
    data = buf.tobytes()
    return [data[o:o + n] for o, n in zip(offsets.tolist(), lengths.tolist())]


def _read_framed(path: str, check_crc: bool):
    with open(path, "rb") as f:
        data = f.read()
    offsets, lengths = _frame_offsets(data, path)
    buf = np.frombuffer(data, dtype=np.uint8)
    if check_crc and len(offsets):
        _check_crcs(buf, offsets, lengths, path)
    return buf, offsets, lengths


def frame_records(records: list[bytes]) -> bytes:
    """TFRecord framing of several records (their CRCs computed together)."""
    if not records:
        return b""
    lengths = np.array([len(r) for r in records], dtype=np.int64)
    headers = lengths.astype("<u8").view(np.uint8).reshape(-1, 8)
    data = np.frombuffer(b"".join(records), dtype=np.uint8)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    length_crcs = mask(crc32c_many(headers.reshape(-1), np.arange(len(records)) * 8, np.full(len(records), 8)))
    data_crcs = mask(crc32c_many(data, starts, lengths)).astype("<u4")
    length_crcs = length_crcs.astype("<u4")
    parts = []
    for i, record in enumerate(records):
        parts += [headers[i].tobytes(), length_crcs[i].tobytes(), record, data_crcs[i].tobytes()]
    return b"".join(parts)


def frame_many(data: np.ndarray, lengths: np.ndarray) -> bytes:
    """TFRecord framing of records given back to back (``data`` uint8, ``lengths`` per record)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    if n == 0:
        return b""
    headers = lengths.astype("<u8").view(np.uint8)
    starts = np.cumsum(lengths) - lengths
    length_crcs = mask(crc32c_many(headers, np.arange(n) * 8, np.full(n, 8))).astype("<u4").view(np.uint8)
    data_crcs = mask(crc32c_many(data, starts, lengths)).astype("<u4").view(np.uint8)
    out, _ = concat_rows([(headers, np.full(n, 8)), (length_crcs, np.full(n, 4)), (data, lengths),
                          (data_crcs, np.full(n, 4))], n)
    return out.tobytes()


class TFRecordWriter:
    """Appends records to a TFRecord file; CRCs are computed in batches of ``batch`` records."""

    def __init__(self, path: str, batch: int = 4096):
        self.path = path
        self._file = open(path, "wb")
        self._pending: list[bytes] = []
        self._batch = batch
        self.count = 0

    def write(self, record: bytes) -> None:
        self._pending.append(record)
        self.count += 1
        if len(self._pending) >= self._batch:
            self.flush()

    def write_many(self, data: np.ndarray, lengths: np.ndarray) -> None:
        """Records given back to back (e.g. from :func:`encode_examples`)."""
        self.flush()
        self._file.write(frame_many(data, lengths))
        self.count += len(lengths)

    def flush(self) -> None:
        if self._pending:
            self._file.write(frame_records(self._pending))
            self._pending = []
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self.flush()
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_records(path: str, records) -> None:
    with TFRecordWriter(path) as writer:
        for record in records:
            writer.write(record)


# --- tf.train.Example ---------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 as two's complement, 10 bytes
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def varint_rows(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Packed varints of every row of an int64 matrix: (bytes back to back, bytes per row)."""
    v = np.asarray(matrix, dtype=np.int64).view(np.uint64).reshape(len(matrix), -1)
    nbytes = np.ones(v.shape, dtype=np.int64)
    for k in range(1, 10):
        more = v >= np.uint64(1 << (7 * k))
        if not more.any():
            break
        nbytes += more
    width = int(nbytes.max()) if v.size else 1
    shifts = np.uint64(7) * np.arange(width, dtype=np.uint64)
    groups = ((v.reshape(-1)[:, None] >> shifts) & np.uint64(0x7F)).astype(np.uint8)
    flat_n = nbytes.reshape(-1)
    groups |= np.where(np.arange(width) < (flat_n - 1)[:, None], 0x80, 0).astype(np.uint8)
    return groups[np.arange(width) < flat_n[:, None]], nbytes.sum(axis=1)


def _varint_lengths(n: np.ndarray) -> np.ndarray:
    out = np.ones(len(n), dtype=np.int64)
    for k in range(1, 10):
        out += n >= (1 << (7 * k))
    return out


def concat_rows(pieces, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Row r of the result is piece 0's row r, then piece 1's row r, ...: each piece is (bytes of all
    rows back to back, bytes per row). Returns (bytes back to back, bytes per row)."""
    lengths = np.zeros(rows, dtype=np.int64)
    for _data, n in pieces:
        lengths += n
    out = np.empty(int(lengths.sum()), dtype=np.uint8)
    pos = np.cumsum(lengths) - lengths
    for data, n in pieces:
        # byte i of the piece (row r, its start s_r in the piece) goes to pos_r + (i - s_r)
        shift = pos - (np.cumsum(n) - n)
        out[np.arange(len(data)) + np.repeat(shift, n)] = data
        pos = pos + n
    return out, lengths


def encode_examples(columns) -> tuple[np.ndarray, np.ndarray]:
    """Serialized Examples of many rows at once, byte for byte what :func:`encode_example` makes
    row by row: ``columns`` is [(name, FLOAT or INT64, [N, W] matrix)] in map order, W >= 1.
    Returns (Examples back to back as uint8, bytes per Example)."""
    rows = len(columns[0][2])

    def const(b):
        return np.tile(np.frombuffer(b, dtype=np.uint8), rows), np.full(rows, len(b), dtype=np.int64)

    def varints(values):
        return varint_rows(np.asarray(values, dtype=np.int64)[:, None])

    pieces, body = [], np.zeros(rows, dtype=np.int64)
    for name, kind, matrix in columns:
        if kind == FLOAT:
            raw = np.ascontiguousarray(matrix, dtype="<f4").reshape(rows, -1)
            data, n = raw.view(np.uint8).reshape(-1), np.full(rows, raw.shape[1] * 4, dtype=np.int64)
        else:
            data, n = varint_rows(matrix)
        key = _field(1, name.encode())
        inner = 1 + _varint_lengths(n) + n
        feature = 1 + _varint_lengths(inner) + inner
        entry = len(key) + 1 + _varint_lengths(feature) + feature
        pieces += [const(b"\x0a"), varints(entry), const(key + b"\x12"), varints(feature),
                   const(bytes([(kind << 3) | 2])), varints(inner), const(b"\x0a"), varints(n), (data, n)]
        body += 1 + _varint_lengths(entry) + entry
    return concat_rows([const(b"\x0a"), varints(body)] + pieces, rows)


def _field(number: int, payload: bytes) -> bytes:
    return _varint((number << 3) | 2) + _varint(len(payload)) + payload


def encode_feature(kind: int, values) -> bytes:
    """One serialized ``Feature``: ``kind`` is BYTES, FLOAT or INT64; numeric values are packed."""
    if kind == BYTES:
        inner = b"".join(_field(1, bytes(v)) for v in values)
    elif kind == FLOAT:
        arr = np.asarray(values, dtype="<f4")
        inner = _field(1, arr.tobytes()) if len(arr) else b""
    elif kind == INT64:
        arr = np.asarray(values, dtype=np.int64)
        inner = _field(1, varint_rows(arr[None])[0].tobytes()) if len(arr) else b""
    else:
        raise ValueError(f"unknown Feature kind {kind}")
    return _field(kind, inner)


def encode_example(features: dict) -> bytes:
    """A serialized ``tf.train.Example`` from ``{name: (kind, values)}``, map entries in dict order."""
    entries = b"".join(
        _field(1, _field(1, name.encode()) + _field(2, encode_feature(kind, values)))
        for name, (kind, values) in features.items())
    return _field(1, entries)


def _skip_field(buf, pos: int, wire: int) -> int:
    if wire == 0:
        return get_varint(buf, pos)[1]
    if wire == 1:
        return pos + 8
    if wire == 2:
        n, pos = get_varint(buf, pos)
        return pos + n
    if wire == 5:
        return pos + 4
    raise ValueError(f"unsupported protobuf wire type {wire}")


def _feature_spans(data: bytes, base: int = 0):
    """``{name: (kind, start, end, packed)}`` of one serialized Example: where each Feature's list
    payload lies (``base`` is added to the positions; ``packed`` tells how values are stored)."""
    spans = {}
    pos, size = 0, len(data)
    while pos < size:  # Example
        tag, pos = get_varint(data, pos)
        if tag != 0x0A:
            pos = _skip_field(data, pos, tag & 7)
            continue
        n, pos = get_varint(data, pos)
        features_end = pos + n
        while pos < features_end:  # Features: map entries
            tag, pos = get_varint(data, pos)
            n, pos = get_varint(data, pos)
            entry_end = pos + n
            if tag != 0x0A:
                pos = entry_end
                continue
            name, value = "", None
            while pos < entry_end:
                tag, pos = get_varint(data, pos)
                n, pos = get_varint(data, pos)
                if tag == 0x0A:
                    name = data[pos:pos + n].decode("utf-8", "replace")
                elif tag == 0x12:
                    value = (pos, pos + n)
                pos += n
            kind, start, end, packed = 0, 0, 0, True
            if value is not None:
                p, value_end = value
                while p < value_end:  # Feature: the oneof
                    tag, p = get_varint(data, p)
                    n, p = get_varint(data, p)
                    kind, start, end = tag >> 3, p, p + n
                    p += n
                if kind in (FLOAT, INT64) and start < end:
                    tag, p = get_varint(data, start)
                    if tag == 0x0A:  # packed: one length-delimited run
                        n, p = get_varint(data, p)
                        if p + n == end:
                            start = p
                        else:
                            packed = False
                    else:
                        packed = False
            spans[name] = (kind, base + start, base + end, packed)
        pos = features_end
    return spans


def _read_varints_at(buf: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The varint starting at ``buf[pos[i]]`` for every i (values, positions after them)."""
    value = np.zeros(len(pos), dtype=np.uint64)
    done = np.zeros(len(pos), dtype=bool)
    end = pos.copy()
    last = len(buf) - 1
    for k in range(10):
        byte = buf[np.minimum(pos + k, last)]
        live = ~done
        value[live] |= (byte[live] & 0x7F).astype(np.uint64) << np.uint64(7 * k)
        stop = live & (byte < 0x80)
        end[stop] = pos[stop] + k + 1
        done |= stop
        if done.all():
            break
    return value.astype(np.int64), end


def _feature_spans_vectorized(buf: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, names):
    """Like :func:`_feature_spans` for all records at once, when every record has the same shape:
    one Features message, the same number of entries, each entry key then value, packed lists.
    Returns ``{name: (kind[N], start[N], end[N], present[N])}`` or None (then parse one by one)."""
    n = len(offsets)
    ends = offsets + lengths
    tag = buf[np.minimum(offsets, len(buf) - 1)]
    if n == 0 or (tag != 0x0A).any() or (lengths == 0).any():
        return None
    size, pos = _read_varints_at(buf, offsets + 1)
    if (pos + size != ends).any():
        return None
    out = {name: (np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, bool))
           for name in names}
    encoded = {name: np.frombuffer(name.encode(), np.uint8) for name in names}
    for _entry in range(64):
        live = pos < ends
        if not live.any():
            return out
        if not live.all() or (buf[pos] != 0x0A).any():
            return None
        entry_len, p = _read_varints_at(buf, pos + 1)
        entry_end = p + entry_len
        if (buf[p] != 0x0A).any():
            return None
        key_len, key_start = _read_varints_at(buf, p + 1)
        p = key_start + key_len
        if (buf[np.minimum(p, len(buf) - 1)] != 0x12).any():
            return None
        value_len, p = _read_varints_at(buf, p + 1)
        if (p + value_len != entry_end).any():
            return None
        kind_tag = buf[np.minimum(p, len(buf) - 1)]
        kind = (kind_tag >> 3).astype(np.int64)
        list_len, list_start = _read_varints_at(buf, p + 1)
        empty_feature = value_len == 0
        if ((kind_tag & 7) != 2)[~empty_feature].any() or (list_start + list_len != entry_end)[~empty_feature].any():
            return None
        # inside the list: one packed run (tag 0x0A) or nothing
        has_values = ~empty_feature & (list_len > 0)
        run_tag = buf[np.minimum(list_start, len(buf) - 1)]
        if (has_values & (run_tag != 0x0A)).any():
            return None
        run_len, run_start = _read_varints_at(buf, list_start + 1)
        if (has_values & (run_start + run_len != entry_end)).any():
            return None
        start = np.where(has_values, run_start, entry_end)
        for name, code in encoded.items():
            is_name = key_len == len(code)
            if is_name.any():
                rows = np.flatnonzero(is_name)
                key = buf[np.minimum(key_start[rows, None] + np.arange(len(code)), len(buf) - 1)]
                is_name[rows] = (key == code).all(axis=1)
            if is_name.any():
                k, st, en, pr = out[name]
                if pr[is_name].any():  # the same key twice in one record: leave it to the slow path
                    return None
                k[is_name] = np.where(empty_feature, 0, kind)[is_name]
                st[is_name] = start[is_name]
                en[is_name] = entry_end[is_name]
                pr[is_name] = True
        pos = entry_end
    return None


def _decode_unpacked(data: bytes, start: int, end: int, kind: int) -> np.ndarray:
    values, pos = [], start
    while pos < end:
        tag, pos = get_varint(data, pos)
        if tag == 0x0A:  # a packed run among unpacked values
            n, pos = get_varint(data, pos)
            run = data[pos:pos + n]
            values.extend(np.frombuffer(run, "<f4").tolist() if kind == FLOAT else _decode_varints(
                np.frombuffer(run, np.uint8)).tolist())
            pos += n
        elif kind == FLOAT:
            values.append(struct.unpack_from("<f", data, pos)[0])
            pos += 4
        else:
            v, pos = get_varint(data, pos)
            values.append(v - (1 << 64) if v >= 1 << 63 else v)
    return np.asarray(values, dtype=np.float32 if kind == FLOAT else np.int64)


def _decode_varints(raw: np.ndarray) -> np.ndarray:
    """Decode concatenated varints (uint8 array) into int64 values, all at once."""
    if len(raw) == 0:
        return np.zeros(0, dtype=np.int64)
    ends = raw < 0x80
    if ends.all():
        return raw.astype(np.int64)
    stop = np.flatnonzero(ends)
    first = np.concatenate([[0], stop[:-1] + 1])
    position = np.arange(len(raw)) - np.repeat(first, stop - first + 1)
    parts = (raw & 0x7F).astype(np.uint64) << (np.uint64(7) * position.astype(np.uint64))
    return np.add.reduceat(parts, first).view(np.int64)


def decode_example(data: bytes) -> dict[str, np.ndarray]:
    """``{name: values}`` of one serialized Example: int64, float32 arrays, or a list of bytes."""
    out = {}
    for name, (kind, start, end, packed) in _feature_spans(data).items():
        if kind == BYTES:
            items, pos = [], start
            while pos < end:
                _tag, pos = get_varint(data, pos)
                n, pos = get_varint(data, pos)
                items.append(data[pos:pos + n])
                pos += n
            out[name] = items
        elif not packed:
            out[name] = _decode_unpacked(data, start, end, kind)
        elif kind == FLOAT:
            out[name] = np.frombuffer(data[start:end], "<f4").astype(np.float32)
        elif kind == INT64:
            out[name] = _decode_varints(np.frombuffer(data[start:end], np.uint8))
        else:
            out[name] = np.zeros(0, dtype=np.int64)  # an empty Feature (no kind set)
    return out


# --- BERT pretraining shards --------------------------------------------------------------------


@dataclass
class PretrainingShards:
    """Every instance of some pretraining shards, row i = record i (files in the order given).

    ``next_sentence_labels`` is None when the shards have none (masked-LM-only data)."""

    input_ids: np.ndarray             # int32 [N, seq_len]
    input_mask: np.ndarray            # int8 [N, seq_len]
    segment_ids: np.ndarray           # int8 [N, seq_len]
    masked_lm_positions: np.ndarray   # int32 [N, max_predictions]
    masked_lm_ids: np.ndarray         # int32 [N, max_predictions]
    masked_lm_weights: np.ndarray     # float32 [N, max_predictions]
    next_sentence_labels: np.ndarray | None  # int8 [N]
    files: list[str]
    file_rows: np.ndarray             # int64 [len(files) + 1]: rows of files[k] are file_rows[k]:file_rows[k+1]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def max_predictions(self) -> int:
        return self.masked_lm_positions.shape[1]


def expand_shard_paths(paths) -> list[str]:
    """Paths and glob patterns (``data/part-*.tfrecord``), in the order given, each pattern sorted."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = []
    for p in map(str, paths):
        if any(ch in p for ch in "*?["):
            matched = sorted(glob.glob(p))
            if not matched:
                raise UsageError(f"no file matches the shard pattern {p!r}: check the path (patterns are "
                                 "shell globs such as 'data/part-*.tfrecord', quoted so the shell leaves them).")
            files += matched
        elif not os.path.isfile(p):
            raise UsageError(f"shard file {p!r} does not exist: give TFRecord files written by "
                             "`bertopt create-pretraining-data` or Google's create_pretraining_data.py.")
        else:
            files.append(p)
    if not files:
        raise UsageError("no shard files were given: pass TFRecord files or glob patterns.")
    return files


def _file_features(path: str, check_crc: bool):
    """One file's instances: {name: 2-D array}, per-record value counts checked against the first."""
    buf, offsets, lengths = _read_framed(path, check_crc)
    data = buf.tobytes()
    n = len(offsets)
    spans = {name: np.zeros((n, 2), dtype=np.int64) for name in PRETRAINING_FEATURES}
    present = {name: np.zeros(n, dtype=bool) for name in PRETRAINING_FEATURES}
    slow = []  # (record, name, start, end, kind): unpacked values, decoded one by one
    fast = _feature_spans_vectorized(buf, offsets, lengths, PRETRAINING_FEATURES)
    if fast is not None:
        for name, (want_kind, _w, _d) in PRETRAINING_FEATURES.items():
            kind, start, end, have = fast[name]
            wrong = have & (kind != want_kind) & (start != end)
            if wrong.any():
                i = int(np.flatnonzero(wrong)[0])
                _wrong_kind(path, i, name, int(kind[i]), want_kind)
            present[name] = have
            spans[name] = np.stack([start, end], axis=1)
    for i, (o, length) in enumerate(zip(offsets.tolist(), lengths.tolist()) if fast is None else ()):
        try:
            record_spans = _feature_spans(data[o:o + length], base=o)
        except (IndexError, ValueError) as e:
            raise TFRecordError(
                f"{path}: record {i} is not a tf.train.Example ({e}). Shards must hold serialized "
                "tf.train.Example protos, as Google's create_pretraining_data.py writes.") from None
        for name, (want_kind, _w, _d) in PRETRAINING_FEATURES.items():
            span = record_spans.get(name)
            if span is None:
                continue
            kind, start, end, packed = span
            if kind != want_kind and start != end:
                _wrong_kind(path, i, name, kind, want_kind)
            present[name][i] = True
            spans[name][i] = (start, end)
            if not packed:
                slow.append((i, name, start, end, kind))
    out = {}
    for name, (kind, _width, dtype) in PRETRAINING_FEATURES.items():
        have = present[name]
        if not have.any() and name in OPTIONAL_FEATURES:
            out[name] = None
            continue
        if not have.all():
            i = int(np.flatnonzero(~have)[0])
            raise TFRecordError(
                f"{path}: record {i} has no feature {name!r} ({int((~have).sum())} of {n} records lack it). "
                f"BERT pretraining shards hold {', '.join(PRETRAINING_FEATURES)}; write them with "
                "`bertopt create-pretraining-data` or Google's create_pretraining_data.py.")
        s = spans[name]
        if kind == FLOAT:
            nbytes = s[:, 1] - s[:, 0]
            counts = nbytes // 4
            raw = buf[np.repeat(s[:, 0], nbytes) + _ranges(nbytes)]
            values = raw.view("<f4") if len(raw) else np.zeros(0, np.float32)
        else:
            nbytes = s[:, 1] - s[:, 0]
            raw = buf[np.repeat(s[:, 0], nbytes) + _ranges(nbytes)]
            ends = (raw < 0x80).astype(np.int64)
            counts = np.add.reduceat(ends, np.concatenate([[0], np.cumsum(nbytes)[:-1]])) if len(raw) else nbytes
            counts = np.where(nbytes == 0, 0, counts)
            values = _decode_varints(raw)
        per_record = [None] * n
        if slow:
            for i, slow_name, start, end, k in slow:
                if slow_name == name:
                    per_record[i] = _decode_unpacked(data, start, end, k)
            if any(v is not None for v in per_record):
                bounds = np.concatenate([[0], np.cumsum(counts)])
                per_record = [per_record[i] if per_record[i] is not None else values[bounds[i]:bounds[i + 1]]
                              for i in range(n)]
                counts = np.array([len(v) for v in per_record], dtype=np.int64)
                values = np.concatenate(per_record) if n else values
        width = int(counts[0]) if n else 0
        bad = np.flatnonzero(counts != width)
        if len(bad):
            i = int(bad[0])
            raise TFRecordError(
                f"{path}: feature {name!r} has {int(counts[i])} values in record {i} but {width} in record 0: "
                "every record of a shard must have the same length (Google pads to max_seq_length and "
                "max_predictions_per_seq). The file is not a BERT pretraining shard, or was written wrongly.")
        out[name] = values.reshape(n, width)
    return out


def _wrong_kind(path, i, name, kind, want_kind):
    raise TFRecordError(
        f"{path}: record {i}: feature {name!r} is a {KIND_NAMES.get(kind, kind)}, expected "
        f"a {KIND_NAMES[want_kind]} (Google's create_pretraining_data.py writes int64 lists, "
        "and a float list for masked_lm_weights). These are not BERT pretraining shards.")


def _ranges(counts: np.ndarray) -> np.ndarray:
    """Concatenated aranges 0..counts[i]-1."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return np.arange(total) - np.repeat(starts, counts)


def read_pretraining_shards(paths, seq_len: int | None = None, max_predictions: int | None = None,
                            check_crc: bool = True) -> PretrainingShards:
    """Load every instance of BERT pretraining shards (TFRecord files of tf.train.Example with
    Google's seven features) into compact arrays. ``paths``: files or glob patterns.

    ``seq_len`` / ``max_predictions``, when given, must equal the shards' (else a UsageError
    that says both numbers); all files must agree with each other."""
    files = expand_shard_paths(paths)
    per_file = []
    for path in files:
        feats = _file_features(path, check_crc)
        n = len(feats["input_ids"])
        if n == 0:
            raise TFRecordError(f"{path}: the file holds no records: remove it from the shard list or "
                                "create it again (an empty output of an interrupted run?).")
        per_file.append((path, feats))
    first_path, first = per_file[0]
    widths = {"seq_len": first["input_ids"].shape[1], "max_predictions": first["masked_lm_positions"].shape[1],
              "one": 1}
    for path, feats in per_file:
        for name, (_kind, width_key, _dtype) in PRETRAINING_FEATURES.items():
            if feats[name] is None:
                if first[name] is not None:
                    raise TFRecordError(f"{path} has no feature {name!r} but {first_path} has: mixing "
                                        "shards with and without next-sentence labels is not supported.")
                continue
            if first[name] is None:
                raise TFRecordError(f"{path} has a feature {name!r} but {first_path} has none: mixing "
                                    "shards with and without next-sentence labels is not supported.")
            got = feats[name].shape[1]
            if got != widths[width_key]:
                what = {"seq_len": f"sequences of {widths['seq_len']} tokens",
                        "max_predictions": f"{widths['max_predictions']} masked positions per sequence",
                        "one": "one label per sequence"}[width_key]
                raise TFRecordError(
                    f"{path}: feature {name!r} has {got} values per record, but {first_path} holds {what} "
                    "(shards of one run must share max_seq_length and max_predictions_per_seq: create "
                    "them with the same options).")
    if seq_len is not None and seq_len != widths["seq_len"]:
        raise UsageError(
            f"shards hold sequences of {widths['seq_len']} tokens, --seq-len is {seq_len}: the length is fixed "
            f"when the shards are made (max_seq_length); pass --seq-len {widths['seq_len']}, or create the "
            f"shards again with --max-seq-length {seq_len} ({first_path}).")
    if max_predictions is not None and max_predictions != widths["max_predictions"]:
        raise UsageError(
            f"shards hold {widths['max_predictions']} masked positions per sequence, {max_predictions} were "
            f"expected: pass {widths['max_predictions']} (max_predictions_per_seq of the shards), or create "
            f"the shards again with --max-predictions-per-seq {max_predictions} ({first_path}).")
    columns = {}
    for name, (_kind, _width, dtype) in PRETRAINING_FEATURES.items():
        if first[name] is None:
            columns[name] = None
            continue
        arr = np.concatenate([feats[name] for _p, feats in per_file]).astype(dtype)
        columns[name] = arr[:, 0] if name == "next_sentence_labels" else arr
    rows = np.cumsum([0] + [len(feats["input_ids"]) for _p, feats in per_file])
    return PretrainingShards(**columns, files=files, file_rows=rows)


def pretraining_columns(input_ids, input_mask, segment_ids, masked_lm_positions, masked_lm_ids,
                        masked_lm_weights, next_sentence_labels) -> list:
    """:func:`encode_examples` columns of Google's features ([N, ...] arrays; labels [N] or None)."""
    values = {"input_ids": input_ids, "input_mask": input_mask, "segment_ids": segment_ids,
              "masked_lm_positions": masked_lm_positions, "masked_lm_ids": masked_lm_ids,
              "masked_lm_weights": masked_lm_weights,
              "next_sentence_labels": None if next_sentence_labels is None else np.asarray(next_sentence_labels)[:, None]}
    return [(name, PRETRAINING_FEATURES[name][0], values[name]) for name in SERIALIZED_ORDER
            if values[name] is not None]


def write_pretraining_shard(path: str, shards: PretrainingShards, rows=None, block: int = 8192) -> int:
    """Write rows of ``shards`` (all by default) to one TFRecord file; returns the record count."""
    rows = np.arange(len(shards)) if rows is None else np.asarray(rows, dtype=np.int64)
    with TFRecordWriter(path) as writer:
        for start in range(0, len(rows), block):
            r = rows[start:start + block]
            nsp = shards.next_sentence_labels
            writer.write_many(*encode_examples(pretraining_columns(
                shards.input_ids[r], shards.input_mask[r], shards.segment_ids[r], shards.masked_lm_positions[r],
                shards.masked_lm_ids[r], shards.masked_lm_weights[r], None if nsp is None else nsp[r])))
        return writer.count
