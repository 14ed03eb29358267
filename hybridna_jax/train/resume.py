"""What a run records and what a resume checks against it: the config a run
writes to <workdir>/config.json, and the refusals of a resume whose
architecture or data position does not fit the run's checkpoints."""

from __future__ import annotations

import json

import jax
import ml_collections
from absl import logging

from hybridna_jax import paths, sharding
from hybridna_jax.config import DataConfig, ModelConfig, architecture_differences
from hybridna_jax.model import describe_layout, same_param_layout
from hybridna_jax.train.checkpoint import CHECKPOINT_DIR, CONFIG_FILE, DataStateMismatchError


def written_config(workdir: str) -> dict | None:
  """<workdir>/config.json, the config the run was started with (None
  before the run wrote one)."""
  path = paths.join(workdir, CONFIG_FILE)
  return json.loads(path.read_text()) if path.exists() else None


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


def check_data_position(
  step: int, saved: list[int] | None, now: list[int], saved_workers: int = 0, workers: int = 0
) -> None:
  """Raises DataStateMismatchError unless a data position saved with
  `saved` = [rows per process, batch size] (`host_rows`; None: not
  recorded) and `saved_workers` (data.num_workers) means the same place in
  the stream under `now` and `workers`.

  Without workers the position counts this process's windows: its k-th is
  window (k // rows) * batch + (its k % rows-th row). That is the same
  window with the same rows and batch size, or when the process loads
  whole batches both times (then k is the window itself, at any batch
  size). Worker processes count the batches each was dealt, so they need
  the same worker count, rows and batch size. Anything else (a mesh,
  process count or worker count that changed) would silently repeat or
  skip batches.
  """
  if saved_workers != workers:
    raise DataStateMismatchError(
      f"step {step}'s data position was saved with data.num_workers={saved_workers}, "
      f"which counts batches per worker; this run has {workers}"
    )
  whole = saved is not None and saved[0] == saved[1] and now[0] == now[1] and not workers
  if saved is not None and list(saved) != list(now) and not whole:
    raise DataStateMismatchError(
      f"step {step}'s data position was saved loading {saved[0]} of {saved[1]} rows per batch "
      f"in each process, and this run loads {now[0]} of {now[1]}"
    )


def host_rows(layout: sharding.BatchLayout) -> list[int]:
  """[rows one process loads of each batch (the same on every process),
  batch size], as JSON."""
  return [int(len(layout.rows)), int(layout.batch_size)]


def flatten_config(values: dict, prefix: str = "") -> dict:
  """{"a.b.c": value} of nested dicts (a config's to_dict())."""
  flat = {}
  for key, value in values.items():
    if isinstance(value, dict):
      flat.update(flatten_config(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def data_state_error(
  config, workdir: str, error: DataStateMismatchError, written: dict | None
) -> ValueError:
  """The one-line error for a checkpoint whose data-iterator state does not
  fit this run's data loader (`Checkpoints.restore_data`): names the data
  fields that differ from `written` (<workdir>/config.json, e.g.
  data.num_workers) and the way out. Nothing was moved or written."""
  path = paths.join(workdir, CONFIG_FILE)
  changed = []
  if written is not None and "data" in written:
    try:
      before = flatten_config(DataConfig.of(written).to_dict(), "data.")
    except (ValueError, TypeError):
      before = {}  # not a data section this version reads
    now = flatten_config(DataConfig.from_config(config.data).to_dict(), "data.")
    changed = [f"{k}: {v!r} in the run, {now[k]!r} now" for k, v in before.items() if now[k] != v]
  if not changed:
    return ValueError(f"{error}; resume with the settings of {path}, or start a new --workdir.")
  return ValueError(
    f"{workdir} cannot resume with other data-loader settings ({'; '.join(changed)}): its "
    "checkpoint's data-iterator state does not fit them. Resume with the data settings of "
    f"{path}, or start the new settings in another --workdir."
  )


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
