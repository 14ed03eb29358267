"""Configuration: the typed sections of the job config and their defaults.

Config files under configs/ start from `base_config()` and override fields;
launchers take `--config=configs/<file>.py[:variant]` and command-line
overrides such as `--config.train.eval_every=100`. Each section has one
definition, a frozen dataclass with every field's default and meaning:

    model     ModelConfig      (architecture, numerics, kernels)
    data      DataConfig       (hybridna_jax/data/config.py)
    train     TrainConfig      (schedule, optimiser, evaluation, checkpoints)
    score     ScoreConfig      (scoring, evaluation, variant effects)
    finetune  FinetuneConfig   (understanding fine-tuning)
    generate  GenerateConfig   (generative fine-tuning and sampling)

`XConfig.config_dict()` is the section's ConfigDict of defaults (what
`base_config()` mounts); `XConfig.from_config(cfg.x)` is the checked, typed
view code reads (`hybridna_jax.sections`). `validate(config)` checks every
section at once; `apply_variants` is the one `:variant` mechanism of the
config files. `MODEL_ARCHITECTURE_FIELDS` / `MODEL_RUNTIME_FIELDS` say
which model fields a checkpoint fixes.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import ml_collections

from hybridna_jax import tokenizer
from hybridna_jax.data.config import DataConfig, default_data_config
from hybridna_jax.sections import ConfigError, Section, field, set_fields
from hybridna_jax.train.baselines import MAX_ORDER as MAX_MARKOV_ORDER

__all__ = [
  "CONTEXT_ATTENTION",
  "ConfigError",
  "DataConfig",
  "FinetuneConfig",
  "GenerateConfig",
  "ModelConfig",
  "ScoreConfig",
  "TrainConfig",
  "SECTIONS",
  "MODEL_ARCHITECTURE_FIELDS",
  "MODEL_INIT_FIELDS",
  "MODEL_RUNTIME_FIELDS",
  "apply_variants",
  "architecture_differences",
  "base_config",
  "default_data_config",
  "load_config",
  "model_config_dict",
  "validate",
]


# How attention crosses the mesh's context axis (hybridna_jax.kernels.sharded);
# the first is the default (the fastest measured, benchmarks/RESULTS.md).
CONTEXT_ATTENTION = ("zigzag", "ring", "allgather")
# The values of the config's choice fields (checked when a section is read).
POOLINGS = ("mean", "last", "echo")  # score.pooling
POOL_MODES = ("mean", "last")  # finetune.pool (echo is finetune.echo)
RC_MODES = ("none", "average_logits", "concat_features")  # finetune.rc_combine
TASK_FORMATS = ("auto", "gue", "nt", "bed")  # finetune.format
TASK_KINDS = ("auto", "classification", "regression")  # finetune.kind
CLASS_WEIGHTS = ("none", "balanced")  # finetune.class_weights
CHECKPOINT_WHICH = ("latest", "best")  # *.pretrained_which
LABEL_KINDS = ("categorical", "bins")  # generate.label_kind


# ModelConfig fields that count something and must be at least 1.
_MODEL_SIZES = (
  "vocab_size",
  "d_model",
  "n_layers",
  "attn_period",
  "num_heads",
  "num_kv_heads",
  "head_dim",
  "d_state",
  "d_conv",
  "expand",
  "ssm_head_dim",
  "ngroups",
  "chunk_size",
  "max_seq_len",
)


@dataclasses.dataclass(frozen=True)
class ModelConfig(Section):
  """Architecture and numerics of a HybriDNA model (see DESIGN.md section 2)."""

  SECTION = "model"
  vocab_size: int = tokenizer.VOCAB_SIZE
  d_model: int = 1024
  n_layers: int = 24
  # Layer i is attention when i % attn_period == attn_offset, unless
  # attn_layers lists the attention layers explicitly.
  attn_period: int = 8
  attn_offset: int = 4
  attn_layers: tuple[int, ...] | None = None
  mlp_dim: int = 2048
  # Attention (grouped-query).
  num_heads: int = 16
  num_kv_heads: int = 4
  head_dim: int = 64
  rope: bool = False
  rope_theta: float = 10_000.0
  # Share of each head's dims that RoPE rotates (the first ones; the rest
  # pass through). 1.0: all (HybriDNA); 0.5: transformers' Bamba, which
  # always rotates half of each head (partial_rotary_factor).
  rope_fraction: float = 1.0
  # Mamba2 mixer (mamba_ssm defaults).
  d_state: int = 128
  d_conv: int = 4
  expand: int = 2
  ssm_head_dim: int = 64
  ngroups: int = 1
  chunk_size: int = 256
  dt_min: float = 1e-3
  dt_max: float = 1e-1
  dt_init_floor: float = 1e-4
  a_init_range: tuple[float, float] = (1.0, 16.0)
  # Stack.
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  init_std: float = 0.02
  max_seq_len: int = 131_074
  # Numerics and execution.
  dtype: str = "bfloat16"  # compute dtype
  param_dtype: str = "float32"  # master weights
  remat: str = "none"  # none | full | dots
  ssd_impl: str = "auto"  # auto | chunked (XLA) | sequential | pallas... (ssd.CORES)
  attention_impl: str = "auto"  # auto | xla | xla_blockwise | xla_causal | kernels...
  # How attention crosses the mesh's context axis (config.mesh.context > 1):
  # "ring" passes key/value slices around it; "zigzag" does too, with the
  # causal work balanced over the devices (hybridna_jax.kernels.sharded);
  # "allgather" gathers them all.
  context_attention: str = CONTEXT_ATTENTION[0]
  # Parameter layout, not architecture: True runs the stack as one
  # `nnx.scan` over blocks of attn_period layers (params stacked per
  # position in the block), so compile time stops growing with depth. Only
  # when the layer pattern repeats every attn_period layers; otherwise the
  # stack stays a Python loop. Checkpoints convert between the layouts.
  scan_layers: bool = False

  def __post_init__(self):
    # Sizes first: the checks below divide by them.
    for name in _MODEL_SIZES:
      if not getattr(self, name) >= 1:
        raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)!r}.")
    if self.attn_layers is None and not 0 <= self.attn_offset < self.attn_period:
      raise ValueError(
        f"model.attn_offset ({self.attn_offset}) must be in [0, attn_period={self.attn_period}): "
        "another offset builds no attention layer (for none, set model.attn_layers=())."
      )
    for name in ("dtype", "param_dtype"):
      try:
        jnp.dtype(getattr(self, name))
      except TypeError:
        raise ValueError(
          f"model.{name}={getattr(self, name)!r} is not a dtype; use e.g. bfloat16 or float32."
        ) from None
    if self.d_inner % self.ssm_head_dim:
      raise ValueError(
        f"model: expand * d_model ({self.d_inner}) must be a "
        f"multiple of ssm_head_dim ({self.ssm_head_dim})."
      )
    if self.ssm_heads % self.ngroups:
      raise ValueError(
        f"model: SSM heads ({self.ssm_heads}) must be a multiple of ngroups ({self.ngroups})."
      )
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"model: num_heads ({self.num_heads}) must be a multiple "
        f"of num_kv_heads ({self.num_kv_heads})."
      )
    if self.remat not in ("none", "full", "dots"):
      raise ValueError(f"model.remat must be none, full or dots, got {self.remat!r}.")
    if self.context_attention not in CONTEXT_ATTENTION:
      raise ValueError(
        f"model.context_attention must be one of {CONTEXT_ATTENTION}, "
        f"got {self.context_attention!r}."
      )
    rotated = self.head_dim * self.rope_fraction
    if not 0 < self.rope_fraction <= 1 or (self.rope and (rotated != int(rotated) or rotated % 2)):
      raise ValueError(
        f"model.rope_fraction ({self.rope_fraction}) must be in (0, 1] and rotate an even "
        f"number of head_dim ({self.head_dim}) dims."
      )
    for i in self.attn_layers or ():
      if not 0 <= i < self.n_layers:
        raise ValueError(f"model.attn_layers: layer {i} outside [0, {self.n_layers}).")

  @property
  def d_inner(self) -> int:
    return self.expand * self.d_model

  @property
  def ssm_heads(self) -> int:
    return self.d_inner // self.ssm_head_dim

  @property
  def layer_types(self) -> tuple[str, ...]:
    """ "attention" or "mamba" for each layer."""
    if self.attn_layers is not None:
      attn = set(self.attn_layers)
      return tuple("attention" if i in attn else "mamba" for i in range(self.n_layers))
    return tuple(
      "attention" if i % self.attn_period == self.attn_offset else "mamba"
      for i in range(self.n_layers)
    )

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)


# -- Which model fields a checkpoint fixes --------------------------------------
# Runtime fields: numerics, kernels, limits and the layer layout. They change
# no parameter value (scan_layers only stacks them; restore converts), so
# a restored, fine-tuned or scoring model may set them differently from the
# run that trained it (restore.load, finetune, design).
MODEL_RUNTIME_FIELDS = (
  "dtype",
  "param_dtype",
  "remat",
  "ssd_impl",
  "attention_impl",
  "context_attention",
  "max_seq_len",
  "scan_layers",
)
# Initialisation fields: they only shape fresh parameters, which a loaded
# checkpoint replaces; recorded, never compared.
MODEL_INIT_FIELDS = ("dt_min", "dt_max", "dt_init_floor", "a_init_range", "init_std")
# Architecture fields: all the others -- the parameter shapes and the
# function the parameters compute (sizes, layer placement, rope, rope_theta,
# norm_eps, chunking). A checkpoint and the model it loads into must agree
# on every one; a new ModelConfig field is architecture unless listed above.
MODEL_ARCHITECTURE_FIELDS = tuple(
  name for name in ModelConfig.field_names() if name not in MODEL_RUNTIME_FIELDS + MODEL_INIT_FIELDS
)
# Attention placement: different settings can place the same layers, so
# these compare as ModelConfig.layer_types.
PLACEMENT_FIELDS = ("attn_period", "attn_offset", "attn_layers")


def architecture_differences(a: ModelConfig, b: ModelConfig) -> dict[str, tuple[Any, Any]]:
  """{field: (a's value, b's value)} for every architecture field on which
  `a` and `b` differ (attention placement as "layer_types"); empty when a
  checkpoint of one loads into the other."""
  diff = {
    name: (getattr(a, name), getattr(b, name))
    for name in MODEL_ARCHITECTURE_FIELDS
    if name not in PLACEMENT_FIELDS and getattr(a, name) != getattr(b, name)
  }
  if a.layer_types != b.layer_types:
    diff["layer_types"] = (a.layer_types, b.layer_types)
  return diff


def model_config_dict(**overrides) -> ml_collections.ConfigDict:
  """ConfigDict of ModelConfig defaults with `overrides` applied."""
  return ModelConfig.config_dict(**overrides)


# -- The other sections -------------------------------------------------------------


# Range checks of TrainConfig: fields that must be >= 1, and fields that must
# be >= 0 with what 0 means (as documented on each field).
_TRAIN_POSITIVE = (
  "log_every",
  "checkpoint_every",
  "grad_accum",
  "max_consecutive_skips",
  "keep_checkpoints",
  "eval_batch_size",
)
_TRAIN_NON_NEGATIVE = {
  "learning_rate": "0: no updates",
  "warmup_steps": "0: no warmup",
  "eval_every": "0: never evaluate",
  "eval_batches": "0: the whole split",
  "eval_seq_len": "0: the stage's length",
  "grad_clip": "0: no clipping",
  "weight_decay": "0: none",
  "peak_flops_per_device": "0: looked up from the device kind",
}


@dataclasses.dataclass(frozen=True)
class TrainConfig(Section):
  """Pretraining schedule, optimiser, evaluation and checkpointing."""

  SECTION = "train"
  seed: int = 0
  # Context stages, run in order: (sequence length, optimizer steps, global
  # batch size). The paper: most steps at 8k, then short stages at 32k and
  # 131k with fewer sequences per batch (constant tokens per step).
  stages: tuple[tuple[int, int, int], ...] = field(
    ((8192, 10_000, 64), (32_768, 500, 16), (131_072, 100, 4)),
    expected="a tuple of (seq_len, steps, global_batch_size) triples like ((8192, 1000, 64),)",
  )
  # Micro-batches per step (gradient accumulation); divides each batch.
  grad_accum: int = 1
  # AdamW with linear warmup and cosine decay to learning_rate * min_lr_ratio.
  learning_rate: float = 8e-4
  warmup_steps: int = 1000
  min_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1  # not applied to norms, biases, A_log, dt_bias, D
  grad_clip: float = 1.0  # global-norm clipping; 0 disables
  # Steps with a non-finite loss or gradient are skipped; this many in a
  # row stop the run (after a checkpoint, at the next log step).
  max_consecutive_skips: int = 20
  log_every: int = 50
  # Validation on the held-out split every eval_every steps (0: never), over
  # at most eval_batches batches per host (0: the whole split), at
  # eval_seq_len (0: the current stage's length).
  eval_every: int = 1000
  eval_batches: int = 0
  eval_batch_size: int = 8
  eval_seq_len: int = 0
  checkpoint_every: int = 1000
  keep_checkpoints: int = 3
  keep_best: bool = True  # also keep the best-validation parameters in <workdir>/best
  async_checkpoints: bool = True
  # Peak FLOP/s per device for MFU; 0 looks it up from the device kind.
  peak_flops_per_device: float = 0.0
  plot: bool = True
  # The demo's report: validation bits/nt of order-k Markov baselines
  # fitted on the training split (empty: none).
  markov_orders: tuple[int, ...] = ()

  def __post_init__(self):
    # `not value >= low` also refuses NaN.
    for name in _TRAIN_POSITIVE:
      value = getattr(self, name)
      if not value >= 1:
        raise ValueError(f"config.train.{name} must be a positive integer, got {value}.")
    for name, zero in _TRAIN_NON_NEGATIVE.items():
      value = getattr(self, name)
      if not value >= 0:
        raise ValueError(f"config.train.{name} must be >= 0 ({zero}), got {value}.")
    if not 0 <= self.min_lr_ratio <= 1:
      raise ValueError(
        f"config.train.min_lr_ratio must be in [0, 1] (a fraction of learning_rate), "
        f"got {self.min_lr_ratio}."
      )
    if not 0 <= self.seed < 2**32:  # jax.random.key overflows past 2**63; the data adds x 1000
      raise ValueError(f"config.train.seed must be in [0, 2**32), got {self.seed}.")
    if not math.isfinite(self.learning_rate):
      raise ValueError(f"config.train.learning_rate must be finite, got {self.learning_rate}.")
    # b = 1 divides Adam's bias correction by zero: the first update is NaN.
    for name in ("b1", "b2"):
      value = getattr(self, name)
      if not 0 <= value < 1:
        raise ValueError(
          f"config.train.{name} must be in [0, 1) (an Adam moment's decay), got {value}."
        )
    if not 0 <= self.eps < math.inf:
      raise ValueError(f"config.train.eps must be finite and >= 0, got {self.eps}.")
    for order in self.markov_orders:
      if not 0 <= order <= MAX_MARKOV_ORDER:
        raise ValueError(
          f"config.train.markov_orders must each be in [0, {MAX_MARKOV_ORDER}], got {order}; "
          "drop it or pick a lower order."
        )


@dataclasses.dataclass(frozen=True)
class ScoreConfig(Section):
  """Scoring, evaluation and variant effects (hybridna_jax.scoring,
  launch/eval.py, launch/score.py). With the context resolved, this is also
  the `Scorer`'s settings (`scoring.ScoreConfig`)."""

  SECTION = "score"
  # Window length in tokens (0: the trained context, the last stage's
  # seq_len). Longer inputs are scored in windows `stride` apart; each window
  # scores only positions no earlier window scored, so every position is
  # scored once with at least context - stride tokens before it (except
  # near the start of a sequence). stride 0: context // 2.
  context: int = 0
  stride: int = 0
  # Rows per device call; inputs are padded to this many rows and to one of
  # a few power-of-two lengths (from min_bucket up to the context), so new
  # inputs reuse compiled programs.
  batch_size: int = 8
  min_bucket: int = 128
  # Prepend <bos> (only for models trained with it; pretraining windows
  # start mid-genome without one, so the first nucleotide is not scored).
  add_bos: bool = False
  # Average every score over both strands (sequence and reverse complement).
  rc_average: bool = False
  # Parameter/compute dtype and kernels of the restored model ("": as
  # trained). On CPU, "auto" attention is "xla_causal": causal blocks only,
  # O(l * block) memory (the dense "xla" reference holds l x l scores).
  dtype: str = ""
  attention_impl: str = ""
  ssd_impl: str = ""
  # Embeddings: "mean" (over nucleotides), "last" (last nucleotide) or
  # "echo" (sequence, <sep>, sequence; mean over the second copy); layer -1
  # is the final-norm output, 0 the token embeddings, i the output of layer i.
  pooling: str = field("mean", choices=POOLINGS)
  layer: int = -1
  # Variant effects: ref/alt windows of this many nucleotides centred on each
  # variant (capped at the context, less a <bos>); longer REF/ALT alleles are skipped.
  variant_window: int = 8192
  max_indel_length: int = 64
  # Evaluation (launch/eval.py) on the token store: split, at most this
  # many records (0: all) and this many leading tokens of each (0: all).
  eval_split: str = "val"
  eval_max_records: int = 0
  eval_max_tokens: int = 0

  def __post_init__(self):
    if self.context < 0 or self.context == 1:
      raise ValueError(
        f"config.score.context must be at least 2 tokens (0: the trained "
        f"context), got {self.context}."
      )
    if self.batch_size < 1 or self.min_bucket < 1:
      raise ValueError(
        "config.score.batch_size and min_bucket must be positive, got "
        f"{self.batch_size} and {self.min_bucket}."
      )
    for name in ("eval_max_records", "eval_max_tokens"):
      if getattr(self, name) < 0:
        raise ValueError(
          f"config.score.{name} must be >= 0 (0: no limit), got {getattr(self, name)}."
        )
    if self.max_indel_length < 1:
      raise ValueError(
        f"config.score.max_indel_length must be >= 1 (an SNV is 1), got {self.max_indel_length}."
      )
    if self.variant_window < 2:
      raise ValueError(
        f"config.score.variant_window must be at least 2 nucleotides, got {self.variant_window}."
      )
    if self.stride < 0 or (self.context and not 0 < self.window_stride < self.context):
      raise ValueError(
        f"config.score.stride={self.stride} must be in [1, context - 1] "
        f"(context {self.context}): each window needs fresh positions "
        "and each scored position at least one token of context."
      )

  @property
  def window_stride(self) -> int:
    return self.stride or self.context // 2


