"""Cached generation against the full forward: greedy decoding is the argmax
of the full forward's logits token by token, reported log-probs are the
full forward's, sampling filters and seeds behave, and beam search keeps
the exact best hypotheses."""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybridna_jax import generate as gen
from hybridna_jax import tokenizer as tok
from hybridna_jax.config import ModelConfig, load_config
from hybridna_jax.model import create_model

TINY = ModelConfig.from_config(load_config("configs/tiny.py").model)
TWO_LAYERS = dataclasses.replace(TINY, n_layers=2, attn_layers=(1,))
# Prompts of different lengths (left-padded together): task tokens, <bos>, DNA.
PROMPTS = [
  np.array([tok.BOS, tok.task_token(2), tok.A, tok.C, tok.G, tok.T, tok.T]),
  np.array([tok.BOS, tok.task_token(0)]),
  np.array([tok.G, tok.G, tok.C, tok.A, tok.T]),
]
NEW = 12


@functools.cache
def _model(ending: bool = False, rope: bool = False):
  """The tiny model cut to two layers, Mamba2 then attention (both kinds of
  cache, half the compile time of four), with weights scaled up so that
  the next token depends on the whole context (a freshly initialised model
  is nearly flat and greedy decoding falls into repeats at once). With
  `ending`, the <eos> logit is A's plus half of C's, so rows end at
  different steps; with `rope`, attention uses rotary positions."""
  model = create_model(dataclasses.replace(TWO_LAYERS, rope=rope), seed=0)
  assert [l.kind for l in model.layers] == ["mamba", "attention"]
  graphdef, state = nnx.split(model)

  def scale(path, x):
    name = jax.tree_util.keystr(path)
    return x * 10.0 if name.startswith("['layers']") and "kernel" in name else x

  model = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(scale, state))
  if ending:
    head = model.lm_head[...]
    model.lm_head[...] = head.at[:, tok.EOS].set(head[:, tok.A] + 0.5 * head[:, tok.C])
  return model


@functools.cache
def _flat_model():
  """`_model()` with a zero lm_head: every logit is 0 whatever the context,
  so sampling is uniform over the allowed tokens, and greedy decoding takes
  the lowest allowed id (argmax's first maximum): <eos> (2) once allowed,
  else A (5)."""
  model = nnx.clone(_model())
  model.lm_head[...] = jnp.zeros_like(model.lm_head[...])
  return model


@nnx.jit
def _full_logits(model, tokens):
  return model(tokens).logits


def _full_forward_reference(model, generated, allowed):
  """For each prompt + generated row, run through the full forward (rows
  right-padded: the model is causal, so pads after a row change nothing):
  the argmax over `allowed` ((vocab,) or (steps, vocab)) of the logits at
  every generated position, the log-prob of the generated tokens, and the
  number of tokens up to and including the first <eos>."""
  ends = [int(np.argmax(g == tok.EOS)) + 1 if (g == tok.EOS).any() else len(g) for g in generated]
  rows = [np.concatenate([p, g[:n]]) for p, g, n in zip(PROMPTS, generated, ends)]
  tokens = np.full((len(rows), max(len(p) for p in PROMPTS) + NEW), tok.PAD, np.int32)
  for i, r in enumerate(rows):
    tokens[i, : len(r)] = r
  logits = np.asarray(_full_logits(model, jnp.asarray(tokens)))
  out = []
  for i, (p, g, n) in enumerate(zip(PROMPTS, generated, ends)):
    step_logits = logits[i, len(p) - 1 : len(p) - 1 + n]
    mask = allowed[:n] if allowed.ndim == 2 else allowed
    masked = np.where(mask, step_logits, -np.inf)
    argmax = np.argmax(masked, axis=-1)
    # A near-tie (top two within 1e-4) may break either way in float32:
    # count the generated token as the argmax there.
    top = np.take_along_axis(masked, argmax[:, None], axis=-1)[:, 0]
    chosen = np.take_along_axis(masked, g[:n, None].astype(np.int64), axis=-1)[:, 0]
    argmax = np.where(chosen >= top - 1e-4, g[:n], argmax)
    logp = float(jax.nn.log_softmax(step_logits, axis=-1)[np.arange(n), g[:n]].sum())
    out.append((argmax, logp, n))
  return out


