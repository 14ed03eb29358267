"""Evaluation and the eval/score launchers on a tiny trained run: metrics
per record and overall, JSON + table + plot, and every score.py mode run as
a program."""

import gzip
import json
import math
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import LAMBDA_FASTA
from launch_env import launch_env

from hybridna_jax import restore, scoring, sharding, tokenizer
from hybridna_jax.data import fasta
from hybridna_jax.scoring import evaluation
from hybridna_jax.scoring import outputs as score_outputs
from hybridna_jax.scoring.variants import read_scores

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def genome():
  ((_, tokens),) = fasta.read_fasta(LAMBDA_FASTA)
  return tokenizer.decode(tokens)


@pytest.fixture(scope="module")
def inputs(genome, tmp_path_factory):
  root = tmp_path_factory.mktemp("inputs")
  seqs = root / "seqs.fa"
  fasta.write_fasta(
    seqs,
    [("short", genome[100:140]), ("long", genome[2000:2700] + "NN"), ("mid", genome[9000:9300])],
  )
  ref = root / "ref.fa"
  fasta.write_fasta(ref, [("chrA", genome[:3000])])
  calls = root / "calls.vcf"
  other = {"A": "C", "C": "G", "G": "T", "T": "A"}
  calls.write_text(
    "##fileformat=VCFv4.2\n#CHROM\tPOS\tID\tREF\tALT\n"
    f"chrA\t500\tv1\t{genome[499]}\t{other[genome[499]]}\n"
    f"chrA\t900\tv2\t{genome[899:902]}\t{genome[899]}\n"
    "chrA\t950\tbad\tN\tA\n"
  )
  return {"fasta": str(seqs), "reference": str(ref), "vcf": str(calls)}


@pytest.fixture(scope="module")
def scorer(tiny_run):
  model, _, run_config = restore.load(
    tiny_run, mesh=sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  )
  return scoring.Scorer.from_config(model, run_config, batch_size=4, min_bucket=64)


def test_evaluate_reports_records_and_overall(scorer, lambda_store, inputs, tmp_path):
  assert (scorer.context, scorer.stride) == (64, 32)  # the trained context
  seqs = evaluation.store_sequences(
    lambda_store.store_dir, "val", max_tokens=1000
  ) + evaluation.fasta_sequences([inputs["fasta"]])
  assert [s.name for s in seqs] == ["lambda_b", "short", "long", "mid"]
  result = evaluation.evaluate(scorer, seqs)
  records = result["records"]
  assert [r["tokens"] for r in records] == [999, 39, 699, 299]  # N and first base unscored
  ll = scorer.log_likelihood([s.tokens for s in seqs])
  for r, total, count in zip(records, ll.total, ll.count):
    assert r["tokens"] == count
    assert math.isclose(r["loss"], -total / count, rel_tol=1e-6)
    assert math.isclose(r["bits_per_nt"], r["loss"] / math.log(2), rel_tol=1e-9)
    assert math.isclose(r["perplexity"], math.exp(r["loss"]), rel_tol=1e-9)
    assert 0.0 <= r["accuracy"] <= 1.0
  overall = result["overall"]
  assert overall["tokens"] == sum(r["tokens"] for r in records) and overall["records"] == 4
  assert math.isclose(overall["loss"], -ll.total.sum() / ll.count.sum(), rel_tol=1e-6)
  result["checkpoint"] = "/runs/a/checkpoints/4"
  paths = evaluation.write(result, str(tmp_path), "eval")
  assert json.load(open(paths["json"]))["overall"]["tokens"] == overall["tokens"]
  # Another run's evaluation at the same step is not replaced; an unscorable
  # record's NaN is null (strict JSON).
  other = {**result, "checkpoint": "/runs/b/checkpoints/4"}
  with pytest.raises(ValueError, match=r"of another run, /runs/a/checkpoints/4, not of /runs/b/"):
    evaluation.write(other, str(tmp_path), "eval")
  result["records"][0]["loss"] = math.nan
  evaluation.write(result, str(tmp_path), "eval")
  strict = json.load(open(paths["json"]), parse_constant=lambda c: pytest.fail(c))
  assert strict["records"][0]["loss"] is None
  table = open(paths["txt"]).read()
  assert "lambda_b" in table and "overall" in table and "bits/nt" in table
  assert os.path.getsize(paths["png"]) > 0
  with pytest.raises(ValueError, match="no split 'test'"):
    evaluation.store_sequences(lambda_store.store_dir, "test")


