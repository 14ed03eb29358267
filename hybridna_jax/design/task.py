"""Prompt-token generative fine-tuning (regLM-style).

The model learns next-token prediction on the sequence and its <eos> only
(the label tokens are given, never predicted). Generation then starts from
<bos> + the label tokens of the wanted condition(s) (+ an optional DNA
prefix), see `hybridna_jax.generate` and `hybridna_jax.design.sampling`.

`GenerativeFinetuning` is a `train.tasks.Task`: the same jitted train step,
checkpoints, preemption handling and metrics as pretraining, fed by a
Grain stream over the labelled examples (global batch t a pure function of
the seed and t, as pretraining's), optionally starting from a pretrained LM
(`generate.pretrained`).
"""

from __future__ import annotations

import functools

from absl import logging

from hybridna_jax import restore
from hybridna_jax import tokenizer as tok
from hybridna_jax.config import ModelConfig, architecture_differences
from hybridna_jax.design.data import (
  eval_batches,
  load_design_csv,
  resolve_vocab,
  tokenize,
  train_batches,
)
from hybridna_jax.design.prompts import PromptVocab
from hybridna_jax.model import HybriDNA
from hybridna_jax.train import flops as flops_lib
from hybridna_jax.train import loop
from hybridna_jax.train import step as step_lib
from hybridna_jax.train.resume import resumed_config
from hybridna_jax.train.tasks import Task, examples_digest, lm_eval

# How a model gets rows for the label tokens (ids from 10 up).
_LABEL_TOKENS_NEED = (
  f"Label tokens need vocab_size {tok.VOCAB_SIZE}: convert a Hugging Face checkpoint with "
  f"launch/convert.py --vocab_size={tok.VOCAB_SIZE}."
)


