"""Sequence design: prompt tokens for labels, and generative fine-tuning.

regLM-style conditioning: every training example is

    <bos> <label token per condition> sequence <eos>

and the model learns next-token prediction on the sequence and its <eos>
only (the label tokens are given, never predicted). Generation then starts
from <bos> + the label tokens of the wanted condition(s) (+ an optional
DNA prefix), see `hybridna_jax.generate`.

Labels come from a CSV with a `sequence` column and one column per
condition (`config.generate.label_columns`):
  * categorical conditions (label_kind="categorical"): each distinct value
    ("HepG2", "K562", ...) gets its own task token;
  * activity bins (label_kind="bins"): numeric activities are cut into
    `num_bins` quantile bins of the training set, and each bin gets a token
    -- regLM's one token per condition and activity class, e.g. the prompt
    for "high in HepG2, low in K562" is <bos> <HepG2 bin 4> <K562 bin 0>.

The label -> token mapping (`PromptVocab`) is derived from the training CSV
once, at the start of a run, and stored in `config.generate.prompt_vocab`,
so it is saved in the run's config.json and every later sampling run uses
the same tokens. Tokens are taken in order from the reserved block
(`tokenizer.task_token(generate.first_task_token)` onwards).

`GenerativeFinetuning` is a `train.loop.Task`: the same jitted train step,
checkpoints, preemption handling and metrics as pretraining, fed by a
checkpointable Grain iterator over the labelled examples, optionally
starting from a pretrained LM (`generate.pretrained`).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import sys
from typing import Iterable, Mapping, Sequence

import grain
import jax
import numpy as np
from absl import logging

from hybridna_jax import restore
from hybridna_jax import tokenizer as tok
from hybridna_jax.config import ModelConfig
from hybridna_jax.data import pipeline
from hybridna_jax.data.tasks import TaskFormatError
from hybridna_jax.model import HybriDNA
from hybridna_jax.train import flops as flops_lib
from hybridna_jax.train import loop
from hybridna_jax.train import step as step_lib

CATEGORICAL, BINS = "categorical", "bins"
# Model fields that must match between a pretrained checkpoint and the
# fine-tuned model (numerics and kernels may differ).
_ARCHITECTURE_FIELDS = ("vocab_size", "d_model", "n_layers", "mlp_dim", "num_heads",
                        "num_kv_heads", "head_dim", "d_state", "d_conv", "expand",
                        "ssm_head_dim", "ngroups", "tie_embeddings")


# -- the label vocabulary ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Condition:
  """One condition (CSV column) and its block of prompt tokens.

  values: the label of each token, in token order (bins: "0", "1", ...).
  edges: bins only, the num_bins - 1 ascending cut points; a value v falls
    in bin searchsorted(edges, v, side="right").
  first_token: token id of values[0].
  """
  column: str
  kind: str
  values: tuple[str, ...]
  first_token: int
  edges: tuple[float, ...] = ()

  def token(self, value, *, raw: bool = False) -> int:
    """Token id of a label: a class (categorical) or a bin name "0", "1",
    ... (bins); with `raw`, a bins condition reads the value as a numeric
    activity to bin (CSV rows)."""
    value = str(value).strip()
    if not (raw and self.kind == BINS) and value in self.values:
      return self.first_token + self.values.index(value)
    if raw and self.kind == BINS:
      try:
        number = float(value)
      except ValueError:
        number = None
      if number is not None and np.isfinite(number):
        return self.first_token + int(np.searchsorted(self.edges, number, side="right"))
    what = "activity" if raw and self.kind == BINS else "label"
    raise KeyError(f"condition {self.column!r} has no {what} {value!r}; known labels: "
                   f"{list(self.values)}" + (" (bins of numeric activities)"
                                             if self.kind == BINS else ""))

  def label(self, token: int) -> str:
    return self.values[token - self.first_token]

  def to_dict(self) -> dict:
    return {"column": self.column, "kind": self.kind, "values": list(self.values),
            "first_token": self.first_token, "edges": list(self.edges)}

  @classmethod
  def from_dict(cls, d: Mapping) -> "Condition":
    return cls(str(d["column"]), str(d["kind"]), tuple(str(v) for v in d["values"]),
               int(d["first_token"]), tuple(float(e) for e in d.get("edges", ())))


@dataclasses.dataclass(frozen=True)
class PromptVocab:
  """Label -> prompt tokens for every condition (see the module docstring)."""
  conditions: tuple[Condition, ...]

  @property
  def columns(self) -> tuple[str, ...]:
    return tuple(c.column for c in self.conditions)

  def label_tokens(self, labels: Mapping[str, object] | Sequence[object], *,
                   raw: bool = False) -> list[int]:
    """One token per condition, from {column: label} or labels in column
    order; `raw`: labels as read from a CSV (numeric activities for bins)."""
    if isinstance(labels, Mapping):
      missing = [c for c in self.columns if c not in labels]
      extra = [k for k in labels if k not in self.columns]
      if missing or extra:
        raise KeyError(f"labels {dict(labels)} must name exactly the conditions "
                       f"{list(self.columns)}" + (f"; missing {missing}" if missing else "")
                       + (f"; unknown {extra}" if extra else ""))
      labels = [labels[c] for c in self.columns]
    if len(labels) != len(self.conditions):
      raise KeyError(f"{len(labels)} labels given for {len(self.conditions)} conditions "
                     f"{list(self.columns)}.")
    return [c.token(v, raw=raw) for c, v in zip(self.conditions, labels)]

  def prompt(self, labels=None, prefix: str = "") -> np.ndarray:
    """int32 prompt: <bos>, the label tokens (none: unconditional), the prefix."""
    label_part = [] if labels is None else self.label_tokens(labels)
    return np.concatenate([np.array([tok.BOS] + label_part, np.int32),
                           tok.encode(prefix) if prefix else np.zeros((0,), np.int32)])

  def parse(self, spec: str) -> dict[str, str] | None:
    """A prompt spec from the command line -> {column: label} (None for
    "unconditional"). Forms: "HepG2" (one condition), "4,0,1" (labels in
    column order), "HepG2=4,K562=0" (by column)."""
    spec = spec.strip()
    if spec.lower() in ("", "unconditional", "none"):
      return None
    parts = [p.strip() for p in spec.split(",")]
    if all("=" in p for p in parts):
      pairs = dict(p.split("=", 1) for p in parts)
      labels = {k.strip(): v.strip() for k, v in pairs.items()}
    elif any("=" in p for p in parts):
      raise ValueError(f"prompt {spec!r}: give either every condition as column=label or "
                       "labels in column order, not a mix.")
    else:
      labels = dict(zip(self.columns, parts)) if len(parts) == len(self.columns) else None
      if labels is None:
        raise ValueError(f"prompt {spec!r} gives {len(parts)} label(s) for the "
                         f"{len(self.columns)} conditions {list(self.columns)}; give one "
                         "per condition, in that order, or name them (column=label).")
    self.label_tokens(labels)   # validates
    return labels

  def describe(self, labels: Mapping[str, object] | None, *, raw: bool = False) -> str:
    """"column=label,..." naming the bins (for headers and tables)."""
    if labels is None:
      return "unconditional"
    tokens = self.label_tokens(labels, raw=raw)
    return ",".join(f"{c.column}={c.label(t)}" for c, t in zip(self.conditions, tokens))

  def all_labels(self) -> list[dict[str, str]]:
    """Every combination of labels, column order (for a full design sweep)."""
    combos: list[dict[str, str]] = [{}]
    for c in self.conditions:
      combos = [{**d, c.column: v} for d in combos for v in c.values]
    return combos

  def to_config(self) -> tuple:
    return tuple(c.to_dict() for c in self.conditions)

  @classmethod
  def from_config(cls, entries) -> "PromptVocab":
    return cls(tuple(Condition.from_dict(e) for e in entries))

  @classmethod
  def build(cls, rows: "DesignData", *, kind: str, num_bins: int,
            first_task_token: int) -> "PromptVocab":
    """Derives the vocabulary from the training rows."""
    if kind not in (CATEGORICAL, BINS):
      raise ValueError(f"config.generate.label_kind must be {CATEGORICAL!r} or {BINS!r}, "
                       f"got {kind!r}.")
    conditions, next_index = [], first_task_token
    for column in rows.columns:
      raw = rows.labels[column]
      if kind == CATEGORICAL:
        values = tuple(sorted(set(raw), key=_natural_key))
        edges: tuple[float, ...] = ()
      else:
        if num_bins < 2:
          raise ValueError(f"config.generate.num_bins must be >= 2, got {num_bins}.")
        numbers = _numeric(rows, column)
        edges = tuple(float(e) for e in np.quantile(numbers, np.arange(1, num_bins) / num_bins))
        if len(set(edges)) < len(edges):
          raise ValueError(f"{rows.path}: column {column!r} has too few distinct values for "
                           f"{num_bins} quantile bins; lower config.generate.num_bins.")
        values = tuple(str(i) for i in range(num_bins))
      if next_index + len(values) > tok.NUM_TASK_TOKENS:
        raise ValueError(f"the conditions need {next_index + len(values) - first_task_token} "
                         f"task tokens from index {first_task_token}, but only "
                         f"{tok.NUM_TASK_TOKENS} exist; use fewer labels or bins.")
      conditions.append(Condition(column, kind, values, tok.task_token(next_index), edges))
      next_index += len(values)
    return cls(tuple(conditions))


def _natural_key(value: str):
  """Sorts numeric labels numerically ("2" < "10") and others as text."""
  try:
    return (0, float(value), value)
  except ValueError:
    return (1, 0.0, value)


def _numeric(rows: "DesignData", column: str) -> np.ndarray:
  out = np.empty(len(rows), np.float64)
  for i, v in enumerate(rows.labels[column]):
    try:
      out[i] = float(v)
    except ValueError:
      raise TaskFormatError(rows.path, rows.lines[i], f"column {column!r}: {v!r} is not a "
                            "number; label_kind='bins' needs numeric activities (use "
                            "label_kind='categorical' for class names).") from None
    if not np.isfinite(out[i]):
      raise TaskFormatError(rows.path, rows.lines[i], f"column {column!r}: {v!r} is not "
                            "a finite number.")
  return out


# -- data ---------------------------------------------------------------------------


@dataclasses.dataclass
class DesignData:
  """Rows of a design CSV: upper-case sequences, their label strings per
  column, and the line of each row (for error messages)."""
  path: str
  columns: tuple[str, ...]
  sequences: list[str]
  labels: dict[str, list[str]]
  lines: list[int]

  def __len__(self) -> int:
    return len(self.sequences)

  def row_labels(self, i: int) -> dict[str, str]:
    return {c: self.labels[c][i] for c in self.columns}

  def by_prompt(self, vocab: PromptVocab) -> dict[tuple[int, ...], list[str]]:
    """Sequences grouped by their label tokens."""
    groups: dict[tuple[int, ...], list[str]] = {}
    for i, seq in enumerate(self.sequences):
      groups.setdefault(tuple(vocab.label_tokens(self.row_labels(i), raw=True)),
                        []).append(seq)
    return groups


def load_design_csv(path: str | os.PathLike, label_columns: Sequence[str]) -> DesignData:
  """Reads a CSV with a `sequence` column and the label columns.

  Raises:
    FileNotFoundError: no such file.
    TaskFormatError: missing columns, malformed rows, empty sequences or
      labels, characters outside the DNA alphabet (naming file and line).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file; config.generate.train_csv / val_csv "
                            "name CSV files with a header such as 'sequence,label'.")
  columns = tuple(label_columns)
  if not columns:
    raise ValueError("config.generate.label_columns is empty; name the CSV column(s) that "
                     "hold the labels, e.g. ('label',).")
  sequences, lines = [], []
  labels: dict[str, list[str]] = {c: [] for c in columns}
  with open(path, newline="", encoding="utf-8-sig") as f:
    reader = csv.reader(f)
    header = next(reader, None)
    if header is None:
      raise TaskFormatError(path, None, "the file is empty; expected a header such as "
                            f"'sequence,{','.join(columns)}'.")
    names = [h.strip() for h in header]
    lowered = [h.lower() for h in names]
    if "sequence" not in lowered:
      raise TaskFormatError(path, 1, f"header {names} lacks a 'sequence' column.")
    missing = [c for c in columns if c not in names]
    if missing:
      raise TaskFormatError(path, 1, f"header {names} lacks the label column(s) {missing} "
                            "named by config.generate.label_columns.")
    seq_col = lowered.index("sequence")
    label_cols = [names.index(c) for c in columns]
    for row in reader:
      line = reader.line_num
      if not row or all(not c.strip() for c in row):
        continue
      if len(row) != len(names):
        raise TaskFormatError(path, line, f"{len(row)} fields, the header has {len(names)}; "
                              "check for stray commas or quotes.")
      seq = row[seq_col].strip().upper()
      if not seq:
        raise TaskFormatError(path, line, "empty sequence.")
      try:
        tok.encode_bytes(seq.encode("ascii", "replace"), context="sequence")
      except tok.InvalidSequenceError as e:
        raise TaskFormatError(path, line, str(e)) from e
      for c, i in zip(columns, label_cols):
        value = row[i].strip()
        if not value:
          raise TaskFormatError(path, line, f"empty label in column {c!r}.")
        labels[c].append(value)
      sequences.append(seq)
      lines.append(line)
  if not sequences:
    raise TaskFormatError(path, None, "no examples after the header.")
  return DesignData(path, columns, sequences, labels, lines)