def test_positions_outputs_of_two_names_never_share_a_file():
  """Review: pos.v1 and pos.v2 both wrote pos.png and pos.bedgraph
  (os.path.splitext), and --overwrite replaced one run's with the other's."""
  files = lambda output: score_outputs.output_files("positions", output, bedgraph=True)
  assert files("out/pos.v1") == ["out/pos.v1.npz", "out/pos.v1.png", "out/pos.v1.bedgraph"]
  assert files("out/pos.npz") == ["out/pos.npz", "out/pos.png", "out/pos.bedgraph"]


def test_score_modes_write_their_files(scorer, inputs, tmp_path):
  records = evaluation.fasta_sequences([inputs["fasta"]])
  names, tokens = [r.name for r in records], [r.tokens for r in records]
  write = lambda mode, out, **kw: score_outputs.score_sequences_to_files(
    mode, scorer, names, tokens, str(tmp_path / out), **kw
  )

  write("loglik", "ll.tsv", rc_average=True)
  rows = (tmp_path / "ll.tsv").read_text().splitlines()
  assert rows[0].split("\t") == list(score_outputs.LOGLIK_COLUMNS)
  # Strand means: "long" ends in NN, so its reverse strand scores one more base.
  assert [r.split("\t")[:3] for r in rows[1:]] == [
    ["short", "40", "39"],
    ["long", "702", "699.5"],
    ["mid", "300", "299"],
  ]
  ll = scorer.log_likelihood(tokens, rc_average=True)
  np.testing.assert_allclose([float(r.split("\t")[3]) for r in rows[1:]], ll.total, rtol=1e-6)

  paths = write("positions", "pos", bedgraph=True)
  assert paths == [
    str(tmp_path / "pos.npz"),
    str(tmp_path / "pos.png"),
    str(tmp_path / "pos.bedgraph"),
  ]
  positions = score_outputs.read_positions(paths[0])
  assert [(name, len(p.log_probs)) for name, p in positions] == [
    ("short", 40),
    ("long", 702),
    ("mid", 300),
  ]
  assert np.isnan(positions[1][1].log_probs[-2:]).all()
  bedgraph = (tmp_path / "pos.bedgraph").read_text().splitlines()
  assert bedgraph[0].startswith("track") and bedgraph[1].startswith("short\t1\t2\t")
  assert len(bedgraph) == 1 + 39 + 699 + 299  # one line per scored base here

  write("embed", "emb.npz", pooling="echo", layer=1)
  with np.load(tmp_path / "emb.npz") as emb:
    assert emb["embeddings"].shape == (3, 32) and str(emb["pooling"]) == "echo"
    assert list(emb["names"]) == ["short", "long", "mid"] and int(emb["layer"]) == 1


def test_loglik_counts_are_written_exactly(tmp_path):
  # A 1.2 Mb contig's count, and a strand mean (rc_average) ending in .5.
  counts = np.array([1_234_566.0, 1_234_566.5, 39.0])
  ll = scoring.LogLikelihood(-1.3 * counts, np.full(3, -1.3), counts)
  path = str(tmp_path / "ll.tsv")
  score_outputs.write_loglik(path, ["a", "b", "c"], [1_234_567, 1_234_567, 40], ll)
  rows = [r.split("\t") for r in open(path).read().splitlines()[1:]]
  assert [r[2] for r in rows] == ["1234566", "1234566.5", "39"]


