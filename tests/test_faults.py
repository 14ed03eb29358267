"""Fault injection (issue 16): each fault a new user hit, kept fixed.

Tiny config, in-process `loop.train` runs (the real signal handlers run:
signals are sent to this process with os.kill); subprocesses only where a
kill or a launch/ program is the point.
"""

import copy
import dataclasses
import errno
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import jax
import numpy as np
import pytest

from hybridna_jax import launch_utils, restore
from hybridna_jax.config import base_config
from hybridna_jax.data import fasta, pipeline, prepare
from hybridna_jax.data import store as store_lib
from hybridna_jax.train import loop, startup_signal
from hybridna_jax.train.checkpoint import (
  BEST_DIR,
  CHECKPOINT_DIR,
  CONFIG_FILE,
  CheckpointDamagedError,
  CheckpointMismatchError,
  Checkpoints,
)
from hybridna_jax.train.metrics import MetricsLogger, read_metrics
from hybridna_jax.train.preemption import Preemption
from hybridna_jax.train.tasks import LMPretraining

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _store(path, records, val=()):
  """A data config of a store prepared from `records` [(name, sequence)]."""
  fa = str(path) + ".fa"
  fasta.write_fasta(fa, records)
  data = base_config().data
  data.fasta_globs = (fa,)
  data.store_dir = str(path)
  data.source_from = "record"
  data.split.val_records = tuple(val)
  prepare.prepare_store(data, log=lambda *a, **k: None)
  return data


def _one_stage(cfg, steps=4):
  cfg.train.stages = ((32, steps, 4),)
  return cfg


# -- 1, 4, 6: data refused before step 0, nothing written ---------------------


def test_all_n_store_is_refused_before_training(tiny_config, tmp_path):
  tiny_config.data = _store(tmp_path / "n", [("a", "N" * 3000), ("b", "N" * 500)], val=["b"])
  workdir = str(tmp_path / "run")
  with pytest.raises(ValueError, match=r"stages\[0\]: no training window.*3,000 tokens.*100\.0 %"):
    loop.train(_one_stage(tiny_config), workdir)
  assert not os.path.exists(os.path.join(workdir, CONFIG_FILE))


def test_all_n_source_is_dropped_not_trained_on_empty_rows(lambda_store, tmp_path):
  from hybridna_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  ((_, tokens),) = fasta.read_fasta(os.path.join(ROOT, "tests", "data", "lambda_virus.fa"))
  from hybridna_jax import tokenizer  # pylint: disable=g-import-not-at-top

  seq = tokenizer.decode(tokens)[:5000]
  data = _store(tmp_path / "mixed", [("good", seq), ("bad", "N" * 5000)])
  _, _, weights = pipeline.train_windows(data, seq_len=32)
  assert weights[list(store_lib.TokenStore.open(data.store_dir).sources).index("bad")] == 0
  batch = next(pipeline.train_batches(data, seq_len=32, batch_size=8, seed=0))
  assert batch["loss_mask"].sum(axis=1).min() > 0  # no empty rows


def test_stage_longer_than_the_records_is_refused(tiny_config, tmp_path):
  tiny_config.data = _store(tmp_path / "short", [("a", "ACGTACGT"), ("b", "ACGT")], val=["b"])
  with pytest.raises(ValueError, match=r"stages\[0\]: seq_len 32 needs windows of 33.*has 8"):
    loop.train(_one_stage(tiny_config), str(tmp_path / "run"))


def test_stage_longer_than_the_models_max_seq_len_is_refused(tiny_config, tmp_path):
  """Review of stop 37: trained at 32 under max_seq_len 16 without a word,
  then refused by the scorer at the context it was trained at."""
  tiny_config.model.max_seq_len = 16
  with pytest.raises(ValueError, match=r"stages\[0\]: seq_len 32 exceeds config.model.max_seq_"):
    loop.train(_one_stage(tiny_config), str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "config.json")


def test_an_eval_length_the_run_cannot_use_is_refused_before_step_0(tiny_config, tmp_path):
  """Review: found at the first evaluation, which runs before that step's
  checkpoint, so every step since the last one was lost."""
  tiny_config.train.eval_every = 2
  tiny_config.train.eval_seq_len = 33
  tiny_config.mesh.num_devices, tiny_config.mesh.context = 2, 2
  with pytest.raises(ValueError, match=r"eval_seq_len: 33 is not divisible by config.mesh.con"):
    loop.train(_one_stage(tiny_config), str(tmp_path / "run"))
  tiny_config.train.eval_seq_len = 2 * tiny_config.model.max_seq_len
  with pytest.raises(ValueError, match=r"eval_seq_len: \d+ exceeds config.model.max_seq_len"):
    loop.train(_one_stage(tiny_config), str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "config.json")


def test_store_of_other_data_is_refused_before_step_0(tiny_config, tmp_path):
  tiny_config.data = _store(tmp_path / "s", [("a", "ACGT" * 100), ("b", "ACGT" * 50)], val=["b"])
  tiny_config.data.split.val_records = ("a",)  # not how the store was split
  workdir = str(tmp_path / "run")
  refused = r"split.val_records: store \['b'\], config \['a'\]"
  with pytest.raises(store_lib.StoreError, match=refused):
    loop.train(_one_stage(tiny_config), workdir)
  assert not glob.glob(os.path.join(workdir, CHECKPOINT_DIR, "*"))


def test_unwritable_checkpoint_directory_is_refused_before_step_0(
  tiny_config, tmp_path, monkeypatch
):
  """Review: a read-only checkpoints/ was found at the first save, after
  the steps before it (as root, chmod does not stop writes: a failing write
  stands in for a read-only mount)."""
  from hybridna_jax import paths  # pylint: disable=g-import-not-at-top

  real = paths.write_text

  def read_only(path, text):
    if ".write_check" in str(path):
      raise OSError(errno.EROFS, "Read-only file system")
    return real(path, text)

  monkeypatch.setattr(paths, "write_text", read_only)
  workdir = str(tmp_path / "run")
  with pytest.raises(OSError, match=r"checkpoints cannot be written \(Read-only file system\)"):
    loop.train(_one_stage(tiny_config), workdir)
  assert not os.path.exists(os.path.join(workdir, "metrics.jsonl"))


