"""Causal attention that computes only the blocks the mask keeps (the CPU path).

The dense reference (`attention_reference.xla_attention`) scores every
(query, key) pair and masks half of them away; its (l, l) scores also leave
the caches at a few thousand tokens, so on a CPU one attention layer in eight
took three quarters of the model's time. Here the sequence is cut into blocks
of `block` tokens, and query block i visits key blocks 0..i only (a
`fori_loop` with a dynamic bound), with an online softmax; the key blocks of
other documents (disjoint segment-id ranges) are skipped as well. The
backward is flash-attention's: scores are recomputed from the saved
log-sum-exp, so memory stays O(l * block) both ways.

The r = hq / hkv query heads that share a KV head are stacked as r * block
rows, so each product is one matmul per KV head with a single contracted
axis. With (r, block) as two axes, XLA:CPU transposed the (block, r, block)
probabilities for one product and computed them a second time for another.
The block size follows the caches: 512 while one pair's scores (b * hq *
block^2 fp32) fit in 4 MiB, else 256 -- the faster of the two on a 2-core
CPU at each of the demo's shapes (benchmarks/RESULTS.md, "Speed on CPU").

Same contract as the references: q (b, l, hq, d), k and v (b, l, hkv, d),
segment ids (b, l) int32 or None; fp32 scores and softmax, output in q's
dtype.
"""

from __future__ import annotations

import functools

import einops
import jax
import jax.numpy as jnp

from hybridna_jax import attention_reference
from hybridna_jax.kernels import sharded

Array = jax.Array
_NEG_INF = attention_reference.NEG_INF


def _key_blocks(x: Array, block: int) -> Array:
  """(b, n * block, hkv, d) -> (n, b, hkv, block, d)."""
  return einops.rearrange(x, "b (n t) h d -> n b h t d", t=block)


class _Blocked:
  """The operands cut into blocks, and the block-pair masks.

  Attributes:
    q: (n, b, hkv, rows, d) with rows = r * block (query head major).
    k, v: (n, b, hkv, block, d).
    seg: (n, b, block) int32 segment ids.
    seg_lo, seg_hi: (n, b) each block's smallest and largest segment id.
    has_segments: False when no segment ids were given (all 0): no pair is
      skipped, and only the diagonal blocks are masked.
  """

  def __init__(self, q, k, v, seg, block: int, has_segments: bool):
    hkv = k.shape[2]
    self.has_segments = has_segments
    self.block = block
    self.heads_per_kv = q.shape[2] // hkv
    self.scale = q.shape[-1] ** -0.5
    self.q = self.rows(q)
    self.k = _key_blocks(k, block)
    self.v = _key_blocks(v, block)
    self.seg = einops.rearrange(seg, "b (n t) -> n b t", t=block)
    self.seg_lo, self.seg_hi = self.seg.min(-1), self.seg.max(-1)
    self.causal = jnp.tril(jnp.ones((block, block), bool))

  def rows(self, x: Array) -> Array:
    """(b, n * block, hq, ...) -> (n, b, hkv, rows, ...), like q."""
    return einops.rearrange(
      x, "b (n t) (h r) ... -> n b h (r t) ...", t=self.block, r=self.heads_per_kv
    )

  def unrows(self, x: Array) -> Array:
    """(n, b, hkv, rows, d) -> (b, n * block, hq, d)."""
    return einops.rearrange(x, "n b h (r t) d -> b (n t) (h r) d", t=self.block)

  def visit(self, i, j, step, carry):
    """`step(carry, segments)` for block pair (i, j), where `segments` says
    whether its mask must compare segment ids; carry where the pair holds
    no visible key.

    Overlapping segment-id ranges in some row are necessary for a shared
    id, so pairs that fail this are skipped (exact for packed, sorted ids).
    Pairs whose two blocks lie in one document in every row need only the
    causal mask (in a long genome, nearly all of them)."""
    if not self.has_segments:
      return step(carry, False)
    lo_i, hi_i, lo_j, hi_j = self.seg_lo[i], self.seg_hi[i], self.seg_lo[j], self.seg_hi[j]
    shares = jnp.any((lo_i <= hi_j) & (lo_j <= hi_i))
    one_document = jnp.all((lo_i == hi_i) & (lo_j == hi_j) & (lo_i == lo_j))
    branch = jnp.where(one_document, 2, shares.astype(jnp.int32))
    steps = (lambda c: c, lambda c: step(c, True), lambda c: step(c, False))
    return jax.lax.switch(branch, steps, carry)

  def scores(self, i, j) -> Array:
    """Scaled scores (b, hkv, rows, block) fp32 of query block i against key
    block j <= i."""
    s = jnp.einsum("bhRd,bhkd->bhRk", self.q[i], self.k[j], preferred_element_type=jnp.float32)
    return s * self.scale

  def scores_by_key(self, i, j) -> Array:
    """The same scores transposed, (b, hkv, block, rows): the layout in
    which dk, dv and (transposed) dq are plain matmuls."""
    s = jnp.einsum("bhkd,bhRd->bhkR", self.k[j], self.q[i], preferred_element_type=jnp.float32)
    return s * self.scale

  def where_visible(self, i, j, x: Array, fill: float, segments: bool, by_key=False) -> Array:
    """x (b, hkv, rows, block), or (b, hkv, block, rows) `by_key`, with the
    pairs the mask hides set to `fill`; `segments`: compare segment ids.
    The mask broadcasts over the r heads of a row block (a tiled mask cost
    more than the select)."""
    b, hkv = x.shape[:2]
    mask = self._mask(i, j, segments)  # (b or 1, block_q, block_k)
    if by_key:
      shape, mask = (b, hkv, self.block, -1, self.block), mask.swapaxes(1, 2)[:, None, :, None]
    else:
      shape, mask = (b, hkv, -1, self.block, self.block), mask[:, None, None]
    return jnp.where(mask, x.reshape(shape), fill).reshape(x.shape)

  def _mask(self, i, j, segments: bool) -> Array:
    """(b or 1, block_q, block_k) bool: on the diagonal causal, and with
    `segments`, the same document."""
    causal = jnp.where(i == j, self.causal, True)[None]
    if not segments:
      return causal
    return causal & (self.seg[i][:, :, None] == self.seg[j][:, None, :])


