"""Run directories on URLs: a training run on gs:// (a local stand-in for
GCS, tests/fake_gcs.py: Orbax writes its arrays through tensorstore's real
gcs driver, everything else goes through etils.epath), interrupted and
resumed, matches an uninterrupted run on a file:// URL step for step;
restore.load reads both; unsupported URLs are refused in one line."""

import json
import os

import jax
import numpy as np
import pytest
from test_train import _interrupting

from hybridna_jax import launch_utils, paths, restore
from hybridna_jax.train import loop
from hybridna_jax.train.metrics import read_metrics


def _losses(workdir: str) -> dict[int, float]:
  rows = read_metrics(paths.join(workdir, "metrics.jsonl"))
  return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def test_gs_run_resumes_like_an_uninterrupted_run(tiny_config, tmp_path, gcs, monkeypatch):
  cfg = tiny_config
  cfg.train.stages = ((32, 4, 4),)
  cfg.train.log_every = 1
  cfg.train.plot = True
  straight_dir = "file://" + str(tmp_path / "straight")
  assert loop.train(cfg, straight_dir)["stopped"] == "completed"

  url = "gs://bucket/runs/demo"
  with monkeypatch.context() as m:
    _interrupting(m, stop_after=2)
    assert loop.train(cfg, url)["stopped"] == "preempted"
  bucket = os.path.join(gcs.root, "bucket", "runs", "demo")
  assert os.listdir(os.path.join(bucket, "checkpoints")) == ["2"]
  summary = loop.train(cfg, url)
  assert summary["stopped"] == "completed" and summary["steps"] == 4
  assert summary["plot"] == url + "/loss_curves.png"

  # The same losses, step for step (the resumed run rewrote metrics.jsonl
  # as a whole object and appended its rows to the first run's).
  assert _losses(url) == _losses(straight_dir) and sorted(_losses(url)) == [1, 2, 3, 4]
  assert json.loads(paths.read_text(url + "/config.json"))["train"]["log_every"] == 1
  for name in ("loss_curves.png", "config.json", "metrics.jsonl"):
    assert os.path.isfile(os.path.join(bucket, name)), name
  assert any(f.startswith("events.") for f in os.listdir(os.path.join(bucket, "tensorboard")))

  model_a, _, config_a = restore.load(straight_dir)
  model_b, _, config_b = restore.load(url + "/checkpoints/4")
  assert config_b.model == config_a.model
  for a, b in zip(jax.tree.leaves(model_a), jax.tree.leaves(model_b)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_unsupported_run_urls_are_refused_in_one_line(tiny_config):
  with pytest.raises(ValueError, match=r"--workdir=s3://b/run: .*gs:// URLs \(Orbax") as e:
    loop.train(tiny_config, "s3://b/run")
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match=r"checkpoint path=http://h/run: .*read-only"):
    restore.load("http://h/run")
  assert paths.run_path("file:///x/y") == paths.run_path("/x/y")
  # Orbax globs for its files under the run: brackets would be a pattern,
  # and no checkpoint there could be restored.
  with pytest.raises(ValueError, match=r"--workdir=/x/exp\[lr=3e-3\]: Orbax reads '\['"):
    loop.train(tiny_config, "/x/exp[lr=3e-3]")
  # eval/score/generate outputs under a gs:// --workdir must be named locally.
  with pytest.raises(ValueError, match=r"--output_dir=gs://b/run/eval: .*pass a local path"):
    launch_utils.local_output("gs://b/run/eval", "--output_dir")


def test_file_urls_mean_what_a_browser_reads():
  # Path.as_uri() percent-encodes; localhost and the one-slash form are
  # this machine; another host is refused. Upper-case GS:// is gs://.
  assert paths.run_path("file:///x/a%20b") == paths.run_path("/x/a b")
  assert paths.run_path("file://localhost/x/y") == paths.run_path("/x/y")
  assert paths.run_path("file:/x/y") == paths.run_path("/x/y")
  with pytest.raises(ValueError, match="'server' is another host"):
    paths.run_path("file://server/x")
  assert os.fspath(paths.run_path("GS://bucket/run/")) == "gs://bucket/run"
  # Outputs under a file:// --workdir are local files: no refusal.
  assert launch_utils.local_output("file:///x/run/eval", "--output_dir") == "/x/run/eval"
