"""The scanned layer layout (model.scan_layers): which patterns scan, the
stacked parameter layout and its sharding, conversion both ways, and equal
outputs to the loop layout: logits, per-layer hidden states, gradients
(with every remat policy), prefill + decode, scorer embeddings, sharded
loss and gradients, a sharded train step, and checkpoints restored across
layouts."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from hybridna_jax import restore, scoring, sharding
from hybridna_jax import tokenizer as tok
from hybridna_jax.config import ModelConfig, load_config, model_config_dict
from hybridna_jax.model import (
  HybriDNA,
  abstract_model,
  convert_params,
  create_model,
  is_scanned,
  same_param_layout,
  scan_block_size,
  scan_params,
  stacked_block_size,
  unscan_params,
)
from hybridna_jax.train import optimizer as optimizer_lib
from hybridna_jax.train import step as step_lib
from hybridna_jax.train.checkpoint import Checkpoints
from hybridna_jax.train.step import TrainState

# Mamba2, attention, Mamba2, attention: two repetitions of a 2-layer block.
LOOP = dataclasses.replace(
  ModelConfig.from_config(load_config("configs/tiny.py").model),
  n_layers=4,
  attn_period=2,
  attn_offset=1,
)
SCAN = dataclasses.replace(LOOP, scan_layers=True)


def _tokens(b, l, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(tok.A, tok.N + 1, (b, l)), jnp.int32)


def _merge(cfg, params):
  return nnx.merge(nnx.graphdef(abstract_model(cfg)), params)


@pytest.fixture(scope="module")
def loop_params():
  return nnx.state(create_model(LOOP), nnx.Param)


def _pair(loop_params, **overrides):
  """(loop model, scanned model) with the same parameters."""
  loop_cfg = dataclasses.replace(LOOP, **overrides)
  scan_cfg = dataclasses.replace(loop_cfg, scan_layers=True)
  return _merge(loop_cfg, loop_params), _merge(scan_cfg, scan_params(loop_params, loop_cfg))


@nnx.jit(static_argnames=("hidden",))
def _forward(model, tokens, segment_ids, hidden=False):
  return model(tokens, segment_ids=segment_ids, return_hidden_states=hidden)


def _assert_trees_equal(a, b, rtol=1e-6, atol=1e-6, atol_of_max=0.0):
  """Leafwise allclose; atol_of_max adds that fraction of each leaf's largest
  magnitude to atol (sums over sharded devices reorder fp32 additions)."""
  leaves_a, leaves_b = jax.tree.leaves_with_path(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for (path, x), y in zip(leaves_a, leaves_b):
    y = np.asarray(y)
    np.testing.assert_allclose(
      np.asarray(x),
      y,
      rtol=rtol,
      atol=atol + atol_of_max * np.abs(y).max(),
      err_msg=jax.tree_util.keystr(path),
    )


# -- layout --------------------------------------------------------------------------------


def test_scan_block_size_only_for_repeating_patterns():
  assert scan_block_size(SCAN) == 2
  assert scan_block_size(LOOP) is None  # scan_layers off
  hybrid_7b = ModelConfig.from_config(load_config("configs/hybridna_7b.py").model)
  assert scan_block_size(dataclasses.replace(hybrid_7b, scan_layers=True)) == 8
  irregular = [
    dict(n_layers=5),  # not a whole number of blocks
    dict(attn_layers=(1, 2)),  # listed layers that do not repeat
    dict(attn_layers=(1,)),
  ]
  for overrides in irregular:
    cfg = dataclasses.replace(SCAN, **overrides)
    assert scan_block_size(cfg) is None, overrides
    model = abstract_model(cfg)  # the Python loop, as before
    assert len(model.layers) == cfg.n_layers and not hasattr(model, "scanned_layers")
  assert scan_block_size(dataclasses.replace(SCAN, attn_layers=(1, 3))) == 2


def test_scanned_params_are_stacked_with_a_layers_axis(loop_params):
  scanned = nnx.state(abstract_model(SCAN), nnx.Param)
  loop = nnx.state(abstract_model(LOOP), nnx.Param)
  assert set(scanned) == {"embed", "scanned_layers", "final_norm", "lm_head"}
  assert sum(x.size for x in jax.tree.leaves(scanned)) == sum(x.size for x in jax.tree.leaves(loop))
  kernel = scanned["scanned_layers"][0]["mixer"]["in_zx"]["kernel"]
  assert kernel.shape == (2,) + loop["layers"][0]["mixer"]["in_zx"]["kernel"].shape
  assert kernel.get_metadata()["logical_axes"] == ("layers", "embed", None, "ssm_inner")
  assert "q" in scanned["scanned_layers"][1]["mixer"]  # position 1 is attention
  for path, var in jax.tree.leaves_with_path(
    scanned, is_leaf=lambda x: isinstance(x, nnx.Variable)
  ):
    axes = var.get_metadata().get("logical_axes")
    if "scanned_layers" in jax.tree_util.keystr(path):
      assert axes[0] == "layers" and len(axes) == var.ndim, path
  # "layers" maps to no mesh axis: the other axes shard as in the loop layout.
  spec = sharding.state_shardings(scanned, sharding.make_mesh(2, 2, 2))
  assert spec["scanned_layers"][0]["mixer"]["in_zx"]["kernel"].get_value().spec == P(
    None, "fsdp", None, "tensor"
  )
  # Per-layer views (decoding, hidden states) drop the stacked axis.
  views = _merge(SCAN, scan_params(loop_params, LOOP)).layer_blocks()
  assert [v.kind for v in views] == ["mamba", "attention"] * 2
  kernel = views[3].mixer.q.kernel
  np.testing.assert_array_equal(kernel[...], loop_params["layers"][3]["mixer"]["q"]["kernel"][...])
  assert kernel.get_metadata()["logical_axes"] == ("embed", "q_heads", "head_dim")


def test_params_convert_both_ways_exactly(loop_params):
  scanned = scan_params(loop_params, LOOP)
  assert is_scanned(scanned) and not is_scanned(loop_params)
  # Layer r * 2 + j is slice r of block position j.
  np.testing.assert_array_equal(
    scanned["scanned_layers"][1]["mlp"]["wo"]["kernel"][...][1],
    loop_params["layers"][3]["mlp"]["wo"]["kernel"][...],
  )
  _assert_trees_equal(unscan_params(scanned, LOOP), loop_params, rtol=0, atol=0)
  assert convert_params(loop_params, LOOP) is loop_params
  assert convert_params(scanned, SCAN) is scanned
  _assert_trees_equal(convert_params(scanned, LOOP), loop_params, rtol=0, atol=0)
  _assert_trees_equal(convert_params(loop_params, SCAN), scanned, rtol=0, atol=0)
  with pytest.raises(ValueError, match="does not repeat"):
    scan_params(loop_params, dataclasses.replace(LOOP, attn_layers=(1, 2)))


def test_scanned_init_has_the_scanned_layout():
  model = create_model(SCAN, seed=1)
  params = nnx.state(model, nnx.Param)
  assert is_scanned(params)
  a_log = np.asarray(params["scanned_layers"][0]["mixer"]["A_log"][...])
  assert not np.array_equal(a_log[0], a_log[1])  # each repetition has its own draw
  assert np.isfinite(_forward(model, _tokens(1, 8), None).logits).all()


# -- equal outputs -------------------------------------------------------------------------


@pytest.mark.parametrize("rope", [False, True])
def test_logits_identical(loop_params, rope):
  loop, scanned = _pair(loop_params, rope=rope)
  tokens = _tokens(2, 37)
  segments = jnp.asarray([[1] * 20 + [2] * 17, [0] * 5 + [1] * 32])  # packed; left-padded
  for seg in (None, segments):
    np.testing.assert_allclose(
      _forward(scanned, tokens, seg).logits,
      _forward(loop, tokens, seg).logits,
      rtol=1e-6,
      atol=1e-6,
    )


def test_per_layer_hidden_states_identical(loop_params):
  loop, scanned = _pair(loop_params)
  tokens = _tokens(2, 29)
  a, b = _forward(loop, tokens, None, hidden=True), _forward(scanned, tokens, None, hidden=True)
  assert len(b.hidden_states) == LOOP.n_layers + 1
  _assert_trees_equal(b.hidden_states, a.hidden_states)
  np.testing.assert_allclose(b.logits, a.logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_gradients_identical(loop_params, remat):
  """Gradients through the scan (with each remat policy in the scanned
  body) equal the loop's without remat."""
  tokens = _tokens(2, 24)
  segments = jnp.asarray([[1] * 10 + [2] * 14, [1] * 24])

  @nnx.jit
  def value_and_grad(model):
    loss = lambda m: m(tokens, segment_ids=segments).logits.std()
    return nnx.value_and_grad(loss)(model)

  loop, _ = _pair(loop_params)
  _, scanned = _pair(loop_params, remat=remat)
  (l1, g1), (l2, g2) = value_and_grad(loop), value_and_grad(scanned)
  np.testing.assert_allclose(l2, l1, rtol=1e-6)
  g1, g2 = nnx.state(g1, nnx.Param), nnx.state(g2, nnx.Param)
  assert is_scanned(g2)
  _assert_trees_equal(unscan_params(g2, LOOP), g1, rtol=1e-5, atol=1e-8)


