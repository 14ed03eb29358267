"""Prompt tokens for sequence design: the label -> task-token vocabulary.

The label -> token mapping (`PromptVocab`) is derived from the training CSV
once, at the start of a run, and stored in `config.generate.prompt_vocab`,
so it is saved in the run's config.json and every later sampling run uses
the same tokens. Tokens are taken in order from the reserved block
(`tokenizer.task_token(generate.first_task_token)` onwards).

  * categorical conditions (label_kind="categorical"): each distinct value
    ("HepG2", "K562", ...) gets its own task token;
  * activity bins (label_kind="bins"): numeric activities are cut into
    `num_bins` quantile bins of the training set, and each bin gets a token
    -- regLM's one token per condition and activity class, e.g. the prompt
    for "high in HepG2, low in K562" is <bos> <HepG2 bin 4> <K562 bin 0>.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from hybridna_jax import tokenizer as tok
from hybridna_jax.data.tasks import parse_numbers

if TYPE_CHECKING:
  from hybridna_jax.design.data import DesignData

CATEGORICAL, BINS = "categorical", "bins"


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
    raise KeyError(
      f"condition {self.column!r} has no {what} {value!r}; known labels: "
      f"{list(self.values)}" + (" (bins of numeric activities)" if self.kind == BINS else "")
    )

  def label(self, token: int) -> str:
    return self.values[token - self.first_token]

  def to_dict(self) -> dict:
    return {
      "column": self.column,
      "kind": self.kind,
      "values": list(self.values),
      "first_token": self.first_token,
      "edges": list(self.edges),
    }

  @classmethod
  def from_dict(cls, d: Mapping) -> Condition:
    return cls(
      str(d["column"]),
      str(d["kind"]),
      tuple(str(v) for v in d["values"]),
      int(d["first_token"]),
      tuple(float(e) for e in d.get("edges", ())),
    )


@dataclasses.dataclass(frozen=True)
class PromptVocab:
  """Label -> prompt tokens for every condition (see the module docstring)."""

  conditions: tuple[Condition, ...]

  @property
  def columns(self) -> tuple[str, ...]:
    return tuple(c.column for c in self.conditions)

  def label_tokens(
    self, labels: Mapping[str, object] | Sequence[object], *, raw: bool = False
  ) -> list[int]:
    """One token per condition, from {column: label} or labels in column
    order; `raw`: labels as read from a CSV (numeric activities for bins)."""
    if isinstance(labels, Mapping):
      missing = [c for c in self.columns if c not in labels]
      extra = [k for k in labels if k not in self.columns]
      if missing or extra:
        raise KeyError(
          f"labels {dict(labels)} must name exactly the conditions "
          f"{list(self.columns)}"
          + (f"; missing {missing}" if missing else "")
          + (f"; unknown {extra}" if extra else "")
        )
      labels = [labels[c] for c in self.columns]
    if len(labels) != len(self.conditions):
      raise KeyError(
        f"{len(labels)} labels given for {len(self.conditions)} conditions {list(self.columns)}."
      )
    return [c.token(v, raw=raw) for c, v in zip(self.conditions, labels)]

  def prompt(self, labels=None, prefix: str = "") -> np.ndarray:
    """int32 prompt: <bos>, the label tokens (none: unconditional), the prefix."""
    label_part = [] if labels is None else self.label_tokens(labels)
    return np.concatenate(
      [
        np.array([tok.BOS] + label_part, np.int32),
        tok.encode(prefix) if prefix else np.zeros((0,), np.int32),
      ]
    )

  def parse(self, spec: str) -> dict[str, str] | None:
    """A prompt spec from the command line -> {column: label} (None for
    "unconditional"). Forms: "HepG2" (one condition), "4,0,1" (labels in
    column order), "HepG2=4,K562=0" (by column)."""
    spec = spec.strip()
    if spec.lower() in ("", "unconditional", "none"):
      return None
    parts = [p.strip() for p in spec.split(",")]
    if all("=" in p for p in parts):
      labels = {}
      for part in parts:
        key, value = (x.strip() for x in part.split("=", 1))
        if key in labels:
          raise ValueError(f"prompt {spec!r} names column {key!r} twice; give it once.")
        labels[key] = value
    elif any("=" in p for p in parts):
      raise ValueError(
        f"prompt {spec!r}: give either every condition as column=label or "
        "labels in column order, not a mix."
      )
    else:
      labels = dict(zip(self.columns, parts)) if len(parts) == len(self.columns) else None
      if labels is None:
        raise ValueError(
          f"prompt {spec!r} gives {len(parts)} label(s) for the "
          f"{len(self.columns)} conditions {list(self.columns)}; give one "
          "per condition, in that order, or name them (column=label)."
        )
    self.label_tokens(labels)  # validates
    return labels

  def describe(self, labels: Mapping[str, object] | None, *, raw: bool = False) -> str:
    """ "column=label,..." naming the bins (for headers and tables)."""
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
  def from_config(cls, entries) -> PromptVocab:
    return cls(tuple(Condition.from_dict(e) for e in entries))

  @classmethod
  def build(
    cls, rows: DesignData, *, kind: str, num_bins: int, first_task_token: int
  ) -> PromptVocab:
    """Derives the vocabulary from the training rows."""
    if kind not in (CATEGORICAL, BINS):
      raise ValueError(
        f"config.generate.label_kind must be {CATEGORICAL!r} or {BINS!r}, got {kind!r}."
      )
    conditions, next_index = [], first_task_token
    for column in rows.columns:
      raw = rows.labels[column]
      if kind == CATEGORICAL:
        values = tuple(sorted(set(raw), key=_natural_key))
        edges: tuple[float, ...] = ()
        unnamable = [v for v in values if "," in v or "=" in v]
        if unnamable:  # `parse` splits prompts at ',' and '='
          raise ValueError(
            f"{rows.path}: column {column!r} has label(s) {unnamable[:3]} with ',' or '=', "
            "which a prompt on the command line cannot name; rename them in the CSV."
          )
      else:
        if num_bins < 2:
          raise ValueError(f"config.generate.num_bins must be >= 2, got {num_bins}.")
        numbers = _numeric(rows, column)
        edges = tuple(float(e) for e in np.quantile(numbers, np.arange(1, num_bins) / num_bins))
        # A value goes to bin searchsorted(edges, v, "right"); tied values
        # (many zeros, say) can leave a bin with no training row, whose
        # prompt token would then never be trained but still be offered.
        per_bin = np.bincount(np.searchsorted(edges, numbers, side="right"), minlength=num_bins)
        if len(set(edges)) < len(edges) or not per_bin.all():
          raise ValueError(
            f"{rows.path}: column {column!r} has too few distinct values for "
            f"{num_bins} quantile bins (training rows per bin: {per_bin.tolist()}); lower "
            "config.generate.num_bins."
          )
        values = tuple(str(i) for i in range(num_bins))
      if next_index + len(values) > tok.NUM_TASK_TOKENS:
        raise ValueError(
          f"the conditions need {next_index + len(values) - first_task_token} "
          f"task tokens from index {first_task_token}, but only "
          f"{tok.NUM_TASK_TOKENS} exist; use fewer labels or bins."
        )
      conditions.append(Condition(column, kind, values, tok.task_token(next_index), edges))
      next_index += len(values)
    return cls(tuple(conditions))


def _natural_key(value: str):
  """Sorts finite numeric labels numerically ("2" < "10") and others as
  text ("nan" and "inf" too: NaN does not order, and the label -> token map
  would follow set order, which differs between processes)."""
  try:
    number = float(value)
  except ValueError:
    number = math.nan
  if math.isfinite(number):
    return (0, number, value)
  return (1, 0.0, value)


def _numeric(rows: DesignData, column: str) -> np.ndarray:
  return parse_numbers(
    rows.path,
    rows.labels[column],
    rows.lines,
    what=f"column {column!r}:",
    hint="label_kind='bins' needs numeric activities (use "
    "label_kind='categorical' for class names).",
    finite=True,
  )


def iter_label_sets(vocab: PromptVocab, specs: Iterable[str]) -> list[dict[str, str] | None]:
  """Prompt specs from the command line -> label dicts (None: unconditional);
  no specs means every label combination."""
  specs = list(specs)
  if not specs:
    return vocab.all_labels()
  return [vocab.parse(s) for s in specs]
