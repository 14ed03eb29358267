"""Named settings of the `finetune` config section, for `:variant` suffixes
of the fine-tuning configs (comma-separated, applied in order):

    configs/finetune_demo.py:rc_echo,frozen
"""

from __future__ import annotations

# Embedding and training choices; each sets a few finetune fields.
VARIANTS = {
    "echo": dict(echo=True, rc_combine="none"),
    "rc_echo": dict(echo=True, rc_combine="average_logits"),
    "rc_echo_concat": dict(echo=True, rc_combine="concat_features"),
    "mean": dict(pool="mean"),
    "last": dict(pool="last"),
    "plain_mean": dict(echo=False, pool="mean", rc_combine="none"),
    "plain_last": dict(echo=False, pool="last", rc_combine="none"),
    "frozen": dict(freeze_backbone=True),
    "full": dict(freeze_backbone=False),
    "fresh": dict(pretrained=""),
    "balanced": dict(class_weights="balanced"),
}


def apply_variants(cfg, variant: str | None, extra: dict | None = None) -> None:
  """Applies comma-separated variant names to cfg.finetune. `extra` maps
  config-specific names to functions of cfg."""
  for name in filter(None, (v.strip() for v in (variant or "").split(","))):
    if extra and name in extra:
      extra[name](cfg)
    elif name in VARIANTS:
      for key, value in VARIANTS[name].items():
        cfg.finetune[key] = value
    else:
      known = sorted(VARIANTS) + sorted(extra or {})
      raise ValueError(f"unknown config variant {name!r}; known: {', '.join(known)}.")
