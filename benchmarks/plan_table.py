"""The planning table of benchmarks/RESULTS.md: launch/plan.py for each model
config, context stage and device count, one process per cell.

  python benchmarks/plan_table.py --out_dir=runs/plan_table     # compute, resumable
  python benchmarks/plan_table.py --out_dir=runs/plan_table --render

Each cell compiles the train step of config.train.stages[stage] (the paper's
~0.5M tokens per step: 64 x 8k, 16 x 32k, 4 x 131k) on `devices` fake CPU
devices with the GPU kernels as shape proxies, on the mesh data=1,
fsdp=gcd(batch, devices), tensor the largest divisor of devices / fsdp up
to --max_tensor that every layer's heads divide, and the remaining
devices on the context axis (each sequence split over them).
Results land in <out_dir>/<cell>/plan.json; cells already there are
skipped, so the script can be stopped and resumed.
"""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

ROOT = Path(__file__).resolve().parent.parent

flags.DEFINE_list("models", ["hybridna_300m", "hybridna_3b", "hybridna_7b"], "configs/<name>.py")
flags.DEFINE_list("stages", ["0", "1", "2"], "Indices into config.train.stages.")
flags.DEFINE_list("devices", ["8", "64", "256"], "Device counts (columns).")
flags.DEFINE_string("out_dir", "runs/plan_table", "Where cells are written.")
flags.DEFINE_integer("timeout", 1200, "Seconds per cell.")
flags.DEFINE_integer("max_tensor", 8, "Devices beyond fsdp x max_tensor go to the context axis.")
flags.DEFINE_bool("render", False, "Only print the markdown table of the cells done.")
FLAGS = flags.FLAGS

GB = 1e9
MEMORY = (("80 GB", 80e9), ("141 GB", 141e9))
HEADROOM = 0.1


def _config(model: str):
  sys.path.insert(0, str(ROOT))
  from hybridna_jax.config import load_config  # pylint: disable=g-import-not-at-top

  return load_config(str(ROOT / "configs" / f"{model}.py"))


def _mesh(model: str, batch: int, devices: int) -> dict[str, int]:
  """All `devices`: fsdp as wide as the batch allows, then the largest tensor
  axis (<= max_tensor) that divides the rest and every layer's heads
  (`plan.tensor_heads`), then the context axis."""
  from hybridna_jax.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from hybridna_jax.train.plan import tensor_heads  # pylint: disable=g-import-not-at-top

  heads = tensor_heads(ModelConfig.from_config(_config(model).model))
  fsdp = math.gcd(batch, devices)
  rest = devices // fsdp
  tensor = max(
    t for t in range(1, min(rest, FLAGS.max_tensor) + 1) if rest % t == 0 and heads % t == 0
  )
  return {"data": 1, "fsdp": fsdp, "context": rest // tensor, "tensor": tensor}


def _cell_dir(model: str, stage: int, devices: int) -> Path:
  return Path(FLAGS.out_dir) / f"{model}_s{stage}_d{devices}"


def run_cell(model: str, stage: int, devices: int, batch: int) -> None:
  mesh = _mesh(model, batch, devices)
  out = _cell_dir(model, stage, devices)
  if (out / "plan.json").exists():
    return
  out.mkdir(parents=True, exist_ok=True)
  cmd = [
    sys.executable,
    str(ROOT / "launch" / "plan.py"),
    f"--config={ROOT / 'configs' / model}.py",
    f"--stage={stage}",
    f"--devices={devices}",
    "--accelerator=h100",
    f"--workdir={out}",
    *(f"--config.mesh.{k}={v}" for k, v in mesh.items()),
  ]
  env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
  start = time.perf_counter()
  print(f"{out.name}: mesh {mesh} ...", flush=True)
  try:
    proc = subprocess.run(
      cmd, env=env, capture_output=True, text=True, timeout=FLAGS.timeout, check=False
    )
    (out / "log.txt").write_text(proc.stdout + proc.stderr)
    status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
  except subprocess.TimeoutExpired:
    (out / "failed.txt").write_text(f"timed out after {FLAGS.timeout} s\n")
    status = "timeout"
  if status not in ("ok", "timeout"):
    (out / "failed.txt").write_text(f"{status}; see log.txt\n")
  print(f"{out.name}: {status} in {time.perf_counter() - start:.0f} s", flush=True)


def _cell_text(model: str, stage: int, devices: int) -> str:
  out = _cell_dir(model, stage, devices)
  if (out / "plan.json").exists():
    plan = json.loads((out / "plan.json").read_text())["plan"]
    peak = plan["peak_bytes"]
    state = plan["param_bytes"] + plan["opt_bytes"]
    fits = ", ".join(
      f"{name}: {'yes' if peak <= (1 - HEADROOM) * size else 'no'}" for name, size in MEMORY
    )
    mesh = "x".join(str(plan["mesh"].get(a, 1)) for a in ("data", "fsdp", "context", "tensor"))
    return (
      f"{fits}; {peak / GB:.1f} GB (state {state / GB:.1f} + temp "
      f"{plan['temp_bytes'] / GB:.1f}); mesh {mesh}; {plan['lower_s'] + plan['compile_s']:.0f} s"
    )
  for name, what in (("skipped.txt", "not computed: "), ("failed.txt", "failed: ")):
    if (out / name).exists():
      return what + (out / name).read_text().strip()
  return "not computed: out of the time budget"


def render() -> str:
  devices = [int(d) for d in FLAGS.devices]
  lines = [
    "| model | stage | " + " | ".join(f"{d} devices" for d in devices) + " |",
    "|---|---|" + "---|" * len(devices),
  ]
  for model in FLAGS.models:
    stages = _config(model).train.stages
    for s in (int(x) for x in FLAGS.stages):
      seq_len, _, batch = stages[s]
      cells = [_cell_text(model, s, d) for d in devices]
      lines.append(f"| {model} | {batch} x {seq_len:,} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv):
  del argv
  if not FLAGS.render:
    # Column by column: the 8-device cells (one node) first.
    for devices in (int(d) for d in FLAGS.devices):
      for model in FLAGS.models:
        stages = _config(model).train.stages
        for s in (int(x) for x in FLAGS.stages):
          run_cell(model, s, devices, int(stages[s][2]))
  print(render())


if __name__ == "__main__":
  app.run(main)
