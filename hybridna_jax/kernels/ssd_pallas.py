"""Pallas kernels for the SSD (Mamba2) chunked scan, forward and backward.

The core computes, for chunks of Q positions (see `hybridna_jax.ssd`):

    y_i = sum_{j<=i, same doc} (C_i . B_j) exp(cs_i - cs_j) dt_j x_j   (diag)
        + e_i (C_i . S_in)                                              (off)
    S_c = sum_j w_j B_j x_j^T,      S_in[c+1] = a_c S_in[c] + S_c

with cs the within-chunk cumsum of dt * A, e_i = exp(cs_i) (0 once the
document of the previous chunk's end is left), w_j = exp(cs_last - cs_j) dt_j
(0 outside the chunk's last document) and a_c = exp(cs_last) (0 when the chunk
ends in a new document). States are kept transposed, (n, p), so every
in-kernel matmul is a plain or right-transposed product.

Work split (the mamba_ssm split, with the cheap parts in XLA):

* XLA: dt * A cumsum, the decay vectors w, e, a, and C B^T per chunk and
  group (one batched matmul, shared by the h / g heads of a group).
* `_state_kernel`: S_c per (batch, chunk, head); reused in the backward for
  dS = sum_i e_i C_i dy_i^T.
* state passing: a Pallas loop over chunks on GPU, `lax.scan` on TPU (it is
  memory-bound; XLA's loop is as fast there); the same code runs reversed in
  the backward.
* `_scan_kernel`: y for a (batch, chunk, head, row block).
* `_dx_kernel` (backward, per head and column block): dx, and the per-position
  sums that give d dt and d cs.
* `_dcb_kernel` (backward, per group (or head split) and row block, looping
  over its heads): d(C B^T) summed over heads, the incoming-state part of dC,
  the chunk-state part of dB, dy . y per position and <S_in, G> per chunk.
* XLA again: dC, dB from d(C B^T) (per-group batched matmuls), and d cs ->
  d dt, dA through the reverse cumsum.

Backward identities used (G = gradient of the state leaving a chunk, from the
reversed state passing seeded with the final state's cotangent):
d cs_i gets dy_i . y_i (every decay exp(cs_i - .) and e_i scales row i of y),
minus dt_j x_j . V_j for the columns of the intra-chunk decays (V_j =
sum_i (C_i . B_j) decay_ij dy_i), minus / plus the chunk-state weights
(x_j . B_j G) w_j at j / at the chunk's end, plus <S_in, G> a at the end.

`jax.custom_vjp` joins `_forward` and `_backward`; the backward recomputes the
states instead of saving them. Matmul operands are in x's dtype (bf16 stays
bf16 on the tensor cores / MXU), accumulation and all decays are fp32.

Platforms: one kernel body, two tilings.

* "gpu" (Triton): one head per program, chunks tiled into `block` x `block`
  tiles (64 by default; dot shapes >= 16, powers of two), causal tiles skipped
  with dynamic loop bounds.
* "tpu" (Mosaic): whole chunks (Q x Q tiles for the MXU), blocks of 8 heads per
  program (block last-two dims are (8k, Q), (Q, p) or (n, p)), the backward's
  head splits accumulated in place along an "arbitrary" grid axis.

Arrays are head-major inside (x as (b, h, l, p), per-position vectors as
(b, nc, h, Q)) so that the same BlockSpecs are legal on both.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from hybridna_jax import ssd_reference
from hybridna_jax.kernel_registry import warn_once
from hybridna_jax.kernels import sharded

Array = jax.Array
f32 = jnp.float32
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


@dataclasses.dataclass(frozen=True)
class SsdKernelConfig:
  """Tiling and backend of the Pallas SSD.

  Attributes:
    platform: "gpu" (Pallas Triton) or "tpu" (Pallas Mosaic).
    interpret: run on CPU (Triton: `interpret=True`; TPU: Pallas' TPU
      interpret mode).
    block: GPU tile edge within a chunk (power of two, >= 16).
    num_warps, num_stages: Triton launch parameters.
    tpu_heads: heads per TPU program: a multiple of 8 that divides the heads
      per group, else a group's heads (a program never spans two groups).
    min_programs: GPU backward: split a group's heads over programs until the
      dB/dC kernel has at least this many (partial sums are added in XLA).
    state_block: GPU state passing: elements of the (n * p) state per program.
  """

  platform: str = "gpu"
  interpret: bool = False
  block: int = 64
  num_warps: int = 4
  num_stages: int = 2
  tpu_heads: int = 8
  min_programs: int = 264
  state_block: int = 1024


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static geometry of one call."""

  cfg: SsdKernelConfig
  b: int
  l: int
  h: int
  p: int
  g: int
  n: int
  q: int  # chunk size
  hb: int  # heads per program (state, scan, dx kernels)
  blk: int  # row / column tile within a chunk
  nsplit: int  # head splits per group in the dB/dC kernel
  dtype: jnp.dtype  # matmul operand dtype

  @property
  def nc(self):
    return self.l // self.q

  @property
  def r(self):
    return self.h // self.g

  @property
  def nb(self):
    return self.q // self.blk

  @property
  def hs(self):
    return self.r // self.nsplit

  @property
  def dcs_from_products(self):
    """How the backward sums the intra-chunk d cs terms, which nearly cancel.

    bf16/fp16 operands: as row and column sums of the same fp32 products
    (dy_i . x_j) z_ij, so the rounding cancels too (rounding z to bf16 for
    y's matmul and again for V's once left dA 57% off). fp32: through y and V
    from matmuls, whose sums cancel inside the accumulation and are the more
    accurate there.
    """
    return self.dtype != jnp.dtype(f32)

  @property
  def tpu(self):
    return self.cfg.platform == "tpu"


