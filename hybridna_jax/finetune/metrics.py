"""Metrics of understanding tasks, from scikit-learn and scipy.

Classification (labels int (n,), scores (n, k) probabilities or logits):
MCC (the GUE headline; the multi-class form is Gorodkin's R_K,
`sklearn.metrics.matthews_corrcoef`), accuracy, F1 (binary: of class 1; and
macro over classes), AUROC (`roc_auc_score`, trapezoids: ties count half)
and AUPRC (`average_precision_score`, the step-wise average precision).
Multi-class AUROC / AUPRC are one-vs-rest, macro over the classes that have
both positives and negatives.

Regression (targets, predictions float (n,)): Pearson, Spearman
(`scipy.stats`; ties get their average rank), MSE and R^2.

Undefined values (a constant prediction for MCC, a split with one class for
AUROC) are 0 for MCC and NaN for the rest, never an exception or a
warning, so a run with a degenerate dev split still finishes.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats
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
  """float64 (k,): F1 of each class (0 where it has no true or predicted example)."""
  return sk.f1_score(
    labels, predictions, labels=np.arange(num_classes), average=None, zero_division=0.0
  ).astype(np.float64)


def binary_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
  """Area under the ROC curve (trapezoids, so ties count half); NaN with
  one class only."""
  labels = np.asarray(labels).astype(bool)
  if labels.all() or not labels.any():
    return float("nan")
  return float(sk.roc_auc_score(labels, np.asarray(scores, np.float64)))


def binary_auprc(labels: np.ndarray, scores: np.ndarray) -> float:
  """Average precision: sum over thresholds of (recall step) x precision;
  NaN without positives."""
  labels = np.asarray(labels).astype(bool)
  if not labels.any():
    return float("nan")
  return float(sk.average_precision_score(labels, np.asarray(scores, np.float64)))


def _one_vs_rest(metric, labels: np.ndarray, scores: np.ndarray) -> float:
  values = [metric(labels == c, scores[:, c]) for c in range(scores.shape[1])]
  values = [v for v in values if np.isfinite(v)]
  return float(np.mean(values)) if values else float("nan")


def softmax(logits: np.ndarray) -> np.ndarray:
  z = np.asarray(logits, np.float64)
  z = np.exp(z - z.max(axis=-1, keepdims=True))
  return z / z.sum(axis=-1, keepdims=True)


def classification_metrics(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
  """labels int (n,), logits (n, k) -> MCC, accuracy, F1, AUROC, AUPRC and
  the mean cross-entropy ("loss")."""
  labels = np.asarray(labels, np.int64)
  logits = np.asarray(logits, np.float64)
  k = logits.shape[1]
  probs = softmax(logits)
  predictions = np.argmax(logits, axis=1)
  f1 = f1_per_class(labels, predictions, k)
  log_probs = logits - logits.max(1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(1, keepdims=True))
  out = {
    "mcc": mcc(labels, predictions, k),
    "accuracy": float(np.mean(predictions == labels)) if labels.size else float("nan"),
    "f1_macro": float(np.mean(f1)),
    "loss": float(-np.mean(log_probs[np.arange(labels.size), labels])),
  }
  if k == 2:
    out["f1"] = float(f1[1])
    out["auroc"] = binary_auroc(labels == 1, probs[:, 1])
    out["auprc"] = binary_auprc(labels == 1, probs[:, 1])
  else:
    out["auroc"] = _one_vs_rest(binary_auroc, labels, probs)
    out["auprc"] = _one_vs_rest(binary_auprc, labels, probs)
  return out


def rankdata(x: np.ndarray) -> np.ndarray:
  """1-based ranks; tied values get the mean of their ranks."""
  return stats.rankdata(np.asarray(x), method="average").astype(np.float64)


def _correlation(fn, x: np.ndarray, y: np.ndarray) -> float:
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
    return float("nan")
  return float(fn(x, y).statistic)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
  """Pearson correlation (`scipy.stats.pearsonr`); NaN for a constant input."""
  return _correlation(stats.pearsonr, x, y)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
  """Spearman rank correlation (`scipy.stats.spearmanr`); NaN for a constant input."""
  return _correlation(stats.spearmanr, x, y)


def regression_metrics(targets: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
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
