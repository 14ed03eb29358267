"""State-space duality (SSD) scan: the public op and its kernel table.

`ssd_chunked_scan` has the interface of mamba_ssm's
`mamba_chunk_scan_combined`: it pre-processes dt (bias, softplus), runs an
SSD core, then adds D * x and the silu(z) gate. The recurrence and the XLA
cores live in `hybridna_jax.ssd_reference` (re-exported here); the Pallas
kernels in `hybridna_jax.kernels` import those references, never this module.

Cores (`CORES`, config `ssd_impl`; "auto" takes the first whose platforms
include the backend, else ``chunked``):

* ``chunked``: the SSD chunked algorithm in XLA; the fast path on CPU and the
  reference for the Pallas kernels.
* ``sequential``: a `lax.scan` over time; the definition, slow.
* ``pallas``: the Pallas SSD for the default backend: Triton kernels on GPU,
  Mosaic kernels on TPU (auto on both); on CPU the Triton variant in
  interpret mode (slow; for debugging).
* ``pallas_gpu``, ``pallas_tpu``: one variant explicitly (e.g. to lower for
  another platform with `jax.export`).
* ``pallas_gpu_interpret``, ``pallas_tpu_interpret``: the variants on CPU
  (Triton interpret mode / Pallas' TPU interpret mode), for tests.

Every core runs per shard in `jax.shard_map` under `sharding.activate`
(`hybridna_jax.kernels.sharded`), which also passes the state across the
context axis when the mesh splits the sequence. All cores accumulate in fp32 and return y
in x's dtype and final states in fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hybridna_jax import sharding
from hybridna_jax.kernel_registry import Kernel, KernelRegistry

# The references, re-exported: users and the Mamba2 layer call them as ssd.*.
from hybridna_jax.ssd_reference import CoreInputs as CoreInputs
from hybridna_jax.ssd_reference import chunked_core as chunked_core
from hybridna_jax.ssd_reference import sequential_core as sequential_core
from hybridna_jax.ssd_reference import softplus as softplus
from hybridna_jax.ssd_reference import ssd_step as ssd_step

Array = jax.Array

_KERNELS = "hybridna_jax.kernels.ssd_pallas"
# A core maps (CoreInputs, chunk_size) -> (y fp32 (b,l,h,p), final (b,h,p,n)).
# Option needs_chunk_multiple (default True): the core wants l % chunk == 0.
CORES = KernelRegistry(
  "ssd",
  fallback="chunked",
  kernels=(
    # name                         provided by                            auto on
    Kernel("chunked", "hybridna_jax.kernels.sharded:chunked_core"),
    Kernel(
      "sequential",
      "hybridna_jax.kernels.sharded:sequential_core",
      options={"needs_chunk_multiple": False},
    ),
    Kernel("pallas", f"{_KERNELS}:sharded_backend_core", ("gpu", "tpu")),
    Kernel("pallas_gpu", f"{_KERNELS}:sharded_gpu_core"),
    Kernel("pallas_tpu", f"{_KERNELS}:sharded_tpu_core"),
    Kernel("pallas_gpu_interpret", f"{_KERNELS}:sharded_gpu_interpret_core"),
    Kernel("pallas_tpu_interpret", f"{_KERNELS}:sharded_tpu_interpret_core"),
  ),
)


def number_segments(segment_ids: jax.Array) -> jax.Array:
  """(b, l) segment ids -> (b, l) int32 document numbers in order: 0 while
  the id is that of position -1 (0, the initial state's), then +1 at every
  change, so that an id that comes back (1, 2, 1; or 0, 1, 0 where padding
  follows a continued document) is a new document. Idempotent."""
  segment_ids = segment_ids.astype(jnp.int32)
  previous = jnp.pad(segment_ids, [(0, 0), (1, 0)])[:, :-1]
  return jnp.cumsum(segment_ids != previous, axis=1, dtype=jnp.int32)


@sharding.context_keyed_jit(
  static_argnames=("chunk_size", "dt_softplus", "return_final_states", "impl")
)
def ssd_chunked_scan(
  x: Array,
  dt: Array,
  A: Array,
  B: Array,
  C: Array,
  chunk_size: int,
  *,
  D: Array | None = None,
  z: Array | None = None,
  dt_bias: Array | None = None,
  dt_softplus: bool = False,
  initial_states: Array | None = None,
  seq_idx: Array | None = None,
  return_final_states: bool = False,
  impl: str = "auto",
):
  """Mamba2 SSD scan with the interface of `mamba_chunk_scan_combined`.

  Args:
    x: (b, l, h, p) inputs.
    dt: (b, l, h) time steps (raw when dt_bias/dt_softplus are given).
    A: (h,) per-head decay (negative).
    B, C: (b, l, g, n) input and output projections; h % g == 0.
    chunk_size: chunk length of the chunked algorithm.
    D: (h,) or (h, p) skip connection.
    z: (b, l, h, p) gate; y *= silu(z).
    dt_bias: (h,) added to dt before the softplus.
    dt_softplus: apply softplus to dt (+ dt_bias).
    initial_states: (b, h, p, n) state before position 0.
    seq_idx: (b, l) int32 document ids; the state resets where they change.
    return_final_states: also return the (b, h, p, n) fp32 final state.
    impl: a name of `CORES` ("auto", "chunked", "sequential", "pallas", ...).

  Returns:
    y (b, l, h, p) in x.dtype, and final states when asked.
  """
  b, l, h, p = x.shape
  g, n = B.shape[-2:]
  _check_shape("dt", dt, (b, l, h))
  _check_shape("A", A, (h,))
  _check_shape("B", B, (b, l, g, n))
  _check_shape("C", C, (b, l, g, n))
  if h % g:
    raise ValueError(f"heads ({h}) must be a multiple of groups ({g}).")
  if D is not None and D.shape not in ((h,), (h, p)):
    raise ValueError(f"D must have shape ({h},) or ({h}, {p}), got {D.shape}.")
  if z is not None:
    _check_shape("z", z, (b, l, h, p))
  if dt_bias is not None:
    _check_shape("dt_bias", dt_bias, (h,))
  if initial_states is not None:
    _check_shape("initial_states", initial_states, (b, h, p, n))
  if seq_idx is not None:
    _check_shape("seq_idx", seq_idx, (b, l))
  if chunk_size <= 0:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}.")

  dt = dt.astype(jnp.float32)
  if dt_bias is not None:
    dt = dt + dt_bias.astype(jnp.float32)
  if dt_softplus:
    dt = softplus(dt)
  if seq_idx is None:
    seq_idx = jnp.zeros((b, l), jnp.int32)
  else:
    # The state resets where the id changes, but the chunked cores tell
    # documents apart by value.
    seq_idx = number_segments(seq_idx)
  init = (
    jnp.zeros((b, h, p, n), jnp.float32)
    if initial_states is None
    else initial_states.astype(jnp.float32)
  )

  core = CORES.resolve(impl)
  inputs = CoreInputs(x, dt, A.astype(jnp.float32), B, C, seq_idx, init)
  # A context-parallel mesh cuts the length into slices of whole chunks.
  multiple = chunk_size if core.options.get("needs_chunk_multiple", True) else 1
  pad = (-l) % (multiple * sharding.active_context_shards())
  if pad:
    inputs = _pad_time(inputs, pad)
  y, final = core.fn(inputs, chunk_size)
  y = y[:, :l]

  if D is not None:
    D = D.astype(jnp.float32)
    y = y + x.astype(jnp.float32) * (D[:, None] if D.ndim == 1 else D)
  if z is not None:
    y = y * jax.nn.silu(z.astype(jnp.float32))
  y = y.astype(x.dtype)
  return (y, final) if return_final_states else y


def _check_shape(name, array, expected):
  if tuple(array.shape) != tuple(expected):
    raise ValueError(
      f"ssd_chunked_scan: {name} has shape {tuple(array.shape)}, expected {tuple(expected)}."
    )


def _pad_time(inputs: CoreInputs, pad: int) -> CoreInputs:
  """Pads the time axis. dt = 0 makes padded steps exact no-ops (decay 1, no
  input), and repeating the last seq_idx avoids a spurious reset, so the final
  state is unchanged."""

  def zeros(a):
    return jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))

  seq_idx = jnp.pad(inputs.seq_idx, [(0, 0), (0, pad)], mode="edge")
  return inputs._replace(
    x=zeros(inputs.x), dt=zeros(inputs.dt), B=zeros(inputs.B), C=zeros(inputs.C), seq_idx=seq_idx
  )
