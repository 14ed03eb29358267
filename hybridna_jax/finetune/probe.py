"""Frozen-embedding linear probes: the cheap evaluation of Caduceus and the
Nucleotide Transformer.

    scorer = Scorer(model, context=1024, batch_size=16)
    results = probe(scorer, data, pooling="echo", layer=-1)
    results["test"]["mcc"]

    python launch/finetune.py --config=configs/finetune_demo.py \
        --config.finetune.probe=True --config.score.pooling=echo \
        --config.score.layer=2 --workdir=runs/probe_species

The backbone stays frozen: the jitted `Scorer.embed` turns every sequence of
the train, dev and test splits into one (d_model,) vector -- "mean" over the
nucleotides, "last" nucleotide, or "echo" (mean over the second copy of
sequence <sep> sequence), from any layer (-1: the final norm, 0: the token
embeddings, i: layer i's output), optionally averaged over both strands --
and a linear model is fitted on train: L2 logistic regression
(classification) or ridge (regression) on standardised features, its
strength chosen on dev among `STRENGTHS` by the headline metric, reported
on test with the metrics of fine-tuning (`finetune.metrics`).

`probe_echo_views` / `run_probe_echo_views` fit four probes (echo,
RC-averaged echo, plain mean, RC-averaged plain mean) from one echo pass
per strand (`Scorer.embed_echo_views`): the comparison of embedding modes
in benchmarks/finetune_modes.py.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import numpy as np
from absl import logging

from hybridna_jax import echo as echo_lib
from hybridna_jax.finetune import baselines as baselines_lib
from hybridna_jax.finetune import datasets, report
from hybridna_jax.finetune.metrics import HEADLINE
from hybridna_jax.scoring.scorer import ProgressLogger

# Inverse regularisation strengths tried on dev (logistic C; ridge alpha = 1/C).
STRENGTHS = (0.01, 0.1, 1.0, 10.0)


def embed_splits(
  scorer, data: datasets.TaskData, *, pooling: str, layer: int, rc_average: bool
) -> dict[str, np.ndarray]:
  """split -> (n_split, d_model) float32 embeddings of its sequences (the
  progress of each split logged)."""
  return {
    split: scorer.embed(
      data.splits[split].sequences,
      pooling=pooling,
      layer=layer,
      rc_average=rc_average,
      progress=ProgressLogger(f"{split} sequences"),
    )
    for split in ("train", *baselines_lib.EVAL_SPLITS)
  }


def fit_probe(
  features: dict[str, np.ndarray],
  data: datasets.TaskData,
  strengths=STRENGTHS,
  class_weight: str | None = None,
) -> dict:
  """Fits the linear probe on features["train"], picks its strength on dev.

  Args:
    features: split -> (n_split, f) features of train, dev and test.
    data: the task (labels, kind).
    class_weight: None or "balanced" (classification; finetune.class_weights).

  Returns:
    {"dev", "test": metrics, "c": chosen strength, "dev_by_c": {c: dev headline}}.
  """
  return baselines_lib.choose_strength(features, data, strengths, class_weight)


def probe_label(pooling: str, layer: int, rc_average: bool) -> str:
  where = "final norm" if layer == -1 else ("token embeddings" if layer == 0 else f"layer {layer}")
  return f"linear probe: {pooling}, {where}{', RC-averaged' if rc_average else ''}"


def _results(
  data: datasets.TaskData,
  features: dict[str, np.ndarray],
  label: str,
  settings,
  class_weight: str | None = None,
):
  """Fits the probe on `features` (split -> (n_split, f)); the results dict."""
  fit = fit_probe(features, data, class_weight=class_weight)
  model = "logistic regression" if data.kind == "classification" else "ridge"
  per_class = {"test_per_class": fit["test_per_class"]} if "test_per_class" in fit else {}
  return {
    "task": data.name,
    "kind": data.kind,
    "embedding": label,
    "selection": f"{model} C={fit['c']:g} chosen on dev {HEADLINE[data.kind]}",
    "dev": fit["dev"],
    "test": fit["test"],
    "data": data.summary(),
    "settings": {
      **settings,
      "features": int(features["train"].shape[1]),
      "model": f"sklearn {model} on standardised embeddings",
      "c": fit["c"],
      "dev_by_c": fit["dev_by_c"],
      "class_weight": class_weight,
    },
    **per_class,
  }


def probe(
  scorer,
  data: datasets.TaskData,
  *,
  pooling: str = "echo",
  layer: int = -1,
  rc_average=False,
  class_weight: str | None = None,
) -> dict:
  """Embeds the task with `scorer` and fits the probe; a results dict with
  "task", "kind", "embedding", "dev", "test" and "settings"."""
  start = time.perf_counter()
  features = embed_splits(scorer, data, pooling=pooling, layer=layer, rc_average=rc_average)
  settings = {
    "pooling": pooling,
    "layer": layer,
    "rc_average": rc_average,
    "context": scorer.context,
    "embed_seconds": round(time.perf_counter() - start, 2),
  }
  return _results(data, features, probe_label(pooling, layer, rc_average), settings, class_weight)


# Scorer.embed_echo_views -> (pooling, rc_average) of the same embedding.
ECHO_VIEWS = {
  "echo": ("echo", False),
  "echo_rc": ("echo", True),
  "plain_mean": ("mean", False),
  "plain_mean_rc": ("mean", True),
}


def probe_echo_views(
  scorer, data: datasets.TaskData, *, layer: int = -1, class_weight: str | None = None
) -> dict[str, dict]:
  """The probe on each of the four embeddings of `Scorer.embed_echo_views`
  (echo, RC-averaged echo, plain mean, RC-averaged plain mean), from one
  echo pass per strand instead of six passes: view -> results dict, as
  `probe` with that view's pooling and rc_average would return."""
  start = time.perf_counter()
  by_split = {
    split: scorer.embed_echo_views(data.splits[split].sequences, layer=layer)
    for split in ("train", *baselines_lib.EVAL_SPLITS)
  }
  embed_s = round(time.perf_counter() - start, 2)
  out = {}
  for view, (pooling, rc_average) in ECHO_VIEWS.items():
    settings = {
      "pooling": pooling,
      "layer": layer,
      "rc_average": rc_average,
      "context": scorer.context,
      "embed_seconds": embed_s,
      "embedded_with": "Scorer.embed_echo_views (all four views)",
    }
    features = {split: views[view] for split, views in by_split.items()}
    label = probe_label(pooling, layer, rc_average)
    out[view] = _results(data, features, label, settings, class_weight)
  return out


