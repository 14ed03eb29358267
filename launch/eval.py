"""Evaluates a trained model: bits per nucleotide, perplexity and accuracy,
per record and overall, on FASTA files or on the held-out split.

    python launch/eval.py --workdir=runs/demo                    # held-out split
    python launch/eval.py --checkpoint=runs/demo/best            # its best step
    python launch/eval.py --workdir=runs/demo --fasta=genome.fa.gz \\
        --config=configs/demo.py --config.score.context=8192 --config.score.stride=2048

--workdir is the run to evaluate, or pass --checkpoint for a run,
checkpoints/, best/ or step directory (one of the two is needed). Settings
come from the `score` section of --config (default: the run's own
config.json): context (0: the trained context), stride (0: context // 2),
batch_size, dtype, eval_split, eval_max_records, eval_max_tokens. Long
records are scored in sliding windows so that every position is scored once
with at least context - stride tokens before it. Writes
<output_dir>/eval_<data>_ctx<C>_stride<S>_step<N>[_best][_bos][_<dtype>]
[_<weight dtype>weights][_max<R>rec][_max<T>tok].{json,txt,png} (default output_dir: <workdir>/eval,
or eval/ in the run directory of --checkpoint; <data>: <split>-<hash of the
token store's path or URL>, or <FASTA stem>-<hash of its path>, or
<n>fasta-<hash> for several; _best: a step of best/, whichever flag named
it), so that no evaluation overwrites another (one of another checkpoint or
store under the same name is refused before anything is scored), and prints
the table.
"""

import os

from absl import flags, logging

from hybridna_jax import launch_utils

launch_utils.define_flags(workdir_required=False, distributed=False)
flags.DEFINE_multi_string(
  "fasta",
  [],
  "FASTA file(s) to evaluate (default: the token "
  "store's score.eval_split split, from the config's data.store_dir).",
)
flags.DEFINE_string(
  "checkpoint",
  None,
  "Checkpoint to evaluate: a run, checkpoints/, best/ or step directory (default: --workdir; "
  "one of the two is needed).",
)
flags.DEFINE_enum("which", "latest", ["latest", "best"], "Checkpoint of a run directory.")
flags.DEFINE_string(
  "output_dir",
  None,
  "Where to write results (default: <workdir>/eval, or eval/ in the run directory of "
  "--checkpoint).",
)
FLAGS = flags.FLAGS


def main(argv):
  del argv  # flags only (launch_utils.run)
  launch_utils.quiet_library_logs()
  # Imported after flag parsing (nothing may touch devices before).
  from hybridna_jax import scoring  # pylint: disable=g-import-not-at-top
  from hybridna_jax.config import DataConfig, ScoreConfig  # pylint: disable=g-import-not-at-top
  from hybridna_jax.scoring import evaluation  # pylint: disable=g-import-not-at-top

  # `which` is where the step is (best/ or not), whichever flag named it.
  ref = launch_utils.named_checkpoint(FLAGS.checkpoint, FLAGS.workdir, FLAGS.which, "evaluate")
  # Checked before the (long) evaluation, which would otherwise be lost.
  output_dir = launch_utils.local_output(
    FLAGS.output_dir or os.path.join(FLAGS.workdir or ref.run_dir, "eval"), "--output_dir"
  )
  scorer, run_config = scoring.Scorer.from_run(ref.step_dir, FLAGS.config)
  config = FLAGS.config if FLAGS.config is not None else run_config
  section = ScoreConfig.of(config)
  max_records, max_tokens = section.eval_max_records, section.eval_max_tokens
  store = None
  if FLAGS.fasta:
    data = list(FLAGS.fasta)
  else:
    data = section.eval_split
    store = evaluation.store_identity(config.data.store_dir)
  stem = evaluation.output_stem(
    data,
    scorer.context,
    scorer.stride,
    ref.which,
    store=store,
    step=ref.step,
    add_bos=scorer.settings.add_bos,
    dtype=str(scorer.model_config.dtype),
    param_dtype=str(scorer.model_config.param_dtype),
    max_records=max_records,
    max_tokens=max_tokens,
  )
  evaluation.refuse_to_replace(output_dir, stem, checkpoint=scorer.checkpoint, store=store)
  if FLAGS.fasta:
    sequences = evaluation.fasta_sequences(
      data, max_records, max_tokens, allow_empty_records=DataConfig.of(config).allow_empty_records
    )
  else:
    sequences = evaluation.store_sequences(config.data.store_dir, data, max_records, max_tokens)
  evaluation.log_records(sequences)
  result = evaluation.evaluate(scorer, sequences, progress=scoring.ProgressLogger("windows"))
  result.update(
    checkpoint=scorer.checkpoint,  # the step directory restored
    which=ref.which,
    data=data,
    **({"store": store} if store is not None else {}),
    dtype=str(scorer.model_config.dtype),
    param_dtype=str(scorer.model_config.param_dtype),
    compiles=scorer.trace_count,
  )
  paths = evaluation.write(result, output_dir, stem)
  print(evaluation.format_table(result))
  logging.info("wrote %s", ", ".join(paths.values()))


if __name__ == "__main__":
  launch_utils.run(main)
