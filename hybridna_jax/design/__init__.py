"""Sequence design: prompt tokens, labelled data, generative fine-tuning,
cached sampling of designs and their metrics.

regLM-style conditioning: every training example is
`<bos> <label token per condition> sequence <eos>`; sampling starts from
`<bos>` + the label tokens of the wanted condition(s).

    prompts   labels -> reserved task tokens (`PromptVocab`)
    data      design CSV -> tokenized examples -> Grain batches
    task      `GenerativeFinetuning`, a `train.tasks.Task`
    sampling  designs from a checkpoint: FASTA + summary (`run_sampling`)
    metrics   GC, k-mer distance, diversity, copies of training sequences
    oracle    judging designs: a k-mer classifier fitted on held-out real
              sequences, against real and dinucleotide-shuffled controls
"""

from hybridna_jax.design.data import (
  DesignData,
  Examples,
  eval_batches,
  example_row,
  lm_batch,
  load_design_csv,
  resolve_vocab,
  sequences_by_label,
  tokenize,
  train_batches,
)
from hybridna_jax.design.prompts import BINS, CATEGORICAL, Condition, PromptVocab, iter_label_sets
from hybridna_jax.design.task import GenerativeFinetuning, finetune

__all__ = [
  "DesignData",
  "Examples",
  "eval_batches",
  "example_row",
  "lm_batch",
  "load_design_csv",
  "resolve_vocab",
  "sequences_by_label",
  "tokenize",
  "train_batches",
  "BINS",
  "CATEGORICAL",
  "Condition",
  "PromptVocab",
  "iter_label_sets",
  "GenerativeFinetuning",
  "finetune",
]
