"""TensorFlow checkpoints (the tensor bundle that ``tf.train.Saver`` and ``tf.train.Checkpoint`` write: a
``PREFIX.index`` table and ``PREFIX.data-0000K-of-0000N`` shards) read and written without TensorFlow.

    from bertopt.interop.tf_checkpoint import read_tf_checkpoint, write_tf_checkpoint
    tensors = read_tf_checkpoint("uncased_L-12_H-768_A-12/bert_model.ckpt")  # name -> numpy array
    write_tf_checkpoint("out/model.ckpt-1000", tensors)   # tf.train.load_checkpoint reads it

Format (TensorFlow's ``tensor_bundle.cc``): the index is a sorted string table (:mod:`.sstable`) whose
entry ``""`` holds a ``BundleHeaderProto`` (number of shards, endianness, format version) and every other
entry a ``BundleEntryProto`` (dtype, shape, shard, offset, size, masked CRC-32C) keyed by the variable's
name. A numeric tensor is its raw bytes in the shard; a string tensor is the varint64 lengths of its
elements, a masked CRC-32C of those lengths (as uint32 each), then the bytes of the elements.

Reading maps each shard into memory: numeric arrays are views of the file (nothing copied; ``mmap=False``
copies), so a 1.3 GB checkpoint costs page cache, not process memory. The mapping is private
(copy-on-write): writing into an array changes this process's copy of that page, never the file. Checksums are
verified (``verify=True``, the default: every byte is read once; ``verify=False`` touches nothing until
used). bfloat16 comes back as ``ml_dtypes.bfloat16`` (the numpy dtype TensorFlow and JAX use), which
:func:`to_torch` turns into a ``torch.bfloat16`` tensor without a copy.

This module imports numpy (and optionally ``google_crc32c`` and ``ml_dtypes``), never torch or
TensorFlow.
"""

from __future__ import annotations

import mmap as _mmap
import os
import re
import struct
import tempfile
from pathlib import Path

import numpy as np

from . import crc32c, sstable
from .sstable import get_varint, put_varint

try:
    import ml_dtypes
except ImportError:  # pragma: no cover - depends on the environment
    ml_dtypes = None


class TFCheckpointError(ValueError):
    """A TensorFlow checkpoint that cannot be read: missing, truncated, corrupt or of an unsupported kind."""


DT_STRING = 7
DT_BFLOAT16 = 14
# TensorFlow's DataType enum (types.proto) -> numpy dtype, for the types whose bytes are stored as they are.
_NUMPY_OF = {1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 5: np.int16, 6: np.int8, 8: np.complex64,
             9: np.int64, 10: np.bool_, 17: np.uint16, 18: np.complex128, 19: np.float16, 22: np.uint32, 23: np.uint64}
_NAMES = {1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8", 7: "string", 8: "complex64",
          9: "int64", 10: "bool", 14: "bfloat16", 17: "uint16", 18: "complex128", 19: "float16", 20: "resource",
          21: "variant", 22: "uint32", 23: "uint64"}
_ENUM_OF = {np.dtype(t): e for e, t in _NUMPY_OF.items()}


def _bfloat16():
    if ml_dtypes is None:
        raise TFCheckpointError("this checkpoint holds bfloat16 tensors and numpy has no bfloat16 of its own: "
                                "install ml_dtypes (pip install ml_dtypes), which bertopt then uses for them")
    return np.dtype(ml_dtypes.bfloat16)


# ---------------------------------------------------------------------------------------------- protobuf


