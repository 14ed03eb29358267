"""Scores sequences or variants with a trained model (hybridna_jax.scoring).

    # Log-likelihood of each FASTA record (sum, mean, bits/nt) -> TSV
    python launch/score.py --workdir=runs/demo --mode=loglik --fasta=seqs.fa
    # Per-position log-probs and entropies -> NPZ (+ bedGraph), e.g. a 1 Mb contig
    python launch/score.py --workdir=runs/demo --mode=positions --fasta=contig.fa --bedgraph
    # Embeddings (config score.pooling mean|last|echo, score.layer) -> NPZ
    python launch/score.py --workdir=runs/demo --mode=embed --fasta=seqs.fa \\
        --config=configs/demo.py --config.score.pooling=echo
    # Zero-shot variant effects (VCF/BCF or CSV chrom,pos,ref,alt) -> TSV, annotated VCF
    python launch/score.py --workdir=runs/demo --mode=variants --variants=calls.vcf.gz \\
        --reference=genome.fa.gz --config=configs/demo.py --config.score.rc_average=True \\
        --region=chr17:43044295-43125483 --annotated=calls.scored.vcf.gz

--workdir is the run to restore, or pass --checkpoint (one of the two is
needed). Settings come from the `score` section of --config (default: the
run's config.json): context, stride, batch_size, dtype, rc_average, pooling,
layer, variant_window, max_indel_length. Outputs go to --output (default
<workdir>/scores/<name>, or scores/<name> in the run directory of
--checkpoint); positions and variants also write a plot next to it;
progress is logged while scoring. An earlier run's
outputs are not replaced without --overwrite.

Variants are streamed (hybridna_jax.scoring.callsets): VCF/BCF through htslib
(pysam), the reference (plain or bgzip FASTA) at random through faidx, memory
flat in the size of the call set. An interrupted --mode=variants run resumes
when rerun with the same flags (<output>.progress.json).
"""

import os

from absl import app, flags, logging

from hybridna_jax import launch_utils

launch_utils.define_flags(workdir_required=False, distributed=False)
flags.DEFINE_enum(
  "mode", None, ["loglik", "positions", "embed", "variants"], "What to compute.", required=True
)
flags.DEFINE_multi_string("fasta", [], "FASTA file(s) of sequences (loglik, positions, embed).")
flags.DEFINE_string(
  "variants", None, "VCF (.vcf, .vcf.gz) or CSV (chrom,pos,ref,alt) of variants (mode=variants)."
)
flags.DEFINE_string(
  "reference", None, "Reference FASTA, plain or bgzip (a .fai is built if missing; mode=variants)."
)
flags.DEFINE_string(
  "region",
  None,
  "mode=variants: only records in this region, chr, chr:start or chr:start-end (1-based, "
  "inclusive; commas allowed in the numbers); needs an indexed (.tbi/.csi) bgzip VCF or BCF.",
)
flags.DEFINE_string(
  "annotated",
  None,
  "mode=variants: also write the input records with INFO HYBRIDNA_LLR and HYBRIDNA_LLR_RC "
  "here (.vcf, or .vcf.gz / .bcf, each with a .csi index).",
)
flags.DEFINE_integer(
  "chunk_records", 2048, "mode=variants: records scored per chunk (memory and resume unit)."
)
flags.DEFINE_string(
  "checkpoint",
  None,
  "A run, checkpoints/, best/ or step directory (default: --workdir; one of the two is needed).",
)
flags.DEFINE_enum("which", "latest", ["latest", "best"], "Checkpoint of a run directory.")
flags.DEFINE_string(
  "output",
  None,
  "Output file (default: <workdir>/scores/<mode>.<ext>, or scores/<mode>.<ext> in the run "
  "directory of --checkpoint); "
  "positions and variants write their plots and other files next to it.",
)
flags.DEFINE_bool(
  "overwrite",
  False,
  "Replace existing outputs of an earlier run at --output (mode=variants: also start an "
  "interrupted run over instead of resuming it).",
)
flags.DEFINE_bool(
  "bedgraph",
  False,
  "mode=positions: also write <output, less .npz>.bedgraph (beside its .png) of the "
  "per-position log-probabilities (for genome browsers).",
)
FLAGS = flags.FLAGS

_EXTENSIONS = {"loglik": "tsv", "positions": "npz", "embed": "npz", "variants": "tsv"}


