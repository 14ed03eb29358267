"""A SIGTERM that comes while a training program starts up.

Imports and jax.distributed start-up (which can wait minutes for the other
hosts) come before `loop.train` installs its handler (`preemption.Preemption`);
under the default action such a SIGTERM (a Slurm time limit or preemption)
killed the process with status 143 and no summary, so the job was not
requeued. The training launchers call `catch` before they read their flags
and config (`launch_utils.run(record_sigterm=True)`; generate.py's finetune
mode at the top of `main`): the signal is recorded here, and `loop.train`
honours it before its first step (no compile): it saves the state it starts
from and returns "stopped": "preempted" (exit status 0). A fine-tuning suite
stops before its first task. What is left unguarded is the interpreter's
start and the launcher's imports (about a second).

SIGINT keeps its default (KeyboardInterrupt): a Ctrl-C while starting up
loses no step. No jax here, so this imports in milliseconds.
"""

from __future__ import annotations

import signal

from absl import logging

_received: int | None = None


def catch() -> None:
  """Records SIGTERM from now until `loop.train` takes over (and after it
  returns, when a summary is being written)."""

  def record(signum, frame):
    del frame
    global _received
    _received = signum
    logging.warning(
      "signal %d while starting up: the run stops at its first chance once training starts.",
      signum,
    )

  signal.signal(signal.SIGTERM, record)


def received() -> int | None:
  """The signal `catch` recorded, or None."""
  return _received


def reset() -> None:
  """Forgets a recorded signal (tests)."""
  global _received
  _received = None
