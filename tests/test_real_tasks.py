"""scripts/make_real_tasks.py: a small promoter task from the Debian files
(skipped, with the reason, where they are absent)."""

import collections
import csv
import importlib.util
import os

import numpy as np
import pytest

from hybridna_jax import tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
  "make_real_tasks", os.path.join(ROOT, "scripts", "make_real_tasks.py")
)
make = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make)


def test_region_split_keeps_blocks_whole():
  block = 100
  assert make.region_split(0, 50, block) == "train"
  assert make.region_split(750, 800, block) == "dev"
  assert (
    make.region_split(890, 900, block) == "test" and make.region_split(1990, 2000, block) == "test"
  )
  assert make.region_split(95, 105, block) is None  # crosses a boundary


def test_small_promoter_task_from_the_debian_files(tmp_path):
  cache = os.path.join(ROOT, "data_cache")
  paths = {rel: make.find_source(rel, cache) for rel in (make.UPSTREAM, make.CHR2R)}
  missing = [make.PACKAGES[rel] for rel, path in paths.items() if path is None]
  if missing:
    pytest.skip(
      f"Debian files of {', '.join(missing)} absent (bash scripts/fetch_real_task_data.sh)"
    )
  out = str(tmp_path / "prom")
  info = make.make_promoters(
    paths[make.UPSTREAM], paths[make.CHR2R], out, length=120, max_per_split=40, seed=1
  )
  splits = {}
  for split in make.SPLITS:
    with open(os.path.join(out, f"{split}.csv")) as f:
      rows = list(csv.DictReader(f))
    splits[split] = rows
    labels = np.array([int(r["label"]) for r in rows])
    assert (labels == 1).sum() == (labels == 0).sum() == info["counts"][split]["positives"] > 10
    assert all(len(r["sequence"]) == 120 and set(r["sequence"]) <= set("ACGT") for r in rows)
  # No sequence is shared between the held-out test split and train.
  train = {r["sequence"] for r in splits["train"]}
  assert not train & {r["sequence"] for r in splits["test"]}
  # Positives are the genome next to a start: each occurs in chr2R on one strand.
  from hybridna_jax.data import fasta

  ((_, tokens),) = fasta.read_fasta(paths[make.CHR2R])
  genome = tokenizer.decode(tokens).upper()
  for r in [r for r in splits["test"] if r["label"] == "1"][:5]:
    s = r["sequence"]
    assert s in genome or tokenizer.reverse_complement(s) in genome


def _read_split(folder, split):
  with open(os.path.join(folder, f"{split}.csv")) as f:
    rows = list(csv.DictReader(f))
  with open(os.path.join(folder, f"{split}.regions.bed")) as f:
    regions = [line.split("\t") for line in f.read().splitlines()]
  assert len(rows) == len(regions)
  return rows, [(int(r[1]), int(r[2]), int(r[3]), r[5]) for r in regions]


def _check_insulator_task(folder, genome, peaks, protein, length, bins, pad, block):
  """Shared checks of one insulator folder against its genome and peaks."""
  union = make.merge_intervals([tuple(p) for ps in peaks.values() for p in ps])
  spans = {}
  for split in make.SPLITS:
    rows, regions = _read_split(folder, split)
    spans[split] = regions
    labels = np.array([int(r["label"]) for r in rows])
    assert (labels == 1).sum() == (labels == 0).sum() > 0
    gc = {0: [], 1: []}
    for row, (start, end, label, strand) in zip(rows, regions):
      assert int(row["label"]) == label and end - start == length
      assert make.region_split(start, end, block) == split
      window = genome[start:end]
      expect = window if strand == "+" else tokenizer.reverse_complement(window)
      assert row["sequence"] == expect and set(expect) <= set("ACGT")
      gc[label].append(int((window.count("G") + window.count("C")) / length * bins))
      if label == 1:  # overlaps a peak of its protein
        assert any(s < end and start < e for s, e in peaks[protein])
      else:  # at least `pad` nt from every peak of every protein
        assert not any(s - pad < end and start < e + pad for s, e in union)
    # GC-matched: the same GC bins, window for window.
    assert sorted(min(b, bins - 1) for b in gc[0]) == sorted(min(b, bins - 1) for b in gc[1])
  # Held out by region: no test window overlaps a train or dev window.
  for other in ("train", "dev"):
    for s, e, *_ in spans["test"]:
      assert not any(s < e2 and s2 < e for s2, e2, *_ in spans[other])


