"""Sequence design on CPU: generative fine-tuning of the demo model with one
prompt token per insulator protein (CTCF, BEAF-32, CP190, Su(Hw); 200 nt
centred on Bushey 2009 peaks of D. melanogaster chr2R), 200 nt designs per
protein, judged by a k-mer oracle fitted on held-out real peaks.

  bash scripts/fetch_real_task_data.sh
  python scripts/make_real_tasks.py design_insulators --out=data_cache/design_insulators
  python launch/generate.py --mode=finetune --config=configs/design_demo.py \\
      --workdir=runs/design_insulators
  python launch/generate.py --mode=sample --workdir=runs/design_insulators --num_samples=64

The sampling summary (designs.summary.json / .txt) holds the oracle's
report (hybridna_jax/design/oracle.py): the share of designs it assigns to
the requested protein, beside real held-out peaks, their dinucleotide
shuffles and chance.

Variants:
  (none)     the insulator design above
  synthetic  the fast demo: synthetic cell-type-specific enhancers
             (scripts/make_design_demo.py, planted motifs in lambda phage
             DNA, data_cache/design_demo), a token per cell type, no oracle
  bins       regLM-style activity classes of the synthetic data: its
             `activity` column cut into 5 quantile bins, a token per bin
  pretrained start from the pretraining demo run (runs/demo; same model)
  quick      a one-minute smoke run (30 steps, no oracle change)
"""

import os

from hybridna_jax.config import apply_variants, base_config, load_config

_DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")

_SYNTHETIC = dict(
  train_csv="data_cache/design_demo/train.csv",
  val_csv="data_cache/design_demo/val.csv",
  oracle_csv="",
  oracle_dev_csv="",
  test_csv="",
  num_samples=100,
  batch_size=50,
)

VARIANTS = {
  "synthetic": {"generate": _SYNTHETIC, "train": dict(stages=((256, 600, 16),), eval_every=100)},
  "bins": {
    "generate": dict(_SYNTHETIC, label_columns=("activity",), label_kind="bins", num_bins=5),
    "train": dict(stages=((256, 600, 16),), eval_every=100),
  },
  "pretrained": {"generate": dict(pretrained="runs/demo"), "train": dict(learning_rate=5e-4)},
  "quick": {
    "train": dict(
      stages=((256, 30, 8),), warmup_steps=5, log_every=10, eval_every=30, checkpoint_every=30
    ),
    "generate": dict(num_samples=16, batch_size=32),
  },
}


def get_config(variant: str | None = None):
  cfg = base_config()
  cfg.model = load_config(_DEMO).model  # the demo model, so runs/demo can seed it
  cfg.mesh.num_devices = 1

  g = cfg.generate
  data = "data_cache/design_insulators"
  g.train_csv = f"{data}/train.csv"  # block % 10 in 0-4 of chr2R
  g.val_csv = f"{data}/dev.csv"  # block 7: bits/nt and label gain
  g.oracle_csv = f"{data}/oracle.csv"  # blocks 5-6: the oracle's own rows
  g.oracle_dev_csv = f"{data}/dev.csv"  # its choice of k
  g.test_csv = f"{data}/test.csv"  # blocks 8-9: real held-out peaks
  g.label_columns = ("label",)
  g.label_kind = "categorical"
  g.reverse_complement_prob = 0.5  # random-strand windows; binding has no orientation here
  g.max_new_tokens = 200
  g.num_samples = 64
  g.batch_size = 64
  g.temperature = 1.0

  t = cfg.train
  t.stages = ((256, 400, 16),)  # <bos> + label + 200 nt + <eos> fits in 256
  t.learning_rate = 2e-3
  t.warmup_steps = 30
  t.log_every = 25
  t.eval_every = 50
  t.eval_batch_size = 50
  t.checkpoint_every = 50
  t.markov_orders = ()
  return apply_variants(cfg, variant, VARIANTS, __file__)
