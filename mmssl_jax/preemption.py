"""Stopping a run cleanly on SIGTERM/SIGINT: a flag checked at step boundaries.

A preempted run saves a checkpoint at the next step boundary and raises
`Preempted`; the CLI exits with 128 + the signal number (143 for SIGTERM,
130 for SIGINT), and the same command resumes. In multi-process runs every
process learns of a signal any of them received (`PreemptionGuard.agree`),
so all stop at the same step and the collective save cannot deadlock.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from mmssl_jax import multihost


class Preempted(Exception):
  """Training stopped by a signal after saving a checkpoint.

  `exit_code` is 128 + the signal number (143 for SIGTERM, 130 for SIGINT),
  the shell convention for a process ended by that signal.
  """

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum
    self.exit_code = 128 + signum


class PreemptionGuard:
  """Turns SIGTERM/SIGINT into a flag checked at step boundaries.

  Use as a context manager around the training loop (main thread only;
  elsewhere it installs nothing). The first signal sets `signum` and restores
  the previous handlers, so a second signal acts as usual (SIGINT raises
  KeyboardInterrupt, SIGTERM terminates) if the save hangs.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict[int, Any] = {}

  @property
  def requested(self) -> bool:
    return self.signum is not None

  @property
  def signal_name(self) -> str:
    return signal.Signals(self.signum).name if self.signum else ""

  def _handler(self, signum, frame):
    del frame
    self.signum = signum
    self._restore()

  def _restore(self):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}

  def __enter__(self) -> "PreemptionGuard":
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handler)
    return self

  def __exit__(self, *exc) -> None:
    self._restore()

  def agree(self) -> bool:
    """`requested`, agreed by all processes (a collective in multi-process
    runs: every process must call it at the same step boundary).

    A process that received no signal takes the one another process
    received, so every process stops, saves the same checkpoint (orbax saves
    are collective) and raises `Preempted` with the same exit status.
    """
    signum = multihost.agree_signal(self.signum)
    if signum is not None and self.signum is None:
      self.signum = signum
    return self.requested
