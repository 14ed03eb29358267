"""Variant effects: VCF/CSV reading, bad records reported by line and
skipped, ref/alt windows centred on the variant and shared, LLRs equal to
the model's window log-likelihoods, TSV output."""

import gzip
import math

import jax
import numpy as np
import pytest
from conftest import LAMBDA_FASTA

from hybridna_jax import restore, scoring, sharding, tokenizer
from hybridna_jax.data import fasta
from hybridna_jax.scoring import variants


@pytest.fixture(scope="module")
def genome():
  ((_, tokens),) = fasta.read_fasta(LAMBDA_FASTA)
  return tokenizer.decode(tokens)


@pytest.fixture(scope="module")
def reference_path(genome, tmp_path_factory):
  path = tmp_path_factory.mktemp("ref") / "ref.fa.gz"
  fasta.write_fasta(
    path,
    [("chrA", genome[:3000]), ("chrB", genome[3000:5000]), ("chrC", genome[5000:6000])],
    compress="gzip",
  )
  return str(path)


def _other(base):
  return {"A": "C", "C": "G", "G": "T", "T": "A"}[base]


@pytest.fixture(scope="module")
def vcf(genome, tmp_path_factory):
  a, b = genome[:3000], genome[3000:5000]
  ref = lambda chrom, pos, n=1: chrom[pos - 1 : pos - 1 + n]
  rows = [
    ("chrA", 101, "rs1", ref(a, 101), _other(ref(a, 101))),  # 4 SNV
    (
      "chrA",
      201,
      ".",
      ref(a, 201),
      f"{_other(ref(a, 201))},{_other(_other(ref(a, 201)))}",
    ),  # 5 two alleles
    ("chrA", 301, ".", ref(a, 301), ref(a, 301) + "GT"),  # 6 insertion
    ("chrB", 51, ".", ref(b, 51, 3), ref(b, 51)),  # 7 deletion
    ("chrA", 401, ".", _other(ref(a, 401)), "A"),  # 8 REF mismatch
    ("A", 10, ".", "A", "C"),  # 9 unknown chrom
    ("chrB", 1999, ".", ref(b, 1999, 2) + "A", "A"),  # 10 past the end
    ("chrA", 501, ".", ref(a, 501), "<DEL>"),  # 11 symbolic
    ("chrA", 601, ".", ref(a, 601), "N"),  # 12 N allele
    ("chrA", "abc", ".", "A", "C"),  # 13 bad POS
    ("chrA", 701, ".", ref(a, 701), ref(a, 701)),  # 14 ALT = REF
    ("chrA", 801, ".", ref(a, 801), ref(a, 801) + "A" * 100),  # 15 too long
    ("chrA", 1, "first", ref(a, 1), _other(ref(a, 1))),  # 16 at the start
    ("chrB", 2000, "last", ref(b, 2000), _other(ref(b, 2000))),  # 17 at the end
  ]
  lines = [
    "##fileformat=VCFv4.2",
    "##contig=<ID=chrA>",
    "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO",
  ]
  lines += ["\t".join(map(str, r)) + "\t.\tPASS\t." for r in rows]
  lines.append("chrA\t5")  # 18 malformed
  path = tmp_path_factory.mktemp("vcf") / "calls.vcf.gz"
  with gzip.open(path, "wt") as f:
    f.write("\n".join(lines) + "\n")
  return str(path)


class FakeScorer:
  """Deterministic stand-in: log-likelihood = a position-weighted token sum;
  records every sequence it is asked to score."""

  context = window_nucleotides = 1000

  def __init__(self):
    self.seen = []

  @staticmethod
  def value(tokens):
    tokens = np.asarray(tokens, np.float64)
    return float((tokens * np.sin(np.arange(len(tokens)) + 1.0)).sum())

  def log_likelihood(self, sequences, progress=None):
    del progress
    self.seen += [np.asarray(s) for s in sequences]
    totals = np.array([self.value(s) for s in sequences])
    return scoring.LogLikelihood(totals, totals, np.ones_like(totals))


