"""Simple baselines trained beside every fine-tuning run, on the same splits.

    found = run_baselines(data)              # {"gc": {...}, "kmer": {...}, "onehot": {...}}
    verdict = compare(results["test"], found, data.kind)
    verdict["text"]   # "The model (test MCC 0.45) does not beat ..."

DNA language models often lose to simple baselines, so each report carries
three (fitted on train, selected on dev, reported on test, with the metrics of
`finetune.metrics`):

* gc: the GC content of each sequence (one feature) -> logistic regression
  (classification) or linear regression (regression);
* kmer: k-mer frequencies over both strands (4**k features, k-mers with N
  skipped), standardised -> L2 logistic regression or ridge; k among
  `KMER_SIZES` and the strength among `KMER_STRENGTHS` (the linear probes'
  grid: the same budget) are chosen together by the dev headline metric;
* onehot: the base at each position (a position weight matrix's view:
  4 x length features, sequences centred in the longest training length)
  -> L2 logistic regression or ridge, its strength chosen on dev among
  `ONEHOT_STRENGTHS`. k-mer frequencies cannot see where a motif sits;
  tasks whose signal is positional (splice sites) need this one.

Classification outputs are log-probabilities (n, num_classes), so the
model's metric code applies unchanged; a class missing from train gets
log-probability -1e9.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence

import numpy as np
from absl import logging
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from hybridna_jax import tokenizer
from hybridna_jax.design.metrics import gc_content
from hybridna_jax.finetune import metrics as metrics_lib

KMER_SIZES = (3, 4, 5, 6)
KMER_STRENGTHS = (0.01, 0.1, 1.0, 10.0)
ONEHOT_STRENGTHS = (1e-4, 1e-3, 1e-2, 1e-1)
ONEHOT_MAX_LENGTH = 2048  # longer tasks are cropped around the centre
NAMES = {
  "gc": "GC content",
  "kmer": "k-mer logistic regression",
  "onehot": "one-hot (per-position) logistic regression",
}
EVAL_SPLITS = ("dev", "test")


def kmer_features(sequences: Sequence[str], k: int) -> np.ndarray:
  """float32 (n, 4**k): k-mer frequencies of each sequence and its reverse
  complement together (k-mers with N skipped; index = base-4 number, A=0)."""
  out = np.zeros((len(sequences), 4**k), np.float32)
  powers = 4 ** np.arange(k - 1, -1, -1)
  for row, seq in enumerate(sequences):
    for strand in (seq, tokenizer.reverse_complement(seq)):
      t = tokenizer.encode(strand).astype(np.int64) - tokenizer.A  # A C G T -> 0..3
      if t.size < k:
        continue
      windows = np.lib.stride_tricks.sliding_window_view(t, k)
      windows = windows[((windows >= 0) & (windows < 4)).all(axis=1)]
      out[row] += np.bincount(windows @ powers, minlength=4**k)
  return out / np.maximum(out.sum(axis=1, keepdims=True), 1.0)


def onehot_features(sequences: Sequence[str], length: int) -> np.ndarray:
  """float32 (n, 4 * length): the one-hot base (A C G T; N and padding all
  zero) at each of `length` positions, each sequence centred in them
  (cropped around its centre when longer, zero-padded on both sides when
  shorter)."""
  out = np.zeros((len(sequences), length, 4), np.float32)
  for row, seq in enumerate(sequences):
    t = tokenizer.encode(seq).astype(np.int64) - tokenizer.A  # A C G T -> 0..3
    if t.size > length:
      start = (t.size - length) // 2
      t = t[start : start + length]
    offset = (length - t.size) // 2
    keep = (t >= 0) & (t < 4)
    out[row, offset + np.flatnonzero(keep), t[keep]] = 1.0
  return out.reshape(len(sequences), 4 * length)


def gc_features(sequences: Sequence[str]) -> np.ndarray:
  """float64 (n, 1): GC share of the A C G T bases (0.5 where there are none)."""
  return np.nan_to_num(gc_content(sequences), nan=0.5)[:, None]


def fit(
  kind: str,
  x_train: np.ndarray,
  labels: np.ndarray,
  *,
  linear: bool = False,
  c: float = 1.0,
  class_weight: str | None = None,
):
  """A fitted scikit-learn pipeline (standardise, then the model).

  Args:
    kind: "classification" or "regression".
    x_train: (n, f) features. labels: (n,) class ids or targets.
    linear: an unregularised linear regression (regression, one feature).
    c: inverse regularisation strength: logistic regression's C, ridge's
      alpha = 1 / c.
    class_weight: classification only: None, or "balanced" (each class
      weighs the same in the loss, whatever its count).
  """
  if kind == "classification":
    # A tight tolerance: with sklearn's default (1e-4) the fitted weights,
    # and dev scores that choose k, moved with the dtype and thread count.
    model = make_pipeline(
      StandardScaler(),
      LogisticRegression(C=c, tol=1e-6, max_iter=5000, class_weight=class_weight),
    )
  else:
    regression = LinearRegression() if linear else Ridge(alpha=1.0 / c)
    model = make_pipeline(StandardScaler(), regression)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)
    model.fit(x_train, labels)
  return model


def predict(model, kind: str, features: np.ndarray, *, num_classes: int = 0) -> np.ndarray:
  """(n, num_classes) log-probabilities (classification; a class the model
  never saw gets -1e9) or (n,) predictions (regression) of a `fit` model."""
  if kind != "classification":
    return model.predict(features)
  scores = model.decision_function(features)  # logits; (n,) for two classes
  if scores.ndim == 1:
    scores = np.stack([np.zeros_like(scores), scores], axis=1)
  scores = scores - scores.max(axis=1, keepdims=True)
  logp = np.full((len(features), num_classes), -1e9)
  logp[:, model.classes_.astype(np.int64)] = scores - np.log(
    np.exp(scores).sum(axis=1, keepdims=True)
  )
  return logp


def fit_predict(
  kind: str,
  x: dict[str, np.ndarray],
  labels: np.ndarray,
  *,
  num_classes: int = 0,
  linear: bool = False,
  c: float = 1.0,
  class_weight: str | None = None,
) -> dict[str, np.ndarray]:
  """Fits on x["train"] (n, f) and predicts the other splits (`fit`, `predict`).

  Returns:
    split -> (n_split, num_classes) log-probabilities, or (n_split,)
    predictions, for every split of `x` but train.
  """
  model = fit(kind, x["train"], labels, linear=linear, c=c, class_weight=class_weight)
  return {
    split: predict(model, kind, features, num_classes=num_classes)
    for split, features in x.items()
    if split != "train"
  }


def choose_strength(
  features: dict[str, np.ndarray],
  data,
  strengths: Sequence[float],
  class_weight: str | None = None,
) -> dict:
  """Fits a logistic regression / ridge on features["train"] once per
  inverse regularisation strength and keeps the best on the dev headline
  metric (the first best wins ties).

  Args:
    features: split -> (n_split, f) features of train, dev and test.
    data: the task (`datasets.TaskData`: labels, kind).
    class_weight: None or "balanced" (`fit`).

  Returns:
    {"dev", "test": metrics, "c": chosen strength, "dev_by_c": {str(c): dev
    headline}}, and for classification "test_per_class" (`metrics.per_class`).
  """
  headline = metrics_lib.HEADLINE[data.kind]
  best, by_c = None, {}
  for c in strengths:
    outputs = fit_predict(
      data.kind,
      features,
      data.splits["train"].labels,
      num_classes=_classes(data),
      c=c,
      class_weight=class_weight,
    )
    found = {s: split_metrics(data.kind, data.splits[s].labels, outputs[s]) for s in EVAL_SPLITS}
    score = found["dev"][headline]
    by_c[str(c)] = score
    score = score if np.isfinite(score) else -np.inf
    if best is None or score > best[0]:
      best = (score, c, found, outputs["test"])
  _, c, found, test_outputs = best
  out = {**found, "c": c, "dev_by_c": by_c}
  if data.kind == "classification":
    out["test_per_class"] = metrics_lib.per_class(data.splits["test"].labels, test_outputs)
  return out


def choose_kmer(
  kind: str,
  train: tuple[Sequence[str], np.ndarray],
  dev: tuple[Sequence[str], np.ndarray],
  *,
  num_classes: int = 0,
  ks: Sequence[int] = KMER_SIZES,
  strengths: Sequence[float] = KMER_STRENGTHS,
  class_weight: str | None = None,
) -> tuple[int, float, object, dict[str, float]]:
  """k-mer frequencies -> logistic regression / ridge for each k of `ks`
  and inverse regularisation strength of `strengths`, fitted on train
  (sequences, labels) and scored on dev by the kind's headline metric (MCC
  / Pearson; the first best (k, strength) wins ties).

  Returns:
    (k, strength, the fitted model of these, {str(k): the best dev headline
    metric of that k}).
  """
  headline = metrics_lib.HEADLINE[kind]
  best, by_k = None, {}
  for k in ks:
    x_train, x_dev = kmer_features(train[0], k), kmer_features(dev[0], k)
    for c in strengths:
      model = fit(kind, x_train, train[1], c=c, class_weight=class_weight)
      outputs = predict(model, kind, x_dev, num_classes=num_classes)
      score = split_metrics(kind, dev[1], outputs)[headline]
      score = score if np.isfinite(score) else -np.inf
      by_k[str(k)] = max(by_k.get(str(k), -np.inf), score)
      if best is None or score > best[0]:
        best = (score, k, c, model)
  _, k, c, model = best
  return k, c, model, {key: (v if np.isfinite(v) else float("nan")) for key, v in by_k.items()}


def split_metrics(kind: str, labels: np.ndarray, outputs: np.ndarray) -> dict[str, float]:
  """The task kind's metrics of `fit_predict` outputs, with "examples"."""
  if kind == "classification":
    out = metrics_lib.classification_metrics(labels, outputs)
  else:
    out = metrics_lib.regression_metrics(labels, outputs)
  out["examples"] = len(labels)
  return out


