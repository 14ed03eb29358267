"""Converts between our Orbax run directories and Hugging Face directories.

    # A run (or checkpoints/, best/, step directory) -> a directory that
    # transformers.BambaForCausalLM.from_pretrained loads with our logits:
    python launch/convert.py --input=runs/demo --output=exports/demo_hf
    # A Hugging Face directory (transformers Bamba, or the HybriDNA release's
    # Jamba-style names) -> a run directory for eval.py, score.py,
    # finetune.py and generate.py:
    python launch/convert.py --input=HybriDNA-300M --output=runs/hybridna_300m

The direction follows --input: a directory (local path or file:// URL) with
config.json and model.safetensors (or its index) is a Hugging Face one; one
whose download is incomplete (shards without their index, weights without
config.json) is named as such. Run -> HF writes config.json, safetensors
(shards of --max_shard_gb) and a character-level tokenizer of our vocabulary.
--output must be new or empty; run -> HF may also name an earlier export,
which is replaced whole (written beside it, then renamed into place).
HF -> run re-orders the embedding and head rows into our token ids
(hybridna_jax.tokenizer; the rules: hf.checkpoint.vocab_remap). The default
(--vocab_size=0) keeps every row, each once, so scores are exactly the
checkpoint's (unless one of its tokens serves two of our roles with no row
left over for the second: a zero output row, logged). An
explicit --vocab_size keeps our ids 0..N-1: 128 gives every task token
generative fine-tuning needs, as zero rows where the checkpoint has none
(logit 0, which takes probability mass); a smaller one drops rows (the
softmax renormalises: scores change). Each placement is logged. --config
(optional) supplies the other sections of the written run's config.json:
the checkpoint decides `model` and `score.add_bos` (True when its tokenizer
adds bos, as hf.load reads it), which replace --config's.
"""

import os

from absl import app, flags, logging

from hybridna_jax import launch_utils

launch_utils.define_flags(workdir_required=False, distributed=False)
flags.DEFINE_string("input", None, "Run/checkpoint directory or Hugging Face directory.")
flags.DEFINE_string(
  "output",
  None,
  "Directory to write: new or empty (run -> HF: or an earlier export, which is replaced).",
)
flags.DEFINE_enum("which", "latest", ["latest", "best"], "Checkpoint of a run directory.")
flags.DEFINE_enum(
  "dtype", "float32", ["float32", "bfloat16"], "Tensor dtype of a written HF directory."
)
flags.DEFINE_float("max_shard_gb", 4.0, "Largest safetensors shard written (GB).")
flags.DEFINE_integer(
  "vocab_size",
  0,
  "HF -> run: our token ids kept (0: every checkpoint row, scores exact; 128: all task "
  "tokens, zero rows where the checkpoint has none; fewer drops rows).",
)
flags.mark_flags_as_required(["input", "output"])
FLAGS = flags.FLAGS


def main(argv):
  del argv  # flags only (launch_utils.run)
  launch_utils.quiet_library_logs()
  from hybridna_jax import hf, restore  # pylint: disable=g-import-not-at-top

  # A Hugging Face download that load cannot read (a missing index or
  # config.json, PyTorch weights) is named as such, not taken for a run.
  hf.check_safetensors(FLAGS.input)
  if hf.is_hf_dir(FLAGS.input):
    hf.checkpoint.check_our_vocab(FLAGS.vocab_size, "--vocab_size")
    if os.path.isdir(FLAGS.output) and os.listdir(FLAGS.output):
      raise app.UsageError(
        f"--output {FLAGS.output} exists and is not empty; pick a new directory."
      )
    model, _, config = hf.load(FLAGS.input, our_vocab=FLAGS.vocab_size)
    if FLAGS.config is not None:
      # The checkpoint decides its architecture and whether its pipeline
      # scores after bos; --config gives the rest.
      if FLAGS.config.score.add_bos != config.score.add_bos:
        logging.warning(
          "--config's score.add_bos=%s replaced by the checkpoint's score.add_bos=%s.",
          FLAGS.config.score.add_bos,
          config.score.add_bos,
        )
      FLAGS.config.model = config.model
      FLAGS.config.score.add_bos = config.score.add_bos
      config = FLAGS.config
    logging.info(
      "the run scores with score.add_bos=%s (whether the checkpoint's tokenizer adds bos)",
      config.score.add_bos,
    )
    hf.write_run(model, config, FLAGS.output)
    logging.info("wrote run directory %s (restore.load, eval.py, score.py ...)", FLAGS.output)
  else:
    # Checked before the model loads; hf.export replaces an earlier export
    # whole and refuses any other non-empty directory.
    hf.check_export_dir(FLAGS.output)
    model, _, _ = restore.load(FLAGS.input, which=FLAGS.which, scan_layers=False)
    files = hf.export(
      model, FLAGS.output, dtype=FLAGS.dtype, max_shard_bytes=int(FLAGS.max_shard_gb * 2**30)
    )
    logging.info("wrote %s: %s", FLAGS.output, ", ".join(files))


if __name__ == "__main__":
  launch_utils.run(main)
