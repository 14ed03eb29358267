"""The CPU main job: a small 8-layer HybriDNA (7 Mamba2 : 1 attention)
trained on real bacterial and phage genomes (scripts/fetch_example_genomes.sh)
through two context stages, with held-out strains for validation."""

from hybridna_jax.config import apply_variants, base_config, model_config_dict

# One strain per species, held out (scripts/example_genomes.py).
HELD_OUT = (
  "E_coli__MG1655-K12",
  "H_pylori__SJM180",
  "S_aureus__USA300_FPR3757",
  "V_cholerae__H1",
  "K_pneumoniae__MGH78578",
)

VARIANTS = {
  "quick": {  # a one-minute smoke run
    "train": dict(
      stages=((512, 20, 4), (1024, 10, 2)), eval_every=10, checkpoint_every=10, log_every=5
    ),
    "data": dict(eval_max_windows=16),
    "score": dict(context=1024, stride=512, variant_window=1024),
  },
}


def get_config(variant: str | None = None):
  cfg = base_config()
  cfg.model = model_config_dict(
    d_model=128,
    n_layers=8,
    mlp_dim=256,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    d_state=32,
    ssm_head_dim=32,
    chunk_size=64,
    dtype="float32",
  )

  cfg.data.fasta_globs = ("data_cache/genomes/*",)
  cfg.data.store_dir = "data_cache/example_store"
  cfg.data.split.val_sources = HELD_OUT
  cfg.data.eval_max_windows = 32  # spread over all five held-out genomes

  t = cfg.train
  t.stages = ((1024, 250, 8), (4096, 30, 2))  # 8k then 8k tokens per step
  t.learning_rate = 3e-3
  t.warmup_steps = 40
  t.log_every = 20
  t.eval_every = 125
  t.eval_batch_size = 8
  t.eval_seq_len = 4096
  t.checkpoint_every = 125
  t.markov_orders = (3, 5, 8)

  sc = cfg.score  # launch/eval.py and launch/score.py
  sc.context = 4096  # the last stage's length
  sc.stride = 2048  # every position sees >= 2048 nt of context
  sc.eval_max_tokens = 32_768  # per held-out record: a CPU-sized evaluation
  sc.variant_window = 2048
  sc.batch_size = 8
  return apply_variants(cfg, variant, VARIANTS, __file__)
