"""Orbax checkpoints of training runs.

A checkpoint step directory holds three items:

  params  the model parameters (nnx.State of Params)
  train   optimizer state and step counters (TrainState without params)
  meta    JSON: step, stage, and anything else the loop wants back

(no data-iterator state: the loop restarts the data stream at the step's
batch; the `data` item of earlier versions' steps is not read).

Saves are asynchronous; Orbax writes each step into a temporary directory and
renames it when complete (on gs://, which has no rename, it writes a commit
marker last), so a step left half-written by a crash is never listed. The
directory may be local, file:// or gs:// (`hybridna_jax.paths`). A step
damaged after it was written (truncated or deleted array files, a missing
item, an empty step directory) is found by `restore_newest`, reported, and
moved aside to <directory>.damaged/<step> (never deleted), and the newest
complete step is restored instead. A checkpoint whose arrays do not fit the
target (another architecture) is not damage: `check_fits` names the
parameters and nothing is moved. Restoring takes an abstract target carrying
shardings, so a checkpoint restores onto any mesh or device count;
`restore_params` reads the parameters alone.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from hybridna_jax import paths
from hybridna_jax.train.step import TrainState


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings (restore targets)."""
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )


class CheckpointMismatchError(ValueError):
  """The checkpoint's arrays do not fit the model being restored (another
  architecture); the message names the parameters."""


# A run directory (launch/train.py, launch/finetune.py): its config, its
# checkpoints and the best dev/val step's.
CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "best"


class CheckpointDamagedError(ValueError):
  """A step directory that cannot be read back (see `restore_newest`); a
  ValueError, so that launchers report it in one line."""


def check_finite(state: TrainState) -> None:
  """Raises CheckpointDamagedError naming the parameters and optimizer
  arrays that hold NaN or inf: bytes changed in the array files (which
  restore without complaint) or a divergence that was saved. A resume from
  such a state would skip every step (non-finite losses, `step.py`) and save
  copies of it over the good checkpoints."""
  named = [
    (jax.tree_util.keystr(path), x)
    for path, x in jax.tree_util.tree_leaves_with_path((state.params, state.opt_state))
    if jnp.issubdtype(x.dtype, jnp.inexact)
  ]
  finite = jax.device_get(
    jax.jit(lambda xs: [jnp.isfinite(x).all() for x in xs])([x for _, x in named])
  )
  bad = [name for (name, _), ok in zip(named, finite) if not ok]
  if bad:
    raise CheckpointDamagedError(
      f"non-finite values in {len(bad)} array(s), e.g. {', '.join(bad[:3])}"
    )


