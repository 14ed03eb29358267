"""Plans a training run before it gets machines: memory, FLOPs and step time
of one sharded train step per device, and whether it fits an accelerator.

    python launch/plan.py --config=configs/hybridna_7b.py --stage=2 \\
        --devices=64 --accelerator=h100 --mfu=0.4 [--search]

Compiles the train step ahead of time for a mesh of --devices fake CPU
devices (nothing is allocated; the program sets XLA_FLAGS itself), with the
mesh of config.mesh (`--config.mesh.fsdp=8 --config.mesh.tensor=2`) and the
shape of config.train.stages[--stage] (or --seq_len / --batch). Prints the
per-device bytes of parameters, optimizer state, batch and temporaries from
XLA's memory analysis, XLA's FLOP count next to train/flops.py's, and for
--accelerator whether the step fits with --headroom and its time at --mfu.
--search tries meshes from the least split up and suggests the first that
fits. --kernels=configured compiles the kernels as configured (what a CPU run
executes; --measure then runs the step and compares with the process's
memory). See README, "Planning a run".
"""

import os
import sys

from absl import app, flags

from hybridna_jax import launch_utils, paths

launch_utils.define_flags(workdir_required=False, config_required=True, distributed=False)
flags.DEFINE_integer("devices", 8, "Number of (fake CPU) devices to plan for.", lower_bound=1)
flags.DEFINE_enum(
  "accelerator",
  "h100",
  ["h100", "h200", "v5p", "v5e"],
  "Target device: memory, peak FLOP/s and kernels (GPU or TPU).",
)
flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation for the step time.")
flags.DEFINE_float(
  "headroom",
  0.1,
  "Share of device memory kept free (allocator "
  "fragmentation, XLA_PYTHON_CLIENT_MEM_FRACTION, the runtime).",
)
flags.DEFINE_integer("stage", 0, "Index into config.train.stages (seq_len, steps, batch).")
flags.DEFINE_integer("seq_len", None, "Sequence length (overrides the stage's).", lower_bound=1)
flags.DEFINE_integer("batch", None, "Global batch size (overrides the stage's).", lower_bound=1)
flags.DEFINE_enum(
  "kernels",
  "accelerator",
  ["accelerator", "configured"],
  "accelerator: trace the target's Pallas kernels as shape proxies; "
  "configured: the kernels as configured (on CPU the XLA references).",
)
flags.DEFINE_bool(
  "search",
  False,
  "Suggest the least-split mesh (fsdp, tensor, context) of "
  "--devices that fits --accelerator (compiles each candidate).",
)
flags.DEFINE_integer("max_tensor", 8, "Largest tensor axis the search tries.", lower_bound=1)
flags.DEFINE_bool(
  "measure",
  False,
  "Also run the step on CPU (real arrays) and compare "
  "the predicted memory with the process's; small configs only.",
)
FLAGS = flags.FLAGS

_DEVICE_FLAG = "--xla_force_host_platform_device_count"
# XLA's CPU scheduler favours concurrency by default and then runs the
# recomputation of every remat'd layer before the first backward step,
# holding all their activations at once; GPU and TPU schedule under a memory
# limit, so the memory-optimised CPU scheduler is the closer stand-in (7B,
# 8 layers, 16k tokens: 97 GB of temporaries with the default, 58 GB with it).
_SCHEDULER_FLAG = "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"
# Keeps the optimization barriers that order the layers' backward passes
# (plan.sequential_remat) until after scheduling; added to any passes the
# caller's XLA_FLAGS disable.
_DISABLE_FLAG = "--xla_disable_hlo_passes"
_DISABLED_PASSES = ("cse_barrier_expander",)


def planner_xla_flags(existing: str, n: int) -> str:
  """XLA_FLAGS for the planner: `existing` with n devices, the scheduler
  above, and the planner's disabled passes joined to the caller's."""
  disabled, kept = list(_DISABLED_PASSES), []
  for flag in existing.split():
    name, _, value = flag.partition("=")
    if name == _DISABLE_FLAG:
      disabled = [p for p in value.split(",") if p and p not in disabled] + disabled
    elif name not in (_DEVICE_FLAG, _SCHEDULER_FLAG.split("=")[0]):
      kept.append(flag)
  own = [f"{_DEVICE_FLAG}={n}", _SCHEDULER_FLAG, f"{_DISABLE_FLAG}={','.join(disabled)}"]
  return " ".join(kept + own)


