"""Restoring: a checkpoint written by the trainer on 8 devices restores onto
1 and the other way, with identical parameters and logits; bf16 restores;
bad paths give errors that say what to pass."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybridna_jax import restore, sharding
from hybridna_jax.train.checkpoint import Checkpoints
from hybridna_jax.train.step import TrainState

TOKENS = np.random.default_rng(0).integers(5, 9, (4, 64)).astype(np.int32)


@nnx.jit
def _logits(model, tokens):
  return model(tokens).logits


def _params(model):
  return jax.device_get(nnx.state(model, nnx.Param))


def _one_device():
  return sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def on_one_device(tiny_run):
  model, _, config = restore.load(tiny_run, mesh=_one_device())
  return model, np.asarray(_logits(model, TOKENS))


def test_trained_on_8_devices_restores_onto_1_with_identical_logits(tiny_run, on_one_device):
  model_1, logits_1 = on_one_device
  assert {d for leaf in jax.tree.leaves(nnx.state(model_1)) for d in leaf.devices()} == {
    jax.devices()[0]
  }
  model_8, tok, config = restore.load(tiny_run, mesh=sharding.make_mesh(2, 2, 2))
  assert tok.A == 5 and config.train.stages[-1][0] == 64
  kernel = model_8.layers[0].mixer.in_zx.kernel[...]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", None, "tensor")
  for a, b in zip(jax.tree.leaves(_params(model_1)), jax.tree.leaves(_params(model_8))):
    np.testing.assert_array_equal(a, b)
  logits_8 = np.asarray(_logits(model_8, TOKENS))
  np.testing.assert_allclose(logits_8, logits_1, rtol=1e-6, atol=1e-6)


def test_written_on_1_device_restores_onto_8(tiny_run, on_one_device, tmp_path):
  model_1, logits_1 = on_one_device
  # A checkpoint saved from single-device parameters, as the trainer saves.
  run = tmp_path / "run"
  run.mkdir()
  shutil.copy(os.path.join(tiny_run, restore.CONFIG_FILE), run / restore.CONFIG_FILE)
  zero = jnp.zeros((), jnp.int32)
  ckpt = Checkpoints(str(run / "checkpoints"), async_save=False)
  ckpt.save(TrainState(zero + 7, nnx.state(model_1, nnx.Param), None, zero, zero), {"stage": 0})
  ckpt.close()
  model_8, _, _ = restore.load(str(run / "checkpoints" / "7"))  # default: fsdp over all 8
  kernel = model_8.layers[0].mixer.in_zx.kernel[...]
  assert len(kernel.sharding.device_set) == 8
  assert kernel.sharding.spec[0] == "fsdp"
  np.testing.assert_allclose(np.asarray(_logits(model_8, TOKENS)), logits_1, rtol=1e-6, atol=1e-6)


def test_bf16_restore(tiny_run, on_one_device):
  _, logits_32 = on_one_device
  model, _, _ = restore.load(tiny_run, dtype="bfloat16", mesh=_one_device())
  dtypes = {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))}
  assert dtypes == {jnp.dtype(jnp.bfloat16)}
  assert model.cfg.dtype == "bfloat16"
  logits = np.asarray(_logits(model, TOKENS))
  assert logits.dtype == np.float32
  np.testing.assert_allclose(logits, logits_32, atol=0.1)
  # Same prediction almost everywhere.
  assert (logits.argmax(-1) == logits_32.argmax(-1)).mean() > 0.9


def test_checkpoint_paths_and_runtime_settings(tiny_run):
  by_run = restore.find_checkpoint(tiny_run)
  assert by_run.step == 2 and by_run.run_dir == os.path.abspath(tiny_run)
  for path in (os.path.join(tiny_run, "checkpoints"), os.path.join(tiny_run, "checkpoints", "2")):
    assert restore.find_checkpoint(path) == by_run
  model, _, _ = restore.load(
    tiny_run, mesh=_one_device(), attention_impl="xla_blockwise", ssd_impl=""
  )
  assert model.cfg.attention_impl == "xla_blockwise" and model.cfg.ssd_impl == "auto"
  with pytest.raises(ValueError, match=r"\['d_model'\] cannot be changed at restore time"):
    restore.load(tiny_run, d_model=64)


def test_bad_paths_say_what_to_pass(tiny_run, tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint or run directory at"):
    restore.load(str(tmp_path / "missing"))
  with pytest.raises(FileNotFoundError, match=r"has no best/ directory.*keep_best"):
    restore.load(tiny_run, which="best")
  with pytest.raises(ValueError, match="which must be 'latest' or 'best'"):
    restore.find_checkpoint(tiny_run, which="newest")
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="no complete checkpoint in"):
    restore.load(str(empty))
  # A step directory outside a run directory (no config.json beside it).
  orphan = tmp_path / "orphan" / "checkpoints"
  shutil.copytree(os.path.join(tiny_run, "checkpoints"), orphan)
  with pytest.raises(FileNotFoundError, match="has no config.json"):
    restore.load(str(orphan / "2"))
  with open(os.path.join(tiny_run, restore.CONFIG_FILE), encoding="utf-8") as f:
    assert json.load(f)["model"]["n_layers"] == 2


def test_run_directories_read_without_disturbing_them(tiny_run, tmp_path):
  """(review) A run directory named by a number is a run, not a step; a
  reader leaves a save in flight (*.orbax-checkpoint-tmp) alone, where it
  used to delete a training run's async save; a fine-tuning run is named as
  such, with the function that loads it."""
  run = tmp_path / "sweep" / "7"
  shutil.copytree(tiny_run, run)
  in_flight = run / "checkpoints" / "3.orbax-checkpoint-tmp"
  in_flight.mkdir()
  ref = restore.find_checkpoint(str(run))
  assert (ref.run_dir, ref.step) == (str(run), 2)
  restore.load(str(run), mesh=_one_device())
  assert in_flight.is_dir()
  config_json = run / restore.CONFIG_FILE
  config = json.loads(config_json.read_text())
  config.setdefault("finetune", {})["task"] = "tasks/motif"
  config_json.write_text(json.dumps(config))
  with pytest.raises(
    ValueError, match=r"is a fine-tuning run \(task tasks/motif\).*load_finetuned"
  ):
    restore.load(str(run), mesh=_one_device())
