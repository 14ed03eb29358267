"""Metrics of understanding tasks, in numpy (no scikit-learn dependency).

Classification (labels int (n,), scores (n, k) probabilities or logits):
MCC (the GUE headline; the multi-class form is Gorodkin's R_K, as in
scikit-learn's `matthews_corrcoef`), accuracy, F1 (binary: of class 1; and
macro over classes), AUROC and AUPRC (average precision, scikit-learn's
step-wise definition). Multi-class AUROC / AUPRC are one-vs-rest, macro
over the classes that have both positives and negatives.

Regression (targets, predictions float (n,)): Pearson, Spearman (ties get
their average rank), MSE and R^2.

Undefined values (a constant prediction for MCC, a split with one class for
AUROC) are 0 for MCC and NaN for the rest, never an exception, so a run with
a degenerate dev split still finishes.
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
  """int64 (k, k): rows are true classes, columns predicted classes."""
  labels = np.asarray(labels, np.int64)
  predictions = np.asarray(predictions, np.int64)
  return np.bincount(
    labels * num_classes + predictions, minlength=num_classes * num_classes
  ).reshape(num_classes, num_classes)


def mcc(labels: np.ndarray, predictions: np.ndarray, num_classes: int | None = None) -> float:
  """Matthews correlation coefficient (binary and multi-class); 0 if undefined."""
  k = num_classes or int(max(np.max(labels, initial=0), np.max(predictions, initial=0))) + 1
  cm = confusion_matrix(labels, predictions, k).astype(np.float64)
  samples = cm.sum()
  correct = np.trace(cm)
  true_counts, pred_counts = cm.sum(axis=1), cm.sum(axis=0)
  cov = correct * samples - pred_counts @ true_counts
  denom = np.sqrt(
    (samples**2 - pred_counts @ pred_counts) * (samples**2 - true_counts @ true_counts)
  )
  return float(cov / denom) if denom > 0 else 0.0


def f1_per_class(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
  """float64 (k,): F1 of each class (0 where it has no true or predicted example)."""
  cm = confusion_matrix(labels, predictions, num_classes).astype(np.float64)
  tp = np.diag(cm)
  denom = cm.sum(axis=0) + cm.sum(axis=1)  # 2 tp + fp + fn
  return np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)


def _binary_ranking(labels: np.ndarray, scores: np.ndarray):
  """Distinct thresholds from the highest score down: cumulative true and
  false positives at each (ties form one threshold)."""
  order = np.argsort(-scores, kind="stable")
  scores, labels = scores[order], labels[order]
  last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), labels.size - 1]
  tps = np.cumsum(labels)[last_of_tie]
  fps = (last_of_tie + 1) - tps
  return tps.astype(np.float64), fps.astype(np.float64)


def binary_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
  """Area under the ROC curve (trapezoids, so ties count half); NaN with
  one class only."""
  labels = np.asarray(labels).astype(bool)
  scores = np.asarray(scores, np.float64)
  positives, negatives = labels.sum(), (~labels).sum()
  if positives == 0 or negatives == 0:
    return float("nan")
  tps, fps = _binary_ranking(labels, scores)
  tpr = np.r_[0.0, tps / positives]
  fpr = np.r_[0.0, fps / negatives]
  return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def binary_auprc(labels: np.ndarray, scores: np.ndarray) -> float:
  """Average precision: sum over thresholds of (recall step) x precision;
  NaN without positives."""
  labels = np.asarray(labels).astype(bool)
  scores = np.asarray(scores, np.float64)
  positives = labels.sum()
  if positives == 0:
    return float("nan")
  tps, fps = _binary_ranking(labels, scores)
  precision = tps / (tps + fps)
  recall = tps / positives
  return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


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
  x = np.asarray(x)
  order = np.argsort(x, kind="stable")
  sorted_x = x[order]
  starts = np.r_[0, np.flatnonzero(np.diff(sorted_x)) + 1]
  ends = np.r_[starts[1:], x.size]
  average = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
  ranks = np.empty(x.size, np.float64)
  ranks[order] = np.repeat(average, ends - starts)
  return ranks


def pearson(x: np.ndarray, y: np.ndarray) -> float:
  x = np.asarray(x, np.float64) - np.mean(x)
  y = np.asarray(y, np.float64) - np.mean(y)
  denom = np.sqrt((x @ x) * (y @ y))
  return float(x @ y / denom) if denom > 0 else float("nan")


def spearman(x: np.ndarray, y: np.ndarray) -> float:
  return pearson(rankdata(x), rankdata(y))


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
