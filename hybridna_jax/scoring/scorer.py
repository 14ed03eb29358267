"""Jitted, batched scoring with a trained model: log-likelihoods, per-position
log-probabilities and entropies, and embeddings.

    model, _, config = hybridna_jax.restore.load("runs/demo")
    scorer = Scorer.from_config(model, config)
    ll = scorer.log_likelihood(["ACGT...", "GGCA..."], rc_average=True)
    ll.total, ll.mean                      # (n,) nats
    pos = scorer.position_scores([chromosome])  # 1 Mb in, (1 Mb,) out
    emb = scorer.embed(seqs, pooling="echo", layer=-1)  # (n, d_model)

Conventions.
  * Sequences are DNA strings or 1-D integer token arrays (A C G T N ids of
    `hybridna_jax.tokenizer`, e.g. a token-store record's memmap).
  * The log-probability of position i is log p(x_i | x_<i) under the model's
    full softmax (the training loss), in nats. A position is scored when it
    has at least one token of context and is A, C, G or T: the first
    nucleotide (no <bos> by default, as in pretraining) and N (masked out
    of the training loss) are not scored; per-position outputs hold NaN
    there. The entropy at i is that of the distribution predicting x_i
    (NaN only at the first position).
  * Windows. An input longer than `context` tokens is scored in windows of
    `context` tokens, `stride` apart; each window scores only the positions
    no earlier window scored, so every position is scored exactly once with
    at least context - stride tokens before it (all earlier tokens near the
    start). The last window is moved back to end at the sequence end, so all
    windows of a long input have the same length. An input that fits is one
    window: windowing does not change its scores.
  * Buckets. Windows are right-padded to the smallest of a few power-of-two
    lengths (min_bucket, 2 min_bucket, ..., context) and grouped into
    batches of exactly `batch_size` rows, so a scorer compiles at most one
    program per bucket and kind of output, whatever the inputs; the model
    is causal, so right padding never changes a score. `trace_count` counts
    the traces (each one a compile).
  * Reverse complement. With `rc_average=True` each input is also scored
    on the reverse strand: log-likelihoods are the mean of the two strands',
    per-position scores the mean of the values for the same base (position
    i forward, n - 1 - i reverse; one strand's value where the other has
    none), embeddings the mean of the two. A sequence and its reverse
    complement get the same averaged scores.
  * Echo embeddings ("echo"): the sequence is fed twice with <sep> between,
    and the second copy is read (it has seen the whole sequence), as in
    HybriDNA's understanding fine-tuning; the rows come from the fine-tuning
    heads' own builder, `hybridna_jax.echo.build_row`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hybridna_jax import echo as echo_lib
from hybridna_jax import sharding, tokenizer
from hybridna_jax.config import POOLINGS, ScoreConfig, TrainConfig
from hybridna_jax.train.metrics import format_duration

SequenceLike = str | np.ndarray
Progress = Callable[[int, int], None]


# -- results ------------------------------------------------------------------


class LogLikelihood(NamedTuple):
  """Per-sequence log-likelihoods (nats) over the scored positions.

  total: (n,) float64 sum of log p(x_i | x_<i).
  mean: (n,) float64 total / count (NaN when nothing was scored).
  count: (n,) float64 scored positions (a strand average with rc_average).
  """

  total: np.ndarray
  mean: np.ndarray
  count: np.ndarray


class PositionScores(NamedTuple):
  """One sequence's per-position scores, aligned with its nucleotides.

  log_probs: (length,) float32 log p(x_i | x_<i), NaN where not scored.
  entropy: (length,) float32 entropy (nats) of the distribution predicting
    x_i, NaN at the first position.
  """

  log_probs: np.ndarray
  entropy: np.ndarray


class TokenStats(NamedTuple):
  """Sums for evaluation metrics, per sequence: negative log-likelihood
  (nats), correct argmax predictions and scored positions."""

  nll: np.ndarray
  correct: np.ndarray
  count: np.ndarray


# -- windows and buckets ----------------------------------------------------------


class Window(NamedTuple):
  """Tokens [start, end) of a sequence, scoring positions [score_from, end)."""

  start: int
  end: int
  score_from: int


def plan_windows(length: int, context: int, stride: int) -> list[Window]:
  """Windows covering `length` tokens; every position in exactly one
  [score_from, end), with >= context - stride tokens of context from the
  second window on (see the module docstring)."""
  if not 0 < stride < context:
    raise ValueError(f"stride {stride} must be in [1, context - 1] (context {context}).")
  if length <= context:
    return [Window(0, length, 0)]
  windows, start, scored_to = [], 0, 0
  while scored_to < length:
    end = start + context
    if end >= length:  # the last window ends at the end
      start, end = length - context, length
    windows.append(Window(start, end, scored_to))
    scored_to, start = end, start + stride
  return windows


def bucket_lengths(context: int, min_bucket: int) -> tuple[int, ...]:
  """Padded window lengths: powers of two times min_bucket below the
  context, then the context itself."""
  buckets, size = [], max(1, min(min_bucket, context))
  while size < context:
    buckets.append(size)
    size *= 2
  return tuple(buckets) + (context,)


# -- sequences --------------------------------------------------------------------


def as_tokens(sequence: SequenceLike, name: str = "") -> np.ndarray:
  """A DNA string or token array -> 1-D integer tokens (A C G T N only).

  Arrays (e.g. memmaps) are not copied."""
  where = f"sequence {name}: " if name else ""
  if isinstance(sequence, str):
    try:
      return tokenizer.encode(sequence)
    except tokenizer.InvalidSequenceError as e:
      raise tokenizer.InvalidSequenceError(e.char, e.position, where.rstrip(": ")) from None
  array = np.asarray(sequence)
  if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
    raise ValueError(
      f"{where}expected a DNA string or a 1-D integer token array, "
      f"got {array.dtype} of shape {array.shape}."
    )
  bad = np.flatnonzero(~tokenizer.is_nucleotide(array))
  if bad.size:
    raise ValueError(
      f"{where}token {int(array[bad[0]])} at position {int(bad[0])} is "
      "not a nucleotide (A C G T N ids 5..9); pass nucleotides only."
    )
  return array


class _Sequence:
  """A sequence as the model reads it: optional <bos>, then nucleotides."""

  def __init__(self, tokens: np.ndarray, add_bos: bool):
    self.tokens = tokens
    self.offset = int(add_bos)
    self.length = tokens.shape[0] + self.offset

  def window(self, start: int, end: int) -> np.ndarray:
    """int32 tokens [start, end) of the model-side sequence."""
    if self.offset and start == 0:
      return np.concatenate([[tokenizer.BOS], self.tokens[: end - 1]]).astype(np.int32)
    return np.asarray(self.tokens[start - self.offset : end - self.offset], np.int32)


class _Job(NamedTuple):
  """One window to run. Tokens are read from the sequence when the batch is
  built (unless given), so a chromosome's windows are never all in memory."""

  seq: int
  window: Window
  tokens: np.ndarray | None = None  # (L,) int32, default: the window's tokens
  weights: np.ndarray | None = None  # (L,) float32 pooling weights
  # Mean pooling: the weights are the window's nucleotides from score_from
  # on, made with the batch (like the tokens) instead of held per window.
  mean_pooled: bool = False

  @property
  def length(self) -> int:
    return self.window.end - self.window.start if self.tokens is None else len(self.tokens)


