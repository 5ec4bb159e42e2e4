"""The sorted string table under a TensorFlow checkpoint's ``.index`` file (LevelDB's table format, as
TensorFlow's ``table_builder.cc`` / ``block_builder.cc`` / ``format.cc`` write it), read and written.

Layout: data blocks of entries ``varint32 shared | varint32 unshared | varint32 value_len | key suffix |
value`` (keys prefix-compressed against the previous key, restarting every 16 entries; the block ends
with the restart offsets as fixed32 and their count), each block followed by a 5-byte trailer
(compression type, masked CRC-32C of the block and the type byte); then an empty metaindex block, an
index block (restart interval 1) mapping a separator key to each data block's handle, and a 48-byte
footer: the two handles (varint64 offset, varint64 size) padded to 40 bytes and the magic number.

The writer makes the same decisions as TensorFlow's (256 KiB blocks, the same shortest separators),
so for the same entries it writes the same bytes: the fixture script checks that against real
TensorFlow. Snappy-compressed blocks (written by no TensorFlow release's checkpoint writer since
1.2) are refused with a clear error.
"""

from __future__ import annotations

import struct

from . import crc32c

MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
TRAILER_SIZE = 5
BLOCK_SIZE = 262144
RESTART_INTERVAL = 16


class TableError(ValueError):
    """The bytes are not a valid table (the caller adds which file)."""


def put_varint(out: bytearray, value: int) -> None:
    if value < 0:
        raise ValueError(f"varint of a negative number {value}")
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def get_varint(data, pos: int, limit: int | None = None) -> tuple[int, int]:
    """(value, position after it); TableError past ``limit`` or after 10 bytes."""
    limit = len(data) if limit is None else limit
    result = shift = 0
    while True:
        if pos >= limit or shift > 63:
            raise TableError("a varint runs past its end")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


# ---------------------------------------------------------------------------------------------- reading


def _read_block(data: bytes, offset: int, size: int, what: str) -> bytes:
    end = offset + size
    if offset < 0 or end + TRAILER_SIZE > len(data):
        raise TableError(f"the {what} at bytes {offset}..{end} runs past the end of the file ({len(data)} bytes): "
                         "the file is truncated")
    contents = data[offset:end]
    block_type = data[end]
    (stored,) = struct.unpack_from("<I", data, end + 1)
    actual = crc32c.extend(crc32c.value(contents), bytes([block_type]))
    if crc32c.unmask(stored) != actual:
        raise TableError(f"the {what} at bytes {offset}..{end} fails its checksum (stored {crc32c.unmask(stored):08x}, "
                         f"computed {actual:08x}): the file is corrupt")
    if block_type == 1:
        raise TableError(f"the {what} is Snappy-compressed; only uncompressed tables (what TensorFlow >= 1.2 writes) "
                         "are read: load and re-save it with TensorFlow")
    if block_type != 0:
        raise TableError(f"the {what} has an unknown compression type {block_type}: the file is corrupt")
    return contents


