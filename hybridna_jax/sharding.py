"""Device mesh and logical-axis sharding rules: the one place for both.

Parameters carry logical axis names as `nnx.Variable` metadata
(`logical_axes=("embed", "mlp")`); activations are annotated with
`constrain(x, ("act_batch", "act_length", "act_embed"))`. Rules map logical
names to mesh axes, so the model code never names a mesh axis.

Mesh axes, outermost first: ``data`` (pure data parallelism, e.g. across
slices/hosts), ``fsdp`` (data parallelism with parameters and optimizer state
sharded), ``context`` (each sequence's length split across devices) and
``tensor`` (SSM heads, attention heads and MLP width split across devices).
The order follows the traffic: tensor-parallel partners exchange activations
in every layer, so they are adjacent devices (the fastest links, e.g. one
NVLink domain or neighbouring TPU chips); context partners exchange a state
and KV blocks per layer; data and fsdp only gradients and parameters.

A logical axis is sharded only if the array dimension divides evenly over the
mesh axes it maps to; otherwise it is replicated (e.g. 4 KV heads on a
tensor axis of 8), so every config runs on every mesh.

The active mesh, and how jit sees it
------------------------------------
`activate(mesh, rules)` is entered while tracing -- inside the jitted
function (the train step does this) or around the call that traces it -- and
`constrain` and the kernels' shard_map wrappers read it. It enters JAX's own
mesh context, `jax.sharding.use_abstract_mesh(mesh.abstract_mesh)`, so
`jax.sharding.get_abstract_mesh()` reports it and jit's caches key on it:
the abstract mesh is part of JAX's trace context and jit cache key, so a
jitted op traced under one mesh (or none) is retraced under another (this
replaced a static "sharding context" argument on the public SSD/attention
ops). What JAX 0.10 and 0.11 provide (identical in both):

* `jax.set_mesh(mesh)`: sets the concrete and the abstract mesh, but raises
  under `jax.jit` ("can only be used outside of jax.jit"), and
  `jax.sharding.get_mesh()` likewise; `jax.sharding.use_mesh` is gone (0.7).
  So `activate` cannot be `set_mesh`: it must work inside a trace.
* `jax.sharding.use_abstract_mesh` / `get_abstract_mesh()`: work anywhere
  and are keyed by jit, but carry no devices. `jax.shard_map` without a
  mesh argument uses this context mesh, which lowers only when the jitted
  computation already has the mesh's devices (inputs placed on it, or
  `set_mesh` around the call); with single-device inputs it fails at
  compile time. So the kernels pass the concrete mesh to shard_map
  explicitly (JAX checks that it matches the context mesh).

Hence `activate` keeps the concrete mesh and the rules in a context variable
(see `_CONTEXT`) beside JAX's abstract mesh, and `current()` answers only
while JAX's context mesh is that mesh (inside a shard_map it is not: the
axes are manual there, and no constraint applies). jit keys on the abstract
mesh (axis names, sizes and types, device kind), not on device ids or the
rules, so the public ops that read the context (`ssd.ssd_chunked_scan`,
`attention.causal_attention`) are jitted with `context_keyed_jit`, which
adds the context to their key: two meshes of one shape over other devices
(say devices 0-3 and 4-7) get two traces, each with its own devices.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
import math
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from hybridna_jax.config import MeshConfig

MESH_AXES = ("data", "fsdp", "context", "tensor")
BATCH_AXES = ("data", "fsdp")
CONTEXT_AXIS = "context"
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
  ("ssm_inner", "tensor"),  # d_inner = ssm heads x headdim, split by head
  ("ssm_heads", "tensor"),
  ("ssm_state", None),  # B and C projections (ngroups x d_state)
  ("conv_width", None),
  ("classes", None),
  ("layers", None),  # stacked layers of the scanned layout (model.scan_layers)
  # Activations.
  ("act_batch", BATCH_AXES),
  ("act_length", "context"),
  ("act_embed", None),
  ("act_heads", "tensor"),
  ("act_kv_heads", "tensor"),
  ("act_mlp", "tensor"),
  ("act_ssm_inner", "tensor"),
  ("act_vocab", "tensor"),
)


def make_mesh(
  data: int = 1,
  fsdp: int = -1,
  tensor: int = 1,
  devices: Sequence[jax.Device] | None = None,
  *,
  context: int = 1,
) -> Mesh:
  """A (data, fsdp, context, tensor) mesh; one size may be -1 for "the rest"."""
  MeshConfig(data=data, fsdp=fsdp, context=context, tensor=tensor)  # checks the sizes
  devices = list(jax.devices() if devices is None else devices)
  sizes = [data, fsdp, context, tensor]
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      fixed = " x ".join(f"{a} {s}" for a, s in zip(MESH_AXES, sizes) if s != -1)
      raise ValueError(
        f"config.mesh: {fixed} = {known} devices does not divide the {len(devices)} devices "
        "(mesh.num_devices, or plan.py's --devices); make the fixed axes' product a divisor "
        "of the device count, or change the device count."
      )
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(
      f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
      f"devices, but {len(devices)} are available; set one axis to -1."
    )
  # Auto axes: XLA propagates shardings from the annotations (GSPMD style).
  auto = (AxisType.Auto,) * len(MESH_AXES)
  if devices == list(jax.devices()):
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=auto)
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES, axis_types=auto)


def mesh_from_config(mesh_config, devices=None) -> Mesh:
  """Mesh from the `mesh` config section (`config.MeshConfig`: data, fsdp,
  context, tensor; num_devices 0 = all devices, N = the first N, single-process only)."""
  # Lenient: run directories of older versions lack newer mesh fields.
  mesh = MeshConfig.from_config(mesh_config, strict=False)
  if devices is None:
    devices = jax.devices()
    if mesh.num_devices:
      if jax.process_count() > 1:
        raise ValueError("mesh.num_devices must be 0 (all devices) in multi-process runs.")
      if mesh.num_devices > len(devices):
        raise ValueError(
          f"mesh.num_devices={mesh.num_devices} but only {len(devices)} devices exist."
        )
      devices = devices[: mesh.num_devices]
  return make_mesh(mesh.data, mesh.fsdp, mesh.tensor, devices=devices, context=mesh.context)


def rules_from_config(mesh_config) -> Rules:
  """DEFAULT_RULES with `mesh_config.rules` applied: (logical name, mesh axis
  | tuple of mesh axes | None) pairs that replace the default for that name
  (every logical name the model uses has one); empty (the default) keeps
  DEFAULT_RULES."""
  overrides = mesh_config.get("rules") or ()

  def valid(pair):
    if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not isinstance(pair[0], str):
      return False
    target = pair[1]
    if target is None or (isinstance(target, str) and target in MESH_AXES):
      return True
    return (
      isinstance(target, (tuple, list))
      and bool(target)
      and all(isinstance(a, str) and a in MESH_AXES for a in target)
      and len(set(target)) == len(target)
    )

  if not isinstance(overrides, (tuple, list)) or not all(valid(p) for p in overrides):
    raise ValueError(
      "config.mesh.rules must be a tuple of (logical_name, mesh_axis | (mesh_axes, ...) "
      f"| None) pairs with mesh axes from {MESH_AXES}, each axis once per pair; got "
      f"{overrides!r}."
    )
  table = dict(DEFAULT_RULES)
  unknown = [name for name, _ in overrides if name not in table]
  if unknown:  # a typo would otherwise change nothing, silently
    raise ValueError(
      f"config.mesh.rules: {', '.join(map(repr, unknown))} is no logical axis of the model; "
      f"the names are {', '.join(table)}."
    )
  for name, target in overrides:
    table[name] = tuple(target) if isinstance(target, list) else target
  return tuple(table.items())


def logical_to_spec(
  logical_axes: LogicalAxes,
  mesh: Mesh,
  rules: Rules = DEFAULT_RULES,
  shape: Sequence[int] | None = None,
) -> P:
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
      raise KeyError(
        f"no sharding rule for logical axis {name!r}; add it to "
        "the rules in hybridna_jax/sharding.py."
      )
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

  return jax.tree.map(to_sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_shards(mesh: Mesh) -> int:
  """How many ways a batch splits on `mesh`: the product of its batch axes
  (data x fsdp); batch sizes must divide by it to be split."""
  return math.prod(mesh.shape.get(axis, 1) for axis in BATCH_AXES)


def context_shards(mesh: Mesh) -> int:
  """How many ways a sequence's length splits on `mesh` (the context axis)."""
  return mesh.shape.get(CONTEXT_AXIS, 1)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batch arrays (any rank) split over (data, fsdp) on their leading axis."""
  return NamedSharding(mesh, P(BATCH_AXES))


def sequence_batch_sharding(mesh: Mesh) -> NamedSharding:
  """Token arrays (B, L, ...): rows split over (data, fsdp), the length over
  the context axis (rows only when the context axis has size 1)."""
  if context_shards(mesh) == 1:
    return batch_sharding(mesh)
  return NamedSharding(mesh, P(BATCH_AXES, CONTEXT_AXIS))


@dataclasses.dataclass(frozen=True)
class BatchLayout:
  """What this process loads of a global batch of token rows (B, L).

  rows: int64 (R,) sorted global row ids (of 0..B-1) held by this process's
    devices (all rows of its data/fsdp positions; processes whose devices
    are tensor or context partners get the same rows).
  columns: [start, stop) of the L positions held by this process's devices
    (all of them unless the context axis spans processes).
  """

  batch_size: int
  length: int
  rows: np.ndarray
  columns: tuple[int, int]

  @property
  def local_shape(self) -> tuple[int, int]:
    return (len(self.rows), self.columns[1] - self.columns[0])


def batch_layout(
  mesh: Mesh, batch_size: int, length: int, devices: Sequence[jax.Device] | None = None
) -> BatchLayout:
  """This process's `BatchLayout` of a (batch_size, length) token batch placed
  with `sequence_batch_sharding(mesh)`: the rows and columns its devices
  (default: its addressable devices of the mesh; a test may name others)
  hold. batch_size must divide by data x fsdp and length by context."""
  if batch_size % batch_shards(mesh) or length % context_shards(mesh):
    raise ValueError(
      f"a ({batch_size}, {length}) batch does not split over {dict(mesh.shape)}: rows must "
      "divide by data x fsdp and the length by context."
    )
  index = sequence_batch_sharding(mesh).devices_indices_map((batch_size, length))
  mine = set(d for d in mesh.devices.flat if d.process_index == jax.process_index())
  mine = mine if devices is None else set(devices)
  rows, cols = set(), set()
  for idx in (idx for d, idx in index.items() if d in mine):
    row_slice, col_slice = (tuple(idx) + (slice(None),) * 2)[:2]
    rows.update(range(*row_slice.indices(batch_size)))
    cols.update(range(*col_slice.indices(length)))
  if not rows:
    raise ValueError(f"none of the devices {sorted(mine, key=str)} are in the mesh.")
  lo, hi = min(cols), max(cols) + 1
  if len(cols) != hi - lo:  # a device order no default mesh has
    raise ValueError(f"this process's context blocks of {dict(mesh.shape)} are not adjacent.")
  return BatchLayout(batch_size, length, np.asarray(sorted(rows), np.int64), (lo, hi))


@dataclasses.dataclass(frozen=True)
class ShardingContext:
  mesh: Mesh
  rules: Rules


# The concrete mesh and the rules of the innermost `activate`. A context
# variable, not an argument: `constrain` runs deep in the model code, and
# JAX's mesh context holds only the abstract mesh under jit (no devices, no
# user data such as logical-axis rules). Unlike a module-level stack it is
# per thread and restored by token, so an exception cannot leave it set.
_CONTEXT: contextvars.ContextVar[ShardingContext | None] = contextvars.ContextVar(
  "hybridna_jax_sharding", default=None
)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Iterator[ShardingContext]:
  """Makes `constrain` and the kernels' shard_map wrappers use this mesh and
  these rules while tracing, and enters `mesh` as JAX's context mesh (so jit
  keys its caches on it). Enter it inside the function being jitted, or
  around the first call that traces it."""
  ctx = ShardingContext(mesh, tuple(rules))
  token = _CONTEXT.set(ctx)
  try:
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      yield ctx
  finally:
    _CONTEXT.reset(token)


def maybe_activate(mesh: Mesh | None, rules: Rules = DEFAULT_RULES):
  """`activate(mesh, rules)`, or a context that does nothing when there is no
  mesh or it has one device (nothing to shard)."""
  if mesh is None or mesh.size == 1:
    return contextlib.nullcontext()
  return activate(mesh, rules)


def context_keyed_jit(fn: Callable | None = None, *, static_argnames: Sequence[str] = ()):
  """`jax.jit(fn, static_argnames=...)` whose traces are also keyed by the
  active `current()` context (the concrete mesh, devices included, and the
  rules). With jit's own key alone a mesh of the same shape over other
  devices reused a trace whose shard_maps named the first mesh's devices:
  its inputs failed to compile ("incompatible devices"), or, placed on no
  device yet, ran on the first mesh's devices."""
  if fn is None:
    return functools.partial(context_keyed_jit, static_argnames=static_argnames)

  def body(_context, **kwargs):
    del _context  # a key only: `fn` reads the same context through `current()`
    return fn(**kwargs)

  jitted = jax.jit(body, static_argnames=(*static_argnames, "_context"))
  signature = inspect.signature(fn)

  @functools.wraps(fn)
  def call(*args, **kwargs):
    # By name, so that a static argument passed by position stays static.
    return jitted(_context=current(), **signature.bind(*args, **kwargs).arguments)

  return call


