"""Grain pipeline: token-store windows -> training and evaluation batches.

Batches are dicts of numpy arrays, B = rows on this host, L = seq_len (or
the width of this host's columns):

    inputs       int32   (B, L)  token ids
    targets      int32   (B, L)  the next token of each input position
    segment_ids  int32   (B, L)  document id per position: >= 1 for real
                                 tokens, 0 for padding, constant within a
                                 document and changing at every document
                                 boundary (attention segment ids and the
                                 SSD's seq_idx)
    loss_mask    float32 (B, L)  1 where the target is a nucleotide of the
                                 same document as the input position (and not
                                 N with data.mask_n_in_loss), else 0

Each row is a window of L + 1 stored tokens read as the shifted pair.

Windows. A split is cut into segments -- each record, or with packing each
run of records of one source -- and each segment into windows of L + 1
tokens `stride` apart. Windows are addressed by a global integer through
per-segment counts and their cumulative sum (`WindowIndex`), so even 160 Gb
of genome needs only a few numbers per segment, never a list of windows.

Training stream (`train_dataset`), all deterministic for a seed. Position
g of an infinite global stream becomes a window (`WindowSampler`):
  1. `SourceSchedule` picks a source: source s takes a share of positions
     proportional to its weight (training tokens ** (1/temperature) times
     data.source_weights), in a seeded order that repeats every 2**20
     positions, and gives the position k in that source's stream;
  2. the source's stream visits its windows in a fresh keyed permutation
     every epoch (`permute`, O(1) per element, no index arrays);
  3. a hash of (seed, g) decides the reverse complement;
  4. a mostly-N window is replaced by a resample of its source keyed by
     (seed, g) (`NotMostlyN`), so no position is dropped.
Global batch t of B rows is positions t * B ... t * B + B - 1. With a batch
layout (`train_batches(rows=, columns=)`, from `sharding.BatchLayout`) a
host reads exactly the rows its devices hold, and with the context axis
across hosts only its columns of each window; hosts holding the same rows
read the same positions, and the global batches do not depend on the
layout. Without one, host h of H takes positions h, h + H, ... (per-host
batches). Windows are read from the memory map and batched, optionally in
data.num_workers worker processes.
The iterator is a `grain.DatasetIterator`: `get_state()`/`set_state()`, and
`iterator_save_args` / `iterator_restore_args` give the Orbax args to keep
it in a Composite checkpoint:

    mngr.save(step, args=ocp.args.Composite(
        params=..., data=pipeline.iterator_save_args(it)))
    mngr.restore(step, args=ocp.args.Composite(
        params=..., data=pipeline.iterator_restore_args(it)))

Evaluation (`eval_batches`): every record of a split in consecutive,
non-overlapping windows (each target token scored exactly once), the last
one of each record padded, no augmentation, no skipping; the windows are
dealt round-robin to hosts, and every host gets the same number of batches
(padded with empty rows, loss_mask 0) so collective eval steps line up.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import sys
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from absl import flags, logging

from hybridna_jax import tokenizer
from hybridna_jax.data import store as store_lib

_SCHEDULE_PERIOD = 1 << 20
# Token -> complementary token (N and specials unchanged), as a
# bytes.translate table.
_COMPLEMENT_TABLE = bytes(tokenizer.COMPLEMENT.tolist() + list(range(tokenizer.VOCAB_SIZE, 256)))
_M64 = (1 << 64) - 1
_LAST_COUNTED = {True: tokenizer.T, False: tokenizer.N}


def derive_seed(seed: int, *keys: Any) -> int:
  """A 32-bit seed from `seed` and `keys`, one per random decision."""
  text = "\0".join(str(k) for k in (seed,) + keys).encode()
  return int.from_bytes(hashlib.blake2b(text, digest_size=4).digest(), "little")


class WindowIndex:
  """Windows of `length` tokens over segments of a split's token file.

  Segment k covers tokens [starts[k], ends[k]) and belongs to source
  sources[k]; segments are sorted by source, so the windows of a source
  have consecutive ids (`source_ranges`). A segment of n >= 2 tokens has
  windows starting every `stride` tokens:
    * align_end=True (training): 1 + ceil(max(0, n - length) / stride)
      windows, the last moved back to end at the segment's end (a short
      segment gives one padded window);
    * align_end=False (evaluation, stride = length - 1): ceil((n - 1) /
      stride) windows covering every target once, the last one padded.
  """

  def __init__(
    self,
    starts: np.ndarray,
    ends: np.ndarray,
    sources: np.ndarray,
    *,
    length: int,
    stride: int,
    align_end: bool,
  ):
    if length < 2 or stride < 1:
      raise ValueError(f"need length >= 2 and stride >= 1, got {length}, {stride}")
    order = np.argsort(sources, kind="stable")
    self.starts = np.asarray(starts, np.int64)[order]
    self.ends = np.asarray(ends, np.int64)[order]
    self.sources = np.asarray(sources, np.int64)[order]
    self.length, self.stride, self.align_end = length, stride, align_end
    n = self.ends - self.starts
    if align_end:
      counts = 1 + -(-np.maximum(n - length, 0) // stride)
    else:
      counts = -(-(n - 1) // stride)
    counts = np.where(n >= 2, counts, 0)
    self.cum = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

  def __len__(self) -> int:
    return int(self.cum[-1])

  def source_ranges(self, num_sources: int) -> np.ndarray:
    """int64 (num_sources, 2): [first, end) window ids of each source."""
    first = np.searchsorted(self.sources, np.arange(num_sources), "left")
    last = np.searchsorted(self.sources, np.arange(num_sources), "right")
    return np.stack([self.cum[first], self.cum[last]], axis=1)

  def window(self, i: int) -> tuple[int, int]:
    """[start, end) token positions of window `i` (end - start <= length)."""
    k = int(np.searchsorted(self.cum, i, "right")) - 1
    lo, hi = int(self.starts[k]), int(self.ends[k])
    start = lo + (i - int(self.cum[k])) * self.stride
    if self.align_end:
      start = min(start, max(lo, hi - self.length))
    return start, min(start + self.length, hi)


def split_segments(
  split: store_lib.StoreSplit, packing: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(starts, ends, source ids) of the segments windows are cut from.

  Without packing each record is a segment; with packing each maximal run
  of consecutive records of one source (records are stored back to back).
  """
  starts, lengths, sources = split.offsets, split.lengths, split.source_ids
  if not packing or starts.size == 0:
    return starts, starts + lengths, sources
  run_start = np.flatnonzero(np.diff(sources, prepend=-1) != 0)
  run_end = np.append(run_start[1:], sources.size) - 1
  return (starts[run_start], starts[run_end] + lengths[run_end], sources[run_start])


