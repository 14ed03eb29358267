"""Genome data: FASTA -> token store -> Grain windows -> batches.

Modules:
  fasta     streaming FASTA reader (plain, gzip, bgzip, xz, bzip2)
  store     reading the token store (uint8 memory-mapped split files + record
            index, or zarr arrays at a URL)
  store_writer  writing it, locally or at a URL; export to zarr
  prepare   FASTA files -> train/val store (launch/prepare_data.py)
  windows   a split's windows: index, reading, batch dicts
  sampling  which window each training-stream position holds
  pipeline  Grain training and evaluation batches; a stream starts at any batch
  tasks     GUE-style CSV task folders
  textfiles numbered lines of plain or compressed text; CSV rows under a header
  config    default_data_config(), mounted as `config.data`
"""

from hybridna_jax.data.config import default_data_config
from hybridna_jax.data.store import TokenStore

__all__ = ["default_data_config", "TokenStore"]
