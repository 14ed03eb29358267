"""Sequence design: label vocabularies, design CSVs and batches, the
generative fine-tuning task end to end (a label's motif shows up under its
own label token, far more than under another's), the sampling workflow's
FASTA and summary, and the summary metrics."""

import copy
import csv
import dataclasses
import functools
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from launch_env import launch_env

from hybridna_jax import design, restore, sharding
from hybridna_jax import generate as gen
from hybridna_jax import tokenizer as tok
from hybridna_jax.config import ModelConfig, load_config
from hybridna_jax.data import fasta
from hybridna_jax.data.tasks import TaskFormatError
from hybridna_jax.design import data as design_data
from hybridna_jax.design import metrics
from hybridna_jax.design import sampling as design_sampling
from hybridna_jax.model import create_model
from hybridna_jax.train import step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOTIFS = {"a": "GATTAC", "b": "CCGCGG"}
SEQ_LEN = 24


def _write_csv(path, rows, header=("sequence", "label", "activity")):
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)
  return str(path)


def _motif_rows(n, seed):
  """Random 24-nt sequences, each with its label's motif at a random place."""
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n):
    label = "ab"[i % 2]
    seq = list(rng.choice(list("ACGT"), SEQ_LEN))
    pos = int(rng.integers(0, SEQ_LEN - 6 + 1))
    seq[pos : pos + 6] = MOTIFS[label]
    rows.append(("".join(seq), label, f"{rng.normal():.3f}"))
  return rows


def _config(tmp_path, **generate):
  cfg = load_config(os.path.join(REPO, "configs", "tiny.py"))
  # Two layers of the tiny model (Mamba2, attention): fast to compile.
  cfg.model.n_layers = 2
  cfg.model.attn_layers = (1,)
  cfg.mesh.num_devices = 1
  g = cfg.generate
  g.train_csv = _write_csv(tmp_path / "train.csv", _motif_rows(256, seed=0))
  g.val_csv = _write_csv(tmp_path / "val.csv", _motif_rows(64, seed=1))
  for k, v in generate.items():
    g[k] = v
  t = cfg.train
  t.stages = ((32, 800, 16),)
  t.learning_rate = 3e-3
  t.warmup_steps = 20
  t.log_every = 100
  t.eval_every = 800
  t.eval_batch_size = 32
  t.checkpoint_every = 800
  t.keep_best = False
  t.plot = False
  t.async_checkpoints = False
  return cfg


# -- vocabulary and data ---------------------------------------------------------------


def test_categorical_vocab_prompts_and_config_round_trip(tmp_path):
  cfg = _config(tmp_path, first_task_token=3)
  vocab = design.resolve_vocab(cfg)
  (cond,) = vocab.conditions
  assert cond.values == ("a", "b") and cond.first_token == tok.task_token(3)
  np.testing.assert_array_equal(
    vocab.prompt({"label": "b"}, "ACG"), [tok.BOS, tok.task_token(4), tok.A, tok.C, tok.G]
  )
  np.testing.assert_array_equal(vocab.prompt(None), [tok.BOS])
  assert vocab.parse("b") == {"label": "b"} and vocab.parse("label=a") == {"label": "a"}
  assert vocab.parse("unconditional") is None
  with pytest.raises(KeyError, match="no label 'c'.*known labels: \\['a', 'b'\\]"):
    vocab.parse("c")
  # The mapping is in the config, so config.json keeps it, and it wins
  # over the CSV afterwards.
  saved = json.loads(cfg.to_json_best_effort())
  assert saved["generate"]["prompt_vocab"][0]["values"] == ["a", "b"]
  cfg.generate.train_csv = "/nonexistent.csv"
  assert design.resolve_vocab(cfg) == vocab


def test_label_order_does_not_depend_on_set_order_and_unnamable_labels_are_refused():
  # "nan" once broke the sort, leaving the label -> token map to set order
  # (which differs between processes: PYTHONHASHSEED).
  build = lambda labels: design.PromptVocab.build(
    design.DesignData("t.csv", ("label",), ["ACGT"] * len(labels), {"label": labels}, [2] * 9),
    kind="categorical",
    num_bins=2,
    first_task_token=0,
  )
  labels = ["10", "nan", "2", "1", "3", "inf"]
  assert build(labels).conditions[0].values == ("1", "2", "3", "10", "inf", "nan")
  assert build(labels[::-1]).conditions[0].values == ("1", "2", "3", "10", "inf", "nan")
  with pytest.raises(ValueError, match=r"t.csv: column 'label' has label\(s\) \['HepG2,high'\]"):
    build(["HepG2,high", "K562"])


