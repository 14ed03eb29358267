"""The HybriDNA language model: embeddings, the hybrid stack, LM head, and
incremental decoding.

Layer i is pre-norm residual:

    h = h + mixer(rmsnorm(h))      mixer = Mamba2, or attention where
    h = h + mlp(rmsnorm(h))        i % attn_period == attn_offset

Layer layout: by default `layers` holds one Block per layer and the stack
is a Python loop. With `scan_layers` and a pattern that repeats every
attn_period = P layers, `scanned_layers` holds P Blocks whose parameters are
stacked over the n_layers / P repetitions (leading axis, logical name
"layers"): scanned_layers[j] slice r is layer r * P + j. The stack is then
one `nnx.scan` over the repetitions, its body the P layers of a block, so
compile time no longer grows with depth. `scan_params` / `unscan_params`
convert parameter states between the layouts; outputs are the same.

Decoding: `prefill` runs the prompt in one pass and returns a `DecodeCache`
(KV cache for attention layers, conv + SSM state for Mamba2 layers);
`decode_step` then costs one token. Prompts may be left-padded: positions
with segment id 0 are padding that no real token attends to, and the Mamba2
state resets where the segment id changes, so pads have no effect.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx

from hybridna_jax import attention, ssd
from hybridna_jax.config import ModelConfig
from hybridna_jax.layers.attention import Attention, KVCache
from hybridna_jax.layers.mamba2 import Mamba2
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


def _check_same_shape(tokens: jax.Array, **named: jax.Array | None) -> None:
  """Refuses (b, l) side inputs whose shape is not that of `tokens` (they
  failed deep in the convolution, naming neither)."""
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be (batch, length), got shape {tokens.shape}.")
  for name, x in named.items():
    if x is not None and x.shape != tokens.shape:
      raise ValueError(f"{name} has shape {x.shape}, tokens {tokens.shape}; they must match.")


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
  """(b, l) position of each token within its segment (0 at every start)."""
  l = segment_ids.shape[1]
  idx = jnp.broadcast_to(jnp.arange(l), segment_ids.shape)
  starts = jnp.concatenate(
    [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1
  )
  return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


class Block(nnx.Module):
  """One pre-norm layer: mixer (Mamba2 or attention) then gated MLP."""

  def __init__(self, cfg: ModelConfig, kind: str, *, rngs: nnx.Rngs):
    self.kind = kind
    pdt = cfg.weight_dtype
    self.mixer_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdt)
    self.mixer = Attention(cfg, rngs=rngs) if kind == "attention" else Mamba2(cfg, rngs=rngs)
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
    """New tokens h (b, t, d) -> (b, t, d) and the layer's updated cache:
    an attention layer writes its keys and values at `slot` () and attends
    under kv_mask (b, t, s) at positions (b, t) (`Attention.decode`); a
    Mamba2 layer steps its conv and SSM states one token at a time (t = 1)."""
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

# The stacked axis of scanned parameters: nnx.vmap (creation) and nnx.scan
# (application) add and remove it from each Variable's `logical_axes`, so
# sharding sees ("layers", *per-layer axes); "layers" maps to no mesh axis.
LAYERS_AXIS = "layers"
_STACKED_METADATA = {nnx.PARTITION_NAME: LAYERS_AXIS, "logical_axes": LAYERS_AXIS}


def scan_block_size(cfg: ModelConfig) -> int | None:
  """Layers per scanned block (attn_period), or None when the stack runs
  as a Python loop: scan_layers is off, or the layer pattern does not repeat
  every attn_period layers over a whole number of blocks."""
  period = cfg.attn_period
  if not cfg.scan_layers or period < 1 or cfg.n_layers % period:
    return None
  kinds = cfg.layer_types
  if any(kinds[i] != kinds[i % period] for i in range(cfg.n_layers)):
    return None
  return period


def same_param_layout(a: ModelConfig, b: ModelConfig) -> bool:
  """Whether two configs of one architecture keep their layers' parameters
  alike: both one entry per layer, or both stacked in blocks of one size
  (the same layers placed through another attn_period stack otherwise)."""
  return scan_block_size(a) == scan_block_size(b)


def describe_layout(cfg: ModelConfig) -> str:
  """The layer layout in words, for messages."""
  period = scan_block_size(cfg)
  if period is None:
    return "one entry per layer"
  return f"stacked in blocks of {period} layers (model.attn_period)"


@functools.cache
def _warn_loop(n_layers: int, attn_period: int) -> None:
  logging.warning(
    "model.scan_layers: the layer pattern does not repeat every attn_period=%d layers over "
    "%d layers; the stack runs as a Python loop (same results, longer compiles).",
    attn_period,
    n_layers,
  )


def _run_layer(layer: Block, remat: str, h, segment_ids, positions, *, in_scan=False):
  """One layer's forward under the config's remat policy."""
  if remat == "none":
    return layer(h, segment_ids, positions)
  # Inside a scan the loop already keeps XLA from CSE-ing the recomputation
  # into the forward pass, so the barriers of prevent_cse only cost speed.
  fn = nnx.remat(Block.__call__, policy=_REMAT_POLICIES[remat], prevent_cse=not in_scan)
  return fn(layer, h, segment_ids, positions)


def _constrained_view(layer: Block) -> Block:
  """`layer` with every parameter constrained to its logical sharding.

  Inside the scan body a parameter is a slice of the stacked array, and its
  gradient a slice of the stacked gradient the backward scan accumulates.
  Without the constraint XLA may replicate that accumulator over fsdp (seen
  on a data x fsdp x tensor mesh), i.e. full-size gradients on every device;
  the constraint's transpose shards each gradient slice like its parameter.
  """
  graphdef, state = nnx.split(layer)
  state = jax.tree.map(
    lambda v: v.replace(constrain(v.get_value(), v.get_metadata()["logical_axes"])),
    state,
    is_leaf=lambda x: isinstance(x, nnx.Variable),
  )
  return nnx.merge(graphdef, state)


def _stacked_blocks(
  cfg: ModelConfig, kinds: tuple[str, ...], reps: int, rngs: nnx.Rngs
) -> nnx.List:
  """len(kinds) Blocks, each holding `reps` layers' parameters stacked on a
  leading axis (each repetition initialised from its own split of `rngs`)."""

  @nnx.split_rngs(splits=reps)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=_STACKED_METADATA)
  def create(rngs):
    return nnx.List([Block(cfg, kind, rngs=rngs) for kind in kinds])

  return create(rngs)


def _repetition(stacked: nnx.Module, r: int) -> nnx.Module:
  """Repetition r of a module whose variables are stacked on a leading
  "layers" axis: slice r of every variable, without that axis in its
  metadata."""
  graphdef, state = nnx.split(stacked)
  return nnx.merge(
    graphdef,
    jax.tree.map(
      lambda v: v.replace(
        v.get_value()[r], logical_axes=tuple(v.get_metadata()["logical_axes"][1:])
      ),
      state,
      is_leaf=lambda x: isinstance(x, nnx.Variable),
    ),
  )


def _layers_by_kind(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.List:
  """The loop layout's Blocks, one per layer in cfg.layer_types order. The
  layers of one kind are initialised together (stacked by `_stacked_blocks`,
  then sliced), so XLA compiles one copy of a kind's initialisers rather
  than one per layer: the jitted init of a 32-layer model compiles in 14.6 s
  on a 2-core CPU, against 48.2 s one layer at a time (benchmarks/RESULTS.md,
  "The initialisation's compile")."""
  kinds = cfg.layer_types
  built = {}  # kind -> an iterator over its layers, in order
  for kind in dict.fromkeys(kinds):
    n = kinds.count(kind)
    if n == 1:  # nothing to share
      built[kind] = iter([Block(cfg, kind, rngs=rngs)])
    else:
      stacked = _stacked_blocks(cfg, (kind,), n, rngs)[0]
      built[kind] = iter([_repetition(stacked, r) for r in range(n)])
  return nnx.List([next(built[kind]) for kind in kinds])


class HybriDNA(nnx.Module):
  """Decoder-only hybrid Mamba2/attention LM over single nucleotides."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    # Checked here, not at the first forward (whose error names no field).
    for name, registry in (("ssd_impl", ssd.CORES), ("attention_impl", attention.KERNELS)):
      if getattr(cfg, name) not in registry.names():
        raise ValueError(
          f"model.{name}={getattr(cfg, name)!r} is not an implementation; "
          f"choose one of {registry.names()}."
        )
    self.cfg = cfg
    pdt = cfg.weight_dtype
    self.embed = nnx.Param(
      cfg.init_std * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.d_model), pdt),
      logical_axes=("vocab", "embed"),
    )
    period = scan_block_size(cfg)
    if period is None and cfg.scan_layers:
      _warn_loop(cfg.n_layers, cfg.attn_period)
    if period is None:
      self.layers = _layers_by_kind(cfg, rngs)
    else:
      self.scanned_layers = _stacked_blocks(
        cfg, cfg.layer_types[:period], cfg.n_layers // period, rngs
      )
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdt)
    if not cfg.tie_embeddings:
      self.lm_head = nnx.Param(
        cfg.init_std * jax.random.normal(rngs.params(), (cfg.d_model, cfg.vocab_size), pdt),
        logical_axes=("embed", "vocab"),
      )

  # -- pieces -----------------------------------------------------------------

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    """tokens (b, l) int -> (b, l, d) embeddings in the compute dtype."""
    # The table is small (vocab 128): gather from a replicated copy rather
    # than make XLA partition a gather over a sharded table.
    table = constrain(self.embed[...], (None, None))
    h = jnp.take(table, tokens, axis=0).astype(self.cfg.compute_dtype)
    return constrain(h, _HIDDEN_AXES)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """(..., d) final-norm hidden -> (..., vocab) fp32 logits."""
    head = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
    return jnp.einsum(
      "...d,dv->...v", hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32
    )

  def layer_blocks(self) -> list[Block]:
    """Every layer's Block in order. In the scanned layout these are views
    built from slices of the stacked parameters (for per-layer work such as
    decoding; the full forward scans the stacked Blocks instead)."""
    if scan_block_size(self.cfg) is None:
      return list(self.layers)
    reps = self.cfg.n_layers // len(self.scanned_layers)
    return [_repetition(stacked, r) for r in range(reps) for stacked in self.scanned_layers]

  # -- full forward ---------------------------------------------------------------

  def __call__(
    self,
    tokens: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
    return_logits: bool = True,
    return_hidden_states: bool = False,
  ) -> LMOutput:
    """tokens (b, l) int32 -> LMOutput.

    segment_ids (b, l): packed documents (0 = padding); a document is a run
    of equal ids (an id that comes back starts another one): attention and
    the convolution never cross documents and the Mamba2 state resets
    between them. positions (b, l) are only used with RoPE (default: restart
    at each document).
    """
    _check_same_shape(tokens, segment_ids=segment_ids, positions=positions)
    if segment_ids is not None:
      segment_ids = ssd.number_segments(segment_ids)
    h, hidden_states, _ = self._stack(tokens, segment_ids, positions, return_hidden_states)
    hidden = self.final_norm(h)
    return LMOutput(
      self.logits(hidden) if return_logits else None,
      hidden,
      tuple(hidden_states) if return_hidden_states else None,
    )

  def _stack(self, tokens, segment_ids, positions, keep_hidden=False, keep_caches=False):
    """Embeddings and every layer.

    Returns h (b, l, d) after the last layer; hidden_states, with
    keep_hidden, [embeddings, layer 0 output, ...] each (b, l, d); caches,
    with keep_caches, each layer's KVCache or MambaState (batch leading).
    """
    if positions is None:
      positions = (
        positions_from_segments(segment_ids)
        if segment_ids is not None
        else jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
      )
    h = self.embed_tokens(tokens)
    scanned = scan_block_size(self.cfg) is not None
    if scanned and not keep_hidden:
      h, caches = self._scan_stack(h, segment_ids, positions, keep_caches)
      return h, [], caches
    # Per-layer hidden states run the loop in both layouts: a scan would
    # stack all n_layers of them, where the loop keeps alive only those the
    # caller uses (the scorer reads one layer).
    hidden_states = [h] if keep_hidden else []
    caches = []
    for layer in self.layer_blocks() if scanned else self.layers:
      h, cache = _run_layer(layer, self.cfg.remat, h, segment_ids, positions)
      caches.append(cache)
      if keep_hidden:
        hidden_states.append(h)
    return h, hidden_states, caches

  def _scan_stack(self, h, segment_ids, positions, keep_caches):
    """The scanned layout's stack: one nnx.scan step per block of P layers.

    Returns h (b, l, d) and, with keep_caches, each layer's cache in layer
    order; they leave the scan stacked per block position, (reps, b, ...),
    and are unstacked (layer r * P + j is slice r of position j).
    """
    remat = self.cfg.remat

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0), transform_metadata=_STACKED_METADATA)
    def block(h, layers):
      caches = []
      for layer in layers:
        layer = _constrained_view(layer)
        h, cache = _run_layer(layer, remat, h, segment_ids, positions, in_scan=True)
        caches.append(cache if keep_caches else None)  # None: nothing leaves the scan
      return h, tuple(caches)

    h, stacked = block(h, self.scanned_layers)
    if not keep_caches:
      return h, []
    reps = self.cfg.n_layers // len(stacked)
    return h, [
      jax.tree.map(lambda x, r=r: x[r], stacked[j])
      for r in range(reps)
      for j in range(len(stacked))
    ]

  # -- decoding -----------------------------------------------------------------------

  def prefill(
    self, tokens: jax.Array, max_length: int, *, segment_ids: jax.Array | None = None
  ) -> tuple[jax.Array, DecodeCache]:
    """Runs a (left-padded) prompt and builds the cache.

    Args:
      tokens: (b, l) prompt; max_length: total slots (prompt + new tokens):
        the cache takes max_length - l `decode_step`s; later steps return
        NaN logits.
      segment_ids: (b, l), 0 on left padding and 1 on the prompt (default: 1).

    Returns:
      logits (b, vocab) fp32 of the last prompt position, and the cache.
    """
    _check_same_shape(tokens, segment_ids=segment_ids)
    b, l = tokens.shape
    if l == 0:
      raise ValueError("prefill needs a prompt of at least one token, got tokens of shape (b, 0).")
    if l > max_length:
      raise ValueError(f"prompt length {l} exceeds max_length {max_length}.")
    # Numbered as in __call__; the cache keeps the numbers decoding compares.
    segment_ids = (
      jnp.ones((b, l), jnp.int32) if segment_ids is None else ssd.number_segments(segment_ids)
    )
    positions = positions_from_segments(segment_ids)
    h, _, layer_caches = self._stack(tokens, segment_ids, positions, keep_caches=True)
    hidden = self.final_norm(h[:, -1])
    pad = max_length - l
    layers = tuple(
      KVCache(*(jnp.pad(a, [(0, 0), (0, pad), (0, 0), (0, 0)]) for a in c))
      if isinstance(c, KVCache)
      else c
      for c in layer_caches
    )
    cache = DecodeCache(
      layers=layers,
      length=jnp.array(l, jnp.int32),
      segment_ids=jnp.pad(segment_ids.astype(jnp.int32), [(0, 0), (0, pad)]),
      segment=segment_ids[:, -1].astype(jnp.int32),
      position=positions[:, -1].astype(jnp.int32) + 1,
    )
    return self.logits(hidden), cache

  def decode_step(self, tokens: jax.Array, cache: DecodeCache) -> tuple[jax.Array, DecodeCache]:
    """One new token per row: tokens (b,) -> logits (b, vocab) fp32, cache.

    Each step fills one cache slot. Past the last slot (more steps than
    prefill's max_length left room for) the logits are NaN: the writes
    would clamp onto the last slot and silently corrupt the results.
    """
    if tokens.shape != cache.segment.shape:
      raise ValueError(
        f"decode_step takes one token per row, tokens of shape {cache.segment.shape}; got "
        f"{tokens.shape}."
      )
    slot = cache.length
    slots = cache.segment_ids.shape[1]
    seg_ids = jax.lax.dynamic_update_slice_in_dim(
      cache.segment_ids, cache.segment[:, None], slot, axis=1
    )
    kv_mask = ((jnp.arange(slots) <= slot)[None, :] & (seg_ids == cache.segment[:, None]))[
      :, None, :
    ]  # (b, 1, slots)
    positions = cache.position[:, None]
    h = self.embed_tokens(tokens[:, None])
    new_layers = []
    # A Python loop over the layers in both layouts: the cache stays one
    # entry per layer, updated in place (a scan would copy every KV cache).
    # In the scanned layout the per-layer weight slices are loop-invariant,
    # and XLA hoists them out of a generation while_loop: a second copy of
    # the layer weights for the loop's lifetime. Generation should restore
    # with scan_layers=False (converted once at load).
    for layer, layer_cache in zip(self.layer_blocks(), cache.layers):
      h, layer_cache = layer.decode(h, layer_cache, slot, kv_mask, positions)
      new_layers.append(layer_cache)
    logits = self.logits(self.final_norm(h[:, 0]))
    # Overflow shows as NaN, decided on device (no host sync); the cache
    # stays broken, so every later step is NaN too.
    logits = jnp.where(slot < slots, logits, jnp.nan)
    return logits, DecodeCache(
      tuple(new_layers), slot + 1, seg_ids, cache.segment, cache.position + 1
    )


