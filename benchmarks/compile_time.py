"""Train-step compile time of the loop and scanned layer layouts
(`model.scan_layers`) as the stack gets deeper.

For each depth and layout: the full jitted train step of `build_steps`
(forward, backward, AdamW update) on one device, traced and lowered, then
compiled by XLA. "init s" is the same for the jitted initialisation of the
train state (parameters and AdamW moments), which a fresh run compiles too.
The lowered StableHLO text size shows what the compiler is given; "temp MB"
is the compiled program's scratch memory; with --iters > 0 the median step
time is measured too (on real parameters).

  python benchmarks/compile_time.py                       # 8, 16, 32 layers
  python benchmarks/compile_time.py --layers 8 16 --remat full --iters 3

Use a fresh process per measurement set: JAX's persistent compilation
cache stays off here (no jax_compilation_cache_dir), so every compile is cold.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import environment  # noqa: E402

from hybridna_jax import sharding  # noqa: E402
from hybridna_jax.config import ModelConfig, load_config  # noqa: E402
from hybridna_jax.model import HybriDNA, scan_block_size  # noqa: E402
from hybridna_jax.train import optimizer as optimizer_lib  # noqa: E402
from hybridna_jax.train import step as step_lib  # noqa: E402


def model_config(n_layers: int, d_model: int, scan: bool, remat: str) -> ModelConfig:
  """A narrow model with the paper's layer pattern (attention at i % 8 == 4)."""
  return dataclasses.replace(
    ModelConfig(),
    d_model=d_model,
    n_layers=n_layers,
    attn_period=8,
    attn_offset=4,
    mlp_dim=2 * d_model,
    num_heads=4,
    num_kv_heads=2,
    head_dim=d_model // 4,
    d_state=16,
    ssm_head_dim=16,
    chunk_size=64,
    dtype="float32",
    remat=remat,
    scan_layers=scan,
  )


def batch_arrays(batch: int, seq_len: int) -> dict:
  toks = np.random.default_rng(0).integers(5, 9, (batch, seq_len + 1)).astype(np.int32)
  return dict(
    inputs=toks[:, :-1],
    targets=toks[:, 1:],
    segment_ids=np.ones((batch, seq_len), np.int32),
    loss_mask=np.ones((batch, seq_len), np.float32),
  )


def measure(cfg: ModelConfig, batch: int, seq_len: int, iters: int) -> dict:
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  optimizer, schedule = optimizer_lib.make_optimizer(load_config("configs/tiny.py").train, 100)
  fns = step_lib.build_steps(
    lambda rngs: HybriDNA(cfg, rngs=rngs), step_lib.lm_loss, optimizer, schedule, mesh
  )
  start = time.perf_counter()
  fns.init.lower(jax.random.key(0)).compile()
  init_s = time.perf_counter() - start
  abstract_state = jax.eval_shape(fns.init, jax.random.key(0))
  arrays = batch_arrays(batch, seq_len)
  abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in arrays.items()}

  start = time.perf_counter()
  lowered = fns.train_step.lower(abstract_state, abstract_batch)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  row = dict(
    init_s=init_s,
    lower_s=lower_s,
    compile_s=compile_s,
    hlo_kb=len(lowered.as_text()) / 1024,
    temp_mb=compiled.memory_analysis().temp_size_in_bytes / 2**20,
    step_s=None,
  )
  if iters:
    state = fns.init(jax.random.key(0))
    device_batch = step_lib.device_batch(arrays, fns.batch_sharding)
    times = []
    for _ in range(iters + 1):  # the first call is a warm-up
      start = time.perf_counter()
      state, metrics = compiled(state, device_batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
    row["step_s"] = statistics.median(times[1:])
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--layers", type=int, nargs="+", default=[8, 16, 32])
  parser.add_argument("--layouts", nargs="+", default=["loop", "scan"], choices=["loop", "scan"])
  parser.add_argument("--d_model", type=int, default=64)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--remat", default="none", choices=["none", "full", "dots"])
  parser.add_argument("--iters", type=int, default=0, help="timed train steps (0: none)")
  args = parser.parse_args()

  print(environment())
  print(
    f"train step of build_steps on 1 device: d_model {args.d_model}, batch {args.batch} x "
    f"{args.seq_len} nt, fp32, remat {args.remat}, attention at i % 8 == 4"
  )
  header = (
    f"{'layers':>6}  {'layout':<6}{'init s':>8}{'lower s':>9}{'compile s':>11}{'HLO KB':>9}"
    f"{'temp MB':>9}{'step s':>9}"
  )
  print(header)
  for n_layers in args.layers:
    for layout in args.layouts:
      cfg = model_config(n_layers, args.d_model, layout == "scan", args.remat)
      if layout == "scan" and scan_block_size(cfg) is None:
        print(f"{n_layers:>6}  {layout:<6}  (pattern does not repeat: no scanned layout)")
        continue
      r = measure(cfg, args.batch, args.seq_len, args.iters)
      step = f"{r['step_s']:>9.3f}" if r["step_s"] is not None else f"{'-':>9}"
      print(
        f"{n_layers:>6}  {layout:<6}{r['init_s']:>8.1f}{r['lower_s']:>9.1f}{r['compile_s']:>11.1f}"
        f"{r['hlo_kb']:>9.0f}{r['temp_mb']:>9.1f}{step}",
        flush=True,
      )


if __name__ == "__main__":
  main()
