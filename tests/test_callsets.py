"""Whole call sets: bgzip+tabix VCF and BCF inputs through pysam, a bgzip
reference through faidx, --region, the annotated VCF/BCF (INFO equal to the
TSV) and resuming an interrupted run to the same outputs."""

import gzip
import json
import math
import os
import pathlib
import shutil

import numpy as np
import pysam
import pytest
from conftest import LAMBDA_FASTA
from test_variants import FakeScorer

from hybridna_jax import tokenizer
from hybridna_jax.data import fasta
from hybridna_jax.scoring import callsets, variants

OTHER = {"A": "C", "C": "G", "G": "T", "T": "A"}


@pytest.fixture(scope="module")
def genome():
  ((_, tokens),) = fasta.read_fasta(LAMBDA_FASTA)
  return tokenizer.decode(tokens)


@pytest.fixture(scope="module")
def files(genome, tmp_path_factory):
  """A bgzip reference (chrA, chrB) with .fai, and the same sorted call set
  as plain VCF, bgzip VCF + .tbi and BCF + .csi."""
  root = tmp_path_factory.mktemp("callset")
  a, b = genome[:3000], genome[3000:5000]
  plain_ref = root / "ref.fa"
  fasta.write_fasta(plain_ref, [("chrA", a), ("chrB", b)])
  ref = str(root / "ref.fa.gz")
  pysam.tabix_compress(str(plain_ref), ref)
  pysam.faidx(ref)  # .fai and .gzi
  rng = np.random.default_rng(0)
  rows = []
  for chrom, seq in (("chrA", a), ("chrB", b)):
    for pos in sorted(rng.choice(np.arange(1, len(seq) - 10), 14, replace=False)):
      pos = int(pos)
      base = seq[pos - 1]
      kind = rng.integers(5)
      if kind == 0:
        alt = f"{OTHER[base]},{OTHER[OTHER[base]]}"  # two alleles
      elif kind == 1:
        alt = base + "".join(rng.choice(list("ACGT"), 3))  # insertion
      elif kind == 2:
        rows.append((chrom, pos, f"d{pos}", seq[pos - 1 : pos + 2], base))  # deletion
        continue
      else:
        alt = OTHER[base]
      rows.append((chrom, pos, f"v{pos}", base, alt))
  rows.insert(3, ("chrA", rows[3][1], "bad_ref", OTHER[a[rows[3][1] - 1]], "A"))  # REF mismatch
  rows.insert(6, ("chrA", rows[6][1], "sym", a[rows[6][1] - 1], "*"))  # symbolic: "*"
  header = [
    "##fileformat=VCFv4.2",
    "##contig=<ID=chrA,length=3000>",
    "##contig=<ID=chrB,length=2000>",
    '##INFO=<ID=DP,Number=1,Type=Integer,Description="depth">',
    "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO",
  ]
  text = "\n".join(header + ["\t".join(map(str, r)) + "\t50\tPASS\tDP=7" for r in rows]) + "\n"
  vcf = root / "calls.vcf"
  vcf.write_text(text)
  vcf_gz = str(root / "calls.vcf.gz")
  pysam.tabix_compress(str(vcf), vcf_gz)
  pysam.tabix_index(vcf_gz, preset="vcf")
  bcf = str(root / "calls.bcf")
  with pysam.VariantFile(str(vcf)) as src, pysam.VariantFile(bcf, "wb", header=src.header) as out:
    for record in src:
      out.write(record)
  pysam.tabix_index(bcf, preset="bcf", keep_original=True)
  return {"ref": ref, "plain_ref": str(plain_ref), "vcf": str(vcf), "vcf_gz": vcf_gz, "bcf": bcf}


def _rows(path):
  return [
    (r["chrom"], int(r["pos"]), r["alt"], r["llr"], r["window_start"])
    for r in variants.read_scores(path)
  ]


