"""Shared benchmark helpers: timing of jitted functions and the environment
line recorded with every result."""

from __future__ import annotations

import platform
import statistics
import time
from typing import Any, Callable

import jax


def environment() -> str:
  """Device, versions and host, for RESULTS.md."""
  import flax  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  return (f"device: {dev.device_kind} x{jax.device_count()} ({jax.default_backend()}), "
          f"jax {jax.__version__}, flax {flax.__version__}, "
          f"python {platform.python_version()}, host cores: {_cores()}")


def _cores() -> str:
  import os  # pylint: disable=g-import-not-at-top
  return str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())


def median_seconds(fn: Callable[[], Any], iters: int, warmup: int) -> float:
  """Median seconds of `fn()`, which must block until its work is done
  (jax.block_until_ready, torch.cuda.synchronize), after `warmup` calls."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def time_jitted(fn: Callable[..., Any], *args, warmup: int = 1, iters: int = 5,
                min_seconds: float = 0.0) -> dict[str, float]:
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
  return {"compile_s": compile_s, "median_s": statistics.median(times),
          "min_s": min(times), "iters": len(times)}
