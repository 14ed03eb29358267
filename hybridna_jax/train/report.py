"""End-of-run report: validation bits per nucleotide of the trained model
next to order-k Markov baselines fitted on the training split and scored on
the same windows and targets."""

from __future__ import annotations

import numpy as np
from absl import logging

from hybridna_jax import paths, sharding
from hybridna_jax.data import pipeline
from hybridna_jax.data.store import TokenStore
from hybridna_jax.train.baselines import MarkovModel
from hybridna_jax.train.metrics import LOSS_PLOT, METRICS_FILE, plot_loss_curves
from hybridna_jax.train.stages import parse_stages
from hybridna_jax.train.tasks import eval_global_batch


def markov_bits_per_nt(model: MarkovModel, batches) -> tuple[float, int]:
  """Bits per nucleotide of a Markov model on exactly the LM's evaluation
  targets: each row's window is its only context, and the loss mask picks
  the scored targets. Returns (bits/nt, scored targets)."""
  total, count = 0.0, 0
  for batch in batches:
    windows = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)
    # Packed windows (data.eval_packing): the LM's context stops at each
    # document start, and so does the baseline's.
    segments = np.concatenate([batch["segment_ids"], batch["segment_ids"][:, -1:]], axis=1)
    starts = np.concatenate(
      [np.ones_like(segments[:, :1], bool), segments[:, 1:] != segments[:, :-1]], axis=1
    )
    for window, doc_starts, mask in zip(windows, starts, batch["loss_mask"]):
      if not mask.any():
        continue
      log2p, _ = model.log2_probs(window, doc_starts)
      total -= float(log2p[1:][mask > 0].sum())
      count += int((mask > 0).sum())
  return total / max(count, 1), count


def baseline_report(config, model_val: dict, workdir: str) -> str:
  """Fits the Markov baselines on the training split, scores them on the
  windows the model was evaluated on, writes <workdir>/baseline_report.json,
  adds them to the loss-curve plot, and returns a printable table."""
  store = TokenStore.open(config.data.store_dir)
  train_split, val_split = store[config.data.train_split], store["val"]
  stages = parse_stages(config.train)
  seq_len = int(config.train.eval_seq_len) or stages[-1].seq_len
  # The model's evaluation batches (`tasks.lm_eval`), so that eval_batches
  # keeps the same windows.
  batch_size = eval_global_batch(config.train, sharding.mesh_from_config(config.mesh))
  batches = list(pipeline.eval_batches(config.data, seq_len=seq_len, batch_size=batch_size))
  if int(config.train.eval_batches):
    batches = batches[: int(config.train.eval_batches)]
  rows = [("HybriDNA (this run)", model_val["bits_per_nt"])]
  for order in config.train.markov_orders:
    logging.info(
      "fitting an order-%d Markov baseline on %d training records", order, len(train_split)
    )
    model = MarkovModel(int(order)).fit(r.tokens for r in train_split)
    bits, scored = markov_bits_per_nt(model, batches)
    if model_val.get("tokens") is not None and scored != int(model_val["tokens"]):
      raise RuntimeError(f"baseline scored {scored} targets, the model {model_val['tokens']}.")
    rows.append((f"Markov order {order}", bits))
  val_sources = sorted({r.source for r in val_split})
  report = {
    "val_sources": val_sources,
    "eval_seq_len": seq_len,
    "scored_targets": model_val.get("tokens"),
    "bits_per_nt": dict(rows),
  }
  paths.write_json(paths.join(workdir, "baseline_report.json"), report)
  metrics = paths.join(workdir, METRICS_FILE)
  if metrics.exists():
    plot_loss_curves(
      metrics,
      paths.join(workdir, LOSS_PLOT),
      stage_starts=[(s.start_step, f"{s.seq_len:,} nt") for s in stages],
      baselines={name: v for name, v in rows[1:]},
    )
  uniform = "(uniform over A/C/G/T)"
  width = max(len(name) for name, _ in [*rows, (uniform, 0)])
  lines = [
    f"Validation bits per nucleotide on held-out genomes ({', '.join(val_sources)}), "
    f"{int(model_val.get('tokens', 0)):,} targets in {seq_len:,}-nt windows:",
    f"{'model':<{width}}  bits/nt",
    f"{'-' * width}  -------",
  ]
  lines += [f"{name:<{width}}  {value:.4f}" for name, value in rows]
  lines.append(f"{uniform:<{width}}  2.0000")
  return "\n".join(lines)
