"""The training loop: progressive context stages, evaluation, checkpoints,
preemption handling and metrics, for any `Task` (pretraining, fine-tuning).

`train(config, workdir)` runs (or resumes) a job described by a config from
configs/. The schedule is a list of context stages, each (sequence length,
optimizer steps, global batch size); the run moves through them by itself,
and a resumed run continues in the stage and at the step where its latest
checkpoint left off. Its data stream restarts at the global batch of that
step (one batch per step; every batch is a pure function of the seed and
its index), so it reads what an uninterrupted run would have read, under
any mesh, process count or data.num_workers; checkpoints keep no iterator
state.

The loop's parts live beside it: the stage schedule in stages.py, signal
handling in preemption.py, the `Task`s and LM evaluation in tasks.py, and
what a run records and a resume checks in resume.py.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import numpy as np
from absl import logging

from hybridna_jax import paths, sharding
from hybridna_jax.config import TrainConfig, validate
from hybridna_jax.data import pipeline
from hybridna_jax.train import flops as flops_lib
from hybridna_jax.train import step as step_lib
from hybridna_jax.train.checkpoint import BEST_DIR, CHECKPOINT_DIR, Checkpoints, with_shardings
from hybridna_jax.train.metrics import LOSS_PLOT, MetricsLogger, plot_loss_curves
from hybridna_jax.train.preemption import EvalInterrupted, Preemption, fetch
from hybridna_jax.train.resume import (
  check_resume_config,
  check_same_examples,
  check_stream_position,
  write_config,
  written_config,
)
from hybridna_jax.train.stages import Stage, check_batch, stage_at
from hybridna_jax.train.tasks import LMPretraining, Task, check_eval_seq_len


class NonFiniteLossError(RuntimeError):
  pass


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
  resume, the architecture of the run (`check_resume_config`), all before
  step 0.
  SIGTERM or SIGINT from then on saves a checkpoint and returns with
  summary["stopped"] == "preempted" (see `Preemption`). `workdir` may
  be a local path, file:// or gs:// URL (`hybridna_jax.paths`)."""
  validate(config)
  paths.checkpoint_path(workdir)  # refuses unsupported URLs before any work
  with Preemption() as preemption:
    try:
      return _train(config, workdir, task, preemption)
    except BaseException as e:
      preemption.finish_saves(e)
      raise


def _train(config, workdir: str, task: Task | None, preemption: Preemption) -> dict:
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

  def stage_layout(stage: Stage):
    return check_batch(stage, mesh, tc.grad_accum, task.stage_fields(stage))

  def make_iterator(stage: Stage, step: int):
    """(iterator, layout): this host's batches of the stage from the one of
    `step` on, and their `BatchLayout`."""
    layout = stage_layout(stage)
    seed = tc.seed * 1000 + stage.index
    it = task.layout_iterator(stage, layout, seed, step - stage.start_step)
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
  model_cfg = getattr(task, "model_cfg", None)
  for stage in stages:  # every stage fits the model and the mesh: not found hours in
    if model_cfg is not None and stage.seq_len > model_cfg.max_seq_len:
      raise ValueError(
        f"{task.stage_fields(stage)[1]}: seq_len {stage.seq_len} exceeds "
        f"config.model.max_seq_len {model_cfg.max_seq_len}, the longest context the model is "
        "scored and sampled at; raise model.max_seq_len or shorten the stage."
      )
    stage_layout(stage)
  if tc.eval_every and tc.eval_seq_len:  # or found at the first evaluation, before its save
    check_eval_seq_len(tc.eval_seq_len, mesh, model_cfg and model_cfg.max_seq_len)
  written = written_config(workdir)  # the run's config.json so far, read once
  examples = task.examples_digest()
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
  try:
    resumed = checkpoints.restore_newest(target) if checkpoints.all_steps() else None
    step = 0 if resumed is None else resumed[0]
    if step > total_steps:
      # It would "complete" at once, its config.json naming fewer steps
      # than its model was trained for.
      raise ValueError(
        f"{workdir} is at step {step}, past the {total_steps} steps of this config's stages; "
        "resume with a schedule that reaches its step, or start this one in another --workdir."
      )
    stage = stage_at(stages, step)
    if resumed is not None:
      check_same_examples(resumed[2], examples, config, task.example_fields, written, workdir)
      lm = isinstance(task, LMPretraining)
      batch_field = task.stage_fields(stage)[0]
      check_stream_position(resumed[2], stage, batch_field, written, workdir, lm)
    # The stream restarts at the step's batch (module docstring).
    iterator, layout = make_iterator(stage, step)
  except BaseException:
    # A refused resume ends the process: stop the managers' threads first.
    preemption.managers = []
    for manager in (checkpoints, best):
      if manager is not None:
        manager.close()
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
  else:
    _, state, meta = resumed
    last_eval, pending_eval = meta.get("last_eval"), meta.get("pending_eval")
    accumulated = {k: list(v) for k, v in (meta.get("unlogged") or {}).items()}
    logging.info("resumed from step %d (%s)", step, stage.label)
  # The best value so far is that of best/'s own step: the resumed
  # checkpoint can be older (a kill after an eval saved best/).
  newest_best = best.newest_meta() if best is not None else None
  if newest_best is not None:
    best_val = newest_best[1].get(select_key, best_val)
  write_config(config, workdir, None if resumed is None else step, written)
  # Opened only now: a refused resume leaves no file open (nor metrics.jsonl created).
  logger = MetricsLogger(workdir, total_steps, devices=mesh.size)

  iterator_stage = stage.index
  summary = {"steps": step, "stopped": "completed"}

  def save(stage: Stage, force_sync: bool = False):
    if checkpoints.latest_step() != step:  # not saved at this step already
      meta = {
        "stage": stage.index,
        "seq_len": stage.seq_len,
        "batch_size": stage.batch_size,
        "stage_start": stage.start_step,
        "last_eval": last_eval,
        "stream_format": pipeline.STREAM_FORMAT,
        "examples_sha256": examples,
        "pending_eval": pending_eval,
        "unlogged": {k: [float(x) for x in jax.device_get(v)] for k, v in accumulated.items()},
      }
      checkpoints.save(state, meta)
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

  def preempted() -> None:
    save(stage, force_sync=True)
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
      (iterator, layout), iterator_stage = make_iterator(stage, step), stage.index
    logging.info("%s: steps %d..%d", stage.label, stage.start_step, stage.end_step)
    tokens_per_step = stage.seq_len * stage.batch_size
    first_step = True
    while step < stage.end_step:
      host_batch = fetch(iterator, preemption)
      if host_batch is None:  # signalled while waiting for data: resumes at this batch
        preempted()
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