def _decode_all(model, tokens, prompt_len, segment_ids=None):
  """Logits of positions prompt_len-1 .. l-1: prefill, then decode steps."""
  l = tokens.shape[1]
  prefill = nnx.jit(lambda m, t, s: m.prefill(t, l, segment_ids=s))
  logits, cache = prefill(
    model, tokens[:, :prompt_len], None if segment_ids is None else segment_ids[:, :prompt_len]
  )
  out, caches = [logits], [cache]
  step = nnx.jit(lambda m, t, c: m.decode_step(t, c))
  for t in range(prompt_len, l):
    logits, cache = step(model, tokens[:, t], cache)
    out.append(logits)
    caches.append(cache)
  return jnp.stack(out, 1), caches


def test_prefill_and_decode_identical(loop_params):
  loop, scanned = _pair(loop_params, rope=True)
  tokens = jnp.concatenate([jnp.full((2, 4), tok.PAD, jnp.int32), _tokens(2, 26)], 1)
  segments = jnp.asarray([[0] * 4 + [1] * 26, [1] * 30])  # one left-padded prompt
  a_logits, a_caches = _decode_all(loop, tokens, 21, segments)
  b_logits, b_caches = _decode_all(scanned, tokens, 21, segments)
  np.testing.assert_allclose(b_logits, a_logits, rtol=1e-6, atol=1e-6)
  # The same DecodeCache (one entry per layer, batch leading) in both layouts.
  assert jax.tree.structure(b_caches[-1]) == jax.tree.structure(a_caches[-1])
  _assert_trees_equal(b_caches[0], a_caches[0])
  _assert_trees_equal(b_caches[-1], a_caches[-1], rtol=1e-5, atol=1e-6)
  full = _forward(loop, tokens, jnp.asarray(segments)).logits
  np.testing.assert_allclose(b_logits, full[:, 20:], rtol=1e-4, atol=1e-4)