def test_wrong_label_control_changes_every_condition():
  # 4 cell types and 2 strands: one shift for both (4 // 2 = 2) left the
  # strand right; each condition moves by half its own values.
  vocab = design.PromptVocab(
    (
      design.Condition("cell", "categorical", tuple("ABCD"), tok.task_token(0)),
      design.Condition("strand", "categorical", ("+", "-"), tok.task_token(4)),
    )
  )
  labels = np.array([[tok.task_token(c), tok.task_token(4 + c % 2)] for c in range(4)], np.int32)
  examples = design_data.Examples(labels, [tok.encode("ACGT").astype(np.int32)] * 4)
  rows = lambda wrong: np.concatenate(
    [
      b["inputs"][:, 1:3]
      for b in design.eval_batches(
        examples, seq_len=12, batch_size=4, wrong_labels=wrong, vocab=vocab
      )
    ]
  )
  true, wrong = rows(False), rows(True)
  np.testing.assert_array_equal(true, labels)
  assert (wrong != true).all()


def test_bins_vocab_one_token_per_condition_and_activity_bin(tmp_path):
  """regLM-style: two conditions (cell types), activities cut into 4
  quantile bins each, one token per (condition, bin)."""
  rows = [("ACGT", str(float(i)), str(float(-i))) for i in range(100)]
  data = design.load_design_csv(
    _write_csv(tmp_path / "t.csv", rows, ("sequence", "HepG2", "K562")), ("HepG2", "K562")
  )
  vocab = design.PromptVocab.build(data, kind="bins", num_bins=4, first_task_token=2)
  hepg2, k562 = vocab.conditions
  assert hepg2.values == k562.values == ("0", "1", "2", "3")
  assert (hepg2.first_token, k562.first_token) == (tok.task_token(2), tok.task_token(6))
  np.testing.assert_allclose(hepg2.edges, [24.75, 49.5, 74.25])
  # CSV rows bin their raw activities; prompts name bins.
  tokens = design.tokenize(data, vocab).label_tokens
  assert tokens[0].tolist() == [tok.task_token(2), tok.task_token(9)]
  assert tokens[99].tolist() == [tok.task_token(5), tok.task_token(6)]
  assert vocab.label_tokens({"HepG2": "3", "K562": "0"}) == [tok.task_token(5), tok.task_token(6)]
  assert vocab.parse("3,0") == vocab.parse("K562=0,HepG2=3") == {"HepG2": "3", "K562": "0"}
  assert vocab.describe({"HepG2": "60.0", "K562": "-1"}, raw=True) == "HepG2=2,K562=3"
  assert len(vocab.all_labels()) == 16
  with pytest.raises(ValueError, match="column=label or labels in column order"):
    vocab.parse("3,K562=0")
  with pytest.raises(ValueError, match=r"gives 1 label\(s\) for the 2 conditions"):
    vocab.parse("3")


@pytest.mark.parametrize(
  "activities, bins, per_bin",
  [
    ([0] * 60 + list(range(1, 41)), 2, [0, 100]),  # the lower edge is the minimum
    ([0] * 50 + [10] * 50, 4, [0, 50, 0, 50]),  # interior edges between ties
  ],
)
def test_bins_that_no_training_row_falls_in_are_refused(tmp_path, activities, bins, per_bin):
  """Tied activities (many zeros) can leave a quantile bin empty: its
  prompt token would never be trained, yet be offered for design."""
  rows = [("ACGT", "x", str(a)) for a in activities]
  data = design.load_design_csv(_write_csv(tmp_path / "t.csv", rows), ("activity",))
  with pytest.raises(ValueError, match=re.escape(f"rows per bin: {per_bin}); lower")):
    design.PromptVocab.build(data, kind="bins", num_bins=bins, first_task_token=0)


def test_csv_errors_name_file_line_and_fix(tmp_path):
  path = _write_csv(tmp_path / "bad.csv", [("ACGT", "a", "1"), ("ACXT", "b", "2")])
  with pytest.raises(TaskFormatError, match=r"bad\.csv line 3: .*invalid nucleotide 'X'"):
    design.load_design_csv(path, ("label",))
  path = _write_csv(tmp_path / "cols.csv", [("ACGT", "a", "1")])
  with pytest.raises(
    TaskFormatError,
    match=r"cols\.csv line 1: .*lacks the label column.*"
    r"\['cell'\].*label_columns",
  ):
    design.load_design_csv(path, ("cell",))
  path = _write_csv(tmp_path / "nan.csv", [("ACGT", "a", "1"), ("ACGT", "b", "high")])
  data = design.load_design_csv(path, ("activity",))
  with pytest.raises(TaskFormatError, match=r"nan\.csv line 3: .*'high' is not a number"):
    design.PromptVocab.build(data, kind="bins", num_bins=2, first_task_token=0)