def test_indexed_reference_reads_like_the_in_memory_one(files, genome, capfd):
  ref = callsets.IndexedReference(files["ref"], block=97, cache_blocks=4)
  assert ref.all_names == ("chrA", "chrB") and len(ref["chrB"]) == 2000
  want = tokenizer.encode(genome[3000:5000])
  for start, stop in [(0, 1), (90, 300), (96, 98), (1990, 2000), (5, 5)]:
    np.testing.assert_array_equal(ref["chrB"][start:stop], want[start:stop])
  assert "'A' is not in the reference" in ref.unknown_reason("A")
  gz = files["ref"].replace("ref.fa.gz", "plain_gzip.fa.gz")
  with gzip.open(gz, "wt") as f:
    f.write(">chrA\nACGT\n")
  with pytest.raises(callsets.ReferenceAccessError, match="gzip, not bgzip, .*; recompress"):
    callsets.IndexedReference(gz)
  in_memory = callsets.open_reference(gz)  # falls back, with a warning
  assert not isinstance(in_memory, callsets.IndexedReference)
  assert "[E::" not in capfd.readouterr().err  # refused before htslib tries (and complains)
  np.testing.assert_array_equal(in_memory["chrA"][0:4], tokenizer.encode("ACGT"))
  # A plain FASTA with lines of unequal length (valid, but not for faidx).
  ragged = files["ref"].replace("ref.fa.gz", "ragged.fa")
  with open(ragged, "w") as f:
    f.write(">chrA\nACGTA\nCG\nTTTTTTT\n")
  with pytest.raises(callsets.ReferenceAccessError, match="lines within a record have one length"):
    callsets.IndexedReference(ragged)
  np.testing.assert_array_equal(
    callsets.open_reference(ragged)["chrA"][0:14], tokenizer.encode("ACGTACGTTTTTTT")
  )


def test_streamed_scores_equal_the_in_memory_path_for_vcf_and_bcf(files, tmp_path):
  found, read_problems = variants.read_variants(files["vcf"])
  reference = variants.load_reference(files["plain_ref"])
  expected, check_problems = variants.score_variants(FakeScorer(), found, reference, window=31)
  variants.write_scores(str(tmp_path / "expected.tsv"), expected)
  want = _rows(str(tmp_path / "expected.tsv"))
  assert len(want) > 25 and len(read_problems) == 1 and len(check_problems) == 1
  for name in ("vcf", "vcf_gz", "bcf"):
    out = str(tmp_path / f"{name}.tsv")
    summary = callsets.score_callset(
      FakeScorer(), files[name], files["ref"], out, window=31, chunk_records=4
    )
    assert _rows(out) == want, name
    assert summary.scored == len(want) and summary.skipped == 2
    skipped = variants.read_scores(out + ".skipped.tsv")
    sources = [r["source"] for r in skipped]
    if name == "bcf":
      assert sources == [f"{files['bcf']}:record 4", f"{files['bcf']}:record 7"]
    else:  # line numbers: 5 header lines
      assert sources == [f"{files[name]}:9", f"{files[name]}:12"]
    assert "does not match the reference" in skipped[0]["reason"]
    assert "symbolic" in skipped[1]["reason"]


@pytest.mark.parametrize("name", ["vcf_gz", "bcf"])
def test_region_restricts_to_the_indexed_records(files, tmp_path, name):
  out = str(tmp_path / "region.tsv")
  callsets.score_callset(
    FakeScorer(), files[name], files["ref"], out, window=31, region="chrA:500-2000"
  )
  full = str(tmp_path / "full.tsv")
  callsets.score_callset(FakeScorer(), files[name], files["ref"], full, window=31)
  want = [r for r in _rows(full) if r[0] == "chrA" and 500 <= r[1] <= 2000]
  assert 0 < len(want) < len(_rows(full)) and _rows(out) == want
  with pytest.raises(variants.VariantFormatError, match="needs a tabix index"):
    callsets.CallSet(files["vcf"], region="chrA:1-10")
  with pytest.raises(variants.VariantFormatError, match="'chrZ:1-10'.*with a chromosome of"):
    list(callsets.CallSet(files[name], region="chrZ:1-10").sites())


def _overlapping(vcf, chrom, start, end):
  """(chrom, pos, id) of the records of a text VCF that overlap chrom:start-end."""
  out = []
  for line in pathlib.Path(vcf).read_text().splitlines():
    if not line.startswith("#"):
      c, pos, variant_id, ref = line.split("\t")[:4]
      if c == chrom and int(pos) <= end and int(pos) + len(ref) - 1 >= start:
        out.append((c, pos, variant_id))
  return out


