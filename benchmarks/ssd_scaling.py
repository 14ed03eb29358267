"""How the SSD scan's time grows with sequence length: the chunked XLA
algorithm next to the sequential scan (the definition), forward and
forward+backward, at the demo model's SSD shapes by default.

  python benchmarks/ssd_scaling.py --lengths=4096,8192,16384,32768,65536
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import environment, time_jitted  # noqa: E402

from hybridna_jax import ssd  # noqa: E402

flags.DEFINE_list("lengths", ["4096", "8192", "16384", "32768", "65536"], "Sequence lengths.")
flags.DEFINE_list("impls", ["chunked", "sequential"], "Implementations to compare.")
flags.DEFINE_integer("batch", 1, "Batch size.")
flags.DEFINE_integer("heads", 8, "SSM heads.")
flags.DEFINE_integer("headdim", 32, "Head dimension p.")
flags.DEFINE_integer("d_state", 32, "State size n.")
flags.DEFINE_integer("chunk", 64, "Chunk size.")
flags.DEFINE_integer("iters", 3, "Timed iterations.")
FLAGS = flags.FLAGS


def inputs(length):
  rng = np.random.default_rng(0)
  b, h, p, n = FLAGS.batch, FLAGS.heads, FLAGS.headdim, FLAGS.d_state
  f = lambda *s: jnp.asarray(rng.standard_normal(s, np.float32))
  return (
    f(b, length, h, p),
    f(b, length, h) - 2.0,
    -jnp.exp(f(h)),
    f(b, length, 1, n),
    f(b, length, 1, n),
  )


def main(argv):
  del argv
  print(environment())
  print(
    f"b={FLAGS.batch} h={FLAGS.heads} p={FLAGS.headdim} n={FLAGS.d_state} "
    f"chunk={FLAGS.chunk} fp32; seconds per call (median of {FLAGS.iters})"
  )
  header = f"{'length':>8}" + "".join(
    f"{impl + ' fwd':>16}{impl + ' f+b':>16}" for impl in FLAGS.impls
  )
  print(header)
  for length in (int(x) for x in FLAGS.lengths):
    args = inputs(length)
    row = f"{length:>8}"
    for impl in FLAGS.impls:

      def fwd(x, dt, A, B, C, impl=impl):
        return ssd.ssd_chunked_scan(x, dt, A, B, C, FLAGS.chunk, dt_softplus=True, impl=impl)

      def loss(x, dt, A, B, C, impl=impl):
        return fwd(x, dt, A, B, C, impl).sum()

      f = time_jitted(jax.jit(fwd), *args, iters=FLAGS.iters)
      fb = time_jitted(jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))), *args, iters=FLAGS.iters)
      row += f"{f['median_s']:>16.4f}{fb['median_s']:>16.4f}"
    print(row, flush=True)


if __name__ == "__main__":
  app.run(main)
