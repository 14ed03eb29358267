"""Shared benchmark helpers: timing of jitted functions and the environment
line recorded with every result."""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax


def environment() -> str:
  """Device, versions and host, for RESULTS.md."""
  import flax  # pylint: disable=g-import-not-at-top

  dev = jax.devices()[0]
  return (
    f"device: {dev.device_kind} x{jax.device_count()} ({jax.default_backend()}), "
    f"jax {jax.__version__}, flax {flax.__version__}, "
    f"python {platform.python_version()}, host cores: {_cores()}"
  )


def _cores() -> str:
  import os  # pylint: disable=g-import-not-at-top

  return str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())


def _call_seconds(fn: Callable[[], Any], iters: int, warmup: int) -> list[float]:
  """Seconds of each of `iters` calls of `fn()`, after `warmup` untimed ones."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def median_seconds(fn: Callable[[], Any], iters: int, warmup: int) -> float:
  """Median seconds of `fn()`, which must block until its work is done
  (jax.block_until_ready, torch.cuda.synchronize), after `warmup` calls."""
  return statistics.median(_call_seconds(fn, iters, warmup))


def interleaved_seconds(
  fns: Sequence[Callable[[], Any]], rounds: int, iters: int, warmup: int
) -> list[list[float]]:
  """Seconds of each of `fns` (each blocking until its work is done): in
  each of `rounds` rounds every fn runs as a block of `warmup` untimed and
  `iters` timed calls, the order of the blocks reversed every other round.
  A noisy machine's slow spells then fall on all of them alike, while each
  timed call still follows a call of the same fn: alternating single calls
  of JAX and torch ran both 1.5-2.5x slower on a 2-core VM (each refaulted
  the memory the other had just released)."""
  times: list[list[float]] = [[] for _ in fns]
  for r in range(rounds):
    for i in range(len(fns)) if r % 2 == 0 else reversed(range(len(fns))):
      times[i] += _call_seconds(fns[i], iters, warmup)
  return times


def time_jitted(
  fn: Callable[..., Any], *args, warmup: int = 1, iters: int = 5, min_seconds: float = 0.0
) -> dict[str, float]:
  """Compiles `fn` (a jitted function) on `args`, then times calls.

  Returns compile_s (first call) and the median / min seconds per call.
  """
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  compile_s = time.perf_counter() - start
  for _ in range(max(warmup - 1, 0)):
    jax.block_until_ready(fn(*args))
  times = []
  while len(times) < iters or sum(times) < min_seconds:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return {
    "compile_s": compile_s,
    "median_s": statistics.median(times),
    "min_s": min(times),
    "iters": len(times),
  }


# -- kernel grids (benchmarks/ssd.py, benchmarks/attention.py) ------------------


def add_grid_arguments(parser: argparse.ArgumentParser) -> None:
  """--batch/--seqlen/--heads lists and the timing options of a kernel grid."""
  parser.add_argument("--batch", type=int, nargs="+")
  parser.add_argument("--seqlen", type=int, nargs="+")
  parser.add_argument("--heads", type=int, nargs="+")
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument(
    "--max-tokens", type=int, default=None, help="skip shapes with batch * seqlen above this"
  )
  parser.add_argument("--small", action="store_true", help="CPU smoke run: tiny grid, 2 iterations")


def resolve_grid(args: argparse.Namespace, grid: dict, small: dict) -> None:
  """Fills the grid lists not given on the command line from `grid` (or
  `small` with --small, which also caps the iterations)."""
  for key, values in (small if args.small else grid).items():
    if getattr(args, key) is None:
      setattr(args, key, values)
  if args.small:
    args.iters, args.warmup = min(args.iters, 2), min(args.warmup, 1)


def grid_shapes(args: argparse.Namespace) -> Iterator[tuple[int, int, int]]:
  """(batch, seqlen, heads) of the grid, without shapes over --max-tokens."""
  for b, l, h in itertools.product(args.batch, args.seqlen, args.heads):
    if not args.max_tokens or b * l <= args.max_tokens:
      yield b, l, h


def failure(e: Exception) -> str:
  """A one-line table cell for a failed case: "OOM: ..." or "error: ..."."""
  text = str(e)
  kind = "OOM" if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() else "error"
  return f"{kind}: {text.splitlines()[0][:80] if text else type(e).__name__}"
