"""Causal GQA attention kernels: splash (TPU), cuDNN and a Pallas Triton flash
kernel (GPU).

All follow `hybridna_jax.attention.causal_attention` (references in
`hybridna_jax.attention_reference`): q (b, l, hq, d), k and v
(b, l, hkv, d), optional segment ids (b, l) int32 (a query sees keys at or
before it with the same id), fp32 softmax, output in q's dtype.

* `splash_attention`: jax's splash attention (Mosaic TPU) with a causal mask
  and segment ids; GQA as its MQA form (one kv head, r query heads) vmapped
  over kv heads and batch. Lengths are padded to a multiple of 128: padded
  keys come after every real query, so the causal mask hides them.
* `cudnn_attention`: `jax.nn.dot_product_attention(implementation="cudnn")`,
  causal, GQA native. The public API takes no segment ids.
* `flash_attention`: a Pallas Triton flash attention (FlashAttention-2
  forward, separate dq and dk/dv backward kernels) with segment ids and GQA;
  key/value heads are indexed by the BlockSpecs (no repeat), and the dk/dv
  kernel loops over the query heads of its group so nothing is summed in HBM.
  Causal tiles above the diagonal are skipped.
* `gpu_attention`: what `auto` uses on GPU: cuDNN where it applies (no
  segment ids, 16-bit inputs), else the Pallas kernel.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from hybridna_jax import attention_reference
from hybridna_jax.kernel_registry import warn_once
from hybridna_jax.kernels import sharded

Array = jax.Array
f32 = jnp.float32
_LOG2E = math.log2(math.e)
_MASK = -1e30  # finite: a tile with no visible key must not produce NaN
_NT = (((1,), (1,)), ((), ()))
_TN = (((0,), (0,)), ((), ()))


def _pad_len(l: int, multiple: int) -> int:
  return -(-l // multiple) * multiple


def _pad_seq(a: Array | None, lp: int) -> Array | None:
  if a is None or a.shape[1] == lp:
    return a
  pad = [(0, 0), (0, lp - a.shape[1])] + [(0, 0)] * (a.ndim - 2)
  return jnp.pad(a, pad)


# ----------------------------------------------------------------------------
# TPU: splash attention.
# ----------------------------------------------------------------------------


def _splash_block_sizes(block_q: int, block_kv: int):
  """Splash's tiles: the same for the forward and the fused backward."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa  # pylint: disable=g-import-not-at-top

  return sa.BlockSizes(
    block_q=block_q,
    block_kv=block_kv,
    block_kv_compute=block_kv,
    block_q_dkv=block_q,
    block_kv_dkv=block_kv,
    block_kv_dkv_compute=block_kv,
    use_fused_bwd_kernel=True,
  )


@functools.lru_cache(maxsize=64)
def _splash_kernel(lp: int, r: int, block: int, interpret: bool):
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas.ops.tpu import splash_attention as sa  # pylint: disable=g-import-not-at-top

  mask = sa.MultiHeadMask([sa.CausalMask((lp, lp)) for _ in range(r)])
  sizes = _splash_block_sizes(block, block)
  # interpret: Pallas' TPU interpret mode (also for the backward kernels,
  # which are traced outside any context manager).
  mode = pltpu.InterpretParams() if interpret else False
  # Concrete mask arrays, so the cached kernel holds no tracer of the first
  # trace that built it.
  with jax.ensure_compile_time_eval():
    return sa.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=mode)


def _per_row_and_kv_head(fn, interpret: bool, *args):
  """`fn` applied to each (batch row, kv head) of `args`, arrays (b, hkv,
  ...) or None; outputs (b, hkv, ...). vmapped, or a loop in TPU interpret
  mode, which does not take a vmapped pallas_call with dimension semantics
  (jax 0.10): the same kernel calls."""
  b, h = args[0].shape[:2]
  flat = [None if a is None else a.reshape(b * h, *a.shape[2:]) for a in args]
  if interpret:
    out = jax.lax.map(lambda xs: fn(*xs), flat)
  else:
    out = jax.vmap(fn)(*flat)
  return jax.tree.map(lambda o: o.reshape(b, h, *o.shape[1:]), out)


