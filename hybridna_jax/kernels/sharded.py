"""Running the kernels under a device mesh.

Pallas calls are opaque to XLA's sharding propagation, so on a mesh the kernels
run inside `jax.shard_map`: batch split over the data axes ("data", "fsdp")
and heads over the tensor axis, each device running the kernel on its shard.
Nothing crosses devices: the SSD and attention are independent per batch row
and per head (SSD heads of a B/C group stay together when the groups are
split, or B/C are replicated when there is one group).

Where a size does not divide over its mesh axes, that dimension is replicated
instead (every device computes it), which is correct but does redundant work.
Outside `sharding.activate` (or on a 1-device mesh) the kernels run as is.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
from jax.sharding import PartitionSpec as P

from hybridna_jax import sharding, ssd_reference


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


def _active_mesh():
  ctx = sharding.current()
  if ctx is None or ctx.mesh.size == 1:
    return None
  return ctx.mesh


def shard_ssd_core(core: Callable) -> Callable:
  """Wraps an SSD core (see `hybridna_jax.ssd_reference`) so that it runs per
  shard on the active mesh."""

  @functools.wraps(core)
  def wrapped(inputs: ssd_reference.CoreInputs, chunk_size: int):
    mesh = _active_mesh()
    if mesh is None:
      return core(inputs, chunk_size)
    b, _, h, _ = inputs.x.shape
    g = inputs.B.shape[2]
    # Heads split only with whole groups per device (or one shared group).
    head_sizes = (h,) if g == 1 else (h, g)
    bs, hs = _axes(mesh, b, head_sizes)
    if bs is None and hs is None:
      return core(inputs, chunk_size)
    gs = hs if g > 1 else None
    in_specs = ssd_reference.CoreInputs(
      x=P(bs, None, hs, None),
      dt=P(bs, None, hs),
      A=P(hs),
      B=P(bs, None, gs, None),
      C=P(bs, None, gs, None),
      seq_idx=P(bs, None),
      initial_states=P(bs, hs, None, None),
    )
    out_specs = (P(bs, None, hs, None), P(bs, hs, None, None))
    fn = jax.shard_map(
      lambda i: core(i, chunk_size),
      mesh=mesh,
      in_specs=(in_specs,),
      out_specs=out_specs,
      check_vma=False,
    )
    return fn(ssd_reference.CoreInputs(*inputs))

  return wrapped


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
