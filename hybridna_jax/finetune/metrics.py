"""Metrics of understanding tasks, from scikit-learn and scipy.

Classification (labels int (n,), logits or log-probabilities (n, k)):
MCC (the GUE headline; the multi-class form is Gorodkin's R_K,
`sklearn.metrics.matthews_corrcoef`), accuracy, F1 (binary: of class 1; and
macro over the classes in the labels or the predictions), AUROC
(`roc_auc_score`, trapezoids: ties count half) and AUPRC
(`average_precision_score`, the step-wise average precision), both ranking
by each class's log-odds (`one_vs_rest_logits`; binary: z_1 - z_0).
Multi-class AUROC / AUPRC are one-vs-rest, macro over the classes that have
both positives and negatives.

Regression (targets, predictions float (n,)): Pearson, Spearman
(`scipy.stats`; ties get their average rank), MSE and R^2.

Undefined values (a constant prediction for MCC, a split with one class for
AUROC, a NaN or infinite logit for AUROC / AUPRC) are 0 for MCC and NaN for
the rest, never an exception or a warning, so a run with a degenerate dev
split or a diverged model still finishes.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import special, stats
from sklearn import metrics as sk


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
  """int64 (k, k): rows are true classes, columns predicted classes."""
  return sk.confusion_matrix(labels, predictions, labels=np.arange(num_classes)).astype(np.int64)


def mcc(labels: np.ndarray, predictions: np.ndarray, num_classes: int | None = None) -> float:
  """Matthews correlation coefficient (binary and multi-class); 0 if undefined."""
  labels, predictions = np.asarray(labels, np.int64), np.asarray(predictions, np.int64)
  if labels.size == 0:
    return 0.0
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # undefined -> 0.0, as documented
    return float(sk.matthews_corrcoef(labels, predictions))


def f1_per_class(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
  """float64 (k,): F1 of each class; NaN (undefined) for a class with neither
  a true nor a predicted example, e.g. one absent from a small split."""
  classes = np.arange(num_classes)
  f1 = sk.f1_score(labels, predictions, labels=classes, average=None, zero_division=0.0)
  present = np.isin(classes, labels) | np.isin(classes, predictions)
  return np.where(present, f1, np.nan)


def f1_macro(f1: np.ndarray) -> float:
  """The mean of `f1_per_class` over the classes it defines (sklearn's
  average="macro": the classes in the labels or the predictions), so a class
  absent from a split does not count as F1 = 0."""
  defined = f1[np.isfinite(f1)]
  return float(defined.mean()) if defined.size else float("nan")


def binary_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
  """Area under the ROC curve (trapezoids, so ties count half); NaN with
  one class only, or with a non-finite score (a diverged model)."""
  labels = np.asarray(labels).astype(bool)
  scores = np.asarray(scores, np.float64)
  if labels.all() or not labels.any() or not np.isfinite(scores).all():
    return float("nan")
  return float(sk.roc_auc_score(labels, scores))


def binary_auprc(labels: np.ndarray, scores: np.ndarray) -> float:
  """Average precision: sum over thresholds of (recall step) x precision;
  NaN without positives, or with a non-finite score."""
  labels = np.asarray(labels).astype(bool)
  scores = np.asarray(scores, np.float64)
  if not labels.any() or not np.isfinite(scores).all():
    return float("nan")
  return float(sk.average_precision_score(labels, scores))


def _one_vs_rest(metric, labels: np.ndarray, scores: np.ndarray) -> float:
  values = [metric(labels == c, scores[:, c]) for c in range(scores.shape[1])]
  values = [v for v in values if np.isfinite(v)]
  return float(np.mean(values)) if values else float("nan")


def softmax(logits: np.ndarray) -> np.ndarray:
  """(..., classes) logits -> probabilities over the last axis, float64."""
  z = np.asarray(logits, np.float64)
  z = np.exp(z - z.max(axis=-1, keepdims=True))
  return z / z.sum(axis=-1, keepdims=True)


def one_vs_rest_logits(logits: np.ndarray) -> np.ndarray:
  """float64 (n, k): log(p_c / (1 - p_c)) = z_c - logsumexp_{j != c} z_j of
  logits z (or log-probabilities: a constant per row cancels out). The
  ranking score of AUROC / AUPRC: probabilities round to exactly 1.0 (and
  log-probabilities to 0.0) once a margin passes ~37, tying confident
  examples; these differences do not. Two classes: column 1 is z_1 - z_0."""
  z = np.asarray(logits, np.float64)
  out = np.empty_like(z)
  for c in range(z.shape[1]):
    out[:, c] = z[:, c] - special.logsumexp(np.delete(z, c, axis=1), axis=1)
  return out


def classification_metrics(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
  """labels int (n,), logits (n, k) (or log-probabilities, as the baselines
  give) -> MCC, accuracy, F1, AUROC, AUPRC and the mean cross-entropy ("loss")."""
  labels = np.asarray(labels, np.int64)
  logits = np.asarray(logits, np.float64)
  k = logits.shape[1]
  with np.errstate(invalid="ignore", over="ignore"):  # non-finite logits give NaN
    scores = one_vs_rest_logits(logits)
    log_probs = special.log_softmax(logits, axis=1)
  predictions = np.argmax(logits, axis=1)
  f1 = f1_per_class(labels, predictions, k)
  out = {
    "mcc": mcc(labels, predictions, k),
    "accuracy": float(np.mean(predictions == labels)) if labels.size else float("nan"),
    "f1_macro": f1_macro(f1),
    "loss": float(-np.mean(log_probs[np.arange(labels.size), labels])),
  }
  if k == 2:
    out["f1"] = float(f1[1])
    out["auroc"] = binary_auroc(labels == 1, scores[:, 1])
    out["auprc"] = binary_auprc(labels == 1, scores[:, 1])
  else:
    out["auroc"] = _one_vs_rest(binary_auroc, labels, scores)
    out["auprc"] = _one_vs_rest(binary_auprc, labels, scores)
  return out


def per_class(labels: np.ndarray, logits: np.ndarray) -> dict[str, list]:
  """labels int (n,), logits (n, k) -> {"examples": (k,) true examples per
  class, "f1": (k,) F1 per class (NaN: neither true nor predicted),
  "confusion": (k, k) counts, rows true classes, columns predicted}."""
  labels = np.asarray(labels, np.int64)
  k = np.asarray(logits).shape[1]
  predictions = np.argmax(np.asarray(logits, np.float64), axis=1)
  return {
    "examples": np.bincount(labels, minlength=k).tolist(),
    "f1": f1_per_class(labels, predictions, k).tolist(),
    "confusion": confusion_matrix(labels, predictions, k).tolist(),
  }


def rankdata(x: np.ndarray) -> np.ndarray:
  """1-based ranks; tied values get the mean of their ranks."""
  return stats.rankdata(np.asarray(x), method="average").astype(np.float64)


def _correlation(fn, x: np.ndarray, y: np.ndarray) -> float:
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  # A diverged model's inf or NaN: undefined (ranks would still order an inf).
  if x.size < 2 or not (np.isfinite(x).all() and np.isfinite(y).all()):
    return float("nan")
  if np.ptp(x) == 0 or np.ptp(y) == 0:
    return float("nan")
  return float(fn(x, y).statistic)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
  """Pearson correlation (`scipy.stats.pearsonr`); NaN for a constant or
  non-finite input."""
  return _correlation(stats.pearsonr, x, y)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
  """Spearman rank correlation (`scipy.stats.spearmanr`); NaN for a constant
  or non-finite input."""
  return _correlation(stats.spearmanr, x, y)


def regression_metrics(targets: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
  """(n,) targets and predictions -> Pearson, Spearman, MSE, R^2 and loss (MSE)."""
  targets = np.asarray(targets, np.float64)
  predictions = np.asarray(predictions, np.float64)
  mse = float(np.mean((predictions - targets) ** 2))
  variance = float(np.var(targets))
  return {
    "pearson": pearson(predictions, targets),
    "spearman": spearman(predictions, targets),
    "mse": mse,
    "r2": 1.0 - mse / variance if variance > 0 else float("nan"),
    "loss": mse,
  }


# The headline metric of each task kind (selection on dev, first column of tables).
HEADLINE = {"classification": "mcc", "regression": "pearson"}
