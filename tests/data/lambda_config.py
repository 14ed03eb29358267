"""A minimal job config for testing launch/prepare_data.py.

Its `data` field prepares the committed lambda phage genome; pass the output
with --config.data.store_dir=...
"""

import os

import ml_collections

from hybridna_jax.data.config import default_data_config

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.data = default_data_config()
  config.data.fasta_globs = (os.path.join(HERE, "lambda_virus.fa"),)
  config.data.progress_seconds = 0.0
  return config