@pytest.mark.parametrize("name", ["vcf_gz", "bcf"])
def test_every_region_form_reads_alike_and_a_bad_one_fails_before_any_output(files, tmp_path, name):
  for region, (chrom, start, end) in [
    ("chrA:500", ("chrA", 500, 3000)),  # BCF: an IndexError in pysam's own parser
    ("chrA:1,000-2,000", ("chrA", 1000, 2000)),
    ("chrA:1,000-", ("chrA", 1000, 3000)),
    ("chrB", ("chrB", 1, 2000)),
  ]:
    sites = callsets.CallSet(files[name], region=region).sites()
    got = [tuple(s.line.split("\t")[:3]) for s in sites]
    assert 0 < len(got) == len(want := _overlapping(files["vcf"], chrom, start, end)), region
    assert got == want, region
  assert callsets.parse_region("chr1:1,000-2,000") == ("chr1", 1000, 2000)
  assert callsets.parse_region("HLA-A*01:01", contigs={"HLA-A*01:01"}) == ("HLA-A*01:01", 1, None)
  out = tmp_path / "s.tsv"
  for region, why in [
    ("chrA:abc", "is not a region; give chr, chr:start or chr:start-end"),
    ("chrA:0-10", "the start must be at least 1"),
    ("chrA:20-10", "the end is before the start"),
    ("chrZ:1-10", "'chrZ:1-10'.*with a chromosome of the file"),
  ]:
    with pytest.raises(variants.VariantFormatError, match=why) as e:
      callsets.score_callset(
        FakeScorer(), files[name], files["ref"], str(out), window=31, region=region
      )
    assert "\n" not in str(e.value) and "--region" in str(e.value)
    assert not list(tmp_path.iterdir()), region  # nothing written: a corrected rerun starts anew


@pytest.mark.parametrize("suffix", [".vcf.gz", ".bcf"])
def test_annotated_output_carries_the_tsv_scores(files, tmp_path, suffix):
  out, annotated = str(tmp_path / "s.tsv"), str(tmp_path / f"scored{suffix}")
  summary = callsets.score_callset(
    FakeScorer(),
    files["vcf_gz"],
    files["ref"],
    out,
    window=31,
    rc_average=True,
    annotated=annotated,
    chunk_records=5,
  )
  assert annotated in summary.paths and len(summary.paths) == 4  # + its index
  assert summary.paths[-1] == annotated + ".csi" and os.path.exists(annotated + ".csi")
  tsv = {(r["chrom"], int(r["pos"]), r["alt"]): r for r in variants.read_scores(out)}
  seen = 0
  with pysam.VariantFile(annotated) as vf:
    assert vf.header.info[callsets.INFO_LLR].number == "A"
    assert vf.header.info[callsets.INFO_LLR_RC].type == "Float"
    records = list(vf)
    assert len(records) == 30  # every input record, bad ones without scores
    for rec in records:
      assert rec.info["DP"] == 7
      for i, alt in enumerate(rec.alts):
        row = tsv.get((rec.chrom, rec.pos, alt))
        if row is None:
          assert callsets.INFO_LLR not in rec.info or rec.info[callsets.INFO_LLR][i] is None
          continue
        seen += 1
        assert math.isclose(rec.info[callsets.INFO_LLR][i], float(row["llr_forward"]), rel_tol=1e-6)
        assert math.isclose(rec.info[callsets.INFO_LLR_RC][i], float(row["llr"]), rel_tol=1e-6)
    assert seen == len(tsv)
    assert len(list(vf.fetch("chrB"))) == 14  # indexed


def test_annotated_header_states_the_window_after_the_cap(files, tmp_path):
  out, annotated = str(tmp_path / "s.tsv"), str(tmp_path / "a.vcf")
  scorer = RestoredScorer("run/checkpoints/1", context=40)  # caps the 8192-nt default
  callsets.score_callset(
    scorer, files["vcf"], files["ref"], out, window=8192, rc_average=True, annotated=annotated
  )
  widths = {int(r["window_end"]) - int(r["window_start"]) for r in variants.read_scores(out)}
  assert widths == {40}
  info = [
    h
    for h in pathlib.Path(annotated).read_text().splitlines()
    if h.startswith("##INFO=<ID=HYBRIDNA")
  ]
  assert len(info) == 2 and all("(40-nt" in h and "8192" not in h for h in info), info


def test_a_pos_other_than_ascii_digits_is_a_bad_record_everywhere(genome, files, tmp_path):
  a = genome[:3000]
  snv = lambda pos_text, pos: (
    f"chrA\t{pos_text}\tv{pos}\t{a[pos - 1]}\t{OTHER[a[pos - 1]]}\t.\t.\t."
  )
  calls = tmp_path / "calls.vcf"
  calls.write_text(
    "##fileformat=VCFv4.2\n#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n"
    + "\n".join(
      [snv("100", 100), snv("+200", 200), snv(" 300", 300), snv("4_00", 400), snv("\u0665", 5)]
      + [snv("600", 600)]
    )
    + "\n"
  )
  out, annotated = str(tmp_path / "s.tsv"), str(tmp_path / "a.vcf")
  summary = callsets.score_callset(
    FakeScorer(), str(calls), files["ref"], out, window=31, annotated=annotated
  )
  scored = [r["pos"] for r in variants.read_scores(out)]
  written = [
    line.split("\t")[1]
    for line in pathlib.Path(annotated).read_text().splitlines()
    if not line.startswith("#")
  ]
  assert scored == written == ["100", "600"]
  skipped = variants.read_scores(out + ".skipped.tsv")
  assert [r["source"] for r in skipped] == [f"{calls}:{n}" for n in (4, 5, 6, 7)]
  assert all("is not a positive integer" in r["reason"] for r in skipped)
  assert summary.scored == 2 and summary.skipped == 4
  found, problems = variants.read_variants(str(calls))  # the in-memory reader alike
  assert [v.pos for v in found] == [100, 600] and len(problems) == 4