@dataclasses.dataclass
class Examples:
  """Tokenised examples: label tokens and sequence tokens of each row."""
  label_tokens: np.ndarray          # (n, conditions) int32
  sequences: list[np.ndarray]       # int32 (len,) each

  def __len__(self) -> int:
    return len(self.sequences)


def tokenize(rows: DesignData, vocab: PromptVocab) -> Examples:
  """Rows -> Examples; a label unknown to the vocabulary names file and line."""
  label_tokens = np.zeros((len(rows), len(vocab.conditions)), np.int32)
  for i in range(len(rows)):
    try:
      label_tokens[i] = vocab.label_tokens(rows.row_labels(i), raw=True)
    except KeyError as e:
      raise TaskFormatError(rows.path, rows.lines[i], str(e.args[0])) from None
  return Examples(label_tokens, [tok.encode(s) for s in rows.sequences])


def example_row(labels: np.ndarray, sequence: np.ndarray, width: int, *,
                drop_labels: bool = False, reverse: bool = False) -> np.ndarray:
  """<bos> labels sequence <eos>, right-padded with <pad> to `width` tokens."""
  if reverse:
    sequence = tok.reverse_complement_tokens(sequence)
  parts = [np.array([tok.BOS], np.int32), np.zeros((0,), np.int32) if drop_labels else labels,
           sequence, np.array([tok.EOS], np.int32)]
  row = np.concatenate(parts).astype(np.int32)
  out = np.full((width,), tok.PAD, np.int32)
  out[:row.size] = row[:width]
  return out


