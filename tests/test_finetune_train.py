"""Fine-tuning through the training loop: a tiny model learns a planted
motif (and survives preemption), a pretrained backbone is loaded and stays
frozen, the training iterator is shuffled, sharded and checkpointable, and a
suite writes one table."""

import csv
import dataclasses
import json
import os
import shutil
import signal
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybridna_jax import echo as echo_lib
from hybridna_jax import sharding, tokenizer
from hybridna_jax.config import ModelConfig, load_config
from hybridna_jax.finetune import baselines as baselines_lib
from hybridna_jax.finetune import example_tasks
from hybridna_jax.finetune import task as task_lib
from hybridna_jax.finetune.model import HeadConfig, SequenceModel
from hybridna_jax.model import HybriDNA
from hybridna_jax.train import loop
from hybridna_jax.train import step as step_lib
from hybridna_jax.train.checkpoint import CHECKPOINT_DIR, CONFIG_FILE, Checkpoints


@pytest.fixture(scope="module")
def motif_task(tmp_path_factory):
  folder = tmp_path_factory.mktemp("motif")
  return example_tasks.make_motif_task(
    str(folder), n_train=1024, n_dev=128, n_test=128, min_length=16, max_length=32, seed=0
  )


def _config(task: str, **finetune):
  cfg = load_config("configs/finetune_tiny.py")
  cfg.mesh.num_devices = 1
  # The tiny model cut to two layers, Mamba2 then attention (compiles faster).
  cfg.model.update(dict(n_layers=2, attn_period=2, attn_offset=1))
  f = cfg.finetune
  f.task = task
  f.steps = 80
  f.eval_every_epochs = 0.0
  for key, value in finetune.items():
    f[key] = value
  t = cfg.train
  t.learning_rate = 1e-2
  t.eval_every = 40
  t.checkpoint_every = 20
  t.log_every = 20
  t.async_checkpoints = False
  return cfg


def _interrupt_at(monkeypatch, call: int):
  """SIGTERM while the `call`-th batch is placed on devices."""
  real = step_lib.device_batch
  count = [0]

  def device_batch(*args, **kwargs):
    count[0] += 1
    if count[0] == call:
      os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)

  monkeypatch.setattr(step_lib, "device_batch", device_batch)


def test_tiny_model_learns_a_planted_motif(motif_task, tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  with monkeypatch.context() as m:
    _interrupt_at(m, 30)  # the 30th training batch: preempted at step 30
    first = task_lib.finetune(_config(motif_task), workdir)
  assert first["stopped"] == "preempted" and first["steps"] == 30
  summary = task_lib.finetune(_config(motif_task), workdir)  # resumes at step 30
  assert summary["stopped"] == "completed" and summary["steps"] == 80
  results = summary["results"]
  assert results["selected_step"] in (40, 80)
  assert results["dev"]["mcc"] > 0.8, results
  assert results["test"]["mcc"] > 0.8, results  # held out, never selected on
  assert results["test"]["auroc"] > 0.9 and results["test"]["examples"] == 128

  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["test"]["mcc"] == pytest.approx(results["test"]["mcc"])
  with open(os.path.join(workdir, "results.md")) as f:
    table = f.read()
  assert "| motif" in table and "| mcc |" in table and "echo mean" in table
  # Per class on test (review: no per-class numbers): the confusion matrix
  # agrees with the accuracy and its rows with the class counts.
  per_class = results["test_per_class"]
  confusion = np.array(per_class["confusion"])
  assert confusion.sum(axis=1).tolist() == per_class["examples"] and confusion.sum() == 128
  assert np.trace(confusion) / 128 == pytest.approx(results["test"]["accuracy"])
  assert np.mean(per_class["f1"]) == pytest.approx(results["test"]["f1_macro"])
  assert "Test, per class" in table
  # Baselines on the same splits, beside the model, with a plain verdict.
  assert set(results["baselines"]) == {"gc", "kmer", "onehot"}
  assert results["verdict"]["text"] in table and "baseline: GC content" in table
  assert os.path.getsize(os.path.join(workdir, "baselines.png")) > 10_000
  assert os.path.getsize(os.path.join(workdir, "finetune_curves.png")) > 10_000
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in records if r["kind"] == "val"] == [40, 80]

  # The restored best checkpoint predicts what the run reported.
  with open(os.path.join(workdir, "test_predictions.csv")) as f:
    rows = list(csv.DictReader(f))
  finetuned = task_lib.load_finetuned(workdir)
  with open(os.path.join(motif_task, "test.csv")) as f:
    sequences = [r["sequence"] for r in csv.DictReader(f)]
  probs = finetuned.predict(sequences[:64], batch_size=64)
  np.testing.assert_allclose(probs[:, 1], [float(r["p1"]) for r in rows[:64]], atol=1e-4)
  assert finetuned.predict([]).shape == (0, probs.shape[1])  # review: a concatenate error


