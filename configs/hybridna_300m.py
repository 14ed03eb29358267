"""HybriDNA-300M: hidden 1024, 24 layers, attention at 4, 12, 20 (~0.30B)."""

from hybridna_jax.config import apply_variants, base_config, model_config_dict


def get_config(variant: str | None = None):
  cfg = base_config()
  cfg.model = model_config_dict(
    d_model=1024, n_layers=24, mlp_dim=2048, num_heads=16, num_kv_heads=4, head_dim=64
  )
  return apply_variants(cfg, variant, {}, __file__)  # no variants
