"""Embedding modes side by side, on one task or many: fine-tunes (or
linearly probes) each task once per embedding mode and backbone, and prints
dev / test scores beside the task's baselines in one table.

  python benchmarks/finetune_modes.py --config=configs/finetune_demo.py \
      --tasks=data_cache/tasks/species --workdir=runs/bench_finetune \
      --modes=echo,rc_echo,plain_mean,plain_last --backbones=pretrained,fresh

  # The real tasks (scripts/make_real_tasks.py), every mode, a fixed budget:
  python benchmarks/finetune_modes.py --config=configs/finetune_demo.py \
      --tasks='data_cache/tasks/dm_promoters,data_cache/tasks/dm_insulators/*' \
      --tasks='data_cache/tasks/dm_splice/*' \
      --modes=probe,echo --steps=32 --pretrained=runs/demo \
      --max_examples=train=1000,dev=200,test=600 \
      --workdir=runs/real_tasks

Modes are config variants (hybridna_jax/finetune/presets.py), each
optionally with more variants joined by '+' (echo+frozen); `probe` is four
linear probes on frozen embeddings of the final norm -- echo, RC-averaged
echo, plain mean and RC-averaged plain mean, from one echo pass per strand
(`probe.run_probe_echo_views`). Each (task, backbone, mode) runs in
<workdir>/<task>/<backbone>_<mode> (resumable; finished runs are read
back, and refused when made under other settings or task files). The
baselines (GC content, k-mer and one-hot logistic regressions) are fitted
once per task on the same splits; --max_examples caps the splits the same
way for all.
Written to <workdir>: modes_table.md (per task: every run and the
baselines; then test MCC and AUROC of every task in one table each) and
modes_scores.png (test headline metric, grouped by task).
"""

import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags, logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import environment  # noqa: E402

from hybridna_jax import paths as paths_lib  # noqa: E402
from hybridna_jax.config import load_config  # noqa: E402
from hybridna_jax.data.tasks import TaskSplit  # noqa: E402
from hybridna_jax.finetune import baselines as baselines_lib  # noqa: E402
from hybridna_jax.finetune import datasets, report  # noqa: E402
from hybridna_jax.finetune import probe as probe_lib  # noqa: E402
from hybridna_jax.finetune import task as task_lib  # noqa: E402
from hybridna_jax.finetune.metrics import HEADLINE  # noqa: E402
from hybridna_jax.train.metrics import read_metrics  # noqa: E402

flags.DEFINE_string("config", "configs/finetune_demo.py", "Fine-tuning config file.")
flags.DEFINE_multi_string(
  "tasks",
  None,
  "Task folders, BED files or glob patterns, comma-separated and/or repeated "
  "(default: the config's task).",
)
flags.DEFINE_string("workdir", "runs/bench_finetune", "Where the runs go.")
flags.DEFINE_list(
  "modes",
  ["echo", "rc_echo", "plain_mean", "plain_last"],
  "Config variants to compare (hybridna_jax/finetune/presets.py), "
  "each optionally with more variants joined by '+', e.g. echo+frozen; "
  "probe: four linear probes on frozen embeddings (echo, RC-echo, plain mean, RC plain mean).",
)
flags.DEFINE_list(
  "backbones",
  ["pretrained", "fresh"],
  "pretrained (the config's finetune.pretrained) and/or fresh (random init).",
)
flags.DEFINE_list(
  "max_examples",
  [],
  "Per-split caps, e.g. train=1000,dev=200,test=600: a seeded random subset "
  "of each larger split, the same for every run and the baselines.",
)
flags.DEFINE_integer("steps", 0, "Override finetune.steps (0: the config's schedule).")
flags.DEFINE_float(
  "eval_every_epochs", 0.0, "Override finetune.eval_every_epochs (0: the config's)."
)
flags.DEFINE_float("learning_rate", 0.0, "Override train.learning_rate (0: the config's).")
flags.DEFINE_string("pretrained", None, "Override finetune.pretrained.")
FLAGS = flags.FLAGS


