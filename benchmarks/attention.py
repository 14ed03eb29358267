"""Benchmark of causal attention: the kernels beside the XLA paths (and
PyTorch's flash attention when torch with CUDA imports).

One row per (shape, implementation): forward time, forward+backward time,
TFLOP/s (causal FLOPs: 2 b h l^2 d forward, 2.5x that backward), the share of
the device's bf16 dense peak where it is known (or given by --peak-tflops),
and the memory of the forward+backward (JAX: XLA's buffer assignment of the
compiled step; PyTorch: peak allocated bytes).

    python benchmarks/attention.py                     # the H100 grid
    python benchmarks/attention.py --small             # CPU smoke run
    python benchmarks/attention.py --seqlen 32768 --heads 16 --headdim 128

Implementations (names of `attention.KERNELS`): by default on GPU
pallas_gpu, cudnn, xla_blockwise, xla; on TPU splash, xla_blockwise, xla; on
CPU xla, xla_blockwise, pallas_gpu_interpret. With --segments, packed
documents (segment ids) are passed (cuDNN does not take them).
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

from hybridna_jax import attention
from hybridna_jax.kernels import attention_kernels
from hybridna_jax.train import flops

GRID = dict(batch=[1, 2, 4, 8], seqlen=[8192, 32768, 131072], heads=[16, 32, 64])
SMALL = dict(batch=[1], seqlen=[256, 512], heads=[2])


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  add_grid_arguments(parser)
  parser.add_argument(
    "--kv-heads", type=int, default=None, help="key/value heads (default: heads, i.e. MHA)"
  )
  parser.add_argument("--headdim", type=int, default=128)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument(
    "--segments", type=int, default=0, help="pack this many documents per row (segment ids)"
  )
  parser.add_argument("--impls", nargs="+", default=None)
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--peak-tflops", type=float, default=None)
  args = parser.parse_args(argv)
  resolve_grid(args, GRID, SMALL)
  if args.small:
    if args.headdim == 128:
      args.headdim = 64
  if args.impls is None:
    args.impls = {
      "gpu": ["pallas_gpu", "cudnn", "xla_blockwise", "xla"],
      "tpu": ["splash", "xla_blockwise", "xla"],
    }.get(jax.default_backend(), ["xla", "xla_blockwise", "pallas_gpu_interpret"])
  return args


def make_inputs(b, l, hq, hkv, d, dtype, segments, seed=0):
  rng = np.random.default_rng(seed)
  normal = lambda *s: jnp.asarray(rng.standard_normal(s, np.float32), dtype)
  seg = None
  if segments > 1:
    cuts = np.sort(rng.choice(np.arange(1, l), segments - 1, replace=False))
    seg = np.ones((b, l), np.int32)
    for c in cuts:
      seg[:, c:] += 1
    seg = jnp.asarray(seg)
  return normal(b, l, hq, d), normal(b, l, hkv, d), normal(b, l, hkv, d), seg


def jax_case(impl, q, k, v, seg, iters, warmup):
  fn = attention.KERNELS.resolve(impl).fn

  def loss(q, k, v):
    return fn(q, k, v, seg).astype(jnp.float32).sum()

  fwd = jax.jit(lambda q, k, v: fn(q, k, v, seg)).lower(q, k, v).compile()
  bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
  t_f = median_seconds(lambda: jax.block_until_ready(fwd(q, k, v)), iters, warmup)
  t_b = median_seconds(lambda: jax.block_until_ready(bwd(q, k, v)), iters, warmup)
  mem = bwd.memory_analysis()
  total = (
    None
    if mem is None
    else (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes)
  )
  return t_f, t_b, total


def torch_available():
  try:
    import torch  # pylint: disable=g-import-not-at-top

    return torch.cuda.is_available()
  except Exception:  # pylint: disable=broad-except
    return False


def torch_case(q, k, v, iters, warmup):
  """PyTorch scaled_dot_product_attention restricted to its flash backend."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch.nn.attention import SDPBackend, sdpa_kernel  # pylint: disable=g-import-not-at-top

  def to_torch(a):  # (b, l, h, d) -> (b, h, l, d)
    t = torch.from_numpy(np.asarray(a.astype(jnp.float32))).cuda()
    return t.to(torch.bfloat16).transpose(1, 2).contiguous()

  tq, tk, tv = to_torch(q), to_torch(k), to_torch(v)
  gqa = tq.shape[1] != tk.shape[1]
  leaves = [t.clone().requires_grad_(True) for t in (tq, tk, tv)]

  def run(a, b_, c):
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
      return torch.nn.functional.scaled_dot_product_attention(
        a, b_, c, is_causal=True, enable_gqa=gqa
      )

  def fwd():
    with torch.no_grad():
      run(tq, tk, tv)
    torch.cuda.synchronize()

  def fwd_bwd():
    run(*leaves).float().sum().backward()
    torch.cuda.synchronize()

  t_f = median_seconds(fwd, iters, warmup)
  torch.cuda.reset_peak_memory_stats()
  t_b = median_seconds(fwd_bwd, iters, warmup)
  return t_f, t_b, torch.cuda.max_memory_allocated()