def gc_baseline(data, class_weight: str | None = None) -> dict:
  """GC content -> logistic / linear regression; {"name", "dev", "test", "settings"}."""
  x = {s: gc_features(data.splits[s].sequences) for s in ("train", *EVAL_SPLITS)}
  outputs = fit_predict(
    data.kind,
    x,
    data.splits["train"].labels,
    num_classes=_classes(data),
    linear=True,
    class_weight=class_weight,
  )
  return {
    "name": NAMES["gc"],
    **{s: split_metrics(data.kind, data.splits[s].labels, outputs[s]) for s in EVAL_SPLITS},
    "settings": {
      "features": "GC share",
      "model": _model_name(data.kind, linear=True),
      "class_weight": class_weight,
    },
  }


def kmer_baseline(data, ks: Sequence[int] = KMER_SIZES, class_weight: str | None = None) -> dict:
  """k-mer frequencies -> logistic regression / ridge, k and the strength
  chosen on dev (`choose_kmer`).

  Returns:
    {"name", "dev", "test", "settings": {"k", "c", "dev_by_k", ...}}.
  """
  split = {s: (data.splits[s].sequences, data.splits[s].labels) for s in ("train", *EVAL_SPLITS)}
  k, c, model, by_k = choose_kmer(
    data.kind,
    split["train"],
    split["dev"],
    num_classes=_classes(data),
    ks=ks,
    class_weight=class_weight,
  )
  found = {
    s: split_metrics(
      data.kind,
      split[s][1],
      predict(model, data.kind, kmer_features(split[s][0], k), num_classes=_classes(data)),
    )
    for s in EVAL_SPLITS
  }
  return {
    "name": f"{k}-mer {'logistic regression' if data.kind == 'classification' else 'ridge'}",
    **found,
    "settings": {
      "k": k,
      "c": c,
      "dev_by_k": by_k,
      "features": "k-mer frequencies, both strands, standardised",
      "model": _model_name(data.kind, c=None),
      "class_weight": class_weight,
    },
  }


