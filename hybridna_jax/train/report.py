"""End-of-run report: validation bits per nucleotide of the trained model
next to order-k Markov baselines fitted on the training split."""

from __future__ import annotations

import json
import os

from absl import logging

from hybridna_jax.baselines import MarkovModel
from hybridna_jax.data.store import TokenStore
from hybridna_jax.train.loop import parse_stages
from hybridna_jax.train.metrics import plot_loss_curves


def baseline_report(config, model_val: dict, workdir: str) -> str:
  """Fits the Markov baselines, writes <workdir>/baseline_report.json, adds
  them to the loss-curve plot, and returns a printable table."""
  store = TokenStore.open(config.data.store_dir)
  train_split, val_split = store[config.data.train_split], store["val"]
  rows = [("HybriDNA (this run)", model_val["bits_per_nt"])]
  for order in config.train.markov_orders:
    logging.info("fitting an order-%d Markov baseline on %d training records", order,
                 len(train_split))
    model = MarkovModel(int(order)).fit(r.tokens for r in train_split)
    rows.append((f"Markov order {order}",
                 model.bits_per_nucleotide(r.tokens for r in val_split)))
  val_sources = sorted({r.source for r in val_split})
  report = {"val_sources": val_sources, "val_tokens": model_val.get("tokens"),
            "bits_per_nt": dict(rows)}
  with open(os.path.join(workdir, "baseline_report.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2)
  metrics = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(metrics):
    stages = parse_stages(config.train)
    plot_loss_curves(metrics, os.path.join(workdir, "loss_curves.png"),
                     stage_starts=[(s.start_step, f"{s.seq_len:,} nt") for s in stages],
                     baselines={name: v for name, v in rows[1:]})
  width = max(len(name) for name, _ in rows)
  lines = [f"Validation bits per nucleotide on held-out genomes: {', '.join(val_sources)}",
           f"{'model':<{width}}  bits/nt", f"{'-' * width}  -------"]
  lines += [f"{name:<{width}}  {value:.4f}" for name, value in rows]
  lines.append(f"{'(uniform over A/C/G/T)':<{width}}  2.0000")
  return "\n".join(lines)
