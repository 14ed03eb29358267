"""Variant effects of whole call sets, streamed with flat memory.

    summary = score_callset(
      scorer, "clinvar.vcf.gz", "GRCh38.fa.gz", "effects.tsv",
      window=8192, rc_average=True, region="chr17:43044295-43125483",
      annotated="clinvar.scored.vcf.gz")

Reads a VCF (plain, gzip or bgzip) or BCF record by record through htslib
(pysam), checks and scores it chunk by chunk (`variants.score_variants`:
length-fair windows, reference windows shared by the alleles of a site and
by neighbouring variants of a chunk) against a reference read at random
through faidx (`IndexedReference`: plain or bgzip FASTA with .fai; no
chromosome is ever held whole), and appends per chunk to:

  <output>               the scores TSV (`variants.SCORE_COLUMNS`)
  <output>.skipped.tsv   every record not scored, with file:line and reason
  <annotated>            optional: the input records with the LLRs in the INFO
                         fields HYBRIDNA_LLR (forward strand) and HYBRIDNA_LLR_RC
                         (mean over both strands, with rc_average), Number=A,
                         declared in the header; .vcf, .vcf.gz (bgzip + tabix
                         index) or .bcf (+ csi index)

Memory is one chunk of records plus a small cache of reference blocks,
whatever the size of the call set. `region` (chr, chr:start or
chr:start-end, 1-based inclusive, commas allowed in the numbers:
`parse_region`) needs an index (.tbi/.csi for bgzip VCF, .csi for BCF); a
malformed region or a chromosome the index lacks is refused by `CallSet`,
before any output is written.

Resuming: after each chunk the outputs are flushed and <output>.progress.json
records how many input records are done and the byte size of each output. A
rerun with the same inputs, settings and scorer (checkpoint, context, stride,
add_bos, dtype, and so the window after the cap at the context) truncates
the outputs to those sizes, skips the records done and goes on; the results
equal an uninterrupted run (chunks are fixed by record count, so every
window is scored in the same batch); another one is refused. The progress
file is removed when the run completes.

Sources: text VCF records are "file:line"; a --region read of a text VCF has
no line numbers ("file:region#k", the k-th record of the region) and BCF
records are "file:record k" (k-th record, 1-based).
"""

from __future__ import annotations

import array
import collections
import dataclasses
import json
import os
import re
import shutil
import time
from collections.abc import Collection, Iterator

import numpy as np
from absl import logging

from hybridna_jax import paths
from hybridna_jax.data import fasta, textfiles
from hybridna_jax.scoring import variants as variants_lib

INFO_LLR = "HYBRIDNA_LLR"
INFO_LLR_RC = "HYBRIDNA_LLR_RC"
_VCF_FIXED = ("#CHROM", "POS", "ID", "REF", "ALT", "QUAL", "FILTER", "INFO")


def _pysam():
  import pysam  # pylint: disable=g-import-not-at-top

  return pysam


class ReferenceAccessError(ValueError):
  """A reference that cannot be read at random (the message names the fix)."""


# -- the reference, through faidx ----------------------------------------------------------


class _Chromosome:
  """Read-only view of one chromosome's uint8 tokens, fetched through faidx
  in blocks (`len(view)`, `view[a:b]` -> (b - a,) uint8)."""

  def __init__(self, reference: IndexedReference, name: str, length: int):
    self._reference, self.name, self._length = reference, name, length

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, key: slice) -> np.ndarray:
    if not isinstance(key, slice) or key.step not in (None, 1):
      raise TypeError("chromosome views take [start:stop] slices only")
    start, stop, _ = key.indices(self._length)
    return self._reference.tokens(self.name, start, max(start, stop))


