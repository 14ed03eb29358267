"""Default data configuration, mounted by the job configs as `config.data`."""

from __future__ import annotations

import ml_collections


def default_data_config() -> ml_collections.ConfigDict:
  """Every data field with its default; see the comment on each field."""
  c = ml_collections.ConfigDict()

  # --- Preparation: FASTA -> token store (launch/prepare_data.py) ---------
  # Glob patterns of the FASTA inputs (plain, gzip, bgzip, xz or bzip2,
  # detected from the bytes); `**` recurses. Relative paths are relative to
  # the current directory. Every pattern must match at least one file.
  c.fasta_globs = ()
  # How a record's source (genome / strain / species) is named:
  #   "file":   the file name without FASTA and compression extensions
  #             (one genome per file, e.g. GRCh38.fa.gz -> GRCh38);
  #   "dir":    the name of the file's directory (a genome split over
  #             several files, e.g. human/chr1.fa -> human);
  #   "record": every record is its own source.
  c.source_from = "file"
  # Token store directory: written by prepare_data, read by the pipeline and
  # by eval/scoring. Relative to the current directory.
  c.store_dir = ""
  # Replace an existing store prepared from other inputs (an identical one is
  # always re-used as is).
  c.overwrite_store = False
  # Skip records whose header has no sequence (with a warning) instead of
  # failing on them.
  c.allow_empty_records = False
  # Decompressed bytes read and encoded at a time; bounds preparation memory
  # (a few times this) whatever the genome size.
  c.prepare_block_bytes = 16 << 20
  # Seconds between progress reports while preparing.
  c.progress_seconds = 10.0

  # Train/validation split, by whole sources or whole records, so that the
  # two never overlap. A record goes to validation when any rule selects it.
  c.split = ml_collections.ConfigDict()
  # Sources held out for validation: names or fnmatch patterns ("E_coli_*");
  # each must match a source.
  c.split.val_sources = ()
  # Records held out for validation: names or fnmatch patterns of record
  # names (any source); each must match a record.
  c.split.val_records = ()
  # A held-out fraction, of sources or of records (see split_by), chosen by
  # a seeded hash of the names, so it is stable when inputs are added.
  c.split.val_fraction = 0.0
  # Unit of val_fraction: "source" (whole genomes) or "record".
  c.split.split_by = "source"
  # Seed of the val_fraction choice.
  c.split.seed = 0

  # --- Windows ---------------------------------------------------------
  # Split the training iterator reads.
  c.train_split = "train"
  # Start-to-start distance of training windows in tokens; 0 means seq_len
  # (non-overlapping). Windows are read as seq_len + 1 tokens.
  c.window_stride = 0
  # Training windows run through the concatenated records of a source and
  # may cross record boundaries; segment ids keep documents apart. Without
  # packing, a window stays in one record and short records are padded.
  c.packing = True
  # The same for evaluation windows (each target token is still scored
  # exactly once); off by default so that eval numbers do not depend on it.
  c.eval_packing = False
  # Evaluate on at most this many windows, spread evenly over the split so
  # that every record is sampled (0: every window, the whole split).
  c.eval_max_windows = 0
  # Training windows whose fraction of N (unknown base) tokens is above this
  # are skipped (1.0 keeps every window).
  c.max_n_fraction = 0.5
  # Leave N targets out of the loss (loss_mask 0).
  c.mask_n_in_loss = True
  # Probability of reverse-complementing a training window (0 disables).
  c.reverse_complement_prob = 0.5

  # --- Sampling across sources ------------------------------------------
  # Sources are sampled with probability proportional to
  # (training tokens of the source) ** (1 / temperature): 1.0 samples every
  # window equally often, larger values flatten towards uniform over
  # sources, so one huge genome does not drown the rest.
  c.source_temperature = 1.0
  # Extra multipliers on top of the temperature: "pattern=weight" strings
  # with fnmatch patterns over source names, e.g. ("GRCh38=0.5", "E_*=2").
  # A weight of 0 drops the source from training.
  c.source_weights = ()

  # --- Performance -------------------------------------------------------
  # Grain worker processes per host (0: read in the main process).
  c.num_workers = 0
  # Grain reader threads per process. 0 is fastest from the page cache (the
  # work is short numpy calls that contend for the GIL; see
  # benchmarks/RESULTS.md); raise it when the store sits on slow or remote
  # storage, where threads overlap the waits.
  c.read_threads = 0
  # Windows buffered ahead per process; 0 picks about two batches.
  c.prefetch_buffer_size = 0
  return c