def test_insulator_task_on_a_synthetic_chromosome(tmp_path):
  """The whole insulator builder on a made-up chromosome and BED folder:
  runs without any download, so it always runs."""
  rng = np.random.default_rng(0)
  n, length, bins = 200_000, 100, 10
  # GC varies along the chromosome so that GC matching has work to do.
  gc = np.repeat(rng.uniform(0.25, 0.65, n // 2_000), 2_000)
  strong = rng.random(n) < gc
  genome = np.where(strong, rng.choice(list("GC"), n), rng.choice(list("AT"), n))
  genome[5_000:5_050] = "N"
  genome = "".join(genome)
  (tmp_path / "chr.fa").write_text(
    ">chrT\n" + "\n".join(genome[i : i + 80] for i in range(0, n, 80)) + "\n"
  )
  beds = tmp_path / "beds"
  beds.mkdir()
  for prefix in make.BUSHEY.values():
    for cell in make.CELL_LINES:
      lines = ['track name="x"']
      for s in rng.integers(0, n - 400, 25):
        lines.append(f"chrT\t{s}\t{s + int(rng.integers(150, 400))}")
      lines.append("chrOther\t10\t500")
      (beds / f"{prefix}_{cell}_Bushey_2009.bed").write_text("\n".join(lines) + "\n")
  peaks = make.read_bushey(str(beds), "chrT")
  assert all(len(p) > 20 and (np.diff(p[:, 0]) > 0).all() for p in peaks.values())
  out = tmp_path / "ins"
  infos = make.make_insulators(
    str(beds),
    str(tmp_path / "chr.fa"),
    str(out),
    proteins=("ctcf", "suhw"),
    length=length,
    block=10_000,
    seed=3,
    gc_bins=bins,
  )
  assert sorted(os.listdir(out)) == ["ctcf", "suhw"]
  for protein, info in infos.items():
    assert info["counts"]["train"]["positives"] > 10
    _check_insulator_task(str(out / protein), genome, peaks, protein, length, bins, length, 10_000)
  # Fixed seed: the same files again.
  again = make.make_insulators(
    str(beds),
    str(tmp_path / "chr.fa"),
    str(tmp_path / "again"),
    proteins=("ctcf",),
    length=length,
    block=10_000,
    seed=3,
    gc_bins=bins,
  )
  assert again["ctcf"]["counts"] == infos["ctcf"]["counts"]


def test_merge_intervals_and_split_codes():
  merged = make.merge_intervals([(50, 60), (0, 10), (5, 20), (20, 30), (70, 71)])
  assert merged.tolist() == [[0, 30], [50, 60], [70, 71]]
  starts = np.arange(0, 2_000, 7)
  codes = make.split_codes(starts, 30, 100)
  for s, c in zip(starts, codes):
    expect = make.region_split(int(s), int(s) + 30, 100)
    assert (make.SPLITS[c] if c >= 0 else None) == expect


def test_small_insulator_task_from_the_packaged_files(tmp_path):
  cache = os.path.join(ROOT, "data_cache")
  chrom_path, beds = make.find_source(make.CHR2R, cache), make.find_bushey(cache)
  if chrom_path is None or beds is None:
    missing = (["augustus-doc"] if chrom_path is None else []) + (
      ["the pybedtools 0.12.1 wheel"] if beds is None else []
    )
    pytest.skip(f"{', '.join(missing)} absent (bash scripts/fetch_real_task_data.sh)")
  from hybridna_jax.data import fasta

  ((_, tokens),) = fasta.read_fasta(chrom_path)
  genome = tokenizer.decode(tokens).upper()
  peaks = make.read_bushey(beds, "chr2R")
  # Hundreds of merged peaks per protein on chr2R (both cell lines).
  assert all(300 < len(p) < 2_000 for p in peaks.values())
  out = str(tmp_path / "ins")
  infos = make.make_insulators(
    beds, chrom_path, out, proteins=("suhw",), length=200, max_per_split=15, seed=1
  )
  assert infos["suhw"]["counts"]["test"] == {"positives": 15, "negatives": 15}
  _check_insulator_task(os.path.join(out, "suhw"), genome, peaks, "suhw", 200, 50, 200, 1_000_000)


def test_readme_builds_the_real_tasks_it_fine_tunes_on():
  """The README's commands: fetch, then make_real_tasks.py with arguments its
  parser accepts, writing the folders the fine-tuning commands read."""
  import shlex

  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    text = f.read().replace("\\\n", " ")
  commands = [line.strip() for line in text.splitlines()]
  fetch = [i for i, c in enumerate(commands) if c == "bash scripts/fetch_real_task_data.sh"]
  makes = [i for i, c in enumerate(commands) if c.startswith("python scripts/make_real_tasks.py")]
  assert fetch and makes and fetch[0] < makes[0]
  built = {}
  for i in makes:
    args = make.build_parser().parse_args(shlex.split(commands[i])[2:])
    built[args.task] = args.out
  assert set(built) == {"promoters", "insulators", "splice", "design_insulators"}
  tasks = [c for c in commands if c.startswith("python launch/finetune.py") and "dm_" in c]
  assert any(f"--task={built['promoters']}" in c for c in tasks)
  assert any(f"--task_suite='{built['insulators']}/*'" in c for c in tasks)
  # The design demo's config reads what the README's design command writes.
  from hybridna_jax.config import load_config

  g = load_config(os.path.join(ROOT, "configs", "design_demo.py")).generate
  for path in (g.train_csv, g.val_csv, g.oracle_csv, g.oracle_dev_csv, g.test_csv):
    assert os.path.dirname(path) == built["design_insulators"], path
  assert any(
    c.startswith("python launch/generate.py --mode=finetune --config=configs/design_demo.py")
    for c in commands
  )


def _genbank(name, seq, location):
  lines = [f"LOCUS       {name}   {len(seq)} bp  DNA", "FEATURES             Location/Qualifiers"]
  lines.append(f"     source          1..{len(seq)}")
  lines.append(f"     CDS             {location[:40]}")
  for i in range(40, len(location), 40):
    lines.append(" " * 21 + location[i : i + 40])
  lines.append(' ' * 21 + '/gene="g"')
  lines.append("ORIGIN")
  for i in range(0, len(seq), 60):
    chunk = seq[i : i + 60].lower()
    lines.append(f"{i + 1:>9} " + " ".join(chunk[j : j + 10] for j in range(0, len(chunk), 10)))
  lines.append("//")
  return "\n".join(lines) + "\n"


def _locus(rng):
  """A random 3 kb locus with CDS exons 1001..1200, 1401..1600, 1801..2000
  (1-based): donors after 1200 and 1600 (GT), acceptors before 1401 and
  1801 (AG)."""
  seq = list(rng.choice(list("ACGT"), 3_000))
  for b in (1200, 1600):
    seq[b : b + 2] = "GT"
  for s in (1401, 1801):
    seq[s - 3 : s - 1] = "AG"
  return "".join(seq)


_LOCATION = "join(1001..1200,1401..1600,1801..2000)"


def test_splice_sites_from_genbank_both_strands(tmp_path):
  rng = np.random.default_rng(0)
  plus = _locus(rng)
  minus = tokenizer.reverse_complement(plus)
  n = len(plus)
  rc_location = (
    "complement(join("
    + ",".join(f"{n - e + 1}..{n - s + 1}" for s, e in [(1801, 2000), (1401, 1600), (1001, 1200)])
    + "))"
  )
  test_path = tmp_path / "genes.gb.test"
  test_path.write_text(
    _genbank("chrT_1-3000", plus, _LOCATION) + _genbank("chrT_5001-8000", minus, rc_location)
  )
  records = make.read_genbank(str(test_path))
  assert [r[0] for r in records] == ["chrT_1-3000", "chrT_5001-8000"]
  assert records[0][1] == plus and records[1][2][0][0] == "-"
  assert records[0][2] == [("+", [(1001, 1200), (1401, 1600), (1801, 2000)])]
  for _, locus, cds in records:
    ((strand, exons),) = cds
    oriented, donors, acceptors = make.splice_sites(locus, strand, exons)
    assert oriented == plus and donors == [1200, 1600] and acceptors == [1400, 1800]
  train_path = tmp_path / "genes.gb.train"
  train_path.write_text(
    _genbank("chrT_9001-12000", _locus(rng), _LOCATION)
    + _genbank("chrT_20001-23000", _locus(rng), _LOCATION)
  )
  out = tmp_path / "splice"
  infos = make.make_splice(
    str(train_path), str(test_path), str(out), length=40, seed=0, dev_fraction=0.5
  )
  for site, dinucleotide, centre in (
    ("donor", "GT", slice(20, 22)),
    ("acceptor", "AG", slice(18, 20)),
  ):
    counts = infos[site]["counts"]
    assert counts["test"]["positives"] == 4 and counts["train"]["positives"] == 2
    assert counts["dev"]["positives"] == 2 and counts["test"]["dropped_as_in_train"] == 0
    with open(out / site / "test.csv") as f:
      rows = list(csv.DictReader(f))
    real = {plus[b - 20 : b + 20] for b in ((1200, 1600) if site == "donor" else (1400, 1800))}
    for r in rows:
      assert len(r["sequence"]) == 40 and r["sequence"][centre] == dinucleotide
      assert (r["sequence"] in real) == (r["label"] == "1")
  # The same locus in train and test: its held-out windows are dropped, not leaked.
  infos = make.make_splice(
    str(test_path), str(test_path), str(tmp_path / "same"), length=40, seed=0, dev_fraction=0.5
  )
  for site in ("donor", "acceptor"):
    counts = infos[site]["counts"]
    assert counts["train"]["positives"] == 2
    assert counts["test"]["positives"] == counts["dev"]["positives"] == 0
    assert counts["test"]["dropped_as_in_train"] > 2


def test_small_splice_task_from_augustus(tmp_path):
  cache = os.path.join(ROOT, "data_cache")
  paths = [make.find_source(rel, cache) for rel in (make.GENES_TRAIN, make.GENES_TEST)]
  if None in paths:
    pytest.skip("augustus-doc genes.gb.train/test absent (bash scripts/fetch_real_task_data.sh)")
  records = make.read_genbank(paths[1])
  assert len(records) == 100 and all(r[2] for r in records)  # the 100 test loci, each with a CDS
  infos = make.make_splice(*paths, str(tmp_path / "s"), length=60, max_per_split=20, seed=2)
  for site in ("donor", "acceptor"):
    counts = infos[site]["counts"]["test"]
    assert (counts["positives"], counts["negatives"], counts["loci"]) == (20, 20, 100)
    train = open(tmp_path / "s" / site / "train.csv").read().splitlines()[1:]
    test = open(tmp_path / "s" / site / "test.csv").read().splitlines()[1:]
    assert len(test) == 40 and len(train) == 40
    test_seqs = [row.split(",")[0] for row in test]
    centre = slice(30, 32) if site == "donor" else slice(28, 30)
    assert {t[centre] for t in test_seqs} == {"GT" if site == "donor" else "AG"}


def test_design_insulators_on_a_synthetic_chromosome(tmp_path):
  """The design CSV builder on a made-up chromosome and BED folder: one
  label per protein, windows centred on peaks, peaks shared by two
  proteins dropped, the region split of DESIGN_ROLES; loadable as design
  CSVs."""
  from hybridna_jax import design

  rng = np.random.default_rng(0)
  n, length, block = 400_000, 60, 10_000
  genome = "".join(rng.choice(list("ACGT"), n))
  (tmp_path / "chr.fa").write_text(
    ">chrT\n" + "\n".join(genome[i : i + 80] for i in range(0, n, 80)) + "\n"
  )
  beds = tmp_path / "beds"
  beds.mkdir()
  starts = rng.permutation(np.arange(1_000, n - 1_000, 1_500))
  own = {p: starts[i::4][:50] for i, p in enumerate(make.BUSHEY)}
  shared = int(own["ctcf"][0])  # also a CP190 peak: ambiguous
  for protein, prefix in make.BUSHEY.items():
    for c, cell in enumerate(make.CELL_LINES):
      lines = ['track name="x"', "chrOther\t10\t500"]
      for s in own[protein][c::2]:
        lines.append(f"chrT\t{s}\t{s + 100}")
      if protein == "cp190" and c == 0:
        lines.append(f"chrT\t{shared + 50}\t{shared + 150}")
      (beds / f"{prefix}_{cell}_Bushey_2009.bed").write_text("\n".join(lines) + "\n")
  out = tmp_path / "design"
  info = make.make_design_insulators(
    str(beds), str(tmp_path / "chr.fa"), str(out), length=length, block=block, seed=2
  )
  assert info["counts"]["CTCF"]["dropped_shared_with_another_protein"] == 1
  assert info["counts"]["CP190"]["dropped_shared_with_another_protein"] == 1
  assert info["counts"]["BEAF-32"]["dropped_shared_with_another_protein"] == 0
  peaks = make.read_bushey(str(beds), "chrT")
  total = 0
  for split in make.DESIGN_SPLITS:
    rows = design.load_design_csv(str(out / f"{split}.csv"), ("label",))
    with open(out / f"{split}.regions.bed") as f:
      regions = [line.split("\t") for line in f.read().splitlines()]
    assert len(regions) == len(rows) > 0
    for seq, label, (_, s, e, bed_label, _, strand) in zip(
      rows.sequences, rows.labels["label"], regions
    ):
      s, e = int(s), int(e)
      assert label == bed_label and e - s == length
      assert make.DESIGN_SPLITS[make.DESIGN_ROLES[(s // block) % 10]] == split
      assert s // block == (e - 1) // block
      window = genome[s:e]
      assert seq == (window if strand == "+" else tokenizer.reverse_complement(window))
      protein = {v: k for k, v in make.DESIGN_LABELS.items()}[label]
      centre = s + length // 2
      assert any(a <= centre < b and (a + b) // 2 == centre for a, b in peaks[protein])
      assert not (s <= shared + 50 < e)  # the ambiguous peak is gone
    by_label = collections.Counter(rows.labels["label"])
    assert sum(info["counts"][label][split] for label in by_label) == len(rows)
    total += len(rows)
  assert total == 4 * 50 - 1 - sum(  # CTCF loses one peak; CP190 had 51
    info["counts"][label]["dropped_crossing_a_block_or_end_or_with_n"] for label in info["counts"]
  )
