"""Genome data: FASTA -> token store -> Grain windows -> batches.

Modules:
  fasta     streaming FASTA reader (plain, gzip, bgzip, xz, bzip2)
  store     the token store (uint8 memory-mapped split files + record index)
  prepare   FASTA files -> train/val store (launch/prepare_data.py)
  pipeline  Grain training and evaluation batches, checkpointable iterator
  tasks     GUE-style CSV task folders
  textfiles numbered lines of plain or compressed text; CSV rows under a header
  config    default_data_config(), mounted as `config.data`
"""

from hybridna_jax.data.config import default_data_config
from hybridna_jax.data.store import TokenStore

__all__ = ["default_data_config", "TokenStore"]
