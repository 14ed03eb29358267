"""Pretrains HybriDNA: `python launch/train.py --config=configs/demo.py --workdir=runs/demo`.

Runs the context stages of config.train.stages, checkpoints to
<workdir>/checkpoints (resuming from the latest one), logs to the console,
<workdir>/metrics.jsonl and TensorBoard (<workdir>/tensorboard), and plots
<workdir>/loss_curves.png. With config.train.markov_orders it ends by
printing validation bits per nucleotide next to order-k Markov baselines.
--workdir may be a gs:// or file:// URL (see hybridna_jax/paths.py).
"""

import json

from absl import flags, logging

from hybridna_jax import launch_utils, paths

launch_utils.define_flags(config_required=True)
FLAGS = flags.FLAGS


def main(argv):
  del argv  # flags only (launch_utils.run)
  launch_utils.quiet_library_logs()
  launch_utils.initialize_distributed()
  # Imported after distributed start-up (nothing may touch devices before).
  import jax  # pylint: disable=g-import-not-at-top

  from hybridna_jax.train import (
    loop,  # pylint: disable=g-import-not-at-top
    report,  # pylint: disable=g-import-not-at-top
  )

  config = FLAGS.config
  summary = loop.train(config, FLAGS.workdir)
  if jax.process_index() != 0:
    return
  if summary.get("final_val") and config.train.markov_orders:
    table = report.baseline_report(config, summary["final_val"], FLAGS.workdir)
    print(table)
  paths.write_json(paths.join(FLAGS.workdir, "train_summary.json"), summary)
  logging.info("done: %s", json.dumps({k: summary[k] for k in ("steps", "stopped")}))


if __name__ == "__main__":
  launch_utils.run(main, record_sigterm=True)  # SIGTERM while starting: a checkpoint
