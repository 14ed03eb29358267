"""RMSNorm and the gated, grouped RMSNorm of the Mamba2 mixer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
  """x / rms(x) over the last axis, in fp32."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
  """RMSNorm with a learned scale; computes in fp32, returns x.dtype."""

  def __init__(self, dim: int, *, eps: float, axis_name: str = "embed", param_dtype=jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=(axis_name,))

  def __call__(self, x: jax.Array) -> jax.Array:
    return (rms_normalize(x, self.eps) * self.scale[...]).astype(x.dtype)


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
    gated = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
    *lead, dim = gated.shape
    grouped = rms_normalize(gated.reshape(*lead, self.groups, dim // self.groups), self.eps)
    return (grouped.reshape(*lead, dim) * self.scale[...]).astype(y.dtype)
