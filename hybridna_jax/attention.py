"""Causal grouped-query attention: the public op and its kernel table.

`causal_attention` takes q (b, l, hq, d), k and v (b, l, hkv, d) with
hq % hkv == 0, and optional segment ids (b, l) int32: a query attends to keys
at or before its position with the same segment id, so packed documents never
see each other. Scores and softmax are fp32; the output has q's dtype. The
XLA references live in `hybridna_jax.attention_reference` (re-exported here);
the kernels in `hybridna_jax.kernels` import those, never this module.

Kernels (`KERNELS`, config `attention_impl`; "auto" takes the first whose
platforms include the backend, else ``xla``):

* ``xla``: materialises the (l, l) scores; the reference every kernel is
  tested against.
* ``xla_blockwise``: the same math with an online softmax over key blocks,
  O(l * block) memory; for long contexts on CPU.
* ``xla_causal``: visits only the (query, key) blocks the causal mask and
  the segment ids keep, with an online softmax and a flash backward, O(l *
  block) memory (auto on CPU; `hybridna_jax.kernels.causal_blocks`).
* ``splash``: splash attention (auto on TPU); ``splash_interpret`` runs it in
  TPU interpret mode.
* ``flash_gpu``: cuDNN when it applies (no segment ids, bf16/fp16), else
  ``pallas_gpu`` (auto on GPU).
* ``cudnn``: jax.nn.dot_product_attention(implementation="cudnn"), no
  segment ids.
* ``pallas_gpu``: the Pallas Triton flash kernel; ``pallas_gpu_interpret``
  runs it on CPU.

The kernels run per shard in `jax.shard_map` under `sharding.activate`
(`hybridna_jax.kernels.sharded`). Where the mesh's context axis splits the
sequence, attention crosses it by a load-balanced ring, a ring or an
all-gather instead (see `causal_attention`), and a kernel's block version
(`CONTEXT_BLOCKS`: splash on TPU, the Triton kernel on GPU, XLA elsewhere)
computes each (query slice, key slice) block.
"""

from __future__ import annotations

import jax

from hybridna_jax import sharding

# The references, re-exported: users and the attention layer call them here.
from hybridna_jax.attention_reference import decode_attention as decode_attention
from hybridna_jax.attention_reference import xla_attention as xla_attention
from hybridna_jax.attention_reference import xla_blockwise_attention as xla_blockwise_attention
from hybridna_jax.config import CONTEXT_ATTENTION
from hybridna_jax.kernel_registry import Kernel, KernelRegistry
from hybridna_jax.kernels import sharded

Array = jax.Array

_REF = "hybridna_jax.attention_reference"
_KERNELS = "hybridna_jax.kernels.attention_kernels"
_CAUSAL_BLOCKS = "hybridna_jax.kernels.causal_blocks"
# A kernel maps (q, k, v, segment_ids or None) -> (b, l, hq, d) in q.dtype;
# its "context_block" option names the block of `CONTEXT_BLOCKS` that runs
# it per (query slice, key slice) when the context axis splits the sequence.
_XLA = {"context_block": "xla"}
KERNELS = KernelRegistry(
  "attention",
  fallback="xla",
  kernels=(
    # name                         provided by                               auto on
    Kernel("xla", f"{_REF}:xla_attention", options=_XLA),
    Kernel("xla_blockwise", f"{_REF}:xla_blockwise_attention", options=_XLA),
    Kernel("xla_causal", f"{_CAUSAL_BLOCKS}:sharded_causal_blocks", ("cpu",), _XLA),
    Kernel("splash", f"{_KERNELS}:sharded_splash", ("tpu",), {"context_block": "splash"}),
    Kernel("flash_gpu", f"{_KERNELS}:sharded_flash_gpu", ("gpu",), {"context_block": "pallas_gpu"}),
    Kernel("cudnn", f"{_KERNELS}:sharded_cudnn", options={"context_block": "pallas_gpu"}),
    Kernel("pallas_gpu", f"{_KERNELS}:sharded_pallas_gpu", options={"context_block": "pallas_gpu"}),
    Kernel(
      "pallas_gpu_interpret",
      f"{_KERNELS}:sharded_pallas_gpu_interpret",
      options={"context_block": "pallas_gpu_interpret"},
    ),
    Kernel(
      "splash_interpret",
      f"{_KERNELS}:sharded_splash_interpret",
      options={"context_block": "splash_interpret"},
    ),
  ),
)

# `attention_reference.BlockAttention`s: one (query slice, key slice) block
# of the ring and zigzag context attention (`sharded.context_attention`).
CONTEXT_BLOCKS = KernelRegistry(
  "context attention block",
  fallback="xla",
  kernels=(
    Kernel("xla", f"{_REF}:XLA_BLOCK"),
    Kernel("splash", f"{_KERNELS}:SPLASH_BLOCK"),
    Kernel("splash_interpret", f"{_KERNELS}:SPLASH_BLOCK_INTERPRET"),
    Kernel("pallas_gpu", f"{_KERNELS}:FLASH_BLOCK"),
    Kernel("pallas_gpu_interpret", f"{_KERNELS}:FLASH_BLOCK_INTERPRET"),
  ),
)


@sharding.context_keyed_jit(static_argnames=("impl", "context"))
def causal_attention(
  q: Array,
  k: Array,
  v: Array,
  segment_ids: Array | None = None,
  *,
  impl: str = "auto",
  context: str = CONTEXT_ATTENTION[0],
) -> Array:
  """Causal GQA self-attention; returns (b, l, hq, d) in q.dtype.

  On a mesh whose context axis splits the sequence, `context` ("zigzag",
  "ring" or "allgather") says how keys and values cross it
  (`sharded.context_attention`); each (query slice, key slice) block runs
  `impl`'s block kernel (its "context_block")."""
  b, l, hq, d = q.shape
  if k.shape != v.shape or k.shape[:2] != (b, l) or k.shape[3] != d:
    raise ValueError(
      f"causal_attention: q {q.shape}, k {k.shape} and v "
      f"{v.shape} must be (b, l, heads, d) with equal b, l, d."
    )
  if hq % k.shape[2]:
    raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({k.shape[2]}).")
  if segment_ids is not None and segment_ids.shape != (b, l):
    raise ValueError(f"segment_ids has shape {segment_ids.shape}, expected {(b, l)}.")
  kernel = KERNELS.resolve(impl)
  if sharding.active_context_shards() > 1:
    block = CONTEXT_BLOCKS.resolve(kernel.options["context_block"]).fn
    return sharded.context_attention(q, k, v, segment_ids, method=context, block_op=block)
  return kernel.fn(q, k, v, segment_ids)