class IndexedReference(variants_lib.Reference):
  """A reference FASTA read at random through faidx (pysam.FastaFile).

  Plain or bgzip-compressed; a missing .fai (and .gzi) is built next to the
  file. Sequences are fetched in `block`-base blocks, the last
  `cache_blocks` of them kept, so neighbouring variants share reads.
  `reference[chrom]` is a view with len() and [start:stop] -> uint8 tokens.

  Raises:
    ReferenceAccessError: gzip (not bgzip) or other compression, or no index can
      be built.
  """

  def __init__(self, path: str, *, block: int = 1 << 16, cache_blocks: int = 64):
    path = os.fspath(path)
    if not os.path.exists(path):
      raise ReferenceAccessError(f"{path}: no such reference FASTA; check --reference.")
    kind = fasta.detect_compression(path)
    if kind not in ("plain", "gzip"):
      raise ReferenceAccessError(
        f"{path}: {kind}-compressed; random access needs a plain or bgzip FASTA "
        "(decompress it, then optionally `bgzip` it)."
      )
    gzip_fix = "recompress with `gunzip -c X | bgzip > X.bgz` (or gunzip it)"
    if kind == "gzip" and not fasta.is_bgzip(path):  # refused here, not by htslib on stderr
      raise ReferenceAccessError(f"{path}: gzip, not bgzip, has no random access; {gzip_fix}.")
    try:
      self._fasta = _pysam().FastaFile(path)
    except (OSError, ValueError) as e:
      fix = (
        f"it is gzip, not bgzip: {gzip_fix}"
        if kind == "gzip"
        else "faidx needs a FASTA whose lines within a record have one length (reformat, "
        "e.g. `seqkit seq -w 60`), in a folder writable for its .fai index"
      )
      raise ReferenceAccessError(f"{path}: cannot open for random access ({e}); {fix}.") from None
    names, lengths = self._fasta.references, self._fasta.lengths
    super().__init__(path, {n: _Chromosome(self, n, k) for n, k in zip(names, lengths)}, names)
    self.block, self.cache_blocks = block, cache_blocks
    self._cache: collections.OrderedDict[tuple[str, int], np.ndarray] = collections.OrderedDict()
    self.blocks_read = 0

  def _block(self, name: str, index: int) -> np.ndarray:
    key = (name, index)
    hit = self._cache.get(key)
    if hit is not None:
      self._cache.move_to_end(key)
      return hit
    start = index * self.block
    text = self._fasta.fetch(name, start, start + self.block).encode("ascii", "replace")
    tokens = np.frombuffer(text.translate(fasta._ENCODE_TABLE), np.uint8)  # noqa: SLF001
    bad = np.flatnonzero(tokens == 0xFF)
    if bad.size:
      at = start + int(bad[0]) + 1
      raise fasta.FastaFormatError(
        self.path, None, f"{name}:{at}: byte {text[bad[0] : bad[0] + 1]!r} is not a base"
      )
    self.blocks_read += 1
    self._cache[key] = tokens
    if len(self._cache) > self.cache_blocks:
      self._cache.popitem(last=False)
    return tokens

  def tokens(self, name: str, start: int, stop: int) -> np.ndarray:
    """(stop - start,) uint8 tokens of `name`[start:stop] (0-based)."""
    if stop <= start:
      return np.zeros(0, np.uint8)
    first, last = start // self.block, (stop - 1) // self.block
    parts = [self._block(name, i) for i in range(first, last + 1)]
    joined = parts[0] if len(parts) == 1 else np.concatenate(parts)
    offset = first * self.block
    return joined[start - offset : stop - offset]


def open_reference(path: str) -> variants_lib.Reference:
  """An `IndexedReference` for a plain or bgzip FASTA; when faidx cannot
  index it (another compression, lines of unequal length, a read-only
  folder) a warning and the whole FASTA in memory
  (`variants.load_reference`, which reads any FASTA we read)."""
  try:
    return IndexedReference(path)
  except ReferenceAccessError as e:
    if not os.path.exists(path):
      raise
    logging.warning("%s Reading the whole reference into memory instead.", e)
    return variants_lib.load_reference(path)


# -- reading the call set ----------------------------------------------------------------------

REGION_FORMS = (
  "give chr, chr:start or chr:start-end (1-based, inclusive; commas allowed in the numbers)"
)
_REGION = re.compile(r"(?P<contig>.+):(?P<start>[0-9][0-9,]*)(?:-(?P<end>[0-9][0-9,]*)?)?")