def test_scorer_embeddings_identical(loop_params):
  loop, scanned = _pair(loop_params)
  seqs = [np.asarray(_tokens(1, 40, seed=s)[0]) for s in (1, 2, 3)]
  kw = dict(context=32, stride=16, batch_size=2, min_bucket=16)
  a, b = scoring.Scorer(loop, **kw), scoring.Scorer(scanned, **kw)
  for layer in (-1, 0, 2, LOOP.n_layers):
    np.testing.assert_allclose(
      b.embed(seqs, layer=layer),
      a.embed(seqs, layer=layer),
      rtol=1e-6,
      atol=1e-6,
      err_msg=f"layer {layer}",
    )
  np.testing.assert_allclose(b.log_likelihood(seqs).total, a.log_likelihood(seqs).total, rtol=1e-6)


# -- sharding --------------------------------------------------------------------------------


def _batch(b=8, l=32, seed=0):
  toks = np.random.default_rng(seed).integers(5, 10, (b, l + 1)).astype(np.int32)
  seg = np.ones((b, l), np.int32)
  seg[1, l // 2 :] = 2
  mask = (toks[:, 1:] != 9).astype(np.float32)
  return dict(inputs=toks[:, :-1], targets=toks[:, 1:], segment_ids=seg, loss_mask=mask)


def test_sharded_loss_and_grads_identical(loop_params):
  """On a (data 2, fsdp 2, tensor 2) mesh of 8 devices."""
  mesh = sharding.make_mesh(2, 2, 2)
  batch = step_lib.device_batch(_batch(), sharding.batch_sharding(mesh))

  def loss_and_grads(cfg, params):
    placed = jax.device_put(params, sharding.state_shardings(params, mesh))
    graphdef = nnx.graphdef(abstract_model(cfg))

    @jax.jit
    def fn(p, b):
      with sharding.activate(mesh):
        return jax.value_and_grad(lambda p: step_lib.lm_loss(nnx.merge(graphdef, p), b)[0])(p)

    return placed, fn(placed, batch)

  _, (loss_loop, grads_loop) = loss_and_grads(LOOP, loop_params)
  placed, (loss_scan, grads_scan) = loss_and_grads(SCAN, scan_params(loop_params, LOOP))
  kernel = placed["scanned_layers"][0]["mixer"]["in_zx"]["kernel"][...]
  assert kernel.sharding.spec == P(None, "fsdp", None, "tensor")
  assert (
    grads_scan["scanned_layers"][0]["mixer"]["in_zx"]["kernel"][...].sharding.spec
    == kernel.sharding.spec
  )
  np.testing.assert_allclose(loss_scan, loss_loop, rtol=1e-6)
  _assert_trees_equal(
    unscan_params(jax.device_get(grads_scan), LOOP),
    jax.device_get(grads_loop),
    rtol=1e-4,
    atol=0,
    atol_of_max=1e-6,
  )


def test_sharded_train_step_identical(loop_params):
  """One optimizer step through `build_steps` on 8 devices: the scanned
  train state (params and AdamW moments with the "layers" axis) shards and
  steps like the loop layout."""
  mesh = sharding.make_mesh(2, 2, 2)
  train_cfg = load_config("configs/tiny.py").train
  optimizer, schedule = optimizer_lib.make_optimizer(train_cfg, total_steps=10)

  def one_step(cfg, params):
    fns = step_lib.build_steps(
      lambda rngs: HybriDNA(cfg, rngs=rngs), step_lib.lm_loss, optimizer, schedule, mesh
    )
    # The step donates its state: fresh buffers (device_put may alias its
    # input on device 0), and distinct counters (one buffer donated three
    # times crashes XLA:CPU).
    params = jax.tree.map(jnp.copy, params)
    zero = lambda: jnp.zeros((), jnp.int32)
    state = jax.device_put(
      TrainState(zero(), params, optimizer.init(params), zero(), zero()), fns.state_shardings
    )
    state, metrics = fns.train_step(state, step_lib.device_batch(_batch(), fns.batch_sharding))
    return state, jax.device_get(metrics)

  loop_state, loop_metrics = one_step(LOOP, loop_params)
  scan_state, scan_metrics = one_step(SCAN, scan_params(loop_params, LOOP))
  mu = scan_state.opt_state[1][0].mu["scanned_layers"][0]["mixer"]["in_zx"]["kernel"][...]
  assert mu.sharding.spec == P(None, "fsdp", None, "tensor")
  for key in ("loss", "grad_norm", "accuracy"):
    np.testing.assert_allclose(scan_metrics[key], loop_metrics[key], rtol=1e-5, err_msg=key)
  _assert_trees_equal(
    unscan_params(jax.device_get(scan_state.params), LOOP),
    jax.device_get(loop_state.params),
    rtol=1e-5,
    atol=1e-6,
  )


# -- checkpoints -------------------------------------------------------------------------------


def _write_run(directory, cfg, params):
  """A run directory (config.json + one checkpoint at step 3) holding `params`."""
  config = load_config("configs/tiny.py")
  config.model = model_config_dict(**dataclasses.asdict(cfg))
  os.makedirs(directory)
  with open(os.path.join(directory, restore.CONFIG_FILE), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2))
  zero = jnp.zeros((), jnp.int32)
  ckpt = Checkpoints(os.path.join(directory, "checkpoints"), async_save=False)
  ckpt.save(TrainState(zero + 3, params, None, zero, zero), {"stage": 0})
  ckpt.close()
  return str(directory)


