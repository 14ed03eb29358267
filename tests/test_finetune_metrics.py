"""Fine-tuning metrics (scikit-learn / scipy) against values computed by
hand and against the project's former hand-written numpy metrics."""

import math
import warnings

import numpy as np
import pytest
from sklearn import metrics as sk

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
  # A diverged model's NaN or infinite logits: NaN rankings, no exception
  # or warning (review: sklearn raised, and the run stopped at its eval).
  labels = np.array([0, 1, 0, 1])
  for bad in (np.nan, np.inf):
    logits = _binary_logits(np.array([0.1, 0.9, 0.2, 0.8]))
    logits[2, 1] = bad
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      out = m.classification_metrics(labels, logits)
    assert math.isnan(out["auroc"]) and math.isnan(out["auprc"]) and not math.isfinite(out["loss"])
    out3 = m.classification_metrics(np.array([0, 1, 2, 1]), np.c_[logits, np.zeros(4)])
    assert math.isnan(out3["auroc"]) and math.isnan(out3["auprc"])


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


def test_f1_macro_leaves_out_classes_absent_from_the_split():
  labels = np.array([0, 1, 0, 1, 0, 1])  # a 3-class task; class 2 is not in this split
  out = m.classification_metrics(labels, np.eye(3)[labels] * 5.0)  # perfect predictions
  assert out["f1_macro"] == pytest.approx(1.0)
  np.testing.assert_array_equal(m.f1_per_class(labels, labels, 3), [1.0, 1.0, np.nan])
  predictions = np.array([0, 1, 2, 1, 0, 0])  # class 2 predicted, never true: F1 0, counted
  f1 = m.f1_per_class(labels, predictions, 4)
  assert np.isnan(f1[3]) and f1[2] == 0.0
  assert m.f1_macro(f1) == pytest.approx(sk.f1_score(labels, predictions, average="macro"))


def test_per_class_results_against_sklearn():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, 40)  # a 4-class task; class 3 absent from this split
  logits = rng.normal(size=(40, 4))
  out = m.per_class(labels, logits)
  predictions = logits.argmax(1)
  assert out["confusion"] == sk.confusion_matrix(labels, predictions, labels=range(4)).tolist()
  assert out["examples"] == np.bincount(labels, minlength=4).tolist()
  expected = sk.f1_score(labels, predictions, labels=range(4), average=None, zero_division=0)
  present = np.isin(range(4), labels) | np.isin(range(4), predictions)
  np.testing.assert_allclose(out["f1"], np.where(present, expected, np.nan))


def test_auroc_and_auprc_rank_logits_past_softmax_saturation():
  # Margins above ~37 round softmax probabilities to exactly 1.0 (ties).
  labels = np.array([1, 1, 0, 0])
  logits = np.stack([np.zeros(4), [50.0, 45.0, 40.0, -1.0]], axis=1)
  out = m.classification_metrics(labels, logits)
  assert out["auroc"] == 1.0 and out["auprc"] == 1.0
  # One-vs-rest: class 0 ranks rows 0, 1 above row 2 only by its log-odds.
  labels = np.array([0, 0, 1, 2])
  logits = np.array([[60.0, 0, 0], [50, 0, 0], [45, 0, 0], [0, 0, 3]])
  scores = m.one_vs_rest_logits(logits)
  for c in range(3):
    rest = np.log(np.exp(np.delete(logits, c, axis=1)).sum(axis=1))
    np.testing.assert_allclose(scores[:, c], logits[:, c] - rest)
  # Class 1's positive (row 2) ranks below row 3 only: AUROC 2/3; classes 0, 2: 1.
  assert m.classification_metrics(labels, logits)["auroc"] == pytest.approx(np.mean([1, 2 / 3, 1]))
  # Log-probabilities (the baselines' outputs) rank the same.
  log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
  np.testing.assert_allclose(m.one_vs_rest_logits(log_probs), scores, rtol=1e-9, atol=1e-9)


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
  # A diverged model's inf or NaN prediction: both correlations undefined,
  # without a warning (review of stop 37: Spearman ranked the inf, 0.4).
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    for bad in (np.inf, np.nan):
      out = m.regression_metrics(y, np.array([1.0, bad, 3, 4]))
      assert math.isnan(out["pearson"]) and math.isnan(out["spearman"])


