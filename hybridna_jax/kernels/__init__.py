"""Pallas, splash and cuDNN kernels, registered into the kernel registries.

Imported lazily by `hybridna_jax.kernel_registry` on the first `resolve`.
Every kernel is wrapped by `sharded` so that, under an active mesh
(`sharding.activate`), it runs per shard inside `jax.shard_map`.

SSD cores (`ssd.CORES`, config `ssd_impl`):

* ``pallas``: the Pallas SSD for the default backend: Triton kernels on GPU,
  Mosaic kernels on TPU (auto on both); on CPU the Triton variant in
  interpret mode (slow; for debugging).
* ``pallas_gpu``, ``pallas_tpu``: one variant explicitly (e.g. to lower for
  another platform with `jax.export`).
* ``pallas_gpu_interpret``, ``pallas_tpu_interpret``: the variants on CPU
  (Triton interpret mode / Pallas' TPU interpret mode), for tests.

Attention kernels (`attention.KERNELS`, config `attention_impl`):

* ``splash``: splash attention (auto on TPU); ``splash_interpret`` runs it
  in TPU interpret mode.
* ``flash_gpu``: cuDNN when it applies (no segment ids, bf16/fp16), else
  ``pallas_gpu`` (auto on GPU).
* ``cudnn``: jax.nn.dot_product_attention(implementation="cudnn"), no
  segment ids.
* ``pallas_gpu``: the Pallas Triton flash kernel; ``pallas_gpu_interpret``
  runs it on CPU.
"""

import functools

import jax

from hybridna_jax import attention
from hybridna_jax import ssd
from hybridna_jax.kernels import attention_kernels
from hybridna_jax.kernels import sharded
from hybridna_jax.kernels import ssd_pallas

_SSD_VARIANTS = {
    "gpu": ssd_pallas.make_core(ssd_pallas.SsdKernelConfig(platform="gpu")),
    "tpu": ssd_pallas.make_core(ssd_pallas.SsdKernelConfig(platform="tpu")),
}
_SSD_INTERPRET = {
    platform: ssd_pallas.make_core(
        ssd_pallas.SsdKernelConfig(platform=platform, interpret=True))
    for platform in ("gpu", "tpu")
}


def _pallas_ssd_for_backend(inputs, chunk_size):
  backend = jax.default_backend()
  if backend in _SSD_VARIANTS:
    return _SSD_VARIANTS[backend](inputs, chunk_size)
  return _SSD_INTERPRET["gpu"](inputs, chunk_size)


ssd.CORES.register("pallas", sharded.shard_ssd_core(_pallas_ssd_for_backend),
                   auto_platforms=("gpu", "tpu"))
for _platform in ("gpu", "tpu"):
  ssd.CORES.register(f"pallas_{_platform}",
                     sharded.shard_ssd_core(_SSD_VARIANTS[_platform]))
  ssd.CORES.register(f"pallas_{_platform}_interpret",
                     sharded.shard_ssd_core(_SSD_INTERPRET[_platform]))

_FLASH_INTERPRET = attention_kernels.FlashConfig(interpret=True)
attention.KERNELS.register(
    "splash", sharded.shard_attention(attention_kernels.splash_attention),
    auto_platforms=("tpu",))
attention.KERNELS.register(
    "flash_gpu", sharded.shard_attention(attention_kernels.gpu_attention),
    auto_platforms=("gpu",))
attention.KERNELS.register(
    "cudnn", sharded.shard_attention(attention_kernels.cudnn_attention))
attention.KERNELS.register(
    "pallas_gpu", sharded.shard_attention(attention_kernels.flash_attention))
attention.KERNELS.register(
    "pallas_gpu_interpret", sharded.shard_attention(functools.partial(
        attention_kernels.flash_attention, config=_FLASH_INTERPRET)))
attention.KERNELS.register(
    "splash_interpret", sharded.shard_attention(functools.partial(
        attention_kernels.splash_attention, interpret=True)))
