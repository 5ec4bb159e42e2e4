"""TensorFlow checkpoints read and written without TensorFlow (bertopt.interop.tf_checkpoint), against
checkpoints that real TensorFlow wrote and TensorFlow's verdicts on ours (tf_checkpoints/make_fixtures.py,
run with TensorFlow 2.21; expected.json holds what TensorFlow's get_tensor returned, as sha256)."""

from __future__ import annotations

import importlib.util
import json
import mmap
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import bertopt
from bertopt.interop import crc32c, sstable
from bertopt.interop.tf_checkpoint import (TFCheckpointError, _read_index, list_tf_checkpoint, read_tf_checkpoint,
                                           to_torch, write_tf_checkpoint)

FIXTURES = Path(__file__).with_name("tf_checkpoints")
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
REPO = Path(__file__).resolve().parents[2]

_spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
make_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_fixtures)  # numpy only at import; TensorFlow is imported in its main()
describe = make_fixtures.describe


def copy_fixture(name: str, tmp_path: Path) -> Path:
    shutil.copytree(FIXTURES / name, tmp_path / name)
    return tmp_path / EXPECTED["fixtures"][name]["prefix"] if name in EXPECTED["fixtures"] else tmp_path / name


def entry_of(prefix: Path, name: str):
    return dict(_read_index(str(prefix))[1])[name]


@pytest.mark.parametrize("fixture", sorted(EXPECTED["fixtures"]))
def test_every_tensor_tensorflow_wrote_is_read_bit_for_bit(fixture):
    expected = EXPECTED["fixtures"][fixture]
    tensors = read_tf_checkpoint(FIXTURES / expected["prefix"])
    assert list(tensors) == sorted(expected["tensors"])  # the index's order, every variable
    assert {name: describe(value) for name, value in tensors.items()} == expected["tensors"]
    listed = list_tf_checkpoint(FIXTURES / expected["prefix"])
    assert {n: (d, list(s)) for n, (d, s) in listed.items()} == {
        n: (t["dtype"], t["shape"]) for n, t in expected["tensors"].items()}


def test_bert_checkpoint_names_slots_and_step():
    tensors = read_tf_checkpoint(FIXTURES / "bert")  # the directory: its `checkpoint` state file names the prefix
    assert tensors["global_step"].dtype == np.int64 and int(tensors["global_step"]) == 1000
    for name, shape in make_fixtures.BERT_SHAPES.items():
        for suffix in ("", "/adam_m", "/adam_v"):
            assert tensors[name + suffix].shape == shape and tensors[name + suffix].dtype == np.float32
    same = read_tf_checkpoint(FIXTURES / "bert/model.ckpt-1000.index", names=["global_step"])
    assert list(same) == ["global_step"]
    with pytest.raises(TFCheckpointError, match="no variable 'bert/nope'"):
        read_tf_checkpoint(FIXTURES / "bert", names=["bert/nope"])


def test_dtypes_as_numpy_types():
    tensors = read_tf_checkpoint(FIXTURES / "dtypes/model.ckpt")
    assert tensors["bfloat16"].dtype == ml_dtypes.bfloat16 and tensors["float16"].dtype == np.float16
    assert tensors["scalar"].shape == () and tensors["scalar"] == np.float32(3.25)
    assert tensors["empty"].shape == (0, 4) and tensors["empty_strings"].shape == (0,)
    assert tensors["strings"].dtype == object and tensors["strings"][0, 1] == "grüße 世界".encode()
    assert tensors["string_scalar"].shape == () and tensors["string_scalar"].item() == b"bert"
    torch = pytest.importorskip("torch")
    as_torch = to_torch(tensors["bfloat16"])
    assert as_torch.dtype == torch.bfloat16
    assert np.array_equal(as_torch.view(torch.int16).numpy(), tensors["bfloat16"].view(np.int16))


