"""Shared plumbing of the absl programs under launch/: the --config and
--workdir flags, and multi-host start-up."""

from __future__ import annotations

import logging as logging_std
import os

import jax
from absl import flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS


def define_flags(default_config: str | None = None, workdir_required: bool = True) -> None:
  """--config=<configs/file.py>[:variant] (with --config.x.y=... overrides),
  --workdir, and the multi-host flags."""
  config_flags.DEFINE_config_file(
      "config", default_config, "Config file, e.g. configs/demo.py[:variant]; "
      "override fields with --config.train.steps=...", lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, outputs).",
                      required=workdir_required)
  flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                    "Call jax.distributed.initialize(): 'auto' does when a "
                    "coordinator is given or a cluster (SLURM, TPU pod) is detected.")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
  flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")


class _LibraryInfoFilter(logging_std.Filter):
  """Drops INFO records from chatty libraries (Orbax logs several lines per
  checkpoint); their warnings and errors still show."""

  _QUIET = ("orbax", "grain", "jax/_src")

  def filter(self, record: logging_std.LogRecord) -> bool:
    return record.levelno > logging_std.INFO or not any(
        part in record.pathname for part in self._QUIET)


def quiet_library_logs() -> None:
  logging.get_absl_handler().addFilter(_LibraryInfoFilter())


def _cluster_detected() -> bool:
  env = os.environ
  return (int(env.get("SLURM_NTASKS", "1")) > 1
          or len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1
          or "JAX_COORDINATOR_ADDRESS" in env)


def initialize_distributed() -> None:
  """Multi-host start-up; a no-op for single-process runs."""
  mode = FLAGS.distributed
  explicit = FLAGS.coordinator_address is not None
  if mode == "off" or (mode == "auto" and not explicit and not _cluster_detected()):
    return
  # Cross-process collectives of the CPU client (tests, debugging) go
  # through gloo; GPU/TPU clients are unaffected. (Asking for the backend
  # here would initialise it, which must wait for initialize().)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if explicit:
    kwargs = dict(coordinator_address=FLAGS.coordinator_address,
                  num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  jax.distributed.initialize(**kwargs)
  logging.info("process %d/%d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