def _launch(script, workdir, *args, env):
  """Starts launch/<script> (with --workdir=<workdir> unless it is None)."""
  workdir_flag = [f"--workdir={workdir}"] if workdir is not None else []
  return subprocess.Popen(
    [sys.executable, os.path.join(ROOT, "launch", script), *workdir_flag, *args],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def test_launchers(tiny_run, lambda_store, inputs, tmp_path):
  env = launch_env(8)  # with this session's compilation cache (conftest.py)
  out = tmp_path
  tiny = ["--config=configs/tiny.py", f"--config.data.store_dir={lambda_store.store_dir}"]
  runs = {  # both at once: the two CPU cores overlap start-up and compiles
    "eval": _launch(
      "eval.py",
      tiny_run,
      *tiny,
      "--config.score.eval_max_tokens=500",
      f"--output_dir={out}",
      env=env,
    ),
    "variants": _launch(
      "score.py",
      tiny_run,
      "--mode=variants",
      f"--variants={inputs['vcf']}",
      f"--reference={inputs['reference']}",
      f"--output={out}/v.tsv",
      f"--annotated={out}/v.vcf.gz",
      *tiny,
      "--config.score.variant_window=48",
      "--config.score.rc_average=True",
      env=env,
    ),
  }
  logs = {}
  for name, proc in runs.items():
    logs[name], _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{name} failed:\n{logs[name][-3000:]}"

  # The step restored, and the store's hash.
  (written,) = out.glob("eval_val-*_ctx64_stride32_step*_max500tok.json")
  result = json.load(open(written))
  assert result["records"][0]["name"] == "lambda_b" and result["overall"]["tokens"] == 499
  assert result["store"] == os.path.abspath(lambda_store.store_dir)
  assert result["which"] == "latest" and result["data"] == "val"
  assert "overall" in logs["eval"] and "bits/nt" in logs["eval"]
  assert written.with_suffix(".png").exists()

  scores = read_scores(str(out / "v.tsv"))
  assert [(r["id"], r["type"]) for r in scores] == [("v1", "SNV"), ("v2", "deletion")]
  assert int(scores[0]["window_end"]) - int(scores[0]["window_start"]) == 48
  assert scores[0]["llr_reverse"] != "nan"
  skipped = (out / "v.tsv.skipped.tsv").read_text().splitlines()
  assert len(skipped) == 2 and f"{inputs['vcf']}:5" in skipped[1]
  assert "skipped" in logs["variants"] and "compiled programs: 1" in logs["variants"]
  annotated = gzip.open(out / "v.vcf.gz", "rt").read().splitlines()
  assert "##INFO=<ID=HYBRIDNA_LLR_RC,Number=A" in "\n".join(annotated)
  llrs = [line.split("\t")[7] for line in annotated if not line.startswith("#")]
  assert llrs[0] == f"HYBRIDNA_LLR={scores[0]['llr_forward']};HYBRIDNA_LLR_RC={scores[0]['llr']}"
  assert (out / "v.vcf.gz.csi").exists() and (out / "v.tsv.png").exists()

  # A finished run's outputs are not replaced without --overwrite (refused
  # before the restore).
  again = _launch("score.py", tiny_run, *runs["variants"].args[3:], env=env)  # its flags
  log, _ = again.communicate(timeout=300)
  assert again.returncode != 0 and f"{out}/v.tsv exists (an earlier score run's)" in log


def test_score_without_config_restores_on_the_devices_it_has(tiny_run, inputs, tmp_path):
  # tiny_run was trained on 8 devices with mesh.tensor=2; scoring it on one
  # takes the run's `score` settings but not its training mesh.
  args = ["--mode=loglik", f"--fasta={inputs['fasta']}", f"--output={tmp_path}/ll.tsv"]
  proc = _launch("score.py", tiny_run, *args, env=launch_env(1))
  log, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, log[-3000:]
  assert "context 64" in log  # the trained context, from the run's config
  rows = (tmp_path / "ll.tsv").read_text().splitlines()
  assert [r.split("\t")[:3] for r in rows[1:]] == [
    ["short", "40", "39"],
    ["long", "702", "699"],
    ["mid", "300", "299"],
  ]
  again = _launch("score.py", tiny_run, *args, env=launch_env(1))
  log, _ = again.communicate(timeout=300)
  assert again.returncode != 0 and "ll.tsv exists (an earlier score run's)" in log
  replaced = _launch("score.py", tiny_run, *args, "--overwrite", env=launch_env(1))
  log, _ = replaced.communicate(timeout=300)
  assert replaced.returncode == 0, log[-3000:]
  # Review: an --output naming a directory scored everything, then failed
  # writing 'out/..partial'; it is refused first, in one line.
  to_dir = _launch("score.py", tiny_run, *args[:2], f"--output={tmp_path}/", env=launch_env(1))
  log, _ = to_dir.communicate(timeout=300)
  assert to_dir.returncode != 0 and f"--output={tmp_path}/ is a directory; name a file" in log
  assert "scored" not in log


def test_evaluations_of_other_data_or_checkpoints_never_share_a_file():
  stem = evaluation.output_stem
  assert stem("val", 64, 32) == "eval_val_ctx64_stride32"
  genome = stem(["/data/genome.fa.gz"], 64, 32)
  assert re.fullmatch(r"eval_genome-[0-9a-f]{8}_ctx64_stride32", genome)
  assert stem(["/other/genome.fa.gz"], 64, 32) != genome  # another strain's genome.fa
  assert stem(["/data/genome.fa.gz"], 64, 32, "best") == genome + "_best"
  assert stem("val", 64, 32, step=4) != stem("val", 64, 32, step=2)
  subsets = [
    stem("val", 64, 32, step=4, add_bos=True),
    stem("val", 64, 32, step=4, max_records=10),
    stem("val", 64, 32, step=4, max_tokens=10),
  ]
  assert len(set(subsets + [stem("val", 64, 32, step=4)])) == 4
  assert stem("val", 64, 32, step=4, dtype="bfloat16") == "eval_val_ctx64_stride32_step4_bfloat16"
  two, other = stem(["a.fa", "b.fa"], 64, 32), stem(["a.fa", "c.fa"], 64, 32)
  assert two.startswith("eval_2fasta-") and two != other
  assert two == stem(["b.fa", "a.fa"], 64, 32)  # the same set in another order


def test_evaluations_of_two_stores_never_share_a_file(tmp_path, monkeypatch):
  """Review: the held-out split's files were eval_val_..., whatever
  data.store_dir, and `write` compared only the checkpoint, so evaluating a
  checkpoint on another store into the same --output_dir replaced the first
  store's results."""
  stem = lambda store: evaluation.output_stem("val", 64, 32, store=store, step=4)
  a = stem("/data/store_a")
  assert re.fullmatch(r"eval_val-[0-9a-f]{8}_ctx64_stride32_step4", a)
  assert stem("/data/store_b") != a and stem("gs://bucket/store_a") != a
  # The same store, however named, keeps its name.
  assert stem("/data/store_a/") == a and stem("file:///data/store_a") == a
  assert stem("gs://bucket/store_a/") == stem("gs://bucket/store_a")
  monkeypatch.chdir(tmp_path)
  assert stem("store_c") == stem(str(tmp_path / "store_c"))
  assert evaluation.output_stem("val", 64, 32) == "eval_val_ctx64_stride32"  # no store given
  # Review: bf16 compute over fp32 weights and over bf16 weights score
  # differently; they shared a name, and the second replaced the first.
  bf16 = lambda weights: evaluation.output_stem(
    "val", 64, 32, dtype="bfloat16", param_dtype=weights
  )
  assert bf16("float32") == "eval_val_ctx64_stride32_bfloat16"
  assert bf16("bfloat16") == "eval_val_ctx64_stride32_bfloat16_bfloat16weights"
  # A file of that name holding another store's evaluation is not replaced.
  checkpoint = "/runs/a/checkpoints/4"
  (tmp_path / f"{a}.json").write_text(
    json.dumps({"checkpoint": checkpoint, "store": "/data/store_a"})
  )
  with pytest.raises(ValueError, match="holds the evaluation of the token store /data/store_a, "):
    evaluation.refuse_to_replace(str(tmp_path), a, checkpoint=checkpoint, store="/data/store_b")
  evaluation.refuse_to_replace(str(tmp_path), a, checkpoint=checkpoint, store="/data/store_a")
  with pytest.raises(ValueError, match="checkpoint of the same run, /runs/a/checkpoints/4, not"):
    evaluation.refuse_to_replace(str(tmp_path), a, checkpoint="/runs/a/best/4")
  monkeypatch.chdir("/")  # the same step directory, named relative to here
  evaluation.refuse_to_replace(str(tmp_path), a, checkpoint="runs/a/checkpoints/4")


def _run_with_best(tiny_run, root):
  """A copy of tiny_run whose best/ holds its checkpoint (step 2)."""
  run = root / "run"
  shutil.copytree(tiny_run, run)
  shutil.copytree(run / "checkpoints", run / "best")
  return run


def test_eval_names_and_records_the_checkpoint_restored(tiny_run, tmp_path):
  """Review: --checkpoint=<run>/best was named and recorded as --which
  (default latest); a clash with another checkpoint's file was found only
  after the whole evaluation, and blamed on "two runs" when it was another
  checkpoint of the same run."""
  run = _run_with_best(tiny_run, tmp_path)
  assert restore.find_checkpoint(str(run / "best")).which == "best"
  assert restore.find_checkpoint(str(run), "best").which == "best"
  assert restore.find_checkpoint(str(run / "checkpoints" / "2"), "best").which == "latest"
  env = launch_env(1)
  fasta_path = tmp_path / "seqs.fa"
  fasta.write_fasta(fasta_path, [("a", "ACGTTGCA" * 8)])
  args = [f"--checkpoint={run}/best", f"--fasta={fasta_path}"]
  stem = evaluation.output_stem([str(fasta_path)], 64, 32, "best", step=2)
  # Another checkpoint of this run already evaluated under that name.
  taken = tmp_path / "taken"
  taken.mkdir()
  (taken / f"{stem}.json").write_text(json.dumps({"checkpoint": f"{run}/checkpoints/2"}))
  procs = [
    _launch("eval.py", run, *args, f"--output_dir={tmp_path / 'out'}", env=env),
    _launch("eval.py", run, *args, f"--output_dir={taken}", env=env),
  ]
  (log, _), (refused, _) = [p.communicate(timeout=300) for p in procs]
  assert procs[0].returncode == 0, log[-3000:]
  result = json.load(open(tmp_path / "out" / f"{stem}.json"))
  assert result["which"] == "best" and result["checkpoint"] == f"{run}/best/2"
  assert procs[1].returncode != 0
  assert f"holds the evaluation of another checkpoint of the same run, {run}/checkpoints/2, " in (
    refused
  )
  assert "evaluating" not in refused and "windows" not in refused  # refused before scoring


def test_eval_and_score_take_a_checkpoint_without_workdir(tiny_run, lambda_store, tmp_path):
  """Review: --checkpoint without --workdir failed ("Flag --workdir must
  have a value other than None") though --help offers it instead. Outputs
  then go to the checkpoint's run directory; two stores evaluated there
  each keep their own files."""
  run = _run_with_best(tiny_run, tmp_path)
  other_store = tmp_path / "store_copy"
  shutil.copytree(lambda_store.store_dir, other_store)
  env = launch_env(1)
  evals = {
    store: _launch(
      "eval.py",
      None,
      f"--checkpoint={run}/checkpoints",
      "--config=configs/tiny.py",
      f"--config.data.store_dir={store}",
      "--config.score.eval_max_tokens=200",
      env=env,
    )
    for store in (lambda_store.store_dir, str(other_store))
  }
  fasta_path = tmp_path / "seqs.fa"
  fasta.write_fasta(fasta_path, [("a", "ACGTTGCA" * 8)])
  score = _launch(
    "score.py", None, f"--checkpoint={run}", "--mode=loglik", f"--fasta={fasta_path}", env=env
  )
  for proc in [*evals.values(), score]:
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-3000:]
  written = sorted((run / "eval").glob("eval_val-*_ctx64_stride32_step2_max200tok.json"))
  stores = {json.load(open(p))["store"] for p in written}
  assert len(written) == 2 and stores == {os.path.abspath(s) for s in evals}
  assert (run / "scores" / "loglik.tsv").exists()
  neither = _launch("eval.py", None, env=env)
  log, _ = neither.communicate(timeout=300)
  assert neither.returncode != 0 and "pass --workdir (the run to evaluate) or --checkpoint" in log


