"""Fine-tuning results as JSON, markdown tables and plots.

Per run (<workdir>): results.json (selected step, dev and test metrics, data
summary, settings, the baselines' metrics and whether the model beats them),
results.md (that verdict and a table), baselines.png (test headline of the
model and the baselines), test_predictions.csv and finetune_curves.png
(train loss and the dev headline metric against step). Per suite:
suite_results.json, suite_table.md (verdicts and a table) and
suite_scores.png (the headline metric of every task, dev and test, and the
baselines on test).
"""

from __future__ import annotations

import csv
import math
import os

import numpy as np

from hybridna_jax import paths as paths_lib
from hybridna_jax import plotting
from hybridna_jax.finetune.metrics import HEADLINE
from hybridna_jax.train.metrics import read_metrics

CLASSIFICATION_COLUMNS = ("mcc", "f1", "f1_macro", "accuracy", "auroc", "auprc")
REGRESSION_COLUMNS = ("pearson", "spearman", "r2", "mse")


def _fmt(value) -> str:
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return "-"
  return f"{value:.4f}" if isinstance(value, float) else str(value)


def metrics_table(rows: list[dict]) -> str:
  """Markdown table of result rows: {"task", "kind", "embedding", "split",
  metric: value, ...}; metric columns follow the kinds present."""
  kinds = {r["kind"] for r in rows}
  columns = [
    c
    for kind, cols in (
      ("classification", CLASSIFICATION_COLUMNS),
      ("regression", REGRESSION_COLUMNS),
    )
    if kind in kinds
    for c in cols
  ]
  header = ["task", "embedding", "split", "n", *columns]
  lines = [
    "| " + " | ".join(header) + " |",
    "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|",
  ]
  for r in rows:
    cells = [r["task"], r.get("embedding", ""), r["split"], str(r.get("examples", ""))]
    cells += [_fmt(r.get(c)) for c in columns]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def result_rows(results: dict) -> list[dict]:
  """The model's dev and test rows of one run's results.json, then one test
  row per baseline ("system": "model" or the baseline's key)."""
  rows = [
    {
      "task": results["task"],
      "kind": results["kind"],
      "system": "model",
      "embedding": results["embedding"],
      "split": split,
      **results[split],
    }
    for split in ("dev", "test")
  ]
  for key, baseline in results.get("baselines", {}).items():
    rows.append(
      {
        "task": results["task"],
        "kind": results["kind"],
        "system": key,
        "embedding": f"baseline: {baseline['name']}",
        "split": "test",
        **baseline["test"],
      }
    )
  return rows


def write_results(workdir: str, results: dict) -> dict[str, str]:
  """results.md, with baselines baselines.png, and results.json last (it
  marks a finished run); returns their paths."""
  json_path = os.path.join(workdir, "results.json")
  table_path = os.path.join(workdir, "results.md")
  headline = HEADLINE[results["kind"]]
  with paths_lib.replacing(table_path) as tmp, open(tmp, "w", encoding="utf-8") as f:
    f.write(f"# {results['task']}: {results['embedding']}\n\n")
    if "selected_step" in results:
      selection = (
        f"Selected on dev {headline} at step {results['selected_step']} of {results['total_steps']}"
      )
    else:
      selection = results["selection"]
    f.write(f"{selection}; backbone: {results['backbone']}.\n\n")
    if "verdict" in results:
      f.write(f"**{results['verdict']['text']}**\n\n")
    f.write(metrics_table(result_rows(results)))
    if "test_per_class" in results:
      f.write("\n" + per_class_table(results["test_per_class"]))
  paths = {"json": json_path, "table": table_path}
  if results.get("baselines"):
    paths["baselines_plot"] = plot_baselines(results, os.path.join(workdir, "baselines.png"))
  paths_lib.write_json(json_path, results)
  return paths


def per_class_table(per_class: dict) -> str:
  """Markdown: each test class's examples, F1 and row of the confusion
  matrix (`metrics.per_class`)."""
  k = len(per_class["examples"])
  lines = [
    "Test, per class (confusion: rows true, columns predicted):\n",
    "| class | examples | F1 | " + " | ".join(f"-> {c}" for c in range(k)) + " |",
    "|---:|---:|---:|" + "---:|" * k,
  ]
  for c in range(k):
    counts = " | ".join(str(n) for n in per_class["confusion"][c])
    lines.append(f"| {c} | {per_class['examples'][c]} | {_fmt(per_class['f1'][c])} | {counts} |")
  return "\n".join(lines) + "\n"


def plot_baselines(results: dict, out_path: str) -> str:
  """Bars: the test headline metric of the model and of each baseline."""
  plt = plotting.pyplot()
  headline = HEADLINE[results["kind"]]
  names = [f"model\n({results['embedding']})"]
  values = [results["test"][headline]]
  for baseline in results["baselines"].values():
    names.append(baseline["name"])
    values.append(baseline["test"][headline])
  fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
  colors = ["tab:blue"] + ["tab:gray"] * (len(values) - 1)
  bars = ax.bar(np.arange(len(values)), values, color=colors)
  for bar, value in zip(bars, values):
    ax.annotate(
      _fmt(float(value)),
      (bar.get_x() + bar.get_width() / 2, max(bar.get_height(), 0.0)),
      ha="center",
      va="bottom",
      fontsize=8,
    )
  ax.set_xticks(np.arange(len(values)), names, fontsize=8)
  ax.axhline(0, color="black", lw=0.5)
  ax.set_ylabel(f"test {headline}")
  ax.set_title(f"{results['task']}: model vs baselines (test)", fontsize=10)
  return plotting.save(fig, out_path)


