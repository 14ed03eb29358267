"""Train state, sharded initialisation, and the jitted train/eval steps.

`build_steps` is generic over the model and loss: pretraining, classification
fine-tuning and generative fine-tuning all go through it. A loss function
maps (model, batch) to (summed loss, {"count": weight, name: summed metric});
the step divides by the total count, so gradient accumulation over
micro-batches is exact.

Every array of the train state carries its logical axes (optax keeps the
nnx.Variable wrappers, and their metadata, on the moments it mirrors from
the parameters), so one call to `sharding.state_shardings` places parameters
and optimizer state alike; the step is jitted with explicit in/out shardings
and the batch split over (data, fsdp).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from hybridna_jax import sharding

LN2 = 0.6931471805599453
LM_BATCH_KEYS = ("inputs", "targets", "segment_ids", "loss_mask")

# (model, batch) -> (loss summed over examples/tokens, {"count": ..., metric sums}).
LossFn = Callable[[nnx.Module, dict], tuple[jax.Array, dict[str, jax.Array]]]


class TrainState(NamedTuple):
  step: jax.Array  # () int32, train steps taken (skipped ones included)
  params: nnx.State  # nnx.Param variables
  opt_state: Any
  # () int32, steps skipped in total: non-finite, or with no scored token
  # (an all-N batch), whose zero gradient would still move the parameters
  # through Adam's momentum and weight decay.
  skipped: jax.Array
  consecutive_skips: jax.Array  # () int32, current run of non-finite steps


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array):
  """Sums over masked positions: (nll_sum, count, correct)."""
  logits = logits.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  mask = mask.astype(jnp.float32)
  nll = (logz - target_logit) * mask
  correct = (jnp.argmax(logits, axis=-1) == targets) * mask
  return nll.sum(), mask.sum(), correct.sum()


def lm_loss(model: nnx.Module, batch: dict):
  """Next-token loss over `loss_mask` (pretraining and generative tuning):
  batch inputs, targets (b, l) int32, loss_mask (b, l) float32 and optional
  segment_ids (b, l) int32 (without them each row is one document). Returns
  (summed nll, {"count", "accuracy" (correct count), "bits_per_nt"})."""
  out = model(batch["inputs"], segment_ids=batch.get("segment_ids"))
  nll, count, correct = masked_cross_entropy(out.logits, batch["targets"], batch["loss_mask"])
  return nll, {"count": count, "accuracy": correct, "bits_per_nt": nll / LN2}


@dataclasses.dataclass(frozen=True)
class StepFunctions:
  """Compiled entry points bound to a model, loss, optimizer and mesh.

  init(key) -> TrainState; train_step(state, batch) -> (state, metrics);
  eval_step(params, batch) -> loss sums (like the train metrics, unreduced);
  apply(params, batch) -> `apply_fn`'s outputs (e.g. logits for metrics).
  """

  graphdef: Any
  state_shardings: Any
  batch_sharding: NamedSharding  # rows over (data, fsdp)
  batch_keys: tuple[str, ...]
  # Per batch key: `batch_sharding`, or for `sequence_keys` (token arrays
  # (B, L, ...)) also the length over the context axis.
  batch_shardings: dict[str, NamedSharding]
  sequence_keys: tuple[str, ...]
  init: Callable[[jax.Array], TrainState]
  train_step: Callable[[TrainState, dict], tuple[TrainState, dict]]
  eval_step: Callable[[nnx.State, dict], dict]
  apply: Callable[[nnx.State, dict], Any] | None
  mesh: Mesh


def build_steps(
  init_model: Callable[[nnx.Rngs], nnx.Module],
  loss_fn: LossFn,
  optimizer: optax.GradientTransformation,
  schedule: optax.Schedule,
  mesh: Mesh,
  *,
  batch_keys: tuple[str, ...] = LM_BATCH_KEYS,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
  grad_accum: int = 1,
  apply_fn: Callable[[nnx.Module, dict], Any] | None = None,
  sequence_keys: tuple[str, ...] = (),
) -> StepFunctions:
  """Jitted, sharded init / train / eval functions.

  Args:
    init_model: builds a freshly initialised model from nnx.Rngs.
    loss_fn: see `LossFn`.
    batch_keys: the batch's arrays; each has the batch on its leading axis.
    grad_accum: micro-batches per step (divides the batch).
    apply_fn: optional (model, batch) -> outputs, jitted as `apply`.
    sequence_keys: batch keys of token arrays (B, L, ...) placed with their
      length split over the context axis (`sharding.sequence_batch_sharding`;
      fed through a `sharding.BatchLayout`); the others split rows only.
  """
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: init_model(nnx.Rngs(0))), nnx.Param)

  def init(key: jax.Array) -> TrainState:
    params = nnx.state(init_model(nnx.Rngs(params=key)), nnx.Param)
    zero = jnp.zeros((), jnp.int32)
    return TrainState(zero, params, optimizer.init(params), zero, zero)

  abstract_state = jax.eval_shape(init, jax.random.key(0))
  state_shardings = sharding.state_shardings(abstract_state, mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh)

  def loss_of_params(params, batch):
    return loss_fn(nnx.merge(graphdef, params), batch)

  grad_fn = jax.value_and_grad(loss_of_params, has_aux=True)

  def microbatches(batch):
    """(B, ...) -> (grad_accum, B / grad_accum, ...), each micro-batch still
    split over all data devices (rows are dealt round-robin), and the
    `sequence_keys` over the context axis as the batch was (constrained to
    whole rows, XLA gathered each row's length at every step)."""

    def split(x, sequence: bool):
      x = x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1)
      rest = ("act_length",) + (None,) * (x.ndim - 3) if sequence else (None,) * (x.ndim - 2)
      return sharding.constrain(x, (None, "act_batch") + rest)

    return {k: split(batch[k], k in sequence_keys) for k in batch_keys}

  def train_step(state: TrainState, batch: dict):
    with sharding.activate(mesh, rules):
      if grad_accum == 1:
        (loss_sum, sums), grads = grad_fn(state.params, batch)
      else:

        def accumulate(carry, micro):
          (m_loss, m_sums), m_grads = grad_fn(state.params, micro)
          return jax.tree.map(jnp.add, carry, (m_loss, m_sums, m_grads)), None

        (_, abstract_sums), _ = jax.eval_shape(
          grad_fn, state.params, jax.tree.map(lambda x: x[0], microbatches(batch))
        )
        zeros = jax.tree.map(
          lambda a: jnp.zeros(a.shape, a.dtype),
          (jax.ShapeDtypeStruct((), jnp.float32), abstract_sums, state.params),
        )
        (loss_sum, sums, grads), _ = jax.lax.scan(accumulate, zeros, microbatches(batch))
      denom = jnp.maximum(sums["count"], 1.0)
      grads = jax.tree.map(lambda g: g / denom, grads)
      loss = loss_sum / denom
      grad_norm = optax.tree.norm(grads)
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      applies = finite & (sums["count"] > 0)

      def apply(state):
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state._replace(
          step=state.step + 1,
          params=params,
          opt_state=opt_state,
          consecutive_skips=jnp.zeros((), jnp.int32),
        )

      def skip(state):
        return state._replace(
          step=state.step + 1,
          skipped=state.skipped + 1,
          # An empty batch is no sign of divergence: the run of non-finite
          # steps (max_consecutive_skips) neither grows nor ends.
          consecutive_skips=state.consecutive_skips + (~finite).astype(jnp.int32),
        )

      new_state = jax.lax.cond(applies, apply, skip, state)
      metrics = {k: v / denom for k, v in sums.items() if k != "count"}
      metrics.update(
        loss=loss,
        grad_norm=grad_norm,
        # The rate this step applies: the schedule follows the optimizer's
        # own count, the updates applied (step - skipped). A skipped step
        # leaves the optimizer state, and so the schedule, where it was.
        learning_rate=schedule(state.step - state.skipped),
        count=sums["count"],
        skipped=1 - applies.astype(jnp.int32),
        consecutive_skips=new_state.consecutive_skips,
      )
      return new_state, metrics

  def eval_step(params: nnx.State, batch: dict):
    with sharding.activate(mesh, rules):
      loss_sum, sums = loss_of_params(params, batch)
      return {"loss": loss_sum, **sums}

  def apply(params: nnx.State, batch: dict):
    with sharding.activate(mesh, rules):
      return apply_fn(nnx.merge(graphdef, params), batch)

  replicated = NamedSharding(mesh, P())
  unknown = set(sequence_keys) - set(batch_keys)
  if unknown:
    raise ValueError(f"sequence_keys {sorted(unknown)} are not batch keys {batch_keys}.")
  sequence_sharding = sharding.sequence_batch_sharding(mesh)
  batch_shardings = {
    k: sequence_sharding if k in sequence_keys else batch_sharding for k in batch_keys
  }
  return StepFunctions(
    graphdef=graphdef,
    state_shardings=state_shardings,
    batch_sharding=batch_sharding,
    batch_keys=tuple(batch_keys),
    batch_shardings=batch_shardings,
    sequence_keys=tuple(sequence_keys),
    init=jax.jit(init, out_shardings=state_shardings),
    train_step=jax.jit(
      train_step,
      in_shardings=(state_shardings, batch_shardings),
      out_shardings=(state_shardings, replicated),
      donate_argnums=0,
    ),
    eval_step=jax.jit(
      eval_step, in_shardings=(state_shardings.params, batch_shardings), out_shardings=replicated
    ),
    apply=(
      jax.jit(apply, in_shardings=(state_shardings.params, batch_shardings))
      if apply_fn is not None
      else None
    ),
    mesh=mesh,
  )


