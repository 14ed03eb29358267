"""Naming families: how a Hugging Face checkpoint's tensors and config.json
fields map to HybriDNA's parameters and ModelConfig.

One `Family` per naming convention. Each holds the tensor-name templates
(`names`) and a config translation; the tensor layouts (PyTorch Linear
weights are (out, in), Conv1d weights (channels, 1, width)) and how each
tensor splits into our parameters are shared, in `tensor_specs`:

    model.embed_tokens.weight          (V, d)          -> embed (V, d)
    lm_head.weight                     (V, d)          -> lm_head (d, V)  [untied only]
    model.final_layernorm.weight       (d,)            -> final_norm.scale
    model.layers.{i}.input_layernorm.weight   (d,)     -> layers.i.mixer_norm.scale
    model.layers.{i}.pre_ff_layernorm.weight  (d,)     -> layers.i.mlp_norm.scale
    model.layers.{i}.feed_forward.{gate,up,down}_proj.weight
                                       (F, d) (F, d) (d, F) -> mlp.wi_gate, wi_up, wo
    Mamba2 layers, prefix model.layers.{i}.mamba.:
      in_proj.weight   (di + (di + 2gn) + h, d) rows [z | x B C | dt]
                                       -> mixer.in_zx (d, 2, di) [z, x],
                                          in_bc (d, 2, gn) [B, C], in_dt (d, h)
      conv1d.weight    (di + 2gn, 1, K) channels [x | B | C]
                                       -> conv_x_weight (K, di), conv_bc_weight (K, 2, gn)
      conv1d.bias      (di + 2gn,)     -> conv_x_bias (di,), conv_bc_bias (2, gn)
      dt_bias, A_log, D (h,); norm.weight (di,) -> norm.scale; out_proj.weight (d, di)
    attention layers, prefix model.layers.{i}.self_attn.:
      q_proj (H hd, d), k_proj / v_proj (Hkv hd, d), o_proj (d, H hd)
                                       -> q (d, H, hd), k / v (d, Hkv, hd), o (H, hd, d)

Both directions are here (`to_ours` when loading, `to_hf` when exporting),
so import and export cannot drift apart. Verified against transformers'
modeling_bamba.py (BambaForCausalLM); the HybriDNA release's names follow
transformers' Jamba (the same names, read from its modeling_jamba.py) with
a Mamba2 mixer -- assumed from users' reports, see the README.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from hybridna_jax.config import ModelConfig

# -- Tensor layouts ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One checkpoint tensor: its expected shape, and the two conversions.

  to_ours(array) -> {our parameter path (relative): array}.
  to_hf(get) -> array, where get(relative path) is our parameter as numpy.
  """

  shape: tuple[int, ...]
  to_ours: Callable[[np.ndarray], dict[str, np.ndarray]]
  to_hf: Callable[[Callable[[str], np.ndarray]], np.ndarray]


def _direct(path: str, shape) -> TensorSpec:
  return TensorSpec(tuple(shape), lambda a: {path: a}, lambda get: get(path))


def _linear(path: str, d_in: int, out_shape, in_shape=None) -> TensorSpec:
  """A torch Linear weight (out, in) <-> our kernel in_shape + out_shape."""
  out_shape = tuple(int(n) for n in np.atleast_1d(out_shape))
  in_shape = tuple(int(n) for n in np.atleast_1d(in_shape if in_shape is not None else d_in))
  n_out = math.prod(out_shape)
  return TensorSpec(
    (n_out, math.prod(in_shape)),
    lambda a: {path: a.T.reshape(in_shape + out_shape)},
    lambda get: get(path).reshape(math.prod(in_shape), n_out).T,
  )


