"""The Mamba2 mixer (mamba_ssm `Mamba2`), with SSD and decode state.

Data flow for x (b, l, d), d_inner = expand * d, h = d_inner / headdim:

    z, xs = x W_zx                 (b, l, d_inner) each
    B, C  = x W_bc                 (b, l, g * n) each
    dt    = x W_dt                 (b, l, h)
    xs, B, C = silu(causal depthwise conv1d(., width d_conv))
    y = SSD(xs, dt, A = -exp(A_log), B, C; D, dt_bias, softplus)
    out = W_out rmsnorm_g(y * silu(z))

mamba_ssm fuses W_zx, W_bc and W_dt into one `in_proj` (d -> [z, xBC, dt]);
here they are three kernels so that the tensor axis can split z/x and dt by
SSM head while B and C (shared by all heads of a group) stay replicated. The
math and parameter count are identical; a PyTorch checkpoint maps over by
slicing in_proj and conv1d along their output channels.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from hybridna_jax import ssd
from hybridna_jax.config import ModelConfig
from hybridna_jax.kernels.sharded import shard_causal_conv
from hybridna_jax.layers.linear import Linear
from hybridna_jax.layers.norms import GatedRMSNorm
from hybridna_jax.sharding import constrain

_INNER_AXES = ("act_batch", "act_length", "act_ssm_inner")


class MambaState(NamedTuple):
  """Decode state of one Mamba2 layer.

  conv_x: (b, d_conv - 1, d_inner) last pre-conv xs inputs.
  conv_bc: (b, d_conv - 1, 2, g * n) last pre-conv B, C inputs.
  ssm: (b, h, headdim, d_state) fp32 SSM state.
  """

  conv_x: jax.Array
  conv_bc: jax.Array
  ssm: jax.Array


def causal_conv(
  u: jax.Array,
  weight: jax.Array,
  bias: jax.Array,
  segment_ids: jax.Array | None = None,
  history: jax.Array | None = None,
  history_segment_ids: jax.Array | None = None,
) -> jax.Array:
  """Depthwise causal conv1d along time.

  out[t] = bias + sum_k weight[k] * u[t - (K - 1) + k], where an input from
  another document (per `segment_ids`, with the history belonging to document
  0) counts as zero -- the seq_idx convention of mamba_ssm's causal_conv1d.

  Args:
    u: (b, l, *channels); weight: (K, *channels); bias: (*channels,).
    segment_ids: (b, l) int32 or None.
    history: (b, K - 1, *channels) inputs before position 0 (zeros if None).
    history_segment_ids: (b, K - 1) their segment ids (None: document 0).
  """
  width = weight.shape[0]
  b, l = u.shape[:2]
  if history is None:
    history = jnp.zeros((b, width - 1) + u.shape[2:], u.dtype)
  padded = jnp.concatenate([history.astype(u.dtype), u], axis=1).reshape(b, width - 1 + l, -1)
  keep = None  # (b, l, K - 1): tap k of position t reads the same document
  if segment_ids is not None and width > 1:
    if history_segment_ids is None:
      history_segment_ids = jnp.zeros((b, width - 1), segment_ids.dtype)
    seg_padded = jnp.concatenate([history_segment_ids.astype(segment_ids.dtype), segment_ids], 1)
    keep = jnp.stack([seg_padded[:, k : k + l] == segment_ids for k in range(width - 1)], -1)
  out = _conv_taps(
    padded,
    weight.reshape(width, -1).astype(jnp.float32),
    bias.reshape(-1).astype(jnp.float32),
    keep,
  )
  return out.reshape(u.shape).astype(u.dtype)


def _same_document(x: jax.Array, keep: jax.Array | None, k: int, width: int) -> jax.Array:
  """x (b * l, C) with the rows whose tap k reads another document zeroed."""
  if keep is None or k == width - 1:  # the last tap is the position itself
    return x
  return x * keep[:, :, k].reshape(x.shape[0], 1)


def _tap(padded: jax.Array, keep: jax.Array | None, k: int, width: int) -> jax.Array:
  """Tap k's inputs as a fp32 (b * l, C) matrix, other documents' zeroed."""
  b, l = padded.shape[0], padded.shape[1] - width + 1
  return _same_document(padded[:, k : k + l].astype(jnp.float32).reshape(b * l, -1), keep, k, width)


@jax.custom_vjp
def _conv_taps(padded, weight, bias, keep):
  """padded (b, K - 1 + l, C) in the input dtype, weight (K, C) and bias (C,)
  fp32, keep (b, l, K - 1) bool or None -> (b * l, C) fp32.

  Its own backward keeps only `padded` (in its own dtype) and recomputes the
  fp32 taps. Under autodiff the K fp32 taps were the residuals: in the
  scanned layer layout they crossed the loop as stacks that XLA converted
  back to fp32 all at once before the backward (benchmarks/RESULTS.md, H200
  results), and on a CPU their (tokens, channels) products are plain
  matrices either way (the weight gradients are sums over tokens, which
  XLA:CPU did 40-80x slower over a (1, l, channels) batch of one)."""
  return _conv_taps_fwd(padded, weight, bias, keep)[0]


def _conv_taps_fwd(padded, weight, bias, keep):
  width = weight.shape[0]
  out = bias
  for k in range(width):
    out = out + _tap(padded, keep, k, width) * weight[k]
  return out, (padded, weight, keep)


def _conv_taps_bwd(residuals, d_out):
  padded, weight, keep = residuals
  width = weight.shape[0]
  b, l, channels = padded.shape[0], padded.shape[1] - width + 1, padded.shape[2]
  taps = (_tap(padded, keep, k, width) for k in range(width))
  d_weight = jnp.stack([jnp.sum(tap * d_out, axis=0) for tap in taps])
  d_padded = 0.0
  for k in range(width):
    d_tap = _same_document(d_out * weight[k], keep, k, width)
    d_padded += jnp.pad(d_tap.reshape(b, l, channels), ((0, 0), (k, width - 1 - k), (0, 0)))
  return d_padded.astype(padded.dtype), d_weight, jnp.sum(d_out, axis=0), None


_conv_taps.defvjp(_conv_taps_fwd, _conv_taps_bwd)


def _conv_init(rngs: nnx.Rngs, shape, width: int, dtype):
  # PyTorch's Conv1d default for a depthwise conv: U(+-1/sqrt(fan_in)), fan_in = width.
  bound = 1.0 / math.sqrt(width)
  return jax.random.uniform(rngs.params(), shape, dtype, -bound, bound)


class Mamba2(nnx.Module):
  """Mamba2 mixer; x (b, l, d) -> (b, l, d)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, di, h, gn, k = (
      cfg.d_model,
      cfg.d_inner,
      cfg.ssm_heads,
      cfg.ngroups * cfg.d_state,
      cfg.d_conv,
    )
    pdt = cfg.weight_dtype
    kw = dict(rngs=rngs, dtype=cfg.compute_dtype, param_dtype=pdt, init_std=cfg.init_std)
    self.in_zx = Linear(d, (2, di), axes=("embed", None, "ssm_inner"), **kw)
    self.in_bc = Linear(d, (2, gn), axes=("embed", None, "ssm_state"), **kw)
    self.in_dt = Linear(d, h, axes=("embed", "ssm_heads"), **kw)
    self.conv_x_weight = nnx.Param(
      _conv_init(rngs, (k, di), k, pdt), logical_axes=("conv_width", "ssm_inner")
    )
    self.conv_x_bias = nnx.Param(_conv_init(rngs, (di,), k, pdt), logical_axes=("ssm_inner",))
    self.conv_bc_weight = nnx.Param(
      _conv_init(rngs, (k, 2, gn), k, pdt), logical_axes=("conv_width", None, "ssm_state")
    )
    self.conv_bc_bias = nnx.Param(
      _conv_init(rngs, (2, gn), k, pdt), logical_axes=(None, "ssm_state")
    )

    # dt_bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max], floored.
    log_lo, log_hi = math.log(cfg.dt_min), math.log(cfg.dt_max)
    dt = jnp.exp(jax.random.uniform(rngs.params(), (h,), jnp.float32, log_lo, log_hi))
    dt = jnp.maximum(dt, cfg.dt_init_floor)
    self.dt_bias = nnx.Param(
      (dt + jnp.log(-jnp.expm1(-dt))).astype(pdt), logical_axes=("ssm_heads",)
    )
    lo, hi = cfg.a_init_range
    self.A_log = nnx.Param(
      jnp.log(jax.random.uniform(rngs.params(), (h,), jnp.float32, lo, hi)).astype(pdt),
      logical_axes=("ssm_heads",),
    )
    self.D = nnx.Param(jnp.ones((h,), pdt), logical_axes=("ssm_heads",))
    self.norm = GatedRMSNorm(di, groups=cfg.ngroups, eps=cfg.norm_eps, param_dtype=pdt)
    kw["init_std"] = cfg.init_std / (2 * cfg.n_layers) ** 0.5
    self.out = Linear(di, d, axes=("ssm_inner", "embed"), **kw)

  def _inputs(self, x):
    """Projections before the conv: xs, z (b, l, di), bc (b, l, 2, gn), dt (b, l, h)."""
    z, xs = self.in_zx.parts(x)
    return constrain(xs, _INNER_AXES), constrain(z, _INNER_AXES), self.in_bc(x), self.in_dt(x)

  def _output(self, y, z):
    """y (b, l, h, p) -> (b, l, d)."""
    b, l = y.shape[:2]
    y = constrain(y.reshape(b, l, self.cfg.d_inner), _INNER_AXES)
    return self.out(self.norm(y, z))

  def _split_bc(self, bc):
    b, l = bc.shape[:2]
    g, n = self.cfg.ngroups, self.cfg.d_state
    return bc[:, :, 0].reshape(b, l, g, n), bc[:, :, 1].reshape(b, l, g, n)

  def __call__(
    self, x: jax.Array, segment_ids: jax.Array | None = None, *, return_state: bool = False
  ):
    """Full-sequence forward. segment_ids (b, l) resets conv and SSM state at
    document boundaries; they must be numbered as `ssd.number_segments`
    gives them (the model numbers them once for every layer): the conv
    compares ids by value, so a raw id that comes back (1, 2, 1) would join
    its conv window to the earlier document. With `return_state`, also
    returns the MambaState after the last position (the prefill of
    decoding)."""
    cfg = self.cfg
    b, l, _ = x.shape
    xs_raw, z, bc_raw, dt = self._inputs(x)
    # On a context-parallel mesh each slice takes its left halo from the last.
    xs = jax.nn.silu(
      shard_causal_conv(
        causal_conv,
        xs_raw,
        self.conv_x_weight[...],
        self.conv_x_bias[...],
        segment_ids,
        ("act_ssm_inner",),
      )
    )
    bc = jax.nn.silu(
      shard_causal_conv(
        causal_conv,
        bc_raw,
        self.conv_bc_weight[...],
        self.conv_bc_bias[...],
        segment_ids,
        (None, None),
      )
    )
    B, C = self._split_bc(bc)
    y, final = ssd.ssd_chunked_scan(
      xs.reshape(b, l, cfg.ssm_heads, cfg.ssm_head_dim),
      dt,
      -jnp.exp(self.A_log[...].astype(jnp.float32)),
      B,
      C,
      cfg.chunk_size,
      D=self.D[...],
      dt_bias=self.dt_bias[...],
      dt_softplus=True,
      seq_idx=segment_ids,
      return_final_states=True,
      impl=cfg.ssd_impl,
    )
    out = self._output(y, z)
    if not return_state:
      return out
    keep = cfg.d_conv - 1
    history_x, history_bc = _last_steps(xs_raw, keep), _last_steps(bc_raw, keep)
    if segment_ids is not None:
      # Conv inputs from an earlier document (e.g. left padding) are not
      # history of the last one: zero them as the full forward masks them.
      seg = _last_steps(segment_ids, keep, fill=-1)
      same = seg == segment_ids[:, -1:]
      history_x = history_x * same[:, :, None].astype(history_x.dtype)
      history_bc = history_bc * same[:, :, None, None].astype(history_bc.dtype)
    return out, MambaState(conv_x=history_x, conv_bc=history_bc, ssm=final)

  def decode(self, x: jax.Array, state: MambaState) -> tuple[jax.Array, MambaState]:
    """One token per row: x (b, 1, d) -> (b, 1, d), updated state."""
    cfg = self.cfg
    b = x.shape[0]
    xs_raw, z, bc_raw, dt = self._inputs(x)
    xs = jax.nn.silu(
      causal_conv(xs_raw, self.conv_x_weight[...], self.conv_x_bias[...], history=state.conv_x)
    )
    bc = jax.nn.silu(
      causal_conv(bc_raw, self.conv_bc_weight[...], self.conv_bc_bias[...], history=state.conv_bc)
    )
    B, C = self._split_bc(bc)
    dt = ssd.softplus(dt[:, 0].astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32))
    x_heads = xs[:, 0].reshape(b, cfg.ssm_heads, cfg.ssm_head_dim)
    ssm_state, y = ssd.ssd_step(
      state.ssm, x_heads, dt, -jnp.exp(self.A_log[...].astype(jnp.float32)), B[:, 0], C[:, 0]
    )
    y = y + x_heads.astype(jnp.float32) * self.D[...].astype(jnp.float32)[:, None]
    out = self._output(y[:, None].astype(x.dtype), z)
    keep = cfg.d_conv - 1
    new_state = MambaState(
      conv_x=_last_steps(
        jnp.concatenate([state.conv_x, xs_raw.astype(state.conv_x.dtype)], 1), keep
      ),
      conv_bc=_last_steps(
        jnp.concatenate([state.conv_bc, bc_raw.astype(state.conv_bc.dtype)], 1), keep
      ),
      ssm=ssm_state,
    )
    return out, new_state


def _last_steps(u: jax.Array, k: int, fill=0) -> jax.Array:
  """The last k time steps of u (b, l, ...), left-padded with `fill` if l < k."""
  l = u.shape[1]
  if l < k:
    return jnp.pad(u, [(0, 0), (k - l, 0)] + [(0, 0)] * (u.ndim - 2), constant_values=fill)
  return u[:, l - k :]  # not u[:, -k:], which is all of u when k == 0 (d_conv=1)
