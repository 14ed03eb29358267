"""State-space duality (SSD) scan: the public API and its XLA references.

The recurrence (per batch row b, head h; state S is (headdim p, d_state n)):

    S_t = keep_t * exp(dt_t * A) * S_{t-1} + dt_t * x_t B_t^T
    y_t = S_t C_t + D * x_t,        then y_t *= silu(z_t) when z is given

with `keep_t = (seq_idx_t == seq_idx_{t-1})` and `seq_idx_{-1} = 0`, so the
state resets at packed-document boundaries and `initial_states` belong to
document 0 -- the convention of mamba_ssm's `mamba_chunk_scan_combined`.
B and C are shared by the `h // g` heads of each group.

Implementations of the core (everything but dt pre-processing, D and z):

* ``sequential``: a `lax.scan` over time; the definition, slow.
* ``chunked``: the SSD chunked algorithm in XLA (quadratic within chunks of
  `chunk_size`, a scan over chunk states between them); the fast path on CPU
  and the reference for the Pallas kernels.
* ``pallas``: the Pallas kernels in `hybridna_jax.kernels` (GPU and TPU),
  registered there into `CORES`.

``auto`` picks a registered kernel for the backend (see `kernel_registry`),
``chunked`` otherwise.
All implementations accumulate in fp32 and return y in x's dtype and final
states in fp32.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from hybridna_jax.kernel_registry import KernelRegistry, jit_dispatch

Array = jax.Array


class CoreInputs(NamedTuple):
  """Canonical, pre-processed inputs of an SSD core.

  Shapes: x (b, l, h, p); dt (b, l, h) fp32, already biased and softplus-ed;
  A (h,) fp32; B, C (b, l, g, n); seq_idx (b, l) int32; initial_states
  (b, h, p, n) fp32. For the chunked cores l is a multiple of chunk_size.
  """
  x: Array
  dt: Array
  A: Array
  B: Array
  C: Array
  seq_idx: Array
  initial_states: Array


# A core maps (CoreInputs, chunk_size) -> (y fp32 (b,l,h,p), final (b,h,p,n)).
# Option `needs_chunk_multiple` (default True): the core wants l % chunk == 0.
Core = Callable[[CoreInputs, int], tuple[Array, Array]]
CORES = KernelRegistry("ssd", fallback="chunked")


@jit_dispatch(("chunk_size", "dt_softplus", "return_final_states", "impl"))
def ssd_chunked_scan(x: Array, dt: Array, A: Array, B: Array, C: Array,
                     chunk_size: int, *, D: Array | None = None,
                     z: Array | None = None, dt_bias: Array | None = None,
                     dt_softplus: bool = False,
                     initial_states: Array | None = None,
                     seq_idx: Array | None = None,
                     return_final_states: bool = False,
                     impl: str = "auto"):
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
    impl: "auto", "chunked", "sequential" or "pallas".

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
  seq_idx = (jnp.zeros((b, l), jnp.int32) if seq_idx is None
             else seq_idx.astype(jnp.int32))
  init = (jnp.zeros((b, h, p, n), jnp.float32) if initial_states is None
          else initial_states.astype(jnp.float32))

  core = CORES.resolve(impl)
  inputs = CoreInputs(x, dt, A.astype(jnp.float32), B, C, seq_idx, init)
  pad = (-l) % chunk_size if core.options.get("needs_chunk_multiple", True) else 0
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


def softplus(x: Array) -> Array:
  """softplus with mamba_ssm's threshold (identity above 20)."""
  return jnp.where(x > 20.0, x, jnp.log1p(jnp.exp(jnp.minimum(x, 20.0))))


def _check_shape(name, array, expected):
  if tuple(array.shape) != tuple(expected):
    raise ValueError(f"ssd_chunked_scan: {name} has shape {tuple(array.shape)}, "
                     f"expected {tuple(expected)}.")


def _pad_time(inputs: CoreInputs, pad: int) -> CoreInputs:
  """Pads the time axis. dt = 0 makes padded steps exact no-ops (decay 1, no
  input), and repeating the last seq_idx avoids a spurious reset, so the final
  state is unchanged."""
  def zeros(a):
    return jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
  seq_idx = jnp.pad(inputs.seq_idx, [(0, 0), (0, pad)], mode="edge")
  return inputs._replace(x=zeros(inputs.x), dt=zeros(inputs.dt),
                         B=zeros(inputs.B), C=zeros(inputs.C), seq_idx=seq_idx)


def _keep_mask(seq_idx: Array) -> Array:
  """(b, l) bool: False where the document changes (state reset)."""
  prev = jnp.pad(seq_idx, [(0, 0), (1, 0)])[:, :-1]
  return seq_idx == prev


def sequential_core(inputs: CoreInputs, chunk_size: int):
  """The definition: one recurrence step per position (chunk_size unused)."""
  del chunk_size
  x, dt, A, B, C, seq_idx, init = inputs
  keep = _keep_mask(seq_idx)

  def step(state, t_inputs):
    x_t, dt_t, B_t, C_t, keep_t = t_inputs
    state, y_t = ssd_step(state, x_t, dt_t, A, B_t, C_t, keep=keep_t)
    return state, y_t

  xs = (x.astype(jnp.float32).swapaxes(0, 1), dt.swapaxes(0, 1),
        B.astype(jnp.float32).swapaxes(0, 1),
        C.astype(jnp.float32).swapaxes(0, 1), keep.swapaxes(0, 1))
  final, y = jax.lax.scan(step, init, xs)
  return y.swapaxes(0, 1), final


