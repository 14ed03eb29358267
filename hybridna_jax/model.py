"""The HybriDNA language model: embeddings, the hybrid stack, LM head, and
incremental decoding.

Layer i is pre-norm residual:

    h = h + mixer(rmsnorm(h))      mixer = Mamba2, or attention where
    h = h + mlp(rmsnorm(h))        i % attn_period == attn_offset

Decoding: `prefill` runs the prompt in one pass and returns a `DecodeCache`
(KV cache for attention layers, conv + SSM state for Mamba2 layers);
`decode_step` then costs one token. Prompts may be left-padded: positions
with segment id 0 are padding that no real token attends to, and the Mamba2
state resets where the segment id changes, so pads have no effect.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from hybridna_jax.config import ModelConfig
from hybridna_jax.layers.attention import Attention, KVCache
from hybridna_jax.layers.mamba2 import Mamba2, MambaState
from hybridna_jax.layers.mlp import GatedMLP
from hybridna_jax.layers.norms import RMSNorm
from hybridna_jax.sharding import constrain

_HIDDEN_AXES = ("act_batch", "act_length", "act_embed")


class LMOutput(NamedTuple):
  """logits: (b, l, vocab) fp32, or None when not asked for.
  hidden: (b, l, d) final-norm output (what the LM head reads).
  hidden_states: per-layer outputs (b, l, d) (index 0 = embeddings), when asked.
  """
  logits: jax.Array | None
  hidden: jax.Array
  hidden_states: tuple[jax.Array, ...] | None = None


class DecodeCache(NamedTuple):
  """Decoding state for a batch.

  layers: per layer, a KVCache (attention: (b, slots, kv_heads, hd)) or a
    MambaState.
  length: () int32, slots filled so far (the same for every row).
  segment_ids: (b, slots) int32, the segment of each filled slot.
  segment: (b,) int32, the segment new tokens belong to.
  position: (b,) int32, RoPE position of the next token.
  """
  layers: tuple
  length: jax.Array
  segment_ids: jax.Array
  segment: jax.Array
  position: jax.Array


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
  """(b, l) position of each token within its segment (0 at every start)."""
  l = segment_ids.shape[1]
  idx = jnp.broadcast_to(jnp.arange(l), segment_ids.shape)
  starts = jnp.concatenate(
      [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
  return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


class Block(nnx.Module):
  """One pre-norm layer: mixer (Mamba2 or attention) then gated MLP."""

  def __init__(self, cfg: ModelConfig, kind: str, *, rngs: nnx.Rngs):
    self.kind = kind
    pdt = cfg.weight_dtype
    self.mixer_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdt)
    self.mixer = (Attention(cfg, rngs=rngs) if kind == "attention"
                  else Mamba2(cfg, rngs=rngs))
    self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdt)
    self.mlp = GatedMLP(cfg, rngs=rngs)

  def __call__(self, h, segment_ids, positions):
    """Returns (h, cache entry): KVCache or MambaState of this layer."""
    normed = self.mixer_norm(h)
    if self.kind == "attention":
      mixed, cache = self.mixer(normed, segment_ids, positions)
    else:
      mixed, cache = self.mixer(normed, segment_ids, return_state=True)
    h = constrain(h + mixed, _HIDDEN_AXES)
    h = constrain(h + self.mlp(self.mlp_norm(h)), _HIDDEN_AXES)
    return h, cache

  def decode(self, h, cache, slot, kv_mask, positions):
    normed = self.mixer_norm(h)
    if self.kind == "attention":
      mixed, cache = self.mixer.decode(normed, cache, slot, kv_mask, positions)
    else:
      mixed, cache = self.mixer.decode(normed, cache)
    h = h + mixed
    return h + self.mlp(self.mlp_norm(h)), cache


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class HybriDNA(nnx.Module):
  """Decoder-only hybrid Mamba2/attention LM over single nucleotides."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pdt = cfg.weight_dtype
    self.embed = nnx.Param(
        cfg.init_std * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.d_model), pdt),
        logical_axes=("vocab", "embed"))
    self.layers = nnx.List([Block(cfg, kind, rngs=rngs) for kind in cfg.layer_types])
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdt)
    if not cfg.tie_embeddings:
      self.lm_head = nnx.Param(
          cfg.init_std * jax.random.normal(rngs.params(), (cfg.d_model, cfg.vocab_size), pdt),
          logical_axes=("embed", "vocab"))

  # -- pieces -----------------------------------------------------------------

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    # The table is small (vocab 128): gather from a replicated copy rather
    # than make XLA partition a gather over a sharded table.
    table = constrain(self.embed[...], (None, None))
    h = jnp.take(table, tokens, axis=0).astype(self.cfg.compute_dtype)
    return constrain(h, _HIDDEN_AXES)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """(..., d) final-norm hidden -> (..., vocab) fp32 logits."""
    head = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
    return jnp.einsum("...d,dv->...v", hidden, head.astype(hidden.dtype),
                      preferred_element_type=jnp.float32)

  def _run_layer(self, layer: Block, h, segment_ids, positions):
    if self.cfg.remat == "none":
      return layer(h, segment_ids, positions)
    fn = nnx.remat(Block.__call__, policy=_REMAT_POLICIES[self.cfg.remat])
    return fn(layer, h, segment_ids, positions)

  # -- full forward ---------------------------------------------------------------

  def __call__(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, return_logits: bool = True,
               return_hidden_states: bool = False) -> LMOutput:
    """tokens (b, l) int32 -> LMOutput.

    segment_ids (b, l): packed documents (0 = padding); attention never
    crosses segments and the Mamba2 state resets between them. positions
    (b, l) are only used with RoPE (default: restart at each segment).
    """
    h, hidden_states, _ = self._stack(tokens, segment_ids, positions, return_hidden_states)
    hidden = self.final_norm(h)
    return LMOutput(self.logits(hidden) if return_logits else None, hidden,
                    tuple(hidden_states) if return_hidden_states else None)

  def _stack(self, tokens, segment_ids, positions, keep_hidden=False):
    if positions is None:
      positions = (positions_from_segments(segment_ids) if segment_ids is not None
                   else jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape))
    h = self.embed_tokens(tokens)
    hidden_states = [h] if keep_hidden else []
    caches = []
    for layer in self.layers:
      h, cache = self._run_layer(layer, h, segment_ids, positions)
      caches.append(cache)
      if keep_hidden:
        hidden_states.append(h)
    return h, hidden_states, caches

  # -- decoding -----------------------------------------------------------------------

  def prefill(self, tokens: jax.Array, max_length: int, *,
              segment_ids: jax.Array | None = None) -> tuple[jax.Array, DecodeCache]:
    """Runs a (left-padded) prompt and builds the cache.

    Args:
      tokens: (b, l) prompt; max_length: total slots (prompt + new tokens).
      segment_ids: (b, l), 0 on left padding and 1 on the prompt (default: 1).

    Returns:
      logits (b, vocab) fp32 of the last prompt position, and the cache.
    """
    b, l = tokens.shape
    if l > max_length:
      raise ValueError(f"prompt length {l} exceeds max_length {max_length}.")
    if segment_ids is None:
      segment_ids = jnp.ones((b, l), jnp.int32)
    positions = positions_from_segments(segment_ids)
    h, _, layer_caches = self._stack(tokens, segment_ids, positions)
    hidden = self.final_norm(h[:, -1])
    pad = max_length - l
    layers = tuple(
        KVCache(*(jnp.pad(a, [(0, 0), (0, pad), (0, 0), (0, 0)]) for a in c))
        if isinstance(c, KVCache) else c for c in layer_caches)
    cache = DecodeCache(
        layers=layers, length=jnp.array(l, jnp.int32),
        segment_ids=jnp.pad(segment_ids.astype(jnp.int32), [(0, 0), (0, pad)]),
        segment=segment_ids[:, -1].astype(jnp.int32),
        position=positions[:, -1].astype(jnp.int32) + 1)
    return self.logits(hidden), cache

  def decode_step(self, tokens: jax.Array, cache: DecodeCache) -> tuple[jax.Array, DecodeCache]:
    """One new token per row: tokens (b,) -> logits (b, vocab) fp32, cache."""
    slot = cache.length
    slots = cache.segment_ids.shape[1]
    seg_ids = jax.lax.dynamic_update_slice_in_dim(
        cache.segment_ids, cache.segment[:, None], slot, axis=1)
    kv_mask = ((jnp.arange(slots) <= slot)[None, :]
               & (seg_ids == cache.segment[:, None]))[:, None, :]       # (b, 1, slots)
    positions = cache.position[:, None]
    h = self.embed_tokens(tokens[:, None])
    new_layers = []
    for layer, layer_cache in zip(self.layers, cache.layers):
      h, layer_cache = layer.decode(h, layer_cache, slot, kv_mask, positions)
      new_layers.append(layer_cache)
    logits = self.logits(self.final_norm(h[:, 0]))
    return logits, DecodeCache(tuple(new_layers), slot + 1, seg_ids, cache.segment,
                               cache.position + 1)


def count_params(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def abstract_model(cfg: ModelConfig) -> HybriDNA:
  """The model's structure with ShapeDtypeStruct leaves (no allocation)."""
  return nnx.eval_shape(lambda: HybriDNA(cfg, rngs=nnx.Rngs(0)))


@functools.cache
def _compiled_init(cfg: ModelConfig):
  return nnx.jit(lambda key: HybriDNA(cfg, rngs=nnx.Rngs(params=key)))


def create_model(cfg: ModelConfig, seed: int = 0) -> HybriDNA:
  """Initialises a model under jit: one compiled program per config (XLA's
  CPU compile of the many PRNG calls takes seconds; eager init is slower).
  For sharded initialisation see `hybridna_jax.train`."""
  return _compiled_init(cfg)(jax.random.key(seed))