def test_a_signal_during_the_dev_evaluation_abandons_it(motif_task, tmp_path, monkeypatch):
  """SIGTERM as the dev set's second batch (of 4) goes to the devices: the
  evaluation stops after it, nothing of it is logged, and step 2 is saved
  at once."""
  cfg = _config(motif_task, steps=4, eval_batch_size=32)
  cfg.train.eval_every, cfg.train.checkpoint_every = 2, 100
  workdir = str(tmp_path / "run")
  _interrupt_at(monkeypatch, 2 + 2)  # two training batches, then the dev batches
  summary = task_lib.finetune(cfg, workdir)
  assert summary["stopped"] == "preempted" and summary["steps"] == 2
  assert Checkpoints(os.path.join(workdir, CHECKPOINT_DIR)).all_steps() == [2]
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r for r in records if r["kind"] == "val"] == []


def test_a_run_resumes_only_on_the_examples_it_was_trained_on(motif_task, tmp_path):
  """Review of stop 37: rerun in a finished run's --workdir with another
  task, the run "completed" at once and wrote the old model's results as
  the new task's. A moved copy of the same task still resumes."""

  def config(task):
    cfg = _config(task, steps=2, baselines=False)
    cfg.train.eval_every, cfg.train.checkpoint_every = 0, 2
    return cfg

  task, other, moved = (str(tmp_path / name) for name in ("task", "other", "moved"))
  shutil.copytree(motif_task, task)
  workdir = str(tmp_path / "run")
  assert task_lib.finetune(config(task), workdir)["stopped"] == "completed"
  results = open(os.path.join(workdir, "results.json")).read()
  shutil.copytree(task, other)
  train_csv = os.path.join(other, "train.csv")
  lines = open(train_csv).read().split("\n")
  lines[1] = lines[1][:-1] + str(1 - int(lines[1][-1]))  # one label flipped
  open(train_csv, "w").write("\n".join(lines))
  with pytest.raises(ValueError, match=r"finetune.task: '.*/task' in the run, '.*/other' now\); "):
    task_lib.finetune(config(other), workdir)
  assert open(os.path.join(workdir, "results.json")).read() == results  # left as it was
  shutil.copytree(task, moved)
  assert task_lib.finetune(config(moved), workdir)["steps"] == 2  # the same examples
  shutil.copyfile(train_csv, os.path.join(moved, "train.csv"))  # edited in place
  with pytest.raises(ValueError, match=r"\(the files finetune.task, .* name changed since\)"):
    task_lib.finetune(config(moved), workdir)