def test_missing_val_split_is_refused_before_step_0(tiny_config, tmp_path, lambda_store):
  ((_, tokens),) = fasta.read_fasta(os.path.join(ROOT, "tests", "data", "lambda_virus.fa"))
  from hybridna_jax import tokenizer  # pylint: disable=g-import-not-at-top

  tiny_config.data = _store(tmp_path / "noval", [("a", tokenizer.decode(tokens)[:4000])])
  tiny_config.train.eval_every = 2
  workdir = str(tmp_path / "run")
  with pytest.raises(ValueError, match=r"eval_every=2 evaluates on split 'val'.*eval_every=0"):
    loop.train(_one_stage(tiny_config), workdir)
  assert not glob.glob(os.path.join(workdir, CHECKPOINT_DIR, "*"))


def test_zero_intervals_are_config_errors(tiny_config):
  from hybridna_jax.config import validate  # pylint: disable=g-import-not-at-top

  for field in ("log_every", "checkpoint_every", "grad_accum"):
    cfg = tiny_config.copy_and_resolve_references()
    cfg.train[field] = 0
    with pytest.raises(ValueError, match=field):
      validate(cfg)


# -- 2, 3, 11: checkpoints ----------------------------------------------------


@pytest.fixture(scope="module")
def base_run(lambda_store, tmp_path_factory):
  """A 4-step run with checkpoints at steps 2 and 4; returns (config, dir)."""
  from hybridna_jax.config import load_config  # pylint: disable=g-import-not-at-top

  cfg = load_config(os.path.join(ROOT, "configs", "tiny.py"))
  cfg.data = copy.deepcopy(lambda_store)
  cfg.mesh.num_devices = 1
  t = cfg.train
  t.stages, t.warmup_steps, t.log_every, t.eval_every = ((32, 4, 4),), 1, 2, 0
  t.checkpoint_every, t.keep_best, t.plot, t.async_checkpoints = 2, False, False, False
  workdir = str(tmp_path_factory.mktemp("base") / "run")
  assert loop.train(cfg, workdir)["steps"] == 4
  return cfg, workdir


def _damage(step_dir, kind):
  if kind == "truncated arrays":
    for f in glob.glob(os.path.join(step_dir, "params", "ocdbt.process_0", "d", "*")):
      with open(f, "r+b") as fh:
        fh.truncate(10)
  elif kind == "deleted manifests":
    for f in glob.glob(os.path.join(step_dir, "*", "**", "manifest.ocdbt"), recursive=True):
      os.remove(f)
  elif kind == "missing meta/metadata":
    os.remove(os.path.join(step_dir, "meta", "metadata"))
  elif kind == "missing train item":
    shutil.rmtree(os.path.join(step_dir, "train"))
  elif kind == "empty step directory":
    shutil.rmtree(step_dir)
    os.makedirs(step_dir)


DAMAGES = [
  "truncated arrays",
  "deleted manifests",
  "missing meta/metadata",
  "missing train item",
  "empty step directory",
]


def _target(cfg):
  from hybridna_jax import sharding  # pylint: disable=g-import-not-at-top
  from hybridna_jax.train.checkpoint import with_shardings  # pylint: disable=g-import-not-at-top

  fns = loop.task_steps(LMPretraining(cfg), cfg, sharding.mesh_from_config(cfg.mesh))
  return with_shardings(jax.eval_shape(fns.init, jax.random.key(0)), fns.state_shardings)


@pytest.mark.parametrize("kind", DAMAGES)
def test_damaged_latest_checkpoint_is_moved_aside(base_run, tmp_path, kind):
  cfg, base = base_run
  ckpt_dir = str(tmp_path / "checkpoints")
  shutil.copytree(os.path.join(base, CHECKPOINT_DIR), ckpt_dir)
  _damage(os.path.join(ckpt_dir, "4"), kind)
  ckpts = Checkpoints(ckpt_dir)
  step, state, meta = ckpts.restore_newest(_target(cfg))
  assert step == meta["step"] == int(state.step) == 2
  assert os.path.isdir(os.path.join(ckpt_dir + ".damaged", "4"))  # kept, not deleted
  assert ckpts.all_steps() == [2] and not os.path.exists(os.path.join(ckpt_dir, "4"))


def test_damaged_best_step_is_moved_aside_or_named(base_run, tmp_path):
  """Review: a truncated best/<n>/meta stopped every resume with a bare JSON
  error, and damaged best/ parameters ended a fine-tuning run in a
  175-line traceback."""
  cfg, base = base_run
  best_dir = str(tmp_path / "best")
  shutil.copytree(os.path.join(base, CHECKPOINT_DIR), best_dir)
  with open(os.path.join(best_dir, "4", "meta", "metadata"), "r+b") as f:
    f.truncate(5)
  best = Checkpoints(best_dir)
  step, meta = best.newest_meta()
  assert step == meta["step"] == 2 and os.path.isdir(best_dir + ".damaged/4")
  _damage(os.path.join(best_dir, "2"), "truncated arrays")
  with pytest.raises(CheckpointDamagedError, match=rf"^{best_dir}/2 cannot be read \("):
    best.restore_params(2, _target(cfg).params)


def test_every_checkpoint_incomplete_moves_nothing(base_run, tmp_path):
  # A cause common to every step (e.g. a path Orbax could not finish its
  # saves under) is raised, not hidden by a restart from step 0.
  cfg, base = base_run
  ckpt_dir = str(tmp_path / "checkpoints")
  shutil.copytree(os.path.join(base, CHECKPOINT_DIR), ckpt_dir)
  for step in ("2", "4"):
    _damage(os.path.join(ckpt_dir, step), "deleted manifests")
  with pytest.raises(CheckpointDamagedError, match=r"every checkpoint in .* is incomplete"):
    Checkpoints(ckpt_dir).restore_newest(_target(cfg))
  assert sorted(os.listdir(ckpt_dir)) == ["2", "4"] and not os.path.exists(ckpt_dir + ".damaged")