def lm_batch(rows: np.ndarray, *, mask_n_in_loss: bool) -> dict[str, np.ndarray]:
  """(B, L + 1) example rows -> the LM batch of `data.pipeline` (inputs,
  targets, segment_ids, loss_mask), with the loss on sequence and <eos>
  targets only."""
  inputs, targets = rows[:, :-1], rows[:, 1:]
  real = inputs != tok.PAD
  last = tok.T if mask_n_in_loss else tok.N
  scored = ((targets >= tok.A) & (targets <= last)) | (targets == tok.EOS)
  return {"inputs": inputs.astype(np.int32), "targets": targets.astype(np.int32),
          "segment_ids": real.astype(np.int32),
          "loss_mask": (real & scored).astype(np.float32)}


class _ExampleSampler(grain.transforms.Map):
  """Stream position g -> (example, reverse-complement, drop-labels): each
  epoch visits every example once in a fresh keyed permutation."""

  def __init__(self, n: int, seed: int, rc_prob: float, label_dropout: float):
    self.n = n
    self.key = pipeline._mix64(pipeline.derive_seed(seed, "design-shuffle"))  # pylint: disable=protected-access
    self.rc_key = pipeline._mix64(pipeline.derive_seed(seed, "design-rc"))  # pylint: disable=protected-access
    self.drop_key = pipeline._mix64(pipeline.derive_seed(seed, "design-drop"))  # pylint: disable=protected-access
    self.rc_threshold = int(rc_prob * 2.0**64)
    self.drop_threshold = int(label_dropout * 2.0**64)

  def map(self, g: int) -> tuple[int, bool, bool]:
    mix = pipeline._mix64  # pylint: disable=protected-access
    epoch, j = divmod(int(g), self.n)
    index = pipeline.permute(j, self.n, mix(self.key ^ epoch))
    return (index, mix(self.rc_key ^ int(g)) < self.rc_threshold,
            mix(self.drop_key ^ int(g)) < self.drop_threshold)


