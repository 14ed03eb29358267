"""Context parallelism on 8 fake CPU devices: one sequence split over the
mesh's context axis computes what one device does -- the SSD core (state
passing), the causal conv (halo), attention (ring, all-gather, zigzag) and the
whole model's loss and every parameter gradient -- with packed documents
crossing the slice boundaries."""

import functools
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import LAMBDA_FASTA
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from launch_env import launch_env

from hybridna_jax import (
  attention,
  generate,
  kernel_registry,
  restore,
  scoring,
  sharding,
  ssd,
  tokenizer,
)
from hybridna_jax.config import CONTEXT_ATTENTION, ModelConfig, load_config
from hybridna_jax.data import fasta
from hybridna_jax.kernels import attention_kernels, sharded
from hybridna_jax.kernels.sharded import shard_causal_conv
from hybridna_jax.layers.mamba2 import causal_conv
from hybridna_jax.model import abstract_model, create_model
from hybridna_jax.train import step as step_lib

TINY = ModelConfig.from_config(load_config("configs/tiny.py").model)


def _context_mesh(context=8, **axes):
  return sharding.make_mesh(
    axes.get("data", 1), axes.get("fsdp", 1), axes.get("tensor", 1), context=context
  )


def _segments(b, l, seed):
  """(b, l) int32 packed-document ids whose boundaries fall inside slices
  and exactly on them, and a row that is one document."""
  rng = np.random.default_rng(seed)
  seg = np.zeros((b, l), np.int32)
  for row in range(1, b):
    cuts = np.sort(rng.choice(np.arange(1, l), size=5, replace=False))
    cuts[0] = l // 8  # exactly at a slice boundary of context=8
    seg[row] = np.searchsorted(np.sort(cuts), np.arange(l), side="right")
  return jnp.asarray(seg)


def _ssd_inputs(b=2, l=256, h=4, p=8, g=2, n=8, seed=0):
  keys = jax.random.split(jax.random.key(seed), 6)
  return (
    jax.random.normal(keys[0], (b, l, h, p)),
    jax.nn.softplus(jax.random.normal(keys[1], (b, l, h)) - 1.0),
    -jnp.exp(jax.random.normal(keys[2], (h,))),
    jax.random.normal(keys[3], (b, l, g, n)),
    jax.random.normal(keys[4], (b, l, g, n)),
    jax.random.normal(keys[5], (b, h, p, n)),
    _segments(b, l, seed),
  )


@pytest.mark.parametrize("impl", ["chunked", "pallas_tpu_interpret"])
def test_ssd_state_passing_matches_one_device(impl):
  x, dt, A, B, C, init, seq = _ssd_inputs()
  if impl == "pallas_tpu_interpret":  # slow in interpret mode: a shorter sequence
    x, dt, B, C, seq = x[:, :128], dt[:, :128], B[:, :128], C[:, :128], seq[:, :128]

  def loss(mesh, x, dt, A, B, C, init):
    with sharding.maybe_activate(mesh):
      y, final = ssd.ssd_chunked_scan(
        x, dt, A, B, C, 16, initial_states=init, seq_idx=seq, return_final_states=True, impl=impl
      )
    return jnp.sum(y * jnp.cos(y)) + jnp.sum(final**2), (y, final)

  def run(mesh):
    fn = jax.jit(jax.value_and_grad(functools.partial(loss, mesh), argnums=range(6), has_aux=True))
    return jax.device_get(fn(x, dt, A, B, C, init))

  (ref_loss, (ref_y, ref_final)), ref_grads = run(None)
  for mesh in (_context_mesh(8), _context_mesh(2, data=2, tensor=2)):
    (got_loss, (y, final)), grads = run(mesh)
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(final, ref_final, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-5)
    for name, a, b in zip(("x", "dt", "A", "B", "C", "init"), grads, ref_grads):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max(), err_msg=name)


