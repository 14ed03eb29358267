"""Task data: Nucleotide Transformer FASTA/CSV folders, BEND-style BED +
reference extraction, dev carving, class-imbalance reports, and errors
naming the file and the line."""

import numpy as np
import pytest

from hybridna_jax import tokenizer
from hybridna_jax.data import fasta
from hybridna_jax.finetune import datasets
from hybridna_jax.finetune.datasets import TaskFormatError


def _nt_fasta(path, records):
  fasta.write_fasta(path, [(f"{name}|{label}", seq) for name, seq, label in records])


def test_nt_fasta_folder_with_dev_carved_from_train(tmp_path):
  rng = np.random.default_rng(0)
  train = [
    (f"chr1:{i}-{i + 12}", "".join(rng.choice(list("ACGT"), 12)), int(i % 4 == 0))
    for i in range(40)
  ]  # 10 of class 1, 30 of class 0
  _nt_fasta(tmp_path / "train.fna", train)
  _nt_fasta(tmp_path / "test.fna", [("a", "ACGTNRY", 0), ("b", "acgtac", 1)])
  data = datasets.load_task(str(tmp_path), dev_fraction=0.2, split_seed=3)
  assert data.format == "nt" and data.dev_from_train and data.kind == "classification"
  assert data.splits["test"].sequences == ["ACGTNNN", "ACGTAC"]
  train_seqs, dev_seqs = data.splits["train"].sequences, data.splits["dev"].sequences
  # Stratified: 20% of each class; together exactly the training file.
  np.testing.assert_array_equal(data.class_counts("dev"), [6, 2])
  np.testing.assert_array_equal(data.class_counts("train"), [24, 8])
  assert sorted(train_seqs + dev_seqs) == sorted(s for _, s, _ in train)
  again = datasets.load_task(str(tmp_path), dev_fraction=0.2, split_seed=3)
  assert again.splits["dev"].sequences == dev_seqs  # seeded
  report = data.report()
  assert "class 0" not in report and "0: 24 (75.0%), 1: 8 (25.0%)" in report
  assert "imbalance 3.00x" in report
  assert any("imbalanced 3.0x" in w and "class_weights='balanced'" in w for w in data.warnings())


def test_nt_csv_layout_and_regression(tmp_path):
  (tmp_path / "train.csv").write_text(
    "sequence,name,label\nACGT,x,0.5\nGGCC,y,1.5\nTTAA,z,2\nCCGG,w,3.25\n"
  )
  (tmp_path / "test.csv").write_text("sequence,name,label\nACGT,t,1\n")
  data = datasets.load_task(str(tmp_path), dev_fraction=0.25)
  assert data.format == "nt" and data.kind == "regression"
  assert all(s.labels.dtype == np.float32 for s in data.splits.values())
  assert len(data.splits["dev"].sequences) == 1 and len(data.splits["train"].sequences) == 3
  assert "labels mean" in data.report()


def test_regression_with_whole_number_targets(tmp_path):
  """kind='regression' settles the kind before the dev split is carved: whole
  numbers (negative ones too) are targets, not class ids, so dev is a
  dev_fraction share of train, not one of each value (review: every value
  once was refused, twice sent half of train to dev)."""
  rng = np.random.default_rng(0)
  values = np.repeat(np.arange(-50, 50), 2)  # each value twice
  rows = "".join(f"{''.join(rng.choice(list('ACGT'), 20))},{v}\n" for v in values)
  (tmp_path / "train.csv").write_text("sequence,label\n" + rows)
  (tmp_path / "test.csv").write_text("sequence,label\nACGTACGT,-3\nGGCCAATT,7\n")
  data = datasets.load_task(str(tmp_path), kind="regression", dev_fraction=0.1, log=False)
  assert data.kind == "regression"
  assert len(data.splits["dev"].sequences) == 20 and len(data.splits["train"].sequences) == 180
  np.testing.assert_array_equal(data.splits["test"].labels, [-3.0, 7.0])
  with pytest.raises(ValueError, match=r"class label -50.*finetune.kind='regression'"):
    datasets.load_task(str(tmp_path), kind="auto", log=False)


def test_csv_sequences_read_like_fasta(tmp_path):
  """U as T and IUPAC codes as N, as FASTA and BED read them: the GC baseline
  and the train/test overlap warning see what the model sees."""
  (tmp_path / "train.csv").write_text(
    "sequence,label\nGCGCUUUU,0\ngcauauau,1\nGGGGCCCU,0\nAUAUAUGC,1\n"
  )
  (tmp_path / "dev.csv").write_text("sequence,label\nACGUACGU,0\nUUUUAAAA,1\n")
  (tmp_path / "test.csv").write_text("sequence,label\nGCGCTTTT,0\nGGRYAAAA,1\n")
  data = datasets.load_task(str(tmp_path), log=False)
  assert data.splits["train"].sequences == ["GCGCTTTT", "GCATATAT", "GGGGCCCT", "ATATATGC"]
  assert data.splits["test"].sequences == ["GCGCTTTT", "GGNNAAAA"]
  assert any("1 distinct sequence(s) are in both train and test" in w for w in data.warnings())