# Per-position document marks of a window (uint8, compact for the hop
# from worker processes): a document starts here / continues / padding.
DOC_START, DOC_CONTINUE, DOC_PAD = 1, 0, 255


class WindowReader(grain.transforms.Map):
  """Window id -> {"tokens": uint8 (W,), "marks": uint8 (W,), "prior": int32 ()}.

  Reads window positions [a, b) = `columns` (default: the whole window, W =
  length), so a process that holds one context slice of each sequence reads
  only that slice. Tokens past the segment end are <pad>; `marks` holds
  DOC_START at window position 0 and at each record boundary, DOC_PAD on
  padding and DOC_CONTINUE elsewhere; `prior` counts the DOC_STARTs at window
  positions before a (so segment ids of a slice continue those of the
  row). A reverse-complemented window is read as if the whole window were
  flipped (`reverse_complement_window`), then sliced. Pickles without its
  memory map, so Grain workers reopen the store.
  """

  def __init__(
    self, store_path: str, split: str, index: WindowIndex, columns: tuple[int, int] | None = None
  ):
    a, b = columns if columns is not None else (0, index.length)
    if not 0 <= a < b <= index.length:
      raise ValueError(f"window columns {columns} not inside [0, {index.length}).")
    self.store_path = store_path
    self.split_name = split
    self.index = index
    self.columns = (int(a), int(b))
    self._split = None

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_split"] = None
    return state

  @property
  def split(self) -> store_lib.StoreSplit:
    if self._split is None:
      self._split = store_lib.TokenStore.open(self.store_path)[self.split_name]
    return self._split

  def _range(self, item: int | tuple[int, bool]) -> tuple[int, int] | None:
    """The split's token range [lo, hi) that `item` reads (None: nothing)."""
    i, flip = item if isinstance(item, tuple) else (item, False)
    if i < 0:
      return None
    a, b = self.columns
    start, end = self.index.window(int(i))
    n = end - start
    hi = min(b, n)
    if a >= hi:
      return None
    return (start + n - hi, start + n - a) if flip else (start + a, start + hi)

  def map(self, item: int | tuple[int, bool]) -> dict[str, np.ndarray]:
    """`item`: a window id (< 0: an empty window) or (id, reverse flag)."""
    return self.map_batch([item])[0]

  def map_batch(
    self, items: Sequence[int | tuple[int, bool]], known: dict[int, np.ndarray] | None = None
  ) -> list[dict[str, np.ndarray]]:
    """`map` of each item; the token reads of all items are issued together
    (`store.read_ranges`: concurrent on a zarr store), then assembled.
    `known`: window id -> its whole tokens, already read (not read again)."""
    known = known or {}
    ranges = [self._range(item) for item in items]
    wanted = [
      r
      for item, r in zip(items, ranges)
      if r is not None and (item[0] if isinstance(item, tuple) else item) not in known
    ]
    fetched = iter(store_lib.read_ranges(self.split.tokens, wanted))

    def piece(item, r):
      i = item[0] if isinstance(item, tuple) else item
      if i not in known:
        return next(fetched)
      start = self.index.window(int(i))[0]
      return known[i][r[0] - start : r[1] - start]

    pieces = iter([piece(item, r) for item, r in zip(items, ranges) if r is not None])
    return [
      self._window(item, next(pieces) if r is not None else None) for item, r in zip(items, ranges)
    ]

  def _window(self, item, piece: np.ndarray | None) -> dict[str, np.ndarray]:
    """The window of `item` from `piece`, the tokens of its `_range`."""
    i, flip = item if isinstance(item, tuple) else (item, False)
    a, b = self.columns
    tokens = np.zeros((b - a,), np.uint8)
    marks = np.full((b - a,), DOC_PAD, np.uint8)
    prior = 0
    if piece is not None:
      start, end = self.index.window(int(i))
      n = end - start
      hi = min(b, n)
      offsets = self.split.offsets
      marks[: hi - a] = DOC_CONTINUE
      if a == 0:
        marks[0] = DOC_START
      # Record starts o (start < o < end) mark window position o - start,
      # or n - (o - start) when reversed; only those in [max(a, 1), hi).
      if not flip:
        tokens[: hi - a] = piece
        lo_o, hi_o = start + max(a, 1), start + hi  # o in [lo_o, hi_o)
        inside = offsets[np.searchsorted(offsets, lo_o) : np.searchsorted(offsets, hi_o)]
        marks[inside - start - a] = DOC_START
        if a:
          prior = 1 + int(
            np.searchsorted(offsets, start + a) - np.searchsorted(offsets, start, "right")
          )
      else:
        rc = np.ascontiguousarray(piece[::-1]).tobytes().translate(_COMPLEMENT_TABLE)
        tokens[: hi - a] = np.frombuffer(rc, np.uint8)
        lo_o, hi_o = start + n - hi, start + n - max(a, 1)  # o in (lo_o, hi_o]
        inside = offsets[
          np.searchsorted(offsets, lo_o, "right") : np.searchsorted(offsets, hi_o, "right")
        ]
        marks[start + n - inside - a] = DOC_START
        if a:
          prior = 1 + int(
            np.searchsorted(offsets, start + n - 1, "right")
            - np.searchsorted(offsets, start + n - a, "right")
          )
    return {"tokens": tokens, "marks": marks, "prior": np.int32(prior)}