def test_tensorflow_read_our_checkpoints_bit_for_bit():
    """The verdicts the fixture script recorded with TensorFlow on bertopt's writer."""
    writer = EXPECTED["writer"]
    for name in ("ours", "ours_sharded", "many_tensors"):
        assert writer[name]["tf_values_equal_written"] is True, name
    for name in ("ours", "ours_sharded"):
        assert writer[name]["tf_list_variables_equal"] is True and writer[name]["tf_latest_checkpoint"] == "model.ckpt"
    assert writer["ours"]["files_identical_to_tf_savev2"] is True  # same bytes as TensorFlow's own SaveV2
    assert writer["many_tensors"]["files_identical_to_tf_savev2"] is True
    assert writer["many_tensors"]["tf_index_data_blocks"] >= 2


def test_writer_reproduces_the_bytes_tensorflow_accepted(tmp_path):
    tensors = read_tf_checkpoint(FIXTURES / "dtypes/model.ckpt", mmap=False)
    for name, shards in (("ours", 1), ("ours_sharded", 2)):
        prefix = write_tf_checkpoint(tmp_path / name / "model.ckpt", tensors, num_shards=shards, state_file=True)
        assert EXPECTED["writer"][name]["files"] == sorted(p.name for p in Path(prefix).parent.glob("model.ckpt.*"))
        for file in (FIXTURES / name).iterdir():
            assert (tmp_path / name / file.name).read_bytes() == file.read_bytes(), file.name
    for file in (FIXTURES / "dtypes").iterdir():  # and TensorFlow's SaveV2 wrote exactly these bytes
        assert (tmp_path / "ours" / file.name).read_bytes() == file.read_bytes(), file.name


def test_many_tensors_index_spans_blocks_as_tensorflow_writes_it(tmp_path):
    many = make_fixtures.many_tensors()
    expected = EXPECTED["writer"]["many_tensors"]
    write_tf_checkpoint(tmp_path / "m", many)
    index = (tmp_path / "m.index").read_bytes()
    assert len(sstable.data_block_handles(index)) == expected["tf_index_data_blocks"]
    assert make_fixtures.sha256(index) == expected["tf_index_sha256"]
    assert make_fixtures.sha256((tmp_path / "m.data-00000-of-00001").read_bytes()) == expected["tf_data_sha256"]
    back = read_tf_checkpoint(tmp_path / "m")
    assert list(back) == sorted(many) and all(np.array_equal(back[n], many[n]) for n in many)


def mapped(array: np.ndarray) -> bool:
    base = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None) if not isinstance(base, memoryview) else base.obj
    return isinstance(base, mmap.mmap)


def test_round_trip_every_dtype_and_a_large_tensor_mapped_not_copied(tmp_path):
    tensors = make_fixtures.dtype_tensors()
    tensors["large"] = np.random.default_rng(0).standard_normal((1024, 2048)).astype(np.float32)  # 8 MiB
    tensors["unicode"] = np.array(["é", "", "b" * 200], dtype=object)  # str elements are written as UTF-8
    write_tf_checkpoint(tmp_path / "rt", tensors, num_shards=3)
    back = read_tf_checkpoint(tmp_path / "rt")
    tensors["unicode"] = np.array([s.encode() for s in tensors["unicode"]], dtype=object)
    assert list(back) == sorted(tensors)
    for name, value in tensors.items():
        assert describe(back[name]) == describe(value), name
    large = back["large"]
    assert not large.flags.owndata and mapped(large)
    data_files = {p: p.read_bytes() for p in tmp_path.glob("rt.data-*")}
    large[0, :] = 7.0  # copy-on-write: this process's page changes, the file does not
    to_torch(back["float32"]).mul_(2)
    assert all(p.read_bytes() == raw for p, raw in data_files.items())
    again = read_tf_checkpoint(tmp_path / "rt")
    assert np.array_equal(again["large"], tensors["large"]) and np.array_equal(again["float32"], tensors["float32"])
    copied = read_tf_checkpoint(tmp_path / "rt", mmap=False)["large"]
    assert not mapped(copied) and copied.flags.writeable and np.array_equal(copied, tensors["large"])


