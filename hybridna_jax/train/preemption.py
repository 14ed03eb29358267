"""Stopping a run in order: SIGTERM and SIGINT set a flag (`Preemption`)
that the loop honours after the running step, while waiting for data
(`fetch`) and between the batches of an evaluation (`check_eval_interrupt`)."""

from __future__ import annotations

import contextlib
import signal
import threading

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from hybridna_jax.train import startup_signal


class EvalInterrupted(Exception):
  """A stop was requested during an evaluation of `loop.train`, which abandons it
  (`check_eval_interrupt`)."""


class Preemption:
  """SIGTERM and SIGINT (Ctrl-C) set a flag; the loop saves a checkpoint and
  exits after the step that is running (a compile included), at once while
  waiting for data (`fetch`), and after the batch that is running during
  an evaluation (`check_eval_interrupt`), whose result is dropped. A second
  SIGINT raises KeyboardInterrupt: stop now, without a new checkpoint (a save
  already in flight is completed first, `finish_saves`). A SIGTERM recorded
  while the launcher started up (`startup_signal`) counts as one at entry."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)
  # The one `loop.train` running in this process, for `check_eval_interrupt`.
  running: Preemption | None = None

  def __init__(self, action: str = "saving a checkpoint and stopping after this step"):
    self.action = action  # what the log says a signal does
    self.requested = False
    self.evaluating = False
    self._previous: dict = {}
    self._outer: Preemption | None = None
    # The run's checkpoint managers, whose saves in flight `finish_saves`
    # completes when the run stops on an exception.
    self.managers: list = []

  def __enter__(self):
    def handler(signum, frame):
      del frame
      if self.requested and signum == signal.SIGINT:
        raise KeyboardInterrupt
      logging.warning("signal %d: %s (Ctrl-C again: stop at once).", signum, self.action)
      self.requested = True

    for sig in self.SIGNALS:
      try:
        self._previous[sig] = signal.signal(sig, handler)
      except ValueError:  # not the main thread (e.g. some test runners)
        pass
    self._outer, Preemption.running = Preemption.running, self
    if startup_signal.received() is not None and not self.requested:
      logging.warning(
        "signal %d came while starting up: %s.", startup_signal.received(), self.action
      )
      self.requested = True
    return self

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}
    Preemption.running = self._outer

  @contextlib.contextmanager
  def evaluation(self):
    """Marks an evaluation, which `check_eval_interrupt` may abandon."""
    self.evaluating = True
    try:
      yield
    finally:
      self.evaluating = False

  def finish_saves(self, error: BaseException) -> None:
    """Completes the checkpoint saves in flight (an async save of the last
    interval is whole data) before `error` ends the process, whose exit
    would cut them off. Ctrl-C again abandons them. One process only: with
    several, the save's commit waits on every process, which an exception of
    this one may never let reach it."""
    if jax.process_count() > 1:
      return
    for manager in self.managers:
      if not manager.saving():
        continue
      logging.warning(
        "stopping (%s); finishing the checkpoint save in flight in %s first (Ctrl-C again "
        "to abandon it).",
        type(error).__name__,
        manager.directory,
      )
      try:
        manager.wait()
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("the save in flight in %s failed: %s", manager.directory, e)

  def any_host(self) -> bool:
    if jax.process_count() == 1:
      return self.requested
    flags = multihost_utils.process_allgather(np.array(self.requested))
    return bool(np.any(flags))


def stop_signals(action: str) -> Preemption:
  """A context manager catching SIGTERM and SIGINT outside `loop.train` (e.g.
  between the runs of a fine-tuning suite, whose default action would kill
  the process and lose the orderly stop); `.any_host()` says whether one
  came (a collective with several processes). `action` is what the log
  says a signal does."""
  return Preemption(action)


def check_eval_interrupt() -> None:
  """Raises EvalInterrupted when the `loop.train` running in this process
  evaluates and a stop was requested (on any host): a long evaluation would
  hold up the checkpoint past the grace time of a preemption. Evaluation
  loops call it between batches; with several processes it is a collective,
  so every process calls it at the same batches. Outside `loop.train`'s
  evaluations (finish, launch/eval.py) it does nothing."""
  preemption = Preemption.running
  if preemption is not None and preemption.evaluating and preemption.any_host():
    raise EvalInterrupted


_WAIT_POLL_S = 0.2


def fetch(iterator, preemption: Preemption):
  """next(iterator), read on a daemon thread so that a signal is honoured
  while the data is slow or never comes: returns None when a preemption is
  requested before the batch arrives (single process; with several, every
  process waits for its batch, so that collectives stay in step).
  Exceptions of the iterator are re-raised here."""
  if jax.process_count() > 1:
    return next(iterator)
  box: dict = {}
  done = threading.Event()

  def read():
    try:
      box["batch"] = next(iterator)
    except BaseException as e:  # pylint: disable=broad-except
      box["error"] = e
    done.set()

  threading.Thread(target=read, name="next-batch", daemon=True).start()
  while not done.wait(_WAIT_POLL_S):
    if preemption.requested:
      return None
  if "error" in box:
    raise box["error"]
  return box["batch"]