@dataclasses.dataclass(frozen=True)
class FinetuneConfig(Section):
  """Understanding fine-tuning (launch/finetune.py, hybridna_jax.finetune).

  The schedule comes from here, not from train.stages: one stage of
  (padded echo length, steps, batch_size), which the task writes back into
  train.stages; the optimiser, evaluation and checkpoint fields of `train`
  apply as in pretraining.
  """

  SECTION = "finetune"
  # The task: a GUE folder (train/dev/test.csv), a Nucleotide Transformer
  # folder (train/test .fna with ">name|label" headers, or .csv), or a
  # BEND-style BED file (chromosome, start, end, [strand,] split, label).
  task: str = ""
  format: str = field("auto", choices=TASK_FORMATS)
  reference: str = ""  # reference FASTA of a BED task
  # Tasks without a dev split (NT, some BED files): this fraction of train,
  # stratified by class and seeded, becomes dev (model selection).
  dev_fraction: float = 0.1
  split_seed: int = 0
  kind: str = field("auto", choices=TASK_KINDS)
  # Backbone: a pretraining run directory, its checkpoints/ or best/, or a
  # step directory; empty = a freshly initialised model. Its architecture
  # replaces config.model (the runtime fields, MODEL_RUNTIME_FIELDS: dtype,
  # remat, kernels, ..., stay as configured here).
  pretrained: str = ""
  pretrained_which: str = field("latest", choices=CHECKPOINT_WHICH)  # for a run directory
  freeze_backbone: bool = False  # True: train the head only
  # Embedding: echo = sequence <sep> sequence, pooled over the second copy;
  # False = the plain baselines, pooled over the sequence.
  echo: bool = True
  pool: str = field("mean", choices=POOL_MODES)
  # Reverse-complement strand: none | average_logits | concat_features.
  rc_combine: str = field("none", choices=RC_MODES)
  head_hidden: int = 0  # 0: a linear head; N: one hidden layer of N (GELU)
  # Class-weighted loss: none | balanced (weights n / (classes * n_c)).
  class_weights: str = field("none", choices=CLASS_WEIGHTS)
  # Reverse-complement a training example with this probability.
  rc_augment: float = 0.0
  # Nucleotides per sequence; 0 = the longest in the task. Longer sequences
  # are cropped around their centre.
  max_length: int = 0
  pad_multiple: int = 64  # padded input length is a multiple of this
  # Schedule: `steps` optimizer steps, or (steps = 0) `epochs` passes over
  # the training split, at `batch_size` sequences per step (global).
  steps: int = 0
  epochs: float = 3.0
  batch_size: int = 32
  eval_batch_size: int = 64
  # Dev evaluation (model selection) and checkpoints every this many epochs;
  # 0 keeps train.eval_every / train.checkpoint_every (steps).
  eval_every_epochs: float = 0.5
  # Learning-rate warmup as a fraction of the steps (0 keeps
  # train.warmup_steps).
  warmup_fraction: float = 0.1
  # Also fit the GC-content, k-mer and one-hot baselines (finetune/baselines.py) on
  # the same train split and report them beside the model.
  baselines: bool = True
  # True: no training -- a linear probe (logistic regression / ridge) on
  # frozen embeddings of the backbone, with score.pooling (mean | last |
  # echo), score.layer and score.rc_average (finetune/probe.py).
  probe: bool = False

  def __post_init__(self):
    problems = []
    for name in ("batch_size", "eval_batch_size", "pad_multiple"):
      if not getattr(self, name) >= 1:
        problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
    zero_means = {
      "steps": "epochs decide",
      "max_length": "the longest sequence",
      "head_hidden": "a linear head",
      "eval_every_epochs": "train.eval_every",
    }
    for name, zero in zero_means.items():
      if not getattr(self, name) >= 0:
        problems.append(f"{name} must be >= 0 (0: {zero}), got {getattr(self, name)}")
    if not self.epochs > 0:
      problems.append(f"epochs must be > 0, got {self.epochs}")
    for name in ("warmup_fraction", "rc_augment"):
      if not 0 <= getattr(self, name) <= 1:
        problems.append(f"{name} must be in [0, 1], got {getattr(self, name)}")
    if self.probe and (self.pool != "mean" or self.rc_combine != "none"):
      # The probe embeds with the score section; silently probing another
      # embedding than the preset named would mislabel the results.
      problems.append(
        f"pool={self.pool!r} and rc_combine={self.rc_combine!r} are not used by the linear "
        "probe (probe=True), which embeds with score.pooling (mean | last | echo), score.layer "
        "and score.rc_average; set those instead"
      )
    if problems:
      raise ValueError("config.finetune: " + "; ".join(problems) + ".")