def _mamba_specs(cfg: ModelConfig, conv_bias: bool) -> dict[str, TensorSpec]:
  d, di, h, k = cfg.d_model, cfg.d_inner, cfg.ssm_heads, cfg.d_conv
  gn = cfg.ngroups * cfg.d_state
  conv_dim = di + 2 * gn

  def in_proj_to_ours(a):
    w = a.T  # (d, 2 di + 2 gn + h)
    z, x = w[:, :di], w[:, di : 2 * di]
    b, c = w[:, 2 * di : 2 * di + gn], w[:, 2 * di + gn : 2 * di + 2 * gn]
    return {
      "mixer.in_zx.kernel": np.stack([z, x], axis=1),
      "mixer.in_bc.kernel": np.stack([b, c], axis=1),
      "mixer.in_dt.kernel": w[:, 2 * di + 2 * gn :],
    }

  def in_proj_to_hf(get):
    zx, bc, dt = get("mixer.in_zx.kernel"), get("mixer.in_bc.kernel"), get("mixer.in_dt.kernel")
    return np.concatenate([zx[:, 0], zx[:, 1], bc[:, 0], bc[:, 1], dt], axis=1).T

  def conv_to_ours(a):
    w = a[:, 0, :].T  # (K, conv_dim)
    out = {
      "mixer.conv_x_weight": w[:, :di],
      "mixer.conv_bc_weight": np.stack([w[:, di : di + gn], w[:, di + gn :]], axis=1),
    }
    if not conv_bias:  # the checkpoint has no conv bias: ours is zero
      out["mixer.conv_x_bias"] = np.zeros((di,), a.dtype)
      out["mixer.conv_bc_bias"] = np.zeros((2, gn), a.dtype)
    return out

  def conv_to_hf(get):
    bc = get("mixer.conv_bc_weight")
    return np.concatenate([get("mixer.conv_x_weight"), bc[:, 0], bc[:, 1]], axis=1).T[:, None, :]

  specs = {
    "in_proj.weight": TensorSpec((2 * di + 2 * gn + h, d), in_proj_to_ours, in_proj_to_hf),
    "conv1d.weight": TensorSpec((conv_dim, 1, k), conv_to_ours, conv_to_hf),
    "dt_bias": _direct("mixer.dt_bias", (h,)),
    "A_log": _direct("mixer.A_log", (h,)),
    "D": _direct("mixer.D", (h,)),
    "norm.weight": _direct("mixer.norm.scale", (di,)),
    "out_proj.weight": _linear("mixer.out.kernel", di, d),
  }
  if conv_bias:
    specs["conv1d.bias"] = TensorSpec(
      (conv_dim,),
      lambda a: {"mixer.conv_x_bias": a[:di], "mixer.conv_bc_bias": a[di:].reshape(2, gn)},
      lambda get: np.concatenate(
        [get("mixer.conv_x_bias"), get("mixer.conv_bc_bias").reshape(-1)], axis=0
      ),
    )
  return specs


def _attention_specs(cfg: ModelConfig) -> dict[str, TensorSpec]:
  d, hd = cfg.d_model, cfg.head_dim
  return {
    "q_proj.weight": _linear("mixer.q.kernel", d, (cfg.num_heads, hd)),
    "k_proj.weight": _linear("mixer.k.kernel", d, (cfg.num_kv_heads, hd)),
    "v_proj.weight": _linear("mixer.v.kernel", d, (cfg.num_kv_heads, hd)),
    "o_proj.weight": _linear("mixer.o.kernel", None, d, in_shape=(cfg.num_heads, hd)),
  }


# -- Families ------------------------------------------------------------------

# Names of the pieces of a checkpoint; a family overrides what differs.
DEFAULT_NAMES = {
  "embed": "model.embed_tokens.weight",
  "final_norm": "model.final_layernorm.weight",
  "lm_head": "lm_head.weight",
  "layer": "model.layers.{i}.",
  "mixer_norm": "input_layernorm.weight",
  "mlp_norm": "pre_ff_layernorm.weight",
  "mlp": "feed_forward.",
  "mamba": "mamba.",
  "attention": "self_attn.",
}


@dataclasses.dataclass(frozen=True)
class Translation:
  """A config.json translated: ModelConfig fields, the config.json fields
  nothing reads (`unknown`), and settings we cannot reproduce (`problems`,
  each "field=value: why")."""

  fields: dict[str, Any]
  unknown: tuple[str, ...]
  problems: tuple[str, ...]
  conv_bias: bool = True


