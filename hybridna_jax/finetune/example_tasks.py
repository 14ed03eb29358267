"""Example understanding tasks in the GUE layout (train/dev/test.csv).

* `motif`: a synthetic, learnable task. Random DNA of varying length;
  class 1 carries a planted motif (on either strand) at a random place,
  class 0 has no copy of it on either strand. Tests and smoke runs.
* `species`: real genomes (the demo's example corpus). 200-nt fragments,
  labelled by species, from either strand; train from the strains the demo
  pretrains on, dev and test from the held-out strains (the first and
  second half of each genome), so test measures what carries over to unseen
  strains.

    python -m hybridna_jax.finetune.example_tasks motif data_cache/tasks/motif
    python -m hybridna_jax.finetune.example_tasks species data_cache/tasks/species
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import re

import numpy as np

from hybridna_jax import tokenizer
from hybridna_jax.data import fasta as fasta_lib

DEFAULT_MOTIF = "TATAAT"


def write_split(path: str, sequences: list[str], labels: list) -> None:
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["sequence", "label"])
    writer.writerows(zip(sequences, labels))


def _contains(seq: str, motif: str) -> bool:
  return motif in seq or tokenizer.reverse_complement(motif) in seq


def motif_examples(
  n: int,
  rng: np.random.Generator,
  *,
  motif: str = DEFAULT_MOTIF,
  min_length: int = 24,
  max_length: int = 48,
) -> tuple[list[str], list[int]]:
  """n balanced examples (labels 0/1, shuffled)."""
  sequences, labels = [], []
  while len(sequences) < n:
    label = len(sequences) % 2
    length = int(rng.integers(min_length, max_length + 1))
    seq = "".join(rng.choice(list("ACGT"), size=length))
    if _contains(seq, motif):
      continue
    if label:
      site = motif if rng.random() < 0.5 else tokenizer.reverse_complement(motif)
      start = int(rng.integers(0, length - len(site) + 1))
      seq = seq[:start] + site + seq[start + len(site) :]
    sequences.append(seq)
    labels.append(label)
  order = rng.permutation(n)
  return [sequences[i] for i in order], [labels[i] for i in order]


def make_motif_task(
  folder: str, *, n_train: int = 1024, n_dev: int = 256, n_test: int = 256, seed: int = 0, **kwargs
) -> str:
  """Writes the planted-motif task; returns `folder`."""
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  for split, n in (("train", n_train), ("dev", n_dev), ("test", n_test)):
    write_split(os.path.join(folder, f"{split}.csv"), *motif_examples(n, rng, **kwargs))
  return folder


def _genome(path: str) -> list[np.ndarray]:
  return [tokens for _, tokens in fasta_lib.read_fasta(path)]


def _fragments(
  records: list[np.ndarray],
  n: int,
  length: int,
  rng: np.random.Generator,
  part: tuple[float, float] = (0.0, 1.0),
) -> list[str]:
  """n fragments without N from the `part` (fractions) of each record,
  records chosen by length, random strand."""
  spans = [(r, int(part[0] * r.size), int(part[1] * r.size)) for r in records]
  spans = [s for s in spans if s[2] - s[1] > length]
  sizes = np.array([hi - lo for _, lo, hi in spans], np.float64)
  out = []
  while len(out) < n:
    tokens, lo, hi = spans[rng.choice(len(spans), p=sizes / sizes.sum())]
    start = int(rng.integers(lo, hi - length))
    piece = tokens[start : start + length]
    if np.any(piece == tokenizer.N):
      continue
    if rng.random() < 0.5:
      piece = tokenizer.reverse_complement_nucleotides(piece)
    out.append(tokenizer.decode(piece))
  return out


def make_species_task(
  folder: str,
  genome_glob: str,
  held_out: tuple[str, ...],
  *,
  length: int = 200,
  n_train: int = 400,
  n_eval: int = 100,
  seed: int = 0,
) -> str:
  """Writes the species task from genome files named <species>__<strain>.*.

  Args:
    held_out: strain names (<species>__<strain>) for dev and test; species
      without a held-out strain are left out.
    n_train, n_eval: fragments per class in train, and in each of dev / test.
  """
  rng = np.random.default_rng(seed)
  by_species: dict[str, dict[str, str]] = {}
  for path in sorted(glob.glob(genome_glob)):
    strain = re.sub(r"\.(fasta|fna|fa)(\.(gz|xz|bz2))?$", "", os.path.basename(path))
    species = strain.split("__")[0]
    by_species.setdefault(species, {})[strain] = path
  classes = sorted(
    s
    for s, strains in by_species.items()
    if any(h in strains for h in held_out) and len(strains) > 1
  )
  if not classes:
    raise ValueError(
      f"no species with both training and held-out strains in {genome_glob} "
      f"(held out: {held_out}); run scripts/fetch_example_genomes.sh."
    )
  splits = {"train": ([], []), "dev": ([], []), "test": ([], [])}
  for label, species in enumerate(classes):
    strains = by_species[species]
    test_strains = [s for s in strains if s in held_out]
    train_records = [r for s, p in strains.items() if s not in held_out for r in _genome(p)]
    held_records = [r for s in test_strains for r in _genome(strains[s])]
    for split, records, n, part in (
      ("train", train_records, n_train, (0.0, 1.0)),
      ("dev", held_records, n_eval, (0.0, 0.5)),
      ("test", held_records, n_eval, (0.5, 1.0)),
    ):
      seqs = _fragments(records, n, length, rng, part)
      splits[split][0].extend(seqs)
      splits[split][1].extend([label] * n)
  os.makedirs(folder, exist_ok=True)
  for split, (seqs, labels) in splits.items():
    order = rng.permutation(len(seqs))
    write_split(
      os.path.join(folder, f"{split}.csv"), [seqs[i] for i in order], [labels[i] for i in order]
    )
  with open(os.path.join(folder, "classes.txt"), "w", encoding="utf-8") as f:
    f.write("\n".join(f"{i}\t{c}" for i, c in enumerate(classes)) + "\n")
  return folder


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("kind", choices=("motif", "species"))
  parser.add_argument("folder")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--genomes",
    default="data_cache/genomes/*",
    help="species: glob of <species>__<strain> genome files",
  )
  parser.add_argument("--length", type=int, default=200, help="species: fragment length")
  parser.add_argument("--n_train", type=int, default=400, help="species: train fragments per class")
  parser.add_argument(
    "--n_eval", type=int, default=100, help="species: dev and test fragments per class"
  )
  args = parser.parse_args(argv)
  if args.kind == "motif":
    make_motif_task(args.folder, seed=args.seed)
  else:
    # The strains the demo holds out of pretraining (configs/demo.py).
    from hybridna_jax.config import load_config  # pylint: disable=g-import-not-at-top

    demo = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "demo.py")
    held_out = tuple(load_config(demo).data.split.val_sources)
    make_species_task(
      args.folder,
      args.genomes,
      held_out,
      length=args.length,
      n_train=args.n_train,
      n_eval=args.n_eval,
      seed=args.seed,
    )
  print(f"wrote {args.folder}")


if __name__ == "__main__":
  main()
