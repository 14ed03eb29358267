"""Gated (SwiGLU) MLP."""

from __future__ import annotations

import jax
from flax import nnx

from hybridna_jax.config import ModelConfig
from hybridna_jax.layers.linear import Linear
from hybridna_jax.sharding import constrain


class GatedMLP(nnx.Module):
  """wo(silu(x wi_gate) * (x wi_up)); x (b, l, d) -> (b, l, d)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    kw = dict(rngs=rngs, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
    self.wi_gate = Linear(
      cfg.d_model, cfg.mlp_dim, axes=("embed", "mlp"), init_std=cfg.init_std, **kw
    )
    self.wi_up = Linear(
      cfg.d_model, cfg.mlp_dim, axes=("embed", "mlp"), init_std=cfg.init_std, **kw
    )
    self.wo = Linear(
      cfg.mlp_dim,
      cfg.d_model,
      axes=("mlp", "embed"),
      init_std=cfg.init_std / (2 * cfg.n_layers) ** 0.5,
      **kw,
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    """x (b, l, d) -> (b, l, d): wo(silu(wi_gate x) * wi_up x)."""
    h = jax.nn.silu(self.wi_gate(x)) * self.wi_up(x)
    h = constrain(h, ("act_batch", "act_length", "act_mlp"))
    return self.wo(h)
