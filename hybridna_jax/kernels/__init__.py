"""Pallas, splash and cuDNN kernels, each beside the XLA reference it matches.

    ssd_pallas         the Pallas SSD (Triton on GPU, Mosaic on TPU)
    attention_kernels  splash (TPU), cuDNN and a Pallas Triton flash kernel
    sharded            shard_map wrappers: run a kernel per shard of the mesh

The kernels import the references (`hybridna_jax.ssd_reference`,
`hybridna_jax.attention_reference`), never the public ops. The public
modules `hybridna_jax.ssd` and `hybridna_jax.attention` name each kernel in
their tables (`CORES`, `KERNELS`) by module and function, imported on first
use; nothing here registers anything, and this package imports nothing.
"""
