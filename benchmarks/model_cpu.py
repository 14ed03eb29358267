"""Forward and forward+backward throughput of a config's model on one
batch, e.g. the demo config on a 4,096-nucleotide batch on CPU.

  python benchmarks/model_cpu.py --config=configs/demo.py --batch=1 --seq_len=4096
"""

import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import environment, time_jitted  # noqa: E402

from hybridna_jax.config import ModelConfig, load_config  # noqa: E402
from hybridna_jax.model import count_params, create_model  # noqa: E402
from hybridna_jax.train.flops import train_flops_per_token  # noqa: E402
from hybridna_jax.train.step import masked_cross_entropy  # noqa: E402

flags.DEFINE_string("config", "configs/demo.py", "Config file.")
flags.DEFINE_integer("batch", 1, "Sequences per batch.")
flags.DEFINE_integer("seq_len", 4096, "Nucleotides per sequence.")
flags.DEFINE_integer("iters", 5, "Timed iterations.")
flags.DEFINE_string("ssd_impl", None, "Override model.ssd_impl.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  cfg = ModelConfig.from_config(load_config(FLAGS.config).model)
  if FLAGS.ssd_impl:
    cfg = dataclasses.replace(cfg, ssd_impl=FLAGS.ssd_impl)
  model = create_model(cfg)
  graphdef, params = nnx.split(model, nnx.Param)
  tokens = jnp.asarray(
    np.random.default_rng(0).integers(5, 9, (FLAGS.batch, FLAGS.seq_len + 1)), jnp.int32
  )
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  mask = jnp.ones(inputs.shape, jnp.float32)

  def loss(params):
    logits = nnx.merge(graphdef, params)(inputs).logits
    nll, count, _ = masked_cross_entropy(logits, targets, mask)
    return nll / count

  forward = jax.jit(loss)
  forward_backward = jax.jit(jax.value_and_grad(loss))
  n_tokens = FLAGS.batch * FLAGS.seq_len
  print(environment())
  print(
    f"config {FLAGS.config}: {count_params(model):,} params, layers "
    f"{''.join('A' if t == 'attention' else 'M' for t in cfg.layer_types)}, "
    f"dtype {cfg.dtype}, ssd_impl {cfg.ssd_impl}, batch {FLAGS.batch} x {FLAGS.seq_len} nt"
  )
  flops = train_flops_per_token(cfg, FLAGS.seq_len)
  print(f"{'pass':<18}{'compile s':>10}{'median s':>10}{'tokens/s':>12}{'GFLOP/s':>10}")
  for name, fn, mult in (("forward", forward, 1 / 3), ("forward+backward", forward_backward, 1.0)):
    t = time_jitted(fn, params, iters=FLAGS.iters)
    rate = n_tokens / t["median_s"]
    print(
      f"{name:<18}{t['compile_s']:>10.1f}{t['median_s']:>10.3f}{rate:>12,.0f}"
      f"{rate * flops * mult / 1e9:>10.1f}"
    )


if __name__ == "__main__":
  app.run(main)
