"""How a set of designed sequences compares with the training sequences.

For each designed set (one per prompt) `summarize` reports:

  gc_mean, gc_std          GC content of the designs (share of G + C among
                           A C G T), and of the reference (training) set
  kmer_js                  Jensen-Shannon distance (base 2, in [0, 1])
                           between the k-mer spectra (default 6-mers,
                           overlapping, both strands not merged) of m
                           designs and of the training sequences of the
                           same label outside a random subset of m of them
                           (m: the designs' count, at most half the
                           training sequences; a seeded sample of the
                           designs when there are more)
  kmer_js_floor            the same distance for that subset of m training
                           sequences against the same rest: what sampling
                           noise alone gives at equal sizes, so kmer_js
                           near the floor means "as close as real data
                           gets"
  edit_mean, edit_norm     mean pairwise Levenshtein distance among the
                           designs (diversity), absolute and divided by the
                           longer length of each pair; the reference's own
                           value next to it (edit_norm_reference)
  copy_share               share of designs identical to a training
                           sequence (any label) or to its reverse
                           complement
  length_mean              mean design length (the DNA prefix included)
  log_prob_per_nt          the model's mean log-probability per scored
                           token: the generated nucleotides and the <eos>
                           of rows that ended with one (not the prefix)

All of it is numpy on the host; the pairwise edit distances run as one
dynamic programme over all pairs at once (a row of the DP table per step,
the insertion chain as a cumulative minimum), so 100 designs of 200 nt
(4,950 pairs) take well under a second.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from hybridna_jax import plotting
from hybridna_jax import tokenizer as tok

_BASE_CODE = np.full(256, -1, np.int64)
for _i, _b in enumerate("ACGT"):
  _BASE_CODE[ord(_b)] = _i


def gc_content(sequences: Sequence[str]) -> np.ndarray:
  """(n,) share of G + C among the A C G T of each sequence (NaN if none)."""
  out = np.full(len(sequences), np.nan)
  for i, s in enumerate(sequences):
    codes = _BASE_CODE[np.frombuffer(s.upper().encode("ascii"), np.uint8)]
    acgt = codes >= 0
    if acgt.any():
      out[i] = np.isin(codes[acgt], (1, 2)).mean()
  return out


def kmer_counts(sequences: Sequence[str], k: int = 6) -> np.ndarray:
  """(4 ** k,) counts of overlapping k-mers (k-mers with N are skipped);
  index = the k-mer read as a base-4 number, A=0 C=1 G=2 T=3."""
  counts = np.zeros(4**k, np.int64)
  powers = 4 ** np.arange(k - 1, -1, -1, dtype=np.int64)
  for s in sequences:
    codes = _BASE_CODE[np.frombuffer(s.upper().encode("ascii"), np.uint8)]
    if codes.size < k:
      continue
    windows = np.lib.stride_tricks.sliding_window_view(codes, k)
    valid = (windows >= 0).all(axis=1)
    counts += np.bincount(windows[valid] @ powers, minlength=4**k)
  return counts


def js_distance(p: np.ndarray, q: np.ndarray) -> float:
  """Jensen-Shannon distance (sqrt of the base-2 divergence) of two count
  or frequency vectors; 0 for identical spectra, 1 for disjoint ones."""
  p = np.asarray(p, np.float64)
  q = np.asarray(q, np.float64)
  if p.sum() == 0 or q.sum() == 0:
    return math.nan
  p, q = p / p.sum(), q / q.sum()
  m = 0.5 * (p + q)

  def kl(a):
    nz = a > 0
    return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

  return math.sqrt(max(0.0, 0.5 * kl(p) + 0.5 * kl(q)))


def edit_distances(a: Sequence[str], b: Sequence[str]) -> np.ndarray:
  """(n,) Levenshtein distances of the pairs (a[i], b[i]), all at once.

  Row i of the DP table for every pair is computed from row i - 1 with
  vectorised substitutions/deletions, then insertions by a running
  minimum: d[j] = min_k (d[k] + j - k) = j + cummin(d[k] - k).
  """
  n = len(a)
  if n != len(b):
    raise ValueError(f"{n} and {len(b)} sequences: pairs need equal counts.")
  if n == 0:
    return np.zeros((0,), np.int64)
  len_a = np.array([len(s) for s in a])
  len_b = np.array([len(s) for s in b])
  width_a, width_b = int(len_a.max()), int(len_b.max())
  codes_a = np.full((n, width_a), -1, np.int8)
  codes_b = np.full((n, width_b), -2, np.int8)  # padding never matches
  for i, (s, t) in enumerate(zip(a, b)):
    codes_a[i, : len(s)] = np.frombuffer(s.encode("ascii"), np.uint8)
    codes_b[i, : len(t)] = np.frombuffer(t.encode("ascii"), np.uint8)
  columns = np.arange(width_b + 1, dtype=np.int32)
  row = np.broadcast_to(columns, (n, width_b + 1)).copy()
  result = row[np.arange(n), len_b].astype(np.int64)  # len_a == 0
  for i in range(1, width_a + 1):
    cost = (codes_b != codes_a[:, i - 1 : i]).astype(np.int32)
    new = np.empty_like(row)
    new[:, 0] = i
    new[:, 1:] = np.minimum(row[:, 1:] + 1, row[:, :-1] + cost)
    new = columns + np.minimum.accumulate(new - columns, axis=1)
    row = new
    done = len_a == i
    if done.any():
      result[done] = row[done, len_b[done]]
  return result


def pairwise_edit_distance(
  sequences: Sequence[str], *, max_pairs: int = 20_000, seed: int = 0
) -> tuple[float, float]:
  """Mean pairwise edit distance, absolute and normalised by the longer
  sequence of each pair; at most `max_pairs` pairs (a seeded sample of
  them when there are more). NaN for fewer than two sequences."""
  n = len(sequences)
  if n < 2:
    return math.nan, math.nan
  i, j = np.triu_indices(n, k=1)
  if i.size > max_pairs:
    pick = np.random.default_rng(seed).choice(i.size, max_pairs, replace=False)
    i, j = i[pick], j[pick]
  distances = edit_distances([sequences[x] for x in i], [sequences[x] for x in j])
  longer = np.maximum([len(sequences[x]) for x in i], [len(sequences[x]) for x in j])
  return float(distances.mean()), float((distances / np.maximum(longer, 1)).mean())


def summarize(
  designs: Sequence[str],
  reference: Sequence[str] | None = None,
  *,
  training: set[str] | None = None,
  log_probs: Sequence[float] | None = None,
  scored_tokens: Sequence[int] | None = None,
  k: int = 6,
  max_pairs: int = 20_000,
  seed: int = 0,
) -> dict:
  """The summary of one designed set (module docstring).

  Args:
    designs: designed sequences. reference: training sequences of the
      same label (None: reference metrics are left out). training: every
      training sequence, for copy_share (None: the reference).
    log_probs: model log-probabilities of the designs (with their <eos>),
      and scored_tokens, needed with them: how many tokens each sums over
      (generated nucleotides, + 1 for an <eos>; a DNA prefix is not scored).
  """
  if log_probs is not None and scored_tokens is None:
    raise ValueError("summarize: log_probs need scored_tokens, the tokens each one sums over.")
  designs = list(designs)
  lengths = np.array([len(s) for s in designs])
  gc = gc_content(designs)
  edit_mean, edit_norm = pairwise_edit_distance(designs, max_pairs=max_pairs, seed=seed)
  out = {
    "n": len(designs),
    "length_mean": float(lengths.mean()) if designs else math.nan,
    "gc_mean": float(np.nanmean(gc)) if designs else math.nan,
    "gc_std": float(np.nanstd(gc)) if designs else math.nan,
    "edit_mean": edit_mean,
    "edit_norm": edit_norm,
  }
  if log_probs is not None and designs:
    out["log_prob_per_nt"] = float(np.sum(log_probs) / max(int(np.sum(scored_tokens)), 1))
  if reference:
    reference = list(reference)
    rng = np.random.default_rng(seed)
    ref_gc = gc_content(reference)
    out["reference_n"] = len(reference)
    out["gc_reference"] = float(np.nanmean(ref_gc))
    ref_counts = kmer_counts(reference, k)
    # The designs and the noise floor (as many reference sequences) are both
    # compared with the same rest of the reference, at equal sizes: a
    # smaller sample has a larger distance, so unequal sizes bias the verdict.
    size = min(len(designs), len(reference) // 2)
    if size >= 1:
      chosen = rng.choice(len(reference), size, replace=False)
      subset_counts = kmer_counts([reference[i] for i in chosen], k)
      rest = ref_counts - subset_counts
      sample = designs
      if size < len(designs):
        sample = [designs[i] for i in rng.choice(len(designs), size, replace=False)]
      out["kmer_js"] = js_distance(kmer_counts(sample, k), rest)
      out["kmer_js_floor"] = js_distance(subset_counts, rest)
    else:  # one reference sequence: no floor
      out["kmer_js"] = js_distance(kmer_counts(designs, k), ref_counts)
    ref_sample = [
      reference[i]
      for i in rng.choice(len(reference), min(len(reference), len(designs) or 1), replace=False)
    ]
    out["edit_norm_reference"] = pairwise_edit_distance(ref_sample, max_pairs=max_pairs, seed=seed)[
      1
    ]
  pool = training if training is not None else (set(reference) if reference else None)
  if pool is not None and designs:
    # Training often reverse-complements (generate.reverse_complement_prob):
    # a memorised sequence comes out on either strand.
    out["copy_share"] = float(
      np.mean([s in pool or tok.reverse_complement(s) in pool for s in designs])
    )
  return out


TABLE_COLUMNS = (
  ("n", "n", "{:d}"),
  ("length_mean", "len", "{:.1f}"),
  ("gc_mean", "GC", "{:.3f}"),
  ("gc_reference", "GC train", "{:.3f}"),
  ("kmer_js", "k-mer JS", "{:.3f}"),
  ("kmer_js_floor", "JS floor", "{:.3f}"),
  ("edit_norm", "edit/len", "{:.3f}"),
  ("edit_norm_reference", "edit/len train", "{:.3f}"),
  ("copy_share", "copies", "{:.3f}"),
  ("log_prob_per_nt", "logp/nt", "{:.3f}"),
)


def format_table(summaries: dict[str, dict]) -> str:
  """A plain-text table, one row per prompt."""
  header = ["prompt"] + [title for _, title, _ in TABLE_COLUMNS]
  rows = []
  for name, s in summaries.items():
    cells = [name]
    for key, _, fmt in TABLE_COLUMNS:
      v = s.get(key)
      cells.append("-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v))
    rows.append(cells)
  return "\n".join(text_table(header, rows))


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
  """Lines of a plain-text table: the first column left-aligned, the others
  right-aligned, a rule under the header."""
  widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]

  def line(cells):
    return "  ".join(
      x.ljust(w) if c == 0 else x.rjust(w) for c, (x, w) in enumerate(zip(cells, widths))
    )

  return [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def plot_summary(
  designs: dict[str, Sequence[str]], references: dict[str, Sequence[str]], path: str, *, k: int = 6
) -> str:
  """GC histograms (designs vs training, per prompt) and a k-mer frequency
  scatter (designed vs training frequency of every k-mer). Returns path."""
  plt = plotting.pyplot()

  names = list(designs)
  fig, axes = plt.subplots(2, len(names), figsize=(4 * len(names), 7), dpi=110, squeeze=False)
  bins = np.linspace(0, 1, 41)
  for c, name in enumerate(names):
    ax = axes[0, c]
    ref = references.get(name)
    if ref:
      ax.hist(gc_content(ref), bins=bins, density=True, alpha=0.5, label="training")
    ax.hist(gc_content(designs[name]), bins=bins, density=True, alpha=0.6, label="designed")
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("GC content")
    ax.legend(fontsize=8)
    ax = axes[1, c]
    if ref:
      p = kmer_counts(designs[name], k).astype(float)
      q = kmer_counts(ref, k).astype(float)
      p, q = p / max(p.sum(), 1), q / max(q.sum(), 1)
      ax.loglog(q + 1e-7, p + 1e-7, ".", ms=2, alpha=0.5)
      lim = [1e-7, max(p.max(), q.max()) * 2]
      ax.plot(lim, lim, "k-", lw=0.5)
      ax.set_xlabel(f"{k}-mer frequency, training")
      ax.set_ylabel(f"{k}-mer frequency, designed")
      ax.set_title(f"JS distance {js_distance(p, q):.3f}", fontsize=9)
    else:
      ax.set_axis_off()
  return plotting.save(fig, path)


def decode_designs(tokens: np.ndarray) -> list[str]:
  """Generated token rows (b, t) -> DNA strings (stopping at <eos>)."""
  out = []
  for row in np.asarray(tokens):
    ends = np.flatnonzero(row == tok.EOS)
    out.append(tok.decode(row[: ends[0]] if ends.size else row))
  return out