def parse_region(region: str, contigs: Collection[str] = ()) -> tuple[str, int, int | None]:
  """(chromosome, start, end) of a --region: "chr", "chr:start" (to the
  end: end None) or "chr:start-end", 1-based and inclusive, with commas
  allowed in the numbers ("chr1:1,000-2,000"). A region that is one of
  `contigs` whole is that chromosome (a name with ':' in it).

  Raises:
    ValueError: another form, a start under 1 or an end before the start
      (one line naming --region and the accepted forms).
  """
  if region in contigs:
    return region, 1, None
  match = _REGION.fullmatch(region)
  if match is None:
    if ":" in region or not region:
      raise ValueError(f"--region {region!r} is not a region; {REGION_FORMS}.")
    return region, 1, None
  start = int(match["start"].replace(",", ""))
  end = int(match["end"].replace(",", "")) if match["end"] else None
  if start < 1:
    raise ValueError(f"--region {region!r}: the start must be at least 1; {REGION_FORMS}.")
  if end is not None and end < start:
    raise ValueError(f"--region {region!r}: the end is before the start; {REGION_FORMS}.")
  return match["contig"], start, end


def _index_contigs(indexed) -> Collection[str]:
  """The chromosome names of a TabixFile's or an indexed VariantFile's index."""
  if hasattr(indexed, "contigs"):  # TabixFile
    return set(indexed.contigs)
  return set(indexed.index) if indexed.index is not None else set()


@dataclasses.dataclass
class Site:
  """One input record: its source, VCF text (None if malformed or from a
  CSV) and the variants / problems it gave."""

  source: str
  line: str | None
  variants: list[variants_lib.Variant]
  problems: list[variants_lib.Problem]


def _is_bcf(path: str) -> bool:
  with open(path, "rb") as f:
    head = f.read(32)
  if head.startswith(b"BCF"):
    return True
  if head.startswith(b"\x1f\x8b"):
    import gzip  # pylint: disable=g-import-not-at-top

    with gzip.open(path, "rb") as g:
      return g.read(3) == b"BCF"
  return False


