"""Windows of a token-store split, read and turned into batches.

A split is cut into segments -- each record, or with packing each
run of records of one source -- and each segment into windows of L + 1
tokens `stride` apart. Windows are addressed by a global integer through
per-segment counts and their cumulative sum (`WindowIndex`), so even 160 Gb
of genome needs only a few numbers per segment, never a list of windows.

`WindowReader` reads a window (or some of its columns) with its document
marks, `ReadBatch` the windows of a batch at once into a compact batch
(`stack_windows`), and `MakeBatch` turns that into the batch dict, numpy
arrays with B = rows on this host, L = seq_len (or the width of this host's
columns):

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
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import grain
import numpy as np

from hybridna_jax import tokenizer
from hybridna_jax.data import store as store_lib

if TYPE_CHECKING:
  from hybridna_jax.data.sampling import NotMostlyN

# Token -> complementary token (N and specials unchanged), as a
# bytes.translate table.
_COMPLEMENT_TABLE = bytes(tokenizer.COMPLEMENT.tolist() + list(range(tokenizer.VOCAB_SIZE, 256)))
_LAST_COUNTED = {True: tokenizer.T, False: tokenizer.N}


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
  row). Record boundaries are the starts of non-empty records
  (`record_starts`): a zero-length record starts where the next one does.
  A reverse-complemented window is read as if the whole window were
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
    self._record_starts = None
    self._opening = threading.Lock()

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_split"] = state["_record_starts"] = None
    del state["_opening"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._opening = threading.Lock()

  @property
  def split(self) -> store_lib.StoreSplit:
    if self._split is None:
      # data.read_threads reach here at once: the store is opened once, not
      # by each (whose concurrent numpy header parses also broke CPython
      # 3.11's parser: "AST constructor recursion depth mismatch").
      with self._opening:
        if self._split is None:
          self._split = store_lib.TokenStore.open(self.store_path)[self.split_name]
    return self._split

  @property
  def record_starts(self) -> np.ndarray:
    """int64, increasing: token offsets of the split's non-empty records,
    where documents start. A zero-length record (`TokenStoreWriter` accepts
    them) has the offset of the next one; counting it too would count that
    boundary twice in `prior`, so a slice's segment ids would run ahead of
    the whole row's."""
    if self._record_starts is None:
      split = self.split
      self._record_starts = np.ascontiguousarray(split.offsets[split.lengths > 0], np.int64)
    return self._record_starts

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
      offsets = self.record_starts
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


class ReadBatch:
  """Items of one batch -> a compact batch (`stack_windows`): the Grain
  batch_fn of the training and evaluation streams, so that the token reads
  of a whole batch go out together (concurrent on a zarr store, hiding the
  latency of a remote one). With `n_filter` the items are stream positions
  (`sampling.NotMostlyN.map_batch` picks their windows), else window items."""

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
