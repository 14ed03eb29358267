"""Baselines beside fine-tuning results: GC content and k-mer regression
fitted on train, k chosen on dev, reported on test with a plain verdict."""

import json
import os

import numpy as np
import pytest

from hybridna_jax import tokenizer
from hybridna_jax.data.tasks import TaskSplit
from hybridna_jax.finetune import baselines, datasets, report


def _task(splits, name="toy"):
  return datasets.TaskData(name, "mem", "gue", splits)


def _gc_task(rng):
  """Label 1: GC-rich sequences (60%), label 0: GC-poor (40%)."""

  def split(n):
    labels = rng.integers(0, 2, n)
    seqs = [
      "".join(rng.choice(list("ACGT"), 60, p=[0.2, 0.3, 0.3, 0.2] if y else [0.3, 0.2, 0.2, 0.3]))
      for y in labels
    ]
    return TaskSplit(seqs, labels.astype(np.int64))

  return _task({"train": split(300), "dev": split(100), "test": split(100)})


def _motif_task(rng):
  """Label 1: a planted GAATTC in uniform random sequence (GC carries no signal)."""

  def split(n):
    labels = rng.integers(0, 2, n)
    seqs = []
    for y in labels:
      s = "".join(rng.choice(list("ACGT"), 60))
      if y:
        at = int(rng.integers(0, 54))
        s = s[:at] + "GAATTC" + s[at + 6 :]
      seqs.append(s)
    return TaskSplit(seqs, labels.astype(np.int64))

  return _task({"train": split(400), "dev": split(150), "test": split(150)})


def test_kmer_features_count_both_strands_and_skip_n():
  x = baselines.kmer_features(["AACN", "A"], 2)
  assert x.shape == (2, 16)
  # AA, AC on the forward strand; GT, TT on the reverse complement (NGTT).
  expected = np.zeros(16)
  expected[[0, 1, 11, 15]] = 0.25
  np.testing.assert_allclose(x[0], expected)
  assert x[1].sum() == 0  # too short
  assert np.allclose(baselines.kmer_features(["ACGGT"], 3), baselines.kmer_features(["ACCGT"], 3))


def test_gc_baseline_finds_gc_and_kmer_finds_a_motif():
  rng = np.random.default_rng(0)
  gc_task = _gc_task(rng)
  gc = baselines.gc_baseline(gc_task)
  assert gc["test"]["mcc"] > 0.7 and gc["test"]["examples"] == 100
  motif = _motif_task(rng)
  found = baselines.run_baselines(motif, ks=(3, 6))
  assert abs(found["gc"]["test"]["mcc"]) < 0.3  # GC says nothing here
  assert found["kmer"]["settings"]["k"] == 6, found["kmer"]["settings"]  # chosen on dev
  assert set(found["kmer"]["settings"]["dev_by_k"]) == {"3", "6"}
  # k and the strength chosen together on dev, on the linear probes' grid.
  assert found["kmer"]["settings"]["c"] in baselines.KMER_STRENGTHS
  assert found["kmer"]["dev"]["mcc"] == max(found["kmer"]["settings"]["dev_by_k"].values())
  assert found["kmer"]["test"]["mcc"] > 0.5 and found["kmer"]["test"]["auroc"] > 0.8
  assert found["kmer"]["name"] == "6-mer logistic regression"


def test_onehot_baseline_sees_where_a_motif_sits():
  # Both classes hold GT once in random sequence: at the centre (label 1)
  # or 8 nt to its left (label 0). Same composition, so k-mer frequencies
  # cannot tell them apart; the per-position one-hot model can.
  rng = np.random.default_rng(2)

  def split(n):
    labels = rng.integers(0, 2, n)
    seqs = []
    for y in labels:
      seq = list(rng.choice(list("AC"), 41))  # no G or T: GT occurs once
      at = 20 if y else 12
      seq[at : at + 2] = "GT"
      seqs.append("".join(seq))
    return TaskSplit(seqs, labels)

  task = _task({"train": split(300), "dev": split(100), "test": split(100)})
  found = baselines.run_baselines(task, ks=(3,))
  assert found["onehot"]["test"]["mcc"] > 0.9, found["onehot"]
  assert found["kmer"]["test"]["mcc"] < 0.4, found["kmer"]
  assert found["onehot"]["settings"]["length"] == 41
  assert set(found["onehot"]["settings"]["dev_by_c"]) == {
    str(c) for c in baselines.ONEHOT_STRENGTHS
  }
  x = baselines.onehot_features(["ACGTN", "ACGTACG"], 5)  # centred: cropped, padded
  np.testing.assert_array_equal(x[0].reshape(5, 4).argmax(1)[:4], [0, 1, 2, 3])
  assert x[0].reshape(5, 4)[4].sum() == 0  # N is all zero
  np.testing.assert_array_equal(x[1].reshape(5, 4).argmax(1), [1, 2, 3, 0, 1])  # CGTAC
  assert baselines.onehot_features(["AC"], 4).reshape(4, 4).sum(1).tolist() == [0, 1, 1, 0]


