"""Scoring throughput: sequences scored per second by `hybridna_jax.scoring`
for 1 kb and 32 kb inputs, and proof that new inputs do not recompile.

  python benchmarks/scoring.py                       # demo config, random weights
  python benchmarks/scoring.py --workdir=runs/demo   # a trained run

Each case warms up on one set of inputs, then scores fresh random sequences
whose lengths vary within a bucket (e.g. 900..1,024 nt); JAX's backend
compile events and the scorer's own trace counter are counted during the
timed part, where both must stay 0. Cases (log-likelihoods):
  * 1 kb, one window (context 32,768, bucket 1,024), 8 rows a call;
  * 32 kb, one window (context 32,768), 1 row a call;
  * 32 kb windowed at a 4,096 context, stride 2,048 (the demo's trained
    context): 15 windows a sequence, 8 rows a call.
"""

import dataclasses
import sys
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import environment  # noqa: E402

from hybridna_jax import scoring  # noqa: E402
from hybridna_jax.config import ModelConfig, load_config  # noqa: E402
from hybridna_jax.model import count_params, create_model  # noqa: E402

flags.DEFINE_string("config", "configs/demo.py", "Model config (without --workdir).")
flags.DEFINE_string("workdir", None, "Restore this run instead of random weights.")
flags.DEFINE_integer("repeats", 2, "Timed repeats of each case, each on fresh sequences.")
flags.DEFINE_bool("rc_average", False, "Score both strands.")
flags.DEFINE_string(
  "attention_impl",
  "auto",
  "Attention kernel (auto: xla_causal on CPU, which holds no 32k x 32k scores).",
)
FLAGS = flags.FLAGS

# name, sequence lengths (within one bucket), context, stride, sequences per
# repeat, rows per device call.
CASES = (
  ("1 kb", (900, 1024), 32_768, 16_384, 8, 8),
  ("32 kb", (30_000, 32_768), 32_768, 16_384, 2, 1),
  ("32 kb windowed", (30_000, 32_768), 4_096, 2_048, 2, 8),
)


class CompileCounter:
  """Counts XLA backend compiles (jax.monitoring events)."""

  def __init__(self):
    self.count = 0
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event, duration, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      self.count += 1


def main(argv):
  del argv
  attention = FLAGS.attention_impl
  if FLAGS.workdir:
    from hybridna_jax import restore  # pylint: disable=g-import-not-at-top

    model, _, _ = restore.load(FLAGS.workdir, attention_impl=attention)
    source = FLAGS.workdir
  else:
    cfg = ModelConfig.from_config(load_config(FLAGS.config).model)
    model = create_model(dataclasses.replace(cfg, attention_impl=attention))
    source = f"{FLAGS.config} (random weights)"
  cfg = model.cfg
  compiles = CompileCounter()
  rng = np.random.default_rng(0)
  print(environment())
  print(
    f"model {source}: {count_params(model):,} params, layers "
    f"{''.join('A' if t == 'attention' else 'M' for t in cfg.layer_types)}, dtype "
    f"{cfg.dtype}, ssd {cfg.ssd_impl}, attention {cfg.attention_impl}; "
    f"rc_average {FLAGS.rc_average}; {FLAGS.repeats} timed repeats per case"
  )
  print(
    f"{'case':<16}{'context':>8}{'batch':>6}{'windows/seq':>12}{'warm-up s':>10}"
    f"{'seqs/s':>9}{'kb/s':>8}{'compiles':>9}{'traces':>7}"
  )
  for name, (low, high), context, stride, per_repeat, batch in CASES:
    scorer = scoring.Scorer(
      model, context=context, stride=stride, batch_size=batch, min_bucket=1024
    )

    def sequences(low=low, high=high, per_repeat=per_repeat):
      lengths = rng.integers(low, high + 1, per_repeat)
      return [rng.integers(5, 9, n).astype(np.int32) for n in lengths]

    start = time.perf_counter()
    scorer.log_likelihood(sequences(), rc_average=FLAGS.rc_average)
    warmup = time.perf_counter() - start
    compiles_before, traces_before = compiles.count, scorer.trace_count
    repeats = [sequences() for _ in range(FLAGS.repeats)]
    start = time.perf_counter()
    for seqs in repeats:
      scorer.log_likelihood(seqs, rc_average=FLAGS.rc_average)
    seconds = time.perf_counter() - start
    n = FLAGS.repeats * per_repeat
    nucleotides = sum(len(s) for seqs in repeats for s in seqs)
    windows = len(scoring.plan_windows(high, context, stride))
    print(
      f"{name:<16}{context:>8,}{batch:>6}{windows:>12}{warmup:>10.1f}{n / seconds:>9.3f}"
      f"{nucleotides / seconds / 1e3:>8.1f}{compiles.count - compiles_before:>9}"
      f"{scorer.trace_count - traces_before:>7}",
      flush=True,
    )


if __name__ == "__main__":
  app.run(main)