def test_fasta_inputs_skip_empty_records_only_when_asked(tmp_path, caplog):
  """Review: eval.py's error said "set data.allow_empty_records=True", which
  eval and score then ignored."""
  path = tmp_path / "in.fa"
  path.write_text(">a\nACGT\n>empty\n>a\nGGCC\n")
  with pytest.raises(fasta.FastaFormatError, match="line 3: header '>empty' has no sequence"):
    evaluation.fasta_sequences([str(path)])
  records = evaluation.fasta_sequences([str(path)], allow_empty_records=True)
  assert [(r.name, tokenizer.decode(r.tokens)) for r in records] == [("a", "ACGT"), ("a", "GGCC")]
  caplog.set_level("WARNING")
  evaluation.log_records(records)
  assert "1 record name(s) repeat (a)" in caplog.text


def test_model_fields_of_a_job_config_that_the_checkpoint_overrides_are_named(tiny_run, caplog):
  """Review of stop 37: eval/score --config.model.dtype=bfloat16 scored in
  float32 without a word (the checkpoint decides the model; score.dtype sets
  its numerics)."""
  config = restore.run_config(tiny_run)
  scoring.Scorer.from_run(tiny_run, config)
  assert "are not used" not in caplog.text  # the run's own config: nothing differs
  config.model.dtype = "bfloat16"
  config.model.remat = "full"
  scorer, _ = scoring.Scorer.from_run(tiny_run, config)
  assert "--config's model.dtype, model.remat differ from the run's and are not used" in caplog.text
  assert scorer.model_config.dtype == "float32"


def test_fasta_inputs_stream_only_what_is_evaluated(tmp_path):
  """Review: every record was read whole before eval_max_records and
  eval_max_tokens applied, so a bad record past the limit failed the run and
  each kept prefix was a view holding its whole record. The bad record here
  lies past the reader's first block (fasta.DEFAULT_BLOCK_SIZE)."""
  path = tmp_path / "in.fa"
  long = "ACGT" * (fasta.DEFAULT_BLOCK_SIZE // 4 + 1000)
  path.write_text(f">a\nACGTACGT\nACGT\n>b\n{long}\n>c\nAC*GT\n")
  records = evaluation.fasta_sequences([str(path)], max_records=1, max_tokens=10)
  assert [(r.name, tokenizer.decode(r.tokens)) for r in records] == [("a", "ACGTACGTAC")]
  with pytest.raises(fasta.FastaFormatError, match="line 7: record 'c'"):
    evaluation.fasta_sequences([str(path)], max_records=3, max_tokens=10)
  (tmp_path / "long.fa").write_text(f">b\n{long}\n")
  (record,) = evaluation.fasta_sequences([str(tmp_path / "long.fa")], max_tokens=10)
  assert len(record.tokens) == 10 and record.tokens.base is None  # a copy, not a view
