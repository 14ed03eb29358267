"""Attention kernels (Pallas Triton flash in interpret mode, splash in TPU
interpret mode) against the XLA reference, under a mesh, and lowered for CUDA
and TPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybridna_jax import attention, attention_reference, sharding
from hybridna_jax.kernels import attention_kernels, causal_blocks

# Small tiles so that l = 100 (padded to 128) spans several of them.
FLASH = attention_kernels.FlashConfig(
  block_q=32, block_k=16, block_q_bwd=16, block_k_bwd=32, interpret=True
)


def qkv(seed=0, b=2, l=100, hq=4, hkv=2, d=16, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  normal = lambda *s: jnp.asarray(rng.standard_normal(s, np.float32), dtype)
  seg = np.ones((b, l), np.int32)
  seg[0, 30:] = 2
  seg[0, 71:] = 3
  seg[b - 1, l - 10 :] = 0  # trailing padding
  return (normal(b, l, hq, d), normal(b, l, hkv, d), normal(b, l, hkv, d), jnp.asarray(seg))


def outputs_and_grads(fn, q, k, v, seg):
  rng = np.random.default_rng(7)
  cot = jnp.asarray(rng.standard_normal(q.shape, np.float32))

  def loss(q, k, v):
    out = fn(q, k, v, seg)
    return (out.astype(jnp.float32) * cot).sum(), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


def check(fn, q, k, v, seg, rtol, atol_frac):
  out, grads = outputs_and_grads(fn, q, k, v, seg)
  f32 = lambda a: a.astype(jnp.float32)
  ref_out, ref_grads = outputs_and_grads(attention.xla_attention, f32(q), f32(k), f32(v), seg)
  assert out.dtype == q.dtype and out.shape == q.shape
  for name, got, want in zip(("out", "dq", "dk", "dv"), (out,) + grads, (ref_out,) + ref_grads):
    want = np.asarray(want, np.float32)
    np.testing.assert_allclose(
      np.asarray(got, np.float32),
      want,
      rtol=rtol,
      atol=atol_frac * np.abs(want).max(),
      err_msg=name,
    )


@pytest.mark.parametrize("hq,hkv,with_segments", [(4, 2, True), (2, 2, False)])
def test_triton_flash_matches_xla(hq, hkv, with_segments):
  """GQA and MHA, causal, packed documents and padding, odd length."""
  q, k, v, seg = qkv(hq=hq, hkv=hkv)
  fn = lambda q, k, v, s: attention_kernels.flash_attention(
    q, k, v, s if with_segments else None, config=FLASH
  )
  check(fn, q, k, v, seg if with_segments else None, 1e-4, 1e-5)


def test_triton_flash_bf16():
  q, k, v, seg = qkv(l=64, d=32, dtype=jnp.bfloat16)
  fn = lambda q, k, v, s: attention_kernels.flash_attention(q, k, v, s, config=FLASH)
  check(fn, q, k, v, seg, 2e-2, 2e-2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_splash_matches_xla(dtype):
  """Splash under Pallas' TPU interpret mode: GQA, causal, segment ids, odd
  length (padded to 128)."""
  q, k, v, seg = qkv(b=1, l=100, hq=4, hkv=2, d=32, dtype=dtype)
  fn = lambda q, k, v, s: attention_kernels.splash_attention(q, k, v, s, interpret=True)
  tol = (1e-4, 1e-5) if dtype == jnp.float32 else (2e-2, 2e-2)
  check(fn, q, k, v, seg, *tol)


@pytest.mark.parametrize(
  "l,block,hq,hkv,with_segments",
  [
    (100, 32, 4, 2, True),  # GQA, packed documents and padding, padded to 128
    (100, 32, 2, 2, False),  # MHA, no segment ids (nothing skipped but the upper blocks)
    (64, 256, 4, 1, True),  # MQA, shorter than one block
    (96, 16, 4, 2, True),  # many blocks: whole blocks of other documents skipped
    (600, None, 4, 2, True),  # the automatic block (256 here), padded to 768
  ],
)
def test_causal_blocks_matches_xla(l, block, hq, hkv, with_segments):
  q, k, v, seg = qkv(l=l, hq=hq, hkv=hkv)
  fn = lambda q, k, v, s: causal_blocks.causal_block_attention(q, k, v, s, block=block)
  check(fn, q, k, v, seg if with_segments else None, 1e-5, 1e-6)


def test_causal_blocks_unsorted_segments_and_bf16():
  """Segment ids need not be sorted (the block skip tests id ranges, a
  necessary condition); bf16 inputs at bf16 tolerance."""
  q, k, v, _ = qkv(l=64, d=32)
  seg = jnp.asarray(np.tile(np.repeat([3, 1, 2, 1], 16), (2, 1)), jnp.int32)
  fn = lambda q, k, v, s: causal_blocks.causal_block_attention(q, k, v, s, block=16)
  check(fn, q, k, v, seg, 1e-5, 1e-6)
  q16, k16, v16 = (a.astype(jnp.bfloat16) for a in (q, k, v))
  check(fn, q16, k16, v16, seg, 2e-2, 2e-2)


def test_causal_blocks_memory_is_linear_in_length():
  """The compiled forward+backward holds O(l * block) temporaries, not the
  (l, l) scores the reference keeps for its backward."""
  b, l, hq, d = 1, 4096, 2, 16
  q = jax.ShapeDtypeStruct((b, l, hq, d), jnp.float32)
  grad = lambda fn: jax.grad(lambda q, k, v: fn(q, k, v).sum(), argnums=(0, 1, 2))
  temp = lambda fn: jax.jit(grad(fn)).lower(q, q, q).compile().memory_analysis().temp_size_in_bytes
  scores_bytes = b * hq * l * l * 4
  assert temp(attention.xla_attention) > scores_bytes
  blocks = temp(lambda q, k, v: causal_blocks.causal_block_attention(q, k, v, block=256))
  assert blocks < scores_bytes / 8


def test_causal_blocks_auto_block_follows_the_scores_size():
  """512 while one pair's fp32 scores (b * hq * block^2) fit in 4 MiB."""
  assert causal_blocks.auto_block(batch=1, query_heads=4) == 512
  assert causal_blocks.auto_block(batch=2, query_heads=4) == 256


