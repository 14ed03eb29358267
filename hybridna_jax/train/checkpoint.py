"""Orbax checkpoints of training runs.

A checkpoint step directory holds four items:

  params  the model parameters (nnx.State of Params)
  train   optimizer state and step counters (TrainState without params)
  meta    JSON: step, stage, and anything else the loop wants back
  data    the Grain iterator state (train runs only)

Saves are asynchronous; Orbax writes each step into a temporary directory and
renames it when complete, so a step left half-written by a crash is never
listed and the previous complete one is restored instead. Restoring takes
an abstract target carrying shardings, so a checkpoint restores onto any
mesh or device count; `restore_params` reads the parameters alone.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from hybridna_jax.train.step import TrainState


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings (restore targets)."""
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )


class Checkpoints:
  """The run's CheckpointManager: the last `keep` steps of a run directory."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      create=True,
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(
    self, state: TrainState, meta: dict, *, data_args: Any = None, force: bool = True
  ) -> None:
    step = int(jax.device_get(state.step))
    items = dict(
      params=ocp.args.StandardSave(state.params),
      train=ocp.args.StandardSave(state._replace(params=None)),
      meta=ocp.args.JsonSave({**meta, "step": step}),
    )
    if data_args is not None:
      items["data"] = data_args
    self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(
    self, step: int, target: TrainState, *, data_args: Any = None
  ) -> tuple[TrainState, dict]:
    """Restores the full train state into `target` (ShapeDtypeStructs with
    shardings, see `with_shardings`)."""
    items = dict(
      params=ocp.args.StandardRestore(target.params),
      train=ocp.args.StandardRestore(target._replace(params=None)),
      meta=ocp.args.JsonRestore(),
    )
    if data_args is not None:
      items["data"] = data_args
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    state = restored.train._replace(params=restored.params)
    return state, dict(restored.meta)

  def restore_meta(self, step: int) -> dict:
    return dict(
      self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    )

  def restore_params(self, step: int, target: Any) -> Any:
    """Parameters alone (no optimizer state), into `target`."""
    return self.manager.restore(
      step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target))
    ).params

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