# Items every step directory holds.
_ITEMS = ("params", "train", "meta")


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  """{'a.b.c': shape} of the array leaves of `tree` (arrays,
  ShapeDtypeStructs or Orbax ArrayMetadata)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {
    ".".join(_key_name(k) for k in path): tuple(leaf.shape)
    for path, leaf in leaves
    if hasattr(leaf, "shape")
  }


def describe_mismatch(
  stored: dict[str, tuple[int, ...]], wanted: dict[str, tuple[int, ...]], limit: int = 6
) -> list[str]:
  """One phrase per parameter that differs between `stored` (the
  checkpoint) and `wanted` (the model): shape, missing or extra."""
  problems = []
  for name in sorted(set(stored) | set(wanted)):
    if name not in stored:
      problems.append(f"{name} {wanted[name]} is not in the checkpoint")
    elif name not in wanted:
      problems.append(f"{name} {stored[name]} is in the checkpoint but not in the model")
    elif stored[name] != wanted[name]:
      problems.append(f"{name} is {stored[name]} in the checkpoint but {wanted[name]} here")
  if len(problems) > limit:
    problems = problems[:limit] + [f"{len(problems) - limit} more"]
  return problems


class Checkpoints:
  """The run's CheckpointManager: the last `keep` steps of a run directory.

  `create=False` opens an existing directory for reading without creating
  it, and without clearing its unfinished (`*.orbax-checkpoint-tmp`) saves:
  those may be a running trainer's save in flight, which a writer's opening
  clears as the leftovers of a killed run."""

  def __init__(
    self, directory: str, *, keep: int = 3, async_save: bool = True, create: bool = True
  ):
    self.directory = paths.checkpoint_path(directory, "checkpoint directory")
    self._options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      create=create,
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=create,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=self._options)

  @property
  def damaged_directory(self):
    """Where damaged steps are moved: <directory>.damaged/<step>."""
    return self.directory.parent / (self.directory.name + ".damaged")

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, state: TrainState, meta: dict, *, force: bool = True) -> None:
    step = int(jax.device_get(state.step))
    items = dict(
      params=ocp.args.StandardSave(state.params),
      train=ocp.args.StandardSave(state._replace(params=None)),
      meta=ocp.args.JsonSave({**meta, "step": step}),
    )
    self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, target: TrainState) -> tuple[TrainState, dict]:
    """Restores the full train state into `target` (ShapeDtypeStructs with
    shardings, see `with_shardings`), and the step's meta."""
    restored = self.manager.restore(
      step,
      args=ocp.args.Composite(
        params=ocp.args.StandardRestore(target.params),
        train=ocp.args.StandardRestore(target._replace(params=None)),
        meta=ocp.args.JsonRestore(),
      ),
    )
    state = restored.train._replace(params=restored.params)
    return state, dict(restored.meta)

  def step_directory(self, step: int):
    """The step's directory (an epath.Path)."""
    return self.directory / str(step)

  def check_complete(self, step: int) -> None:
    """Raises CheckpointDamagedError naming what is missing from the step
    directory (an item, its metadata or its OCDBT manifest). Cheap: reads
    no arrays (truncated array files show only when read, see
    `restore_newest`)."""
    root = self.step_directory(step)
    missing = [i for i in _ITEMS if not (root / i).is_dir()]
    if missing:
      raise CheckpointDamagedError(f"item(s) {', '.join(missing)} missing")
    needed = ["meta/metadata"]
    for item in ("params", "train"):
      needed += [f"{item}/_METADATA", f"{item}/manifest.ocdbt"]
    absent = [p for p in needed if not (root / p).is_file()]
    if absent:
      raise CheckpointDamagedError(f"{', '.join(absent)} missing")

  def check_fits(self, step: int, target: TrainState | None = None, *, params: Any = None) -> None:
    """Raises CheckpointMismatchError, naming the parameters, when the
    step's arrays do not have the shapes of `target` (a TrainState) or of
    `params` alone (another architecture); CheckpointDamagedError when its
    metadata is unreadable."""
    problems = []
    if target is not None:
      trees = (("params", target.params), ("train", target._replace(params=None)))
    else:
      trees = (("params", params),)
    for item, tree in trees:
      try:
        stored = ocp.StandardCheckpointer().metadata(self.step_directory(step) / item)
        stored = _shapes(getattr(stored, "item_metadata", stored))
      except Exception as e:  # pylint: disable=broad-except
        raise CheckpointDamagedError(f"{item}/ metadata unreadable ({_first_line(e)})") from e
      problems += [f"{item} {p}" for p in describe_mismatch(stored, _shapes(tree))]
    if problems:
      if not any(p.startswith("params ") for p in problems) and "opt_state" in problems[0]:
        # The parameters fit; the optimizer's state has another structure.
        fix = (
          "The optimizer settings must match the ones the checkpoint was written with "
          "(config.train.grad_clip on or off, finetune.freeze_backbone, the optimizer)."
        )
        what = "optimizer state"
      else:
        fix = "The model config must match the one the checkpoint was written with."
        what = "model"
      raise CheckpointMismatchError(
        f"checkpoint {self.step_directory(step)} does not fit the {what}: "
        + "; ".join(problems)
        + f". {fix}"
      )

  def move_aside(self, step: int, reason: str) -> str:
    """Moves a damaged step directory to <directory>.damaged/<step>[-<time>]
    (process 0; every process waits for it) and re-reads the step list;
    returns the new path."""
    dest = self.damaged_directory / str(step)
    if dest.exists():
      dest = dest.parent / f"{step}-{int(time.time())}"
    if jax.process_index() == 0:
      self.damaged_directory.mkdir(parents=True, exist_ok=True)
      self.step_directory(step).rename(dest)  # on gs://: copied, then deleted
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint-move-aside-{step}")
    logging.warning(
      "checkpoint step %d in %s is damaged (%s); moved it to %s and trying the previous one.",
      step,
      self.directory,
      reason,
      dest,
    )
    self.manager.reload()
    return dest

  def restore_newest(self, target: TrainState) -> tuple[int, TrainState, dict] | None:
    """(step, state, meta) of the newest step that restores into `target`
    (see `restore`); damaged steps on the way are reported and moved aside
    (`move_aside`). None when no step is left. A failure of the machine
    (memory, I/O, a storage service; `_machine_failure`) is raised, with
    nothing moved.

    Raises:
      CheckpointMismatchError: the newest readable step does not fit
        `target` (nothing is moved).
      CheckpointDamagedError: every step lacks files (nothing is moved):
        a cause common to all of them, which moving them aside and
        starting again from step 0 would hide.
    """
    steps = sorted(self.all_steps(), reverse=True)
    incomplete: dict[int, CheckpointDamagedError] = {}
    for step in steps:
      try:
        self.check_complete(step)
      except CheckpointDamagedError as e:
        incomplete[step] = e
    if steps and len(incomplete) == len(steps):
      described = "; ".join(f"step {s}: {e}" for s, e in list(incomplete.items())[:3])
      raise CheckpointDamagedError(
        f"every checkpoint in {self.directory} is incomplete ({described}); "
        "nothing was moved. Restore the files, or move the directory away to start again."
      )
    for step in steps:
      try:
        if step in incomplete:
          raise incomplete[step]
        self.check_fits(step, target)
        state, meta = self.restore(step, target)
        check_finite(state)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        self._damaged_or_raise(step, e)
        continue
      return step, state, meta
    return None

  def _damaged_or_raise(self, step: int, error: Exception) -> None:
    """Moves the step aside when `error` came from its files; re-raises a
    failure of this machine (memory, a storage or network error): the step
    may be intact, and moving every step aside would restart the run from
    step 0 once the machine is fixed."""
    if _machine_failure(error):
      raise error
    self.move_aside(step, _first_line(error))

  def check_writable(self) -> None:
    """Raises OSError naming the directory when no file can be written there
    (a read-only file system, permissions), which the first save would
    otherwise find only after the steps before it. Every process checks
    (each writes its part of a checkpoint)."""
    probe = self.directory / f".write_check-{jax.process_index()}-{os.getpid()}"
    try:
      paths.write_text(probe, "")
      probe.unlink()
    except OSError as e:
      raise OSError(
        f"{self.directory} cannot be written ({e.strerror or e}), so no checkpoint could be "
        "saved; make it writable, or choose another --workdir."
      ) from None

  def newest_meta(self) -> tuple[int, dict] | None:
    """(step, meta) of the newest step whose meta reads back; damaged steps
    on the way are moved aside as in `restore_newest` (best/: a run keeps
    training, and saves a new best at its next better evaluation). None
    when no step is left."""
    for step in sorted(self.all_steps(), reverse=True):
      try:
        self.check_complete(step)
        return step, self.restore_meta(step)
      except Exception as e:  # pylint: disable=broad-except
        self._damaged_or_raise(step, e)
    return None

  def restore_meta(self, step: int) -> dict:
    return dict(
      self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    )

  def update_meta(self, step: int, meta: dict) -> None:
    """Replaces fields of a saved step's meta (process 0; every process
    waits). The JSON item is one small file, rewritten whole
    (`paths.write_text`), so a kill leaves the old meta or the new one."""
    self.wait()
    if jax.process_index() == 0:
      path = self.step_directory(step) / "meta" / "metadata"
      updated = {**json.loads(path.read_text()), **meta}
      paths.write_text(path, json.dumps(updated))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint-update-meta-{step}")

  def restore_params(self, step: int, target: Any) -> Any:
    """Parameters alone (no optimizer state), into `target`; a target of
    other shapes fails first with CheckpointMismatchError naming them, and
    files that cannot be read with CheckpointDamagedError naming the step
    (a failure of the machine is raised as it is)."""
    self.check_fits(step, params=target)
    try:
      return self.manager.restore(
        step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target))
      ).params
    except Exception as e:  # pylint: disable=broad-except
      if _machine_failure(e):
        raise
      raise CheckpointDamagedError(
        f"{self.step_directory(step)} cannot be read ({_first_line(e)})."
      ) from None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def saving(self) -> bool:
    """Whether an async save is still being written."""
    return self.manager.is_saving_in_progress()

  def close(self) -> None:
    self.manager.close()


# Status codes (absl, as tensorstore and XLA print them) of failures that
# are the machine's or the storage service's, not the checkpoint's.
_MACHINE_STATUS = ("RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "PERMISSION_DENIED")


def _machine_failure(error: BaseException) -> bool:
  """Whether `error`, met while restoring a step, is a failure of this
  machine or its storage (out of memory, an I/O error, a refused or timed
  out request) rather than damage to the step's files."""
  if isinstance(error, MemoryError):
    return True
  if isinstance(error, OSError) and not isinstance(
    error, (FileNotFoundError, IsADirectoryError, NotADirectoryError)
  ):
    return True
  text = str(error)
  return any(code in text for code in _MACHINE_STATUS)


def _first_line(error: BaseException, limit: int = 200) -> str:
  text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  text = text.split(" See full TensorStore details")[0]
  return text if len(text) <= limit else text[:limit] + "..."