def onehot_baseline(
  data, strengths: Sequence[float] = ONEHOT_STRENGTHS, class_weight: str | None = None
) -> dict:
  """Per-position one-hot bases -> logistic regression / ridge, the
  strength chosen on dev by the headline metric.

  Returns:
    {"name", "dev", "test", "settings": {"length", "c", "dev_by_c", ...}}.
  """
  length = min(ONEHOT_MAX_LENGTH, max(len(s) for s in data.splits["train"].sequences))
  x = {s: onehot_features(data.splits[s].sequences, length) for s in ("train", *EVAL_SPLITS)}
  fit = choose_strength(x, data, strengths, class_weight)
  model = "logistic regression" if data.kind == "classification" else "ridge"
  return {
    "name": f"one-hot (per-position) {model}",
    "dev": fit["dev"],
    "test": fit["test"],
    "settings": {
      "length": length,
      "c": fit["c"],
      "dev_by_c": fit["dev_by_c"],
      "features": f"one-hot base at each of {length} centred positions",
      "model": f"sklearn {model} on standardised features, C chosen on dev",
      "class_weight": class_weight,
    },
  }


def _classes(data) -> int:
  return data.num_classes if data.kind == "classification" else 0


def _model_name(kind: str, linear: bool = False, c: float | None = 1.0) -> str:
  """The model's description; c None: its strength is chosen on dev."""
  if kind == "classification":
    return f"sklearn LogisticRegression({'C chosen on dev' if c is None else f'C={c:g}'}, lbfgs)"
  if linear:
    return "sklearn LinearRegression"
  return f"sklearn Ridge({'alpha = 1/C, C chosen on dev' if c is None else f'alpha={1 / c:g}'})"


