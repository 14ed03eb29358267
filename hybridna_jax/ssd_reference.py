"""The XLA references of the SSD scan: the cores every kernel must match.

The recurrence (per batch row b, head h; state S is (headdim p, d_state n)):

    S_t = keep_t * exp(dt_t * A) * S_{t-1} + dt_t * x_t B_t^T
    y_t = S_t C_t

with `keep_t = (seq_idx_t == seq_idx_{t-1})` and `seq_idx_{-1} = 0`, so the
state resets at packed-document boundaries and the initial state belongs to
document 0. B and C are shared by the `h // g` heads of each group. A core
maps (`CoreInputs`, chunk_size) to (y fp32 (b, l, h, p), final state fp32
(b, h, p, n)); dt pre-processing, D and the z gate are the public op's
(`hybridna_jax.ssd.ssd_chunked_scan`).

* `sequential_core`: a `lax.scan` over time; the definition, slow.
* `chunked_core`: the SSD chunked algorithm (quadratic within chunks of
  `chunk_size`, a scan over chunk states between them); the fast path on CPU
  and the reference of the Pallas kernels (`hybridna_jax.kernels`), which
  import this module -- never the public one.
* `ssd_step`: one recurrence step, the decode path of a Mamba2 layer.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import einops
import jax
import jax.numpy as jnp

Array = jax.Array


class CoreInputs(NamedTuple):
  """Canonical, pre-processed inputs of an SSD core.

  Shapes: x (b, l, h, p); dt (b, l, h) fp32, already biased and softplus-ed;
  A (h,) fp32; B, C (b, l, g, n); seq_idx (b, l) int32; initial_states
  (b, h, p, n) fp32. For the chunked cores l is a multiple of chunk_size.
  """

  x: Array
  dt: Array
  A: Array
  B: Array
  C: Array
  seq_idx: Array
  initial_states: Array


def softplus(x: Array) -> Array:
  """softplus with mamba_ssm's threshold (identity above 20)."""
  return jnp.where(x > 20.0, x, jnp.log1p(jnp.exp(jnp.minimum(x, 20.0))))


def _keep_mask(seq_idx: Array) -> Array:
  """(b, l) bool: False where the document changes (state reset)."""
  prev = jnp.pad(seq_idx, [(0, 0), (1, 0)])[:, :-1]
  return seq_idx == prev


def sequential_core(inputs: CoreInputs, chunk_size: int):
  """The definition: one recurrence step per position (chunk_size unused)."""
  del chunk_size
  x, dt, A, B, C, seq_idx, init = inputs
  keep = _keep_mask(seq_idx)

  def step(state, t_inputs):
    x_t, dt_t, B_t, C_t, keep_t = t_inputs
    state, y_t = ssd_step(state, x_t, dt_t, A, B_t, C_t, keep=keep_t)
    return state, y_t

  xs = (
    x.astype(jnp.float32).swapaxes(0, 1),
    dt.swapaxes(0, 1),
    B.astype(jnp.float32).swapaxes(0, 1),
    C.astype(jnp.float32).swapaxes(0, 1),
    keep.swapaxes(0, 1),
  )
  final, y = jax.lax.scan(step, init, xs)
  return y.swapaxes(0, 1), final


