r"""Builds real labelled genomics tasks offline, as GUE-layout folders
(train.csv, dev.csv, test.csv with columns sequence,label) plus a
task.json recording sources, settings and counts.

    bash scripts/fetch_real_task_data.sh            # Debian packages -> data_cache
    python scripts/make_real_tasks.py promoters --out=data_cache/tasks/dm_promoters

Task `promoters` (Drosophila melanogaster, dm3 chr2R): label 1 = the
`--length` nucleotides just upstream of an annotated transcription start
(the 3' end of a record of Biostrings' dm3_upstream2000.fa.gz, in
transcript orientation; transcripts sharing a start are kept once),
label 0 = a window of the same length drawn uniformly from chr2R (random
strand, no N) that overlaps no 2 kb upstream region. Sources, both in
Debian packages (no download at run time):

  r-bioc-biostrings: .../Biostrings/extdata/dm3_upstream2000.fa.gz
  augustus-doc:      .../augustus/tutorial/data/chr2R.fa (dm3 chr2R)

Held-out split by region, so neighbouring and overlapping promoters never
straddle train and test: chr2R is cut into `--block` bp blocks; block i goes
to test when i % 10 in (8, 9), to dev when i % 10 == 7, else to train, and a
window crossing a block boundary is dropped. Negatives are drawn per split
inside that split's blocks, as many as its positives (seeded).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hybridna_jax import tokenizer  # noqa: E402
from hybridna_jax.data import fasta  # noqa: E402
from hybridna_jax.finetune.example_tasks import write_split  # noqa: E402

UPSTREAM = "usr/lib/R/site-library/Biostrings/extdata/dm3_upstream2000.fa.gz"
CHR2R = "usr/share/doc/augustus/tutorial/data/chr2R.fa"
PACKAGES = {UPSTREAM: "r-bioc-biostrings", CHR2R: "augustus-doc"}
SPLITS = ("train", "dev", "test")
_HEADER = re.compile(r"^(\S+)_up_(\d+)_(\S+)_(-?\d+)_([fr])\s+(\S+):(-?\d+)-(-?\d+)")


def find_source(relative: str, cache_dir: str) -> str | None:
  """A packaged file: unpacked under <cache_dir>/extracted/<package>/ (by
  scripts/fetch_real_task_data.sh) or installed at /<relative>."""
  for path in (os.path.join(cache_dir, "extracted", PACKAGES[relative], relative), "/" + relative):
    if os.path.exists(path):
      return path
  return None


def region_split(start: int, end: int, block: int) -> str | None:
  """The split of a window [start, end) (0-based), None if it crosses a block."""
  first, last = start // block, (end - 1) // block
  if first != last:
    return None
  rest = first % 10
  return "test" if rest >= 8 else ("dev" if rest == 7 else "train")


def read_upstream(path: str, chrom: str) -> list[tuple[int, int, str, str]]:
  """Records of dm3_upstream2000 on `chrom`: (start, end) 0-based
  end-exclusive genome span of the 2 kb region (start < 0 near the
  chromosome start), strand "+"/"-", sequence in transcript orientation
  (upper case)."""
  out = []
  with gzip.open(path, "rt") as f:
    header, chunks = None, []
    for line in list(f) + [">"]:
      if line.startswith(">"):
        if header:
          m = _HEADER.match(header)
          if m is None:
            raise ValueError(f"{path}: unexpected header {header!r}")
          if m.group(6) == chrom:
            start, end = int(m.group(7)) - 1, int(m.group(8))
            strand = "+" if m.group(5) == "f" else "-"
            out.append((start, end, strand, "".join(chunks).upper()))
        header, chunks = line[1:].strip(), []
      else:
        chunks.append(line.strip())
  return out


def make_promoters(
  upstream_path: str,
  chrom_path: str,
  out_dir: str,
  *,
  length: int = 300,
  block: int = 1_000_000,
  seed: int = 0,
  max_per_split: int = 0,
) -> dict:
  """Writes the promoter task (module docstring) to `out_dir`; returns the
  task.json dict."""
  ((header, tokens),) = fasta.read_fasta(chrom_path)
  genome = tokenizer.decode(tokens).upper()
  chrom = header.name
  records = read_upstream(upstream_path, chrom)
  if not records:
    raise ValueError(f"{upstream_path}: no upstream records on {chrom}.")
  rng = np.random.default_rng(seed)
  positives = {s: [] for s in SPLITS}
  seen = set()
  covered = np.zeros(len(genome) + 1, np.int32)  # upstream regions, as a difference array
  for start, end, strand, seq in records:
    covered[max(start, 0)] += 1
    covered[end] -= 1
    # The `length` nt next to the start: the 3' end of the record.
    if strand == "+":
      span = (end - length, end)
    else:
      span = (start, start + length)
    if span in seen or start < 0 or len(seq) != end - start:
      continue
    seen.add(span)
    split = region_split(*span, block)
    window = seq[-length:]
    if split is None or "N" in window:
      continue
    positives[split].append(window)
  covered = np.cumsum(covered)[:-1] > 0
  covered_prefix = np.r_[0, np.cumsum(covered)]
  negatives = {s: [] for s in SPLITS}
  for split in SPLITS:
    order = rng.permutation(len(positives[split]))
    if max_per_split:
      order = order[:max_per_split]
    positives[split] = [positives[split][i] for i in order]
    tries = 0
    while len(negatives[split]) < len(positives[split]):
      tries += 1
      if tries > 1000 * max(1, len(positives[split])):
        raise RuntimeError(f"could not draw {split} negatives from {chrom}.")
      start = int(rng.integers(0, len(genome) - length))
      if region_split(start, start + length, block) != split:
        continue
      if covered_prefix[start + length] - covered_prefix[start] > 0:
        continue
      window = genome[start : start + length]
      if "N" in window:
        continue
      negatives[split].append(
        window if rng.random() < 0.5 else tokenizer.reverse_complement(window)
      )
  os.makedirs(out_dir, exist_ok=True)
  counts = {}
  for split in SPLITS:
    seqs = positives[split] + negatives[split]
    labels = [1] * len(positives[split]) + [0] * len(negatives[split])
    order = rng.permutation(len(seqs))
    write_split(
      os.path.join(out_dir, f"{split}.csv"), [seqs[i] for i in order], [labels[i] for i in order]
    )
    counts[split] = {"positives": len(positives[split]), "negatives": len(negatives[split])}
  info = {
    "task": "promoters",
    "label_1": f"{length} nt upstream of an annotated transcription start ({chrom})",
    "label_0": f"{length} nt {chrom} window overlapping no 2 kb upstream region, random strand",
    "sources": {"upstream": upstream_path, "genome": chrom_path},
    "split": f"{block:,} bp blocks of {chrom}: block % 10 in (8, 9) test, 7 dev, else train",
    "length": length,
    "seed": seed,
    "counts": counts,
  }
  with open(os.path.join(out_dir, "task.json"), "w", encoding="utf-8") as f:
    json.dump(info, f, indent=2)
  return info


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("task", choices=["promoters"])
  parser.add_argument("--out", required=True, help="output task folder")
  parser.add_argument("--cache_dir", default="data_cache", help="where fetch put the packages")
  parser.add_argument("--length", type=int, default=300)
  parser.add_argument("--block", type=int, default=1_000_000)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--max_per_split", type=int, default=0, help="0: all positives")
  args = parser.parse_args(argv)
  paths = {}
  for relative in (UPSTREAM, CHR2R):
    paths[relative] = find_source(relative, args.cache_dir)
    if paths[relative] is None:
      print(
        f"missing {relative} (Debian package {PACKAGES[relative]}); run "
        "bash scripts/fetch_real_task_data.sh",
        file=sys.stderr,
      )
      return 1
  info = make_promoters(
    paths[UPSTREAM],
    paths[CHR2R],
    args.out,
    length=args.length,
    block=args.block,
    seed=args.seed,
    max_per_split=args.max_per_split,
  )
  print(json.dumps(info["counts"]))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
