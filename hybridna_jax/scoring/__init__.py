"""Scoring trained models: jitted likelihoods, embeddings, evaluation and
zero-shot variant effects.

    scorer      `Scorer`: bucketed, batched, windowed, RC-averaged scoring
    outputs     scores -> TSV / NPZ files (what `launch/score.py` writes)
    evaluation  bits/nt, perplexity and accuracy over FASTA or a store split
    variants    VCF/CSV variants -> ref/alt windows -> log-likelihood ratios

`Scorer` and its result types are re-exported here:
`from hybridna_jax.scoring import Scorer`.
"""

from hybridna_jax.scoring.scorer import (
  POOLINGS,
  LogLikelihood,
  PositionScores,
  Progress,
  ProgressLogger,
  ScoreConfig,
  Scorer,
  TokenStats,
  Window,
  as_tokens,
  bucket_lengths,
  plan_windows,
)

__all__ = [
  "POOLINGS",
  "LogLikelihood",
  "PositionScores",
  "Progress",
  "ProgressLogger",
  "Scorer",
  "ScoreConfig",
  "TokenStats",
  "Window",
  "as_tokens",
  "bucket_lengths",
  "plan_windows",
]
