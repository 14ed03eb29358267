"""GUE-style task folders: train.csv, dev.csv, test.csv with `sequence,label`.

    task = load_csv_task("GUE/prom/prom_core_all")
    sequences, labels = task["train"]          # list[str], int64 (n,)
    tokens = task["train"].tokens()            # list of int32 (len,) arrays

Sequences go through the project tokenizer when loading, so a bad character
fails here, naming the file and line, not later inside a training step.
Extra columns are ignored; a UTF-8 byte-order mark and Windows line endings
are accepted.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from hybridna_jax import tokenizer
from hybridna_jax.data import textfiles

SPLITS = ("train", "dev", "test")


class TaskFormatError(ValueError):
  """A problem in a task file; the message names the file and the line."""

  def __init__(self, path: str, line: int | None, message: str):
    self.path, self.line = path, line
    where = f"{path} line {line}" if line is not None else path
    super().__init__(f"{where}: {message}")


class TaskSplit(NamedTuple):
  """One split of a task.

  Attributes:
    sequences: upper-case DNA strings, in file order.
    labels: (n,) int64 class ids, or float32 if any label is not an integer
      (regression tasks).
  """

  sequences: list[str]
  labels: np.ndarray

  def tokens(self, *, add_bos: bool = False, add_eos: bool = False) -> list[np.ndarray]:
    """The sequences as int32 token arrays (`tokenizer.encode`)."""
    return [tokenizer.encode(s, add_bos=add_bos, add_eos=add_eos) for s in self.sequences]


def load_csv_split(path: str | os.PathLike) -> TaskSplit:
  """Reads one `sequence,label` CSV file.

  Raises:
    FileNotFoundError: no such file.
    TaskFormatError: missing columns, a malformed row, an empty sequence,
      a bad label or a character outside the DNA alphabet (file and line).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"{path}: no such file; a task folder holds train.csv, dev.csv and "
      "test.csv with a 'sequence,label' header."
    )
  rows = textfiles.csv_rows(
    path, error=TaskFormatError, expected="a 'sequence,label' header and one row per example"
  )
  header_line, header = next(rows)
  header = [h.lower() for h in header]
  if "sequence" not in header or "label" not in header:
    raise TaskFormatError(
      path,
      header_line,
      f"header {header} lacks a 'sequence' or 'label' "
      "column; the first line must name them, e.g. 'sequence,label'.",
    )
  seq_col, label_col = header.index("sequence"), header.index("label")
  sequences: list[str] = []
  raw_labels: list[str] = []
  lines: list[int] = []
  for line, row in rows:
    sequences.append(check_sequence(path, line, row[seq_col]))
    raw_labels.append(row[label_col].strip())
    lines.append(line)
  if not sequences:
    raise TaskFormatError(path, None, "no examples after the header.")
  return TaskSplit(sequences, parse_labels(path, raw_labels, lines))


def check_sequence(path: str, line: int, text: str) -> str:
  """A sequence field of a CSV row in the model's alphabet, as FASTA and BED
  sequences are read: stripped, upper-cased, U as T and other IUPAC codes as
  N (what the model sees; the GC baseline and the overlap checks compare
  these strings).

  Raises:
    TaskFormatError: (naming the line) the field is empty or holds a
      character outside the DNA alphabet.
  """
  seq = text.strip().upper()
  if not seq:
    raise TaskFormatError(path, line, "empty sequence.")
  try:
    tokens = tokenizer.encode(seq, context="sequence")
  except tokenizer.InvalidSequenceError as e:
    raise TaskFormatError(path, line, str(e)) from e
  return tokenizer.decode(tokens)


def parse_labels(path: str, raw: Sequence[str], lines: Sequence[int]) -> np.ndarray:
  """Label strings -> int64 (n,) class ids, or float32 (n,) numbers
  (regression) when any is not an integer; `lines` name each one's line.

  Raises:
    TaskFormatError: a label that is not a number, or is NaN or infinite
      (a missing value, e.g. "nan" from a pandas export: it would make every
      standardised regression target and the dev metrics NaN).
  """
  try:
    return np.array([int(x) for x in raw], np.int64)
  except ValueError:
    pass
  return parse_numbers(path, raw, lines, finite=True).astype(np.float32)


def parse_numbers(
  path: str,
  raw: Sequence[str],
  lines: Sequence[int],
  *,
  what: str = "label",
  hint: str = "write a class id (or a number, for regression) there, or remove the row.",
  finite: bool = False,
) -> np.ndarray:
  """Numeric label strings -> float64 (n,).

  Raises:
    TaskFormatError: "<what> '<text>' is not a (finite) number; <hint>"
      naming the line of the first bad one (with `finite`, NaN and
      infinities too).
  """
  values = np.empty(len(raw), np.float64)
  for i, (text, line) in enumerate(zip(raw, lines)):
    try:
      values[i] = float(text)
    except ValueError:
      raise TaskFormatError(path, line, f"{what} {text!r} is not a number; {hint}") from None
    if finite and not np.isfinite(values[i]):
      raise TaskFormatError(path, line, f"{what} {text!r} is not a finite number; {hint}")
  return values


def load_csv_task(
  folder: str | os.PathLike, splits: Sequence[str] = SPLITS
) -> dict[str, TaskSplit]:
  """Loads a GUE-style task folder: {split: TaskSplit} for `splits`."""
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{folder}: no such task folder.")
  return {s: load_csv_split(os.path.join(folder, f"{s}.csv")) for s in splits}


def num_classes(task: dict[str, TaskSplit]) -> int:
  """1 + the largest class id over all splits (classification tasks)."""
  labels = [s.labels for s in task.values()]
  if any(l.dtype.kind != "i" for l in labels):
    raise ValueError("the task has non-integer labels (regression).")
  return int(max(l.max() for l in labels)) + 1
