"""Understanding fine-tuning as a `tasks.Task`: the pretraining loop's mesh,
sharded steps, checkpoints, resume, preemption and metrics, with a
sequence-level head on the backbone.

    summary = finetune(config, "runs/prom_300")       # one task
    summary = run_suite(config, ["GUE/prom/*"], "runs/gue")   # several tasks

A run trains one stage of (padded input width, steps, batch size), evaluates
dev every `finetune.eval_every_epochs` (the loop keeps the best dev
checkpoint by MCC, or Pearson for regression, in <workdir>/best), then
restores that checkpoint and reports dev and test metrics (`report`).
`load_finetuned` brings a finished run back for predictions.

Batches (global B rows, width W; see `echo`):
    inputs, segment_ids  int32 (B, W)     pool_mask  float32 (B, W)
    rc_inputs            int32 (B, W)     (RC-echo only)
    labels               int32 (B,) classes | float32 (B,) standardised targets
    weight               float32 (B,)     1, or 0 on filler rows of eval batches
    index                int32 (B,)       example index in its split, -1 on fillers
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import json
import math
import os
import time

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from hybridna_jax import echo as echo_lib
from hybridna_jax import paths as paths_lib
from hybridna_jax import restore, sharding, tokenizer
from hybridna_jax.config import MODEL_RUNTIME_FIELDS, FinetuneConfig, ModelConfig, model_config_dict
from hybridna_jax.data import pipeline, sampling
from hybridna_jax.finetune import baselines as baselines_lib
from hybridna_jax.finetune import datasets, report
from hybridna_jax.finetune import metrics as metrics_lib
from hybridna_jax.finetune.model import HeadConfig, SequenceModel
from hybridna_jax.train import flops as flops_lib
from hybridna_jax.train import loop
from hybridna_jax.train import optimizer as optimizer_lib
from hybridna_jax.train import step as step_lib
from hybridna_jax.train.checkpoint import (
  BEST_DIR,
  CHECKPOINT_DIR,
  CheckpointDamagedError,
  Checkpoints,
  with_shardings,
)
from hybridna_jax.train.metrics import METRICS_FILE
from hybridna_jax.train.preemption import check_eval_interrupt, stop_signals
from hybridna_jax.train.resume import flatten_config
from hybridna_jax.train.tasks import Task, examples_digest

TASK_INFO = "task_info.json"


# -- backbone ---------------------------------------------------------------------------


def resolve_backbone(config) -> tuple[ModelConfig, restore.CheckpointRef | None]:
  """The backbone's config and, with finetune.pretrained, its checkpoint.

  A pretrained backbone brings its architecture (and initialisation
  fields) from its run's config.json; config.model is rewritten to match
  (so this run's config.json describes what it trains), keeping the runtime
  fields of config.model (config.MODEL_RUNTIME_FIELDS: dtypes, remat,
  kernels, max_seq_len).
  """
  fc = config.finetune
  own = ModelConfig.from_config(config.model)
  if not fc.pretrained:
    return own, None
  ref = restore.find_checkpoint(str(fc.pretrained), str(fc.pretrained_which))
  run = restore.run_config(ref.run_dir)
  run_task = FinetuneConfig.of(run).task
  if run_task:
    raise ValueError(
      f"finetune.pretrained={fc.pretrained} is a fine-tuning run (task "
      f"{run_task}); pass a pretraining run (launch/train.py)."
    )
  model_cfg = dataclasses.replace(
    ModelConfig.from_config(run.model), **{f: getattr(own, f) for f in MODEL_RUNTIME_FIELDS}
  )
  with config.unlocked():
    config.model = model_config_dict(**dataclasses.asdict(model_cfg))
  return model_cfg, ref


def head_only(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` on the head's parameters; zero updates and no optimizer state for
  the (frozen) backbone. Its gradients are zero already (stop_gradient), but
  AdamW's weight decay would still move it, and its moments would cost two
  backbones of memory."""

  def init(params):
    return tx.init(params["head"])

  def update(updates, state, params=None):
    head_updates, state = tx.update(
      updates["head"], state, None if params is None else params["head"]
    )
    updates = jax.tree.map(jnp.zeros_like, updates)
    updates["head"] = head_updates
    return updates, state

  return optax.GradientTransformation(init, update)


# -- training data ------------------------------------------------------------------------


class _TrainExamples(grain.transforms.Map):
  """Stream position g -> one training example (a dict of row arrays).

  Position g of epoch e = g div n is example permute(g mod n) under a key
  of (seed, e): a fresh order every epoch, O(1) per position, the same for
  any host count. With `rc_prob`, a hash of (seed, g) picks examples to
  reverse-complement.
  """

  def __init__(
    self,
    tokens: list[np.ndarray],
    labels: np.ndarray,
    width: int,
    echo: bool,
    reverse_strand: bool,
    seed: int,
    rc_prob: float,
  ):
    self.tokens, self.labels = tokens, labels
    self.width, self.echo, self.reverse_strand = width, echo, reverse_strand
    self.seed, self.rc_prob = seed, rc_prob

  def map(self, g: int) -> dict[str, np.ndarray]:
    n = len(self.tokens)
    epoch, j = divmod(int(g), n)
    i = sampling.permute(j, n, sampling.derive_seed(self.seed, "finetune", epoch))
    tokens = self.tokens[i]
    if self.rc_prob > 0 and (sampling.derive_seed(self.seed, "rc", g) / 2.0**32) < self.rc_prob:
      tokens = tokenizer.reverse_complement_nucleotides(tokens)
    row = echo_lib.build_batch(
      [tokens], self.width, echo=self.echo, reverse_strand=self.reverse_strand
    )
    row = {k: v[0] for k, v in row.items()}
    row.update(labels=self.labels[i], weight=np.float32(1.0), index=np.int32(i))
    return row


# -- the task -----------------------------------------------------------------------------


class FinetuneTask(Task):
  """Sequence classification / regression on a task from `datasets`.

  Construction loads the task (unless `data` is given), resolves the
  backbone, and writes the derived schedule into `config.train` (stages,
  and eval/checkpoint intervals and warmup when given in epochs or as a
  fraction), so the run's config.json records what ran.
  """

  example_fields = ("finetune.task", "finetune.format", "finetune.reference")

  def __init__(self, config, data: datasets.TaskData | None = None):
    super().__init__(config)
    fc = config.finetune
    data = self.data = data if data is not None else datasets.load_config_task(fc)
    self.kind = data.kind
    self.model_cfg, self.pretrained = resolve_backbone(config)
    num_outputs = data.num_classes if self.kind == "classification" else 1
    self.head_cfg = HeadConfig.from_config(fc, num_outputs)
    self.selection = (metrics_lib.HEADLINE[self.kind], "max")
    self.batch_keys = ("inputs", "segment_ids", "pool_mask", "labels", "weight", "index") + (
      ("rc_inputs",) if self.head_cfg.reverse_strand else ()
    )

    # Tokens (uint8) of every split, cropped to max_length.
    longest = max(len(s) for split in data.splits.values() for s in split.sequences)
    self.max_tokens = int(fc.max_length) or longest
    self.tokens, cropped = {}, 0
    for name, split in data.splits.items():
      rows = [tokenizer.encode(s).astype(np.uint8) for s in split.sequences]
      cropped += sum(r.size > self.max_tokens for r in rows)
      self.tokens[name] = [echo_lib.crop_center(r, self.max_tokens) for r in rows]
    if cropped:
      logging.warning(
        "%d sequences longer than finetune.max_length=%d nt were cropped around their centre.",
        cropped,
        self.max_tokens,
      )
    self.width = echo_lib.padded_width(self.max_tokens, self.head_cfg.echo, int(fc.pad_multiple))

    # Targets: class ids, or regression labels standardised on train.
    train_labels = data.splits["train"].labels
    if self.kind == "regression":
      self.label_mean = float(np.mean(train_labels))
      self.label_std = float(np.std(train_labels)) or 1.0
    else:
      self.label_mean, self.label_std = 0.0, 1.0
    self.class_weights = None
    if self.kind == "classification" and fc.class_weights == "balanced":
      counts = np.bincount(train_labels, minlength=num_outputs).astype(np.float64)
      self.class_weights = np.where(
        counts > 0, counts.sum() / (num_outputs * np.maximum(counts, 1)), 0.0
      ).astype(np.float32)
    elif fc.class_weights not in ("none", "balanced"):
      raise ValueError(
        f"finetune.class_weights must be none or balanced, got {fc.class_weights!r}."
      )

    # The schedule.
    n_train = len(self.tokens["train"])
    batch = int(fc.batch_size)
    steps_per_epoch = n_train / batch
    steps = int(fc.steps) or max(1, math.ceil(float(fc.epochs) * steps_per_epoch))
    tc = config.train
    tc.stages = ((self.width, steps, batch),)
    if float(fc.eval_every_epochs) > 0:
      every = max(1, round(float(fc.eval_every_epochs) * steps_per_epoch))
      tc.eval_every = every
      tc.checkpoint_every = every
    if float(fc.warmup_fraction) > 0:
      tc.warmup_steps = int(round(float(fc.warmup_fraction) * steps))
    if not int(tc.eval_every):
      logging.warning(
        "train.eval_every = 0: dev is evaluated only at the end, so the "
        "last step is the selected model."
      )
    tc.keep_best = True
    tc.plot = False  # the LM loss plot; `finish` draws fine-tuning curves

  # -- model and loss -----------------------------------------------------------

  def init_model(self, rngs):
    return SequenceModel(self.model_cfg, self.head_cfg, rngs=rngs)

  def loss(self, model, batch):
    outputs = model(batch)
    weight = batch["weight"]
    if self.kind == "classification":
      if self.class_weights is not None:
        weight = weight * jnp.asarray(self.class_weights)[batch["labels"]]
      nll, count, correct = step_lib.masked_cross_entropy(outputs, batch["labels"], weight)
      return nll, {"count": count, "accuracy": correct}
    error = (outputs[:, 0] - batch["labels"]) ** 2
    return jnp.sum(error * weight), {"count": jnp.sum(weight)}

  def apply(self, model, batch):
    return {"outputs": model(batch), "index": batch["index"]}

  def optimizer(self, total_steps: int):
    tx, schedule = optimizer_lib.make_optimizer(self.config.train, total_steps)
    return (head_only(tx) if self.head_cfg.freeze_backbone else tx), schedule

  def flops_per_token(self, seq_len: int) -> float:
    """The backbone's forward without the LM head (the head's d x classes
    is negligible), times 3 for the backward, or 1 with a frozen backbone
    (stop_gradient: XLA runs no backward through it)."""
    strands = 2 if self.head_cfg.reverse_strand else 1
    forward = sum(
      flops_lib.forward_flops_per_token(self.model_cfg, seq_len, lm_head=False).values()
    )
    return strands * (1 if self.head_cfg.freeze_backbone else 3) * forward

  # -- data ---------------------------------------------------------------------------

  def _labels(self, split: str) -> np.ndarray:
    labels = self.data.splits[split].labels
    if self.kind == "classification":
      return labels.astype(np.int32)
    return ((labels - self.label_mean) / self.label_std).astype(np.float32)

  def stage_fields(self, stage):
    return (
      "config.finetune.batch_size",
      f"the padded input width (finetune.max_length {self.max_tokens} nt"
      f"{' echoed' if self.head_cfg.echo else ''}, rounded up to finetune.pad_multiple)",
    )

  def layout_iterator(self, stage, layout, seed, start_batch):
    """This process's rows `layout.rows` of every global batch from
    `start_batch` on (stream positions t * B + row, as pretraining), whole
    rows (no sequence keys)."""
    examples = _TrainExamples(
      self.tokens["train"],
      self._labels("train"),
      stage.seq_len,
      self.head_cfg.echo,
      self.head_cfg.reverse_strand,
      seed,
      float(self.config.finetune.rc_augment),
    )
    rows = len(layout.rows)
    ds = pipeline.layout_positions(layout.rows, stage.batch_size, start_batch)
    ds = ds.map(examples).batch(rows, drop_remainder=True)
    options = grain.ReadOptions(
      num_threads=int(self.config.data.read_threads), prefetch_buffer_size=2 * rows
    )
    return iter(ds.to_iter_dataset(options))

  def _eval_layout(self, mesh) -> sharding.BatchLayout:
    """This process's layout of the eval batches: finetune.eval_batch_size
    rows rounded up to a multiple of data x fsdp."""
    shards = sharding.batch_shards(mesh)
    global_batch = -(-int(self.config.finetune.eval_batch_size) // shards) * shards
    return sharding.batch_layout(mesh, global_batch, self.width)

  def _eval_batches(self, split: str, layout: sharding.BatchLayout):
    """This process's rows of the eval batches of `split` (global batch t holds
    examples t * B ...), the last filled with weight-0 rows."""
    tokens, labels = self.tokens[split], self._labels(split)
    for ids in pipeline.host_eval_rows(len(tokens), layout.batch_size)[:, layout.rows]:
      rows = ids[ids >= 0]
      fill = len(ids) - len(rows)
      batch = echo_lib.build_batch(
        [tokens[i] for i in rows] + [tokens[0]] * fill,
        self.width,
        echo=self.head_cfg.echo,
        reverse_strand=self.head_cfg.reverse_strand,
      )
      batch["labels"] = np.concatenate([labels[rows], np.repeat(labels[:1], fill)])
      batch["weight"] = np.r_[np.ones(len(rows)), np.zeros(fill)].astype(np.float32)
      batch["index"] = np.r_[rows, -np.ones(fill)].astype(np.int32)
      yield batch

  def predict(self, fns: step_lib.StepFunctions, params, split: str) -> np.ndarray:
    """Head outputs of every example of `split`, in file order: logits (n, k)
    or de-standardised regression predictions (n,)."""
    n = len(self.tokens[split])
    outputs = None
    start = last_report = time.perf_counter()
    layout = self._eval_layout(fns.mesh)
    for done, batch in enumerate(self._eval_batches(split, layout)):
      if time.perf_counter() - last_report > 30:  # long splits show progress
        last_report = time.perf_counter()
        logging.info(
          "predicting %s: %d rows in %.0f s",
          split,
          done * layout.batch_size,
          last_report - start,
        )
      check_eval_interrupt()  # a dev-set evaluation during training stops for a signal
      placed = step_lib.device_batch(batch, fns.batch_sharding, fns.batch_keys, layout=layout)
      out = fns.apply(params, placed)
      if jax.process_count() > 1:
        out = multihost_utils.process_allgather(out, tiled=True)
      out = jax.tree.map(np.asarray, jax.device_get(out))
      if outputs is None:
        outputs = np.zeros((n, out["outputs"].shape[1]), np.float32)
      keep = out["index"] >= 0
      outputs[out["index"][keep]] = out["outputs"][keep]
    if self.kind == "regression":
      return outputs[:, 0] * self.label_std + self.label_mean
    return outputs

  def split_metrics(self, outputs: np.ndarray, split: str) -> dict[str, float]:
    labels = self.data.splits[split].labels
    if self.kind == "classification":
      values = metrics_lib.classification_metrics(labels, outputs)
    else:
      values = metrics_lib.regression_metrics(labels, outputs)
    values["examples"] = len(labels)
    return values

  def evaluate(self, fns, params, stage):
    values = self.split_metrics(self.predict(fns, params, "dev"), "dev")
    del values["examples"]
    return values

  # -- start and finish ------------------------------------------------------------

  def start(self, fns, state):
    if self.pretrained is None:
      logging.info("backbone: freshly initialised (finetune.pretrained is empty)")
      return state
    ref = self.pretrained
    logging.info("backbone: %s step %d", ref.manager_dir, ref.step)
    loaded = restore.restore_params(ref, self.model_cfg, fns.mesh)
    target = fns.state_shardings.params["backbone"]
    if jax.tree.structure(loaded) != jax.tree.structure(state.params["backbone"]):
      raise ValueError(
        f"the checkpoint at {ref.manager_dir} does not hold a HybriDNA "
        "backbone of this architecture."
      )
    state.params["backbone"] = jax.device_put(loaded, target)
    return state

  def best_params(self, fns, state, workdir: str):
    """(params, step) of the best dev checkpoint, or the final state's."""
    best_dir = os.path.join(workdir, BEST_DIR)
    checkpoints = Checkpoints(best_dir, create=False) if os.path.isdir(best_dir) else None
    step = checkpoints.latest_step() if checkpoints else None
    if step is None:
      return state.params, int(jax.device_get(state.step))
    target = with_shardings(
      jax.eval_shape(fns.init, jax.random.key(0)).params, fns.state_shardings.params
    )
    try:
      return checkpoints.restore_params(step, target), step
    except CheckpointDamagedError as e:
      raise CheckpointDamagedError(
        f"{e} These are the dev-selected parameters: move the step away and rerun to report "
        "the last step's parameters instead, or fine-tune again in a new --workdir."
      ) from None

  def task_info(self) -> dict:
    return {
      "task": self.data.name,
      "path": self.data.path,
      "format": self.data.format,
      "kind": self.kind,
      "num_outputs": self.head_cfg.num_outputs,
      "head": dataclasses.asdict(self.head_cfg),
      "max_tokens": self.max_tokens,
      "width": self.width,
      "label_mean": self.label_mean,
      "label_std": self.label_std,
    }

  def finish(self, fns, state, workdir):
    params, step = self.best_params(fns, state, workdir)
    dev_out, test_out = self.predict(fns, params, "dev"), self.predict(fns, params, "test")
    results = {
      "task": self.data.name,
      "kind": self.kind,
      "embedding": self.head_cfg.label,
      "backbone": (
        f"{self.pretrained.manager_dir} step {self.pretrained.step}"
        if self.pretrained
        else "fresh init"
      ),
      "selected_step": step,
      "total_steps": int(jax.device_get(state.step)),
      "selection": list(self.selection),
      "dev": self.split_metrics(dev_out, "dev"),
      "test": self.split_metrics(test_out, "test"),
      "data": self.data.summary(),
      "settings": self.task_info(),
    }
    if self.kind == "classification":
      results["test_per_class"] = metrics_lib.per_class(self.data.splits["test"].labels, test_out)
    if jax.process_index() == 0:
      if self.config.finetune.baselines:
        weight = baselines_lib.class_weight_of(self.config.finetune, self.kind)
        baselines_lib.attach(results, self.data, weight)
      # results.json last: it marks a finished run (run_suite reuses it).
      paths_lib.write_json(os.path.join(workdir, TASK_INFO), self.task_info())
      report.write_predictions(
        os.path.join(workdir, "test_predictions.csv"),
        self.data.splits["test"].labels,
        test_out,
        self.kind,
      )
      plot = None
      jsonl = os.path.join(workdir, METRICS_FILE)
      if os.path.exists(jsonl):
        plot = report.plot_curves(
          jsonl,
          os.path.join(workdir, "finetune_curves.png"),
          self.selection[0],
          f"{self.data.name}: {self.head_cfg.label}",
        )
      paths = report.write_results(workdir, results)
      results["files"] = paths | ({"plot": plot} if plot else {})
      headline = self.selection[0]
      logging.info(
        "%s: dev %s %.4f, test %s %.4f (step %d)\n%s%s",
        self.data.name,
        headline,
        results["dev"][headline],
        headline,
        results["test"][headline],
        step,
        report.metrics_table(report.result_rows(results)),
        results["verdict"]["text"] if "verdict" in results else "",
      )
    return {"results": results}

  def examples_digest(self) -> str:
    """Of every split as loaded (a dev split carved from train included)."""
    return examples_digest({k: (v.sequences, v.labels) for k, v in self.data.splits.items()})

  def describe(self) -> str:
    cfg = self.model_cfg
    return (
      f"fine-tuning on {self.data.name} ({self.kind}, {self.head_cfg.num_outputs} "
      f"outputs): {self.head_cfg.label}, width {self.width}; backbone "
      f"{cfg.n_layers} layers d={cfg.d_model} "
      f"({'pretrained' if self.pretrained else 'fresh init'})"
    )


# -- entry points --------------------------------------------------------------------------


def finetune(config, workdir: str, data: datasets.TaskData | None = None) -> dict:
  """Fine-tunes on config.finetune.task (or `data`) in `workdir`, resuming
  from its latest checkpoint; returns the loop's summary with "results".
  With finetune.probe, fits a linear probe on frozen embeddings instead
  (`probe.run_probe`)."""
  if config.finetune.get("probe", False):
    from hybridna_jax.finetune import probe  # pylint: disable=g-import-not-at-top

    return probe.run_probe(config, workdir, data)
  task = FinetuneTask(config, data)
  return loop.train(config, workdir, task=task)


def expand_suite(patterns: list[str]) -> list[str]:
  """Task paths from paths and glob patterns (each must match a task)."""
  paths = []
  for pattern in patterns:
    matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    tasks = []
    for path in matches:
      try:
        datasets.detect_format(path)
        tasks.append(path)
      except (ValueError, FileNotFoundError) as e:
        if not glob.has_magic(pattern):
          raise
        logging.info("suite: skipping %s (%s)", path, e)
    if not tasks:
      raise ValueError(f"--task_suite entry {pattern!r} matches no task folder or BED file.")
    paths.extend(p for p in tasks if p not in paths)
  return paths


def suite_names(paths: list[str]) -> list[str]:
  """Display names: each path relative to the paths' common parent."""
  absolute = [os.path.abspath(p) for p in paths]
  parent = os.path.commonpath(absolute) if len(absolute) > 1 else os.path.dirname(absolute[0])
  if parent in absolute:
    parent = os.path.dirname(parent)
  names = [os.path.relpath(p, parent) for p in absolute]
  return [n[: -len(".bed")] if n.endswith(".bed") else n for n in names]


# A finished suite task's config, flattened: a rerun reuses its results only
# under the same one.
SUITE_SETTINGS = "suite_settings.json"


def settings_of(config) -> dict[str, str]:
  """A run's settings as SUITE_SETTINGS holds them: the repr of every
  config field (as JSON can hold them)."""
  return {k: repr(v) for k, v in flatten_config(config.to_dict()).items()}


def check_suite_settings(task_dir: str, settings: dict[str, str]) -> None:
  """Refuses to reuse a finished task's results under other settings (runs
  finished before the settings were saved are reused as before)."""
  path = os.path.join(task_dir, SUITE_SETTINGS)
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    saved = json.load(f)
  changed = sorted(k for k in saved.keys() | settings.keys() if saved.get(k) != settings.get(k))
  if changed:
    raise ValueError(
      f"{task_dir} finished under another config ({', '.join(changed[:3])}"
      f"{', ...' if len(changed) > 3 else ''} differ); give the suite a new --workdir, or "
      "delete that task's directory to rerun it."
    )


def run_suite(config, patterns: list[str], workdir: str) -> dict:
  """Fine-tunes on every task (one run directory each under `workdir`, so
  an interrupted suite resumes; finished tasks are not re-run) and writes
  suite_results.json, suite_table.md and suite_scores.png.

  A preempted task (SIGTERM / SIGINT: the loop saved its checkpoint) stops
  the suite, whose files then hold the tasks finished so far; running it
  again resumes that task. A signal while a task finishes (its test
  predictions and baselines) or between two tasks (writing one's results,
  loading the next one's data) stops the suite before the next task.

  Returns:
    {"suite": result rows (`report.result_rows`) of the finished tasks,
    "stopped": "completed" or "preempted"} (+ "preempted_task": its name).
  """
  with stop_signals("stopping the suite before its next task") as between:
    return _run_suite(config, patterns, workdir, between)


def _run_suite(config, patterns: list[str], workdir: str, between) -> dict:
  paths = expand_suite(patterns)
  names = suite_names(paths)
  rows, verdicts = [], []
  summary = {"stopped": "completed"}
  logging.info("suite of %d tasks: %s", len(paths), ", ".join(names))
  for i, (path, name) in enumerate(zip(paths, names)):
    task_dir = os.path.join(workdir, name.replace(os.sep, "__"))
    results_path = os.path.join(task_dir, "results.json")
    task_config = copy.deepcopy(config)
    with task_config.unlocked():
      task_config.finetune.task = path
    settings = settings_of(task_config)
    reused = os.path.exists(results_path)
    if reused:
      check_suite_settings(task_dir, settings)
      logging.info("[%d/%d] %s: done already (%s)", i + 1, len(paths), name, results_path)
      with open(results_path, encoding="utf-8") as f:
        results = json.load(f)
    else:
      logging.info("[%d/%d] %s", i + 1, len(paths), name)
      start = time.perf_counter()
      data = datasets.load_config_task(task_config.finetune, name=name)
      if between.any_host():  # signalled between two tasks (or while loading this one)
        summary.update(stopped="preempted", preempted_task=name)
        logging.warning(
          "[%d/%d] stop requested before %s; the suite stops here (%d of %d tasks finished).",
          i + 1,
          len(paths),
          name,
          i,
          len(paths),
        )
        break
      if jax.process_index() == 0:  # before the run: its results.json marks it finished
        paths_lib.write_json(os.path.join(task_dir, SUITE_SETTINGS), settings)
      run = finetune(task_config, task_dir, data)
      if run.get("stopped") == "preempted":  # no results: the task resumes next time
        summary.update(stopped="preempted", preempted_task=name)
        logging.warning(
          "[%d/%d] %s preempted at step %d; the suite stops here (%d of %d tasks finished).",
          i + 1,
          len(paths),
          name,
          run["steps"],
          i,
          len(paths),
        )
        break
      results = run["results"]
      logging.info(
        "[%d/%d] %s finished in %.0f s", i + 1, len(paths), name, time.perf_counter() - start
      )
    rows.extend(report.result_rows({**results, "task": name}))
    if "verdict" in results:
      verdicts.append(f"- {name}: {results['verdict']['text']}")
    if not reused and run.get("signalled") and i + 1 < len(paths):
      # Signalled while the task finished (test predictions, baselines).
      summary.update(stopped="preempted", preempted_task=names[i + 1])
      logging.warning(
        "[%d/%d] %s finished after a stop signal; the suite stops before %s (%d of %d tasks "
        "finished).",
        i + 1,
        len(paths),
        name,
        names[i + 1],
        i + 1,
        len(paths),
      )
      break
  if jax.process_index() == 0 and rows:
    os.makedirs(workdir, exist_ok=True)
    paths_lib.write_json(os.path.join(workdir, "suite_results.json"), rows)
    table = report.metrics_table(rows)
    with open(os.path.join(workdir, "suite_table.md"), "w", encoding="utf-8") as f:
      f.write("# Fine-tuning suite\n\nSelected on dev, reported on test.\n\n")
      if summary["stopped"] == "preempted":
        f.write(
          f"Preempted at {summary['preempted_task']}: the tasks below finished; "
          "run the suite again to resume.\n\n"
        )
      if verdicts:
        f.write("Against the baselines (test):\n\n" + "\n".join(verdicts) + "\n\n")
      f.write(table)
    report.plot_suite(rows, os.path.join(workdir, "suite_scores.png"))
    logging.info("suite results:\n%s", table)
  return {**summary, "suite": rows}


# -- using a fine-tuned model -----------------------------------------------------------------


@dataclasses.dataclass
class Finetuned:
  """A fine-tuned model restored for predictions (`load_finetuned`)."""

  model: SequenceModel
  config: ml_collections.ConfigDict
  info: dict

  def predict(self, sequences: list[str], batch_size: int = 64) -> np.ndarray:
    """Class probabilities (n, k), or predicted values (n,) for regression.

    Sequences longer than the run's max length are centre-cropped as in
    training; batches are padded to the run's width (one compiled shape).
    """
    head: HeadConfig = self.model.head_cfg
    forward = nnx.jit(lambda model, batch: model(batch))
    outputs = [np.zeros((0, head.num_outputs), np.float32)]  # no sequences: (0, k) or (0,)
    for start in range(0, len(sequences), batch_size):
      chunk = [
        echo_lib.crop_center(tokenizer.encode(s), self.info["max_tokens"])
        for s in sequences[start : start + batch_size]
      ]
      fill = batch_size - len(chunk)
      batch = echo_lib.build_batch(
        chunk + [chunk[0]] * fill,
        self.info["width"],
        echo=head.echo,
        reverse_strand=head.reverse_strand,
      )
      outputs.append(np.asarray(forward(self.model, batch))[: len(chunk)])
    out = np.concatenate(outputs)
    if self.info["kind"] == "regression":
      return out[:, 0] * self.info["label_std"] + self.info["label_mean"]
    return metrics_lib.softmax(out)


def load_finetuned(run_dir: str, *, which: str = "best", mesh=None) -> Finetuned:
  """Restores a fine-tuning run (its best dev checkpoint, or "latest")."""
  info_path = os.path.join(run_dir, TASK_INFO)
  if not os.path.exists(info_path):
    raise FileNotFoundError(
      f"{run_dir} has no {TASK_INFO}; is it a finished fine-tuning run (launch/finetune.py)?"
    )
  with open(info_path, encoding="utf-8") as f:
    info = json.load(f)
  config = restore.run_config(run_dir)
  model_cfg = ModelConfig.from_config(config.model)
  head_cfg = HeadConfig(**info["head"])
  abstract = nnx.eval_shape(lambda: SequenceModel(model_cfg, head_cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract_params = nnx.split(abstract, nnx.Param)
  mesh = mesh or restore.default_mesh()
  target = with_shardings(abstract_params, sharding.state_shardings(abstract_params, mesh))
  manager = os.path.join(run_dir, BEST_DIR if which == "best" else CHECKPOINT_DIR)
  checkpoints = Checkpoints(manager, create=False)
  step = checkpoints.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {manager}.")
  params = checkpoints.restore_params(step, target)
  return Finetuned(nnx.merge(graphdef, params), config, info)
