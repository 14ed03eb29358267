"""Model core: layer pattern and sizes, Mamba2 initialisation, packing,
remat, sharding metadata, and decoding against the full forward."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybridna_jax import tokenizer as tok
from hybridna_jax.config import ModelConfig, load_config
from hybridna_jax.layers.mamba2 import _last_steps, causal_conv
from hybridna_jax.model import HybriDNA, abstract_model, create_model, positions_from_segments

TINY = ModelConfig.from_config(load_config("configs/tiny.py").model)


@functools.cache
def _tiny_params(seed):
  return nnx.state(create_model(TINY, seed))


def make_model(seed=0, **overrides):
  """The tiny model with `overrides`; variants that keep the parameter
  structure share one initialisation (compiling init costs seconds)."""
  cfg = dataclasses.replace(TINY, **overrides)
  graphdef, abstract = nnx.split(abstract_model(cfg))
  params = _tiny_params(seed)
  if jax.tree.structure(abstract) != jax.tree.structure(params):
    return create_model(cfg, seed)
  return nnx.merge(graphdef, params)


@nnx.jit(static_argnames=("segment_ids_given", "return_hidden_states", "return_logits"))
def _forward(model, tokens, segment_ids=None, segment_ids_given=False, **kw):
  del segment_ids_given
  return model(tokens, segment_ids=segment_ids, **kw)


def forward(model, tokens, segment_ids=None, **kw):
  """Jitted full forward (eager op-by-op dispatch is slow on CPU)."""
  return _forward(model, tokens, segment_ids, segment_ids is not None, **kw)


def random_tokens(b, l, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(tok.A, tok.N + 1, (b, l)), jnp.int32)


@pytest.mark.parametrize(
  "name,attn_layers,params_b",
  [
    ("hybridna_300m", [4, 12, 20], (0.28, 0.32)),
    ("hybridna_3b", [4, 12], (2.9, 3.3)),
    ("hybridna_7b", [4, 12, 20, 28], (6.0, 7.0)),
  ],
)
def test_published_sizes(name, attn_layers, params_b):
  cfg = ModelConfig.from_config(load_config(f"configs/{name}.py").model)
  assert [i for i, t in enumerate(cfg.layer_types) if t == "attention"] == attn_layers
  assert (cfg.d_state, cfg.d_conv, cfg.expand, cfg.ssm_head_dim, cfg.ngroups, cfg.chunk_size) == (
    128,
    4,
    2,
    64,
    1,
    256,
  )
  model = nnx.eval_shape(lambda: HybriDNA(cfg, rngs=nnx.Rngs(0)))
  n = sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert params_b[0] * 1e9 < n < params_b[1] * 1e9


def test_unknown_config_field_is_named():
  with pytest.raises(ValueError, match="unknown fields.*d_modle"):
    ModelConfig.from_config({"d_modle": 3})


@pytest.mark.parametrize("field", ["ssd_impl", "attention_impl"])
def test_unknown_kernel_name_is_named_at_build(field):
  cfg = dataclasses.replace(TINY, **{field: "bogus"})
  with pytest.raises(ValueError, match=rf"model.{field}='bogus' is not an implementation"):
    nnx.eval_shape(lambda: HybriDNA(cfg, rngs=nnx.Rngs(0)))


def test_mamba2_initialisation():
  cfg = dataclasses.replace(TINY, d_model=256, ssm_head_dim=8)  # 64 heads
  mixer = create_model(cfg).layers[0].mixer
  a = np.exp(np.asarray(mixer.A_log[...]))
  assert a.min() >= 1.0 and a.max() <= 16.0 and a.std() > 1.0
  dt = np.asarray(jax.nn.softplus(mixer.dt_bias[...]))
  assert dt.min() >= 1e-4 * 0.999 and dt.max() <= 0.1 * 1.001
  assert np.log(dt).std() > 0.5  # log-uniform, not constant
  np.testing.assert_array_equal(mixer.D[...], 1.0)


def test_every_param_has_logical_axes():
  state = nnx.state(make_model(), nnx.Param)
  for path, var in jax.tree.leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    axes = var.get_metadata().get("logical_axes")
    assert axes is not None and len(axes) == var[...].ndim, path


def test_forward_shapes_and_hidden_states():
  model = make_model()
  out = forward(model, random_tokens(2, 19), return_hidden_states=True)
  assert out.logits.shape == (2, 19, tok.VOCAB_SIZE) and out.logits.dtype == jnp.float32
  assert out.hidden.shape == (2, 19, TINY.d_model)
  assert len(out.hidden_states) == TINY.n_layers + 1
  assert forward(model, random_tokens(2, 19), return_logits=False).logits is None


def test_model_is_causal():
  model = make_model()
  tokens = random_tokens(1, 40)
  changed = tokens.at[0, 25].set(tok.N if tokens[0, 25] != tok.N else tok.A)
  a, b = forward(model, tokens).logits, forward(model, changed).logits
  np.testing.assert_allclose(a[:, :25], b[:, :25], atol=1e-6)
  assert np.abs(a[:, 25:] - b[:, 25:]).max() > 1e-4


@pytest.mark.parametrize("rope", [False, True])
def test_packed_documents_do_not_see_each_other(rope):
  model = make_model(rope=rope)
  first, second = random_tokens(1, 23, seed=1), random_tokens(1, 18, seed=2)
  packed = jnp.concatenate([first, second], 1)
  segments = jnp.array([[1] * 23 + [2] * 18])
  out = forward(model, packed, segments).logits
  np.testing.assert_allclose(out[:, :23], forward(model, first).logits, atol=1e-5)
  np.testing.assert_allclose(out[:, 23:], forward(model, second).logits, atol=1e-5)


def test_a_segment_id_that_comes_back_is_another_document():
  """Ids 1, 2, 1: the third run sees neither earlier one, in attention and
  the convolution as in the Mamba2 state; prefill and decoding agree."""
  model = make_model()
  docs = [random_tokens(1, n, seed=s) for n, s in ((11, 1), (7, 2), (9, 3))]
  packed = jnp.concatenate(docs, 1)
  segments = jnp.array([[1] * 11 + [2] * 7 + [1] * 9])
  out = forward(model, packed, segments).logits
  np.testing.assert_allclose(out[:, 18:], forward(model, docs[2]).logits, atol=1e-5)
  logits, _ = model.prefill(packed, 30, segment_ids=segments)
  np.testing.assert_allclose(logits, out[:, -1], atol=1e-5)


def test_positions_restart_per_segment():
  seg = jnp.array([[0, 0, 1, 1, 1, 2, 2]])
  assert positions_from_segments(seg).tolist() == [[0, 1, 0, 1, 2, 0, 1]]


def test_causal_conv_history_and_segments():
  rng = np.random.default_rng(0)
  u = jnp.asarray(rng.standard_normal((1, 9, 3), np.float32))
  w = jnp.asarray(rng.standard_normal((4, 3), np.float32))
  bias = jnp.asarray(rng.standard_normal(3, np.float32))
  full = causal_conv(u, w, bias)
  tail = causal_conv(u[:, 5:], w, bias, history=u[:, 2:5])
  np.testing.assert_allclose(full[:, 5:], tail, rtol=1e-6)
  seg = jnp.array([[1] * 5 + [2] * 4])
  packed = causal_conv(u, w, bias, segment_ids=seg)
  np.testing.assert_allclose(packed[:, 5:], causal_conv(u[:, 5:], w, bias), rtol=1e-6)


def _conv_by_autodiff(u, weight, bias, seg, history, history_seg):
  """The conv written plainly (fp32 shifted inputs, masked), for autodiff."""
  width, l = weight.shape[0], u.shape[1]
  padded = jnp.concatenate([history, u], 1).astype(jnp.float32)
  seg_padded = jnp.concatenate([history_seg, seg], 1)
  out = bias.astype(jnp.float32)
  for k in range(width):
    same = (seg_padded[:, k : k + l] == seg)[..., None, None]
    out = out + jnp.where(same, padded[:, k : k + l], 0.0) * weight[k].astype(jnp.float32)
  return out.astype(u.dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_causal_conv_backward_matches_autodiff(dtype):
  """causal_conv's own backward (it keeps only its input) against autodiff
  of the plain formula: packed documents, a history, (b, l, 2, c) channels."""
  rng = np.random.default_rng(1)
  b, l, width = 2, 11, 4
  u, history = (jnp.asarray(rng.standard_normal((b, n, 2, 3)), dtype) for n in (l, width - 1))
  weight = jnp.asarray(rng.standard_normal((width, 2, 3)), jnp.float32)
  bias = jnp.asarray(rng.standard_normal((2, 3)), jnp.float32)
  seg = jnp.array([[1] * 4 + [2] * 7, [0] * 2 + [3] * 9], jnp.int32)
  history_seg = jnp.array([[1, 1, 1], [5, 0, 0]], jnp.int32)
  project = jnp.asarray(rng.standard_normal((b, l, 2, 3)), jnp.float32)

  def loss(conv):
    def f(u, weight, bias, history):
      return jnp.sum(conv(u, weight, bias, seg, history, history_seg).astype(jnp.float32) * project)

    return jax.value_and_grad(f, argnums=(0, 1, 2, 3))(u, weight, bias, history)

  value, grads = loss(causal_conv)
  ref_value, ref_grads = loss(_conv_by_autodiff)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(value, ref_value, rtol=tol)
  for got, want in zip(grads, ref_grads):
    assert got.dtype == want.dtype
    np.testing.assert_allclose(
      np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol
    )


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_matches(remat):
  tokens = random_tokens(2, 20)

  def loss(model):
    return model(tokens).logits.std()

  plain, checkpointed = make_model(), make_model(remat=remat)
  value_and_grad = nnx.jit(nnx.value_and_grad(loss))
  (l1, g1), (l2, g2) = value_and_grad(plain), value_and_grad(checkpointed)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  g1, g2 = nnx.state(g1), nnx.state(g2)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_tied_embeddings_have_no_head():
  model = make_model(tie_embeddings=True)
  assert not hasattr(model, "lm_head")
  assert forward(model, random_tokens(1, 8)).logits.shape == (1, 8, tok.VOCAB_SIZE)


def _decode_all(model, tokens, prompt_len, segment_ids=None):
  """Logits for positions prompt_len-1 .. l-1 by prefill + decode steps."""
  l = tokens.shape[1]
  if segment_ids is not None:
    segment_ids = segment_ids[:, :prompt_len]
  prefill = nnx.jit(lambda m, t, s: m.prefill(t, l, segment_ids=s))
  logits, cache = prefill(model, tokens[:, :prompt_len], segment_ids)
  out = [logits]
  step = nnx.jit(lambda m, t, c: m.decode_step(t, c))
  for t in range(prompt_len, l):
    logits, cache = step(model, tokens[:, t], cache)
    out.append(logits)
  return jnp.stack(out, 1)


def sharp_attention(model, scale=10.0):
  """`model` with its attention q and k kernels scaled up. A freshly
  initialised model attends nearly uniformly, so a RoPE position off by one
  in decoding moves its logits by < 1e-4; scaled x10, by > 1e-3."""
  graphdef, state = nnx.split(model)
  scaled = []

  def f(path, x):
    name = jax.tree_util.keystr(path)
    if "['mixer']['q']" in name or "['mixer']['k']" in name:
      scaled.append(name)
      return x * scale
    return x

  state = jax.tree_util.tree_map_with_path(f, state)
  assert scaled, "no attention q/k kernels found"
  return nnx.merge(graphdef, state)


@pytest.mark.parametrize("prompt_len", [5, 16, 27])  # <, =, > one chunk (16)
@pytest.mark.parametrize("rope", [False, True])
def test_decode_matches_full_forward(prompt_len, rope):
  model = sharp_attention(make_model(rope=rope))
  tokens = random_tokens(2, 36)
  full = forward(model, tokens).logits
  decoded = _decode_all(model, tokens, prompt_len)
  # float32 on CPU agrees to ~2e-7; a RoPE position off by one is ~5e-3 off.
  np.testing.assert_allclose(decoded, full[:, prompt_len - 1 :], rtol=2e-5, atol=2e-5)


def test_left_padded_prompts_decode_like_unpadded():
  model = sharp_attention(make_model(rope=True))
  tokens = random_tokens(1, 20, seed=3)
  pad = 6
  padded = jnp.concatenate([jnp.full((1, pad), tok.PAD, jnp.int32), tokens], 1)
  segments = jnp.array([[0] * pad + [1] * 20])
  reference = _decode_all(model, tokens, 9)
  padded_run = _decode_all(model, padded, 9 + pad, segment_ids=segments)
  np.testing.assert_allclose(padded_run, reference, rtol=1e-4, atol=1e-4)


def test_bf16_compute_close_to_fp32():
  tokens = random_tokens(2, 24)
  f32 = forward(make_model(), tokens).logits
  bf16 = forward(make_model(dtype="bfloat16"), tokens).logits
  assert bf16.dtype == jnp.float32
  np.testing.assert_allclose(bf16, f32, atol=0.1)
  assert np.abs(bf16 - f32).mean() < 0.02


def test_decoding_past_the_cache_gives_nan_logits():
  """decode_step past prefill's max_length would overwrite the last cache
  slot (the write clamps); the logits say so with NaN instead."""
  model = make_model(rope=True)
  tokens = random_tokens(1, 12)
  full = forward(model, tokens).logits[0]
  logits, cache = nnx.jit(lambda m, t: m.prefill(t, 9))(model, tokens[:, :8])
  step = nnx.jit(lambda m, t, c: m.decode_step(t, c))
  out = []
  for t in range(8, 12):
    logits, cache = step(model, tokens[:, t], cache)
    out.append(logits[0])
  np.testing.assert_allclose(out[0], full[8], rtol=1e-4, atol=1e-4)  # the last slot
  assert np.isnan(np.stack(out[1:])).all()


def test_decode_with_d_conv_1_matches_full_forward():
  assert _last_steps(jnp.zeros((1, 5, 2)), 0).shape == (1, 0, 2)
  # Not make_model: its shared parameters would keep the width-4 conv kernels.
  model = create_model(dataclasses.replace(TINY, d_conv=1))
  tokens = random_tokens(2, 12)
  decoded = _decode_all(model, tokens, 5)
  full = forward(model, tokens).logits
  np.testing.assert_allclose(decoded, full[:, 4:], rtol=1e-4, atol=1e-4)
