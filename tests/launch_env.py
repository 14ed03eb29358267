"""The environment for a launcher a test runs in its own process."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch_env(devices: int) -> dict[str, str]:
  """os.environ for a subprocess on `devices` fake CPU devices: this tree's
  package first on PYTHONPATH, unbuffered output, and the suite's other XLA
  flags and compilation cache (set by conftest.py) kept."""
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
  env.update(
    JAX_PLATFORMS="cpu",
    # This tree's package, not another checkout's installed in the venv.
    PYTHONPATH=os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p),
    PYTHONUNBUFFERED="1",
    XLA_FLAGS=f"{flags.strip()} --xla_force_host_platform_device_count={devices}".strip(),
  )
  return env