def test_vcf_records_are_read_checked_and_bad_ones_reported_by_line(vcf, reference_path):
  found, problems = variants.read_variants(vcf, max_indel_length=64)
  assert [(v.chrom, v.pos) for v in found][:4] == [
    ("chrA", 101),
    ("chrA", 201),
    ("chrA", 201),
    ("chrA", 301),
  ]
  assert found[0].id == "rs1" and found[0].source == f"{vcf}:4"
  reasons = {int(p.source.rsplit(":", 1)[1]): p.reason for p in problems}
  assert sorted(reasons) == [11, 12, 13, 14, 15, 18]
  assert "symbolic" in reasons[11] and "N (an unknown base)" in reasons[12]
  assert "POS 'abc'" in reasons[13] and "ALT equals REF" in reasons[14]
  assert "max_indel_length=64" in reasons[15] and "at least 5" in reasons[18]

  reference = variants.load_reference(reference_path, {v.chrom for v in found})
  assert set(reference.chromosomes) == {"chrA", "chrB"}  # chrC was not needed
  valid, bad = variants.check_variants(found, reference)
  reasons = {int(p.source.rsplit(":", 1)[1]): p.reason for p in bad}
  assert sorted(reasons) == [8, 9, 10]
  assert "does not match the reference" in reasons[8]
  assert "'A' is not in the reference" in reasons[9] and "calls it 'chrA'" in reasons[9]
  assert "past the end of chrB (length 2,000)" in reasons[10]
  assert [v.kind for v in valid] == ["SNV", "SNV", "SNV", "insertion", "deletion", "SNV", "SNV"]


def test_windows_are_centred_shared_and_give_the_llr(vcf, reference_path, genome):
  found, _ = variants.read_variants(vcf)
  reference = variants.load_reference(reference_path, {v.chrom for v in found})
  fake = FakeScorer()
  scores, problems = variants.score_variants(fake, found, reference, window=21)
  assert len(problems) == 3 and len(scores) == 7
  # 7 alt windows and 6 reference windows: the two alleles at 201 share one.
  assert len(fake.seen) == 13
  a = variants.tokenizer.encode(genome[:3000])
  snv = scores[0]
  assert (snv.window_start, snv.window_end) == (90, 111)  # 10 bases each side
  ref_window = a[90:111]
  alt_window = ref_window.copy()
  alt_window[10] = tokenizer.encode(snv.variant.alt)[0]
  assert math.isclose(snv.llr, FakeScorer.value(alt_window) - FakeScorer.value(ref_window))
  assert math.isclose(snv.ref_loglik, FakeScorer.value(ref_window))
  assert math.isnan(snv.llr_reverse)
  # Every window is 21 long. Insertion of 2 bases: 9 bases on the left; the
  # reference window reaches 2 bases further right than the alt window.
  assert {len(s) for s in fake.seen} == {21}
  ins = scores[3]
  assert (ins.window_start, ins.window_end) == (300 - 9, 301 + 11)
  expected_alt = np.concatenate([a[291:300], tokenizer.encode(ins.variant.alt), a[301:310]])
  assert any((s == expected_alt).all() for s in fake.seen)
  # Deletion of 2 bases: the alt window lacks them and reads 2 bases further.
  dele = scores[4]
  b = tokenizer.encode(genome[3000:5000])
  assert (dele.window_start, dele.window_end) == (50 - 9, 53 + 9)
  expected_alt = np.concatenate([b[41:51], b[53:64]])
  assert any((s == expected_alt).all() for s in fake.seen)
  # At the chromosome ends the window shifts inwards and keeps its length.
  assert (scores[5].window_start, scores[5].window_end) == (0, 21)
  assert (scores[6].window_start, scores[6].window_end) == (1979, 2000)

  both = FakeScorer()
  rc_scores, _ = variants.score_variants(both, found, reference, window=21, rc_average=True)
  assert len(both.seen) == 26
  s = rc_scores[0]
  rc = lambda t: tokenizer.reverse_complement_nucleotides(t)
  llr_reverse = FakeScorer.value(rc(alt_window)) - FakeScorer.value(rc(ref_window))
  assert math.isclose(s.llr_forward, snv.llr) and math.isclose(s.llr_reverse, llr_reverse)
  assert math.isclose(s.llr, (snv.llr + llr_reverse) / 2)
  for got, window in ((s.ref_loglik, ref_window), (s.alt_loglik, alt_window)):  # strand means
    assert math.isclose(got, (FakeScorer.value(window) + FakeScorer.value(rc(window))) / 2)


