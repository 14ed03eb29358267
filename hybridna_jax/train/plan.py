"""Plans a training run ahead of time: per-device memory, FLOPs, fit and step
time of the sharded train step, from XLA's compiled program (launch/plan.py).

The step is the one `train.loop` runs (`step.build_steps` with the
pretraining task), lowered with abstract inputs (`jax.ShapeDtypeStruct`s
carrying the state and batch shardings) and compiled for a mesh of fake CPU
devices (`--xla_force_host_platform_device_count`), so nothing is allocated
and a 256-device plan runs on a laptop. The numbers come from
`compiled.memory_analysis()` (per device) and `compiled.cost_analysis()`.

Kernels. A GPU or TPU run uses Pallas kernels that XLA cannot compile for
CPU, and the XLA references that CPU runs instead hold far more memory (the
SSD reference keeps (chunk x chunk) decay matrices per chunk, the dense
attention reference the (l x l) scores). For a GPU or TPU target the plan
therefore traces the target's kernels with every `pallas_call` replaced by a
shape proxy: an XLA op with the kernel's inputs and outputs and no work.
The buffers XLA sees are then those of the real program (kernel outputs,
custom-VJP residuals, the XLA glue between kernels); what a kernel keeps
on-chip (VMEM, shared memory) is not HBM and is not counted, and the
kernels' FLOPs are missing from XLA's count.

Layer order. XLA's CPU scheduler is free to interleave the backward passes
of different layers (recompute layer k while layer k+1's weight gradients
wait), and then holds the activations of many layers at once: for the 3B
config at 1 x 8k on one device, 56 GB of temporaries where one layer at a
time needs 17 GB. GPU and TPU compilers schedule under the device's memory
limit (and rematerialise to meet it). For a GPU or TPU target the plan
therefore also traces remat="full" layers through `sequential_remat`: the
same recomputation, with optimization barriers that make a layer's
backward start when its output cotangent arrives and release its input
cotangent only with its parameter gradients; the launcher keeps XLA from
removing those barriers before scheduling
(--xla_disable_hlo_passes=cse_barrier_expander).

Caveats: the program compiles with the config's dtypes, but XLA:CPU runs
bf16 matmuls in fp32 (float-normalization-bf16; its dot emitter rejects
bf16) and holds fp32 copies of their operands, and it fuses and schedules
differently from the GPU and TPU compilers: for bf16 models the
temporaries err high (one H200 comparison: measured 0.54x the plan; see
README, "Planning a run"). Parameters and optimizer state are exact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from hybridna_jax import sharding
from hybridna_jax.config import ModelConfig
from hybridna_jax.model import scan_block_size
from hybridna_jax.train import flops as flops_lib
from hybridna_jax.train import loop
from hybridna_jax.train import step as step_lib
from hybridna_jax.train.checkpoint import with_shardings
from hybridna_jax.train.stages import Stage, check_batch
from hybridna_jax.train.tasks import LMPretraining

# Mesh axes the search splits the model over (the rest of the devices go to
# `data`), in order of preference at equal split size: fsdp (splits the
# state), then tensor (the state and activations), then context (activations
# only; what is left once the batch rows run out, as at 131k).
SEARCH_AXES = ("fsdp", "tensor", "context")

# The kernels a run uses on each platform where the config says "auto" (or
# the backend-dependent "pallas"): what `kernel_registry` would pick there.
TARGET_KERNELS = {
  "gpu": {"ssd_impl": "pallas_gpu", "attention_impl": "flash_gpu"},
  "tpu": {"ssd_impl": "pallas_tpu", "attention_impl": "splash"},
}

# dtypes of the pretraining batch (`data.pipeline`): tokens and segment ids
# int32, the loss mask float32.
BATCH_DTYPES = {
  "inputs": jnp.int32,
  "targets": jnp.int32,
  "segment_ids": jnp.int32,
  "loss_mask": jnp.float32,
}

GB = 1e9


@dataclasses.dataclass(frozen=True)
class StepPlan:
  """One compiled train step; bytes and FLOPs are per device."""

  mesh: dict[str, int]
  seq_len: int
  batch: int  # global
  grad_accum: int
  platform: str | None  # "gpu"/"tpu": its kernels as proxies; None: as configured
  kernels: dict[str, str]  # ssd_impl, attention_impl traced
  param_bytes: int  # from the state shardings
  opt_bytes: int
  batch_bytes: int
  argument_bytes: int  # from XLA's memory analysis (state + batch)
  output_bytes: int
  alias_bytes: int  # outputs written into donated arguments
  temp_bytes: int  # activations, gradients, workspace
  code_bytes: int
  # XLA's cost analysis: a loop's body counted once (the scanned layers',
  # and grad_accum's micro-batch loop).
  xla_flops: float | None
  model_flops: float  # train/flops.py (remat recomputation not counted)
  lower_s: float
  compile_s: float
  # Repetitions of the scanned layout's block (model.scan_layers); XLA's
  # cost analysis counts the loop's body, i.e. 1/scan_repeats of the layers.
  scan_repeats: int = 1
  remat: str = "none"  # model.remat: XLA's count includes the recomputation
  # Bytes of the collectives' results per device, by kind (`collective_bytes`).
  collectives: dict[str, int] = dataclasses.field(default_factory=dict)

  @property
  def devices(self) -> int:
    return math.prod(self.mesh.values())

  @property
  def peak_bytes(self) -> int:
    """Arguments live throughout; outputs not written in place and the
    temporaries come on top."""
    return (
      self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes
    )

  @property
  def tokens(self) -> int:
    return self.batch * self.seq_len

  def fits(self, accelerator: flops_lib.Accelerator, headroom: float) -> bool:
    return self.peak_bytes <= (1.0 - headroom) * accelerator.memory_bytes

  def step_seconds(self, accelerator: flops_lib.Accelerator, mfu: float) -> float:
    return self.model_flops / (mfu * accelerator.peak_flops)

  def to_json(self) -> dict:
    return {**dataclasses.asdict(self), "devices": self.devices, "peak_bytes": self.peak_bytes}


# ----------------------------------------------------------------------------
# Kernel shape proxies.
# ----------------------------------------------------------------------------


def _proxy_pallas_call(kernel, out_shape=None, **unused_kwargs):
  """`pl.pallas_call` stand-in: outputs of `out_shape`, no work.

  Each output depends on every input (so the inputs stay live until the
  "kernel" runs, as they would), and an optimization barrier makes XLA
  materialise the outputs rather than fuse the broadcasts into their users.
  """
  del kernel, unused_kwargs

  def call(*args):
    leaves = [jnp.asarray(a) for a in jax.tree.leaves(args)]
    seed = sum(
      (a.reshape(-1)[0].astype(jnp.float32) for a in leaves if a.size), jnp.zeros((), jnp.float32)
    )
    outs = jax.tree.map(lambda s: jnp.broadcast_to(seed.astype(s.dtype), s.shape), out_shape)
    return jax.lax.optimization_barrier(outs)

  return call


@contextlib.contextmanager
def kernel_shape_proxies() -> Iterator[None]:
  """Traces Pallas kernels as shape proxies (see the module docstring).

  Clears jax's caches on exit: the public ops are jitted (`jit_dispatch`),
  and a later real call must not reuse a trace made with proxies.
  """
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top

  original = pl.pallas_call
  pl.pallas_call = _proxy_pallas_call
  try:
    yield
  finally:
    pl.pallas_call = original
    jax.clear_caches()


def _sequential_checkpoint(fn: Callable) -> Callable:
  """jax.checkpoint of `fn` (nothing saved but its inputs) whose backward is
  fenced: it starts once the output cotangent exists, and its input
  cotangents come out together with everything else it computes."""

  @jax.custom_vjp
  def checkpointed(*args):
    return fn(*args)

  def forward(*args):
    return fn(*args), args

  def backward(args, cotangent):
    args, cotangent = jax.lax.optimization_barrier((args, cotangent))
    _, vjp = jax.vjp(fn, *args)
    return jax.lax.optimization_barrier(vjp(cotangent))

  checkpointed.defvjp(forward, backward)
  return checkpointed


def _sequential_remat(original: Callable) -> Callable:
  """An `nnx.remat` for layers (module, h, ...) -> (h, cache) whose
  policy is None (remat="full"): `_sequential_checkpoint` on h. The cache
  entry is dropped (None): the train step never reads it, and its zero
  cotangents would otherwise be materialised. Other policies go to
  `original`."""

  def remat(f, *, policy=None, prevent_cse=True, static_argnums=()):
    if policy is not None or static_argnums:
      return original(f, policy=policy, prevent_cse=prevent_cse, static_argnums=static_argnums)

    def call(module, *args):
      graphdef, state = nnx.split(module)
      hidden = _sequential_checkpoint(lambda state, *a: f(nnx.merge(graphdef, state), *a)[0])
      return hidden(state, *args), None

    return call

  return remat


@contextlib.contextmanager
def sequential_remat() -> Iterator[None]:
  """Traces remat="full" layers with a fenced backward (see the module
  docstring, "Layer order"); only for planning, never for running."""
  original = nnx.remat
  nnx.remat = _sequential_remat(original)
  try:
    yield
  finally:
    nnx.remat = original
    jax.clear_caches()


def target_kernels(model_cfg, platform: str | None) -> dict[str, str]:
  """ssd_impl and attention_impl a run on `platform` uses for this config
  (None: as configured)."""
  impls = {k: str(model_cfg[k]) for k in ("ssd_impl", "attention_impl")}
  if platform is None:
    return impls
  target = TARGET_KERNELS[platform]
  for key, impl in impls.items():
    if impl == "auto":
      impls[key] = target[key]
    elif impl == "pallas":  # the backend-dependent SSD name
      impls[key] = f"pallas_{platform}"
  return impls


# ----------------------------------------------------------------------------
# Building and compiling the step.
# ----------------------------------------------------------------------------


def _bytes_per_device(tree) -> int:
  """Bytes one device holds of abstract arrays carrying shardings."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
  return total


