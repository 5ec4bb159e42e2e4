"""`bertopt schedule`: printed table and PNG, through bertopt.cli.main."""

from __future__ import annotations

import re
import struct

import pytest

pytest.importorskip("matplotlib")

from bertopt import schedules
from bertopt.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def table_rows(text: str) -> dict[int, list[float]]:
    """step -> printed LRs, from the lines that start with a step number."""
    rows = {}
    for line in text.splitlines():
        match = re.match(r"^\s*(\d+)((?:\s+[-+.eE\d]+)+)", line)
        if match:
            rows[int(match.group(1))] = [float(v) for v in match.group(2).split()]
    return rows


def assert_valid_png(path, width=960, height=540):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR" and struct.unpack(">II", data[16:24]) == (width, height)
    import matplotlib.image

    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (height, width)
    assert pixels.std() > 0.05  # something was drawn


def test_compare_prints_google_and_rebased_values_and_writes_png(tmp_path, capsys):
    out = tmp_path / "plots" / "bert.png"
    total, warmup, lr = 200, 20, 1e-3
    argv = ["schedule", "--steps", str(total), "--warmup-steps", str(warmup), "--lr", str(lr),
            "--compare", "--every", "50", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    rows = table_rows(printed)
    # every 50th step, the step T, and both sides of the warmup boundary
    assert sorted(rows) == [0, 19, 20, 50, 100, 150, 200]
    for step, (google, rebased) in rows.items():
        # written out independently of bertopt.schedules; 8 significant digits printed -> rel 1e-7
        want_google = lr * step / warmup if step < warmup else lr * (1 - step / total)
        want_rebased = lr * step / warmup if step < warmup else lr * (total - step) / (total - warmup)
        assert google == pytest.approx(want_google, rel=1e-7, abs=0)
        assert rebased == pytest.approx(want_rebased, rel=1e-7, abs=0)
    assert rows[20] == pytest.approx([lr * 0.9, lr], rel=1e-7)  # google's drop at the end of warmup
    assert "last warmup step" in printed and f"wrote {out}" in printed
    assert_valid_png(out)


def test_defaults_use_warmup_proportion_and_write_schedule_png_in_cwd(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["schedule", "--steps", "1005"]) == 0
    rows = table_rows(capsys.readouterr().out)
    import torch

    scheduler = schedules.bert_schedule(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=5e-5), 1005)
    assert scheduler.schedule.num_warmup_steps == 100  # int(1005 * 0.1)
    assert {99, 100, 1005} <= set(rows)
    for step, (value,) in rows.items():
        assert value == pytest.approx(scheduler.lr_at(step)[0], rel=1e-7, abs=0)
    assert_valid_png(tmp_path / "schedule.png")


@pytest.mark.parametrize("name", schedules.SCHEDULE_NAMES)
def test_every_schedule_name_runs(name, tmp_path, capsys):
    out = tmp_path / f"{name}.png"
    assert main(["schedule", "--schedule", name, "--steps", "60", "--warmup-steps", "6", "--out", str(out)]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert rows[0] == [0.0] and rows[5] == [pytest.approx(5e-5 * 5 / 6, rel=1e-7)]  # the shared linear warmup
    expected_end = {"constant": 5e-5, "inverse_sqrt": 5e-5 * (6 / 60) ** 0.5}.get(name, 0.0)
    assert rows[60] == [pytest.approx(expected_end, rel=1e-7, abs=0)]
    assert_valid_png(out)


def test_polynomial_power_reaches_the_schedule(tmp_path, capsys):
    argv = ["schedule", "--schedule", "polynomial", "--power", "0.5", "--steps", "100", "--warmup-steps", "10",
            "--lr", "1", "--every", "25", "--out", str(tmp_path / "p.png")]
    assert main(argv) == 0
    rows = table_rows(capsys.readouterr().out)
    assert rows[75] == [pytest.approx(0.25**0.5, rel=1e-7)]  # NVIDIA LAMB: (1 - step/T) ** 0.5


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--schedule", "cosine", "--power", "2"], "power"),
        (["--schedule", "cosine", "--compare"], "--compare"),
        (["--schedule", "wsd", "--style", "rebased"], "--style"),
        (["--compare", "--style", "google"], "--style"),
        (["--steps", "0"], "num_train_steps"),
        (["--steps", "10", "--warmup-steps", "11"], "longer than training"),
        (["--lr", "-1"], "--lr"),
        (["--every", "0"], "--every"),
    ],
)
def test_bad_options_exit_2_with_a_message(argv, message, tmp_path, capsys):
    out = tmp_path / "x.png"
    assert main(["schedule", *argv, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_debug_shows_the_exception(tmp_path):
    with pytest.raises(ValueError, match="num_train_steps"):
        main(["--debug", "schedule", "--steps", "0", "--out", str(tmp_path / "x.png")])