# One (query slice, key slice) block of context-parallel attention, as the
# ring calls it: causal (lq >= lk, both slices starting together) or full.
BLOCKS = {
  "xla": attention_reference.XLA_BLOCK,
  "pallas_gpu_interpret": attention_kernels.flash_block(FLASH),
  "splash_interpret": attention_kernels.SPLASH_BLOCK_INTERPRET,
}


def dense_block(q, k, v, q_seg, k_seg, causal):
  """(out, lse) fp32 of the whole score matrix, for the blocks' checks."""
  b, lq, hq, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  f32 = lambda a: jnp.repeat(a.astype(jnp.float32), hq // hkv, axis=2)
  s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), f32(k)) * d**-0.5
  mask = q_seg[:, :, None] == k_seg[:, None, :]
  if causal:
    mask = mask & (jnp.arange(lq)[:, None] >= jnp.arange(lk)[None])
  s = jnp.where(mask[:, None], s, -1e30)
  lse = jax.nn.logsumexp(s, -1)
  out = jnp.einsum("bhqk,bkhd->bqhd", jnp.exp(s - lse[..., None]), f32(v))
  return out, lse.transpose(0, 2, 1)


@pytest.mark.parametrize(
  "name,causal,lq,lk,dtype",
  [
    (name, causal, lq, lk, jnp.float32)
    for name in BLOCKS
    for causal, lq, lk in ((True, 256, 256), (True, 256, 128), (False, 128, 256))
  ]
  + [(name, True, 256, 128, jnp.bfloat16) for name in BLOCKS if name != "xla"],
)
def test_context_blocks_match_dense(name, causal, lq, lk, dtype):
  check_block(BLOCKS[name], causal, lq, lk, dtype)


