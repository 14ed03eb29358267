"""Device mesh and logical-axis sharding rules: the one place for both.

Parameters carry logical axis names as `nnx.Variable` metadata
(`logical_axes=("embed", "mlp")`); activations are annotated with
`constrain(x, ("act_batch", "act_length", "act_embed"))`. Rules map logical
names to mesh axes, so the model code never names a mesh axis.

Mesh axes: ``data`` (pure data parallelism, e.g. across slices/hosts),
``fsdp`` (data parallelism with parameters and optimizer state sharded) and
``tensor`` (SSM heads, attention heads and MLP width split across devices).

A logical axis is sharded only if the array dimension divides evenly over the
mesh axes it maps to; otherwise it is replicated (e.g. 4 KV heads on a
tensor axis of 8), so every config runs on every mesh.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
TENSOR_AXIS = "tensor"

LogicalAxes = Sequence[str | None]
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DEFAULT_RULES: Rules = (
    # Parameters.
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("ssm_inner", "tensor"),    # d_inner = ssm heads x headdim, split by head
    ("ssm_heads", "tensor"),
    ("ssm_state", None),        # B and C projections (ngroups x d_state)
    ("conv_width", None),
    ("classes", None),
    ("layers", None),           # stacked layers of the scanned layout (model.scan_layers)
    # Activations.
    ("act_batch", BATCH_AXES),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_ssm_inner", "tensor"),
    ("act_vocab", "tensor"),
)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one size may be -1 for "the rest"."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}.")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh: {len(devices)} devices do not divide by the fixed "
                       f"axes {dict(zip(MESH_AXES, sizes))}.")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
                     f"devices, but {len(devices)} are available; set one axis to -1.")
  # Auto axes: XLA propagates shardings from the annotations (GSPMD style).
  auto = (AxisType.Auto,) * len(MESH_AXES)
  if devices == list(jax.devices()):
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=auto)
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES, axis_types=auto)


def mesh_from_config(mesh_config, devices=None) -> Mesh:
  """Mesh from a config section with fields data, fsdp, tensor and
  num_devices (0: all devices; N: the first N, single-process only)."""
  if devices is None:
    devices = jax.devices()
    limit = int(mesh_config.get("num_devices", 0))
    if limit:
      if jax.process_count() > 1:
        raise ValueError("mesh.num_devices must be 0 (all devices) in multi-process runs.")
      if limit > len(devices):
        raise ValueError(f"mesh.num_devices={limit} but only {len(devices)} devices exist.")
      devices = devices[:limit]
  return make_mesh(mesh_config.data, mesh_config.fsdp, mesh_config.tensor,
                   devices=devices)


def logical_to_spec(logical_axes: LogicalAxes, mesh: Mesh,
                    rules: Rules = DEFAULT_RULES,
                    shape: Sequence[int] | None = None) -> P:
  """PartitionSpec for an array with the given logical axes.

  A mesh axis is used at most once (first dimension wins), size-1 mesh axes
  are dropped, and a dimension that does not divide over its mesh axes is
  replicated.
  """
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for i, name in enumerate(logical_axes):
    target = table.get(name) if name is not None else None
    if name is not None and name not in table:
      raise KeyError(f"no sharding rule for logical axis {name!r}; add it to "
                     "the rules in hybridna_jax/sharding.py.")
    axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
    if shape is not None and axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
      axes = ()
    used.update(axes)
    spec.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
  return P(*spec)


def _variable_spec(variable: nnx.Variable, mesh: Mesh, rules: Rules) -> P:
  axes = variable.get_metadata().get("logical_axes")
  value = variable.get_value() if hasattr(variable, "get_value") else variable.value
  if axes is None:
    return P()
  if len(axes) != value.ndim:
    raise ValueError(f"logical axes {axes} do not match a parameter of shape {value.shape}.")
  return logical_to_spec(axes, mesh, rules, value.shape)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES):
  """NamedSharding for every leaf of an nnx.State (variables without
  `logical_axes` metadata are replicated)."""
  def to_sharding(v):
    if isinstance(v, nnx.Variable):
      return v.replace(NamedSharding(mesh, _variable_spec(v, mesh, rules)))
    return NamedSharding(mesh, P())
  return jax.tree.map(to_sharding, state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batch arrays (any rank) split over (data, fsdp) on their leading axis."""
  return NamedSharding(mesh, P(BATCH_AXES))


@dataclasses.dataclass(frozen=True)
class ShardingContext:
  mesh: Mesh
  rules: Rules


_ACTIVE: list[ShardingContext] = []


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Iterator[ShardingContext]:
  """Makes `constrain` (and kernel shard_map wrappers) use this mesh while
  tracing. Enter it inside the function being jitted, or around the first
  call that traces it."""
  ctx = ShardingContext(mesh, tuple(rules))
  _ACTIVE.append(ctx)
  try:
    yield ctx
  finally:
    _ACTIVE.pop()


def current() -> ShardingContext | None:
  """The active sharding context, or None outside `activate`."""
  return _ACTIVE[-1] if _ACTIVE else None


def constrain(x: jax.Array, logical_axes: LogicalAxes) -> jax.Array:
  """`with_sharding_constraint` by logical names; a no-op with no active mesh
  or on a single device."""
  ctx = current()
  if ctx is None or ctx.mesh.size == 1:
    return x
  spec = logical_to_spec(logical_axes, ctx.mesh, ctx.rules, x.shape)
  return jax.lax.with_sharding_constraint(x, NamedSharding(ctx.mesh, spec))


def spec_for(logical_axes: LogicalAxes, shape: Sequence[int]) -> P:
  """PartitionSpec under the active context (P() when none is active)."""
  ctx = current()
  if ctx is None:
    return P()
  return logical_to_spec(logical_axes, ctx.mesh, ctx.rules, shape)
