r"""Writes the design demo's data: synthetic "cell-type-specific enhancers".

    python scripts/make_design_demo.py --out_dir=data_cache/design_demo

Each sequence is a 200 bp fragment of the lambda phage genome (real DNA,
tests/data/lambda_virus.fa) with 2-4 copies of its cell type's
transcription-factor motifs planted at random positions and orientations:

    HepG2    HNF1A GTTAATNATTAAC, HNF4A CAAAGTCCA
    K562     GATA1 AGATAA (x2 spaced, as in GATA pairs), KLF1 CCACACCCT
    SK-N-SH  PHOX2B TAATYYAATTA, SOX ACAAAGG

so a model fine-tuned on it should write its label's motifs, and not the
others'. Columns: sequence, label (the cell type), activity (number of
motifs planted plus noise; for the `bins` variant of the config), motifs
(how many were planted). train.csv has --num_train rows, val.csv
--num_val, from disjoint halves of the genome.
"""

import csv
import os

import numpy as np
from absl import app, flags

from hybridna_jax import tokenizer
from hybridna_jax.data import fasta

_OUT_DIR = flags.DEFINE_string("out_dir", "data_cache/design_demo", "Output folder.")
_NUM_TRAIN = flags.DEFINE_integer("num_train", 3000, "Training rows.")
_NUM_VAL = flags.DEFINE_integer("num_val", 300, "Validation rows.")
_LENGTH = flags.DEFINE_integer("length", 200, "Sequence length.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")

LAMBDA = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "lambda_virus.fa")

MOTIFS = {
  "HepG2": ("GTTAATNATTAAC", "CAAAGTCCA"),
  "K562": ("AGATAANNNNAGATAA", "CCACACCCT"),
  "SK-N-SH": ("TAATYYAATTA", "ACAAAGG"),
}
_IUPAC = {"N": "ACGT", "Y": "CT", "R": "AG"}


def _instance(motif: str, rng: np.random.Generator) -> str:
  site = "".join(rng.choice(list(_IUPAC[c])) if c in _IUPAC else c for c in motif)
  return tokenizer.reverse_complement(site) if rng.random() < 0.5 else site


def make_rows(background: str, n: int, length: int, rng: np.random.Generator) -> list[dict]:
  rows = []
  labels = list(MOTIFS)
  for i in range(n):
    label = labels[i % len(labels)]
    start = int(rng.integers(0, len(background) - length))
    seq = list(background[start : start + length])
    count = int(rng.integers(2, 5))
    for _ in range(count):
      site = _instance(MOTIFS[label][int(rng.integers(len(MOTIFS[label])))], rng)
      pos = int(rng.integers(0, length - len(site)))
      seq[pos : pos + len(site)] = site
    activity = count + rng.normal(0, 0.5)
    rows.append(
      {"sequence": "".join(seq), "label": label, "activity": f"{activity:.3f}", "motifs": count}
    )
  rng.shuffle(rows)
  return rows


def main(argv):
  del argv
  ((_, tokens),) = fasta.read_fasta(LAMBDA)
  genome = tokenizer.decode(tokens)
  half = len(genome) // 2
  rng = np.random.default_rng(_SEED.value)
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  for name, part, n in (
    ("train", genome[:half], _NUM_TRAIN.value),
    ("val", genome[half:], _NUM_VAL.value),
  ):
    path = os.path.join(_OUT_DIR.value, f"{name}.csv")
    with open(path, "w", newline="", encoding="utf-8") as f:
      writer = csv.DictWriter(f, fieldnames=["sequence", "label", "activity", "motifs"])
      writer.writeheader()
      writer.writerows(make_rows(part, n, _LENGTH.value, rng))
    print(f"wrote {n} rows to {path}")


if __name__ == "__main__":
  app.run(main)