def _is_pow2(v):
  return v >= 1 and (v & (v - 1)) == 0


def unsupported_reason(x_shape, g: int, n: int, chunk: int, cfg: SsdKernelConfig) -> str | None:
  """Why the kernels cannot take these shapes (None when they can)."""
  _, _, h, p = x_shape
  if cfg.platform == "gpu":
    for name, v in (("chunk_size", chunk), ("headdim", p), ("d_state", n)):
      if not _is_pow2(v) or v < 16:
        return f"{name}={v} must be a power of two >= 16 for the Triton kernels"
  elif cfg.platform == "tpu":
    if chunk % 8:
      return f"chunk_size={chunk} must be a multiple of 8 on TPU"
    r = h // g
    if g > 1 and r % 8:
      return (
        f"{r} heads per group: the TPU kernels need a multiple of 8 when there are several groups"
      )
  else:
    return f"unknown platform {cfg.platform!r}"
  return None


def _make_plan(x_shape, x_dtype, g, n, chunk, cfg: SsdKernelConfig) -> _Plan:
  b, l, h, p = x_shape
  r = h // g
  nc = l // chunk
  if cfg.platform == "tpu":
    hb = cfg.tpu_heads if (r % cfg.tpu_heads == 0 and cfg.tpu_heads % 8 == 0) else r
    blk = chunk
    nsplit = r // hb
  else:
    hb = 1
    blk = min(cfg.block, chunk)
    # Enough dB/dC programs to fill the GPU, each keeping >= 1 head.
    nsplit = r
    for d in range(1, r + 1):
      if r % d == 0 and b * nc * g * (chunk // blk) * d >= cfg.min_programs:
        nsplit = d
        break
  dtype = jnp.dtype(x_dtype)
  if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    dtype = jnp.dtype(f32)
  return _Plan(cfg, b, l, h, p, g, n, chunk, hb, blk, nsplit, dtype)


# ----------------------------------------------------------------------------
# In-kernel helpers.
# ----------------------------------------------------------------------------


def _dot(a, b, dims=_NN):
  """fp32-accumulating matmul; fp32 operands get full precision (Triton would
  otherwise use TF32)."""
  precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=f32)


def _col(row, plan: _Plan):
  """(1, w) -> (w, 1): a lane vector as a sublane vector."""
  w = row.shape[-1]
  if plan.tpu:
    # Mosaic: broadcast + 2D transpose are native; slicing the first lane.
    return jnp.broadcast_to(row, (128, w)).T[:, :1]
  return row.reshape(w, 1)


def _row_sum(m, plan: _Plan):
  """(w, k) -> (1, w): row sums laid out along lanes."""
  if plan.tpu:
    ones = jnp.ones((8, m.shape[1]), f32)
    return _dot(ones, m, _NT)[:1]
  return jnp.sum(m, axis=1)[None, :]


def _col_sum(m, plan: _Plan):
  """(k, w) -> (1, w): column sums laid out along lanes."""
  if plan.tpu:
    ones = jnp.ones((8, m.shape[0]), f32)
    return _dot(ones, m)[:1]
  return jnp.sum(m, axis=0)[None, :]


def _sl(start, size, nblocks):
  """A ref index for block `start` of a dim split in `nblocks` blocks."""
  if nblocks == 1:
    return slice(None)
  if isinstance(start, int):
    return pl.ds(start * size, size)
  return pl.ds(pl.multiple_of(start * size, size), size)


def _div(a, b):
  """Index-map division: truncating (operands are >= 0), which Mosaic lowers
  without the sign fix-ups of floor division."""
  return a if b == 1 else jax.lax.div(a, b)


def _for_heads(n, body):
  if n == 1:
    body(0)
  else:

    def step(hh, carry):
      body(hh)
      return carry

    jax.lax.fori_loop(0, n, step, 0)


def _loop(lo, hi, body, init, static_single):
  """Loop over tile indices [lo, hi); a single static step when the chunk is
  one tile (TPU)."""
  if static_single:
    return body(0, init)
  return jax.lax.fori_loop(lo, hi, body, init)


def _decay(cs_i, cs_j, seq_i, seq_j, i0, j0, bi, bj):
  """(bi, bj) exp(cs_i - cs_j) where j <= i in the same document, else 0."""
  ri = i0 + jax.lax.broadcasted_iota(jnp.int32, (bi, bj), 0)
  cj = j0 + jax.lax.broadcasted_iota(jnp.int32, (bi, bj), 1)
  mask = (ri >= cj) & (seq_i == seq_j)
  return jnp.exp(jnp.where(mask, cs_i - cs_j, -jnp.inf))


# ----------------------------------------------------------------------------
# Kernels. Ref shapes are the block shapes (squeezed dims dropped).
# ----------------------------------------------------------------------------


def _state_kernel(v_ref, p_ref, w_ref, o_ref, *, plan: _Plan):
  """o[h] = sum_j w[h, j] p_j v[h, j]^T.

  v_ref (hb, Q, p) operand dtype; p_ref (Q, n); w_ref (hb, Q) fp32;
  o_ref (hb, n, p) fp32.
  """
  nb, blk = plan.nb, plan.blk

  def head(hh):
    acc = jnp.zeros((plan.n, plan.p), f32)
    for j in range(nb):  # static: Q / blk steps
      rows = _sl(j, blk, nb)
      w = _col(w_ref[pl.ds(hh, 1), rows], plan)  # (blk, 1)
      pw = (p_ref[rows, :].astype(f32) * w).T.astype(plan.dtype)  # (n, blk)
      acc = acc + _dot(pw, v_ref[hh, rows, :])
    o_ref[hh] = acc

  _for_heads(plan.hb, head)