def check_block(op, causal, lq, lk, dtype, d=16):
  """Forward (out, lse) and the backward from the block's own result,
  GQA, two documents per slice (every query sees a key)."""
  rng = np.random.default_rng(0)
  b, hq, hkv = 2, 4, 2
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
  q, k, v = normal(b, lq, hq, d), normal(b, lk, hkv, d), normal(b, lk, hkv, d)
  d_out = normal(b, lq, hq, d)
  q_cut, k_cut = lq // 3, min(lk // 2, lq // 3)
  q_seg = jnp.asarray(np.repeat([[0] * q_cut + [1] * (lq - q_cut)], b, 0), jnp.int32)
  k_seg = jnp.asarray(np.repeat([[0] * k_cut + [1] * (lk - k_cut)], b, 0), jnp.int32)
  q, k, v = (a.astype(dtype) for a in (q, k, v))
  out, lse = jax.jit(op.forward, static_argnums=5)(q, k, v, q_seg, k_seg, causal)
  want_out, want_lse = dense_block(q, k, v, q_seg, k_seg, causal)
  tol = 1e-4 if dtype == jnp.float32 else 2e-2
  assert out.dtype == lse.dtype == jnp.float32
  np.testing.assert_allclose(out, want_out, rtol=tol, atol=tol)
  np.testing.assert_allclose(lse, want_lse, rtol=tol, atol=tol)
  grads = jax.jit(op.backward, static_argnums=5)(q, k, v, q_seg, k_seg, causal, out, lse, d_out)
  _, vjp = jax.vjp(lambda q, k, v: dense_block(q, k, v, q_seg, k_seg, causal)[0], q, k, v)
  for label, got, want in zip("qkv", grads, vjp(d_out)):
    assert got.dtype == jnp.float32
    want = np.asarray(want, np.float32)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max(), err_msg=label)


def test_registry():
  assert attention.KERNELS.resolve("auto", platform="tpu").name == "splash"
  assert attention.KERNELS.resolve("auto", platform="gpu").name == "flash_gpu"
  assert attention.KERNELS.resolve("auto", platform="cpu").name == "xla_causal"
  for name in (
    "xla",
    "xla_blockwise",
    "splash",
    "flash_gpu",
    "cudnn",
    "pallas_gpu",
    "pallas_gpu_interpret",
    "splash_interpret",
  ):
    assert name in attention.KERNELS.names()
    block = attention.KERNELS.resolve(name).options["context_block"]
    assert attention.CONTEXT_BLOCKS.resolve(block).fn.name == block


def test_gpu_choice():
  """flash_gpu sends segment ids (which cuDNN's API does not take) and fp32
  inputs to the Triton kernel, and bf16 without segment ids to cuDNN (which
  this CPU host lacks, so it falls back to the Triton kernel); head dims the
  Triton kernel cannot take go to XLA. Traced only, to check the dispatch."""
  q, k, v, seg = qkv(l=64, d=32)
  trace = lambda *a: str(jax.make_jaxpr(attention_kernels.gpu_attention)(*a))
  assert "flash_attention_fwd" in trace(q, k, v, seg)
  assert "flash_attention_fwd" in trace(q, k, v, None)
  q16, k16, v16 = (a.astype(jnp.bfloat16) for a in (q, k, v))
  assert "flash_attention_fwd" in trace(q16, k16, v16, seg)
  assert "flash_attention_fwd" in trace(q16, k16, v16, None)
  q, k, v, seg = qkv(l=64, d=24)
  assert "pallas_call" not in trace(q, k, v, seg)


def in_mesh(mesh, fn):
  """fn with the sharding context entered inside (where tracing sees it)."""

  def wrapped(*args):
    with sharding.activate(mesh):
      return fn(*args)

  return wrapped