def test_batches_put_the_loss_on_dna_and_eos_only():
  labels = np.array([tok.task_token(0), tok.task_token(7)], np.int32)
  row = design.example_row(labels, tok.encode("ACGTN"), 12)
  np.testing.assert_array_equal(
    row, [tok.BOS, labels[0], labels[1], tok.A, tok.C, tok.G, tok.T, tok.N, tok.EOS, 0, 0, 0]
  )
  batch = design.lm_batch(row[None], mask_n_in_loss=True)
  np.testing.assert_array_equal(batch["inputs"][0], row[:-1])
  np.testing.assert_array_equal(batch["targets"][0], row[1:])
  # Targets: label, label, A C G T N <eos> pad pad pad -> scored A C G T <eos>.
  np.testing.assert_array_equal(batch["loss_mask"][0], [0, 0, 1, 1, 1, 1, 0, 1, 0, 0, 0])
  np.testing.assert_array_equal(batch["segment_ids"][0], [1] * 9 + [0] * 2)
  assert design.lm_batch(row[None], mask_n_in_loss=False)["loss_mask"][0, 6] == 1
  flipped = design.example_row(labels, tok.encode("AACG"), 8, reverse=True, drop_labels=True)
  np.testing.assert_array_equal(flipped, [tok.BOS, tok.C, tok.G, tok.T, tok.T, tok.EOS, 0, 0])


def test_train_iterator_shuffles_epochs_and_resumes_from_its_state():
  examples = design.Examples(
    np.arange(10, 20, dtype=np.int32)[:, None], [tok.encode("ACGT"[: 1 + i % 4]) for i in range(10)]
  )
  it = design.train_batches(examples, seq_len=8, batch_size=5, seed=3)
  epoch = np.concatenate([next(it)["inputs"][:, 1] for _ in range(2)])
  assert sorted(epoch.tolist()) == list(range(10, 20))  # every example once
  assert epoch.tolist() != list(range(10, 20))
  state = it.get_state()
  expected = [next(it)["inputs"] for _ in range(3)]
  resumed = design.train_batches(examples, seq_len=8, batch_size=5, seed=3)
  resumed.set_state(state)
  started = design.train_batches(examples, seq_len=8, batch_size=5, seed=3, start_batch=2)
  for want in expected:
    np.testing.assert_array_equal(next(resumed)["inputs"], want)
    np.testing.assert_array_equal(next(started)["inputs"], want)  # how a resumed run reads on
  # Processes holding rows 0-1 and 2-4 of each global batch, and the columns
  # [0, 4) or [4, 8) of each row (a context axis across processes), load
  # their parts of the same batches.
  one = design.train_batches(examples, seq_len=8, batch_size=5, seed=3)
  whole = [next(one) for _ in range(2)]
  for rows in ([0, 1], [2, 3, 4]):
    for columns in ((0, 4), (4, 8)):
      part = design.train_batches(
        examples, seq_len=8, batch_size=5, seed=3, rows=rows, columns=columns
      )
      for want in whole:
        got = next(part)
        for key, value in want.items():
          np.testing.assert_array_equal(got[key], value[rows, columns[0] : columns[1]], key)
  evals = design.eval_batches(examples, seq_len=8, batch_size=4)  # 10 examples + 2 empty rows
  parts = design.eval_batches(examples, seq_len=8, batch_size=4, rows=[1, 3], columns=(4, 8))
  assert len(parts) == len(evals) == 3
  for got, want in zip(parts, evals):
    for key, value in want.items():
      np.testing.assert_array_equal(got[key], value[[1, 3], 4:8], key)
  dropped = design.train_batches(examples, seq_len=8, batch_size=10, seed=3, label_dropout=0.5)
  firsts = next(dropped)["inputs"][:, 1]
  assert 0 < np.sum(firsts < 10) < 10  # some rows start with DNA, not a label
  # rc_prob=0.5: some rows (not all) read the reverse complement.
  same = design.Examples(examples.label_tokens, [tok.encode("AACG")] * 10)
  batch = next(design.train_batches(same, seq_len=8, batch_size=10, seed=3, rc_prob=0.5))
  dna = batch["inputs"][:, 2:6]  # <bos> label A A C G <eos>, or C G T T reversed
  flipped = (dna == tok.encode("CGTT")).all(1)
  assert (flipped | (dna == tok.encode("AACG")).all(1)).all(), dna
  assert 0 < flipped.sum() < 10, flipped


