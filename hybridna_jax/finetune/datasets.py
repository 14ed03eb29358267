"""Understanding-task data: GUE folders, Nucleotide Transformer tasks and
BEND-style BED files, loaded into one `TaskData` with train/dev/test splits.

    data = load_task("GUE/prom/prom_300_all")                  # GUE
    data = load_task("nt_tasks/promoter_all")                  # NT
    data = load_task("bend/enhancers.bed", reference="GRCh38.fa")
    print(data.report())        # sizes, lengths, class balance

Layouts (`format="auto"` tells them apart):

* GUE: a folder with train.csv, dev.csv and test.csv, columns
  `sequence,label` (`hybridna_jax.data.tasks`).
* Nucleotide Transformer downstream tasks: a folder with train and test
  FASTA files (train.fna / test.fna as the public release ships them, or
  .fa / .fasta, optionally compressed) whose record names end in
  `|<label>` (">chr1:100-400|1"), or the same splits as CSV files
  (`sequence,label`, extra columns such as `name` ignored), as exported
  from the Hugging Face copy. An optional dev file is used when present.
* BEND-style: a tab-separated BED file with a header line naming the
  columns `chromosome` (or `chrom`), `start` (or `chromStart`), `end` (or
  `chromEnd`), `split` and `label`, and optionally `strand` (a header-less
  file is read as chrom, start, end, split, label), plus a reference FASTA.
  Coordinates are 0-based, end-exclusive; `-` strand rows are
  reverse-complemented; split values are train, valid / val / validation /
  dev, and test.

Tasks without a dev split get one from train: `dev_fraction` of each class,
chosen by a seeded shuffle. Labels are integer class ids (classification) or
numbers (regression). Every format error names the file and the line.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable

import numpy as np
from absl import logging

from hybridna_jax import tokenizer
from hybridna_jax.config import TASK_FORMATS
from hybridna_jax.data import fasta as fasta_lib
from hybridna_jax.data import tasks as tasks_lib
from hybridna_jax.data import textfiles
from hybridna_jax.data.tasks import TaskFormatError, TaskSplit, parse_labels

SPLITS = ("train", "dev", "test")
_COMPRESSED_SUFFIXES = ("",) + fasta_lib.COMPRESSION_SUFFIXES
_DEV_NAMES = {
  "dev": "dev",
  "valid": "dev",
  "val": "dev",
  "validation": "dev",
  "train": "train",
  "test": "test",
}
# Imbalance (largest / smallest class of a split) above this gets a warning.
IMBALANCE_WARNING = 3.0


@dataclasses.dataclass
class TaskData:
  """A loaded task.

  Attributes:
    name: a short name (the folder or file name).
    path: where it was loaded from.
    format: "gue", "nt" or "bed".
    splits: {"train", "dev", "test"} -> TaskSplit(sequences, labels).
    dev_from_train: whether dev was carved out of the training file.
  """

  name: str
  path: str
  format: str
  splits: dict[str, TaskSplit]
  dev_from_train: bool = False

  @property
  def kind(self) -> str:
    """ "classification" (integer labels) or "regression"."""
    return (
      "classification"
      if all(s.labels.dtype.kind == "i" for s in self.splits.values())
      else "regression"
    )

  @property
  def num_classes(self) -> int:
    return tasks_lib.num_classes(self.splits)

  def class_counts(self, split: str) -> np.ndarray:
    return np.bincount(self.splits[split].labels, minlength=self.num_classes)

  def summary(self) -> dict:
    """Sizes, sequence lengths and label balance of every split (JSON-able)."""
    out = {
      "name": self.name,
      "path": self.path,
      "format": self.format,
      "kind": self.kind,
      "dev_from_train": self.dev_from_train,
      "splits": {},
    }
    if self.kind == "classification":
      out["num_classes"] = self.num_classes
    for split, data in self.splits.items():
      lengths = np.array([len(s) for s in data.sequences])
      entry = {
        "examples": len(data.sequences),
        "length_min": int(lengths.min()),
        "length_mean": float(lengths.mean()),
        "length_max": int(lengths.max()),
      }
      if self.kind == "classification":
        counts = self.class_counts(split)
        present = counts[counts > 0]
        entry["class_counts"] = counts.tolist()
        entry["majority_fraction"] = float(counts.max() / counts.sum())
        entry["imbalance_ratio"] = float(present.max() / present.min())
      else:
        labels = data.labels.astype(np.float64)
        entry.update(
          label_mean=float(labels.mean()),
          label_std=float(labels.std()),
          label_min=float(labels.min()),
          label_max=float(labels.max()),
        )
      out["splits"][split] = entry
    return out

  def report(self) -> str:
    """A readable account of the splits, with class imbalance."""
    summary = self.summary()
    head = (
      f"task {self.name} ({self.format}, {self.kind}"
      + (f", {self.num_classes} classes" if self.kind == "classification" else "")
      + (", dev carved from train" if self.dev_from_train else "")
      + ")"
    )
    lines = [head]
    for split, entry in summary["splits"].items():
      text = (
        f"  {split:5s} {entry['examples']:7,d} sequences, length "
        f"{entry['length_min']}-{entry['length_max']} (mean {entry['length_mean']:.0f})"
      )
      if self.kind == "classification":
        total = sum(entry["class_counts"])
        classes = ", ".join(
          f"{c}: {n:,} ({n / total:.1%})" for c, n in enumerate(entry["class_counts"])
        )
        text += (
          f"; classes {classes}; imbalance {entry['imbalance_ratio']:.2f}x, "
          f"majority-class accuracy {entry['majority_fraction']:.3f}"
        )
      else:
        text += (
          f"; labels mean {entry['label_mean']:.4g} sd {entry['label_std']:.4g} "
          f"range [{entry['label_min']:.4g}, {entry['label_max']:.4g}]"
        )
      lines.append(text)
    return "\n".join(lines)

  def warnings(self) -> list[str]:
    """Sequences shared between splits (leakage: the same sequence, or its
    reverse complement, which strand-symmetric features and RC-averaged
    embeddings cannot tell from it) and class-balance problems worth acting
    on."""
    out = []
    seen = {name: {strand_key(s) for s in split.sequences} for name, split in self.splits.items()}
    exact = {name: {s.upper() for s in split.sequences} for name, split in self.splits.items()}
    for a, b in (("train", "dev"), ("train", "test"), ("dev", "test")):
      if a not in seen or b not in seen:
        continue
      shared = len(seen[a] & seen[b])
      if shared:  # and of these, how many only as the other strand:
        as_rc = shared - len({strand_key(s) for s in exact[a] & exact[b]})
        out.append(
          f"{self.name}: {shared} distinct sequence(s) are in both {a} and {b}"
          + (f" ({as_rc} as reverse complements)" if as_rc else "")
          + f"; {b} metrics are optimistic for them."
        )
    if self.kind != "classification":
      return out
    for split in self.splits:
      counts = self.class_counts(split)
      missing = np.flatnonzero(counts == 0).tolist()
      if missing:
        out.append(f"{self.name}: {split} has no examples of class(es) {missing}.")
      present = counts[counts > 0]
      ratio = present.max() / present.min()
      if split == "train" and ratio >= IMBALANCE_WARNING:
        out.append(
          f"{self.name}: train classes are imbalanced {ratio:.1f}x (counts "
          f"{counts.tolist()}); consider finetune.class_weights='balanced'. "
          "MCC, F1 and AUPRC stay informative; accuracy does not."
        )
    return out


# -- format detection ----------------------------------------------------------------


def _find(folder: str, stem: str, suffixes: Iterable[str]) -> str | None:
  for suffix in suffixes:
    for compression in _COMPRESSED_SUFFIXES:
      path = os.path.join(folder, stem + suffix + compression)
      if os.path.isfile(path):
        return path
  return None


def _split_names(split: str) -> tuple[str, ...]:
  """File stems a split may have (dev: also valid, val, validation)."""
  return (split,) if split != "dev" else ("dev", "valid", "val", "validation")


def _fasta_split(folder: str, split: str) -> str | None:
  for name in _split_names(split):
    path = _find(folder, name, fasta_lib.FASTA_SUFFIXES)
    if path:
      return path
  return None


def detect_format(path: str) -> str:
  """ "gue", "nt" or "bed" for a task path; raises with what was expected."""
  if os.path.isfile(path):
    lowered = path.lower()
    if any(
      lowered.endswith(".bed" + c) or lowered.endswith(".tsv" + c) for c in _COMPRESSED_SUFFIXES
    ):
      return "bed"
    raise ValueError(
      f"{path}: a task file must be a BED file (.bed, .bed.gz or .tsv); "
      "GUE and Nucleotide Transformer tasks are folders."
    )
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such task folder or BED file.")
  has = lambda name: os.path.isfile(os.path.join(path, name))  # noqa: E731
  if has("train.csv") and has("dev.csv") and has("test.csv"):
    return "gue"
  if (has("train.csv") and has("test.csv")) or (
    _fasta_split(path, "train") and _fasta_split(path, "test")
  ):
    return "nt"
  raise ValueError(
    f"{path}: not a task folder. Expected train.csv, dev.csv and test.csv (GUE), "
    "train and test FASTA files with '>name|label' headers or train.csv and test.csv "
    f"(Nucleotide Transformer); found {sorted(os.listdir(path))[:10]}."
  )


# -- Nucleotide Transformer FASTA -------------------------------------------------------


def load_fasta_split(path: str) -> TaskSplit:
  """One NT-style FASTA file: records named "<anything>|<label>"."""
  sequences, raw, lines = [], [], []
  for header, tokens in fasta_lib.read_fasta(path):
    name, sep, label = header.name.rpartition("|")
    if not sep or not label:
      raise TaskFormatError(
        path,
        header.line,
        f"header '>{header.name}' has no "
        "'|<label>' at the end of its name; Nucleotide Transformer "
        "task records are named like '>chr1:100-400|1'.",
      )
    if tokens.size == 0:
      raise TaskFormatError(path, header.line, f"record '>{name}' has no sequence.")
    sequences.append(tokenizer.decode(tokens))
    raw.append(label)
    lines.append(header.line)
  if not sequences:
    raise TaskFormatError(path, None, "no records.")
  return TaskSplit(sequences, parse_labels(path, raw, lines))


def _load_nt(folder: str) -> tuple[dict[str, TaskSplit], bool]:
  splits = {}
  for split in SPLITS:
    csv_path = next(
      (
        os.path.join(folder, f"{name}.csv")
        for name in _split_names(split)
        if os.path.isfile(os.path.join(folder, f"{name}.csv"))
      ),
      None,
    )
    fasta_path = _fasta_split(folder, split)
    if csv_path:
      splits[split] = tasks_lib.load_csv_split(csv_path)
    elif fasta_path:
      splits[split] = load_fasta_split(fasta_path)
  return splits, "dev" not in splits


# -- BEND-style BED + reference ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BedRow:
  chrom: str
  start: int
  end: int
  strand: str
  split: str
  label: str
  line: int


_BED_ALIASES = {
  "chromosome": "chrom",
  "chrom": "chrom",
  "chr": "chrom",
  "#chrom": "chrom",
  "#chromosome": "chrom",
  "start": "start",
  "chromstart": "start",
  "end": "end",
  "chromend": "end",
  "strand": "strand",
  "split": "split",
  "label": "label",
}
_BED_DEFAULT_COLUMNS = ("chrom", "start", "end", "split", "label")


def read_bed(path: str) -> list[BedRow]:
  """Parses a BEND-style BED file (module docstring); validates each row."""
  rows: list[BedRow] = []
  columns = None
  for line_number, text in textfiles.text_lines(path):
    if not text.strip() or text.startswith(("track", "browser")):
      continue
    fields = text.split("\t") if "\t" in text else text.split()
    # Canonical column names, so a header naming e.g. chromStart / chromEnd
    # is recognised as one.
    named = tuple(_BED_ALIASES.get(x.strip().lower(), x.strip().lower()) for x in fields)
    if columns is None:
      if "start" in named and "end" in named:  # a header line
        columns = named
        missing = [c for c in ("chrom", "start", "end", "split") if c not in columns]
        if missing:
          raise TaskFormatError(
            path,
            line_number,
            f"header {fields} lacks column(s) "
            f"{missing}; BEND-style task files name chromosome, "
            "start, end, split and label (strand optional).",
          )
        if "label" not in columns:
          raise TaskFormatError(
            path,
            line_number,
            "no 'label' column; tasks whose "
            "labels live in a separate HDF5 file (multi-label BEND "
            "tasks) are not supported; add a label column.",
          )
        continue
      if text.startswith("#"):
        continue
      columns = _BED_DEFAULT_COLUMNS
      if len(fields) != len(columns):
        raise TaskFormatError(
          path,
          line_number,
          f"{len(fields)} columns and no header; "
          "a header-less task BED file has 5 columns: chromosome, "
          "start, end, split, label (add a header line otherwise).",
        )
    if text.startswith("#"):
      continue
    if len(fields) < len(columns):
      raise TaskFormatError(
        path, line_number, f"{len(fields)} columns, the header names {len(columns)}."
      )
    values = dict(zip(columns, (x.strip() for x in fields)))
    try:
      start, end = int(values["start"]), int(values["end"])
    except ValueError:
      raise TaskFormatError(
        path, line_number, f"start {values['start']!r} / end {values['end']!r} are not integers."
      ) from None
    if start < 0 or end <= start:
      raise TaskFormatError(
        path,
        line_number,
        f"interval [{start}, {end}) is empty or "
        "negative; BED coordinates are 0-based with end > start.",
      )
    split = _DEV_NAMES.get(values["split"].lower())
    if split is None:
      raise TaskFormatError(
        path,
        line_number,
        f"split {values['split']!r} is not one of train, valid (val, validation, dev) or test.",
      )
    strand = values.get("strand", "+") or "+"
    if strand not in ("+", "-", "."):
      raise TaskFormatError(path, line_number, f"strand {strand!r} is not '+', '-' or '.'.")
    rows.append(BedRow(values["chrom"], start, end, strand, split, values["label"], line_number))
  if not rows:
    raise TaskFormatError(path, None, "no intervals.")
  return rows


def read_chromosomes(reference: str, names: set[str]) -> dict[str, np.ndarray]:
  """uint8 tokens of the named records of a FASTA file (others are skipped
  while streaming, so a whole genome is never held for a few chromosomes)."""
  return {
    header.name: tokens
    for header, tokens in fasta_lib.iter_records(reference, keep=names.__contains__)
    if tokens is not None
  }


def _load_bed(path: str, reference: str) -> tuple[dict[str, TaskSplit], bool]:
  if not reference:
    raise ValueError(
      f"{path} is a BED task: set finetune.reference (--reference) to the "
      "reference genome FASTA its coordinates refer to."
    )
  if not os.path.isfile(reference):
    raise FileNotFoundError(f"reference genome {reference} not found (finetune.reference).")
  rows = read_bed(path)
  names = {r.chrom for r in rows}
  start = time.perf_counter()
  logging.info(
    "%s: %d intervals on %d chromosomes; reading them from %s",
    path,
    len(rows),
    len(names),
    reference,
  )
  chromosomes = read_chromosomes(reference, names)
  logging.info(
    "read %d chromosomes (%.0f Mb) in %.0f s",
    len(chromosomes),
    sum(c.size for c in chromosomes.values()) / 1e6,
    time.perf_counter() - start,
  )
  by_split: dict[str, tuple[list, list, list]] = {}
  for row in rows:
    genome = chromosomes.get(row.chrom)
    if genome is None:
      raise TaskFormatError(
        path,
        row.line,
        f"chromosome {row.chrom!r} is not in "
        f"{reference}; check that the BED file and the reference use "
        "the same names (e.g. 'chr1' vs '1').",
      )
    if row.end > genome.size:
      raise TaskFormatError(
        path,
        row.line,
        f"interval {row.chrom}:{row.start}-{row.end} "
        f"runs past the end of {row.chrom} ({genome.size:,} nt in "
        f"{reference}); is it the right assembly?",
      )
    tokens = genome[row.start : row.end]
    if row.strand == "-":
      tokens = tokenizer.reverse_complement_nucleotides(tokens)
    seqs, labels, lines = by_split.setdefault(row.split, ([], [], []))
    seqs.append(tokenizer.decode(tokens))
    labels.append(row.label)
    lines.append(row.line)
  splits = {
    s: TaskSplit(seqs, parse_labels(path, labels, lines))
    for s, (seqs, labels, lines) in by_split.items()
  }
  for split in ("train", "test"):
    if split not in splits:
      raise TaskFormatError(path, None, f"no rows with split '{split}'.")
  return splits, "dev" not in splits


# -- dev split and loading ---------------------------------------------------------------


_COMPLEMENT = str.maketrans("ACGT", "TGCA")


def strand_key(sequence: str) -> str:
  """The same key for a sequence and its reverse complement (upper case)."""
  sequence = sequence.upper()
  return min(sequence, sequence.translate(_COMPLEMENT)[::-1])


def carve_dev(
  train: TaskSplit, fraction: float, seed: int, path: str = "train"
) -> tuple[TaskSplit, TaskSplit]:
  """(train, dev): `fraction` of each class of train (of all examples for
  regression), at least one per class with two or more distinct sequences;
  a class's only sequence stays in train. Copies of a sequence, on either
  strand (`strand_key`), go to the same side, so dev never holds a sequence
  train has."""
  if not 0.0 < fraction < 1.0:
    raise ValueError(
      f"finetune.dev_fraction must be in (0, 1) for a task without a dev split, got {fraction}."
    )
  labels = train.labels
  rng = np.random.default_rng(seed)
  # Rows by sequence; a sequence counts in the class of its first row.
  _, first, copy_of = np.unique(
    np.asarray([strand_key(s) for s in train.sequences], dtype=object),
    return_index=True,
    return_inverse=True,
  )
  if labels.dtype.kind == "i":
    groups = [first[labels[first] == c] for c in np.unique(labels[first])]
  else:
    groups = [first]
  dev = []
  for group in groups:
    take = min(max(int(round(fraction * group.size)), 1), group.size - 1)
    dev.extend(rng.permutation(np.sort(group))[:take].tolist())
  is_dev = np.isin(first[copy_of], dev)
  if not is_dev.any():
    raise ValueError(
      f"{path}: too few examples to carve a dev split from train (no class has two distinct "
      "sequences); add a dev split to the task."
    )

  def subset(mask):
    idx = np.flatnonzero(mask)
    return TaskSplit([train.sequences[i] for i in idx], labels[idx])

  return subset(~is_dev), subset(is_dev)


def _unify_label_dtypes(splits: dict[str, TaskSplit], path: str) -> dict[str, TaskSplit]:
  """A task whose labels are integers in one split and fractional in another
  is a regression task throughout."""
  if all(s.labels.dtype.kind == "i" for s in splits.values()):
    for name, s in splits.items():
      if s.labels.min() < 0:
        raise ValueError(
          f"{path}: {name} split has class label {int(s.labels.min())}; "
          "class labels are 0, 1, ..., (number of classes - 1); for numeric targets set "
          "finetune.kind='regression'."
        )
    return splits
  return {k: TaskSplit(v.sequences, v.labels.astype(np.float32)) for k, v in splits.items()}


def _check_kind_is_clear(splits: dict[str, TaskSplit], path: str) -> None:
  """With finetune.kind='auto': refuses labels that look like class ids
  but include a few non-integers (e.g. one 1.0 or 0.5 among 0/1), which
  would silently turn classification into regression."""
  values = [(name, np.asarray(s.labels, np.float64)) for name, s in splits.items()]
  if all(s.labels.dtype.kind == "i" for s in splits.values()):
    return
  flat = np.concatenate([v for _, v in values])
  integral = np.isfinite(flat) & (flat == np.round(flat))
  if integral.mean() < 0.9:
    return  # numbers: a regression task
  floats = [name for name, s in splits.items() if s.labels.dtype.kind != "i"]
  where = f"the {floats[0]} split"
  for name, v in values:
    bad = np.flatnonzero(~(np.isfinite(v) & (v == np.round(v))))
    if bad.size:
      where = f"example {bad[0] + 1} of the {name} split has label {v[bad[0]]:g}"
      break
  raise ValueError(
    f"{path}: labels look like class ids ({int(integral.sum())} of {flat.size} are whole "
    f"numbers), but {where} and labels of {', '.join(floats)} are written as decimals "
    "(e.g. 1.0 or 0.5); set finetune.kind='classification' and write integer labels, or "
    "finetune.kind='regression' if the labels are numbers."
  )


def load_task(
  path: str,
  *,
  format: str = "auto",
  reference: str = "",  # pylint: disable=redefined-builtin
  dev_fraction: float = 0.1,
  split_seed: int = 0,
  kind: str = "auto",
  name: str | None = None,
  log: bool = True,
) -> TaskData:
  """Loads a task in any supported layout (module docstring).

  Args:
    path: task folder or BED file.
    format: "auto", "gue", "nt" or "bed".
    reference: the reference FASTA (BED tasks).
    dev_fraction, split_seed: the dev split carved from train when absent.
    kind: "auto", "classification" or "regression" (regression turns class
      ids into numbers; classification requires integer labels).
    name: the task name (default: the folder or file name).
    log: log the split report and imbalance warnings.
  """
  path = os.path.normpath(os.fspath(path))
  if format not in TASK_FORMATS:
    raise ValueError(f"finetune.format must be one of {TASK_FORMATS}, got {format!r}.")
  fmt = detect_format(path) if format == "auto" else format
  if fmt == "gue":
    splits, missing_dev = tasks_lib.load_csv_task(path), False
  elif fmt == "nt":
    splits, missing_dev = _load_nt(path)
    for split in ("train", "test"):
      if split not in splits:
        raise FileNotFoundError(
          f"{path}: no {split} split ({split}.fna / .fa / .fasta or {split}.csv)."
        )
  else:
    splits, missing_dev = _load_bed(path, reference)
  if kind not in ("auto", "classification", "regression"):
    raise ValueError(f"finetune.kind must be auto, classification or regression, got {kind!r}.")
  # The kind is settled before a dev split is carved: a regression task's
  # is a random share of train, a classification task's a share of each class.
  if kind == "regression":  # whole numbers too (negative ones included)
    splits = {k: TaskSplit(v.sequences, v.labels.astype(np.float32)) for k, v in splits.items()}
  else:
    if kind == "auto":
      _check_kind_is_clear(splits, path)
    splits = _unify_label_dtypes(splits, path)
    if kind == "classification" and any(v.labels.dtype.kind != "i" for v in splits.values()):
      raise ValueError(
        f"{path}: finetune.kind='classification' but some labels are not "
        "integers; use kind='regression' or 'auto'."
      )
  if missing_dev:
    splits["train"], splits["dev"] = carve_dev(splits["train"], dev_fraction, split_seed, path)
  splits = {s: splits[s] for s in SPLITS}
  if all(v.labels.dtype.kind == "i" for v in splits.values()):
    classes = np.unique(np.concatenate([v.labels for v in splits.values()]))
    if classes.size < 2:
      raise ValueError(
        f"{path}: classification needs at least 2 classes, but every label is "
        f"{int(classes[0])}; check the label column (or finetune.kind='regression')."
      )
    trained = np.unique(splits["train"].labels)
    if trained.size < 2:
      # Nothing to learn: the model and the baselines would fit one class.
      raise ValueError(
        f"{path}: the train split holds only class {int(trained[0])} (of {classes.tolist()}); "
        "classification needs at least 2 classes in train: check how the splits were made."
      )
  base = os.path.basename(path)
  for suffix in (".gz", ".bed", ".tsv"):
    base = base[: -len(suffix)] if base.endswith(suffix) else base
  data = TaskData(name or base, path, fmt, splits, missing_dev)
  if log:
    logging.info("%s", data.report())
    for warning in data.warnings():
      logging.warning("%s", warning)
  return data


def load_config_task(fc, name: str | None = None) -> TaskData:
  """The task of a `finetune` config section (task, format, reference,
  dev_fraction, split_seed, kind)."""
  if not fc.task:
    raise ValueError(
      "no task: set finetune.task (--task) to a GUE or Nucleotide Transformer folder or a BED file."
    )
  return load_task(
    str(fc.task),
    format=str(fc.format),
    reference=str(fc.reference),
    dev_fraction=float(fc.dev_fraction),
    split_seed=int(fc.split_seed),
    kind=str(fc.kind),
    name=name,
  )