def device_batch(
  batch: dict,
  batch_sharding: NamedSharding | Mapping[str, NamedSharding],
  keys: tuple[str, ...] = LM_BATCH_KEYS,
  *,
  layout: sharding.BatchLayout | None = None,
) -> dict:
  """Host-local numpy batch -> global jax arrays.

  batch_sharding: one sharding for every key, or one per key (e.g.
    `StepFunctions.batch_shardings`).
  layout: None: each process passes its own equal share of the rows (R =
    B / process count, split over data and fsdp only), and on one process
    this is a device_put. A `sharding.BatchLayout` of a (B, L) batch: each
    process passes exactly its layout's rows, in order, and for keys whose
    sharding splits dimension 1 (the length over context) only its columns:
    such a key is (len(rows), columns[1] - columns[0], ...), any other
    (len(rows), ...). Processes whose devices are tensor or context partners
    pass the same rows.

  Returns: {key: jax.Array} of global shape (B, L, ...) or (B, ...).
  """
  out = {}
  for k in keys:
    s = batch_sharding[k] if isinstance(batch_sharding, Mapping) else batch_sharding
    x = batch[k]
    if layout is None:
      out[k] = jax.make_array_from_process_local_data(s, x)
      continue
    split_length = len(s.spec) > 1 and s.spec[1] is not None
    local = layout.local_shape if split_length else (len(layout.rows),)
    if x.shape[: len(local)] != local:
      raise ValueError(
        f"batch[{k!r}] has shape {x.shape}; this process's layout needs {local} leading."
      )
    shape = (layout.batch_size, layout.length) if split_length else (layout.batch_size,)
    out[k] = jax.make_array_from_process_local_data(s, x, shape + x.shape[len(shape) :])
  return out
