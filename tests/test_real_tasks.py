"""scripts/make_real_tasks.py: a small promoter task from the Debian files
(skipped, with the reason, where they are absent)."""

import csv
import importlib.util
import os

import numpy as np
import pytest

from hybridna_jax import tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
  "make_real_tasks", os.path.join(ROOT, "scripts", "make_real_tasks.py")
)
make = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make)


def test_region_split_keeps_blocks_whole():
  block = 100
  assert make.region_split(0, 50, block) == "train"
  assert make.region_split(750, 800, block) == "dev"
  assert (
    make.region_split(890, 900, block) == "test" and make.region_split(1990, 2000, block) == "test"
  )
  assert make.region_split(95, 105, block) is None  # crosses a boundary


def test_small_promoter_task_from_the_debian_files(tmp_path):
  cache = os.path.join(ROOT, "data_cache")
  paths = {rel: make.find_source(rel, cache) for rel in (make.UPSTREAM, make.CHR2R)}
  missing = [make.PACKAGES[rel] for rel, path in paths.items() if path is None]
  if missing:
    pytest.skip(
      f"Debian files of {', '.join(missing)} absent (bash scripts/fetch_real_task_data.sh)"
    )
  out = str(tmp_path / "prom")
  info = make.make_promoters(
    paths[make.UPSTREAM], paths[make.CHR2R], out, length=120, max_per_split=40, seed=1
  )
  splits = {}
  for split in make.SPLITS:
    with open(os.path.join(out, f"{split}.csv")) as f:
      rows = list(csv.DictReader(f))
    splits[split] = rows
    labels = np.array([int(r["label"]) for r in rows])
    assert (labels == 1).sum() == (labels == 0).sum() == info["counts"][split]["positives"] > 10
    assert all(len(r["sequence"]) == 120 and set(r["sequence"]) <= set("ACGT") for r in rows)
  # No sequence is shared between the held-out test split and train.
  train = {r["sequence"] for r in splits["train"]}
  assert not train & {r["sequence"] for r in splits["test"]}
  # Positives are the genome next to a start: each occurs in chr2R on one strand.
  from hybridna_jax.data import fasta

  ((_, tokens),) = fasta.read_fasta(paths[make.CHR2R])
  genome = tokenizer.decode(tokens).upper()
  for r in [r for r in splits["test"] if r["label"] == "1"][:5]:
    s = r["sequence"]
    assert s in genome or tokenizer.reverse_complement(s) in genome
