"""Echo vs plain embeddings, side by side: fine-tunes one task once per
embedding mode (and backbone) and prints dev / test scores and training
speed in one table.

  python benchmarks/finetune_modes.py --config=configs/finetune_demo.py \
      --task=data_cache/tasks/species --workdir=runs/bench_finetune \
      --modes=echo,rc_echo,plain_mean,plain_last --backbones=pretrained,fresh

Each (mode, backbone) trains in <workdir>/<backbone>_<mode> (resumable;
finished runs are read back); the table is also written to
<workdir>/modes_table.md with a bar plot, modes_scores.png.
"""

import json
import os
import statistics
import sys
import time
from pathlib import Path

from absl import app, flags, logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import environment  # noqa: E402

from hybridna_jax.config import load_config  # noqa: E402
from hybridna_jax.finetune import (
  report,  # noqa: E402
)
from hybridna_jax.finetune import task as task_lib  # noqa: E402
from hybridna_jax.finetune.metrics import HEADLINE  # noqa: E402
from hybridna_jax.train.metrics import read_metrics  # noqa: E402

flags.DEFINE_string("config", "configs/finetune_demo.py", "Fine-tuning config file.")
flags.DEFINE_string("task", None, "Task folder or BED file (default: the config's).")
flags.DEFINE_string("workdir", "runs/bench_finetune", "Where the runs go.")
flags.DEFINE_list(
  "modes",
  ["echo", "rc_echo", "plain_mean", "plain_last"],
  "Config variants to compare (hybridna_jax/finetune/presets.py), "
  "each optionally with more variants joined by '+', e.g. echo+frozen.",
)
flags.DEFINE_list(
  "backbones",
  ["pretrained", "fresh"],
  "pretrained (the config's finetune.pretrained) and/or fresh (random init).",
)
flags.DEFINE_integer("steps", 0, "Override finetune.steps (0: the config's schedule).")
flags.DEFINE_float("learning_rate", 0.0, "Override train.learning_rate (0: the config's).")
flags.DEFINE_string("pretrained", None, "Override finetune.pretrained.")
FLAGS = flags.FLAGS


def _run(mode: str, backbone: str) -> dict:
  variant = ",".join(mode.split("+") + (["fresh"] if backbone == "fresh" else []))
  config = load_config(f"{FLAGS.config}:{variant}")
  if FLAGS.task:
    config.finetune.task = FLAGS.task
  if FLAGS.steps:
    config.finetune.steps = FLAGS.steps
  if FLAGS.learning_rate:
    config.train.learning_rate = FLAGS.learning_rate
  if FLAGS.pretrained is not None and backbone != "fresh":
    config.finetune.pretrained = FLAGS.pretrained
  workdir = os.path.join(FLAGS.workdir, f"{backbone}_{mode}")
  results_path = os.path.join(workdir, "results.json")
  start = time.perf_counter()
  if os.path.exists(results_path):
    with open(results_path, encoding="utf-8") as f:
      results = json.load(f)
    wall = float("nan")
  else:
    results = task_lib.finetune(config, workdir)["results"]
    wall = time.perf_counter() - start
  train = [
    r
    for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
    if r["kind"] == "train" and "step_time_s" in r
  ]
  step_s = statistics.median(r["step_time_s"] for r in train) if train else float("nan")
  stages = config.train.stages[0]
  return {
    "results": results,
    "mode": mode,
    "backbone": backbone,
    "step_s": step_s,
    "width": stages[0],
    "batch": stages[2],
    "steps": stages[1],
    "wall_s": wall,
  }


def main(argv):
  del argv
  runs = [_run(mode, backbone) for backbone in FLAGS.backbones for mode in FLAGS.modes]
  kind = runs[0]["results"]["kind"]
  headline = HEADLINE[kind]
  extra = "auroc" if kind == "classification" else "spearman"
  lines = [
    environment(),
    f"task: {runs[0]['results']['task']} ({kind}); selected on dev {headline}, reported on test",
    "",
    f"| backbone | embedding | width | steps x batch | dev {headline} | "
    f"test {headline} | test {extra} | s/step | seq/s | wall s |",
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  rows = []
  for r in runs:
    res = r["results"]
    lines.append(
      f"| {r['backbone']} | {res['embedding']} | {r['width']} | {r['steps']} x {r['batch']} "
      f"| {res['dev'][headline]:.4f} | {res['test'][headline]:.4f} | "
      f"{res['test'][extra]:.4f} | {r['step_s']:.3f} | {r['batch'] / r['step_s']:.1f} | "
      f"{r['wall_s']:.0f} |"
    )
    label = f"{r['backbone']}: {res['embedding']}"
    rows.extend(report.result_rows({**res, "task": label}))
  # Every run fits the same baselines on the same splits (finetune/baselines.py).
  for baseline in runs[0]["results"].get("baselines", {}).values():
    lines.append(
      f"| - | baseline: {baseline['name']} | - | - | {baseline['dev'][headline]:.4f} | "
      f"{baseline['test'][headline]:.4f} | {baseline['test'][extra]:.4f} | - | - | - |"
    )
  table = "\n".join(lines) + "\n"
  print(table)
  os.makedirs(FLAGS.workdir, exist_ok=True)
  with open(os.path.join(FLAGS.workdir, "modes_table.md"), "w", encoding="utf-8") as f:
    f.write(table + "\n" + report.metrics_table(rows))
  report.plot_suite(rows, os.path.join(FLAGS.workdir, "modes_scores.png"))
  logging.info("wrote %s", os.path.join(FLAGS.workdir, "modes_table.md"))


if __name__ == "__main__":
  app.run(main)
