"""Files written by launch/score.py: log-likelihood TSVs, per-position NPZ /
bedGraph tracks and plots, embedding NPZs; readers for
the NPZs; and `score_sequences_to_files`, the body of its sequence modes
(variants: hybridna_jax.scoring.callsets).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from hybridna_jax import paths, plotting
from hybridna_jax.scoring import evaluation
from hybridna_jax.scoring.scorer import LogLikelihood, PositionScores, Progress, Scorer

LN2 = math.log(2.0)
LOGLIK_COLUMNS = ("name", "length", "scored", "loglik_sum", "loglik_mean", "bits_per_nt")


def write_loglik(
  path: str, names: Sequence[str], lengths: Sequence[int], ll: LogLikelihood
) -> None:
  """TSV: one row per sequence; log-likelihoods in nats, bits/nt = -mean / ln 2,
  and the scored positions exactly (a strand mean with rc_average may end in .5)."""
  with paths.replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
    f.write("\t".join(LOGLIK_COLUMNS) + "\n")
    for name, length, total, mean, count in zip(names, lengths, ll.total, ll.mean, ll.count):
      total = total + 0.0  # -0.0 (nothing scored) prints as 0.000000
      f.write(f"{name}\t{length}\t{_exact(count)}\t{total:.6f}\t{mean:.6f}\t{-mean / LN2:.6f}\n")


def _exact(x: float) -> str:
  """A count without rounding or exponent: 1234567, 699.5."""
  x = float(x)
  return str(int(x)) if x.is_integer() else repr(x)


def write_positions(path: str, names: Sequence[str], scores: Sequence[PositionScores]) -> None:
  """NPZ with `names` and, for record i, `log_probs_<i>` and `entropy_<i>`
  (float32, one value per base, NaN where not scored); see `read_positions`."""
  arrays = {"names": np.asarray(names, dtype=str)}
  for i, s in enumerate(scores):
    arrays[f"log_probs_{i}"] = s.log_probs
    arrays[f"entropy_{i}"] = s.entropy
  with paths.replacing(path) as tmp, open(tmp, "wb") as f:
    np.savez_compressed(f, **arrays)


def read_positions(path: str) -> list[tuple[str, PositionScores]]:
  """(name, scores) of every record of a `write_positions` file, in its
  order (a list: records of several FASTA files may share a name)."""
  with np.load(path) as data:
    return [
      (str(name), PositionScores(data[f"log_probs_{i}"], data[f"entropy_{i}"]))
      for i, name in enumerate(data["names"])
    ]


def write_bedgraph(path: str, names: Sequence[str], scores: Sequence[PositionScores]) -> None:
  """bedGraph of per-base log-probabilities (0-based starts; runs of equal
  values merged; unscored bases left out), one track for all records."""
  with paths.replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
    f.write('track type=bedGraph name="HybriDNA log p" description="log p(x_i | x_<i), nats"\n')
    for name, s in zip(names, scores):
      if not len(s.log_probs):
        continue
      values = np.round(s.log_probs.astype(np.float64), 4)
      finite = np.isfinite(values)
      # Run boundaries: a change of value or of scored / unscored.
      change = np.flatnonzero((values[1:] != values[:-1]) | (finite[1:] != finite[:-1])) + 1
      starts = np.concatenate([[0], change])
      ends = np.concatenate([change, [len(values)]])
      keep = finite[starts]
      f.writelines(
        f"{name}\t{a}\t{b}\t{v:g}\n"
        for a, b, v in zip(starts[keep], ends[keep], values[starts[keep]])
      )


def plot_positions(
  path: str, names: Sequence[str], scores: Sequence[PositionScores], max_records: int = 4
) -> str:
  """Per-position log-probability and entropy along the first records
  (raw and smoothed over ~1% of the length)."""
  plt = plotting.pyplot()
  shown = list(zip(names, scores))[:max_records]
  fig, axes = plt.subplots(len(shown), 1, figsize=(10, 2.6 * len(shown)), squeeze=False)
  for ax, (name, s) in zip(axes[:, 0], shown):
    x = np.arange(len(s.log_probs))
    bits = -s.log_probs / LN2
    ax.plot(x, bits, lw=0.3, alpha=0.35, color="tab:blue", label="-log2 p (bits)")
    ax.plot(x, _smooth(bits), lw=1.2, color="tab:blue", label="smoothed")
    ax.plot(x, _smooth(s.entropy / LN2), lw=1.2, color="tab:orange", label="entropy (bits)")
    ax.set_title(name, fontsize=9)
    ax.set_ylabel("bits")
    ax.legend(fontsize=7, loc="upper right")
  axes[-1, 0].set_xlabel("position")
  return plotting.save(fig, path, dpi=110)


def _smooth(values: np.ndarray) -> np.ndarray:
  """Moving average ignoring NaN, over ~1% of the length (at least 1)."""
  if not len(values):
    return values
  width = max(1, len(values) // 100)
  valid = np.isfinite(values)
  kernel = np.ones(width)
  total = np.convolve(np.where(valid, values, 0.0), kernel, mode="same")
  count = np.convolve(valid.astype(float), kernel, mode="same")
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def write_embeddings(
  path: str,
  names: Sequence[str],
  embeddings: np.ndarray,
  *,
  pooling: str,
  layer: int,
  rc_average: bool,
) -> None:
  """NPZ: `names` (n,), `embeddings` (n, d) float32, and the settings."""
  with paths.replacing(path) as tmp, open(tmp, "wb") as f:
    np.savez(
      f,
      names=np.asarray(names, dtype=str),
      embeddings=embeddings,
      pooling=np.asarray(pooling),
      layer=np.asarray(layer),
      rc_average=np.asarray(rc_average),
    )


def score_sequences_to_files(
  mode: str,
  scorer: Scorer,
  names: Sequence[str],
  sequences: Sequence[np.ndarray],
  output: str,
  *,
  rc_average: bool = False,
  pooling: str = "mean",
  layer: int = -1,
  bedgraph: bool = False,
  progress: Progress | None = None,
) -> list[str]:
  """Runs mode "loglik" (TSV), "positions" (NPZ, plot, optional bedGraph)
  or "embed" (NPZ) and writes the results (`output_files`); returns the
  paths written."""
  files = output_files(mode, output, bedgraph=bedgraph)
  evaluation.warn_repeated_names(names)
  if mode in ("loglik", "positions"):
    evaluation.warn_unscorable(
      names, sequences, add_bos=scorer.settings.add_bos, rc_average=rc_average
    )
  if mode == "loglik":
    ll = scorer.log_likelihood(sequences, rc_average=rc_average, progress=progress)
    write_loglik(files[0], names, [len(t) for t in sequences], ll)
    return files
  if mode == "positions":
    positions = scorer.position_scores(sequences, rc_average=rc_average, progress=progress)
    write_positions(files[0], names, positions)
    plot_positions(files[1], names, positions)
    if bedgraph:
      write_bedgraph(files[2], names, positions)
    return files
  embeddings = scorer.embed(
    sequences, pooling=pooling, layer=layer, rc_average=rc_average, progress=progress
  )
  write_embeddings(files[0], names, embeddings, pooling=pooling, layer=layer, rc_average=rc_average)
  return files


def output_files(mode: str, output: str, *, bedgraph: bool = False) -> list[str]:
  """The files that `score_sequences_to_files` writes for `mode` at `output`:
  loglik [TSV]; positions [NPZ, plot, bedGraph if asked]; embed [NPZ]."""
  npz = output if output.endswith(".npz") else output + ".npz"
  stem = npz.removesuffix(".npz")  # pos.v1 and pos.v2 keep apart (not splitext)
  if mode == "loglik":
    return [output]
  if mode == "positions":
    return [npz, stem + ".png"] + ([stem + ".bedgraph"] if bedgraph else [])
  if mode == "embed":
    return [npz]
  raise ValueError(f"unknown mode {mode!r}; expected loglik, positions or embed.")