def run_baselines(
  data, ks: Sequence[int] = KMER_SIZES, class_weight: str | None = None
) -> dict[str, dict]:
  """Every baseline on a `datasets.TaskData`: {"gc", "kmer", "onehot"};
  class_weight (None or "balanced") as the model compared with them."""
  return {
    "gc": gc_baseline(data, class_weight),
    "kmer": kmer_baseline(data, ks, class_weight),
    "onehot": onehot_baseline(data, class_weight=class_weight),
  }


def class_weight_of(finetune_cfg, kind: str) -> str | None:
  """sklearn's class_weight for finetune.class_weights: "balanced" for a
  balanced classification, else None."""
  balanced = kind == "classification" and finetune_cfg.class_weights == "balanced"
  return "balanced" if balanced else None


def compare(model_test: dict, baselines: dict[str, dict], kind: str) -> dict:
  """Whether the model beats each baseline on the test headline metric.

  Returns:
    {"metric", "beats": {name: bool}, "text": one plain sentence}.
  """
  headline = metrics_lib.HEADLINE[kind]
  ours = model_test[headline]
  beats = {key: bool(ours > b["test"][headline]) for key, b in baselines.items()}
  label = headline.upper() if headline == "mcc" else headline.capitalize()

  def describe(keys):
    return " or ".join(
      f"the {baselines[k]['name']} ({baselines[k]['test'][headline]:.4f})" for k in keys
    )

  won = [k for k, v in beats.items() if v]
  lost = [k for k, v in beats.items() if not v]
  if not lost:
    text = f"The model (test {label} {ours:.4f}) beats {describe(won).replace(' or ', ' and ')}."
  elif not won:
    text = f"The model (test {label} {ours:.4f}) does not beat {describe(lost)}."
  else:
    text = f"The model (test {label} {ours:.4f}) beats {describe(won)} but not {describe(lost)}."
  return {"metric": headline, "beats": beats, "text": text}


def attach(results: dict, data, class_weight: str | None = None) -> dict:
  """Adds results["baselines"] (GC content, k-mer regression; trained on
  data's train split, `finetune.baselines`, weighted like the model) and
  results["verdict"] (does the model beat them on test); returns `results`."""
  start = time.perf_counter()
  results["baselines"] = run_baselines(data, class_weight=class_weight)
  results["verdict"] = compare(results["test"], results["baselines"], results["kind"])
  logging.info(
    "%s: baselines in %.1f s. %s",
    data.name,
    time.perf_counter() - start,
    results["verdict"]["text"],
  )
  return results
