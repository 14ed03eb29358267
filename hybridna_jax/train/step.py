"""Train state, sharded initialisation, and the jitted train/eval steps.

Every array of the train state carries its logical axes (optax keeps the
nnx.Variable wrappers, and their metadata, on the moments it mirrors from the
parameters), so one call to `sharding.state_shardings` places parameters and
optimizer state alike; the step is jitted with those explicit in/out
shardings and the batch split over (data, fsdp).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hybridna_jax import sharding
from hybridna_jax.config import ModelConfig
from hybridna_jax.model import HybriDNA, abstract_model

LN2 = 0.6931471805599453
BATCH_KEYS = ("inputs", "targets", "segment_ids", "loss_mask")


class TrainState(NamedTuple):
  step: jax.Array                 # () int32, optimizer steps taken
  params: nnx.State               # nnx.Param variables
  opt_state: Any
  skipped: jax.Array              # () int32, non-finite steps skipped in total
  consecutive_skips: jax.Array    # () int32, current run of skipped steps


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array):
  """Sums over masked positions: (nll_sum, count, correct)."""
  logits = logits.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  mask = mask.astype(jnp.float32)
  nll = (logz - target_logit) * mask
  correct = (jnp.argmax(logits, axis=-1) == targets) * mask
  return nll.sum(), mask.sum(), correct.sum()


@dataclasses.dataclass(frozen=True)
class StepFunctions:
  """Compiled entry points bound to a model config, optimizer and mesh."""
  graphdef: Any
  state_shardings: Any
  batch_sharding: NamedSharding
  init: Callable[[jax.Array], TrainState]
  train_step: Callable[[TrainState, dict], tuple[TrainState, dict]]
  eval_step: Callable[[nnx.State, dict], dict]
  mesh: Mesh


def build_steps(model_cfg: ModelConfig, optimizer: optax.GradientTransformation,
                schedule: optax.Schedule, mesh: Mesh,
                rules: sharding.Rules = sharding.DEFAULT_RULES,
                grad_accum: int = 1) -> StepFunctions:
  """Jitted, sharded init / train / eval functions."""
  graphdef, _ = nnx.split(abstract_model(model_cfg), nnx.Param)

  def init(key: jax.Array) -> TrainState:
    model = HybriDNA(model_cfg, rngs=nnx.Rngs(params=key))
    params = nnx.state(model, nnx.Param)
    zero = jnp.zeros((), jnp.int32)
    return TrainState(zero, params, optimizer.init(params), zero, zero)

  abstract_state = jax.eval_shape(init, jax.random.key(0))
  state_shardings = sharding.state_shardings(abstract_state, mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh)

  def loss_fn(params, micro):
    model = nnx.merge(graphdef, params)
    out = model(micro["inputs"], segment_ids=micro["segment_ids"])
    nll, count, correct = masked_cross_entropy(out.logits, micro["targets"],
                                               micro["loss_mask"])
    return nll, (count, correct)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def microbatches(batch):
    """(B, L) -> (grad_accum, B / grad_accum, L), each micro-batch still
    split over all data devices (rows are dealt round-robin)."""
    def split(x):
      b = x.shape[0]
      x = x.reshape(b // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1)
      return sharding.constrain(x, (None, "act_batch", "act_length"))
    return {k: split(batch[k]) for k in BATCH_KEYS}

  def train_step(state: TrainState, batch: dict):
    with sharding.activate(mesh, rules):
      if grad_accum == 1:
        (nll, (count, correct)), grads = grad_fn(state.params, batch)
      else:
        def accumulate(carry, micro):
          nll, count, correct, grads = carry
          (m_nll, (m_count, m_correct)), m_grads = grad_fn(state.params, micro)
          return (nll + m_nll, count + m_count, correct + m_correct,
                  jax.tree.map(jnp.add, grads, m_grads)), None
        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (nll, count, correct, grads), _ = jax.lax.scan(
            accumulate, (0.0, 0.0, 0.0, zeros), microbatches(batch))
      denom = jnp.maximum(count, 1.0)
      grads = jax.tree.map(lambda g: g / denom, grads)
      loss = nll / denom
      grad_norm = optax.tree.norm(grads)
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

      def apply(state):
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state._replace(step=state.step + 1, params=params, opt_state=opt_state,
                              consecutive_skips=jnp.zeros((), jnp.int32))

      def skip(state):
        return state._replace(step=state.step + 1, skipped=state.skipped + 1,
                              consecutive_skips=state.consecutive_skips + 1)

      new_state = jax.lax.cond(finite, apply, skip, state)
      metrics = {
          "loss": loss, "bits_per_nt": loss / LN2, "accuracy": correct / denom,
          "grad_norm": grad_norm, "learning_rate": schedule(state.step),
          "tokens": count, "skipped": 1 - finite.astype(jnp.int32),
          "consecutive_skips": new_state.consecutive_skips,
      }
      return new_state, metrics

  def eval_step(params: nnx.State, batch: dict):
    with sharding.activate(mesh, rules):
      nll, (count, correct) = loss_fn(params, batch)
      return {"nll": nll, "tokens": count, "correct": correct}

  replicated = NamedSharding(mesh, P())
  batch_shardings = {k: batch_sharding for k in BATCH_KEYS}
  return StepFunctions(
      graphdef=graphdef,
      state_shardings=state_shardings,
      batch_sharding=batch_sharding,
      init=jax.jit(init, out_shardings=state_shardings),
      train_step=jax.jit(train_step, in_shardings=(state_shardings, batch_shardings),
                         out_shardings=(state_shardings, replicated), donate_argnums=0),
      eval_step=jax.jit(eval_step, in_shardings=(state_shardings.params, batch_shardings),
                        out_shardings=replicated),
      mesh=mesh)


def device_batch(batch: dict, batch_sharding: NamedSharding) -> dict:
  """Host-local numpy batch -> global jax arrays split over (data, fsdp).

  Each process passes its own rows; on one process this is a device_put.
  """
  return {k: jax.make_array_from_process_local_data(batch_sharding, batch[k])
          for k in BATCH_KEYS}