def test_nt_fasta_errors_name_file_and_line(tmp_path):
  (tmp_path / "train.fna").write_text(">s1|0\nACGT\n>s2\nACGT\n")
  (tmp_path / "test.fna").write_text(">s1|0\nACGT\n")
  with pytest.raises(TaskFormatError, match=r"train.fna line 3: header '>s2' has no '\|<label>'"):
    datasets.load_task(str(tmp_path))
  (tmp_path / "train.fna").write_text(">s1|0\nACGT\n>s2|dog\nACGT\n")
  with pytest.raises(TaskFormatError, match=r"train.fna line 3: label 'dog' is not a number"):
    datasets.load_task(str(tmp_path))
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ValueError, match="not a task folder. Expected train.csv, dev.csv"):
    datasets.load_task(str(empty))


@pytest.fixture
def genome(tmp_path):
  rng = np.random.default_rng(1)
  chroms = {
    "chr1": "".join(rng.choice(list("ACGT"), 300)),
    "chr2": "".join(rng.choice(list("ACGT"), 120)),
  }
  path = tmp_path / "ref.fa.gz"
  fasta.write_fasta(path, list(chroms.items()), compress="gzip")
  return str(path), chroms


def test_bed_extraction_strands_and_splits(tmp_path, genome):
  ref, chroms = genome
  bed = tmp_path / "task.bed"
  bed.write_text(
    "chromosome\tstart\tend\tstrand\tsplit\tlabel\n"
    "chr1\t10\t30\t+\ttrain\t1\n"
    "chr2\t100\t120\t-\ttrain\t0\n"
    "chr1\t0\t5\t+\tvalid\t0\n"
    "chr2\t0\t7\t.\ttest\t1\n"
  )
  data = datasets.load_task(str(bed), reference=ref)
  assert data.format == "bed" and data.name == "task" and not data.dev_from_train
  assert data.splits["train"].sequences == [
    chroms["chr1"][10:30],
    tokenizer.reverse_complement(chroms["chr2"][100:120]),
  ]
  assert data.splits["dev"].sequences == [chroms["chr1"][:5]]
  assert data.splits["test"].sequences == [chroms["chr2"][:7]]
  np.testing.assert_array_equal(data.splits["train"].labels, [1, 0])
  # Header-less BEND order: chrom, start, end, split, label (dev carved).
  plain = tmp_path / "plain.bed"
  plain.write_text(
    "".join(f"chr1\t{i}\t{i + 10}\ttrain\t{i % 2}\n" for i in range(20)) + "chr2\t5\t15\ttest\t1\n"
  )
  data = datasets.load_task(str(plain), reference=ref, dev_fraction=0.2)
  assert data.dev_from_train and len(data.splits["dev"].sequences) == 4


def test_bed_header_with_ucsc_column_names(tmp_path, genome):
  ref, chroms = genome
  bed = tmp_path / "ucsc.bed"
  bed.write_text(
    "chrom\tchromStart\tchromEnd\tsplit\tlabel\n"
    "chr1\t10\t30\ttrain\t1\nchr1\t40\t60\ttrain\t0\nchr1\t0\t5\tvalid\t0\n"
    "chr2\t0\t7\ttest\t1\n"
  )
  data = datasets.load_task(str(bed), reference=ref)  # the header is not read as data
  assert data.splits["train"].sequences == [chroms["chr1"][10:30], chroms["chr1"][40:60]]
  assert data.splits["test"].sequences == [chroms["chr2"][:7]]


@pytest.mark.parametrize(
  "row, message",
  [
    ("chr1\t290\t310\t+\ttrain\t1", "runs past the end of chr1 (300 nt"),
    ("chrX\t0\t10\t+\ttrain\t1", "chromosome 'chrX' is not in"),
    ("chr1\t10\t10\t+\ttrain\t1", "interval [10, 10) is empty"),
    ("chr1\t10\tx\t+\ttrain\t1", "are not integers"),
    ("chr1\t10\t20\t+\tholdout\t1", "split 'holdout' is not one of"),
    ("chr1\t10\t20\t*\ttrain\t1", "strand '*'"),
  ],
)
def test_bed_errors_name_file_and_line(tmp_path, genome, row, message):
  ref, _ = genome
  bed = tmp_path / "bad.bed"
  bed.write_text(
    "chromosome\tstart\tend\tstrand\tsplit\tlabel\n"
    "chr1\t0\t10\t+\ttrain\t0\n" + row + "\nchr1\t0\t10\t+\ttest\t0\n"
  )
  with pytest.raises(TaskFormatError) as e:
    datasets.load_task(str(bed), reference=ref)
  assert str(e.value).startswith(f"{bed} line 3: ") and message in str(e.value)


def test_bed_needs_reference_and_label_column(tmp_path, genome):
  bed = tmp_path / "t.bed"
  bed.write_text("chromosome\tstart\tend\tsplit\nchr1\t0\t10\ttrain\n")
  with pytest.raises(ValueError, match="set finetune.reference"):
    datasets.load_task(str(bed))
  with pytest.raises(TaskFormatError, match="line 1: no 'label' column"):
    datasets.load_task(str(bed), reference=genome[0])


