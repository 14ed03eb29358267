"""RMSNorm and the gated, grouped RMSNorm of the Mamba2 mixer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# Both norms scale (tokens, dim) matrices: a scale's gradient is a sum over
# tokens, and XLA:CPU reduced a (1, l, dim) cotangent over its batch and
# length 35-40x slower than the same values as (l, dim) (1 x 16,384 tokens;
# a batch of 2 was not affected). The reshapes are free on every backend.


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
    tokens = x.reshape(-1, x.shape[-1])
    return (rms_normalize(tokens, self.eps) * self.scale[...]).reshape(x.shape).astype(x.dtype)


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
    dim = y.shape[-1]
    gated = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
    grouped = rms_normalize(gated.reshape(-1, self.groups, dim // self.groups), self.eps)
    return (grouped.reshape(-1, dim) * self.scale[...]).reshape(y.shape).astype(y.dtype)