# -- parameter layouts ----------------------------------------------------------------


def _with_values(template: nnx.State, values: dict) -> nnx.State:
  """`template`'s Variables (shapes, metadata) holding `values` by path."""
  flat = list(nnx.to_flat_state(template))
  if {path for path, _ in flat} != set(values):
    raise ValueError(
      "parameter state does not match the model's layer layout: "
      f"{sorted(map(str, set(values) ^ {path for path, _ in flat}))[:4]} ..."
    )
  return nnx.from_flat_state([(path, var.replace(values[path])) for path, var in flat])


def _block_size_or_raise(cfg: ModelConfig) -> int:
  period = scan_block_size(dataclasses.replace(cfg, scan_layers=True))
  if period is None:
    raise ValueError(
      f"the layer pattern of {cfg.n_layers} layers does not repeat every "
      f"attn_period={cfg.attn_period} layers; it has no scanned layout."
    )
  return period


def scan_params(params: nnx.State, cfg: ModelConfig) -> nnx.State:
  """Loop-layout parameters (`layers/i/...`) -> scanned layout
  (`scanned_layers/j/...`, layer r * P + j at index r of a leading
  (n_layers / P) axis). Other parameters pass through unchanged."""
  period = _block_size_or_raise(cfg)
  reps = cfg.n_layers // period
  values, stacks = {}, {}
  for path, var in nnx.to_flat_state(params):
    if path[0] == "layers":
      r, j = divmod(int(path[1]), period)
      stacks.setdefault(("scanned_layers", j) + tuple(path[2:]), {})[r] = var.get_value()
    else:
      values[path] = var.get_value()
  for path, by_rep in stacks.items():
    values[path] = jnp.stack([by_rep[r] for r in range(reps)])
  template = nnx.state(abstract_model(dataclasses.replace(cfg, scan_layers=True)), nnx.Param)
  return _with_values(template, values)