def _scan_kernel(
  x_ref, c_ref, cb_ref, s_ref, cs_ref, dt_ref, e_ref, seq_ref, y_ref, *, plan: _Plan
):
  """y for rows block i of one chunk.

  x_ref (hb, Q, p); c_ref (blk, n); cb_ref (blk, Q) fp32; s_ref (hb, n, p)
  fp32; cs/dt/e_ref (hb, Q) fp32; seq_ref (1, Q) int32; y_ref (hb, blk, p).
  """
  nb, blk = plan.nb, plan.blk
  i = pl.program_id(3) if nb > 1 else 0
  i0 = i * blk
  rows = _sl(i, blk, nb)
  c = c_ref[...].astype(plan.dtype)
  seq_i = _col(seq_ref[:, rows], plan)

  def head(hh):
    cs_i = _col(cs_ref[pl.ds(hh, 1), rows], plan)
    e_i = _col(e_ref[pl.ds(hh, 1), rows], plan)
    y = e_i * _dot(c, s_ref[hh].astype(plan.dtype))

    def tile(j, acc):
      cols = _sl(j, blk, nb)
      cs_j = cs_ref[pl.ds(hh, 1), cols]
      dt_j = dt_ref[pl.ds(hh, 1), cols]
      decay = _decay(cs_i, cs_j, seq_i, seq_ref[:, cols], i0, j * blk, blk, blk)
      pm = (cb_ref[:, cols] * decay * dt_j).astype(plan.dtype)
      return acc + _dot(pm, x_ref[hh, cols, :])

    y_ref[hh] = _loop(0, i + 1, tile, y, nb == 1)

  _for_heads(plan.hb, head)


def _dx_kernel(
  x_ref,
  dy_ref,
  b_ref,
  cb_ref,
  g_ref,
  cs_ref,
  dt_ref,
  w_ref,
  seq_ref,
  dx_ref,
  ddt_ref,
  dw_ref,
  *,
  plan: _Plan,
):
  """dx, x . V and x . (B G) for column block j of one chunk.

  V_j = sum_{i >= j} (CB * decay)[i, j] dy_i (so dx_diag = dt_j V_j and
  d dt_j (diag) = x_j . V_j); G (n, p) is the gradient of the chunk's end
  state. x_ref (hb, blk, p); dy_ref (hb, Q, p); b_ref (blk, n);
  cb_ref (Q, blk) fp32; g_ref (hb, n, p) fp32; cs/dt/w_ref (hb, Q);
  seq_ref (1, Q); dx_ref (hb, blk, p); ddt_ref, dw_ref (hb, blk) fp32.
  """
  nb, blk = plan.nb, plan.blk
  j = pl.program_id(3) if nb > 1 else 0
  j0 = j * blk
  cols = _sl(j, blk, nb)
  bj = b_ref[...].astype(plan.dtype)
  seq_j = seq_ref[:, cols]

  def head(hh):
    cs_j = cs_ref[pl.ds(hh, 1), cols]

    x_j = x_ref[hh]

    def tile(i, carry):
      acc, xv = carry
      rows = _sl(i, blk, nb)
      cs_i = _col(cs_ref[pl.ds(hh, 1), rows], plan)
      seq_i = _col(seq_ref[:, rows], plan)
      z = cb_ref[rows, :] * _decay(cs_i, cs_j, seq_i, seq_j, i * blk, j0, blk, blk)
      dy_i = dy_ref[hh, rows, :]
      if plan.dcs_from_products:  # x_j . V_j as column sums (see _Plan)
        xv = xv + _col_sum(_dot(dy_i, x_j, _NT) * z, plan)
      return acc + _dot(z.T.astype(plan.dtype), dy_i), xv

    v, xv = _loop(j, nb, tile, (jnp.zeros((blk, plan.p), f32), jnp.zeros((1, blk), f32)), nb == 1)
    bg = _dot(bj, g_ref[hh].astype(plan.dtype))  # (blk, p)
    x = x_j.astype(f32)
    dt_j = _col(dt_ref[pl.ds(hh, 1), cols], plan)
    w_j = _col(w_ref[pl.ds(hh, 1), cols], plan)
    dx_ref[hh] = (dt_j * v + w_j * bg).astype(dx_ref.dtype)
    ddt_ref[pl.ds(hh, 1), :] = xv if plan.dcs_from_products else _row_sum(x * v, plan)
    dw_ref[pl.ds(hh, 1), :] = _row_sum(x * bg, plan)

  _for_heads(plan.hb, head)