@pytest.mark.parametrize("rope", [False, True])
def test_greedy_equals_full_forward_argmax_token_by_token(rope):
  model = _model(rope=rope)
  out = jax.device_get(
    gen.sample(model, PROMPTS, gen.GenerateConfig(max_new_tokens=NEW, temperature=0))
  )
  assert out.tokens.shape == (3, NEW)
  reference = _full_forward_reference(model, out.tokens, gen.allowed_tokens())
  for row, logp, (argmax, ref_logp, _) in zip(out.tokens, out.log_probs, reference):
    np.testing.assert_array_equal(row, argmax)
    np.testing.assert_allclose(logp, ref_logp, rtol=1e-4)
  assert set(np.unique(out.tokens)) <= {tok.A, tok.C, tok.G, tok.T}
  assert len({tuple(r) for r in out.tokens}) > 1  # the prompts matter
  np.testing.assert_array_equal(out.lengths, NEW)
  assert not out.ended.any()


def test_greedy_stop_at_eos_pads_finished_rows():
  model = _model(ending=True)
  settings = gen.GenerateConfig(
    max_new_tokens=NEW, temperature=0, stop_at_eos=True, min_new_tokens=3
  )
  out = jax.device_get(gen.sample(model, PROMPTS, settings))
  assert out.ended.any(), out.tokens  # <eos> is likely once allowed
  allowed = np.stack([gen.allowed_tokens(allow_eos=i >= 3) for i in range(NEW)])
  reference = _full_forward_reference(model, out.tokens, allowed)
  for row, length, ended, logp, (argmax, ref_logp, n) in zip(
    out.tokens, out.lengths, out.ended, out.log_probs, reference
  ):
    np.testing.assert_array_equal(row[:n], argmax)
    if ended:
      assert row[n - 1] == tok.EOS and n - 1 == length >= 3
      assert (row[n:] == tok.PAD).all()
    else:
      assert length == n == NEW and tok.EOS not in row
    np.testing.assert_allclose(logp, ref_logp, rtol=1e-4)
  # The reference scorer agrees on the padded continuations.
  np.testing.assert_allclose(
    gen.sequence_log_probs(model, PROMPTS, out.tokens), out.log_probs, rtol=1e-4
  )


def test_eos_is_allowed_from_exactly_min_new_tokens():
  model = _flat_model()
  assert tok.EOS < tok.A
  settings = gen.GenerateConfig(max_new_tokens=8, temperature=0, stop_at_eos=True, min_new_tokens=3)
  out = jax.device_get(gen.sample(model, PROMPTS, settings))
  np.testing.assert_array_equal(out.lengths, 3)
  assert out.ended.all()
  expected = [tok.A] * 3 + [tok.EOS] + [tok.PAD] * 4
  np.testing.assert_array_equal(out.tokens, np.broadcast_to(expected, (3, 8)))


def test_sampling_draws_a_fresh_token_every_step():
  """On a flat model at temperature 1 every step is a uniform draw over
  A C G T: each token and repeats of the previous token come ~1/4 of the
  time (504 pairs: a standard deviation of 0.02). A key reused across steps
  would repeat one token for a whole row."""
  model = _flat_model()
  settings = gen.GenerateConfig(max_new_tokens=64, temperature=1.0)
  out = jax.device_get(gen.sample(model, [PROMPTS[0]] * 8, settings, seed=0))
  tokens = out.tokens
  assert set(np.unique(tokens)) <= {tok.A, tok.C, tok.G, tok.T}
  repeats = (tokens[:, 1:] == tokens[:, :-1]).mean()
  assert 0.15 < repeats < 0.35, repeats
  for t in (tok.A, tok.C, tok.G, tok.T):
    assert 0.15 < (tokens == t).mean() < 0.35, (t, (tokens == t).mean())


def test_filter_logits_distribution():
  logits = jnp.log(jnp.array([[0.05, 0.4, 0.3, 0.15, 0.1]]))
  allowed = jnp.array([True, True, True, True, False])

  def probs(temperature, top_k, top_p):
    return np.exp(
      gen.filter_logits(
        logits, allowed, jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p)
      )
    )[0]

  base = np.array([0.05, 0.4, 0.3, 0.15, 0.0]) / 0.9
  np.testing.assert_allclose(probs(1.0, 0, 1.0), base, atol=1e-6)
  np.testing.assert_allclose(probs(1.0, 2, 1.0), [0, 0.4 / 0.7, 0.3 / 0.7, 0, 0], atol=1e-6)
  # Nucleus: 0.4/0.9 + 0.3/0.9 = 0.78 < 0.8, so the third token is needed too.
  np.testing.assert_allclose(
    probs(1.0, 0, 0.8), [0, 0.4 / 0.85, 0.3 / 0.85, 0.15 / 0.85, 0], atol=1e-6
  )
  np.testing.assert_allclose(probs(1.0, 0, 0.3), [0, 1, 0, 0, 0], atol=1e-6)
  # top_k first, then the nucleus of what it keeps: 0.4 / 0.7 already reaches 0.5.
  np.testing.assert_allclose(probs(1.0, 2, 0.5), [0, 1, 0, 0, 0], atol=1e-6)
  # The smallest set that reaches top_p: mass exactly top_p needs no more tokens.
  exact = gen.filter_logits(
    jnp.log(jnp.array([[0.5, 0.25, 0.25]])),
    jnp.ones(3, bool),
    jnp.float32(1.0),
    jnp.int32(0),
    jnp.float32(0.5),
  )
  np.testing.assert_array_equal(np.exp(exact)[0], [1, 0, 0])
  sharp = np.array([0.05, 0.4, 0.3, 0.15, 0.0]) ** 2
  np.testing.assert_allclose(probs(0.5, 0, 1.0), sharp / sharp.sum(), atol=1e-6)