class _RowBuilder(grain.transforms.Map):
  def __init__(self, examples: Examples, width: int):
    self.examples, self.width = examples, width

  def map(self, item: tuple[int, bool, bool]) -> np.ndarray:
    i, reverse, drop = item
    return example_row(self.examples.label_tokens[i], self.examples.sequences[i],
                       self.width, drop_labels=drop, reverse=reverse)


class _MakeBatch(grain.transforms.Map):
  def __init__(self, mask_n_in_loss: bool):
    self.mask_n_in_loss = mask_n_in_loss

  def map(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    return lm_batch(rows, mask_n_in_loss=self.mask_n_in_loss)


def train_batches(examples: Examples, *, seq_len: int, batch_size: int, seed: int,
                  rc_prob: float = 0.0, label_dropout: float = 0.0,
                  mask_n_in_loss: bool = False, shard_index: int = 0,
                  shard_count: int = 1) -> grain.DatasetIterator:
  """An infinite, checkpointable iterator of shuffled LM batches (B rows of
  seq_len inputs). Host h of H takes stream positions h, h + H, ..., so the
  global stream does not depend on the host count."""
  if not len(examples):
    raise ValueError("no training examples.")
  ds = grain.MapDataset.range(0, sys.maxsize)[shard_index::shard_count]
  ds = ds.map(_ExampleSampler(len(examples), seed, rc_prob, label_dropout))
  ds = ds.map(_RowBuilder(examples, seq_len + 1))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=2 * batch_size))
  it = it.batch(batch_size, drop_remainder=True, batch_fn=np.stack)
  return iter(it.map(_MakeBatch(mask_n_in_loss)))