class GenerativeFinetuning(Task):
  """Prompt-token generative fine-tuning (module docstring).

  Validation (when config.generate.val_csv is set): bits per nucleotide of
  the sequences (and <eos>) given their true labels, and `label_gain_bits`
  -- how many bits per nucleotide worse the same sequences score under
  another label -- a direct measure of how much the model uses the prompt.
  """

  selection = ("bits_per_nt", "min")
  example_fields = ("generate.train_csv", "generate.label_columns")
  # Laid out like pretraining's batches: each process loads its rows, and of
  # them its columns where the context axis spans processes.
  sequence_keys = step_lib.LM_BATCH_KEYS

  def __init__(self, config):
    super().__init__(config)
    g = config.generate
    if not g.train_csv:
      raise ValueError(
        "config.generate.train_csv is empty; give a CSV of sequence + label "
        "columns (see configs/design_demo.py)."
      )
    self.model_cfg = ModelConfig.from_config(config.model)
    self.train_rows = load_design_csv(g.train_csv, g.label_columns)
    self.vocab = resolve_vocab(config, self.train_rows)
    last_token = max(c.first_token + len(c.values) - 1 for c in self.vocab.conditions)
    if last_token >= self.model_cfg.vocab_size:
      raise ValueError(
        f"config.model.vocab_size={self.model_cfg.vocab_size} has no rows for the label "
        f"tokens (ids up to {last_token}). {_LABEL_TOKENS_NEED}"
      )
    self.train_examples = tokenize(self.train_rows, self.vocab)
    self.val_examples = None
    if g.val_csv:
      self.val_examples = tokenize(load_design_csv(g.val_csv, g.label_columns), self.vocab)
    elif int(config.train.eval_every):
      raise ValueError(
        "config.train.eval_every > 0 but config.generate.val_csv is empty; "
        "give a validation CSV or set config.train.eval_every=0."
      )
    # Validation rows too: a longer one would be cut, and its bits/nt
    # measured on a prefix without its <eos>.
    longest, which = max(
      (s.size, name)
      for name, examples in (("training", self.train_examples), ("validation", self.val_examples))
      if examples is not None
      for s in examples.sequences
    )
    needed = longest + len(self.vocab.conditions) + 2
    for stage in self.stages():
      if stage.seq_len + 1 < needed:
        raise ValueError(
          f"config.train.stages[{stage.index}] seq_len {stage.seq_len} is too "
          f"short: the longest {which} example needs {needed - 1} "
          f"(<bos> + {len(self.vocab.conditions)} label token(s) + {longest} nt "
          "+ <eos>, minus one for the shift)."
        )
    self.mask_n = bool(g.mask_n_in_loss)
    # Checked now, before anything compiles: the pretrained run must have
    # this architecture.
    self.pretrained = self._check_pretrained(str(g.pretrained)) if g.pretrained else None

  def _check_pretrained(self, path: str) -> restore.CheckpointRef:
    ref = restore.find_checkpoint(path, str(self.config.generate.pretrained_which))
    pretrained_cfg = ModelConfig.from_config(restore.run_config(ref.run_dir).model)
    # Every architecture field (config.MODEL_ARCHITECTURE_FIELDS) must match;
    # runtime fields (numerics, kernels) may differ.
    diff = architecture_differences(pretrained_cfg, self.model_cfg)
    if diff:
      hint = (
        f" {_LABEL_TOKENS_NEED}"
        if "vocab_size" in diff and pretrained_cfg.vocab_size < tok.VOCAB_SIZE
        else ""
      )
      raise ValueError(
        f"config.generate.pretrained={path}: its model differs from "
        f"config.model in {diff} (pretrained, this config); use the "
        f"pretraining run's model settings.{hint}"
      )
    return ref

  def init_model(self, rngs):
    return HybriDNA(self.model_cfg, rngs=rngs)

  def loss(self, model, batch):
    return step_lib.lm_loss(model, batch)

  def layout_iterator(self, stage, layout, seed, start_batch):
    g = self.config.generate
    return train_batches(
      self.train_examples,
      seq_len=stage.seq_len,
      batch_size=stage.batch_size,
      seed=seed,
      rc_prob=float(g.reverse_complement_prob),
      label_dropout=float(g.label_dropout),
      mask_n_in_loss=self.mask_n,
      rows=layout.rows,
      columns=layout.columns,
      start_batch=start_batch,
    )

  def evaluate(self, fns, params, stage):
    def run(wrong_labels: bool):
      return lm_eval(
        fns,
        params,
        self.config.train,
        stage,
        functools.partial(
          eval_batches,
          self.val_examples,
          wrong_labels=wrong_labels,
          vocab=self.vocab,
          mask_n_in_loss=self.mask_n,
        ),
      )

    metrics = run(False)
    if max(len(c.values) for c in self.vocab.conditions) > 1:
      wrong = run(True)
      metrics["bits_per_nt_wrong_label"] = wrong["bits_per_nt"]
      metrics["label_gain_bits"] = wrong["bits_per_nt"] - metrics["bits_per_nt"]
    return metrics

  def start(self, fns, state):
    """Loads the pretrained LM's parameters (fresh runs only; a resumed run
    restores its own checkpoint instead)."""
    if self.pretrained is None:
      return state
    ref = self.pretrained
    params = restore.restore_params(ref, self.model_cfg, fns.mesh)
    logging.info("loaded pretrained parameters from %s step %d", ref.manager_dir, ref.step)
    return state._replace(params=params)

  def finish(self, fns, state, workdir):
    return {"prompt_vocab": [c.to_dict() for c in self.vocab.conditions]}

  def flops_per_token(self, seq_len: int) -> float:
    return flops_lib.train_flops_per_token(self.model_cfg, seq_len)

  def examples_digest(self) -> str:
    """Of the training rows: sequences and each label column."""
    rows = self.train_rows
    return examples_digest({f"train:{c}": (rows.sequences, rows.labels[c]) for c in rows.columns})

  def describe(self) -> str:
    conditions = ", ".join(
      f"{c.column} ({c.kind}: {len(c.values)} tokens from {tok.token_name(c.first_token)})"
      for c in self.vocab.conditions
    )
    return (
      f"generative fine-tuning on {len(self.train_examples):,} sequences of "
      f"{self.train_rows.path}; conditions {conditions}"
    )


def finetune(config, workdir: str) -> dict:
  """Runs (or resumes) generative fine-tuning in `workdir`; returns the
  training summary. A resumed run keeps the label -> token map it was
  trained with (its config.json), whatever the CSV holds now."""
  saved = ((resumed_config(workdir) or {}).get("generate") or {}).get("prompt_vocab")
  if saved:
    saved = PromptVocab.from_config(saved).to_config()
    given = config.generate.prompt_vocab
    if given and PromptVocab.from_config(given).to_config() != saved:
      raise ValueError(
        f"config.generate.prompt_vocab differs from the one {workdir} was trained with "
        "(its config.json); resume without setting it, or start another --workdir."
      )
    with config.unlocked():
      config.generate.prompt_vocab = saved
  return loop.train(config, workdir, task=GenerativeFinetuning(config))