def probe_context(data: datasets.TaskData, pooling: str, max_seq_len: int) -> int:
  """The smallest multiple of 64 holding the longest sequence (echo: twice
  it plus <sep>; the even round-up leaves room for <bos>), at most the
  model's max_seq_len. Not a power of two: 300-nt echo rows pad to 640,
  not 1,024."""
  longest = max(len(s) for split in data.splits.values() for s in split.sequences)
  need = 2 * longest + 1 if pooling == "echo" else longest + 1
  return int(min(max_seq_len, 64 * math.ceil(need / 64)))


def probe_scorer(config, data: datasets.TaskData, pooling: str):
  """The Scorer of a probe run and a description of its backbone: restores
  finetune.pretrained with the numerics and kernels of the `score` section
  (score.dtype, attention_impl, ssd_impl, as `Scorer.from_run` does) on the
  config's mesh, or initialises config.model; score.context 0 means
  `probe_context`."""
  from hybridna_jax import restore, sharding  # pylint: disable=g-import-not-at-top
  from hybridna_jax.config import ModelConfig, ScoreConfig  # pylint: disable=g-import-not-at-top
  from hybridna_jax.model import create_model  # pylint: disable=g-import-not-at-top
  from hybridna_jax.scoring.scorer import Scorer, run_add_bos  # pylint: disable=g-import-not-at-top

  fc = config.finetune
  sc = ScoreConfig.of(config)
  if fc.pretrained:
    model, _, run_config = restore.load(
      str(fc.pretrained),
      which=str(fc.pretrained_which),
      dtype=sc.dtype or None,
      mesh=sharding.mesh_from_config(config.mesh) if "mesh" in config else None,
      attention_impl=sc.attention_impl,
      ssd_impl=sc.ssd_impl,
    )
    backbone = f"{fc.pretrained} ({fc.pretrained_which})"
    add_bos = run_add_bos(sc.add_bos, run_config, str(fc.pretrained))
  else:
    model = create_model(ModelConfig.from_config(config.model), seed=int(config.train.seed))
    backbone = "fresh init"
    add_bos = sc.add_bos
  context = sc.context or probe_context(data, pooling, model.cfg.max_seq_len)
  scorer = Scorer(
    model,
    context=context,
    batch_size=int(fc.eval_batch_size),
    min_bucket=min(sc.min_bucket, context),
    add_bos=add_bos,
  )
  return scorer, backbone


