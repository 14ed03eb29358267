"""Named kernel implementations, loaded by module name on first use.

`hybridna_jax.ssd.CORES` and `hybridna_jax.attention.KERNELS` are tables of
`Kernel`s: each names its function as "package.module:attribute", imported
the first time it is chosen, so nothing registers by import side effect and
the XLA references work where Pallas fails to import. Configs name an
implementation (`ssd_impl`, `attention_impl`); "auto" picks the first kernel
that lists the backend in its `auto_platforms`, else the XLA fallback.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

import jax


class KernelImportError(ImportError):
  """A chosen kernel's module failed to import (the cause is chained)."""


@dataclasses.dataclass(frozen=True)
class Kernel:
  """One implementation of an operation.

  Attributes:
    name: what configs call it ("chunked", "pallas_gpu", ...).
    source: "package.module:attribute" of the function.
    auto_platforms: backends on which "auto" picks it.
    options: per-operation settings (e.g. SSD `needs_chunk_multiple`).
  """

  name: str
  source: str
  auto_platforms: tuple[str, ...] = ()
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)

  @functools.cached_property
  def fn(self) -> Callable[..., Any]:
    """The function, imported on first access. A failed import is not
    cached (the next access tries again and raises again)."""
    module_name, _, attribute = self.source.partition(":")
    try:
      module = importlib.import_module(module_name)
    except Exception as err:  # any failure, e.g. a jax API moved: say which
      raise KernelImportError(
        f"{self.name!r} is unavailable: importing {module_name} failed: {type(err).__name__}: {err}"
      ) from err
    return getattr(module, attribute)


class KernelRegistry:
  """The named implementations of one operation, in the order "auto" tries
  them."""

  def __init__(self, what: str, fallback: str, kernels: tuple[Kernel, ...]):
    self.what = what
    self.fallback = fallback
    self.kernels: dict[str, Kernel] = {k.name: k for k in kernels}
    if fallback not in self.kernels:
      raise ValueError(f"{what}: fallback {fallback!r} is not among the kernels.")

  def names(self) -> tuple[str, ...]:
    return ("auto",) + tuple(self.kernels)

  def resolve(self, impl: str, platform: str | None = None) -> Kernel:
    """The loaded kernel for `impl` ("auto" decides by `platform`, default:
    the default backend).

    Raises:
      ValueError: an unknown name.
      KernelImportError: the chosen kernel's module does not import.
    """
    if impl == "auto":
      platform = platform or jax.default_backend()
      for kernel in self.kernels.values():
        if platform in kernel.auto_platforms:
          try:
            _ = kernel.fn  # imports the kernel's module now
            return kernel
          except KernelImportError as err:
            # auto means "the best that works": say why, then use the reference.
            warn_once(f"{self.what}: auto on {platform} uses {self.fallback!r}: {err}")
            break
      impl = self.fallback
    if impl not in self.kernels:
      raise ValueError(
        f"unknown {self.what} implementation {impl!r}; choose one of {self.names()}."
      )
    kernel = self.kernels[impl]
    try:
      _ = kernel.fn  # imports the kernel's module now
    except KernelImportError as err:
      raise KernelImportError(f"{self.what} implementation {err}") from err.__cause__
    return kernel


_warned: set[str] = set()


def warn_once(message: str):
  """Logs a warning the first time `message` comes (kernel fallbacks are
  decided at every trace)."""
  if message not in _warned:
    _warned.add(message)
    logging.warning(message)