def _splash_layout(q, k, v, q_seg, k_seg):
  """(b, l, heads, d) -> splash's MQA layout per (row, kv head): q scaled
  (splash applies no softmax scale; folded into q in fp32) (b, hkv, r, lq,
  d); k, v (b, hkv, lk, d); segment ids (b, hkv, l) or None."""
  b, lq, hq, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  qs = (q.astype(f32) * d**-0.5).astype(q.dtype)
  qh = qs.reshape(b, lq, hkv, hq // hkv, d).transpose(0, 2, 3, 1, 4)
  kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  if q_seg is None:
    return qh, kh, vh, None, None
  per_head = lambda s, l: jnp.broadcast_to(s[:, None], (b, hkv, l))
  return qh, kh, vh, per_head(q_seg, lq), per_head(k_seg, lk)


def _from_splash(x, hq: int):
  """(b, hkv, r, l, ...) -> (b, l, hq, ...)."""
  x = jnp.moveaxis(x, 3, 1)
  return x.reshape(x.shape[0], x.shape[1], hq, *x.shape[4:])


def splash_attention(q, k, v, segment_ids=None, *, block: int = 512, interpret: bool = False):
  """Causal GQA attention through splash attention (TPU).

  With `interpret`, runs under Pallas' TPU interpret mode (CPU tests).
  """
  from jax.experimental.pallas.ops.tpu import splash_attention as sa  # pylint: disable=g-import-not-at-top

  b, l, hq, d = q.shape
  r = hq // k.shape[2]
  lp = _pad_len(l, 128)
  block = max(bk for bk in (block, 512, 256, 128) if bk <= block and lp % bk == 0)
  kernel = _splash_kernel(lp, r, block, interpret)
  seg = _pad_seq(segment_ids, lp)
  qh, kh, vh, q_seg, k_seg = _splash_layout(*(_pad_seq(a, lp) for a in (q, k, v)), seg, seg)

  def one(qg, kg, vg, qs, ks):
    return kernel(qg, kg, vg, segment_ids=None if qs is None else sa.SegmentIds(q=qs, kv=ks))

  out = _per_row_and_kv_head(one, interpret, qh, kh, vh, q_seg, k_seg)
  return _from_splash(out, hq)[:, :l].astype(q.dtype)


# One (query slice, key slice) block of context-parallel attention
# (`attention_reference.BlockAttention`): a causal or a full mask, the
# log-sum-exp out, and a backward from the merged ring result.


@functools.lru_cache(maxsize=64)
def _splash_block_kernel(lq: int, lk: int, r: int, causal: bool, interpret: bool):
  from jax.experimental.pallas.ops.tpu import splash_attention as sa  # pylint: disable=g-import-not-at-top

  mask = (sa.CausalMask if causal else sa.FullMask)((lq, lk))
  tile = lambda length: max(t for t in (512, 256, 128) if length % t == 0)
  sizes = _splash_block_sizes(tile(lq), tile(lk))
  # interpret: Pallas' generic interpreter, not TPU interpret mode
  # (`InterpretParams`), which synchronises the devices of a shard_map at
  # each kernel call and hangs when the ring's branches run different kernels
  # on different devices.
  with jax.ensure_compile_time_eval():
    return sa.make_splash_mqa_single_device(
      sa.MultiHeadMask([mask] * r), block_sizes=sizes, save_residuals=True, interpret=interpret
    )


def _splash_block_forward(q, k, v, q_seg, k_seg, causal, *, interpret=False):
  from jax.experimental.pallas.ops.tpu import splash_attention as sa  # pylint: disable=g-import-not-at-top

  hq = q.shape[2]
  kernel = _splash_block_kernel(q.shape[1], k.shape[1], hq // k.shape[2], causal, interpret)

  def one(qg, kg, vg, qs, ks):
    out, (lse,) = kernel(qg, kg, vg, segment_ids=sa.SegmentIds(q=qs, kv=ks))
    return out, lse

  out, lse = _per_row_and_kv_head(one, interpret, *_splash_layout(q, k, v, q_seg, k_seg))
  return _from_splash(out, hq).astype(f32), _from_splash(lse, hq)


def _splash_block_backward(q, k, v, q_seg, k_seg, causal, out, lse, d_out, *, interpret=False):
  """Splash's own dq/dk/dv kernels (its private `_splash_attention_bwd`,
  the public kernel's VJP, which takes the output and log-sum-exp as
  residuals: here the merged ones). Gradients come in the inputs' dtype."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sak  # pylint: disable=g-import-not-at-top

  b, lq, hq, d = q.shape
  hkv = k.shape[2]
  kernel = _splash_block_kernel(lq, k.shape[1], hq // hkv, causal, interpret)
  kw = kernel.kwargs
  info = kernel.dkv_mask_info
  if info.partial_mask_blocks is not None:  # as splash's own call collapses them
    blocks = info.partial_mask_blocks
    info = info._replace(partial_mask_blocks=blocks.reshape(-1, *blocks.shape[-2:]))
  grouped = lambda a: a.reshape(b, lq, hkv, hq // hkv, *a.shape[3:]).swapaxes(1, 2).swapaxes(2, 3)

  def one(qg, kg, vg, qs, ks, og, lg, dog):
    residuals = (qg, kg, vg, sak.SegmentIds(q=qs, kv=ks), None, og, lg, None, info)
    grads = sak._splash_attention_bwd(  # noqa: SLF001
      False, kw["mask_value"], True, kw["block_sizes"], None, kw["mask_function"],
      kw["attn_logits_soft_cap"], kw["interpret"], residuals, dog,
    )  # fmt: skip
    return grads[3:6]

  layout = _splash_layout(q, k, v, q_seg, k_seg)
  dq, dk, dv = _per_row_and_kv_head(
    one, interpret, *layout, grouped(out), grouped(lse), grouped(d_out.astype(q.dtype))
  )
  dq = _from_splash(dq, hq).astype(f32) * d**-0.5  # splash's q was scaled
  return dq, dk.swapaxes(1, 2).astype(f32), dv.swapaxes(1, 2).astype(f32)


def splash_block(interpret: bool = False) -> attention_reference.BlockAttention:
  return attention_reference.BlockAttention(
    "splash_interpret" if interpret else "splash",
    functools.partial(_splash_block_forward, interpret=interpret),
    functools.partial(_splash_block_backward, interpret=interpret),
    length_multiple=128,
  )


# ----------------------------------------------------------------------------
# GPU: cuDNN.
# ----------------------------------------------------------------------------


def cudnn_attention(q, k, v, segment_ids=None):
  """cuDNN flash attention (no segment ids: use `gpu_attention` for those)."""
  if segment_ids is not None:
    raise ValueError("cudnn attention takes no segment ids; use 'flash_gpu'.")
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


# ----------------------------------------------------------------------------
# GPU: Pallas Triton flash attention.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FlashConfig:
  """Tiles and launch parameters of the Triton flash attention."""

  block_q: int = 128
  block_k: int = 64
  block_q_bwd: int = 64
  block_k_bwd: int = 64
  num_warps: int | None = None  # default: 4 for d <= 64, else 8
  num_stages: int = 2
  interpret: bool = False


def _dot(a, b, dims=(((1,), (0,)), ((), ()))):
  precision = jax.lax.Precision.HIGHEST if a.dtype == f32 else None
  return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=f32)


def _mask(q0, k0, bq, bk, q_seg, k_seg, diagonal):
  """(bq, bk) visibility, or None when every key of the tile is visible.

  Only tiles that reach the diagonal make the causal compare (`diagonal`);
  segment ids are compared on every tile."""
  mask = None
  if diagonal:
    rows = q0 + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    cols = k0 + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    mask = rows >= cols
  if q_seg is not None:
    same = q_seg[:, None] == k_seg[None, :]
    mask = same if mask is None else mask & same
  return mask


def _key_blocks(i, bq, bk, nk, causal):
  """Key tiles of query tile i: [0, n_full) lie wholly before its first
  query, [n_full, n_blocks) reach the diagonal; later ones are skipped.
  Without the causal mask every tile is full."""
  if not causal:
    return nk, nk
  n_full = jnp.minimum(jax.lax.div(i * bq, bk), nk)
  n_blocks = jnp.minimum(jax.lax.div((i + 1) * bq + bk - 1, bk), nk)
  return n_full, n_blocks


def _fwd_kernel(q_ref, k_ref, v_ref, *refs, has_seg, scale, bq, bk, nk, causal):
  """One (query block, batch, query head). Scores in base 2 (exp2)."""
  if has_seg:
    qs_ref, ks_ref, o_ref, lse_ref = refs
  else:
    (o_ref, lse_ref), qs_ref, ks_ref = refs, None, None
  i = pl.program_id(0)
  q = q_ref[...]
  q_seg = qs_ref[...] if has_seg else None
  d = q.shape[-1]

  def body(j, carry, diagonal):
    m, s, acc = carry
    keys = pl.ds(pl.multiple_of(j * bk, bk), bk)
    x = _dot(q, k_ref[keys, :], _NT) * (scale * _LOG2E)
    mask = _mask(i * bq, j * bk, bq, bk, q_seg, ks_ref[keys] if has_seg else None, diagonal)
    if mask is not None:
      x = jnp.where(mask, x, _MASK)
    m_new = jnp.maximum(m, jnp.max(x, axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(x - m_new[:, None])
    v = v_ref[keys, :]
    acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
    return m_new, s * alpha + jnp.sum(p, axis=1), acc

  n_full, n_blocks = _key_blocks(i, bq, bk, nk, causal)
  init = (jnp.full((bq,), _MASK, f32), jnp.zeros((bq,), f32), jnp.zeros((bq, d), f32))
  carry = jax.lax.fori_loop(0, n_full, functools.partial(body, diagonal=False), init)
  m, s, acc = jax.lax.fori_loop(n_full, n_blocks, functools.partial(body, diagonal=True), carry)
  o_ref[...] = (acc / s[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log2(s)


def _dq_kernel(
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, has_seg, scale, bq, bk, nk, causal
):
  if has_seg:
    qs_ref, ks_ref, dq_ref = refs
  else:
    (dq_ref,), qs_ref, ks_ref = refs, None, None
  i = pl.program_id(0)
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[...]
  delta = delta_ref[...]
  q_seg = qs_ref[...] if has_seg else None

  def body(j, dq, diagonal):
    keys = pl.ds(pl.multiple_of(j * bk, bk), bk)
    k = k_ref[keys, :]
    x = _dot(q, k, _NT) * (scale * _LOG2E)
    mask = _mask(i * bq, j * bk, bq, bk, q_seg, ks_ref[keys] if has_seg else None, diagonal)
    p = jnp.exp2(x - lse[:, None])
    if mask is not None:
      p = jnp.where(mask, p, 0.0)
    dp = _dot(do, v_ref[keys, :], _NT)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k)

  n_full, n_blocks = _key_blocks(i, bq, bk, nk, causal)
  dq = jnp.zeros(q.shape, f32)
  dq = jax.lax.fori_loop(0, n_full, functools.partial(body, diagonal=False), dq)
  dq = jax.lax.fori_loop(n_full, n_blocks, functools.partial(body, diagonal=True), dq)
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, has_seg, scale, bq, bk, r, nq, causal
):
  """One (key block, batch, kv head): loops over the group's r query heads."""
  if has_seg:
    qs_ref, ks_ref, dk_ref, dv_ref = refs
  else:
    (dk_ref, dv_ref), qs_ref, ks_ref = refs, None, None
  j = pl.program_id(0)
  k = k_ref[...]
  v = v_ref[...]
  k_seg = ks_ref[...] if has_seg else None
  # Query tiles [first, full) reach the diagonal; [full, nq) lie wholly
  # after the key tile; earlier ones see none of it. Without the causal
  # mask, every query tile is full.
  if causal:
    first = jax.lax.div(j * bk, bq)
    full = jnp.minimum(jax.lax.div((j + 1) * bk + bq - 1, bq), nq)
  else:
    first = full = 0

  def q_block(i, carry, hh, diagonal):
    dk, dv = carry
    rows = pl.ds(pl.multiple_of(i * bq, bq), bq)
    q = q_ref[rows, hh, :]
    do = do_ref[rows, hh, :]
    x = _dot(q, k, _NT) * (scale * _LOG2E)
    mask = _mask(i * bq, j * bk, bq, bk, qs_ref[rows] if has_seg else None, k_seg, diagonal)
    p = jnp.exp2(x - lse_ref[hh, rows][:, None])
    if mask is not None:
      p = jnp.where(mask, p, 0.0)
    dv = dv + _dot(p.astype(do.dtype), do, _TN)
    dp = _dot(do, v, _NT)
    ds = p * (dp - delta_ref[hh, rows][:, None])
    dk = dk + _dot(ds.astype(q.dtype), q, _TN)
    return dk, dv

  def head(hh, carry):
    carry = jax.lax.fori_loop(first, full, functools.partial(q_block, hh=hh, diagonal=True), carry)
    return jax.lax.fori_loop(full, nq, functools.partial(q_block, hh=hh, diagonal=False), carry)

  init = (jnp.zeros(k.shape, f32), jnp.zeros(v.shape, f32))
  dk, dv = jax.lax.fori_loop(0, r, head, init)
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _params(cfg: FlashConfig, d: int):
  warps = cfg.num_warps or (4 if d <= 64 else 8)
  return plgpu.CompilerParams(num_warps=warps, num_stages=cfg.num_stages)


def _tile(block: int, length: int) -> int:
  return min(block, length)


def _flash_fwd(q, k, v, q_seg, k_seg, cfg: FlashConfig, causal=True, out_dtype=None):
  """q (b, lq, hq, d), k and v (b, lk, hkv, d), segment ids (b, lq) and
  (b, lk) or both None -> out (b, lq, hq, d) in `out_dtype` (q's by
  default) and the base-2 log-sum-exp (b, hq, lq) fp32. Causal: query r
  sees key c <= r (lq >= lk); else every key."""
  b, lq, hq, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  r = hq // hkv
  bq, bk = _tile(cfg.block_q, lq), _tile(cfg.block_k, lk)
  has_seg = q_seg is not None
  kv_head = lambda h: jax.lax.div(h, r) if r > 1 else h
  in_specs = [
    pl.BlockSpec((None, bq, None, d), lambda i, b_, h: (b_, i, h, 0)),
    pl.BlockSpec((None, lk, None, d), lambda i, b_, h: (b_, 0, kv_head(h), 0)),
    pl.BlockSpec((None, lk, None, d), lambda i, b_, h: (b_, 0, kv_head(h), 0)),
  ]
  args = [q, k, v]
  if has_seg:
    in_specs += [
      pl.BlockSpec((None, bq), lambda i, b_, h: (b_, i)),
      pl.BlockSpec((None, lk), lambda i, b_, h: (b_, 0)),
    ]
    args += [q_seg, k_seg]
  out_specs = [
    pl.BlockSpec((None, bq, None, d), lambda i, b_, h: (b_, i, h, 0)),
    pl.BlockSpec((None, None, bq), lambda i, b_, h: (b_, h, i)),
  ]
  out_shape = [
    jax.ShapeDtypeStruct(q.shape, out_dtype or q.dtype),
    jax.ShapeDtypeStruct((b, hq, lq), f32),
  ]
  kernel = functools.partial(
    _fwd_kernel, has_seg=has_seg, scale=d**-0.5, bq=bq, bk=bk, nk=lk // bk, causal=causal
  )
  return pl.pallas_call(
    kernel,
    grid=(lq // bq, b, hq),
    in_specs=in_specs,
    out_specs=out_specs,
    out_shape=out_shape,
    compiler_params=_params(cfg, d),
    interpret=cfg.interpret,
    name="flash_attention_fwd",
  )(*args)


def _flash_grads(q, k, v, q_seg, k_seg, out, lse, do, cfg: FlashConfig, causal=True, dtype=None):
  """dq, dk, dv (in `dtype`, the inputs' by default) of `_flash_fwd`'s
  output, given that output (or, for one block of a larger key set, the
  whole set's), its base-2 log-sum-exp (b, hq, lq) and cotangent `do`."""
  b, lq, hq, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  r = hq // hkv
  bq, bk = _tile(cfg.block_q_bwd, lq), _tile(cfg.block_k_bwd, lk)
  has_seg = q_seg is not None
  scale = d**-0.5
  do = do.astype(q.dtype)
  # delta_i = do_i . o_i (base-2 lse and natural delta: p is exact either way).
  delta = jnp.einsum("blhd,blhd->bhl", out.astype(f32), do.astype(f32))
  kv_head = lambda h: jax.lax.div(h, r) if r > 1 else h
  params = _params(cfg, d)
  grad = lambda a: jax.ShapeDtypeStruct(a.shape, dtype or a.dtype)

  # dq: one program per (query block, batch, query head).
  in_specs = [
    pl.BlockSpec((None, bq, None, d), lambda i, b_, h: (b_, i, h, 0)),
    pl.BlockSpec((None, lk, None, d), lambda i, b_, h: (b_, 0, kv_head(h), 0)),
    pl.BlockSpec((None, lk, None, d), lambda i, b_, h: (b_, 0, kv_head(h), 0)),
    pl.BlockSpec((None, bq, None, d), lambda i, b_, h: (b_, i, h, 0)),
    pl.BlockSpec((None, None, bq), lambda i, b_, h: (b_, h, i)),
    pl.BlockSpec((None, None, bq), lambda i, b_, h: (b_, h, i)),
  ]
  args = [q, k, v, do, lse, delta]
  if has_seg:
    in_specs += [
      pl.BlockSpec((None, bq), lambda i, b_, h: (b_, i)),
      pl.BlockSpec((None, lk), lambda i, b_, h: (b_, 0)),
    ]
    args += [q_seg, k_seg]
  dq = pl.pallas_call(
    functools.partial(
      _dq_kernel, has_seg=has_seg, scale=scale, bq=bq, bk=bk, nk=lk // bk, causal=causal
    ),
    grid=(lq // bq, b, hq),
    in_specs=in_specs,
    out_specs=pl.BlockSpec((None, bq, None, d), lambda i, b_, h: (b_, i, h, 0)),
    out_shape=grad(q),
    compiler_params=params,
    interpret=cfg.interpret,
    name="flash_attention_bwd_dq",
  )(*args)

  # dk, dv: one program per (key block, batch, kv head), looping over the r
  # query heads of the group.
  in_specs = [
    pl.BlockSpec((None, lq, r, d), lambda j, b_, h: (b_, 0, h, 0)),
    pl.BlockSpec((None, bk, None, d), lambda j, b_, h: (b_, j, h, 0)),
    pl.BlockSpec((None, bk, None, d), lambda j, b_, h: (b_, j, h, 0)),
    pl.BlockSpec((None, lq, r, d), lambda j, b_, h: (b_, 0, h, 0)),
    pl.BlockSpec((None, r, lq), lambda j, b_, h: (b_, h, 0)),
    pl.BlockSpec((None, r, lq), lambda j, b_, h: (b_, h, 0)),
  ]
  args = [q, k, v, do, lse, delta]
  if has_seg:
    in_specs += [
      pl.BlockSpec((None, lq), lambda j, b_, h: (b_, 0)),
      pl.BlockSpec((None, bk), lambda j, b_, h: (b_, j)),
    ]
    args += [q_seg, k_seg]
  kv_spec = pl.BlockSpec((None, bk, None, d), lambda j, b_, h: (b_, j, h, 0))
  dk, dv = pl.pallas_call(
    functools.partial(
      _dkv_kernel, has_seg=has_seg, scale=scale, bq=bq, bk=bk, r=r, nq=lq // bq, causal=causal
    ),
    grid=(lk // bk, b, hkv),
    in_specs=in_specs,
    out_specs=[kv_spec, kv_spec],
    out_shape=[grad(k), grad(v)],
    compiler_params=params,
    interpret=cfg.interpret,
    name="flash_attention_bwd_dkv",
  )(*args)
  return dq, dk, dv


def _flash_bwd(cfg: FlashConfig, res, do):
  q, k, v, seg, out, lse = res
  dq, dk, dv = _flash_grads(q, k, v, seg, seg, out, lse, do, cfg)
  seg_ct = None if seg is None else np.zeros(seg.shape, jax.dtypes.float0)
  return dq, dk, dv, seg_ct


@functools.cache
def _flash_vjp(cfg: FlashConfig):
  @jax.custom_vjp
  def attn(q, k, v, seg):
    return _flash_fwd(q, k, v, seg, seg, cfg)[0]

  def fwd(q, k, v, seg):
    out, lse = _flash_fwd(q, k, v, seg, seg, cfg)
    return out, (q, k, v, seg, out, lse)

  attn.defvjp(fwd, functools.partial(_flash_bwd, cfg))
  return attn


def flash_unsupported_reason(q_shape) -> str | None:
  d = q_shape[-1]
  if d < 16 or d & (d - 1):
    return f"head dim {d} must be a power of two >= 16 for the Triton kernel"
  return None


def flash_attention(q, k, v, segment_ids=None, *, config: FlashConfig = FlashConfig()):
  """Causal GQA flash attention, Pallas Triton (GPU; `interpret` on CPU)."""
  b, l, hq, d = q.shape
  if flash_unsupported_reason(q.shape):
    raise ValueError(flash_unsupported_reason(q.shape))
  blocks = (config.block_q, config.block_k, config.block_q_bwd, config.block_k_bwd)
  if l < max(blocks):
    lp = max(16, 1 << (l - 1).bit_length())  # short: power-of-two tiles
  else:
    lp = _pad_len(l, max(blocks))
  seg = None if segment_ids is None else _pad_seq(segment_ids.astype(jnp.int32), lp)
  out = _flash_vjp(config)(_pad_seq(q, lp), _pad_seq(k, lp), _pad_seq(v, lp), seg)
  return out[:, :l]


def _flash_block_forward(q, k, v, q_seg, k_seg, causal, *, config):
  out, lse2 = _flash_fwd(q, k, v, q_seg, k_seg, config, causal=causal, out_dtype=f32)
  return out, jnp.swapaxes(lse2, 1, 2) / _LOG2E  # base 2 -> natural, (b, lq, hq)


def _flash_block_backward(q, k, v, q_seg, k_seg, causal, out, lse, d_out, *, config):
  lse2 = jnp.swapaxes(lse, 1, 2) * _LOG2E
  return _flash_grads(q, k, v, q_seg, k_seg, out, lse2, d_out, config, causal=causal, dtype=f32)


def flash_block(config: FlashConfig = FlashConfig()) -> attention_reference.BlockAttention:
  blocks = (config.block_q, config.block_k, config.block_q_bwd, config.block_k_bwd)
  return attention_reference.BlockAttention(
    "pallas_gpu_interpret" if config.interpret else "pallas_gpu",
    functools.partial(_flash_block_forward, config=config),
    functools.partial(_flash_block_backward, config=config),
    length_multiple=max(blocks),
    unsupported=flash_unsupported_reason,
  )


def gpu_attention(q, k, v, segment_ids=None, *, config: FlashConfig = FlashConfig()):
  """GPU choice: cuDNN for 16-bit inputs without segment ids, else Triton.

  Shapes or setups either kernel rejects at trace time (e.g. no cuDNN, a
  head dim the Triton kernel does not take) fall back, with a one-time
  warning, to the Triton kernel and then to XLA's blockwise attention.
  """
  if segment_ids is None and q.dtype in (jnp.bfloat16, jnp.float16):
    try:
      return cudnn_attention(q, k, v)
    except (ValueError, RuntimeError, NotImplementedError) as e:
      warn_once(f"cuDNN attention unavailable ({e}); using the Pallas kernel.")
  reason = flash_unsupported_reason(q.shape)
  if reason is None:
    return flash_attention(q, k, v, segment_ids, config=config)
  warn_once(f"{reason}; using XLA blockwise attention.")
  return attention_reference.xla_blockwise_attention(q, k, v, segment_ids)


def attention_flops(b: int, l: int, hq: int, d: int, backward: bool = False):
  """Causal attention matmul FLOPs (half of 4 b hq l^2 d forward; the
  backward is 2.5x the forward: 5 matmuls against 2)."""
  fwd = 2 * b * hq * l * l * d
  return float(fwd * 3.5 if backward else fwd)


# ----------------------------------------------------------------------------
# Entry points of `hybridna_jax.attention.KERNELS`, each run per shard on the
# active mesh (`sharded`).
# ----------------------------------------------------------------------------

sharded_splash = sharded.shard_attention(splash_attention)
sharded_splash_interpret = sharded.shard_attention(
  functools.partial(splash_attention, interpret=True)
)
sharded_flash_gpu = sharded.shard_attention(gpu_attention)
sharded_cudnn = sharded.shard_attention(cudnn_attention)
sharded_pallas_gpu = sharded.shard_attention(flash_attention)
sharded_pallas_gpu_interpret = sharded.shard_attention(
  functools.partial(flash_attention, config=FlashConfig(interpret=True))
)

# Blocks of `hybridna_jax.attention.CONTEXT_BLOCKS`.
SPLASH_BLOCK = splash_block()
SPLASH_BLOCK_INTERPRET = splash_block(interpret=True)
FLASH_BLOCK = flash_block()
FLASH_BLOCK_INTERPRET = flash_block(FlashConfig(interpret=True))
