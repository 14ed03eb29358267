"""What a run trains: the `Task` interface that `loop.train` runs,
`LMPretraining` (the default task), and the LM evaluation that tasks share
(`lm_eval`, `sum_eval_steps`, `lm_metrics`)."""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import jax

from hybridna_jax import sharding
from hybridna_jax.config import ModelConfig, TrainConfig
from hybridna_jax.data import pipeline, prepare
from hybridna_jax.data.store import StoreError
from hybridna_jax.model import HybriDNA
from hybridna_jax.train import flops as flops_lib
from hybridna_jax.train import optimizer as optimizer_lib
from hybridna_jax.train import step as step_lib
from hybridna_jax.train.preemption import check_eval_interrupt
from hybridna_jax.train.stages import Stage, parse_stages


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


def check_eval_seq_len(seq_len: int, mesh, max_seq_len: int | None = None) -> None:
  """Refuses an evaluation length the mesh cannot split over its context
  axis, or (`max_seq_len`, the model's) longer than the model reads; raises
  ValueError naming config.train.eval_seq_len."""
  context = sharding.context_shards(mesh)
  if seq_len % context:
    raise ValueError(
      f"config.train.eval_seq_len: {seq_len} is not divisible by config.mesh.context="
      f"{context}; set it to a multiple."
    )
  if max_seq_len is not None and seq_len > max_seq_len:
    raise ValueError(
      f"config.train.eval_seq_len: {seq_len} exceeds config.model.max_seq_len {max_seq_len}; "
      "shorten it (0: each stage's length)."
    )


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
  check_eval_seq_len(seq_len, fns.mesh)
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


def examples_digest(splits: Mapping[str, tuple[Sequence[str], Sequence]]) -> str:
  """SHA-256 (hex) of named splits of (sequences, labels)."""
  digest = hashlib.sha256()
  for name in sorted(splits):
    sequences, labels = splits[name]
    digest.update(f"{name}\0{len(sequences)}\0".encode())
    digest.update("\n".join(sequences).encode())
    digest.update(("\0" + "\n".join(str(label) for label in labels)).encode())
  return digest.hexdigest()


class Task:
  """What a run trains and how it is fed and judged; `loop.train` runs any task
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

  def layout_iterator(
    self, stage: Stage, layout: sharding.BatchLayout, seed: int, start_batch: int
  ):
    """An iterator of this host's part of the stage's global batches from
    batch `start_batch` on: rows `layout.rows`, and of the `sequence_keys`
    only `layout.columns` (see `step.device_batch`). Global batch t must be
    a pure function of (seed, t), whatever the layout: a resumed run starts
    the stream at the batch of its step (the loop keeps no iterator state)."""
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

  # The config fields that name a task's examples (for `examples_digest`'s
  # refusal to say which changed).
  example_fields: tuple[str, ...] = ()

  def examples_digest(self) -> str | None:
    """A digest of the examples the run trains and is judged on, kept in
    its checkpoints: a resume on other examples (another task, an edited
    file) is refused, so a run's results are never another task's model.
    None (the default): not checked (pretraining reads a token store, which
    `prepare.check_store_matches` holds to its config)."""
    return None

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

  def init_model(self, rngs):
    return HybriDNA(self.model_cfg, rngs=rngs)

  def loss(self, model, batch):
    return step_lib.lm_loss(model, batch)

  def layout_iterator(self, stage, layout, seed, start_batch):
    return pipeline.train_batches(
      self.config.data,
      seq_len=stage.seq_len,
      batch_size=stage.batch_size,
      seed=seed,
      rows=layout.rows,
      columns=layout.columns,
      start_batch=start_batch,
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