def test_carved_dev_never_takes_a_class_out_of_train():
  labels = np.array([0] * 9 + [1] * 2 + [2])  # class 2 has one example
  train = datasets.TaskSplit([f"s{i}" for i in range(labels.size)], labels)
  for fraction in (0.2, 0.6, 0.9):
    kept, dev = datasets.carve_dev(train, fraction, seed=0)
    assert set(kept.labels.tolist()) == {0, 1, 2}
    assert sorted(kept.sequences + dev.sequences) == sorted(train.sequences)
    assert 2 not in dev.labels and (dev.labels == 1).sum() == 1


def test_carved_dev_keeps_copies_of_a_sequence_together_and_warns_of_shared_ones(tmp_path):
  # 40 distinct sequences, each twice in train (and 5 of them in test too).
  rng = np.random.default_rng(0)
  seqs = ["".join(rng.choice(list("ACGT"), 12)) for _ in range(40)]
  rows = [(s, i % 2) for i, s in enumerate(seqs)] * 2
  (tmp_path / "train.csv").write_text("sequence,label\n" + "".join(f"{s},{y}\n" for s, y in rows))
  (tmp_path / "test.csv").write_text("sequence,label\n" + "".join(f"{s},1\n" for s in seqs[:5]))
  data = datasets.load_task(str(tmp_path), dev_fraction=0.25, log=False)
  train, dev = data.splits["train"].sequences, data.splits["dev"].sequences
  assert len(dev) == 20 and not set(dev) & set(train)  # 10 sequences, both copies each
  shared = [w for w in data.warnings() if "distinct sequence(s) are in both" in w]
  assert not any("train and dev" in w for w in shared)  # the copies stayed together
  assert sum(int(w.split(": ")[1].split()[0]) for w in shared) == 5  # the test rows
  assert all(w.endswith("test metrics are optimistic for them.") for w in shared)
  # Reverse complements count as copies (review): strand-symmetric features
  # and RC-averaged embeddings cannot tell them apart.
  rc = lambda s: s[::-1].translate(str.maketrans("ACGT", "TGCA"))  # noqa: E731
  rows = [(s, i % 2) for i, s in enumerate(seqs)] + [(rc(s), i % 2) for i, s in enumerate(seqs)]
  (tmp_path / "train.csv").write_text("sequence,label\n" + "".join(f"{s},{y}\n" for s, y in rows))
  data = datasets.load_task(str(tmp_path), dev_fraction=0.25, log=False)
  keys = {k: {datasets.strand_key(s) for s in data.splits[k].sequences} for k in ("train", "dev")}
  assert len(keys["dev"]) == 10 and not keys["dev"] & keys["train"]
  (tmp_path / "test.csv").write_text("sequence,label\n" + "".join(f"{rc(s)},1\n" for s in seqs[:3]))
  data = datasets.load_task(str(tmp_path), dev_fraction=0.25, log=False)
  data.splits["train"] = datasets.TaskSplit(seqs, np.arange(40) % 2)  # one strand only
  (shared,) = [w for w in data.warnings() if "are in both train and test" in w]
  assert "3 distinct sequence(s) are in both" in shared and "(3 as reverse complements)" in shared
  both = datasets.TaskSplit([seqs[0], rc(seqs[0])], np.array([0, 0]))  # each strand in each
  data.splits["train"] = data.splits["test"] = both
  (shared,) = [w for w in data.warnings() if "are in both train and test" in w]
  assert "1 distinct sequence(s) are in both train and test;" in shared
  # Too small to carve (one sequence per class): a clear error, not an empty dev.
  one_each = datasets.TaskSplit(["AC", "GT"], np.array([0, 1]))
  with pytest.raises(ValueError, match="tiny.bed: too few examples to carve a dev split"):
    datasets.carve_dev(one_each, 0.1, seed=0, path="tiny.bed")


def test_nt_csv_dev_by_any_of_its_names_and_one_class_refused(tmp_path):
  (tmp_path / "train.csv").write_text("sequence,label\nACGT,0\nGGCC,1\nTTAA,0\nCCGG,1\n")
  (tmp_path / "test.csv").write_text("sequence,label\nACGA,1\nACGC,0\n")
  (tmp_path / "valid.csv").write_text("sequence,label\nAAAA,0\nCCCC,1\n")
  data = datasets.load_task(str(tmp_path), log=False)
  assert data.splits["dev"].sequences == ["AAAA", "CCCC"] and not data.dev_from_train
  assert len(data.splits["train"].sequences) == 4
  for name in ("train", "test", "valid"):
    path = tmp_path / f"{name}.csv"
    path.write_text(path.read_text().replace(",1\n", ",0\n"))
  with pytest.raises(ValueError, match=r"classification needs at least 2 classes, but every label"):
    datasets.load_task(str(tmp_path), log=False)