def test_conv_halo_matches_one_device():
  keys = jax.random.split(jax.random.key(1), 3)
  u = jax.random.normal(keys[0], (2, 64, 16))
  weight = jax.random.normal(keys[1], (4, 16))
  bias = jax.random.normal(keys[2], (16,))
  seg = _segments(2, 64, 1)
  ref = causal_conv(u, weight, bias, seg)
  mesh = _context_mesh(8)

  @jax.jit
  def sharded(u, seg):
    with sharding.activate(mesh):
      return shard_causal_conv(causal_conv, u, weight, bias, seg, ("act_ssm_inner",))

  np.testing.assert_allclose(sharded(u, seg), ref, rtol=1e-6, atol=1e-6)
  # A length that does not divide by the context size is padded, not refused.
  np.testing.assert_allclose(sharded(u[:, :60], seg[:, :60]), ref[:, :60], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", CONTEXT_ATTENTION)
# 118: padded to a multiple of 4 (of 8 for zigzag's two chunks per slice)
@pytest.mark.parametrize("length", [128, 118])
def test_context_attention_matches_reference(method, length):
  meshes = [_context_mesh(4, data=2)] + [_context_mesh(8)] * (length == 128)

  def attend(q, k, v, seg):
    return attention.causal_attention(q, k, v, seg, impl="xla", context=method)

  _check_context_attention(attend, meshes, length, d=8, seed=2)


def _check_context_attention(attend, meshes, length, d, seed):
  """`attend(q, k, v, seg)` under each mesh: output and q/k/v gradients of
  a loss of it equal one device's dense attention (b 2, 4 query / 2 kv
  heads, packed documents)."""
  keys = jax.random.split(jax.random.key(seed), 3)
  b, hq, hkv = 2, 4, 2
  q = jax.random.normal(keys[0], (b, length, hq, d))
  k = jax.random.normal(keys[1], (b, length, hkv, d))
  v = jax.random.normal(keys[2], (b, length, hkv, d))
  seg = _segments(b, length, seed)

  def loss(mesh, q, k, v):
    if mesh is None:
      out = attention.xla_attention(q, k, v, seg)
    else:
      with sharding.activate(mesh):
        out = attend(q, k, v, seg)
    return jnp.sum(out * jnp.sin(out)), out

  def run(mesh):
    fn = jax.jit(jax.value_and_grad(functools.partial(loss, mesh), argnums=(0, 1, 2), has_aux=True))
    return jax.device_get(fn(q, k, v))

  (_, ref_out), ref_grads = run(None)
  for mesh in meshes:
    (_, out), grads = run(mesh)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    for name, a, b_ in zip("qkv", grads, ref_grads):
      np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("method", CONTEXT_ATTENTION)
def test_context_attention_backward_has_no_scatter(method):
  """The ring's gradient sums add block gradients into static slices
  without a scatter: x.at[:, :].add closes an empty index array into the
  shard_map, and the Shardy partitioner of jax 0.11.2 (the GPU image's)
  crashes compiling it."""
  b, l, hq, hkv, d = 2, 64, 4, 2, 8
  q, k, v = (jnp.ones((b, l, h, d)) for h in (hq, hkv, hkv))
  mesh = _context_mesh(8)

  def loss(q, k, v):
    with sharding.activate(mesh):
      out = attention.causal_attention(q, k, v, _segments(b, l, 0), impl="xla", context=method)
    return out.sum()

  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).as_text()
  assert "manual_computation" in text and "stablehlo.scatter" not in text


# Small Triton tiles: slices of 32 tokens suffice (the default's 128 would
# need 1,024-token sequences for zigzag over 4 devices in interpret mode).
_SMALL_FLASH = attention_kernels.flash_block(
  attention_kernels.FlashConfig(
    block_q=32, block_k=16, block_q_bwd=16, block_k_bwd=32, interpret=True
  )
)