def _write_pretrained_run(run_dir: str, config) -> nnx.State:
  """A pretraining run directory (config.json + a checkpoint at step 7)
  holding random backbone parameters; returns them."""
  os.makedirs(run_dir)
  with open(os.path.join(run_dir, CONFIG_FILE), "w") as f:
    f.write(config.to_json_best_effort())
  abstract = nnx.eval_shape(
    lambda: HybriDNA(ModelConfig.from_config(config.model), rngs=nnx.Rngs(0))
  )
  rng = np.random.default_rng(0)
  params = jax.tree.map(
    lambda a: jnp.asarray(rng.normal(0, 0.2, a.shape).astype(a.dtype)),
    nnx.state(abstract, nnx.Param),
  )
  zero = jnp.zeros((), jnp.int32)
  checkpoints = Checkpoints(os.path.join(run_dir, CHECKPOINT_DIR), async_save=False)
  checkpoints.save(
    step_lib.TrainState(jnp.array(7, jnp.int32), params, None, zero, zero), {"stage": 0}
  )
  return params


def test_pretrained_frozen_backbone_with_rc_echo_on_8_devices(motif_task, tmp_path):
  lm_config = _config("")
  pretrained = _write_pretrained_run(str(tmp_path / "lm"), lm_config)
  cfg = _config(
    motif_task,
    pretrained=str(tmp_path / "lm"),
    freeze_backbone=True,
    rc_combine="average_logits",
    steps=4,
  )
  cfg.model.n_layers = 4  # replaced by the pretrained architecture
  cfg.train.eval_every = 2
  # Sharded like pretraining: 8 devices, batch over (data, fsdp), heads over tensor.
  cfg.mesh.update(dict(data=2, fsdp=2, tensor=2, num_devices=0))
  workdir = str(tmp_path / "ft")
  results = task_lib.finetune(cfg, workdir)["results"]
  assert results["embedding"] == "RC-echo mean (avg logits) frozen"
  assert results["backbone"].endswith("step 7")
  with open(os.path.join(workdir, CONFIG_FILE)) as f:
    assert json.load(f)["model"]["n_layers"] == 2

  finetuned = task_lib.load_finetuned(workdir)
  backbone = nnx.state(finetuned.model.backbone, nnx.Param)
  assert jax.tree.structure(backbone) == jax.tree.structure(pretrained)
  for a, b in zip(jax.tree.leaves(pretrained), jax.tree.leaves(backbone)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # loaded, then frozen
  assert np.abs(np.asarray(finetuned.model.head.kernel[...])).max() > 0  # the head trained


@pytest.mark.parametrize("frozen", [False, True])
def test_flops_per_token_is_what_xla_compiles(frozen):
  """The MFU's FLOPs: backbone without the LM head, and no backward through
  a frozen backbone (review: counted 3x forward with the LM head, so a
  frozen run's MFU read 2.9x too high). Checked against XLA's count of the
  loss gradient."""
  cfg = dataclasses.replace(
    ModelConfig.from_config(load_config("configs/tiny.py").model),
    d_model=256,
    mlp_dim=512,
    num_heads=8,
    num_kv_heads=4,
    head_dim=32,
  )
  b, width = 4, 256
  rng = np.random.default_rng(0)
  rows = [rng.integers(tokenizer.A, tokenizer.N, 100).astype(np.uint8) for _ in range(b)]
  batch = {k: jnp.asarray(v) for k, v in echo_lib.build_batch(rows, width, echo=False).items()}
  head = HeadConfig(num_outputs=2, echo=False, freeze_backbone=frozen)
  graphdef, params = nnx.split(SequenceModel(cfg, head, rngs=nnx.Rngs(0)), nnx.Param)

  def loss(params):
    return jax.nn.log_softmax(nnx.merge(graphdef, params)(batch))[:, 0].sum()

  cost = jax.jit(jax.grad(loss)).lower(params).compile().cost_analysis()
  xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
  task = types.SimpleNamespace(head_cfg=head, model_cfg=cfg)
  ours = task_lib.FinetuneTask.flops_per_token(task, width) * b * width
  assert 0.85 < ours / xla < 1.15, (ours, xla)


def test_batch_and_width_errors_name_the_finetune_fields(motif_task, tmp_path):
  """The loop's stage checks name the fields a fine-tuning user sets (the
  task derives config.train.stages itself)."""
  cfg = _config(motif_task, batch_size=3)
  cfg.mesh.update(dict(data=2, fsdp=1, num_devices=2))
  with pytest.raises(ValueError, match=r"^config\.finetune\.batch_size: global batch 3 "):
    loop.train(cfg, str(tmp_path / "batch"), task_lib.FinetuneTask(cfg))
  cfg = _config(motif_task, pad_multiple=1, max_length=31)
  cfg.mesh.update(dict(data=1, fsdp=1, context=2, num_devices=2))
  with pytest.raises(
    ValueError, match=r"finetune\.max_length 31 nt echoed.*pad_multiple\): seq_len 63"
  ):
    loop.train(cfg, str(tmp_path / "width"), task_lib.FinetuneTask(cfg))


def test_train_iterator_shuffles_lays_out_rows_and_restores(motif_task):
  task = task_lib.FinetuneTask(_config(motif_task, rc_augment=0.5))
  stage = task.stages()[0]
  assert stage.seq_len == 80 and stage.steps == 80 and stage.batch_size == 32  # 2*32+1 -> 80
  n = len(task.tokens["train"])

  def iterator(seed, rows=range(32), start_batch=0):  # a process holding `rows` of each batch
    layout = sharding.BatchLayout(32, stage.seq_len, np.asarray(rows), (0, stage.seq_len))
    return task.layout_iterator(stage, layout, seed, start_batch)

  def indices(it, batches):
    return np.concatenate([next(it)["index"] for _ in range(batches)])

  epoch = indices(iterator(5), 2 * n // 32)
  np.testing.assert_array_equal(np.sort(epoch[:n]), np.arange(n))  # every example once
  np.testing.assert_array_equal(np.sort(epoch[n:]), np.arange(n))
  assert not np.array_equal(epoch[:n], epoch[n:])  # reshuffled
  assert not np.array_equal(epoch[:n], indices(iterator(6), n // 32))
  # Processes holding rows 0-7 and 8-31 load the rows of the same global batches.
  halves = [indices(iterator(5, rows), 2) for rows in (range(8), range(8, 32))]
  np.testing.assert_array_equal(
    np.concatenate([halves[0][:8], halves[1][:24], halves[0][8:], halves[1][24:]]), epoch[:64]
  )

  it = iterator(5, range(8))
  for _ in range(3):
    next(it)
  expected = [next(it) for _ in range(2)]
  resumed = iterator(5, range(8), start_batch=3)  # how a resumed run reads on
  for want in expected:
    got = next(resumed)
    for key in task.batch_keys:
      np.testing.assert_array_equal(got[key], want[key])
  # Rows are echo rows of the indexed example or, with rc_augment=0.5, of
  # its reverse complement (some rows each way: 32 rows here).
  batch = next(iterator(5))
  labels = task.data.splits["train"].labels
  flipped = []
  for row, i in enumerate(batch["index"]):
    tokens = task.tokens["train"][i]
    rc = tokenizer.reverse_complement_nucleotides(tokens)
    k = tokens.size
    first = batch["inputs"][row][:k]
    assert np.array_equal(first, tokens) or np.array_equal(first, rc)
    if not np.array_equal(tokens, rc):  # a palindrome reads the same either way
      flipped.append(np.array_equal(first, rc))
    np.testing.assert_array_equal(batch["inputs"][row][k + 1 : 2 * k + 1], first)
    assert batch["labels"][row] == labels[i]
  assert len(flipped) > 16 and 0 < np.mean(flipped) < 1, flipped


def _fake_finetune(calls: list, preempted: tuple[str, ...] = (), signalled: tuple[str, ...] = ()):
  """A stand-in for `task_lib.finetune` that scores a fixed rule instead of
  training (the suite logic is under test); tasks named in `preempted` stop
  as a preempted loop does, without results; those in `signalled` complete
  with a signal received while they finished."""

  def fake_finetune(config, workdir, data):
    calls.append((config.finetune.task, workdir, data.name))
    if data.name in preempted:
      return {"stopped": "preempted", "steps": 3}
    task = task_lib.FinetuneTask(config, data)
    outputs = {
      s: np.stack(
        [
          np.zeros(len(task.tokens[s])),
          [float("TATAAT" in q or "ATTATA" in q) for q in data.splits[s].sequences],
        ],
        1,
      )
      for s in ("dev", "test")
    }
    results = {
      "task": data.name,
      "kind": "classification",
      "embedding": "echo mean",
      "dev": task.split_metrics(outputs["dev"], "dev"),
      "test": task.split_metrics(outputs["test"], "test"),
    }
    baselines_lib.attach(results, data)
    os.makedirs(workdir, exist_ok=True)  # run_suite wrote its settings there
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f)
    return {"stopped": "completed", "results": results, "signalled": data.name in signalled}

  return fake_finetune


def test_suite_writes_one_table(motif_task, tmp_path, monkeypatch):
  nt = tmp_path / "tasks" / "nt_like"
  nt.mkdir(parents=True)
  for split in ("train", "test"):
    with open(os.path.join(motif_task, f"{split}.csv")) as src:
      (nt / f"{split}.csv").write_text(src.read())
  gue = tmp_path / "tasks" / "gue_like"
  example_tasks.make_motif_task(str(gue), n_train=64, n_dev=16, n_test=16)
  (tmp_path / "tasks" / "notes").mkdir()  # not a task: skipped by the glob
  calls = []
  monkeypatch.setattr(task_lib, "finetune", _fake_finetune(calls))

  cfg = _config("")
  summary = task_lib.run_suite(cfg, [str(tmp_path / "tasks" / "*")], str(tmp_path / "suite"))
  assert summary["stopped"] == "completed"
  rows = summary["suite"]
  assert [c[2] for c in calls] == ["gue_like", "nt_like"]
  assert [(r["task"], r["system"], r["split"]) for r in rows] == [
    (task, system, split)
    for task in ("gue_like", "nt_like")
    for system, split in (
      ("model", "dev"),
      ("model", "test"),
      ("gc", "test"),
      ("kmer", "test"),
      ("onehot", "test"),
    )
  ]
  assert all(r["mcc"] == pytest.approx(1.0) for r in rows if r["system"] == "model")
  table = open(tmp_path / "suite" / "suite_table.md").read()
  assert table.count("| gue_like |") == 5 and table.count("| nt_like |") == 5
  assert "- gue_like: The model (test MCC 1.0000) beats the GC content" in table
  assert os.path.getsize(tmp_path / "suite" / "suite_scores.png") > 10_000
  assert len(json.load(open(tmp_path / "suite" / "suite_results.json"))) == 10
  # Finished tasks are read back, not re-run.
  task_lib.run_suite(cfg, [str(tmp_path / "tasks" / "*")], str(tmp_path / "suite"))
  assert len(calls) == 2
  # ... but not under another config, whose results they are not.
  cfg.train.learning_rate = cfg.train.learning_rate * 2
  with pytest.raises(ValueError, match=r"gue_like finished under another config \(train.lea"):
    task_lib.run_suite(cfg, [str(tmp_path / "tasks" / "*")], str(tmp_path / "suite"))
  assert len(calls) == 2


def test_preempted_task_stops_the_suite_which_resumes(tmp_path, monkeypatch):
  for name in ("a", "b", "c"):
    example_tasks.make_motif_task(str(tmp_path / "tasks" / name), n_train=32, n_dev=8, n_test=8)
  cfg, calls = _config(""), []
  patterns, workdir = [str(tmp_path / "tasks" / "*")], str(tmp_path / "suite")
  monkeypatch.setattr(task_lib, "finetune", _fake_finetune(calls, preempted=("b",)))
  summary = task_lib.run_suite(cfg, patterns, workdir)
  assert summary["stopped"] == "preempted" and summary["preempted_task"] == "b"
  assert [c[2] for c in calls] == ["a", "b"]  # c is not started
  # What finished so far is written.
  assert {r["task"] for r in summary["suite"]} == {"a"}
  written = json.load(open(tmp_path / "suite" / "suite_results.json"))
  assert [r["task"] for r in written] == [r["task"] for r in summary["suite"]]
  assert "Preempted at b" in open(tmp_path / "suite" / "suite_table.md").read()
  # A signal while b finishes (its test predictions): b's results are kept,
  # and the suite stops before c.
  monkeypatch.setattr(task_lib, "finetune", _fake_finetune(calls, signalled=("b",)))
  summary = task_lib.run_suite(cfg, patterns, workdir)  # a is read back, b resumes
  assert summary["stopped"] == "preempted" and summary["preempted_task"] == "c"
  assert [c[2] for c in calls[2:]] == ["b"]
  # A signal between two tasks, while c's data loads (outside any run's
  # handler, where it used to kill the process): the suite stops before c.
  real_load = task_lib.datasets.load_config_task

  def load_and_signal(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return real_load(*args, **kwargs)

  monkeypatch.setattr(task_lib, "finetune", _fake_finetune(calls))
  with monkeypatch.context() as m:
    m.setattr(task_lib.datasets, "load_config_task", load_and_signal)
    summary = task_lib.run_suite(cfg, patterns, workdir)
  assert summary["stopped"] == "preempted" and summary["preempted_task"] == "c"
  assert len(calls) == 3
  summary = task_lib.run_suite(cfg, patterns, workdir)  # a and b are read back
  assert summary["stopped"] == "completed" and [c[2] for c in calls[3:]] == ["c"]
  assert [r["task"] for r in summary["suite"] if r["split"] == "dev"] == ["a", "b", "c"]


def test_losses_weights_and_regression_targets(tmp_path):
  """The task's loss on fixed outputs: class weights, filler rows, and
  standardised regression targets that predictions are mapped back from."""
  folder = tmp_path / "reg"
  folder.mkdir()
  for split, labels in (("train", [1.0, 3.0, 5.0, 7.0]), ("dev", [2.0, 4.0]), ("test", [6.5])):
    (folder / f"{split}.csv").write_text(
      "sequence,label\n" + "".join(f"ACGT{'A' * i},{y}\n" for i, y in enumerate(labels))
    )
  task = task_lib.FinetuneTask(_config(str(folder)))
  assert task.kind == "regression" and task.selection == ("pearson", "max")
  assert task.label_mean == pytest.approx(4.0) and task.label_std == pytest.approx(np.sqrt(5))
  targets = task._labels("train")  # pylint: disable=protected-access
  np.testing.assert_allclose(targets, (np.array([1, 3, 5, 7]) - 4) / np.sqrt(5), rtol=1e-6)
  batch = {"labels": jnp.asarray(targets), "weight": jnp.array([1.0, 1.0, 1.0, 0.0])}
  outputs = jnp.zeros((4, 1))
  loss, sums = task.loss(lambda b: outputs, batch)
  assert float(sums["count"]) == 3.0  # the filler row does not count
  assert float(loss) == pytest.approx(float(np.sum(targets[:3] ** 2)), rel=1e-6)

  cls = tmp_path / "cls"
  cls.mkdir()
  for split in ("train", "dev", "test"):
    (cls / f"{split}.csv").write_text("sequence,label\nAC,0\nAG,0\nAT,0\nCC,1\n")
  task = task_lib.FinetuneTask(_config(str(cls), class_weights="balanced"))
  np.testing.assert_allclose(task.class_weights, [4 / 6, 4 / 2])
  logits = jnp.zeros((4, 2))  # nll = log 2 for every row
  batch = {"labels": jnp.array([0, 0, 1, 1]), "weight": jnp.ones(4)}
  loss, sums = task.loss(lambda b: logits, batch)
  assert float(sums["count"]) == pytest.approx(2 * 4 / 6 + 2 * 2)
  assert float(loss) == pytest.approx(float(sums["count"]) * np.log(2), rel=1e-6)
