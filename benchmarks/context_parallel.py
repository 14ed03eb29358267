"""Context parallelism on fake CPU devices: per-device memory and train-step
time of the tiny model as one sequence is split over 1, 2, 4 and 8 devices.

For each length and context size: the jitted train step of `build_steps`
(forward, backward, AdamW) for one sequence, compiled for a mesh of
`context` fake CPU devices (data = fsdp = tensor = 1). "temp MB" is the
compiled program's per-device scratch memory (XLA's memory analysis: the
activations and everything else the step allocates), "args MB" its
per-device inputs (parameters, optimizer state, batch). With --time_up_to,
steps up to that length are also run and timed (median of --iters after a
warm-up); the fake devices share the host's cores, so the time shows the
overhead of the split, not a speed-up.

  python benchmarks/context_parallel.py                    # 32k..1M x 1,2,4,8
  python benchmarks/context_parallel.py --lengths 131072 --attention ring allgather
  python benchmarks/context_parallel.py --no_attention --lengths 1048576 --contexts 8 \
      --chunk_size 16 --remat full --time_up_to 1048576

With --attention_op, the attention op alone (forward + backward of
`causal_attention`, HybriDNA-300M's heads: 16 query, 4 key/value, 64 wide;
one sequence, two packed documents) for each context method side by side:
"temp MB" is the compiled op's per-device temporaries (XLA's memory
analysis; lengths above --time_up_to are only compiled), "wall s" the fake
devices' time (they share the host's cores, so it sums every device's
work), "critical s" the slowest device's share: each device's attention
blocks per ring step (the shapes each method computes there),
timed one at a time on one device and summed over the steps as the
slowest device at each step (collectives excluded; on real devices the step
waits for the slowest device); "critical blocks" the same in units of one
slice-by-slice block (query x key positions), without timing. Times are
the fewest seconds of --iters calls (other jobs may share the cores).

  python benchmarks/context_parallel.py --attention_op --lengths 8192 32768 --contexts 8 \
      --attention ring zigzag allgather
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import environment, time_jitted  # noqa: E402

from hybridna_jax import attention_reference, sharding  # noqa: E402
from hybridna_jax.attention import causal_attention  # noqa: E402
from hybridna_jax.config import CONTEXT_ATTENTION, ModelConfig, load_config  # noqa: E402
from hybridna_jax.model import HybriDNA  # noqa: E402
from hybridna_jax.train import optimizer as optimizer_lib  # noqa: E402
from hybridna_jax.train import step as step_lib  # noqa: E402

MB = 2**20


def tiny_model(attention: str, with_attention: bool, chunk_size: int, remat: str) -> ModelConfig:
  """configs/tiny.py (4 layers, attention at layer 2), or its three Mamba2
  layers alone (attention is quadratic: at 1M it dominates a CPU run)."""
  cfg = ModelConfig.from_config(load_config("configs/tiny.py").model)
  # xla_blockwise on one device: the online softmax that each context slice
  # runs (the dense reference would hold l x l scores).
  cfg = dataclasses.replace(
    cfg,
    context_attention=attention,
    chunk_size=chunk_size,
    attention_impl="xla_blockwise",
    remat=remat,
  )
  if not with_attention:
    cfg = dataclasses.replace(cfg, attn_layers=(), n_layers=3)
  return cfg


def one_sequence(seq_len: int) -> dict:
  toks = np.random.default_rng(0).integers(5, 9, (1, seq_len + 1)).astype(np.int32)
  seg = np.ones((1, seq_len), np.int32)
  seg[:, seq_len // 3 :] = 2  # two packed documents
  return dict(
    inputs=toks[:, :-1],
    targets=toks[:, 1:],
    segment_ids=seg,
    loss_mask=np.ones((1, seq_len), np.float32),
  )


def measure(cfg: ModelConfig, seq_len: int, context: int, iters: int) -> dict:
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:context], context=context)
  optimizer, schedule = optimizer_lib.make_optimizer(load_config("configs/tiny.py").train, 100)
  fns = step_lib.build_steps(
    lambda rngs: HybriDNA(cfg, rngs=rngs), step_lib.lm_loss, optimizer, schedule, mesh
  )
  abstract_state = jax.eval_shape(fns.init, jax.random.key(0))
  arrays = one_sequence(seq_len)
  abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in arrays.items()}
  start = time.perf_counter()
  compiled = fns.train_step.lower(abstract_state, abstract_batch).compile()
  memory = compiled.memory_analysis()
  row = dict(
    compile_s=time.perf_counter() - start,
    temp_mb=memory.temp_size_in_bytes / MB,
    args_mb=memory.argument_size_in_bytes / MB,
    step_s=None,
    loss=None,
  )
  if iters:
    state = fns.init(jax.random.key(0))
    batch = step_lib.device_batch(arrays, fns.batch_sharding)
    times = []
    for _ in range(iters + 1):  # the first call is a warm-up
      start = time.perf_counter()
      state, metrics = compiled(state, batch)  # the step donates its state
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
    row["step_s"] = statistics.median(times[1:])
    row["loss"] = float(metrics["loss"])  # of the last step: equal across context sizes
  return row


HEADS = dict(hq=16, hkv=4, d=64)  # configs/hybridna_300m.py


def attention_inputs(lq: int, lk: int):
  """q (1, lq, 16, 64), k and v (1, lk, 4, 64)."""
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (1, lq, HEADS["hq"], HEADS["d"]))
  k, v = (jax.random.normal(key, (1, lk, HEADS["hkv"], HEADS["d"])) for key in keys[1:])
  return q, k, v


def attention_op(seq_len: int, context: int, method: str, iters: int) -> tuple[float, float | None]:
  """Per-device temporary MB (XLA's memory analysis) and the fewest seconds
  (None when `iters` is 0) of forward + backward of the attention op on a
  mesh of `context` fake devices."""
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:context], context=context)
  q, k, v = attention_inputs(seq_len, seq_len)
  seg = (jnp.arange(seq_len) >= seq_len // 3).astype(jnp.int32)[None]  # two documents

  @jax.jit
  def step(q, k, v):
    def loss(q, k, v):
      with sharding.activate(mesh):
        out = causal_attention(q, k, v, seg, impl="xla_blockwise", context=method)
      return jnp.sum(out * out)

    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  temp_mb = step.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes / 2**20
  if not iters:
    return temp_mb, None
  return temp_mb, time_jitted(step, q, k, v, iters=iters)["min_s"]


def block_shapes(method: str, shards: int, lq: int) -> list[list[list[tuple[int, int]]]]:
  """(queries, keys) of the blocks that device i computes at ring step s,
  [s][i] -> list, as `hybridna_jax.kernels.sharded` schedules them."""
  h = lq // 2
  if method in ("ring", "allgather"):  # slice i sees slices i, i-1, ..., 0
    return [[[(lq, lq)] if s <= i else [] for i in range(shards)] for s in range(shards)]
  assert method == "zigzag"
  steps = [[[(lq, h), (h, h)] for _ in range(shards)]]  # own chunks
  for s in range(1, shards):  # from an earlier shard: (lq, h); from a later one: (h, lq)
    steps.append([[(lq, h)] if s <= i else [(h, lq)] for i in range(shards)])
  return steps


def critical_seconds(seq_len: int, context: int, method: str, iters: int, cache: dict) -> float:
  """The slowest device's attention time per ring step, summed: each block
  shape timed (forward + backward) on one device."""

  def block_seconds(lq: int, lk: int) -> float:
    if (lq, lk) not in cache:
      q, k, v = attention_inputs(lq, lk)
      pos_q, pos_k = jnp.arange(lq) + lk, jnp.arange(lk)  # every key visible
      seg_q, seg_k = jnp.zeros((1, lq), jnp.int32), jnp.zeros((1, lk), jnp.int32)

      @jax.jit
      def block(q, k, v):
        def loss(q, k, v):
          out, lse = attention_reference.blockwise_attention_lse(
            q, k, v, pos_q, pos_k, seg_q, seg_k, block=512
          )
          return jnp.sum(out * out) + jnp.sum(lse)

        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

      with jax.default_device(jax.devices()[0]):
        cache[lq, lk] = time_jitted(block, q, k, v, iters=iters)["min_s"]
    return cache[lq, lk]

  steps = block_shapes(method, context, seq_len // context)
  return sum(max(sum(block_seconds(*b) for b in dev) for dev in step) for step in steps)


def critical_blocks(seq_len: int, context: int, method: str) -> float:
  """The slowest device's attention work per ring step, summed, in blocks of
  lq x lq query x key positions."""
  lq = seq_len // context
  steps = block_shapes(method, context, lq)
  return sum(max(sum(a * b for a, b in dev) for dev in step) for step in steps) / lq**2


def attention_op_table(args) -> None:
  print(
    "attention op, forward + backward: 1 sequence, 16 query / 4 key-value heads x 64, "
    "two packed documents, fp32, blockwise (512 keys) per block"
  )
  print(
    f"{'length':>9}{'context':>8}  {'method':<10}{'temp MB':>10}{'wall s':>9}{'critical s':>11}"
    f"{'critical blocks':>16}"
  )
  cache = {}
  for seq_len in args.lengths:
    for context in args.contexts:
      for method in args.attention:
        timed = seq_len <= args.time_up_to
        temp_mb, wall = attention_op(seq_len, context, method, args.iters if timed else 0)
        blocks = critical_blocks(seq_len, context, method)
        if timed:
          crit = critical_seconds(seq_len, context, method, args.iters, cache)
          times = f"{wall:>9.2f}{crit:>11.2f}"
        else:
          times = f"{'-':>9}{'-':>11}"
        print(
          f"{seq_len:>9}{context:>8}  {method:<10}{temp_mb:>10.1f}{times}{blocks:>16.2f}",
          flush=True,
        )


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072, 262144, 1048576])
  parser.add_argument("--contexts", type=int, nargs="+", default=[1, 2, 4, 8])
  parser.add_argument(
    "--attention", nargs="+", default=[CONTEXT_ATTENTION[0]], choices=CONTEXT_ATTENTION
  )
  parser.add_argument("--attention_op", action="store_true", help="the attention op alone")
  parser.add_argument("--no_attention", action="store_true", help="the Mamba2 layers only")
  parser.add_argument("--chunk_size", type=int, default=256)
  parser.add_argument("--remat", default="none", choices=["none", "full", "dots"])
  parser.add_argument("--time_up_to", type=int, default=32768, help="run steps up to this length")
  parser.add_argument("--iters", type=int, default=2)
  args = parser.parse_args()

  print(environment())
  if args.attention_op:
    attention_op_table(args)
    return
  layers = "3 Mamba2 layers" if args.no_attention else "4 layers MMAM"
  print(
    f"tiny model ({layers}, d_model 32, fp32, chunk {args.chunk_size}, remat {args.remat}): "
    "train step of one "
    "sequence, two packed documents; per-device memory from XLA's memory analysis"
  )
  header = (
    f"{'length':>9}{'context':>8}  {'attention':<10}{'compile s':>10}{'temp MB':>10}"
    f"{'args MB':>9}{'step s':>9}{'loss':>9}"
  )
  print(header)
  for seq_len in args.lengths:
    for attention in args.attention:
      cfg = tiny_model(attention, not args.no_attention, args.chunk_size, args.remat)
      for context in args.contexts:
        iters = args.iters if seq_len <= args.time_up_to else 0
        r = measure(cfg, seq_len, context, iters)
        step = f"{r['step_s']:>9.2f}" if r["step_s"] is not None else f"{'-':>9}"
        loss = f"{r['loss']:>9.5f}" if r["loss"] is not None else f"{'-':>9}"
        name = "-" if args.no_attention else attention
        print(
          f"{seq_len:>9}{context:>8}  {name:<10}{r['compile_s']:>10.1f}{r['temp_mb']:>10.1f}"
          f"{r['args_mb']:>9.2f}{step}{loss}",
          flush=True,
        )


if __name__ == "__main__":
  main()
