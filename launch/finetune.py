r"""Fine-tunes HybriDNA on understanding tasks with echo embeddings.

One task (GUE folder, Nucleotide Transformer folder, or BED + reference):

    python launch/finetune.py --config=configs/finetune_demo.py \
        --task=data_cache/tasks/species --workdir=runs/ft_species
    python launch/finetune.py --config=configs/finetune_demo.py:rc_echo,frozen \
        --task=bend/enhancers.bed --reference=GRCh38.fa --workdir=runs/ft_enh

A suite (globs allowed; one run directory per task under --workdir, one
table for all):

    python launch/finetune.py --config=configs/finetune_demo.py \
        --task_suite='GUE/prom/*,GUE/tf/*' --workdir=runs/gue

Each run checkpoints to <workdir>/checkpoints and resumes from there when
started again; the best dev checkpoint (MCC, or Pearson for regression) is
kept in <workdir>/best and reported on test in results.json / results.md,
with test_predictions.csv and finetune_curves.png. A suite adds
suite_results.json, suite_table.md and suite_scores.png; finished tasks are
not re-run. SIGTERM (preemption) saves the running task's checkpoint and
stops (a suite writes its files for the tasks finished so far), with
"stopped": "preempted" in <workdir>/finetune_summary.json; starting it again
resumes. Variants of the configs choose the embedding (echo, rc_echo,
rc_echo_concat, mean, last, plain_mean, plain_last) and frozen / full
fine-tuning; any field can be overridden, e.g.
--config.finetune.pretrained=runs/demo --config.finetune.epochs=5.

Every result carries its baselines (GC content, a k-mer and a
per-position one-hot logistic regression on the same train split) and
says whether the model beats them.
The `probe` variant trains nothing: a linear probe on frozen embeddings
(score.pooling mean | last | echo, score.layer, score.rc_average):

    python launch/finetune.py --config=configs/finetune_demo.py:probe \
        --config.score.pooling=echo --config.score.layer=-1 --workdir=runs/probe
"""

import json
import os
import sys

from absl import app, flags, logging

from hybridna_jax import launch_utils, paths

launch_utils.define_flags(config_required=True)
_TASK = flags.DEFINE_string(
  "task", None, "Task folder or BED file (overrides config.finetune.task)."
)
_REFERENCE = flags.DEFINE_string(
  "reference", None, "Reference FASTA of a BED task (overrides config.finetune.reference)."
)
_PRETRAINED = flags.DEFINE_string(
  "pretrained",
  None,
  "Pretraining run directory or "
  "checkpoint (overrides config.finetune.pretrained); "
  "'' for a freshly initialised backbone.",
)
_SUITE = flags.DEFINE_list(
  "task_suite",
  None,
  "Comma-separated task folders / BED files "
  "or glob patterns: fine-tune on each and write one table.",
)
FLAGS = flags.FLAGS


def main(argv):
  del argv  # flags only (launch_utils.run)
  launch_utils.quiet_library_logs()
  launch_utils.initialize_distributed()
  # Imported after distributed start-up (nothing may touch devices before).
  import jax  # pylint: disable=g-import-not-at-top

  from hybridna_jax.finetune import datasets  # pylint: disable=g-import-not-at-top
  from hybridna_jax.finetune import task as task_lib  # pylint: disable=g-import-not-at-top

  config = FLAGS.config
  if "finetune" not in config:
    raise app.UsageError("the config has no `finetune` section; use configs/finetune_*.py.")
  fc = config.finetune
  for flag, field in ((_TASK, "task"), (_REFERENCE, "reference"), (_PRETRAINED, "pretrained")):
    if flag.value is not None:
      fc[field] = flag.value
  if _SUITE.value and _TASK.value:
    raise app.UsageError("give --task or --task_suite, not both.")
  try:
    if _SUITE.value:
      summary = task_lib.run_suite(config, _SUITE.value, FLAGS.workdir)
    else:
      summary = task_lib.finetune(config, FLAGS.workdir)
  except (FileNotFoundError, datasets.TaskFormatError) as e:  # bad input: the message says it
    logging.error("finetune failed: %s", e)
    sys.exit(1)
  if jax.process_index() == 0:
    paths.write_json(os.path.join(FLAGS.workdir, "finetune_summary.json"), summary)
    # As launch/train.py: a preempted run (or suite) saved its checkpoint and
    # ends normally, saying so; starting it again resumes.
    done = ("steps", "stopped", "preempted_task")
    logging.info("done: %s", json.dumps({k: summary[k] for k in done if k in summary}))


if __name__ == "__main__":
  launch_utils.run(main, record_sigterm=True)  # SIGTERM while starting: a checkpoint