def test_csv_sites_come_one_per_row_in_file_order(genome, files, tmp_path):
  a = genome[:3000]
  rows = [
    "chrom,pos,ref,alt,id",
    f"chrA,100,{OTHER[a[99]]},A,mismatch",  # 2: found when checked against the reference
    f"chrA,200,{a[199]},{OTHER[a[199]]},ok",  # 3
    "chrA,abc,A,C,bad_pos",  # 4: found when read
    "chrA,5",  # 5: too few fields
    "chrZ,300,A,C,unknown_chrom",  # 6
    f"chrA,400,{a[399]},{OTHER[a[399]]},ok2",  # 7
  ]
  calls = tmp_path / "calls.csv"
  calls.write_text("\n".join(rows) + "\n")
  sites = list(callsets.CallSet(str(calls)).sites())
  assert [s.source for s in sites] == [f"{calls}:{n}" for n in range(2, 8)]
  assert [len(s.variants) for s in sites] == [1, 1, 0, 0, 1, 1]
  out = str(tmp_path / "s.tsv")
  summary = callsets.score_callset(FakeScorer(), str(calls), files["ref"], out, window=31)
  skipped = variants.read_scores(out + ".skipped.tsv")
  assert [r["source"] for r in skipped] == [f"{calls}:{n}" for n in (2, 4, 5, 6)]
  assert "does not match" in skipped[0]["reason"] and "2 fields" in skipped[2]["reason"]
  assert summary.records == 6 and summary.scored == 2
  (tmp_path / "bad.csv").write_text("chrom,position,ref,alt\nchrA,1,A,C\n")
  with pytest.raises(variants.VariantFormatError, match="bad.csv line 1: .*lacks the columns pos"):
    callsets.CallSet(str(tmp_path / "bad.csv"))  # the header is checked before any output


class Interrupted(Exception):
  pass


class InterruptingScorer(FakeScorer):
  """Stops the run (as a kill would) on its `calls`-th scoring call."""

  def __init__(self, calls):
    super().__init__()
    self.calls = calls

  def log_likelihood(self, sequences, progress=None):
    self.calls -= 1
    if self.calls == 0:
      raise Interrupted
    return super().log_likelihood(sequences, progress)


class RestoredScorer(InterruptingScorer):
  """An InterruptingScorer that says, as `Scorer.fingerprint` does, which
  checkpoint it was restored from (calls=0: never interrupts)."""

  def __init__(self, checkpoint, context=1000, calls=0):
    super().__init__(calls)
    self.checkpoint, self.context = checkpoint, context
    self.window_nucleotides = context

  def fingerprint(self):
    return {"checkpoint": self.checkpoint, "context": self.context}