def test_torch_tensors_are_written_bfloat16_included(tmp_path):
    torch = pytest.importorskip("torch")
    values = {"w": torch.randn(3, 4), "bf": torch.randn(5).to(torch.bfloat16), "step": torch.tensor(7)}
    write_tf_checkpoint(tmp_path / "t", values)
    back = read_tf_checkpoint(tmp_path / "t")
    assert back["bf"].dtype == ml_dtypes.bfloat16 and torch.equal(to_torch(back["bf"]), values["bf"])
    assert torch.equal(to_torch(back["w"]), values["w"]) and back["step"].dtype == np.int64


# ---------------------------------------------------------------------------------------- bad input


def test_truncated_data_file_names_file_and_tensor(tmp_path):
    prefix = copy_fixture("dtypes", tmp_path)
    data = Path(f"{prefix}.data-00000-of-00001")
    data.write_bytes(data.read_bytes()[:300])
    with pytest.raises(TFCheckpointError, match=r"tensor '\w+' lies at bytes .* of .*data-00000-of-00001, which has "
                                                r"only 300 bytes: the data file is truncated"):
        read_tf_checkpoint(prefix)


def test_flipped_byte_in_a_tensor_fails_its_checksum(tmp_path):
    prefix = copy_fixture("sharded", tmp_path)
    entry = entry_of(prefix, "float32")
    data = Path(f"{prefix}.data-{entry.shard:05d}-of-00002")
    raw = bytearray(data.read_bytes())
    raw[entry.offset + 5] ^= 0x10
    data.write_bytes(bytes(raw))
    with pytest.raises(TFCheckpointError, match=rf"tensor 'float32' in .*{data.name} .* fails its checksum"):
        read_tf_checkpoint(prefix)
    assert read_tf_checkpoint(prefix, names=["int64"])["int64"][2] == 2**62 + 12345  # the others are intact
    unverified = read_tf_checkpoint(prefix, verify=False)["float32"]  # read anyway when asked
    assert describe(unverified) != EXPECTED["fixtures"]["sharded"]["tensors"]["float32"]


def test_flipped_byte_in_a_string_tensor(tmp_path):
    prefix = copy_fixture("dtypes", tmp_path)
    entry = entry_of(prefix, "strings")
    data = Path(f"{prefix}.data-00000-of-00001")
    raw = bytearray(data.read_bytes())
    raw[entry.offset + entry.size - 1] ^= 1  # in the last element's bytes
    data.write_bytes(bytes(raw))
    with pytest.raises(TFCheckpointError, match="tensor 'strings' in .* fails its checksum"):
        read_tf_checkpoint(prefix)
    raw[entry.offset + entry.size - 1] ^= 1
    raw[entry.offset] ^= 1  # the first length: its own checksum catches it
    data.write_bytes(bytes(raw))
    with pytest.raises(TFCheckpointError, match="'strings'.*(length|bytes)"):
        read_tf_checkpoint(prefix)


def index_positions(raw: bytes) -> dict[str, int]:
    (offset, size), = sstable.data_block_handles(raw)
    footer = len(raw) - sstable.FOOTER_SIZE
    _, after_metaindex = sstable.get_varint(raw, sstable.get_varint(raw, footer)[1])
    return {"data block": offset + 10, "block trailer": offset + size + 2, "index handle": after_metaindex,
            "magic": len(raw) - 1}


