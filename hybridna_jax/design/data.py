"""Design data: labelled sequences from a CSV, tokenized examples, and the
Grain batches of generative fine-tuning.

Every training example is

    <bos> <label token per condition> sequence <eos>

Labels come from a CSV with a `sequence` column and one column per
condition (`config.generate.label_columns`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import grain
import numpy as np

from hybridna_jax import tokenizer as tok
from hybridna_jax.data import pipeline, textfiles
from hybridna_jax.data import sampling as data_sampling
from hybridna_jax.data.tasks import TaskFormatError, check_sequence
from hybridna_jax.design.prompts import PromptVocab


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


def load_design_csv(path: str | os.PathLike, label_columns: Sequence[str] | None) -> DesignData:
  """Reads a CSV with a `sequence` column and the label columns (None: the
  sequences alone, as the reference set of a model without prompt tokens).

  Raises:
    FileNotFoundError: no such file.
    TaskFormatError: missing columns, malformed rows, empty sequences or
      labels, characters outside the DNA alphabet (naming file and line).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"{path}: no such file; config.generate.train_csv / val_csv "
      "name CSV files with a header such as 'sequence,label'."
    )
  columns = tuple(label_columns or ())
  if label_columns is not None and not columns:
    raise ValueError(
      "config.generate.label_columns is empty; name the CSV column(s) that "
      "hold the labels, e.g. ('label',)."
    )
  rows = textfiles.csv_rows(
    path, error=TaskFormatError, expected=f"a header such as 'sequence,{','.join(columns)}'"
  )
  header_line, names = next(rows)
  lowered = [h.lower() for h in names]
  if "sequence" not in lowered:
    raise TaskFormatError(path, header_line, f"header {names} lacks a 'sequence' column.")
  missing = [c for c in columns if c not in names]
  if missing:
    raise TaskFormatError(
      path,
      header_line,
      f"header {names} lacks the label column(s) {missing} named by config.generate.label_columns.",
    )
  seq_col = lowered.index("sequence")
  label_cols = [names.index(c) for c in columns]
  sequences, lines = [], []
  labels: dict[str, list[str]] = {c: [] for c in columns}
  for line, row in rows:
    seq = check_sequence(path, line, row[seq_col])
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

  label_tokens: np.ndarray  # (n, conditions) int32
  sequences: list[np.ndarray]  # int32 (len,) each

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


def example_row(
  labels: np.ndarray,
  sequence: np.ndarray,
  width: int,
  *,
  drop_labels: bool = False,
  reverse: bool = False,
) -> np.ndarray:
  """<bos> labels sequence <eos>, right-padded with <pad> to `width` tokens."""
  if reverse:
    sequence = tok.reverse_complement_tokens(sequence)
  parts = [
    np.array([tok.BOS], np.int32),
    np.zeros((0,), np.int32) if drop_labels else labels,
    sequence,
    np.array([tok.EOS], np.int32),
  ]
  row = np.concatenate(parts).astype(np.int32)
  out = np.full((width,), tok.PAD, np.int32)
  out[: row.size] = row[:width]
  return out


def lm_batch(rows: np.ndarray, *, mask_n_in_loss: bool) -> dict[str, np.ndarray]:
  """(B, L + 1) example rows -> the LM batch of `data.pipeline` (inputs,
  targets, segment_ids, loss_mask), with the loss on sequence and <eos>
  targets only."""
  inputs, targets = rows[:, :-1], rows[:, 1:]
  real = inputs != tok.PAD
  last = tok.T if mask_n_in_loss else tok.N
  scored = ((targets >= tok.A) & (targets <= last)) | (targets == tok.EOS)
  return {
    "inputs": inputs.astype(np.int32),
    "targets": targets.astype(np.int32),
    "segment_ids": real.astype(np.int32),
    "loss_mask": (real & scored).astype(np.float32),
  }


class _ExampleSampler(grain.transforms.Map):
  """Stream position g -> (example, reverse-complement, drop-labels): each
  epoch visits every example once in a fresh keyed permutation."""

  def __init__(self, n: int, seed: int, rc_prob: float, label_dropout: float):
    self.n = n
    self.key = data_sampling._mix64(data_sampling.derive_seed(seed, "design-shuffle"))  # pylint: disable=protected-access
    self.rc_key = data_sampling._mix64(data_sampling.derive_seed(seed, "design-rc"))  # pylint: disable=protected-access
    self.drop_key = data_sampling._mix64(data_sampling.derive_seed(seed, "design-drop"))  # pylint: disable=protected-access
    self.rc_threshold = int(rc_prob * 2.0**64)
    self.drop_threshold = int(label_dropout * 2.0**64)

  def map(self, g: int) -> tuple[int, bool, bool]:
    mix = data_sampling._mix64  # pylint: disable=protected-access
    epoch, j = divmod(int(g), self.n)
    index = data_sampling.permute(j, self.n, mix(self.key ^ epoch))
    return (
      index,
      mix(self.rc_key ^ int(g)) < self.rc_threshold,
      mix(self.drop_key ^ int(g)) < self.drop_threshold,
    )