def test_a_checkpoint_of_non_finite_values_is_moved_aside(base_run, tmp_path):
  """Review: changed bytes in a params file restored as NaN without a word;
  the resumed run skipped every step and its checkpoints of that state
  pushed the good ones out (keep_checkpoints)."""
  cfg, base = base_run
  ckpt_dir = str(tmp_path / "checkpoints")
  shutil.copytree(os.path.join(base, CHECKPOINT_DIR), ckpt_dir)
  ckpts = Checkpoints(ckpt_dir)
  state, meta = ckpts.restore(4, _target(cfg))
  ckpts.close()
  leaves, tree = jax.tree.flatten(state.params)
  leaves[3] = leaves[3].at[0].set(np.nan)
  shutil.rmtree(os.path.join(ckpt_dir, "4"))
  ckpts = Checkpoints(ckpt_dir)
  ckpts.save(state._replace(params=jax.tree.unflatten(tree, leaves)), meta)
  ckpts.wait()
  ckpts.close()
  ckpts = Checkpoints(ckpt_dir)
  step, state, _ = ckpts.restore_newest(_target(cfg))
  ckpts.close()
  assert step == int(state.step) == 2
  (reason,) = glob.glob(os.path.join(ckpt_dir + ".damaged", "4*"))
  assert os.path.isdir(reason)


def test_training_resumes_past_a_damaged_checkpoint(base_run, tmp_path):
  cfg, base = base_run
  workdir = str(tmp_path / "run")
  shutil.copytree(base, workdir)
  ckpt_dir = os.path.join(workdir, CHECKPOINT_DIR)
  _damage(os.path.join(ckpt_dir, "4"), "empty step directory")
  cfg = cfg.copy_and_resolve_references()
  cfg.train.stages = ((32, 5, 4),)
  summary = loop.train(cfg, workdir)  # resumes from 2, not the damaged 4
  assert summary["stopped"] == "completed" and summary["steps"] == 5
  assert os.path.isdir(os.path.join(ckpt_dir + ".damaged", "4"))
  assert sorted(Checkpoints(ckpt_dir).all_steps()) == [2, 4, 5]  # 4 written again from 2


def test_stopping_at_once_completes_the_save_in_flight(tiny_config, tmp_path, monkeypatch):
  """Ctrl-C twice (KeyboardInterrupt: stop without a new checkpoint) right
  after an async save started: the save completes before the exception
  leaves train (it was cut off at exit, and the rerun began at step 0)."""
  cfg = _one_stage(tiny_config, 4)
  cfg.train.async_checkpoints = True
  real = Checkpoints.save

  def save(self, *args, **kwargs):
    real(self, *args, **kwargs)
    raise KeyboardInterrupt

  monkeypatch.setattr(Checkpoints, "save", save)
  workdir = str(tmp_path / "run")
  with pytest.raises(KeyboardInterrupt):
    loop.train(cfg, workdir)
  ckpt_dir = os.path.join(workdir, CHECKPOINT_DIR)
  assert os.listdir(ckpt_dir) == ["2"] and Checkpoints(ckpt_dir).all_steps() == [2]


def test_a_signal_after_the_last_step_is_reported(tiny_config, tmp_path, monkeypatch):
  """SIGTERM during the task's finish (after the last step) completes the
  run and says so in the summary, for callers that run more (a suite)."""
  cfg = _one_stage(tiny_config, 2)
  real = LMPretraining.finish

  def finish(self, fns, state, workdir):
    os.kill(os.getpid(), signal.SIGTERM)
    return real(self, fns, state, workdir)

  monkeypatch.setattr(LMPretraining, "finish", finish)
  summary = loop.train(cfg, str(tmp_path / "run"))
  assert summary["stopped"] == "completed" and summary["signalled"] is True


def _signal_at_eval_batch(monkeypatch, at_batch):
  """Sends SIGTERM as the `at_batch`-th batch of an LM evaluation is read;
  returns the list of batch numbers read, evaluation by evaluation."""
  real, reads = pipeline.eval_batches, []

  def eval_batches(*args, **kwargs):
    reads.append(0)
    for batch in real(*args, **kwargs):
      reads[-1] += 1
      if reads[-1] == at_batch and len(reads) == 1:
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  monkeypatch.setattr(pipeline, "eval_batches", eval_batches)
  return reads


def test_a_signal_during_an_evaluation_abandons_it_for_the_checkpoint(
  tiny_config, tmp_path, monkeypatch
):
  """SIGTERM in the middle of an evaluation (of 4 batches, at step 2 of 4,
  no checkpoint due): the batch that is running completes, the rest is
  dropped and nothing of it logged, and step 2 is saved at once. The resumed
  run evaluates step 2 first (it had been lost), then step 4."""
  cfg = _evaluating(tiny_config, 4)
  cfg.train.eval_batches, cfg.train.checkpoint_every = 4, 100
  workdir = str(tmp_path / "run")
  reads = _signal_at_eval_batch(monkeypatch, 2)
  summary = loop.train(cfg, workdir)
  assert summary["stopped"] == "preempted" and summary["steps"] == 2
  assert reads == [2] and _steps_of(workdir) == [2] and _val_rows(workdir) == []
  monkeypatch.undo()
  resumed = loop.train(cfg, workdir)
  assert resumed["stopped"] == "completed" and resumed["steps"] == 4
  assert [r["step"] for r in _val_rows(workdir)] == [2, 4]
  # As an uninterrupted run: the same evaluations and the same best/.
  whole = str(tmp_path / "whole")
  loop.train(cfg, whole)
  for a, b in zip(_val_rows(whole), _val_rows(workdir)):
    assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=1e-6)
  best = lambda w: Checkpoints(os.path.join(w, BEST_DIR)).all_steps()
  assert best(whole) == best(workdir)


def test_a_signal_during_a_final_evaluation_on_rerun_is_repeated_next_time(
  tiny_config, tmp_path, monkeypatch
):
  """A completed run rerun with eval_every turned on, signalled during the
  final evaluation it adds: reported as preempted (not completed without a
  final_val), and the next launch evaluates it."""
  cfg = _evaluating(tiny_config, 2)
  cfg.train.eval_every, cfg.train.eval_batches = 0, 3
  workdir = str(tmp_path / "run")
  loop.train(cfg, workdir)
  cfg.train.eval_every = 2
  reads = _signal_at_eval_batch(monkeypatch, 1)
  second = loop.train(cfg, workdir)
  assert second["stopped"] == "preempted" and "final_val" not in second
  assert reads == [1] and _val_rows(workdir) == []
  monkeypatch.undo()
  third = loop.train(cfg, workdir)
  assert third["stopped"] == "completed" and "loss" in third["final_val"]
  assert [r["step"] for r in _val_rows(workdir)] == [2]


