"""Benchmark of the SSD scan: Pallas kernels beside the XLA path (and
mamba_ssm's Triton kernel when it imports).

For each shape it prints one row per implementation: forward time,
forward+backward time, TFLOP/s of each (the same FLOP count for every
implementation: the matmuls of the chunked algorithm, causal halves counted
once, see `ssd_pallas.flops`), and the memory of the forward+backward: for
JAX, XLA's buffer assignment (arguments + outputs + temporaries of the
compiled step); for PyTorch, the peak allocated bytes.

    python benchmarks/ssd.py                       # the H100 grid
    python benchmarks/ssd.py --small               # CPU smoke run
    python benchmarks/ssd.py --batch 1 2 --seqlen 32768 --heads 32

Shapes are (batch, length, heads, headdim, d_state), one B/C group, chunk 256,
bf16 inputs, fp32 dt/A; dt_softplus with a dt bias, D and z off (they are
elementwise XLA work shared by every implementation).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import add_grid_arguments, failure, grid_shapes, median_seconds, resolve_grid  # noqa: E402  pylint: disable=g-import-not-at-top

from hybridna_jax import ssd
from hybridna_jax.kernels import ssd_pallas

GRID = dict(batch=[1, 2, 4, 8], seqlen=[8192, 32768, 131072], heads=[16, 32, 64])
SMALL = dict(batch=[1], seqlen=[512, 1024], heads=[2])


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  add_grid_arguments(parser)
  parser.add_argument("--headdim", type=int, default=64)
  parser.add_argument("--dstate", type=int, default=128)
  parser.add_argument("--groups", type=int, default=1)
  parser.add_argument("--chunk", type=int, default=256)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument(
    "--impls",
    nargs="+",
    default=None,
    help="ssd impls (default: pallas chunked, and mamba_ssm when importable)",
  )
  args = parser.parse_args(argv)
  resolve_grid(args, GRID, SMALL)
  if args.impls is None:
    args.impls = ["pallas", "chunked", "mamba_ssm"]
  return args


def make_inputs(b, l, h, p, n, g, dtype, seed=0):
  rng = np.random.default_rng(seed)
  normal = lambda *s: rng.standard_normal(s, np.float32)
  return dict(
    x=jnp.asarray(normal(b, l, h, p), dtype),
    dt=jnp.asarray(normal(b, l, h) - 2.0),
    A=jnp.asarray(-np.exp(rng.uniform(0, np.log(16), h)), jnp.float32),
    B=jnp.asarray(normal(b, l, g, n), dtype),
    C=jnp.asarray(normal(b, l, g, n), dtype),
    dt_bias=jnp.asarray(normal(h) * 0.1),
  )


def jax_case(impl, inputs, chunk, iters, warmup):
  """(fwd s, fwd+bwd s, bytes of the compiled fwd+bwd) for a JAX impl."""

  def forward(x, dt, A, B, C, dt_bias):
    return ssd.ssd_chunked_scan(
      x, dt, A, B, C, chunk, dt_bias=dt_bias, dt_softplus=True, return_final_states=True, impl=impl
    )

  def loss(x, dt, A, B, C, dt_bias):
    y, final = forward(x, dt, A, B, C, dt_bias)
    return y.astype(jnp.float32).sum() + final.sum()

  args = tuple(inputs[k] for k in ("x", "dt", "A", "B", "C", "dt_bias"))
  fwd = jax.jit(forward).lower(*args).compile()
  bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5))).lower(*args).compile()
  t_fwd = median_seconds(lambda: jax.block_until_ready(fwd(*args)), iters, warmup)
  t_bwd = median_seconds(lambda: jax.block_until_ready(bwd(*args)), iters, warmup)
  mem = bwd.memory_analysis()
  compiled = None
  if mem is not None:
    compiled = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
  return t_fwd, t_bwd, compiled


def mamba_case(inputs, chunk, iters, warmup):
  """The same call through mamba_ssm's Triton kernels (PyTorch, CUDA)."""
  import torch  # pylint: disable=g-import-not-at-top
  from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined  # pylint: disable=g-import-not-at-top

  dev = "cuda"
  t = {k: torch.from_numpy(np.asarray(v.astype(jnp.float32))).to(dev) for k, v in inputs.items()}
  dtype = torch.bfloat16 if inputs["x"].dtype == jnp.bfloat16 else torch.float32
  for k in ("x", "B", "C"):
    t[k] = t[k].to(dtype)
  leaves = {k: v.clone().requires_grad_(True) for k, v in t.items()}

  def fwd():
    with torch.no_grad():
      mamba_chunk_scan_combined(
        t["x"],
        t["dt"],
        t["A"],
        t["B"],
        t["C"],
        chunk,
        dt_bias=t["dt_bias"],
        dt_softplus=True,
        return_final_states=True,
      )
    torch.cuda.synchronize()

  def fwd_bwd():
    y, final = mamba_chunk_scan_combined(
      leaves["x"],
      leaves["dt"],
      leaves["A"],
      leaves["B"],
      leaves["C"],
      chunk,
      dt_bias=leaves["dt_bias"],
      dt_softplus=True,
      return_final_states=True,
    )
    (y.float().sum() + final.sum()).backward()
    torch.cuda.synchronize()

  t_fwd = median_seconds(fwd, iters, warmup)
  torch.cuda.reset_peak_memory_stats()
  t_bwd = median_seconds(fwd_bwd, iters, warmup)
  return t_fwd, t_bwd, torch.cuda.max_memory_allocated()


