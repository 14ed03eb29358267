"""The training loop: progressive context stages, evaluation, checkpoints,
preemption handling and metrics, for any `Task` (pretraining, fine-tuning).

`train(config, workdir)` runs (or resumes) a job described by a config from
configs/. The schedule is a list of context stages, each (sequence length,
optimizer steps, global batch size); the run moves through them by itself,
and a resumed run continues in the stage and at the step where its latest
checkpoint left off, with the data iterator exactly where it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from hybridna_jax import paths, sharding
from hybridna_jax.config import (
  DataConfig,
  ModelConfig,
  TrainConfig,
  architecture_differences,
  validate,
)
from hybridna_jax.data import pipeline, prepare
from hybridna_jax.data.store import StoreError
from hybridna_jax.model import HybriDNA, describe_layout, same_param_layout
from hybridna_jax.train import flops as flops_lib
from hybridna_jax.train import optimizer as optimizer_lib
from hybridna_jax.train import startup_signal
from hybridna_jax.train import step as step_lib
from hybridna_jax.train.checkpoint import (
  BEST_DIR,
  CHECKPOINT_DIR,
  CONFIG_FILE,
  Checkpoints,
  DataStateMismatchError,
  with_shardings,
)
from hybridna_jax.train.metrics import LOSS_PLOT, MetricsLogger, plot_loss_curves


@dataclasses.dataclass(frozen=True)
class Stage:
  index: int
  seq_len: int
  steps: int
  batch_size: int  # global
  start_step: int

  @property
  def end_step(self) -> int:
    return self.start_step + self.steps

  @property
  def label(self) -> str:
    return f"stage {self.index}: {self.seq_len:,} nt x {self.batch_size}"


def parse_stages(train) -> list[Stage]:
  """The context stages of the `train` section (a TrainConfig, or the
  ConfigDict, read through TrainConfig: a malformed stages field fails
  there with one line naming it)."""
  stages, start = [], 0
  for i, (seq_len, steps, batch) in enumerate(TrainConfig.from_config(train).stages):
    if seq_len < 1 or steps < 1 or batch < 1:
      raise ValueError(
        f"config.train.stages[{i}] = {(seq_len, steps, batch)!r}: all values must be positive."
      )
    stages.append(Stage(i, seq_len, steps, batch, start))
    start += steps
  if not stages:
    raise ValueError(
      "config.train.stages is empty; give at least one (seq_len, steps, global_batch_size)."
    )
  return stages


def stage_at(stages: list[Stage], step: int) -> Stage:
  """The stage that step `step` (0-based, the next one to run) belongs to."""
  for stage in stages:
    if step < stage.end_step:
      return stage
  return stages[-1]


def _check_batch(
  stage: Stage, mesh, grad_accum: int, fields: tuple[str, str]
) -> sharding.BatchLayout:
  """This process's layout of the stage's (global batch, seq_len) batches;
  errors name the field to fix, `fields` = the config fields that set the
  (batch, seq_len) (`Task.stage_fields`). The batch need only divide by
  data x fsdp x grad_accum (not by the process count: processes whose
  devices are tensor or context partners load the same rows)."""
  batch_field, seq_len_field = fields
  data_devices = sharding.batch_shards(mesh)
  if stage.batch_size % (data_devices * grad_accum):
    raise ValueError(
      f"{batch_field}: global batch {stage.batch_size} is not divisible "
      f"by data x fsdp devices x grad_accum ({data_devices} x {grad_accum}); change the batch "
      "or config.mesh / config.train.grad_accum."
    )
  context = sharding.context_shards(mesh)
  if stage.seq_len % context:
    raise ValueError(
      f"{seq_len_field}: seq_len {stage.seq_len} is not divisible by "
      f"config.mesh.context={context}; change one of them."
    )
  return sharding.batch_layout(mesh, stage.batch_size, stage.seq_len)


class EvalInterrupted(Exception):
  """A stop was requested during an evaluation of `train`, which abandons it
  (`check_eval_interrupt`)."""


class _Preemption:
  """SIGTERM and SIGINT (Ctrl-C) set a flag; the loop saves a checkpoint and
  exits after the step that is running (a compile included), at once while
  waiting for data (`_fetch`), and after the batch that is running during
  an evaluation (`check_eval_interrupt`), whose result is dropped. A second
  SIGINT raises KeyboardInterrupt: stop now, without a new checkpoint (a save
  already in flight is completed first, `finish_saves`). A SIGTERM recorded
  while the launcher started up (`startup_signal`) counts as one at entry."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)
  # The one `train` running in this process, for `check_eval_interrupt`.
  running: _Preemption | None = None

  def __init__(self, action: str = "saving a checkpoint and stopping after this step"):
    self.action = action  # what the log says a signal does
    self.requested = False
    self.evaluating = False
    self._previous: dict = {}
    self._outer: _Preemption | None = None
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
    self._outer, _Preemption.running = _Preemption.running, self
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
    _Preemption.running = self._outer

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