def write_predictions(path: str, labels: np.ndarray, outputs: np.ndarray, kind: str) -> None:
  """Test predictions, one row per example in file order: label, prediction
  and class probabilities (classification) or the predicted value."""
  from hybridna_jax.finetune.metrics import softmax  # pylint: disable=g-import-not-at-top

  with paths_lib.replacing(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    if kind == "classification":
      probs = softmax(outputs)
      writer.writerow(["index", "label", "prediction"] + [f"p{c}" for c in range(probs.shape[1])])
      for i, (label, p) in enumerate(zip(labels, probs)):
        writer.writerow([i, int(label), int(np.argmax(p))] + [f"{x:.6g}" for x in p])
    else:
      writer.writerow(["index", "label", "prediction"])
      for i, (label, value) in enumerate(zip(labels, outputs)):
        writer.writerow([i, f"{float(label):.6g}", f"{float(value):.6g}"])


def plot_curves(jsonl_path: str, out_path: str, headline: str, title: str) -> str:
  """Train loss and the dev headline metric (right axis) against step."""
  plt = plotting.pyplot()
  latest = {(r["kind"], r["step"]): r for r in read_metrics(jsonl_path)}
  train = sorted((s, r["loss"]) for (k, s), r in latest.items() if k == "train" and "loss" in r)
  dev = sorted((s, r[headline]) for (k, s), r in latest.items() if k == "val" and headline in r)
  fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
  if train:
    ax.plot(*zip(*train), color="tab:blue", lw=1, label="train loss")
  ax.set_xlabel("step")
  ax.set_ylabel("train loss", color="tab:blue")
  ax.grid(alpha=0.3)
  right = ax.twinx()
  if dev:
    right.plot(*zip(*dev), color="tab:red", marker="o", lw=2, label=f"dev {headline}")
  right.set_ylabel(f"dev {headline}", color="tab:red")
  ax.set_title(title, fontsize=10)
  return plotting.save(fig, out_path)


def _headline(row: dict) -> float:
  """The row's headline metric; NaN where undefined (null in results.json)."""
  value = row.get(HEADLINE[row["kind"]])
  return np.nan if value is None else value


def plot_suite(
  rows: list[dict],
  out_path: str,
  series: list[tuple[str, str, str]] | None = None,
  title: str = "HybriDNA-JAX fine-tuning: selected on dev, reported on test",
) -> str:
  """Grouped bars of the headline metric of every task.

  `series`: (system, split, label) per bar colour. Default: the model on
  dev and test, then each baseline (rows with another "system") on test.
  """
  plt = plotting.pyplot()
  tasks = list(dict.fromkeys(r["task"] for r in rows))
  if series is None:
    series = [("model", "dev", "model dev"), ("model", "test", "model test")]
    for system in dict.fromkeys(r.get("system", "model") for r in rows):
      if system != "model":
        label = next(r["embedding"] for r in rows if r.get("system") == system)
        series.append((system, "test", label))
  colors = plt.get_cmap("tab10" if len(series) <= 10 else "tab20").colors
  bars_total = len(series) * len(tasks)
  # Values are written on the bars while they stay legible.
  annotate = bars_total <= 40
  inches = max(6.0, (0.5 if annotate else 0.22) * bars_total + 2)
  fig, ax = plt.subplots(figsize=(inches, 4.5), dpi=120)
  width = 0.8 / len(series)
  x = np.arange(len(tasks))
  for j, (system, split, label) in enumerate(series):
    values = []
    for task in tasks:
      row = next(
        (
          r
          for r in rows
          if r["task"] == task and r["split"] == split and r.get("system", "model") == system
        ),
        None,
      )
      values.append(_headline(row) if row else np.nan)
    offset = (j - (len(series) - 1) / 2) * width
    bars = ax.bar(x + offset, values, width, label=label, color=colors[j % len(colors)])
    for bar, value in zip(bars, values):
      if annotate and np.isfinite(value):
        ax.annotate(
          f"{value:.2f}",
          (bar.get_x() + bar.get_width() / 2, bar.get_height()),
          ha="center",
          va="bottom",
          fontsize=7,
        )
  scores = [_headline(r) for r in rows]
  low = np.nanmin(scores) if np.any(np.isfinite(scores)) else 0.0
  ax.set_ylim(min(0.0, low) - 0.05, 1.08)  # MCC and Pearson lie in [-1, 1]
  kinds = {r["kind"] for r in rows}
  ax.set_ylabel(" / ".join(HEADLINE[k] for k in sorted(kinds)) + " (headline)")
  ax.set_xticks(x, tasks, rotation=30, ha="right", fontsize=8)
  ax.axhline(0, color="black", lw=0.5)
  ax.legend(fontsize=7, ncol=1 if len(series) <= 6 else 2)
  ax.set_title(title, fontsize=10)
  return plotting.save(fig, out_path)