# -- the former hand-written numpy metrics, kept as the reference -----------------------


def _hand_mcc(labels, predictions, k):
  cm = np.bincount(labels * k + predictions, minlength=k * k).reshape(k, k).astype(np.float64)
  samples, correct = cm.sum(), np.trace(cm)
  t, p = cm.sum(axis=1), cm.sum(axis=0)
  denom = np.sqrt((samples**2 - p @ p) * (samples**2 - t @ t))
  return float((correct * samples - p @ t) / denom) if denom > 0 else 0.0


def _hand_f1(labels, predictions, k):
  cm = np.bincount(labels * k + predictions, minlength=k * k).reshape(k, k).astype(np.float64)
  denom = cm.sum(axis=0) + cm.sum(axis=1)
  # NaN (undefined) for a class with neither a true nor a predicted example.
  return np.divide(2 * np.diag(cm), denom, out=np.full(k, np.nan), where=denom > 0)


def _hand_ranking(labels, scores):
  order = np.argsort(-scores, kind="stable")
  scores, labels = scores[order], labels[order]
  last = np.r_[np.flatnonzero(np.diff(scores)), labels.size - 1]
  tps = np.cumsum(labels)[last].astype(np.float64)
  return tps, (last + 1) - tps


def _hand_auroc(labels, scores):
  pos, neg = labels.sum(), (~labels).sum()
  if pos == 0 or neg == 0:
    return float("nan")
  tps, fps = _hand_ranking(labels, scores)
  tpr, fpr = np.r_[0.0, tps / pos], np.r_[0.0, fps / neg]
  return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def _hand_auprc(labels, scores):
  if labels.sum() == 0:
    return float("nan")
  tps, fps = _hand_ranking(labels, scores)
  return float(np.sum(np.diff(np.r_[0.0, tps / labels.sum()]) * tps / (tps + fps)))


def _hand_rankdata(x):
  order = np.argsort(x, kind="stable")
  sx = x[order]
  starts = np.r_[0, np.flatnonzero(np.diff(sx)) + 1]
  ends = np.r_[starts[1:], x.size]
  ranks = np.empty(x.size)
  ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
  return ranks


def _hand_pearson(x, y):
  x, y = x - x.mean(), y - y.mean()
  denom = np.sqrt((x @ x) * (y @ y))
  return float(x @ y / denom) if denom > 0 else float("nan")


@pytest.mark.parametrize("k", [2, 3, 5])
def test_library_metrics_agree_with_the_former_hand_written_ones(k):
  rng = np.random.default_rng(k)
  for trial in range(20):
    n = int(rng.integers(2, 80))
    labels = rng.integers(0, k, n)
    # Coarse scores (many ties) on half of the trials.
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[labels]
    if trial % 2:
      logits = np.round(logits)
    predictions = np.argmax(logits, axis=1)
    assert m.mcc(labels, predictions, k) == pytest.approx(_hand_mcc(labels, predictions, k))
    f1 = m.f1_per_class(labels, predictions, k)
    np.testing.assert_allclose(f1, _hand_f1(labels, predictions, k))
    assert m.f1_macro(f1) == pytest.approx(sk.f1_score(labels, predictions, average="macro"))
    probs = m.softmax(logits)
    for c in range(k):
      for ours, hand in ((m.binary_auroc, _hand_auroc), (m.binary_auprc, _hand_auprc)):
        np.testing.assert_allclose(ours(labels == c, probs[:, c]), hand(labels == c, probs[:, c]))
    x = np.round(rng.normal(size=n), 1)
    y = x + rng.normal(size=n)
    np.testing.assert_allclose(m.rankdata(x), _hand_rankdata(x))
    assert m.pearson(x, y) == pytest.approx(_hand_pearson(x, y))
    assert m.spearman(x, y) == pytest.approx(_hand_pearson(_hand_rankdata(x), _hand_rankdata(y)))