@nnx.jit
def _logits(model, tokens):
  return model(tokens).logits


@pytest.mark.parametrize("written", ["loop", "scan"])
def test_checkpoints_restore_into_either_layout(loop_params, tmp_path, written):
  params = loop_params if written == "loop" else scan_params(loop_params, LOOP)
  run = _write_run(tmp_path / written, LOOP if written == "loop" else SCAN, params)
  one = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  tokens = _tokens(2, 33)
  expected = np.asarray(_logits(_merge(LOOP, loop_params), tokens))
  as_written, _, _ = restore.load(run, mesh=one)
  assert is_scanned(nnx.state(as_written)) == (written == "scan")
  for scan in (False, True):
    model, _, config = restore.load(run, mesh=one, scan_layers=scan)
    assert model.cfg.scan_layers == scan and is_scanned(nnx.state(model)) == scan
    assert config.model.scan_layers == (written == "scan")  # the run's config, as written
    np.testing.assert_allclose(np.asarray(_logits(model, tokens)), expected, rtol=1e-6, atol=1e-6)
  # Converted straight into the shardings of an 8-device mesh.
  model, _, _ = restore.load(run, mesh=sharding.make_mesh(2, 2, 2), scan_layers=written == "loop")
  state = nnx.state(model)
  kernel = (state["scanned_layers"][0] if written == "loop" else state["layers"][0])["mixer"][
    "in_zx"
  ]["kernel"][...]
  assert len(kernel.sharding.device_set) == 8
  assert kernel.sharding.spec == (
    P(None, "fsdp", None, "tensor") if written == "loop" else P("fsdp", None, "tensor")
  )
  np.testing.assert_allclose(np.asarray(_logits(model, tokens)), expected, rtol=1e-6, atol=1e-6)


