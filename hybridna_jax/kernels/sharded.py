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
  state passing needs), so every shard does half a block per step;
  "allgather" gathers all keys and values once (and reduce-scatters their
  gradients). A block kernel (`attention_reference.BlockAttention`: splash,
  the Triton kernel or XLA's online softmax) computes each (query slice, key
  slice) block with its log-sum-exp, and the partial results merge by it; a
  custom VJP around the whole ring keeps only the shard's own q, k, v,
  output and lse, and the backward runs the ring again, each key/value slice
  travelling with its gradient accumulator.

Where a size does not divide over its mesh axes, that dimension is replicated
(every device computes it: correct, redundant); the public ops pad lengths to
a multiple of the context size. Outside `sharding.activate` (or on a 1-device
mesh) the ops run as is.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import einops
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from hybridna_jax import attention_reference, sharding, ssd_reference
from hybridna_jax.config import CONTEXT_ATTENTION
from hybridna_jax.kernel_registry import warn_once


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


# Which blocks each ring step computes: (query part, key part, causal) of
# the shard's query slice and the key slice it holds. Step 0 is its own
# slice; at later steps the key slice comes from an earlier shard ("before")
# or a later one ("after", invisible to a contiguous slice).
_Part = tuple[slice, slice, bool]
_ALL = slice(None)


@dataclasses.dataclass(frozen=True)
class _Schedule:
  own: tuple[_Part, ...]
  before: tuple[_Part, ...]
  after: tuple[_Part, ...]


def _ring_schedule(lq: int) -> _Schedule:
  """Contiguous slices: the diagonal block, then whole earlier slices."""
  del lq
  return _Schedule(own=((_ALL, _ALL, True),), before=((_ALL, _ALL, False),), after=())