def _dcb_kernel(
  x_ref,
  dy_ref,
  c_ref,
  cb_ref,
  s_ref,
  g_ref,
  cs_ref,
  dt_ref,
  e_ref,
  w_ref,
  seq_ref,
  dcb_ref,
  dcoff_ref,
  dbst_ref,
  dcs_ref,
  da_ref,
  *,
  plan: _Plan,
):
  """Cross-head sums for row block i of one chunk, over this program's heads.

  dcb += decay * dt_j * (dy_i . x_j)        (d(C B^T), causal tiles only)
  dcoff += e_i dy_i S^T    (dC from the incoming state)
  dbst += w_i x_i G^T      (dB from the chunk state)
  dcs[h, i] = dy_i . y_i   (d cs through every exp(cs_i ...) factor)
  da[h] = <S, G>           (d of the carried decay a; S and G are loaded
                            here anyway, every row block writes the same)

  x_ref (hs, Q, p); dy_ref (hs, blk, p); c_ref (blk, n); cb_ref (blk, Q);
  s_ref, g_ref (hs, n, p) fp32; cs/dt/e/w_ref (hs, Q); seq_ref (1, Q);
  dcb_ref (blk, Q), dcoff_ref, dbst_ref (blk, n) fp32; dcs_ref (hs, blk);
  da_ref (hs, 1).
  """
  nb, blk = plan.nb, plan.blk
  if plan.tpu:
    i = 0
    first = pl.program_id(3) == 0  # head splits accumulate in place
  else:
    i = pl.program_id(3) if nb > 1 else 0
    first = True
  i0 = i * blk
  rows = _sl(i, blk, nb)

  def zero():
    dcb_ref[...] = jnp.zeros(dcb_ref.shape, f32)
    dcoff_ref[...] = jnp.zeros(dcoff_ref.shape, f32)
    dbst_ref[...] = jnp.zeros(dbst_ref.shape, f32)

  if first is True:
    zero()
  else:
    pl.when(first)(zero)

  c = c_ref[...].astype(plan.dtype)
  seq_i = _col(seq_ref[:, rows], plan)

  def head(hh):
    dy = dy_ref[hh].astype(plan.dtype)  # (blk, p)
    s32, g32 = s_ref[hh], g_ref[hh]
    da_ref[pl.ds(hh, 1), :] = jnp.full((1, 1), jnp.sum(s32 * g32), f32)
    s = s32.astype(plan.dtype)  # (n, p)
    cs_i = _col(cs_ref[pl.ds(hh, 1), rows], plan)
    e_i = _col(e_ref[pl.ds(hh, 1), rows], plan)
    w_i = _col(w_ref[pl.ds(hh, 1), rows], plan)
    y_off = e_i * _dot(c, s)
    dcoff_ref[...] += e_i * _dot(dy, s, _NT)
    dbst_ref[...] += w_i * _dot(x_ref[hh, rows, :], g32.astype(plan.dtype), _NT)

    def tile(j, carry):
      cols = _sl(j, blk, nb)
      cs_j = cs_ref[pl.ds(hh, 1), cols]
      dt_j = dt_ref[pl.ds(hh, 1), cols]
      decay_dt = _decay(cs_i, cs_j, seq_i, seq_ref[:, cols], i0, j * blk, blk, blk) * dt_j
      x_j = x_ref[hh, cols, :]
      dy_x = _dot(dy, x_j, _NT)  # (blk, blk)
      dcb_ref[:, cols] += decay_dt * dy_x
      if plan.dcs_from_products:  # dy_i . y_i as row sums (see _Plan)
        return carry + _row_sum(dy_x * cb_ref[:, cols] * decay_dt, plan)
      return carry + _dot((cb_ref[:, cols] * decay_dt).astype(plan.dtype), x_j)

    if plan.dcs_from_products:
      dy_y = _loop(0, i + 1, tile, _row_sum(dy.astype(f32) * y_off, plan), nb == 1)
    else:
      y = _loop(0, i + 1, tile, y_off, nb == 1)
      dy_y = _row_sum(dy.astype(f32) * y, plan)
    dcs_ref[pl.ds(hh, 1), :] = dy_y

  _for_heads(plan.hs, head)


def _pass_kernel(s_ref, a_ref, init_ref, out_ref, final_ref, *, nc, reverse):
  """GPU state passing for one (batch, head, state block).

  out[c] = carry;  carry = a[c] * carry + s[c]   (c descending if reverse).
  s_ref, out_ref (nc, bs); a_ref (nc,); init_ref, final_ref (bs,).
  """

  def step(k, carry):
    c = nc - 1 - k if reverse else k
    out_ref[c, :] = carry
    return a_ref[c] * carry + s_ref[c, :]

  final_ref[...] = jax.lax.fori_loop(0, nc, step, init_ref[...])


# ----------------------------------------------------------------------------
# pallas_call wrappers.
# ----------------------------------------------------------------------------


def _call(kernel, plan: _Plan, grid, in_specs, out_specs, out_shape, semantics=None, name=None):
  cfg = plan.cfg
  if cfg.platform == "tpu":
    params = pltpu.CompilerParams(dimension_semantics=semantics or ("parallel",) * len(grid))
    interpret = pltpu.InterpretParams() if cfg.interpret else False
  else:
    params = plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    interpret = cfg.interpret
  return pl.pallas_call(
    functools.partial(kernel, plan=plan),
    grid=grid,
    in_specs=in_specs,
    out_specs=out_specs,
    out_shape=out_shape,
    compiler_params=params,
    interpret=interpret,
    name=name,
  )


def _vec_spec(plan, heads):
  """(b, nc, h, Q) per-position vectors: a block of `heads` heads, whole
  chunk, for the 4-D grids (batch, chunk, head block, tile)."""
  return pl.BlockSpec((None, None, heads, plan.q), lambda b, c, k, i: (b, c, k, 0))