@dataclasses.dataclass
class _Built:
  """The step's pieces for one config, mesh and shape (nothing allocated)."""

  config: ml_collections.ConfigDict
  task: LMPretraining
  fns: step_lib.StepFunctions
  state: Any  # ShapeDtypeStructs with shardings
  batch: dict[str, jax.ShapeDtypeStruct]
  kernels: dict[str, str]
  platform: str | None

  @property
  def state_bytes(self) -> int:
    return _bytes_per_device(self.state)


def _build(
  config, mesh_sizes: dict[str, int] | None, seq_len: int, batch: int, platform: str | None
) -> _Built:
  config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy
  for axis, size in (mesh_sizes or {}).items():
    config.mesh[axis] = int(size)
  kernels = target_kernels(config.model, platform)
  config.model.update(kernels)
  task = LMPretraining(config)
  mesh = sharding.mesh_from_config(config.mesh)
  stage = Stage(0, seq_len, 1, batch, 0)
  # The planned shape comes from launch/plan.py's --batch / --seq_len or
  # --stage, not always from config.train.stages[0].
  fields = ("the planned batch (--batch, or its --stage)", "the planned length (--seq_len)")
  check_batch(stage, mesh, int(config.train.grad_accum), fields)
  fns = loop.task_steps(task, config, mesh)
  state = with_shardings(jax.eval_shape(fns.init, jax.random.key(0)), fns.state_shardings)
  batch_specs = {
    k: jax.ShapeDtypeStruct((batch, seq_len), BATCH_DTYPES[k], sharding=fns.batch_shardings[k])
    for k in fns.batch_keys
  }
  return _Built(config, task, fns, state, batch_specs, kernels, platform)