def stop_signals(action: str) -> _Preemption:
  """A context manager catching SIGTERM and SIGINT outside `train` (e.g.
  between the runs of a fine-tuning suite, whose default action would kill
  the process and lose the orderly stop); `.any_host()` says whether one
  came (a collective with several processes). `action` is what the log
  says a signal does."""
  return _Preemption(action)


def check_eval_interrupt() -> None:
  """Raises EvalInterrupted when the `train` running in this process
  evaluates and a stop was requested (on any host): a long evaluation would
  hold up the checkpoint past the grace time of a preemption. Evaluation
  loops call it between batches; with several processes it is a collective,
  so every process calls it at the same batches. Outside `train`'s
  evaluations (finish, launch/eval.py) it does nothing."""
  preemption = _Preemption.running
  if preemption is not None and preemption.evaluating and preemption.any_host():
    raise EvalInterrupted


class _SavedIteratorState:
  """An iterator state frozen at one moment, saved by Grain's checkpoint
  handler like the iterator itself (it calls get_state())."""

  def __init__(self, state: dict):
    self._json = json.dumps(state, indent=4).encode()

  def get_state(self) -> bytes:
    return self._json


_WAIT_POLL_S = 0.2


def _fetch(iterator, preemption: _Preemption):
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


class NonFiniteLossError(RuntimeError):
  pass


def sum_eval_steps(
  fns: step_lib.StepFunctions,
  params,
  batches,
  max_batches: int = 0,
  layout: sharding.BatchLayout | None = None,
) -> dict:
  """Runs eval_step over batches (this host's part of each, laid out by
  `layout` or, without one, an equal share of the rows per host); returns the
  summed outputs on the host."""
  totals: dict[str, float] = {}
  for i, batch in enumerate(batches):
    if max_batches and i >= max_batches:
      break
    check_eval_interrupt()
    placed = step_lib.device_batch(batch, fns.batch_shardings, fns.batch_keys, layout=layout)
    out = jax.device_get(fns.eval_step(params, placed))
    for k, v in out.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  return totals


