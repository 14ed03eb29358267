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

import csv
import os
from typing import NamedTuple, Sequence

import numpy as np

from hybridna_jax import tokenizer

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

  def tokens(self, *, add_bos: bool = False,
             add_eos: bool = False) -> list[np.ndarray]:
    """The sequences as int32 token arrays (`tokenizer.encode`)."""
    return [tokenizer.encode(s, add_bos=add_bos, add_eos=add_eos)
            for s in self.sequences]


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
        "test.csv with a 'sequence,label' header.")
  sequences: list[str] = []
  raw_labels: list[str] = []
  with open(path, newline="", encoding="utf-8-sig") as f:
    reader = csv.reader(f)
    header = next(reader, None)
    if header is None:
      raise TaskFormatError(path, None, "the file is empty; expected a "
                            "'sequence,label' header and one row per example.")
    header = [h.strip().lower() for h in header]
    if "sequence" not in header or "label" not in header:
      raise TaskFormatError(
          path, 1, f"header {header} lacks a 'sequence' or 'label' column; "
          "the first line must name them, e.g. 'sequence,label'.")
    seq_col, label_col = header.index("sequence"), header.index("label")
    for row in reader:
      line = reader.line_num
      if not row or all(not c.strip() for c in row):
        continue  # Blank lines, e.g. a trailing one.
      if len(row) != len(header):
        raise TaskFormatError(
            path, line, f"{len(row)} fields, the header has {len(header)}; "
            "check for stray commas or quotes.")
      seq = row[seq_col].strip().upper()
      if not seq:
        raise TaskFormatError(path, line, "empty sequence.")
      try:
        tokenizer.encode_bytes(seq.encode("ascii", "replace"),
                               context="sequence")
      except tokenizer.InvalidSequenceError as e:
        raise TaskFormatError(path, line, str(e)) from e
      sequences.append(seq)
      raw_labels.append(row[label_col].strip())
  if not sequences:
    raise TaskFormatError(path, None, "no examples after the header.")
  return TaskSplit(sequences, _parse_labels(path, raw_labels))


def _parse_labels(path: str, raw: Sequence[str]) -> np.ndarray:
  try:
    return np.array([int(x) for x in raw], np.int64)
  except ValueError:
    pass
  values = []
  for i, x in enumerate(raw):
    try:
      values.append(float(x))
    except ValueError:
      # Line numbers are 1-based with the header on line 1; blank lines were
      # skipped, so look the row up again for an exact line.
      raise TaskFormatError(path, _line_of_label(path, i), f"label {x!r} is "
                            "not a number; labels are class ids (or "
                            "numbers for regression).") from None
  return np.array(values, np.float32)


def _line_of_label(path: str, row_index: int) -> int | None:
  with open(path, newline="", encoding="utf-8-sig") as f:
    reader = csv.reader(f)
    next(reader, None)
    seen = -1
    for row in reader:
      if row and any(c.strip() for c in row):
        seen += 1
        if seen == row_index:
          return reader.line_num
  return None


def load_csv_task(folder: str | os.PathLike,
                  splits: Sequence[str] = SPLITS) -> dict[str, TaskSplit]:
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
