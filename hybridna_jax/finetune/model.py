"""A HybriDNA backbone with a sequence-level head (classification or
regression), reading echo / RC-echo / plain pooled embeddings.

    model = SequenceModel(model_cfg, HeadConfig(num_outputs=2), rngs=rngs)
    logits = model(batch)       # batch from echo.build_batch: (b, outputs) fp32

Strands (`HeadConfig.rc_combine`):
  "none": the forward strand only.
  "average_logits": the head scores both strands; the logits are averaged.
  "concat_features": the head reads the two strands' pooled features
    concatenated in a strand-symmetric order, [max(f, r), min(f, r)]
    elementwise (2d features). The plain order [f, r] would give a sequence
    and its reverse complement different predictions; the sorted pair keeps
    all of both strands' features per dimension and is the same for either
    input strand, so both RC modes predict the same for a sequence and its
    reverse complement by construction.

Both strands run through the backbone as one batch of 2b rows (one program,
one weight read). With a frozen backbone the pooled features are a
stop_gradient, so XLA drops the backbone's backward pass.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from hybridna_jax import echo as echo_lib
from hybridna_jax.config import RC_MODES, ModelConfig
from hybridna_jax.model import HybriDNA
from hybridna_jax.sharding import constrain


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  """How sequences become features and features become outputs.

  num_outputs: classes (classification) or 1 (regression).
  echo, pool, rc_combine: see `hybridna_jax.echo` and the module docstring.
  hidden: 0 for a linear head, else one GELU hidden layer of this width.
  freeze_backbone: train the head only.
  """

  num_outputs: int
  echo: bool = True
  pool: str = "mean"
  rc_combine: str = "none"
  hidden: int = 0
  freeze_backbone: bool = False

  def __post_init__(self):
    if self.pool not in echo_lib.POOL_MODES:
      raise ValueError(f"finetune.pool must be one of {echo_lib.POOL_MODES}, got {self.pool!r}.")
    if self.rc_combine not in RC_MODES:
      raise ValueError(f"finetune.rc_combine must be one of {RC_MODES}, got {self.rc_combine!r}.")
    if self.num_outputs < 1 or self.hidden < 0:
      raise ValueError(
        f"head: need num_outputs >= 1 and hidden >= 0, got {self.num_outputs}, {self.hidden}."
      )

  @property
  def reverse_strand(self) -> bool:
    return self.rc_combine != "none"

  @property
  def label(self) -> str:
    """A short name of the embedding, e.g. "RC-echo mean (avg logits)"."""
    name = ("RC-" if self.reverse_strand else "") + ("echo" if self.echo else "plain")
    extra = {
      "none": "",
      "average_logits": " (avg logits)",
      "concat_features": " (concat features)",
    }[self.rc_combine]
    return f"{name} {self.pool}{extra}" + (" frozen" if self.freeze_backbone else "")

  @classmethod
  def from_config(cls, fc, num_outputs: int) -> HeadConfig:
    """From the `finetune` config section."""
    return cls(
      num_outputs=num_outputs,
      echo=bool(fc.echo),
      pool=str(fc.pool),
      rc_combine=str(fc.rc_combine),
      hidden=int(fc.head_hidden),
      freeze_backbone=bool(fc.freeze_backbone),
    )


class SequenceHead(nnx.Module):
  """features (b, in) fp32 -> outputs (b, num_outputs) fp32."""

  def __init__(self, in_features: int, cfg: HeadConfig, *, param_dtype, rngs: nnx.Rngs):
    width = in_features
    if cfg.hidden:
      self.hidden = nnx.Param(
        jax.random.normal(rngs.params(), (in_features, cfg.hidden), param_dtype)
        / jnp.sqrt(in_features).astype(param_dtype),
        logical_axes=("embed", "mlp"),
      )
      self.hidden_bias = nnx.Param(jnp.zeros((cfg.hidden,), param_dtype), logical_axes=("mlp",))
      width = cfg.hidden
    else:
      self.hidden = None
    # Zero output layer: the untrained head predicts the uniform distribution
    # (or 0), a stable start on top of pretrained features.
    self.kernel = nnx.Param(
      jnp.zeros((width, cfg.num_outputs), param_dtype),
      logical_axes=("mlp" if cfg.hidden else "embed", "classes"),
    )
    self.bias = nnx.Param(jnp.zeros((cfg.num_outputs,), param_dtype), logical_axes=("classes",))

  def __call__(self, x: jax.Array) -> jax.Array:
    """Pooled features (b, d) -> outputs (b, num_outputs) float32."""
    x = x.astype(jnp.float32)
    if self.hidden is not None:
      x = jax.nn.gelu(
        x @ self.hidden[...].astype(jnp.float32) + self.hidden_bias[...].astype(jnp.float32)
      )
    return x @ self.kernel[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)


class SequenceModel(nnx.Module):
  """Backbone (`HybriDNA`, params under "backbone") + head (under "head")."""

  def __init__(self, model_cfg: ModelConfig, head_cfg: HeadConfig, *, rngs: nnx.Rngs):
    self.head_cfg = head_cfg
    self.backbone = HybriDNA(model_cfg, rngs=rngs)
    in_features = model_cfg.d_model * (2 if head_cfg.rc_combine == "concat_features" else 1)
    self.head = SequenceHead(in_features, head_cfg, param_dtype=model_cfg.weight_dtype, rngs=rngs)

  def embed(self, inputs: jax.Array, segment_ids: jax.Array, pool_mask: jax.Array) -> jax.Array:
    """Pooled final-norm features, float32 (b, d)."""
    out = self.backbone(inputs, segment_ids=segment_ids, return_logits=False)
    features = echo_lib.pool(out.hidden, pool_mask, self.head_cfg.pool)
    if self.head_cfg.freeze_backbone:
      features = jax.lax.stop_gradient(features)
    return constrain(features, ("act_batch", None))

  def __call__(self, batch: dict) -> jax.Array:
    """Batch from `echo.build_batch` -> outputs (b, num_outputs) float32."""
    cfg = self.head_cfg
    if not cfg.reverse_strand:
      return self.head(self.embed(batch["inputs"], batch["segment_ids"], batch["pool_mask"]))
    b = batch["inputs"].shape[0]
    both = lambda x, y: jnp.concatenate([x, y], axis=0)  # noqa: E731
    features = self.embed(
      both(batch["inputs"], batch["rc_inputs"]),
      both(batch["segment_ids"], batch["segment_ids"]),
      both(batch["pool_mask"], batch["pool_mask"]),
    )
    forward, reverse = features[:b], features[b:]
    if cfg.rc_combine == "average_logits":
      return 0.5 * (self.head(forward) + self.head(reverse))
    return self.head(
      jnp.concatenate([jnp.maximum(forward, reverse), jnp.minimum(forward, reverse)], axis=-1)
    )
