"""Echo inputs and pooling: the layout of padded batches, pooled features
that do not depend on padding or batch-mates, and RC-echo predicting the
same for a sequence and its reverse complement."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybridna_jax import echo, tokenizer
from hybridna_jax.config import ModelConfig, load_config
from hybridna_jax.finetune.model import HeadConfig, SequenceModel

# The tiny test model cut to two layers, Mamba2 then attention (compiles faster).
TINY = dataclasses.replace(
  ModelConfig.from_config(load_config("configs/tiny.py").model),
  n_layers=2,
  attn_period=2,
  attn_offset=1,
)
SEQS = ["ACGTTGCA", "GATTACAGATTACAGG", "CCN", "TTTTTTTTTTAAAAAACGCG"]


def test_echo_rows_of_a_padded_batch():
  tokens = [tokenizer.encode(s) for s in SEQS]
  width = echo.padded_width(max(len(t) for t in tokens), echo=True, multiple=16)
  assert width == 48  # 2 * 20 + 1 = 41 -> 48
  batch = echo.build_batch(tokens, width, echo=True, reverse_strand=True)
  for row, (seq, t) in enumerate(zip(SEQS, tokens)):
    n = len(t)
    inputs, seg, mask = batch["inputs"][row], batch["segment_ids"][row], batch["pool_mask"][row]
    np.testing.assert_array_equal(inputs[:n], t)
    assert inputs[n] == tokenizer.SEP
    np.testing.assert_array_equal(inputs[n + 1 : 2 * n + 1], t)
    assert np.all(inputs[2 * n + 1 :] == tokenizer.PAD)
    np.testing.assert_array_equal(seg, (np.arange(width) < 2 * n + 1).astype(np.int32))
    # Pooling reads the second copy only: never the first copy, <sep> or pads.
    np.testing.assert_array_equal(np.flatnonzero(mask), np.arange(n + 1, 2 * n + 1))
    rc = tokenizer.encode(tokenizer.reverse_complement(seq))
    np.testing.assert_array_equal(batch["rc_inputs"][row][:n], rc)
    np.testing.assert_array_equal(batch["rc_inputs"][row][n + 1 : 2 * n + 1], rc)
    assert batch["rc_inputs"][row][n] == tokenizer.SEP


def test_plain_rows_and_errors():
  t = tokenizer.encode("ACGTA")
  inputs, seg, mask = echo.build_row(t, 8, echo=False)
  np.testing.assert_array_equal(inputs, [5, 6, 7, 8, 5, 0, 0, 0])
  np.testing.assert_array_equal(mask, [1, 1, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(seg, mask.astype(np.int32))
  with pytest.raises(ValueError, match="needs 11 positions"):
    echo.build_row(t, 10, echo=True)
  np.testing.assert_array_equal(echo.crop_center(np.arange(10), 4), [3, 4, 5, 6])


def test_pool_mean_and_last():
  hidden = np.arange(2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3)
  mask = np.array([[0, 1, 1, 0, 0], [0, 0, 0, 0, 1]], np.float32)
  np.testing.assert_allclose(
    echo.pool(hidden, mask, "mean"), [hidden[0, 1:3].mean(0), hidden[1, 4]]
  )
  np.testing.assert_allclose(echo.pool(hidden, mask, "last"), [hidden[0, 2], hidden[1, 4]])
  with pytest.raises(ValueError, match="finetune.pool"):
    echo.pool(hidden, mask, "max")


def _model(**head):
  """A jitted init; an RBG key compiles ~3x faster than threefry on CPU."""
  cfg = HeadConfig(num_outputs=3, hidden=8, **head)
  init = nnx.jit(lambda key: SequenceModel(TINY, cfg, rngs=nnx.Rngs(params=key)))
  return init(jax.random.key(1, impl="rbg"))


@nnx.jit
def _hidden(model, inputs, segment_ids):
  return model.backbone(inputs, segment_ids=segment_ids, return_logits=False).hidden


def test_pooled_features_ignore_padding_and_read_the_right_positions():
  """The hidden states of each row do not depend on its padding or its
  batch-mates, and both pooling modes read the second copy (echo) or the
  sequence (plain) at the expected positions."""
  model = _model()
  tokens = [tokenizer.encode(s) for s in SEQS]
  width = echo.padded_width(20, echo=True)  # 41: the longest row is unpadded
  batch = echo.build_batch(tokens, width, echo=True)
  hidden = np.asarray(_hidden(model, batch["inputs"], batch["segment_ids"]))
  # The same rows in another order with 23 more pads each.
  order = [2, 0, 3, 1]
  wide = echo.build_batch([tokens[i] for i in order], width + 23, echo=True)
  hidden_wide = np.asarray(_hidden(model, wide["inputs"], wide["segment_ids"]))
  for row, t in enumerate(tokens):
    real = 2 * len(t) + 1
    np.testing.assert_allclose(
      hidden_wide[order.index(row), :real], hidden[row, :real], rtol=2e-5, atol=2e-5
    )
  for echo_on in (True, False):
    rows = echo.build_batch(tokens, width, echo=echo_on)
    states = hidden if echo_on else np.asarray(_hidden(model, rows["inputs"], rows["segment_ids"]))
    mean = np.asarray(echo.pool(states, rows["pool_mask"], "mean"))
    last = np.asarray(echo.pool(states, rows["pool_mask"], "last"))
    for row, t in enumerate(tokens):
      n = len(t)
      positions = np.arange(n + 1, 2 * n + 1) if echo_on else np.arange(n)
      np.testing.assert_allclose(mean[row], states[row, positions].mean(0), rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(last[row], states[row, positions[-1]], rtol=1e-6)


@pytest.mark.parametrize("rc_combine", ["average_logits", "concat_features"])
def test_rc_echo_predicts_the_same_for_both_strands(rc_combine):
  model = _model(rc_combine=rc_combine)
  # Make the head non-trivial (its output layer starts at zero).
  model.head.kernel[...] = jax.random.normal(jax.random.key(2), model.head.kernel.shape)
  forward = [tokenizer.encode(s) for s in SEQS]
  reverse = [tokenizer.encode(tokenizer.reverse_complement(s)) for s in SEQS]
  width = echo.padded_width(20, echo=True, multiple=16)
  run = nnx.jit(lambda m, b: m(b))
  a = np.asarray(run(model, echo.build_batch(forward, width, echo=True, reverse_strand=True)))
  b = np.asarray(run(model, echo.build_batch(reverse, width, echo=True, reverse_strand=True)))
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert np.abs(a).max() > 1e-2 and np.ptp(a[:, 0]) > 1e-3  # not a constant output
  # The head reads what rc_combine says, built from each strand's features.
  batch = echo.build_batch(forward, width, echo=True, reverse_strand=True)
  f, r = (
    model.embed(batch[k], batch["segment_ids"], batch["pool_mask"]) for k in ("inputs", "rc_inputs")
  )
  want = (
    0.5 * (model.head(f) + model.head(r))
    if rc_combine == "average_logits"
    else model.head(jnp.concatenate([jnp.maximum(f, r), jnp.minimum(f, r)], axis=-1))
  )
  np.testing.assert_allclose(a, np.asarray(want), rtol=1e-4, atol=1e-5)
  if rc_combine == "average_logits":
    # The forward strand alone is not strand-symmetric: the check has teeth.
    single = _model(rc_combine="none")
    nnx.update(single, nnx.state(model, nnx.Param))
    fa = np.asarray(run(single, echo.build_batch(forward, width, echo=True)))
    fb = np.asarray(run(single, echo.build_batch(reverse, width, echo=True)))
    assert np.abs(fa - fb).max() > 1e-3
