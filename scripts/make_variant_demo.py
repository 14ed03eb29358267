r"""The demo's zero-shot variant-effect check: nonsense vs synonymous SNVs.

    python scripts/make_variant_demo.py write --genome=GENOME.fa.gz \
        --out=runs/demo/variants.csv
    python launch/score.py --workdir=runs/demo --mode=variants \
        --variants=runs/demo/variants.csv --reference=GENOME.fa.gz
    python scripts/make_variant_demo.py summarize --tsv=runs/demo/scores/variants.tsv

`write` finds long open reading frames (ATG ... stop, in frame, >= 900 nt,
both strands) in a genome -- in bacteria nearly all such ORFs are real
genes -- and, per ORF, picks two SNVs in its first half:

  nonsense_<k>    turns a sense codon into a stop codon (e.g. CAG -> TAG);
  synonymous_<k>  changes the third base of a four-fold degenerate codon
                  (GCN, GGN, CCN, ACN, GTN, CTN, TCN, CGN), same amino acid.

A model that has learnt coding sequence should give nonsense SNVs the lower
log-likelihood ratio (alt vs ref). It also writes a few malformed records
(a wrong REF, an unknown chromosome, a position past the end), which the
scorer must report line by line and skip.

`summarize` prints, from the scorer's TSV, the mean LLR of each class and
the share of ORFs whose nonsense SNV scores below its synonymous one (0.5:
no signal). Held-out genomes (ones the model did not train on) make this a
zero-shot test.
"""

import csv
import os

import numpy as np
from absl import app, flags

from hybridna_jax import tokenizer
from hybridna_jax.data import fasta

flags.DEFINE_string("genome", None, "FASTA of the genome (write).")
flags.DEFINE_string("out", None, "CSV to write (write).")
flags.DEFINE_integer("num_orfs", 100, "ORFs (variant pairs) to write.")
flags.DEFINE_integer("min_orf", 900, "Shortest ORF in nucleotides, stop included.")
flags.DEFINE_integer("seed", 0, "Random seed (which codons are mutated).")
flags.DEFINE_string("tsv", None, "The scorer's output TSV (summarize).")
FLAGS = flags.FLAGS

STOPS = ("TAA", "TAG", "TGA")
FOURFOLD = ("GC", "GG", "CC", "AC", "GT", "CT", "TC", "CG")


def find_orfs(seq: str, min_length: int) -> list[tuple[int, int, int]]:
  """Open reading frames of one strand: [(start, end, frame)] with 0-based
  half-open coordinates, from an ATG to the first in-frame stop (included),
  the longest per stop codon."""
  orfs = []
  for frame in range(3):
    start = None
    for i in range(frame, len(seq) - 2, 3):
      codon = seq[i : i + 3]
      if start is None and codon == "ATG":
        start = i
      elif codon in STOPS:
        if start is not None and i + 3 - start >= min_length:
          orfs.append((start, i + 3, frame))
        start = None
  return orfs


