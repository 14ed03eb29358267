"""The chunked SSD agrees with the sequential definition (outputs, final
states and gradients) with every option on and off."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybridna_jax import ssd, ssd_reference


def make_inputs(seed=0, b=2, l=37, h=4, p=8, g=2, n=16, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape, np.float32)
  seq_idx = np.zeros((b, l), np.int32)
  seq_idx[0, l // 4 :] = 1
  seq_idx[0, 3 * l // 4 :] = 2
  seq_idx[1:, :] = 3  # rows that never match the initial state's id 0
  return dict(
    x=jnp.asarray(normal(b, l, h, p), dtype),
    dt=jnp.asarray(normal(b, l, h) - 1.0),
    A=jnp.asarray(-np.exp(normal(h))),
    B=jnp.asarray(normal(b, l, g, n), dtype),
    C=jnp.asarray(normal(b, l, g, n), dtype),
    D=jnp.asarray(normal(h, p)),
    z=jnp.asarray(normal(b, l, h, p), dtype),
    dt_bias=jnp.asarray(normal(h)),
    initial_states=jnp.asarray(normal(b, h, p, n)),
    seq_idx=jnp.asarray(seq_idx),
  )


OPTIONS = ("D", "z", "dt_bias", "initial_states", "seq_idx")


def call(inputs, chunk, impl, opts, softplus=True):
  kw = {o: inputs[o] for o in opts}
  return ssd.ssd_chunked_scan(
    inputs["x"],
    inputs["dt"],
    inputs["A"],
    inputs["B"],
    inputs["C"],
    chunk,
    dt_softplus=softplus,
    return_final_states=True,
    impl=impl,
    **kw,
  )


@pytest.mark.parametrize("opts", [(), OPTIONS] + [(o,) for o in OPTIONS])
@pytest.mark.parametrize("chunk", [4, 16, 64])
def test_chunked_matches_sequential(opts, chunk):
  inputs = make_inputs()
  y_ref, f_ref = call(inputs, chunk, "sequential", opts)
  y, f = call(inputs, chunk, "chunked", opts)
  np.testing.assert_allclose(y, y_ref, rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(f, f_ref, rtol=2e-4, atol=2e-4)


def test_seq_idx_resets_state():
  """Packing two documents equals running them separately."""
  inputs = make_inputs(b=1, l=24)
  seq_idx = jnp.array([[0] * 11 + [1] * 13])
  y_packed = call({**inputs, "seq_idx": seq_idx}, 8, "chunked", ("seq_idx",))[0]
  first = {k: (v[:, :11] if k in ("x", "dt", "B", "C") else v) for k, v in inputs.items()}
  second = {k: (v[:, 11:] if k in ("x", "dt", "B", "C") else v) for k, v in inputs.items()}
  y1 = call(first, 8, "chunked", ())[0]
  y2 = call(second, 8, "chunked", ())[0]
  np.testing.assert_allclose(y_packed, jnp.concatenate([y1, y2], 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  "ids",
  [
    [1] * 10 + [2] * 12 + [1] * 10,  # an id that comes back is a new document
    [0] * 12 + [1] * 12 + [0] * 8,  # the pipeline's rows: padding (0) after a document
    [1] * 5 + [2] * 5 + [1] * 6,  # an id that comes back inside one chunk
  ],
)
def test_ids_that_come_back_reset_like_the_sequential_definition(ids):
  inputs = make_inputs(b=1, l=len(ids))
  inputs["seq_idx"] = jnp.array([ids], jnp.int32)
  opts = ("seq_idx", "initial_states")
  y_ref, f_ref = call(inputs, 16, "sequential", opts)
  y, f = call(inputs, 16, "chunked", opts)
  np.testing.assert_allclose(y, y_ref, rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(f, f_ref, rtol=2e-4, atol=2e-4)


def test_public_op_gates_skips_and_preprocesses_dt_as_documented():
  """The public op's own pre- and post-processing (shared by every core, so
  comparing cores cannot see it), against the documented formulas:
  y *= silu(z), y += x * D, dt -> softplus(dt + dt_bias)."""
  inputs = make_inputs()
  x, z = np.asarray(inputs["x"]), np.asarray(inputs["z"])
  y0 = np.asarray(call(inputs, 16, "chunked", ())[0])
  y_z = call(inputs, 16, "chunked", ("z",))[0]
  np.testing.assert_allclose(y_z, y0 * np.asarray(jax.nn.silu(z)), rtol=1e-5, atol=1e-6)
  for D in (inputs["D"], inputs["D"][:, 0]):  # (h, p) and (h,)
    y_d = np.asarray(call({**inputs, "D": D}, 16, "chunked", ("D",))[0])
    d = np.asarray(D) if D.ndim == 2 else np.asarray(D)[:, None]
    np.testing.assert_allclose(y_d - y0, x * d, rtol=1e-5, atol=1e-5)
  y_bias = call(inputs, 16, "chunked", ("dt_bias",))[0]
  dt = jax.nn.softplus(inputs["dt"] + inputs["dt_bias"])
  y_pre = call({**inputs, "dt": dt}, 16, "chunked", (), softplus=False)[0]
  np.testing.assert_allclose(y_bias, y_pre, rtol=1e-5, atol=1e-5)


def test_final_state_continues_the_scan():
  """Scanning [0, t) then [t, l) from the final state equals one scan."""
  inputs = make_inputs(b=1, l=40)
  y_full, f_full = call(inputs, 16, "chunked", ("D",))
  head = {k: (v[:, :23] if k in ("x", "dt", "B", "C") else v) for k, v in inputs.items()}
  tail = {k: (v[:, 23:] if k in ("x", "dt", "B", "C") else v) for k, v in inputs.items()}
  y1, f1 = call(head, 16, "chunked", ("D",))
  y2, f2 = call({**tail, "initial_states": f1}, 16, "chunked", ("D", "initial_states"))
  np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), y_full, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(f2, f_full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  "opts,heads,groups", [((), 4, 2), (OPTIONS, 4, 2), (OPTIONS, 6, 2), (OPTIONS, 8, 1)]
)
def test_gradients_match(opts, heads, groups):
  inputs = make_inputs(l=29, h=heads, g=groups)
  diff_names = ("x", "dt", "A", "B", "C") + tuple(o for o in opts if o != "seq_idx")
  rng = np.random.default_rng(5)
  cot = rng.standard_normal(inputs["x"].shape, np.float32)
  cot_f = rng.standard_normal(inputs["initial_states"].shape, np.float32)

  def loss(diff, impl):
    y, f = call({**inputs, **diff}, 8, impl, opts)
    return (y * cot).sum() + (f * cot_f).sum()

  diff = {k: inputs[k] for k in diff_names}
  g_ref = jax.grad(loss)(diff, "sequential")
  g = jax.grad(loss)(diff, "chunked")
  for name in diff_names:
    scale = np.abs(g_ref[name]).max()
    np.testing.assert_allclose(g[name], g_ref[name], rtol=1e-3, atol=1e-4 * scale, err_msg=name)


@pytest.mark.parametrize("heads_per_group", [2, 3, 5, 8])
def test_per_head_backward_sums_each_groups_heads(heads_per_group):
  """The broadcast of B, C and C B^T to the heads, whose backward sums by
  halving (odd counts included), against autodiff of jnp.repeat."""
  a = jax.random.normal(jax.random.key(0), (2, 3, 2, 5, 4))
  cot = jax.random.normal(jax.random.key(1), (2, 3, 2 * heads_per_group, 5, 4))
  ours = jax.vjp(lambda a: ssd_reference._per_head(a, heads_per_group), a)  # pylint: disable=protected-access
  ref = jax.vjp(lambda a: jnp.repeat(a, heads_per_group, axis=2), a)
  np.testing.assert_array_equal(ours[0], ref[0])
  np.testing.assert_allclose(ours[1](cot)[0], ref[1](cot)[0], rtol=1e-6, atol=1e-6)


def test_bf16_inputs_accumulate_in_fp32():
  inputs = make_inputs(dtype=jnp.bfloat16, l=64)
  y, f = call(inputs, 16, "chunked", OPTIONS)
  assert y.dtype == jnp.bfloat16 and f.dtype == jnp.float32
  f32 = {k: (v.astype(jnp.float32) if v.dtype == jnp.bfloat16 else v) for k, v in inputs.items()}
  y_ref, f_ref = call(f32, 16, "sequential", OPTIONS)
  # Inputs are identical bf16 values; only the output rounding differs.
  np.testing.assert_allclose(y.astype(jnp.float32), y_ref, rtol=2e-2, atol=2e-2)
  np.testing.assert_allclose(f, f_ref, rtol=1e-3, atol=1e-3)


def test_d_per_head_and_no_softplus():
  inputs = make_inputs()
  inputs["D"] = inputs["D"][:, 0]
  inputs["dt"] = jax.nn.softplus(inputs["dt"])
  y_ref, _ = call(inputs, 8, "sequential", ("D",), softplus=False)
  y, _ = call(inputs, 8, "chunked", ("D",), softplus=False)
  np.testing.assert_allclose(y, y_ref, rtol=2e-4, atol=2e-4)


def test_ssd_step_matches_scan():
  inputs = make_inputs(b=1, l=5, g=1)
  y_ref, f_ref = call(inputs, 4, "sequential", ())
  state = jnp.zeros_like(inputs["initial_states"])
  dt = ssd.softplus(inputs["dt"])
  for t in range(5):
    state, y_t = ssd.ssd_step(
      state, inputs["x"][:, t], dt[:, t], inputs["A"], inputs["B"][:, t], inputs["C"][:, t]
    )
    np.testing.assert_allclose(y_t, y_ref[:, t], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(state, f_ref, rtol=1e-5, atol=1e-5)


def test_bad_shapes_are_named():
  inputs = make_inputs()
  with pytest.raises(ValueError, match="dt has shape"):
    ssd.ssd_chunked_scan(inputs["x"], inputs["dt"][:, :3], inputs["A"], inputs["B"], inputs["C"], 8)
  with pytest.raises(ValueError, match="unknown ssd implementation"):
    ssd.ssd_chunked_scan(
      inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], 8, impl="nope"
    )