@pytest.mark.parametrize("where", ["data block", "block trailer", "index handle", "magic"])
def test_flipped_byte_in_the_index(tmp_path, where):
    prefix = copy_fixture("dtypes", tmp_path)
    index = Path(f"{prefix}.index")
    raw = bytearray(index.read_bytes())
    raw[index_positions(bytes(raw))[where]] ^= 0x01
    index.write_bytes(bytes(raw))
    with pytest.raises(TFCheckpointError, match=rf"{index} is not a readable TensorFlow checkpoint index: .*"
                                                r"(checksum|magic number)"):
        list_tf_checkpoint(prefix)


def test_missing_data_shard_says_which_and_what_to_do(tmp_path):
    prefix = copy_fixture("sharded", tmp_path)
    Path(f"{prefix}.data-00001-of-00002").unlink()
    with pytest.raises(TFCheckpointError, match=r"the data file .*model.ckpt.data-00001-of-00002 of checkpoint .* is "
                                                r"missing \(tensor '\w+' is in it\).*copy the missing file"):
        read_tf_checkpoint(prefix)
    assert "float32" in list_tf_checkpoint(prefix)  # the index alone still lists


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(TFCheckpointError, match=r"no TensorFlow checkpoint at .*nothing: .*nothing.index does not exist"):
        read_tf_checkpoint(tmp_path / "nothing")
    (tmp_path / "notes.index").write_text("just some text, long enough to hold a footer? " * 3)
    with pytest.raises(TFCheckpointError, match="does not end with the table magic number"):
        read_tf_checkpoint(tmp_path / "notes.index")
    (tmp_path / "tiny.index").write_bytes(b"abc")
    with pytest.raises(TFCheckpointError, match="fewer than a table's 48-byte footer"):
        read_tf_checkpoint(tmp_path / "tiny")
    with pytest.raises(TFCheckpointError, match=r"directory without a 'checkpoint' state file.*notes, tiny"
                                                r"|directory without a 'checkpoint' state file.*notes.index"):
        read_tf_checkpoint(tmp_path)


def test_writer_refuses_what_tensorflow_cannot_hold(tmp_path):
    with pytest.raises(TypeError, match="tensor 'x' has dtype <U|tensor 'x' has dtype float128|object array"):
        write_tf_checkpoint(tmp_path / "a", {"x": np.array([1, "a"], dtype=object)})
    with pytest.raises(ValueError, match="non-empty strings"):
        write_tf_checkpoint(tmp_path / "b", {"": np.zeros(1)})
    with pytest.raises(ValueError, match="is a directory"):
        write_tf_checkpoint(tmp_path, {"x": np.zeros(1)})
    assert not list(tmp_path.glob("*tempstate*"))


# ---------------------------------------------------------------------------------------- the pieces