def test_config_and_machine_failures_on_resume_move_nothing(base_run, tmp_path, monkeypatch):
  """A resume that fails for a reason of this run's config (a batch the
  mesh cannot split) or of this machine (an I/O error) raises with every
  step left in place (issue: each step moved to checkpoints.damaged/, and
  the next start trained from step 0)."""
  cfg, base = base_run
  workdir = str(tmp_path / "run")
  shutil.copytree(base, workdir)
  ckpt_dir = os.path.join(workdir, CHECKPOINT_DIR)
  cfg = cfg.copy_and_resolve_references()
  cfg.train.stages = ((32, 6, 4),)
  bad = cfg.copy_and_resolve_references()
  bad.train.grad_accum = 3
  with pytest.raises(ValueError, match=r"global batch 4 is not divisible .* grad_accum"):
    loop.train(bad, workdir)
  with monkeypatch.context() as m:
    m.setattr(Checkpoints, "restore", lambda *a: (_ for _ in ()).throw(OSError(5, "I/O error")))
    with pytest.raises(OSError, match="I/O error"):
      loop.train(cfg, workdir)
  assert sorted(os.listdir(ckpt_dir)) == ["2", "4"] and not os.path.exists(ckpt_dir + ".damaged")
  summary = loop.train(cfg, workdir)
  assert summary["stopped"] == "completed" and summary["steps"] == 6
  assert not os.path.exists(ckpt_dir + ".damaged")


def test_a_stage_changed_mid_stage_is_refused(base_run, tmp_path):
  """The stream restarts at the step's global batch, which holds other
  windows under another batch size or stage start (review: re-read windows
  silently)."""
  cfg, base = base_run
  workdir = str(tmp_path / "run")
  shutil.copytree(base, workdir)
  cfg = cfg.copy_and_resolve_references()
  cfg.train.stages = ((32, 6, 2),)  # step 4 is mid-stage, 4 rows a batch before
  was = r"step 4 was in stage 0 from step 0, in batches of 4 x 32 tokens; this config puts it in "
  with pytest.raises(
    ValueError, match=was + r"stage 0 from step 0, in batches of 2 x 32 tokens \("
  ):
    loop.train(cfg, workdir)
  cfg.train.stages = ((32, 1, 4), (32, 5, 4))  # the stage moved: its batch 3 is not batch 4
  with pytest.raises(ValueError, match=was + "stage 1 from step 1, in batches of 4 x 32"):
    loop.train(cfg, workdir)
  # Review: another window length was accepted (its stream from batch 2).
  cfg.train.stages = ((64, 6, 4),)
  with pytest.raises(ValueError, match=was + "stage 0 from step 0, in batches of 4 x 64 tokens"):
    loop.train(cfg, workdir)
  cfg.train.stages = ((32, 6, 2),)
  # An earlier version's meta recorded the batch in host_rows.
  meta_file = os.path.join(workdir, CHECKPOINT_DIR, "4", "meta", "metadata")
  meta = json.load(open(meta_file))
  del meta["batch_size"]
  json.dump({**meta, "host_rows": [4, 4]}, open(meta_file, "w"))
  with pytest.raises(ValueError, match=was):
    loop.train(cfg, workdir)
  assert sorted(os.listdir(os.path.join(workdir, CHECKPOINT_DIR))) == ["2", "4"]
  cfg.train.stages = ((32, 3, 4),)  # ends before the run's step (review: "completed")
  with pytest.raises(ValueError, match=r"is at step 4, past the 3 steps of this config's stages"):
    loop.train(cfg, workdir)
  cfg.train.stages = ((32, 4, 4), (32, 2, 2))  # a new stage from step 4: any batch
  assert loop.train(cfg, workdir)["steps"] == 6


def test_a_worker_data_position_of_an_earlier_version_is_refused(base_run, tmp_path):
  """Before STREAM_FORMAT 2, worker processes batched every W-th position,
  so global batch t of this version's stream is not where such a run was.
  Without workers the streams agree, and any data.num_workers resumes."""
  cfg, base = base_run
  workdir = str(tmp_path / "run")
  shutil.copytree(base, workdir)
  meta_file = os.path.join(workdir, CHECKPOINT_DIR, "4", "meta", "metadata")
  meta = json.load(open(meta_file))
  del meta["stream_format"]
  json.dump(meta, open(meta_file, "w"))
  config_json = os.path.join(workdir, CONFIG_FILE)
  written = json.load(open(config_json))
  written["data"]["num_workers"] = 1  # the run had workers
  json.dump(written, open(config_json, "w"))
  cfg = cfg.copy_and_resolve_references()
  cfg.train.stages = ((32, 6, 4),)  # step 4 is mid-stage
  with pytest.raises(ValueError, match=r"step 4 \(data.num_workers=1\) was saved by an earlier"):
    loop.train(cfg, workdir)
  assert sorted(os.listdir(os.path.join(workdir, CHECKPOINT_DIR))) == ["2", "4"]
  written["data"]["num_workers"] = 0
  json.dump(written, open(config_json, "w"))
  cfg.data.num_workers = 1
  assert loop.train(cfg, workdir)["steps"] == 6


class _Killed(BaseException):
  """A hard kill (SIGKILL, node loss): nothing after it runs."""


def _evaluating(cfg, steps):
  """`cfg` evaluating every 2 steps (one batch) and keeping best/."""
  t = cfg.train
  t.stages, t.eval_every, t.eval_batches, t.keep_best = ((32, steps, 4),), 2, 1, True
  t.learning_rate = 3e-3  # each eval improves on the last
  return cfg


def _val_rows(workdir):
  return [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if r["kind"] == "val"]


def test_resume_when_best_is_newer_than_the_checkpoint(tiny_config, tmp_path, monkeypatch):
  """A kill after an eval saved best/ and before the next checkpoint: the
  resumed run replays that eval, which must neither count as better than
  best/ (whose own meta holds the best value) nor save its step again
  (issue: StepAlreadyExistsError on every retry)."""
  cfg = _evaluating(tiny_config, 8)
  cfg.train.checkpoint_every = 4
  workdir = str(tmp_path / "run")
  real_save, loggers = Checkpoints.save, []

  def save(self, state, meta, **kwargs):
    real_save(self, state, meta, **kwargs)
    if self.directory.name == BEST_DIR and int(state.step) == 6:
      self.wait()
      raise _Killed  # before the checkpoint at step 8

  def logger(*args, **kwargs):
    loggers.append(MetricsLogger(*args, **kwargs))
    return loggers[-1]

  with monkeypatch.context() as m:
    m.setattr(Checkpoints, "save", save)
    m.setattr(loop, "MetricsLogger", logger)
    with pytest.raises(_Killed):
      loop.train(cfg, workdir)
  loggers[0].close()  # the file the kill left open
  assert Checkpoints(os.path.join(workdir, BEST_DIR)).all_steps() == [6]
  assert _steps_of(workdir) == [4]
  summary = loop.train(cfg, workdir)
  assert summary["stopped"] == "completed" and summary["steps"] == 8
  best = Checkpoints(os.path.join(workdir, BEST_DIR))
  values = {r["step"]: r["bits_per_nt"] for r in _val_rows(workdir)}
  assert best.restore_meta(best.latest_step())["bits_per_nt"] == min(values.values())