# -- progress ---------------------------------------------------------------------


class ProgressLogger:
  """A `Progress` callback that logs done/total windows, rate and ETA at
  most every `every` seconds (and at the end)."""

  def __init__(
    self, what: str = "windows", every: float = 10.0, log: Callable[..., None] = logging.info
  ):
    self.what, self.every, self.log = what, every, log
    self._start = self._last = None

  def __call__(self, done: int, total: int) -> None:
    now = time.perf_counter()
    if self._start is None:
      self._start = self._last = now
    if now - self._last < self.every and done < total:
      return
    self._last = now
    elapsed = now - self._start
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else float("nan")
    self.log(
      "scored %d/%d %s (%.0f%%), %.1f %s/s, %s elapsed, ETA %s",
      done,
      total,
      self.what,
      100.0 * done / max(total, 1),
      rate,
      self.what,
      format_duration(elapsed),
      format_duration(eta),
    )


# -- the scorer ---------------------------------------------------------------------


def _warn_unused_model_fields(config, run_config) -> None:
  """Names the `model` fields of a job config that differ from the run's:
  the checkpoint decides the model (a --config.model.dtype would otherwise
  be dropped without a word)."""
  if config is None or "model" not in config or run_config is None or "model" not in run_config:
    return
  # Through JSON: tuples and the lists config.json holds compare equal.
  ours, run = (json.loads(c.model.to_json_best_effort()) for c in (config, run_config))
  differ = sorted(k for k in ours if k in run and ours[k] != run[k])
  if differ:
    logging.warning(
      "--config's model.%s differ from the run's and are not used: the checkpoint decides the "
      "model; score.dtype, score.attention_impl and score.ssd_impl set its numerics and kernels.",
      ", model.".join(differ),
    )