def _compile(built: _Built):
  """(compiled step, lower seconds, compile seconds)."""
  start = time.perf_counter()
  with contextlib.ExitStack() as stack:
    if built.platform is not None:  # trace as the accelerator would run
      stack.enter_context(kernel_shape_proxies())
      stack.enter_context(sequential_remat())
    lowered = built.fns.train_step.lower(built.state, built.batch)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  return compiled, lowered_at - start, time.perf_counter() - lowered_at


COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE_OP = re.compile(r"= (.+?) (" + "|".join(COLLECTIVES) + r")(-start)?\(", re.MULTILINE)
_SHAPE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_HLO_BYTES = {  # bytes per element of an HLO type (f8 types: 1; tuples, tokens: 0)
  **{"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2},
  **{"s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8},
}


_GROUPS = re.compile(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[(\d+),1\]<=")
_PAIRS = re.compile(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}")


def _moves_nothing(line: str) -> bool:
  """Whether a collective's HLO line keeps every device to itself."""
  pairs = _PAIRS.search(line)
  if pairs is not None:
    found = re.findall(r"\{(\d+),(\d+)\}", pairs.group(1))
    return bool(found) and all(a == b for a, b in found)
  if _IOTA_GROUPS.search(line):  # [G,1]<=[...]: G groups of one device
    return True
  groups = _GROUPS.search(line)
  if groups is not None:
    members = re.findall(r"\{([\d,]*)\}", groups.group(1))
    return bool(members) and all("," not in m for m in members)
  return False


def collective_bytes(hlo_text: str) -> dict[str, int]:
  """Bytes of every collective's result in a compiled program's HLO text,
  summed by kind (all-gather, all-reduce, ...): a per-device measure of
  what the step moves between devices. An op in a loop body (the scanned
  layers, grad_accum's micro-batches) is counted once; an async op's
  (-start) tuple by its last member, the result. Ops that move nothing are
  left out: groups of one device each, and permutes whose every pair sends
  a device to itself."""
  out = {kind: 0 for kind in COLLECTIVES}
  for line in hlo_text.splitlines():
    op = _COLLECTIVE_OP.search(line)
    if op is None or _moves_nothing(line):
      continue
    shapes, kind, start = op.groups()
    found = _SHAPE.findall(shapes)
    for dtype, dims in found[-1:] if start else found:
      size = _HLO_BYTES.get(dtype, 1 if dtype.startswith("f8") else 0)
      out[kind] += size * math.prod(int(d) for d in dims.split(",") if d)
  return out


def _xla_flops(compiled) -> float | None:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def _plan_from(built: _Built, compiled, lower_s: float, compile_s: float) -> StepPlan:
  memory = compiled.memory_analysis()
  mesh = dict(built.fns.mesh.shape)
  seq_len, batch = built.batch["inputs"].shape[1], built.batch["inputs"].shape[0]
  model_cfg = built.task.model_cfg
  model_flops = (
    flops_lib.train_flops_per_token(model_cfg, seq_len) * batch * seq_len / math.prod(mesh.values())
  )
  return StepPlan(
    mesh=mesh,
    seq_len=int(seq_len),
    batch=int(batch),
    grad_accum=int(built.config.train.grad_accum),
    platform=built.platform,
    kernels=built.kernels,
    param_bytes=_bytes_per_device(built.state.params),
    opt_bytes=_bytes_per_device(built.state.opt_state),
    batch_bytes=_bytes_per_device(built.batch),
    argument_bytes=int(memory.argument_size_in_bytes),
    output_bytes=int(memory.output_size_in_bytes),
    alias_bytes=int(memory.alias_size_in_bytes),
    temp_bytes=int(memory.temp_size_in_bytes),
    code_bytes=int(memory.generated_code_size_in_bytes),
    xla_flops=_xla_flops(compiled),
    model_flops=float(model_flops),
    lower_s=lower_s,
    compile_s=compile_s,
    scan_repeats=model_cfg.n_layers // (scan_block_size(model_cfg) or model_cfg.n_layers),
    remat=model_cfg.remat,
    collectives=collective_bytes(compiled.as_text()),
  )


def plan_step(
  config,
  *,
  seq_len: int,
  batch: int,
  platform: str | None,
  mesh_sizes: dict[str, int] | None = None,
) -> StepPlan:
  """Compiles the train step of `config` for (batch, seq_len) on the mesh
  `config.mesh` (with `mesh_sizes` overriding its axes) and returns its plan.

  platform: "gpu" or "tpu" trace that platform's kernels as shape proxies;
  None compiles the kernels as configured (on CPU, what a CPU run executes).
  """
  built = _build(config, mesh_sizes, seq_len, batch, platform)
  return _plan_from(built, *_compile(built))


# ----------------------------------------------------------------------------
# Mesh search.
# ----------------------------------------------------------------------------


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def tensor_heads(model_cfg: ModelConfig) -> int:
  """The largest tensor split every layer's heads divide over: the gcd of
  the attention query and key/value heads and the SSM heads and groups
  (of the layer kinds present; one SSM group is shared, not split), as the
  kernels' shard_map wrappers require (`kernels.sharded._axes`). A tensor
  axis they do not divide runs every head on every tensor device: it only
  wastes devices."""
  kinds = set(model_cfg.layer_types)
  counts = []
  if "attention" in kinds:
    counts += [model_cfg.num_heads, model_cfg.num_kv_heads]
  if "mamba" in kinds:
    counts += [model_cfg.ssm_heads] + [model_cfg.ngroups] * (model_cfg.ngroups > 1)
  return math.gcd(*counts)


def candidate_meshes(
  devices: int,
  batch: int,
  grad_accum: int = 1,
  max_tensor: int = 8,
  seq_len: int = 0,
  heads: int = 0,
) -> list[dict[str, int]]:
  """Every split of `devices` over `data` x SEARCH_AXES whose batch axes
  divide the batch (and whose context axis divides `seq_len`, and whose
  tensor axis divides `heads`, where given), least model-parallel first: by
  the product of the SEARCH_AXES sizes, then preferring the earlier axes of
  SEARCH_AXES."""
  meshes = []
  for sizes in itertools.product(_divisors(devices), repeat=len(SEARCH_AXES)):
    split = math.prod(sizes)
    if devices % split:
      continue
    mesh = {"data": devices // split, **dict(zip(SEARCH_AXES, sizes))}
    tensor = mesh["tensor"]
    if tensor > max_tensor or (heads and heads % tensor):
      continue
    if seq_len and seq_len % mesh["context"]:
      continue
    batch_ways = math.prod(mesh.get(a, 1) for a in sharding.BATCH_AXES)
    if batch % (batch_ways * grad_accum):
      continue
    meshes.append(mesh)
  meshes.sort(
    key=lambda m: (math.prod(m[a] for a in SEARCH_AXES), [m[a] for a in reversed(SEARCH_AXES)])
  )
  return meshes


@dataclasses.dataclass(frozen=True)
class SearchStep:
  """One mesh the search looked at: its plan, or why it was not compiled."""

  mesh: dict[str, int]
  plan: StepPlan | None
  skipped: str | None = None


def search_mesh(
  config,
  *,
  devices: int,
  seq_len: int,
  batch: int,
  accelerator: flops_lib.Accelerator,
  headroom: float,
  platform: str | None,
  max_tensor: int = 8,
  report: Callable[[SearchStep], None] = lambda step: None,
) -> list[SearchStep]:
  """Tries `candidate_meshes` in order until one fits `accelerator`; the
  last entry is the suggestion when its plan fits.

  A mesh whose state (parameters + optimizer, exact from the shardings)
  alone exceeds the budget is skipped without compiling.
  """
  budget = (1.0 - headroom) * accelerator.memory_bytes
  steps = []
  grad_accum = int(config.train.grad_accum)
  heads = tensor_heads(ModelConfig.from_config(config.model))
  for mesh in candidate_meshes(devices, batch, grad_accum, max_tensor, seq_len, heads):
    built = _build(config, {**mesh, "num_devices": devices}, seq_len, batch, platform)
    if built.state_bytes > budget:
      step = SearchStep(
        mesh, None, f"state alone {built.state_bytes / GB:.1f} GB > {budget / GB:.1f} GB"
      )
    else:
      step = SearchStep(mesh, _plan_from(built, *_compile(built)))
    steps.append(step)
    report(step)
    if step.plan is not None and step.plan.fits(accelerator, headroom):
      break
  return steps


# ----------------------------------------------------------------------------
# Checking the plan against a real step on CPU.
# ----------------------------------------------------------------------------


def real_batch(built: _Built) -> dict[str, jax.Array]:
  """A batch of the planned shape on the planned devices (token 0, one
  document per row, every position in the loss), to run the step."""
  host = {k: np.zeros(s.shape, s.dtype) for k, s in built.batch.items()}
  host["segment_ids"][:] = 1
  host["loss_mask"][:] = 1.0
  return step_lib.device_batch(host, built.fns.batch_shardings, built.fns.batch_keys)


def _rss_bytes() -> int:
  with open("/proc/self/statm", encoding="ascii") as f:
    return int(f.read().split()[1]) * 4096  # resident pages (4 KiB on Linux)


@dataclasses.dataclass(frozen=True)
class CpuMeasurement:
  """Process memory around one real train step on the fake CPU mesh, for
  all devices together (they share the process)."""

  predicted_bytes: int  # devices x StepPlan.peak_bytes
  measured_bytes: int  # peak RSS during the step - RSS before the state existed
  plan: StepPlan


def measure_on_cpu(
  config,
  *,
  seq_len: int,
  batch: int,
  mesh_sizes: dict[str, int] | None = None,
  poll_s: float = 5e-4,
) -> CpuMeasurement:
  """Runs the planned step (kernels as configured) on real zero arrays and
  samples the resident set size; for small configs (tests, the demo).

  Everything is compiled before the baseline is read, so the measured growth
  is the state, the batch and what the step allocates. Linux only.
  """
  built = _build(config, mesh_sizes, seq_len, batch, None)
  compiled, lower_s, compile_s = _compile(built)
  plan = _plan_from(built, compiled, lower_s, compile_s)
  init = built.fns.init.lower(jax.random.key(0)).compile()
  baseline = _rss_bytes()
  state = init(jax.random.key(0))
  device_batch = real_batch(built)
  jax.block_until_ready((state, device_batch))

  peak, done = [_rss_bytes()], threading.Event()

  def sample():
    while not done.is_set():
      peak[0] = max(peak[0], _rss_bytes())
      time.sleep(poll_s)

  sampler = threading.Thread(target=sample, daemon=True)
  sampler.start()
  try:
    jax.block_until_ready(compiled(state, device_batch))
  finally:
    done.set()
    sampler.join()
  peak[0] = max(peak[0], _rss_bytes())
  return CpuMeasurement(plan.devices * plan.peak_bytes, peak[0] - baseline, plan)


# ----------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------


def _gb(n: float) -> str:
  return f"{n / GB:,.2f} GB" if n >= GB else f"{n / 1e6:,.1f} MB"


def format_plan(
  plan: StepPlan, accelerator_name: str | None = None, headroom: float = 0.1, mfu: float = 0.4
) -> str:
  """The human-readable report launch/plan.py prints."""
  mesh = " ".join(f"{k}={v}" for k, v in plan.mesh.items())
  where = (
    "kernels as configured"
    if plan.platform is None
    else f"{plan.platform} kernels as shape proxies"
  )
  lines = [
    f"step: {plan.batch} x {plan.seq_len:,} nt ({plan.tokens:,} tokens), "
    f"grad_accum {plan.grad_accum}",
    f"mesh: {mesh} ({plan.devices} fake CPU devices); {where}: "
    f"ssd {plan.kernels['ssd_impl']}, attention {plan.kernels['attention_impl']}",
    f"compile: lower {plan.lower_s:.1f} s, compile {plan.compile_s:.1f} s",
    "per device (XLA memory analysis):",
    f"  parameters            {_gb(plan.param_bytes):>12}",
    f"  optimizer state       {_gb(plan.opt_bytes):>12}",
    f"  batch                 {_gb(plan.batch_bytes):>12}",
    f"  (arguments in all     {_gb(plan.argument_bytes):>12})",
    f"  outputs not in place  {_gb(plan.output_bytes - plan.alias_bytes):>12}",
    f"  temporaries           {_gb(plan.temp_bytes):>12}   (activations, gradients, workspace)",
    f"  generated code        {_gb(plan.code_bytes):>12}",
    f"  peak                  {_gb(plan.peak_bytes):>12}",
  ]
  xla = plan.xla_flops
  ratio = f"{xla / plan.model_flops:.2f}" if xla and plan.model_flops else "n/a"
  lines.append(
    f"FLOPs per device per step: XLA {xla or float('nan'):.3e}, train/flops.py "
    f"{plan.model_flops:.3e} (XLA / model {ratio}"
    + ("; XLA counts remat recomputation" if plan.remat != "none" else "")
    + ("; kernels traced as proxies count nothing" if plan.platform is not None else "")
    + ("; the XLA reference kernels count their masked work too" if plan.platform is None else "")
    + (
      f"; the layers' scan counted once, not {plan.scan_repeats} times"
      if plan.scan_repeats > 1
      else ""
    )
    + (
      f"; the micro-batch loop counted once, not {plan.grad_accum} times"
      if plan.grad_accum > 1
      else ""
    )
    + ")"
  )
  moved = {k: v for k, v in plan.collectives.items() if v}
  if moved:
    lines.append(
      "collectives per device per step (bytes of their results; a loop body counted once): "
      + ", ".join(f"{k} {_gb(v)}" for k, v in moved.items())
    )
  if accelerator_name:
    accel = flops_lib.ACCELERATORS[accelerator_name]
    budget = (1.0 - headroom) * accel.memory_bytes
    verdict = "fits" if plan.fits(accel, headroom) else "does NOT fit"
    seconds = plan.step_seconds(accel, mfu)
    lines.append(
      f"{accelerator_name} ({accel.memory_bytes / GB:.0f} GB, "
      f"{accel.peak_flops / 1e12:.0f} TFLOP/s bf16): {verdict} with "
      f"{headroom:.0%} headroom ({_gb(plan.peak_bytes)} of {_gb(budget)}); "
      f"step {seconds:.3g} s at {mfu:.0%} MFU "
      f"({plan.tokens / seconds / 1e6:.2f}M tokens/s over {plan.devices} devices)"
    )
  return "\n".join(lines)