def test_rerunning_a_completed_run_repeats_nothing(tiny_config, tmp_path):
  """A completed run launched again (a requeued job) whose final eval is
  off the eval_every grid: no second final eval, no crash, the same
  final_val."""
  cfg = _evaluating(tiny_config, 5)
  workdir = str(tmp_path / "run")
  first = loop.train(cfg, workdir)
  second = loop.train(cfg, workdir)
  assert second["stopped"] == "completed" and second["steps"] == 5
  assert second["final_val"] == first["final_val"]
  assert [r["step"] for r in _val_rows(workdir)] == [2, 4, 5]


def test_final_eval_added_on_rerun_is_recorded(tiny_config, tmp_path):
  """A completed run rerun with eval_every turned on evaluates its final
  step once: the result goes into the final checkpoint's meta, so a third
  launch repeats nothing."""
  cfg = _evaluating(tiny_config, 4)
  cfg.train.eval_every = 0
  workdir = str(tmp_path / "run")
  loop.train(cfg, workdir)
  cfg.train.eval_every = 2
  second = loop.train(cfg, workdir)
  third = loop.train(cfg, workdir)
  assert third["final_val"] == second["final_val"]
  assert [r["step"] for r in _val_rows(workdir)] == [4]
  meta = Checkpoints(os.path.join(workdir, CHECKPOINT_DIR)).restore_meta(4)
  assert meta["last_eval"]["step"] == 4 and meta["stage"] == 0  # the other fields kept


def test_architecture_change_on_resume_is_refused(base_run, tmp_path):
  cfg, base = base_run
  workdir = str(tmp_path / "run")
  shutil.copytree(base, workdir)
  config_json = os.path.join(workdir, CONFIG_FILE)
  before = open(config_json, encoding="utf-8").read()
  cfg = cfg.copy_and_resolve_references()
  cfg.model.d_model = 64
  with pytest.raises(ValueError, match=r"another architecture \(model\.d_model: 32 in the run, 64"):
    loop.train(cfg, workdir)
  assert open(config_json, encoding="utf-8").read() == before
  restore.load(workdir)  # still loads
  assert sorted(os.listdir(os.path.join(workdir, CHECKPOINT_DIR))) == ["2", "4"]
  # The layer layout is a runtime field, but the checkpoints (and their
  # optimizer state) are in the run's: named in one line (review: a list of
  # 240 missing parameters that never said scan_layers).
  cfg.model.d_model, cfg.model.scan_layers = 32, True
  with pytest.raises(
    ValueError, match=r"hold the layers one entry per layer, this config stacked in blocks of 4 "
  ):
    loop.train(cfg, workdir)
  assert sorted(os.listdir(os.path.join(workdir, CHECKPOINT_DIR))) == ["2", "4"]


def test_a_resume_under_other_settings_keeps_the_earlier_config(base_run, tmp_path, caplog):
  """config.json says what trains from now on; the config of the steps
  before the resume is kept beside it (it was overwritten)."""
  cfg, base = base_run
  workdir = str(tmp_path / "run")
  shutil.copytree(base, workdir)
  cfg = cfg.copy_and_resolve_references()
  cfg.train.stages = ((32, 5, 4),)
  before = json.load(open(os.path.join(workdir, CONFIG_FILE)))
  loop.train(cfg, workdir)
  kept = json.load(open(os.path.join(workdir, "config.step4.json")))
  assert kept == before and json.load(open(os.path.join(workdir, CONFIG_FILE)))["train"][
    "stages"
  ] == [[32, 5, 4]]
  assert "resumed at step 4 with other settings (train.stages:" in caplog.text


def test_optimizer_change_on_resume_names_the_optimizer_settings(base_run, tmp_path):
  cfg, base = base_run
  workdir = str(tmp_path / "run")
  shutil.copytree(base, workdir)
  cfg = cfg.copy_and_resolve_references()
  cfg.train.grad_clip = 0.0 if cfg.train.grad_clip else 1.0
  with pytest.raises(
    CheckpointMismatchError, match=r"does not fit the optimizer state: train opt_state.*grad_clip"
  ):
    loop.train(cfg, workdir)
  assert sorted(os.listdir(os.path.join(workdir, CHECKPOINT_DIR))) == ["2", "4"]


def test_a_damaged_config_json_is_named_on_resume(base_run, tmp_path):
  """Review: an emptied config.json ended a resume with json's bare
  'Expecting value: line 1 column 1 (char 0)'."""
  cfg, base = base_run
  workdir = str(tmp_path / "run")
  shutil.copytree(base, workdir)
  with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
    f.write("")
  with pytest.raises(ValueError, match=r"config.json is not valid JSON \(Expecting value"):
    loop.train(cfg, workdir)


def test_restore_errors_name_the_parameter_and_config_json(base_run, tmp_path):
  _, base = base_run
  workdir = str(tmp_path / "run")
  shutil.copytree(base, workdir)
  config_json = os.path.join(workdir, CONFIG_FILE)
  with open(config_json, encoding="utf-8") as f:
    written = json.load(f)
  written["model"]["d_model"] = 64
  with open(config_json, "w", encoding="utf-8") as f:
    json.dump(written, f)
  with pytest.raises(
    CheckpointMismatchError, match=r"params embed\.value is \(128, 32\) in the"
  ) as e:
    restore.load(workdir)
  assert len(str(e.value)) < 1500 and "config.json" in str(e.value)
  assert os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR, "4"))  # nothing moved
  os.remove(config_json)
  with pytest.raises(FileNotFoundError, match="has no config.json"):
    restore.load(workdir)


# -- 1, 5: signals ------------------------------------------------------------