def ssd_step(state: Array, x: Array, dt: Array, A: Array, B: Array, C: Array,
             *, keep: Array | None = None):
  """One recurrence step; the decode path of a Mamba2 layer.

  Args:
    state: (b, h, p, n) fp32.
    x: (b, h, p); dt: (b, h) fp32 (pre-processed); A: (h,);
    B, C: (b, g, n); keep: optional (b,) bool, False resets the state.

  Returns:
    new state (b, h, p, n) fp32 and y (b, h, p) fp32 (without D / z).
  """
  b, h, p, n = state.shape
  g = B.shape[1]
  decay = jnp.exp(dt * A)                                   # (b, h)
  if keep is not None:
    decay = decay * keep[:, None].astype(decay.dtype)
  Bh = jnp.repeat(B.astype(jnp.float32), h // g, axis=1)    # (b, h, n)
  Ch = jnp.repeat(C.astype(jnp.float32), h // g, axis=1)
  dtx = dt[..., None] * x.astype(jnp.float32)               # (b, h, p)
  state = state * decay[..., None, None] + dtx[..., None] * Bh[:, :, None, :]
  y = jnp.einsum("bhpn,bhn->bhp", state, Ch)
  return state, y


def chunked_core(inputs: CoreInputs, chunk_size: int):
  """SSD chunked algorithm (Dao & Gu 2024, section 6) in XLA.

  Four steps per chunk of length Q: (1) the intra-chunk output, a masked
  quadratic form C_i B_j exp(cs_i - cs_j) dt_j x_j; (2) each chunk's own final
  state; (3) a scan over chunks passing states; (4) the contribution of the
  incoming state to each position, C_i S_prev exp(cs_i).
  """
  x, dt, A, B, C, seq_idx, init = inputs
  b, l, h, p = x.shape
  g, n = B.shape[2:]
  r = h // g
  q = chunk_size
  nc = l // q
  f32 = jnp.float32

  x = x.astype(f32).reshape(b, nc, q, g, r, p)
  dt = dt.reshape(b, nc, q, g, r)
  B = B.astype(f32).reshape(b, nc, q, g, n)
  C = C.astype(f32).reshape(b, nc, q, g, n)
  seq = seq_idx.reshape(b, nc, q)
  A = A.reshape(g, r)

  cs = jnp.cumsum(dt * A, axis=2)                          # (b, nc, q, g, r)
  dtx = dt[..., None] * x                                  # (b, nc, q, g, r, p)

  # (1) Intra-chunk: exp(cs_i - cs_j) for j <= i within the same document.
  same_doc = seq[:, :, :, None] == seq[:, :, None, :]      # (b, nc, q_i, q_j)
  causal = jnp.tril(jnp.ones((q, q), bool))
  mask = (same_doc & causal)[:, :, None, None]             # (b, nc, 1, 1, i, j)
  cs_t = jnp.moveaxis(cs, 2, -1)                           # (b, nc, g, r, q)
  seg = cs_t[..., :, None] - cs_t[..., None, :]            # (b, nc, g, r, i, j)
  decay = jnp.exp(jnp.where(mask, seg, -jnp.inf))
  cb = jnp.einsum("bcign,bcjgn->bcgij", C, B)
  y_diag = jnp.einsum("bcgij,bcgrij,bcjgrp->bcigrp", cb, decay, dtx)

  # (2) Each chunk's final state from its own inputs (same document as the
  # chunk's last position only).
  seq_end = seq[:, :, -1]                                  # (b, nc)
  in_last_doc = (seq == seq_end[:, :, None])[..., None, None]
  to_end = jnp.exp(cs[:, :, -1:] - cs) * in_last_doc       # (b, nc, q, g, r)
  chunk_states = jnp.einsum("bcjgn,bcjgr,bcjgrp->bcgrpn", B, to_end, dtx)

  # (3) Pass states between chunks; a document change resets the carry.
  seq_prev_end = jnp.pad(seq_end, [(0, 0), (1, 0)])[:, :-1]  # 0 before chunk 0
  carry_decay = jnp.exp(cs[:, :, -1]) * (seq_end == seq_prev_end)[..., None, None]

  def pass_state(state, chunk):
    decay_c, new_c = chunk
    prev = state
    state = state * decay_c[..., None, None] + new_c
    return state, prev

  init = init.reshape(b, g, r, p, n)
  final, prev_states = jax.lax.scan(
      pass_state, init, (jnp.moveaxis(carry_decay, 1, 0),
                         jnp.moveaxis(chunk_states, 1, 0)))
  prev_states = jnp.moveaxis(prev_states, 0, 1)            # (b, nc, g, r, p, n)

  # (4) The incoming state's contribution, for positions still in the
  # document the previous chunk ended in.
  from_prev = (seq == seq_prev_end[:, :, None])[..., None, None]
  in_decay = jnp.exp(cs) * from_prev                       # (b, nc, q, g, r)
  y_off = jnp.einsum("bcign,bcgrpn,bcigr->bcigrp", C, prev_states, in_decay)

  y = (y_diag + y_off).reshape(b, l, h, p)
  return y, final.reshape(b, h, p, n)


CORES.register("chunked", chunked_core)
CORES.register("sequential", sequential_core, needs_chunk_multiple=False)