def chunk_states(v, proj, w, plan: _Plan):
  """(b, nc, h, n, p) fp32: sum over each chunk of w_j proj_j v_j^T.

  v (b, h, l, p) operand dtype, proj (b, g, l, n), w (b, nc, h, Q) fp32.
  """
  hb, r, q = plan.hb, plan.r, plan.q
  grid = (plan.b, plan.nc, plan.h // hb)
  in_specs = [
    pl.BlockSpec((None, hb, q, plan.p), lambda b, c, k: (b, k, c, 0)),
    pl.BlockSpec((None, None, q, plan.n), lambda b, c, k: (b, _div(k * hb, r), c, 0)),
    pl.BlockSpec((None, None, hb, q), lambda b, c, k: (b, c, k, 0)),
  ]
  out_spec = pl.BlockSpec((None, None, hb, plan.n, plan.p), lambda b, c, k: (b, c, k, 0, 0))
  out_shape = jax.ShapeDtypeStruct((plan.b, plan.nc, plan.h, plan.n, plan.p), f32)
  return _call(_state_kernel, plan, grid, in_specs, out_spec, out_shape, name="ssd_chunk_state")(
    v, proj, w
  )


def pass_states(s, a, init, plan: _Plan, reverse=False):
  """Runs the chunk recurrence; returns (states entering each chunk, last).

  s (b, nc, h, n, p) fp32 per-chunk inputs, a (b, nc, h) decays, init
  (b, h, n, p). Forward: out[c] = S_in[c]; reverse: out[c] is the carry
  before chunk c's update when walking from the last chunk.
  """
  if plan.tpu or plan.cfg.platform != "gpu":
    return pass_states_xla(s, a, init, reverse)
  b, nc, h, n, p = s.shape
  size = n * p
  bs = min(plan.cfg.state_block, size)
  grid = (b, h, size // bs)
  kernel = functools.partial(_pass_kernel, nc=nc, reverse=reverse)
  params = plgpu.CompilerParams(num_warps=4, num_stages=1)
  out, final = pl.pallas_call(
    kernel,
    grid=grid,
    in_specs=[
      pl.BlockSpec((None, nc, None, bs), lambda i, j, k: (i, 0, j, k)),
      pl.BlockSpec((None, None, nc), lambda i, j, k: (i, j, 0)),
      pl.BlockSpec((None, None, bs), lambda i, j, k: (i, j, k)),
    ],
    out_specs=[
      pl.BlockSpec((None, nc, None, bs), lambda i, j, k: (i, 0, j, k)),
      pl.BlockSpec((None, None, bs), lambda i, j, k: (i, j, k)),
    ],
    out_shape=[
      jax.ShapeDtypeStruct((b, nc, h, size), f32),
      jax.ShapeDtypeStruct((b, h, size), f32),
    ],
    compiler_params=params,
    interpret=plan.cfg.interpret,
    name="ssd_state_passing",
  )(s.reshape(b, nc, h, size), a.transpose(0, 2, 1), init.reshape(b, h, size))
  return out.reshape(s.shape), final.reshape(init.shape)


def pass_states_xla(s, a, init, reverse=False):
  """`pass_states` as a `lax.scan` (TPU path and reference): s (b, nc, h, n,
  p), a (b, nc, h), init (b, h, n, p) -> (states (b, nc, h, n, p), last)."""

  def step(carry, inputs):
    a_c, s_c = inputs
    return a_c[..., None, None] * carry + s_c, carry

  final, out = jax.lax.scan(
    step, init, (jnp.moveaxis(a, 1, 0), jnp.moveaxis(s, 1, 0)), reverse=reverse
  )
  return jnp.moveaxis(out, 0, 1), final


def chunk_scan(xt, ct, cb, s_in, cs, dt, e, seq, plan: _Plan):
  """y (b, h, l, p) fp32 from the prepared inputs (see `_prepare`)."""
  hb, r, q, blk, nb = plan.hb, plan.r, plan.q, plan.blk, plan.nb
  grid = (plan.b, plan.nc, plan.h // hb, nb)
  in_specs = [
    pl.BlockSpec((None, hb, q, plan.p), lambda b, c, k, i: (b, k, c, 0)),
    pl.BlockSpec((None, None, blk, plan.n), lambda b, c, k, i: (b, _div(k * hb, r), c * nb + i, 0)),
    pl.BlockSpec((None, None, None, blk, q), lambda b, c, k, i: (b, c, _div(k * hb, r), i, 0)),
    pl.BlockSpec((None, None, hb, plan.n, plan.p), lambda b, c, k, i: (b, c, k, 0, 0)),
    _vec_spec(plan, hb),
    _vec_spec(plan, hb),
    _vec_spec(plan, hb),
    pl.BlockSpec((None, None, 1, q), lambda b, c, k, i: (b, c, 0, 0)),
  ]
  out_spec = pl.BlockSpec((None, hb, blk, plan.p), lambda b, c, k, i: (b, k, c * nb + i, 0))
  out_shape = jax.ShapeDtypeStruct((plan.b, plan.h, plan.l, plan.p), f32)
  return _call(_scan_kernel, plan, grid, in_specs, out_spec, out_shape, name="ssd_chunk_scan")(
    xt, ct, cb, s_in, cs, dt, e, seq
  )


def chunk_scan_dx(xt, dyt, bt, cb, gs, cs, dt, w, seq, plan: _Plan):
  """Backward per head: dx (b, h, l, p), x.V and x.(B G) as (b, nc, h, Q)."""
  hb, r, q, blk, nb = plan.hb, plan.r, plan.q, plan.blk, plan.nb
  grid = (plan.b, plan.nc, plan.h // hb, nb)
  in_specs = [
    pl.BlockSpec((None, hb, blk, plan.p), lambda b, c, k, j: (b, k, c * nb + j, 0)),
    pl.BlockSpec((None, hb, q, plan.p), lambda b, c, k, j: (b, k, c, 0)),
    pl.BlockSpec((None, None, blk, plan.n), lambda b, c, k, j: (b, _div(k * hb, r), c * nb + j, 0)),
    pl.BlockSpec((None, None, None, q, blk), lambda b, c, k, j: (b, c, _div(k * hb, r), 0, j)),
    pl.BlockSpec((None, None, hb, plan.n, plan.p), lambda b, c, k, j: (b, c, k, 0, 0)),
    _vec_spec(plan, hb),
    _vec_spec(plan, hb),
    _vec_spec(plan, hb),
    pl.BlockSpec((None, None, 1, q), lambda b, c, k, j: (b, c, 0, 0)),
  ]
  vec_out = pl.BlockSpec((None, None, hb, blk), lambda b, c, k, j: (b, c, k, j))
  out_specs = [
    pl.BlockSpec((None, hb, blk, plan.p), lambda b, c, k, j: (b, k, c * nb + j, 0)),
    vec_out,
    vec_out,
  ]
  vec = jax.ShapeDtypeStruct((plan.b, plan.nc, plan.h, q), f32)
  out_shape = [jax.ShapeDtypeStruct(xt.shape, plan.dtype), vec, vec]
  return _call(
    _dx_kernel, plan, grid, in_specs, out_specs, out_shape, name="ssd_chunk_scan_bwd_dx"
  )(xt, dyt, bt, cb, gs, cs, dt, w, seq)


def chunk_scan_dcb(xt, dyt, ct, cb, s_in, gs, cs, dt, e, w, seq, plan: _Plan):
  """Backward across heads: d(CB), dC (state part), dB (state part), dy.y
  and d of each chunk's carried decay.

  Returns dcb (b, nc, g, Q, Q), dc_off and db_state (b, g, l, n),
  dcs_rows (b, nc, h, Q) and da (b, nc, h), all fp32.
  """
  hs, ns, q, blk, nb, g = plan.hs, plan.nsplit, plan.q, plan.blk, plan.nb, plan.g
  if plan.tpu:
    # Grid (b, nc, g, split): the split axis runs in order and its outputs
    # stay in VMEM, so partial sums accumulate in place.
    grid = (plan.b, plan.nc, g, ns)
    hblk = lambda k, s: k * ns + s
    outs_g = g
    out_idx = lambda b, c, k, s: (b, c, k, 0, 0)
    rows_idx = lambda b, c, k, s: (b, k, c, 0)
    semantics = ("parallel", "parallel", "parallel", "arbitrary")
    x_spec = pl.BlockSpec((None, hs, q, plan.p), lambda b, c, k, s: (b, hblk(k, s), c, 0))
    dy_spec = pl.BlockSpec((None, hs, blk, plan.p), lambda b, c, k, s: (b, hblk(k, s), c, 0))
    c_spec = pl.BlockSpec((None, None, blk, plan.n), lambda b, c, k, s: (b, k, c, 0))
    cb_spec = pl.BlockSpec((None, None, None, blk, q), lambda b, c, k, s: (b, c, k, 0, 0))
    st_spec = pl.BlockSpec(
      (None, None, hs, plan.n, plan.p), lambda b, c, k, s: (b, c, hblk(k, s), 0, 0)
    )
    vec_spec = pl.BlockSpec((None, None, hs, q), lambda b, c, k, s: (b, c, hblk(k, s), 0))
    dcs_spec = vec_spec
    da_spec = pl.BlockSpec((None, None, hs, 1), lambda b, c, k, s: (b, c, hblk(k, s), 0))
  else:
    # Grid (b, nc, g * split, row block): every program writes its own
    # partial sums (summed over splits in XLA).
    grid = (plan.b, plan.nc, g * ns, nb)
    outs_g = g * ns
    out_idx = lambda b, c, k, i: (b, c, k, i, 0)
    rows_idx = lambda b, c, k, i: (b, k, c * nb + i, 0)
    semantics = None
    x_spec = pl.BlockSpec((None, hs, q, plan.p), lambda b, c, k, i: (b, k, c, 0))
    dy_spec = pl.BlockSpec((None, hs, blk, plan.p), lambda b, c, k, i: (b, k, c * nb + i, 0))
    c_spec = pl.BlockSpec(
      (None, None, blk, plan.n), lambda b, c, k, i: (b, _div(k, ns), c * nb + i, 0)
    )
    cb_spec = pl.BlockSpec((None, None, None, blk, q), lambda b, c, k, i: (b, c, _div(k, ns), i, 0))
    st_spec = pl.BlockSpec((None, None, hs, plan.n, plan.p), lambda b, c, k, i: (b, c, k, 0, 0))
    vec_spec = pl.BlockSpec((None, None, hs, q), lambda b, c, k, i: (b, c, k, 0))
    dcs_spec = pl.BlockSpec((None, None, hs, blk), lambda b, c, k, i: (b, c, k, i))
    da_spec = pl.BlockSpec((None, None, hs, 1), lambda b, c, k, i: (b, c, k, 0))
  seq_spec = pl.BlockSpec((None, None, 1, q), lambda b, c, k, i: (b, c, 0, 0))
  in_specs = [
    x_spec,
    dy_spec,
    c_spec,
    cb_spec,
    st_spec,
    st_spec,
    vec_spec,
    vec_spec,
    vec_spec,
    vec_spec,
    seq_spec,
  ]
  out_specs = [
    pl.BlockSpec((None, None, None, blk, q), out_idx),
    pl.BlockSpec((None, None, blk, plan.n), rows_idx),
    pl.BlockSpec((None, None, blk, plan.n), rows_idx),
    dcs_spec,
    da_spec,
  ]
  out_shape = [
    jax.ShapeDtypeStruct((plan.b, plan.nc, outs_g, q, q), f32),
    jax.ShapeDtypeStruct((plan.b, outs_g, plan.l, plan.n), f32),
    jax.ShapeDtypeStruct((plan.b, outs_g, plan.l, plan.n), f32),
    jax.ShapeDtypeStruct((plan.b, plan.nc, plan.h, q), f32),
    jax.ShapeDtypeStruct((plan.b, plan.nc, plan.h, 1), f32),
  ]
  dcb, dcoff, dbst, dcs, da = _call(
    _dcb_kernel,
    plan,
    grid,
    in_specs,
    out_specs,
    out_shape,
    semantics,
    name="ssd_chunk_scan_bwd_dcb",
  )(xt, dyt, ct, cb, s_in, gs, cs, dt, e, w, seq)
  if outs_g != g:
    b, nc, l, n = plan.b, plan.nc, plan.l, plan.n
    dcb = dcb.reshape(b, nc, g, ns, q, q).sum(3)
    dcoff = dcoff.reshape(b, g, ns, l, n).sum(2)
    dbst = dbst.reshape(b, g, ns, l, n).sum(2)
  return dcb, dcoff, dbst, dcs, da[..., 0]


# ----------------------------------------------------------------------------
# XLA glue and the custom VJP.
# ----------------------------------------------------------------------------


class _Prepared:
  """Per-chunk quantities shared by the forward and the backward."""

  def __init__(self, x, dt, A, B, C, seq_idx, plan: _Plan):
    b, h, g, n, q, nc = plan.b, plan.h, plan.g, plan.n, plan.q, plan.nc
    dtype = plan.dtype
    self.xt = x.astype(dtype).transpose(0, 2, 1, 3)  # (b, h, l, p)
    self.bt = B.astype(dtype).transpose(0, 2, 1, 3)  # (b, g, l, n)
    self.ct = C.astype(dtype).transpose(0, 2, 1, 3)
    self.dt = dt.reshape(b, nc, q, h).transpose(0, 1, 3, 2)  # (b, nc, h, Q)
    self.cs = jnp.cumsum(self.dt * A[:, None], axis=-1)
    seq = seq_idx.reshape(b, nc, q)
    seq_end = seq[..., -1]
    seq_prev = jnp.pad(seq_end, [(0, 0), (1, 0)])[:, :-1]  # 0 before chunk 0
    self.seq = seq.reshape(b, nc, 1, q)
    self.in_last_doc = (seq == seq_end[..., None])[:, :, None]  # (b, nc, 1, Q)
    from_prev = (seq == seq_prev[..., None])[:, :, None]
    cs_last = self.cs[..., -1:]
    self.to_end = jnp.exp(cs_last - self.cs) * self.in_last_doc
    self.w = self.to_end * self.dt
    self.e = jnp.exp(self.cs) * from_prev
    self.a = jnp.exp(cs_last[..., 0]) * (seq_end == seq_prev)[..., None]
    precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
    self.cb = jnp.einsum(
      "bgcin,bgcjn->bcgij",
      self.ct.reshape(b, g, nc, q, n),
      self.bt.reshape(b, g, nc, q, n),
      precision=precision,
      preferred_element_type=f32,
    )


def _states(x, dt, A, B, C, init, seq_idx, plan: _Plan):
  """Prepared inputs, states entering each chunk (b, nc, h, n, p), final."""
  pre = _Prepared(x, dt, A, B, C, seq_idx, plan)
  s_chunk = chunk_states(pre.xt, pre.bt, pre.w, plan)
  s_in, final = pass_states(s_chunk, pre.a, init.swapaxes(-1, -2), plan)
  return pre, s_in, final


def _forward(x, dt, A, B, C, init, seq_idx, plan: _Plan):
  pre, s_in, final = _states(x, dt, A, B, C, init, seq_idx, plan)
  yt = chunk_scan(pre.xt, pre.ct, pre.cb, s_in, pre.cs, pre.dt, pre.e, pre.seq, plan)
  return yt.transpose(0, 2, 1, 3), final.swapaxes(-1, -2)


def _backward(plan: _Plan, res, cotangents):
  x, dt, A, B, C, init, seq_idx = res
  dy, dfinal = cotangents
  b, l, h, g, n, q, nc = plan.b, plan.l, plan.h, plan.g, plan.n, plan.q, plan.nc
  # Recompute rather than save: the states are as large as x in fp32.
  pre, s_in, _ = _states(x, dt, A, B, C, init, seq_idx, plan)
  dyt = dy.astype(plan.dtype).transpose(0, 2, 1, 3)

  ds_y = chunk_states(dyt, pre.ct, pre.e, plan)
  gs, dinit = pass_states(ds_y, pre.a, dfinal.astype(f32).swapaxes(-1, -2), plan, reverse=True)
  dxt, x_v, x_bg = chunk_scan_dx(
    pre.xt, dyt, pre.bt, pre.cb, gs, pre.cs, pre.dt, pre.w, pre.seq, plan
  )
  dcb, dc_off, db_state, dcs_rows, da = chunk_scan_dcb(
    pre.xt, dyt, pre.ct, pre.cb, s_in, gs, pre.cs, pre.dt, pre.e, pre.w, pre.seq, plan
  )

  # dC, dB from d(C B^T) (summed over each group's heads): per-group batched
  # matmuls, bf16 operands for bf16 inputs as in the forward's C B^T.
  precision = jax.lax.Precision.HIGHEST if plan.dtype == jnp.float32 else None
  dcb = dcb.astype(plan.dtype)
  bt5 = pre.bt.reshape(b, g, nc, q, n)
  ct5 = pre.ct.reshape(b, g, nc, q, n)
  dc = dc_off.reshape(b, g, nc, q, n) + jnp.einsum(
    "bcgij,bgcjn->bgcin", dcb, bt5, precision=precision, preferred_element_type=f32
  )
  db = db_state.reshape(b, g, nc, q, n) + jnp.einsum(
    "bcgij,bgcin->bgcjn", dcb, ct5, precision=precision, preferred_element_type=f32
  )
  dc = dc.reshape(b, g, l, n).transpose(0, 2, 1, 3)
  db = db.reshape(b, g, l, n).transpose(0, 2, 1, 3)

  # Per-position d cs: rows of the decays (dy . y), their columns
  # (-dt x . V), the chunk-state weights w and the carried decay a.
  dw_w = x_bg * pre.w
  dcs = dcs_rows - pre.dt * x_v - dw_w
  last = jnp.sum(dw_w, axis=-1) + da * pre.a
  dcs = dcs.at[..., -1].add(last)
  ddt = x_v + x_bg * pre.to_end
  d_dta = jnp.flip(jnp.cumsum(jnp.flip(dcs, -1), axis=-1), -1)
  ddt = ddt + d_dta * A[:, None]
  dA = jnp.sum(d_dta * pre.dt, axis=(0, 1, 3))
  ddt = ddt.transpose(0, 1, 3, 2).reshape(b, l, h)

  dx = dxt.transpose(0, 2, 1, 3)
  seq_ct = np.zeros(seq_idx.shape, jax.dtypes.float0)
  return (
    dx.astype(x.dtype),
    ddt.astype(dt.dtype),
    dA.astype(A.dtype),
    db.astype(B.dtype),
    dc.astype(C.dtype),
    dinit.swapaxes(-1, -2).astype(init.dtype),
    seq_ct,
  )


@functools.cache
def _vjp_core(plan: _Plan):
  @jax.custom_vjp
  def core(x, dt, A, B, C, init, seq_idx):
    return _forward(x, dt, A, B, C, init, seq_idx, plan)

  def fwd(x, dt, A, B, C, init, seq_idx):
    return core(x, dt, A, B, C, init, seq_idx), (x, dt, A, B, C, init, seq_idx)

  core.defvjp(fwd, functools.partial(_backward, plan))
  return core


def make_core(cfg: SsdKernelConfig):
  """An SSD core (`hybridna_jax.ssd_reference`) running the Pallas kernels
  with `cfg`.

  Shapes the kernels cannot take (see `unsupported_reason`) fall back to the
  XLA chunked core, with a one-time warning.
  """

  def core(inputs: ssd_reference.CoreInputs, chunk_size: int):
    x, dt, A, B, C, seq_idx, init = inputs
    g, n = B.shape[-2:]
    reason = unsupported_reason(x.shape, g, n, chunk_size, cfg)
    if reason is not None:
      warn_once(f"Pallas SSD ({cfg.platform}): {reason}; using the XLA chunked scan.")
      return ssd_reference.chunked_core(inputs, chunk_size)
    plan = _make_plan(x.shape, x.dtype, g, n, chunk_size, cfg)
    return _vjp_core(plan)(
      x, dt.astype(f32), A.astype(f32), B, C, init.astype(f32), seq_idx.astype(jnp.int32)
    )

  core.config = cfg
  return core


def flops(
  b: int, l: int, h: int, p: int, n: int, g: int, chunk: int, backward: bool = False
) -> float:
  """Matmul FLOPs of the chunked algorithm (causal half of the intra-chunk
  products), the count benchmarks report TFLOP/s against."""
  nc = l // chunk
  q = chunk
  per_chunk_head = (
    q * q * p  # diag output (causal half of 2 q q p)
    + 2 * q * n * p  # chunk state
    + 2 * q * n * p
  )  # off-diagonal output
  fwd = b * nc * (h * per_chunk_head + g * 2 * q * q * n)
  if not backward:
    return float(fwd)
  # Backward: recomputed forward states, dS, dx (diag + state), dCB, y
  # recompute, dC/dB state parts, dC/dB from dCB.
  bwd = (
    b
    * nc
    * (
      h
      * (
        2 * q * n * p  # states again
        + 2 * q * n * p  # dS from dy
        + q * q * p  # dx diag
        + 2 * q * n * p  # B G
        + q * q * p  # dcb
        + q * q * p  # y diag recompute
        + 2 * q * n * p  # C S (y off)
        + 4 * q * n * p
      )  # dC off, dB state
      + g * (2 * q * q * n + 4 * q * q * n)
    )
  )
  return float(fwd + bwd)


# ----------------------------------------------------------------------------
# Entry points of `hybridna_jax.ssd.CORES`, each run per shard on the active
# mesh (`sharded`).
# ----------------------------------------------------------------------------

_COMPILED = {platform: make_core(SsdKernelConfig(platform=platform)) for platform in ("gpu", "tpu")}
_INTERPRETED = {
  platform: make_core(SsdKernelConfig(platform=platform, interpret=True))
  for platform in ("gpu", "tpu")
}


def _backend_core(inputs: ssd_reference.CoreInputs, chunk_size: int):
  """The compiled variant of the default backend; elsewhere the Triton one
  in interpret mode."""
  core = _COMPILED.get(jax.default_backend(), _INTERPRETED["gpu"])
  return core(inputs, chunk_size)


sharded_backend_core = sharded.shard_ssd_core(_backend_core)  # "pallas"
sharded_gpu_core = sharded.shard_ssd_core(_COMPILED["gpu"])  # "pallas_gpu"
sharded_tpu_core = sharded.shard_ssd_core(_COMPILED["tpu"])  # "pallas_tpu"
sharded_gpu_interpret_core = sharded.shard_ssd_core(_INTERPRETED["gpu"])
sharded_tpu_interpret_core = sharded.shard_ssd_core(_INTERPRETED["tpu"])