def _signal_on_call(monkeypatch, obj, name, signum, call):
  """Sends `signum` to this process at the `call`-th call of obj.name."""
  real = getattr(obj, name)
  calls = [0]

  def wrapped(*args, **kwargs):
    calls[0] += 1
    if calls[0] == call:
      os.kill(os.getpid(), signum)
    return real(*args, **kwargs)

  monkeypatch.setattr(obj, name, wrapped)


def _steps_of(workdir):
  return sorted(Checkpoints(os.path.join(workdir, CHECKPOINT_DIR)).all_steps())


@pytest.mark.parametrize(
  "signum,point",
  [
    (signal.SIGINT, "compiling"),
    (signal.SIGTERM, "mid-step"),
    (signal.SIGINT, "checkpoint save"),
  ],
)
def test_signal_saves_and_stops_within_one_step(base_run, tmp_path, monkeypatch, signum, point):
  cfg, _ = base_run
  cfg = cfg.copy_and_resolve_references()
  cfg.train.stages, cfg.train.checkpoint_every = ((32, 6, 4),), 2
  workdir = str(tmp_path / "run")
  real_task_steps = loop.task_steps
  # The run restores the handlers it found (SIG_IGN for SIGINT under nohup or a
  # background shell job, the default handler otherwise).
  sigint_before = signal.getsignal(signal.SIGINT)

  def task_steps(*args, **kwargs):
    fns = real_task_steps(*args, **kwargs)
    if point in ("compiling", "mid-step"):
      # Step 1 compiles the train step; step 3 is an ordinary one.
      call, real, calls = 1 if point == "compiling" else 3, fns.train_step, [0]

      def train_step(*a):
        calls[0] += 1
        if calls[0] == call:
          os.kill(os.getpid(), signum)
        return real(*a)

      fns = dataclasses.replace(fns, train_step=train_step)
    return fns

  monkeypatch.setattr(loop, "task_steps", task_steps)
  if point == "checkpoint save":
    _signal_on_call(monkeypatch, Checkpoints, "save", signum, 1)  # the save at step 2
  summary = loop.train(cfg, workdir)
  expected = {"compiling": 1, "mid-step": 3, "checkpoint save": 2}[point]
  assert summary["stopped"] == "preempted" and summary["steps"] == expected
  assert _steps_of(workdir)[-1] == expected
  # The handlers are gone again: SIGINT is handled as before the run.
  assert signal.getsignal(signal.SIGINT) is sigint_before


def test_a_resumed_run_logs_the_intervals_of_an_uninterrupted_one(base_run, tmp_path, monkeypatch):
  """Preempted at step 3 (logs every 2): the steps since the last log line
  are kept in the checkpoint, so the resumed run logs step 4 as the mean of
  steps 3 and 4, as the uninterrupted run does (it logged step 4 alone)."""
  cfg, _ = base_run
  cfg = cfg.copy_and_resolve_references()
  cfg.train.stages, cfg.train.checkpoint_every, cfg.train.log_every = ((32, 6, 4),), 100, 2
  whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
  loop.train(cfg, whole)
  real_task_steps = loop.task_steps

  def task_steps(*args, **kwargs):
    fns = real_task_steps(*args, **kwargs)
    real, calls = fns.train_step, [0]

    def train_step(*a):
      calls[0] += 1
      if calls[0] == 3:
        os.kill(os.getpid(), signal.SIGTERM)
      return real(*a)

    return dataclasses.replace(fns, train_step=train_step)

  with monkeypatch.context() as m:
    m.setattr(loop, "task_steps", task_steps)
    assert loop.train(cfg, parts)["steps"] == 3
  loop.train(cfg, parts)
  rows = lambda w: [
    (r["step"], r["loss"])
    for r in read_metrics(os.path.join(w, "metrics.jsonl"))
    if r["kind"] == "train"
  ]
  assert [s for s, _ in rows(parts)] == [2, 4, 6]
  for (s, a), (_, b) in zip(rows(whole), rows(parts)):
    assert a == pytest.approx(b, rel=1e-6), s


class _StuckIterator:
  """An iterator whose `stuck_at`-th batch never comes (an all-N filter or
  a dead file system); sends `signum` to this process when it gets stuck."""

  def __init__(self, inner, stuck_at, signum):
    self.inner, self.stuck_at, self.signum, self.calls = inner, stuck_at, signum, 0

  def __iter__(self):
    return self

  def __next__(self):
    self.calls += 1
    if self.calls == self.stuck_at:
      os.kill(os.getpid(), self.signum)
      threading.Event().wait()  # forever
    return next(self.inner)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_while_waiting_on_data(base_run, tmp_path, monkeypatch, signum):
  cfg, _ = base_run
  cfg = cfg.copy_and_resolve_references()
  cfg.train.stages, cfg.train.checkpoint_every = ((32, 6, 4),), 100
  workdir = str(tmp_path / "run")
  real = LMPretraining.layout_iterator
  seen = {}

  def layout_iterator(self, stage, layout, seed, start_batch):
    seen.setdefault("starts", []).append(start_batch)
    return _StuckIterator(real(self, stage, layout, seed, start_batch), 4, signum)

  monkeypatch.setattr(LMPretraining, "layout_iterator", layout_iterator)
  start = time.monotonic()
  summary = loop.train(cfg, workdir)
  assert summary["stopped"] == "preempted" and summary["steps"] == 3
  assert time.monotonic() - start < 60
  monkeypatch.undo()
  monkeypatch.setattr(LMPretraining, "layout_iterator", layout_iterator)
  # The resumed run (not stuck: 3 batches) reads the stream from the
  # batch that never came, the fourth (index 3).
  assert loop.train(cfg, workdir)["steps"] == 6
  assert seen["starts"] == [0, 3]


def test_a_sigterm_while_starting_up_stops_at_the_first_step(base_run, tmp_path):
  """SIGTERM before `train` installs its handler (the launcher's imports,
  jax.distributed start-up): recorded by `startup_signal`, so the run saves
  step 0 and returns "preempted" (which the Slurm script requeues) instead
  of dying with status 143; the rerun then trains as if uninterrupted."""
  cfg, base = base_run
  workdir = str(tmp_path / "run")
  before = signal.getsignal(signal.SIGTERM)
  try:
    startup_signal.catch()
    os.kill(os.getpid(), signal.SIGTERM)
    summary = loop.train(cfg, workdir)
  finally:
    signal.signal(signal.SIGTERM, before)
    startup_signal.reset()
  assert summary["stopped"] == "preempted" and summary["steps"] == 0
  assert _steps_of(workdir) == [0]
  assert loop.train(cfg, workdir)["steps"] == 4
  losses = lambda w: [
    r["loss"] for r in read_metrics(os.path.join(w, "metrics.jsonl")) if r["kind"] == "train"
  ]
  assert losses(workdir) == pytest.approx(losses(base), rel=1e-6)


