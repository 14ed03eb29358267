"""A run written by the code as it stood before the architecture change
(commit 8be976f; `tests/data/make_legacy_run.py`) still restores, and gives
the logits it gave then."""

import os

import numpy as np
from flax import nnx

from hybridna_jax import restore

LEGACY_RUN = os.path.join(os.path.dirname(__file__), "data", "legacy_run")


def test_legacy_run_restores_with_the_logits_it_had():
  model, tok, config = restore.load(LEGACY_RUN)
  expected = np.load(os.path.join(LEGACY_RUN, "expected_logits.npz"))
  assert config.model.n_layers == 2 and tok.A == 5
  logits = np.asarray(nnx.jit(lambda m, x: m(x).logits)(model, expected["tokens"]))
  np.testing.assert_allclose(logits, expected["logits"], rtol=1e-5, atol=1e-5)
