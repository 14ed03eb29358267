"""Frozen-embedding linear probes: embeddings from the jitted Scorer, a
linear model chosen on dev, the fine-tuning metrics and reports."""

import json
import os

import numpy as np
import pytest

from hybridna_jax.config import ModelConfig, load_config
from hybridna_jax.data.tasks import TaskSplit
from hybridna_jax.finetune import baselines as baselines_lib
from hybridna_jax.finetune import datasets, example_tasks, probe
from hybridna_jax.finetune import task as task_lib
from hybridna_jax.model import create_model
from hybridna_jax.scoring import Scorer


def _gc_split(rng, n, length=48):
  """Label 1: GC-rich (65% G+C), label 0: GC-poor (35%)."""
  labels = rng.integers(0, 2, n)
  rich, poor = [0.175, 0.325, 0.325, 0.175], [0.325, 0.175, 0.175, 0.325]
  seqs = ["".join(rng.choice(list("ACGT"), length, p=rich if y else poor)) for y in labels]
  return seqs, labels


@pytest.fixture(scope="module")
def gc_task(tmp_path_factory):
  folder = tmp_path_factory.mktemp("gc_task")
  rng = np.random.default_rng(0)
  for split, n in (("train", 160), ("dev", 64), ("test", 64)):
    example_tasks.write_split(os.path.join(folder, f"{split}.csv"), *_gc_split(rng, n))
  return str(folder)


def test_fit_probe_chooses_the_strength_on_dev():
  rng = np.random.default_rng(0)
  labels = {s: rng.integers(0, 2, n) for s, n in (("train", 200), ("dev", 80), ("test", 80))}
  # Feature 0 carries the label; 20 more are noise.
  features = {
    s: np.c_[y + rng.normal(0, 0.3, y.size), rng.normal(size=(y.size, 20))]
    for s, y in labels.items()
  }
  data = datasets.TaskData(
    "toy", "mem", "gue", {s: TaskSplit(["ACGT"] * y.size, y) for s, y in labels.items()}
  )
  fit = probe.fit_probe(features, data)
  assert fit["test"]["mcc"] > 0.8 and fit["test"]["examples"] == 80
  assert set(fit["dev_by_c"]) == {str(c) for c in probe.STRENGTHS}
  assert fit["dev_by_c"][str(fit["c"])] == max(fit["dev_by_c"].values())


def test_probe_of_token_embeddings_reads_base_composition(gc_task):
  # Layer 0 mean pooling is a linear function of base composition, so even
  # an untrained model's probe separates GC-rich from GC-poor sequences.
  cfg = ModelConfig.from_config(load_config("configs/tiny.py").model)
  scorer = Scorer(create_model(cfg, seed=0), context=128, batch_size=64, min_bucket=64)
  data = datasets.load_task(gc_task, log=False)
  results = probe.probe(scorer, data, pooling="mean", layer=0)
  assert results["test"]["mcc"] > 0.8, results["test"]
  assert results["embedding"] == "linear probe: mean, token embeddings"
  assert results["settings"]["features"] == cfg.d_model
  # Echo embeddings of the final norm, both strands: one row per sequence.
  emb = probe.embed_splits(scorer, data, pooling="echo", layer=-1, rc_average=True)
  assert {s: e.shape for s, e in emb.items()} == {
    "train": (160, cfg.d_model),
    "dev": (64, cfg.d_model),
    "test": (64, cfg.d_model),
  }
  assert probe.probe_context(data, "echo", 4096) == 128  # 2 * 48 + 1 -> 128
  assert probe.probe_context(data, "mean", 4096) == 64


def test_finetune_with_probe_writes_results_and_baselines(gc_task, tmp_path):
  cfg = load_config("configs/finetune_tiny.py:probe")
  cfg.finetune.task = gc_task
  cfg.score.pooling, cfg.score.layer = "mean", 0
  workdir = str(tmp_path / "probe")
  results = task_lib.finetune(cfg, workdir)["results"]
  assert results["backbone"] == "fresh init" and results["test"]["mcc"] > 0.8
  assert set(results["baselines"]) == {"gc", "kmer", "onehot"}
  saved = json.load(open(os.path.join(workdir, "results.json")))
  assert saved["test"]["mcc"] == pytest.approx(results["test"]["mcc"])
  table = open(os.path.join(workdir, "results.md")).read()
  assert "chosen on dev mcc; backbone: fresh init" in table
  assert "linear probe: mean, token embeddings" in table and results["verdict"]["text"] in table
  confusion = np.array(saved["test_per_class"]["confusion"])  # the probe's, as a head's
  assert np.trace(confusion) / confusion.sum() == pytest.approx(results["test"]["accuracy"])
  assert "Test, per class" in table


def test_the_probe_crops_to_max_length_and_refuses_echo_under_a_plain_preset(
  gc_task, tmp_path, monkeypatch
):
  """Review of stop 37: the probe embedded whole sequences whatever
  finetune.max_length said, and probed echo embeddings under a plain preset
  (finetune.echo=False) when score.pooling was echo."""
  cfg = load_config("configs/finetune_tiny.py:plain_mean,probe")
  cfg.finetune.task, cfg.finetune.baselines, cfg.finetune.max_length = gc_task, False, 8
  cfg.score.pooling, cfg.score.layer = "mean", 0
  embedded = []
  real = Scorer.embed
  monkeypatch.setattr(
    Scorer, "embed", lambda self, seqs, **kw: embedded.extend(seqs) or real(self, seqs, **kw)
  )
  results = task_lib.finetune(cfg, str(tmp_path / "cropped"))["results"]
  assert {len(s) for s in embedded} == {8} and results["settings"]["max_length"] == 8
  data = datasets.load_task(gc_task, log=False)
  assert embedded[0] == data.splits["train"].sequences[0][20:28]  # the centre, as fine-tuning
  cfg.score.pooling = "echo"
  with pytest.raises(ValueError, match=r"finetune.echo=False .* but score.pooling='echo'"):
    task_lib.finetune(cfg, str(tmp_path / "echo"))