def test_pretrained_run_must_match_every_architecture_field(tmp_path):
  # The legacy run's model is this config's (Mamba2, attention; placed by
  # attn_period/offset there, attn_layers here): it loads, whatever the
  # runtime fields say.
  cfg = _config(tmp_path, pretrained=os.path.join(REPO, "tests", "data", "legacy_run"))
  cfg.model.remat, cfg.model.attention_impl = "full", "xla_blockwise"
  assert design.GenerativeFinetuning(cfg).pretrained.step == 2
  # Another positional encoding (or norm epsilon) is another model.
  cfg.model.rope = True
  with pytest.raises(ValueError, match=r"differs from config.model in \{'rope': \(False, True\)\}"):
    design.GenerativeFinetuning(cfg)
  cfg.model.rope, cfg.model.norm_eps = False, 1e-6
  with pytest.raises(ValueError, match=r"in \{'norm_eps': \(1e-05, 1e-06\)\}"):
    design.GenerativeFinetuning(cfg)


def test_task_checks_lengths_and_validation(tmp_path):
  cfg = _config(tmp_path)
  cfg.train.stages = ((20, 10, 4),)
  with pytest.raises(ValueError, match=r"stages\[0\] seq_len 20 is too short.*needs 26"):
    design.GenerativeFinetuning(cfg)
  cfg = _config(tmp_path, val_csv="")
  with pytest.raises(ValueError, match="eval_every > 0 but config.generate.val_csv is empty"):
    design.GenerativeFinetuning(cfg)
  # Label tokens past the embedding (a run converted with 10 token ids).
  cfg = _config(tmp_path)
  cfg.model.vocab_size = 10
  with pytest.raises(ValueError, match=r"vocab_size=10 has no rows for the label tokens.*128"):
    design.GenerativeFinetuning(cfg)
  # A validation row longer than the training ones would be cut short.
  long_val = [(r[0] * 3, r[1], r[2]) for r in _motif_rows(4, seed=2)]
  cfg = _config(tmp_path, val_csv=_write_csv(tmp_path / "long_val.csv", long_val))
  with pytest.raises(ValueError, match="seq_len 32 is too short: the longest validation example"):
    design.GenerativeFinetuning(cfg)


def test_resume_keeps_the_label_tokens_it_was_trained_with(tmp_path):
  """A resumed run reads its label -> token map from its config.json: a CSV
  with a new label (which would sort first and shift every token) is
  refused by name, and so is another prompt_vocab given explicitly."""
  cfg = _config(tmp_path)
  cfg.train.stages, cfg.train.eval_every, cfg.train.checkpoint_every = ((32, 2, 4),), 0, 2
  workdir = str(tmp_path / "run")
  design.finetune(cfg, workdir)
  trained = json.load(open(os.path.join(workdir, "config.json")))["generate"]["prompt_vocab"]
  assert trained[0]["values"] == ["a", "b"]
  relabelled = [
    (seq, "0" if i % 3 == 0 else label, act)
    for i, (seq, label, act) in enumerate(_motif_rows(64, 0))
  ]
  cfg = _config(tmp_path, train_csv=_write_csv(tmp_path / "new.csv", relabelled))
  cfg.train.stages, cfg.train.eval_every = ((32, 4, 4),), 0
  with pytest.raises(TaskFormatError, match=r"has no label '0'; known labels: \['a', 'b'\]"):
    design.finetune(cfg, workdir)
  cfg = _config(tmp_path, prompt_vocab=({**trained[0], "values": ["b", "a"]},))
  with pytest.raises(ValueError, match="prompt_vocab differs from the one"):
    design.finetune(cfg, workdir)
  assert (
    json.load(open(os.path.join(workdir, "config.json")))["generate"]["prompt_vocab"] == trained
  )


# -- fine-tuning and sampling end to end ----------------------------------------------------


@pytest.fixture(scope="module")
def motif_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("design")
  cfg = _config(tmp)
  workdir = str(tmp / "run")
  summary = design.finetune(cfg, workdir)
  return cfg, workdir, summary


def _motif_share(sequences, motif):
  return float(np.mean([motif in s for s in sequences]))


