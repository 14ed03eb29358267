"""The design oracle: the dinucleotide shuffle keeps dinucleotide counts
exactly and is uniform; the k-mer oracle's report gives sane shares on
synthetic classes that k-mers separate; bad input is one clear error."""

import collections
import csv
import itertools

import numpy as np
import pytest
from scipy import stats

from hybridna_jax import design
from hybridna_jax.data.tasks import TaskFormatError
from hybridna_jax.design import oracle

MOTIFS = {"x": "GATTACA", "y": "CCGCGGA", "z": "TTTAAAC"}


def _dinucleotides(s):
  return collections.Counter(s[i : i + 2] for i in range(len(s) - 1))


def test_dinucleotide_shuffle_keeps_counts_exactly():
  rng = np.random.default_rng(0)
  seqs = ["", "A", "AC", "AAAA", "ACGTN", "NNACGNNT", "GGGGGGGGT"]
  seqs += ["".join(rng.choice(list("ACGT"), int(rng.integers(3, 300)))) for _ in range(200)]
  changed = 0
  for s in seqs:
    t = oracle.dinucleotide_shuffle(s, rng)
    assert len(t) == len(s) and t[:1] == s[:1] and t[-1:] == s[-1:]
    assert _dinucleotides(t) == _dinucleotides(s), s
    changed += t != s
  assert changed > 190  # long random sequences have many other orders
  assert oracle.shuffle_all(seqs[-5:], seed=3) == oracle.shuffle_all(seqs[-5:], seed=3)


def test_dinucleotide_shuffle_is_uniform_over_sequences_with_those_counts():
  s = "ACAGTCATGA"
  target = _dinucleotides(s)
  same = sorted(
    {
      "".join(p)
      for p in itertools.permutations(s)
      if p[0] == s[0] and p[-1] == s[-1] and _dinucleotides("".join(p)) == target
    }
  )
  assert 5 <= len(same) <= 100
  rng = np.random.default_rng(1)
  draws = collections.Counter(oracle.dinucleotide_shuffle(s, rng) for _ in range(200 * len(same)))
  assert set(draws) == set(same)
  assert stats.chisquare([draws[x] for x in same]).pvalue > 1e-3


def _rows(n, seed, labels=tuple(MOTIFS), length=60):
  """Random sequences with their label's motif planted once."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    label = labels[i % len(labels)]
    seq = list(rng.choice(list("ACGT"), length))
    at = int(rng.integers(0, length - 7))
    seq[at : at + 7] = MOTIFS[label]
    out.append(("".join(seq), label))
  return out


def _csv(path, rows):
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(("sequence", "label"))
    w.writerows(rows)
  return str(path)


def test_oracle_report_real_beats_shuffled_on_separable_classes(tmp_path):
  load = lambda rows, name: design.load_design_csv(_csv(tmp_path / name, rows), ("label",))  # noqa: E731
  train, dev, test = (
    load(_rows(300, 0), "o.csv"),
    load(_rows(90, 1), "d.csv"),
    load(_rows(150, 2), "t.csv"),
  )
  fitted = oracle.KmerOracle.fit(train, dev, "label", classes=("x", "y", "z"), ks=(3, 6))
  assert fitted.k == 6 and set(fitted.dev_by_k) == {"3", "6"} and fitted.dev["accuracy"] > 0.8
  good = {label: [s for s, l in _rows(60, 5) if l == label] for label in MOTIFS}
  rng = np.random.default_rng(7)
  noise = {label: ["".join(rng.choice(list("ACGT"), 60)) for _ in range(20)] for label in MOTIFS}
  report = oracle.judge(fitted, good, test, seed=0)
  mean = report["mean_over_labels"]
  assert report["chance"] == pytest.approx(1 / 3)
  assert mean["real"] > 0.8 and mean["designed"] > 0.8, mean
  assert mean["shuffled"] < 0.6 and mean["real"] > mean["shuffled"] + 0.3, mean
  for by_kind in report["by_label"].values():
    assert set(by_kind) == {"designed", "real", "shuffled"}
    real = by_kind["real"]
    assert real["n"] == 50 and real["hits"] == round(real["share"] * 50)
    assert real["ci95"][0] <= real["share"] <= real["ci95"][1] and 0 <= real["mean_prob"] <= 1
  assert "beat the dinucleotide-shuffled controls" in report["verdict"]
  table = oracle.format_report(report)
  assert "mean over labels" in table and "chance" in table and "6-mer" in table
  # Designs without the motifs: near chance, not above the shuffles.
  weak = oracle.judge(fitted, noise, test, seed=0)
  assert weak["mean_over_labels"]["designed"] < 0.6
  assert "do not beat" in weak["verdict"] or "within noise" in weak["verdict"]


def test_wilson_interval():
  lo, hi = oracle.wilson_interval(5, 10)
  assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
  assert oracle.wilson_interval(0, 10)[0] == 0.0 and oracle.wilson_interval(10, 10)[1] == 1.0


def test_oracle_errors_name_the_file_field_and_fix(tmp_path):
  train = design.load_design_csv(_csv(tmp_path / "o.csv", _rows(30, 0)), ("label",))
  dev = design.load_design_csv(_csv(tmp_path / "d.csv", _rows(9, 1) + [("ACGT", "w")]), ("label",))
  with pytest.raises(
    TaskFormatError, match=r"d\.csv line 11: label 'w' .*not one of the generator's labels"
  ):
    oracle.KmerOracle.fit(train, dev, "label", classes=("x", "y", "z"), ks=(3,))
  with pytest.raises(TaskFormatError, match=r"o\.csv: no rows labelled \['w'\]"):
    oracle.KmerOracle.fit(train, train, "label", classes=("x", "y", "z", "w"), ks=(3,))
  vocab = design.PromptVocab.build(train, kind="categorical", num_bins=2, first_task_token=0)
  paths = {"oracle_csv": train.path, "oracle_dev_csv": train.path, "test_csv": ""}
  with pytest.raises(
    ValueError, match=r"config.generate.test_csv empty while oracle_csv, oracle_dev_csv"
  ):
    oracle.judge_designs(vocab, {}, **paths)
  paths["test_csv"] = str(tmp_path / "missing.csv")
  with pytest.raises(
    FileNotFoundError, match=r"missing\.csv: no such file \(config.generate.test_csv"
  ):
    oracle.judge_designs(vocab, {}, **paths)
  paths["test_csv"] = train.path
  report = oracle.judge_designs(vocab, {"x": ["GATTACA" * 8]}, **paths)
  assert report["by_label"]["x"]["designed"]["n"] == 1 and list(report["by_label"]) == ["x"]
