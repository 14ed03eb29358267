"""Two processes on localhost (CPU, 2 devices each) train together through
launch/train.py and agree with one process on 4 devices: with the batch split
over the processes, and with the context axis spanning them (both load the
same rows of a global batch of 2, each its half of every sequence), including
an exact resume."""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from launch_env import launch_env

from hybridna_jax import sharding
from hybridna_jax.config import ModelConfig, load_config
from hybridna_jax.restore import find_checkpoint, restore_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ModelConfig.from_config(load_config(os.path.join(ROOT, "configs", "tiny.py")).model)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _train_command(store_dir: str, workdir: str, extra=(), stages="((32, 3, 8),)"):
  return [
    sys.executable,
    os.path.join(ROOT, "launch", "train.py"),
    f"--config={os.path.join(ROOT, 'configs', 'tiny.py')}",
    f"--workdir={workdir}",
    f"--config.data.store_dir={store_dir}",
    f"--config.train.stages={stages}",
    "--config.train.warmup_steps=1",
    "--config.train.log_every=1",
    "--config.train.eval_every=0",
    "--config.train.checkpoint_every=2",
    "--config.train.keep_best=False",
    "--config.train.plot=False",
    "--config.mesh.fsdp=-1",
    *extra,
  ]


def _run_one(argv: list[str]) -> str:
  """Runs `argv` as the one process of a job on 4 devices; returns its output."""
  done = subprocess.run(argv, env=launch_env(4), capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  return done.stdout + done.stderr


def _run_two(command, timeout=600) -> list[str]:
  """Runs `command(extra)` as processes 0 and 1 of a 2-process job; returns
  their outputs."""
  address = f"--coordinator_address=127.0.0.1:{_free_port()}"
  procs = [
    subprocess.Popen(
      command([address, "--num_processes=2", f"--process_id={i}"]),
      env=launch_env(2),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=timeout)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  return outputs


def _params(workdir):
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  return jax.device_get(restore_params(find_checkpoint(workdir), TINY, mesh))


@pytest.mark.slow
def test_two_processes_match_one(lambda_store, tmp_path):
  store = lambda_store.store_dir
  single = str(tmp_path / "single")
  _run_one(_train_command(store, single))

  multi = str(tmp_path / "multi")
  outputs = _run_two(lambda extra: _train_command(store, multi, extra))
  assert "process 1/2, 2 local / 4 global devices" in outputs[1]

  a, b = _params(single), _params(multi)
  assert find_checkpoint(multi).step == find_checkpoint(single).step == 3
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    # Same global batches in the same row order: equal up to summation order.
    np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-6)


def _losses(workdir) -> dict[int, float]:
  """Step -> training loss from metrics.jsonl (the last row of each step)."""
  losses = {}
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      if row["kind"] == "train":
        losses[row["step"]] = row["loss"]
  return losses


@pytest.mark.slow
def test_context_axis_across_processes_matches_one_process_and_resumes(lambda_store, tmp_path):
  # Mesh (context=2, tensor=2) over 2 processes x 2 devices: each process's
  # devices are one tensor pair, and the context pair spans the processes.
  # Global batch 2 < 2 processes x 2: both processes load rows 0 and 1, each
  # its 16 of the 32 positions.
  store = lambda_store.store_dir
  stages = "((32, 5, 2),)"
  mesh = ["--config.mesh.fsdp=1", "--config.mesh.context=2", "--config.mesh.tensor=2"]

  def command(workdir):
    return lambda extra: _train_command(store, workdir, mesh + extra, stages=stages)

  single = str(tmp_path / "single")
  _run_one(command(single)([]))
  multi = str(tmp_path / "multi")
  outputs = _run_two(command(multi))
  assert "loads rows [0, 1] and columns [0, 16) of each 2 x 32 batch" in outputs[0]
  assert "loads rows [0, 1] and columns [16, 32) of each 2 x 32 batch" in outputs[1]
  want = _losses(single)
  assert sorted(want) == [1, 2, 3, 4, 5]
  got = _losses(multi)
  assert sorted(got) == sorted(want)
  for step in want:
    np.testing.assert_allclose(got[step], want[step], rtol=1e-5, err_msg=f"step {step}")

  # Resume from the step-2 checkpoint (model and optimizer; the data stream
  # restarts at batch 2): steps 3..5 again, as in the uninterrupted run.
  checkpoints = os.path.join(multi, "checkpoints")
  assert sorted(os.listdir(checkpoints)) == ["2", "4", "5"]
  for step in ("4", "5"):
    shutil.rmtree(os.path.join(checkpoints, step))
  os.remove(os.path.join(multi, "metrics.jsonl"))
  outputs = _run_two(command(multi))
  assert "resumed from step 2" in outputs[0]
  resumed = _losses(multi)
  assert sorted(resumed) == [3, 4, 5]
  for step in resumed:
    np.testing.assert_allclose(resumed[step], want[step], rtol=1e-5, err_msg=f"step {step}")
  # The 2-process run resumed by one process (a job back on a smaller
  # slice; refused while checkpoints held each process's iterator state).
  for step in ("4", "5"):
    shutil.rmtree(os.path.join(checkpoints, step))
  os.remove(os.path.join(multi, "metrics.jsonl"))
  assert "resumed from step 2" in _run_one(command(multi)([]))
  alone = _losses(multi)
  assert sorted(alone) == [3, 4, 5]
  for step in alone:
    np.testing.assert_allclose(alone[step], want[step], rtol=1e-5, err_msg=f"step {step}")


@pytest.mark.slow
def test_finetune_with_context_axis_across_processes_matches_one_process(tmp_path):
  # Fine-tuning lays its batches out like pretraining: with (context=2,
  # tensor=2) over 2 processes both processes load every row of a global
  # batch of 3 (not divisible by the process count) and of the eval batches.
  from hybridna_jax.finetune import example_tasks  # pylint: disable=g-import-not-at-top

  task = example_tasks.make_motif_task(
    str(tmp_path / "motif"), n_train=24, n_dev=10, n_test=10, min_length=8, max_length=12, seed=0
  )

  def command(workdir):
    return lambda extra: [
      sys.executable,
      os.path.join(ROOT, "launch", "finetune.py"),
      f"--config={os.path.join(ROOT, 'configs', 'finetune_tiny.py')}",
      f"--task={task}",
      f"--workdir={workdir}",
      "--config.finetune.steps=2",
      "--config.finetune.batch_size=3",
      "--config.finetune.eval_batch_size=4",
      "--config.finetune.eval_every_epochs=0",
      "--config.finetune.baselines=False",
      "--config.train.log_every=1",
      "--config.train.eval_every=0",
      "--config.train.async_checkpoints=False",
      "--config.mesh.fsdp=1",
      "--config.mesh.context=2",
      "--config.mesh.tensor=2",
      *extra,
    ]

  single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
  _run_one(command(single)([]))
  outputs = _run_two(command(multi))
  for out in outputs:  # whole rows: fine-tuning's batches have no sequence keys
    assert "loads rows [0, 1, 2] and columns [0, 32) of each 3 x 32 batch" in out
  want, got = _losses(single), _losses(multi)
  assert sorted(got) == sorted(want) == [1, 2]
  for step in want:
    np.testing.assert_allclose(got[step], want[step], rtol=1e-5, err_msg=f"step {step}")
  results = [json.load(open(os.path.join(w, "results.json"))) for w in (single, multi)]
  for split in ("dev", "test"):
    for key, value in results[0][split].items():
      np.testing.assert_allclose(results[1][split][key], value, rtol=1e-5, err_msg=key)


@pytest.mark.slow
def test_sampling_across_processes_matches_one_process(lambda_store, tmp_path):
  # launch/generate.py on 2 processes x 2 devices samples the designs of
  # one process on 4 devices (each sample's random stream is keyed by its
  # prompt and index, not by where it runs), and process 0 alone writes them.
  workdir = str(tmp_path / "run")
  _run_one(_train_command(lambda_store.store_dir, workdir))

  def command(output):
    return lambda extra: [
      sys.executable,
      os.path.join(ROOT, "launch", "generate.py"),
      "--mode=sample",
      f"--workdir={workdir}",
      f"--output={output}",
      "--prefix=ACGTACGT",
      "--length=12",
      "--num_samples=6",
      "--batch_size=4",
      "--seed=3",
      *extra,
    ]

  single, multi = str(tmp_path / "single.fasta"), str(tmp_path / "multi.fasta")
  _run_one(command(single)([]))
  outputs = _run_two(command(multi))
  assert f"wrote {multi} and its summaries" in outputs[0]
  assert "wrote " not in outputs[1] and "designs: " not in outputs[1]
  with open(single, encoding="utf-8") as a, open(multi, encoding="utf-8") as b:
    want, got = a.read(), b.read()
  assert want.count(">") == 6
  assert got == want
