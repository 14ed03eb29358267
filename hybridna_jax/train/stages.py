"""The context-stage schedule of a run: `Stage`s of (sequence length,
optimizer steps, global batch size) parsed from config.train.stages, the
stage a step belongs to, and how a stage's batches lay out on the mesh."""

from __future__ import annotations

import dataclasses

from hybridna_jax import sharding
from hybridna_jax.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class Stage:
  index: int
  seq_len: int
  steps: int
  batch_size: int  # global
  start_step: int

  @property
  def end_step(self) -> int:
    return self.start_step + self.steps

  @property
  def label(self) -> str:
    return f"stage {self.index}: {self.seq_len:,} nt x {self.batch_size}"


def parse_stages(train) -> list[Stage]:
  """The context stages of the `train` section (a TrainConfig, or the
  ConfigDict, read through TrainConfig: a malformed stages field fails
  there with one line naming it)."""
  stages, start = [], 0
  for i, (seq_len, steps, batch) in enumerate(TrainConfig.from_config(train).stages):
    if seq_len < 1 or steps < 1 or batch < 1:
      raise ValueError(
        f"config.train.stages[{i}] = {(seq_len, steps, batch)!r}: all values must be positive."
      )
    stages.append(Stage(i, seq_len, steps, batch, start))
    start += steps
  if not stages:
    raise ValueError(
      "config.train.stages is empty; give at least one (seq_len, steps, global_batch_size)."
    )
  return stages


def stage_at(stages: list[Stage], step: int) -> Stage:
  """The stage that step `step` (0-based, the next one to run) belongs to."""
  for stage in stages:
    if step < stage.end_step:
      return stage
  return stages[-1]


def check_batch(
  stage: Stage, mesh, grad_accum: int, fields: tuple[str, str]
) -> sharding.BatchLayout:
  """This process's layout of the stage's (global batch, seq_len) batches;
  errors name the field to fix, `fields` = the config fields that set the
  (batch, seq_len) (`tasks.Task.stage_fields`). The batch need only divide by
  data x fsdp x grad_accum (not by the process count: processes whose
  devices are tensor or context partners load the same rows)."""
  batch_field, seq_len_field = fields
  data_devices = sharding.batch_shards(mesh)
  if stage.batch_size % (data_devices * grad_accum):
    raise ValueError(
      f"{batch_field}: global batch {stage.batch_size} is not divisible "
      f"by data x fsdp devices x grad_accum ({data_devices} x {grad_accum}); change the batch "
      "or config.mesh / config.train.grad_accum."
    )
  context = sharding.context_shards(mesh)
  if stage.seq_len % context:
    raise ValueError(
      f"{seq_len_field}: seq_len {stage.seq_len} is not divisible by "
      f"config.mesh.context={context}; change one of them."
    )
  return sharding.batch_layout(mesh, stage.batch_size, stage.seq_len)