@dataclasses.dataclass(frozen=True)
class Family:
  """A naming family: tensor names and config.json translation."""

  name: str
  description: str
  names: Mapping[str, str]
  translate: Callable[[Mapping[str, Any]], Translation]
  to_hf_config: Callable[[ModelConfig], dict[str, Any]] | None = None

  def tensor_specs(
    self, cfg: ModelConfig, conv_bias: bool = True
  ) -> dict[str, tuple[str, TensorSpec]]:
    """{checkpoint tensor name: (our parameter path prefix, spec)}; our path
    is prefix + a key of spec.to_ours's result (dot-separated, loop layout)."""
    n = self.names
    d = cfg.d_model
    specs = {n["embed"]: ("", _direct("embed", (cfg.vocab_size, d)))}
    specs[n["final_norm"]] = ("", _direct("final_norm.scale", (d,)))
    if not cfg.tie_embeddings:
      specs[n["lm_head"]] = ("", _linear("lm_head", d, cfg.vocab_size))
    mamba, attention = _mamba_specs(cfg, conv_bias), _attention_specs(cfg)
    for i, kind in enumerate(cfg.layer_types):
      hf, ours = n["layer"].format(i=i), f"layers.{i}."
      layer = {
        n["mixer_norm"]: _direct("mixer_norm.scale", (d,)),
        n["mlp_norm"]: _direct("mlp_norm.scale", (d,)),
        n["mlp"] + "gate_proj.weight": _linear("mlp.wi_gate.kernel", d, cfg.mlp_dim),
        n["mlp"] + "up_proj.weight": _linear("mlp.wi_up.kernel", d, cfg.mlp_dim),
        n["mlp"] + "down_proj.weight": _linear("mlp.wo.kernel", cfg.mlp_dim, d),
      }
      mixer, table = (n["attention"], attention) if kind == "attention" else (n["mamba"], mamba)
      layer.update({mixer + name: spec for name, spec in table.items()})
      specs.update({hf + name: (ours, spec) for name, spec in layer.items()})
    return specs


def _value(config: Mapping[str, Any], key: str):
  """A config.json value with transformers' JSON encoding of non-finite
  floats ({"__float__": "Infinity"}) decoded."""
  v = config[key]
  if isinstance(v, dict) and "__float__" in v:
    return float(v["__float__"])
  if isinstance(v, list):
    return [float(x["__float__"]) if isinstance(x, dict) and "__float__" in x else x for x in v]
  return v


# config.json fields both families share, translated one to one.
_COMMON_FIELDS = {
  "vocab_size": "vocab_size",
  "hidden_size": "d_model",
  "num_hidden_layers": "n_layers",
  "intermediate_size": "mlp_dim",
  "num_attention_heads": "num_heads",
  "num_key_value_heads": "num_kv_heads",
  "head_dim": "head_dim",
  "rms_norm_eps": "norm_eps",
  "tie_word_embeddings": "tie_embeddings",
  "max_position_embeddings": "max_seq_len",
  "mamba_d_state": "d_state",
  "mamba_d_conv": "d_conv",
  "mamba_expand": "expand",
  "mamba_chunk_size": "chunk_size",
}
# Fields with no effect on the logits (training, generation, bookkeeping).
_IGNORED = {
  "architectures",
  "model_type",
  "dtype",
  "torch_dtype",
  "transformers_version",
  "initializer_range",
  "use_cache",
  "num_logits_to_keep",
  "pad_token_id",
  "bos_token_id",
  "eos_token_id",
  "sep_token_id",
  "mask_token_id",
  "unk_token_id",
  "attention_dropout",
  "z_loss_coefficient",
  "output_router_logits",
  "router_aux_loss_coef",
  "auto_map",
  "use_mamba_kernels",
  "tokenizer_class",
  "mamba_n_heads",  # checked against the tensors (A_log)
}
# Settings whose non-default values we cannot reproduce: (default, why).
_MUST_BE = {
  "hidden_act": ("silu", "the MLP and the Mamba2 conv use SiLU"),
  "mamba_proj_bias": (False, "in_proj/out_proj have no bias here"),
  "attention_bias": (False, "the attention projections have no bias here"),
  "mlp_bias": (False, "the MLP projections have no bias here"),
  "mamba_rmsnorm": (True, "the Mamba2 output always goes through the gated RMSNorm"),
  "mamba_norm_before_gate": (False, "the gate is applied before the norm here"),
  "num_experts": (1, "no mixture-of-experts layers here"),
  "sliding_window": (None, "attention is full causal here"),
}


# transformers' config defaults where they differ from ModelConfig's: what an
# absent (or null) config.json field means there (BambaConfig, JambaConfig,
# transformers 5.23). vocab_size is left out: the embedding's shape gives it.
_TRANSFORMERS_DEFAULTS = {
  "hidden_size": 4096,
  "num_hidden_layers": 32,
  "intermediate_size": 14336,
  "num_attention_heads": 32,
  "num_key_value_heads": 8,
  "max_position_embeddings": 262_144,
}
_BAMBA_DEFAULTS = {**_TRANSFORMERS_DEFAULTS, "mamba_d_state": 256}
# JambaConfig's for the Jamba-style family, but its mamba_d_state (16), which
# belongs to Jamba's Mamba1 mixer: an absent SSM state size is read from the
# tensors when the group count is stated, else it is an error
# (hf.checkpoint.model_config): guessing it can load the wrong groups.
_JAMBA_DEFAULTS = {**_TRANSFORMERS_DEFAULTS, "rms_norm_eps": 1e-6}


