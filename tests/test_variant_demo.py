"""scripts/make_variant_demo.py: its SNVs are what they claim to be."""

import csv
import itertools
import os
import subprocess
import sys

import numpy as np
from launch_env import launch_env

from hybridna_jax import tokenizer
from hybridna_jax.data import fasta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "make_variant_demo.py")
CODONS = ["".join(c) for c in itertools.product("ACGT", repeat=3)]
SENSE = [c for c in CODONS if c not in ("TAA", "TAG", "TGA", "ATG")]


def _run(*args):
  return subprocess.run(
    [sys.executable, SCRIPT, *args],
    capture_output=True,
    text=True,
    check=True,
    cwd=ROOT,
    env=launch_env(1),  # this tree's package, whatever the venv has installed
  ).stdout


def _genome(rng):
  """Random DNA with three 300-codon ORFs, two forward and one reverse:
  (sequence, [(strand, start, end)] 0-based half-open)."""
  seq, orfs = "", []
  for strand in "++-":
    seq += "".join(rng.choice(list("ACGT"), 500))  # too short to hold a 600-nt ORF
    orf = "ATG" + "".join(rng.choice(SENSE, 298)) + "TAA"
    orfs.append((strand, len(seq), len(seq) + len(orf)))
    seq += orf if strand == "+" else tokenizer.reverse_complement(orf)
  return seq + "".join(rng.choice(list("ACGT"), 500)), orfs


def _codon_at(seq, pos, strand_orfs):
  """(codon, index of `pos` in it, on the minus strand) for 1-based `pos`,
  read in the frame and on the strand of the ORF that holds it."""
  for strand, start, end in strand_orfs:
    if start < pos <= end:
      if strand == "+":
        k = (pos - 1 - start) // 3 * 3 + start
        return seq[k : k + 3], pos - 1 - k, False
      rc = tokenizer.reverse_complement(seq[start:end])
      offset = end - pos
      k = offset // 3 * 3
      return rc[k : k + 3], offset - k, True
  raise AssertionError(f"position {pos} is in no ORF")


def test_nonsense_makes_a_stop_and_synonymous_keeps_the_amino_acid(tmp_path):
  seq, orfs = _genome(np.random.default_rng(0))
  genome = str(tmp_path / "g.fa")
  fasta.write_fasta(genome, [("chr", seq)])
  out = str(tmp_path / "v.csv")
  _run("write", f"--genome={genome}", f"--out={out}", "--num_orfs=3", "--min_orf=600")
  with open(out) as f:
    rows = list(csv.DictReader(f))
  good = [r for r in rows if not r["id"].startswith("bad_")]
  assert len(good) == 6 and {r["id"].split("_")[0] for r in good} == {"nonsense", "synonymous"}
  # In position order, the unknown chromosome last.
  assert [r["id"] for r in rows if r["id"].startswith("bad_")] == [
    "bad_wrong_ref",
    "bad_past_the_end",
    "bad_unknown_chromosome",
  ]
  positions = [int(r["pos"]) for r in rows if r["chrom"] == "chr"]
  assert positions == sorted(positions) and rows[-1]["id"] == "bad_unknown_chromosome"
  for r in good:
    pos = int(r["pos"])
    assert seq[pos - 1] == r["ref"]
    codon, k, reverse = _codon_at(seq, pos, orfs)
    alt = tokenizer.reverse_complement(r["alt"]) if reverse else r["alt"]
    mutated = codon[:k] + alt + codon[k + 1 :]
    if r["id"].startswith("nonsense"):
      assert mutated in ("TAA", "TAG", "TGA"), (codon, mutated)
    else:
      assert (
        len(codon) == 3
        and k == 2
        and codon[:2] == mutated[:2]
        and codon[:2] in ("GC", "GG", "CC", "AC", "GT", "CT", "TC", "CG")
      ), (codon, mutated)


def test_summarize_pairs_nonsense_with_synonymous(tmp_path):
  tsv = tmp_path / "scores.tsv"
  tsv.write_text(
    "chrom\tpos\tid\tref\talt\tllr\n"
    "c\t1\tnonsense_0\tA\tT\t-2.0\nc\t2\tsynonymous_0\tA\tC\t-0.5\n"
    "c\t3\tnonsense_1\tA\tT\t-0.1\nc\t4\tsynonymous_1\tA\tC\t-0.3\n"
  )
  out = _run("summarize", f"--tsv={tsv}")
  assert "2 ORFs" in out and "nonsense -1.050" in out and "synonymous -0.400" in out
  assert "in 50% of ORFs" in out
