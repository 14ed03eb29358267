"""Checks launch/plan.py against a real GPU: for each case, the planner's
per-device peak (CPU compile, kernels as shape proxies), the GPU compiler's
own memory analysis of the same step, and the peak memory and time of the
step run on the GPU.

  python benchmarks/plan_check_gpu.py --cases=hybridna_300m:8192:1,hybridna_300m:32768:1
  python benchmarks/plan_check_gpu.py --cases=hybridna_300m:8192:4 \
      --overrides=model.scan_layers=True,model.remat=none  # the scanned layout

One device; each case is <config>:<seq_len>:<batch>; --overrides apply to
every case, on the device and in the planner alike. The measured peak is
the process's high-water mark: a case that stays below an earlier case's
peak reports n/a (run it alone, or order cases small to large). A case that
fails on the device (out of memory) keeps what was measured before the
failure (the GPU compile's memory analysis and compile time). The planner
runs in subprocesses on the host's CPUs while the GPU works. Without a GPU it
runs the same steps on CPU. Results go to --out_dir ($OUT/plan_check_gpu on
a device machine, so that they come back). One GPU holds at most a ~3B model
with fp32 Adam state (16 bytes a parameter): the 7B needs a mesh. On a device image without grain
and ml-collections, install the `.whl/` folder first as
benchmarks/device_check.sh does.
"""

import ast
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

flags.DEFINE_list("cases", ["hybridna_300m:8192:1"], "<config>:<seq_len>:<batch> cases.")
flags.DEFINE_string(
  "out_dir",
  os.path.join(os.environ["OUT"], "plan_check_gpu")
  if os.environ.get("OUT")
  else "runs/plan_check_gpu",
  "Where plans and results go (default: $OUT/plan_check_gpu when $OUT is set).",
)
flags.DEFINE_integer("steps", 3, "Timed steps per case (after the first).")
flags.DEFINE_integer("plan_timeout", 900, "Seconds for each planner subprocess.")
flags.DEFINE_list(
  "overrides", [], "Config overrides for every case, e.g. model.scan_layers=True,model.remat=none."
)
FLAGS = flags.FLAGS
GB = 1e9


def apply_override(config, override: str) -> None:
  """Sets config's field `a.b` from "a.b=value", as the planner's
  --config.a.b=value does (a Python literal, else the string)."""
  path, value = override.split("=", 1)
  *parents, leaf = path.split(".")
  node = config
  for name in parents:
    node = node[name]
  try:
    node[leaf] = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    node[leaf] = value


def start_plan(name: str, seq_len: int, batch: int, out: Path) -> subprocess.Popen:
  out.mkdir(parents=True, exist_ok=True)
  cmd = [
    sys.executable,
    str(ROOT / "launch" / "plan.py"),
    f"--config={ROOT / 'configs' / name}.py",
    "--devices=1",
    "--accelerator=h200",
    f"--seq_len={seq_len}",
    f"--batch={batch}",
    f"--workdir={out}",
    *(f"--config.{override}" for override in FLAGS.overrides),
  ]
  env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
  log = open(out / "log.txt", "w", encoding="utf-8")  # pylint: disable=consider-using-with
  return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def run_on_device(name: str, seq_len: int, batch: int, result: dict) -> None:
  """Compiles (abstract inputs) and runs the step with the default kernels;
  fills `result` as it goes, so that a failure keeps what was measured."""
  import jax  # pylint: disable=g-import-not-at-top

  from hybridna_jax.config import load_config  # pylint: disable=g-import-not-at-top
  from hybridna_jax.train import plan as plan_lib  # pylint: disable=g-import-not-at-top

  config = load_config(str(ROOT / "configs" / f"{name}.py"))
  for override in FLAGS.overrides:
    apply_override(config, override)
  built = plan_lib._build(config, {"num_devices": 1}, seq_len, batch, None)  # pylint: disable=protected-access
  start = time.perf_counter()
  compiled = built.fns.train_step.lower(built.state, built.batch).compile()
  compile_s = time.perf_counter() - start
  plan = plan_lib._plan_from(built, compiled, 0.0, compile_s)  # pylint: disable=protected-access
  result.update(
    xla_peak_bytes=plan.peak_bytes,
    xla_temp_bytes=plan.temp_bytes,
    argument_bytes=plan.argument_bytes,
    compile_s=compile_s,
    model_flops=plan.model_flops,
  )
  device = jax.devices()[0]
  # The peak is the process's high-water mark, never reset: it is this
  # case's only if it rose during the case (not set by an earlier, larger one).
  peak_before = (device.memory_stats() or {}).get("peak_bytes_in_use", 0)
  state = built.fns.init(jax.random.key(0))
  data = plan_lib.real_batch(built)
  state, metrics = compiled(state, data)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(FLAGS.steps):
    start = time.perf_counter()
    state, metrics = compiled(state, data)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  stats = device.memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  if peak is not None and peak_before and peak <= peak_before:
    result["peak_note"] = "an earlier case set the process's peak; run this case alone"
    peak = None
  result.update(
    step_s=min(times),
    peak_bytes_in_use=peak,
    bytes_limit=stats.get("bytes_limit"),
    loss=float(metrics["loss"]),
  )
  peak_flops = plan_lib.flops_lib.peak_flops_per_device(device)
  if peak_flops:
    result["mfu"] = plan.model_flops / result["step_s"] / peak_flops
  del state, data, compiled


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top

  out_dir = Path(FLAGS.out_dir)
  cases = [(c.split(":")[0], int(c.split(":")[1]), int(c.split(":")[2])) for c in FLAGS.cases]
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
  plans = {
    case: start_plan(case[0], case[1], case[2], out_dir / f"{case[0]}_{case[1]}_{case[2]}")
    for case in cases
  }
  results = {}
  for case in cases:
    key = f"{case[0]}_{case[1]}_{case[2]}"
    results[key] = {}
    try:
      run_on_device(*case, results[key])
    except Exception as e:  # pylint: disable=broad-except
      results[key]["error"] = f"{type(e).__name__}: {str(e)[:500]}"
    print(key, json.dumps(results[key]), flush=True)
    jax.clear_caches()
  for case, proc in plans.items():
    key = f"{case[0]}_{case[1]}_{case[2]}"
    try:
      proc.wait(timeout=FLAGS.plan_timeout)
    except subprocess.TimeoutExpired:
      proc.kill()
    path = out_dir / key / "plan.json"
    if path.exists():
      plan = json.loads(path.read_text())["plan"]
      results[key]["plan_peak_bytes"] = plan["peak_bytes"]
      results[key]["plan_temp_bytes"] = plan["temp_bytes"]
      results[key]["plan_compile_s"] = plan["lower_s"] + plan["compile_s"]
    else:
      log = (out_dir / key / "log.txt").read_text()[-1500:]
      results[key]["plan_error"] = log
  print(
    "\n| case | plan peak GB (CPU, proxies) | GPU XLA peak GB | GPU measured peak GB "
    "| measured / plan | step s | MFU |"
  )
  print("|---|---|---|---|---|---|---|")
  for key, r in results.items():
    plan, measured = r.get("plan_peak_bytes"), r.get("peak_bytes_in_use")
    ratio = f"{measured / plan:.2f}" if plan and measured else "n/a"
    fmt = lambda v: f"{v / GB:.2f}" if v else "n/a"
    print(
      f"| {key} | {fmt(plan)} | {fmt(r.get('xla_peak_bytes'))} | {fmt(measured)} | "
      f"{ratio} | {r.get('step_s', float('nan')):.3f} | {r.get('mfu', float('nan')):.2f} |"
    )
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
  app.run(main)