def main(argv):
  del argv  # flags only (launch_utils.run)
  launch_utils.quiet_library_logs()
  from hybridna_jax import (
    restore,  # pylint: disable=g-import-not-at-top
    scoring,  # pylint: disable=g-import-not-at-top
  )
  from hybridna_jax.config import DataConfig, ScoreConfig  # pylint: disable=g-import-not-at-top
  from hybridna_jax.scoring import callsets  # pylint: disable=g-import-not-at-top
  from hybridna_jax.scoring import outputs as score_outputs  # pylint: disable=g-import-not-at-top
  from hybridna_jax.scoring import variants as variants_lib  # pylint: disable=g-import-not-at-top
  from hybridna_jax.scoring.evaluation import fasta_sequences  # pylint: disable=g-import-not-at-top

  mode = FLAGS.mode
  if mode == "variants" and not (FLAGS.variants and FLAGS.reference):
    raise app.UsageError("--mode=variants needs --variants and --reference.")
  if mode != "variants" and not FLAGS.fasta:
    raise app.UsageError(f"--mode={mode} needs --fasta.")
  ref = launch_utils.named_checkpoint(FLAGS.checkpoint, FLAGS.workdir, FLAGS.which, "restore")
  output = launch_utils.local_output(
    FLAGS.output
    or os.path.join(FLAGS.workdir or ref.run_dir, "scores", f"{mode}.{_EXTENSIONS[mode]}"),
    "--output",
  )
  if output.endswith(("/", os.sep)) or os.path.isdir(output):
    example = os.path.join(output, f"{mode}.{_EXTENSIONS[mode]}")
    raise ValueError(f"--output={output} is a directory; name a file, e.g. --output={example}.")
  _refuse_to_replace(mode, output)
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)

  # The `score` section, found before the (slower) restore so that inputs
  # are read, and fail, first. Only this section comes from the run's
  # config.json: its mesh is the training one (e.g. tensor=2 on 2 GPUs), so
  # from_run gets --config alone, as in launch/eval.py.
  run_config = restore.run_config(ref.run_dir)
  config = FLAGS.config if FLAGS.config is not None else run_config
  section = ScoreConfig.of(config)
  if mode == "variants":
    callsets.CallSet(FLAGS.variants, region=FLAGS.region)  # header and index checks
    reference = callsets.open_reference(FLAGS.reference)
  else:
    records = fasta_sequences(
      FLAGS.fasta, allow_empty_records=DataConfig.of(config).allow_empty_records
    )

  scorer, _ = scoring.Scorer.from_run(ref.step_dir, FLAGS.config)  # the step resolved above
  rc = section.rc_average
  progress = scoring.ProgressLogger("windows")
  logging.info(
    "mode %s: context %d, stride %d, batch %d, buckets %s, rc_average %s",
    mode,
    scorer.context,
    scorer.stride,
    scorer.settings.batch_size,
    scorer.buckets,
    rc,
  )

  if mode == "variants":
    summary = callsets.score_callset(
      scorer,
      FLAGS.variants,
      FLAGS.reference,
      output,
      window=section.variant_window,
      rc_average=rc,
      region=FLAGS.region,
      annotated=FLAGS.annotated,
      max_indel_length=section.max_indel_length,
      chunk_records=FLAGS.chunk_records,
      reference=reference,
    )
    plot = variants_lib.plot_llrs(_variants_plot(output), callsets.read_llrs(output))
    paths = summary.paths + ([plot] if plot else [])
  else:
    paths = score_outputs.score_sequences_to_files(
      mode,
      scorer,
      [r.name for r in records],
      [r.tokens for r in records],
      output,
      rc_average=rc,
      pooling=section.pooling,
      layer=section.layer,
      bedgraph=FLAGS.bedgraph,
      progress=progress,
    )
  logging.info("wrote %s", ", ".join(paths))
  logging.info("compiled programs: %d (buckets %s)", scorer.trace_count, scorer.buckets)


def _variants_plot(output: str) -> str:
  """The LLR histogram written beside a variants run's scores TSV."""
  return output + ".png"


def _refuse_to_replace(mode: str, output: str) -> None:
  """Refuses, before anything is restored, to replace an earlier run's
  outputs without --overwrite; an interrupted variants run at `output` is
  resumed instead (or, with --overwrite, started over)."""
  from hybridna_jax.scoring import callsets  # pylint: disable=g-import-not-at-top
  from hybridna_jax.scoring import outputs as score_outputs  # pylint: disable=g-import-not-at-top

  if mode == "variants":
    progress = callsets.progress_file(output)
    if os.path.exists(progress):
      if FLAGS.overwrite:
        os.remove(progress)  # its partial outputs are rewritten from the start
      return
    files = callsets.output_files(output, FLAGS.annotated) + [_variants_plot(output)]
  else:
    files = score_outputs.output_files(mode, output, bedgraph=FLAGS.bedgraph)
  existing = [f for f in files if os.path.exists(f)]
  if existing and not FLAGS.overwrite:
    raise app.UsageError(
      f"{existing[0]} exists (an earlier score run's); pass another --output, or --overwrite "
      "to replace that run's outputs."
    )


if __name__ == "__main__":
  launch_utils.run(main)
