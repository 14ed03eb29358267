"""Named settings of the `finetune` config section, the `:variant` presets
of the fine-tuning configs (comma-separated, applied in order by
`hybridna_jax.config.apply_variants`):

    configs/finetune_demo.py:rc_echo,frozen
"""

from __future__ import annotations

# Embedding and training choices; each sets a few finetune fields.
PRESETS = {
  "echo": {"finetune": dict(echo=True, rc_combine="none")},
  "rc_echo": {"finetune": dict(echo=True, rc_combine="average_logits")},
  "rc_echo_concat": {"finetune": dict(echo=True, rc_combine="concat_features")},
  "mean": {"finetune": dict(pool="mean")},
  "last": {"finetune": dict(pool="last")},
  "plain_mean": {"finetune": dict(echo=False, pool="mean", rc_combine="none")},
  "plain_last": {"finetune": dict(echo=False, pool="last", rc_combine="none")},
  "frozen": {"finetune": dict(freeze_backbone=True)},
  "full": {"finetune": dict(freeze_backbone=False)},
  "fresh": {"finetune": dict(pretrained="")},
  "balanced": {"finetune": dict(class_weights="balanced")},
  # A linear probe on frozen embeddings instead of training (finetune/probe.py;
  # score.pooling / score.layer / score.rc_average choose the embedding).
  "probe": {"finetune": dict(probe=True)},
}
