r"""Prepares the example corpus unpacked by scripts/fetch_example_genomes.sh.

    python scripts/example_genomes.py --cache_dir=data_cache

Links each genome as <cache>/genomes/<Species>__<strain>.<ext> (so the
source of its records is "<Species>__<strain>") and prepares the token
store <cache>/example_store with one strain per species held out for
validation (the strain that ragout's examples assemble; for Klebsiella,
MGH 78578). The lambda phage has a single strain and stays in training.
The draft contig assemblies in ragout-examples (*_contigs.fasta.gz) are
left out: they are drafts of the held-out strains and would duplicate them.
Even so, the held-out strains share most of their sequence with the
training strains of their species (--overlap_kmers prints the share of
100-mers found verbatim: from 100% for E. coli MG1655 in DH1 to 2-6% for
H. pylori SJM180), so their bits/nt measures generalisation to new strains
only for a model too small to memorise.

To train on it, a job config sets:
    config.data.fasta_globs = ("data_cache/genomes/*",)
    config.data.store_dir = "data_cache/example_store"
    config.data.split.val_sources = example_genomes.HELD_OUT  (printed below)
"""

import os

import numpy as np
from absl import app, flags, logging

from hybridna_jax import launch_utils, tokenizer
from hybridna_jax.data import config as config_lib
from hybridna_jax.data import prepare

_CACHE_DIR = flags.DEFINE_string(
  "cache_dir", "data_cache", "Where fetch_example_genomes.sh unpacked."
)
_STORE_DIR = flags.DEFINE_string(
  "store_dir", None, "Output store (default <cache_dir>/example_store)."
)
_OVERLAP = flags.DEFINE_integer(
  "overlap_kmers",
  0,
  "Also print, for each held-out strain, the share of this many random 100-mers of it (either "
  "strand) found verbatim in each training strain of its species (0: off).",
)

_RAGOUT = "ragout-examples/usr/share/doc/ragout/examples"
_KLEBORATE = "kleborate-examples/usr/share/doc/kleborate/examples/data"
_BOWTIE2 = "bowtie2-examples/usr/share/doc/bowtie2/examples/reference"

# (species, strain, file under <cache>/extracted).
GENOMES = (
  ("E_coli", "DH1", f"{_RAGOUT}/E.Coli/references/DH1.fasta.gz"),
  ("E_coli", "MG1655-K12", f"{_RAGOUT}/E.Coli/references/MG1655-K12.fasta.gz"),
  ("H_pylori", "ELS37", f"{_RAGOUT}/H.Pylori/references/ELS37.fasta.gz"),
  ("H_pylori", "G27", f"{_RAGOUT}/H.Pylori/references/G27.fasta.gz"),
  ("H_pylori", "Gambia94_24", f"{_RAGOUT}/H.Pylori/references/Gambia94_24.fasta.gz"),
  ("H_pylori", "Puno120", f"{_RAGOUT}/H.Pylori/references/Puno120.fasta.gz"),
  ("H_pylori", "SJM180", f"{_RAGOUT}/H.Pylori/references/SJM180.fasta.gz"),
  ("S_aureus", "COL", f"{_RAGOUT}/S.Aureus/references/COL.fasta.gz"),
  ("S_aureus", "JKD6008", f"{_RAGOUT}/S.Aureus/references/JKD6008.fasta.gz"),
  ("S_aureus", "N315", f"{_RAGOUT}/S.Aureus/references/N315.fasta.gz"),
  ("S_aureus", "RF122", f"{_RAGOUT}/S.Aureus/references/RF122.fasta.gz"),
  ("S_aureus", "USA300_FPR3757", f"{_RAGOUT}/S.Aureus/references/USA300_FPR3757.fasta.gz"),
  ("V_cholerae", "H1", f"{_RAGOUT}/V.Cholerae/references/H1.fasta.gz"),
  ("V_cholerae", "O1_Inaba", f"{_RAGOUT}/V.Cholerae/references/O1_Inaba.fasta.gz"),
  ("V_cholerae", "O1_biovar_N16961", f"{_RAGOUT}/V.Cholerae/references/O1_biovar.fasta.gz"),
  ("V_cholerae", "O395", f"{_RAGOUT}/V.Cholerae/references/O395.fasta.gz"),
  ("K_pneumoniae", "HS11286", f"{_KLEBORATE}/Klebs_HS11286.fna.xz"),
  ("K_pneumoniae", "Kp1084", f"{_KLEBORATE}/Klebs_Kp1084.fna.xz"),
  ("K_pneumoniae", "MGH78578", f"{_KLEBORATE}/MGH78578.fna.xz"),
  ("K_pneumoniae", "NTUH-K2044", f"{_KLEBORATE}/NTUH-K2044.fna.xz"),
  ("Lambda_phage", "NC_001416", f"{_BOWTIE2}/lambda_virus.fa.gz"),
)