@pytest.mark.parametrize("method", CONTEXT_ATTENTION)
@pytest.mark.parametrize(
  "block,axes,length",
  [
    (_SMALL_FLASH, dict(context=4, data=2), 250),
    (attention_kernels.SPLASH_BLOCK_INTERPRET, dict(context=2, data=2, tensor=2), 500),
  ],
  ids=["pallas_gpu", "splash"],
)
def test_context_attention_with_kernel_blocks(method, block, axes, length):
  """The Triton and splash kernels per (query slice, key slice) block, in
  interpret mode, with the ring's own backward: output and gradients of
  one device's dense attention (GQA, packed documents across slices,
  padding to the kernels' multiple)."""

  def attend(q, k, v, seg):
    return sharded.context_attention(q, k, v, seg, method=method, block_op=block)

  _check_context_attention(attend, [_context_mesh(**axes)], length, d=16, seed=3)


def test_context_attention_falls_back_to_xla_blocks_where_the_kernel_cannot_run(caplog):
  keys = jax.random.split(jax.random.key(4), 3)
  q = jax.random.normal(keys[0], (1, 64, 2, 8))  # head dim 8: below Triton's 16
  k, v = (jax.random.normal(key, (1, 64, 1, 8)) for key in keys[1:])
  with sharding.activate(_context_mesh(4, data=2)), caplog.at_level("WARNING"):
    out = jax.jit(lambda q, k, v: sharded.context_attention(q, k, v, block_op=_SMALL_FLASH))(
      q, k, v
    )
  np.testing.assert_allclose(out, attention.xla_attention(q, k, v), rtol=1e-5, atol=1e-5)
  assert "head dim 8" in caplog.text or "head dim 8" in str(kernel_registry._warned)


TRITON = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")


@pytest.mark.parametrize("impl,platform", [("pallas_gpu", "cuda"), ("splash", "tpu")])
@pytest.mark.usefixtures("lowers_for_cuda_here")
def test_context_attention_lowers_with_kernels_for_cuda_and_tpu(impl, platform):
  """The attention kernel's block runs in the ring on the accelerator: the
  sharded forward and backward over (data=2, context=4), bf16, d = 128,
  lowered for CUDA (Triton calls) and TPU (Mosaic calls)."""
  spec = jax.ShapeDtypeStruct
  b, l, hq, hkv, d = 2, 4096, 8, 2, 128
  args = [spec((b, l, h, d), jnp.bfloat16) for h in (hq, hkv, hkv)] + [spec((b, l), jnp.int32)]
  mesh = _context_mesh(4, data=2)
  marker = "xla.gpu.triton" if platform == "cuda" else "tpu_custom_call"

  def grads(q, k, v, seg):
    def loss(q, k, v):
      with sharding.activate(mesh):
        out = attention.causal_attention(q, k, v, seg, impl=impl, context="zigzag")
      return out.astype(jnp.float32).sum()

    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  exported = jax.export.export(jax.jit(grads), platforms=[platform], disabled_checks=[TRITON])(
    *args
  )
  assert exported.nr_devices == 8
  # Forward and backward kernels of the own-slice step and of the later steps.
  assert exported.mlir_module().count(marker) >= 4


def _lm_batch(b=2, l=256, seed=0):
  rng = np.random.default_rng(seed)
  toks = rng.integers(5, 10, (b, l + 1)).astype(np.int32)
  seg = np.asarray(_segments(b, l, seed)) + 1
  mask = np.ones((b, l), np.float32)
  mask[:, :-1] *= seg[:, 1:] == seg[:, :-1]  # no target across a document boundary
  return dict(inputs=toks[:, :-1], targets=toks[:, 1:], segment_ids=seg, loss_mask=mask)