def test_llr_with_the_model_and_tsv_output(tiny_run, vcf, reference_path, tmp_path):
  model, _, _ = restore.load(tiny_run, mesh=sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
  scorer = scoring.Scorer(model, context=64, stride=32, batch_size=4, min_bucket=32)
  found, read_problems = variants.read_variants(vcf)
  reference = variants.load_reference(reference_path, {v.chrom for v in found})
  scores, problems = variants.score_variants(scorer, found, reference, window=32, rc_average=True)
  for s in (scores[0], scores[4]):  # an SNV and a deletion
    span, ref_w, alt_w = variants.variant_windows(s.variant, reference[s.variant.chrom], 32)
    assert span == (s.window_start, s.window_end) and len(ref_w) == 32
    ll = scorer.log_likelihood([ref_w, alt_w], rc_average=True).total
    np.testing.assert_allclose(s.llr, ll[1] - ll[0], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose([s.ref_loglik, s.alt_loglik], ll, rtol=1e-5)
    np.testing.assert_allclose(s.llr, (s.llr_forward + s.llr_reverse) / 2, rtol=1e-6)
  out = tmp_path / "effects.tsv"
  variants.write_scores(str(out), scores)
  rows = variants.read_scores(str(out))
  assert list(rows[0]) == list(variants.SCORE_COLUMNS)
  assert [(r["chrom"], int(r["pos"]), r["alt"]) for r in rows] == [
    (s.variant.chrom, s.variant.pos, s.variant.alt) for s in scores
  ]
  assert rows[0]["id"] == "rs1" and rows[3]["type"] == "insertion"
  np.testing.assert_allclose([float(r["llr"]) for r in rows], [s.llr for s in scores], rtol=1e-5)
  skipped = tmp_path / "skipped.tsv"
  variants.write_problems(str(skipped), read_problems + problems)
  lines = skipped.read_text().splitlines()
  assert lines[0].split("\t") == list(variants.PROBLEM_COLUMNS) and len(lines) == 10
  assert variants.plot_scores(str(tmp_path / "effects.png"), scores)


def test_a_window_of_the_whole_context_holds_the_bos(tiny_run, vcf, reference_path):
  # With <bos>, 64 nt would be 65 tokens: two model windows of a 64-token
  # context, the second scoring the last base without <bos>. The window is
  # capped at 63 nt instead, one model window each.
  model, _, _ = restore.load(tiny_run, mesh=sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
  scorer = scoring.Scorer(model, context=64, stride=32, batch_size=4, min_bucket=64, add_bos=True)
  assert scorer.window_nucleotides == 63
  found, _ = variants.read_variants(vcf)
  reference = variants.load_reference(reference_path, {v.chrom for v in found})
  whole, _ = variants.score_variants(scorer, found[:2], reference, window=64)
  capped, _ = variants.score_variants(scorer, found[:2], reference, window=63)
  for a, b in zip(whole, capped):
    assert (a.window_start, a.window_end) == (b.window_start, b.window_end)
    assert b.window_end - b.window_start == 63 and a.llr == b.llr


class Order0Scorer:
  """A model whose predictions ignore position and context: log p(x_i) =
  logq[x_i] for every scored position (all but the first, as the Scorer)."""

  context = window_nucleotides = 1000

  def __init__(self, logq):
    self.logq = np.asarray(logq, np.float64)

  def log_likelihood(self, sequences, progress=None):
    del progress
    totals = np.array([self.logq[np.asarray(s)[1:]].sum() for s in sequences])
    return scoring.LogLikelihood(totals, totals, np.ones_like(totals))


def _indels(genome, rng, count):
  """Random insertions (1..8 random bases after a reference base) in the
  middle of chrA, as (pos, ref, alt)."""
  out = []
  for _ in range(count):
    pos = int(rng.integers(500, 2500))
    base = genome[pos - 1]
    out.append((pos, base, base + "".join(rng.choice(list("ACGT"), int(rng.integers(1, 9))))))
  return out


def _paired_scores(scorer, genome, indels, window):
  """LLRs of each insertion on chrA and of the deletion that undoes it on
  the haplotype carrying the insertion; (lengths, llr_ins, llr_del)."""
  chrom = genome[:3000]
  lengths, ins_llrs, del_llrs = [], [], []
  for pos, ref, alt in indels:
    hap = chrom[: pos - 1] + alt + chrom[pos:]
    reference = variants.Reference("mem", {"c": tokenizer.encode(chrom)}, ["c"])
    inserted = variants.Reference("mem", {"c": tokenizer.encode(hap)}, ["c"])
    (ins,), p1 = variants.score_variants(
      scorer, [variants.Variant("c", pos, ref, alt)], reference, window=window
    )
    (dele,), p2 = variants.score_variants(
      scorer, [variants.Variant("c", pos, alt, ref)], inserted, window=window
    )
    assert not p1 and not p2
    assert ins.variant.kind == "insertion" and dele.variant.kind == "deletion"
    lengths.append(len(alt) - len(ref))
    ins_llrs.append(ins.llr)
    del_llrs.append(dele.llr)
  return np.array(lengths), np.array(ins_llrs), np.array(del_llrs)


def test_indel_scores_are_length_fair_and_antisymmetric(genome):
  rng = np.random.default_rng(0)
  indels = _indels(genome, rng, 24)
  # Context-dependent model: an insertion and the deletion undoing it swap
  # windows, so their scores are exactly opposite.
  lengths, ins, dele = _paired_scores(FakeScorer(), genome, indels, window=41)
  np.testing.assert_allclose(dele, -ins, atol=1e-9)
  assert np.abs(ins).max() > 1.0  # not trivially zero
  # Uniform predictions (an untrained model's ideal): every indel scores 0;
  # windows of unequal length would give -log(128) nats per inserted base.
  uniform = Order0Scorer(np.full(128, -np.log(128)))
  _, ins, dele = _paired_scores(uniform, genome, indels, window=41)
  np.testing.assert_allclose(np.concatenate([ins, dele]), 0.0, atol=1e-9)
  # Order-0: only the composition of the inserted bases against as many
  # flanking bases counts; no trend with length.
  logq = np.full(128, -50.0)
  logq[list(tokenizer.encode("ACGT"))] = np.log([0.1, 0.2, 0.3, 0.4])
  many = _indels(genome, rng, 160)
  lengths, ins, dele = _paired_scores(Order0Scorer(logq), genome, many, window=41)
  np.testing.assert_allclose(dele, -ins, atol=1e-9)
  slope = np.polyfit(lengths, ins, 1)[0]
  assert abs(slope) < 0.15, slope  # nats per inserted base; unequal windows: ~-1.3


def test_untrained_model_gives_indel_llrs_near_zero(genome):
  from hybridna_jax.config import ModelConfig, load_config
  from hybridna_jax.model import create_model

  cfg = ModelConfig.from_config(load_config("configs/tiny.py").model)
  scorer = scoring.Scorer(create_model(cfg, seed=0), context=64, batch_size=8, min_bucket=64)
  indels = _indels(genome, np.random.default_rng(1), 12)
  lengths, ins, dele = _paired_scores(scorer, genome, indels, window=64)
  np.testing.assert_allclose(dele, -ins, atol=1e-3)
  # log(128) = 4.85 nats per base: unequal windows gave about that per base.
  assert np.abs(ins).max() < 0.5, ins
  assert abs(np.polyfit(lengths, ins, 1)[0]) < 0.1


def test_csv_variants_and_format_errors(tmp_path):
  good = tmp_path / "v.csv"
  good.write_text(
    "\ufeffID,Chrom,Pos,Ref,Alt,gene\nv1,chrA,12,A,G,x\nv2,chrA,13\n"
    "v3,chrB,0,C,T,y\nv4,chrB,7,c,<INS>,z\n"
  )
  found, problems = variants.read_variants(str(good))
  assert [(v.id, v.chrom, v.pos, v.ref, v.alt, v.source) for v in found] == [
    ("v1", "chrA", 12, "A", "G", f"{good}:2")
  ]
  assert [p.source for p in problems] == [f"{good}:3", f"{good}:4", f"{good}:5"]
  assert "3 fields" in problems[0].reason and "positive integer" in problems[1].reason
  bad = tmp_path / "bad.csv"
  bad.write_text("chrom,position,ref,alt\nchrA,1,A,C\n")
  with pytest.raises(variants.VariantFormatError, match=r"bad.csv line 1: .*lacks the columns pos"):
    variants.read_variants(str(bad))
  no_header = tmp_path / "x.vcf"
  no_header.write_text("chrA\t1\t.\tA\tC\n")
  with pytest.raises(variants.VariantFormatError, match=r"x.vcf line 1: a record before"):
    variants.read_variants(str(no_header))
  with pytest.raises(variants.VariantFormatError, match="unknown variant file type"):
    variants.read_variants(str(tmp_path / "v.bed"))


def test_kind_ignores_the_bases_the_alleles_share():
  # Multi-allelic sites pad every ALT to the longest REF (ACT>A,GCT).
  cases = {
    ("ACT", "GCT"): "SNV",
    ("AT", "GT"): "SNV",
    ("CAT", "CGT"): "SNV",
    ("CAT", "CT"): "deletion",
    ("ACT", "A"): "deletion",
    ("ATG", "ATCG"): "insertion",
    ("A", "AGT"): "insertion",
    ("AC", "GT"): "MNV",
    ("ACGT", "ACTA"): "MNV",
    ("AT", "GCC"): "indel",
    # An event at POS 1 is padded with the base after it (VCF 4.2).
    ("A", "GTA"): "insertion",
    ("GTA", "A"): "deletion",
    ("AT", "GAT"): "insertion",
  }
  assert {k: variants.Variant("c", 1, *k).kind for k in cases} == cases
  assert variants.trim_alleles("CAT", "CT") == ("CA", "C")


def test_a_padded_snv_of_a_long_multiallelic_site_is_a_small_variant(tmp_path):
  """REF of 70 bases with ALTs of a 69-base deletion and an SNV padded to
  the REF: the deletion exceeds max_indel_length, the SNV does not."""
  ref = "ACGT" * 17 + "AC"
  vcf = tmp_path / "m.vcf"
  vcf.write_text(
    "##fileformat=VCFv4.2\n#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n"
    f"c\t1\t.\t{ref}\t{ref[0]},G{ref[1:]}\t.\t.\t.\n"
  )
  found, problems = variants.read_variants(str(vcf), max_indel_length=64)
  assert [v.alt for v in found] == ["G" + ref[1:]] and found[0].kind == "SNV"
  (problem,) = problems
  assert problem.alt == ref[0] and "alleles of 70 and 1 bases" in problem.reason


def test_an_allele_longer_than_a_short_chromosome_is_skipped_not_fatal(genome):
  short, long = genome[:40], genome[1000:1500]
  reference = variants.Reference(
    "mem", {"ctg": tokenizer.encode(short), "chrA": tokenizer.encode(long)}, ["ctg", "chrA"]
  )
  snv = variants.Variant("chrA", 100, long[99], _other(long[99]), source="x:1")
  # 25 bases deleted from 40: the alt haplotype (15 nt) caps the 64-nt window.
  big = variants.Variant("ctg", 5, short[4:30], short[4], source="x:2")
  small = variants.Variant("ctg", 5, short[4:8], short[4], source="x:3")
  assert variants.window_length(big, 40, 64) == 15
  scores, problems = variants.score_variants(FakeScorer(), [snv, big, small], reference, window=64)
  assert [s.variant.source for s in scores] == ["x:1", "x:3"]
  assert [(p.source, p.reason) for p in problems] == [
    ("x:2", "alleles longer than the window (15 nt, capped by the 40-nt chromosome)")
  ]
  assert scores[1].window_end - scores[1].window_start == 37  # 40 - 4 + 1


def test_a_window_one_base_longer_than_the_allele_puts_that_base_before_it():
  """Review of stop 37: a 2-nt window started at an SNV, whose own base a
  window's first position never scores (without add_bos)."""
  chrom = tokenizer.encode("ACGTACGTAC")
  snv = variants.Variant("c", 5, "A", "G")
  (start, end), ref, alt = variants.variant_windows(snv, chrom, 2)
  assert (start, end) == (3, 5) and tokenizer.decode(ref) == "TA" and tokenizer.decode(alt) == "TG"
  first = variants.Variant("c", 1, "A", "G")  # nothing before it: the window starts there
  assert variants.variant_windows(first, chrom, 2)[0] == (0, 2)
  mnv = variants.Variant("c", 5, "AC", "GG")
  assert variants.variant_windows(mnv, chrom, 3)[0] == (3, 6)
  assert variants.variant_windows(mnv, chrom, 6)[0] == (2, 8)  # centred as before