def _zigzag_schedule(lq: int) -> _Schedule:
  """Slices of chunks i and 2N-1-i (`_to_zigzag`): own chunks, chunk i
  never seeing chunk 2N-1-i; from an earlier shard, all queries against its
  early chunk (its late chunk follows both query chunks); from a later shard,
  the late query chunk against both (the early query chunk precedes both).
  Each later step is half a slice-by-slice block."""
  early, late = slice(None, lq // 2), slice(lq // 2, None)
  return _Schedule(
    own=((_ALL, early, True), (late, late, True)),
    before=((_ALL, early, False),),
    after=((late, _ALL, False),),
  )


def _step_forward(op, parts, q, seg, kv, merged):
  """`merged` (out, lse) updated with the blocks `parts` of this step."""
  kb, vb, segb = kv
  lq = q.shape[1]
  for qs, ks, causal in parts:
    out, lse = op.forward(q[:, qs], kb[:, ks], vb[:, ks], seg[:, qs], segb[:, ks], causal)
    start, stop, _ = qs.indices(lq)
    if (start, stop) != (0, lq):  # queries outside the part see no key here
      pad = [(0, 0), (start, lq - stop)]
      out = jnp.pad(out, pad + [(0, 0), (0, 0)])
      lse = jnp.pad(lse, pad + [(0, 0)], constant_values=attention_reference.NEG_INF)
    merged = attention_reference.merge_partials(merged, (out, lse))
  return merged


def _step_backward(op, parts, q, seg, kv, out, lse, d_out, grads):
  """`grads` (dq, dk, dv) fp32 plus this step's blocks' shares."""
  kb, vb, segb = kv
  dq, dk, dv = grads
  for qs, ks, causal in parts:
    gq, gk, gv = op.backward(
      q[:, qs], kb[:, ks], vb[:, ks], seg[:, qs], segb[:, ks], causal,
      out[:, qs], lse[:, qs], d_out[:, qs],
    )  # fmt: skip
    dq, dk, dv = _add_rows(dq, qs, gq), _add_rows(dk, ks, gk), _add_rows(dv, ks, gv)
  return dq, dk, dv


def _add_rows(acc, rows: slice, part):
  """acc[:, rows] + part, as an update of a static slice. (x.at[:, :].add
  would be a scatter with an empty index array, on which the Shardy
  partitioner of jax 0.11.2 crashes inside shard_map.)"""
  start, stop, _ = rows.indices(acc.shape[1])
  return jax.lax.dynamic_update_slice_in_dim(acc, acc[:, start:stop] + part, start, axis=1)


def _by_source(step: int, source, index, run, schedule: _Schedule, carry):
  """The step's blocks: the own slice's at step 0, else those for a key
  slice from an earlier or a later shard (lax.cond on the shard index)."""
  if step == 0:
    return run(schedule.own, carry)
  return jax.lax.cond(
    source < index,
    functools.partial(run, schedule.before),
    functools.partial(run, schedule.after),
    carry,
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _ring(op, schedule, axis, shards, q, k, v, seg):
  return _ring_fwd(op, schedule, axis, shards, q, k, v, seg)[0]


def _merged_over(op, schedule, q, seg, index, key_slices):
  """(out, lse) of the shard's queries over the key slices, which
  `key_slices` yields as (source shard, (k, v, seg)), one per ring step."""
  b, lq, hq, d = q.shape
  merged = attention_reference.no_keys(b, lq, hq, d)
  for step, (source, kv) in enumerate(key_slices):

    def run(parts, carry, kv=kv):
      return _step_forward(op, parts, q, seg, kv, carry)

    merged = _by_source(step, source, index, run, schedule, merged)
  return merged


def _ring_fwd(op, schedule, axis, shards, q, k, v, seg):
  index = jax.lax.axis_index(axis)
  key_slices = _around_ring((k, v, seg), axis, shards)
  out, lse = _merged_over(op, schedule, q, seg, index, key_slices)
  return out, (q, k, v, seg, out, lse)


def _ring_bwd(op, schedule, axis, shards, residuals, d_out):
  """The ring again: key/value slices go around with their gradient
  accumulators, and one more pass takes each accumulator home."""
  q, k, v, seg, out, lse = residuals
  index = jax.lax.axis_index(axis)
  f32 = jnp.float32
  grads = (jnp.zeros(q.shape, f32), jnp.zeros(k.shape, f32), jnp.zeros(v.shape, f32))
  kv = (k, v, seg)
  forward = [(i, (i + 1) % shards) for i in range(shards)]
  for step in range(shards):

    def run(parts, carry, kv=kv):
      return _step_backward(op, parts, q, seg, kv, out, lse, d_out, carry)

    grads = _by_source(step, (index - step) % shards, index, run, schedule, grads)
    dq, dk, dv = grads
    if step < shards - 1:
      kv, (dk, dv) = jax.lax.ppermute((kv, (dk, dv)), axis, forward)
    elif shards > 1:  # after the last step, the accumulators go home
      dk, dv = jax.lax.ppermute((dk, dv), axis, forward)
    grads = dq, dk, dv
  dq, dk, dv = grads
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_ring.defvjp(_ring_fwd, _ring_bwd)


def _ring_attention(q, k, v, seg, axis: str, shards: int, op):
  """Query slice i against key slices i, i-1, ..., 0 as they pass around the
  ring (slices after i are all masked and skipped); out (b, lq, hq, d) fp32.
  A custom VJP around the whole ring keeps only this shard's q, k, v, out
  and lse for the backward, which runs the ring again."""
  return _ring(op, _ring_schedule(q.shape[1]), axis, shards, q, k, v, seg)


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


def _zigzag_attention(q, k, v, seg, axis: str, shards: int, op):
  """The ring with balanced causal work: inside the layer each shard holds
  query/key chunks i and 2N-1-i (`_to_zigzag`), and every ring step after
  the first costs each shard half a slice-by-slice block (`_zigzag_schedule`)
  instead of the plain ring's critical path of a whole block at every step
  on the last shard. Per shard, in the contiguous layout: q (b, lq, hq, d),
  k and v (b, lq, hkv, d), seg (b, lq) with lq even -> out (b, lq, hq, d)
  fp32, as `_ring_attention`."""
  q, k, v, seg = _to_zigzag((q, k, v, seg), axis, shards)
  out = _ring(op, _zigzag_schedule(q.shape[1]), axis, shards, q, k, v, seg)
  return _from_zigzag(out, axis, shards)


def _slice_of(full, source, lq: int):
  """Shard `source`'s slice (b, lq, ...) of gathered arrays (b, n * lq, ...)."""
  return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, source * lq, lq, axis=1), full)


def _gathered_slices(full, index, shards: int, lq: int):
  """Yields (source shard, its slice of `full`) in the ring's order."""
  for step in range(shards):
    source = (index - step) % shards
    yield source, _slice_of(full, source, lq)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _gathered(op, axis, shards, q, k, v, seg):
  return _gathered_fwd(op, axis, shards, q, k, v, seg)[0]


def _gathered_fwd(op, axis, shards, q, k, v, seg):
  """The ring's blocks (`_ring_schedule`) on keys and values gathered once."""
  index = jax.lax.axis_index(axis)
  lq = q.shape[1]
  full = jax.tree.map(lambda a: jax.lax.all_gather(a, axis, axis=1, tiled=True), (k, v, seg))
  key_slices = _gathered_slices(full, index, shards, lq)
  out, lse = _merged_over(op, _ring_schedule(lq), q, seg, index, key_slices)
  return out, (q, k, v, seg, out, lse)


