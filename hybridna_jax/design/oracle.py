"""Judging designed sequences with an oracle fitted on held-out real ones.

The paper judges designed regulatory elements by a classifier trained
separately on real sequences. Here the oracle is the k-mer logistic
regression of `finetune.baselines` (k-mer frequencies of both strands,
standardised, L2 logistic regression with balanced class weights, k chosen
among 3-6 by dev MCC), multi-class over the labels of one categorical
condition, fitted on sequences the generator never saw (`oracle.csv` of
`scripts/make_real_tasks.py design_insulators`).

    oracle = KmerOracle.fit(oracle_rows, dev_rows, "label", classes=("CTCF", ...))
    report = judge(oracle, {"CTCF": designs, ...}, test_rows, seed=0)

`judge` reports, per requested label and as the mean over labels:

  designed   share of the designs the oracle assigns to the requested label
  real       the same share for real held-out test sequences of that label
             (the oracle's recall: what real data gets)
  shuffled   the same share for dinucleotide shuffles of those test
             sequences (same length and dinucleotide counts, motifs
             destroyed: what composition alone gets)
  chance     1 / number of labels

each share with a 95% Wilson interval. Designs that carry their label's
sequence features land near `real`; designs that only mimic composition
land near `shuffled`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from hybridna_jax.data.tasks import TaskFormatError
from hybridna_jax.design import metrics as design_metrics
from hybridna_jax.design.data import DesignData, load_design_csv
from hybridna_jax.design.prompts import CATEGORICAL
from hybridna_jax.finetune import baselines
from hybridna_jax.finetune import metrics as metrics_lib

CLASSIFICATION = "classification"


# -- dinucleotide shuffle ----------------------------------------------------------------------


def dinucleotide_shuffle(sequence: str, rng: np.random.Generator) -> str:
  """A uniformly random sequence with exactly the dinucleotide counts (and
  so the first and last letters and the letter counts) of `sequence`.

  Altschul & Erickson (1985), in the form of Kandel et al. (1996): the
  sequence is an Eulerian path through the multigraph of its letters (an
  edge per adjacent pair). For every letter but the last, one of its
  outgoing edges is drawn as its last exit; the draw is kept when the last
  exits form a tree into the last letter (else redrawn: with 4-5 letters
  this is quick). The other edges out of each letter are shuffled, and the
  walk from the first letter takes them in that order, then the last exit.
  Every Eulerian path arises from the same number of draws, so the result
  is uniform over sequences with these dinucleotide counts.
  """
  n = len(sequence)
  if n <= 2:
    return sequence
  first, last = sequence[0], sequence[-1]
  edges: dict[str, list[str]] = {}
  for a, b in zip(sequence[:-1], sequence[1:]):
    edges.setdefault(a, []).append(b)
  while True:
    exits = {v: out[int(rng.integers(len(out)))] for v, out in edges.items() if v != last}
    if _is_tree_into(exits, last):
      break
  order = {}
  for v, out in edges.items():
    rest = list(out)
    if v != last:
      rest.remove(exits[v])
    rest = [rest[i] for i in rng.permutation(len(rest))]
    if v != last:
      rest.append(exits[v])
    order[v] = rest
  position = {v: 0 for v in order}
  out, v = [first], first
  for _ in range(n - 1):
    nxt = order[v][position[v]]
    position[v] += 1
    out.append(nxt)
    v = nxt
  return "".join(out)


def _is_tree_into(exits: Mapping[str, str], root: str) -> bool:
  """Whether following last exits from every letter reaches `root` (no cycle)."""
  reaches = {root}
  for start in exits:
    path, v = [], start
    while v not in reaches:
      if v in path:
        return False
      path.append(v)
      v = exits[v]
    reaches.update(path)
  return True


def shuffle_all(sequences: Sequence[str], seed: int) -> list[str]:
  """`dinucleotide_shuffle` of each sequence, one seeded stream for all."""
  rng = np.random.default_rng(seed)
  return [dinucleotide_shuffle(s, rng) for s in sequences]


# -- the oracle --------------------------------------------------------------------------------


@dataclasses.dataclass
class KmerOracle:
  """A multi-class k-mer logistic regression over the labels of one
  categorical condition (module docstring).

  classes: the label of each class id, in the generator's token order.
  dev: classification metrics of the chosen k on the dev rows.
  """

  column: str
  classes: tuple[str, ...]
  k: int
  model: object
  dev_by_k: dict[str, float]
  dev: dict[str, float]
  sources: dict[str, object]

  @classmethod
  def fit(
    cls,
    train: DesignData,
    dev: DesignData,
    column: str,
    *,
    classes: Sequence[str] | None = None,
    ks: Sequence[int] = baselines.KMER_SIZES,
  ) -> KmerOracle:
    """Fits on `train` and chooses k on `dev` (design CSV rows).

    classes: the labels in class-id order (None: the sorted labels of train).

    Raises:
      TaskFormatError: a row's label is not one of `classes`, or a class has
        no training row (naming the file, and the line of a bad row).
    """
    classes = tuple(classes) if classes is not None else tuple(sorted(set(train.labels[column])))
    y_train = _class_ids(train, column, classes)
    missing = [c for i, c in enumerate(classes) if not np.any(y_train == i)]
    if missing:
      raise TaskFormatError(
        train.path,
        None,
        f"no rows labelled {missing} in column {column!r}; the oracle needs training "
        f"sequences of every label {list(classes)}.",
      )
    y_dev = _class_ids(dev, column, classes)
    k, _, model, by_k = baselines.choose_kmer(
      CLASSIFICATION,
      (train.sequences, y_train),
      (dev.sequences, y_dev),
      num_classes=len(classes),
      ks=ks,
      class_weight="balanced",
    )
    oracle = cls(column, classes, k, model, by_k, {}, {})
    oracle.dev = metrics_lib.classification_metrics(y_dev, oracle.log_probs(dev.sequences))
    oracle.sources = {"train_csv": train.path, "dev_csv": dev.path, "train_rows": len(train)}
    return oracle

  def log_probs(self, sequences: Sequence[str]) -> np.ndarray:
    """(n, len(classes)) log-probabilities of each label."""
    features = baselines.kmer_features(list(sequences), self.k)
    return baselines.predict(self.model, CLASSIFICATION, features, num_classes=len(self.classes))

  def assign(self, sequences: Sequence[str]) -> np.ndarray:
    """(n,) int class id the oracle assigns to each sequence."""
    if not len(sequences):
      return np.zeros((0,), np.int64)
    return np.argmax(self.log_probs(sequences), axis=1)

  def describe(self) -> dict:
    return {
      "model": f"{self.k}-mer logistic regression (balanced class weights, "
      f"{baselines._model_name(CLASSIFICATION, c=None)})",  # pylint: disable=protected-access
      "k": self.k,
      "dev_mcc_by_k": self.dev_by_k,
      "dev": {m: self.dev[m] for m in ("accuracy", "mcc", "f1_macro") if m in self.dev},
      "classes": list(self.classes),
      "column": self.column,
      **self.sources,
    }


def _class_ids(rows: DesignData, column: str, classes: Sequence[str]) -> np.ndarray:
  if column not in rows.labels:
    raise TaskFormatError(
      rows.path, None, f"no label column {column!r} (has {list(rows.columns)})."
    )
  index = {c: i for i, c in enumerate(classes)}
  out = np.empty(len(rows), np.int64)
  for i, value in enumerate(rows.labels[column]):
    if value not in index:
      raise TaskFormatError(
        rows.path,
        rows.lines[i],
        f"label {value!r} in column {column!r} is not one of the generator's labels "
        f"{list(classes)}; give the oracle CSVs the same labels as the training CSV.",
      )
    out[i] = index[value]
  return out


# -- judging -----------------------------------------------------------------------------------


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
  """95% Wilson score interval of a share (NaN, NaN for n = 0)."""
  if n == 0:
    return math.nan, math.nan
  p = successes / n
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  return max(0.0, centre - half), min(1.0, centre + half)


def requested_share(oracle: KmerOracle, sequences: Sequence[str], label: str) -> dict:
  """How often the oracle assigns `label` to `sequences`: {"n", "hits",
  "share", "ci95", "mean_prob" (the oracle's mean probability of it)}."""
  c = oracle.classes.index(label)
  n = len(sequences)
  if not n:
    return {
      "n": 0,
      "hits": 0,
      "share": math.nan,
      "ci95": [math.nan, math.nan],
      "mean_prob": math.nan,
    }
  logp = oracle.log_probs(sequences)
  hits = int(np.sum(np.argmax(logp, axis=1) == c))
  return {
    "n": n,
    "hits": hits,
    "share": hits / n,
    "ci95": list(wilson_interval(hits, n)),
    "mean_prob": float(np.mean(np.exp(logp[:, c]))),
  }


KINDS = ("designed", "real", "shuffled")


def judge(
  oracle: KmerOracle,
  designs: Mapping[str, Sequence[str]],
  test: DesignData,
  *,
  seed: int = 0,
) -> dict:
  """The oracle's report on designed sets (module docstring).

  Args:
    designs: requested label -> designed sequences.
    test: real held-out rows (never seen by the generator or the oracle).
    seed: of the dinucleotide shuffles.

  Returns:
    {"oracle": its settings and dev metrics, "chance", "test_csv",
    "by_label": {label: {kind: requested_share}}, "mean_over_labels":
    {kind: share}, "verdict": one sentence}.
  """
  unknown = [label for label in designs if label not in oracle.classes]
  if unknown:
    raise ValueError(
      f"designs requested labels {unknown} the oracle does not know {list(oracle.classes)}."
    )
  test_ids = _class_ids(test, oracle.column, oracle.classes)
  by_label = {}
  for label, seqs in designs.items():
    real = [s for s, y in zip(test.sequences, test_ids) if oracle.classes[y] == label]
    by_label[label] = {
      "designed": requested_share(oracle, list(seqs), label),
      "real": requested_share(oracle, real, label),
      "shuffled": requested_share(
        oracle, shuffle_all(real, seed + oracle.classes.index(label)), label
      ),
    }
  mean = {
    kind: float(np.nanmean([v[kind]["share"] for v in by_label.values()])) if by_label else math.nan
    for kind in KINDS
  }
  chance = 1.0 / len(oracle.classes)
  report = {
    "oracle": oracle.describe(),
    "chance": chance,
    "test_csv": test.path,
    "shuffle_seed": seed,
    "by_label": by_label,
    "mean_over_labels": mean,
  }
  report["verdict"] = verdict(report)
  return report


def verdict(report: dict) -> str:
  """One plain sentence: the three shares, chance, and whether the designs
  beat the shuffled controls (pooled designed hits against pooled
  shuffled hits, by non-overlapping 95% intervals)."""
  m = report["mean_over_labels"]
  pooled = {}
  for kind in KINDS:
    hits = sum(v[kind]["hits"] for v in report["by_label"].values())
    n = sum(v[kind]["n"] for v in report["by_label"].values())
    pooled[kind] = (hits, n)
  lo_designed, _ = wilson_interval(*pooled["designed"])
  _, hi_shuffled = wilson_interval(*pooled["shuffled"])
  if m["designed"] > m["shuffled"] and lo_designed > hi_shuffled:
    against = "beat the dinucleotide-shuffled controls (95% intervals apart)"
  elif m["designed"] > m["shuffled"]:
    against = "are above the dinucleotide-shuffled controls, within noise"
  else:
    against = "do not beat the dinucleotide-shuffled controls"
  return (
    f"The oracle ({report['oracle']['k']}-mer) assigns {m['designed']:.3f} of the designs to "
    f"their requested label (mean over labels), against {m['real']:.3f} of real held-out "
    f"sequences, {m['shuffled']:.3f} of their dinucleotide shuffles and chance "
    f"{report['chance']:.3f}: the designs {against}."
  )


def format_report(report: dict) -> str:
  """A plain-text table: one row per label, the shares of designed, real
  and shuffled sequences with their counts."""
  header = ["requested label", "designed", "real held-out", "shuffled held-out"]
  rows = []
  for label, v in report["by_label"].items():
    rows.append([label] + [_cell(v[kind]) for kind in KINDS])
  m = report["mean_over_labels"]
  rows.append(["mean over labels"] + [f"{m[kind]:.3f}" for kind in KINDS])
  rows.append(["chance"] + [f"{report['chance']:.3f}"] * 3)
  lines = design_metrics.text_table(header, rows)
  o = report["oracle"]
  lines.append(
    f"oracle: {o['model']}, fitted on {o['train_rows']} rows of {o['train_csv']}, k chosen on "
    f"{o['dev_csv']} (dev accuracy {o['dev'].get('accuracy', math.nan):.3f}); "
    f"held-out: {report['test_csv']}"
  )
  lines.append(report["verdict"])
  return "\n".join(lines)


def _cell(share: dict) -> str:
  if not share["n"]:
    return "-"
  return f"{share['share']:.3f} ({share['hits']}/{share['n']})"


ORACLE_FIELDS = ("oracle_csv", "oracle_dev_csv", "test_csv")


def check_oracle_settings(vocab, *, oracle_csv: str, oracle_dev_csv: str, test_csv: str) -> None:
  """Refuses oracle settings `judge_designs` could not use (before any
  sampling): only some of the three CSVs, a missing one (naming the config
  field), or a vocabulary that is not one categorical condition."""
  paths = {"oracle_csv": oracle_csv, "oracle_dev_csv": oracle_dev_csv, "test_csv": test_csv}
  missing = [f for f, p in paths.items() if not p]
  if missing:
    raise ValueError(
      f"config.generate.{' / '.join(missing)} empty while "
      f"{', '.join(f for f in paths if f not in missing)} is set; the oracle needs all "
      "three (its training rows, its dev rows, the held-out test rows), or none."
    )
  for field, path in paths.items():
    if not os.path.isfile(path):
      raise FileNotFoundError(
        f"{path}: no such file (config.generate.{field}, or --{field}); build it with "
        "scripts/make_real_tasks.py design_insulators, or give a design CSV."
      )
  if len(vocab.conditions) != 1 or vocab.conditions[0].kind != CATEGORICAL:
    raise ValueError(
      "the oracle judges one categorical condition, but this run's labels are "
      f"{[(c.column, c.kind) for c in vocab.conditions]}; unset config.generate.oracle_csv."
    )


def judge_designs(
  vocab,
  designs: Mapping[str, Sequence[str]],
  *,
  oracle_csv: str,
  oracle_dev_csv: str,
  test_csv: str,
  seed: int = 0,
) -> dict:
  """Fits the oracle on oracle_csv (k on oracle_dev_csv) over the labels of
  the run's one categorical condition and `judge`s the designs against
  test_csv.

  Args:
    vocab: the run's `PromptVocab`.
    designs: requested label (a value of the condition) -> sequences.

  Raises:
    ValueError: only some of the three CSVs given, or a vocabulary that is
      not one categorical condition.
    FileNotFoundError: a CSV is missing (naming the config field).
  """
  paths = {"oracle_csv": oracle_csv, "oracle_dev_csv": oracle_dev_csv, "test_csv": test_csv}
  check_oracle_settings(vocab, **paths)
  (condition,) = vocab.conditions
  column = condition.column
  rows = {f: load_design_csv(p, (column,)) for f, p in paths.items()}
  oracle = KmerOracle.fit(
    rows["oracle_csv"], rows["oracle_dev_csv"], column, classes=condition.values
  )
  return judge(oracle, designs, rows["test_csv"], seed=seed)
