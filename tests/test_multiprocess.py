"""Two processes on localhost (CPU, 2 devices each) train together through
launch/train.py and agree with one process on 4 devices."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from hybridna_jax import sharding
from hybridna_jax.config import ModelConfig, load_config
from hybridna_jax.restore import find_checkpoint, restore_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ModelConfig.from_config(load_config(os.path.join(ROOT, "configs", "tiny.py")).model)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _train_command(store_dir: str, workdir: str, extra=()):
  return [
    sys.executable,
    os.path.join(ROOT, "launch", "train.py"),
    f"--config={os.path.join(ROOT, 'configs', 'tiny.py')}",
    f"--workdir={workdir}",
    f"--config.data.store_dir={store_dir}",
    "--config.train.stages=((32, 3, 8),)",
    "--config.train.warmup_steps=1",
    "--config.train.log_every=1",
    "--config.train.eval_every=0",
    "--config.train.checkpoint_every=2",
    "--config.train.keep_best=False",
    "--config.train.plot=False",
    "--config.mesh.fsdp=-1",
    *extra,
  ]


def _env(devices: int):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(
    JAX_PLATFORMS="cpu",
    PYTHONUNBUFFERED="1",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
  )
  return env


def _params(workdir):
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  return jax.device_get(restore_params(find_checkpoint(workdir), TINY, mesh))


@pytest.mark.slow
def test_two_processes_match_one(lambda_store, tmp_path):
  store = lambda_store.store_dir
  single = str(tmp_path / "single")
  subprocess.run(
    _train_command(store, single), env=_env(4), check=True, capture_output=True, timeout=600
  )

  multi = str(tmp_path / "multi")
  port = _free_port()
  procs = [
    subprocess.Popen(
      _train_command(
        store,
        multi,
        [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      ),
      env=_env(2),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  assert "process 1/2, 2 local / 4 global devices" in outputs[1]

  a, b = _params(single), _params(multi)
  assert find_checkpoint(multi).step == find_checkpoint(single).step == 3
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    # Same global batches, rows in another order: equal up to summation order.
    np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-6)