def test_sampling_seeds_filters_and_batching():
  model = _model()
  settings = gen.GenerateConfig(
    max_new_tokens=NEW, temperature=1.5, top_k=3, top_p=0.95, allow_n=True
  )
  prompts = PROMPTS * 2
  a = jax.device_get(gen.sample(model, prompts, settings, seed=7))
  b = jax.device_get(gen.sample(model, prompts, settings, seed=7))
  c = jax.device_get(gen.sample(model, prompts, settings, seed=8))
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert (a.tokens != c.tokens).any()
  # jax keeps 32 bits of a seed: 2**32 would repeat seed 0 (review).
  for bad in (-1, 2**32, 2**63):
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*32\)"):
      gen.sample(model, prompts, settings, seed=bad)
  assert (a.tokens[:3] != a.tokens[3:]).any()  # each row its own stream
  assert set(np.unique(a.tokens)) <= {tok.A, tok.C, tok.G, tok.T, tok.N}
  # A row's sample depends on (seed, sample id), not on its place in the batch.
  order = np.array([5, 3, 4, 0, 1, 2])
  d = jax.device_get(
    gen.sample(model, [prompts[i] for i in order], settings, seed=7, sample_ids=order)
  )
  np.testing.assert_array_equal(d.tokens, a.tokens[order])
  # top_k=1 is greedy whatever the temperature (same compiled program).
  one = jax.device_get(gen.sample(model, prompts, dataclasses.replace(settings, top_k=1)))
  reference = _full_forward_reference(model, one.tokens[:3], gen.allowed_tokens(allow_n=True))
  for row, (argmax, _, _) in zip(one.tokens, reference):
    np.testing.assert_array_equal(row, argmax)
  for logp, (_, ref_logp, _) in zip(
    a.log_probs, _full_forward_reference(model, a.tokens[:3], gen.allowed_tokens(allow_n=True))
  ):
    np.testing.assert_allclose(logp, ref_logp, rtol=1e-4)


def test_beam_width_one_is_greedy_and_wider_beams_score_higher():
  model = _model()
  greedy = jax.device_get(
    gen.sample(model, PROMPTS, gen.GenerateConfig(max_new_tokens=NEW, temperature=0))
  )
  one = jax.device_get(
    gen.beam_search(model, PROMPTS, gen.GenerateConfig(max_new_tokens=NEW, beam_width=1))
  )
  np.testing.assert_array_equal(one.tokens[:, 0], greedy.tokens)
  np.testing.assert_allclose(one.log_probs[:, 0], greedy.log_probs, rtol=1e-5)
  wide = jax.device_get(
    gen.beam_search(model, PROMPTS, gen.GenerateConfig(max_new_tokens=NEW, beam_width=4))
  )
  assert (wide.log_probs[:, 0] >= greedy.log_probs - 1e-4).all()
  assert (np.diff(wide.scores, axis=1) <= 1e-6).all()  # best first
  for row in range(3):  # distinct hypotheses
    assert len({tuple(t) for t in wide.tokens[row]}) == 4
  reference = _full_forward_reference(model, wide.tokens[:, 0], gen.allowed_tokens())
  np.testing.assert_allclose(wide.log_probs[:, 0], [r[1] for r in reference], rtol=1e-4)


