"""Sequence design: generative fine-tuning with prompt tokens, and sampling.

Fine-tune (regLM-style label tokens; the same train step, checkpoints,
preemption handling and metrics as pretraining):

  python launch/generate.py --mode=finetune --config=configs/design_demo.py \\
      --workdir=runs/design_demo

Design sequences from a fine-tuned run (or any checkpoint; a pretrained LM
takes a --prefix instead of labels):

  python launch/generate.py --mode=sample --workdir=runs/design_demo \\
      --labels=HepG2 --labels=K562 --num_samples=100 --temperature=0.8 --top_k=3

  --labels, repeatable: "HepG2" (one condition), "4,0,1" (labels in column
  order), "HepG2=4,K562=0" (by column) or "unconditional"; none given:
  every label combination. Sampling settings default to the --config's
  `generate` section, else the run's own; the flags below override them.

--checkpoint (a run, checkpoints/, best/ or step directory) may replace
--workdir in sample mode. Writes <workdir>/designs.fasta (with --checkpoint
alone, designs.fasta in its run directory; or --output; an existing one, or
existing summaries of the same name, are refused unless --overwrite) with the
prompt and settings in every header, and next to it .summary.json /
.summary.txt (GC content, 6-mer spectrum distance to the training sequences
of each label, mean pairwise edit distance, share of exact training copies)
and .summary.png.

Judged by an oracle when config.generate.oracle_csv, oracle_dev_csv and
test_csv are set (or --oracle_csv --oracle_dev_csv --test_csv): a k-mer
logistic regression fitted on real sequences the generator never saw
(hybridna_jax/design/oracle.py); the summary then holds "oracle": the share
of designs it assigns to their requested label, beside the same share for
real held-out test sequences, for their dinucleotide shuffles, and chance.
"""

import json
import os

from absl import app, flags, logging

from hybridna_jax import launch_utils, paths
from hybridna_jax.train import startup_signal

launch_utils.define_flags(workdir_required=False)
flags.DEFINE_enum(
  "mode",
  "sample",
  ["finetune", "sample"],
  "finetune: train on config.generate.train_csv; sample: design sequences.",
)
flags.DEFINE_string(
  "checkpoint",
  None,
  "sample: run directory, checkpoints/ or best/ directory, or step directory (default: --workdir; "
  "one of the two is needed).",
)
flags.DEFINE_enum(
  "which", "latest", ["latest", "best"], "sample: which checkpoint of a run directory."
)
flags.DEFINE_multi_string("labels", [], "sample: a prompt's labels (repeatable).")
flags.DEFINE_string("prefix", "", "sample: DNA the designs start with (after the labels).")
flags.DEFINE_integer("num_samples", None, "sample: designs per prompt.")
flags.DEFINE_integer("batch_size", None, "sample: rows generated at once.")
flags.DEFINE_integer("length", None, "sample: new nucleotides (the cap with --stop_at_eos).")
flags.DEFINE_bool("stop_at_eos", None, "sample: end a design at <eos>.")
flags.DEFINE_integer("min_length", None, "sample: no <eos> before this many nucleotides.")
flags.DEFINE_float("temperature", None, "sample: softmax temperature (0: greedy).")
flags.DEFINE_integer("top_k", None, "sample: keep the k most likely tokens (0: all).")
flags.DEFINE_float("top_p", None, "sample: nucleus mass (1: all).")
flags.DEFINE_integer("beam_width", None, "sample: > 1 runs beam search.")
flags.DEFINE_float("length_penalty", None, "sample: beam score = log-prob / len ** this.")
flags.DEFINE_bool("allow_n", None, "sample: allow N in designs.")
flags.DEFINE_integer("seed", None, "sample: random seed, in [0, 2**32).")
flags.DEFINE_string(
  "output",
  None,
  "sample: FASTA path (default <workdir>/designs.fasta, or designs.fasta in the run directory "
  "of --checkpoint).",
)
flags.DEFINE_bool(
  "overwrite", False, "sample: replace an existing --output FASTA and its summaries."
)
flags.DEFINE_string(
  "reference_csv",
  None,
  "sample: training CSV for the summary (default: the run's generate.train_csv).",
)
flags.DEFINE_string(
  "oracle_csv", None, "sample: the oracle's training CSV (default: config.generate.oracle_csv)."
)
flags.DEFINE_string(
  "oracle_dev_csv",
  None,
  "sample: the oracle's dev CSV, for its k (config.generate.oracle_dev_csv).",
)
flags.DEFINE_string(
  "test_csv", None, "sample: real held-out CSV the oracle compares with (config.generate.test_csv)."
)
FLAGS = flags.FLAGS