def settings_from_config(config, run_config=None, **overrides) -> ScoreConfig:
  """The `score` section of `config` (defaults when it has none) with
  `overrides` (None values are ignored); context 0 becomes the trained
  context, the last stage's length in `run_config` (default: `config`)."""
  settings = ScoreConfig.of(config).replace(**overrides)
  if not settings.context:
    trained = run_config if run_config is not None else config
    stages = TrainConfig.of(trained).stages if "train" in trained else ()
    if not stages:
      raise ValueError(
        "score.context is 0 and the config has no train.stages to take "
        "the trained context from; set --config.score.context."
      )
    settings = dataclasses.replace(settings, context=int(stages[-1][0]))
  return settings


def run_add_bos(add_bos: bool, run_config, run: str) -> bool:
  """Whether to score the checkpoint of `run` with <bos>: `add_bos` (a job
  config's score.add_bos), or True where the run's own config.json scores
  with it (a converted tokenizer that adds bos, or a run trained with it):
  the checkpoint reads <bos> first, and a config given for other settings
  (a size config, a longer context) does not take it away (warned)."""
  if add_bos or not ScoreConfig.of(run_config).add_bos:
    return add_bos
  logging.warning(
    "%s scores with score.add_bos=True (its config.json: the checkpoint reads <bos> first); "
    "kept under the given config, whose score.add_bos is False.",
    run,
  )
  return True


def _model_mesh(state) -> jax.sharding.Mesh | None:
  for leaf in jax.tree.leaves(state):
    if isinstance(getattr(leaf, "sharding", None), NamedSharding):
      return leaf.sharding.mesh
  return None