def test_the_same_layers_stacked_in_blocks_of_another_size_convert(tmp_path):
  """Attention at layers 1, 3, 5, 7 of 8, placed through attn_period 2 or
  through attn_layers with attn_period 4: one architecture, whose scanned
  checkpoints stack blocks of 2 or of 4 layers. A run written in one
  restores into the other (as fine-tuning from a pretrained run does), and
  a resume is refused in one line naming the run's settings (review: a
  shape error that never said attn_period)."""
  by_two = dataclasses.replace(SCAN, n_layers=8)
  by_four = dataclasses.replace(by_two, attn_period=4, attn_layers=(1, 3, 5, 7))
  assert by_two.layer_types == by_four.layer_types
  assert (scan_block_size(by_two), scan_block_size(by_four)) == (2, 4)
  assert not same_param_layout(by_two, by_four)
  unscanned = dataclasses.replace(by_two, scan_layers=False)
  loop_params = nnx.state(create_model(unscanned), nnx.Param)
  run = _write_run(tmp_path / "run", by_two, scan_params(loop_params, by_two))
  one = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  tokens = _tokens(2, 17)
  expected = np.asarray(_logits(_merge(unscanned, loop_params), tokens))
  ref = restore.find_checkpoint(run)
  for cfg in (by_four, dataclasses.replace(by_four, scan_layers=False), by_two):
    params = restore.restore_params(ref, cfg, one)
    assert stacked_block_size(params) == scan_block_size(cfg)
    np.testing.assert_allclose(
      np.asarray(_logits(_merge(cfg, params), tokens)), expected, rtol=1e-6, atol=1e-6
    )
  from hybridna_jax.train.resume import check_resume_config  # pylint: disable=g-import-not-at-top

  config = load_config("configs/tiny.py")
  config.model = model_config_dict(**dataclasses.asdict(by_four))
  with pytest.raises(ValueError, match=r"blocks of 2 layers.*blocks of 4 layers.*attn_period=2"):
    check_resume_config(config, run)