@pytest.mark.parametrize(
  "axes",
  [dict(context=8), dict(data=2, context=4), dict(fsdp=2, context=2, tensor=2)],
  ids=["context8", "data2-context4", "fsdp2-context2-tensor2"],
)
def test_model_loss_and_gradients_match_one_device(axes):
  """With the default context attention (zigzag); the other methods' forward
  and gradients are checked op by op above."""
  batch = _lm_batch(b=4)
  params = nnx.state(create_model(TINY), nnx.Param)
  graphdef = nnx.graphdef(abstract_model(TINY))

  def loss_and_grads(mesh):
    placed = jax.device_put(params, sharding.state_shardings(params, mesh))

    @jax.jit
    def fn(p, b):
      with sharding.activate(mesh):
        return jax.value_and_grad(lambda p: step_lib.lm_loss(nnx.merge(graphdef, p), b)[0])(p)

    placed_batch = step_lib.device_batch(batch, sharding.batch_sharding(mesh))
    lowered = fn.lower(placed, placed_batch)
    compiled = lowered.compile()
    return jax.device_get(compiled(placed, placed_batch)), lowered.as_text(), compiled.as_text()

  (ref_loss, ref), _, _ = loss_and_grads(sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
  (got_loss, got), text, compiled = loss_and_grads(_context_mesh(**axes))
  # No zero-sized array enters a shard_map: jax 0.11.2's Shardy partitioner
  # segfaults on one (see test_context_attention_backward_has_no_scatter).
  assert "manual_computation" in text and "tensor<0x" not in text
  # No (b, l, ...) activation is gathered to its whole length (review: the
  # layers' token matrices merged the split length with the batch, and XLA
  # gathered it at every projection and norm, forward and backward).
  gathered = re.findall(r"= (f32\[[\d,]+\])\S* all-gather\(", compiled)
  assert not [g for g in gathered if re.match(r"f32\[\d+,256,", g)], gathered
  np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max(), err_msg=str(path))


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = {  # launcher flags: one device, and 4 slices x 2 rows on 8 fake devices
  "one": ["--config.mesh.num_devices=1"],
  "context": ["--config.mesh.context=4", "--config.mesh.fsdp=2"],
}


def _launch(program: str, *args: str) -> None:
  """Runs launch/<program> with the tiny config on 8 fake CPU devices."""
  command = [
    sys.executable,
    os.path.join(ROOT, "launch", program),
    f"--config={os.path.join(ROOT, 'configs', 'tiny.py')}",
    *args,
  ]
  done = subprocess.run(command, env=launch_env(8), capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]


def _launch_train(store_dir: str, workdir: str, mesh_flags) -> list[dict]:
  """Trains the tiny model 4 steps at 128 nt through launch/train.py; returns
  the train records of metrics.jsonl."""
  _launch(
    "train.py",
    f"--workdir={workdir}",
    f"--config.data.store_dir={store_dir}",
    "--config.train.stages=((128, 4, 2),)",
    "--config.train.warmup_steps=1",
    "--config.train.log_every=1",
    "--config.train.eval_every=0",
    "--config.train.checkpoint_every=4",
    "--config.train.keep_best=False",
    "--config.train.plot=False",
    *mesh_flags,
  )
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["kind"] == "train"]


@pytest.mark.slow
def test_launch_train_with_context_axis_gives_one_device_losses(lambda_store, tmp_path):
  one, split = (
    _launch_train(lambda_store.store_dir, str(tmp_path / name), MESHES[name])
    for name in ("one", "context")
  )
  assert [r["step"] for r in split] == [r["step"] for r in one] == [1, 2, 3, 4]
  for a, b in zip(split, one):
    for key in ("loss", "grad_norm", "accuracy"):
      np.testing.assert_allclose(a[key], b[key], rtol=2e-5, err_msg=f"step {a['step']} {key}")


@pytest.fixture(scope="module")
def one_device_and_context_models(tiny_run):
  one = restore.load(tiny_run, mesh=sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]))[0]
  split = restore.load(tiny_run, mesh=_context_mesh(4, data=2))[0]
  return one, split