def _gathered_bwd(op, axis, shards, residuals, d_out):
  """dk, dv of every gathered slice, summed over the shards that read it
  and scattered back to its owner (one reduce-scatter)."""
  q, k, v, seg, out, lse = residuals
  index = jax.lax.axis_index(axis)
  lq = q.shape[1]
  f32 = jnp.float32
  full = jax.tree.map(lambda a: jax.lax.all_gather(a, axis, axis=1, tiled=True), (k, v, seg))
  schedule = _ring_schedule(lq)
  dq = jnp.zeros(q.shape, f32)
  dk_full, dv_full = (jnp.zeros(a.shape, f32) for a in full[:2])
  for step, (source, kv) in enumerate(_gathered_slices(full, index, shards, lq)):

    def run(parts, carry, kv=kv):
      return _step_backward(op, parts, q, seg, kv, out, lse, d_out, carry)

    zeros = (jnp.zeros(k.shape, f32), jnp.zeros(v.shape, f32))
    dq, dk, dv = _by_source(step, source, index, run, schedule, (dq, *zeros))
    dk_full, dv_full = (
      jax.lax.dynamic_update_slice_in_dim(acc, _slice_of(acc, source, lq) + g, source * lq, 1)
      for acc, g in ((dk_full, dk), (dv_full, dv))
    )
  dk, dv = (
    jax.lax.psum_scatter(g, axis, scatter_dimension=1, tiled=True) for g in (dk_full, dv_full)
  )
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_gathered.defvjp(_gathered_fwd, _gathered_bwd)


def _allgather_attention(q, k, v, seg, axis: str, shards: int, op):
  """Query slice i against every key slice, gathered once, with the ring's
  blocks: slice i causally, slices before it fully, later ones skipped."""
  return _gathered(op, axis, shards, q, k, v, seg)


_METHODS = {"ring": _ring_attention, "allgather": _allgather_attention, "zigzag": _zigzag_attention}
assert set(_METHODS) == set(CONTEXT_ATTENTION)


def context_attention(
  q,
  k,
  v,
  segment_ids=None,
  *,
  method: str = CONTEXT_ATTENTION[0],
  block_op: attention_reference.BlockAttention = attention_reference.XLA_BLOCK,
):
  """Causal GQA attention with the length split over the active mesh's
  context axis (`method` in config.CONTEXT_ATTENTION); q (b, l, hq, d), k and v
  (b, l, hkv, d), segment_ids (b, l) or None -> (b, l, hq, d) in q.dtype.
  `block_op` computes each (query slice, key slice) block (XLA's online
  softmax where it cannot run these shapes). The length is padded to a
  multiple of the context size (twice it for "zigzag") times the block's
  length multiple; padded positions form their own segment, after every
  real one."""
  if method not in CONTEXT_ATTENTION:
    raise ValueError(f"context attention {method!r}: choose one of {CONTEXT_ATTENTION}.")
  if block_op.unsupported(q.shape):
    warn_once(f"{block_op.unsupported(q.shape)}; context attention uses XLA blocks.")
    block_op = attention_reference.XLA_BLOCK
  mesh = _active_mesh()
  if mesh is None:
    raise ValueError(
      "context attention runs under sharding.activate(mesh) with a context axis; "
      "attention.causal_attention picks it where the mesh splits the length."
    )
  n = sharding.context_shards(mesh)
  b, l = q.shape[:2]
  seg = jnp.zeros((b, l), jnp.int32) if segment_ids is None else segment_ids
  # zigzag: slices of two chunks, each a multiple of the block's multiple
  pad = (-l) % ((2 * n if method == "zigzag" else n) * block_op.length_multiple)
  if pad:
    q, k, v = (jnp.pad(a, [(0, 0), (0, pad), (0, 0), (0, 0)]) for a in (q, k, v))
    seg = jnp.pad(seg, [(0, 0), (0, pad)], constant_values=-1)
  bs, hs = _axes(mesh, b, (q.shape[2], k.shape[2]))
  axis = sharding.CONTEXT_AXIS
  spec = P(bs, axis, hs, None)
  attend = _METHODS[method]

  def body(q, k, v, seg):
    return attend(q, k, v, seg, axis, n, block_op).astype(q.dtype)

  fn = jax.shard_map(
    body, mesh=mesh, in_specs=(spec, spec, spec, P(bs, axis)), out_specs=spec, check_vma=False
  )
  return fn(q, k, v, seg)[:, :l]
