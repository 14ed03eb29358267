"""The norms' hand-written backward passes against autodiff of their formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybridna_jax.layers import norms

EPS = 1e-5


def rms_norm_formula(x, scale, groups=1, gate=None):
  u = x.astype(jnp.float32)
  if gate is not None:
    u = u * jax.nn.silu(gate.astype(jnp.float32))
  grouped = u.reshape(u.shape[0], groups, -1)
  normalized = grouped * jax.lax.rsqrt(jnp.mean(grouped**2, -1, keepdims=True) + EPS)
  return (normalized.reshape(u.shape) * scale).astype(x.dtype)


def values_and_grads(fn, *args):
  cot = jnp.asarray(np.random.default_rng(3).standard_normal(args[0].shape), jnp.float32)
  loss = lambda *a: (fn(*a).astype(jnp.float32) * cot).sum()
  return fn(*args), jax.grad(loss, argnums=tuple(range(len(args))))(*args)


def assert_close(got, want, tol):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == w.dtype and g.shape == w.shape
    w = np.asarray(w, np.float32)
    np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=tol, atol=tol * np.abs(w).max())


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_rms_norm_matches_autodiff(dtype, tol):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((37, 24)) * 3, dtype)
  scale = jnp.asarray(rng.uniform(0.5, 1.5, 24), jnp.float32)
  assert_close(
    values_and_grads(lambda x, s: norms.rms_norm(x, s, EPS), x, scale),
    values_and_grads(rms_norm_formula, x, scale),
    tol,
  )


@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_gated_rms_norm_matches_autodiff(groups, dtype, tol):
  rng = np.random.default_rng(1)
  y = jnp.asarray(rng.standard_normal((29, 32)), dtype)
  z = jnp.asarray(rng.standard_normal((29, 32)) * 2, dtype)
  scale = jnp.asarray(rng.uniform(0.5, 1.5, 32), jnp.float32)
  assert_close(
    values_and_grads(lambda y, z, s: norms.gated_rms_norm(y, z, s, groups, EPS), y, z, scale),
    values_and_grads(lambda y, z, s: rms_norm_formula(y, s, groups, gate=z), y, z, scale),
    tol,
  )


def test_modules_keep_leading_axes_and_dtype():
  x = jnp.ones((2, 5, 8), jnp.bfloat16)
  assert norms.RMSNorm(8, eps=EPS)(x).shape == (2, 5, 8)
  out = norms.GatedRMSNorm(8, groups=2, eps=EPS)(x, x)
  assert out.shape == (2, 5, 8) and out.dtype == jnp.bfloat16