def test_a_train_split_of_one_class_is_refused_before_training(tmp_path):
  """Review of stop 37: it trained to the end, then the baselines failed
  and no results were written (a rerun failed again)."""
  (tmp_path / "train.csv").write_text("sequence,label\nACGT,0\nGGCC,0\nTTAA,0\nCCGG,0\n")
  (tmp_path / "dev.csv").write_text("sequence,label\nAAAA,0\nCCCC,1\n")
  (tmp_path / "test.csv").write_text("sequence,label\nACGA,1\nACGC,0\n")
  with pytest.raises(ValueError, match=r"the train split holds only class 0 \(of \[0, 1\]\)"):
    datasets.load_task(str(tmp_path), log=False)


def test_probe_of_echo_views_equals_one_probe_per_pooling(gc_task, tmp_path):
  # Four probes from two passes per sequence: each as its own probe() call.
  cfg = load_config("configs/finetune_tiny.py:probe")
  cfg.finetune.task = gc_task
  cfg.finetune.baselines = False
  cfg.score.layer = 1
  data = datasets.load_task(gc_task, log=False)
  found = probe.run_probe_echo_views(cfg, str(tmp_path / "views"), data)
  assert sorted(found) == sorted(probe.ECHO_VIEWS)
  scorer, _ = probe.probe_scorer(cfg, data, "echo")
  for view, (pooling, rc_average) in probe.ECHO_VIEWS.items():
    one = probe.probe(scorer, data, pooling=pooling, layer=1, rc_average=rc_average)
    assert found[view]["embedding"] == one["embedding"]
    assert found[view]["settings"]["c"] == one["settings"]["c"]
    for split in ("dev", "test"):
      np.testing.assert_allclose(found[view][split]["mcc"], one[split]["mcc"], atol=1e-6)
    saved = json.load(open(tmp_path / "views" / view / "results.json"))
    assert saved["test"]["mcc"] == pytest.approx(found[view]["test"]["mcc"])


def test_balanced_class_weights_reach_the_probe_and_the_baselines():
  """finetune.class_weights='balanced' was ignored by the probe (same
  numbers as unweighted); it now weighs the probe and its baselines alike."""
  rng = np.random.default_rng(1)
  labels = {s: (rng.random(n) < 0.1).astype(np.int64) for s, n in (("train", 300), ("dev", 100))}
  labels["test"] = (rng.random(100) < 0.1).astype(np.int64)
  features = {
    s: np.c_[y + rng.normal(0, 1.2, y.size), rng.normal(size=y.size)] for s, y in labels.items()
  }
  seqs = {s: ["".join(rng.choice(list("ACGT"), 20)) for _ in y] for s, y in labels.items()}
  data = datasets.TaskData(
    "toy", "mem", "gue", {s: TaskSplit(seqs[s], y) for s, y in labels.items()}
  )
  plain = probe.fit_probe(features, data)
  balanced = probe.fit_probe(features, data, class_weight="balanced")
  assert balanced["test"] != plain["test"]
  cfg = load_config("configs/finetune_tiny.py").finetune
  cfg.class_weights = "balanced"
  assert baselines_lib.class_weight_of(cfg, "classification") == "balanced"
  assert baselines_lib.class_weight_of(cfg, "regression") is None
  found = baselines_lib.run_baselines(data, ks=(2,), class_weight="balanced")
  assert all(b["settings"]["class_weight"] == "balanced" for b in found.values())


def test_probe_restores_with_the_score_sections_numerics_and_kernels(gc_task, monkeypatch):
  """Review: a probe of finetune.pretrained restored the backbone as trained,
  ignoring score.dtype and the kernels (Scorer.from_run applies them)."""
  from hybridna_jax import restore, sharding  # pylint: disable=g-import-not-at-top

  cfg = load_config("configs/finetune_tiny.py:probe")
  cfg.finetune.pretrained = "runs/pretrained"
  cfg.score.dtype, cfg.score.attention_impl, cfg.score.ssd_impl = "bfloat16", "xla", "xla"
  calls = []
  run_config = load_config("configs/tiny.py")
  run_config.score.add_bos = True  # e.g. a converted checkpoint whose tokenizer adds bos

  def load(path, **kwargs):
    calls.append((path, kwargs))
    return create_model(ModelConfig.from_config(cfg.model)), None, run_config

  monkeypatch.setattr(restore, "load", load)
  scorer, backbone = probe.probe_scorer(cfg, datasets.load_task(gc_task, log=False), "mean")
  ((path, kwargs),) = calls
  assert path == "runs/pretrained" and backbone == "runs/pretrained (latest)"
  assert kwargs["dtype"] == "bfloat16" and kwargs["which"] == "latest"
  assert (kwargs["attention_impl"], kwargs["ssd_impl"]) == ("xla", "xla")
  assert kwargs["mesh"].shape == sharding.mesh_from_config(cfg.mesh).shape  # the config's mesh
  # The backbone reads <bos> first: kept though score.add_bos is False here.
  assert not cfg.score.add_bos and scorer.settings.add_bos
