"""Run metrics: console progress with ETA, TensorBoard event files, a JSONL
log, and loss-curve plots.

Only process 0 writes; every process may call the methods. The run
directory may be local, file:// or gs:// (`hybridna_jax.paths`): on gs://,
metrics.jsonl is rewritten whole at every logged row (objects cannot be
appended to; the file is small) and TensorBoard events are written to a
local directory and copied to <workdir>/tensorboard when the logger closes.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from typing import Any

import jax
from absl import logging

from hybridna_jax import paths, plotting

METRICS_FILE = "metrics.jsonl"  # in a run directory
LOSS_PLOT = "loss_curves.png"


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _whole_lines(text: str) -> str:
  """`text` ending in a newline (a line cut by a kill then stays one bad
  line that readers skip, and the next row starts a line of its own)."""
  return text if not text or text.endswith("\n") else text + "\n"


def _open_for_appending(path) -> io.TextIOBase:
  """metrics.jsonl opened to append whole lines (`_whole_lines`), and to be
  read back if it is deleted while open."""
  cut = False
  if os.path.exists(path) and os.path.getsize(path):
    with open(path, "rb") as f:
      f.seek(-1, os.SEEK_END)
      cut = f.read(1) != b"\n"
  f = open(path, "a+", encoding="utf-8")
  if cut:
    f.write("\n")
  return f


class MetricsLogger:
  """Writes train/eval metrics to the console, TensorBoard and metrics.jsonl.

  `devices`: the devices that run the steps (the mesh's, which may be fewer
  than the host's); TFLOP/s and MFU are per one of them."""

  def __init__(self, workdir: str, total_steps: int, *, devices: int, tensorboard: bool = True):
    self.total_steps = total_steps
    self.devices = devices
    self.enabled = jax.process_index() == 0
    self.jsonl_path = paths.join(workdir, METRICS_FILE)
    self._writer = None
    self._jsonl = None
    self._rows: list[str] | None = None  # remote: the whole file, rewritten
    self._tensorboard = None  # remote: (local staging, its context manager)
    if self.enabled:
      self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
      if paths.is_remote(self.jsonl_path):
        self._rows = [_whole_lines(self.jsonl_path.read_text())] if self.jsonl_path.exists() else []
      else:
        self._jsonl = _open_for_appending(self.jsonl_path)
      if tensorboard:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

        self._tensorboard = paths.staged(paths.join(workdir, "tensorboard"), directory=True)
        self._writer = SummaryWriter(self._tensorboard.__enter__())
    self._last_time = None
    self._last_step = None
    # Smoothed seconds per step and per model FLOP: the ETA weighs the steps
    # left by their FLOPs when the caller gives them (later stages cost more).
    self._seconds_per_step = None
    self._seconds_per_flop = None

  def _write(self, kind: str, step: int, values: dict[str, float]):
    if not self.enabled:
      return
    record = json.dumps({"kind": kind, "step": step, "time": time.time(), **values}) + "\n"
    if self._rows is None:
      if os.fstat(self._jsonl.fileno()).st_nlink == 0:
        # Deleted while the run writes it: put back what the open file holds.
        self._jsonl.seek(0)
        kept = self._jsonl.read()
        self._jsonl.close()
        paths.write_text(self.jsonl_path, kept)
        self._jsonl = _open_for_appending(self.jsonl_path)
        logging.warning("%s was deleted during the run; written again.", self.jsonl_path)
      self._jsonl.write(record)
      self._jsonl.flush()
    else:
      self._rows.append(record)
      paths.write_text(self.jsonl_path, "".join(self._rows))
    if self._writer is not None:
      for key, value in values.items():
        if isinstance(value, (int, float)) and math.isfinite(value):
          self._writer.add_scalar(f"{kind}/{key}", value, step)
      self._writer.flush()

  def mark(self, step: int):
    """Starts timing at `step` (after compilation, restores, evals)."""
    self._last_time, self._last_step = time.perf_counter(), step

  def log_train(
    self,
    step: int,
    metrics: dict[str, Any],
    *,
    tokens_per_step: float,
    flops_per_token: float,
    peak_flops: float | None,
    stage: str,
    remaining_flops: float | None = None,
  ):
    """Logs averaged step metrics; throughput is measured since the last call.

    remaining_flops: model FLOPs of the steps after `step` (all stages); the
    ETA is then that at the measured seconds per FLOP, not the steps left at
    this stage's seconds per step."""
    now = time.perf_counter()
    values = {k: float(v) for k, v in metrics.items()}
    step_flops = tokens_per_step * flops_per_token
    if self._last_time is not None and step > self._last_step:
      per_step = (now - self._last_time) / (step - self._last_step)
      smooth = lambda old, new: new if old is None else 0.7 * old + 0.3 * new  # noqa: E731
      self._seconds_per_step = smooth(self._seconds_per_step, per_step)
      if step_flops > 0:
        self._seconds_per_flop = smooth(self._seconds_per_flop, per_step / step_flops)
      values["step_time_s"] = per_step
      values["tokens_per_s"] = tokens_per_step / per_step
      achieved = values["tokens_per_s"] * flops_per_token / self.devices
      values["tflops_per_device"] = achieved / 1e12
      if peak_flops:
        values["mfu"] = achieved / peak_flops
    self._last_time, self._last_step = now, step
    self._write("train", step, values)
    if self.enabled:
      if remaining_flops is not None and self._seconds_per_flop is not None:
        eta = remaining_flops * self._seconds_per_flop
      else:
        eta = (self.total_steps - step) * (self._seconds_per_step or float("nan"))
      throughput = (
        f" | {values['tokens_per_s']:,.0f} tok/s {values['step_time_s']:.3f} s/step"
        if "tokens_per_s" in values
        else ""
      )
      mfu = f" MFU {values['mfu']:.1%}" if "mfu" in values else ""
      skipped = f" | skipped {int(values['skipped_total'])}" if values.get("skipped_total") else ""
      # Tasks report different metrics (fine-tuning has no bits/nt).
      task_metrics = "".join(
        f" {label} {values[key]:{fmt}}"
        for key, label, fmt in (("bits_per_nt", "bpn", ".4f"), ("accuracy", "acc", ".3f"))
        if key in values
      )
      logging.info(
        "step %d/%d (%.0f%%) [%s] loss %.4f%s | gnorm %.3f lr %.2e%s%s%s | ETA %s",
        step,
        self.total_steps,
        100.0 * step / self.total_steps,
        stage,
        values["loss"],
        task_metrics,
        values["grad_norm"],
        values["learning_rate"],
        throughput,
        mfu,
        skipped,
        format_duration(eta),
      )

  def log_eval(self, step: int, values: dict[str, float], split: str = "val"):
    self._write(split, step, values)
    if self.enabled:
      logging.info(
        "eval @ step %d [%s] %s",
        step,
        split,
        " ".join(f"{k} {v:,.0f}" if k == "tokens" else f"{k} {v:.4f}" for k, v in values.items()),
      )

  def close(self):
    if self._writer is not None:
      self._writer.close()
      self._writer = None
      self._tensorboard.__exit__(None, None, None)  # copies it up when remote
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None


def read_metrics(jsonl_path) -> list[dict]:
  """The rows of a metrics.jsonl (a local path, file:// or gs:// URL). A
  line cut short by a kill mid-write (a resumed run appends after it) is
  skipped."""
  rows = []
  for number, line in enumerate(paths.read_text(jsonl_path).splitlines(), 1):
    if line.strip():
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        logging.warning(
          "%s line %d is not a JSON record (cut short?); skipped.", jsonl_path, number
        )
  return rows


def plot_loss_curves(
  jsonl_path: str,
  out_path: str,
  *,
  stage_starts: list[tuple[int, str]] | None = None,
  baselines: dict[str, float] | None = None,
) -> str:
  """Train and validation bits per nucleotide against step, with stage
  boundaries and horizontal baseline lines. Returns out_path (a local path
  or URL, `plotting.save`)."""
  plt = plotting.pyplot()

  records = read_metrics(jsonl_path)
  # A resumed run appends: keep the last record per (kind, step).
  latest = {(r["kind"], r["step"]): r for r in records}
  series = {}
  for (kind, step), r in sorted(latest.items(), key=lambda kv: kv[0][1]):
    key = "bits_per_nt"
    if key in r and math.isfinite(r[key]):  # an interval of skipped steps logs NaN
      series.setdefault(kind, ([], []))
      series[kind][0].append(step)
      series[kind][1].append(r[key])
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=110)
  finite_baselines = [v for v in (baselines or {}).values() if math.isfinite(v)]
  lowest = min([min(v) for _, v in series.values() if v] + finite_baselines + [2.0])
  for ax, zoom in zip(axes, (False, True)):
    styles = {"train": dict(lw=1, alpha=0.8), "val": dict(marker="o", lw=2)}
    for kind, (steps, values) in series.items():
      ax.plot(steps, values, label=f"{kind} bits/nt", **styles.get(kind, {}))
    for step, label in stage_starts or []:
      ax.axvline(step, color="gray", ls=":", lw=1)
      ax.annotate(
        label,
        (step, 1.0),
        xycoords=("data", "axes fraction"),
        xytext=(3, -12),
        textcoords="offset points",
        fontsize=8,
        color="gray",
      )
    colors = iter(["tab:red", "tab:purple", "tab:brown", "tab:olive"])
    for name, value in (baselines or {}).items():
      ax.axhline(value, ls="--", lw=1, color=next(colors), label=f"{name}: {value:.3f}")
    ax.axhline(2.0, ls="-", lw=0.5, color="black", alpha=0.3)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if zoom:  # the region where models are compared: 2 bits = uniform over ACGT
      ax.set_ylim(lowest - 0.03, 2.1)
      ax.set_title("zoom: near 2 bits/nt (uniform over A/C/G/T)", fontsize=10)
    else:
      ax.set_ylabel("bits per nucleotide")
      ax.set_title("HybriDNA-JAX training", fontsize=10)
      ax.legend(loc="upper right", fontsize=8)
  return plotting.save(fig, out_path)