def use_fake_cpu_devices(n: int) -> None:
  """Makes jax start with `n` CPU devices (and the planner's XLA flags).
  XLA reads XLA_FLAGS when its backends start, so when they already run
  with other settings the program starts over (exec) with the new
  environment."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top

  flags_before = os.environ.get("XLA_FLAGS", "")
  os.environ["XLA_FLAGS"] = planner_xla_flags(flags_before, n)
  os.environ["JAX_PLATFORMS"] = "cpu"
  if xla_bridge.backends_are_initialized():
    if (
      jax.default_backend() == "cpu"
      and jax.device_count() == n
      and os.environ["XLA_FLAGS"] == flags_before
    ):
      return
    os.execv(sys.executable, [sys.executable, *sys.argv])
  jax.config.update("jax_platforms", "cpu")
  if jax.device_count() != n:
    raise RuntimeError(f"asked for {n} fake CPU devices, jax has {jax.device_count()}.")


def main(argv):
  del argv  # flags only (launch_utils.run)
  launch_utils.quiet_library_logs()
  use_fake_cpu_devices(FLAGS.devices)
  # Imported after the device set-up (nothing may touch devices before).
  from hybridna_jax.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from hybridna_jax.train import flops as flops_lib  # pylint: disable=g-import-not-at-top
  from hybridna_jax.train import plan as plan_lib  # pylint: disable=g-import-not-at-top

  if FLAGS.search and FLAGS.measure:
    raise app.UsageError(
      "--search and --measure: choose one (measure the mesh the search suggests afterwards)."
    )
  if not 0.0 < FLAGS.mfu <= 1.0:
    raise app.UsageError(f"--mfu={FLAGS.mfu}: give a fraction of peak in (0, 1].")
  if not 0.0 <= FLAGS.headroom < 1.0:
    raise app.UsageError(f"--headroom={FLAGS.headroom}: give a fraction of memory in [0, 1).")
  config = FLAGS.config
  stages = config.train.stages
  if not 0 <= FLAGS.stage < len(stages):
    raise app.UsageError(f"--stage={FLAGS.stage}: the config has {len(stages)} stages.")
  seq_len = FLAGS.seq_len if FLAGS.seq_len is not None else int(stages[FLAGS.stage][0])
  batch = FLAGS.batch if FLAGS.batch is not None else int(stages[FLAGS.stage][2])
  accelerator = flops_lib.ACCELERATORS[FLAGS.accelerator]
  platform = None if FLAGS.kernels == "configured" or FLAGS.measure else accelerator.platform
  mesh_sizes = {"num_devices": FLAGS.devices}
  report = {
    "config": config.to_dict(),
    "accelerator": FLAGS.accelerator,
    "headroom": FLAGS.headroom,
    "mfu": FLAGS.mfu,
  }

  def show(plan):
    print(plan_lib.format_plan(plan, FLAGS.accelerator, FLAGS.headroom, FLAGS.mfu), flush=True)

  if FLAGS.search:
    fixed = {k: config.mesh[k] for k in ("data", "fsdp", "context", "tensor") if config.mesh[k] > 1}
    if fixed:
      print(
        "note: --search tries every split and ignores config.mesh "
        f"({', '.join(f'{k}={v}' for k, v in fixed.items())}).",
        flush=True,
      )
    print(
      f"searching meshes of {FLAGS.devices} devices for {FLAGS.accelerator}, "
      f"{batch} x {seq_len:,} nt, least split first:",
      flush=True,
    )

    def progress(step):
      mesh = " ".join(f"{k}={v}" for k, v in step.mesh.items())
      if step.plan is None:
        print(f"  {mesh}: skipped, {step.skipped}", flush=True)
      else:
        fits = "fits" if step.plan.fits(accelerator, FLAGS.headroom) else "does not fit"
        print(
          f"  {mesh}: peak {step.plan.peak_bytes / plan_lib.GB:.2f} GB per device, "
          f"{fits} (compiled in {step.plan.compile_s:.0f} s)",
          flush=True,
        )

    steps = plan_lib.search_mesh(
      config,
      devices=FLAGS.devices,
      seq_len=seq_len,
      batch=batch,
      accelerator=accelerator,
      headroom=FLAGS.headroom,
      platform=platform,
      max_tensor=FLAGS.max_tensor,
      report=progress,
    )
    report["search"] = [
      {"mesh": s.mesh, "skipped": s.skipped, "plan": s.plan.to_json() if s.plan else None}
      for s in steps
    ]
    if not steps:
      raise app.UsageError(
        f"no split of {FLAGS.devices} devices has data x fsdp x grad_accum "
        f"({config.train.grad_accum}) dividing the batch {batch}, context dividing "
        f"{seq_len} and tensor <= {FLAGS.max_tensor} dividing the model's heads "
        f"({plan_lib.tensor_heads(ModelConfig.from_config(config.model))}); change --batch, "
        "--seq_len, --devices or --max_tensor."
      )
    best = steps[-1].plan
    if best is not None and best.fits(accelerator, FLAGS.headroom):
      mesh = " ".join(f"--config.mesh.{k}={v}" for k, v in best.mesh.items())
      print(f"\nsuggested: {mesh}\n")
      show(best)
    else:
      print(
        f"\nno mesh of {FLAGS.devices} devices (tensor <= {FLAGS.max_tensor}) fits "
        f"{FLAGS.accelerator}; use more devices, a smaller batch per device "
        "(config.train.grad_accum) or remat (config.model.remat)."
      )
  elif FLAGS.measure:
    result = plan_lib.measure_on_cpu(config, seq_len=seq_len, batch=batch, mesh_sizes=mesh_sizes)
    show(result.plan)
    print(
      f"measured on CPU ({result.plan.devices} devices in one process): "
      f"predicted {result.predicted_bytes / plan_lib.GB:.3f} GB, resident set grew "
      f"{result.measured_bytes / plan_lib.GB:.3f} GB "
      f"(measured / predicted {result.measured_bytes / result.predicted_bytes:.2f})"
    )
    report["measured_bytes"] = result.measured_bytes
    report["plan"] = result.plan.to_json()
  else:
    plan = plan_lib.plan_step(
      config, seq_len=seq_len, batch=batch, platform=platform, mesh_sizes=mesh_sizes
    )
    show(plan)
    report["plan"] = plan.to_json()
  if FLAGS.workdir:
    paths.write_json(os.path.join(FLAGS.workdir, "plan.json"), report)


if __name__ == "__main__":
  # Without the huge-pages restart: --measure compares the resident set
  # with the plan, and the tests' margins were set with 4 KiB pages.
  launch_utils.run(main, huge_pages=False)