class CallSet:
  """Header lines and records of a VCF/BCF (or CSV), streamed.

  Raises:
    VariantFormatError: no header, an unreadable file, or --region without an
      index, malformed or on a chromosome the index lacks (file named, with
      the fix).
  """

  def __init__(self, path: str, *, region: str | None = None, max_indel_length: int = 64):
    self.path, self.region, self.max_indel_length = os.fspath(path), region, max_indel_length
    if not os.path.exists(self.path):
      raise variants_lib.VariantFormatError(self.path, None, "no such file; check --variants.")
    name = fasta.strip_suffixes(os.path.basename(self.path).lower())
    self.kind = (
      "bcf"
      if _is_bcf(self.path)
      else "csv"
      if name.endswith(".csv")
      else "vcf"
      if name.endswith(".vcf")
      else None
    )
    if self.kind is None:
      raise variants_lib.VariantFormatError(
        self.path, None, "unknown variant file type; name it .vcf[.gz], .bcf or .csv."
      )
    if region and self.kind == "csv":
      raise variants_lib.VariantFormatError(
        self.path, None, "--region needs an indexed VCF or BCF, not a CSV."
      )
    self.header: list[str] = []
    self._tabix = self._bcf = None
    if self.kind == "bcf":
      try:
        self._bcf = _pysam().VariantFile(self.path)
      except (OSError, ValueError) as e:
        raise variants_lib.VariantFormatError(self.path, None, f"cannot read as BCF: {e}") from None
      self.header = str(self._bcf.header).rstrip("\n").split("\n")
      if region and self._bcf.index is None:
        raise variants_lib.VariantFormatError(
          self.path, None, "--region needs an index (.csi): run `bcftools index FILE`."
        )
    elif self.kind == "vcf" and region:
      if not any(os.path.exists(self.path + ext) for ext in (".tbi", ".csi")):
        raise variants_lib.VariantFormatError(
          self.path,
          None,
          "--region needs a tabix index (.tbi/.csi) of a bgzip VCF: run `tabix -p vcf FILE` "
          "(bgzip it first if plain).",
        )
      try:
        self._tabix = _pysam().TabixFile(self.path)
      except (OSError, ValueError) as e:
        msg = f"cannot read the index: {e}"
        raise variants_lib.VariantFormatError(self.path, None, msg) from None
      self.header = list(self._tabix.header)
    elif self.kind == "csv":  # the header is checked here, the rows streamed by sites()
      self._csv_rows = variants_lib.variant_csv_rows(self.path, max_indel_length=max_indel_length)
    elif self.kind == "vcf":
      self._lines = textfiles.text_lines(self.path)
      for number, line in self._lines:
        if not line.strip():
          continue
        if not line.startswith("#"):
          raise variants_lib.VariantFormatError(
            self.path,
            number,
            "a record before the '#CHROM POS ID REF ALT' header line; is this a VCF? "
            "(CSV files need a .csv name)",
          )
        self.header.append(line)
        if not line.startswith("##"):
          break
    if self.kind != "csv":
      if not self.header or tuple(f.upper() for f in self.header[-1].split("\t")[:5]) != (
        variants_lib.VCF_COLUMNS
      ):
        raise variants_lib.VariantFormatError(
          self.path,
          None,
          "no '#CHROM POS ID REF ALT' header line (tab-separated) before the records; "
          "is this a VCF?",
        )
    self._region: tuple[str, int, int | None] | None = None
    if region:
      indexed = self._bcf if self._bcf is not None else self._tabix
      try:
        self._region = parse_region(region, contigs=_index_contigs(indexed))
      except ValueError as e:
        raise variants_lib.VariantFormatError(self.path, None, str(e)) from None
      self._fetch_region(indexed)  # an unknown chromosome fails here, before any output

  def sites(self) -> Iterator[Site]:
    """Every record, in file order (restricted to `region` when given)."""
    if self.kind == "csv":
      for source, found, problems in self._csv_rows:
        yield Site(source, None, found, problems)
      return
    if self._bcf is not None:
      records = self._fetch_region(self._bcf) if self._region else self._bcf
      numbered = (
        (f"{self.path}:record {k}", str(r).rstrip("\n")) for k, r in enumerate(records, 1)
      )
    elif self._tabix is not None:
      lines = self._fetch_region(self._tabix)
      numbered = ((f"{self.path}:{self.region}#{k}", line) for k, line in enumerate(lines, 1))
    else:
      numbered = ((f"{self.path}:{n}", line) for n, line in self._lines if line.strip())
    for source, line in numbered:
      yield self._site(source, line)

  def _fetch_region(self, indexed) -> Iterator:
    """An iterator over the records of `self.region` (parsed by
    `parse_region`; htslib's own parser differs between TabixFile and
    VariantFile).

    Raises:
      VariantFormatError: a chromosome the index lacks, or coordinates it refuses.
    """
    contig, start, end = self._region
    try:
      return indexed.fetch(contig, start - 1, end)
    except ValueError as e:
      raise variants_lib.VariantFormatError(
        self.path,
        None,
        f"--region {self.region!r}: {e}; {REGION_FORMS} with a chromosome of the file",
      ) from None

  def _site(self, source: str, line: str) -> Site:
    fields = line.split("\t")
    problems: list[variants_lib.Problem] = []
    if len(fields) < 5:
      problems.append(
        variants_lib.Problem(
          source,
          fields[0],
          "",
          "",
          "",
          f"{len(fields)} tab-separated fields, a VCF record needs at least 5 "
          "(CHROM POS ID REF ALT)",
        )
      )
      return Site(source, None, [], problems)
    chrom, pos, variant_id, ref, alt = fields[:5]
    found = variants_lib._make_variants(  # noqa: SLF001
      self.path, 0, chrom, pos, ref, alt.split(","), variant_id, self.max_indel_length, problems
    )
    fix = lambda p: p._replace(source=source)  # the reader's own source, e.g. "record k"
    found = [dataclasses.replace(v, source=source) for v in found]
    valid_pos = variants_lib.parse_pos(pos) is not None  # else a reported problem
    return Site(source, line if valid_pos else None, found, [fix(p) for p in problems])


# -- the annotated VCF -------------------------------------------------------------------------