def test_launch_train_records_a_sigterm_while_reading_its_config(lambda_store, tmp_path):
  """launch/train.py records a SIGTERM from the moment its flags are read
  (`launch_utils.run(record_sigterm=True)`), not only once `main` starts:
  a config file that signals the process as it loads stands in for a
  Slurm preemption during start-up. The run saves step 0 and exits 0 as
  preempted (it died with status 143, no summary, when `main` installed
  the handler)."""
  config = tmp_path / "signalling_config.py"
  config.write_text(
    textwrap.dedent(
      f"""
      import os, signal, sys
      sys.path.insert(0, {os.path.join(ROOT, "configs")!r})
      import tiny

      def get_config():
        os.kill(os.getpid(), signal.SIGTERM)
        return tiny.get_config()
      """
    )
  )
  workdir = tmp_path / "run"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, HYBRIDNA_HUGE_PAGES="0")
  done = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "launch", "train.py"),
      f"--config={config}",
      f"--workdir={workdir}",
      f"--config.data.store_dir={lambda_store.store_dir}",
      "--config.train.stages=((64, 4, 2),)",
      "--config.train.plot=False",
      "--config.mesh.num_devices=1",
    ],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
    check=False,
  )
  assert done.returncode == 0, done.stderr[-2000:]
  summary = json.loads((workdir / "train_summary.json").read_text())
  assert summary["stopped"] == "preempted" and summary["steps"] == 0
  assert _steps_of(str(workdir)) == [0]


def test_second_sigint_stops_without_saving():
  with Preemption() as p:
    os.kill(os.getpid(), signal.SIGINT)
    assert p.requested
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.1)


# -- 8: stores ----------------------------------------------------------------


def _lambda_records():
  from hybridna_jax import tokenizer  # pylint: disable=g-import-not-at-top

  ((_, tokens),) = fasta.read_fasta(os.path.join(ROOT, "tests", "data", "lambda_virus.fa"))
  seq = tokenizer.decode(tokens)
  return [("a", seq[:30000]), ("b", seq[30000:])]


def test_damaged_store_is_rebuilt(tmp_path):
  data = _store(tmp_path / "s", _lambda_records(), val=["b"])
  tokens_file = glob.glob(os.path.join(data.store_dir, "**", "*tokens*"), recursive=True)[0]
  with open(tokens_file, "r+b") as f:
    f.truncate(100)
  assert store_lib.verify(data.store_dir) is not None
  logs = []
  store = prepare.prepare_store(data, log=lambda msg, *a: logs.append(msg % a))
  assert any("damaged" in line for line in logs)
  assert store_lib.verify(data.store_dir) is None and store["train"].num_tokens == 30000
  # overwrite_store rebuilds even an intact store of the same inputs.
  data.overwrite_store, logs[:] = True, []
  prepare.prepare_store(data, log=lambda msg, *a: logs.append(msg % a))
  assert any("preparing it again" in line for line in logs)


def test_kill_during_prepare_then_rerun(tmp_path):
  rng = np.random.default_rng(0)
  records = [(f"r{i}", "".join(rng.choice(list("ACGT"), 200_000))) for i in range(40)]
  fa = str(tmp_path / "big.fa")
  fasta.write_fasta(fa, records)
  store_dir = str(tmp_path / "store")
  # The child kills itself (SIGKILL, no clean-up) after 50 blocks were
  # written: mid-write whatever the machine's speed.
  code = textwrap.dedent(
    f"""
    import os, signal
    from hybridna_jax.config import base_config
    from hybridna_jax.data import prepare, store_writer
    append, blocks = store_writer.TokenStoreWriter.append, [0]
    def killing_append(self, tokens):
      blocks[0] += 1
      if blocks[0] > 50:
        os.kill(os.getpid(), signal.SIGKILL)
      append(self, tokens)
    store_writer.TokenStoreWriter.append = killing_append
    d = base_config().data
    d.fasta_globs, d.store_dir, d.source_from = ({fa!r},), {store_dir!r}, "record"
    d.prepare_block_bytes = 4096
    prepare.prepare_store(d)
    """
  )
  proc = subprocess.run(
    [sys.executable, "-c", code],
    env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"},
    capture_output=True,
    timeout=300,
  )
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  assert glob.glob(str(tmp_path / ".store.tmp-*" / "*"))  # killed mid-write
  assert not store_lib.is_complete(store_dir)
  data = base_config().data
  data.fasta_globs, data.store_dir, data.source_from = (fa,), store_dir, "record"
  store = prepare.prepare_store(data, log=lambda *a, **k: None)
  assert store["train"].num_tokens == 40 * 200_000
  assert not glob.glob(str(tmp_path / ".store.tmp-*"))


# -- 12: one line for user errors ----------------------------------------------


def test_launch_programs_print_one_line_for_user_errors(tmp_path, monkeypatch, capsys):
  def main(argv):
    raise store_lib.StoreError("no token store at /x; prepare one with launch/prepare_data.py")

  monkeypatch.setattr(sys, "argv", ["train.py"])
  with pytest.raises(SystemExit) as e:
    launch_utils.one_line_errors(main)(["train.py"])
  assert (
    e.value.code == "train.py: error: no token store at /x; prepare one with launch/prepare_data.py"
  )

  def bug(argv):
    raise ZeroDivisionError("a real bug")

  with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
    launch_utils.one_line_errors(bug)(["train.py"])

  def no_gcsfs(argv):  # fsspec, for a gs:// path without the optional packages
    raise ImportError("Please install gcsfs to access Google Storage")

  with pytest.raises(SystemExit, match=r"^train.py: error: gs:// paths need `pip install gcsfs"):
    launch_utils.one_line_errors(no_gcsfs)(["train.py"])

  def broken(argv):
    raise ImportError("cannot import name 'x' from 'hybridna_jax'")

  with pytest.raises(ImportError):  # any other import failure keeps its traceback
    launch_utils.one_line_errors(broken)(["train.py"])


