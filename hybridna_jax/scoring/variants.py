"""Zero-shot variant effects: the log-likelihood ratio of alt vs ref windows.

    reference = load_reference("GRCh38.fa.gz", chromosomes={"chr17"})
    variants, problems = read_variants("clinvar_brca1.vcf.gz")
    scores, skipped = score_variants(scorer, variants, reference, window=8192)
    write_scores("effects.tsv", scores)

Inputs: a VCF (plain or gzip/bgzip; CHROM POS ID REF ALT, further columns
ignored; a multi-allelic ALT gives one variant per allele) or a CSV with a
header naming chrom,pos,ref,alt (optional id; 1-based pos), plus the
reference FASTA. SNVs, MNVs and small indels are scored; REF and ALT are in
VCF form (indels usually share a leading base, e.g. AT -> A).

Windows are length-fair: the ref and alt windows have the same length, so
an indel's score never counts the cost of extra tokens. For a variant
replacing REF (r bases at 0-based p) by ALT (a bases), m = max(r, a), the
reference window is `window` bases of the chromosome and the alt window
`window` bases of the alt haplotype (the chromosome with REF replaced by
ALT), both starting (window - m) // 2 bases before the variant (shifted
inwards where a chromosome end is near; `window` is capped at the shorter
haplotype):

    ref = chrom[s : p] + REF + chrom[p + r : s + window]
    alt = chrom[s : p] + ALT + chrom[p + r : s + window + r - a]

The two share the left flank; the right flank of the shorter allele's
window reaches |a - r| bases further, so each inserted base is weighed
against one more reference base rather than against nothing. (The other
fair choice, summing only the positions both windows share, would drop the
inserted bases' own likelihood; equal windows keep it.) Consequences: an
indel's LLR carries no length bias -- a model whose predictions do not
depend on context gives exactly 0 when they are uniform (the untrained
model is close to that) and, for an order-0 model, only the composition
difference between the inserted bases and as many flanking bases, whatever
the indel's length -- and an insertion and the deletion that undoes it
(scored on the haplotype that carries the insertion) swap windows and get
exactly opposite scores, wherever neither window meets a chromosome end.
SNVs and MNVs are unchanged: both windows are the chromosome around them.

The score is LLR = log P(alt window) - log P(ref window) (nats, summed over
scored positions; negative: the model finds the alt sequence less likely).
Variants with the same reference window (e.g. the alleles of one site)
share its forward pass. With rc_average the LLR is the mean over both
strands, and the per-strand values are reported too. The first base of a
window is not predicted (nothing precedes it) unless score.add_bos puts
<bos> before it, so a window puts at least one base before the allele
wherever it can (also when it is one base longer than the allele). Without
add_bos, an SNV at a chromosome's first base (the only case where a window
must start at the variant) gets no term for its own base on the forward
strand, only those of the bases after it.

Bad records are never scored silently: each is reported with its file and
line (a logged warning and a row of the skipped-records TSV) and skipped --
a malformed line, a POS other than ASCII digits of a number from 1
(`parse_pos`), REF not matching the reference, an unknown chromosome, a
position past the chromosome's end, a symbolic or structural allele (<DEL>,
breakends, *), an allele with N or other characters, REF equal to ALT, an
indel longer than max_indel_length, or alleles not shorter than their
window (capped at the context and at a short chromosome).
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple, TextIO

import numpy as np
from absl import logging

from hybridna_jax import plotting, tokenizer
from hybridna_jax.data import fasta, textfiles

VCF_COLUMNS = ("#CHROM", "POS", "ID", "REF", "ALT")
CSV_COLUMNS = ("chrom", "pos", "ref", "alt")
_ALLELE_BASES = frozenset("ACGT")


class VariantFormatError(ValueError):
  """A variant file that cannot be read at all (the message names the file
  and line); single bad records are `Problem`s instead."""

  def __init__(self, path: str, line: int | None, message: str):
    self.path, self.line = str(path), line
    where = f"{path} line {line}" if line is not None else str(path)
    super().__init__(f"{where}: {message}")


@dataclasses.dataclass(frozen=True)
class Variant:
  """One alternate allele at a site (1-based `pos`, VCF-style alleles)."""

  chrom: str
  pos: int
  ref: str
  alt: str
  id: str = "."
  source: str = ""  # "file:line", for reports

  @property
  def kind(self) -> str:
    """The type: SNV, MNV, insertion, deletion or indel (a complex
    replacement), of the alleles without the bases they share
    (`trim_alleles`): a multi-allelic site pads every ALT to the longest
    REF, and ACT>GCT is an SNV, CAT>CT a deletion."""
    ref, alt = trim_alleles(self.ref, self.alt)
    if len(ref) == len(alt):
      return "SNV" if len(ref) == 1 else "MNV"
    # The shorter allele is the anchor of the longer: before it, or after it
    # (an event at POS 1 is padded with the base after it: A>GTA).
    short, long = sorted((ref, alt), key=len)
    if long.startswith(short) or long.endswith(short):
      return "insertion" if len(alt) > len(ref) else "deletion"
    return "indel"


def trim_alleles(ref: str, alt: str) -> tuple[str, str]:
  """REF and ALT without their shared suffix, then their shared prefix, each
  keeping at least one base (an indel keeps its anchor base), as in
  left-normalisation: ("CAT", "CT") -> ("CA", "C"), ("ACT", "GCT") -> ("A", "G")."""
  while len(ref) > 1 and len(alt) > 1 and ref[-1] == alt[-1]:
    ref, alt = ref[:-1], alt[:-1]
  while len(ref) > 1 and len(alt) > 1 and ref[0] == alt[0]:
    ref, alt = ref[1:], alt[1:]
  return ref, alt


class Problem(NamedTuple):
  """A record that was reported and skipped."""

  source: str  # "file:line"
  chrom: str
  pos: str
  ref: str
  alt: str
  reason: str


class VariantScore(NamedTuple):
  """The effect of one variant.

  llr: log P(alt window) - log P(ref window), nats (strand mean with
    rc_average). llr_forward / llr_reverse: per strand (reverse NaN without
    rc_average). ref_loglik / alt_loglik: the window log-likelihoods behind
    llr. window_start / window_end: 0-based, end-exclusive reference
    coordinates of the window.
  """

  variant: Variant
  llr: float
  llr_forward: float
  llr_reverse: float
  ref_loglik: float
  alt_loglik: float
  window_start: int
  window_end: int


# -- reading variants ------------------------------------------------------------------


def _allele_problem(ref: str, alt: str, max_indel_length: int) -> str | None:
  """Why a REF/ALT pair cannot be scored, or None."""
  if alt in (".", "*") or alt.startswith("<") or "[" in alt or "]" in alt:
    return (
      f"symbolic or structural ALT allele {alt!r}; only sequence-resolved "
      "SNVs and small indels are scored"
    )
  for name, allele in (("REF", ref), ("ALT", alt)):
    if not allele:
      return f"empty {name} allele"
    bad = sorted(set(allele) - _ALLELE_BASES)
    if bad:
      what = "N (an unknown base)" if bad == ["N"] else f"characters {''.join(bad)!r}"
      return f"{name} allele {allele!r} contains {what}; only A C G T alleles are scored"
  if ref == alt:
    return "ALT equals REF"
  # The event, without the bases a multi-allelic site pads every ALT with.
  event = trim_alleles(ref, alt)
  if max(map(len, event)) > max_indel_length:
    return (
      f"alleles of {len(event[0])} and {len(event[1])} bases (without shared bases) exceed "
      f"max_indel_length={max_indel_length} (score.max_indel_length); not a small variant"
    )
  return None


def parse_pos(text: str) -> int | None:
  """A POS field as an int, or None unless it is ASCII digits (no sign,
  space, '_' or other digits) of a number of at least 1. The one check of
  every reader (`read_vcf`, `read_variant_csv`, callsets.CallSet), so a
  record is scored only when its annotated line is written too."""
  if not (text.isascii() and text.isdigit()):
    return None
  pos = int(text)
  return pos if pos > 0 else None


def _make_variants(
  path: str,
  number: int,
  chrom: str,
  pos_text: str,
  ref: str,
  alts: Sequence[str],
  variant_id: str,
  max_indel_length: int,
  problems: list[Problem],
) -> list[Variant]:
  source = f"{path}:{number}"
  ref = ref.strip().upper()
  pos = parse_pos(pos_text)
  if pos is None:
    problems.append(
      Problem(
        source,
        chrom,
        pos_text,
        ref,
        ",".join(alts),
        f"POS {pos_text!r} is not a positive integer (ASCII digits only)",
      )
    )
    return []
  out = []
  for alt in alts:
    alt = alt.strip().upper()
    reason = _allele_problem(ref, alt, max_indel_length)
    if reason:
      problems.append(Problem(source, chrom, pos_text, ref, alt, reason))
    else:
      out.append(Variant(chrom, pos, ref, alt, variant_id or ".", source))
  return out


def read_vcf(path: str, *, max_indel_length: int = 64) -> tuple[list[Variant], list[Problem]]:
  """Variants of a VCF (plain, gzip or bgzip), one per ALT allele.

  Raises:
    VariantFormatError: no #CHROM header line before the first record, or
      a header without the columns CHROM POS ID REF ALT.
  """
  path = os.fspath(path)
  variants, problems = [], []
  header_seen = False
  for number, line in textfiles.text_lines(path):
    if not line.strip() or line.startswith("##"):
      continue
    fields = line.split("\t")
    if line.startswith("#"):
      if tuple(f.upper() for f in fields[:5]) != VCF_COLUMNS:
        raise VariantFormatError(
          path,
          number,
          "the header line must start with the "
          f"tab-separated columns {' '.join(VCF_COLUMNS)}, got "
          f"{line[:80]!r}.",
        )
      header_seen = True
      continue
    if not header_seen:
      raise VariantFormatError(
        path,
        number,
        "a record before the '#CHROM POS ID REF ALT' "
        "header line; is this a VCF? (CSV files need a .csv name)",
      )
    if len(fields) < 5:
      problems.append(
        Problem(
          f"{path}:{number}",
          fields[0],
          "",
          "",
          "",
          f"{len(fields)} tab-separated fields, a VCF record needs at "
          "least 5 (CHROM POS ID REF ALT)",
        )
      )
      continue
    chrom, pos, variant_id, ref, alt = fields[:5]
    variants += _make_variants(
      path, number, chrom, pos, ref, alt.split(","), variant_id, max_indel_length, problems
    )
  if not header_seen:
    raise VariantFormatError(path, None, "no '#CHROM POS ID REF ALT' header line; is this a VCF?")
  return variants, problems


def read_variant_csv(
  path: str, *, max_indel_length: int = 64
) -> tuple[list[Variant], list[Problem]]:
  """Variants of a CSV with a header naming chrom,pos,ref,alt (any order,
  case-insensitive; an optional id column; other columns ignored).

  Raises:
    VariantFormatError: a header without the required columns.
  """
  variants, problems = [], []
  for _, found, bad in variant_csv_rows(path, max_indel_length=max_indel_length):
    variants += found
    problems += bad
  return variants, problems


def variant_csv_rows(
  path: str, *, max_indel_length: int = 64
) -> Iterator[tuple[str, list[Variant], list[Problem]]]:
  """(source "file:line", variants, problems) of each row of a variant CSV
  (`read_variant_csv`), in file order, streamed. The header is read and
  checked at the call; the rows as they are iterated.

  Raises:
    VariantFormatError: an empty file or a header without the required columns.
  """
  path = os.fspath(path)
  rows = textfiles.csv_rows(
    path,
    error=VariantFormatError,
    comment="#",
    check_width=False,
    expected=f"a header naming {','.join(CSV_COLUMNS)}",
  )
  number, header = next(rows)
  names = [c.lower() for c in header]
  missing = [c for c in CSV_COLUMNS if c not in names]
  if missing:
    raise VariantFormatError(
      path,
      number,
      f"the header {','.join(header)[:80]!r} lacks the "
      f"columns {', '.join(missing)}; expected a header naming "
      f"{','.join(CSV_COLUMNS)} (and optionally id).",
    )
  columns = {name: names.index(name) for name in CSV_COLUMNS + ("id",) if name in names}
  return _csv_variant_rows(path, rows, columns, len(names), max_indel_length)


def _csv_variant_rows(
  path: str,
  rows: Iterator[tuple[int, list[str]]],
  columns: dict[str, int],
  width: int,
  max_indel_length: int,
) -> Iterator[tuple[str, list[Variant], list[Problem]]]:
  for number, row in rows:
    source, problems = f"{path}:{number}", []
    if len(row) < width:
      problems.append(
        Problem(source, row[0], "", "", "", f"{len(row)} fields, the header has {width}")
      )
      yield source, [], problems
      continue
    get = lambda key: row[columns[key]].strip() if key in columns else ""  # noqa: B023 (used at once)
    found = _make_variants(
      path,
      number,
      get("chrom"),
      get("pos"),
      get("ref"),
      [get("alt")],
      get("id"),
      max_indel_length,
      problems,
    )
    yield source, found, problems


def read_variants(path: str, *, max_indel_length: int = 64) -> tuple[list[Variant], list[Problem]]:
  """A VCF (.vcf, .vcf.gz, .vcf.bgz) or a CSV (.csv, .csv.gz), by name."""
  name = os.path.basename(os.fspath(path)).lower()
  for suffix in fasta.COMPRESSION_SUFFIXES:
    name = name.removesuffix(suffix)
  if name.endswith(".vcf"):
    return read_vcf(path, max_indel_length=max_indel_length)
  if name.endswith(".csv"):
    return read_variant_csv(path, max_indel_length=max_indel_length)
  raise VariantFormatError(
    path,
    None,
    "unknown variant file type; name it .vcf[.gz] (VCF) or .csv (columns chrom,pos,ref,alt).",
  )


# -- the reference ------------------------------------------------------------------------


class Reference:
  """Chromosome sequences (uint8 tokens) of a reference FASTA, by name."""

  def __init__(self, path: str, chromosomes: dict[str, np.ndarray], all_names: Sequence[str]):
    self.path = path
    self.chromosomes = chromosomes
    self.all_names = tuple(all_names)

  def __contains__(self, name: str) -> bool:
    return name in self.chromosomes

  def __getitem__(self, name: str) -> np.ndarray:
    return self.chromosomes[name]

  def unknown_reason(self, chrom: str) -> str:
    names = self.all_names
    hint = ""
    alias = chrom[3:] if chrom.startswith("chr") else "chr" + chrom
    if alias in names:
      hint = f"; the reference calls it {alias!r} (rename the chromosomes to match)"
    else:
      close = difflib.get_close_matches(chrom, names, n=3)
      if close:
        hint = f"; close names: {', '.join(close)}"
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
    return f"chromosome {chrom!r} is not in the reference {self.path} ({shown}){hint}"


def load_reference(path: str, chromosomes: Iterable[str] | None = None) -> Reference:
  """Reads a reference FASTA (plain or compressed), streaming it once and
  keeping only `chromosomes` (all when None) in memory as uint8 tokens.

  Raises:
    FastaFormatError: a malformed FASTA (file and line named).
  """
  path = os.fspath(path)
  wanted = None if chromosomes is None else set(chromosomes)
  kept: dict[str, np.ndarray] = {}
  names: list[str] = []
  keep = None if wanted is None else wanted.__contains__
  for header, tokens in fasta.iter_records(path, keep=keep, allow_empty_records=True):
    names.append(header.name)
    if tokens is not None:
      kept[header.name] = tokens
  if not names:
    raise fasta.FastaFormatError(path, None, "no FASTA records; is this the reference?")
  return Reference(path, kept, names)


def check_variants(
  variants: Sequence[Variant], reference: Reference
) -> tuple[list[Variant], list[Problem]]:
  """Variants whose chromosome, position and REF agree with the reference;
  the rest as problems."""
  valid, problems = [], []
  for v in variants:
    reason = None
    if v.chrom not in reference:
      reason = reference.unknown_reason(v.chrom)
    else:
      chrom = reference[v.chrom]
      end = v.pos - 1 + len(v.ref)
      if end > len(chrom):
        reason = (
          f"position {v.pos} (REF of {len(v.ref)} bases) is past the end of "
          f"{v.chrom} (length {len(chrom):,})"
        )
      else:
        actual = tokenizer.decode(chrom[v.pos - 1 : end])
        if actual != v.ref:
          reason = (
            f"REF {v.ref!r} does not match the reference {actual!r} at "
            f"{v.chrom}:{v.pos} (wrong reference build, or 0-based positions?)"
          )
    if reason:
      problems.append(Problem(v.source, v.chrom, str(v.pos), v.ref, v.alt, reason))
    else:
      valid.append(v)
  return valid, problems


# -- windows and scores ---------------------------------------------------------------------


def scoring_window(window: int, scorer) -> int:
  """The variant window used with `scorer`: `window` nucleotides, capped at
  what one model window holds (`scorer.window_nucleotides`: the context,
  less a <bos>); a longer one would run as two windows.

  Raises:
    ValueError: a window under 2 nucleotides.
  """
  if window < 2:
    raise ValueError(f"score.variant_window must be at least 2, got {window}.")
  return min(window, scorer.window_nucleotides)


def window_length(variant: Variant, chrom_length: int, window: int) -> int:
  """The length of a variant's windows on a chromosome of `chrom_length`
  bases: `window` capped at the shorter of the two haplotypes, min(window,
  n, n - r + a); the alleles fit when it is longer than both."""
  r, a = len(variant.ref), len(variant.alt)
  return min(window, chrom_length, chrom_length - r + a)


def variant_windows(
  variant: Variant, chrom: np.ndarray, window: int
) -> tuple[tuple[int, int], np.ndarray, np.ndarray]:
  """Equal-length reference and alt windows of a variant (module docstring).

  Args:
    variant: the variant (its REF must match `chrom`).
    chrom: (n,) the chromosome's tokens.
    window: window length; capped at the shorter of the two haplotypes
      (`window_length`).

  Returns:
    (start, end) of the reference window (0-based, end-exclusive), and the
    ref and alt windows as (w,) int32 tokens each, w = min(window, n,
    n - r + a).

  Raises:
    ValueError: the capped window is shorter than an allele
      (`score_variants` reports such variants instead).
  """
  p, r, a = variant.pos - 1, len(variant.ref), len(variant.alt)
  m = max(r, a)
  window = window_length(variant, len(chrom), window)
  if window < m:
    raise ValueError(f"window {window} is shorter than the alleles of {variant}.")
  # Centred, with a base before the allele wherever the window has room:
  # a window's first base is not predicted (module docstring).
  left = max((window - m) // 2, min(1, window - m))

  def start_in(length: int) -> int:
    # Centred, shifted inwards at either end; always holds the allele.
    return min(max(p - left, 0), length - window)

  s_ref, s_alt = start_in(len(chrom)), start_in(len(chrom) - r + a)
  ref_tokens = np.asarray(chrom[s_ref : s_ref + window], np.int32)
  right = s_alt + window - (p + a)  # alt-window bases after ALT
  alt_tokens = np.concatenate(
    [chrom[s_alt:p], tokenizer.encode(variant.alt), chrom[p + r : p + r + right]]
  ).astype(np.int32)
  return (s_ref, s_ref + window), ref_tokens, alt_tokens


def score_variants(
  scorer,
  variants: Sequence[Variant],
  reference: Reference,
  *,
  window: int,
  rc_average: bool = False,
  progress: Callable[[int, int], None] | None = None,
) -> tuple[list[VariantScore], list[Problem]]:
  """Checks `variants` against `reference` and scores the valid ones.

  Args:
    scorer: a `hybridna_jax.scoring.Scorer`; `window` is capped at its
      context (less its <bos>).
    window: window length in nucleotides (config score.variant_window).
    rc_average: average the LLR over both strands.

  Returns:
    (scores of the valid variants in input order, problems found here);
    each problem is also logged with its file and line.
  """
  used = scoring_window(window, scorer)
  if used < window:
    logging.info("variant window %d capped at %d by the scoring context.", window, used)
    window = used
  checked, problems = check_variants(variants, reference)
  valid = []
  for v in checked:
    # Each window needs a flank besides the alleles; a short chromosome caps it.
    n = len(reference[v.chrom])
    capped = window_length(v, n, window)
    if max(len(v.ref), len(v.alt)) < capped:
      valid.append(v)
      continue
    why = f"alleles longer than the window ({capped} nt"
    why += f", capped by the {n:,}-nt chromosome)" if capped < window else ")"
    problems.append(Problem(v.source, v.chrom, str(v.pos), v.ref, v.alt, why))
  report_problems(problems)

  # Unique windows: reference windows are shared between variants.
  sequences: list[np.ndarray] = []
  ref_index: dict[tuple[str, int, int], int] = {}
  plans = []
  for v in valid:
    span, ref_tokens, alt_tokens = variant_windows(v, reference[v.chrom], window)
    key = (v.chrom,) + span
    if key not in ref_index:
      ref_index[key] = len(sequences)
      sequences.append(ref_tokens)
    sequences.append(alt_tokens)
    plans.append((ref_index[key], len(sequences) - 1, span))
  logging.info(
    "scoring %d variants: %d windows (%d reference windows, one per site)%s",
    len(valid),
    len(sequences),
    len(ref_index),
    ", both strands" if rc_average else "",
  )
  if not valid:
    return [], problems
  inputs = sequences + (
    [tokenizer.reverse_complement_nucleotides(s) for s in sequences] if rc_average else []
  )
  totals = scorer.log_likelihood(inputs, progress=progress).total
  forward, reverse = totals[: len(sequences)], totals[len(sequences) :]
  scores = []
  for v, (ref_i, alt_i, span) in zip(valid, plans):
    llr_f = float(forward[alt_i] - forward[ref_i])
    llr_r = float(reverse[alt_i] - reverse[ref_i]) if rc_average else float("nan")
    ref_ll = float(forward[ref_i] + reverse[ref_i]) / 2 if rc_average else float(forward[ref_i])
    alt_ll = float(forward[alt_i] + reverse[alt_i]) / 2 if rc_average else float(forward[alt_i])
    scores.append(
      VariantScore(
        v,
        (llr_f + llr_r) / 2 if rc_average else llr_f,
        llr_f,
        llr_r,
        ref_ll,
        alt_ll,
        span[0],
        span[1],
      )
    )
  return scores, problems


def report_problems(problems: Sequence[Problem]) -> None:
  for p in problems:
    logging.warning("%s: %s:%s %s>%s skipped: %s", p.source, p.chrom, p.pos, p.ref, p.alt, p.reason)


# -- output --------------------------------------------------------------------------------------

SCORE_COLUMNS = (
  "chrom",
  "pos",
  "id",
  "ref",
  "alt",
  "type",
  "llr",
  "llr_forward",
  "llr_reverse",
  "ref_loglik",
  "alt_loglik",
  "window_start",
  "window_end",
)
PROBLEM_COLUMNS = ("source", "chrom", "pos", "ref", "alt", "reason")


def write_scores(path: str, scores: Sequence[VariantScore]) -> None:
  """TSV, one row per scored variant (SCORE_COLUMNS; nats)."""
  with open(path, "w", encoding="utf-8", newline="") as f:
    f.write("\t".join(SCORE_COLUMNS) + "\n")
    write_score_rows(f, scores)


def write_score_rows(f: TextIO, scores: Sequence[VariantScore]) -> None:
  """The rows of `write_scores` (no header), appended to an open file."""
  f.write(
    "".join(
      "\t".join(
        [
          s.variant.chrom,
          str(s.variant.pos),
          s.variant.id,
          s.variant.ref,
          s.variant.alt,
          s.variant.kind,
          _num(s.llr),
          _num(s.llr_forward),
          _num(s.llr_reverse),
          _num(s.ref_loglik),
          _num(s.alt_loglik),
          str(s.window_start),
          str(s.window_end),
        ]
      )
      + "\n"
      for s in scores
    )
  )


def write_problems(path: str, problems: Sequence[Problem]) -> None:
  """TSV, one row per skipped record, with its file:line and the reason."""
  with open(path, "w", encoding="utf-8", newline="") as f:
    f.write("\t".join(PROBLEM_COLUMNS) + "\n")
    for p in problems:
      f.write("\t".join(str(x).replace("\t", " ") for x in p) + "\n")


def read_scores(path: str) -> list[dict[str, str]]:
  """Rows of a scores TSV as dicts (for tests and notebooks)."""
  with open(path, encoding="utf-8", newline="") as f:
    return list(csv.DictReader(f, delimiter="\t"))


def _num(x: float) -> str:
  return "nan" if x != x else f"{x:.6g}"


def plot_scores(path: str, scores: Sequence[VariantScore]) -> str | None:
  """Histogram of LLRs by variant type; returns the path (None if empty)."""
  by_kind: dict[str, list[float]] = {}
  for s in scores:
    by_kind.setdefault(s.variant.kind, []).append(s.llr)
  return plot_llrs(path, {k: np.asarray(v) for k, v in by_kind.items()})


def plot_llrs(path: str, by_kind: dict[str, np.ndarray]) -> str | None:
  """Histogram of LLRs, one (n,) array per variant type; returns the path
  (None if there are none)."""
  if not any(len(v) for v in by_kind.values()):
    return None
  plt = plotting.pyplot()
  fig, ax = plt.subplots(figsize=(7, 4))
  values = np.concatenate([np.asarray(v, np.float64) for v in by_kind.values()])
  bins = np.histogram_bin_edges(values[np.isfinite(values)], bins=40)
  for kind, llrs in sorted(by_kind.items()):
    ax.hist(llrs, bins=bins, alpha=0.6, label=f"{kind} (n={len(llrs)})")
  ax.axvline(0.0, color="k", lw=0.8)
  ax.set_xlabel("LLR = log P(alt) - log P(ref)  [nats]")
  ax.set_ylabel("variants")
  ax.set_title("Zero-shot variant effects")
  ax.legend()
  return plotting.save(fig, path, dpi=120)
