"""The CPU main job: a small 8-layer HybriDNA (7 Mamba2 : 1 attention)."""

from hybridna_jax.config import base_config, model_config_dict


def get_config(variant: str | None = None):
  cfg = base_config()
  cfg.model = model_config_dict(
      d_model=128, n_layers=8, mlp_dim=256,
      num_heads=4, num_kv_heads=2, head_dim=32,
      d_state=32, ssm_head_dim=32, chunk_size=64, dtype="float32")
  return cfg
