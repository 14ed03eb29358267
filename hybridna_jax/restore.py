"""Restoring trained models: one call from a run directory or checkpoint to
a model on the devices you have now.

    model, tokenizer, config = hybridna_jax.restore.load("runs/demo")

`path` may be a run directory (config.json + checkpoints/), its checkpoints/
or best/ directory, one step directory (runs/demo/checkpoints/400), each local, file:// or gs://
(`hybridna_jax.paths`), or a
Hugging Face-format directory (config.json + model.safetensors or its
index; local or file://; hybridna_jax.hf), whose vocabulary is mapped to our token ids like
launch/convert.py's (our_vocab=None keeps the checkpoint's ids).
Parameters only are read (no optimizer state), cast to the requested dtype,
and placed on `mesh` by the model's logical-axis rules, so a checkpoint
written on 8 devices restores onto 1 and vice versa. A checkpoint written
with the other layer layout (`model.scan_layers`) is converted on restore.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from hybridna_jax import hf, paths, sharding, tokenizer
from hybridna_jax.config import (
  CHECKPOINT_WHICH,
  MODEL_RUNTIME_FIELDS,
  PLACEMENT_FIELDS,
  FinetuneConfig,
  ModelConfig,
)
from hybridna_jax.model import abstract_model, convert_params, same_param_layout
from hybridna_jax.train.checkpoint import (
  BEST_DIR,
  CHECKPOINT_DIR,
  CONFIG_FILE,
  CheckpointMismatchError,
  Checkpoints,
)


@dataclasses.dataclass(frozen=True)
class CheckpointRef:
  run_dir: str  # holds config.json (a local path or gs:// URL)
  manager_dir: str  # the Orbax CheckpointManager directory
  step: int

  @property
  def which(self) -> str:
    """'best' for a step of the run's best/ directory, else 'latest' (of
    checkpoints/, or of another directory of steps), whatever `which` the
    path was resolved with: --checkpoint=<run>/best restores a best step."""
    return "best" if os.path.basename(self.manager_dir.rstrip("/")) == BEST_DIR else "latest"

  @property
  def step_dir(self) -> str:
    """The step directory resolved (restoring it restores this very step,
    even if a newer one is saved meanwhile)."""
    return os.fspath(paths.join(self.manager_dir, str(self.step)))


def find_checkpoint(path: str, which: str = "latest") -> CheckpointRef:
  """Resolves a run directory, checkpoint directory or step directory.

  Args:
    which: "latest" or "best" when `path` is a run directory.
  """
  if which not in CHECKPOINT_WHICH:
    raise ValueError(f"which must be 'latest' or 'best', got {which!r}.")
  path = paths.checkpoint_path(path, flag="checkpoint path")
  if not path.exists():
    raise FileNotFoundError(f"no checkpoint or run directory at {path}.")
  # A step directory (a run directory may be named by a number too: its
  # config.json tells them apart).
  if re.fullmatch(r"\d+", path.name) and not (path / CONFIG_FILE).exists():
    manager_dir, step = path.parent, int(path.name)
  else:
    if hf.is_hf_dir(os.fspath(path)):
      raise FileNotFoundError(
        f"{path} is a Hugging Face directory, not a run; convert it once: python "
        f"launch/convert.py --input={path} --output=<run dir> (in Python, "
        "restore.load reads it directly)."
      )
    hf.check_safetensors(os.fspath(path))
    if (path / CONFIG_FILE).exists():
      manager_dir = path / (BEST_DIR if which == "best" else CHECKPOINT_DIR)
    elif (path / CHECKPOINT_DIR).is_dir() or (path / BEST_DIR).is_dir():
      raise FileNotFoundError(
        f"{path} looks like a run directory (it has checkpoints/ or best/) but has no "
        f"{CONFIG_FILE}, which holds the model settings; copy the {CONFIG_FILE} of the run "
        "(launch/train.py writes it once training starts) back into it."
      )
    else:
      manager_dir = path
    if not manager_dir.is_dir():
      hint = (
        " (best/ is written only with train.keep_best and evaluation, "
        "train.eval_every > 0; use which='latest')"
        if which == "best"
        else ""
      )
      raise FileNotFoundError(
        f"{path} has no {manager_dir.name}/ directory{hint}; "
        "pass a run directory, its checkpoints/ or a step directory."
      )
    step = Checkpoints(manager_dir, create=False).latest_step()
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint in {manager_dir}.")
  run_dir = manager_dir.parent
  if not (run_dir / CONFIG_FILE).exists():
    raise FileNotFoundError(
      f"{run_dir} has no {CONFIG_FILE}; it is not a run directory "
      "written by launch/train.py or launch/finetune.py."
    )
  return CheckpointRef(os.fspath(run_dir), os.fspath(manager_dir), step)


def run_config(run_dir: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(json.loads(paths.read_text(paths.join(run_dir, CONFIG_FILE))))


def default_mesh() -> Mesh:
  """All devices on the fsdp axis: parameters sharded, batch split."""
  return sharding.make_mesh(data=1, fsdp=-1, tensor=1)


def restore_params(
  ref: CheckpointRef,
  model_cfg: ModelConfig,
  mesh: Mesh,
  *,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
) -> nnx.State:
  """The LM parameters of a checkpoint, sharded over `mesh`, in the layer
  layout of `model_cfg` (converted when the run was written in another
  layout, as its config.json says: the other `scan_layers`, or blocks of
  another size when the same layers were placed through another
  attn_period)."""
  written_config = run_config(ref.run_dir)
  task = FinetuneConfig.of(written_config).task
  if task:
    raise ValueError(
      f"{ref.run_dir} is a fine-tuning run (task {task}): its checkpoints hold a backbone "
      "and a head; load it with hybridna_jax.finetune.task.load_finetuned(run_dir)."
    )
  # Lenient view: runs written before scan_layers existed read its default.
  written_model = ModelConfig.from_config(written_config.model, strict=False)
  written = dataclasses.replace(
    model_cfg, **{f: getattr(written_model, f) for f in ("scan_layers", *PLACEMENT_FIELDS)}
  )

  def abstract_params(cfg):
    _, abstract = nnx.split(abstract_model(cfg), nnx.Param)
    return abstract, sharding.state_shardings(abstract, mesh, rules)

  abstract, shardings = abstract_params(written)
  target = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )
  try:
    params = Checkpoints(ref.manager_dir, create=False).restore_params(ref.step, target)
  except CheckpointMismatchError as e:
    raise CheckpointMismatchError(
      f"{e} (the model settings come from {os.path.join(ref.run_dir, CONFIG_FILE)})"
    ) from None
  if same_param_layout(written, model_cfg):
    return params
  # Stack or unstack on the devices, straight into the target shardings.
  _, shardings = abstract_params(model_cfg)
  return jax.jit(lambda p: convert_params(p, model_cfg), out_shardings=shardings)(params)


# The runtime fields load() takes as keywords; `dtype` sets dtype and
# param_dtype together. scan_layers changes the parameter layout: restore
# converts.
_LOAD_OVERRIDES = tuple(f for f in MODEL_RUNTIME_FIELDS if f not in ("dtype", "param_dtype"))


def load(
  path: str,
  *,
  dtype: str | None = None,
  mesh: Mesh | None = None,
  which: str = "latest",
  our_vocab: int | None = 0,
  **runtime,
):
  """Loads a trained model.

  Args:
    path: run directory, checkpoints/ or best/ directory, step directory, or
      a Hugging Face-format directory, local or file:// (see
      hybridna_jax.hf.load).
    dtype: parameter and compute dtype, "float32" or "bfloat16" (default:
      as trained: fp32 weights, the config's compute dtype; fp32 for a
      Hugging Face directory).
    mesh: where to place the parameters (default: all devices, fsdp).
    which: "latest" or "best" for a run directory.
    our_vocab: for a Hugging Face directory, hf.load's our_vocab: 0 (default)
      maps its embedding and head rows to our token ids keeping every row,
      so hybridna_jax.tokenizer -- which the Scorer, fine-tuning and design
      encode with -- gives its scores; N in 10..128 keeps our ids 0..N-1;
      None keeps the checkpoint's ids (and returns its hf.VocabTokenizer).
      Ignored for run directories, which hold our ids.
    **runtime: runtime fields of the restored model (config.MODEL_RUNTIME_FIELDS
      but the dtypes: remat, ssd_impl, attention_impl, max_seq_len,
      scan_layers), e.g. attention_impl="xla" for the dense reference,
      or scan_layers=True/False for the other parameter
      layout (converted).

  Returns:
    (model, tokenizer, config) -- an nnx HybriDNA with its parameters on
    `mesh`, `hybridna_jax.tokenizer` (for a Hugging Face directory with
    our_vocab=None: a hf.VocabTokenizer of the checkpoint's ids, None
    without readable tokenizer files), and the run's config.
  """
  unknown = sorted(set(runtime) - set(_LOAD_OVERRIDES))
  if unknown:
    raise ValueError(
      f"load(): {unknown} cannot be changed at restore time; allowed: "
      f"{', '.join(_LOAD_OVERRIDES)} (and dtype)."
    )
  if hf.is_hf_dir(path):  # also a file:// URL (hf.checkpoint.local_dir)
    runtime = {k: v for k, v in runtime.items() if v not in (None, "")}
    return hf.load(path, dtype=dtype, mesh=mesh, our_vocab=our_vocab, **runtime)
  ref = find_checkpoint(path, which)
  config = run_config(ref.run_dir)
  model_cfg = ModelConfig.from_config(config.model)
  runtime = {k: v for k, v in runtime.items() if v not in (None, "")}
  if runtime:
    model_cfg = dataclasses.replace(model_cfg, **runtime)
  mesh = mesh or default_mesh()
  params = restore_params(ref, model_cfg, mesh)
  if dtype is not None:
    params = jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), params)
    model_cfg = dataclasses.replace(model_cfg, dtype=dtype, param_dtype=dtype)
  graphdef, _ = nnx.split(abstract_model(model_cfg), nnx.Param)
  model = nnx.merge(graphdef, params)
  return model, tokenizer, config