def _forward(blk: _Blocked):
  """(out (n, b, hkv, rows, d) fp32, lse (n, b, hkv, rows) fp32)."""
  n, b, hkv, rows, d = blk.q.shape

  def query_block(i):
    def key_block(j, carry):
      def step(carry, segments):
        m, s, acc = carry
        scores = blk.where_visible(i, j, blk.scores(i, j), _NEG_INF, segments)
        m_new = jnp.maximum(m, scores.max(-1))
        correction = jnp.exp(m - m_new)
        p = jnp.exp(scores - m_new[..., None])
        pv = jnp.einsum(
          "bhRk,bhkd->bhRd", p.astype(blk.v.dtype), blk.v[j], preferred_element_type=jnp.float32
        )
        return m_new, s * correction + p.sum(-1), acc * correction[..., None] + pv

      return blk.visit(i, j, step, carry)

    init = (
      jnp.full((b, hkv, rows), _NEG_INF, jnp.float32),
      jnp.zeros((b, hkv, rows), jnp.float32),
      jnp.zeros((b, hkv, rows, d), jnp.float32),
    )
    m, s, acc = jax.lax.fori_loop(0, i + 1, key_block, init)
    # Every query sees at least itself, so s >= 1 (padding included).
    return acc / s[..., None], m + jnp.log(s)

  return jax.lax.map(query_block, jnp.arange(n))


