"""Fine-tuning the demo backbone (configs/demo.py, pretrained with
`launch/train.py --config=configs/demo.py --workdir=runs/demo`) on the
example species task built from the same genomes: 200-nt fragments labelled
by species, trained on the pretraining strains and tested on the held-out
strains the pretraining never saw.

    python -m hybridna_jax.finetune.example_tasks species data_cache/tasks/species
    python launch/finetune.py --config=configs/finetune_demo.py --workdir=runs/ft_species
    python launch/finetune.py --config=configs/finetune_demo.py:plain_mean,fresh \
        --workdir=runs/ft_species_plain_fresh

Variants (comma-separated): echo (default), rc_echo, rc_echo_concat, mean,
last, plain_mean, plain_last, frozen, full, fresh, balanced, probe (a linear
probe on frozen embeddings; hybridna_jax/finetune/presets.py), and quick (a
short smoke run).
"""

import os

from hybridna_jax.config import apply_variants, load_config
from hybridna_jax.finetune.presets import PRESETS

VARIANTS = {
  **PRESETS,
  "quick": {  # a short smoke run
    "finetune": dict(steps=20, eval_every_epochs=0.0),
    "train": dict(eval_every=10, checkpoint_every=10, log_every=5),
  },
}


def get_config(variant: str | None = None):
  cfg = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py"))
  f = cfg.finetune
  f.task = "data_cache/tasks/species"
  f.pretrained = "runs/demo"
  f.batch_size = 32
  f.eval_batch_size = 64
  f.epochs = 2.0
  f.eval_every_epochs = 0.25
  f.pad_multiple = 64
  t = cfg.train
  t.learning_rate = 1e-3
  t.weight_decay = 0.01
  t.log_every = 20
  t.keep_checkpoints = 2
  return apply_variants(cfg, variant, VARIANTS, __file__)
