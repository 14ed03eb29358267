"""Fine-tuning metrics against values computed by hand."""

import math

import numpy as np
import pytest

from hybridna_jax.finetune import metrics as m


def _binary_logits(scores):
  s = np.asarray(scores, np.float64)
  return np.log(np.stack([1 - s, s], axis=1))  # softmax(...)[:, 1] == scores


def test_binary_classification_by_hand():
  labels = np.array([1, 1, 0, 0, 1, 0])
  scores = np.array([0.9, 0.4, 0.3, 0.6, 0.8, 0.1])
  # Predictions at 0.5: [1, 0, 0, 1, 1, 0] -> TP 2, FN 1, FP 1, TN 2.
  out = m.classification_metrics(labels, _binary_logits(scores))
  assert out["mcc"] == pytest.approx((2 * 2 - 1 * 1) / math.sqrt(3 * 3 * 3 * 3))
  assert out["f1"] == pytest.approx(2 / 3)
  assert out["f1_macro"] == pytest.approx(2 / 3)
  assert out["accuracy"] == pytest.approx(4 / 6)
  assert out["auroc"] == pytest.approx(8 / 9)  # 8 of 9 pairs ranked right
  assert out["auprc"] == pytest.approx(1 / 3 + 1 / 3 + 1 / 3 * 3 / 4)
  expected_loss = -np.mean(np.log(np.where(labels == 1, scores, 1 - scores)))
  assert out["loss"] == pytest.approx(expected_loss)


def test_ties_and_degenerate_cases():
  assert m.binary_auroc(np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(0.5)
  assert m.binary_auprc(np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(0.5)
  assert math.isnan(m.binary_auroc(np.array([1, 1]), np.array([0.2, 0.3])))
  assert math.isnan(m.binary_auprc(np.array([0, 0]), np.array([0.2, 0.3])))
  assert m.mcc(np.array([0, 1, 1]), np.array([1, 1, 1])) == 0.0  # constant prediction
  assert m.mcc(np.array([0, 1, 0, 1]), np.array([1, 0, 1, 0])) == pytest.approx(-1.0)


def test_multiclass_by_hand():
  labels = np.array([0, 1, 2, 0, 1, 2])
  predictions = np.array([0, 2, 2, 0, 1, 1])
  # Confusion [[2,0,0],[0,1,1],[0,1,1]]: (4*6 - 12) / sqrt((36-12) * (36-12)).
  assert m.mcc(labels, predictions, 3) == pytest.approx(0.5)
  np.testing.assert_allclose(m.f1_per_class(labels, predictions, 3), [1.0, 0.5, 0.5])
  logits = np.full((6, 3), -2.0)
  logits[np.arange(6), predictions] = 2.0
  out = m.classification_metrics(labels, logits)
  assert out["mcc"] == pytest.approx(0.5) and out["accuracy"] == pytest.approx(4 / 6)
  assert out["f1_macro"] == pytest.approx(2 / 3) and "f1" not in out
  # One-vs-rest. Class 0 is ranked perfectly. Class 1: positives rows 1 (low
  # score) and 4 (high); negatives 0, 2, 3 (low) and 5 (high): row 4 wins 3
  # pairs and ties 1, row 1 ties 3 and loses 1 -> (3.5 + 1.5) / 8. Class 2
  # is the mirror image.
  assert out["auroc"] == pytest.approx(np.mean([1.0, 5 / 8, 5 / 8]))
  perfect = np.eye(3)[labels] * 5
  assert m.classification_metrics(labels, perfect)["auprc"] == pytest.approx(1.0)


def test_regression_by_hand():
  x, y = np.array([1.0, 2, 3, 4]), np.array([2.0, 4, 5, 9])
  assert m.pearson(x, y) == pytest.approx(11 / math.sqrt(5 * 26))
  assert m.spearman(x, y) == pytest.approx(1.0)
  np.testing.assert_allclose(m.rankdata([1, 2, 2, 3]), [1, 2.5, 2.5, 4])
  assert m.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
  out = m.regression_metrics(y, x)
  assert out["mse"] == pytest.approx(np.mean((x - y) ** 2))
  assert out["r2"] == pytest.approx(1 - out["mse"] / np.var(y))
  assert math.isnan(m.pearson([1, 1, 1], [1, 2, 3]))
