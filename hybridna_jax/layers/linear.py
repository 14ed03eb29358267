"""Dense projections with logical-axis metadata and mixed precision."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from hybridna_jax import sharding
from hybridna_jax.sharding import LogicalAxes


class Linear(nnx.Module):
  """y = x . W over the last `len(in_shape)` axes of x.

  The kernel has shape in_shape + out_shape and logical axes `axes` (one per
  kernel dimension), is stored in `param_dtype` and cast to `dtype` for the
  matmul (bf16 compute over fp32 master weights).
  """

  def __init__(
    self,
    in_shape: int | Sequence[int],
    out_shape: int | Sequence[int],
    *,
    axes: LogicalAxes,
    rngs: nnx.Rngs,
    init_std: float,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
  ):
    in_shape = (in_shape,) if isinstance(in_shape, int) else tuple(in_shape)
    out_shape = (out_shape,) if isinstance(out_shape, int) else tuple(out_shape)
    shape = in_shape + out_shape
    if len(axes) != len(shape):
      raise ValueError(f"Linear: {len(axes)} logical axes for a kernel of shape {shape}.")
    self.num_in = len(in_shape)
    self.dtype = dtype
    self.kernel = nnx.Param(
      init_std * jax.random.normal(rngs.params(), shape, param_dtype), logical_axes=tuple(axes)
    )

  def _matrices(self, x: jax.Array):
    """x as (tokens, fan_in), the kernel as (fan_in, *out_shape) in the
    compute dtype, and x's leading shape.

    Products are 2D matmuls, (tokens, fan_in) x (fan_in, fan_out): XLA:CPU
    runs those (and their transposes in the backward) as library GEMMs,
    while a dot over (b, l, d) operands took twice as long forward and
    backward (benchmarks/RESULTS.md, "Speed on CPU"). The reshapes are free
    on every backend, except where the length is split over devices (a
    context axis: `_contract`)."""
    kernel = self.kernel[...].astype(self.dtype)
    fan_in = math.prod(kernel.shape[: self.num_in])
    lead = x.shape[: x.ndim - self.num_in]
    x2d = x.astype(self.dtype).reshape(-1, fan_in)
    return x2d, kernel.reshape(fan_in, *kernel.shape[self.num_in :]), lead

  def _contract(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x (..., *in_shape) . kernel (*in_shape, *rest) -> (..., *rest), with
    x's leading axes kept: with the length split over devices, merging it
    with the batch made XLA all-gather the length (forward and backward)."""
    n = self.num_in
    contracting = (tuple(range(x.ndim - n, x.ndim)), tuple(range(n)))
    return jax.lax.dot_general(
      x.astype(self.dtype), kernel.astype(self.dtype), (contracting, ((), ()))
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    """x (..., *in_shape) -> (..., *out_shape)."""
    if sharding.active_context_shards() > 1:
      return self._contract(x, self.kernel[...])
    x2d, kernel, lead = self._matrices(x)
    y = x2d @ kernel.reshape(kernel.shape[0], -1)
    return y.reshape(*lead, *kernel.shape[1:])

  def parts(self, x: jax.Array) -> tuple[jax.Array, ...]:
    """The output split along the first output axis, one matmul per part:
    x (..., *in_shape) -> out_shape[0] arrays (..., *out_shape[1:]).

    The same values as slicing `self(x)`, but each part is contiguous, and
    the backward adds (tokens, fan_in) cotangents instead of padding strided
    slices of the whole output back together (XLA:CPU spent more on those
    than on the matmuls)."""
    if sharding.active_context_shards() > 1:
      kernel = self.kernel[...]
      return tuple(
        self._contract(x, jnp.take(kernel, i, axis=self.num_in))
        for i in range(kernel.shape[self.num_in])
      )
    x2d, kernel, lead = self._matrices(x)
    return tuple(
      (x2d @ kernel[:, i].reshape(kernel.shape[0], -1)).reshape(*lead, *kernel.shape[2:])
      for i in range(kernel.shape[1])
    )
