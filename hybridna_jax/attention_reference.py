"""The XLA references of causal grouped-query attention.

All take q (b, l, hq, d), k and v (b, l, hkv, d) with hq % hkv == 0, and
optional segment ids (b, l) int32: a query attends to keys at or before its
position with the same segment id, so packed documents never see each other.
Scores and softmax are fp32; the output has q's dtype.

* `xla_attention`: materialises the (l, l) scores; the reference every
  kernel (`hybridna_jax.kernels`, which import this module -- never the
  public `hybridna_jax.attention`) is tested against.
* `xla_blockwise_attention`: the same math with an online softmax over key
  blocks (`lax.scan`), O(l * block) memory; for long contexts on CPU.
* `decode_attention`: new queries against a KV cache.
"""

from __future__ import annotations

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


def xla_blockwise_attention(q, k, v, segment_ids=None, *, block: int = 512):
  """Online-softmax attention over key blocks: O(l * block) live memory.

  Queries are processed whole; keys/values stream in blocks of `block`
  (the sequence is padded to a multiple, padded keys are masked).
  """
  b, l, hq, d = q.shape
  hkv = k.shape[2]
  block = min(block, l)
  pad = (-l) % block
  seg = jnp.zeros((b, l), jnp.int32) if segment_ids is None else segment_ids
  if pad:
    k = jnp.pad(k, [(0, 0), (0, pad), (0, 0), (0, 0)])
    v = jnp.pad(v, [(0, 0), (0, pad), (0, 0), (0, 0)])
  kv_seg = jnp.pad(seg, [(0, 0), (0, pad)], constant_values=-1)
  qg = _grouped(q, hkv)
  q_pos = jnp.arange(l)

  def body(carry, blk):
    m, s, acc = carry
    kb, vb, segb, start = blk
    scores = jnp.einsum("bqhrd,bkhd->bhrqk", qg, kb, preferred_element_type=jnp.float32) * d**-0.5
    k_pos = start + jnp.arange(block)
    mask = (q_pos[:, None] >= k_pos[None, :])[None] & (seg[:, :, None] == segb[:, None, :])
    scores = jnp.where(mask[:, None, None], scores, _NEG_INF)
    m_new = jnp.maximum(m, scores.max(-1))
    correction = jnp.exp(m - m_new)
    p = jnp.exp(scores - m_new[..., None])
    s = s * correction + p.sum(-1)
    acc = acc * correction[..., None] + jnp.einsum(
      "bhrqk,bkhd->bhrqd", p.astype(v.dtype), vb, preferred_element_type=jnp.float32
    )
    return (m_new, s, acc), None

  r = hq // hkv
  init = (
    jnp.full((b, hkv, r, l), _NEG_INF, jnp.float32),
    jnp.zeros((b, hkv, r, l), jnp.float32),
    jnp.zeros((b, hkv, r, l, d), jnp.float32),
  )
  # Key blocks first, the axis lax.scan walks.
  blocks = (
    einops.rearrange(k, "b (n k) h d -> n b k h d", k=block),
    einops.rearrange(v, "b (n k) h d -> n b k h d", k=block),
    einops.rearrange(kv_seg, "b (n k) -> n b k", k=block),
    jnp.arange((l + pad) // block) * block,
  )
  (_, s, acc), _ = jax.lax.scan(jax.checkpoint(body), init, blocks)
  out = acc / s[..., None]
  return einops.rearrange(out, "b h r q d -> b q (h r) d").astype(q.dtype)


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
