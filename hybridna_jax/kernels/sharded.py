"""Running the sequence ops under a device mesh: per shard, in `jax.shard_map`.

Batch rows split over the data axes ("data", "fsdp") and heads over the
tensor axis; nothing crosses devices there (the SSD and attention are
independent per row and per head; SSD heads of a B/C group stay together when
the groups are split, or B/C are replicated when there is one group). Pallas
calls are opaque to XLA's sharding propagation, hence the shard_map.

The context axis splits each sequence's length, and then the ops must pass
information along it -- exactly, so a context-parallel run computes what one
device does:

* SSD (`shard_ssd_core`, every core): each shard scans its slice from a zero
  state, then the shards' final states and total decays are all-gathered, each
  shard composes its incoming state (the state passing of the chunked
  algorithm, at device granularity) and adds that state's contribution to its
  outputs. Document resets (seq_idx) and the initial state hold across shards.
* The depthwise causal conv (`shard_causal_conv`): each shard takes its
  left halo (d_conv - 1 inputs and their segment ids) from the previous one.
* Attention (`context_attention`): "ring" passes key/value slices around the
  axis with an online softmax, skipping slices after the query slice (so the
  last slice, which sees every key, does a whole block at each step while
  the first idles); "zigzag" passes them the same way but balances the
  causal work: inside the layer shard i holds the half-slice chunks i and
  2N-1-i of queries and keys (q, k, v permuted in and the output back, once
  each; the rest of the model keeps contiguous slices, which the SSD's
  state passing needs), so every shard does half a block per step; "allgather" gathers
  all keys and values. All compute each block with the
  XLA online softmax of `attention_reference` (flash-style backward, memory
  linear in the slice), merging partial results by their log-sum-exp; the
  per-device kernels return no log-sum-exp, so they cannot be merged.

Where a size does not divide over its mesh axes, that dimension is replicated
(every device computes it: correct, redundant); the public ops pad lengths to
a multiple of the context size. Outside `sharding.activate` (or on a 1-device
mesh) the ops run as is.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import einops
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from hybridna_jax import attention_reference, sharding, ssd_reference
from hybridna_jax.config import CONTEXT_ATTENTION


def _axes(mesh, batch: int, heads: tuple[int, ...]):
  """(batch spec entry, tensor axis or None) for this mesh and these sizes."""
  batch_axes = tuple(a for a in sharding.BATCH_AXES if mesh.shape.get(a, 1) > 1)
  if batch % sharding.batch_shards(mesh):
    batch_axes = ()
  tensor = sharding.TENSOR_AXIS
  t = mesh.shape.get(tensor, 1)
  head_axis = tensor if t > 1 and all(hd % t == 0 for hd in heads) else None
  batch_spec = None if not batch_axes else batch_axes[0] if len(batch_axes) == 1 else batch_axes
  return batch_spec, head_axis


def _context_axis(mesh, length: int, multiple: int = 1) -> str | None:
  """The context axis if it splits `length` into slices of a multiple of
  `multiple`, else None."""
  n = sharding.context_shards(mesh)
  return sharding.CONTEXT_AXIS if n > 1 and length % (n * multiple) == 0 else None


def _active_mesh():
  ctx = sharding.current()
  if ctx is None or ctx.mesh.size == 1:
    return None
  return ctx.mesh


def active_context_shards() -> int:
  """How many slices the active mesh cuts a sequence into (1 without one);
  the public ops pad lengths to a multiple of it."""
  mesh = _active_mesh()
  return 1 if mesh is None else sharding.context_shards(mesh)


def _from_previous_shard(x, axis: str, shards: int):
  """Each shard receives the previous shard's `x`; the first receives zeros."""
  return jax.lax.ppermute(x, axis, [(i, i + 1) for i in range(shards - 1)])


# ---------------------------------------------------------------------------
# SSD