def annotated_header(
  header: list[str], *, window: int, rc_average: bool, contigs: dict[str, int] | None = None
) -> list[str]:
  """The input header with the INFO declarations (replacing any of the same
  IDs), `contigs` missing from it declared, and the 8 fixed columns.
  `window` is the one the scores use, after the cap at the context
  (`variants.scoring_window`)."""
  ours = (f"##INFO=<ID={INFO_LLR},", f"##INFO=<ID={INFO_LLR_RC},")
  meta = [h for h in header[:-1] if not h.startswith(ours)]
  contig_lines = [h for h in meta if h.startswith("##contig=<ID=")]
  declared = {h[len("##contig=<ID=") :].split(",")[0].rstrip(">") for h in contig_lines}
  for name, length in (contigs or {}).items():
    if name not in declared:
      meta.append(f"##contig=<ID={name},length={length}>")
  meta += [
    f'##INFO=<ID={INFO_LLR},Number=A,Type=Float,Description="HybriDNA log P(alt window) - '
    f'log P(ref window), forward strand, nats ({window}-nt length-fair windows)">',
    f'##INFO=<ID={INFO_LLR_RC},Number=A,Type=Float,Description="HybriDNA log-likelihood ratio '
    f'averaged over both strands, nats ({window}-nt windows)">',
  ]
  columns = header[-1].split("\t")
  if len(columns) < 8:
    columns = list(_VCF_FIXED)
  return meta + ["\t".join(columns)]


def annotate_line(line: str, llr: list[str], llr_rc: list[str] | None) -> str:
  """A VCF record with INFO HYBRIDNA_LLR (and _RC) set, one value per ALT
  ('.' where not scored); missing fixed columns filled with '.'."""
  fields = line.split("\t")
  fields += ["."] * (8 - len(fields))
  info = [
    kv for kv in fields[7].split(";") if kv not in ("", ".") and kv.split("=")[0] not in _OURS
  ]
  if any(x != "." for x in llr):
    info.append(f"{INFO_LLR}={','.join(llr)}")
    if llr_rc is not None:
      info.append(f"{INFO_LLR_RC}={','.join(llr_rc)}")
  fields[7] = ";".join(info) or "."
  return "\t".join(fields)


_OURS = (INFO_LLR, INFO_LLR_RC)


def finish_annotated(partial: str, path: str) -> list[str]:
  """Writes the plain-text `partial` VCF to `path` as .vcf, .vcf.gz (bgzip +
  .csi) or .bcf (+ .csi), keeping `partial` (removed by the caller once the
  run is recorded complete); returns the files written."""
  pysam = _pysam()
  lower = path.lower()
  if lower.endswith(".bcf"):
    try:
      with pysam.VariantFile(partial) as src:
        for line in _undeclared_header_lines(partial, src.header):
          src.header.add_line(line)  # before the records are parsed
        with pysam.VariantFile(path, "wb", header=src.header) as out:
          for record in src:
            out.write(record)
    except (OSError, ValueError) as e:  # htslib's errors say little (often a bogus errno)
      raise OSError(
        f"{path}: cannot write the annotated BCF ({' '.join(str(e).split())}); the scores are "
        f"complete and the annotated records kept in {partial}: fix the cause and rerun the same "
        "command (only this step is redone), or write --annotated as .vcf.gz."
      ) from None
    return [path] + _index(path, "bcf")
  if lower.endswith((".gz", ".bgz")):
    pysam.tabix_compress(partial, path, force=True)
    return [path] + _index(path, "vcf")
  shutil.copyfile(partial, path)
  return [path]


def _undeclared_header_lines(partial: str, header) -> list[str]:
  """##contig, ##FILTER, ##INFO and ##FORMAT lines for the IDs that the
  records of the text VCF `partial` use and `header` (a pysam.VariantHeader)
  lacks -- a hand-made input VCF, or a record on a contig the reference
  lacks (skipped, but kept in the annotated file). BCF stores every ID as
  an index into the header, so htslib refuses to write records with
  undeclared ones. Values stay text: Number=., Type=String (Flag for an
  INFO key that never has a value)."""
  declared = {
    "contig": set(header.contigs),
    "FILTER": set(header.filters),
    "INFO": set(header.info),
    "FORMAT": set(header.formats),
  }
  used: dict[str, dict[str, bool]] = {kind: {} for kind in declared}  # ID -> has a value
  with open(partial, encoding="utf-8") as f:
    for line in f:
      if line.startswith("#"):
        continue
      fields = line.rstrip("\n").split("\t")
      fields += ["."] * (9 - len(fields))
      items = {
        "contig": [fields[0]],
        "FILTER": fields[6].split(";"),
        "INFO": fields[7].split(";"),
        "FORMAT": fields[8].split(":"),
      }
      for kind, values in items.items():
        for item in values:
          key, _, value = item.partition("=")
          used[kind][key] = used[kind].get(key, False) or bool(value)
  note = 'Description="Not declared in the input VCF"'
  lines = []
  for kind, ids in used.items():
    for name, valued in ids.items():
      if name in ("", ".") or name in declared[kind]:
        continue
      if kind == "contig":
        lines.append(f"##contig=<ID={name}>")
      elif kind == "FILTER":
        lines.append(f"##FILTER=<ID={name},{note}>")
      elif kind == "INFO" and not valued:
        lines.append(f"##INFO=<ID={name},Number=0,Type=Flag,{note}>")
      else:
        lines.append(f"##{kind}=<ID={name},Number=.,Type=String,{note}>")
  return lines


