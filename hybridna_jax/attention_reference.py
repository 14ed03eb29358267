"""The XLA references of causal grouped-query attention.

All take q (b, l, hq, d), k and v (b, l, hkv, d) with hq % hkv == 0, and
optional segment ids (b, l) int32: a query attends to keys at or before its
position with the same segment id, so packed documents never see each other.
Scores and softmax are fp32; the output has q's dtype.

* `xla_attention`: materialises the (l, l) scores; the reference every
  kernel (`hybridna_jax.kernels`, which import this module -- never the
  public `hybridna_jax.attention`) is tested against.
* `xla_blockwise_attention`: the same math with an online softmax over key
  blocks (`lax.scan`), O(l * block) memory; for long contexts on CPU. Its
  pieces (`blockwise_stats`, `merge_stats`, `finish_stats`) also compute
  attention across the context axis (`hybridna_jax.kernels.sharded`), where
  each device holds one slice of the queries and sees the keys slice by slice.
* `decode_attention`: new queries against a KV cache.
"""

from __future__ import annotations

from typing import NamedTuple

import einops
import jax
import jax.numpy as jnp

Array = jax.Array
_NEG_INF = -1e30  # finite, so fully masked rows give zeros rather than NaN


def _grouped(q: Array, hkv: int) -> Array:
  """(b, l, hq, d) -> (b, l, hkv, hq // hkv, d): the query heads that share
  each key/value head (GQA), consecutive in hq."""
  return einops.rearrange(q, "b l (h r) d -> b l h r d", h=hkv)


def _ungrouped(out: Array) -> Array:
  """(b, l, hkv, r, d) -> (b, l, hkv * r, d), the inverse of `_grouped`."""
  return einops.rearrange(out, "b l h r d -> b l (h r) d")


