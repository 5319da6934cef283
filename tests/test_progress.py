"""progress: the terminal-only epoch bar and the optional TensorBoard writer."""

from __future__ import annotations

import io
from pathlib import Path
import struct
import sys

import numpy as np
import pytest

from mmssl_jax import progress


class FakeTTY(io.StringIO):

  def isatty(self) -> bool:
    return True


class FakeClock:

  def __init__(self):
    self.now = 1000.0

  def __call__(self) -> float:
    return self.now


def test_silent_without_a_terminal():
  stream = io.StringIO()
  bar = progress.EpochProgress(10, epoch=0, stream=stream)
  assert not bar.enabled
  for _ in range(10):
    bar.update({"loss": 1.0})
  bar.close()
  assert stream.getvalue() == ""
  assert bar.means == {}  # disabled: terms are never read (no device sync)

  forced = FakeTTY()
  bar = progress.EpochProgress(3, epoch=0, stream=forced, enabled=False)
  bar.update({"loss": 1.0})
  bar.close()
  assert forced.getvalue() == ""


def test_bar_on_a_terminal():
  stream, clock = FakeTTY(), FakeClock()
  bar = progress.EpochProgress(100, epoch=3, stream=stream, clock=clock,
                               columns=200)
  assert bar.enabled
  clock.now += 10.0
  bar.update({"bpr": 0.5, "loss": 1.0}, steps=25)
  first = stream.getvalue()
  assert first.startswith("\repoch   3 [#####---------------]  25/100 ")
  # 10 s for 25 steps -> 30 s to go; loss is shown first.
  assert "00:10<00:30 loss 1.0000 bpr 0.5000" in first
  clock.now += 10.0
  bar.update(None, steps=25)  # advances without new terms
  assert "  50/100 00:20<00:20 loss 1.0000" in stream.getvalue().split("\r")[-1]
  bar.update({"loss": 3.0, "bpr": 1.5})  # < 0.1 s later: not redrawn
  assert stream.getvalue().count("\r") == 2
  clock.now += 0.4
  bar.update(None)  # 20.4 s for 52 steps -> 18.8 s to go
  assert bar.means == {"loss": 2.0, "bpr": 1.0}
  line = stream.getvalue().split("\r")[-1]
  assert "  52/100 00:20<00:18 loss 2.0000 bpr 1.0000" in line
  assert "\n" not in stream.getvalue()
  bar.close()
  out = stream.getvalue()
  assert out.endswith("\n") and out.count("\n") == 1
  assert out.split("\r")[-1].startswith("epoch   3 [##########----------]")
  bar.close()  # idempotent
  assert stream.getvalue() == out


def test_resumed_epoch_eta():
  stream, clock = FakeTTY(), FakeClock()
  bar = progress.EpochProgress(100, epoch=2, initial=60, stream=stream,
                               clock=clock, columns=200)
  assert "  60/100 00:00<?" in bar.line()
  clock.now += 4.0
  bar.update(None, steps=20)  # 20 new steps in 4 s -> 20 to go in 4 s
  assert "  80/100 00:04<00:04" in stream.getvalue()


def test_redraws_are_throttled():
  stream, clock = FakeTTY(), FakeClock()
  bar = progress.EpochProgress(1000, epoch=0, stream=stream, clock=clock,
                               columns=200)
  for _ in range(999):
    clock.now += 0.001  # 1 ms per step: ~1 s in all
    bar.update({"loss": np.float32(0.25)})
  draws = stream.getvalue().count("\r")
  assert 9 <= draws <= 11, draws  # ~10 per second, not 999
  clock.now += 0.01
  bar.update(None)  # the last step always draws
  assert stream.getvalue().count("\r") == draws + 1
  assert "1000/1000 00:01 loss 0.2500" in stream.getvalue().split("\r")[-1]
  bar.close()  # already drawn: only ends the line
  assert stream.getvalue().count("\r") == draws + 1
  assert stream.getvalue().endswith("\n")


def test_line_fits_the_terminal_and_blanks_leftovers():
  stream, clock = FakeTTY(), FakeClock()
  bar = progress.EpochProgress(10, epoch=1, stream=stream, clock=clock,
                               columns=40, min_interval=0.0)
  bar.update({"a_long_loss_name": 1.0})
  assert len(stream.getvalue().split("\r")[-1]) == 39
  wide = progress.EpochProgress(10, epoch=1, stream=FakeTTY(), clock=clock,
                                columns=200, min_interval=0.0)
  wide.update({"a_long_loss_name": 1.0, "b": 2.0})
  before = len(wide.line())
  wide._sums.clear()  # pylint: disable=protected-access
  wide._counts.clear()  # pylint: disable=protected-access
  wide.update(None)  # shorter line: padded over the old one
  assert len(wide.stream.getvalue().split("\r")[-1]) == before


def test_metric_writer_is_a_no_op_without_tensorboardx(tmp_path: Path,
                                                       monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails
  with progress.MetricWriter(tmp_path) as writer:
    assert not writer.active
    writer.write_scalars(0, {"train/loss": 1.0})
    writer.flush()
  assert list(tmp_path.iterdir()) == []


def test_metric_writer_disabled(tmp_path: Path):
  writer = progress.MetricWriter(tmp_path, enabled=False)
  assert not writer.active
  writer.write_scalars(0, {"train/loss": 1.0})
  writer.close()
  assert list(tmp_path.iterdir()) == []


def read_scalars(path: Path) -> list[tuple[int, str, float]]:
  """(step, tag, value) of every scalar in a TFRecord event file."""
  event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")
  data, out, pos = path.read_bytes(), [], 0
  while pos < len(data):
    (length,) = struct.unpack("<Q", data[pos:pos + 8])
    event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
    pos += 12 + length + 4  # length, its crc, payload, payload crc
    out += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
  return out


def test_metric_writer_writes_events(tmp_path: Path):
  pytest.importorskip("tensorboardX")
  with progress.MetricWriter(tmp_path) as writer:
    assert writer.active
    writer.write_scalars(0, {"train/loss": 1.5, "val/recall@20": 0.25})
    writer.write_scalars(1, {"train/loss": np.float32(0.5), "note": "text",
                             "test": {"nested": 1.0}, "flag": True})
  files = list(tmp_path.glob("events.out.tfevents.*"))
  assert len(files) == 1 and files[0].stat().st_size > 0
  assert read_scalars(files[0]) == [(0, "train/loss", 1.5),
                                    # tensorboardX turns '@' into '_'
                                    (0, "val/recall_20", 0.25),
                                    (1, "train/loss", 0.5)]
