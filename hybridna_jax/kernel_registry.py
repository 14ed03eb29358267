"""The one place where kernel implementations are registered and chosen.

`hybridna_jax.ssd` and `hybridna_jax.attention` each own a `KernelRegistry`
holding their XLA references; `hybridna_jax.kernels` adds the Pallas / splash /
cuDNN kernels to them when it imports. Configs name an implementation
(`ssd_impl`, `attention_impl`); "auto" picks the first registered kernel that
declares the default backend in its `auto_platforms`, else the XLA fallback.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable

import jax


@dataclasses.dataclass(frozen=True)
class Kernel:
  name: str
  fn: Callable[..., Any]
  auto_platforms: tuple[str, ...] = ()
  options: dict = dataclasses.field(default_factory=dict)


@functools.cache
def _load_kernels():
  # Optional: the XLA references work wherever Pallas fails to import.
  try:
    import hybridna_jax.kernels  # noqa: F401  pylint: disable=g-import-not-at-top
  except ImportError:
    pass


def jit_dispatch(static_argnames: tuple[str, ...]):
  """Jits a public op so eager calls are fast, keyed on the sharding context.

  The registered kernels read `sharding.current()` while tracing (to wrap
  themselves in shard_map), which jax's trace cache does not see; passing the
  context as a static argument makes a call under another mesh (or none)
  retrace instead of reusing a trace made for a different placement.
  """
  from hybridna_jax import sharding  # pylint: disable=g-import-not-at-top

  def decorator(fn):
    signature = inspect.signature(fn)

    def with_context(_sharding_context, **kwargs):
      del _sharding_context
      return fn(**kwargs)

    jitted = jax.jit(with_context,
                     static_argnames=tuple(static_argnames) + ("_sharding_context",))

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
      bound = signature.bind(*args, **kwargs)   # every argument by name
      bound.apply_defaults()
      return jitted(_sharding_context=sharding.current(), **bound.arguments)
    return wrapper
  return decorator


class KernelRegistry:
  """Named implementations of one operation."""

  def __init__(self, what: str, fallback: str):
    self.what = what
    self.fallback = fallback
    self._kernels: dict[str, Kernel] = {}

  def register(self, name: str, fn: Callable[..., Any], *,
               auto_platforms: tuple[str, ...] = (), **options) -> None:
    self._kernels[name] = Kernel(name, fn, tuple(auto_platforms), options)

  def names(self) -> tuple[str, ...]:
    _load_kernels()
    return ("auto",) + tuple(self._kernels)

  def resolve(self, impl: str, platform: str | None = None) -> Kernel:
    """The kernel for `impl` ("auto" decides by `platform`, default backend)."""
    _load_kernels()
    if impl == "auto":
      platform = platform or jax.default_backend()
      for kernel in self._kernels.values():
        if platform in kernel.auto_platforms:
          return kernel
      impl = self.fallback
    if impl not in self._kernels:
      raise ValueError(f"unknown {self.what} implementation {impl!r}; "
                       f"choose one of {self.names()}.")
    return self._kernels[impl]
