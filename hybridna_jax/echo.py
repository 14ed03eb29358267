"""Echo inputs and pooling for sequence-level tasks.

The model is causal, so a position has seen only what precedes it. Echo
embeddings feed the sequence twice, `s <sep> s`, and read the second copy:
each of its positions has seen the whole sequence. A right-padded row of a
batch of width W, for a sequence of n tokens:

    echo:   s_0 .. s_{n-1} <sep> s_0 .. s_{n-1} <pad> ...   (2n + 1 real)
            pool_mask = 1 on positions n+1 .. 2n
    plain:  s_0 .. s_{n-1} <pad> ...                         (n real)
            pool_mask = 1 on positions 0 .. n-1

segment_ids are 1 on real positions and 0 on padding (the model's padding
convention), so pads affect nothing, and pooling reads only `pool_mask`
positions: "mean" averages them, "last" takes the last one. RC-echo builds
the same row for the reverse-complement strand; it has the same length, so
`segment_ids` and `pool_mask` serve both strands.

Host side (numpy): `build_row`, `build_batch`. Device side (jax): `pool`.
Shared by `hybridna_jax.scoring` (echo embeddings) and `hybridna_jax.finetune`
(echo heads), so neither imports the other.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hybridna_jax import tokenizer
from hybridna_jax.config import POOL_MODES


def input_length(num_tokens: int, echo: bool) -> int:
  """Real positions of the model input for a sequence of `num_tokens`."""
  return 2 * num_tokens + 1 if echo else num_tokens


def padded_width(max_tokens: int, echo: bool, multiple: int = 1) -> int:
  """The batch width for sequences of up to `max_tokens`, rounded up to a
  multiple of `multiple`."""
  multiple = max(int(multiple), 1)
  return -(-input_length(max_tokens, echo) // multiple) * multiple


def crop_center(tokens, max_tokens: int):
  """The central `max_tokens` of a longer sequence, (n,) tokens or a string
  (unchanged if shorter)."""
  if max_tokens <= 0 or len(tokens) <= max_tokens:
    return tokens
  start = (len(tokens) - max_tokens) // 2
  return tokens[start : start + max_tokens]


def build_row(tokens: np.ndarray, width: int, echo: bool):
  """One right-padded model input.

  Args:
    tokens: int (n,) nucleotide tokens, n >= 1.
    width: the padded length W >= input_length(n, echo).

  Returns:
    inputs int32 (W,), segment_ids int32 (W,), pool_mask float32 (W,).
  """
  n = int(tokens.size)
  real = input_length(n, echo)
  if n == 0:
    raise ValueError("empty sequence")
  if real > width:
    raise ValueError(
      f"a sequence of {n} nt needs {real} positions "
      f"({'echo' if echo else 'plain'}), more than the width {width}."
    )
  inputs = np.zeros((width,), np.int32)  # <pad> = 0
  pool_mask = np.zeros((width,), np.float32)
  inputs[:n] = tokens
  if echo:
    inputs[n] = tokenizer.SEP
    inputs[n + 1 : real] = tokens
    pool_mask[n + 1 : real] = 1.0
  else:
    pool_mask[:n] = 1.0
  segment_ids = np.zeros((width,), np.int32)
  segment_ids[:real] = 1
  return inputs, segment_ids, pool_mask


def build_batch(
  sequences: Sequence[np.ndarray], width: int, *, echo: bool, reverse_strand: bool = False
) -> dict[str, np.ndarray]:
  """Model inputs for a batch of token rows.

  Returns:
    {"inputs": int32 (B, W), "segment_ids": int32 (B, W),
     "pool_mask": float32 (B, W)}, plus "rc_inputs" int32 (B, W) (the
    reverse-complement strand, same layout) with `reverse_strand`.
  """
  rows = [build_row(np.asarray(s), width, echo) for s in sequences]
  batch = {
    "inputs": np.stack([r[0] for r in rows]),
    "segment_ids": np.stack([r[1] for r in rows]),
    "pool_mask": np.stack([r[2] for r in rows]),
  }
  if reverse_strand:
    batch["rc_inputs"] = np.stack(
      [build_row(tokenizer.reverse_complement_nucleotides(s), width, echo)[0] for s in sequences]
    )
  return batch


def pool(hidden: jax.Array, pool_mask: jax.Array, mode: str) -> jax.Array:
  """Pools (b, l, d) hidden states over the `pool_mask` positions (b, l).

  "mean": the average over masked positions; "last": the last masked
  position. Returns float32 (b, d); rows with no masked position give 0.
  """
  mask = pool_mask.astype(jnp.float32)
  if mode == "mean":
    total = jnp.einsum("bld,bl->bd", hidden.astype(jnp.float32), mask)
    return total / jnp.maximum(mask.sum(axis=1), 1.0)[:, None]
  if mode == "last":
    positions = jnp.arange(mask.shape[1], dtype=jnp.int32)
    last = jnp.max(jnp.where(mask > 0, positions, -1), axis=1)  # (b,)
    picked = jnp.take_along_axis(hidden, jnp.maximum(last, 0)[:, None, None], axis=1)[:, 0]
    return jnp.where((last >= 0)[:, None], picked.astype(jnp.float32), 0.0)
  raise ValueError(f"finetune.pool must be one of {POOL_MODES}, got {mode!r}.")