def _index(path: str, preset: str) -> list[str]:
  """Writes path.csi; returns [its path] ([] for unsorted input)."""
  try:
    # tabix_index returns the data file's name, not the index's.
    _pysam().tabix_index(path, preset=preset, force=True, keep_original=True, csi=True)
    return [path + ".csi"]
  except (OSError, ValueError) as e:  # unsorted input
    logging.warning("%s: not indexed (%s); sort the input to get an index.", path, e)
    return []


def _annotated_kind(path: str) -> str:
  lower = path.lower()
  if lower.endswith(".bcf"):
    return "bcf"
  if lower.endswith((".vcf", ".vcf.gz", ".vcf.bgz")):
    return "vcf"
  raise ValueError(f"--annotated {path}: name it .vcf, .vcf.gz or .bcf.")


# -- the run ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Summary:
  records: int = 0  # input records read (this run and the resumed part)
  scored: int = 0  # variants scored, this run only
  skipped: int = 0  # problems reported, this run only
  resumed_from: int = 0  # records done before this run
  seconds: float = 0.0
  paths: list[str] = dataclasses.field(default_factory=list)


def _fingerprint(variants_path, reference_path, scorer, window, **settings) -> dict:
  """What a resumed run must share with the interrupted one: the inputs,
  the settings, the scorer's (checkpoint, context, stride, add_bos, dtype:
  `Scorer.fingerprint`; only the context of a stand-in without it) and the
  window used, after the cap at the context."""
  stat = os.stat(variants_path)
  # The reference by size and time too: one fixed in place (another build
  # under the same name) must not score the rest of an interrupted run.
  ref_stat = os.stat(reference_path)
  described = (
    scorer.fingerprint() if hasattr(scorer, "fingerprint") else {"context": scorer.context}
  )
  return {
    "variants": os.path.abspath(variants_path),
    "variants_size": stat.st_size,
    "variants_mtime_ns": stat.st_mtime_ns,
    "reference": os.path.abspath(reference_path),
    "reference_size": ref_stat.st_size,
    "reference_mtime_ns": ref_stat.st_mtime_ns,
    "window": window,
    **settings,
    **described,
    "window_used": variants_lib.scoring_window(window, scorer),
  }


def output_files(output: str, annotated: str | None = None) -> list[str]:
  """The files that `score_callset` writes at `output`: the scores TSV, the
  skipped records' TSV and, if asked, the annotated VCF/BCF (an index is
  written beside it)."""
  return [output, output + ".skipped.tsv"] + ([annotated] if annotated else [])


def progress_file(output: str) -> str:
  """Where an interrupted `score_callset` run at `output` records its state."""
  return output + ".progress.json"