def _block_entries(block: bytes, what: str):
    """(key, value) of a block, in order."""
    if len(block) < 4:
        raise TableError(f"the {what} is too short ({len(block)} bytes)")
    (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    limit = len(block) - 4 - 4 * num_restarts
    if limit < 0:
        raise TableError(f"the {what} claims {num_restarts} restart points, more than it can hold")
    pos, key = 0, b""
    while pos < limit:
        shared, pos = get_varint(block, pos, limit)
        unshared, pos = get_varint(block, pos, limit)
        value_len, pos = get_varint(block, pos, limit)
        if shared > len(key) or pos + unshared + value_len > limit:
            raise TableError(f"an entry of the {what} at byte {pos} is malformed")
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        yield key, block[pos:pos + value_len]
        pos += value_len


def _handle(data, pos: int, limit: int) -> tuple[int, int, int]:
    offset, pos = get_varint(data, pos, limit)
    size, pos = get_varint(data, pos, limit)
    return offset, size, pos


def data_block_handles(data: bytes) -> list[tuple[int, int]]:
    """(offset, size) of every data block, from the footer and the index block (checksum verified)."""
    if len(data) < FOOTER_SIZE:
        raise TableError(f"it has {len(data)} bytes, fewer than a table's {FOOTER_SIZE}-byte footer: "
                         "it is truncated or not a checkpoint index")
    footer = data[-FOOTER_SIZE:]
    (magic,) = struct.unpack_from("<Q", footer, 40)
    if magic != MAGIC:
        raise TableError(f"it does not end with the table magic number (found {magic:016x}): it is truncated or "
                         "not a checkpoint index")
    _, _, pos = _handle(footer, 0, 40)  # the metaindex block: empty in checkpoints, nothing to read
    index_offset, index_size, _ = _handle(footer, pos, 40)
    index = _read_block(data, index_offset, index_size, "index block")
    return [_handle(handle, 0, len(handle))[:2] for _, handle in _block_entries(index, "index block")]


def read_table(data: bytes) -> list[tuple[bytes, bytes]]:
    """All (key, value) entries of a table, in key order, every block's checksum verified."""
    entries: list[tuple[bytes, bytes]] = []
    for n, (offset, size) in enumerate(data_block_handles(data)):
        what = f"data block {n}"
        entries.extend(_block_entries(_read_block(data, offset, size, what), what))
    for (a, _), (b, _) in zip(entries, entries[1:]):
        if not a < b:
            raise TableError(f"its keys are not in increasing order ({a!r} before {b!r}): the file is corrupt")
    return entries


# ---------------------------------------------------------------------------------------------- writing


class _BlockBuilder:
    def __init__(self, restart_interval: int):
        self.restart_interval = restart_interval
        self.reset()

    def reset(self) -> None:
        self.buffer, self.restarts, self.counter, self.last_key = bytearray(), [0], 0, b""

    def empty(self) -> bool:
        return not self.buffer

    def size_estimate(self) -> int:
        return len(self.buffer) + 4 * len(self.restarts) + 4

    def add(self, key: bytes, value: bytes) -> None:
        shared = 0
        if self.counter < self.restart_interval:
            limit = min(len(self.last_key), len(key))
            while shared < limit and self.last_key[shared] == key[shared]:
                shared += 1
        else:
            self.restarts.append(len(self.buffer))
            self.counter = 0
        for number in (shared, len(key) - shared, len(value)):
            put_varint(self.buffer, number)
        self.buffer += key[shared:]
        self.buffer += value
        self.last_key = key
        self.counter += 1

    def finish(self) -> bytes:
        out = self.buffer + b"".join(struct.pack("<I", r) for r in self.restarts) + struct.pack("<I", len(self.restarts))
        self.reset()
        return bytes(out)


def _shortest_separator(start: bytes, limit: bytes) -> bytes:
    """A short key >= start and < limit (TensorFlow's FindShortestSeparator)."""
    n = min(len(start), len(limit))
    i = 0
    while i < n and start[i] == limit[i]:
        i += 1
    if i < n and start[i] < 0xFF and start[i] + 1 < limit[i]:
        return start[:i] + bytes([start[i] + 1])
    return start


def _short_successor(key: bytes) -> bytes:
    """A short key >= key (TensorFlow's FindShortSuccessor)."""
    for i, byte in enumerate(key):
        if byte != 0xFF:
            return key[:i] + bytes([byte + 1])
    return key


def build_table(entries: list[tuple[bytes, bytes]]) -> bytes:
    """The table of ``entries`` (sorted by key, keys unique), byte for byte what TensorFlow writes."""
    out = bytearray()
    data_block, index_block = _BlockBuilder(RESTART_INTERVAL), _BlockBuilder(1)
    pending: tuple[int, int] | None = None
    last_key = b""

    def write_block(block: _BlockBuilder) -> tuple[int, int]:
        contents = block.finish()
        handle = (len(out), len(contents))
        out.extend(contents)
        out.append(0)  # no compression
        out.extend(struct.pack("<I", crc32c.mask(crc32c.extend(crc32c.value(contents), b"\0"))))
        return handle

    def encode_handle(handle: tuple[int, int]) -> bytes:
        buf = bytearray()
        put_varint(buf, handle[0])
        put_varint(buf, handle[1])
        return bytes(buf)

    for number, (key, value) in enumerate(entries):
        if number > 0:
            if not key > last_key:
                raise ValueError(f"table keys must be unique and sorted: {key!r} after {last_key!r}")
            if len(key) + len(value) >= 2 * BLOCK_SIZE and not data_block.empty():  # an overly large entry
                pending = write_block(data_block)
        if pending is not None:
            index_block.add(_shortest_separator(last_key, key), encode_handle(pending))
            pending = None
        last_key = key
        data_block.add(key, value)
        if data_block.size_estimate() >= BLOCK_SIZE:
            pending = write_block(data_block)
    if not data_block.empty():
        pending = write_block(data_block)
    metaindex = write_block(_BlockBuilder(RESTART_INTERVAL))
    if pending is not None:
        index_block.add(_short_successor(last_key), encode_handle(pending))
    index = write_block(index_block)
    footer = bytearray(encode_handle(metaindex) + encode_handle(index))
    footer.extend(b"\0" * (40 - len(footer)))
    footer.extend(struct.pack("<Q", MAGIC))
    out.extend(footer)
    return bytes(out)