class _RowBuilder(grain.transforms.Map):
  def __init__(self, examples: Examples, width: int):
    self.examples, self.width = examples, width

  def map(self, item: tuple[int, bool, bool]) -> np.ndarray:
    i, reverse, drop = item
    return example_row(
      self.examples.label_tokens[i],
      self.examples.sequences[i],
      self.width,
      drop_labels=drop,
      reverse=reverse,
    )


def _batch_columns(batch: dict[str, np.ndarray], columns) -> dict[str, np.ndarray]:
  """Positions [start, stop) of every (R, L) array (all without columns)."""
  return batch if columns is None else {k: v[:, columns[0] : columns[1]] for k, v in batch.items()}


class _MakeBatch(grain.transforms.Map):
  def __init__(self, mask_n_in_loss: bool, columns: tuple[int, int] | None):
    self.mask_n_in_loss, self.columns = mask_n_in_loss, columns

  def map(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    return _batch_columns(lm_batch(rows, mask_n_in_loss=self.mask_n_in_loss), self.columns)


def train_batches(
  examples: Examples,
  *,
  seq_len: int,
  batch_size: int,
  seed: int,
  rc_prob: float = 0.0,
  label_dropout: float = 0.0,
  mask_n_in_loss: bool = False,
  rows: Sequence[int] | None = None,
  columns: tuple[int, int] | None = None,
  start_batch: int = 0,
) -> grain.DatasetIterator:
  """An infinite iterator of shuffled LM batches of seq_len inputs, from
  global batch `start_batch` on. Global batch t holds stream positions
  t * B ... t * B + B - 1 (B = batch_size), as pretraining's
  (`pipeline.train_batches`): with `rows` (`sharding.BatchLayout.rows`)
  this process gets only those rows of each, with `columns` only positions
  [start, stop) of each row; the global stream does not depend on the
  layout."""
  if not len(examples):
    raise ValueError("no training examples.")
  rows = range(batch_size) if rows is None else rows
  ds = pipeline.layout_positions(rows, batch_size, start_batch).map(
    _ExampleSampler(len(examples), seed, rc_prob, label_dropout)
  )
  ds = ds.map(_RowBuilder(examples, seq_len + 1))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=2 * len(rows)))
  it = it.batch(len(rows), drop_remainder=True, batch_fn=np.stack)
  return iter(it.map(_MakeBatch(mask_n_in_loss, columns)))


def eval_batches(
  examples: Examples,
  *,
  seq_len: int,
  batch_size: int,
  rows: Sequence[int] | None = None,
  columns: tuple[int, int] | None = None,
  wrong_labels: bool = False,
  vocab: PromptVocab | None = None,
  mask_n_in_loss: bool = False,
) -> list[dict[str, np.ndarray]]:
  """Every example once, in global batches of batch_size rows (batch t holds
  examples t * B ...), the last padded with empty rows; with `rows` and
  `columns` (a `sharding.BatchLayout`) this process's part of each, as
  `train_batches`.

  wrong_labels replaces each label by the one half its condition's values
  on (cyclically; at least one): the "wrong label" control of `evaluate`,
  which changes every condition with more than one value.
  """
  ids = pipeline.host_eval_rows(len(examples), batch_size)
  if rows is not None:
    ids = ids[:, np.asarray(rows)]
  host_batch = ids.shape[1]
  ids = ids.reshape(-1)
  tokens = np.full((ids.size, seq_len + 1), tok.PAD, np.int32)
  for r, i in enumerate(ids):
    if i < 0:
      continue
    labels = examples.label_tokens[i]
    if wrong_labels:
      labels = np.array(
        [
          c.first_token + (t - c.first_token + max(1, len(c.values) // 2)) % len(c.values)
          for c, t in zip(vocab.conditions, labels)
        ],
        np.int32,
      )
    tokens[r] = example_row(labels, examples.sequences[i], seq_len + 1)
  return [
    _batch_columns(lm_batch(tokens[s : s + host_batch], mask_n_in_loss=mask_n_in_loss), columns)
    for s in range(0, ids.size, host_batch)
  ]


def resolve_vocab(config, train_rows: DesignData | None = None) -> PromptVocab:
  """The run's PromptVocab: from config.generate.prompt_vocab when set,
  otherwise derived from the training CSV and written into the config (so
  that config.json saves it)."""
  g = config.generate
  if g.prompt_vocab:
    vocab = PromptVocab.from_config(g.prompt_vocab)
    if tuple(g.label_columns) != vocab.columns:
      raise ValueError(
        f"config.generate.prompt_vocab covers columns {list(vocab.columns)} "
        f"but label_columns is {list(g.label_columns)}."
      )
    return vocab
  if train_rows is None:
    train_rows = load_design_csv(g.train_csv, g.label_columns)
  vocab = PromptVocab.build(
    train_rows,
    kind=str(g.label_kind),
    num_bins=int(g.num_bins),
    first_task_token=int(g.first_task_token),
  )
  with config.unlocked():
    config.generate.prompt_vocab = vocab.to_config()
  return vocab


def sequences_by_label(rows: DesignData, vocab: PromptVocab) -> dict[str, list[str]]:
  """Training sequences keyed by `vocab.describe(labels)`."""
  out: dict[str, list[str]] = {}
  for i, seq in enumerate(rows.sequences):
    out.setdefault(vocab.describe(rows.row_labels(i), raw=True), []).append(seq)
  return out