def ssd_step(
  state: Array, x: Array, dt: Array, A: Array, B: Array, C: Array, *, keep: Array | None = None
):
  """One recurrence step; the decode path of a Mamba2 layer.

  Args:
    state: (b, h, p, n) fp32.
    x: (b, h, p); dt: (b, h) fp32 (pre-processed); A: (h,);
    B, C: (b, g, n); keep: optional (b,) bool, False resets the state.

  Returns:
    new state (b, h, p, n) fp32 and y (b, h, p) fp32 (without D / z).
  """
  b, h, p, n = state.shape
  g = B.shape[1]
  decay = jnp.exp(dt * A)  # (b, h)
  if keep is not None:
    decay = decay * keep[:, None].astype(decay.dtype)
  # Each group's B and C serve its h // g consecutive heads.
  Bh = einops.repeat(B.astype(jnp.float32), "b g n -> b (g r) n", r=h // g)
  Ch = einops.repeat(C.astype(jnp.float32), "b g n -> b (g r) n", r=h // g)
  dtx = dt[..., None] * x.astype(jnp.float32)  # (b, h, p)
  state = state * decay[..., None, None] + dtx[..., None] * Bh[:, :, None, :]
  y = jnp.einsum("bhpn,bhn->bhp", state, Ch)
  return state, y


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _per_head(a: Array, heads_per_group: int) -> Array:
  """(b, c, g, ...) -> (b, c, h, ...): each group's entry repeated for its
  h // g consecutive heads."""
  return jnp.repeat(a, heads_per_group, axis=2)


def _per_head_fwd(a, heads_per_group):
  return _per_head(a, heads_per_group), None


def _per_head_bwd(heads_per_group, _, d_heads):
  """The sum over each group's heads, as log2(r) halvings: XLA:CPU ran the
  same sum as one reduction over the head axis 10-50x slower
  (benchmarks/RESULTS.md, "Fifth round")."""
  b, c, h = d_heads.shape[:3]
  d = d_heads.reshape(b, c, h // heads_per_group, heads_per_group, *d_heads.shape[3:])
  while d.shape[3] > 1:
    half = d.shape[3] // 2
    rest = d[:, :, :, 2 * half :]  # the odd one out, if any
    d = d[:, :, :, :half] + d[:, :, :, half : 2 * half]
    if rest.shape[3]:
      d = d.at[:, :, :, :1].add(rest)
  return (d[:, :, :, 0],)


_per_head.defvjp(_per_head_fwd, _per_head_bwd)


def chunked_core(inputs: CoreInputs, chunk_size: int):
  """SSD chunked algorithm (Dao & Gu 2024, section 6) in XLA.

  Four steps per chunk of length Q: (1) the intra-chunk output, a masked
  quadratic form C_i B_j exp(cs_i - cs_j) dt_j x_j; (2) each chunk's own final
  state; (3) a scan over chunks passing states; (4) the contribution of the
  incoming state to each position, C_i S_prev exp(cs_i).

  Arrays are laid out (b, c, h, q, ...) -- heads before the position in the
  chunk -- so that every product is a plain batched matmul over (b, c, h)
  with its operands' last two axes contracted or kept; B and C, shared by the
  h // g heads of a group, are broadcast to them (`_per_head`). With time
  before heads, XLA:CPU transposed the quadratic forms around every product
  (forward 1.6x slower at chunk 64; benchmarks/RESULTS.md, "Speed on CPU").
  """
  x, dt, A, B, C, seq_idx, init = inputs
  heads_per_group = x.shape[2] // B.shape[2]
  q = chunk_size
  f32 = jnp.float32

  def per_head(a):  # (b, c, g, ...) -> (b, c, h, ...)
    return _per_head(a, heads_per_group) if heads_per_group > 1 else a

  x = einops.rearrange(x.astype(f32), "b (c q) h p -> b c h q p", q=q)
  dt = einops.rearrange(dt, "b (c q) h -> b c h q", q=q)
  B = einops.rearrange(B.astype(f32), "b (c q) g n -> b c g q n", q=q)
  C = einops.rearrange(C.astype(f32), "b (c q) g n -> b c g q n", q=q)
  seq = einops.rearrange(seq_idx, "b (c q) -> b c q", q=q)

  # The within-chunk cumsum as a product with an upper-triangular ones matrix:
  # XLA:CPU lowers jnp.cumsum to blocked reduce-windows and fuses their last add
  # into every consumer, which left the (q x q) decay exponentials below
  # unvectorised (30 ms against 2 ms for the demo's layer at 2 x 4,096).
  cs = jnp.einsum(  # (b, c, h, q)
    "bchj,ji->bchi", dt * A[:, None], jnp.triu(jnp.ones((q, q), f32)), precision="highest"
  )
  dtx = dt[..., None] * x  # (b, c, h, q, p)

  # (1) Intra-chunk: exp(cs_i - cs_j) for j <= i within the same document.
  same_doc = seq[:, :, :, None] == seq[:, :, None, :]  # (b, c, i, j)
  causal = jnp.tril(jnp.ones((q, q), bool))
  mask = (same_doc & causal)[:, :, None]  # (b, c, 1, i, j)
  decay = jnp.exp(jnp.where(mask, cs[..., :, None] - cs[..., None, :], -jnp.inf))
  cb = jnp.einsum("bcgin,bcgjn->bcgij", C, B)
  y_diag = jnp.einsum("bchij,bchjp->bchip", per_head(cb) * decay, dtx)

  # (2) Each chunk's final state from its own inputs (same document as the
  # chunk's last position only).
  seq_end = seq[:, :, -1]  # (b, c)
  in_last_doc = (seq == seq_end[:, :, None])[:, :, None]  # (b, c, 1, q)
  to_end = jnp.exp(cs[..., -1:] - cs) * in_last_doc  # (b, c, h, q)
  chunk_states = jnp.einsum("bchjp,bchjn->bchpn", dtx * to_end[..., None], per_head(B))

  # (3) Pass states between chunks; a document change resets the carry.
  seq_prev_end = jnp.pad(seq_end, [(0, 0), (1, 0)])[:, :-1]  # 0 before chunk 0
  carry_decay = jnp.exp(cs[..., -1]) * (seq_end == seq_prev_end)[..., None]  # (b, c, h)

  def pass_state(state, chunk):
    decay_c, new_c = chunk
    return state * decay_c[..., None, None] + new_c, state

  final, prev_states = jax.lax.scan(  # over chunks: chunk axis first
    pass_state, init, (jnp.moveaxis(carry_decay, 1, 0), jnp.moveaxis(chunk_states, 1, 0))
  )
  prev_states = jnp.moveaxis(prev_states, 0, 1)  # (b, c, h, p, n)

  # (4) The incoming state's contribution, for positions still in the
  # document the previous chunk ended in.
  from_prev = (seq == seq_prev_end[:, :, None])[:, :, None]  # (b, c, 1, q)
  in_decay = jnp.exp(cs) * from_prev  # (b, c, h, q)
  y_off = jnp.einsum("bchin,bchpn->bchip", per_head(C) * in_decay[..., None], prev_states)

  y = einops.rearrange(y_diag + y_off, "b c h q p -> b (c q) h p")
  return y, final