def eval_batches(examples: Examples, *, seq_len: int, batch_size: int,
                 shard_index: int = 0, shard_count: int = 1, label_shift: int = 0,
                 vocab: PromptVocab | None = None, mask_n_in_loss: bool = False
                 ) -> list[dict[str, np.ndarray]]:
  """Every example once (host h takes examples h, h + H, ...), in full
  batches padded with empty rows; every host gets the same number.

  label_shift > 0 replaces each label by the one `label_shift` places on
  (cyclically) in its condition: the "wrong label" control of `evaluate`.
  """
  n = len(examples)
  per_host = -(-n // shard_count)
  num_rows = -(-per_host // batch_size) * batch_size
  rows = np.full((num_rows, seq_len + 1), tok.PAD, np.int32)
  for r, i in enumerate(range(shard_index, n, shard_count)):
    labels = examples.label_tokens[i]
    if label_shift:
      labels = np.array([c.first_token + (t - c.first_token + label_shift) % len(c.values)
                         for c, t in zip(vocab.conditions, labels)], np.int32)
    rows[r] = example_row(labels, examples.sequences[i], seq_len + 1)
  return [lm_batch(rows[s:s + batch_size], mask_n_in_loss=mask_n_in_loss)
          for s in range(0, num_rows, batch_size)]


# -- the fine-tuning task --------------------------------------------------------------


def resolve_vocab(config, train_rows: DesignData | None = None) -> PromptVocab:
  """The run's PromptVocab: from config.generate.prompt_vocab when set,
  otherwise derived from the training CSV and written into the config (so
  that config.json saves it)."""
  g = config.generate
  if g.prompt_vocab:
    vocab = PromptVocab.from_config(g.prompt_vocab)
    if tuple(g.label_columns) != vocab.columns:
      raise ValueError(f"config.generate.prompt_vocab covers columns {list(vocab.columns)} "
                       f"but label_columns is {list(g.label_columns)}.")
    return vocab
  if train_rows is None:
    train_rows = load_design_csv(g.train_csv, g.label_columns)
  vocab = PromptVocab.build(train_rows, kind=str(g.label_kind), num_bins=int(g.num_bins),
                            first_task_token=int(g.first_task_token))
  with config.unlocked():
    config.generate.prompt_vocab = vocab.to_config()
  return vocab


class GenerativeFinetuning(loop.Task):
  """Prompt-token generative fine-tuning (module docstring).

  Validation (when config.generate.val_csv is set): bits per nucleotide of
  the sequences (and <eos>) given their true labels, and `label_gain_bits`
  -- how many bits per nucleotide worse the same sequences score under
  another label -- a direct measure of how much the model uses the prompt.
  """
  selection = ("bits_per_nt", "min")

  def __init__(self, config):
    super().__init__(config)
    g = config.generate
    if not g.train_csv:
      raise ValueError("config.generate.train_csv is empty; give a CSV of sequence + label "
                       "columns (see configs/design_demo.py).")
    self.model_cfg = ModelConfig.from_config(config.model)
    self.train_rows = load_design_csv(g.train_csv, g.label_columns)
    self.vocab = resolve_vocab(config, self.train_rows)
    self.train_examples = tokenize(self.train_rows, self.vocab)
    self.val_examples = None
    if g.val_csv:
      self.val_examples = tokenize(load_design_csv(g.val_csv, g.label_columns), self.vocab)
    elif int(config.train.eval_every):
      raise ValueError("config.train.eval_every > 0 but config.generate.val_csv is empty; "
                       "give a validation CSV or set config.train.eval_every=0.")
    longest = max(s.size for s in self.train_examples.sequences)
    needed = longest + len(self.vocab.conditions) + 2
    for stage in self.stages():
      if stage.seq_len + 1 < needed:
        raise ValueError(f"config.train.stages[{stage.index}] seq_len {stage.seq_len} is too "
                         f"short: the longest training example needs {needed - 1} "
                         f"(<bos> + {len(self.vocab.conditions)} label token(s) + {longest} nt "
                         "+ <eos>, minus one for the shift).")
    self.mask_n = bool(g.mask_n_in_loss)
    # Checked now, before anything compiles: the pretrained run must have
    # this architecture.
    self.pretrained = self._check_pretrained(str(g.pretrained)) if g.pretrained else None

  def _check_pretrained(self, path: str) -> restore.CheckpointRef:
    ref = restore.find_checkpoint(path, str(self.config.generate.pretrained_which))
    pretrained_cfg = ModelConfig.from_config(restore.run_config(ref.run_dir).model)
    diff = {f: (getattr(pretrained_cfg, f), getattr(self.model_cfg, f))
            for f in _ARCHITECTURE_FIELDS
            if getattr(pretrained_cfg, f) != getattr(self.model_cfg, f)}
    if pretrained_cfg.layer_types != self.model_cfg.layer_types:
      diff["layer_types"] = (pretrained_cfg.layer_types, self.model_cfg.layer_types)
    if diff:
      raise ValueError(f"config.generate.pretrained={path}: its model differs from "
                       f"config.model in {diff} (pretrained, this config); use the "
                       "pretraining run's model settings.")
    return ref

  def init_model(self, rngs):
    return HybriDNA(self.model_cfg, rngs=rngs)

  def loss(self, model, batch):
    return step_lib.lm_loss(model, batch)

  def train_iterator(self, stage, batch_size, seed):
    g = self.config.generate
    return train_batches(self.train_examples, seq_len=stage.seq_len, batch_size=batch_size,
                         seed=seed, rc_prob=float(g.reverse_complement_prob),
                         label_dropout=float(g.label_dropout), mask_n_in_loss=self.mask_n,
                         shard_index=jax.process_index(), shard_count=jax.process_count())

  def evaluate(self, fns, params, stage):
    tc = self.config.train
    seq_len = int(tc.eval_seq_len) or stage.seq_len
    per_host = max(1, int(tc.eval_batch_size) // jax.process_count())

    def run(shift):
      batches = eval_batches(self.val_examples, seq_len=seq_len, batch_size=per_host,
                             shard_index=jax.process_index(), shard_count=jax.process_count(),
                             label_shift=shift, vocab=self.vocab, mask_n_in_loss=self.mask_n)
      return loop.lm_metrics(loop.sum_eval_steps(fns, params, batches, int(tc.eval_batches)))

    metrics = run(0)
    widest = max(len(c.values) for c in self.vocab.conditions)
    if widest > 1:
      wrong = run(max(1, widest // 2))
      metrics["bits_per_nt_wrong_label"] = wrong["bits_per_nt"]
      metrics["label_gain_bits"] = wrong["bits_per_nt"] - metrics["bits_per_nt"]
    return metrics

  def start(self, fns, state):
    """Loads the pretrained LM's parameters (fresh runs only; a resumed run
    restores its own checkpoint instead)."""
    if self.pretrained is None:
      return state
    ref = self.pretrained
    params = restore.restore_params(ref, self.model_cfg, fns.mesh)
    logging.info("loaded pretrained parameters from %s step %d", ref.manager_dir, ref.step)
    return state._replace(params=params)

  def finish(self, fns, state, workdir):
    return {"prompt_vocab": [c.to_dict() for c in self.vocab.conditions]}

  def flops_per_token(self, seq_len: int) -> float:
    return flops_lib.train_flops_per_token(self.model_cfg, seq_len)

  def describe(self) -> str:
    conditions = ", ".join(f"{c.column} ({c.kind}: {len(c.values)} tokens from "
                           f"{tok.token_name(c.first_token)})" for c in self.vocab.conditions)
    return (f"generative fine-tuning on {len(self.train_examples):,} sequences of "
            f"{self.train_rows.path}; conditions {conditions}")


def finetune(config, workdir: str) -> dict:
  """Runs (or resumes) generative fine-tuning in `workdir`; returns the
  training summary."""
  return loop.train(config, workdir, task=GenerativeFinetuning(config))


def sequences_by_label(rows: DesignData, vocab: PromptVocab
                       ) -> dict[str, list[str]]:
  """Training sequences keyed by `vocab.describe(labels)`."""
  out: dict[str, list[str]] = {}
  for i, seq in enumerate(rows.sequences):
    out.setdefault(vocab.describe(rows.row_labels(i), raw=True), []).append(seq)
  return out


def iter_label_sets(vocab: PromptVocab, specs: Iterable[str]) -> list[dict[str, str] | None]:
  """Prompt specs from the command line -> label dicts (None: unconditional);
  no specs means every label combination."""
  specs = list(specs)
  if not specs:
    return vocab.all_labels()
  return [vocab.parse(s) for s in specs]
