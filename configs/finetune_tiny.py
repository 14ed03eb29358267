"""Fine-tuning the tiny test model (configs/tiny.py): tests and quick runs.

    python -m hybridna_jax.finetune.example_tasks motif data_cache/tasks/motif
    python launch/finetune.py --config=configs/finetune_tiny.py \
        --task=data_cache/tasks/motif --workdir=runs/ft_tiny

Variants (comma-separated): echo (default), rc_echo, rc_echo_concat, mean,
last, plain_mean, plain_last, frozen, full, fresh, balanced, probe
(hybridna_jax/finetune/presets.py).
"""

import os

from hybridna_jax.config import apply_variants, load_config
from hybridna_jax.finetune.presets import PRESETS


def get_config(variant: str | None = None):
  cfg = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py"))
  f = cfg.finetune
  f.task = "data_cache/tasks/motif"
  f.batch_size = 32
  f.eval_batch_size = 64
  f.epochs = 4.0
  f.eval_every_epochs = 1.0
  f.pad_multiple = 16
  t = cfg.train
  t.learning_rate = 3e-3
  t.weight_decay = 0.01
  t.log_every = 10
  t.keep_checkpoints = 2
  return apply_variants(cfg, variant, PRESETS, __file__)