def _config(mode: str, backbone: str):
  variant = ",".join(mode.split("+") + (["fresh"] if backbone == "fresh" else []))
  config = load_config(f"{FLAGS.config}:{variant}")
  config.finetune.baselines = False  # fitted once per task by main()
  config.score.context = 0  # probes: the shortest context that holds the task
  if FLAGS.steps:
    config.finetune.steps = FLAGS.steps
  if FLAGS.eval_every_epochs:
    config.finetune.eval_every_epochs = FLAGS.eval_every_epochs
  if FLAGS.learning_rate:
    config.train.learning_rate = FLAGS.learning_rate
  if FLAGS.pretrained is not None and backbone != "fresh":
    config.finetune.pretrained = FLAGS.pretrained
  return config


def _read(path: str) -> dict:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _data_settings(path: str) -> dict[str, str]:
  """What a task's splits depend on: its files (names, sizes, modification
  times) and --max_examples."""
  files = (
    [path]
    if os.path.isfile(path)
    else sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names)
  )
  stats = []
  for f in files:
    st = os.stat(f)
    stats.append((os.path.relpath(f, path), st.st_size, st.st_mtime_ns))
  return {
    "task": repr(os.path.abspath(path)),
    "files": repr(stats),
    "max_examples": repr(sorted(FLAGS.max_examples)),
  }


def _reuse(directory: str, settings: dict[str, str]) -> None:
  """Refuses to read back results made under other settings (another
  --max_examples, --steps, --pretrained, task files, ...); records these."""
  task_lib.check_suite_settings(directory, settings)
  paths_lib.write_json(os.path.join(directory, task_lib.SUITE_SETTINGS), settings)


def _run(data: datasets.TaskData, name: str, mode: str, backbone: str, path: str) -> list[dict]:
  """The run's columns: one, or the four echo views of the probe."""
  config = _config(mode, backbone)
  workdir = os.path.join(FLAGS.workdir, name, f"{backbone}_{mode}")
  _reuse(workdir, task_lib.settings_of(config) | _data_settings(path))
  if mode == "probe":
    views = list(probe_lib.ECHO_VIEWS)
    paths = [os.path.join(workdir, view, "results.json") for view in views]
    if all(os.path.exists(p) for p in paths):
      found = dict(zip(views, map(_read, paths)))
    else:
      found = probe_lib.run_probe_echo_views(config, workdir, data)
    return [
      {
        "results": results,
        "mode": f"probe {view}",
        "backbone": backbone,
        "step_s": float("nan"),
        "width": results["settings"]["context"],
        "schedule": "linear probe",
        "wall_s": results["settings"]["embed_seconds"],
      }
      for view, results in found.items()
    ]
  results_path = os.path.join(workdir, "results.json")
  start = time.perf_counter()
  if os.path.exists(results_path):
    results = _read(results_path)
  else:
    results = task_lib.finetune(config, workdir, data)["results"]
    results["wall_s"] = time.perf_counter() - start
    with open(results_path, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2)
  train = [
    r
    for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
    if r["kind"] == "train" and "step_time_s" in r
  ]
  step_s = statistics.median(r["step_time_s"] for r in train) if train else float("nan")
  return [
    {
      "results": results,
      "mode": mode,
      "backbone": backbone,
      "step_s": step_s,
      "width": results["settings"]["width"],
      "schedule": f"{results['total_steps']} x {config.finetune.batch_size}",
      "wall_s": results.get("wall_s", float("nan")),
    }
  ]


def _load(path: str, name: str) -> datasets.TaskData:
  """The task, each split cut to --max_examples (seeded, order kept)."""
  data = datasets.load_task(path, name=name)
  caps = dict(item.split("=") for item in FLAGS.max_examples)
  rng = np.random.default_rng(0)
  splits = {}
  for split, part in data.splits.items():
    cap = int(caps.get(split, len(part.sequences)))
    if cap < len(part.sequences):
      keep = np.sort(rng.choice(len(part.sequences), cap, replace=False))
      part = TaskSplit([part.sequences[i] for i in keep], part.labels[keep])
    splits[split] = part
  return dataclasses.replace(data, splits=splits)


def _baselines(data: datasets.TaskData, name: str, task_path: str) -> dict:
  """The task's baselines, fitted once and kept in <workdir>/<task>/baselines.json."""
  _reuse(os.path.join(FLAGS.workdir, name), _data_settings(task_path))
  path = os.path.join(FLAGS.workdir, name, "baselines.json")
  cached = _read(path) if os.path.exists(path) else {}
  if set(cached) == set(baselines_lib.NAMES):
    return cached
  found = baselines_lib.run_baselines(data)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(found, f, indent=2)
  return found


