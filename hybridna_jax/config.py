"""Configuration: the ml_collections defaults and the typed model config.

Config files under configs/ start from `base_config()` and override fields;
launchers take `--config=configs/<file>.py[:variant]` and command-line
overrides such as `--config.train.steps=100`. The model reads a frozen
`ModelConfig` built from `config.model`, which validates the fields and
derives sizes (d_inner, SSM heads, the layer pattern).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import ml_collections

from hybridna_jax import tokenizer
from hybridna_jax.data.config import default_data_config


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture and numerics of a HybriDNA model (see DESIGN.md section 2)."""
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
  dtype: str = "bfloat16"          # compute dtype
  param_dtype: str = "float32"     # master weights
  remat: str = "none"              # none | full | dots
  ssd_impl: str = "auto"           # auto | chunked | sequential | pallas
  attention_impl: str = "auto"     # auto | xla | xla_blockwise | kernels...
  # Parameter layout, not architecture: True runs the stack as one
  # `nnx.scan` over blocks of attn_period layers (params stacked per
  # position in the block), so compile time stops growing with depth. Only
  # when the layer pattern repeats every attn_period layers; otherwise the
  # stack stays a Python loop. Checkpoints convert between the layouts.
  scan_layers: bool = False

  def __post_init__(self):
    if self.d_inner % self.ssm_head_dim:
      raise ValueError(f"model: expand * d_model ({self.d_inner}) must be a "
                       f"multiple of ssm_head_dim ({self.ssm_head_dim}).")
    if self.ssm_heads % self.ngroups:
      raise ValueError(f"model: SSM heads ({self.ssm_heads}) must be a multiple "
                       f"of ngroups ({self.ngroups}).")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"model: num_heads ({self.num_heads}) must be a multiple "
                       f"of num_kv_heads ({self.num_kv_heads}).")
    if self.remat not in ("none", "full", "dots"):
      raise ValueError(f"model.remat must be none, full or dots, got {self.remat!r}.")
    for i in self.attn_layers or ():
      if not 0 <= i < self.n_layers:
        raise ValueError(f"model.attn_layers: layer {i} outside [0, {self.n_layers}).")

  @classmethod
  def from_config(cls, cfg: Any) -> "ModelConfig":
    """From a ConfigDict (or dict); unknown fields are an error."""
    values = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
      raise ValueError(f"config.model has unknown fields {unknown}; valid "
                       f"fields: {sorted(names)}.")
    for key in ("attn_layers", "a_init_range"):
      if values.get(key) is not None:
        values[key] = tuple(values[key])
    return cls(**values)

  @property
  def d_inner(self) -> int:
    return self.expand * self.d_model

  @property
  def ssm_heads(self) -> int:
    return self.d_inner // self.ssm_head_dim

  @property
  def layer_types(self) -> tuple[str, ...]:
    """"attention" or "mamba" for each layer."""
    if self.attn_layers is not None:
      attn = set(self.attn_layers)
      return tuple("attention" if i in attn else "mamba" for i in range(self.n_layers))
    return tuple("attention" if i % self.attn_period == self.attn_offset else "mamba"
                 for i in range(self.n_layers))

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)


def model_config_dict(**overrides) -> ml_collections.ConfigDict:
  """ConfigDict of ModelConfig defaults with `overrides` applied."""
  values = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
  unknown = set(overrides) - set(values)
  if unknown:
    raise ValueError(f"unknown model fields {sorted(unknown)}")
  values.update(overrides)
  # ConfigDict fields must keep a type; None-able tuples are stored as lists.
  values["a_init_range"] = list(values["a_init_range"])
  cfg = ml_collections.ConfigDict(values)
  if values["attn_layers"] is None:
    cfg.attn_layers = ml_collections.FieldReference(None, field_type=tuple)
  return cfg


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads "path/to/config.py[:variant]" the way `--config` does."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path, _, variant = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_hybridna_config", path)
  if module_spec is None or module_spec.loader is None:
    raise FileNotFoundError(f"config file {path!r} not found.")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant or None)


def base_config() -> ml_collections.ConfigDict:
  """Defaults for every section; config files override what they need."""
  cfg = ml_collections.ConfigDict()
  cfg.model = model_config_dict()
  # Device mesh; one axis may be -1 ("the rest of the devices"). num_devices:
  # 0 uses every device, N the first N (single-process debugging and tests).
  cfg.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, num_devices=0))
  cfg.data = default_data_config()
  cfg.train = train_config()
  cfg.score = score_config()
  cfg.finetune = finetune_config()
  cfg.generate = generate_config()
  return cfg


