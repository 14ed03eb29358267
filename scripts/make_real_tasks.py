r"""Builds real labelled genomics tasks offline, as GUE-layout folders
(train.csv, dev.csv, test.csv with columns sequence,label) plus a
task.json recording sources, settings and counts.

    bash scripts/fetch_real_task_data.sh            # Debian packages -> data_cache
    python scripts/make_real_tasks.py promoters --out=data_cache/tasks/dm_promoters
    python scripts/make_real_tasks.py insulators --out=data_cache/tasks/dm_insulators
    python scripts/make_real_tasks.py splice --out=data_cache/tasks/dm_splice
    python scripts/make_real_tasks.py design_insulators --out=data_cache/design_insulators

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

Task `insulators` (dm3 chr2R): one binary task per protein, written to
<out>/ctcf, <out>/beaf32, <out>/cp190 and <out>/suhw. Label 1 = the
`--length` nucleotides centred on a peak of that protein (Bushey et al.
2009 ChIP-chip peaks, Kc and Mbn2 cells pooled, overlapping peaks merged;
the BED files `pybedtools/test/data/*_Bushey_2009.bed` are read straight
from the pybedtools 0.12.1 wheel, never installed), label 0 = a chr2R
window with the GC content of a positive (the same of `--gc_bins` equal GC
bins; one background window per positive, distinct starts) at least
`--length` nt from every peak of any of the four proteins, without N. Both
classes take a random strand. One-vs-background rather than one multi-class
task because the proteins co-bind (CP190 with the three others): 35-80% of
the positives overlap another protein's peak (task.json,
positives_sharing_another_protein), so one class per peak would be
ambiguous. Same region split as the promoters (a window crossing a block
is dropped; background is drawn inside the split's own blocks), fixed
seed; <split>.regions.bed records each window's coordinates, label and
strand.

Design data `design_insulators` (dm3 chr2R): design CSVs (columns
sequence,label; `hybridna_jax.design.load_design_csv`) for prompt-token
generative fine-tuning with one label token per protein, and the held-out
sequences its oracle is fitted and judged on. Each row is the `--length`
(default 200) nucleotides centred on a merged peak (the BED files give
intervals, no summits) of one protein, labelled CTCF, BEAF-32, CP190 or
Su(Hw), random strand, no N. 200 nt: the paper's designed regulatory
elements are 200 bp, the merged peaks are wider (median 340-437 bp), so the
window lies inside the bound region, and <bos> + label + 200 nt + <eos>
fits a 256-token row. A peak that overlaps a peak of another protein (either
cell line) is dropped as ambiguous: the proteins co-bind (CP190 with the
three others), one label per sequence keeps the oracle's question ("which
protein?") well posed, and design.json counts what was dropped. Region split
refining the insulator tasks' (1 Mb blocks, windows crossing a block
dropped), block % 10:

    0-4   train.csv    generative fine-tuning (the generator's only data)
    5, 6  oracle.csv   the oracle's training set (never seen by the generator)
    7     dev.csv      the generator's validation and the oracle's choice of k
    8, 9  test.csv     real held-out sequences: the oracle's accuracy on them
                       and on their dinucleotide shuffles (the judge's baselines)

dev and test are the insulator tasks' dev and test blocks; train and oracle
share the insulator tasks' train blocks, split between them.

Task `splice` (D. melanogaster): two binary tasks, <out>/donor and
<out>/acceptor, from the AUGUSTUS tutorial's annotated loci (augustus-doc
tutorial/results/genes.gb.train, 486 loci, and genes.gb.test, 100 loci:
GenBank with CDS exon structure; the train and test loci as given there,
dev = 10% of the train loci, seeded). Label 1 = `--length` (default 200)
nucleotides centred on a canonical donor (exon | GT) or acceptor (AG |
exon) between two CDS exons, in gene orientation; label 0 = a window
centred the same way on another GT (donor task) or AG (acceptor task) of
the same split's loci, as many as the sites; a dev or test window that
also occurs in train (either strand) is dropped. Both classes carry the
dinucleotide at the same place, so it alone tells nothing; non-canonical
sites are left out.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import re
import sys
import zipfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hybridna_jax import tokenizer  # noqa: E402
from hybridna_jax.data import fasta  # noqa: E402
from hybridna_jax.finetune.example_tasks import write_split  # noqa: E402

UPSTREAM = "usr/lib/R/site-library/Biostrings/extdata/dm3_upstream2000.fa.gz"
CHR2R = "usr/share/doc/augustus/tutorial/data/chr2R.fa"
GENES_TRAIN = "usr/share/doc/augustus/tutorial/results/genes.gb.train"
GENES_TEST = "usr/share/doc/augustus/tutorial/results/genes.gb.test"
PACKAGES = {
  UPSTREAM: "r-bioc-biostrings",
  CHR2R: "augustus-doc",
  GENES_TRAIN: "augustus-doc",
  GENES_TEST: "augustus-doc",
}
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


BUSHEY_DIR = "pybedtools/test/data"
BUSHEY = {"ctcf": "CTCF", "beaf32": "BEAF", "cp190": "Cp190", "suhw": "SuHw"}
CELL_LINES = ("Kc", "Mbn2")


def find_bushey(cache_dir: str) -> str | None:
  """The pybedtools 0.12.1 wheel fetched into <cache_dir>/wheels (read as a
  zip, never installed), or the test-data folder of an installed pybedtools."""
  wheels = sorted(glob.glob(os.path.join(cache_dir, "wheels", "pybedtools-0.12.1-*.whl")))
  if wheels:
    return wheels[0]
  try:
    import importlib.util  # pylint: disable=g-import-not-at-top

    spec = importlib.util.find_spec("pybedtools")
  except (ImportError, ValueError):
    spec = None
  if spec and spec.origin:
    folder = os.path.join(os.path.dirname(spec.origin), "test", "data")
    if os.path.exists(os.path.join(folder, "CTCF_Kc_Bushey_2009.bed")):
      return folder
  return None


def merge_intervals(spans) -> np.ndarray:
  """The sorted union of [start, end) intervals (overlapping or touching
  ones merged), as an (n, 2) int64 array."""
  merged: list[list[int]] = []
  for start, end in sorted((int(s), int(e)) for s, e in spans):
    if merged and start <= merged[-1][1]:
      merged[-1][1] = max(merged[-1][1], end)
    else:
      merged.append([start, end])
  return np.array(merged, np.int64).reshape(-1, 2)


def read_bushey(source: str, chrom: str) -> dict[str, np.ndarray]:
  """Bushey 2009 peaks on `chrom` per protein (keys of BUSHEY), Kc and Mbn2
  cells pooled and merged: (n, 2) arrays of 0-based [start, end). `source`
  is the pybedtools wheel or a folder holding the BED files."""
  out = {}
  zf = zipfile.ZipFile(source) if zipfile.is_zipfile(source) else None
  try:
    for protein, prefix in BUSHEY.items():
      spans = []
      for cell in CELL_LINES:
        name = f"{prefix}_{cell}_Bushey_2009.bed"
        if zf is not None:
          text = zf.read(f"{BUSHEY_DIR}/{name}").decode("utf-8")
        else:
          with open(os.path.join(source, name), encoding="utf-8") as f:
            text = f.read()
        for line in text.splitlines():
          fields = line.split()
          if not fields or fields[0] in ("track", "browser") or fields[0].startswith("#"):
            continue
          if fields[0] == chrom:
            spans.append((int(fields[1]), int(fields[2])))
      out[protein] = merge_intervals(spans)
  finally:
    if zf is not None:
      zf.close()
  return out


# Block index % 10 -> index into SPLITS (region_split: 8-9 test, 7 dev, else train).
TASK_ROLES = (0, 0, 0, 0, 0, 0, 0, 1, 2, 2)


def split_codes(
  starts: np.ndarray, length: int, block: int, roles: tuple[int, ...] = TASK_ROLES
) -> np.ndarray:
  """The split of many windows [start, start + length): roles[block % 10]
  (an index into SPLITS by default, region_split's rule), or -1 for a window
  crossing a block boundary."""
  first, last = starts // block, (starts + length - 1) // block
  return np.where(first == last, np.asarray(roles)[first % 10], -1)


class _Genome:
  """A chromosome with prefix sums for fast window statistics."""

  def __init__(self, path: str):
    ((header, tokens),) = fasta.read_fasta(path)
    self.seq = tokenizer.decode(tokens).upper()
    self.name = header.name
    arr = np.frombuffer(self.seq.encode("ascii"), np.uint8)
    self.gc_prefix = np.r_[0, np.cumsum((arr == ord("G")) | (arr == ord("C")))]
    acgt = np.frombuffer(b"ACGT", np.uint8)
    self.bad_prefix = np.r_[0, np.cumsum(~np.isin(arr, acgt))]

  def __len__(self) -> int:
    return len(self.seq)

  def gc(self, starts: np.ndarray, length: int) -> np.ndarray:
    return (self.gc_prefix[starts + length] - self.gc_prefix[starts]) / length

  def clean(self, starts: np.ndarray, length: int) -> np.ndarray:
    return self.bad_prefix[starts + length] == self.bad_prefix[starts]

  def window(self, start: int, length: int, strand: str) -> str:
    w = self.seq[start : start + length]
    return w if strand == "+" else tokenizer.reverse_complement(w)


def _gc_bin(gc: np.ndarray, bins: int) -> np.ndarray:
  return np.minimum((gc * bins).astype(np.int64), bins - 1)


def gc_matched_background(
  genome: _Genome,
  positives: np.ndarray,
  split: int,
  avoid_prefix: np.ndarray,
  rng: np.random.Generator,
  *,
  length: int,
  block: int,
  bins: int,
  batch: int = 100_000,
  rounds: int = 200,
) -> np.ndarray:
  """One background window start per positive start, in the same split's
  blocks, with the positive's GC bin (`bins` equal bins of GC fraction), no
  N, overlapping no position marked in `avoid_prefix` (a prefix sum of a
  0/1 mask) and all starts distinct."""
  want = _gc_bin(genome.gc(positives, length), bins)
  todo = {int(b): list(np.flatnonzero(want == b)) for b in np.unique(want)}
  out = np.full(len(positives), -1, np.int64)
  used: set[int] = set()
  for _ in range(rounds):
    if not any(todo.values()):
      break
    cand = rng.integers(0, len(genome) - length + 1, size=batch)
    cand = cand[split_codes(cand, length, block) == split]
    cand = cand[genome.clean(cand, length)]
    cand = cand[avoid_prefix[cand + length] == avoid_prefix[cand]]
    have = _gc_bin(genome.gc(cand, length), bins)
    for b, idxs in todo.items():
      for start in cand[have == b]:
        if not idxs:
          break
        if int(start) in used:
          continue
        used.add(int(start))
        out[idxs.pop()] = start
  left = {b: len(i) for b, i in todo.items() if i}
  if left:
    raise RuntimeError(
      f"{genome.name} {SPLITS[split]}: no GC-matched background for {sum(left.values())} "
      f"windows (GC bins {sorted(left)} of {bins}); try fewer --gc_bins."
    )
  return out


def make_insulators(
  bed_source: str,
  chrom_path: str,
  out_dir: str,
  *,
  proteins=tuple(BUSHEY),
  length: int = 300,
  block: int = 1_000_000,
  seed: int = 0,
  max_per_split: int = 0,
  gc_bins: int = 50,
  pad: int | None = None,
) -> dict:
  """Writes one binary task per protein to <out_dir>/<protein>/ (module
  docstring); returns {protein: task.json dict}."""
  genome = _Genome(chrom_path)
  chrom, n = genome.name, len(genome)
  peaks = read_bushey(bed_source, chrom)
  union = merge_intervals([tuple(p) for ps in peaks.values() for p in ps])
  pad = length if pad is None else pad
  # Background stays `pad` nt away from every insulator peak (any protein).
  diff = np.zeros(n + 1, np.int64)
  np.add.at(diff, np.clip(union[:, 0] - pad, 0, n), 1)
  np.add.at(diff, np.clip(union[:, 1] + pad, 0, n), -1)
  avoid_prefix = np.r_[0, np.cumsum(np.cumsum(diff)[:-1] > 0)]
  rng = np.random.default_rng(seed)
  infos = {}
  for protein in proteins:
    spans = peaks[protein]
    if not len(spans):
      raise ValueError(f"{bed_source}: no {protein} peaks on {chrom}.")
    others = merge_intervals([tuple(p) for q, ps in peaks.items() if q != protein for p in ps])
    other_diff = np.zeros(n + 1, np.int64)
    np.add.at(other_diff, np.clip(others[:, 0], 0, n), 1)
    np.add.at(other_diff, np.clip(others[:, 1], 0, n), -1)
    other_prefix = np.r_[0, np.cumsum(np.cumsum(other_diff)[:-1] > 0)]
    # Positives: `length` nt centred on each merged peak.
    starts = (spans[:, 0] + spans[:, 1]) // 2 - length // 2
    starts = starts[(starts >= 0) & (starts + length <= n)]
    starts = starts[genome.clean(starts, length)]
    codes = split_codes(starts, length, block)
    folder = os.path.join(out_dir, protein)
    os.makedirs(folder, exist_ok=True)
    counts, gc_means, shared = {}, {}, {}
    for code, split in enumerate(SPLITS):
      pos = rng.permutation(starts[codes == code])
      if max_per_split:
        pos = pos[:max_per_split]
      neg = gc_matched_background(
        genome, pos, code, avoid_prefix, rng, length=length, block=block, bins=gc_bins
      )
      rows = [(int(s), 1) for s in pos] + [(int(s), 0) for s in neg]
      rows = [rows[i] for i in rng.permutation(len(rows))]
      strands = ["+" if rng.random() < 0.5 else "-" for _ in rows]
      write_split(
        os.path.join(folder, f"{split}.csv"),
        [genome.window(s, length, st) for (s, _), st in zip(rows, strands)],
        [label for _, label in rows],
      )
      with open(os.path.join(folder, f"{split}.regions.bed"), "w", encoding="utf-8") as f:
        for (s, label), st in zip(rows, strands):
          f.write(f"{chrom}\t{s}\t{s + length}\t{label}\t0\t{st}\n")
      counts[split] = {"positives": len(pos), "negatives": len(neg)}
      gc_means[split] = {
        "positives": round(float(genome.gc(pos, length).mean()), 4) if len(pos) else None,
        "negatives": round(float(genome.gc(neg, length).mean()), 4) if len(neg) else None,
      }
      shared[split] = (
        round(float(np.mean(other_prefix[pos + length] > other_prefix[pos])), 4)
        if len(pos)
        else None
      )
    info = {
      "task": f"insulators/{protein}",
      "label_1": f"{length} nt centred on a {BUSHEY[protein]} peak (Bushey 2009, Kc + Mbn2 "
      f"merged, {chrom}, dm3), random strand",
      "label_0": f"{length} nt {chrom} window with the GC bin of a positive ({gc_bins} bins), "
      f">= {pad} nt from any CTCF/BEAF-32/CP190/Su(Hw) peak, no N, random strand",
      "design": "one-vs-background (binary) per protein: the proteins co-bind, so one "
      "class per peak would be ambiguous; positives_sharing_another_protein says how often",
      "sources": {"peaks": bed_source, "genome": chrom_path},
      "split": f"{block:,} bp blocks of {chrom}: block % 10 in (8, 9) test, 7 dev, else "
      "train; windows crossing a block are dropped",
      "length": length,
      "seed": seed,
      "peaks_merged": int(len(spans)),
      "counts": counts,
      "gc_mean": gc_means,
      "positives_sharing_another_protein": shared,
    }
    with open(os.path.join(folder, "task.json"), "w", encoding="utf-8") as f:
      json.dump(info, f, indent=2)
    infos[protein] = info
  return infos


DESIGN_LABELS = {"ctcf": "CTCF", "beaf32": "BEAF-32", "cp190": "CP190", "suhw": "Su(Hw)"}
# Block index % 10 -> design split (module docstring).
DESIGN_SPLITS = ("train", "oracle", "dev", "test")
DESIGN_ROLES = (0, 0, 0, 0, 0, 1, 1, 2, 3, 3)


def make_design_insulators(
  bed_source: str,
  chrom_path: str,
  out_dir: str,
  *,
  length: int = 200,
  block: int = 1_000_000,
  seed: int = 0,
  max_per_split: int = 0,
) -> dict:
  """Writes the insulator design CSVs (module docstring) to `out_dir`:
  <split>.csv (sequence,label) and <split>.regions.bed for each of
  DESIGN_SPLITS, and design.json; returns the design.json dict.
  max_per_split > 0 keeps at most that many rows per protein and split."""
  genome = _Genome(chrom_path)
  chrom, n = genome.name, len(genome)
  peaks = read_bushey(bed_source, chrom)
  rng = np.random.default_rng(seed)
  rows = {s: [] for s in DESIGN_SPLITS}  # (start, label)
  counts: dict[str, dict] = {}
  for protein, label in DESIGN_LABELS.items():
    spans = peaks[protein]
    if not len(spans):
      raise ValueError(f"{bed_source}: no {BUSHEY[protein]} peaks on {chrom}.")
    others = merge_intervals([tuple(p) for q, ps in peaks.items() if q != protein for p in ps])
    # A peak overlapping another protein's peak is ambiguous: dropped. The
    # others are sorted and disjoint, so the last one starting before a
    # peak's end is the only one that can reach past its start.
    before = np.searchsorted(others[:, 0], spans[:, 1], side="left")
    last_end = others[np.maximum(before - 1, 0), 1] if len(others) else np.zeros(len(spans))
    shared = (before > 0) & (last_end > spans[:, 0])
    starts = (spans[:, 0] + spans[:, 1]) // 2 - length // 2
    codes = split_codes(starts, length, block, DESIGN_ROLES)
    usable = ~shared & (starts >= 0) & (starts + length <= n) & (codes >= 0)
    usable[usable] = genome.clean(starts[usable], length)
    info = {
      "peaks_merged": int(len(spans)),
      "dropped_shared_with_another_protein": int(shared.sum()),
      "dropped_crossing_a_block_or_end_or_with_n": int((~shared & ~usable).sum()),
    }
    for code, split in enumerate(DESIGN_SPLITS):
      chosen = rng.permutation(starts[usable & (codes == code)])
      if max_per_split:
        chosen = chosen[:max_per_split]
      rows[split].extend((int(s), label) for s in chosen)
      info[split] = int(len(chosen))
    counts[label] = info
  os.makedirs(out_dir, exist_ok=True)
  gc_means = {}
  for split in DESIGN_SPLITS:
    order = rng.permutation(len(rows[split]))
    split_rows = [rows[split][i] for i in order]
    strands = ["+" if rng.random() < 0.5 else "-" for _ in split_rows]
    sequences = [genome.window(s, length, st) for (s, _), st in zip(split_rows, strands)]
    with open(os.path.join(out_dir, f"{split}.csv"), "w", encoding="utf-8") as f:
      f.write("sequence,label\n")
      f.writelines(f"{seq},{label}\n" for seq, (_, label) in zip(sequences, split_rows))
    with open(os.path.join(out_dir, f"{split}.regions.bed"), "w", encoding="utf-8") as f:
      for (s, label), st in zip(split_rows, strands):
        f.write(f"{chrom}\t{s}\t{s + length}\t{label}\t0\t{st}\n")
    starts = np.array([s for s, _ in split_rows], np.int64)
    gc_means[split] = round(float(genome.gc(starts, length).mean()), 4) if len(starts) else None
  info = {
    "task": "design/insulators",
    "labels": list(DESIGN_LABELS.values()),
    "rows": f"{length} nt centred on a merged peak (Bushey 2009, Kc + Mbn2, {chrom}, dm3) "
    "of one protein, random strand, no N",
    "ambiguous": "a peak overlapping a peak of another protein is dropped",
    "sources": {"peaks": bed_source, "genome": chrom_path},
    "split": f"{block:,} bp blocks of {chrom}, block % 10: 0-4 train (generator), 5-6 oracle, "
    "7 dev (generator validation, oracle k), 8-9 test; windows crossing a block are dropped",
    "length": length,
    "seed": seed,
    "counts": counts,
    "gc_mean": gc_means,
  }
  with open(os.path.join(out_dir, "design.json"), "w", encoding="utf-8") as f:
    json.dump(info, f, indent=2)
  return info


_RANGE = re.compile(r"<?(\d+)\.\.>?(\d+)")


def read_genbank(path: str) -> list[tuple[str, str, list[tuple[str, list[tuple[int, int]]]]]]:
  """Records of an AUGUSTUS GenBank training file: (locus name, sequence
  upper case, [(strand, sorted 1-based inclusive CDS exon ranges)] per CDS)."""
  records = []
  name, seq, cds, location, in_seq = None, [], [], None, False
  with open(path, encoding="utf-8") as f:
    for line in f:
      if line.startswith("LOCUS"):
        name, seq, cds, location, in_seq = line.split()[1], [], [], None, False
      elif line.startswith("//"):
        if name is None:
          raise ValueError(f"{path}: '//' without LOCUS")
        records.append((name, "".join(seq).upper(), cds))
        name = None
      elif line.startswith("ORIGIN"):
        in_seq = True
      elif in_seq:
        seq.extend(line.split()[1:])
      elif line.startswith("     CDS "):
        location = line[21:].strip()
      elif location is not None:
        text = line[21:].strip()
        if text.startswith("/") or not line.startswith(" " * 21):
          strand = "-" if location.startswith("complement") else "+"
          exons = sorted((int(a), int(b)) for a, b in _RANGE.findall(location))
          if not exons:
            raise ValueError(f"{path}: {name}: unreadable CDS location {location!r}")
          cds.append((strand, exons))
          location = None
        else:
          location += text
  return records


def splice_sites(seq: str, strand: str, exons) -> tuple[str, list[int], list[int]]:
  """The locus in gene orientation and its canonical sites as 0-based
  boundaries b: donors with exon | GT intron at seq[b:b+2], acceptors with
  intron AG | exon at seq[b-2:b]. Non-canonical sites are left out."""
  if strand == "-":
    n = len(seq)
    seq = tokenizer.reverse_complement(seq)
    exons = sorted((n - e + 1, n - s + 1) for s, e in exons)
  donors = [e for _, e in exons[:-1] if seq[e : e + 2] == "GT"]
  acceptors = [s - 1 for s, _ in exons[1:] if seq[s - 3 : s - 1] == "AG"]
  return seq, donors, acceptors


def make_splice(
  train_path: str,
  test_path: str,
  out_dir: str,
  *,
  length: int = 200,
  seed: int = 0,
  dev_fraction: float = 0.1,
  max_per_split: int = 0,
) -> dict:
  """Writes <out_dir>/donor and <out_dir>/acceptor (module docstring);
  returns {site: task.json dict}."""
  rng = np.random.default_rng(seed)
  train = read_genbank(train_path)
  test = read_genbank(test_path)
  if not train or not test:
    raise ValueError(f"no GenBank records in {train_path if not train else test_path}.")
  dev_ids = set(rng.permutation(len(train))[: max(1, int(round(dev_fraction * len(train))))])
  loci = {
    "train": [r for i, r in enumerate(train) if i not in dev_ids],
    "dev": [r for i, r in enumerate(train) if i in dev_ids],
    "test": test,
  }
  half = length // 2
  motif = {"donor": (0, "GT"), "acceptor": (-2, "AG")}  # offset of the dinucleotide from b
  infos = {}
  for site in ("donor", "acceptor"):
    offset, dinucleotide = motif[site]
    folder = os.path.join(out_dir, site)
    os.makedirs(folder, exist_ok=True)
    counts = {}
    in_train: set[str] = set()  # train windows, both strands
    for split in SPLITS:
      positives, decoys, shared = [], [], 0
      for _, locus_seq, cds in loci[split]:
        for strand, exons in cds:
          seq, donors, acceptors = splice_sites(locus_seq, strand, exons)
          real = set(donors if site == "donor" else acceptors)
          fits = range(half, len(seq) - (length - half) + 1)
          for b in fits:
            if seq[b + offset : b + offset + 2] != dinucleotide:
              continue
            window = seq[b - half : b - half + length]
            if "N" in window:
              continue
            if split == "train":
              in_train.update((window, tokenizer.reverse_complement(window)))
            elif window in in_train:  # a repeated locus: keep held-out windows unseen
              shared += 1
              continue
            (positives if b in real else decoys).append(window)
      positives = [positives[i] for i in rng.permutation(len(positives))]
      if max_per_split:
        positives = positives[:max_per_split]
      if len(decoys) < len(positives):
        raise RuntimeError(f"{split} {site}: {len(decoys)} decoys for {len(positives)} sites.")
      decoys = [decoys[i] for i in rng.choice(len(decoys), len(positives), replace=False)]
      seqs, labels = positives + decoys, [1] * len(positives) + [0] * len(decoys)
      order = rng.permutation(len(seqs))
      write_split(
        os.path.join(folder, f"{split}.csv"), [seqs[i] for i in order], [labels[i] for i in order]
      )
      counts[split] = {
        "positives": len(positives),
        "negatives": len(decoys),
        "loci": len(loci[split]),
        "dropped_as_in_train": shared,
      }
    infos[site] = {
      "task": f"splice/{site}",
      "label_1": f"{length} nt centred on an annotated canonical {site} site "
      f"({dinucleotide}), gene orientation",
      "label_0": f"{length} nt centred on another {dinucleotide} of the same split's loci "
      "(gene orientation, any exon or intron position)",
      "sources": {"train": train_path, "test": test_path},
      "split": f"AUGUSTUS genes.gb.train / genes.gb.test loci as given; dev: "
      f"{dev_fraction:.0%} of the train loci (seeded); dev/test windows found in train dropped",
      "length": length,
      "seed": seed,
      "counts": counts,
    }
    with open(os.path.join(folder, "task.json"), "w", encoding="utf-8") as f:
      json.dump(infos[site], f, indent=2)
  return infos


def _missing(what: str, package: str) -> int:
  print(f"missing {what} ({package}); run bash scripts/fetch_real_task_data.sh", file=sys.stderr)
  return 1


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("task", choices=["promoters", "insulators", "splice", "design_insulators"])
  parser.add_argument("--out", required=True, help="output task folder")
  parser.add_argument("--cache_dir", default="data_cache", help="where fetch put the packages")
  parser.add_argument(
    "--length", type=int, default=None, help="window length (default 300; splice 200)"
  )
  parser.add_argument("--block", type=int, default=1_000_000)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--max_per_split", type=int, default=0, help="0: all positives")
  parser.add_argument(
    "--proteins", default=",".join(BUSHEY), help=f"insulators: some of {','.join(BUSHEY)}"
  )
  parser.add_argument("--gc_bins", type=int, default=50, help="insulators: GC matching bins")
  return parser


def main(argv=None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  needed = {
    "promoters": (UPSTREAM, CHR2R),
    "insulators": (CHR2R,),
    "design_insulators": (CHR2R,),
    "splice": (GENES_TRAIN, GENES_TEST),
  }[args.task]
  paths = {}
  for relative in needed:
    paths[relative] = find_source(relative, args.cache_dir)
    if paths[relative] is None:
      return _missing(relative, f"Debian package {PACKAGES[relative]}")
  if args.task == "splice":
    infos = make_splice(
      paths[GENES_TRAIN],
      paths[GENES_TEST],
      args.out,
      length=args.length or 200,
      seed=args.seed,
      max_per_split=args.max_per_split,
    )
    print(json.dumps({s: i["counts"] for s, i in infos.items()}))
    return 0
  common = dict(length=args.length or 300, block=args.block, seed=args.seed)
  if args.task == "promoters":
    info = make_promoters(
      paths[UPSTREAM], paths[CHR2R], args.out, max_per_split=args.max_per_split, **common
    )
    print(json.dumps(info["counts"]))
    return 0
  beds = find_bushey(args.cache_dir)
  if beds is None:
    return _missing("*_Bushey_2009.bed", "the pybedtools 0.12.1 wheel")
  if args.task == "design_insulators":
    info = make_design_insulators(
      beds,
      paths[CHR2R],
      args.out,
      length=args.length or 200,
      block=args.block,
      seed=args.seed,
      max_per_split=args.max_per_split,
    )
    print(json.dumps(info["counts"]))
    return 0
  proteins = [p.strip() for p in args.proteins.split(",") if p.strip()]
  unknown = sorted(set(proteins) - set(BUSHEY))
  if unknown:
    parser.error(f"unknown proteins {unknown}; choose from {list(BUSHEY)}")
  infos = make_insulators(
    beds,
    paths[CHR2R],
    args.out,
    proteins=proteins,
    max_per_split=args.max_per_split,
    gc_bins=args.gc_bins,
    **common,
  )
  print(json.dumps({p: i["counts"] for p, i in infos.items()}))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