def test_scorer_over_the_context_axis_scores_like_one_device(one_device_and_context_models):
  """Windows of 256 tokens, each split over 4 devices (buckets of 16..256:
  the short ones too), against the same scorer on one device."""
  ((_, genome),) = fasta.read_fasta(LAMBDA_FASTA)
  seqs = [genome[:700].astype(np.int32), genome[9000:9021].astype(np.int32)]
  ref, got = (
    scoring.Scorer(model, context=256, stride=64, batch_size=2, min_bucket=16)
    for model in one_device_and_context_models
  )
  np.testing.assert_allclose(
    got.log_likelihood(seqs).total, ref.log_likelihood(seqs).total, rtol=1e-5
  )
  for a, b in zip(got.position_scores(seqs), ref.position_scores(seqs)):
    np.testing.assert_allclose(a.log_probs, b.log_probs, rtol=1e-4, atol=1e-5)


def test_cached_generation_with_a_context_mesh(one_device_and_context_models):
  """The prefill runs split over the context axis (state passing, ring
  attention); the decode steps continue from its caches."""
  one, split = one_device_and_context_models
  prompts = [np.asarray(tokenizer.encode("ACGTTGCA" * 8)), np.asarray(tokenizer.encode("GATTACA"))]
  settings = generate.GenerateConfig(max_new_tokens=8, temperature=0)
  ref = jax.device_get(generate.sample(one, prompts, settings))
  got = jax.device_get(generate.sample(split, prompts, settings, mesh=split_mesh(split)))
  np.testing.assert_array_equal(got.tokens, ref.tokens)
  np.testing.assert_allclose(got.log_probs, ref.log_probs, rtol=1e-4)


def split_mesh(model):
  return jax.tree.leaves(nnx.state(model))[0].sharding.mesh


@pytest.mark.slow
def test_launch_eval_with_context_axis_gives_one_device_bits(tiny_run, lambda_store, tmp_path):
  """launch/eval.py over 512-token windows split 4 ways (x fsdp 2) reports
  what one device reports."""
  results = {}
  for name, mesh_flags in MESHES.items():
    _launch(
      "eval.py",
      f"--workdir={tiny_run}",
      f"--config.data.store_dir={lambda_store.store_dir}",
      "--config.score.context=512",
      "--config.score.stride=256",
      "--config.score.eval_max_tokens=1500",
      f"--output_dir={tmp_path / name}",
      *mesh_flags,
    )
    (path,) = (tmp_path / name).glob("eval_*.json")
    results[name] = json.loads(path.read_text())["overall"]
  assert results["context"]["tokens"] == results["one"]["tokens"] > 1000
  np.testing.assert_allclose(
    results["context"]["bits_per_nt"], results["one"]["bits_per_nt"], rtol=1e-5
  )


def test_two_meshes_of_one_shape_each_run_on_their_own_devices():
  """Review: jit keyed the public ops by the abstract mesh only, so a mesh of
  the same shape over devices 4-7 reused the trace made for devices 0-3
  ("incompatible devices" for inputs placed on 4-7)."""
  q, k, v = (
    jax.random.normal(key, (2, 64, h, 8))
    for key, h in zip(jax.random.split(jax.random.key(0), 3), (4, 2, 2))
  )
  want = attention.xla_attention(q, k, v)
  devices = jax.devices()
  for part in (devices[:4], devices[4:]):
    mesh = sharding.make_mesh(1, 1, 1, devices=part, context=4)
    placed = [jax.device_put(a, NamedSharding(mesh, P(None, "context"))) for a in (q, k, v)]

    @jax.jit
    def split(q, k, v, mesh=mesh):
      with sharding.activate(mesh):
        return attention.causal_attention(q, k, v, impl="xla", context="ring")

    got = split(*placed)
    assert set(got.sharding.device_set) == set(part)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Review: without a mesh, an AttributeError on None.
  with pytest.raises(ValueError, match=r"context attention runs under sharding.activate"):
    sharded.context_attention(q, k, v)