@dataclasses.dataclass(frozen=True)
class GenerateConfig(Section):
  """Sequence design: generative fine-tuning data and sampling settings
  (hybridna_jax/design/, launch/generate.py). Also how to generate, as
  `hybridna_jax.generate.GenerateConfig`: the sampling fields are read by
  generate.sample / beam_search (see that module's docstring)."""

  SECTION = "generate"
  # --- Generative fine-tuning (launch/generate.py --mode=finetune) --------
  # CSVs with a `sequence` column and the label column(s); val_csv is
  # needed when train.eval_every > 0.
  train_csv: str = ""
  val_csv: str = ""
  # One condition per column, each with its own block of task tokens.
  label_columns: tuple[str, ...] = ("label",)
  # "categorical": a token per distinct label; "bins": numeric activities
  # cut into num_bins quantile bins of the training set, a token per bin.
  label_kind: str = field("categorical", choices=LABEL_KINDS)
  num_bins: int = 5
  # Index (tokenizer.task_token) of the first task token used for labels.
  first_task_token: int = 0
  # The label -> token mapping; empty: derived from train_csv at the start
  # of a run and stored here, so the run's config.json keeps it.
  prompt_vocab: tuple[dict, ...] = ()
  # Share of training examples shown without label tokens, so the model can
  # also generate unconditionally (prompt: <bos> alone).
  label_dropout: float = 0.0
  # Probability of training on the reverse complement (for elements whose
  # activity does not depend on orientation, e.g. enhancers).
  reverse_complement_prob: float = 0.0
  # Leave N targets out of the loss.
  mask_n_in_loss: bool = True
  # Start from a pretrained LM: a run directory, checkpoints/ or best/
  # directory, or step directory ("": random initialisation).
  pretrained: str = ""
  pretrained_which: str = field("latest", choices=CHECKPOINT_WHICH)  # for a run directory

  # --- Sampling (launch/generate.py --mode=sample) ------------------------
  num_samples: int = 100  # per prompt
  batch_size: int = 50
  max_new_tokens: int = 200  # the length, or the cap with stop_at_eos
  stop_at_eos: bool = False  # allow <eos> and end rows there
  min_new_tokens: int = 0  # no <eos> before this many tokens
  temperature: float = 1.0  # 0: greedy
  top_k: int = 0  # 0: off
  top_p: float = 1.0  # 1.0: off
  allow_n: bool = False  # N may be generated
  beam_width: int = 1  # > 1: beam search (the paper's designs)
  length_penalty: float = 1.0  # beam scores: log-prob / length ** this
  seed: int = 0
  # Summary: k of the k-mer spectra, and at most this many pairs for the
  # mean pairwise edit distance.
  kmer: int = 6
  max_edit_pairs: int = 20_000
  # Oracle judging (hybridna_jax/design/oracle.py): design CSVs of real
  # sequences the generator never saw -- the oracle's training rows, its dev
  # rows (choice of k) and the held-out test rows whose share (and that of
  # their dinucleotide shuffles) the designs are compared with. All three
  # or none ("": no oracle report). One categorical condition only.
  oracle_csv: str = ""
  oracle_dev_csv: str = ""
  test_csv: str = ""

  def __post_init__(self):
    problems = []
    for name in ("num_samples", "batch_size", "max_new_tokens"):
      if getattr(self, name) < 1:
        problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
    if not self.temperature >= 0:
      problems.append(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
    if self.top_k < 0:
      problems.append(f"top_k must be >= 0 (0: off), got {self.top_k}")
    if not 0 < self.top_p <= 1:
      problems.append(f"top_p must be in (0, 1] (1: off), got {self.top_p}")
    if not 0 <= self.min_new_tokens <= self.max_new_tokens:
      problems.append(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
    if self.beam_width < 1:
      problems.append(f"beam_width must be >= 1, got {self.beam_width}")
    if self.length_penalty < 0:
      problems.append(f"length_penalty must be >= 0, got {self.length_penalty}")
    for name in ("label_dropout", "reverse_complement_prob"):
      if not 0 <= getattr(self, name) <= 1:
        problems.append(f"{name} must be in [0, 1], got {getattr(self, name)}")
    if self.num_bins < 2:
      problems.append(f"num_bins must be >= 2, got {self.num_bins}")
    if self.kmer < 1:
      problems.append(f"kmer must be >= 1, got {self.kmer}")
    if not 0 <= self.seed < 2**32:
      problems.append(f"seed must be in [0, 2**32) (a 32-bit PRNG seed), got {self.seed}")
    if self.max_edit_pairs < 1:
      problems.append(f"max_edit_pairs must be >= 1, got {self.max_edit_pairs}")
    if not 0 <= self.first_task_token < tokenizer.NUM_TASK_TOKENS:
      problems.append(
        f"first_task_token must be in [0, {tokenizer.NUM_TASK_TOKENS}), got {self.first_task_token}"
      )
    if problems:
      raise ValueError("config.generate: " + "; ".join(problems) + ".")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0

  def describe(self) -> str:
    """The sampling settings in one line, for FASTA headers and logs."""
    if self.beam_width > 1:
      how = f"beam={self.beam_width} length_penalty={self.length_penalty:g}"
    elif self.greedy:
      how = "greedy"
    else:
      how = f"temperature={self.temperature:g} top_k={self.top_k} top_p={self.top_p:g}"
    stop = (
      f"stop_at_eos min_new={self.min_new_tokens} max_new={self.max_new_tokens}"
      if self.stop_at_eos
      else f"length={self.max_new_tokens}"
    )
    return f"{how} {stop}" + (" allow_n" if self.allow_n else "")


@dataclasses.dataclass(frozen=True)
class MeshConfig(Section):
  """The device mesh (read by hybridna_jax.sharding.mesh_from_config and
  rules_from_config)."""

  SECTION = "mesh"
  # Axis sizes; one may be -1 ("the rest of the devices").
  data: int = 1
  fsdp: int = -1
  # Splits each sequence's length over devices (context parallelism): the
  # SSD passes states, the conv takes a halo and attention passes KV blocks
  # across it. Lengths must divide by it.
  context: int = 1
  tensor: int = 1
  # 0 uses every device, N the first N (single-process debugging and tests).
  num_devices: int = 0
  # (logical_name, mesh_axis | (mesh_axes, ...) | None) pairs that override
  # sharding.DEFAULT_RULES; () keeps the defaults. Their form and names are
  # checked by sharding.rules_from_config.
  rules: tuple[Any, ...] = ()

  def __post_init__(self):
    # Whether the sizes fit the devices is sharding.make_mesh's to say.
    sizes = {name: getattr(self, name) for name in ("data", "fsdp", "context", "tensor")}
    for name, size in sizes.items():
      if size != -1 and not size >= 1:
        raise ValueError(f"config.mesh.{name} must be >= 1, or -1 for the rest; got {size}.")
    if list(sizes.values()).count(-1) > 1:
      raise ValueError(f"config.mesh: at most one axis may be -1, got {sizes}.")
    if self.num_devices < 0:
      raise ValueError(
        f"config.mesh.num_devices must be 0 (all devices) or a count, got {self.num_devices}."
      )


# The typed sections of a job config, by name.
SECTIONS: dict[str, type[Section]] = {
  "mesh": MeshConfig,
  "model": ModelConfig,
  "data": DataConfig,
  "train": TrainConfig,
  "score": ScoreConfig,
  "finetune": FinetuneConfig,
  "generate": GenerateConfig,
}


def base_config() -> ml_collections.ConfigDict:
  """Defaults for every section; config files override what they need."""
  cfg = ml_collections.ConfigDict()
  cfg.model = ModelConfig.config_dict()
  cfg.mesh = MeshConfig.config_dict()
  cfg.data = DataConfig.config_dict()
  cfg.train = TrainConfig.config_dict()
  cfg.score = ScoreConfig.config_dict()
  cfg.finetune = FinetuneConfig.config_dict()
  cfg.generate = GenerateConfig.config_dict()
  return cfg


def validate(config) -> ml_collections.ConfigDict:
  """Checks every section `config` has (a job config: unknown fields are
  errors); raises ConfigError / ValueError with one line naming the field.
  Returns `config`."""
  unknown = sorted(set(config.keys()) - set(SECTIONS))
  if unknown:
    raise ConfigError(
      f"config has unknown sections {unknown}; valid sections: {', '.join(sorted(SECTIONS))}."
    )
  for name, section in SECTIONS.items():
    if name in config:
      section.from_config(config[name])
  return config


def apply_variants(
  cfg: ml_collections.ConfigDict,
  variant: str | None,
  presets: Mapping[str, Mapping[str, Any]],
  source: str = "the config",
) -> ml_collections.ConfigDict:
  """Applies the `:variant` suffix of a config file: comma-separated preset
  names, in order ("configs/finetune_demo.py:rc_echo,frozen").

  Every config file calls this at the end of get_config with its presets:
  {name: {section: {field: value}}} (nested dicts for nested sections),
  e.g. {"quick": {"train": {"eval_every": 10}}}. An unknown name, or a
  preset that names no field, is a ConfigError. `source`: the config
  file's path, for messages. Returns `cfg`.
  """
  where = os.path.basename(source)
  for name in filter(None, (v.strip() for v in (variant or "").split(","))):
    if name not in presets:
      known = ", ".join(sorted(presets)) or "none"
      raise ConfigError(f"unknown variant {name!r} of {where}; known variants: {known}.")
    try:
      set_fields(cfg, presets[name])
    except ConfigError as e:
      raise ConfigError(f"variant {name!r} of {where}: {e}") from None
  return cfg


def load_config(spec: str, *, check: bool = True) -> ml_collections.ConfigDict:
  """Loads "path/to/config.py[:variant]" the way `--config` does, and (with
  `check`) validates it."""
  import importlib.util  # pylint: disable=g-import-not-at-top

  path, _, variant = spec.partition(":")
  # A relative path that names no file from here is read in the checkout
  # holding this package (configs/ sits beside hybridna_jax/), so that
  # benchmarks and tools run from any directory.
  beside_package = os.path.join(os.path.dirname(os.path.dirname(__file__)), path)
  if not os.path.isabs(path) and not os.path.exists(path) and os.path.isfile(beside_package):
    path = beside_package
  module_spec = importlib.util.spec_from_file_location("_hybridna_config", path)
  if module_spec is None or module_spec.loader is None:
    raise FileNotFoundError(f"config file {path!r} not found.")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(variant or None)
  return validate(config) if check else config
