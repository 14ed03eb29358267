"""The data section of the job config (`config.data`): one typed definition,
`DataConfig`, with every field's default and meaning."""

from __future__ import annotations

import dataclasses

import ml_collections

from hybridna_jax.sections import Section, field

SOURCE_FROM = ("file", "dir", "record")  # data.source_from
SPLIT_BY = ("source", "record")  # data.split.split_by


@dataclasses.dataclass(frozen=True)
class SplitConfig(Section):
  """Train/validation split, by whole sources or whole records, so that the
  two never overlap. A record goes to validation when any rule selects it."""

  SECTION = "data.split"
  # Sources held out for validation: names or fnmatch patterns ("E_coli_*");
  # each must match a source.
  val_sources: tuple[str, ...] = ()
  # Records held out for validation: names or fnmatch patterns of record
  # names (any source); each must match a record.
  val_records: tuple[str, ...] = ()
  # A held-out fraction, of sources or of records (see split_by): each is
  # held out when a seeded hash of its name is below the fraction, so it is
  # stable when inputs are added (by source: at least one source is held
  # out and one kept, by rank, when the hash picks none or all).
  val_fraction: float = 0.0
  # Unit of val_fraction: "source" (whole genomes) or "record".
  split_by: str = field("source", choices=SPLIT_BY)
  # Seed of the val_fraction choice.
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class DataConfig(Section):
  """Every data field with its default; see the comment on each field."""

  SECTION = "data"

  # --- Preparation: FASTA -> token store (launch/prepare_data.py) ---------
  # Glob patterns of the FASTA inputs (plain, gzip, bgzip, xz or bzip2,
  # detected from the bytes); `**` recurses. Local paths (relative to the
  # current directory), file:// URLs or gs:// objects (needs gcsfs). Every
  # pattern must match at least one file.
  fasta_globs: tuple[str, ...] = ()
  # How a record's source (genome / strain / species) is named:
  #   "file":   the file name without FASTA and compression extensions
  #             (one genome per file, e.g. GRCh38.fa.gz -> GRCh38);
  #   "dir":    the name of the file's directory (a genome split over
  #             several files, e.g. human/chr1.fa -> human);
  #   "record": every record is its own source.
  source_from: str = field("file", choices=SOURCE_FROM)
  # Token store directory: written by prepare_data, read by the pipeline and
  # by eval/scoring. Relative to the current directory.
  store_dir: str = ""
  # Replace an existing store prepared from other inputs (an identical one is
  # always re-used as is).
  overwrite_store: bool = False
  # Skip records whose header has no sequence (with a warning) instead of
  # failing on them.
  allow_empty_records: bool = False
  # Decompressed bytes read and encoded at a time; bounds preparation memory
  # (a few times this) whatever the genome size.
  prepare_block_bytes: int = 16 << 20
  # Seconds between progress reports while preparing.
  progress_seconds: float = 10.0
  split: SplitConfig = dataclasses.field(default_factory=SplitConfig)

  # --- Windows ---------------------------------------------------------
  # Split the training iterator reads.
  train_split: str = "train"
  # Start-to-start distance of training windows in tokens; 0 means seq_len
  # (non-overlapping). Windows are read as seq_len + 1 tokens.
  window_stride: int = 0
  # Training windows run through the concatenated records of a source and
  # may cross record boundaries; segment ids keep documents apart. Without
  # packing, a window stays in one record and short records are padded.
  packing: bool = True
  # The same for evaluation windows (each target token is still scored
  # exactly once); off by default so that eval numbers do not depend on it.
  eval_packing: bool = False
  # Evaluate on at most this many windows, spread evenly over the split so
  # that every record is sampled (0: every window, the whole split).
  eval_max_windows: int = 0
  # Training windows whose fraction of N (unknown base) tokens is above this
  # are skipped (1.0 keeps every window).
  max_n_fraction: float = 0.5
  # Leave N targets out of the loss (loss_mask 0).
  mask_n_in_loss: bool = True
  # Probability of reverse-complementing a training window (0 disables).
  reverse_complement_prob: float = 0.5

  # --- Sampling across sources ------------------------------------------
  # Sources are sampled with probability proportional to
  # (training tokens of the source) ** (1 / temperature): 1.0 samples every
  # window equally often, larger values flatten towards uniform over
  # sources, so one huge genome does not drown the rest.
  source_temperature: float = 1.0
  # Extra multipliers on top of the temperature: "pattern=weight" strings
  # with fnmatch patterns over source names, e.g. ("GRCh38=0.5", "E_*=2").
  # A weight of 0 drops the source from training.
  source_weights: tuple[str, ...] = ()

  # --- Performance -------------------------------------------------------
  # Grain worker processes per host (0: read in the main process); each
  # reads whole batches, so the batches are the same for any count, and a
  # run may resume with another count.
  num_workers: int = 0
  # Grain reader threads per process, each reading whole batches (training
  # and evaluation), so up to this many batches' reads are in flight at
  # once; the batches are the same for any count. 0 is fastest from the page
  # cache (the work is short numpy calls that contend for the GIL; see
  # benchmarks/RESULTS.md); raise it when the store sits on slow or remote
  # storage, where threads overlap the waits.
  read_threads: int = 0
  # Windows buffered ahead per process (with read_threads > 0), rounded up to
  # whole batches and at least one batch per reader thread; 0 picks about
  # two batches.
  prefetch_buffer_size: int = 0

  def __post_init__(self):
    # `not low <= value` also refuses NaN (which would turn a filter off).
    for name in (
      "window_stride",
      "eval_max_windows",
      "num_workers",
      "read_threads",
      "prefetch_buffer_size",
    ):
      if not getattr(self, name) >= 0:
        raise ValueError(f"config.data.{name} must be >= 0, got {getattr(self, name)}.")
    for name in ("max_n_fraction", "reverse_complement_prob"):
      if not 0 <= getattr(self, name) <= 1:
        raise ValueError(
          f"config.data.{name} must be in [0, 1] (a fraction), got {getattr(self, name)}."
        )


def default_data_config() -> ml_collections.ConfigDict:
  """`config.data` with every field at its default (DataConfig)."""
  return DataConfig.config_dict()
