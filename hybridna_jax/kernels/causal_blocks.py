"""Causal attention that computes only the blocks the mask keeps (the CPU path).

The dense reference (`attention_reference.xla_attention`) scores every
(query, key) pair and masks half of them away; its (l, l) scores also leave
the caches at a few thousand tokens, so on a CPU one attention layer in eight
took three quarters of the model's time. Here the sequence is cut into blocks
of `block` tokens, and query block i visits key blocks 0..i only (a
`fori_loop` with a dynamic bound), with an online softmax; the key blocks of
other documents (disjoint segment-id ranges) are skipped as well. The
backward is flash-attention's: scores are recomputed from the saved
log-sum-exp, so memory stays O(l * block) both ways. Blocks of 256 were
the fastest on a 2-core CPU at the demo's sizes (128 and 512 slower;
benchmarks/RESULTS.md, "Speed on CPU").

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


def _blocks(x: Array, block: int, hkv: int) -> Array:
  """(b, n * block, hkv * r, d) -> (n, b, hkv, r, block, d)."""
  return einops.rearrange(x, "b (n t) (h r) d -> n b h r t d", t=block, h=hkv)


def _unblocks(x: Array) -> Array:
  """(n, b, hkv, r, block, d) -> (b, n * block, hkv * r, d)."""
  return einops.rearrange(x, "n b h r t d -> b (n t) (h r) d")


class _Blocked:
  """The operands cut into blocks, and the block-pair masks.

  Attributes:
    q: (n, b, hkv, r, block, d); k, v: (n, b, hkv, 1, block, d).
    seg: (n, b, block) int32 segment ids.
    seg_lo, seg_hi: (n, b) each block's smallest and largest segment id.
  """

  def __init__(self, q, k, v, seg, block: int):
    hkv = k.shape[2]
    self.block = block
    self.scale = q.shape[-1] ** -0.5
    self.q = _blocks(q, block, hkv)
    self.k = _blocks(k, block, hkv)
    self.v = _blocks(v, block, hkv)
    self.seg = einops.rearrange(seg, "b (n t) -> n b t", t=block)
    self.seg_lo, self.seg_hi = self.seg.min(-1), self.seg.max(-1)
    self.causal = jnp.tril(jnp.ones((block, block), bool))

  def shares_a_document(self, i, j) -> Array:
    """() bool: may any query of block i see a key of block j? Overlapping
    segment-id ranges in some row are necessary for a shared id, so blocks
    that fail this hold no visible pair (exact for packed, sorted ids)."""
    return jnp.any((self.seg_lo[i] <= self.seg_hi[j]) & (self.seg_lo[j] <= self.seg_hi[i]))

  def scores(self, i, j) -> tuple[Array, Array]:
    """Scaled scores (b, hkv, r, block_q, block_k) fp32 of query block i
    against key block j <= i, and the mask of visible pairs (b, 1, 1,
    block_q, block_k)."""
    s = jnp.einsum(
      "bhrqd,bhkd->bhrqk", self.q[i], self.k[j][:, :, 0], preferred_element_type=jnp.float32
    )
    return s * self.scale, self._mask(i, j)[:, None, None]

  def scores_by_key(self, i, j) -> tuple[Array, Array]:
    """The same scores laid out (b, hkv, block_k, r, block_q), and the mask
    (b, 1, block_k, 1, block_q): the layout whose products with (r, block_q)
    rows (dk, dv) are plain matmuls. XLA:CPU otherwise transposes p and ds
    for them, which cost more than the matmuls."""
    s = jnp.einsum(
      "bhkd,bhrqd->bhkrq", self.k[j][:, :, 0], self.q[i], preferred_element_type=jnp.float32
    )
    return s * self.scale, self._mask(i, j).swapaxes(1, 2)[:, None, :, None]

  def _mask(self, i, j) -> Array:
    """(b, block_q, block_k) bool: same document and, on the diagonal, causal."""
    same_doc = self.seg[i][:, :, None] == self.seg[j][:, None, :]
    return same_doc & jnp.where(i == j, self.causal, True)[None]


def _visited(blocked: _Blocked, i, j, has_segments: bool, step, carry):
  """`step(carry)` where block pair (i, j) can hold visible keys, else carry."""
  if not has_segments:
    return step(carry)
  return jax.lax.cond(blocked.shares_a_document(i, j), step, lambda c: c, carry)


def _forward(q, k, v, seg, block: int, has_segments: bool):
  """(out (n, b, hkv, r, block, d) fp32, lse (n, b, hkv, r, block) fp32)."""
  blk = _Blocked(q, k, v, seg, block)
  n, b, hkv, r, _, d = blk.q.shape

  def query_block(i):
    def key_block(j, carry):
      def step(carry):
        m, s, acc = carry
        scores, mask = blk.scores(i, j)
        scores = jnp.where(mask, scores, _NEG_INF)
        m_new = jnp.maximum(m, scores.max(-1))
        correction = jnp.exp(m - m_new)
        p = jnp.exp(scores - m_new[..., None])
        pv = jnp.einsum(
          "bhrqk,bhkd->bhrqd", p.astype(v.dtype), blk.v[j][:, :, 0],
          preferred_element_type=jnp.float32,
        )  # fmt: skip
        return m_new, s * correction + p.sum(-1), acc * correction[..., None] + pv

      return _visited(blk, i, j, has_segments, step, carry)

    init = (
      jnp.full((b, hkv, r, block), _NEG_INF, jnp.float32),
      jnp.zeros((b, hkv, r, block), jnp.float32),
      jnp.zeros((b, hkv, r, block, d), jnp.float32),
    )
    m, s, acc = jax.lax.fori_loop(0, i + 1, key_block, init)
    # Every query sees at least itself, so s >= 1 (padding included).
    return acc / s[..., None], m + jnp.log(s)

  return jax.lax.map(query_block, jnp.arange(n))


def _backward(q, k, v, seg, out, lse, d_out, block: int, has_segments: bool):
  """dq (n, b, hkv, r, block, d) and dk, dv (n, b, hkv, block, d), fp32.

  Two passes over the visited pairs, each accumulating in its loop carry:
  dq row by row (query block i, key blocks j <= i), then dk and dv column
  by column (key block j, query blocks i >= j). The scores and dp are
  recomputed in both (7 matmuls a pair instead of 5), but no carry holds a
  whole-sequence buffer: XLA:CPU copied such a buffer on every update,
  which cost more than the matmuls saved."""
  blk = _Blocked(q, k, v, seg, block)
  n = blk.q.shape[0]
  do = _blocks(d_out.astype(jnp.float32), block, k.shape[2])
  delta = jnp.einsum("nbhrtd,nbhrtd->nbhrt", do, out)

  def probs_and_dscores(i, j, by_key: bool = False):
    """p and dL/d(scaled scores), fp32, laid out as `scores` (or, by_key,
    as `scores_by_key`)."""
    if by_key:
      scores, mask = blk.scores_by_key(i, j)
      lse_i, delta_i = lse[i][:, :, None], delta[i][:, :, None]  # (b, hkv, 1, r, block_q)
      dp = jnp.einsum(
        "bhkd,bhrqd->bhkrq", blk.v[j][:, :, 0], do[i], preferred_element_type=jnp.float32
      )
    else:
      scores, mask = blk.scores(i, j)
      lse_i, delta_i = lse[i][..., None], delta[i][..., None]  # (b, hkv, r, block_q, 1)
      dp = jnp.einsum(
        "bhrqd,bhkd->bhrqk", do[i], blk.v[j][:, :, 0], preferred_element_type=jnp.float32
      )
    p = jnp.where(mask, jnp.exp(scores - lse_i), 0.0)
    return p, p * (dp - delta_i) * blk.scale

  def dq_row(i):
    def key_block(j, dq_i):
      def step(dq_i):
        _, ds = probs_and_dscores(i, j)
        return dq_i + jnp.einsum(
          "bhrqk,bhkd->bhrqd", ds, blk.k[j][:, :, 0], preferred_element_type=jnp.float32
        )

      return _visited(blk, i, j, has_segments, step, dq_i)

    return jax.lax.fori_loop(0, i + 1, key_block, jnp.zeros(blk.q.shape[1:], jnp.float32))

  def dkv_column(j):
    def query_block(i, dkv_j):
      def step(dkv_j):
        dk_j, dv_j = dkv_j
        p, ds = probs_and_dscores(i, j, by_key=True)
        dk_j = dk_j + jnp.einsum(
          "bhkrq,bhrqd->bhkd", ds, blk.q[i], preferred_element_type=jnp.float32
        )
        return dk_j, dv_j + jnp.einsum("bhkrq,bhrqd->bhkd", p, do[i])

      return _visited(blk, i, j, has_segments, step, dkv_j)

    zeros = jnp.zeros(blk.k.shape[1:3] + blk.k.shape[4:], jnp.float32)  # (b, hkv, block, d)
    return jax.lax.fori_loop(j, n, query_block, (zeros, zeros))

  dq = jax.lax.map(dq_row, jnp.arange(n))
  dk, dv = jax.lax.map(dkv_column, jnp.arange(n))
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, seg, block, has_segments):
  out, _ = _forward(q, k, v, seg, block, has_segments)
  return _unblocks(out)


def _attention_fwd(q, k, v, seg, block, has_segments):
  out, lse = _forward(q, k, v, seg, block, has_segments)
  return _unblocks(out), (q, k, v, seg, out, lse)


def _attention_bwd(block, has_segments, residuals, d_out):
  q, k, v, seg, out, lse = residuals
  dq, dk, dv = _backward(q, k, v, seg, out, lse, d_out, block, has_segments)
  dk = einops.rearrange(dk, "n b h t d -> b (n t) h d")
  dv = einops.rearrange(dv, "n b h t d -> b (n t) h d")
  return _unblocks(dq).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)


def causal_block_attention(q, k, v, segment_ids=None, *, block: int = 256):
  """Causal GQA attention over the block pairs the mask keeps.

  Args:
    q: (b, l, hq, d); k, v: (b, l, hkv, d), hq % hkv == 0.
    segment_ids: (b, l) int32 or None.
    block: queries and keys per block; a sequence shorter than it is one
      block, a longer one is padded to a multiple (the padding comes after
      every real position, so the causal mask hides it).

  Returns:
    (b, l, hq, d) in q.dtype.
  """
  b, l = q.shape[:2]
  block = min(block, l)
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