def test_beam_search_is_exact_when_the_beam_holds_every_prefix():
  """Length 3 over A C G T with 16 beams: every 2-nt prefix survives, so the
  16 beams must be exactly the 16 best of all 64 sequences by the full
  forward (this checks the cache reordering between steps)."""
  model = _model()
  prompt = PROMPTS[0]
  beams = jax.device_get(
    gen.beam_search(model, [prompt], gen.GenerateConfig(max_new_tokens=3, beam_width=16))
  )
  every = np.array(list(itertools.product([tok.A, tok.C, tok.G, tok.T], repeat=3)), np.int32)
  tokens = np.concatenate([np.broadcast_to(prompt, (64, len(prompt))), every], axis=1)
  logp = jax.nn.log_softmax(_full_logits(model, jnp.asarray(tokens)), axis=-1)
  positions = np.arange(len(prompt) - 1, len(prompt) + 2)
  exhaustive = np.asarray(logp)[np.arange(64)[:, None], positions, every].sum(axis=1)
  best = np.argsort(-exhaustive)[:16]
  np.testing.assert_allclose(beams.log_probs[0], exhaustive[best], rtol=1e-5)
  assert {tuple(t) for t in beams.tokens[0]} == {tuple(t) for t in every[best]}


def test_beam_search_with_eos_ranks_by_length_normalised_log_prob():
  model = _model(ending=True)
  settings = gen.GenerateConfig(
    max_new_tokens=NEW, beam_width=4, stop_at_eos=True, length_penalty=1.0
  )
  beams = jax.device_get(gen.beam_search(model, PROMPTS, settings))
  assert beams.ended.any()
  for row in range(3):
    for tokens, length, ended, logp, score in zip(
      beams.tokens[row],
      beams.lengths[row],
      beams.ended[row],
      beams.log_probs[row],
      beams.scores[row],
    ):
      n = length + int(ended)  # tokens scored, <eos> included
      np.testing.assert_allclose(score, logp / n, rtol=1e-5)
      if ended:
        assert tokens[length] == tok.EOS and (tokens[length + 1 :] == tok.PAD).all()
      assert set(np.unique(tokens[:length])) <= {tok.A, tok.C, tok.G, tok.T}
  reference = _full_forward_reference(model, beams.tokens[:, 0], gen.allowed_tokens(allow_eos=True))
  np.testing.assert_allclose(beams.log_probs[:, 0], [r[1] for r in reference], rtol=1e-4)


def test_bad_settings_and_prompts_are_clear_errors():
  with pytest.raises(ValueError, match="top_p must be in"):
    gen.GenerateConfig(top_p=0.0)
  with pytest.raises(ValueError, match="min_new_tokens"):
    gen.GenerateConfig(max_new_tokens=5, min_new_tokens=6)
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    gen.left_pad([[tok.BOS], []])
  tokens, segments = gen.left_pad([[1, 5], [1, 5, 6, 7]])
  np.testing.assert_array_equal(tokens, [[0, 0, 1, 5], [1, 5, 6, 7]])
  np.testing.assert_array_equal(segments, [[0, 0, 1, 1], [1, 1, 1, 1]])
  # Settings of the design workflow: counts must be positive.
  with pytest.raises(ValueError, match="num_samples must be >= 1, got 0"):
    gen.GenerateConfig(num_samples=0)
  with pytest.raises(ValueError, match="batch_size must be >= 1, got -1"):
    gen.GenerateConfig(batch_size=-1)


def test_array_prompts_are_checked_like_list_prompts():
  model = _model()
  settings = gen.GenerateConfig(max_new_tokens=2, temperature=0)
  for bad in (200, -3, tok.VOCAB_SIZE):
    for prompts in ([np.array([tok.BOS, bad])], np.array([[tok.BOS, bad]])):
      with pytest.raises(ValueError, match=rf"prompt 0 has token id {bad} at position 1, outside"):
        gen.sample(model, prompts, settings)
  with pytest.raises(ValueError, match=r"segment_ids has shape \(1, 2\), expected .* \(1, 3\)"):
    gen.sample(model, np.array([[1, 5, 6]]), settings, segment_ids=np.array([[1, 1]]))
  # Right padding (an HF-style attention mask) would decode from the padding.
  right_padded = np.array([[1, 5, 6], [1, 7, 0]]), np.array([[1, 1, 1], [1, 1, 0]])
  with pytest.raises(ValueError, match="prompt row 1 ends in padding.*must be left-padded"):
    gen.sample(model, right_padded[0], settings, segment_ids=right_padded[1])
  with pytest.raises(ValueError, match="prompt row 1 ends in padding"):
    gen.sequence_log_probs(
      model, *right_padded[:1], np.array([[5], [5]]), segment_ids=right_padded[1]
    )
  # A row of padding only would decode from <pad> (review); no token at all
  # failed deep in the model.
  all_padding = np.array([[1, 5, 6], [0, 0, 0]]), np.array([[1, 1, 1], [0, 0, 0]])
  with pytest.raises(ValueError, match="prompt row 1 is all padding"):
    gen.sample(model, all_padding[0], settings, segment_ids=all_padding[1])
  with pytest.raises(ValueError, match="prompt row 1 is all padding"):
    gen.sequence_log_probs(model, all_padding[0], np.array([[5], [5]]), segment_ids=all_padding[1])
  for empty in (np.zeros((1, 0), np.int32), np.zeros((0, 3), np.int32)):
    with pytest.raises(ValueError, match=r"prompts of shape \(\d, \d\) hold no token"):
      gen.sample(model, empty, settings)
  # A short prompt's position is its own, not the padded one; an id past
  # int32 is refused, not wrapped (2**32 + 5 would become 5).
  for bad in (300, 2**32 + 5):
    with pytest.raises(ValueError, match=rf"prompt 1 has token id {bad} at position 1, outside"):
      gen.left_pad([[1, 5, 6, 7], [1, bad]])