def _write(config, workdir: str, results: dict, data: datasets.TaskData) -> None:
  """Baselines (finetune.baselines) and results.json / .md / baselines.png,
  on process 0."""
  import jax  # pylint: disable=g-import-not-at-top

  if jax.process_index() != 0:
    return
  if config.finetune.baselines:
    baselines_lib.attach(results, data, baselines_lib.class_weight_of(config.finetune, data.kind))
  os.makedirs(workdir, exist_ok=True)
  results["files"] = report.write_results(workdir, results)
  logging.info(
    "%s\n%s", report.metrics_table(report.result_rows(results)), results.get("verdict", {})
  )


def run_probe(config, workdir: str, data: datasets.TaskData | None = None) -> dict:
  """launch/finetune.py with finetune.probe: probes the `probe_scorer`
  backbone with the score section's pooling, layer and rc_average, on
  sequences cropped to finetune.max_length (`crop_task`), adds
  the baselines, and writes results.json / results.md / baselines.png.

  Returns:
    {"results": the results dict}.
  """
  from hybridna_jax.config import ScoreConfig  # pylint: disable=g-import-not-at-top

  fc = config.finetune
  data = data or datasets.load_config_task(fc)
  sc = ScoreConfig.of(config)
  if not fc.echo and sc.pooling == "echo":
    # Probing echo embeddings under a plain preset would mislabel the results.
    raise ValueError(
      "finetune.echo=False (plain embeddings) but score.pooling='echo', which the linear "
      "probe embeds with; set score.pooling to mean or last, or finetune.echo=True."
    )
  cropped = crop_task(data, int(fc.max_length))
  scorer, backbone = probe_scorer(config, cropped, sc.pooling)
  results = probe(
    scorer,
    cropped,
    pooling=sc.pooling,
    layer=sc.layer,
    rc_average=sc.rc_average,
    class_weight=baselines_lib.class_weight_of(fc, data.kind),
  )
  results["settings"]["max_length"] = int(fc.max_length)
  results["backbone"] = backbone
  _write(config, workdir, results, data)  # baselines on the task as loaded, as fine-tuning's
  return {"results": results}


def crop_task(data: datasets.TaskData, max_length: int) -> datasets.TaskData:
  """`data` with each sequence longer than `max_length` nt cropped around
  its centre, as fine-tuning crops (finetune.max_length; 0: unchanged)."""
  if max_length <= 0:
    return data
  splits = {
    name: split._replace(sequences=[echo_lib.crop_center(s, max_length) for s in split.sequences])
    for name, split in data.splits.items()
  }
  return dataclasses.replace(data, splits=splits)


def run_probe_echo_views(
  config, workdir: str, data: datasets.TaskData | None = None
) -> dict[str, dict]:
  """`run_probe` for the four `ECHO_VIEWS` at once (score.layer; the
  pooling fields are not read): each view's files go to <workdir>/<view>.

  Returns:
    view -> results dict.
  """
  from hybridna_jax.config import ScoreConfig  # pylint: disable=g-import-not-at-top

  data = data or datasets.load_config_task(config.finetune)
  scorer, backbone = probe_scorer(config, data, "echo")
  found = probe_echo_views(
    scorer,
    data,
    layer=ScoreConfig.of(config).layer,
    class_weight=baselines_lib.class_weight_of(config.finetune, data.kind),
  )
  for view, results in found.items():
    results["backbone"] = backbone
    _write(config, os.path.join(workdir, view), results, data)
  return found
