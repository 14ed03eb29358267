"""The XLA references of causal grouped-query attention.

All take q (b, l, hq, d), k and v (b, l, hkv, d) with hq % hkv == 0, and
optional segment ids (b, l) int32: a query attends to keys at or before its
position with the same segment id, so packed documents never see each other.
Scores and softmax are fp32; the output has q's dtype.

* `xla_attention`: materialises the (l, l) scores; the reference every
  kernel (`hybridna_jax.kernels`, which import this module -- never the
  public `hybridna_jax.attention`) is tested against.
* `xla_blockwise_attention`: the same math with an online softmax over key
  blocks (`lax.scan`) and a flash-attention backward, O(l * block) memory;
  for long contexts on CPU. Its core, `blockwise_attention_lse`, returns the
  log-sum-exp too, so partial results merge (`merge_partials`): that is how
  attention crosses the context axis (`hybridna_jax.kernels.sharded`), where
  each device holds one slice of the queries and sees the keys slice by slice.
* `BlockAttention`: the contract of one such (query slice, key slice) block
  with its own backward, which the kernels implement too; `XLA_BLOCK` is the
  XLA one.
* `decode_attention`: new queries against a KV cache.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import einops
import jax
import jax.numpy as jnp

Array = jax.Array
NEG_INF = -1e30  # finite, so fully masked rows give zeros rather than NaN


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
  scores = jnp.where(mask[:, None, None], scores, NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum(
    "bhrqk,bkhd->bqhrd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32
  )
  return _ungrouped(out).astype(q.dtype)


def _key_blocks(k, v, k_pos, k_seg, block: int):
  """Keys, values, positions and segment ids in blocks, block axis first (the
  axis lax.scan walks); lk is padded to a multiple of `block` with keys that
  no query sees (segment -1)."""
  pad = (-k.shape[1]) % block
  if pad:
    k = jnp.pad(k, [(0, 0), (0, pad), (0, 0), (0, 0)])
    v = jnp.pad(v, [(0, 0), (0, pad), (0, 0), (0, 0)])
    k_pos = jnp.pad(k_pos, [(0, pad)])
    k_seg = jnp.pad(k_seg, [(0, 0), (0, pad)], constant_values=-1)
  return (
    einops.rearrange(k, "b (n k) h d -> n b k h d", k=block),
    einops.rearrange(v, "b (n k) h d -> n b k h d", k=block),
    einops.rearrange(k_pos, "(n k) -> n k", k=block),
    einops.rearrange(k_seg, "b (n k) -> n b k", k=block),
  )


def _block_scores(qg, kb, q_pos, posb, q_seg, segb):
  """Scaled scores (b, hkv, r, lq, block) fp32 and the mask of visible keys."""
  d = qg.shape[-1]
  scores = jnp.einsum("bqhrd,bkhd->bhrqk", qg, kb, preferred_element_type=jnp.float32) * d**-0.5
  mask = (q_pos[:, None] >= posb[None, :])[None] & (q_seg[:, :, None] == segb[:, None, :])
  return scores, mask[:, None, None]


def _attention_lse_fwd(q, k, v, q_pos, k_pos, q_seg, k_seg, block):
  b, lq, hq, d = q.shape
  hkv = k.shape[2]
  qg = _grouped(q, hkv)

  def body(carry, blk):
    m, s, acc = carry
    kb, vb, posb, segb = blk
    scores, mask = _block_scores(qg, kb, q_pos, posb, q_seg, segb)
    scores = jnp.where(mask, scores, NEG_INF)
    m_new = jnp.maximum(m, scores.max(-1))
    correction = jnp.exp(m - m_new)
    p = jnp.exp(scores - m_new[..., None])
    acc = acc * correction[..., None] + jnp.einsum(
      "bhrqk,bkhd->bhrqd", p.astype(v.dtype), vb, preferred_element_type=jnp.float32
    )
    return (m_new, s * correction + p.sum(-1), acc), None

  r = hq // hkv
  init = (
    jnp.full((b, hkv, r, lq), NEG_INF, jnp.float32),
    jnp.zeros((b, hkv, r, lq), jnp.float32),
    jnp.zeros((b, hkv, r, lq, d), jnp.float32),
  )
  (m, s, acc), _ = jax.lax.scan(body, init, _key_blocks(k, v, k_pos, k_seg, block))
  out = einops.rearrange(acc / s[..., None], "b h r q d -> b q (h r) d")
  lse = einops.rearrange(m + jnp.log(s), "b h r q -> b q (h r)")
  return (out, lse), (q, k, v, q_pos, k_pos, q_seg, k_seg, out, lse)


def _attention_lse_grads(q, k, v, q_pos, k_pos, q_seg, k_seg, out, lse, d_out, d_lse, block):
  """The flash-attention backward: scores are recomputed block by block from
  the saved log-sum-exp, so memory stays O(lq * block). With lse an output
  too, ds = p (dp - delta + dlse), delta = sum(dout * out). Returns dq, dk,
  dv in fp32 (`out` and `lse` may be those of a larger key set: the ring's
  backward passes the merged ones)."""
  hkv = k.shape[2]
  lk = k.shape[1]
  qg = _grouped(q, hkv)
  do = _grouped(d_out.astype(jnp.float32), hkv)  # (b, lq, hkv, r, d)
  delta = jnp.einsum("bqhrd,bqhrd->bhrq", do, _grouped(out.astype(jnp.float32), hkv))
  lse_g = einops.rearrange(lse, "b q (h r) -> b h r q", h=hkv)
  scale = q.shape[-1] ** -0.5
  if d_lse is not None:
    delta = delta - einops.rearrange(d_lse.astype(jnp.float32), "b q (h r) -> b h r q", h=hkv)

  def body(dq, blk):
    kb, vb, posb, segb = blk
    scores, mask = _block_scores(qg, kb, q_pos, posb, q_seg, segb)
    p = jnp.where(mask, jnp.exp(scores - lse_g[..., None]), 0.0)
    dv = jnp.einsum("bhrqk,bqhrd->bkhd", p, do)
    dp = jnp.einsum("bqhrd,bkhd->bhrqk", do, vb, preferred_element_type=jnp.float32)
    ds = p * (dp - delta[..., None])
    dq = dq + jnp.einsum("bhrqk,bkhd->bqhrd", ds, kb, preferred_element_type=jnp.float32) * scale
    dk = jnp.einsum("bhrqk,bqhrd->bkhd", ds, qg, preferred_element_type=jnp.float32) * scale
    return dq, (dk, dv)

  dq, (dk, dv) = jax.lax.scan(
    body, jnp.zeros(qg.shape, jnp.float32), _key_blocks(k, v, k_pos, k_seg, block)
  )
  dk = einops.rearrange(dk, "n b k h d -> b (n k) h d")[:, :lk]
  dv = einops.rearrange(dv, "n b k h d -> b (n k) h d")[:, :lk]
  return _ungrouped(dq), dk, dv


def _attention_lse_bwd(block, residuals, cotangents):
  q, k, v, q_pos, k_pos, q_seg, k_seg, out, lse = residuals
  d_out, d_lse = cotangents
  dq, dk, dv = _attention_lse_grads(
    q, k, v, q_pos, k_pos, q_seg, k_seg, out, lse, d_out, d_lse, block
  )
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _attention_lse(q, k, v, q_pos, k_pos, q_seg, k_seg, block):
  return _attention_lse_fwd(q, k, v, q_pos, k_pos, q_seg, k_seg, block)[0]


_attention_lse.defvjp(_attention_lse_fwd, _attention_lse_bwd)


def blockwise_attention_lse(
  q: Array,
  k: Array,
  v: Array,
  q_pos: Array,
  k_pos: Array,
  q_seg: Array,
  k_seg: Array,
  *,
  block: int = 512,
) -> tuple[Array, Array]:
  """Attention of queries to keys streamed in blocks (online softmax), with
  the log-sum-exp of the scores, so that partial results over disjoint key
  sets merge exactly (`merge_partials`). A query sees a key at or before its
  position with the same segment id. Memory is O(lq * block) in the forward
  and the backward (a flash-attention backward that recomputes the scores).

  Args:
    q: (b, lq, hq, d); k, v: (b, lk, hkv, d).
    q_pos: (lq,) and k_pos: (lk,) int32 global positions (the causal mask).
    q_seg: (b, lq) and k_seg: (b, lk) int32 segment ids.
    block: keys per step.

  Returns:
    out (b, lq, hq, d) fp32 and lse (b, lq, hq) fp32 (about -1e30 for a
    query that sees no key; its out is then meaningless and weighs nothing
    in a merge).
  """
  return _attention_lse(q, k, v, q_pos, k_pos, q_seg, k_seg, min(block, k.shape[1]))


def no_keys(b: int, lq: int, hq: int, d: int) -> tuple[Array, Array]:
  """(out, lse) of attending to no key: the identity of `merge_partials`."""
  return jnp.zeros((b, lq, hq, d), jnp.float32), jnp.full((b, lq, hq), NEG_INF, jnp.float32)


def merge_partials(a: tuple[Array, Array], b: tuple[Array, Array]) -> tuple[Array, Array]:
  """(out, lse) over the union of two disjoint key sets."""
  lse = jnp.logaddexp(a[1], b[1])
  # Each weight exp(part - lse) <= 1. The clamp keeps it so when XLA
  # recomputes lse in a fusion: near -1e30 (a query that sees no key yet)
  # one ulp is ~1e23, and exp of that overflows.
  weight = lambda part: jnp.exp(jnp.minimum(part - lse, 0.0))[..., None]
  return a[0] * weight(a[1]) + b[0] * weight(b[1]), lse


def xla_blockwise_attention(q, k, v, segment_ids=None, *, block: int = 512):
  """Online-softmax attention over key blocks: O(l * block) memory, forward
  and backward (`blockwise_attention_lse`)."""
  b, l = q.shape[:2]
  seg = jnp.zeros((b, l), jnp.int32) if segment_ids is None else segment_ids
  pos = jnp.arange(l)
  out, _ = blockwise_attention_lse(q, k, v, pos, pos, seg, seg, block=block)
  return out.astype(q.dtype)


# ---------------------------------------------------------------------------
# One block of context-parallel attention


def _always_supported(q_shape) -> str | None:
  del q_shape
  return None


@dataclasses.dataclass(frozen=True)
class BlockAttention:
  """Attention of one query slice to one key slice, as the context ring
  (`hybridna_jax.kernels.sharded`) calls it at each step: `XLA_BLOCK` here,
  the kernels' in `hybridna_jax.kernels.attention_kernels`.

  forward(q, k, v, q_seg, k_seg, causal) -> (out, lse): q (b, lq, hq, d), k
    and v (b, lk, hkv, d), q_seg (b, lq) and k_seg (b, lk) int32, `causal` a
    Python bool. Query r sees key c when their segment ids are equal and, if
    causal, r >= c (both slices start at the same position, lq >= lk). out
    (b, lq, hq, d) and lse (b, lq, hq) (natural log), fp32.
  backward(q, k, v, q_seg, k_seg, causal, out, lse, d_out) -> (dq, dk, dv)
    fp32: this block's share of the gradients, given the output and lse of
    each query over all its keys (the merged result of the ring) and the
    output's cotangent (flash attention's backward needs nothing else).
  length_multiple: slice lengths must be multiples of it.
  unsupported(q_shape) -> why the block cannot run these shapes, or None.
  """

  name: str
  forward: Callable[..., tuple[Array, Array]]
  backward: Callable[..., tuple[Array, Array, Array]]
  length_multiple: int = 1
  unsupported: Callable[[tuple[int, ...]], str | None] = _always_supported


def _block_positions(lq: int, lk: int, causal: bool) -> tuple[Array, Array]:
  """Query and key positions whose comparison is the block's mask: causal
  (query r sees key c <= r) or full (every query after every key)."""
  return jnp.arange(lq) + (0 if causal else lk), jnp.arange(lk)


def _xla_block_forward(q, k, v, q_seg, k_seg, causal, block=512):
  q_pos, k_pos = _block_positions(q.shape[1], k.shape[1], causal)
  (out, lse), _ = _attention_lse_fwd(q, k, v, q_pos, k_pos, q_seg, k_seg, min(block, k.shape[1]))
  return out, lse


def _xla_block_backward(q, k, v, q_seg, k_seg, causal, out, lse, d_out, block=512):
  q_pos, k_pos = _block_positions(q.shape[1], k.shape[1], causal)
  return _attention_lse_grads(
    q, k, v, q_pos, k_pos, q_seg, k_seg, out, lse, d_out, None, min(block, k.shape[1])
  )


XLA_BLOCK = BlockAttention("xla", _xla_block_forward, _xla_block_backward)


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
  scores = jnp.where(kv_mask[:, None, None], scores, NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum(
    "bhrqk,bkhd->bqhrd", probs.astype(v_cache.dtype), v_cache, preferred_element_type=jnp.float32
  )
  return _ungrouped(out).astype(q.dtype)
