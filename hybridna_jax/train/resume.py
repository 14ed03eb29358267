"""What a run records and what a resume checks against it: the config a run
writes to <workdir>/config.json, and the refusals of a resume whose
architecture does not fit the run's checkpoints, whose examples are not the
ones it was trained on, or whose data stream an earlier version made
another way."""

from __future__ import annotations

import json

import jax
import ml_collections
from absl import logging

from hybridna_jax import paths
from hybridna_jax.config import ModelConfig, architecture_differences
from hybridna_jax.data import pipeline
from hybridna_jax.model import describe_layout, same_param_layout
from hybridna_jax.train.checkpoint import CHECKPOINT_DIR, CONFIG_FILE
from hybridna_jax.train.stages import Stage


def written_config(workdir: str) -> dict | None:
  """<workdir>/config.json, the config the run was started with (None
  before the run wrote one)."""
  path = paths.join(workdir, CONFIG_FILE)
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(
      f"{path} is not valid JSON ({e}); restore it from a copy, or delete it to resume under "
      "this config."
    ) from e


def resumed_config(workdir: str) -> dict | None:
  """<workdir>/config.json when the run has a checkpoint to resume from
  (None otherwise: a new run)."""
  checkpoints = paths.join(workdir, CHECKPOINT_DIR)
  if not checkpoints.is_dir() or not any(p.name.isdigit() for p in checkpoints.iterdir()):
    return None
  return written_config(workdir)


def check_resume_config(config, workdir: str) -> None:
  """Refuses to resume a run of another architecture: raises ValueError
  naming every model field that differs from <workdir>/config.json, when
  that file and a checkpoint exist."""
  if "model" not in config:
    return
  written = resumed_config(workdir)
  if written is None or "model" not in written:
    return
  try:
    before = ModelConfig.from_config(ml_collections.ConfigDict(written["model"]), strict=False)
  except (ValueError, TypeError):
    return  # not a model section this version reads; check_fits still guards the arrays
  now = ModelConfig.from_config(config.model)
  diff = architecture_differences(before, now)
  if diff:
    fields = "; ".join(f"model.{k}: {a!r} in the run, {b!r} now" for k, (a, b) in diff.items())
    raise ValueError(
      f"{workdir} holds a run of another architecture ({fields}); resume it with the "
      f"model settings of {paths.join(workdir, CONFIG_FILE)}, or start the new model in "
      "another --workdir."
    )
  # A runtime field, but it decides the checkpoints' layout, which a resume
  # restores as written (restore.load converts, for inference only).
  if not same_param_layout(before, now):
    placement = ("scan_layers", "attn_period") + (
      ("attn_offset",) if before.attn_layers is None else ("attn_layers",)
    )
    settings = " ".join(
      f"--config.model.{f}={getattr(before, f)!r}".replace(" ", "") for f in placement
    )
    raise ValueError(
      f"{workdir}'s checkpoints (optimizer state included) hold the layers "
      f"{describe_layout(before)}, this config {describe_layout(now)}; resume with the run's "
      f"{settings} (restore.load converts them for evaluation and scoring)."
    )


def check_stream_position(
  meta: dict, stage: Stage, batch_field: str, written: dict | None, workdir: str, lm: bool
) -> None:
  """Refuses to continue a stage's stream mid-stage where the step's global
  batch is not where the checkpointed run was: the stage's batch size,
  first step or window length changed (meta "batch_size", "stage_start" and
  "seq_len"; `batch_field` names the batch in the config), or (`lm`, pretraining) an earlier version
  made the stream with worker processes (meta "stream_format" before
  `pipeline.STREAM_FORMAT` 2, which grouped windows into batches another
  way). Either would re-read or skip windows. `written`: the run's
  config.json."""
  step = int(meta.get("step", 0))
  if step == stage.start_step or step >= stage.end_step:
    return  # a stage starts here: its stream from batch 0
  saved_batch = meta.get("batch_size") or (meta.get("host_rows") or [None, None])[1]
  saved_len = meta.get("seq_len")  # the window length too: another one is another stream
  saved = (meta.get("stage"), meta.get("stage_start", stage.start_step), saved_batch, saved_len)
  now = (
    stage.index,
    stage.start_step,
    saved_batch and stage.batch_size,
    saved_len and stage.seq_len,
  )
  if saved != now:
    was = (
      f"stage {saved[0]} from step {saved[1]}, in batches of {saved_batch or '?'} x "
      f"{saved_len or '?'} tokens"
    )
    raise ValueError(
      f"{workdir}: step {step} was in {was}; this config puts it in stage {stage.index} from "
      f"step {stage.start_step}, in batches of {stage.batch_size} x {stage.seq_len} tokens "
      f"({batch_field}), whose stream would re-read or skip windows. Resume with the stages as "
      "they were, change them from the end of the step's stage on, or start the new schedule "
      "in another --workdir."
    )
  workers = ((written or {}).get("data") or {}).get("num_workers", 0)
  if lm and workers and meta.get("stream_format", 1) < pipeline.STREAM_FORMAT:
    raise ValueError(
      f"{workdir}: the data position of step {step} (data.num_workers={workers}) was "
      "saved by an earlier version, which grouped each batch's windows differently; finish "
      "the run with that version, or start it again in another --workdir."
    )


def check_same_examples(
  meta: dict,
  digest: str | None,
  config,
  fields: tuple[str, ...],
  written: dict | None,
  workdir: str,
) -> None:
  """Refuses to resume on other examples than the checkpoint was trained
  on (`Task.examples_digest`, kept in its meta as "examples_sha256"): the
  run would mix two tasks, or report one's model as the other's results.
  `fields` name the examples in `config`; `written` is the run's
  config.json (to say which of them changed)."""
  saved = meta.get("examples_sha256")
  if digest is None or saved is None or saved == digest:
    return
  before = flatten_config(written or {})
  now = flatten_config(json.loads(config.to_json_best_effort()))  # tuples as lists, as written
  changed = [
    f"{f}: {before.get(f)!r} in the run, {now.get(f)!r} now"
    for f in fields
    if before.get(f) != now.get(f)
  ]
  what = "; ".join(changed) or f"the files {', '.join(fields)} name changed since"
  raise ValueError(
    f"{workdir} was trained on other examples than this config gives ({what}); give this "
    "task its own --workdir, or resume with the examples the run was trained on."
  )


def flatten_config(values: dict, prefix: str = "") -> dict:
  """{"a.b.c": value} of nested dicts (a config's to_dict())."""
  flat = {}
  for key, value in values.items():
    if isinstance(value, dict):
      flat.update(flatten_config(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def write_config(
  config, workdir: str, resumed_step: int | None = None, before: dict | None = None
) -> None:
  """Writes <workdir>/config.json. A run resumed (at `resumed_step`) under
  other settings than `before` (the config.json it had) keeps that config as
  config.step<N>.json, and the fields that changed are logged."""
  if jax.process_index() != 0:
    return
  text = config.to_json_best_effort(indent=2)
  if resumed_step is not None and before is not None:
    old, new = flatten_config(before), flatten_config(json.loads(text))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if changed:
      kept = paths.join(workdir, f"config.step{resumed_step}.json")
      paths.write_json(kept, before)
      logging.warning(
        "resumed at step %d with other settings (%s); the earlier config is kept as %s.",
        resumed_step,
        ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:8])
        + (f", {len(changed) - 8} more" if len(changed) > 8 else ""),
        kept,
      )
  paths.write_text(paths.join(workdir, CONFIG_FILE), text)
