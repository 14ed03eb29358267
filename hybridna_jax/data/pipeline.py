"""Grain pipeline: token-store windows -> training and evaluation batches.

This module assembles the datasets from the pieces in
  `windows`    a split's windows: where they are (`WindowIndex`), reading
               them (`WindowReader`, `ReadBatch`) and making them batch
               dicts (`MakeBatch`; its module docstring lists the arrays);
  `sampling`   which window each position of the training stream holds
               (`WindowSampler`, `NotMostlyN`) and the source weights;
  `store`      the token store they are read from.

Batches are dicts of numpy arrays, B = rows on this host, L = seq_len (or
the width of this host's columns): inputs, targets, segment_ids and
loss_mask, each (B, L).

Training stream (`train_dataset`), all deterministic for a seed. Position
g of an infinite global stream becomes a window (`sampling.WindowSampler`).
Global batch t of B rows is positions t * B ... t * B + B - 1. With a batch
layout (`train_batches(rows=, columns=)`, from `sharding.BatchLayout`) a
host reads exactly the rows its devices hold, and with the context axis
across hosts only its columns of each window; hosts holding the same rows
read the same positions, and the global batches do not depend on the
layout. Without one, host h of H takes positions h, h + H, ... (per-host
batches). The stream's elements are whole batches, each read at once
(`windows.ReadBatch`), optionally by data.read_threads threads (several
batches in flight) and in data.num_workers worker processes.
Since every batch is a pure function of (seed, t), a stream resumes at any
global batch (`train_batches(start_batch=t)`) under any layout, host count
or worker count: the training loop restarts a stage's stream at the batch
of its step, and checkpoints keep no iterator state. The iterator is also a
`grain.DatasetIterator` (`get_state()`/`set_state()`).

Evaluation (`eval_batches`): every record of a split in consecutive,
non-overlapping windows (each target token scored exactly once), the last
one of each record padded, no augmentation, no skipping; the windows are
dealt round-robin to hosts, and every host gets the same number of batches
(padded with empty rows, loss_mask 0) so collective eval steps line up.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import grain
import numpy as np
from absl import flags

from hybridna_jax.data import sampling, windows
from hybridna_jax.data import store as store_lib


def _read_options(data_cfg, batch_size: int) -> grain.ReadOptions:
  """Grain's read options for a dataset of whole batches of `batch_size` rows:
  data.read_threads threads each read whole batches, and the buffer holds
  data.prefetch_buffer_size windows (0: about two batches) ahead, rounded up
  to whole batches and at least one batch per thread (a thread without a
  buffer slot would sit idle)."""
  threads = int(data_cfg.read_threads)
  windows_ahead = int(data_cfg.prefetch_buffer_size) or max(2 * batch_size, 16)
  buffer = max(1, -(-windows_ahead // batch_size), threads)
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer)


def host_positions(shard_index: int = 0, shard_count: int = 1, skip: int = 0) -> grain.MapDataset:
  """Host h of H's share of an infinite global stream: positions h, h + H, ...,
  from its `skip`-th on.

  The training streams map a global position to an example, so what each
  position holds does not depend on the host count.
  """
  return grain.MapDataset.range(0, sys.maxsize)[shard_index + skip * shard_count :: shard_count]


class _LayoutPositions(grain.transforms.Map):
  """k -> global stream position of this host's k-th row: row rows[k mod R]
  of global batch k div R (batches of `batch_size` consecutive positions)."""

  def __init__(self, rows: Sequence[int], batch_size: int):
    self.rows = [int(r) for r in rows]
    self.batch_size = batch_size

  def map(self, k: int) -> int:
    t, i = divmod(int(k), len(self.rows))
    return t * self.batch_size + self.rows[i]


def layout_positions(
  rows: Sequence[int], batch_size: int, start_batch: int = 0
) -> grain.MapDataset:
  """The stream positions a host holding `rows` of every global batch of
  `batch_size` rows reads (global batch t is positions t * batch_size, ...),
  from global batch `start_batch` on; hosts holding the same rows read the
  same positions."""
  start = int(start_batch) * len(rows)
  return grain.MapDataset.range(start, sys.maxsize).map(_LayoutPositions(rows, batch_size))


def _check_layout(rows, columns, batch_size: int, seq_len: int, shard_count: int) -> None:
  if rows is not None:
    if shard_count != 1:
      raise ValueError("give either rows (a batch layout) or shard_index/shard_count, not both.")
    r = np.asarray(rows)
    if r.ndim != 1 or not r.size or r.min() < 0 or r.max() >= batch_size or np.any(np.diff(r) <= 0):
      raise ValueError(f"rows {rows!r}: need sorted distinct row ids in [0, {batch_size}).")
  if columns is not None and not 0 <= columns[0] < columns[1] <= seq_len:
    raise ValueError(f"columns {columns!r}: need 0 <= start < stop <= seq_len {seq_len}.")


def _reader_columns(columns: tuple[int, int] | None) -> tuple[int, int] | None:
  """Batch columns [c0, c1) -> window positions [c0, c1 + 1) (targets shift by one)."""
  return None if columns is None else (int(columns[0]), int(columns[1]) + 1)


def host_eval_rows(
  num_items: int, batch_size: int, shard_index: int = 0, shard_count: int = 1
) -> np.ndarray:
  """The items of host h of H's evaluation batches, padded to a fixed size.

  Host h takes items h, h + H, ...; every host gets ceil(ceil(n / H) / B)
  batches (the same number, so collective eval steps line up), the tail
  filled with -1 (an empty row).

  Returns:
    int64 (num_batches, batch_size): item ids, -1 on filler rows.
  """
  per_host = -(-num_items // shard_count)
  num_rows = -(-per_host // batch_size) * batch_size
  ids = np.arange(num_rows, dtype=np.int64) * shard_count + shard_index
  ids[ids >= num_items] = -1
  return ids.reshape(-1, batch_size)


def _check_sizes(seq_len: int, batch_size: int, shard_index: int, shard_count: int) -> None:
  if seq_len < 1 or batch_size < 1:
    raise ValueError(f"need seq_len >= 1 and batch_size >= 1, got {seq_len} and {batch_size}.")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} not in [0, {shard_count}).")


def train_windows(
  data_cfg, *, seq_len: int
) -> tuple[store_lib.TokenStore, windows.WindowIndex, np.ndarray]:
  """The training split's store, window index and source weights (0 for
  sources that cannot give a window, see `check_windows`).

  Raises:
    ValueError: with the numbers, when no window can be trained on (records
      shorter than the window, every window mostly N, every source
      weighted 0).
  """
  store = store_lib.TokenStore.open(data_cfg.store_dir)
  if data_cfg.train_split not in store:
    raise ValueError(
      f"data.train_split {data_cfg.train_split!r} is not a split of {store.path} (it has "
      f"{', '.join(map(repr, store.splits))}); set data.train_split or prepare the store again."
    )
  split = store[data_cfg.train_split]
  stride = int(data_cfg.window_stride) or seq_len
  segments = windows.split_segments(split, bool(data_cfg.packing))
  index = windows.WindowIndex(*segments, length=seq_len + 1, stride=stride, align_end=True)
  longest = int(np.max(segments[1] - segments[0])) if segments[0].size else 0
  if longest < seq_len + 1:
    unit = "run of records of one source (data.packing)" if data_cfg.packing else "record"
    raise ValueError(
      f"seq_len {seq_len:,} needs windows of {seq_len + 1:,} tokens, but the longest {unit} "
      f"of split {data_cfg.train_split!r} in {store.path} has {longest:,}; use a context of at "
      f"most {max(longest - 1, 0):,} nt (config.train.stages) or a store of longer sequences"
      + ("" if data_cfg.packing else " (or data.packing=True)")
      + "."
    )
  weights = sampling.source_weights(data_cfg, split.source_token_counts(), store.sources)
  ranges = index.source_ranges(len(store.sources))
  weights[ranges[:, 1] == ranges[:, 0]] = 0.0
  if not np.any(weights > 0):
    raise ValueError(
      f"no training windows in {data_cfg.store_dir} split "
      f"{data_cfg.train_split!r} (all records shorter than 2 "
      "tokens, or every source weighted 0)."
    )
  if float(data_cfg.max_n_fraction) < 1.0:
    weights = sampling.check_windows(
      store, data_cfg.train_split, index, weights, data_cfg.max_n_fraction
    )
  return store, index, weights


# How the training stream's batches are made, recorded in each checkpoint's
# meta: 2 since data.num_workers > 0 deals whole batches to the workers, so
# that global batch t is positions t * B, ... with workers too (before, each
# worker batched every W-th position).
STREAM_FORMAT = 2


def train_dataset(
  data_cfg,
  *,
  seq_len: int,
  batch_size: int,
  seed: int,
  shard_index: int = 0,
  shard_count: int = 1,
  rows: Sequence[int] | None = None,
  columns: tuple[int, int] | None = None,
  start_batch: int = 0,
) -> grain.IterDataset:
  """The infinite training dataset (see the module docstring and `train_batches`)."""
  _check_sizes(seq_len, batch_size, shard_index, shard_count)
  _check_layout(rows, columns, batch_size, seq_len, shard_count)
  store, index, weights = train_windows(data_cfg, seq_len=seq_len)
  ranges = index.source_ranges(len(store.sources))
  used = np.flatnonzero(weights > 0)
  sampler = sampling.WindowSampler(
    ranges[used], weights[used], seed, float(data_cfg.reverse_complement_prob)
  )
  if start_batch < 0:
    raise ValueError(f"start_batch must be >= 0, got {start_batch}.")
  if rows is None:
    ds = host_positions(shard_index, shard_count, skip=start_batch * batch_size)
    host_batch = batch_size
  else:
    ds, host_batch = layout_positions(rows, batch_size, start_batch), len(rows)
  reader = windows.WindowReader(store.path, data_cfg.train_split, index, _reader_columns(columns))
  if float(data_cfg.max_n_fraction) < 1.0:
    read = windows.ReadBatch(
      reader,
      sampling.NotMostlyN(
        sampler, store.path, data_cfg.train_split, index, float(data_cfg.max_n_fraction)
      ),
    )
  else:
    ds, read = ds.map(sampler), windows.ReadBatch(reader)
  # Element t is host batch t, read whole (ReadBatch: its reads go out
  # together), so data.read_threads read several batches at once and Grain
  # deals whole batches to worker processes in turn: batch t is positions
  # t * B, ... for any thread or worker count (STREAM_FORMAT).
  it = ds.batch(host_batch, drop_remainder=True, batch_fn=list).map(read)
  it = it.to_iter_dataset(_read_options(data_cfg, host_batch))
  workers = int(data_cfg.num_workers)
  if workers:
    if not flags.FLAGS.is_parsed():
      # Grain's worker start-up reads its absl flags; outside an absl app
      # (tests, notebooks) they are unparsed, so use their defaults.
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return it.map(windows.MakeBatch(data_cfg.mask_n_in_loss))


def train_batches(
  data_cfg,
  *,
  seq_len: int,
  batch_size: int,
  seed: int,
  shard_index: int = 0,
  shard_count: int = 1,
  rows: Sequence[int] | None = None,
  columns: tuple[int, int] | None = None,
  start_batch: int = 0,
) -> grain.DatasetIterator:
  """An infinite iterator of this host's training batches, from global batch
  `start_batch` on.

  Global batch t holds stream positions t * B ... t * B + B - 1 in row order,
  each a pure function of (seed, position), so every layout of the rows over
  hosts, and every worker count, reads the same global batches, and a
  stream resumes at batch t by starting there.

  Args:
    data_cfg: the data config (`config.default_data_config()` fields).
    seq_len: tokens per row (windows read seq_len + 1 tokens).
    batch_size: without `rows`: rows per batch on this host (host h of H
      reads positions h, h + H, ...); with `rows`: the global batch B.
    seed: seeds shuffling, source order and augmentation.
    shard_index, shard_count: this host's share of the stream (without rows).
    rows: the sorted global row ids this host loads of every global batch
      (`sharding.BatchLayout.rows`); its batches have len(rows) rows.
    columns: [start, stop) of the seq_len positions this host loads
      (`sharding.BatchLayout.columns`; default all): token arrays are then
      (R, stop - start), their segment ids those of the whole row.
    start_batch: the first global batch (without rows: this host's).

  Returns:
    A `grain.DatasetIterator` of batch dicts (`windows` module docstring).
  """
  return iter(
    train_dataset(
      data_cfg,
      seq_len=seq_len,
      batch_size=batch_size,
      seed=seed,
      shard_index=shard_index,
      shard_count=shard_count,
      rows=rows,
      columns=columns,
      start_batch=start_batch,
    )
  )


class _SpreadWindows(grain.transforms.Map):
  """g -> the window id of the g-th of `selected` windows spread evenly over
  all `total` (all of them when selected == total); -1 (an empty row)
  stays -1."""

  def __init__(self, total: int, selected: int):
    self.total, self.selected = total, selected

  def map(self, g: int) -> int:
    return int(g) * self.total // self.selected if g >= 0 else -1


EVAL_SPLIT = "val"  # the split training evaluates on


def eval_batches(
  data_cfg,
  *,
  split: str = EVAL_SPLIT,
  seq_len: int,
  batch_size: int,
  shard_index: int = 0,
  shard_count: int = 1,
  rows: Sequence[int] | None = None,
  columns: tuple[int, int] | None = None,
) -> grain.IterDataset:
  """A finite, deterministic, re-iterable dataset of evaluation batches.

  Covers every record of `split` with consecutive non-overlapping windows
  (seq_len + 1 tokens read, seq_len apart, so every token after a record's
  first is a target exactly once), the last window of each record padded;
  with `data_cfg.eval_max_windows` > 0, only that many of these windows,
  spread evenly over the split (every genome is sampled);
  no shuffling, augmentation or N-skipping. Window w goes to host
  w mod shard_count; every host yields ceil(ceil(W / shard_count) /
  batch_size) full batches, the tail padded with empty rows (loss_mask 0).
  With `rows` (a batch layout, see `train_batches`), batch_size is the global
  batch B: global batch t holds windows t * B ... (empty rows past the end);
  this host yields its rows of each (ceil(W / B) batches of len(rows) rows)
  and, with `columns`, only those positions.
  """
  _check_sizes(seq_len, batch_size, shard_index, shard_count)
  _check_layout(rows, columns, batch_size, seq_len, shard_count)
  store = store_lib.TokenStore.open(data_cfg.store_dir)
  index = windows.WindowIndex(
    *windows.split_segments(store[split], bool(data_cfg.eval_packing)),
    length=seq_len + 1,
    stride=seq_len,
    align_end=False,
  )
  total = len(index)
  limit = int(data_cfg.eval_max_windows)
  selected = min(total, limit) if limit > 0 else total
  items = host_eval_rows(selected, batch_size, shard_index, shard_count)
  if rows is not None:
    items = items[:, np.asarray(rows)]
  host_batch = items.shape[1]
  ds = grain.MapDataset.source(items.reshape(-1)).map(_SpreadWindows(total, selected))
  ds = ds.batch(
    host_batch,
    batch_fn=windows.ReadBatch(
      windows.WindowReader(store.path, split, index, _reader_columns(columns))
    ),
  )
  ds = ds.map(windows.MakeBatch(data_cfg.mask_n_in_loss))
  return ds.to_iter_dataset(_read_options(data_cfg, host_batch))