def score_callset(
  scorer,
  variants_path: str,
  reference_path: str,
  output: str,
  *,
  window: int,
  rc_average: bool = False,
  region: str | None = None,
  annotated: str | None = None,
  max_indel_length: int = 64,
  chunk_records: int = 2048,
  reference: variants_lib.Reference | None = None,
) -> Summary:
  """Scores every record of a call set, appending to the outputs chunk by
  chunk and resuming an interrupted run (module docstring).

  Args:
    scorer: a `Scorer` (or anything with `context` and `log_likelihood`);
      its `fingerprint()`, when it has one, must match to resume.
    output: the scores TSV; <output>.skipped.tsv and <output>.progress.json
      go next to it.
    window: window length in nt (capped at the scorer's context).
    region: tabix-style region, or None for the whole file.
    annotated: the annotated VCF/BCF to write (VCF/BCF input only), or None.
    chunk_records: input records scored per chunk (memory and resume unit).
    reference: an already open reference (default: `open_reference`).

  Returns:
    A `Summary`; the outputs are complete and the progress file is gone.
  """
  start_time = time.perf_counter()
  callset = CallSet(variants_path, region=region, max_indel_length=max_indel_length)
  if annotated and callset.kind == "csv":
    raise ValueError(f"--annotated needs a VCF or BCF input, {variants_path} is a CSV.")
  if annotated:
    _annotated_kind(annotated)
  reference = reference if reference is not None else open_reference(reference_path)
  skipped_path, progress_path = output_files(output)[1], progress_file(output)
  partial = annotated + ".partial.vcf" if annotated else None
  fingerprint = _fingerprint(
    variants_path,
    reference_path,
    scorer,
    window,
    region=region,
    rc_average=rc_average,
    max_indel_length=max_indel_length,
    chunk_records=chunk_records,
    annotated=os.path.abspath(annotated) if annotated else None,
  )
  files = {"tsv": output, "skipped": skipped_path} | ({"annotated": partial} if partial else {})
  summary = Summary()
  state = _load_progress(progress_path, fingerprint, files)
  if state is None:
    _write_new(output, "\t".join(variants_lib.SCORE_COLUMNS) + "\n")
    _write_new(skipped_path, "\t".join(variants_lib.PROBLEM_COLUMNS) + "\n")
    if partial:
      contigs = (
        dict(zip(reference.all_names, (len(reference[n]) for n in reference.all_names)))
        if _annotated_kind(annotated) == "bcf"
        else None
      )
      header = annotated_header(
        callset.header,
        window=variants_lib.scoring_window(window, scorer),
        rc_average=rc_average,
        contigs=contigs,
      )
      _write_new(partial, "\n".join(header) + "\n")
    state = {"records": 0, "sizes": {k: os.path.getsize(p) for k, p in files.items()}}
    _save_progress(progress_path, fingerprint, state)
  else:
    summary.resumed_from = state["records"]
    logging.info("%s: resuming after %d records", progress_path, state["records"])
  handles = {k: open(p, "a", encoding="utf-8", newline="") for k, p in files.items()}
  try:
    chunk: list[Site] = []
    order = _OrderCheck(callset.path)
    for index, site in enumerate(callset.sites()):
      if index < state["records"]:
        continue
      order.see(site)
      chunk.append(site)
      if len(chunk) == chunk_records:
        _score_chunk(scorer, chunk, reference, handles, window, rc_average, summary)
        state = _commit(handles, files, progress_path, fingerprint, state["records"] + len(chunk))
        chunk = []
        logging.info(
          "%d records done, %d variants scored, %.1f variants/s",
          state["records"],
          summary.scored,
          summary.scored / max(time.perf_counter() - start_time, 1e-9),
        )
    if chunk:
      _score_chunk(scorer, chunk, reference, handles, window, rc_average, summary)
      state = _commit(handles, files, progress_path, fingerprint, state["records"] + len(chunk))
  finally:
    for h in handles.values():
      h.close()
  summary.records = state["records"]
  summary.paths = [output, skipped_path]
  if annotated:
    summary.paths += finish_annotated(partial, annotated)
  os.remove(progress_path)  # complete; a crash before this redoes only the finishing
  if partial:
    os.remove(partial)
  summary.seconds = time.perf_counter() - start_time
  logging.info(
    "%d records: %d variants scored, %d records skipped in %.1f s -> %s",
    summary.records,
    summary.scored,
    summary.skipped,
    summary.seconds,
    ", ".join(summary.paths),
  )
  return summary


class _OrderCheck:
  """Warns once when records are not in position order per chromosome."""

  def __init__(self, path):
    self.path, self.last, self.done, self.warned = path, None, set(), False

  def see(self, site: Site) -> None:
    if self.warned or not site.variants:
      return
    v = site.variants[0]
    if self.last and v.chrom != self.last[0]:
      self.done.add(self.last[0])
    if v.chrom in self.done or (self.last and v.chrom == self.last[0] and v.pos < self.last[1]):
      logging.warning(
        "%s: records are not sorted by chromosome and position (at %s); scores are right but "
        "reference reads are not shared and no index can be built: sort it (bcftools sort).",
        self.path,
        v.source,
      )
      self.warned = True
    self.last = (v.chrom, v.pos)