def peak_tflops(args, device):
  """The --peak-tflops flag, else the device's known bf16 dense peak."""
  if args.peak_tflops:
    return args.peak_tflops
  peak = flops.peak_flops_per_device(device)
  return peak / 1e12 if peak else None


def main(argv=None):
  args = parse_args(argv)
  dtype = jnp.dtype(args.dtype)
  dev = jax.devices()[0]
  peak = peak_tflops(args, dev)
  impls = list(args.impls)
  if (
    jax.default_backend() == "gpu" and not args.no_torch and not args.segments and torch_available()
  ):
    impls.append("torch_flash")
  print(
    f"# attention benchmark: device {dev.device_kind} "
    f"({jax.default_backend()}), jax {jax.__version__}, {args.dtype}, "
    f"headdim {args.headdim}, kv heads {args.kv_heads or 'all'}, "
    f"segments {args.segments or 'none'}, median of {args.iters}, "
    f"bf16 peak {peak or 'unknown'} TFLOP/s"
  )
  header = (
    f"{'b':>2} {'L':>7} {'h':>3} | {'impl':<20} | {'fwd ms':>9} "
    f"{'TF/s':>6} {'%pk':>4} | {'f+b ms':>9} {'TF/s':>6} {'%pk':>4} | "
    f"{'f+b GiB':>8}"
  )
  print(header)
  print("-" * len(header))
  pct = lambda tf: "-" if peak is None else f"{100 * tf / peak:.0f}"
  for b, l, h in grid_shapes(args):
    hkv = args.kv_heads or h
    q, k, v, seg = make_inputs(b, l, h, hkv, args.headdim, dtype, args.segments)
    fl_f = attention_kernels.attention_flops(b, l, h, args.headdim)
    fl_b = attention_kernels.attention_flops(b, l, h, args.headdim, backward=True)
    for impl in impls:
      try:
        if impl == "torch_flash":
          t_f, t_b, mem = torch_case(q, k, v, args.iters, args.warmup)
        else:
          t_f, t_b, mem = jax_case(impl, q, k, v, seg, args.iters, args.warmup)
      except Exception as e:  # pylint: disable=broad-except
        print(f"{b:>2} {l:>7} {h:>3} | {impl:<20} | {failure(e)}")
        continue
      tf_f, tf_b = fl_f / t_f / 1e12, fl_b / t_b / 1e12
      mem_s = "-" if mem is None else f"{mem / 2**30:.2f}"
      print(
        f"{b:>2} {l:>7} {h:>3} | {impl:<20} | {t_f * 1e3:>9.2f} "
        f"{tf_f:>6.3g} {pct(tf_f):>4} | {t_b * 1e3:>9.2f} {tf_b:>6.3g} "
        f"{pct(tf_b):>4} | {mem_s:>8}"
      )
    sys.stdout.flush()


if __name__ == "__main__":
  main()