def test_finetuned_model_writes_each_labels_motif(motif_run, tmp_path):
  cfg, workdir, summary = motif_run
  assert summary["stopped"] == "completed" and summary["steps"] == 800
  val = summary["final_val"]
  assert val["label_gain_bits"] > 0.05, val  # the label tokens are used
  out = str(tmp_path / "designs.fasta")
  result = design_sampling.run_sampling(
    workdir, out, num_samples=48, batch_size=32, max_new_tokens=SEQ_LEN, temperature=1.0, seed=0
  )
  records = fasta.read_fasta(out)
  assert len(records) == 96
  designs = {"a": [], "b": []}
  for header, tokens in records:
    label = re.search(r"labels=label=(\w)", header.description).group(1)
    designs[label].append(tok.decode(tokens))
    assert re.search(
      r"prompt=<bos><task_[01]> .*temperature=1 top_k=0 top_p=1 length=24 "
      r"seed=0 checkpoint=\S+/800 log_prob=-[\d.]+ ended_with_eos=0",
      header.description,
    ), header.line
  assert {len(s) for s in designs["a"] + designs["b"]} == {SEQ_LEN}
  own = [_motif_share(designs[l], MOTIFS[l]) for l in "ab"]
  other = [_motif_share(designs[l], MOTIFS["ba"["ab".index(l)]]) for l in "ab"]
  print("motif share under own label", own, "under the other label", other)
  for mine, theirs in zip(own, other):
    assert mine >= 0.5 and mine >= 5 * max(theirs, 1 / 48), (own, other)
  # The summary compares each set with the training sequences of its label.
  s = result["summary"]["label=a"]
  assert s["n"] == 48 and s["reference_n"] == 128 and 0 <= s["copy_share"] < 0.5
  assert 0.2 < s["gc_mean"] < 0.8 and 0 < s["kmer_js"] < 1 and s["edit_norm"] > 0.3
  with open(os.path.splitext(out)[0] + ".summary.json") as f:
    assert set(json.load(f)["summary"]) == {"label=a", "label=b"}
  assert os.path.getsize(os.path.splitext(out)[0] + ".summary.png") > 10_000
  assert "label=b" in result["table"]


def _oracle_csvs(tmp_path):
  return {
    "oracle_csv": _write_csv(tmp_path / "oracle.csv", _motif_rows(256, seed=2)),
    "oracle_dev_csv": _write_csv(tmp_path / "oracle_dev.csv", _motif_rows(64, seed=3)),
    "test_csv": _write_csv(tmp_path / "test.csv", _motif_rows(96, seed=4)),
  }


def test_sampling_summary_carries_the_oracle_report(motif_run, tmp_path):
  """With oracle CSVs (real sequences the generator never saw), the summary
  JSON holds the oracle's shares: designed, real held-out, shuffled, chance."""
  _, workdir, _ = motif_run
  out = str(tmp_path / "designs.fasta")
  result = design_sampling.run_sampling(
    workdir,
    out,
    num_samples=48,
    batch_size=48,
    max_new_tokens=SEQ_LEN,
    seed=0,
    **_oracle_csvs(tmp_path),
  )
  with open(os.path.splitext(out)[0] + ".summary.json") as f:
    report = json.load(f)["oracle"]
  assert report == json.loads(json.dumps(result["oracle"]))
  assert set(report) >= {"oracle", "chance", "by_label", "mean_over_labels", "verdict", "test_csv"}
  assert report["chance"] == 0.5 and list(report["by_label"]) == ["a", "b"]
  assert report["oracle"]["k"] in (3, 4, 5, 6) and report["oracle"]["train_rows"] == 256
  for label in "ab":
    by_kind = report["by_label"][label]
    assert by_kind["designed"]["n"] == 48 and by_kind["real"]["n"] == 48
    assert by_kind["shuffled"]["n"] == 48
  mean = report["mean_over_labels"]
  print("oracle shares", mean)
  # The model writes its label's motif, which the oracle reads.
  assert mean["real"] > mean["shuffled"] and mean["designed"] > 0.6, mean
  assert "requested label" in result["table"] and report["verdict"] in result["table"]


def test_finetuning_starts_from_a_pretrained_run(motif_run):
  cfg, workdir, _ = motif_run
  cfg = copy.deepcopy(cfg)
  cfg.generate.pretrained = workdir
  task = design.GenerativeFinetuning(cfg)
  mesh = sharding.mesh_from_config(cfg.mesh)
  fns = step_lib.build_steps(task.init_model, task.loss, *task.optimizer(10), mesh)
  state = task.start(fns, fns.init(jax.random.key(1)))
  trained = restore.restore_params(restore.find_checkpoint(workdir), task.model_cfg, mesh)
  for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(trained)):
    np.testing.assert_array_equal(x, y)
  cfg.model.d_model = 64  # fails before anything compiles
  with pytest.raises(ValueError, match=r"differs from config.model in \{'d_model': \(32, 64\)"):
    design.GenerativeFinetuning(cfg)


def test_sampling_counts_from_flags_are_validated_not_defaulted(motif_run, tmp_path):
  _, workdir, _ = motif_run
  out = str(tmp_path / "designs.fasta")
  with pytest.raises(ValueError, match="config.generate: num_samples must be >= 1, got 0"):
    design_sampling.run_sampling(workdir, out, num_samples=0)


