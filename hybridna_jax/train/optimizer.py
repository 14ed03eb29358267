"""AdamW with warmup + cosine decay, global-norm clipping and a weight-decay
mask (no decay on norms, biases, A_log, dt_bias or D)."""

from __future__ import annotations

import jax
import optax
from flax import nnx

# Parameter names (last path element) that never get weight decay.
NO_DECAY_NAMES = frozenset({"A_log", "dt_bias", "D", "scale"})


def decays(path: tuple) -> bool:
  """Whether the parameter at this state path gets weight decay."""
  name = str(path[-1]) if path else ""
  return not (name in NO_DECAY_NAMES or name.endswith("bias"))


def weight_decay_mask(params: nnx.State):
  """A pytree of bools matching `params`: True where weight decay applies."""

  def mask(path, _):
    # State paths end in the Variable's `.value` attribute: use the dict keys.
    names = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
    return decays(names)

  return jax.tree_util.tree_map_with_path(mask, params)


def learning_rate_schedule(cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup to cfg.learning_rate, then cosine decay to
  cfg.learning_rate * cfg.min_lr_ratio at `total_steps`."""
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=cfg.learning_rate,
    warmup_steps=warmup,
    decay_steps=max(total_steps, warmup + 1),
    end_value=cfg.learning_rate * cfg.min_lr_ratio,
  )


def make_optimizer(cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """cfg: the `train` config section."""
  schedule = learning_rate_schedule(cfg, total_steps)
  transforms = []
  if cfg.grad_clip > 0:
    transforms.append(optax.clip_by_global_norm(cfg.grad_clip))
  transforms.append(
    optax.adamw(
      schedule,
      b1=cfg.b1,
      b2=cfg.b2,
      eps=cfg.eps,
      weight_decay=cfg.weight_decay,
      mask=weight_decay_mask,
    )
  )
  return optax.chain(*transforms), schedule