def _task_section(name: str, runs: list[dict], found: dict) -> list[str]:
  kind = runs[0]["results"]["kind"]
  headline = HEADLINE[kind]
  extra = "auroc" if kind == "classification" else "spearman"
  lines = [
    f"### {name} ({kind}); selected on dev {headline}, reported on test",
    "",
    f"| backbone | embedding | width | schedule (steps x batch) | dev {headline} | "
    f"test {headline} | test {extra} | s/step | wall s |",
    "|---|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in runs:
    res = r["results"]
    lines.append(
      f"| {r['backbone']} | {res['embedding']} | {r['width']} | {r['schedule']} "
      f"| {res['dev'][headline]:.4f} | {res['test'][headline]:.4f} | "
      f"{res['test'][extra]:.4f} | {r['step_s']:.3f} | {r['wall_s']:.0f} |"
    )
  for baseline in found.values():
    lines.append(
      f"| - | baseline: {baseline['name']} | - | - | {baseline['dev'][headline]:.4f} | "
      f"{baseline['test'][headline]:.4f} | {baseline['test'][extra]:.4f} | - | - |"
    )
  verdicts = [
    f"- {r['backbone']} {r['mode']}: "
    + baselines_lib.compare(r["results"]["test"], found, kind)["text"]
    for r in runs
  ]
  return lines + [""] + verdicts + [""]


def _summary(metric: str, tasks: list[str], by_task: dict, columns: list[tuple[str, str]]) -> str:
  """One column per task, one row per baseline and (backbone, mode): test `metric`."""
  lines = ["| system | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
  for key, label in baselines_lib.NAMES.items():
    cells = [f"{by_task[name][1][key]['test'][metric]:.3f}" for name in tasks]
    lines.append(f"| baseline: {label} | " + " | ".join(cells) + " |")
  for i, (backbone, mode) in enumerate(columns):
    cells = [f"{by_task[name][0][i]['results']['test'][metric]:.3f}" for name in tasks]
    lines.append(f"| {mode} ({backbone}) | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv):
  del argv
  patterns = [p for flag in FLAGS.tasks or [] for p in flag.split(",") if p]
  paths = task_lib.expand_suite(patterns or [load_config(FLAGS.config).finetune.task])
  names = task_lib.suite_names(paths)
  by_task = {}
  for path, name in zip(paths, names):
    data = _load(path, name)
    found = _baselines(data, name, path)
    runs = [
      column
      for backbone in FLAGS.backbones
      for mode in FLAGS.modes
      for column in _run(data, name, mode, backbone, path)
    ]
    by_task[name] = (runs, found)
  columns = [(r["backbone"], r["mode"]) for r in by_task[names[0]][0]]

  lines = [environment(), ""]
  rows = []
  for name in names:
    runs, found = by_task[name]
    lines += _task_section(name, runs, found)
    for r in runs:
      rows.extend(
        {**row, "task": name, "system": f"{r['backbone']} {r['mode']}"}
        for row in report.result_rows(r["results"])
        if row["system"] == "model" and row["split"] == "test"
      )
    kind = runs[0]["results"]["kind"]
    rows.extend(
      {"task": name, "kind": kind, "system": key, "split": "test", **b["test"]}
      for key, b in found.items()
    )
  kinds = {by_task[n][0][0]["results"]["kind"] for n in names}
  for metric in ("mcc", "auroc") if kinds == {"classification"} else (HEADLINE[k] for k in kinds):
    lines += [f"### Test {metric} of every task", "", _summary(metric, names, by_task, columns), ""]
  table = "\n".join(lines) + "\n"
  print(table)
  os.makedirs(FLAGS.workdir, exist_ok=True)
  with open(os.path.join(FLAGS.workdir, "modes_table.md"), "w", encoding="utf-8") as f:
    f.write(table)
  series = [(key, "test", label) for key, label in baselines_lib.NAMES.items()]
  series += [(f"{b} {m}", "test", f"{m} ({b})") for b, m in columns]
  report.plot_suite(
    rows,
    os.path.join(FLAGS.workdir, "modes_scores.png"),
    series=series,
    title="Test headline metric: baselines, then each embedding mode and backbone",
  )
  logging.info("wrote %s", os.path.join(FLAGS.workdir, "modes_table.md"))


if __name__ == "__main__":
  app.run(main)
