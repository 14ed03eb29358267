"""Sequence design on CPU: generative fine-tuning of the demo model on
synthetic cell-type-specific enhancers (scripts/make_design_demo.py), then
sampling 200 bp designs per cell type.

  python scripts/make_design_demo.py --out_dir=data_cache/design_demo
  python launch/generate.py --mode=finetune --config=configs/design_demo.py \\
      --workdir=runs/design_demo
  python launch/generate.py --mode=sample --workdir=runs/design_demo --num_samples=100

Variants:
  (none)    one condition, the cell type: a token per cell type
  bins      regLM-style activity classes: the `activity` column cut into 5
            quantile bins, a token per bin
  pretrained  start from the pretraining demo run (runs/demo; same model)
"""

import os

from hybridna_jax.config import apply_variants, base_config, load_config

_DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")

VARIANTS = {
  "bins": {"generate": dict(label_columns=("activity",), label_kind="bins", num_bins=5)},
  "pretrained": {"generate": dict(pretrained="runs/demo"), "train": dict(learning_rate=5e-4)},
}


def get_config(variant: str | None = None):
  cfg = base_config()
  cfg.model = load_config(_DEMO).model  # the demo model, so runs/demo can seed it
  cfg.mesh.num_devices = 1

  g = cfg.generate
  g.train_csv = "data_cache/design_demo/train.csv"
  g.val_csv = "data_cache/design_demo/val.csv"
  g.label_columns = ("label",)
  g.label_kind = "categorical"
  g.reverse_complement_prob = 0.5  # the planted motifs occur in both orientations
  g.max_new_tokens = 200
  g.num_samples = 100
  g.batch_size = 50
  g.temperature = 1.0

  t = cfg.train
  t.stages = ((256, 600, 16),)  # <bos> + label + 200 nt + <eos> fits in 256
  t.learning_rate = 2e-3
  t.warmup_steps = 50
  t.log_every = 25
  t.eval_every = 100
  t.eval_batch_size = 50
  t.checkpoint_every = 100
  t.markov_orders = ()
  return apply_variants(cfg, variant, VARIANTS, __file__)