def unscan_params(params: nnx.State, cfg: ModelConfig) -> nnx.State:
  """Scanned-layout parameters, in blocks of any size (read from them) ->
  loop layout (the inverse of `scan_params`)."""
  period = stacked_block_size(params)
  values = {}
  for path, var in nnx.to_flat_state(params):
    if path[0] == "scanned_layers":
      value, j = var.get_value(), int(path[1])
      for r in range(value.shape[0]):
        values[("layers", r * period + j) + tuple(path[2:])] = value[r]
    else:
      values[path] = var.get_value()
  template = nnx.state(abstract_model(dataclasses.replace(cfg, scan_layers=False)), nnx.Param)
  return _with_values(template, values)


def is_scanned(params: nnx.State) -> bool:
  """Whether a parameter state has the scanned layer layout."""
  return "scanned_layers" in params


def stacked_block_size(params: nnx.State) -> int | None:
  """Layers per block of scanned-layout parameters (None: loop layout)."""
  if not is_scanned(params):
    return None
  return len({path[1] for path, _ in nnx.to_flat_state(params) if path[0] == "scanned_layers"})


def convert_params(params: nnx.State, cfg: ModelConfig) -> nnx.State:
  """Parameters in any layout (loop, or blocks of any size) -> the layout
  `cfg` runs with (`scan_block_size(cfg)`); unchanged when they have it."""
  want = scan_block_size(cfg)
  if stacked_block_size(params) == want:
    return params
  loop_params = unscan_params(params, cfg) if is_scanned(params) else params
  return loop_params if want is None else scan_params(loop_params, cfg)


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