def eval_global_batch(train_cfg, mesh) -> int:
  """Rows of an LM evaluation batch: train.eval_batch_size rounded up to a
  multiple of data x fsdp, so every batch splits evenly over the mesh."""
  shards = sharding.batch_shards(mesh)
  return -(-int(train_cfg.eval_batch_size) // shards) * shards


def lm_eval(
  fns: step_lib.StepFunctions,
  params,
  train_cfg,
  stage: Stage,
  make_batches: Callable[..., Iterable[dict]],
) -> dict:
  """LM metrics (`lm_metrics`) over this host's evaluation batches.

  Rows have train.eval_seq_len tokens (0: the stage's); at most
  train.eval_batches run (0: all). make_batches(seq_len=, batch_size=,
  rows=, columns=) gives this host's part of global batches of
  train.eval_batch_size rows (rounded up to a multiple of data x fsdp), laid
  out like the training batches (`sharding.BatchLayout`).
  """
  seq_len = int(train_cfg.eval_seq_len) or stage.seq_len
  context = sharding.context_shards(fns.mesh)
  if seq_len % context:
    raise ValueError(
      f"config.train.eval_seq_len: {seq_len} is not divisible by config.mesh.context="
      f"{context}; set it to a multiple."
    )
  batch = eval_global_batch(train_cfg, fns.mesh)
  layout = sharding.batch_layout(fns.mesh, batch, seq_len)
  batches = make_batches(
    seq_len=seq_len, batch_size=batch, rows=layout.rows, columns=layout.columns
  )
  return lm_metrics(sum_eval_steps(fns, params, batches, int(train_cfg.eval_batches), layout))


def lm_metrics(totals: dict) -> dict:
  """Bits per nucleotide, perplexity and accuracy from summed LM outputs.
  No scored token is an error, not a perfect score of 0 bits."""
  count = totals.get("count", 0.0)
  if not count > 0:
    raise ValueError(
      "the evaluation scored no tokens (no batch ran, or every target was masked); check "
      "config.train.eval_batches and the validation split."
    )
  loss = totals.get("loss", 0.0) / count
  return {
    "loss": loss,
    "bits_per_nt": loss / step_lib.LN2,
    "perplexity": math.exp(loss),
    "accuracy": totals.get("accuracy", 0.0) / count,
    "tokens": totals.get("count", 0.0),
  }


class Task:
  """What a run trains and how it is fed and judged; `train` runs any task
  through the same steps, checkpoints, preemption handling and metrics.

  Subclasses give the model, loss, stages, data and evaluation. `evaluate`
  returns host metrics; `selection` names the one that picks the best
  checkpoint (saved params-only to <workdir>/best) and whether lower or
  higher is better.
  """

  batch_keys: tuple[str, ...] = step_lib.LM_BATCH_KEYS
  # Batch keys of token arrays (B, L, ...) fed through a `sharding.BatchLayout`
  # (their length splits over the context axis); a task that sets them
  # implements `layout_iterator`.
  sequence_keys: tuple[str, ...] = ()
  selection: tuple[str, str] = ("bits_per_nt", "min")
  # Worker processes of the training iterator (their saved state counts
  # batches per worker: `check_data_position`).
  data_workers: int = 0

  def __init__(self, config):
    self.config = config

  def init_model(self, rngs):
    raise NotImplementedError

  def loss(self, model, batch):
    raise NotImplementedError

  def apply(self, model, batch):
    """Optional outputs for evaluation (jitted as StepFunctions.apply)."""
    return None

  def stages(self) -> list[Stage]:
    return parse_stages(self.config.train)

  def stage_fields(self, stage: Stage) -> tuple[str, str]:
    """The config fields a user changes to change the stage's (global batch,
    seq_len), for errors (a task that derives its stages names its own)."""
    return (f"config.train.stages[{stage.index}]",) * 2

  def optimizer(self, total_steps: int):
    return optimizer_lib.make_optimizer(self.config.train, total_steps)

  def layout_iterator(self, stage: Stage, layout: sharding.BatchLayout, seed: int):
    """A checkpointable iterator of this host's part of the global batches:
    rows `layout.rows`, and of the `sequence_keys` only `layout.columns`
    (see `step.device_batch`)."""
    raise NotImplementedError

  def evaluate(self, fns: step_lib.StepFunctions, params, stage: Stage) -> dict:
    raise NotImplementedError

  def check_data(self, stages: list[Stage], train_cfg: TrainConfig) -> None:
    """Refuses, before step 0 (and before anything is written), data the
    stages or the evaluation cannot use; raises ValueError naming the field.
    The default checks nothing."""

  def start(self, fns: step_lib.StepFunctions, state):
    """Adjusts a freshly initialised state (e.g. loads pretrained weights)."""
    return state

  def finish(self, fns: step_lib.StepFunctions, state, workdir: str) -> dict:
    """Runs after the last step (e.g. test metrics); returns summary entries."""
    return {}

  def describe(self) -> str:
    return type(self).__name__


class LMPretraining(Task):
  """Next-token pretraining on the token store's train split, validated on
  its val split."""

  sequence_keys = step_lib.LM_BATCH_KEYS

  def __init__(self, config):
    super().__init__(config)
    self.model_cfg = ModelConfig.from_config(config.model)
    self.data_workers = int(config.data.num_workers)

  def init_model(self, rngs):
    return HybriDNA(self.model_cfg, rngs=rngs)

  def loss(self, model, batch):
    return step_lib.lm_loss(model, batch)

  def layout_iterator(self, stage, layout, seed):
    return pipeline.train_batches(
      self.config.data,
      seq_len=stage.seq_len,
      batch_size=stage.batch_size,
      seed=seed,
      rows=layout.rows,
      columns=layout.columns,
    )

  def check_data(self, stages, train_cfg):
    """Every stage's windows fit the store's records and are not all N
    (`pipeline.train_windows`), and the val split exists when the run
    evaluates (train.eval_every > 0), with N targets out of the loss when
    Markov baselines are compared on it; the store holds the data that
    data.fasta_globs and data.split name (`prepare.check_store_matches`)."""
    prepare.check_store_matches(self.config.data)
    for seq_len in sorted({s.seq_len for s in stages}):
      try:
        store, _, _ = pipeline.train_windows(self.config.data, seq_len=seq_len)
      except StoreError:
        raise  # names data.store_dir itself; no stage is at fault
      except ValueError as e:
        index = min(s.index for s in stages if s.seq_len == seq_len)
        raise ValueError(f"config.train.stages[{index}]: {e}") from None
    if train_cfg.eval_every and train_cfg.markov_orders and not self.config.data.mask_n_in_loss:
      raise ValueError(
        "config.train.markov_orders: the Markov baselines predict A/C/G/T only, but "
        "data.mask_n_in_loss=False puts N targets in the loss they are compared on; set "
        "config.train.markov_orders=() or config.data.mask_n_in_loss=True."
      )
    if train_cfg.eval_every and pipeline.EVAL_SPLIT not in store:
      raise ValueError(
        f"config.train.eval_every={train_cfg.eval_every} evaluates on split "
        f"{pipeline.EVAL_SPLIT!r}, but {store.path} has only "
        f"{', '.join(map(repr, store.splits))}; set config.train.eval_every=0, or prepare the "
        "store with a validation split (data.split.val_fraction or data.split.val_records)."
      )

  def evaluate(self, fns, params, stage):
    return lm_eval(
      fns,
      params,
      self.config.train,
      stage,
      functools.partial(pipeline.eval_batches, self.config.data),
    )

  def flops_per_token(self, seq_len: int) -> float:
    return flops_lib.train_flops_per_token(self.model_cfg, seq_len)

  def describe(self) -> str:
    cfg = self.model_cfg
    return (
      f"LM pretraining, {cfg.n_layers} layers "
      f"{''.join('A' if t == 'attention' else 'M' for t in cfg.layer_types)}"
    )


def _write_config(
  config, workdir: str, resumed_step: int | None = None, before: dict | None = None
) -> None:
  """Writes <workdir>/config.json. A run resumed (at `resumed_step`) under
  other settings than `before` (the config.json it had) keeps that config as
  config.step<N>.json, and the fields that changed are logged."""
  if jax.process_index() != 0:
    return
  text = config.to_json_best_effort(indent=2)
  if resumed_step is not None and before is not None:
    old, new = flatten_config(before), flatten_config(json.loads(text))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if changed:
      kept = paths.join(workdir, f"config.step{resumed_step}.json")
      paths.write_json(kept, before)
      logging.warning(
        "resumed at step %d with other settings (%s); the earlier config is kept as %s.",
        resumed_step,
        ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:8])
        + (f", {len(changed) - 8} more" if len(changed) > 8 else ""),
        kept,
      )
  paths.write_text(paths.join(workdir, CONFIG_FILE), text)