def _score_chunk(scorer, chunk, reference, handles, window, rc_average, summary) -> None:
  found = [v for site in chunk for v in site.variants]
  scores, problems = (
    variants_lib.score_variants(scorer, found, reference, window=window, rc_average=rc_average)
    if found
    else ([], [])
  )
  by_variant = {id(s.variant): s for s in scores}
  variants_lib.write_score_rows(handles["tsv"], scores)
  check_problems = collections.defaultdict(list)
  for p in problems:
    check_problems[p.source].append(p)
  skipped = []
  for site in chunk:
    variants_lib.report_problems(site.problems)
    skipped += site.problems + check_problems.pop(site.source, [])
  handles["skipped"].write(
    "".join("\t".join(str(x).replace("\t", " ") for x in p) + "\n" for p in skipped)
  )
  summary.scored += len(scores)
  summary.skipped += len(skipped)
  if "annotated" in handles:
    lines = []
    for site in chunk:
      if site.line is None:
        continue
      alts = [a.strip().upper() for a in site.line.split("\t")[4].split(",")]
      mine = {v.alt: by_variant.get(id(v)) for v in site.variants}
      got = [mine.get(a) for a in alts]
      llr = [variants_lib._num(s.llr_forward) if s else "." for s in got]  # noqa: SLF001
      rc = [variants_lib._num(s.llr) if s else "." for s in got] if rc_average else None  # noqa: SLF001
      lines.append(annotate_line(site.line, llr, rc) + "\n")
    handles["annotated"].write("".join(lines))


def _write_new(path: str, text: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8", newline="") as f:
    f.write(text)


def _commit(handles, files, progress_path, fingerprint, records) -> dict:
  for h in handles.values():
    h.flush()
    os.fsync(h.fileno())
  state = {"records": records, "sizes": {k: os.path.getsize(p) for k, p in files.items()}}
  _save_progress(progress_path, fingerprint, state)
  return state


def _save_progress(path: str, fingerprint: dict, state: dict) -> None:
  paths.write_json(path, {"fingerprint": fingerprint, **state})


def _load_progress(path: str, fingerprint: dict, files: dict[str, str]) -> dict | None:
  """The state of an interrupted run (outputs truncated to it), or None."""
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    saved = json.load(f)
  before = saved["fingerprint"]
  unrecorded = sorted(set(fingerprint) - set(before))
  if unrecorded:
    raise ValueError(
      f"{path}: an interrupted run of an earlier version, which did not record "
      f"{', '.join(unrecorded)} (and typed or filtered some variants otherwise); delete this "
      "file to start over."
    )
  differ = [
    f"{k}: {before.get(k)!r}, now {v!r}" for k, v in fingerprint.items() if before.get(k) != v
  ]
  if differ:
    raise ValueError(
      f"{path}: an interrupted run with other inputs or settings ({'; '.join(differ)}); rerun "
      "with the same ones (and the same checkpoint) to resume, or delete this file to start over."
    )
  for key, size in saved["sizes"].items():
    if not os.path.exists(files[key]) or os.path.getsize(files[key]) < size:
      raise ValueError(
        f"{path}: {files[key]} is missing or shorter than recorded ({size} bytes); "
        "delete the progress file to start over."
      )
    with open(files[key], "r+b") as f:
      f.truncate(size)
  return {"records": saved["records"], "sizes": saved["sizes"]}


def read_llrs(path: str) -> dict[str, np.ndarray]:
  """LLRs of a scores TSV by variant type, as float32 arrays (streamed; for
  plots of large call sets)."""
  out: dict[str, array.array] = {}
  with open(path, encoding="utf-8") as f:
    columns = f.readline().rstrip("\n").split("\t")
    kind, llr = columns.index("type"), columns.index("llr")
    for line in f:
      fields = line.split("\t")
      out.setdefault(fields[kind], array.array("f")).append(float(fields[llr]))
  return {k: np.frombuffer(v, np.float32) for k, v in out.items()}
