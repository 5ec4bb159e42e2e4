"""Atomic, verified checkpoints: round trip, corruption is detected, a killed save loses nothing."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch

from bertopt.train import checkpoint as ckpt


def _state(step: int) -> dict:
    return {"w": torch.full((4, 4), float(step)), "step": step, "nested": {"names": ["a", "b"], "t": (1, 2.5)}}


def test_round_trip_and_metadata(tmp_path):
    info = ckpt.save_checkpoint(tmp_path, 3, _state(3), meta={"run": {"preset": "tiny"}})
    assert info.step == 3 and info.meta == {"run": {"preset": "tiny"}}
    loaded = ckpt.load_checkpoint(tmp_path)
    assert loaded.info.step == 3 and loaded.skipped == []
    assert torch.equal(loaded.state["w"], torch.full((4, 4), 3.0))
    assert loaded.state["nested"] == {"names": ["a", "b"], "t": (1, 2.5)}
    # the manifest and the payload name the same checkpoint
    assert ckpt.load_checkpoint(info.manifest_path).info.step == 3
    assert ckpt.load_checkpoint(info.payload_path).info.step == 3


def test_keeps_the_newest_and_removes_leftovers(tmp_path):
    (tmp_path / ".step-00000009-abcd.pt.tmp-1-ff").write_bytes(b"half a save")  # a killed save
    (tmp_path / "step-00000009-dead.pt").write_bytes(b"orphan payload")
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, _state(step), keep=2)
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [3, 4]
    assert sorted(p.name[:13] for p in tmp_path.iterdir()) == ["step-00000003"] * 2 + ["step-00000004"] * 2


def test_resaving_a_step_replaces_it_atomically(tmp_path):
    ckpt.save_checkpoint(tmp_path, 5, _state(5))
    ckpt.save_checkpoint(tmp_path, 5, {"w": torch.zeros(1), "step": 5})
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [5]
    assert torch.equal(ckpt.load_checkpoint(tmp_path).state["w"], torch.zeros(1))
    assert len(list(tmp_path.glob("*.pt"))) == 1


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest"])
def test_damaged_newest_falls_back_to_previous(tmp_path, damage):
    ckpt.save_checkpoint(tmp_path, 1, _state(1))
    newest = ckpt.save_checkpoint(tmp_path, 2, _state(2))
    data = newest.payload_path.read_bytes()
    if damage == "flip":
        newest.payload_path.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    elif damage == "truncate":
        newest.payload_path.write_bytes(data[: len(data) // 2])
    elif damage == "delete":
        newest.payload_path.unlink()
    else:
        newest.manifest_path.write_text("{not json")
    loaded = ckpt.load_checkpoint(tmp_path)
    assert loaded.info.step == 1 and loaded.state["step"] == 1
    if damage != "manifest":  # an unreadable manifest is not a checkpoint at all
        assert len(loaded.skipped) == 1
        with pytest.raises(ckpt.CheckpointError, match="step-00000002"):
            ckpt.load_checkpoint(newest.manifest_path)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint found"):
        ckpt.load_checkpoint(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="no such"):
        ckpt.load_checkpoint(tmp_path / "missing.json")
    only = ckpt.save_checkpoint(tmp_path, 1, _state(1))
    only.payload_path.write_bytes(b"x" * only.size)  # same size, wrong bytes
    with pytest.raises(ckpt.CheckpointError, match="(?s)every checkpoint failed verification.*checksum"):
        ckpt.load_checkpoint(tmp_path)
    manifest = json.loads(only.manifest_path.read_text())
    manifest["format"] = 99
    only.manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointError, match="format 99"):
        ckpt.load_checkpoint(only.manifest_path)
    with pytest.raises(ValueError, match="keep"):
        ckpt.save_checkpoint(tmp_path, 1, _state(1), keep=-1)


def test_refuses_pickled_code(tmp_path):
    """weights_only loading: a payload with arbitrary objects is refused, not executed."""
    info = ckpt.save_checkpoint(tmp_path, 1, _state(1))
    import pickle

    info.payload_path.write_bytes(pickle.dumps(print, protocol=2))
    manifest = json.loads(info.manifest_path.read_text())
    manifest.update(bytes=info.payload_path.stat().st_size, sha256=ckpt.file_sha256(info.payload_path))
    info.manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointError, match="cannot be read"):
        ckpt.load_checkpoint(info.manifest_path)


def test_failed_manifest_write_keeps_previous(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 1, _state(1))

    def disk_full(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "atomic_write_bytes", disk_full)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, 2, _state(2))
    monkeypatch.undo()
    loaded = ckpt.load_checkpoint(tmp_path)
    assert loaded.info.step == 1 and loaded.skipped == []


def test_atomic_write_leaves_old_content_on_error(tmp_path):
    target = tmp_path / "f.json"
    ckpt.atomic_write_bytes(target, b"old")

    def half_then_fail(f):
        f.write(b"new but incomple")
        raise RuntimeError("writer died")

    with pytest.raises(RuntimeError):
        ckpt.atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def _save_forever(directory, ready_fd):
    """Child process: save checkpoints back to back; announce each save on ready_fd.

    The forked child runs no parallel torch op: libgomp's thread pool, inherited from a parent
    that used OpenMP, deadlocks on its first parallel region. numpy fills the tensor instead."""
    import numpy as np

    step = 0
    while True:
        step += 1
        big = torch.from_numpy(np.full(6_000_000, step, dtype=np.float32))  # 24 MB: a save can be killed mid-way
        os.write(ready_fd, b"s")
        ckpt.save_checkpoint(directory, step, {"big": big, "step": step}, keep=2)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_sigkill_mid_save_leaves_a_loadable_checkpoint(tmp_path):
    """SIGKILL a process that saves checkpoints back to back, at 12 different moments; every time
    the directory still holds a checkpoint that verifies and whose content matches its step."""
    killed_mid_write = 0
    for attempt in range(12):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            try:
                os.close(read_fd)
                _save_forever(tmp_path, write_fd)
            finally:
                os._exit(1)
        os.close(write_fd)
        os.read(read_fd, 1)
        os.read(read_fd, 1)  # the child has started its second save of this attempt
        time.sleep(0.004 * attempt)  # 0..44 ms: lands in payload writing, fsync, rename, pruning
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read_fd)
        killed_mid_write += any(p.name.startswith(".step-") for p in tmp_path.iterdir())
        loaded = ckpt.load_checkpoint(tmp_path)
        assert loaded.skipped == []  # an interrupted save never leaves a bad manifest behind
        assert loaded.state["step"] == loaded.info.step >= 1
        assert torch.equal(loaded.state["big"][:3], torch.full((3,), float(loaded.info.step)))
    assert killed_mid_write >= 1  # the test did hit a save in progress (temporary file left behind)