@pytest.mark.parametrize(
  "config,store,expected",
  [
    ("tiny.py", "nowhere", r"^train.py: error: no token store at .*nowhere; prepare one with"),
    ("tiny.py", "", r"^train.py: error: data.store_dir is empty: set it"),
    ("nosuch.py", "nowhere", r"^--config=.*nosuch.py: cannot load it \(\[Errno 2\] No such file"),
  ],
)
def test_train_py_missing_store_or_config_is_one_line(tmp_path, config, store, expected):
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "launch", "train.py"),
      f"--config={os.path.join(ROOT, 'configs', config)}",
      f"--config.data.store_dir={tmp_path / store if store else ''}",
      "--config.train.stages=((32, 2, 2),)",
      f"--workdir={tmp_path / 'run'}",
    ],
    capture_output=True,
    text=True,
    env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"},
    timeout=300,
  )
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr
  assert re.search(expected, proc.stderr.strip().splitlines()[-1])
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
  "program,args,expected",
  [
    ("train.py", ["--workdir=run"], r"--config must have a value other than None"),
    ("plan.py", ["--config=configs/tiny.py", "--devices=0"], r"--devices=0: 0 is not a positive"),
    # Evaluation runs in one process: no multi-host flags to ignore.
    ("eval.py", ["--workdir=run", "--distributed=on"], r"Unknown command line flag 'distributed'"),
    # A space-separated second value would be dropped.
    ("generate.py", ["--workdir=run", "--labels", "a", "b"], r"unexpected arguments \['b'\]"),
  ],
)
def test_launch_flags_are_checked(tmp_path, program, args, expected):
  proc = subprocess.run(
    [sys.executable, os.path.join(ROOT, "launch", program), *args],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "HYBRIDNA_HUGE_PAGES": "0"},
    timeout=300,
  )
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert re.search(expected, proc.stderr), proc.stderr


# -- 9, 10: task types and unscorable records ---------------------------------


def _gue_task(folder, train_labels):
  os.makedirs(folder)
  rows = {"train": train_labels, "dev": ["0", "1"], "test": ["1", "0"]}
  for split, labels in rows.items():
    with open(os.path.join(folder, f"{split}.csv"), "w", encoding="utf-8") as f:
      f.write("sequence,label\n")
      for i, label in enumerate(labels):
        f.write(f"{'ACGT'[i % 4] * 8},{label}\n")
  return str(folder)


def test_one_float_label_does_not_turn_classification_into_regression(tmp_path):
  from hybridna_jax.finetune import datasets  # pylint: disable=g-import-not-at-top

  folder = _gue_task(tmp_path / "task", ["0", "1"] * 10 + ["1.0"])
  with pytest.raises(ValueError, match=r"look like class ids.*the train split.*kind="):
    datasets.load_task(folder, log=False)
  half = _gue_task(tmp_path / "half", ["0", "1"] * 10 + ["0.5"])
  with pytest.raises(ValueError, match=r"example 21 of the train split has label 0.5"):
    datasets.load_task(half, log=False)
  assert datasets.load_task(folder, kind="regression", log=False).kind == "regression"
  with pytest.raises(ValueError, match="kind='classification' but some labels are not integers"):
    datasets.load_task(folder, kind="classification", log=False)
  numbers = _gue_task(tmp_path / "numbers", [f"{0.1 * i + 0.05:.2f}" for i in range(20)])
  assert datasets.load_task(numbers, log=False).kind == "regression"  # plainly numbers


def test_unscorable_records_are_warned(caplog):
  from hybridna_jax import tokenizer  # pylint: disable=g-import-not-at-top
  from hybridna_jax.scoring import evaluation  # pylint: disable=g-import-not-at-top

  seqs = [tokenizer.encode(s) for s in ("A", "NNNN", "ACGT", "NNA")]
  with caplog.at_level("WARNING"):
    bad = evaluation.warn_unscorable(["one", "ns", "ok", "tail"], seqs)
  assert bad == ["one (1 nt: nothing to predict)", "ns (all N)"]
  assert "2 record(s) cannot be scored and get nan: one" in caplog.text
  # With <bos> the first nucleotide is scored too: only empty or all-N records.
  seqs += [tokenizer.encode(""), tokenizer.encode("ANNN")]
  names = ["one", "ns", "ok", "tail", "empty", "a_then_n"]
  assert evaluation.unscorable(names, seqs, add_bos=True) == [
    "ns (all N)",
    "empty (0 nt: nothing to predict)",
  ]
  assert evaluation.unscorable(names, seqs)[-1] == "a_then_n (all N)"


@pytest.mark.parametrize(
  "stopped,requeued,separate",
  [("preempted", True, False), ("completed", False, False), ("preempted", True, True)],
)
def test_slurm_script_requeues_a_preempted_run(tmp_path, stopped, requeued, separate):
  """The trainer exits 0 after its SIGTERM save, which Slurm's --requeue
  alone does not requeue: the script does (srun and scontrol stubbed)."""
  stubs, workdir = tmp_path / "bin", tmp_path / "run"
  stubs.mkdir()
  workdir.mkdir()
  (stubs / "srun").write_text(
    f"#!/usr/bin/env bash\necho '{{\"stopped\": \"{stopped}\"}}' > {workdir}/train_summary.json\n"
  )
  (stubs / "scontrol").write_text(f"#!/usr/bin/env bash\necho \"$*\" > {tmp_path}/scontrol\n")
  for stub in stubs.iterdir():
    stub.chmod(0o755)
  venv = tmp_path / "venv"  # the script runs $VENV/bin/python: this one
  (venv / "bin").mkdir(parents=True)
  (venv / "bin" / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
  (venv / "bin" / "python").chmod(0o755)
  env = dict(
    os.environ,
    PATH=f"{stubs}:{os.environ['PATH']}",
    SLURM_SUBMIT_DIR=ROOT,
    SLURM_JOB_ID="77",
    VENV=str(venv),
  )
  proc = subprocess.run(
    ["bash", os.path.join(ROOT, "launch", "slurm_gpu.sbatch")]
    + (["--workdir", str(workdir)] if separate else [f"--workdir={workdir}"]),
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr
  assert (tmp_path / "scontrol").exists() == requeued
  if requeued:
    assert (tmp_path / "scontrol").read_text().strip() == "requeue 77"