def task_steps(task: Task, config, mesh) -> step_lib.StepFunctions:
  """The jitted steps `train` runs for `task` on `mesh` (launch/plan.py
  compiles the same ones ahead of time)."""
  optimizer, schedule = task.optimizer(task.stages()[-1].end_step)
  return step_lib.build_steps(
    task.init_model,
    task.loss,
    optimizer,
    schedule,
    mesh,
    rules=sharding.rules_from_config(config.mesh),
    batch_keys=task.batch_keys,
    grad_accum=TrainConfig.from_config(config.train).grad_accum,
    apply_fn=task.apply if type(task).apply is not Task.apply else None,
    sequence_keys=task.sequence_keys,
  )


def train(config, workdir: str, task: Task | None = None) -> dict:
  """Trains (or resumes) `task` (default: LM pretraining) in `workdir`;
  returns a summary dict. The config is validated first (unknown or
  malformed fields fail with one line naming them), then the data and, on
  resume, the architecture of the run (`check_resume_config`) and whether
  the saved data-iterator state fits the data loader, all before step 0.
  SIGTERM or SIGINT from then on saves a checkpoint and returns with
  summary["stopped"] == "preempted" (see `_Preemption`). `workdir` may
  be a local path, file:// or gs:// URL (`hybridna_jax.paths`)."""
  validate(config)
  paths.checkpoint_path(workdir)  # refuses unsupported URLs before any work
  with _Preemption() as preemption:
    try:
      return _train(config, workdir, task, preemption)
    except BaseException as e:
      preemption.finish_saves(e)
      raise


def _written_config(workdir: str) -> dict | None:
  """<workdir>/config.json, the config the run was started with (None
  before the run wrote one)."""
  path = paths.join(workdir, CONFIG_FILE)
  return json.loads(path.read_text()) if path.exists() else None