def _fields(data: bytes):
    """(field number, value) of a protobuf message: ints for varint and fixed fields, bytes for the rest."""
    pos = 0
    while pos < len(data):
        tag, pos = get_varint(data, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = get_varint(data, pos)
        elif wire == 1:
            (value,), pos = struct.unpack_from("<Q", data, pos), pos + 8
        elif wire == 5:
            (value,), pos = struct.unpack_from("<I", data, pos), pos + 4
        elif wire == 2:
            length, pos = get_varint(data, pos)
            value, pos = data[pos:pos + length], pos + length
            if pos > len(data):
                raise sstable.TableError("a protobuf field runs past its message")
        else:
            raise sstable.TableError(f"a protobuf field has the unknown wire type {wire}")
        yield number, value


def _int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _tag(out: bytearray, number: int, wire: int) -> None:
    put_varint(out, number << 3 | wire)


def _message(out: bytearray, number: int, payload: bytes) -> None:
    _tag(out, number, 2)
    put_varint(out, len(payload))
    out += payload


class _Entry:
    """A parsed BundleEntryProto."""

    __slots__ = ("dtype", "shape", "shard", "offset", "size", "crc", "slices")

    def __init__(self, value: bytes):
        self.dtype, self.shape, self.shard, self.offset, self.size, self.crc = 0, (), 0, 0, 0, 0
        self.slices: list[tuple[tuple[int, int], ...]] = []  # a partitioned variable's (start, length) per dim
        for number, v in _fields(value):
            if number == 1:
                self.dtype = v
            elif number == 2:
                dims = []
                for n, dim in _fields(v):
                    if n == 2:
                        dims.append(next((_int64(s) for k, s in _fields(dim) if k == 1), 0))
                    elif n == 3 and dim:  # unknown_rank: true
                        raise sstable.TableError("a tensor of unknown rank")
                self.shape = tuple(dims)
            elif number == 3:
                self.shard = v
            elif number == 4:
                self.offset = v
            elif number == 5:
                self.size = v
            elif number == 6:
                self.crc = v
            elif number == 7:  # TensorSliceProto{extent: [{start, length (absent: the whole dimension)}]}
                extents = []
                for n, extent in _fields(v):
                    if n == 1:
                        parts = dict(_fields(extent))
                        extents.append((_int64(parts.get(1, 0)), _int64(parts[2]) if 2 in parts else -1))
                self.slices.append(tuple(extents))

    def encode(self) -> bytes:
        """Serialized as TensorFlow serializes it (fields in order, zeros left out, the shape always there)."""
        out = bytearray()
        if self.dtype:
            _tag(out, 1, 0)
            put_varint(out, self.dtype)
        shape = bytearray()
        for dim in self.shape:
            size = bytearray()
            if dim:
                _tag(size, 1, 0)
                put_varint(size, dim)
            _message(shape, 2, bytes(size))
        _message(out, 2, bytes(shape))
        for number, v in ((3, self.shard), (4, self.offset), (5, self.size)):
            if v:
                _tag(out, number, 0)
                put_varint(out, v)
        if self.crc:
            _tag(out, 6, 5)
            out += struct.pack("<I", self.crc)
        return bytes(out)


def _header(num_shards: int) -> bytes:
    """BundleHeaderProto{num_shards, endianness: LITTLE (0, left out), version {producer: 1}}."""
    out = bytearray()
    _tag(out, 1, 0)
    put_varint(out, num_shards)
    _message(out, 3, b"\x08\x01")
    return bytes(out)


# ---------------------------------------------------------------------------------------------- paths


def data_filename(prefix: str | os.PathLike, shard: int, num_shards: int) -> str:
    return f"{os.fspath(prefix)}.data-{shard:05d}-of-{num_shards:05d}"


def resolve_prefix(path: str | os.PathLike) -> str:
    """The checkpoint prefix meant by ``path``: a prefix, its ``.index`` or a ``.data-*`` file, or a directory
    with a ``checkpoint`` state file (its ``model_checkpoint_path``, like ``tf.train.latest_checkpoint``)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        state = os.path.join(path, "checkpoint")
        if not os.path.isfile(state):
            indexes = sorted(p.name for p in Path(path).glob("*.index"))
            hint = f" It holds {', '.join(indexes[:5])}: pass one of those prefixes (without .index)." if indexes else ""
            raise TFCheckpointError(f"{path} is a directory without a 'checkpoint' state file, so which checkpoint "
                                    f"to read is not said.{hint}")
        with open(state, encoding="utf-8") as f:
            match = re.search(r'^model_checkpoint_path:\s*"((?:[^"\\]|\\.)*)"', f.read(), re.MULTILINE)
        if match is None:
            raise TFCheckpointError(f"{state} has no model_checkpoint_path line: pass the checkpoint prefix instead "
                                    "(e.g. DIR/model.ckpt-1000)")
        name = match.group(1).encode("latin-1").decode("unicode_escape").encode("latin-1").decode("utf-8")
        return name if os.path.isabs(name) else os.path.join(path, name)
    if path.endswith(".index"):
        return path[: -len(".index")]
    match = re.fullmatch(r"(.*)\.data-\d{5}-of-\d{5}", path)
    return match.group(1) if match else path


# ---------------------------------------------------------------------------------------------- reading


def _read_index(prefix: str) -> tuple[int, list[tuple[str, _Entry]]]:
    index = prefix + ".index"
    try:
        with open(index, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        near = sorted(p.name for p in Path(prefix).parent.glob("*.index")) if Path(prefix).parent.is_dir() else []
        hint = f" Checkpoints there: {', '.join(near[:5])}." if near else ""
        raise TFCheckpointError(f"no TensorFlow checkpoint at {prefix}: {index} does not exist. Pass the checkpoint "
                                f"prefix (e.g. model.ckpt-1000, beside model.ckpt-1000.index and its .data-* files), "
                                f"its .index file, or a directory holding a 'checkpoint' file.{hint}") from None
    try:
        rows = sstable.read_table(data)
        if not rows or rows[0][0] != b"":
            raise sstable.TableError("it has no header entry (the empty key)")
        num_shards, endianness = 0, 0
        for number, v in _fields(rows[0][1]):
            if number == 1:
                num_shards = v
            elif number == 2:
                endianness = v
        if endianness != 0:
            raise sstable.TableError("it was written on a big-endian machine, which this reader does not support")
        entries = []
        for key, value in rows[1:]:
            name = key.decode("utf-8", errors="surrogateescape")
            try:
                entries.append((name, _Entry(value)))
            except (sstable.TableError, struct.error) as exc:
                raise sstable.TableError(f"the entry of tensor {name!r} is malformed ({exc})") from None
    except (sstable.TableError, struct.error) as exc:
        raise TFCheckpointError(f"{index} is not a readable TensorFlow checkpoint index: {exc}. Check that the file "
                                "was copied completely; if it was, it is damaged: take the checkpoint from its "
                                "source again.") from None
    return num_shards, entries


def list_tf_checkpoint(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (dtype name, shape)}`` of every variable, from the index alone (no data is read).
    dtype names are numpy's (``float32``...), plus ``bfloat16`` and ``string``."""
    _, entries = _read_index(resolve_prefix(path))
    return {name: (_NAMES.get(e.dtype, f"DataType {e.dtype}"), e.shape) for name, e in entries
            if not _is_slice_key(name)}


# ---------------------------------------------------------------------------------------------- partitions
# A partitioned variable (saved in slices, e.g. by tf.compat.v1.fixed_size_partitioner) has a full entry
# listing its slices and one entry per slice, keyed by TensorFlow's EncodeTensorNameSlice: OrderedCode's
# NumIncreasing(0), String(name), NumIncreasing(rank), then SignedNumIncreasing(start), (length or -1)
# per dimension. Those keys start with a zero byte, which no variable name does.


def _is_slice_key(name: str) -> bool:
    return name.startswith("\0")


def _ordered_num(value: int) -> bytes:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return bytes([len(raw)]) + raw


def _ordered_signed(value: int) -> bytes:
    magnitude = ~value if value < 0 else value
    length = magnitude.bit_length() // 7 + 1
    if length == 1:
        return bytes([(0x80 ^ value) & 0xFF])
    buf = bytearray((value & ((1 << 80) - 1)).to_bytes(10, "big"))[10 - length:]  # sign-extended, big-endian
    header = 0xFFC0 if length == 10 else 0xFF80 if length == 9 else (0xFF00 << (8 - length)) & 0xFF00
    buf[0] ^= header >> 8
    buf[1] ^= header & 0xFF
    return bytes(buf)


def _slice_key(name: str, extents: tuple[tuple[int, int], ...]) -> str:
    key = bytearray(_ordered_num(0))
    # OrderedCode's String: 0x00 -> 00 ff and 0xff -> ff 00, each byte escaped once; then 00 01.
    raw = name.encode("utf-8", errors="surrogateescape")
    key += re.sub(rb"[\x00\xff]", lambda m: m.group() + (b"\xff" if m.group() == b"\0" else b"\0"), raw) + b"\0\x01"
    key += _ordered_num(len(extents))
    for start, length in extents:
        key += _ordered_signed(start) + _ordered_signed(length)
    return bytes(key).decode("utf-8", errors="surrogateescape")


class _Shards:
    """The data files, each opened and mapped on first use."""

    def __init__(self, prefix: str, num_shards: int, use_mmap: bool):
        self.prefix, self.num_shards, self.use_mmap = prefix, num_shards, use_mmap
        self.buffers: dict[int, object] = {}

    def get(self, shard: int, name: str):
        if shard not in self.buffers:
            if shard >= self.num_shards:
                raise TFCheckpointError(f"tensor {name!r} of {self.prefix}.index is in shard {shard}, but the header "
                                        f"says there are {self.num_shards}: the index is corrupt")
            path = data_filename(self.prefix, shard, self.num_shards)
            try:
                with open(path, "rb") as f:
                    if not self.use_mmap:
                        self.buffers[shard] = bytearray(f.read())  # writable arrays, as with the mapping
                    elif os.fstat(f.fileno()).st_size == 0:
                        self.buffers[shard] = b""
                    else:
                        # Private: pages are the page cache's until written, then this process's own.
                        self.buffers[shard] = _mmap.mmap(f.fileno(), 0, access=_mmap.ACCESS_COPY)
            except FileNotFoundError:
                raise TFCheckpointError(
                    f"the data file {path} of checkpoint {self.prefix} is missing (tensor {name!r} is in it). A "
                    f"checkpoint is the .index file and all {self.num_shards} .data-*-of-{self.num_shards:05d} files "
                    "beside it: copy the missing file next to the index.") from None
        return self.buffers[shard]


def _checksummed_length(length: int) -> bytes:
    """A string element's length as TensorFlow checksums it: uint32 (older checkpoints' width) if it fits."""
    return struct.pack("<I", length) if length <= 0xFFFFFFFF else struct.pack("<Q", length)


def _read_strings(buf, e: _Entry, name: str, where: str, verify: bool) -> np.ndarray:
    count = int(np.prod(e.shape, dtype=np.int64))
    end = e.offset + e.size
    pos, lengths, crc = e.offset, [], 0
    try:
        for _ in range(count):
            length, pos = get_varint(buf, pos, end)
            lengths.append(length)
            if verify:
                crc = crc32c.extend(crc, _checksummed_length(length))
        if pos + 4 > end:
            raise sstable.TableError("the string lengths run past the tensor's end")
        stored_lengths_crc = bytes(buf[pos:pos + 4])
        pos += 4
    except sstable.TableError as exc:
        raise TFCheckpointError(f"string tensor {name!r} in {where} is corrupt: {exc}") from None
    if verify:
        if crc32c.unmask(struct.unpack("<I", stored_lengths_crc)[0]) != crc:
            raise TFCheckpointError(f"string tensor {name!r} in {where}: the checksum of its element lengths does not "
                                    "match: the file is corrupt; take the checkpoint from its source again")
        crc = crc32c.extend(crc, stored_lengths_crc)
    out, start = np.empty(count, dtype=object), pos
    for i, length in enumerate(lengths):
        out[i] = bytes(buf[pos:pos + length])
        pos += length
    if pos != end:
        raise TFCheckpointError(f"string tensor {name!r} in {where}: its {count} elements take {pos - e.offset} bytes, "
                                f"the index says {e.size}: the file is corrupt")
    if verify:
        crc = crc32c.extend(crc, memoryview(buf)[start:end])
        _check_crc(e, crc, name, where)
    return out.reshape(e.shape)


def _check_crc(e: _Entry, actual: int, name: str, where: str) -> None:
    if crc32c.unmask(e.crc) != actual:
        raise TFCheckpointError(f"tensor {name!r} in {where} (bytes {e.offset}..{e.offset + e.size}) fails its checksum "
                                f"(stored {crc32c.unmask(e.crc):08x}, computed {actual:08x}): the file is corrupt. "
                                "Take the checkpoint from its source again (or pass verify=False to read it anyway).")


def _read_tensor(shards: _Shards, e: _Entry, name: str, verify: bool, checks: list):
    """The tensor's array; a numeric tensor's checksum is queued on ``checks`` (strings are checked here)."""
    if e.dtype == DT_STRING:
        dtype = None
    elif e.dtype == DT_BFLOAT16:
        dtype = _bfloat16()
    elif e.dtype in _NUMPY_OF:
        dtype = np.dtype(_NUMPY_OF[e.dtype])
    else:
        raise TFCheckpointError(f"tensor {name!r} of {shards.prefix} has the TensorFlow type "
                                f"{_NAMES.get(e.dtype, e.dtype)}, which is not read (numbers, bool and strings are)")
    buf = shards.get(e.shard, name)
    where = data_filename(shards.prefix, e.shard, shards.num_shards)
    if e.offset + e.size > len(buf):
        raise TFCheckpointError(f"tensor {name!r} lies at bytes {e.offset}..{e.offset + e.size} of {where}, which has "
                                f"only {len(buf)} bytes: the data file is truncated. Copy it again from its source.")
    if dtype is None:
        return _read_strings(buf, e, name, where, verify)
    count = int(np.prod(e.shape, dtype=np.int64))
    if count * dtype.itemsize != e.size:
        raise TFCheckpointError(f"tensor {name!r} in {where}: the index says {e.size} bytes, its shape {e.shape} and "
                                f"type {dtype} take {count * dtype.itemsize}: the index is corrupt")
    array = np.frombuffer(buf, dtype=dtype, count=count, offset=e.offset).reshape(e.shape)
    if verify:
        checks.append((e, name, where, memoryview(buf)[e.offset:e.offset + e.size]))
    return array


def _assemble(shards: _Shards, e: _Entry, name: str, by_key: dict, verify: bool, checks: list) -> np.ndarray:
    """A partitioned variable, its slices copied into one array (the slices' checksums are verified too)."""
    parts, covered = [], 0
    for extents in e.slices:
        key = _slice_key(name, extents)
        if key not in by_key or len(extents) != len(e.shape):
            raise TFCheckpointError(f"partitioned variable {name!r} of {shards.prefix}.index lists a slice {extents} "
                                    "that the index does not hold: the index is corrupt")
        index = tuple(slice(start, None if length < 0 else start + length) for start, length in extents)
        parts.append((index, _read_tensor(shards, by_key[key], f"{name} (slice {extents})", verify, checks)))
        covered += parts[-1][1].size
    if covered != int(np.prod(e.shape, dtype=np.int64)):
        raise TFCheckpointError(f"the slices of partitioned variable {name!r} of {shards.prefix} cover {covered} of its "
                                f"{int(np.prod(e.shape, dtype=np.int64))} elements: the checkpoint is incomplete")
    out = np.empty(e.shape, dtype=parts[0][1].dtype if parts else np.float32)
    for index, part in parts:
        out[index] = part
    return out


def _verify(checks: list) -> None:
    """The numeric tensors' checksums, on all cores when the CRC releases the GIL (the C library called in
    place does; checksum and sum of 1.3 GB took 0.24 s with 2 threads against 0.31 s with one, on this
    busy 2-core machine); the first mismatch in name order is reported."""
    workers = min(len(checks), os.cpu_count() or 1, 8) if crc32c.RELEASES_GIL else 1
    if workers > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as pool:  # largest first, so that the threads finish together
            order = sorted(range(len(checks)), key=lambda i: -checks[i][0].size)
            crcs = dict(zip(order, pool.map(lambda i: crc32c.value(checks[i][3]), order)))
    else:
        crcs = {i: crc32c.value(check[3]) for i, check in enumerate(checks)}
    for i, (e, name, where, _) in enumerate(checks):
        _check_crc(e, crcs[i], name, where)


def read_tf_checkpoint(path: str | os.PathLike, *, names=None, verify: bool = True,
                       mmap: bool = True) -> dict[str, np.ndarray]:
    """Every variable of a TensorFlow checkpoint, ``{name: numpy array}`` in the index's (sorted) order,
    names as ``tf.train.list_variables`` gives them (``bert/embeddings/word_embeddings``, ``.../adam_m``,
    ``global_step``).

    ``path``: the checkpoint prefix (``model.ckpt-1000``), its ``.index`` file, or a directory with a
    ``checkpoint`` state file. ``names``: read only these (an error names one that is missing).
    ``verify``: check every tensor's CRC-32C as TensorFlow does (reads every byte once).
    ``mmap``: numeric arrays are views of the memory-mapped data files (no copy; the file stays mapped
    while an array lives; copy-on-write, so writing into an array never changes the file);
    ``mmap=False`` reads the files into memory instead.
    Strings come back as object arrays of ``bytes``; bfloat16 as ``ml_dtypes.bfloat16``."""
    prefix = resolve_prefix(path)
    num_shards, entries = _read_index(prefix)
    if names is not None:
        wanted = set(names)
        missing = wanted - {name for name, _ in entries if not _is_slice_key(name)}
        if missing:
            raise TFCheckpointError(f"{prefix} has no variable {sorted(missing)[0]!r} ({len(missing)} asked for are "
                                    "missing): list_tf_checkpoint(path) lists the names it has")
        entries = [(name, e) for name, e in entries if name in wanted or _is_slice_key(name)]
    shards = _Shards(prefix, num_shards, mmap)
    by_key = dict(entries) if any(e.slices for _, e in entries) else {}
    checks: list = []
    tensors = {name: _assemble(shards, e, name, by_key, verify, checks) if e.slices
               else _read_tensor(shards, e, name, verify, checks) for name, e in entries if not _is_slice_key(name)}
    _verify(checks)
    return tensors


def to_torch(array: np.ndarray):
    """A torch tensor sharing ``array``'s memory, bfloat16 included (``torch.from_numpy`` refuses
    ``ml_dtypes.bfloat16``). Strings are not tensors."""
    import torch  # the only place this module touches torch, when asked to

    if array.dtype == object:
        raise TypeError("a string tensor has no torch equivalent; use the numpy array of bytes")
    if ml_dtypes is not None and array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


# ---------------------------------------------------------------------------------------------- writing


def _as_array(name: str, value) -> tuple[np.ndarray, int]:
    """(array, TensorFlow dtype enum) for a value to write."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, without importing torch
        tensor = value.detach().cpu()
        if str(tensor.dtype) == "torch.bfloat16":
            import torch  # already imported by whoever made the tensor

            return tensor.contiguous().view(torch.int16).numpy().view(np.uint16), DT_BFLOAT16
        value = tensor.numpy()
    if isinstance(value, (str, bytes)):
        value = np.array(value.encode("utf-8") if isinstance(value, str) else value, dtype=object)
    array = np.asarray(value)
    if array.dtype.kind in "SUO":
        flat = [x.encode("utf-8") if isinstance(x, str) else x for x in array.reshape(-1).tolist()]
        if not all(isinstance(x, bytes) for x in flat):
            raise TypeError(f"tensor {name!r}: an object array must hold bytes or str (a TensorFlow string tensor)")
        strings = np.empty(len(flat), dtype=object)
        strings[:] = flat
        return strings.reshape(array.shape), DT_STRING
    if ml_dtypes is not None and array.dtype == ml_dtypes.bfloat16:
        return array, DT_BFLOAT16
    enum = _ENUM_OF.get(array.dtype.newbyteorder("=") if array.dtype.byteorder == ">" else array.dtype)
    if enum is None:
        raise TypeError(f"tensor {name!r} has dtype {array.dtype}, which has no TensorFlow checkpoint type")
    return array.astype(array.dtype.newbyteorder("<"), copy=False), enum


def _string_payload(array: np.ndarray) -> tuple[list[bytes], int]:
    """The bytes of a string tensor as TensorFlow writes them, and their CRC-32C."""
    lengths, crc = bytearray(), 0
    flat = array.reshape(-1).tolist()
    for s in flat:
        put_varint(lengths, len(s))
        crc = crc32c.extend(crc, _checksummed_length(len(s)))
    lengths_crc = struct.pack("<I", crc32c.mask(crc))
    crc = crc32c.extend(crc, lengths_crc)
    for s in flat:
        crc = crc32c.extend(crc, s)
    return [bytes(lengths), lengths_crc, *flat], crc


def _atomic_write(path: str, write) -> None:
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".tempstate", dir=directory)
    try:
        umask = os.umask(0o22)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 -> what open() would give, as TensorFlow's files have
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_tf_checkpoint(prefix: str | os.PathLike, tensors: dict, *, num_shards: int = 1,
                        state_file: bool = False) -> str:
    """Write ``tensors`` (``{name: array-like}``: numpy arrays of any TensorFlow numeric type or bool,
    ``ml_dtypes.bfloat16`` arrays, torch tensors including bfloat16, str/bytes or arrays of them for string
    tensors) as a TensorFlow checkpoint at ``prefix``: ``prefix.index`` and ``num_shards`` data files, which
    ``tf.train.load_checkpoint(prefix)`` reads bit for bit. Tensors go to the shard with the fewest bytes
    so far, in name order. Each file is written under a temporary name and renamed (the index last), so a
    crash leaves no half-written checkpoint under the prefix. ``state_file=True`` also writes the
    directory's ``checkpoint`` file (what ``tf.train.latest_checkpoint`` reads). Returns the prefix."""
    prefix = os.fspath(prefix)
    if num_shards < 1:
        raise ValueError(f"num_shards must be at least 1, not {num_shards}")
    if os.path.isdir(prefix):
        raise ValueError(f"{prefix} is a directory; a checkpoint prefix names files, e.g. {prefix}/model.ckpt")
    for name in tensors:
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor names must be non-empty strings, not {name!r}")
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    items = sorted(((name.encode("utf-8"), name) for name in tensors))
    shard_bytes = [0] * num_shards
    shard_items: list[list] = [[] for _ in range(num_shards)]
    entries: dict[bytes, _Entry] = {}
    for key, name in items:
        array, enum = _as_array(name, tensors[name])
        e = _Entry(b"")
        e.dtype, e.shape = enum, tuple(int(d) for d in array.shape)
        if enum == DT_STRING:
            parts, crc = _string_payload(array)
        else:
            array = np.ascontiguousarray(array)
            parts = [memoryview(array.reshape(-1).view(np.uint8))]
            crc = crc32c.value(parts[0])
        e.crc = crc32c.mask(crc)
        e.size = sum(len(p) for p in parts)
        e.shard = min(range(num_shards), key=lambda s: shard_bytes[s])
        e.offset = shard_bytes[e.shard]
        shard_bytes[e.shard] += e.size
        shard_items[e.shard].append(parts)
        entries[key] = e

    for shard in range(num_shards):
        def write(f, shard=shard):
            for parts in shard_items[shard]:
                for part in parts:
                    f.write(part)
        _atomic_write(data_filename(prefix, shard, num_shards), write)
    table = sstable.build_table([(b"", _header(num_shards))] + [(k, entries[k].encode()) for k, _ in items])
    _atomic_write(prefix + ".index", lambda f: f.write(table))
    if state_file:
        directory, base = os.path.split(prefix)
        text = f'model_checkpoint_path: "{base}"\nall_model_checkpoint_paths: "{base}"\n'
        _atomic_write(os.path.join(directory or ".", "checkpoint"), lambda f: f.write(text.encode("utf-8")))
    return prefix