def test_sharded_matches_unsharded():
  """(data 2, fsdp 2, tensor 2) mesh with b = 2: the batch does not divide
  over data x fsdp = 4, so it is replicated and only heads are split."""
  q, k, v, seg = qkv(b=2, l=32, hq=4, hkv=2, d=16)
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  fn = lambda q, k, v: attention.causal_attention(q, k, v, seg, impl="pallas_gpu_interpret")
  grad_fn = jax.value_and_grad(lambda q, k, v: (fn(q, k, v) ** 2).sum(), argnums=(0, 1, 2))
  ref_loss, ref_grads = jax.jit(grad_fn)(q, k, v)
  sharded_grad_fn = in_mesh(mesh, grad_fn)
  jaxpr = str(jax.make_jaxpr(sharded_grad_fn)(q, k, v))
  loss, grads = jax.jit(sharded_grad_fn)(q, k, v)
  assert "shard_map" in jaxpr
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for got, want in zip(grads, ref_grads):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["pallas_gpu_interpret", "xla_causal"])
def test_sharded_batch_and_heads(impl):
  q, k, v, seg = qkv(b=4, l=32, hq=4, hkv=2, d=16)
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  fn = lambda q, k, v: attention.causal_attention(q, k, v, seg, impl=impl)
  ref = jax.jit(fn)(q, k, v)
  sharded_fn = in_mesh(mesh, fn)
  jaxpr = str(jax.make_jaxpr(sharded_fn)(q, k, v))
  out = jax.jit(sharded_fn)(q, k, v)
  assert "shard_map" in jaxpr and "('data', 'fsdp')" in jaxpr
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


TRITON = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")


@pytest.mark.parametrize("impl,platform", [("pallas_gpu", "cuda"), ("splash", "tpu")])
@pytest.mark.usefixtures("lowers_for_cuda_here")
def test_kernels_lower_for_cuda_and_tpu(impl, platform):
  """Forward and backward, with and without segment ids, at d = 128, GQA,
  bf16, l = 4096."""
  fn = attention.KERNELS.resolve(impl).fn
  spec = jax.ShapeDtypeStruct
  b, l, hq, hkv, d = 1, 4096, 8, 2, 128
  args = (
    spec((b, l, hq, d), jnp.bfloat16),
    spec((b, l, hkv, d), jnp.bfloat16),
    spec((b, l, hkv, d), jnp.bfloat16),
    spec((b, l), jnp.int32),
  )
  marker = "xla.gpu.triton" if platform == "cuda" else "tpu_custom_call"
  for with_seg in (False, True):
    f = lambda q, k, v, s: fn(q, k, v, s if with_seg else None)  # noqa: B023
    g = lambda q, k, v, s: jax.grad(
      lambda q, k, v: f(q, k, v, s).astype(jnp.float32).sum(),  # noqa: B023
      argnums=(0, 1, 2),
    )(q, k, v)
    for fun, kernels in ((f, 1), (g, 2)):
      exported = jax.export.export(jax.jit(fun), platforms=[platform], disabled_checks=[TRITON])(
        *args
      )
      assert exported.mlir_module().count(marker) >= kernels


ON_DEVICE = pytest.mark.skipif(
  jax.default_backend() not in ("gpu", "tpu"),
  reason="compiled kernels need a GPU or TPU (run with JAX_PLATFORMS=cuda/tpu)",
)


@ON_DEVICE
@pytest.mark.parametrize("with_segments", [False, True])
def test_compiled_kernels_match_xla_on_device(with_segments):
  """On a GPU/TPU: the auto kernel (cuDNN or Triton on GPU, splash on TPU)
  and the Pallas GPU kernel, at d = 128 with GQA and an odd length, against
  the XLA reference in fp32."""
  q, k, v, seg = qkv(b=2, l=1000, hq=8, hkv=2, d=128, dtype=jnp.bfloat16)
  seg = seg if with_segments else None
  impls = ["auto"] + (["pallas_gpu"] if jax.default_backend() == "gpu" else [])
  for impl in impls:
    fn = lambda q, k, v, s, impl=impl: attention.causal_attention(q, k, v, s, impl=impl)
    check(fn, q, k, v, seg, 2e-2, 2e-2)


@ON_DEVICE
@pytest.mark.parametrize("causal,lq,lk", [(True, 512, 256), (False, 256, 512)])
def test_compiled_context_block_matches_dense_on_device(causal, lq, lk):
  """On a GPU/TPU: the block the auto kernel runs per ring step (Triton on
  GPU, splash on TPU), compiled, bf16, d = 128."""
  block = attention.KERNELS.resolve("auto").options["context_block"]
  check_block(attention.CONTEXT_BLOCKS.resolve(block).fn, causal, lq, lk, jnp.bfloat16, d=128)