class Scorer:
  """Batched, bucketed, jitted scoring functions bound to one model.

  Args:
    model: a HybriDNA nnx module (e.g. from `restore.load`); its parameters
      may be sharded over a mesh of this process's devices, and the batch
      is then split over its data axes (when batch_size divides by them).
    settings: windows and batching (`ScoreConfig`), or keyword fields.

  Results come back to the host per batch, so scoring runs in one process
  (any number of local devices).
  """

  def __init__(self, model: nnx.Module, settings: ScoreConfig | None = None, **kwargs):
    if settings is not None and kwargs:
      raise ValueError("pass either settings or keyword fields, not both.")
    self.settings = settings or ScoreConfig(**kwargs)
    if self.settings.context < 2:
      raise ValueError(
        "a Scorer needs score.context >= 2 (the trained context: "
        "Scorer.from_config / settings_from_config)."
      )
    self.model_config = model.cfg
    self.checkpoint: str | None = None  # the step directory, set by from_run
    self.graphdef, self.state = nnx.split(model)
    self.mesh = _model_mesh(self.state)
    s = self.settings
    if s.context > model.cfg.max_seq_len:
      raise ValueError(
        f"score.context {s.context} exceeds the model's max_seq_len {model.cfg.max_seq_len}."
      )
    self.buckets = bucket_lengths(s.context, s.min_bucket)
    self.trace_count = 0
    self._batch_sharding = None
    if self.mesh is not None and self.mesh.size > 1:
      split = s.batch_size % sharding.batch_shards(self.mesh) == 0
      spec = P(sharding.BATCH_AXES) if split else P()
      self._batch_sharding = NamedSharding(self.mesh, spec)
    self._score_fn = jax.jit(self._window_scores)
    self._embed_fn = jax.jit(self._window_embeddings, static_argnames="layer")

  @classmethod
  def from_config(cls, model: nnx.Module, config, run_config=None, **overrides) -> Scorer:
    """A scorer with `settings_from_config(config, run_config, ...)`."""
    return cls(model, settings_from_config(config, run_config, **overrides))

  @classmethod
  def from_run(
    cls, path: str, config=None, *, which: str = "latest", mesh=None, **overrides
  ) -> tuple[Scorer, Any]:
    """Restores a checkpoint (`restore.load`) and binds a scorer to it.

    Args:
      path: run directory, checkpoints/ or best/ directory, or step directory.
      config: job config whose `score` section to use (default: the run's),
        except that a run scored with add_bos keeps it (unless `overrides`
        say add_bos=False);
        its score.dtype, score.attention_impl and score.ssd_impl set the
        restored model's numerics and kernels, and its `mesh` section the
        mesh (unless `mesh` is given): `mesh.context` splits each window
        over devices, for windows of 1M nucleotides and more.
      which, mesh: as for `restore.load`.

    Returns:
      (scorer, the run's config).
    """
    from hybridna_jax import restore  # pylint: disable=g-import-not-at-top

    ref = restore.find_checkpoint(path, which)
    # The step resolved now is the one restored and recorded (`fingerprint`).
    step_dir = ref.step_dir
    run_config = restore.run_config(ref.run_dir)
    _warn_unused_model_fields(config, run_config)
    settings_from = config if config is not None else run_config
    section = ScoreConfig.of(settings_from)
    if overrides.get("add_bos") is None:
      overrides["add_bos"] = run_add_bos(section.add_bos, run_config, ref.run_dir)
    if mesh is None and config is not None and "mesh" in config:
      mesh = sharding.mesh_from_config(config.mesh)  # e.g. --config.mesh.context=8
    model, _, _ = restore.load(
      step_dir,
      dtype=section.dtype or None,
      mesh=mesh,
      attention_impl=section.attention_impl,
      ssd_impl=section.ssd_impl,
      # An explicit score.context is the length the caller asks for.
      max_seq_len=section.context or None,
    )
    scorer = cls.from_config(model, settings_from, run_config, **overrides)
    scorer.checkpoint = step_dir
    return scorer, run_config

  def fingerprint(self) -> dict[str, Any]:
    """What sets this scorer's scores, as JSON values (e.g. to resume a run
    only with the same): the checkpoint's step directory (None unless
    restored by `from_run`), the windows (context, stride, add_bos) and the
    model's dtypes. Batching and buckets never change a score."""
    return {
      "checkpoint": self.checkpoint,
      "context": self.context,
      "stride": self.stride,
      "add_bos": self.settings.add_bos,
      "dtype": f"{self.model_config.dtype}/{self.model_config.param_dtype}",
    }

  @property
  def context(self) -> int:
    return self.settings.context

  @property
  def window_nucleotides(self) -> int:
    """Nucleotides one model window holds: the context, less the <bos>."""
    return self.context - int(self.settings.add_bos)

  @property
  def stride(self) -> int:
    return self.settings.window_stride

  # -- device programs (one per bucket) --------------------------------------------

  def _merged(self, state):
    self.trace_count += 1  # runs once per trace, i.e. per compile
    return nnx.merge(self.graphdef, state)

  def _window_scores(self, state, tokens):
    """tokens (b, L) -> log p, entropy, argmax correct of x_j given x_<j,
    each (b, L) with index 0 undefined."""
    model = self._merged(state)
    with sharding.maybe_activate(self.mesh):
      logits = model(tokens).logits[:, :-1]  # (b, L-1, V) fp32
    log_p = jax.nn.log_softmax(logits, axis=-1)
    targets = tokens[:, 1:]
    target_lp = jnp.take_along_axis(log_p, targets[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)
    correct = jnp.argmax(logits, axis=-1) == targets
    pad = lambda x: jnp.pad(x, [(0, 0), (1, 0)])
    return pad(target_lp), pad(entropy), pad(correct)

  def _window_embeddings(self, state, tokens, weights, layer: int):
    """tokens (b, L), weights (b, L[, k]) -> (b[, k], d) fp32 weighted sums
    of the hidden states of `layer` (-1: final-norm output)."""
    model = self._merged(state)
    with sharding.maybe_activate(self.mesh):
      out = model(tokens, return_logits=False, return_hidden_states=layer != -1)
    hidden = out.hidden if layer == -1 else out.hidden_states[layer]
    return jnp.einsum("bl...,bld->b...d", weights, hidden.astype(jnp.float32))

  # -- batching --------------------------------------------------------------------------

  def bucket(self, length: int) -> int:
    for size in self.buckets:
      if length <= size:
        return size
    raise ValueError(f"window of {length} tokens exceeds the context {self.context}.")

  def _batches(
    self, jobs: Sequence[_Job], seqs: Sequence[_Sequence]
  ) -> Iterator[tuple[list[_Job], dict]]:
    """Groups jobs by bucket into full (batch_size, bucket) arrays."""
    by_bucket: dict[int, list[_Job]] = {}
    for job in jobs:
      by_bucket.setdefault(self.bucket(job.length), []).append(job)
    rows = self.settings.batch_size
    for size in sorted(by_bucket):
      group = by_bucket[size]
      for i in range(0, len(group), rows):
        chunk = group[i : i + rows]
        tokens = np.full((rows, size), tokenizer.PAD, np.int32)
        # Pooling weights (rows, size), or (rows, size, k) for k poolings at once.
        shape = next((j.weights.shape[1:] for j in chunk if j.weights is not None), ())
        weights = np.zeros((rows, size, *shape), np.float32)
        for row, job in enumerate(chunk):
          window = (
            job.tokens
            if job.tokens is not None
            else seqs[job.seq].window(job.window.start, job.window.end)
          )
          tokens[row, : len(window)] = window
          if job.weights is not None:
            weights[row, : len(job.weights)] = job.weights
          elif job.mean_pooled:
            first = job.window.score_from - job.window.start  # earlier ones: an earlier window's
            weights[row, first : len(window)] = tokenizer.is_nucleotide(window[first:])
        yield chunk, {"tokens": tokens, "weights": weights}

  def _put(self, array: np.ndarray):
    if self._batch_sharding is None:
      return jnp.asarray(array)
    return jax.device_put(array, self._batch_sharding)

  def _run(
    self,
    jobs: Sequence[_Job],
    seqs: Sequence[_Sequence],
    call: Callable[[dict], Any],
    sink: Callable[[_Job, tuple], None],
    progress: Progress | None,
  ) -> None:
    """Runs `call` over the batches of `jobs`, one batch in flight while the
    host prepares the next, and hands each job its row of the outputs."""
    total, done = len(jobs), 0
    pending = None

    def drain(pending):
      chunk, outputs = pending
      host = jax.device_get(outputs)
      for row, job in enumerate(chunk):
        sink(job, tuple(x[row] for x in host))
      return len(chunk)

    if progress:
      progress(0, total)
    for chunk, arrays in self._batches(jobs, seqs):
      outputs = call(arrays)  # dispatched asynchronously
      if pending is not None:
        done += drain(pending)
        if progress:
          progress(done, total)
      pending = (chunk, outputs)
    if pending is not None:
      done += drain(pending)
      if progress:
        progress(done, total)

  def _prepare(
    self, sequences: Iterable[SequenceLike], rc_average: bool
  ) -> tuple[list[_Sequence], int]:
    """Model-side sequences: the inputs, then (rc_average) their reverse
    complements in the same order."""
    tokens = [as_tokens(s, str(i)) for i, s in enumerate(sequences)]
    if rc_average:
      tokens += [tokenizer.reverse_complement_nucleotides(t) for t in tokens]
    return [_Sequence(t, self.settings.add_bos) for t in tokens], len(tokens) // (
      2 if rc_average else 1
    )

  # -- per-position scores ----------------------------------------------------------------

  def _score_sequences(
    self,
    seqs: Sequence[_Sequence],
    sink: Callable[[int, int, tuple], None],
    progress: Progress | None,
  ) -> None:
    """Scores every position of every sequence once; sink(seq, first
    position, (log_p, entropy, correct) arrays from that position)."""
    jobs = []
    for i, seq in enumerate(seqs):
      jobs.extend(_Job(i, w) for w in plan_windows(seq.length, self.context, self.stride))

    def call(arrays):
      return self._score_fn(self.state, self._put(arrays["tokens"]))

    def job_sink(job: _Job, rows: tuple):
      w = job.window
      first = max(w.score_from, w.start + 1)  # positions with context
      lo, hi = first - w.start, w.end - w.start
      sink(job.seq, first, tuple(r[lo:hi] for r in rows))

    self._run(jobs, seqs, call, job_sink, progress)

  def position_scores(
    self,
    sequences: Iterable[SequenceLike],
    *,
    rc_average: bool = False,
    progress: Progress | None = None,
  ) -> list[PositionScores]:
    """Per-position log-probabilities and entropies (see the module
    docstring), one `PositionScores` per input, aligned with its bases."""
    seqs, n = self._prepare(sequences, rc_average)
    log_probs = [np.full(s.length, np.nan, np.float32) for s in seqs]
    entropy = [np.full(s.length, np.nan, np.float32) for s in seqs]

    def sink(i, first, rows):
      lp, ent, _ = rows
      targets = seqs[i].window(first, first + len(lp))
      log_probs[i][first : first + len(lp)] = np.where(_scored(targets), lp, np.nan)
      entropy[i][first : first + len(lp)] = ent

    self._score_sequences(seqs, sink, progress)
    off = int(self.settings.add_bos)
    out = [PositionScores(lp[off:], ent[off:]) for lp, ent in zip(log_probs, entropy)]
    if not rc_average:
      return out
    return [
      PositionScores(
        _strand_mean(f.log_probs, r.log_probs[::-1]), _strand_mean(f.entropy, r.entropy[::-1])
      )
      for f, r in zip(out[:n], out[n:])
    ]

  def token_stats(
    self, sequences: Iterable[SequenceLike], *, progress: Progress | None = None
  ) -> TokenStats:
    """Summed NLL, correct argmax predictions and scored positions per
    sequence (forward strand), without keeping per-position arrays, so
    chromosome-length inputs cost O(batch) memory."""
    seqs, _ = self._prepare(sequences, False)
    return self._token_stats_of(seqs, progress)

  def log_likelihood(
    self,
    sequences: Iterable[SequenceLike],
    *,
    rc_average: bool = False,
    progress: Progress | None = None,
  ) -> LogLikelihood:
    """Sequence log-likelihoods: sum and mean of log p over scored positions
    (with rc_average, each the mean of the two strands'; the mean is the
    one strand's where only one has a scored position, as per position)."""
    seqs, n = self._prepare(sequences, rc_average)
    stats = self._token_stats_of(seqs, progress)
    total, count = -stats.nll, stats.count
    with np.errstate(invalid="ignore", divide="ignore"):
      mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    if not rc_average:
      return LogLikelihood(total, mean, count)
    strand_means = np.stack([mean[:n], mean[n:]])
    scored = np.isfinite(strand_means)
    with np.errstate(invalid="ignore", divide="ignore"):
      mean = np.where(scored, strand_means, 0.0).sum(0) / scored.sum(0)
    return LogLikelihood((total[:n] + total[n:]) / 2, mean, (count[:n] + count[n:]) / 2)

  def _token_stats_of(self, seqs, progress) -> TokenStats:
    nll, correct, count = (np.zeros(len(seqs)) for _ in range(3))

    def sink(i, first, rows):
      lp, _, right = rows
      mask = _scored(seqs[i].window(first, first + len(lp)))
      nll[i] -= float(lp[mask].sum(dtype=np.float64))
      correct[i] += int(right[mask].sum())
      count[i] += int(mask.sum())

    self._score_sequences(seqs, sink, progress)
    return TokenStats(nll, correct, count)

  # -- embeddings -------------------------------------------------------------------------

  def embed(
    self,
    sequences: Iterable[SequenceLike],
    *,
    pooling: str = "mean",
    layer: int = -1,
    rc_average: bool = False,
    progress: Progress | None = None,
  ) -> np.ndarray:
    """Sequence embeddings, (n, d_model) float32.

    Args:
      pooling: "mean" over the nucleotides; "last": the last nucleotide
        (from a window of `context` tokens ending there); "echo": mean over
        the second copy of [x, <sep>, x] -- inputs longer than
        (context - 1) // 2 are echoed in consecutive chunks of that size and
        the mean runs over all of them.
      layer: -1 the final-norm output (what the LM head reads), 0 the token
        embeddings, i in 1..n_layers the output of layer i.
      rc_average: mean of the embeddings of both strands.
    """
    if pooling not in POOLINGS:
      raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")
    self._check_layer(layer)
    seqs, n = self._prepare(sequences, rc_average)
    jobs = []
    for i, seq in enumerate(seqs):
      jobs.extend(self._embedding_jobs(i, seq, pooling))
    sums = np.zeros((len(seqs), self.model_config.d_model), np.float64)
    weights = np.zeros(len(seqs))

    def call(arrays):
      return (
        self._embed_fn(
          self.state, self._put(arrays["tokens"]), self._put(arrays["weights"]), layer=layer
        ),
        arrays["weights"].sum(axis=1),  # each row's pooled weight, from the batch as built
      )

    def sink(job, rows):
      sums[job.seq] += rows[0]
      weights[job.seq] += float(rows[1])

    self._run(jobs, seqs, call, sink, progress)
    empty = np.flatnonzero(weights == 0)
    if empty.size:
      raise ValueError(f"sequence {int(empty[0]) % n} has no nucleotide to embed.")
    out = (sums / weights[:, None]).astype(np.float32)
    return (out[:n] + out[n:]) / 2 if rc_average else out

  def embed_echo_views(
    self,
    sequences: Iterable[SequenceLike],
    *,
    layer: int = -1,
    progress: Progress | None = None,
  ) -> dict[str, np.ndarray]:
    """Four embeddings from one echo forward per strand, each (n, d_model)
    float32: "echo" (as embed(pooling="echo")), "echo_rc" (the mean of
    both strands' echo embeddings, as rc_average=True), "plain_mean" and
    "plain_mean_rc". The first copy of [x, <sep>, x] is exactly the plain
    input to a causal model, so its mean is embed(pooling="mean") at no
    extra cost. Every sequence must fit one echo row of the context:
    (context - 1 - <bos>) // 2 nucleotides.
    """
    self._check_layer(layer)
    seqs, n = self._prepare(sequences, rc_average=True)
    jobs = []
    for i, seq in enumerate(seqs):
      (job,) = self._embedding_jobs(i, seq, "echo", single_row=True)
      first = np.zeros(len(job.tokens), np.float32)
      body = slice(seq.offset, seq.offset + len(seq.tokens))
      first[body] = tokenizer.is_nucleotide(job.tokens[body])
      jobs.append(job._replace(weights=np.stack([job.weights, first], axis=1)))
    sums = np.zeros((len(seqs), 2, self.model_config.d_model), np.float64)
    counts = np.zeros((len(seqs), 2))

    def call(arrays):
      tokens, weights = self._put(arrays["tokens"]), self._put(arrays["weights"])
      return (self._embed_fn(self.state, tokens, weights, layer=layer),)

    def sink(job, rows):
      sums[job.seq] += rows[0]
      counts[job.seq] += job.weights.sum(axis=0)

    self._run(jobs, seqs, call, sink, progress)
    empty = np.flatnonzero((counts == 0).any(axis=1))
    if empty.size:
      raise ValueError(f"sequence {int(empty[0]) % n} has no nucleotide to embed.")
    out = (sums / counts[..., None]).astype(np.float32)
    both = (out[:n] + out[n:]) / 2
    return {
      "echo": out[:n, 0],
      "echo_rc": both[:, 0],
      "plain_mean": out[:n, 1],
      "plain_mean_rc": both[:, 1],
    }

  def _check_layer(self, layer: int) -> None:
    n_layers = self.model_config.n_layers
    if not -1 <= layer <= n_layers:
      raise ValueError(f"layer must be -1 (final norm) or in [0, {n_layers}], got {layer}.")

  def _embedding_jobs(
    self, i: int, seq: _Sequence, pooling: str, single_row: bool = False
  ) -> list[_Job]:
    if seq.length - seq.offset == 0:
      raise ValueError(f"sequence {i} is empty.")
    if pooling == "last":
      start = max(0, seq.length - self.context)
      tokens = seq.window(start, seq.length)
      weights = np.zeros(len(tokens), np.float32)
      weights[-1] = 1.0
      return [_Job(i, Window(start, seq.length, seq.length - 1), tokens, weights)]
    if pooling == "mean":
      return [
        _Job(i, w, mean_pooled=True) for w in plan_windows(seq.length, self.context, self.stride)
      ]
    # Echo: [<bos>] chunk <sep> chunk, fitting in the context.
    chunk = (self.context - 1 - seq.offset) // 2
    if chunk < 1:
      raise ValueError(f"context {self.context} is too short for echo embeddings.")
    if single_row and len(seq.tokens) > chunk:
      raise ValueError(
        f"sequence {i} has {len(seq.tokens)} nt; one echo row of context {self.context} "
        f"holds {chunk}: raise score.context to at least {2 * len(seq.tokens) + 1 + seq.offset}."
      )
    jobs = []
    body = seq.tokens
    for start in range(0, len(body), chunk):
      piece = np.asarray(body[start : start + chunk], np.int32)
      echo, _, weights = echo_lib.build_row(piece, 2 * len(piece) + 1, echo=True)
      if seq.offset:
        echo = np.concatenate([[tokenizer.BOS], echo]).astype(np.int32)
        weights = np.concatenate([[0.0], weights]).astype(np.float32)
      jobs.append(_Job(i, Window(start, start + len(piece), start), echo, weights))
    return jobs


def _scored(targets: np.ndarray) -> np.ndarray:
  """Targets that count: A, C, G, T (N is masked out of training)."""
  return (targets >= tokenizer.A) & (targets <= tokenizer.T)


def _strand_mean(forward: np.ndarray, reverse: np.ndarray) -> np.ndarray:
  """Mean of two aligned arrays, ignoring NaN (one strand may lack a value)."""
  both = np.stack([forward, reverse])
  valid = ~np.isnan(both)
  total = np.where(valid, both, 0.0).sum(0)
  count = valid.sum(0)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(np.float32)