def train_config() -> ml_collections.ConfigDict:
  """Pretraining schedule, optimiser, evaluation and checkpointing."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Context stages, run in order: (sequence length, optimizer steps, global
  # batch size). The paper: most steps at 8k, then short stages at 32k and
  # 131k with fewer sequences per batch (constant tokens per step).
  c.stages = ((8192, 10_000, 64), (32_768, 500, 16), (131_072, 100, 4))
  # Micro-batches per step (gradient accumulation); divides each batch.
  c.grad_accum = 1
  # AdamW with linear warmup and cosine decay to learning_rate * min_lr_ratio.
  c.learning_rate = 8e-4
  c.warmup_steps = 1000
  c.min_lr_ratio = 0.1
  c.b1 = 0.9
  c.b2 = 0.95
  c.eps = 1e-8
  c.weight_decay = 0.1      # not applied to norms, biases, A_log, dt_bias, D
  c.grad_clip = 1.0         # global-norm clipping; 0 disables
  # Steps with a non-finite loss or gradient are skipped; this many in a
  # row stop the run (after a checkpoint).
  c.max_consecutive_skips = 20
  c.log_every = 50
  # Validation on the held-out split every eval_every steps (0: never), over
  # at most eval_batches batches per host (0: the whole split), at
  # eval_seq_len (0: the current stage's length).
  c.eval_every = 1000
  c.eval_batches = 0
  c.eval_batch_size = 8
  c.eval_seq_len = 0
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.keep_best = True        # also keep the best-validation parameters in <workdir>/best
  c.async_checkpoints = True
  # Peak FLOP/s per device for MFU; 0 looks it up from the device kind.
  c.peak_flops_per_device = 0.0
  c.plot = True
  # The demo's report: validation bits/nt of order-k Markov baselines
  # fitted on the training split (empty: none).
  c.markov_orders = ()
  return c


def finetune_config() -> ml_collections.ConfigDict:
  """Understanding fine-tuning (launch/finetune.py, hybridna_jax.finetune).

  The schedule comes from here, not from train.stages: one stage of
  (padded echo length, steps, batch_size), which the task writes back into
  train.stages; the optimiser, evaluation and checkpoint fields of `train`
  apply as in pretraining.
  """
  c = ml_collections.ConfigDict()
  # The task: a GUE folder (train/dev/test.csv), a Nucleotide Transformer
  # folder (train/test .fna with ">name|label" headers, or .csv), or a
  # BEND-style BED file (chromosome, start, end, [strand,] split, label).
  c.task = ""
  c.format = "auto"           # auto | gue | nt | bed
  c.reference = ""            # reference FASTA of a BED task
  # Tasks without a dev split (NT, some BED files): this fraction of train,
  # stratified by class and seeded, becomes dev (model selection).
  c.dev_fraction = 0.1
  c.split_seed = 0
  c.kind = "auto"             # auto | classification | regression
  # Backbone: a pretraining run directory, its checkpoints/ or best/, or a
  # step directory; empty = a freshly initialised model. Its architecture
  # replaces config.model (the numerics fields dtype, remat, ssd_impl and
  # attention_impl stay as configured here).
  c.pretrained = ""
  c.pretrained_which = "latest"   # latest | best, for a run directory
  c.freeze_backbone = False   # True: train the head only
  # Embedding: echo = sequence <sep> sequence, pooled over the second copy;
  # False = the plain baselines, pooled over the sequence.
  c.echo = True
  c.pool = "mean"             # mean | last
  # Reverse-complement strand: none | average_logits | concat_features.
  c.rc_combine = "none"
  c.head_hidden = 0           # 0: a linear head; N: one hidden layer of N (GELU)
  # Class-weighted loss: none | balanced (weights n / (classes * n_c)).
  c.class_weights = "none"
  # Reverse-complement a training example with this probability.
  c.rc_augment = 0.0
  # Nucleotides per sequence; 0 = the longest in the task. Longer sequences
  # are cropped around their centre.
  c.max_length = 0
  c.pad_multiple = 64         # padded input length is a multiple of this
  # Schedule: `steps` optimizer steps, or (steps = 0) `epochs` passes over
  # the training split, at `batch_size` sequences per step (global).
  c.steps = 0
  c.epochs = 3.0
  c.batch_size = 32
  c.eval_batch_size = 64
  # Dev evaluation (model selection) and checkpoints every this many epochs;
  # 0 keeps train.eval_every / train.checkpoint_every (steps).
  c.eval_every_epochs = 0.5
  # Learning-rate warmup as a fraction of the steps (0 keeps
  # train.warmup_steps).
  c.warmup_fraction = 0.1
  return c


def generate_config() -> ml_collections.ConfigDict:
  """Sequence design: generative fine-tuning data and sampling settings
  (hybridna_jax/design/, hybridna_jax/generate.py, launch/generate.py)."""
  c = ml_collections.ConfigDict()
  # --- Generative fine-tuning (launch/generate.py --mode=finetune) --------
  # CSVs with a `sequence` column and the label column(s); val_csv is
  # needed when train.eval_every > 0.
  c.train_csv = ""
  c.val_csv = ""
  # One condition per column, each with its own block of task tokens.
  c.label_columns = ("label",)
  # "categorical": a token per distinct label; "bins": numeric activities
  # cut into num_bins quantile bins of the training set, a token per bin.
  c.label_kind = "categorical"
  c.num_bins = 5
  # Index (tokenizer.task_token) of the first task token used for labels.
  c.first_task_token = 0
  # The label -> token mapping; empty: derived from train_csv at the start
  # of a run and stored here, so the run's config.json keeps it.
  c.prompt_vocab = ()
  # Share of training examples shown without label tokens, so the model can
  # also generate unconditionally (prompt: <bos> alone).
  c.label_dropout = 0.0
  # Probability of training on the reverse complement (for elements whose
  # activity does not depend on orientation, e.g. enhancers).
  c.reverse_complement_prob = 0.0
  # Leave N targets out of the loss.
  c.mask_n_in_loss = True
  # Start from a pretrained LM: a run directory, checkpoints/ or best/
  # directory, or step directory ("": random initialisation).
  c.pretrained = ""
  c.pretrained_which = "latest"     # latest | best, for a run directory

  # --- Sampling (launch/generate.py --mode=sample) ------------------------
  c.num_samples = 100               # per prompt
  c.batch_size = 50
  c.max_new_tokens = 200            # the length, or the cap with stop_at_eos
  c.stop_at_eos = False
  c.min_new_tokens = 0
  c.temperature = 1.0               # 0: greedy
  c.top_k = 0                       # 0: off
  c.top_p = 1.0                     # 1.0: off
  c.allow_n = False
  c.beam_width = 1                  # > 1: beam search (the paper's designs)
  c.length_penalty = 1.0            # beam scores: log-prob / length ** this
  c.seed = 0
  # Summary: k of the k-mer spectra, and at most this many pairs for the
  # mean pairwise edit distance.
  c.kmer = 6
  c.max_edit_pairs = 20_000
  return c


def score_config() -> ml_collections.ConfigDict:
  """Scoring, evaluation and variant effects (hybridna_jax.scoring,
  launch/eval.py, launch/score.py)."""
  c = ml_collections.ConfigDict()
  # Window length in tokens (0: the trained context, the last stage's
  # seq_len). Longer inputs are scored in windows `stride` apart; each window
  # scores only positions no earlier window scored, so every position is
  # scored once with at least context - stride tokens before it (except
  # near the start of a sequence). stride 0: context // 2.
  c.context = 0
  c.stride = 0
  # Rows per device call; inputs are padded to this many rows and to one of
  # a few power-of-two lengths (from min_bucket up to the context), so new
  # inputs reuse compiled programs.
  c.batch_size = 8
  c.min_bucket = 128
  # Prepend <bos> (only for models trained with it; pretraining windows
  # start mid-genome without one, so the first nucleotide is not scored).
  c.add_bos = False
  # Average every score over both strands (sequence and reverse complement).
  c.rc_average = False
  # Parameter/compute dtype and kernels of the restored model ("": as
  # trained). On CPU, attention_impl="xla_blockwise" scores long contexts in
  # O(l * block) memory (the dense XLA reference holds l x l scores).
  c.dtype = ""
  c.attention_impl = ""
  c.ssd_impl = ""
  # Embeddings: "mean" (over nucleotides), "last" (last nucleotide) or
  # "echo" (sequence, <sep>, sequence; mean over the second copy); layer -1
  # is the final-norm output, 0 the token embeddings, i the output of layer i.
  c.pooling = "mean"
  c.layer = -1
  # Variant effects: ref/alt windows of this many nucleotides centred on each
  # variant (capped at the context); longer REF/ALT alleles are skipped.
  c.variant_window = 8192
  c.max_indel_length = 64
  # Evaluation (launch/eval.py) on the token store: split, at most this
  # many records (0: all) and this many leading tokens of each (0: all).
  c.eval_split = "val"
  c.eval_max_records = 0
  c.eval_max_tokens = 0
  return c