def resumed_config(workdir: str) -> dict | None:
  """<workdir>/config.json when the run has a checkpoint to resume from
  (None otherwise: a new run)."""
  checkpoints = paths.join(workdir, CHECKPOINT_DIR)
  if not checkpoints.is_dir() or not any(p.name.isdigit() for p in checkpoints.iterdir()):
    return None
  return _written_config(workdir)


def check_resume_config(config, workdir: str) -> None:
  """Refuses to resume a run of another architecture: raises ValueError
  naming every model field that differs from <workdir>/config.json, when
  that file and a checkpoint exist."""
  if "model" not in config:
    return
  written = resumed_config(workdir)
  if written is None or "model" not in written:
    return
  try:
    before = ModelConfig.from_config(ml_collections.ConfigDict(written["model"]), strict=False)
  except (ValueError, TypeError):
    return  # not a model section this version reads; check_fits still guards the arrays
  now = ModelConfig.from_config(config.model)
  diff = architecture_differences(before, now)
  if diff:
    fields = "; ".join(f"model.{k}: {a!r} in the run, {b!r} now" for k, (a, b) in diff.items())
    raise ValueError(
      f"{workdir} holds a run of another architecture ({fields}); resume it with the "
      f"model settings of {paths.join(workdir, CONFIG_FILE)}, or start the new model in "
      "another --workdir."
    )
  # A runtime field, but it decides the checkpoints' layout, which a resume
  # restores as written (restore.load converts, for inference only).
  if not same_param_layout(before, now):
    placement = ("scan_layers", "attn_period") + (
      ("attn_offset",) if before.attn_layers is None else ("attn_layers",)
    )
    settings = " ".join(
      f"--config.model.{f}={getattr(before, f)!r}".replace(" ", "") for f in placement
    )
    raise ValueError(
      f"{workdir}'s checkpoints (optimizer state included) hold the layers "
      f"{describe_layout(before)}, this config {describe_layout(now)}; resume with the run's "
      f"{settings} (restore.load converts them for evaluation and scoring)."
    )


def check_data_position(
  step: int, saved: list[int] | None, now: list[int], saved_workers: int = 0, workers: int = 0
) -> None:
  """Raises DataStateMismatchError unless a data position saved with
  `saved` = [rows per process, batch size] (`_host_rows`; None: not
  recorded) and `saved_workers` (data.num_workers) means the same place in
  the stream under `now` and `workers`.

  Without workers the position counts this process's windows: its k-th is
  window (k // rows) * batch + (its k % rows-th row). That is the same
  window with the same rows and batch size, or when the process loads
  whole batches both times (then k is the window itself, at any batch
  size). Worker processes count the batches each was dealt, so they need
  the same worker count, rows and batch size. Anything else (a mesh,
  process count or worker count that changed) would silently repeat or
  skip batches.
  """
  if saved_workers != workers:
    raise DataStateMismatchError(
      f"step {step}'s data position was saved with data.num_workers={saved_workers}, "
      f"which counts batches per worker; this run has {workers}"
    )
  whole = saved is not None and saved[0] == saved[1] and now[0] == now[1] and not workers
  if saved is not None and list(saved) != list(now) and not whole:
    raise DataStateMismatchError(
      f"step {step}'s data position was saved loading {saved[0]} of {saved[1]} rows per batch "
      f"in each process, and this run loads {now[0]} of {now[1]}"
    )


def _host_rows(layout: sharding.BatchLayout) -> list[int]:
  """[rows one process loads of each batch (the same on every process),
  batch size], as JSON."""
  return [int(len(layout.rows)), int(layout.batch_size)]


