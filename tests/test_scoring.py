"""Scoring: jitted, bucketed scores equal a direct forward pass; windows
cover every position once with enough context; RC averaging is symmetric;
embeddings match the hidden states; no recompilation for new inputs."""

import os

import jax
import numpy as np
import pytest
from conftest import LAMBDA_FASTA
from flax import nnx

from hybridna_jax import echo as echo_lib
from hybridna_jax import restore, scoring, sharding, tokenizer
from hybridna_jax.data import fasta

CONTEXT = 64


@pytest.fixture(scope="module")
def model(tiny_run):
  model, _, _ = restore.load(tiny_run, mesh=sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
  return model


@pytest.fixture(scope="module")
def scorer(model):
  return scoring.Scorer(model, context=CONTEXT, stride=16, batch_size=4, min_bucket=16)


@pytest.fixture(scope="module")
def genome():
  ((_, tokens),) = fasta.read_fasta(LAMBDA_FASTA)
  return tokens.astype(np.int32)


@nnx.jit
def _forward(model, tokens):
  out = model(tokens, return_hidden_states=True)
  return jax.nn.log_softmax(out.logits, -1), out.hidden, out.hidden_states


def _direct_log_probs(log_softmax, tokens):
  """log p(x_j | x_<j) for j >= 1 from (b, l, V) log-softmax outputs."""
  return np.take_along_axis(np.asarray(log_softmax)[:, :-1], tokens[:, 1:, None], -1)[..., 0]


def test_plan_windows_cover_every_position_once_with_context():
  for length, context, stride in [
    (10, 64, 32),
    (64, 64, 32),
    (65, 64, 32),
    (1000, 64, 16),
    (1000, 64, 63),
    (129, 64, 1),
    (300, 100, 30),
  ]:
    windows = scoring.plan_windows(length, context, stride)
    covered = np.zeros(length, int)
    for i, w in enumerate(windows):
      assert 0 <= w.start <= w.score_from < w.end <= length
      assert w.end - w.start <= context
      covered[w.score_from : w.end] += 1
      if i:
        assert w.score_from - w.start >= context - stride
        assert w.end - w.start == context  # long inputs: full windows only
    np.testing.assert_array_equal(covered, 1)
  with pytest.raises(ValueError, match="stride"):
    scoring.plan_windows(100, 64, 64)
  assert scoring.bucket_lengths(64, 16) == (16, 32, 64)
  assert scoring.bucket_lengths(100, 16) == (16, 32, 64, 100)


def test_scores_equal_a_direct_forward_pass_and_windowing_short_inputs_changes_nothing(
  model, scorer, genome
):
  # Shorter than the context: one window, padded to the 64 bucket.
  seqs = [genome[1000:1040], genome[5000:5040]]
  log_softmax, _, _ = _forward(model, np.stack(seqs))
  direct = _direct_log_probs(log_softmax, np.stack(seqs))
  ll = scorer.log_likelihood(seqs)
  positions = scorer.position_scores(seqs)
  for i in range(2):
    assert np.isnan(positions[i].log_probs[0]) and np.isnan(positions[i].entropy[0])
    np.testing.assert_allclose(positions[i].log_probs[1:], direct[i], rtol=1e-5, atol=1e-5)
    probs = np.exp(np.asarray(log_softmax[i, :-1]))
    np.testing.assert_allclose(
      positions[i].entropy[1:],
      -(probs * np.asarray(log_softmax[i, :-1])).sum(-1),
      rtol=1e-4,
      atol=1e-5,
    )
  np.testing.assert_allclose(ll.total, direct.sum(1), rtol=1e-5)
  np.testing.assert_allclose(ll.mean, direct.mean(1), rtol=1e-5)
  np.testing.assert_array_equal(ll.count, [39, 39])
  # Strings and token arrays are the same input.
  as_text = scorer.log_likelihood([tokenizer.decode(s) for s in seqs])
  np.testing.assert_allclose(as_text.total, ll.total, rtol=1e-6)


def test_windowed_scores_equal_a_forward_pass_on_the_window(model, scorer, genome):
  seq = genome[:400]
  windows = scoring.plan_windows(len(seq), CONTEXT, scorer.stride)
  contents = np.stack([seq[w.start : w.end] for w in windows])  # all 64 long
  direct = _direct_log_probs(_forward(model, contents)[0], contents)
  lp = scorer.position_scores([seq])[0].log_probs
  expected = np.full(len(seq), np.nan, np.float32)
  for w, row in zip(windows, direct):
    first = max(w.score_from, 1)
    expected[first : w.end] = row[first - w.start - 1 : w.end - w.start - 1]
  np.testing.assert_allclose(lp, expected, rtol=1e-5, atol=1e-5)
  ll = scorer.log_likelihood([seq])
  np.testing.assert_allclose(ll.total[0], np.nansum(expected), rtol=1e-5)
  assert ll.count[0] == len(seq) - 1


def test_unscored_positions_and_long_inputs(scorer, genome):
  seq = genome[:3000].copy()
  seq[[100, 2500]] = tokenizer.N
  pos = scorer.position_scores([seq])[0]
  assert pos.log_probs.shape == pos.entropy.shape == (3000,)
  np.testing.assert_array_equal(np.flatnonzero(np.isnan(pos.log_probs)), [0, 100, 2500])
  np.testing.assert_array_equal(np.flatnonzero(np.isnan(pos.entropy)), [0])
  stats = scorer.token_stats([seq])
  assert stats.count[0] == 2997 and 0 <= stats.correct[0] <= 2997
  np.testing.assert_allclose(-stats.nll[0], np.nansum(pos.log_probs), rtol=1e-6)


def test_rc_averaging_is_symmetric(scorer, genome):
  seq = genome[7000:7100]  # windowed: longer than the context
  rc = tokenizer.reverse_complement_nucleotides(seq)
  ll = scorer.log_likelihood([seq, rc], rc_average=True)
  np.testing.assert_allclose(ll.total[0], ll.total[1], rtol=1e-6)
  np.testing.assert_allclose(ll.mean[0], ll.mean[1], rtol=1e-6)
  forward = scorer.log_likelihood([seq, rc])
  np.testing.assert_allclose(ll.total[0], forward.total.mean(), rtol=1e-6)
  p_seq, p_rc = scorer.position_scores([seq, rc], rc_average=True)
  np.testing.assert_allclose(p_seq.log_probs, p_rc.log_probs[::-1], rtol=1e-6)
  assert not np.isnan(p_seq.log_probs).any()  # each end is scored on one strand
  # Entropies too are per base: the same base's two strands averaged.
  np.testing.assert_allclose(p_seq.entropy, p_rc.entropy[::-1], rtol=1e-6)
  assert not np.isnan(p_seq.entropy).any()
  e_seq, e_rc = scorer.embed([seq, rc], rc_average=True)
  np.testing.assert_allclose(e_seq, e_rc, rtol=1e-5, atol=1e-6)


def test_mean_embedding_of_a_windowed_sequence_pools_each_nucleotide_once(model, genome):
  """embed(pooling="mean") over several windows, N inside, with and without
  <bos>: the mean over nucleotides of each one's hidden state from the window
  that scores it (the weights are now made with each batch, not held)."""
  seq = genome[7000:7150].copy()
  seq[10:20] = tokenizer.N
  for add_bos in (False, True):
    s = scoring.Scorer(
      model, context=CONTEXT, stride=16, batch_size=4, min_bucket=16, add_bos=add_bos
    )
    read = np.concatenate([[tokenizer.BOS], seq]) if add_bos else seq
    total, count = 0.0, 0
    for w in scoring.plan_windows(len(read), CONTEXT, 16):
      window = read[w.start : w.end]
      hidden = np.asarray(_forward(model, window[None])[1][0])
      keep = tokenizer.is_nucleotide(window) & (np.arange(w.start, w.end) >= w.score_from)
      total, count = total + hidden[keep].sum(0), count + keep.sum()
    assert count == len(seq)  # every base once, N included
    np.testing.assert_allclose(s.embed([seq])[0], total / count, rtol=1e-5, atol=1e-6)


def test_rc_averaging_where_one_strand_scores_nothing(scorer, tmp_path, monkeypatch):
  """N everywhere but one end: one strand scores one base, the other none.
  The mean is that strand's (review: the mean of a NaN and a number, so the
  TSV read nan beside a finite sum), and only records neither strand
  scores are warned about."""
  from hybridna_jax.scoring import evaluation, outputs  # pylint: disable=g-import-not-at-top

  names = ["NNNNA", "ANNNN", "NA", "NNNN"]
  seqs = [tokenizer.encode(n, context="sequence").astype(np.int32) for n in names]
  ll = scorer.log_likelihood(seqs, rc_average=True)
  positions = scorer.position_scores(seqs, rc_average=True)
  for i in range(3):
    np.testing.assert_allclose(ll.mean[i], np.nanmean(positions[i].log_probs), rtol=1e-6)
    assert ll.count[i] == 0.5
  assert np.isnan(ll.mean[3]) and ll.count[3] == 0
  assert evaluation.unscorable(names, seqs, rc_average=True) == ["NNNN (all N)"]
  assert evaluation.unscorable(names, seqs) == ["ANNNN (all N)", "NNNN (all N)"]
  # Names that repeat (one per FASTA file) come back in order, all of them;
  # an empty record is written without a row.
  empty = scoring.PositionScores(np.zeros(0, np.float32), np.zeros(0, np.float32))
  path = str(tmp_path / "pos.npz")
  outputs.write_positions(path, ["chr1", "chr1", "e"], positions[:2] + [empty])
  assert [name for name, _ in outputs.read_positions(path)] == ["chr1", "chr1", "e"]

  # An unscorable record's row: nothing scored sums to 0, not -0.
  tsv = str(tmp_path / "ll.tsv")
  outputs.write_loglik(tsv, ["n"], [4], scoring.LogLikelihood(*np.array([[-0.0], [np.nan], [0.0]])))
  assert open(tsv).read().splitlines()[1] == "n\t4\t0\t0.000000\tnan\tnan"
  os.remove(tsv)

  # A write that fails half-way leaves the earlier file whole, and no
  # temporary file.
  def full_disk(f, **arrays):
    f.write(b"PK\x03\x04 partial")
    raise OSError(28, "No space left on device")

  with monkeypatch.context() as m:
    m.setattr(outputs.np, "savez_compressed", full_disk)
    with pytest.raises(OSError, match="No space left"):
      outputs.write_positions(path, ["a"], positions[:1])
  assert [name for name, _ in outputs.read_positions(path)] == ["chr1", "chr1", "e"]
  assert sorted(os.listdir(tmp_path)) == ["pos.npz"]
  outputs.write_bedgraph(str(tmp_path / "e.bedgraph"), ["e"], [empty])
  assert (tmp_path / "e.bedgraph").read_text().count("\n") == 1  # the track line
  assert os.path.exists(outputs.plot_positions(str(tmp_path / "e.png"), ["e"], [empty]))


def test_embeddings_match_hidden_states(model, scorer, genome):
  seqs = [genome[1000:1040], genome[5000:5040]]
  _, hidden, hidden_states = _forward(model, np.stack(seqs))
  hidden, layer1 = np.asarray(hidden), np.asarray(hidden_states[1])
  np.testing.assert_allclose(scorer.embed(seqs), hidden.mean(1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    scorer.embed(seqs, pooling="last", layer=1), layer1[:, -1], rtol=1e-5, atol=1e-6
  )
  table = np.asarray(model.embed[...])
  np.testing.assert_allclose(
    scorer.embed(seqs, layer=0), table[np.stack(seqs)].mean(1), rtol=1e-5, atol=1e-6
  )
  # Echo: the second copy of [x, <sep>, x] read from one direct pass (30
  # nucleotides: the echo fits the context of 64 in one piece).
  seqs = [s[:30] for s in seqs]
  batch = echo_lib.build_batch(seqs, 61, echo=True)
  echo, lengths = batch["inputs"], batch["segment_ids"].sum(1)
  assert echo.shape == (2, 61) and list(lengths) == [61, 61]
  second = np.stack([np.flatnonzero(m) for m in batch["pool_mask"]])
  _, echo_hidden, _ = _forward(model, echo)
  expected = np.take_along_axis(np.asarray(echo_hidden), second[..., None], 1).mean(1)
  np.testing.assert_allclose(scorer.embed(seqs, pooling="echo"), expected, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="pooling"):
    scorer.embed(seqs, pooling="max")
  with pytest.raises(ValueError, match="layer"):
    scorer.embed(seqs, layer=3)


def test_echo_views_match_each_pooling(model, genome):
  # One echo pass per strand gives what four embed calls give; an N in the
  # first copy is left out of the plain mean as embed(pooling="mean") does.
  # Its own scorer: the module's counts its traces (test_no_recompilation...).
  scorer = scoring.Scorer(model, context=CONTEXT, stride=16, batch_size=4, min_bucket=16)
  seqs = [genome[2000:2030], genome[3000:3017].copy()]
  seqs[1][5] = tokenizer.encode("N")[0]
  views = scorer.embed_echo_views(seqs, layer=1)
  calls = {
    "echo": dict(pooling="echo"),
    "echo_rc": dict(pooling="echo", rc_average=True),
    "plain_mean": dict(pooling="mean"),
    "plain_mean_rc": dict(pooling="mean", rc_average=True),
  }
  assert sorted(views) == sorted(calls)
  for name, kwargs in calls.items():
    want = scorer.embed(seqs, layer=1, **kwargs)
    np.testing.assert_allclose(views[name], want, rtol=1e-5, atol=1e-5, err_msg=name)
  with pytest.raises(ValueError, match="raise score.context to at least"):
    scorer.embed_echo_views([genome[:40]])  # 2 x 40 + 2 > the context of 64


def test_echo_rows_read_by_echo_embeddings():
  tokens = [np.array([5, 6, 7], np.int32), np.array([8, 9], np.int32)]
  batch = echo_lib.build_batch(tokens, 9, echo=True)
  echo, second = batch["inputs"], [np.flatnonzero(m) for m in batch["pool_mask"]]
  np.testing.assert_array_equal(echo, [[5, 6, 7, 3, 5, 6, 7, 0, 0], [8, 9, 3, 8, 9, 0, 0, 0, 0]])
  np.testing.assert_array_equal(batch["segment_ids"].sum(1), [7, 5])
  np.testing.assert_array_equal(second[0], [4, 5, 6])
  np.testing.assert_array_equal(second[1], [3, 4])
  np.testing.assert_array_equal(echo[0, second[0]], tokens[0])


def test_no_recompilation_for_new_inputs(scorer, genome):
  rng = np.random.default_rng(1)

  def batch():
    return [genome[s : s + n] for s, n in zip(rng.integers(0, 40_000, 7), rng.integers(2, 300, 7))]

  scorer.log_likelihood(batch())
  scorer.log_likelihood([genome[:10], genome[:20], genome[:40]])  # every bucket
  before = scorer.trace_count
  assert before <= len(scorer.buckets) + 4  # + embedding programs of other tests
  for _ in range(3):
    scorer.log_likelihood(batch())
    scorer.position_scores(batch(), rc_average=True)
  assert scorer.trace_count == before


def test_sharded_model_scores_the_same(tiny_run, scorer, genome):
  model_8, _, _ = restore.load(tiny_run, mesh=sharding.make_mesh(2, 2, 2))
  sharded = scoring.Scorer(model_8, scorer.settings)
  assert sharded.mesh.size == 8
  seqs = [genome[:150], genome[9000:9030]]
  np.testing.assert_allclose(
    sharded.log_likelihood(seqs).total, scorer.log_likelihood(seqs).total, rtol=1e-5
  )


def test_from_run_records_its_checkpoint_in_the_fingerprint(tiny_run, scorer):
  restored, _ = scoring.Scorer.from_run(
    tiny_run, mesh=sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  )
  (step,) = os.listdir(os.path.join(tiny_run, "checkpoints"))
  assert restored.fingerprint() == {
    "checkpoint": os.path.join(tiny_run, "checkpoints", step),
    "context": CONTEXT,  # the trained one
    "stride": CONTEXT // 2,
    "add_bos": False,
    "dtype": "float32/float32",
  }
  assert scorer.fingerprint()["checkpoint"] is None  # built from a model


def test_bad_inputs_are_named(scorer):
  with pytest.raises(tokenizer.InvalidSequenceError, match="sequence 1.*'X' at position 2"):
    scorer.log_likelihood(["ACGT", "ACXT"])
  with pytest.raises(ValueError, match="token 1 at position 0 is not a nucleotide"):
    scorer.log_likelihood([np.array([tokenizer.BOS, 5, 6])])
  with pytest.raises(ValueError, match="stride"):
    scoring.ScoreConfig(context=64, stride=64)