def current() -> ShardingContext | None:
  """The active sharding context: None outside `activate`, and where JAX's
  context mesh is another one (e.g. inside a shard_map, whose axes are
  manual)."""
  ctx = _CONTEXT.get()
  if ctx is None or jax.sharding.get_abstract_mesh() != ctx.mesh.abstract_mesh:
    return None
  return ctx


def constrain(x: jax.Array, logical_axes: LogicalAxes) -> jax.Array:
  """`with_sharding_constraint` by logical names; a no-op with no active mesh
  or on a single device."""
  ctx = current()
  if ctx is None or ctx.mesh.size == 1:
    return x
  spec = logical_to_spec(logical_axes, ctx.mesh, ctx.rules, x.shape)
  return jax.lax.with_sharding_constraint(x, NamedSharding(ctx.mesh, spec))


def active_context_shards() -> int:
  """How many slices the active mesh cuts a sequence into (1 without one).
  The public ops pad lengths to a multiple of it, and the layers keep
  (b, l, ...) activations whole where it is above 1: merging a split length
  with the batch into one token axis made XLA all-gather the length at every
  projection and norm, forward and backward."""
  ctx = current()
  return 1 if ctx is None or ctx.mesh.size == 1 else context_shards(ctx.mesh)


def spec_for(logical_axes: LogicalAxes, shape: Sequence[int]) -> P:
  """PartitionSpec under the active context (P() when none is active)."""
  ctx = current()
  if ctx is None:
    return P()
  return logical_to_spec(logical_axes, ctx.mesh, ctx.rules, shape)