def test_an_interrupted_run_resumes_to_the_same_outputs(files, tmp_path):
  def run(directory, scorer):
    directory.mkdir(exist_ok=True)
    return callsets.score_callset(
      scorer,
      files["vcf_gz"],
      files["ref"],
      str(directory / "s.tsv"),
      window=31,
      rc_average=True,
      annotated=str(directory / "a.vcf"),
      chunk_records=4,
    )

  run(tmp_path / "whole", FakeScorer())
  with pytest.raises(Interrupted):
    run(tmp_path / "resumed", InterruptingScorer(calls=4))
  progress = tmp_path / "resumed" / "s.tsv.progress.json"
  assert progress.exists()
  # A torn write after the last commit is cut off on resume.
  with open(tmp_path / "resumed" / "s.tsv", "a") as f:
    f.write("chrA\t1\tpartial")
  scorer = FakeScorer()
  summary = run(tmp_path / "resumed", scorer)
  assert summary.resumed_from == 12 and summary.records == 30
  assert len(scorer.seen) < 2 * 2 * 30  # only the rest was scored
  assert not progress.exists()
  for name in ("s.tsv", "s.tsv.skipped.tsv", "a.vcf"):
    assert (tmp_path / "resumed" / name).read_text() == (tmp_path / "whole" / name).read_text()
  # Other settings do not resume silently.
  with pytest.raises(Interrupted):
    run(tmp_path / "changed", InterruptingScorer(calls=2))
  with pytest.raises(ValueError, match="other inputs or settings .*window"):
    callsets.score_callset(
      FakeScorer(),
      files["vcf_gz"],
      files["ref"],
      str(tmp_path / "changed" / "s.tsv"),
      window=33,
      rc_average=True,
      annotated=str(tmp_path / "changed" / "a.vcf"),
      chunk_records=4,
    )
  # Nor another reference under the same name (a build replaced in place).
  reference = tmp_path / ("ref" + "".join(pathlib.Path(files["ref"]).suffixes))
  shutil.copyfile(files["ref"], reference)
  (tmp_path / "newref").mkdir()

  def run_on(ref, scorer):
    return callsets.score_callset(
      scorer,
      files["vcf_gz"],
      str(ref),
      str(tmp_path / "newref" / "s.tsv"),
      window=31,
      chunk_records=4,
    )

  with pytest.raises(Interrupted):
    run_on(reference, InterruptingScorer(calls=2))
  progress = tmp_path / "newref" / "s.tsv.progress.json"
  saved = json.loads(progress.read_text())
  os.utime(reference, ns=(0, os.stat(reference).st_mtime_ns + 10**9))
  with pytest.raises(ValueError, match="other inputs or settings .*reference_mtime_ns"):
    run_on(reference, FakeScorer())
  # Progress of an earlier version (which recorded no reference size or time).
  del saved["fingerprint"]["reference_size"], saved["fingerprint"]["reference_mtime_ns"]
  progress.write_text(json.dumps(saved))
  with pytest.raises(
    ValueError, match="an earlier version, which did not record reference_mtime_ns"
  ):
    run_on(reference, FakeScorer())


def test_annotated_bcf_declares_what_the_input_header_lacks(files, genome, tmp_path):
  # A hand-made VCF: no ##contig, ##FILTER or ##INFO lines, and a record on a
  # contig the reference lacks (skipped, but kept in the annotated file).
  a = genome[:3000]
  calls = tmp_path / "calls.vcf"
  calls.write_text(
    "##fileformat=VCFv4.2\n#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n"
    f"chrA\t100\tv1\t{a[99]}\t{OTHER[a[99]]}\t.\tlowq\tDP=5;SOMATIC\n"
    f"chrA\t200\tv2\t{a[199]}\t{OTHER[a[199]]}\t.\t.\t.\n"
    "chrUn\t10\tv3\tA\tC\t.\t.\t.\n"
  )
  out, annotated = str(tmp_path / "s.tsv"), str(tmp_path / "scored.bcf")
  summary = callsets.score_callset(
    FakeScorer(), str(calls), files["ref"], out, window=31, annotated=annotated
  )
  assert summary.scored == 2 and summary.skipped == 1 and annotated in summary.paths
  with pysam.VariantFile(annotated) as vf:
    records = list(vf)
  assert [(r.chrom, r.pos) for r in records] == [("chrA", 100), ("chrA", 200), ("chrUn", 10)]
  assert records[0].info["DP"] == ("5",) and records[0].info["SOMATIC"] is True
  assert list(records[0].filter) == ["lowq"] and callsets.INFO_LLR in records[1].info

  # A write that fails anyway names the file, in one line.
  blocked = tmp_path / "blocked.bcf"
  blocked.mkdir()
  with pytest.raises(OSError, match=r"blocked.bcf: cannot write the annotated BCF .*rerun") as e:
    callsets.score_callset(
      FakeScorer(), str(calls), files["ref"], out + "2", window=31, annotated=str(blocked)
    )
  assert "\n" not in str(e.value)


def test_a_resume_with_another_checkpoint_or_context_is_refused(files, tmp_path):
  def run(scorer):
    return callsets.score_callset(
      scorer, files["vcf_gz"], files["ref"], str(tmp_path / "s.tsv"), window=31, chunk_records=4
    )

  with pytest.raises(Interrupted):
    run(RestoredScorer("run/checkpoints/200", calls=2))
  refused = r"s.tsv.progress.json: an interrupted run with other inputs or settings \({}\)"
  with pytest.raises(ValueError, match=refused.format("checkpoint: '.*200', now '.*400'")):
    run(RestoredScorer("run/checkpoints/400"))
  # A shorter context caps the window: other windows, other scores.
  with pytest.raises(
    ValueError, match=refused.format("context: 1000, now 20; window_used: 31, now 20")
  ):
    run(RestoredScorer("run/checkpoints/200", context=20))
  assert run(RestoredScorer("run/checkpoints/200")).resumed_from == 4