def window_length(window: dict[str, np.ndarray]) -> int:
  """Number of real (non-padding) tokens of a window."""
  marks = window["marks"]
  return marks.size - int(np.count_nonzero(marks == DOC_PAD))


class NotMostlyN(grain.transforms.Map):
  """(window id, flip) at stream position g -> the same, or a resample when
  more than `max_fraction` of the window's tokens are N.

  The resample stays in the window's source and depends only on (seed, g,
  attempt), so what a stream position holds does not depend on the hosts or
  on which rows a host loads; after `attempts` mostly-N draws the position
  becomes an empty row (id -1: all padding, no loss). The N count covers the
  whole window even when a host reads only a slice of it.
  """

  def __init__(
    self,
    sampler: WindowSampler,
    store_path: str,
    split: str,
    index: WindowIndex,
    max_fraction: float,
    attempts: int = 16,
  ):
    self.sampler = sampler
    self.reader = WindowReader(store_path, split, index)  # for its lazy memory map
    self.index = index
    self.max_fraction = max_fraction
    self.attempts = attempts

  def _ok(self, window: int, tokens: np.ndarray) -> bool:
    start, end = self.index.window(window)
    return int(np.count_nonzero(tokens == tokenizer.N)) <= self.max_fraction * (end - start)

  def map(self, g: int) -> tuple[int, bool]:
    return self.map_batch([g])[0]

  def map_batch(
    self, positions: Sequence[int], known: dict[int, np.ndarray] | None = None
  ) -> list[tuple[int, bool]]:
    """`map` of each position. Each attempt reads the windows still pending
    together (`store.read_ranges`); a draw depends only on (seed, g,
    attempt), so the result is that of one position at a time. The tokens
    of the accepted windows are put in `known` (window id -> tokens), so
    that `WindowReader.map_batch` need not read them again."""
    known = {} if known is None else known
    picked = [self.sampler.map(g) for g in positions]
    pending = list(range(len(picked)))
    for attempt in range(1, self.attempts + 1):
      windows = [picked[k][0] for k in pending]
      ranges = [self.index.window(w) for w in windows]
      tokens = store_lib.read_ranges(self.reader.split.tokens, ranges)
      known.update({w: t for w, t in zip(windows, tokens) if self._ok(w, t)})
      pending = [k for k, w, t in zip(pending, windows, tokens) if not self._ok(w, t)]
      for k in pending:
        picked[k] = (self.sampler.resample(positions[k], attempt), picked[k][1])
      if not pending:
        break
    else:
      for k in pending:
        picked[k] = (-1, False)
    return picked