def xla_attention(q, k, v, segment_ids=None):
  """Reference: full score matrix."""
  b, l, hq, d = q.shape
  hkv = k.shape[2]
  scores = (
    jnp.einsum("bqhrd,bkhd->bhrqk", _grouped(q, hkv), k, preferred_element_type=jnp.float32)
    * d**-0.5
  )
  mask = jnp.tril(jnp.ones((l, l), bool))[None]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
  scores = jnp.where(mask[:, None, None], scores, _NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum(
    "bhrqk,bkhd->bqhrd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32
  )
  return _ungrouped(out).astype(q.dtype)


class SoftmaxStats(NamedTuple):
  """A partial attention result, before normalisation (fp32): running max m
  and sum s of the exp-scores (b, hkv, r, lq), and the weighted values acc
  (b, hkv, r, lq, d). Partials over disjoint key sets merge exactly
  (`merge_stats`); `finish_stats` divides out the sum."""

  m: Array
  s: Array
  acc: Array


def empty_stats(b: int, hkv: int, r: int, lq: int, d: int) -> SoftmaxStats:
  """The stats of attending to no key (merging with it is the identity)."""
  return SoftmaxStats(
    jnp.full((b, hkv, r, lq), _NEG_INF, jnp.float32),
    jnp.zeros((b, hkv, r, lq), jnp.float32),
    jnp.zeros((b, hkv, r, lq, d), jnp.float32),
  )


def merge_stats(a: SoftmaxStats, b: SoftmaxStats) -> SoftmaxStats:
  """The stats over the union of two disjoint key sets (online softmax)."""
  m = jnp.maximum(a.m, b.m)
  ca, cb = jnp.exp(a.m - m), jnp.exp(b.m - m)
  return SoftmaxStats(m, a.s * ca + b.s * cb, a.acc * ca[..., None] + b.acc * cb[..., None])


def finish_stats(stats: SoftmaxStats, dtype) -> Array:
  """(b, hkv, r, lq, d) stats -> the attention output (b, lq, hkv * r, d)."""
  out = stats.acc / stats.s[..., None]
  return einops.rearrange(out, "b h r q d -> b q (h r) d").astype(dtype)


def blockwise_stats(
  q: Array,
  k: Array,
  v: Array,
  q_pos: Array,
  k_pos: Array,
  q_seg: Array,
  k_seg: Array,
  *,
  block: int = 512,
) -> SoftmaxStats:
  """Online-softmax attention of queries to keys streamed in blocks: O(lq *
  block) live memory. A query sees a key at or before its position with the
  same segment id.

  Args:
    q: (b, lq, hq, d); k, v: (b, lk, hkv, d).
    q_pos: (lq,) and k_pos: (lk,) int32 global positions (the causal mask).
    q_seg: (b, lq) and k_seg: (b, lk) int32 segment ids.
    block: keys per step (lk is padded to a multiple; padded keys are masked).

  Returns:
    `SoftmaxStats` of (b, hkv, hq // hkv, lq[, d]).
  """
  b, lq, hq, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  block = min(block, lk)
  pad = (-lk) % block
  if pad:
    k = jnp.pad(k, [(0, 0), (0, pad), (0, 0), (0, 0)])
    v = jnp.pad(v, [(0, 0), (0, pad), (0, 0), (0, 0)])
    k_pos = jnp.pad(k_pos, [(0, pad)])
    k_seg = jnp.pad(k_seg, [(0, 0), (0, pad)], constant_values=-1)
  qg = _grouped(q, hkv)

  def body(stats, blk):
    kb, vb, segb, posb = blk
    scores = jnp.einsum("bqhrd,bkhd->bhrqk", qg, kb, preferred_element_type=jnp.float32) * d**-0.5
    mask = (q_pos[:, None] >= posb[None, :])[None] & (q_seg[:, :, None] == segb[:, None, :])
    scores = jnp.where(mask[:, None, None], scores, _NEG_INF)
    m = scores.max(-1)
    p = jnp.exp(scores - m[..., None])
    acc = jnp.einsum("bhrqk,bkhd->bhrqd", p.astype(v.dtype), vb, preferred_element_type=jnp.float32)
    return merge_stats(stats, SoftmaxStats(m, p.sum(-1), acc)), None

  # Key blocks first, the axis lax.scan walks.
  blocks = (
    einops.rearrange(k, "b (n k) h d -> n b k h d", k=block),
    einops.rearrange(v, "b (n k) h d -> n b k h d", k=block),
    einops.rearrange(k_seg, "b (n k) -> n b k", k=block),
    einops.rearrange(k_pos, "(n k) -> n k", k=block),
  )
  stats, _ = jax.lax.scan(jax.checkpoint(body), empty_stats(b, hkv, hq // hkv, lq, d), blocks)
  return stats


def xla_blockwise_attention(q, k, v, segment_ids=None, *, block: int = 512):
  """Online-softmax attention over key blocks: O(l * block) live memory.

  Queries are processed whole; keys/values stream in blocks of `block`.
  """
  b, l = q.shape[:2]
  seg = jnp.zeros((b, l), jnp.int32) if segment_ids is None else segment_ids
  pos = jnp.arange(l)
  return finish_stats(blockwise_stats(q, k, v, pos, pos, seg, seg, block=block), q.dtype)


def decode_attention(q: Array, k_cache: Array, v_cache: Array, kv_mask: Array) -> Array:
  """Attention of new queries against a KV cache.

  Args:
    q: (b, t, hq, d) queries for t new positions.
    k_cache, v_cache: (b, s, hkv, d).
    kv_mask: (b, t, s) bool, True where query i may read cache slot j.

  Returns:
    (b, t, hq, d) in q.dtype.
  """
  b, t, hq, d = q.shape
  hkv = k_cache.shape[2]
  scores = (
    jnp.einsum("bqhrd,bkhd->bhrqk", _grouped(q, hkv), k_cache, preferred_element_type=jnp.float32)
    * d**-0.5
  )
  scores = jnp.where(kv_mask[:, None, None], scores, _NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum(
    "bhrqk,bkhd->bqhrd", probs.astype(v_cache.dtype), v_cache, preferred_element_type=jnp.float32
  )
  return _ungrouped(out).astype(q.dtype)