def _backward(blk: _Blocked, out, lse, d_out):
  """dq (n, b, hkv, rows, d) and dk, dv (n, b, hkv, block, d), fp32.

  One pass over the visited pairs, key block by key block (j outer, query
  blocks i >= j inner): dk_j and dv_j accumulate in the inner loop's carry,
  and each pair adds its share of dq_i, kept transposed as (d, rows) so that
  it too is a plain matmul, into a whole-sequence buffer that the loops
  update in place. Five matmuls a pair, and one exp."""
  n, b, hkv, rows, d = blk.q.shape
  do = blk.rows(d_out.astype(jnp.float32))
  delta = jnp.einsum("nbhRd,nbhRd->nbhR", do, out)

  def key_column(j, dq_t):
    k_t = blk.k[j].swapaxes(-1, -2).astype(jnp.float32)  # (b, hkv, d, block)

    def query_block(i, carry):
      def step(carry, segments):
        dk_j, dv_j, _ = carry
        p = jnp.exp(blk.scores_by_key(i, j) - lse[i][:, :, None])
        p = blk.where_visible(i, j, p, 0.0, segments, by_key=True)
        dp = jnp.einsum("bhkd,bhRd->bhkR", blk.v[j], do[i], preferred_element_type=jnp.float32)
        ds = p * (dp - delta[i][:, :, None]) * blk.scale
        dk_j += jnp.einsum("bhkR,bhRd->bhkd", ds, blk.q[i], preferred_element_type=jnp.float32)
        dv_j += jnp.einsum("bhkR,bhRd->bhkd", p, do[i])
        return dk_j, dv_j, jnp.einsum("bhdk,bhkR->bhdR", k_t, ds)

      # The whole-sequence dq buffer stays outside the pair's branches:
      # passed through a conditional, it was copied at every pair.
      dk_j, dv_j, dq_t = carry
      dk_j, dv_j, dq_ij = blk.visit(i, j, step, (dk_j, dv_j, jnp.zeros_like(dq_t[i])))
      return dk_j, dv_j, jax.lax.dynamic_update_index_in_dim(dq_t, dq_t[i] + dq_ij, i, 0)

    zeros = jnp.zeros(blk.k.shape[1:], jnp.float32)  # (b, hkv, block, d)
    dk_j, dv_j, dq_t = jax.lax.fori_loop(j, n, query_block, (zeros, zeros, dq_t))
    return dq_t, (dk_j, dv_j)

  dq_t = jnp.zeros((n, b, hkv, d, rows), jnp.float32)
  dq_t, (dk, dv) = jax.lax.scan(lambda dq_t, j: key_column(j, dq_t), dq_t, jnp.arange(n))
  return dq_t.swapaxes(-1, -2), dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, seg, block, has_segments):
  return _attention_fwd(q, k, v, seg, block, has_segments)[0]


def _attention_fwd(q, k, v, seg, block, has_segments):
  blk = _Blocked(q, k, v, seg, block, has_segments)
  out, lse = _forward(blk)
  return blk.unrows(out), (q, k, v, seg, out, lse)


def _attention_bwd(block, has_segments, residuals, d_out):
  q, k, v, seg, out, lse = residuals
  blk = _Blocked(q, k, v, seg, block, has_segments)
  dq, dk, dv = _backward(blk, out, lse, d_out)
  dk = einops.rearrange(dk, "n b h t d -> b (n t) h d")
  dv = einops.rearrange(dv, "n b h t d -> b (n t) h d")
  return blk.unrows(dq).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)


_SCORES_BYTES = 4 << 20  # one block pair's fp32 scores, for the automatic block size


def auto_block(batch: int, query_heads: int) -> int:
  """512 if one pair's (batch, query_heads, 512, 512) fp32 scores fit in 4
  MiB, else 256."""
  return 512 if batch * query_heads * 512 * 512 * 4 <= _SCORES_BYTES else 256


def causal_block_attention(q, k, v, segment_ids=None, *, block: int | None = None):
  """Causal GQA attention over the block pairs the mask keeps.

  Args:
    q: (b, l, hq, d); k, v: (b, l, hkv, d), hq % hkv == 0.
    segment_ids: (b, l) int32 or None.
    block: queries and keys per block (None: `auto_block`); a sequence
      shorter than it is one block, a longer one is padded to a multiple
      (the padding comes after every real position, so the causal mask
      hides it).

  Returns:
    (b, l, hq, d) in q.dtype.
  """
  b, l, hq = q.shape[:3]
  block = min(block or auto_block(b, hq), l)
  pad = (-l) % block
  has_segments = segment_ids is not None
  seg = jnp.zeros((b, l), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  if pad:
    widths = [(0, 0), (0, pad), (0, 0), (0, 0)]
    q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
    seg = jnp.pad(seg, [(0, 0), (0, pad)], mode="edge")
  out = _attention(q, k, v, seg, block, has_segments)
  return out[:, :l].astype(q.dtype)


# The entry point of `hybridna_jax.attention.KERNELS`, run per shard on the
# active mesh (rows over data/fsdp, heads over tensor).
sharded_causal_blocks = sharded.shard_attention(causal_block_attention)