def _with_defaults(config: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
  """config.json as transformers reads it: null fields dropped, absent ones
  at the architecture's defaults; num_key_value_heads null means
  num_attention_heads (multi-head attention) and head_dim absent or null
  means hidden_size // num_attention_heads (stock configs never write it)."""
  filled = {**defaults, **{k: v for k, v in config.items() if v is not None}}
  if "num_key_value_heads" in config and config["num_key_value_heads"] is None:
    filled["num_key_value_heads"] = filled["num_attention_heads"]
  filled.setdefault("head_dim", filled["hidden_size"] // filled["num_attention_heads"])
  return filled


def _translate_common(config: Mapping[str, Any], own: set[str]) -> tuple[dict, list, list]:
  fields, problems = {}, []
  for hf, ours in _COMMON_FIELDS.items():
    if config.get(hf) is not None:
      fields[ours] = _value(config, hf)
  for hf, (default, why) in _MUST_BE.items():
    if hf in config and _value(config, hf) != default:
      problems.append(f"{hf}={_value(config, hf)!r}: {why} (only {default!r} loads)")
  limit = config.get("time_step_limit")
  if limit is not None and tuple(_value(config, "time_step_limit")) != (0.0, math.inf):
    problems.append(
      f"time_step_limit={list(_value(config, 'time_step_limit'))}: dt is not clamped here "
      "(only [0.0, inf] loads)"
    )
  known = set(_COMMON_FIELDS) | _IGNORED | set(_MUST_BE) | own | {"time_step_limit"}
  unknown = sorted(k for k in config if k not in known)
  return fields, unknown, problems


def _shortest_period(n_layers: int, attn_layers: tuple[int, ...]) -> int:
  """The shortest period (dividing n_layers) of the attention placement:
  model.attn_period, the block that `model.scan_layers` stacks, which
  otherwise falls back to the loop for a pattern not repeating every 8."""
  attn = set(attn_layers)
  return next(
    period
    for period in range(1, n_layers + 1)
    if n_layers % period == 0 and all((i in attn) == (i % period in attn) for i in range(n_layers))
  )


def _translate_bamba(config: Mapping[str, Any]) -> Translation:
  own = {"attn_layer_indices", "rope_parameters", "rope_theta", "mamba_d_head", "mamba_n_groups"}
  own |= {"mamba_conv_bias", "partial_rotary_factor", "rope_scaling"}
  config = _with_defaults(config, _BAMBA_DEFAULTS)
  fields, unknown, problems = _translate_common(config, own)
  fields["attn_layers"] = tuple(config.get("attn_layer_indices") or ())
  if isinstance(fields.get("n_layers"), int) and fields["n_layers"] >= 1:
    fields["attn_period"] = _shortest_period(fields["n_layers"], fields["attn_layers"])
  if config.get("mamba_d_head") not in (None, "auto"):
    fields["ssm_head_dim"] = config["mamba_d_head"]
  if config.get("mamba_n_groups") is not None:
    fields["ngroups"] = config["mamba_n_groups"]
  # transformers' Bamba always rotates half of each head (partial_rotary_factor
  # 0.5, hard-coded in BambaConfig), default rope type only. An older
  # config's rope_scaling ({"type": ...}) takes the place of rope_parameters,
  # as transformers' convert_rope_params_to_dict does.
  source = "rope_scaling" if config.get("rope_scaling") else "rope_parameters"
  rope = dict(config.get(source) or {})
  rope.setdefault("rope_type", rope.get("type", "default"))
  fields["rope"] = True
  fields["rope_fraction"] = float(rope.get("partial_rotary_factor", 0.5))
  fields["rope_theta"] = float(rope.get("rope_theta", config.get("rope_theta", 10_000.0)))
  if rope["rope_type"] != "default":
    if _is_identity_rope(rope):
      fields["rope"] = False  # our export of attention without RoPE
    else:
      problems.append(f"{source}.rope_type={rope['rope_type']!r}: only 'default' loads")
  conv_bias = bool(config.get("mamba_conv_bias", True))
  return Translation(fields, tuple(unknown), tuple(problems), conv_bias)


# Our export of attention without positional encoding: transformers' Bamba
# always rotates, so the rotation is made the identity by a "linear" RoPE
# scaling that divides every frequency by this factor (angles at position
# 131,072 stay below 1e-24 radians, far below float precision).
NO_ROPE_FACTOR = 1e30


def _is_identity_rope(rope: Mapping[str, Any]) -> bool:
  return rope.get("rope_type") == "linear" and float(rope.get("factor", 1)) >= NO_ROPE_FACTOR


# Mamba2 fields of a Jamba-style config: each name users or the reference
# implementations use for the same thing, the first present wins (transformers'
# Bamba/Jamba: mamba_d_state, mamba_n_groups; Mamba2: state_size, n_groups;
# NemotronH: ssm_state_size, mamba_head_dim, n_groups).
_JAMBA_ALIASES = {
  "ssm_head_dim": ("mamba_d_head", "mamba_headdim", "mamba_head_dim"),
  "ngroups": ("mamba_n_groups", "mamba_ngroups", "n_groups"),
  "d_state": ("mamba_d_state", "ssm_state_size", "state_size"),
}


def _translate_jamba(config: Mapping[str, Any]) -> Translation:
  aliases = {a for names in _JAMBA_ALIASES.values() for a in names}
  own = {"attn_layer_period", "attn_layer_offset", "expert_layer_period", "expert_layer_offset"}
  own |= {"mamba_conv_bias", "mamba_dt_rank", "num_experts_per_tok", "mamba_n_heads"} | aliases
  own |= {"use_rope", "position_embedding_type"}
  config = _with_defaults(config, _JAMBA_DEFAULTS)
  fields, unknown, problems = _translate_common(config, own)
  fields["attn_period"] = int(config.get("attn_layer_period", 8))
  fields["attn_offset"] = int(config.get("attn_layer_offset", 4))
  fields["attn_layers"] = None
  for ours, names in _JAMBA_ALIASES.items():
    for name in names:
      if config.get(name) not in (None, "auto"):
        fields[ours] = config[name]
        break
  fields["rope"] = False  # Jamba's attention has no positional encoding
  # A config that turns rotary positions on is refused: how its modelling
  # file would apply them (fraction, theta, layout) is not known here.
  position = str(config.get("position_embedding_type") or "none").lower()
  if config.get("use_rope") or position in ("rope", "rotary"):
    problems.append(
      f"use_rope={config.get('use_rope')!r}, position_embedding_type="
      f"{config.get('position_embedding_type')!r}: the Jamba-style family loads without "
      "positional encoding (only use_rope false and no rotary position_embedding_type load)"
    )
  conv_bias = bool(config.get("mamba_conv_bias", True))
  return Translation(fields, tuple(unknown), tuple(problems), conv_bias)


def _bamba_config(cfg: ModelConfig) -> dict[str, Any]:
  """transformers BambaConfig fields of a model (export)."""
  rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": 0.5}
  if not cfg.rope:
    rope.update(rope_type="linear", factor=NO_ROPE_FACTOR)
  return {
    "architectures": ["BambaForCausalLM"],
    "model_type": "bamba",
    **{hf: getattr(cfg, ours) for hf, ours in _COMMON_FIELDS.items()},
    "attn_layer_indices": [i for i, k in enumerate(cfg.layer_types) if k == "attention"],
    "mamba_n_heads": cfg.ssm_heads,
    "mamba_d_head": cfg.ssm_head_dim,
    "mamba_n_groups": cfg.ngroups,
    "mamba_conv_bias": True,
    "mamba_proj_bias": False,
    "attention_bias": False,
    "mlp_bias": False,
    "hidden_act": "silu",
    "rope_parameters": rope,
    "time_step_limit": [0.0, {"__float__": "Infinity"}],
  }


BAMBA = Family(
  "bamba",
  "transformers BambaForCausalLM (config model_type 'bamba')",
  DEFAULT_NAMES,
  _translate_bamba,
  _bamba_config,
)
HYBRIDNA_JAMBA = Family(
  "hybridna-jamba",
  "the HybriDNA release's Jamba-style names (attn_layer_period/offset, no RoPE)",
  DEFAULT_NAMES,
  _translate_jamba,
)
FAMILIES = {f.name: f for f in (BAMBA, HYBRIDNA_JAMBA)}


def detect_family(config: Mapping[str, Any], source: str = "config.json") -> Family:
  """The family of a config.json: model_type 'bamba' -> BAMBA; a Jamba-style
  config (attn_layer_period, or model_type jamba/hybridna) -> HYBRIDNA_JAMBA."""
  model_type = str(config.get("model_type", "")).lower()
  if model_type == "bamba":
    return BAMBA
  if "attn_layer_period" in config or model_type in ("jamba", "hybridna"):
    return HYBRIDNA_JAMBA
  raise ValueError(
    f"{source}: model_type {config.get('model_type')!r} is no known naming family; "
    "known: 'bamba' (BambaForCausalLM) and Jamba-style ('jamba'/'hybridna' or "
    "attn_layer_period set)."
  )
