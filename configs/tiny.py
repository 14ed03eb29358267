"""A tiny model for tests: 4 layers (Mamba2, Mamba2, attention, Mamba2), fp32."""

from hybridna_jax.config import apply_variants, base_config, model_config_dict


def get_config(variant: str | None = None):
  cfg = base_config()
  cfg.model = model_config_dict(
    d_model=32,
    n_layers=4,
    attn_period=4,
    attn_offset=2,
    mlp_dim=64,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    d_state=8,
    ssm_head_dim=8,
    chunk_size=16,
    dtype="float32",
  )
  return apply_variants(cfg, variant, {}, __file__)  # no variants
