"""RMSNorm and the gated, grouped RMSNorm of the Mamba2 mixer.

Both take (..., dim) arrays, (tokens, dim) matrices on one device or a
data/fsdp mesh, and have hand-written backward passes that
keep only their inputs and the (tokens, groups) inverse RMS. Under autodiff
every intermediate (the gated input, its normalised value, the gate's
sigmoid) became a residual, and XLA:CPU computed each one in a fusion of
its own that re-ran the whole producer chain (the causal conv, the SSD
output's transpose): the forward half of a training step spent 50x longer
in the norms than the forward alone (benchmarks/RESULTS.md, "Speed on CPU").
Scales multiply (tokens, dim) matrices too: a scale's gradient is a sum over
tokens, which XLA:CPU did 35-40x slower over a (1, l, dim) batch of one.
Where the length is split over devices (a context axis), the modules keep
(b, l, dim): merging a split length into tokens made XLA all-gather it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from hybridna_jax import sharding


def _inverse_rms(u: jax.Array, groups: int, eps: float) -> jax.Array:
  """u (..., dim) fp32 -> 1 / rms over each of `groups` groups, (..., groups, 1)."""
  grouped = u.reshape(*u.shape[:-1], groups, -1)
  return jax.lax.rsqrt(jnp.mean(jnp.square(grouped), axis=-1, keepdims=True) + eps)


def _times_inverse_rms(u: jax.Array, inv_rms: jax.Array) -> jax.Array:
  """u (..., dim) scaled group by group by inv_rms (..., groups, 1)."""
  return (u.reshape(*u.shape[:-1], inv_rms.shape[-2], -1) * inv_rms).reshape(u.shape)


def _normalize_vjp(u_hat, inv_rms, d_normalized):
  """Cotangent of u given that of u_hat = u * inv_rms(u), both (..., dim)
  fp32; inv_rms (..., groups, 1)."""
  grouped = u_hat.reshape(*u_hat.shape[:-1], inv_rms.shape[-2], -1)
  d = d_normalized.reshape(grouped.shape)
  mean = jnp.mean(d * grouped, axis=-1, keepdims=True)
  return (inv_rms * (d - grouped * mean)).reshape(u_hat.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """x (..., dim) / rms(x) * scale (dim,), computed in fp32, in x.dtype."""
  return _rms_norm_fwd(x, scale, eps)[0]


def _rms_norm_fwd(x, scale, eps):
  u = x.astype(jnp.float32)
  inv_rms = _inverse_rms(u, 1, eps)
  return (_times_inverse_rms(u, inv_rms) * scale).astype(x.dtype), (x, scale, inv_rms)


def _rms_norm_bwd(eps, residuals, d_out):
  del eps
  x, scale, inv_rms = residuals
  g = d_out.astype(jnp.float32)
  u_hat = _times_inverse_rms(x.astype(jnp.float32), inv_rms)
  d_scale = jnp.sum(g * u_hat, axis=tuple(range(g.ndim - 1)))
  du = _normalize_vjp(u_hat, inv_rms, g * scale.astype(jnp.float32))
  return du.astype(x.dtype), d_scale.astype(scale.dtype)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def gated_rms_norm(y: jax.Array, z: jax.Array, scale: jax.Array, groups: int, eps: float):
  """rmsnorm(y * silu(z)) within each of `groups` groups of the last axis,
  times scale (dim,): y, z (..., dim), fp32 inside, out in y.dtype."""
  return _gated_rms_norm_fwd(y, z, scale, groups, eps)[0]


def _gated_rms_norm_fwd(y, z, scale, groups, eps):
  u = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
  inv_rms = _inverse_rms(u, groups, eps)
  out = (_times_inverse_rms(u, inv_rms) * scale).astype(y.dtype)
  return out, (y, z, scale, inv_rms)


def _gated_rms_norm_bwd(groups, eps, residuals, d_out):
  del groups, eps
  y, z, scale, inv_rms = residuals
  y32, z32, g = y.astype(jnp.float32), z.astype(jnp.float32), d_out.astype(jnp.float32)
  sigmoid = jax.nn.sigmoid(z32)
  silu = z32 * sigmoid
  u_hat = _times_inverse_rms(y32 * silu, inv_rms)
  d_scale = jnp.sum(g * u_hat, axis=tuple(range(g.ndim - 1)))
  du = _normalize_vjp(u_hat, inv_rms, g * scale.astype(jnp.float32))
  dz = du * y32 * sigmoid * (1 + z32 * (1 - sigmoid))
  return (du * silu).astype(y.dtype), dz.astype(z.dtype), d_scale.astype(scale.dtype)


gated_rms_norm.defvjp(_gated_rms_norm_fwd, _gated_rms_norm_bwd)


class RMSNorm(nnx.Module):
  """RMSNorm with a learned scale; computes in fp32, returns x.dtype."""

  def __init__(self, dim: int, *, eps: float, axis_name: str = "embed", param_dtype=jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=(axis_name,))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x (..., dim) -> (..., dim)."""
    if sharding.active_context_shards() > 1:
      return rms_norm(x, self.scale[...], self.eps)
    tokens = x.reshape(-1, x.shape[-1])
    return rms_norm(tokens, self.scale[...], self.eps).reshape(x.shape)


class GatedRMSNorm(nnx.Module):
  """rmsnorm(y * silu(z)) normalised within each of `groups` groups of the
  last axis (mamba_ssm's RMSNormGated with norm_before_gate=False)."""

  def __init__(
    self,
    dim: int,
    *,
    groups: int,
    eps: float,
    axis_name: str = "ssm_inner",
    param_dtype=jnp.float32,
  ):
    self.eps = eps
    self.groups = groups
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=(axis_name,))

  def __call__(self, y: jax.Array, z: jax.Array) -> jax.Array:
    """y, z (..., dim) -> (..., dim) in y.dtype."""
    if sharding.active_context_shards() > 1:
      return gated_rms_norm(y, z, self.scale[...], self.groups, self.eps)
    dim = y.shape[-1]
    out = gated_rms_norm(
      y.reshape(-1, dim), z.reshape(-1, dim), self.scale[...], self.groups, self.eps
    )
    return out.reshape(y.shape)