def test_lengths_and_shapes_the_model_cannot_take_are_named():
  """Review: generation ran past model.max_seq_len without a word, and side
  inputs of the wrong shape failed deep in the convolution."""
  model = create_model(dataclasses.replace(TWO_LAYERS, max_seq_len=8), seed=0)
  settings = gen.GenerateConfig(max_new_tokens=20, temperature=0)
  with pytest.raises(ValueError, match=r"= 23 exceed config.model.max_seq_len 8, the longest"):
    gen.sample(model, [np.array([1, 5, 6])], settings)
  tokens = jnp.ones((2, 5), jnp.int32)
  with pytest.raises(ValueError, match=r"segment_ids has shape \(2, 4\), tokens \(2, 5\)"):
    model(tokens, segment_ids=jnp.ones((2, 4), jnp.int32))
  with pytest.raises(ValueError, match=r"segment_ids has shape \(1, 5\), tokens \(2, 5\)"):
    model.prefill(tokens, 8, segment_ids=jnp.ones((1, 5), jnp.int32))
  _, cache = model.prefill(tokens, 8)
  with pytest.raises(ValueError, match=r"one token per row, tokens of shape \(2,\); got \(2, 1\)"):
    model.decode_step(tokens[:, :1], cache)


def test_scored_continuations_are_checked_and_follow_the_prompts_segment():
  model = _model()
  prompts = [np.array([tok.BOS, tok.A])]
  for bad in (-1, 200, tok.VOCAB_SIZE):  # -1 would wrap to 127, 200 embed as NaN
    with pytest.raises(ValueError, match=rf"continuation 0 has token id {bad} at position 1,"):
      gen.sequence_log_probs(model, prompts, np.array([[tok.C, bad]]))
  with pytest.raises(ValueError, match=r"one row per prompt \(1\), got shape \(2, 2\)"):
    gen.sequence_log_probs(model, prompts, np.array([[tok.C, tok.G]] * 2))
  # A padded prompt array whose last document has segment id 3: decoding
  # continues that document, and so does the reference scorer.
  tokens = np.array([[tok.PAD, tok.BOS, tok.G, tok.BOS, tok.A, tok.C]])
  segments = np.array([[0, 2, 2, 3, 3, 3]])
  settings = gen.GenerateConfig(max_new_tokens=4, temperature=0)
  out = jax.device_get(gen.sample(model, tokens, settings, segment_ids=segments))
  np.testing.assert_allclose(
    gen.sequence_log_probs(model, tokens, out.tokens, segment_ids=segments),
    out.log_probs,
    rtol=1e-4,
  )


def test_a_model_with_ten_token_ids_generates():
  """A checkpoint converted from Hugging Face keeps only the specials and
  ACGTN (vocab_size=10): the token masks and prompt checks follow the
  model's vocabulary, not the tokenizer's 128 ids."""
  model = create_model(dataclasses.replace(TWO_LAYERS, vocab_size=10), seed=0)
  prompts = [np.array([tok.BOS, tok.A, tok.C]), np.array([tok.G])]
  settings = gen.GenerateConfig(max_new_tokens=4, stop_at_eos=True)
  for out in (
    gen.sample(model, prompts, settings),
    gen.beam_search(model, prompts, dataclasses.replace(settings, beam_width=2)).best(),
  ):
    out = jax.device_get(out)
    assert out.tokens.shape == (2, 4) and np.isfinite(out.log_probs).all()
    assert set(np.unique(out.tokens)) <= {tok.A, tok.C, tok.G, tok.T, tok.EOS, tok.PAD}
  with pytest.raises(ValueError, match=r"token id 10 at position 0, outside .* \[0, 10\)"):
    gen.sample(model, [np.array([tok.task_token(0), tok.A])], settings)