def flatten_config(values: dict, prefix: str = "") -> dict:
  """{"a.b.c": value} of nested dicts (a config's to_dict())."""
  flat = {}
  for key, value in values.items():
    if isinstance(value, dict):
      flat.update(flatten_config(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _data_state_error(
  config, workdir: str, error: DataStateMismatchError, written: dict | None
) -> ValueError:
  """The one-line error for a checkpoint whose data-iterator state does not
  fit this run's data loader (`Checkpoints.restore_data`): names the data
  fields that differ from `written` (<workdir>/config.json, e.g.
  data.num_workers) and the way out. Nothing was moved or written."""
  path = paths.join(workdir, CONFIG_FILE)
  changed = []
  if written is not None and "data" in written:
    try:
      before = flatten_config(DataConfig.of(written).to_dict(), "data.")
    except (ValueError, TypeError):
      before = {}  # not a data section this version reads
    now = flatten_config(DataConfig.from_config(config.data).to_dict(), "data.")
    changed = [f"{k}: {v!r} in the run, {now[k]!r} now" for k, v in before.items() if now[k] != v]
  if not changed:
    return ValueError(f"{error}; resume with the settings of {path}, or start a new --workdir.")
  return ValueError(
    f"{workdir} cannot resume with other data-loader settings ({'; '.join(changed)}): its "
    "checkpoint's data-iterator state does not fit them. Resume with the data settings of "
    f"{path}, or start the new settings in another --workdir."
  )


def _train(config, workdir: str, task: Task | None, preemption: _Preemption) -> dict:
  task = task or LMPretraining(config)
  tc = TrainConfig.from_config(config.train)  # after the task wrote its schedule
  stages = task.stages()
  total_steps = stages[-1].end_step
  mesh = sharding.mesh_from_config(config.mesh)
  fns = task_steps(task, config, mesh)
  select_key, select_mode = task.selection
  better = (lambda a, b: a < b) if select_mode == "min" else (lambda a, b: a > b)
  peak = tc.peak_flops_per_device or flops_lib.peak_flops_per_device()
  flops_per_token = getattr(task, "flops_per_token", lambda seq_len: 0.0)
  logging.info(
    "%s; mesh %s; %d steps in %d stage(s)",
    task.describe(),
    dict(mesh.shape),
    total_steps,
    len(stages),
  )

  def make_iterator(stage: Stage):
    """(iterator, layout): this host's batches of the stage and their
    `BatchLayout`."""
    layout = _check_batch(stage, mesh, tc.grad_accum, task.stage_fields(stage))
    seed = tc.seed * 1000 + stage.index
    it = task.layout_iterator(stage, layout, seed)
    logging.info(
      "process %d/%d loads rows %s and columns [%d, %d) of each %d x %d batch",
      jax.process_index(),
      jax.process_count(),
      layout.rows.tolist(),
      *(layout.columns if task.sequence_keys else (0, stage.seq_len)),  # else whole rows
      stage.batch_size,
      stage.seq_len,
    )
    return it, layout

  # -- start or resume -----------------------------------------------------
  # Nothing is written to the workdir before the checks and the restore
  # succeed, so a refused resume leaves config.json as it was.
  check_resume_config(config, workdir)
  task.check_data(stages, tc)
  written = _written_config(workdir)  # the run's config.json so far, read once
  # Opened after the checks: an Orbax manager starts a thread that cleans up
  # temporary paths, which a bad-input exit would interrupt with a traceback.
  checkpoints = Checkpoints(
    paths.join(workdir, CHECKPOINT_DIR), keep=tc.keep_checkpoints, async_save=tc.async_checkpoints
  )
  best = Checkpoints(paths.join(workdir, BEST_DIR), keep=1) if tc.keep_best else None
  preemption.managers = [m for m in (checkpoints, best) if m is not None]
  for manager in preemption.managers:
    manager.check_writable()  # before any step: not at the first save
  best_val = math.inf if select_mode == "min" else -math.inf
  target = with_shardings(jax.eval_shape(fns.init, jax.random.key(0)), fns.state_shardings)
  built: dict = {}

  def data_args(meta: dict):
    # The saved iterator belongs to the checkpoint's stage; a checkpoint
    # taken at the end of a stage starts the next one from a fresh iterator.
    step = int(meta.get("step", 0))
    stage = stage_at(stages, step)
    built["stage"], built["iterator"] = stage, make_iterator(stage)
    same_stage = meta.get("stage") == stage.index and step < stage.end_step
    if not same_stage:
      return None
    lm = isinstance(task, LMPretraining)
    saved_workers = ((written or {}).get("data") or {}).get("num_workers", 0) if lm else 0
    stale = meta.get("stream_format", 1) < pipeline.STREAM_FORMAT
    if saved_workers and stale:
      raise ValueError(
        f"{workdir}: the data position of step {step} (data.num_workers={saved_workers}) was "
        "saved by an earlier version, which grouped each batch's windows differently; finish "
        "the run with that version, or start it again in another --workdir."
      )
    check_data_position(
      step,
      meta.get("host_rows"),
      _host_rows(built["iterator"][1]),
      int(meta.get("data_workers", saved_workers)),  # unrecorded: as config.json
      task.data_workers,
    )
    return pipeline.iterator_restore_args(built["iterator"][0])

  try:
    resumed = checkpoints.restore_newest(target, data_args) if checkpoints.all_steps() else None
  except BaseException as e:
    # A refused resume ends the process: stop the managers' threads first.
    preemption.managers = []
    for manager in (checkpoints, best):
      if manager is not None:
        manager.close()
    if isinstance(e, DataStateMismatchError):
      raise _data_state_error(config, workdir, e, written) from None
    raise
  # The latest evaluation, {"step": ..., "result": {...}}; checkpoints keep
  # it, so a run resumed at its end neither repeats its final eval nor
  # loses its result.
  last_eval = None
  # An evaluation a signal abandoned, {"step", "stage"}: the checkpoint of
  # its step records it, and the resumed run runs it first.
  pending_eval = None
  # Per-step train metrics since the last log line ({name: [values]}): the
  # checkpoint keeps them, so a resumed run logs the same intervals.
  accumulated: dict[str, list] = {}
  if resumed is None:
    state = task.start(fns, fns.init(jax.random.key(tc.seed)))
    stage = stages[0]
    iterator, layout = make_iterator(stage)
  else:
    latest, state, meta = resumed
    stage, (iterator, layout) = built["stage"], built["iterator"]
    last_eval, pending_eval = meta.get("last_eval"), meta.get("pending_eval")
    accumulated = {k: list(v) for k, v in (meta.get("unlogged") or {}).items()}
    logging.info("resumed from step %d (%s)", latest, stage.label)
  # The best value so far is that of best/'s own step: the resumed
  # checkpoint can be older (a kill after an eval saved best/).
  newest_best = best.newest_meta() if best is not None else None
  if newest_best is not None:
    best_val = newest_best[1].get(select_key, best_val)
  _write_config(config, workdir, None if resumed is None else resumed[0], written)
  # Opened only now: a refused resume leaves no file open (nor metrics.jsonl created).
  logger = MetricsLogger(workdir, total_steps, devices=mesh.size)

  step = int(jax.device_get(state.step))
  iterator_stage = stage.index
  summary = {"steps": step, "stopped": "completed"}

  def save(stage: Stage, force_sync: bool = False, data_state: dict | None = None):
    if checkpoints.latest_step() != step:  # not saved at this step already
      meta = {
        "stage": stage.index,
        "seq_len": stage.seq_len,
        "last_eval": last_eval,
        "host_rows": _host_rows(layout),
        "stream_format": pipeline.STREAM_FORMAT,
        "data_workers": task.data_workers,
        "pending_eval": pending_eval,
        "unlogged": {k: [float(x) for x in jax.device_get(v)] for k, v in accumulated.items()},
      }
      it = iterator if data_state is None else _SavedIteratorState(data_state)
      checkpoints.save(state, meta, data_args=pipeline.iterator_save_args(it))
    if force_sync:
      checkpoints.wait()

  def run_eval(stage: Stage) -> None:
    nonlocal best_val, last_eval, pending_eval
    try:
      with preemption.evaluation():
        result = task.evaluate(fns, state.params, stage)
    except EvalInterrupted:
      # The checkpoint comes first; the resumed run evaluates this step.
      logging.warning("stop requested: the evaluation at step %d is abandoned.", step)
      pending_eval = {"step": step, "stage": stage.index}
      return
    last_eval, pending_eval = {"step": step, "result": result}, None
    logger.log_eval(step, result)
    # A step at or before best/'s own is replayed after a resume: best/
    # has judged it already.
    fresh = best is not None and step > (best.latest_step() or 0)
    if fresh and better(result[select_key], best_val):
      best_val = result[select_key]
      best.save(state._replace(opt_state=None), {select_key: best_val, "stage": stage.index})
    logger.mark(step)

  def preempted(data_state: dict | None = None) -> None:
    save(stage, force_sync=True, data_state=data_state)
    summary["stopped"] = "preempted"
    logging.warning("preempted at step %d: checkpoint saved, exiting.", step)

  if tc.eval_every and pending_eval is not None and pending_eval["step"] == step:
    run_eval(stages[pending_eval["stage"]])
    if pending_eval is None:  # done: a later resume from this step repeats nothing
      checkpoints.update_meta(step, {"last_eval": last_eval, "pending_eval": None})
    else:
      summary["stopped"] = "preempted"

  # A stop requested before the first step (while the launcher started up,
  # `startup_signal`, or during the restore) is honoured before a compile.
  if summary["stopped"] != "preempted" and step < total_steps and preemption.any_host():
    preempted()

  # -- the loop ---------------------------------------------------------------
  while step < total_steps and summary["stopped"] != "preempted":
    stage = stage_at(stages, step)
    if stage.index != iterator_stage:
      (iterator, layout), iterator_stage = make_iterator(stage), stage.index
    logging.info("%s: steps %d..%d", stage.label, stage.start_step, stage.end_step)
    tokens_per_step = stage.seq_len * stage.batch_size
    first_step = True
    while step < stage.end_step:
      data_state = iterator.get_state()
      host_batch = _fetch(iterator, preemption)
      if host_batch is None:  # signalled while waiting for data
        preempted(data_state)
        break
      batch = step_lib.device_batch(host_batch, fns.batch_shardings, fns.batch_keys, layout=layout)
      start = time.perf_counter()
      state, metrics = fns.train_step(state, batch)
      step += 1
      if first_step:  # compiles for this stage's shapes; not throughput
        jax.block_until_ready(metrics)
        logging.info("step compiled and ran in %.1f s", time.perf_counter() - start)
        logger.mark(step)
        first_step = False
      for k, v in metrics.items():
        accumulated.setdefault(k, []).append(v)
      if step % tc.log_every == 0 or step == stage.end_step:
        host = {k: np.asarray(jax.device_get(v)) for k, v in accumulated.items()}
        # Means over the applied steps: a skipped step's loss is NaN or inf
        # (NaN for the interval when every step was skipped).
        applied = host["skipped"] == 0
        values = {
          k: float(v[applied].mean()) if applied.any() else math.nan
          for k, v in host.items()
          if k not in ("skipped", "consecutive_skips", "learning_rate", "count")
        }
        values["learning_rate"] = float(host["learning_rate"][-1])
        values["skipped_total"] = float(jax.device_get(state.skipped))
        logger.log_train(
          step,
          values,
          tokens_per_step=tokens_per_step,
          flops_per_token=flops_per_token(stage.seq_len),
          peak_flops=peak,
          stage=stage.label,
          remaining_flops=sum(
            (s.end_step - max(step, s.start_step))
            * s.batch_size
            * s.seq_len
            * flops_per_token(s.seq_len)
            for s in stages
            if s.end_step > step
          ),
        )
        accumulated = {}
        # The longest run of skips in the interval (checked here, where the
        # metrics reach the host anyway, not with a sync every step).
        streak = int(host["consecutive_skips"].max())
        if streak >= tc.max_consecutive_skips:
          save(stage, force_sync=True)
          raise NonFiniteLossError(
            f"{streak} consecutive steps had a non-finite loss or gradient (by step {step}); "
            "a checkpoint was saved. Lower config.train.learning_rate, check the data, or "
            "raise config.train.max_consecutive_skips."
          )
      # The final eval runs before the final checkpoint, which records it.
      if tc.eval_every and (step % tc.eval_every == 0 or step == total_steps):
        run_eval(stage)
      if step % tc.checkpoint_every == 0 or step == stage.end_step:
        save(stage)
        logger.mark(step)  # the save's time is not the next steps' time
      if preemption.any_host():
        preempted()
        break
    if summary["stopped"] == "preempted":
      break
  if summary["stopped"] == "completed" and tc.eval_every:
    if last_eval is None or last_eval["step"] != step:
      run_eval(stage)  # resumed at the end from a checkpoint saved without it
      if last_eval is None or last_eval["step"] != step:  # abandoned: a rerun repeats it
        summary["stopped"] = "preempted"
        logging.warning("preempted at step %d during the final evaluation, exiting.", step)
      elif checkpoints.latest_step() == step:  # recorded: a rerun repeats nothing
        checkpoints.update_meta(step, {"last_eval": last_eval})
    if summary["stopped"] == "completed":
      summary["final_val"] = last_eval["result"]
  checkpoints.wait()
  if best is not None:
    best.wait()
  if summary["stopped"] == "completed":
    summary.update(task.finish(fns, state, workdir))
    # A signal after the last step (final eval, finish) stops nothing here,
    # but a caller that runs more (a fine-tuning suite) must stop after it.
    summary["signalled"] = preemption.any_host()
  logger.close()
  summary["steps"] = step
  summary["stages"] = [dataclasses.asdict(s) for s in stages]
  if jax.process_index() == 0 and tc.plot and logger.jsonl_path.exists():
    summary["plot"] = plot_loss_curves(
      logger.jsonl_path,
      paths.join(workdir, LOSS_PLOT),
      stage_starts=[(s.start_step, f"{s.seq_len:,} nt") for s in stages],
    )
  return summary