def mamba_available():
  try:
    import torch  # pylint: disable=g-import-not-at-top
    from mamba_ssm.ops.triton import ssd_combined  # pylint: disable=g-import-not-at-top

    return torch.cuda.is_available() and hasattr(ssd_combined, "mamba_chunk_scan_combined")
  except Exception:  # pylint: disable=broad-except
    return False


def fmt_bytes(v):
  return "-" if v is None else f"{v / 2**30:.2f}"


def main(argv=None):
  args = parse_args(argv)
  dtype = jnp.dtype(args.dtype)
  impls = [i for i in args.impls if i != "mamba_ssm" or mamba_available()]
  skipped = sorted(set(args.impls) - set(impls))
  dev = jax.devices()[0]
  print(
    f"# SSD benchmark: device {dev.device_kind} ({jax.default_backend()}), "
    f"jax {jax.__version__}, {args.dtype}, headdim {args.headdim}, d_state "
    f"{args.dstate}, groups {args.groups}, chunk {args.chunk}, median of "
    f"{args.iters}"
  )
  if skipped:
    print(f"# not available here: {', '.join(skipped)}")
  if jax.default_backend() == "cpu" and "pallas" in impls:
    print(
      "# on CPU 'pallas' runs the Triton variant in interpret mode: "
      "its times say nothing about GPU speed"
    )
  header = (
    f"{'b':>2} {'L':>7} {'h':>3} | {'impl':<10} | {'fwd ms':>9} "
    f"{'TF/s':>6} | {'f+b ms':>9} {'TF/s':>6} | {'f+b GiB':>8}"
  )
  print(header)
  print("-" * len(header))
  for b, l, h in grid_shapes(args):
    inputs = make_inputs(b, l, h, args.headdim, args.dstate, args.groups, dtype)
    fl_f = ssd_pallas.flops(b, l, h, args.headdim, args.dstate, args.groups, args.chunk)
    fl_b = ssd_pallas.flops(
      b, l, h, args.headdim, args.dstate, args.groups, args.chunk, backward=True
    )
    base = {}
    for impl in impls:
      try:
        if impl == "mamba_ssm":
          t_f, t_b, mem = mamba_case(inputs, args.chunk, args.iters, args.warmup)
        else:
          t_f, t_b, mem = jax_case(impl, inputs, args.chunk, args.iters, args.warmup)
      except Exception as e:  # pylint: disable=broad-except
        print(f"{b:>2} {l:>7} {h:>3} | {impl:<10} | {failure(e)}")
        continue
      base[impl] = (t_f, t_b)
      print(
        f"{b:>2} {l:>7} {h:>3} | {impl:<10} | {t_f * 1e3:>9.2f} "
        f"{fl_f / t_f / 1e12:>6.3g} | {t_b * 1e3:>9.2f} "
        f"{fl_b / t_b / 1e12:>6.3g} | {fmt_bytes(mem):>8}"
      )
    if "pallas" in base and "chunked" in base:
      (pf, pb), (xf, xb) = base["pallas"], base["chunked"]
      line = f"   speed-up of pallas over XLA: fwd {xf / pf:.2f}x, f+b {xb / pb:.2f}x"
      if "mamba_ssm" in base:
        mf, mb = base["mamba_ssm"]
        line += f"; over mamba_ssm: fwd {mf / pf:.2f}x, f+b {mb / pb:.2f}x"
      print(line)
    sys.stdout.flush()


if __name__ == "__main__":
  main()
