"""CRC32C (Castagnoli) of many short records at once, for TFRecord framing, in numpy.

A CRC is sequential along a buffer, so one buffer at a time in Python would cost ~0.1 us per
byte. TFRecord files hold many short records, though, so :func:`crc32c_many` runs the
table-driven CRC (slicing by 4 bytes) across *all records at once*: one numpy step per 4-byte
column, each step over every record (records shorter than the column keep their value).
:func:`crc32c` is the one-buffer case (slow; for tests and tiny inputs). (The tfckpt branch has a
``crc32c`` module for long buffers, with google_crc32c's C library when installed: the two belong
in one module once both are merged.)
"""

from __future__ import annotations

import numpy as np

_POLY = 0x82F63B78  # Castagnoli polynomial, bit-reversed


def _table() -> np.ndarray:
    crc = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        crc = np.where(crc & 1, (crc >> 1) ^ np.uint32(_POLY), crc >> 1).astype(np.uint32)
    return crc


TABLE = _table()


def _slices():
    """Slicing-by-4 tables: tables[k][b] is the CRC of byte b followed by k zero bytes."""
    tables = [TABLE]
    for _ in range(3):
        prev = tables[-1]
        tables.append((prev >> 8) ^ TABLE[prev & 0xFF])
    return tuple(tables)


_SLICES = _slices()
_MASK_DELTA = 0xA282EAD8


def crc32c_many(buf: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """CRC32C of ``buf[offsets[i]:offsets[i] + lengths[i]]`` for every i (uint32 array)."""
    buf = np.asarray(buf, dtype=np.uint8)
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    out = np.empty(len(offsets), dtype=np.uint32)
    for start in range(0, len(offsets), _ROWS):
        rows = slice(start, start + _ROWS)
        out[rows] = _crc_block(buf, offsets[rows], lengths[rows])
    return out


_ROWS = 1 << 15  # records per block: the padded block is _ROWS x the longest record


def _crc_block(buf, offsets, lengths):
    n = len(offsets)
    crc = np.full(n, 0xFFFFFFFF, dtype=np.uint32)
    if n == 0 or lengths.max() == 0:
        return crc ^ np.uint32(0xFFFFFFFF)
    # Longest first, so the records still running at word k are a prefix of the rows.
    order = np.argsort(-lengths, kind="stable")
    offsets, lengths = offsets[order], lengths[order]
    words = lengths // 4
    width = int(words[0]) * 4
    # Records side by side, one column per word: block[k] is the k-th 4-byte word of every record
    # (bytes past a record's end are never used for it).
    padded = buf if len(buf) >= int(offsets.max()) + width else np.concatenate([buf, np.zeros(width, np.uint8)])
    block = np.ascontiguousarray(np.lib.stride_tricks.sliding_window_view(padded, width)[offsets].view("<u4").T)
    running = np.searchsorted(-words, -np.arange(len(block)), side="left")  # rows with words > k
    t0, t1, t2, t3 = _SLICES
    for k, live in enumerate(running.tolist()):
        c = crc[:live] ^ block[k, :live]
        crc[:live] = t3[c & 0xFF] ^ t2[(c >> 8) & 0xFF] ^ t1[(c >> 16) & 0xFF] ^ t0[c >> 24]
    for t in range(3):  # the last 0-3 bytes of each record
        live = lengths - words * 4 > t
        idx = np.minimum(offsets + words * 4 + t, len(buf) - 1)
        c = TABLE[(crc ^ buf[idx]) & 0xFF] ^ (crc >> 8)
        crc = np.where(live, c, crc)
    out = np.empty_like(crc)
    out[order] = crc ^ np.uint32(0xFFFFFFFF)
    return out


def crc32c(data: bytes) -> int:
    """CRC32C of one buffer."""
    value = 0xFFFFFFFF
    table = TABLE.tolist()
    for byte in data:
        value = table[(value ^ byte) & 0xFF] ^ (value >> 8)
    return value ^ 0xFFFFFFFF


def mask(crc):
    """TFRecord's masked CRC: rotate right by 15 bits, add a constant (mod 2**32); int or uint32 array."""
    if isinstance(crc, np.ndarray):
        crc = crc.astype(np.uint64)
        return ((((crc >> np.uint64(15)) | (crc << np.uint64(17))) + np.uint64(_MASK_DELTA))
                & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF
