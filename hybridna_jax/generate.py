"""Sequence generation: cached sampling and beam search, jitted end to end.

    from hybridna_jax import generate
    prompts = [vocab.prompt({"label": "HepG2"})] * 8     # design.PromptVocab
    settings = generate.GenerateConfig(max_new_tokens=200, temperature=0.8)
    out = generate.generate(model, prompts, settings)
    out.tokens    # (8, 200) int32; tokenizer.decode(out.tokens[i]) is the DNA

How it runs: prompts of different lengths are left-padded (segment id 0 on
pads, which then have no effect), the batch of prompts is prefilled in one
pass (`HybriDNA.prefill`, one jitted program), and every new token costs one
cached step (`HybriDNA.decode_step`): Mamba2 layers carry a fixed-size conv
+ SSM state, attention layers a KV cache with a slot per token. The whole
token loop -- token choice, cache update, stopping -- is a second XLA
program (a `lax.while_loop` over the cache), so no Python runs per token.
Keeping prefill apart lets every decoding mode share its compiled program.
Shapes (batch, prompt length, new
tokens, beam width) and the on/off switches are static; temperature, top-k
and top-p are traced, so changing them does not recompile.

Token choice:
  * Only `allowed_tokens` may be generated: A C G T by default (optionally
    N), plus <eos> when stopping at eos. A designed sequence never contains
    task tokens or other specials, whatever the model's logits say.
  * Sampling: logits / temperature over the allowed tokens, then top-k,
    then top-p (nucleus) on what is left; temperature 0 is greedy (argmax).
    Each row draws from its own key, fold_in(seed key, sample id), so a
    sample does not depend on the batch it was generated in.
  * Beam search (`beam_width` > 1, or `beam_search`): the `beam_width` best
    continuations by model log-probability; finished hypotheses (ended by
    <eos>) are ranked by log-prob / length ** length_penalty (length counts
    the <eos>); length_penalty 1 is the per-token average, 0 the plain sum.
    With a fixed length every hypothesis has the same length, so the ranking
    is by log-probability. Beam width 1 is greedy decoding.
  * Fixed length (`stop_at_eos=False`): exactly `max_new_tokens` tokens, no
    <eos>. With `stop_at_eos`, a row ends at its <eos> (after at least
    `min_new_tokens` tokens) and emits <pad> afterwards; the loop ends when
    every row has.

`log_probs` are always the model's own log-probabilities (softmax over the
whole vocabulary at temperature 1) of the generated tokens, <eos> included,
so they compare across settings and with `HybriDNA.__call__` scores.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from hybridna_jax import sharding
from hybridna_jax import tokenizer as tok
from hybridna_jax.config import GenerateConfig

_NEG_INF = -jnp.inf


class Generation(NamedTuple):
  """Sampled (or greedy) continuations.

  tokens: (b, max_new_tokens) int32 generated tokens; <eos> then <pad>
    after a row ends.
  lengths: (b,) int32 nucleotides generated (the <eos> not counted).
  ended: (b,) bool, the row ended with <eos>.
  log_probs: (b,) float32 model log-probability of the generated tokens
    (<eos> included).
  """

  tokens: jax.Array
  lengths: jax.Array
  ended: jax.Array
  log_probs: jax.Array


class Beams(NamedTuple):
  """Beam search results, best first.

  tokens: (b, beam_width, max_new_tokens) int32, <pad> after an <eos>.
  lengths: (b, beam_width) int32 nucleotides (the <eos> not counted).
  ended: (b, beam_width) bool, the hypothesis ended with <eos>.
  log_probs: (b, beam_width) float32 model log-probability (<eos> included).
  scores: (b, beam_width) float32 the ranking score (length-normalised
    log-probability of ended hypotheses; -inf for empty slots).
  """

  tokens: jax.Array
  lengths: jax.Array
  ended: jax.Array
  log_probs: jax.Array
  scores: jax.Array

  def best(self) -> Generation:
    """The top hypothesis of each row as a `Generation`."""
    return Generation(self.tokens[:, 0], self.lengths[:, 0], self.ended[:, 0], self.log_probs[:, 0])


# -- prompts and token filtering ---------------------------------------------


def allowed_tokens(
  *, allow_n: bool = False, allow_eos: bool = False, vocab_size: int = tok.VOCAB_SIZE
) -> np.ndarray:
  """(vocab_size,) bool: the tokens a designed sequence may contain. Give the
  model's vocab_size (a converted checkpoint may have only the 10 ids of the
  specials and ACGTN)."""
  allowed = np.zeros(vocab_size, bool)
  allowed[[tok.A, tok.C, tok.G, tok.T]] = True
  allowed[tok.N] = allow_n
  allowed[tok.EOS] = allow_eos
  return allowed


def _check_token_ids(rows, vocab_size: int, what: str = "prompt") -> None:
  """Raises a one-line ValueError unless every id of `rows` (a (b, l) array
  or a list of 1-d arrays of `what`: prompts, continuations) is in
  [0, vocab_size): the embedding lookup does not reject the others
  (negative ids wrap around, too large ones embed as NaN)."""
  for i, row in enumerate(rows):
    bad = np.flatnonzero((row < 0) | (row >= vocab_size))
    if bad.size:
      raise ValueError(
        f"{what} {i} has token id {row[bad[0]]} at position {bad[0]}, outside the "
        f"model's vocabulary [0, {vocab_size})."
      )


def left_pad(
  prompts: Sequence[Sequence[int] | np.ndarray],
  *,
  multiple: int = 1,
  vocab_size: int = tok.VOCAB_SIZE,
) -> tuple[np.ndarray, np.ndarray]:
  """Prompts of token ids -> left-padded (tokens, segment_ids), (b, l) int32.

  Segment ids are 0 on the padding and 1 on the prompt. `multiple` rounds
  the width up (fewer compiled shapes when prompt lengths vary). Token ids
  must be in [0, vocab_size) (give the model's).
  """
  arrays = [np.asarray(p).reshape(-1) for p in prompts]  # checked before the int32 cast
  if not arrays:
    raise ValueError("no prompts given.")
  empty = [i for i, a in enumerate(arrays) if a.size == 0]
  if empty:
    raise ValueError(
      f"prompt {empty[0]} is empty; give at least one token (a task token, <bos>, or a DNA prefix)."
    )
  width = max(a.size for a in arrays)
  width = -(-width // multiple) * multiple
  tokens = np.full((len(arrays), width), tok.PAD, np.int32)
  segment_ids = np.zeros((len(arrays), width), np.int32)
  _check_token_ids(arrays, vocab_size)
  for row, a in enumerate(arrays):
    tokens[row, width - a.size :] = a
    segment_ids[row, width - a.size :] = 1
  return tokens, segment_ids


def filter_logits(
  logits: jax.Array, allowed: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array
) -> jax.Array:
  """The sampling distribution, as log-probabilities with -inf outside it.

  Args:
    logits: (b, vocab) fp32. allowed: (vocab,) or (b, vocab) bool.
    temperature: () > 0; top_k: () int32, 0 keeps every token (every token
      tied with the k-th logit is kept, as in transformers: with an exact
      tie at the top, top_k=1 samples among the tied ones); top_p: ()
      in (0, 1]: the smallest set of most likely tokens whose probability
      reaches top_p (always at least the most likely one).

  Returns:
    (b, vocab) fp32 normalised log-probabilities.
  """
  logits = jnp.where(allowed, logits.astype(jnp.float32) / temperature, _NEG_INF)
  vocab = logits.shape[-1]
  sorted_logits = -jnp.sort(-logits, axis=-1)  # descending
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  kth = jnp.take_along_axis(
    sorted_logits, jnp.broadcast_to(k - 1, logits.shape[:-1])[..., None], axis=-1
  )
  logits = jnp.where(logits >= kth, logits, _NEG_INF)
  # Nucleus: keep a token when the mass of the tokens ranked above it is
  # below top_p (ties at the threshold logit are all kept).
  sorted_logits = jnp.where(sorted_logits >= kth, sorted_logits, _NEG_INF)
  sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
  kept = (mass_before < top_p) | (top_p >= 1.0)  # rounding must not drop a tail at 1.0
  threshold = jnp.min(jnp.where(kept, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  logits = jnp.where(logits >= threshold, logits, _NEG_INF)
  return jax.nn.log_softmax(logits, axis=-1)


def _row_keys(key: jax.Array, sample_ids: jax.Array) -> jax.Array:
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(sample_ids)


def _batch_map(fn, tree):
  """Applies `fn` to every per-row array of a DecodeCache (not `length`)."""
  return jax.tree.map(lambda x: x if x.ndim == 0 else fn(x), tree)


# -- the jitted loops ------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("graphdef", "max_length", "mesh"))
def _prefill(graphdef, state, tokens, segment_ids, *, max_length, mesh=None):
  """The prompt in one pass: last logits (b, V) and the DecodeCache. Its own
  program, shared by every decoding mode with the same prompt shape."""
  with sharding.maybe_activate(mesh):
    return nnx.merge(graphdef, state).prefill(tokens, max_length, segment_ids=segment_ids)


@functools.partial(
  jax.jit,
  static_argnames=(
    "graphdef",
    "max_new_tokens",
    "stop_at_eos",
    "min_new_tokens",
    "allow_n",
    "greedy",
    "mesh",
  ),
)
def _sample_loop(
  graphdef,
  state,
  logits,
  cache,
  row_keys,
  temperature,
  top_k,
  top_p,
  *,
  max_new_tokens,
  stop_at_eos,
  min_new_tokens,
  allow_n,
  greedy,
  mesh=None,
):
  """while_loop of one cached decode step per token; returns a Generation."""
  with sharding.maybe_activate(mesh):
    model = nnx.merge(graphdef, state)
    b, vocab = logits.shape
    dna = jnp.asarray(allowed_tokens(allow_n=allow_n, vocab_size=vocab))
    with_eos = jnp.asarray(allowed_tokens(allow_n=allow_n, allow_eos=stop_at_eos, vocab_size=vocab))

    def choose(logits, step):
      allowed = jnp.where(step >= min_new_tokens, with_eos, dna)
      if greedy:
        return jnp.argmax(jnp.where(allowed, logits, _NEG_INF), axis=-1).astype(jnp.int32)
      logp = filter_logits(logits, allowed, temperature, top_k, top_p)
      step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(row_keys)
      return jax.vmap(jax.random.categorical)(step_keys, logp).astype(jnp.int32)

    def cond(carry):
      step, *_, done, _ = carry
      return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
      step, logits, cache, out, lengths, done, log_probs = carry
      token = jnp.where(done, tok.PAD, choose(logits, step))
      model_logp = jnp.take_along_axis(
        jax.nn.log_softmax(logits, axis=-1), token[:, None], axis=-1
      )[:, 0]
      log_probs = log_probs + jnp.where(done, 0.0, model_logp)
      ends = token == tok.EOS
      lengths = lengths + (~done & ~ends).astype(jnp.int32)
      done = done | ends
      out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], step, axis=1)
      logits, cache = model.decode_step(token, cache)
      return step + 1, logits, cache, out, lengths, done, log_probs

    carry = (
      jnp.zeros((), jnp.int32),
      logits,
      cache,
      jnp.full((b, max_new_tokens), tok.PAD, jnp.int32),
      jnp.zeros((b,), jnp.int32),
      jnp.zeros((b,), bool),
      jnp.zeros((b,), jnp.float32),
    )
    _, _, _, out, lengths, done, log_probs = jax.lax.while_loop(cond, body, carry)
    return Generation(out, lengths, done, log_probs)


@functools.partial(
  jax.jit,
  static_argnames=(
    "graphdef",
    "beam_width",
    "max_new_tokens",
    "stop_at_eos",
    "min_new_tokens",
    "allow_n",
    "mesh",
  ),
)
def _beam_loop(
  graphdef,
  state,
  logits,
  cache,
  length_penalty,
  *,
  beam_width,
  max_new_tokens,
  stop_at_eos,
  min_new_tokens,
  allow_n,
  mesh=None,
):
  """Copies the prefilled cache per beam, then a while_loop of steps.

  Alive hypotheses (no <eos> yet) and finished ones are kept apart, W each:
  every step takes the 2W best extensions of the alive beams (at most W of
  them end with <eos>, so at least W stay alive), moves the <eos> ones into
  the finished set (scored by length-normalised log-prob) and reorders the
  cache rows to follow the surviving alive beams.
  """
  with sharding.maybe_activate(mesh):
    model = nnx.merge(graphdef, state)
    b, vocab = logits.shape
    w, t_max = beam_width, max_new_tokens
    cache = _batch_map(lambda x: jnp.repeat(x, w, axis=0), cache)
    logits = jnp.repeat(logits, w, axis=0)  # (b*w, V)
    dna = jnp.asarray(allowed_tokens(allow_n=allow_n, vocab_size=vocab))
    with_eos = jnp.asarray(allowed_tokens(allow_n=allow_n, allow_eos=stop_at_eos, vocab_size=vocab))
    penalty = lambda n: jnp.power(n.astype(jnp.float32), length_penalty)
    batch_offsets = (jnp.arange(b) * w)[:, None]

    def cond(carry):
      step, _, _, _, alive_logp, _, fin_scores, *_ = carry
      running = step < t_max
      if stop_at_eos:
        # No alive beam can beat the worst kept finished one: future
        # log-probs only fall, and n ** -penalty is largest at n = t_max.
        best_possible = alive_logp[:, 0] / penalty(jnp.array(t_max))
        running &= ~jnp.all(fin_scores[:, -1] >= best_possible)
      return running

    def body(carry):
      (step, logits, cache, alive_seq, alive_logp, fin_seq, fin_scores, fin_logp, fin_len) = carry
      allowed = jnp.where(step >= min_new_tokens, with_eos, dna)
      logp = jnp.where(allowed, jax.nn.log_softmax(logits, axis=-1), _NEG_INF)
      candidates = (alive_logp[:, :, None] + logp.reshape(b, w, vocab)).reshape(b, w * vocab)
      top_logp, top_index = jax.lax.top_k(candidates, 2 * w)  # (b, 2w)
      parent, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
      ends = token == tok.EOS
      parent_seq = jnp.take_along_axis(alive_seq, parent[:, :, None], axis=1)
      extended = jax.lax.dynamic_update_slice_in_dim(
        parent_seq, token[:, :, None], step, axis=2
      )  # (b, 2w, T)
      # Survivors: the w best extensions that do not end.
      new_alive_logp, pick = jax.lax.top_k(jnp.where(ends, _NEG_INF, top_logp), w)
      alive_seq = jnp.take_along_axis(extended, pick[:, :, None], axis=1)
      alive_token = jnp.take_along_axis(token, pick, axis=1)
      alive_parent = jnp.take_along_axis(parent, pick, axis=1)
      # Finished: keep the w best of the old ones and the new <eos> ones.
      scores = jnp.where(ends, top_logp / penalty(step + 1), _NEG_INF)
      all_scores = jnp.concatenate([fin_scores, scores], axis=1)
      fin_scores, keep = jax.lax.top_k(all_scores, w)
      gather = lambda x: jnp.take_along_axis(
        x, keep.reshape(keep.shape + (1,) * (x.ndim - 2)), axis=1
      )
      fin_seq = gather(jnp.concatenate([fin_seq, extended], axis=1))
      fin_logp = gather(jnp.concatenate([fin_logp, top_logp], axis=1))
      fin_len = gather(jnp.concatenate([fin_len, jnp.broadcast_to(step, top_logp.shape)], 1))
      # Follow the survivors' parents in the cache, then feed their tokens.
      rows = (batch_offsets + alive_parent).reshape(-1)
      cache = _batch_map(lambda x: jnp.take(x, rows, axis=0), cache)
      logits, cache = model.decode_step(alive_token.reshape(-1), cache)
      return (
        step + 1,
        logits,
        cache,
        alive_seq,
        new_alive_logp,
        fin_seq,
        fin_scores,
        fin_logp,
        fin_len,
      )

    alive_logp = jnp.full((b, w), _NEG_INF).at[:, 0].set(0.0)  # one live beam at first
    empty = jnp.full((b, w, t_max), tok.PAD, jnp.int32)
    none = jnp.full((b, w), _NEG_INF)
    carry = (
      jnp.zeros((), jnp.int32),
      logits,
      cache,
      empty,
      alive_logp,
      empty,
      none,
      none,
      jnp.zeros((b, w), jnp.int32),
    )
    (step, _, _, alive_seq, alive_logp, fin_seq, fin_scores, fin_logp, fin_len) = (
      jax.lax.while_loop(cond, body, carry)
    )
    # Alive beams that reached the cap end there, without <eos>.
    alive_scores = jnp.where(step == t_max, alive_logp / penalty(jnp.array(t_max)), _NEG_INF)
    scores = jnp.concatenate([fin_scores, alive_scores], axis=1)
    scores, keep = jax.lax.top_k(scores, w)
    pick = lambda x: jnp.take_along_axis(x, keep.reshape(keep.shape + (1,) * (x.ndim - 2)), 1)
    seqs = pick(jnp.concatenate([fin_seq, alive_seq], axis=1))
    log_probs = pick(jnp.concatenate([fin_logp, alive_logp], axis=1))
    lengths = pick(jnp.concatenate([fin_len, jnp.full((b, w), t_max, jnp.int32)], axis=1))
    ended = pick(jnp.concatenate([jnp.ones((b, w), bool), jnp.zeros((b, w), bool)], axis=1))
    return Beams(seqs, lengths, ended & jnp.isfinite(scores), log_probs, scores)


# -- public entry points -------------------------------------------------------------


def _prepare(model, prompts, segment_ids) -> tuple[np.ndarray, np.ndarray]:
  """Prompts (a list, or a padded (b, l) array) -> checked (tokens, segment_ids)."""
  vocab_size = model.cfg.vocab_size
  if isinstance(prompts, (list, tuple)):
    if segment_ids is not None:
      raise ValueError("segment_ids go with a padded (b, l) prompt array, not a list.")
    return left_pad(prompts, vocab_size=vocab_size)
  # Range-check before the int32 cast, which would wrap large ids.
  tokens = np.asarray(prompts)
  if tokens.ndim != 2:
    raise ValueError(
      f"prompts must be (batch, length) token ids or a list of "
      f"1-d prompts, got shape {tokens.shape}."
    )
  if 0 in tokens.shape:
    raise ValueError(
      f"prompts of shape {tokens.shape} hold no token; give at least one row of at least "
      "one token (a task token, <bos>, or a DNA prefix)."
    )
  _check_token_ids(tokens, vocab_size)
  tokens = tokens.astype(np.int32)
  if segment_ids is None:
    return tokens, np.ones_like(tokens)
  segment_ids = np.asarray(segment_ids, np.int32)
  if segment_ids.shape != tokens.shape:
    raise ValueError(
      f"segment_ids has shape {segment_ids.shape}, expected the prompts' {tokens.shape}."
    )
  # Decoding continues the last column's segment: right padding (0 after
  # the prompt) would continue the padding, which sees none of the prompt.
  right_padded = np.flatnonzero((segment_ids[:, -1] == 0) & (segment_ids != 0).any(axis=1))
  if right_padded.size:
    raise ValueError(
      f"prompt row {int(right_padded[0])} ends in padding (segment id 0 after its tokens); "
      "prompts must be left-padded (pass a list of prompts to have them padded)."
    )
  empty = np.flatnonzero(~(segment_ids != 0).any(axis=1))
  if empty.size:
    raise ValueError(
      f"prompt row {int(empty[0])} is all padding (segment id 0 everywhere); give it at "
      "least one token (a task token, <bos>, or a DNA prefix)."
    )
  return tokens, segment_ids


def row_keys(seed: int | jax.Array, sample_ids: Sequence[int] | np.ndarray) -> jax.Array:
  """(b,) PRNG keys fold_in(key(seed), id): one random stream per sample id
  (ids in [0, 2**32)). An int seed must fit 32 bits: jax.random.key keeps
  only those (seeds 0 and 2**32 would give the same samples)."""
  if isinstance(seed, (int, np.integer)):
    if not 0 <= seed < 2**32:
      raise ValueError(f"seed must be in [0, 2**32) (a 32-bit PRNG seed), got {seed}.")
    key = jax.random.key(seed)
  else:
    key = seed
  ids = np.asarray(sample_ids)
  if ids.size and not (ids.min() >= 0 and ids.max() < 2**32):
    # Cast to uint32, ids 0 and 2**32 (or -1 and 2**32 - 1) would share a stream.
    raise ValueError(
      f"sample ids must be in [0, 2**32), got {ids.min()}..{ids.max()}: "
      "ids outside would repeat another id's samples."
    )
  return _row_keys(key, jnp.asarray(ids, jnp.uint32))


def sample(
  model,
  prompts,
  settings: GenerateConfig,
  *,
  seed: int | jax.Array = 0,
  sample_ids: Sequence[int] | np.ndarray | None = None,
  keys: jax.Array | None = None,
  segment_ids: np.ndarray | None = None,
  mesh=None,
) -> Generation:
  """Samples (or greedily decodes) one continuation per prompt.

  Args:
    model: a HybriDNA nnx module.
    prompts: a list of 1-d token-id prompts (left-padded here), or a
      (b, l) array already left-padded, with `segment_ids` (0 on pads).
    settings: see `GenerateConfig` (beam_width is ignored; see `beam_search`).
    seed: an int or a jax PRNG key.
    sample_ids: (b,) ids that, with the seed, pick each row's random
      stream (default 0..b-1); give global ids when generating a large set
      in batches so results do not depend on the batching.
    keys: (b,) PRNG keys, one per row, instead of seed and sample_ids.
    mesh: optional mesh whose logical-axis rules the model's sharding
      constraints follow (parameters already placed on it).
  """
  tokens, segment_ids = _prepare(model, prompts, segment_ids)
  b = tokens.shape[0]
  if keys is None:
    sample_ids = np.arange(b) if sample_ids is None else np.asarray(sample_ids)
    if sample_ids.shape != (b,):
      raise ValueError(f"sample_ids has shape {sample_ids.shape}, expected ({b},).")
    keys = row_keys(seed, sample_ids)
  elif keys.shape != (b,):
    raise ValueError(f"keys has shape {keys.shape}, expected ({b},).")
  graphdef, state, logits, cache = _prefill_model(model, tokens, segment_ids, settings, mesh)
  return _sample_loop(
    graphdef,
    state,
    logits,
    cache,
    keys,
    jnp.float32(max(settings.temperature, 1e-6)),
    jnp.int32(settings.top_k),
    jnp.float32(settings.top_p),
    max_new_tokens=settings.max_new_tokens,
    stop_at_eos=settings.stop_at_eos,
    min_new_tokens=settings.min_new_tokens,
    allow_n=settings.allow_n,
    greedy=settings.greedy,
    mesh=mesh,
  )


def _prefill_model(
  model, tokens: np.ndarray, segment_ids: np.ndarray, settings: GenerateConfig, mesh
):
  """(graphdef, state, last logits, cache) of the prompts (b, l), with cache
  room for settings.max_new_tokens more."""
  max_length = tokens.shape[1] + settings.max_new_tokens
  if max_length > model.cfg.max_seq_len:
    raise ValueError(
      f"prompts of {tokens.shape[1]} tokens (padded) + max_new_tokens "
      f"{settings.max_new_tokens} = {max_length} exceed config.model.max_seq_len "
      f"{model.cfg.max_seq_len}, the longest context the model reads; generate fewer tokens."
    )
  graphdef, state = nnx.split(model)
  logits, cache = _prefill(
    graphdef,
    state,
    jnp.asarray(tokens),
    jnp.asarray(segment_ids),
    max_length=max_length,
    mesh=mesh,
  )
  return graphdef, state, logits, cache


def beam_search(
  model, prompts, settings: GenerateConfig, *, segment_ids: np.ndarray | None = None, mesh=None
) -> Beams:
  """The `settings.beam_width` best continuations of each prompt (`Beams`);
  prompts and segment_ids as for `sample` (a list of 1-d token-id prompts,
  or a left-padded (b, l) array with its segment ids). The sampling
  settings (temperature, top_k, top_p) do not apply: a warning names those
  set."""
  unused = [
    f"{name}={getattr(settings, name)}"
    for name, off in (("temperature", 1.0), ("top_k", 0), ("top_p", 1.0))
    if getattr(settings, name) != off
  ]
  if unused:
    logging.warning(
      "beam search ranks by log-probability; %s apply to sampling only.", ", ".join(unused)
    )
  tokens, segment_ids = _prepare(model, prompts, segment_ids)
  graphdef, state, logits, cache = _prefill_model(model, tokens, segment_ids, settings, mesh)
  return _beam_loop(
    graphdef,
    state,
    logits,
    cache,
    jnp.float32(settings.length_penalty),
    beam_width=settings.beam_width,
    max_new_tokens=settings.max_new_tokens,
    stop_at_eos=settings.stop_at_eos,
    min_new_tokens=settings.min_new_tokens,
    allow_n=settings.allow_n,
    mesh=mesh,
  )


def generate(
  model,
  prompts,
  settings: GenerateConfig,
  *,
  seed: int | jax.Array = 0,
  sample_ids=None,
  keys=None,
  segment_ids=None,
  mesh=None,
) -> Generation:
  """One continuation per prompt: beam search's best when beam_width > 1,
  otherwise a sample (greedy at temperature 0); arguments as for `sample`."""
  if settings.beam_width > 1:
    return beam_search(model, prompts, settings, segment_ids=segment_ids, mesh=mesh).best()
  return sample(
    model,
    prompts,
    settings,
    seed=seed,
    sample_ids=sample_ids,
    keys=keys,
    segment_ids=segment_ids,
    mesh=mesh,
  )


def sequence_log_probs(
  model, prompts, continuations: np.ndarray, *, segment_ids: np.ndarray | None = None
) -> jax.Array:
  """Model log-probability of given continuations by one full forward.

  Args:
    prompts: as for `sample`; continuations: (b, t) token ids, <pad> after
      an <eos> (pads are not scored).

  Returns:
    (b,) float32 summed log-probabilities (the reference that cached
    generation's `log_probs` must match).
  """
  tokens, segment_ids = _prepare(model, prompts, segment_ids)
  # Range-check before the int32 cast, which would wrap large ids.
  continuations = np.asarray(continuations)
  if continuations.ndim != 2 or continuations.shape[0] != tokens.shape[0]:
    raise ValueError(
      f"continuations must be (batch, length) token ids, one row per prompt "
      f"({tokens.shape[0]}), got shape {continuations.shape}."
    )
  _check_token_ids(continuations, model.cfg.vocab_size, "continuation")
  continuations = continuations.astype(np.int32)
  graphdef, state = nnx.split(model)
  return _score(
    graphdef, state, jnp.asarray(tokens), jnp.asarray(segment_ids), jnp.asarray(continuations)
  )


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _score(graphdef, state, tokens, segment_ids, continuations):
  model = nnx.merge(graphdef, state)
  l = tokens.shape[1]
  scored = continuations != tok.PAD
  full = jnp.concatenate([tokens, continuations], axis=1)
  # A continuation goes on in the prompt's last segment, as decoding does.
  seg = jnp.concatenate(
    [segment_ids, jnp.broadcast_to(segment_ids[:, -1:], continuations.shape)], axis=1
  )
  logits = model(full, segment_ids=seg).logits[:, l - 1 : -1]
  logp = jnp.take_along_axis(
    jax.nn.log_softmax(logits, axis=-1), continuations[..., None], axis=-1
  )[..., 0]
  return jnp.sum(jnp.where(scored, logp, 0.0), axis=-1)