def _context_parallel_ssd(core, inputs: ssd_reference.CoreInputs, chunk_size: int, axis, shards):
  """One shard's SSD over its slice of the sequence, exact across shards.

  The recurrence is linear in the state, so a slice's outputs are those of a
  scan from zero plus the incoming state S_in carried forward: y_t +=
  C_t (S_in exp(cs_t)) while position t is still in the document S_in
  belongs to. Slice i's final state is F_i + D_i S_in with its own final
  state F_i and total decay D_i; the incoming states follow by composing
  (F_j, D_j) of the earlier slices, here from all-gathered copies (a few
  (b, h, p, n) states per layer).
  """
  x, dt, A, B, C, seq_idx, init = inputs
  index = jax.lax.axis_index(axis)
  first = index == 0
  # Only the first slice starts from the caller's initial state (it belongs
  # to document 0, as seq_idx_{-1} = 0 on one device).
  y, own_final = core(inputs._replace(initial_states=jnp.where(first, init, 0.0)), chunk_size)

  # Whether each position still continues the document of the previous
  # slice's last position (the state reaching it from before the slice).
  prev_last = _from_previous_shard(seq_idx[:, -1:], axis, shards)  # zeros on the first
  prev = jnp.concatenate([prev_last, seq_idx[:, :-1]], axis=1)
  continues = jnp.cumsum(seq_idx != prev, axis=1) == 0  # (b, l)
  cs = jnp.cumsum(dt * A, axis=1)  # (b, l, h)
  carry_decay = jnp.exp(cs) * continues[..., None]  # (b, l, h)

  finals = jax.lax.all_gather(own_final, axis)  # (shards, b, h, p, n)
  decays = jax.lax.all_gather(carry_decay[:, -1], axis)  # (shards, b, h)
  state = jnp.zeros_like(own_final)
  incoming = []
  for j in range(shards):  # S_in of slice j+1 = F_j + D_j S_in of slice j
    incoming.append(state)
    state = finals[j] + decays[j][..., None, None] * state
  s_in = jnp.take(jnp.stack(incoming), index, axis=0)  # (b, h, p, n)

  h = x.shape[2]
  Ch = einops.repeat(C.astype(jnp.float32), "b l g n -> b l (g r) n", r=h // C.shape[2])
  y = y + jnp.einsum("blhn,bhpn,blh->blhp", Ch, s_in, carry_decay)
  return y, state  # `state` is the last slice's final state: the sequence's


def shard_ssd_core(core: Callable) -> Callable:
  """Wraps an SSD core (see `hybridna_jax.ssd_reference`) so that it runs per
  shard on the active mesh, passing states across the context axis."""

  @functools.wraps(core)
  def wrapped(inputs: ssd_reference.CoreInputs, chunk_size: int):
    mesh = _active_mesh()
    if mesh is None:
      return core(inputs, chunk_size)
    b, l, h, _ = inputs.x.shape
    g = inputs.B.shape[2]
    # Heads split only with whole groups per device (or one shared group).
    head_sizes = (h,) if g == 1 else (h, g)
    bs, hs = _axes(mesh, b, head_sizes)
    cs = _context_axis(mesh, l, chunk_size)
    if bs is None and hs is None and cs is None:
      return core(inputs, chunk_size)
    gs = hs if g > 1 else None
    in_specs = ssd_reference.CoreInputs(
      x=P(bs, cs, hs, None),
      dt=P(bs, cs, hs),
      A=P(hs),
      B=P(bs, cs, gs, None),
      C=P(bs, cs, gs, None),
      seq_idx=P(bs, cs),
      initial_states=P(bs, hs, None, None),
    )
    if cs is None:
      body = core
    else:
      body = functools.partial(
        _context_parallel_ssd, core, axis=cs, shards=sharding.context_shards(mesh)
      )
    fn = jax.shard_map(
      lambda i: body(i, chunk_size),
      mesh=mesh,
      in_specs=(in_specs,),
      out_specs=(P(bs, cs, hs, None), P(bs, hs, None, None)),
      check_vma=False,
    )
    return fn(ssd_reference.CoreInputs(*inputs))

  return wrapped


# The XLA cores, per shard like the kernels (the context axis needs the
# explicit state passing; on batch and heads this equals XLA's partitioning).
chunked_core = shard_ssd_core(ssd_reference.chunked_core)
sequential_core = shard_ssd_core(ssd_reference.sequential_core)


# ---------------------------------------------------------------------------
# Causal conv


def shard_causal_conv(conv: Callable, u, weight, bias, segment_ids, channel_axes):
  """`conv(u, weight, bias, segment_ids, history=, history_segment_ids=)`
  (`layers.mamba2.causal_conv`) with the length split over the context axis:
  each slice's history is the previous slice's last K - 1 inputs.

  Args:
    u: (b, l, *channels); weight: (K, *channels); bias: (*channels,);
    segment_ids: (b, l) int32 or None; channel_axes: the logical axes of the
      channels (e.g. ("act_ssm_inner",)).
  """
  mesh = _active_mesh()
  width = weight.shape[0]
  b, l = u.shape[:2]
  n = 1 if mesh is None else sharding.context_shards(mesh)
  pad = (-l) % n
  if n == 1 or width == 1 or (l + pad) // n < width - 1:
    return conv(u, weight, bias, segment_ids)
  seg = jnp.zeros((b, l), jnp.int32) if segment_ids is None else segment_ids
  if pad:  # at the end: a causal conv's outputs never see later inputs
    u = jnp.pad(u, [(0, 0), (0, pad)] + [(0, 0)] * (u.ndim - 2))
    seg = jnp.pad(seg, [(0, 0), (0, pad)], mode="edge")
  spec = tuple(sharding.spec_for(("act_batch", "act_length", *channel_axes), u.shape))
  axis = sharding.CONTEXT_AXIS
  if spec[1] != axis:  # rules that keep the length whole: nothing to pass
    return conv(u[:, :l], weight, bias, segment_ids)

  def body(u, weight, bias, seg):
    keep = width - 1
    history = _from_previous_shard(u[:, -keep:], axis, n)
    history_seg = _from_previous_shard(seg[:, -keep:], axis, n)
    return conv(u, weight, bias, seg, history=history, history_segment_ids=history_seg)

  fn = jax.shard_map(
    body,
    mesh=mesh,
    in_specs=(P(*spec), P(None, *spec[2:]), P(*spec[2:]), P(*spec[:2])),
    out_specs=P(*spec),
    check_vma=False,
  )
  return fn(u, weight, bias, seg)[:, :l]


# ---------------------------------------------------------------------------
# Attention


def shard_attention(kernel: Callable) -> Callable:
  """Wraps an attention kernel `fn(q, k, v, segment_ids)` likewise (query and
  key/value heads must both divide over the tensor axis to be split)."""

  @functools.wraps(kernel)
  def wrapped(q, k, v, segment_ids=None):
    mesh = _active_mesh()
    if mesh is None:
      return kernel(q, k, v, segment_ids)
    bs, hs = _axes(mesh, q.shape[0], (q.shape[2], k.shape[2]))
    if bs is None and hs is None:
      return kernel(q, k, v, segment_ids)
    spec = P(bs, None, hs, None)
    if segment_ids is None:
      fn = jax.shard_map(
        lambda a, b_, c: kernel(a, b_, c, None),
        mesh=mesh,
        in_specs=(spec, spec, spec),
        out_specs=spec,
        check_vma=False,
      )
      return fn(q, k, v)
    fn = jax.shard_map(
      kernel, mesh=mesh, in_specs=(spec, spec, spec, P(bs, None)), out_specs=spec, check_vma=False
    )
    return fn(q, k, v, segment_ids)

  return wrapped


def _around_ring(kv, axis: str, shards: int):
  """Yields (source shard, its `kv`) for each of the `shards` ring steps: the
  own slice first, then the previous shard's, and so on (each step passes
  every shard's current `kv` to the next shard)."""
  index = jax.lax.axis_index(axis)
  for step in range(shards):
    yield (index - step) % shards, kv
    if step < shards - 1:
      kv = jax.lax.ppermute(kv, axis, [(i, (i + 1) % shards) for i in range(shards)])


def _ring_attention(q, k, v, seg, axis: str, shards: int, block: int):
  """Query slice i against key slices i, i-1, ..., 0 as they pass around the
  ring (slices after i are all masked and skipped); (out, lse) as
  `attention_reference.blockwise_attention_lse`."""
  index = jax.lax.axis_index(axis)
  b, lq, hq, d = q.shape
  q_pos = index * lq + jnp.arange(lq)
  merged = attention_reference.no_keys(b, lq, hq, d)
  for source, kv in _around_ring((k, v, seg), axis, shards):

    def attend(merged, kv=kv, source=source):
      kb, vb, segb = kv
      k_pos = source * lq + jnp.arange(lq)
      part = attention_reference.blockwise_attention_lse(
        q, kb, vb, q_pos, k_pos, seg, segb, block=block
      )
      return attention_reference.merge_partials(merged, part)

    merged = jax.lax.cond(source <= index, attend, lambda merged: merged, merged)
  return merged


# Zigzag: the sequence is cut into 2N chunks of half a slice; shard i holds
# contiguous chunks 2i, 2i+1 everywhere else (the SSD needs them in order),
# and chunks i and 2N-1-i inside the attention, so every shard has one early
# and one late chunk and equal causal work.


def _zigzag_home(chunk: int, shards: int) -> int:
  """The shard that holds `chunk` (of 2 * shards) in the zigzag layout."""
  return chunk if chunk < shards else 2 * shards - 1 - chunk


def _to_zigzag(tree, axis: str, shards: int):
  """Per shard: arrays (b, lq, ...) holding chunks 2i, 2i+1 -> chunks i,
  2N-1-i (two collective permutes of half a slice)."""
  even = jax.lax.axis_index(axis) % 2 == 0
  home = functools.partial(_zigzag_home, shards=shards)

  def move(x):
    h = x.shape[1] // 2
    first = jax.lax.ppermute(x[:, :h], axis, [(i, home(2 * i)) for i in range(shards)])
    second = jax.lax.ppermute(x[:, h:], axis, [(i, home(2 * i + 1)) for i in range(shards)])
    # `first` is the even one of chunks i, 2N-1-i: chunk i when i is even.
    return jnp.where(even, jnp.concatenate([first, second], 1), jnp.concatenate([second, first], 1))

  return jax.tree.map(move, tree)


def _from_zigzag(tree, axis: str, shards: int):
  """The inverse of `_to_zigzag`."""
  even = jax.lax.axis_index(axis) % 2 == 0
  home = functools.partial(_zigzag_home, shards=shards)

  def move(x):
    h = x.shape[1] // 2
    early, late = x[:, :h], x[:, h:]
    first = jax.lax.ppermute(
      jnp.where(even, early, late), axis, [(home(2 * i), i) for i in range(shards)]
    )
    second = jax.lax.ppermute(
      jnp.where(even, late, early), axis, [(home(2 * i + 1), i) for i in range(shards)]
    )
    return jnp.concatenate([first, second], 1)

  return jax.tree.map(move, tree)


def _zigzag_attention(q, k, v, seg, axis: str, shards: int, block: int):
  """The ring with balanced causal work: inside the layer each shard holds
  query/key chunks i and 2N-1-i (`_to_zigzag`), and every ring step costs
  each shard half a slice-by-slice block -- from an earlier shard, all its
  queries against that shard's early key chunk (its late chunk follows both
  query chunks); from a later shard, its late query chunk against both key
  chunks (its early query chunk precedes both) -- instead of the plain
  ring's critical path of a whole block at every step on the last shard.
  Per shard, in the contiguous layout: q (b, lq, hq, d), k and v (b, lq,
  hkv, d), seg (b, lq) with lq even -> (out (b, lq, hq, d), lse (b, lq, hq))
  fp32, as `_ring_attention`."""
  q, k, v, seg = _to_zigzag((q, k, v, seg), axis, shards)
  index = jax.lax.axis_index(axis)
  b, lq, hq, d = q.shape
  h = lq // 2

  def positions(i):  # global positions of shard i's chunks i, 2N-1-i
    return jnp.concatenate([i * h + jnp.arange(h), (2 * shards - 1 - i) * h + jnp.arange(h)])

  q_pos = positions(index)

  def attend(qs, ks, kb, vb, segb, k_pos):
    """Queries `qs` (a slice of the chunks) against keys `ks`."""
    return attention_reference.blockwise_attention_lse(
      q[:, qs], kb[:, ks], vb[:, ks], q_pos[qs], k_pos[ks], seg[:, qs], segb[:, ks], block=block
    )

  def late_only(part):  # a partial of the late query chunk, for all queries
    out, lse = attention_reference.no_keys(b, h, hq, d)
    return jnp.concatenate([out, part[0]], 1), jnp.concatenate([lse, part[1]], 1)

  every, early, late = slice(None), slice(None, h), slice(h, None)
  merged = None
  for source, (kb, vb, segb) in _around_ring((k, v, seg), axis, shards):
    k_pos = positions(source)
    if merged is None:  # own chunks: chunk i never sees chunk 2N-1-i
      merged = attention_reference.merge_partials(
        attend(every, early, kb, vb, segb, k_pos),
        late_only(attend(late, late, kb, vb, segb, k_pos)),
      )
      continue
    part = jax.lax.cond(
      source < index,
      lambda kv, k_pos=k_pos: attend(every, early, *kv, k_pos),
      lambda kv, k_pos=k_pos: late_only(attend(late, every, *kv, k_pos)),
      (kb, vb, segb),
    )
    merged = attention_reference.merge_partials(merged, part)
  return _from_zigzag(merged, axis, shards)


def _allgather_attention(q, k, v, seg, axis: str, shards: int, block: int):
  """Query slice i against every key, gathered (later keys masked)."""
  del shards
  index = jax.lax.axis_index(axis)
  lq = q.shape[1]
  k_all, v_all, seg_all = (jax.lax.all_gather(a, axis, axis=1, tiled=True) for a in (k, v, seg))
  q_pos = index * lq + jnp.arange(lq)
  k_pos = jnp.arange(k_all.shape[1])
  return attention_reference.blockwise_attention_lse(
    q, k_all, v_all, q_pos, k_pos, seg, seg_all, block=block
  )


_METHODS = {"ring": _ring_attention, "allgather": _allgather_attention, "zigzag": _zigzag_attention}
assert set(_METHODS) == set(CONTEXT_ATTENTION)


def context_attention(
  q, k, v, segment_ids=None, *, method: str = CONTEXT_ATTENTION[0], block: int = 512
):
  """Causal GQA attention with the length split over the active mesh's
  context axis (`method` in config.CONTEXT_ATTENTION); q (b, l, hq, d), k and v
  (b, l, hkv, d), segment_ids (b, l) or None -> (b, l, hq, d) in q.dtype.
  The length is padded to a multiple of the context size (twice it for
  "zigzag"; padded positions form their own segment, after every real one)."""
  if method not in CONTEXT_ATTENTION:
    raise ValueError(f"context attention {method!r}: choose one of {CONTEXT_ATTENTION}.")
  mesh = _active_mesh()
  n = sharding.context_shards(mesh)
  b, l = q.shape[:2]
  seg = jnp.zeros((b, l), jnp.int32) if segment_ids is None else segment_ids
  pad = (-l) % (2 * n if method == "zigzag" else n)  # zigzag: slices of two chunks
  if pad:
    q, k, v = (jnp.pad(a, [(0, 0), (0, pad), (0, 0), (0, 0)]) for a in (q, k, v))
    seg = jnp.pad(seg, [(0, 0), (0, pad)], constant_values=-1)
  bs, hs = _axes(mesh, b, (q.shape[2], k.shape[2]))
  axis = sharding.CONTEXT_AXIS
  spec = P(bs, axis, hs, None)
  attend = _METHODS[method]

  def body(q, k, v, seg):
    out, _ = attend(q, k, v, seg, axis, n, block)
    return out.astype(q.dtype)

  fn = jax.shard_map(
    body, mesh=mesh, in_specs=(spec, spec, spec, P(bs, axis)), out_specs=spec, check_vma=False
  )
  return fn(q, k, v, seg)[:, :l]