class ReadBatch:
  """Items of one batch -> a compact batch (`stack_windows`): the Grain
  batch_fn of the training and evaluation streams, so that the token reads
  of a whole batch go out together (concurrent on a zarr store, hiding the
  latency of a remote one). With `n_filter` the items are stream positions
  (`NotMostlyN.map_batch` picks their windows), else window items."""

  def __init__(self, reader: WindowReader, n_filter: NotMostlyN | None = None):
    self.reader = reader
    self.n_filter = n_filter

  def __call__(self, items: Sequence[Any]) -> dict[str, np.ndarray]:
    known: dict[int, np.ndarray] = {}
    if self.n_filter is not None:
      items = self.n_filter.map_batch(items, known)
    return stack_windows(self.reader.map_batch(items, known))


def reverse_complement_window(window: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The window's reverse complement (padding stays at the end)."""
  n = window_length(window)
  tokens = window["tokens"].copy()
  marks = window["marks"].copy()
  if n:
    # bytes.translate: a C loop, several times faster than a numpy lookup.
    tokens[:n] = np.frombuffer(tokens[n - 1 :: -1].tobytes().translate(_COMPLEMENT_TABLE), np.uint8)
    # A document starts after each original start, read backwards.
    marks[1:n] = window["marks"][n - 1 : 0 : -1]
    marks[0] = DOC_START
  return {"tokens": tokens, "marks": marks}


def stack_windows(windows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Windows -> a compact batch: "tokens", "marks" uint8 (B, W) (W = L + 1, or
  a slice's width + 1) and "prior" int32 (B,)."""
  return {
    "tokens": np.stack([w["tokens"] for w in windows]),
    "marks": np.stack([w["marks"] for w in windows]),
    "prior": np.asarray([w.get("prior", 0) for w in windows], np.int32),
  }


class MakeBatch(grain.transforms.Map):
  """A compact batch (`stack_windows`) -> the batch dict (module docstring).

  Runs in the main process, after any worker processes, so that workers
  ship 2 bytes per token instead of 16.
  """

  def __init__(self, mask_n_in_loss: bool = True):
    self.last_counted = _LAST_COUNTED[bool(mask_n_in_loss)]

  def map(self, compact: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return make_batch(compact["tokens"], compact["marks"], self.last_counted, compact.get("prior"))


def make_batch(
  tokens: np.ndarray,
  marks: np.ndarray,
  last_counted: int = tokenizer.T,
  prior: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
  """uint8 tokens and document marks (B, L + 1) -> the batch dict.

  prior: int32 (B,) document starts before each row's first column (a slice
  of a longer window, `WindowReader`), added to its segment ids; None: 0.
  """
  real = marks != DOC_PAD
  # A row whose first column continues a document has local id 0 there.
  segments = (real & (marks[:, :1] == DOC_START)).astype(np.int32)
  # Only rows with a boundary inside need numbering (numpy's cumsum is slow,
  # ~5 ns a token, so the common one-document rows skip it).
  packed = np.flatnonzero((marks[:, 1:] == DOC_START).any(axis=1))
  if packed.size:
    segments[packed] = segment_ids_from_marks(marks[packed])
  if prior is not None and np.any(prior):
    segments = np.where(real, segments + prior[:, None].astype(np.int32), 0)
  inputs = tokens[:, :-1].astype(np.int32)
  targets = tokens[:, 1:].astype(np.int32)
  segment_ids = np.ascontiguousarray(segments[:, :-1])
  # Nucleotide targets: A <= t <= last_counted, as one unsigned comparison.
  counted = (tokens[:, 1:] - np.uint8(tokenizer.A)) <= np.uint8(last_counted - tokenizer.A)
  loss_mask = (segments[:, 1:] == segment_ids) & real[:, :-1] & counted
  return {
    "inputs": inputs,
    "targets": targets,
    "segment_ids": segment_ids,
    "loss_mask": loss_mask.astype(np.float32),
  }


def segment_ids_from_marks(marks: np.ndarray) -> np.ndarray:
  """Document marks (B, W) -> int32 segment ids: 1, 2, ... along each row
  (a new id at each DOC_START), 0 on padding."""
  rows, width = marks.shape
  flat = marks.reshape(-1)
  starts = np.flatnonzero(flat == DOC_START)
  ids = np.zeros(flat.size, np.int32)
  if starts.size:
    runs = np.diff(np.append(starts, flat.size))
    ids[starts[0] :] = np.repeat(np.arange(1, starts.size + 1, dtype=np.int32), runs)
  ids = ids.reshape(rows, width)
  # Restart the numbering in each row: subtract the starts of earlier rows.
  ids -= np.searchsorted(starts, np.arange(rows) * width).astype(np.int32)[:, None]
  ids[marks == DOC_PAD] = 0
  return ids


class SourceSchedule:
  """Infinite weighted interleaving of per-source streams.

  Slot g of the mixed stream is slot r = g mod P of a fixed period of P
  slots, in which source s owns round(P * w_s) slots (at least one) at
  seeded random positions. Slot g maps to (s, q * count_s + rank), with q =
  g div P and rank the slot's rank among s's slots in the period, so each
  source's stream is consumed in order and source shares are exact over
  every period. O(1) per element and stateless.
  """

  def __init__(self, weights: Sequence[float], seed: int, period: int = _SCHEDULE_PERIOD):
    w = np.asarray(weights, np.float64)
    if w.ndim != 1 or not w.size or np.any(w <= 0):
      raise ValueError(f"need positive weights, got {weights}")
    period = max(period, 4 * w.size)
    w = w / w.sum()
    counts = np.maximum(np.floor(w * period).astype(np.int64), 1)
    # Hand out what rounding left over by largest remainder (or take back
    # what the minimum of one slot added, from the largest sources).
    short = period - counts.sum()
    by_remainder = np.argsort(-(w * period - np.floor(w * period)), kind="stable")
    by_size = np.argsort(-counts, kind="stable")
    i = 0
    while short:
      if short > 0:
        counts[by_remainder[i % w.size]] += 1
        short -= 1
      elif counts[by_size[i % w.size]] > 1:
        counts[by_size[i % w.size]] -= 1
        short += 1
      i += 1
    slots = np.repeat(np.arange(w.size, dtype=np.int32), counts)
    slots = np.random.default_rng(seed).permutation(slots)
    order = np.argsort(slots, kind="stable")
    rank = np.empty(period, np.int64)
    rank[order] = np.arange(period) - np.repeat(np.cumsum(counts) - counts, counts)
    self.period = period
    self.counts = counts
    self.slots = slots
    self.rank = rank.astype(np.int32)

  def __getitem__(self, index: int) -> tuple[int, int]:
    q, r = divmod(int(index), self.period)
    s = int(self.slots[r])
    return s, q * int(self.counts[s]) + int(self.rank[r])


def _mix64(z: int) -> int:
  """splitmix64's finaliser: a strong 64-bit integer hash."""
  z = (z + 0x9E3779B97F4A7C15) & _M64
  z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
  z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
  return z ^ (z >> 31)


def permute(index: int, n: int, key: int) -> int:
  """A keyed pseudo-random bijection of [0, n), evaluated at `index`.

  A 4-round Feistel network over the smallest even-bit power of two >= n,
  with cycle walking back into [0, n) (fewer than 4 steps on average).
  Costs microseconds for any n; Grain's index_shuffle takes milliseconds
  for small n, which matters for small genomes (a phage has a handful of
  windows).
  """
  if n <= 1:
    return 0
  bits = max(2, (n - 1).bit_length())
  half = (bits + 1) // 2
  mask = (1 << half) - 1
  keys = [_mix64(key ^ r) for r in range(4)]
  x = index
  while True:
    left, right = x >> half, x & mask
    for k in keys:
      left, right = right, left ^ (_mix64(right ^ k) & mask)
    x = (left << half) | right
    if x < n:
      return x


class WindowSampler(grain.transforms.Map):
  """Global stream position g -> (window id, reverse-complement flag).

  `SourceSchedule` picks the source and the position k in its stream;
  the stream visits the source's windows in a fresh keyed permutation every
  epoch (k div n_s). The flag is a hash of (seed, g) below `rc_prob`.
  Everything depends on g and the seed only, not on the host count.
  """

  def __init__(self, ranges: np.ndarray, weights: np.ndarray, seed: int, rc_prob: float):
    self.first = [int(a) for a, _ in ranges]
    self.count = [int(b - a) for a, b in ranges]
    self.schedule = SourceSchedule(weights, derive_seed(seed, "schedule"))
    self.key = _mix64(derive_seed(seed, "shuffle"))
    self.rc_key = _mix64(derive_seed(seed, "reverse_complement"))
    self.rc_threshold = int(rc_prob * 2.0**64)

  def map(self, g: int) -> tuple[int, bool]:
    s, k = self.schedule[g]
    epoch, j = divmod(k, self.count[s])
    window = self.first[s] + permute(j, self.count[s], _mix64(self.key ^ _mix64((s << 32) ^ epoch)))
    return window, _mix64(self.rc_key ^ int(g)) < self.rc_threshold

  def resample(self, g: int, attempt: int) -> int:
    """Another window of position g's source: a hash of (seed, g, attempt)."""
    s, _ = self.schedule[g]
    return self.first[s] + _mix64(self.key ^ _mix64((int(g) << 8) ^ attempt)) % self.count[s]


def source_weights(data_cfg, token_counts: np.ndarray, source_names: Sequence[str]) -> np.ndarray:
  """float64 (num_sources,): sampling weight of each source (0: unused)."""
  temperature = float(data_cfg.source_temperature)
  if temperature <= 0:
    raise ValueError(f"data.source_temperature must be > 0, got {temperature}.")
  weights = np.power(token_counts.astype(np.float64), 1.0 / temperature)
  weights[token_counts == 0] = 0.0
  for item in data_cfg.source_weights or ():
    pattern, sep, value = str(item).rpartition("=")
    try:
      factor = float(value)
    except ValueError:
      factor = -1.0
    if not sep or not 0 <= factor < math.inf:  # also refuses nan
      raise ValueError(
        f"data.source_weights: {item!r} is not 'pattern=weight' with a finite weight >= 0."
      )
    hits = [i for i, name in enumerate(source_names) if fnmatch.fnmatchcase(name, pattern)]
    if not hits:
      raise ValueError(
        f"data.source_weights: {pattern!r} matches none of the sources {list(source_names)}."
      )
    weights[hits] *= factor
  return weights


def _read_options(data_cfg, batch_size: int, whole_batches: bool = False) -> grain.ReadOptions:
  """Grain's read options: data.prefetch_buffer_size windows (0: about two
  batches) ahead; counted in batches of `batch_size` when the elements are
  whole batches."""
  buffer = int(data_cfg.prefetch_buffer_size) or max(2 * batch_size, 16)
  if whole_batches:
    buffer = max(1, -(-buffer // batch_size))
  return grain.ReadOptions(num_threads=int(data_cfg.read_threads), prefetch_buffer_size=buffer)


def host_positions(shard_index: int = 0, shard_count: int = 1) -> grain.MapDataset:
  """Host h of H's share of an infinite global stream: positions h, h + H, ...

  The training streams map a global position to an example, so what each
  position holds does not depend on the host count.
  """
  return grain.MapDataset.range(0, sys.maxsize)[shard_index::shard_count]


class _LayoutPositions(grain.transforms.Map):
  """k -> global stream position of this host's k-th row: row rows[k mod R]
  of global batch k div R (batches of `batch_size` consecutive positions)."""

  def __init__(self, rows: Sequence[int], batch_size: int):
    self.rows = [int(r) for r in rows]
    self.batch_size = batch_size

  def map(self, k: int) -> int:
    t, i = divmod(int(k), len(self.rows))
    return t * self.batch_size + self.rows[i]


def layout_positions(rows: Sequence[int], batch_size: int) -> grain.MapDataset:
  """The stream positions a host holding `rows` of every global batch of
  `batch_size` rows reads (global batch t is positions t * batch_size, ...);
  hosts holding the same rows read the same positions."""
  return grain.MapDataset.range(0, sys.maxsize).map(_LayoutPositions(rows, batch_size))


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
) -> tuple[store_lib.TokenStore, WindowIndex, np.ndarray]:
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
  segments = split_segments(split, bool(data_cfg.packing))
  index = WindowIndex(*segments, length=seq_len + 1, stride=stride, align_end=True)
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
  weights = source_weights(data_cfg, split.source_token_counts(), store.sources)
  ranges = index.source_ranges(len(store.sources))
  weights[ranges[:, 1] == ranges[:, 0]] = 0.0
  if not np.any(weights > 0):
    raise ValueError(
      f"no training windows in {data_cfg.store_dir} split "
      f"{data_cfg.train_split!r} (all records shorter than 2 "
      "tokens, or every source weighted 0)."
    )
  if float(data_cfg.max_n_fraction) < 1.0:
    weights = check_windows(store, data_cfg.train_split, index, weights, data_cfg.max_n_fraction)
  return store, index, weights


# At most this many windows are read by `check_windows` (evenly spread over
# each source), so the check takes well under a second on a local store (4 s
# on an HTTP one with 20 ms a request, whose reads are issued together).
_CHECK_WINDOWS = 4096
_CHECK_GROUP = 256


def check_windows(
  store: store_lib.TokenStore,
  split_name: str,
  index: WindowIndex,
  weights: np.ndarray,
  max_n_fraction: float,
) -> np.ndarray:
  """The source weights with sources whose every token is N set to 0
  (they cannot give a window `NotMostlyN` accepts; a warning names them).

  Reads up to `_CHECK_WINDOWS` windows spread evenly over the weighted
  sources; a source none of whose sampled windows is accepted gets a
  warning (most of its rows would be empty).

  Raises:
    ValueError: no sampled window of any weighted source has at most
      max_n_fraction N tokens (the data would train on empty rows only),
      with the split's token and N counts.
  """
  split = store[split_name]
  per_source = split.info.get("per_source", {})
  ranges = index.source_ranges(len(store.sources))
  used = np.flatnonzero(weights > 0)
  per = max(1, _CHECK_WINDOWS // max(1, used.size))
  weights = weights.copy()
  accepted, sampled, hopeless = 0, 0, []
  for s in used:
    name = store.sources[s]
    stats = per_source.get(name, {})
    if stats and int(stats.get("tokens", 0)) == int(stats.get("n_tokens", -1)):
      weights[s] = 0.0
      hopeless.append(name)
      sampled += 1
      continue
    first, end = int(ranges[s, 0]), int(ranges[s, 1])
    k = min(per, end - first)
    windows = [index.window(first + i * (end - first) // k) for i in range(k)]
    ok = 0
    # Read in groups: together, where one by one they were a round trip each
    # on a URL store; in groups, so that at 131k a read holds 33 MB, not 0.5 GB.
    for g in range(0, k, _CHECK_GROUP):
      group = windows[g : g + _CHECK_GROUP]
      ok += sum(
        int(np.count_nonzero(tokens == tokenizer.N)) <= max_n_fraction * (stop - start)
        for (start, stop), tokens in zip(group, store_lib.read_ranges(split.tokens, group))
      )
    accepted, sampled = accepted + ok, sampled + k
    if ok == 0:
      logging.warning(
        "source %r of split %r: none of %d sampled windows of %d tokens has at most "
        "data.max_n_fraction=%g N; most of its rows will be empty.",
        name,
        split_name,
        k,
        index.length,
        max_n_fraction,
      )
  if accepted == 0:
    n_tokens = sum(int(v.get("n_tokens", 0)) for v in per_source.values())
    raise ValueError(
      f"no training window of split {split_name!r} in {store.path} has at most "
      f"data.max_n_fraction={max_n_fraction:g} N tokens (0 of {sampled} windows of "
      f"{index.length:,} tokens sampled; the split holds {split.num_tokens:,} tokens, "
      f"{n_tokens:,} ({100 * n_tokens / max(split.num_tokens, 1):.1f} %) N). Prepare the store "
      "from sequences that are not all N, or raise data.max_n_fraction (1.0 keeps every window)."
    )
  if hopeless:
    logging.warning(
      "split %r: source(s) %s are all N and are not trained on.", split_name, ", ".join(hopeless)
    )
  return weights


# The layout of a saved training-iterator state: 2 since data.num_workers > 0
# deals whole batches to the workers (its state counts batches; before, it
# dealt positions and counted them). Recorded in each checkpoint's meta.
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
) -> grain.IterDataset:
  """The infinite training dataset (see the module docstring and `train_batches`)."""
  _check_sizes(seq_len, batch_size, shard_index, shard_count)
  _check_layout(rows, columns, batch_size, seq_len, shard_count)
  store, index, weights = train_windows(data_cfg, seq_len=seq_len)
  ranges = index.source_ranges(len(store.sources))
  used = np.flatnonzero(weights > 0)
  sampler = WindowSampler(
    ranges[used], weights[used], seed, float(data_cfg.reverse_complement_prob)
  )
  if rows is None:
    ds, host_batch = host_positions(shard_index, shard_count), batch_size
  else:
    ds, host_batch = layout_positions(rows, batch_size), len(rows)
  reader = WindowReader(store.path, data_cfg.train_split, index, _reader_columns(columns))
  if float(data_cfg.max_n_fraction) < 1.0:
    read = ReadBatch(
      reader,
      NotMostlyN(sampler, store.path, data_cfg.train_split, index, float(data_cfg.max_n_fraction)),
    )
  else:
    ds, read = ds.map(sampler), ReadBatch(reader)
  workers = int(data_cfg.num_workers)
  if not workers:
    # Windows are read per batch (ReadBatch) after the positions are
    # batched; the iterator state counts positions.
    it = ds.to_iter_dataset(_read_options(data_cfg, host_batch))
    it = it.batch(host_batch, drop_remainder=True, batch_fn=read)
  else:
    # Grain deals the dataset's elements to the workers in turn: batched
    # first, they are whole batches, so batch t is positions t * B, ... as
    # without workers (dealt positions, each worker batched every W-th).
    # The state counts batches (STREAM_FORMAT).
    if not flags.FLAGS.is_parsed():
      # Grain's worker start-up reads its absl flags; outside an absl app
      # (tests, notebooks) they are unparsed, so use their defaults.
      flags.FLAGS.mark_as_parsed()
    it = ds.batch(host_batch, drop_remainder=True, batch_fn=list).map(read)
    it = it.to_iter_dataset(_read_options(data_cfg, host_batch, whole_batches=True))
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return it.map(MakeBatch(data_cfg.mask_n_in_loss))


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
) -> grain.DatasetIterator:
  """An infinite, checkpointable iterator of this host's training batches.

  Global batch t holds stream positions t * B ... t * B + B - 1 in row order,
  each a pure function of (seed, position), so every layout of the rows over
  hosts reads the same global batches.

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

  Returns:
    A `grain.DatasetIterator` of batch dicts (module docstring) with
    `get_state()` / `set_state()`; see `iterator_save_args`.
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
  index = WindowIndex(
    *split_segments(store[split], bool(data_cfg.eval_packing)),
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
    host_batch, batch_fn=ReadBatch(WindowReader(store.path, split, index, _reader_columns(columns)))
  )
  ds = ds.map(MakeBatch(data_cfg.mask_n_in_loss))
  return ds.to_iter_dataset(_read_options(data_cfg, host_batch))


def iterator_save_args(it: grain.DatasetIterator):
  """Orbax args saving the iterator's state as an item of a Composite.

  Grain's handler writes one JSON file per process
  (process_<i>-of-<n>.json), so each host keeps its own position.
  """
  return grain.checkpoint.CheckpointSave(it)


def iterator_restore_args(it: grain.DatasetIterator):
  """Orbax args restoring a saved state into `it` (built the same way)."""
  return grain.checkpoint.CheckpointRestore(it)