# One strain per species for validation (not the single-strain phage).
HELD_OUT = (
  "E_coli__MG1655-K12",
  "H_pylori__SJM180",
  "S_aureus__USA300_FPR3757",
  "V_cholerae__H1",
  "K_pneumoniae__MGH78578",
)


def link_genomes(cache_dir: str) -> str:
  """Links every genome into <cache_dir>/genomes; returns that directory."""
  genomes = os.path.join(cache_dir, "genomes")
  os.makedirs(genomes, exist_ok=True)
  for species, strain, rel in GENOMES:
    target = os.path.join(cache_dir, "extracted", rel)
    if not os.path.isfile(target):
      raise FileNotFoundError(
        f"{target} is missing; run scripts/fetch_example_genomes.sh to "
        "download and unpack the packages."
      )
    ext = (
      ".fna.xz"
      if rel.endswith(".fna.xz")
      else (".fasta.gz" if rel.endswith(".fasta.gz") else ".fa.gz")
    )
    link = os.path.join(genomes, f"{species}__{strain}{ext}")
    relative = os.path.relpath(target, genomes)
    if os.path.islink(link) and os.readlink(link) == relative:
      continue
    if os.path.lexists(link):
      os.remove(link)
    os.symlink(relative, link)
  return genomes


def example_config(cache_dir: str, store_dir: str | None = None):
  c = config_lib.default_data_config()
  c.fasta_globs = (os.path.join(cache_dir, "genomes", "*"),)
  c.store_dir = store_dir or os.path.join(cache_dir, "example_store")
  c.source_from = "file"
  c.split.val_sources = HELD_OUT
  c.progress_seconds = 5.0
  return c


def held_out_overlap(store, samples: int, k: int = 100, seed: int = 0) -> list[tuple]:
  """(held-out strain, training strain, share of `samples` random k-mers of
  the held-out strain found verbatim in the training strain, either strand)
  for each pair of strains of one species."""
  rng = np.random.default_rng(seed)

  def text(split, source):  # records joined by "|" so no k-mer spans two
    records = [r for r in store[split] if r.source == source]
    return "|".join(tokenizer.decode(r.tokens) for r in records)

  rows = []
  for held in HELD_OUT:
    held_text = text("val", held)
    starts = rng.integers(0, len(held_text) - k, samples)
    kmers = [held_text[i : i + k] for i in starts]
    kmers = [m for m in kmers if "|" not in m]
    for source in store["train"].info["per_source"]:
      if source.split("__")[0] != held.split("__")[0]:
        continue
      train = text("train", source)
      found = sum(m in train or tokenizer.reverse_complement(m) in train for m in kmers)
      rows.append((held, source, found / len(kmers)))
  return rows


def main(argv):
  del argv
  cache_dir = _CACHE_DIR.value
  genomes = link_genomes(cache_dir)
  print(f"[prepare] {len(GENOMES)} genomes linked in {genomes}")
  cfg = example_config(cache_dir, _STORE_DIR.value)
  store = prepare.prepare_store(cfg)
  species = {f"{sp}__{st}": sp for sp, st, _ in GENOMES}
  print(f"[prepare] token store {os.path.abspath(store.path)}")
  print(f"{'split':<6}{'species':<14}{'strain':<18}{'records':>8}{'Mb':>8}{'N':>6}")
  for split in store.splits:
    for source, stats in store[split].info["per_source"].items():
      print(
        f"{split:<6}{species[source]:<14}{source.split('__', 1)[1]:<18}"
        f"{stats['records']:>8}{stats['tokens'] / 1e6:>8.3f}"
        f"{stats['n_tokens']:>6}"
      )
  for split in store.splits:
    s = store[split]
    print(
      f"[prepare] {split}: {len(s.info['per_source'])} genomes, "
      f"{s.num_records} records, {s.num_tokens / 1e6:.2f} Mb"
    )
  print(f"[prepare] held out for validation: {', '.join(HELD_OUT)}")
  if _OVERLAP.value:
    for held, source, share in held_out_overlap(store, _OVERLAP.value):
      print(f"[overlap] {share:4.0%} of 100-mers of {held} occur verbatim in {source}")
  logging.flush()


if __name__ == "__main__":
  app.run(launch_utils.one_line_errors(main))  # a bad store or input: one line, no traceback