def test_launcher_samples_with_beam_search(motif_run, tmp_path):
  _, workdir, _ = motif_run
  out = str(tmp_path / "beams.fasta")
  env = launch_env(1)  # this tree's package, whatever the venv has installed
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(REPO, "launch", "generate.py"),
      "--mode=sample",
      f"--workdir={workdir}",
      f"--output={out}",
      "--labels=b",
      "--beam_width=4",
      "--num_samples=4",
      f"--length={SEQ_LEN}",
    ]
    + [f"--{field}={path}" for field, path in _oracle_csvs(tmp_path).items()],
    capture_output=True,
    text=True,
    env=env,
    cwd=REPO,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "label=b" in proc.stdout and "mean over labels" in proc.stdout  # judged
  records = fasta.read_fasta(out)
  assert len(records) == 4 and all("beam=4" in h.description for h, _ in records)
  log_probs = [float(re.search(r"log_prob=(-[\d.]+)", h.description).group(1)) for h, _ in records]
  assert log_probs == sorted(log_probs, reverse=True)
  # A second run into the same --output is refused; nothing is replaced.
  before = open(out).read()
  again = subprocess.run(proc.args, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
  assert again.returncode != 0 and "exists (an earlier sampling run's)" in again.stderr
  assert open(out).read() == before
  # So is one whose summaries would replace that run's (beams.fa shares
  # beams.summary.*; review: the summaries were replaced silently).
  summary_before = open(tmp_path / "beams.summary.json").read()
  other = [a.replace("beams.fasta", "beams.fa") for a in proc.args]
  third = subprocess.run(other, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
  assert third.returncode != 0 and "beams.summary.json exists" in third.stderr
  assert open(tmp_path / "beams.summary.json").read() == summary_before
  assert not os.path.exists(tmp_path / "beams.fa")
  assert MOTIFS["b"] in tok.decode(records[0][1])  # the most likely design has it
  # --checkpoint alone names the run (review of stop 37: --workdir was required).
  alone = [a for a in proc.args if not a.startswith("--workdir")]
  alone = [a.replace("beams.fasta", "alone.fasta") for a in alone] + [f"--checkpoint={workdir}"]
  fourth = subprocess.run(alone, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
  assert fourth.returncode == 0, fourth.stderr[-3000:]
  designs = [tok.decode(s) for _, s in fasta.read_fasta(tmp_path / "alone.fasta")]
  assert designs == [tok.decode(s) for _, s in records]  # the same run, the same beams


# -- summary metrics ------------------------------------------------------------------------------


def _levenshtein(a, b):
  prev = list(range(len(b) + 1))
  for i, x in enumerate(a, 1):
    cur = [i]
    for j, y in enumerate(b, 1):
      cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
    prev = cur
  return prev[-1]


def test_edit_distances_match_the_textbook_recurrence():
  rng = np.random.default_rng(0)
  a = ["".join(rng.choice(list("ACGT"), rng.integers(0, 30))) for _ in range(60)]
  b = ["".join(rng.choice(list("ACG"), rng.integers(0, 30))) for _ in range(60)]
  a[:3], b[:3] = ["", "ACGT", "GATTACA"], ["ACG", "ACGT", "TACAGAT"]
  np.testing.assert_array_equal(
    metrics.edit_distances(a, b), [_levenshtein(x, y) for x, y in zip(a, b)]
  )
  mean, norm = metrics.pairwise_edit_distance(["AAAA", "AAAT", "TTTT"])
  assert mean == pytest.approx((1 + 4 + 3) / 3) and norm == pytest.approx((1 + 4 + 3) / 12)


def test_gc_kmer_spectra_and_summary():
  # G+C among A C G T only: N counts neither way.
  np.testing.assert_allclose(
    metrics.gc_content(["GGCC", "ATGC", "NNAT", "NNGC"]), [1.0, 0.5, 0.0, 1.0]
  )
  counts = metrics.kmer_counts(["ACGTA", "ANCGT"], k=2)
  # AC CG GT TA from the first; CG GT from the second (AN, NC skipped).
  index = {"AC": 1, "CG": 6, "GT": 11, "TA": 12}
  assert counts.sum() == 6 and {k: counts[v] for k, v in index.items()} == {
    "AC": 1,
    "CG": 2,
    "GT": 2,
    "TA": 1,
  }
  assert metrics.js_distance(counts, counts) == 0.0
  assert metrics.js_distance([1, 0], [0, 1]) == pytest.approx(1.0)
  rng = np.random.default_rng(0)
  reference = ["".join(rng.choice(list("ACGT"), 50)) for _ in range(200)]
  designs = reference[:5] + ["GC" * 25] * 5
  s = metrics.summarize(
    designs, reference, log_probs=np.full(10, -51.0), scored_tokens=np.full(10, 51)
  )
  assert s["copy_share"] == 0.5 and s["n"] == 10 and s["log_prob_per_nt"] == pytest.approx(-1.0)
  assert s["kmer_js"] > s["kmer_js_floor"] > 0
  assert "copies" in metrics.format_table({"x": s})
  # A reverse-complemented training sequence is a copy too.
  rc = metrics.summarize([tok.reverse_complement(reference[0]), "GC" * 25], reference)
  assert rc["copy_share"] == 0.5


@pytest.mark.parametrize("designs", [64, 100])
def test_designs_like_the_reference_sit_at_the_js_floor(designs):
  # Designs drawn from the reference's own distribution are as close as
  # real data gets: the floor compares at the designs' size (the earlier
  # floor used fewer sequences, and such designs sat 18-37% below it).
  rng = np.random.default_rng(1)
  draw = lambda n: [
    "".join(rng.choice(list("ACGT"), 200, p=[0.3, 0.2, 0.2, 0.3])) for _ in range(n)
  ]
  ratios = []
  for seed in range(4):
    s = metrics.summarize(draw(designs), draw(124), k=6, seed=seed)
    ratios.append(s["kmer_js"] / s["kmer_js_floor"])
  assert 0.95 < np.mean(ratios) < 1.05, ratios


def test_log_prob_per_nt_counts_the_scored_tokens_only():
  """The DNA prefix is not scored, and an <eos> only where one was generated."""
  cfg = ModelConfig.from_config(load_config(os.path.join(REPO, "configs", "tiny.py")).model)
  model = create_model(dataclasses.replace(cfg, n_layers=2, attn_layers=(1,)))
  settings = gen.GenerateConfig(max_new_tokens=6, temperature=1.0)
  design = functools.partial(
    design_sampling.design_sets, model, None, [None], settings, seed=0, prefix="ACGTACGT"
  )
  (fixed,) = design(num_samples=3, batch_size=2)
  np.testing.assert_array_equal(fixed.lengths, 6)
  assert [len(s) for s in fixed.sequences] == [14] * 3 and not fixed.ended.any()
  summary = design_sampling.summarize_sets([fixed], None, None)["prefix"]
  assert summary["log_prob_per_nt"] == pytest.approx(fixed.log_probs.sum() / 18)
  ended = dataclasses.replace(fixed, lengths=np.array([6, 2, 4]), ended=np.array([0, 1, 1], bool))
  summary = design_sampling.summarize_sets([ended], None, None)["prefix"]
  assert summary["log_prob_per_nt"] == pytest.approx(fixed.log_probs.sum() / (6 + 3 + 5))
  for counts, field in (((0, 2), "num_samples"), ((3, 0), "batch_size"), ((3, -1), "batch_size")):
    with pytest.raises(ValueError, match=f"design_sets: {field} must be >= 1"):
      design(num_samples=counts[0], batch_size=counts[1])


def test_one_design_summary_is_strict_json_and_empty_designs_get_no_record(
  motif_run, tmp_path, caplog
):
  _, workdir, _ = motif_run
  out = str(tmp_path / "one.fasta")
  design_sampling.run_sampling(
    workdir, out, label_specs=["b"], num_samples=1, batch_size=1, max_new_tokens=SEQ_LEN
  )
  with open(os.path.splitext(out)[0] + ".summary.json") as f:
    summary = json.load(f, parse_constant=lambda c: pytest.fail(f"{c} in the summary"))
  assert summary["summary"]["label=b"]["edit_mean"] is None  # one design: no pairs
  # A design that ended at once (<eos> first) has no FASTA record, with a
  # prefix too (review of stop 37: written as the bare prefix, no warning).
  for prefix in ("", "AC"):
    caplog.clear()
    empty = design_sampling.DesignedSet(
      "x",
      None,
      prefix,
      np.array([tok.BOS]),
      [prefix, prefix + "ACG"],
      np.zeros(2),
      np.ones(2, bool),
      np.array([0, 3]),
    )
    path = design_sampling.write_fasta(
      [empty], str(tmp_path / "e.fasta"), settings=gen.GenerateConfig(), seed=0
    )
    assert [h.name for h, _ in fasta.read_fasta(path)] == ["x_1"]
    assert "1 design(s) ended at once" in caplog.text


def test_design_records_of_prompts_with_the_same_slug_stay_apart(tmp_path):
  sets = [
    design_sampling.DesignedSet(
      name, None, "", np.array([tok.BOS]), ["ACG"], np.zeros(1), np.ones(1, bool), np.array([3])
    )
    for name in ("label=Su(Hw)", "label=Su_Hw")
  ]
  path = design_sampling.write_fasta(
    sets, str(tmp_path / "s.fasta"), settings=gen.GenerateConfig(), seed=0
  )
  names = [h.name for h, _ in fasta.read_fasta(path)]
  assert names == ["p0_label_Su_Hw_0", "p1_label_Su_Hw_0"]


def test_a_bad_oracle_setting_is_refused_before_sampling_and_writes_nothing(
  motif_run, tmp_path, monkeypatch
):
  _, workdir, _ = motif_run
  out = tmp_path / "designs.fasta"
  csvs = {**_oracle_csvs(tmp_path), "test_csv": str(tmp_path / "missing.csv")}
  monkeypatch.setattr(design_sampling, "design_sets", lambda *a, **k: pytest.fail("sampled"))
  with pytest.raises(
    FileNotFoundError, match=r"missing.csv: no such file \(config.generate.test_csv"
  ):
    design_sampling.run_sampling(workdir, str(out), num_samples=2, batch_size=2, **csvs)
  assert not any(n.startswith("designs") for n in os.listdir(tmp_path))


def test_beam_designs_leave_out_empty_beam_slots(caplog):
  """One new token over A/C/G/T: 4 hypotheses for a beam of 6; the two
  empty slots (-inf) are not written as empty designs."""
  cfg = ModelConfig.from_config(load_config(os.path.join(REPO, "configs", "tiny.py")).model)
  model = create_model(dataclasses.replace(cfg, n_layers=2, attn_layers=(1,)))
  settings = gen.GenerateConfig(max_new_tokens=1, beam_width=6)
  (beams,) = design_sampling.design_sets(
    model, None, [None], settings, num_samples=6, batch_size=6, seed=0, prefix="ACGT"
  )
  assert sorted(s[-1] for s in beams.sequences) == list("ACGT")
  assert np.isfinite(beams.log_probs).all() and len(beams.lengths) == 4
  assert "found 4 of 6 designs" in caplog.text
  assert "apply to sampling only" not in caplog.text
  # Sampling settings are named, not silently dropped (review of stop 37).
  settings = dataclasses.replace(settings, temperature=0.7, top_k=2)
  design_sampling.design_sets(
    model, None, [None], settings, num_samples=6, batch_size=6, seed=0, prefix="ACGT"
  )
  assert "temperature=0.7, top_k=2 apply to sampling only" in caplog.text


def test_designs_start_with_the_prefix_the_model_read():
  """Review of stop 37: the prefix was written as typed (acgu, ACRY) while
  the model read ACGT / ACNN, so FASTA, header and metrics disagreed with it."""
  cfg = ModelConfig.from_config(load_config(os.path.join(REPO, "configs", "tiny.py")).model)
  model = create_model(dataclasses.replace(cfg, n_layers=2, attn_layers=(1,)))
  settings = gen.GenerateConfig(max_new_tokens=3, temperature=1.0)
  (designs,) = design_sampling.design_sets(
    model, None, [None], settings, num_samples=2, batch_size=2, seed=0, prefix="acgRy"
  )
  assert designs.prefix == "ACGNN"
  assert all(s.startswith("ACGNN") and len(s) == 8 for s in designs.sequences)
  assert tok.decode(designs.prompt) == "ACGNN"


def test_a_column_named_twice_and_out_of_range_sample_ids_are_refused():
  vocab = design.PromptVocab(
    (design.Condition("label", "categorical", ("a", "b"), tok.task_token(0)),)
  )
  assert vocab.parse("label = b") == {"label": "b"}
  with pytest.raises(ValueError, match=r"names column 'label' twice; give it once"):
    vocab.parse("label=a, label =b")
  with pytest.raises(ValueError, match=r"sample ids must be in \[0, 2\*\*32\)"):
    gen.row_keys(0, [0, 2**32])
  with pytest.raises(ValueError, match=r"sample ids must be in"):
    gen.row_keys(0, [-1])


def test_a_pretrained_lm_compares_its_designs_with_a_reference_csv(tiny_run, tmp_path, caplog):
  """Review of stop 37: --reference_csv was ignored for a checkpoint
  without prompt tokens, with a "not found" warning for a file that existed."""
  reference = tmp_path / "ref.csv"
  _write_csv(reference, [("ACGTACGTAA", "x", 1.0), ("GGGCCCAATT", "y", 2.0)])
  result = design_sampling.run_sampling(
    tiny_run,
    str(tmp_path / "lm.fasta"),
    prefix="ACGT",
    reference_csv=str(reference),
    num_samples=2,
    batch_size=2,
    max_new_tokens=6,
  )
  (summary,) = result["summary"].values()
  assert summary["reference_n"] == 2 and "not found" not in caplog.text