def main(argv):
  del argv  # flags only (launch_utils.run)
  if FLAGS.mode == "finetune":
    startup_signal.catch()  # a SIGTERM from here on stops the run with a checkpoint
  launch_utils.quiet_library_logs()
  launch_utils.initialize_distributed()
  import jax  # pylint: disable=g-import-not-at-top

  if FLAGS.mode == "finetune":
    from hybridna_jax import design  # pylint: disable=g-import-not-at-top

    if FLAGS.config is None:
      raise app.UsageError("--mode=finetune needs --config (e.g. configs/design_demo.py).")
    if FLAGS.workdir is None:
      raise app.UsageError("--mode=finetune needs --workdir (the run directory to write).")
    summary = design.finetune(FLAGS.config, FLAGS.workdir)
    if jax.process_index() == 0:
      paths.write_json(os.path.join(FLAGS.workdir, "train_summary.json"), summary)
      logging.info(
        "done: %s",
        json.dumps({k: summary.get(k) for k in ("steps", "stopped", "final_val")}, default=str),
      )
    return

  from hybridna_jax.design import sampling as design_sampling  # pylint: disable=g-import-not-at-top

  ref = launch_utils.named_checkpoint(FLAGS.checkpoint, FLAGS.workdir, FLAGS.which, "sample")
  # Without --workdir, outputs go to the checkpoint's run directory.
  output = launch_utils.local_output(
    FLAGS.output or os.path.join(FLAGS.workdir or ref.run_dir, "designs.fasta"), "--output"
  )
  existing = [f for f in design_sampling.output_files(output) if os.path.exists(f)]
  if existing and not FLAGS.overwrite:
    raise app.UsageError(
      f"{existing[0]} exists (an earlier sampling run's); pass another --output, "
      "or --overwrite to replace that run's FASTA and summaries."
    )
  result = design_sampling.run_sampling(
    ref.step_dir,  # the step resolved above
    output,
    config=FLAGS.config,
    label_specs=FLAGS.labels,
    prefix=FLAGS.prefix.strip().upper(),
    reference_csv=FLAGS.reference_csv,
    num_samples=FLAGS.num_samples,
    batch_size=FLAGS.batch_size,
    seed=FLAGS.seed,
    max_new_tokens=FLAGS.length,
    stop_at_eos=FLAGS.stop_at_eos,
    min_new_tokens=FLAGS.min_length,
    temperature=FLAGS.temperature,
    top_k=FLAGS.top_k,
    top_p=FLAGS.top_p,
    beam_width=FLAGS.beam_width,
    length_penalty=FLAGS.length_penalty,
    allow_n=FLAGS.allow_n,
    oracle_csv=FLAGS.oracle_csv,
    oracle_dev_csv=FLAGS.oracle_dev_csv,
    test_csv=FLAGS.test_csv,
  )
  if jax.process_index() == 0:
    print(result["table"])
    print(
      f"designs: {result['fasta']}; summary: {os.path.splitext(output)[0]}.summary.json, "
      f".txt, .png ({result['seconds']:.1f} s)"
    )


if __name__ == "__main__":
  launch_utils.run(main)