def test_crc32c_backends_agree():
    assert crc32c.value(b"123456789") == 0xE3069283  # the standard check value of CRC-32C
    rng = np.random.default_rng(3)
    for n in (0, 1, 7, 4095, 4096 * 2, 4096 * 9 + 17, 100_000):
        data = rng.integers(0, 256, n, dtype=np.uint8)
        numpy_crc = crc32c._register_numpy(0xFFFFFFFF, data) ^ 0xFFFFFFFF
        python_crc = crc32c._register_small(0xFFFFFFFF, data.tobytes()) ^ 0xFFFFFFFF
        assert numpy_crc == python_crc == crc32c.value(data.tobytes()) == crc32c.value(memoryview(data)), n
        assert crc32c.extend(crc32c.value(data[: n // 3].tobytes()), data[n // 3:].tobytes()) == numpy_crc
        if crc32c._google is not None:  # the Python wrapper, on bytes (what the C library in place must equal)
            assert crc32c._google.value(data.tobytes()) == numpy_crc
    data = rng.integers(0, 256, 3 << 20, dtype=np.uint8)  # the wrapper's 1 MiB copies, when the C library is not found
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(crc32c, "_c_extend", None)
        wrapped = crc32c.value(memoryview(data))
    assert wrapped == crc32c.value(memoryview(data)) == crc32c._register_numpy(0xFFFFFFFF, data) ^ 0xFFFFFFFF
    for crc in (0, 1, 0xFFFFFFFF, 0x12345678):
        assert crc32c.unmask(crc32c.mask(crc)) == crc and crc32c.mask(crc) != crc


def test_reader_imports_neither_torch_nor_tensorflow():
    code = f"""
import sys, importlib.util
sys.modules["torch"] = None  # importing torch would fail
sys.modules["tensorflow"] = None
init = {str(REPO / "bertopt/interop/__init__.py")!r}
spec = importlib.util.spec_from_file_location("interop", init, submodule_search_locations=[init.rsplit("/", 1)[0]])
interop = importlib.util.module_from_spec(spec); sys.modules["interop"] = interop; spec.loader.exec_module(interop)
tensors = interop.read_tf_checkpoint({str(FIXTURES / "bert")!r})
print(int(tensors["global_step"]), len(tensors))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1000", str(len(EXPECTED["fixtures"]["bert"]["tensors"]))]


def test_exported_from_bertopt():
    assert bertopt.read_tf_checkpoint is read_tf_checkpoint and bertopt.write_tf_checkpoint is write_tf_checkpoint
    assert bertopt.list_tf_checkpoint is list_tf_checkpoint and "read_tf_checkpoint" in dir(bertopt)


def test_paths_a_data_file_and_a_state_file_with_an_absolute_path(tmp_path):
    prefix = write_tf_checkpoint(tmp_path / "run" / "model.ckpt-5", {"w": np.arange(3.0)}, state_file=True)
    assert read_tf_checkpoint(tmp_path / "run")["w"].tolist() == [0.0, 1.0, 2.0]  # the state file we wrote
    assert list(read_tf_checkpoint(f"{prefix}.data-00000-of-00001")) == ["w"]
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "checkpoint").write_text(f'model_checkpoint_path: "{prefix}"\n')  # as TF's Saver writes it
    assert list_tf_checkpoint(other) == {"w": ("float64", (3,))}
    (other / "checkpoint").write_text("all_model_checkpoint_paths: nothing\n")
    with pytest.raises(TFCheckpointError, match="has no model_checkpoint_path line"):
        read_tf_checkpoint(other)


def test_partitioned_variable_slices_are_checked(tmp_path):
    prefix = copy_fixture("sliced", tmp_path)
    entries = dict(_read_index(str(prefix))[1])
    wide_slices = [e for name, e in entries.items() if name.startswith("\0wide")]
    assert len(wide_slices) == 2 and len(entries["wide"].slices) == 2
    data = Path(f"{prefix}.data-00000-of-00001")
    raw = bytearray(data.read_bytes())
    raw[wide_slices[1].offset] ^= 0x20
    data.write_bytes(bytes(raw))
    with pytest.raises(TFCheckpointError, match=r"tensor 'wide \(slice \(\(0, -1\), \(\d+, \d+\)\)\)' in .* fails its "
                                                r"checksum"):
        read_tf_checkpoint(prefix)
    assert read_tf_checkpoint(prefix, names=["part"])["part"].tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_slice_key_escapes_each_byte_once():
    """OrderedCode's String escapes 0x00 as 00 ff and 0xff as ff 00, each byte of the name once
    (two chained replaces escaped the 00 of an ff 00 again); a name read with surrogateescape
    (an index key that is not UTF-8) encodes back to its bytes."""
    from bertopt.interop.tf_checkpoint import _slice_key

    key = _slice_key("a\udcffb\0c", ((1, -1),)).encode("utf-8", errors="surrogateescape")
    # NumIncreasing(0), the escaped name and its 00 01 terminator, NumIncreasing(1), then
    # SignedNumIncreasing(1) = 0x81 and SignedNumIncreasing(-1) = 0x7f.
    assert key == b"\x00" + b"a\xff\x00b\x00\xffc" + b"\x00\x01" + b"\x01\x01" + b"\x81\x7f"
