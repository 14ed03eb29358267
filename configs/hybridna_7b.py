"""HybriDNA-7B: hidden 4096, 32 layers, attention at 4, 12, 20, 28 (~6.3B)."""

from hybridna_jax.config import apply_variants, base_config, model_config_dict


def get_config(variant: str | None = None):
  cfg = base_config()
  cfg.model = model_config_dict(
    d_model=4096,
    n_layers=32,
    mlp_dim=8192,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    remat="full",
  )
  return apply_variants(cfg, variant, {}, __file__)  # no variants
