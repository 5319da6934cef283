"""Progress for the training loop: a one-line epoch bar and TensorBoard scalars.

`EpochProgress` redraws a single terminal line while an epoch runs:

  epoch   3 [#########-----------]  120/400 00:12<00:28 loss 0.1234 bpr 0.1111

It writes only to a terminal (by default: when `stream.isatty()`), so logs and
CI output keep the loop's own one line per epoch. Loss terms are optional per
call: reading them costs a device->host transfer (and a sync) per step, so
pass them every N steps and call `update(None)` in between; the running means
are over the terms received.

`MetricWriter` writes scalars to TensorBoard event files through tensorboardX
when it is installed (`pip install "mmssl_jax[tensorboard]"`) and silently
does nothing otherwise. Neither class needs TensorFlow or JAX.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Any, Callable, Mapping, TextIO

BAR_WIDTH = 20
MIN_INTERVAL_S = 0.1  # at most ~10 redraws per second


def _clock_str(seconds: float) -> str:
  seconds = int(max(0.0, seconds))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _isatty(stream: Any) -> bool:
  try:
    return bool(stream.isatty())
  except (AttributeError, ValueError):  # no isatty, or a closed stream
    return False


class EpochProgress:
  """A throttled one-line progress bar for the steps of one epoch.

  Usage:
    bar = EpochProgress(steps_per_epoch, epoch=epoch)
    for idx in range(steps_per_epoch):
      state, terms = step(state, ...)
      bar.update(jax.device_get(terms) if idx % 10 == 0 else None)
    bar.close()

  Args:
    total_steps: steps in the epoch.
    epoch: the epoch number shown at the start of the line.
    initial: steps already done before this bar starts (a resumed epoch);
      they count as done but not towards the step rate behind the ETA.
    enabled: draw or not; default: whether `stream` is a terminal.
    stream: where to draw; default: `sys.stderr` at construction time.
    min_interval: minimum seconds between redraws (the last step and
      `close()` always redraw).
    columns: line width limit; default: the terminal width.
    clock: a monotonic clock in seconds (for tests).
  """

  def __init__(self, total_steps: int, *, epoch: int, initial: int = 0,
               enabled: bool | None = None, stream: TextIO | None = None,
               min_interval: float = MIN_INTERVAL_S,
               columns: int | None = None,
               clock: Callable[[], float] = time.monotonic):
    self.total = max(0, int(total_steps))
    self.epoch = epoch
    self.stream = sys.stderr if stream is None else stream
    self.enabled = _isatty(self.stream) if enabled is None else bool(enabled)
    self.min_interval = min_interval
    self.columns = columns
    self.steps = self.initial = max(0, int(initial))
    self._clock = clock
    self._start = clock()
    self._last_draw = -float("inf")
    self._sums: dict[str, float] = {}
    self._counts: dict[str, int] = {}
    self._width = 0  # length of the line on screen, to blank leftovers
    self._dirty = True  # state changed since the last draw
    self._closed = False

  @property
  def means(self) -> dict[str, float]:
    """Running mean of every loss term received so far."""
    return {k: self._sums[k] / self._counts[k] for k in self._sums}

  def update(self, step_terms: Mapping[str, Any] | None = None,
             steps: int = 1) -> None:
    """Advances by `steps` steps; `step_terms` (if any) feed the means.

    Values are converted with `float`, so JAX arrays work, but each one is a
    device->host transfer: pass terms only every few steps. A disabled bar
    never reads them (no transfer, empty `means`).
    """
    self.steps += steps
    if not self.enabled or self._closed:
      return
    if step_terms:
      for k, v in step_terms.items():
        self._sums[k] = self._sums.get(k, 0.0) + float(v)
        self._counts[k] = self._counts.get(k, 0) + 1
    self._dirty = True
    now = self._clock()
    if (now - self._last_draw >= self.min_interval
        or self.steps >= self.total):
      self._draw(now)

  def close(self) -> None:
    """Draws the final state and ends the line (idempotent)."""
    if self._closed:
      return
    self._closed = True
    if self.enabled:
      if self._dirty:
        self._draw(self._clock())
      self.stream.write("\n")
      self.stream.flush()

  def __enter__(self) -> EpochProgress:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def line(self, now: float | None = None) -> str:
    """The text of the progress line (without the carriage return)."""
    now = self._clock() if now is None else now
    elapsed = now - self._start
    frac = min(1.0, self.steps / self.total) if self.total else 1.0
    filled = int(round(frac * BAR_WIDTH))
    bar = "#" * filled + "-" * (BAR_WIDTH - filled)
    if self.steps >= self.total:
      timing = _clock_str(elapsed)
    elif self.steps > self.initial:
      rate = (self.steps - self.initial) / max(elapsed, 1e-9)
      eta = (self.total - self.steps) / rate
      timing = f"{_clock_str(elapsed)}<{_clock_str(eta)}"
    else:
      timing = f"{_clock_str(elapsed)}<?"
    digits = len(str(self.total))
    means = self.means
    order = sorted(means, key=lambda k: (k != "loss",))  # loss first
    terms = " ".join(f"{k} {means[k]:.4f}" for k in order)
    text = (f"epoch {self.epoch:3d} [{bar}] {self.steps:{digits}d}/"
            f"{self.total} {timing}")
    return f"{text} {terms}" if terms else text

  def _draw(self, now: float) -> None:
    self._last_draw, self._dirty = now, False
    columns = self.columns or shutil.get_terminal_size((100, 20)).columns
    text = self.line(now)[:max(1, columns - 1)]  # no wrap: \r must work
    pad = " " * max(0, self._width - len(text))
    self.stream.write("\r" + text + pad)
    self.stream.flush()
    self._width = len(text)


class MetricWriter:
  """Scalars to TensorBoard event files in `workdir`, via tensorboardX.

  With `enabled=False`, or without tensorboardX installed, every method is a
  silent no-op (`active` is then False) and nothing is written. View with `tensorboard --logdir=WORKDIR`. tensorboardX
  replaces characters outside [A-Za-z0-9_./-] in tags, so `val/recall@20`
  shows up as `val/recall_20`.
  """

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True):
    self.workdir = os.fspath(workdir)
    self._writer = None
    if not enabled:
      return
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    except ImportError:
      return
    self._writer = SummaryWriter(self.workdir)

  @property
  def active(self) -> bool:
    return self._writer is not None

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Writes every numeric value of `scalars` at `step`, then flushes.

    Non-numeric values (strings, None, nested dicts) are skipped, so a whole
    metrics.jsonl record can be passed as is.
    """
    if self._writer is None:
      return
    for name, value in scalars.items():
      if isinstance(value, (bool, str)) or value is None:
        continue
      try:
        value = float(value)
      except (TypeError, ValueError):
        continue
      self._writer.add_scalar(name, value, global_step=int(step))
    self._writer.flush()

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