def test_regression_baselines_and_a_class_missing_from_train():
  rng = np.random.default_rng(1)

  def split(n):
    seqs = ["".join(rng.choice(list("ACGT"), 40)) for _ in range(n)]
    gc = baselines.gc_features(seqs)[:, 0]
    return TaskSplit(seqs, (3 * gc + rng.normal(0, 0.05, n)).astype(np.float32))

  task = _task({"train": split(200), "dev": split(60), "test": split(60)})
  found = baselines.run_baselines(task, ks=(3,))
  assert found["gc"]["test"]["pearson"] > 0.9 and "mse" in found["kmer"]["test"]
  assert found["kmer"]["name"] == "3-mer ridge"
  # Three classes, class 2 only outside train: its log-probability is -1e9.
  seqs = [tokenizer.decode(rng.integers(tokenizer.A, tokenizer.T + 1, 20)) for _ in range(30)]
  labels = np.arange(30) % 3
  x = {"train": baselines.gc_features(seqs[:20]), "test": baselines.gc_features(seqs[20:])}
  train_labels = np.where(labels[:20] == 2, 0, labels[:20])
  out = baselines.fit_predict("classification", x, train_labels, num_classes=3)
  assert out["test"].shape == (10, 3) and (out["test"][:, 2] == -1e9).all()


def test_verdict_and_reports(tmp_path):
  fake = lambda mcc: {"name": f"b{mcc}", "test": {"mcc": mcc, "examples": 4}}
  found = {"gc": fake(0.1), "kmer": fake(0.7)}
  verdict = baselines.compare({"mcc": 0.45}, found, "classification")
  assert verdict["beats"] == {"gc": True, "kmer": False}
  assert verdict["text"] == (
    "The model (test MCC 0.4500) beats the b0.1 (0.1000) but not the b0.7 (0.7000)."
  )
  assert "does not beat" in baselines.compare({"mcc": 0.0}, found, "classification")["text"]
  assert (
    "beats the b0.1 (0.1000) and the b0.7"
    in (baselines.compare({"mcc": 0.9}, found, "classification")["text"])
  )
  results = {
    "task": "toy",
    "kind": "classification",
    "embedding": "echo mean",
    "selected_step": 4,
    "total_steps": 8,
    "backbone": "fresh init",
    "dev": {"mcc": 0.5, "examples": 4},
    "test": {"mcc": 0.45, "examples": 4},
    "baselines": found,
    "verdict": verdict,
  }
  # results.json marks a finished run (a suite reuses it): written last, so
  # a run killed while its other files are written is not taken as done.
  with pytest.MonkeyPatch.context() as m:
    m.setattr(report, "plot_baselines", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
      report.write_results(str(tmp_path), results)
  assert not os.path.exists(tmp_path / "results.json")
  paths = report.write_results(str(tmp_path), results)
  table = open(paths["table"]).read()
  assert verdict["text"] in table
  assert "| toy | baseline: b0.7 | test | 4 | 0.7000 |" in table
  assert os.path.getsize(paths["baselines_plot"]) > 10_000
  assert json.load(open(paths["json"]))["verdict"]["beats"]["kmer"] is False
  rows = report.result_rows(results)
  assert [(r["system"], r["split"]) for r in rows] == [
    ("model", "dev"),
    ("model", "test"),
    ("gc", "test"),
    ("kmer", "test"),
  ]
  assert os.path.getsize(report.plot_suite(rows, str(tmp_path / "suite.png"))) > 10_000
  # An undefined metric (MCC of a constant predictor) is null in strict JSON,
  # and a suite reusing that results.json still tabulates and plots it.
  results["test"]["mcc"] = float("nan")
  results["test"]["confusion"] = np.array([[2, 0], [2, 0]])
  report.write_results(str(tmp_path), results)

  def refuse(token):
    raise ValueError(f"non-strict JSON token {token}")

  saved = json.loads(open(paths["json"]).read(), parse_constant=refuse)
  assert saved["test"]["mcc"] is None and saved["test"]["confusion"] == [[2, 0], [2, 0]]
  rows = report.result_rows(saved)
  assert "| toy | echo mean | test | 4 | - |" in report.metrics_table(rows)
  assert os.path.getsize(report.plot_suite(rows, str(tmp_path / "suite.png"))) > 10_000


def test_attach_baselines_on_a_loaded_task(tmp_path):
  from hybridna_jax.finetune import example_tasks

  folder = example_tasks.make_motif_task(
    str(tmp_path / "motif"), n_train=256, n_dev=64, n_test=64, min_length=16, max_length=32
  )
  data = datasets.load_task(folder, log=False)
  results = {"kind": "classification", "test": {"mcc": 0.0}}
  baselines.attach(results, data)
  assert set(results["baselines"]) == {"gc", "kmer", "onehot"}
  assert results["baselines"]["kmer"]["settings"]["k"] in baselines.KMER_SIZES
  assert results["verdict"]["beats"]["kmer"] is False  # an MCC of 0 beats nothing useful