def _pick_snvs(orf: str, rng: np.random.Generator):
  """(offset, ref, alt) of a nonsense and a synonymous SNV in the ORF's
  first half (after its first 30 codons), or None."""
  codons = range(30, len(orf) // 6)
  nonsense, synonymous = [], []
  for c in codons:
    codon = orf[3 * c : 3 * c + 3]
    for k in range(3):
      for base in "ACGT":
        if base != codon[k] and codon[:k] + base + codon[k + 1 :] in STOPS:
          nonsense.append((3 * c + k, codon[k], base))
    if codon[:2] in FOURFOLD:
      synonymous += [(3 * c + 2, codon[2], b) for b in "ACGT" if b != codon[2]]
  if not nonsense or not synonymous:
    return None
  return (nonsense[rng.integers(len(nonsense))], synonymous[rng.integers(len(synonymous))])


def write(genome_path: str, out_path: str, *, num_orfs: int, min_orf: int, seed: int) -> None:
  """Writes the CSV of `num_orfs` nonsense/synonymous pairs and 3 bad records."""
  records = fasta.read_fasta(genome_path)
  chrom, tokens = max(records, key=lambda r: r[1].size)
  seq = tokenizer.decode(tokens)
  n = len(seq)
  rng = np.random.default_rng(seed)
  candidates = [("+", s, e) for s, e, _ in find_orfs(seq, min_orf)]
  candidates += [
    ("-", n - e, n - s) for s, e, _ in find_orfs(tokenizer.reverse_complement(seq), min_orf)
  ]
  order = rng.permutation(len(candidates))
  rows = []
  for index in order:
    if len(rows) // 2 >= num_orfs:
      break
    strand, start, end = candidates[index]
    orf = seq[start:end] if strand == "+" else tokenizer.reverse_complement(seq[start:end])
    picked = _pick_snvs(orf, rng)
    if picked is None:
      continue
    k = len(rows) // 2
    for kind, (offset, ref, alt) in zip(("nonsense", "synonymous"), picked):
      if strand == "+":
        pos = start + offset + 1
      else:  # offset counts from the ORF's start on the minus strand
        pos = end - offset
        ref, alt = tokenizer.reverse_complement(ref), tokenizer.reverse_complement(alt)
      assert seq[pos - 1] == ref, (pos, ref)
      rows.append((chrom.name, pos, ref, alt, f"{kind}_{k}"))
  if not rows:
    raise ValueError(
      f"{genome_path}: no ORF of at least {min_orf} nt with a nonsense and a "
      "synonymous SNV site; lower --min_orf or use a larger genome."
    )
  # Malformed records: the scorer reports and skips each one.
  first = rows[0]
  wrong_ref = next(b for b in "ACGT" if b != first[2])
  bad = [
    (first[0], first[1], wrong_ref, first[2], "bad_wrong_ref"),
    ("no_such_chromosome", 100, "A", "C", "bad_unknown_chromosome"),
    (first[0], n + 10, "A", "C", "bad_past_the_end"),
  ]
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  with open(out_path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(("chrom", "pos", "ref", "alt", "id"))
    # In position order (other chromosomes last), as call sets come: the
    # scorer streams them and neighbouring variants share reference reads.
    writer.writerows(sorted(rows + bad, key=lambda r: (r[0] != chrom.name, r[0], r[1])))
  print(
    f"{genome_path}: {chrom.name} ({n:,} nt), {len(candidates):,} ORFs >= "
    f"{min_orf} nt; wrote {len(rows) // 2} nonsense/synonymous SNV pairs and "
    f"{len(bad)} malformed records to {out_path}"
  )


def summarize(tsv_path: str) -> None:
  with open(tsv_path) as f:
    lines = [l for l in f if not l.startswith("#")]
  rows = list(csv.DictReader(lines, delimiter="\t"))
  if not rows:
    raise ValueError(f"{tsv_path}: no scored variants.")
  llr_column = next(c for c in rows[0] if c.startswith("llr"))
  by_id = {r["id"]: float(r[llr_column]) for r in rows}
  pairs = [
    (by_id[i], by_id["synonymous_" + i.split("_", 1)[1]])
    for i in by_id
    if i.startswith("nonsense_") and "synonymous_" + i.split("_", 1)[1] in by_id
  ]
  if not pairs:
    raise ValueError(
      f"{tsv_path}: no nonsense/synonymous pairs (ids nonsense_k, "
      "synonymous_k); was it scored from make_variant_demo.py's CSV?"
    )
  nonsense, synonymous = np.array(pairs).T
  print(
    f"{len(pairs)} ORFs ({llr_column}): mean LLR nonsense {nonsense.mean():+.3f}, "
    f"synonymous {synonymous.mean():+.3f}; nonsense below synonymous in "
    f"{np.mean(nonsense < synonymous):.0%} of ORFs (no signal: 50%)"
  )


def main(argv):
  if len(argv) != 2 or argv[1] not in ("write", "summarize"):
    raise app.UsageError("usage: make_variant_demo.py write|summarize [flags]")
  if argv[1] == "write":
    if not FLAGS.genome or not FLAGS.out:
      raise app.UsageError("write needs --genome and --out.")
    write(FLAGS.genome, FLAGS.out, num_orfs=FLAGS.num_orfs, min_orf=FLAGS.min_orf, seed=FLAGS.seed)
  else:
    if not FLAGS.tsv:
      raise app.UsageError("summarize needs --tsv.")
    summarize(FLAGS.tsv)


if __name__ == "__main__":
  app.run(main)
