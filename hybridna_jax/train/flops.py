"""Model FLOPs per token, for MFU: matmuls, attention and the SSD scan."""

from __future__ import annotations

import dataclasses
import re

import jax

from hybridna_jax.config import ModelConfig

# Dense bf16 peak FLOP/s per device, by names within jax's device_kind
# (whole words: "L4" is not "L40S"; first match wins, so specific names come
# before general ones).
PEAK_BF16_FLOPS = (
  ("H200 NVL", 835e12),
  ("H200", 989.4e12),
  ("GH200", 989.4e12),
  ("H100 PCIe", 756e12),
  ("H100 NVL", 835e12),
  ("H100", 989.4e12),
  ("A100", 312e12),
  ("L40S", 362e12),
  ("L40", 181e12),
  ("L4", 121e12),
  ("TPU v6", 918e12),
  ("TPU v5p", 459e12),
  ("TPU v5 lite", 197e12),  # v5e
  ("TPU v5e", 197e12),
  ("TPU v5", 459e12),  # jax names a v5p chip "TPU v5"
  ("TPU v4", 275e12),
)


def peak_flops_for_kind(kind: str) -> float | None:
  """Peak dense bf16 FLOP/s for a jax device_kind, or None if unknown."""
  for key, flops in PEAK_BF16_FLOPS:
    if re.search(rf"(?<![a-z0-9]){re.escape(key)}(?![a-z0-9])", kind, re.IGNORECASE):
      return flops
  return None


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
  """Peak dense bf16 FLOP/s of a device, or None if unknown (e.g. CPU)."""
  return peak_flops_for_kind((device or jax.devices()[0]).device_kind)


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """A device to plan a run for (launch/plan.py)."""

  device_kind: str  # as jax names it; finds the peak in PEAK_BF16_FLOPS
  memory_bytes: float  # the vendor's figure, in 1e9 bytes
  platform: str  # "gpu" or "tpu": which kernels a run there uses

  @property
  def peak_flops(self) -> float:
    return peak_flops_for_kind(self.device_kind)


ACCELERATORS = {
  "h100": Accelerator("NVIDIA H100 80GB HBM3", 80e9, "gpu"),
  "h200": Accelerator("NVIDIA H200", 141e9, "gpu"),
  "v5p": Accelerator("TPU v5p", 95e9, "tpu"),
  "v5e": Accelerator("TPU v5 lite", 16e9, "tpu"),
}


def forward_flops_per_token(
  cfg: ModelConfig, seq_len: int, lm_head: bool = True
) -> dict[str, float]:
  """Forward FLOPs per token, by part, at context `seq_len`.

  matmul: 2 x (weights used in matmuls), the LM head included unless
    `lm_head` is False (a fine-tuning head reads the hidden states).
  attention: QK^T and PV over a causal context (on average seq_len / 2 keys).
  ssd: the chunked scan per token: the intra-chunk C.B and (C.B) x products
    over the chunk (half of it is masked; counted whole, as kernels do the
    work), and the state update and readout (2 h p n each).
  """
  d, di, h, p, n, g = (
    cfg.d_model,
    cfg.d_inner,
    cfg.ssm_heads,
    cfg.ssm_head_dim,
    cfg.d_state,
    cfg.ngroups,
  )
  kinds = cfg.layer_types
  n_attn, n_mamba = kinds.count("attention"), kinds.count("mamba")
  mlp = 3 * d * cfg.mlp_dim
  attn_proj = d * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  mamba_proj = d * (2 * di + 2 * g * n + h) + di * d
  head = d * cfg.vocab_size if lm_head else 0
  matmul = 2 * (n_attn * (attn_proj + mlp) + n_mamba * (mamba_proj + mlp) + head)
  attention = n_attn * 2 * 2 * cfg.num_heads * cfg.head_dim * seq_len / 2
  q = min(cfg.chunk_size, seq_len)
  ssd = n_mamba * (2 * q * (g * n + h * p) + 4 * h * p * n)
  return {"matmul": float(matmul), "attention": float(attention), "ssd": float(ssd)}


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Forward + backward (3x forward); remat recomputation is not counted,
  as is usual for MFU."""
  return 3.0 * sum(forward_flops_per_token(cfg, seq_len).values())
