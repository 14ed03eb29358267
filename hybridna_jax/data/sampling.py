"""Sampling of the training stream: stream position -> window.

All deterministic for a seed. Position g of an infinite global stream
becomes a window (`WindowSampler`):
  1. `SourceSchedule` picks a source: source s takes a share of positions
     proportional to its weight (training tokens ** (1/temperature) times
     data.source_weights, `source_weights`), in a seeded order that repeats
     every 2**20 positions, and gives the position k in that source's stream;
  2. the source's stream visits its windows in a fresh keyed permutation
     every epoch (`permute`, O(1) per element, no index arrays);
  3. a hash of (seed, g) decides the reverse complement;
  4. a mostly-N window is replaced by a resample of its source keyed by
     (seed, g) (`NotMostlyN`), so no position is dropped.
`check_windows` weights 0 the sources that cannot give a window `NotMostlyN`
accepts.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from absl import logging

from hybridna_jax import tokenizer
from hybridna_jax.data import store as store_lib
from hybridna_jax.data.windows import WindowIndex, WindowReader

_SCHEDULE_PERIOD = 1 << 20
_M64 = (1 << 64) - 1


def derive_seed(seed: int, *keys: Any) -> int:
  """A 32-bit seed from `seed` and `keys`, one per random decision."""
  text = "\0".join(str(k) for k in (seed,) + keys).encode()
  return int.from_bytes(hashlib.blake2b(text, digest_size=4).digest(), "little")


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
