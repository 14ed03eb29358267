"""Grouped-query causal self-attention layer (no positional encoding by
default; RoPE optional), with a KV cache for decoding."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from hybridna_jax import attention as attention_ops
from hybridna_jax.config import ModelConfig
from hybridna_jax.layers.linear import Linear
from hybridna_jax.sharding import constrain

_QKV_AXES = ("act_batch", "act_length", "act_heads", None)
_KV_AXES = ("act_batch", "act_length", "act_kv_heads", None)


class KVCache(NamedTuple):
  """Keys and values of the filled cache slots: (b, slots, kv_heads, head_dim)."""

  k: jax.Array
  v: jax.Array


def apply_rope(
  x: jax.Array, positions: jax.Array, theta: float, fraction: float = 1.0
) -> jax.Array:
  """Rotary embedding (rotate-half form). x (b, l, h, d); positions (b, l).
  Only the first d * fraction dims rotate (partial rotary, as transformers'
  Bamba); the others pass through."""
  if fraction != 1.0:
    rot = int(x.shape[-1] * fraction)
    rotated = apply_rope(x[..., :rot], positions, theta)
    return jnp.concatenate([rotated, x[..., rot:]], axis=-1)
  d = x.shape[-1]
  freqs = theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)  # (d/2,)
  angles = positions.astype(jnp.float32)[..., None] * freqs  # (b, l, d/2)
  sin, cos = jnp.sin(angles)[:, :, None], jnp.cos(angles)[:, :, None]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class Attention(nnx.Module):
  """x (b, l, d) -> (b, l, d)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    kw = dict(
      rngs=rngs, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, init_std=cfg.init_std
    )
    hd = cfg.head_dim
    self.q = Linear(cfg.d_model, (cfg.num_heads, hd), axes=("embed", "q_heads", "head_dim"), **kw)
    self.k = Linear(
      cfg.d_model, (cfg.num_kv_heads, hd), axes=("embed", "kv_heads", "head_dim"), **kw
    )
    self.v = Linear(
      cfg.d_model, (cfg.num_kv_heads, hd), axes=("embed", "kv_heads", "head_dim"), **kw
    )
    kw["init_std"] = cfg.init_std / (2 * cfg.n_layers) ** 0.5
    self.o = Linear((cfg.num_heads, hd), cfg.d_model, axes=("q_heads", "head_dim", "embed"), **kw)

  def _project(self, x, positions):
    q = constrain(self.q(x), _QKV_AXES)
    k = constrain(self.k(x), _KV_AXES)
    v = constrain(self.v(x), _KV_AXES)
    if self.cfg.rope:
      q = apply_rope(q, positions, self.cfg.rope_theta, self.cfg.rope_fraction)
      k = apply_rope(k, positions, self.cfg.rope_theta, self.cfg.rope_fraction)
    return q, k, v

  def __call__(
    self, x: jax.Array, segment_ids: jax.Array | None, positions: jax.Array
  ) -> tuple[jax.Array, KVCache]:
    """Full causal self-attention; also returns this block's keys/values."""
    q, k, v = self._project(x, positions)
    out = attention_ops.causal_attention(
      q, k, v, segment_ids, impl=self.cfg.attention_impl, context=self.cfg.context_attention
    )
    out = constrain(out, _QKV_AXES)
    return self.o(out), KVCache(k, v)

  def decode(
    self, x: jax.Array, cache: KVCache, slot: jax.Array, kv_mask: jax.Array, positions: jax.Array
  ) -> tuple[jax.Array, KVCache]:
    """Attends t new tokens to the cache after writing them at `slot`.

    Args:
      x: (b, t, d) new tokens; cache: KVCache with (b, s, kv_heads, hd);
      slot: () int32 first slot to write, at most s - t (the cache has no
        room beyond: dynamic_update_slice would clamp the write onto the
        last slots; HybriDNA.decode_step flags that with NaN logits);
      kv_mask: (b, t, s) bool; positions: (b, t) RoPE positions.
    """
    q, k, v = self._project(x, positions)
    k_cache = jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), slot, axis=1)
    v_cache = jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), slot, axis=1)
    out = attention_ops.decode_attention(q, k_cache, v_cache, kv_mask)
    return self.o(out), KVCache(k_cache, v_cache)
