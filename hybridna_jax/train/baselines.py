"""An order-k Markov model over A/C/G/T: the baseline next to the LM's
validation bits per nucleotide.

Counts of every (j+1)-mer, j = 0..k, are taken over the training records;
a target is predicted from its longest preceding A/C/G/T-only context (at
most k bases, backing off at record starts and after N), with additive
smoothing. Every A/C/G/T target is scored, as in the LM's loss mask; targets
that are N or specials are not.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from hybridna_jax import tokenizer as tok


def _bases(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Token ids -> (values 0..3, valid mask) for A, C, G, T."""
  tokens = np.asarray(tokens)
  valid = (tokens >= tok.A) & (tokens <= tok.T)
  return np.where(valid, tokens - tok.A, 0).astype(np.int64), valid


def _context_run(valid: np.ndarray) -> np.ndarray:
  """For each position, how many consecutive valid bases precede it."""
  run = np.zeros(valid.size + 1, np.int64)
  idx = np.arange(valid.size)
  # Index of the last invalid position at or before i (-1 if none).
  last_invalid = np.maximum.accumulate(np.where(~valid, idx, -1))
  run[1:] = idx - last_invalid  # valid bases ending at i (inclusive)
  return run[:-1]  # ... ending just before i


def _kmer_codes(values: np.ndarray, order: int) -> np.ndarray:
  """codes[i] = base-4 number of values[i - order .. i] (i >= order)."""
  codes = np.zeros(values.size - order, np.int64)
  for j in range(order + 1):
    codes = codes * 4 + values[j : values.size - order + j]
  return codes


MAX_ORDER = 14  # its highest-order table alone: 4**15 int64 counts, 8.6 GB


class MarkovModel:
  """Order-k Markov chain with backoff; `alpha` is the additive smoothing."""

  def __init__(self, order: int, alpha: float = 0.5):
    if not 0 <= order <= MAX_ORDER:
      raise ValueError(f"Markov order must be in [0, {MAX_ORDER}], got {order}.")
    self.order = order
    self.alpha = alpha
    self.counts = [np.zeros(4 ** (j + 1), np.int64) for j in range(order + 1)]

  def fit(self, records: Iterable[np.ndarray]) -> MarkovModel:
    for tokens in records:
      values, valid = _bases(tokens)
      run = _context_run(valid)
      for j in range(self.order + 1):
        if values.size <= j:
          continue
        codes = _kmer_codes(values, j)
        usable = valid[j:] & (run[j:] >= j)
        self.counts[j] += np.bincount(codes[usable], minlength=4 ** (j + 1))
    return self

  def log2_probs(
    self, tokens: np.ndarray, doc_starts: np.ndarray | None = None
  ) -> tuple[np.ndarray, np.ndarray]:
    """Per-position log2 p(token | context) and the mask of scored positions.

    doc_starts: optional bool mask of the positions where a document starts
    (in a packed window); no context reaches back across one.
    """
    values, valid = _bases(tokens)
    context_len = np.minimum(_context_run(valid), self.order)
    if doc_starts is not None:
      idx = np.arange(values.size)
      last_start = np.maximum.accumulate(np.where(doc_starts, idx, 0))
      context_len = np.minimum(context_len, idx - last_start)
    out = np.zeros(values.size)
    for j in range(self.order + 1):
      positions = np.flatnonzero(valid & (context_len == j))
      if positions.size == 0:
        continue
      counts = self.counts[j].reshape(-1, 4)
      ctx = np.zeros(positions.size, np.int64)
      for back in range(j, 0, -1):
        ctx = ctx * 4 + values[positions - back]
      row = counts[ctx]
      p = (row[np.arange(positions.size), values[positions]] + self.alpha) / (
        row.sum(1) + 4 * self.alpha
      )
      out[positions] = np.log2(p)
    return out, valid
