"""The paper's efficiency question: training throughput of HybriDNA against a
same-size pure-attention model built from the same code (attention at every
layer, MLP widened to match the parameter count), at several context lengths.

  python benchmarks/end_to_end.py --config=configs/hybridna_300m.py \
      --seq_lens=8192,32768,65536 --tokens_per_step=65536

For each model and length it runs jitted, donated train steps (bf16 compute,
fp32 master weights, the config's remat) on one device and prints step time,
training tokens/s, model TFLOP/s and MFU (model FLOPs: matmuls, attention and
the SSD scan, see hybridna_jax/train/flops.py), peak device memory (the
process's running peak, so a row shows at least the rows above it), or a
failure cell ("OOM: ..." / "error: ...") after which the run goes on.
`--small` runs a CPU smoke version on the demo config.
"""

import dataclasses
import gc
import sys
from pathlib import Path

import jax
import numpy as np
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import environment, failure, time_jitted  # noqa: E402

from hybridna_jax import sharding  # noqa: E402
from hybridna_jax.config import ModelConfig, load_config  # noqa: E402
from hybridna_jax.model import HybriDNA, abstract_model  # noqa: E402
from hybridna_jax.train import flops as flops_lib  # noqa: E402
from hybridna_jax.train import optimizer as optimizer_lib  # noqa: E402
from hybridna_jax.train import step as step_lib  # noqa: E402

flags.DEFINE_string("config", "configs/hybridna_300m.py", "Model config.")
flags.DEFINE_list("seq_lens", ["8192", "32768", "65536"], "Context lengths.")
flags.DEFINE_integer("tokens_per_step", 65536, "Tokens per step (batch = this / seq_len, >= 1).")
flags.DEFINE_integer("iters", 5, "Timed steps per point.")
flags.DEFINE_string("dtype", "bfloat16", "Compute dtype.")
flags.DEFINE_string("remat", None, "Override model.remat (none | full | dots).")
flags.DEFINE_bool("small", False, "CPU smoke run: demo config, short lengths.")
flags.DEFINE_bool(
  "scan_layers", None, "Override model.scan_layers (one scanned block: faster compiles)."
)
flags.DEFINE_list(
  "models", ["hybrid", "transformer"], "Models to run, in this order (hybrid, transformer)."
)
flags.DEFINE_bool(
  "packed",
  False,
  "Feed segment ids (packed documents). Off: one document per row, so both models take the "
  "fastest attention path (cuDNN on GPU, which segment ids rule out).",
)
FLAGS = flags.FLAGS


def param_count(cfg: ModelConfig) -> int:
  from flax import nnx  # pylint: disable=g-import-not-at-top

  state = nnx.state(abstract_model(cfg), nnx.Param)
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))


def attention_only(cfg: ModelConfig) -> ModelConfig:
  """Attention at every layer, with the MLP widened so that the parameter
  count matches `cfg` (rounded to a multiple of 128)."""
  target = param_count(cfg)
  base = dataclasses.replace(cfg, attn_layers=tuple(range(cfg.n_layers)))
  per_unit = 3 * cfg.d_model * cfg.n_layers  # params per unit of mlp_dim
  mlp = cfg.mlp_dim + (target - param_count(base)) / per_unit
  return dataclasses.replace(base, mlp_dim=max(128, int(round(mlp / 128)) * 128))


def peak_memory_gib() -> str:
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return f"{peak / 2**30:.1f}" if peak else "n/a"


def build(cfg: ModelConfig):
  """(step functions, [train state]) of `cfg` on one device: built and
  initialised once per model, then stepped at every length."""
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  train_cfg = load_config(FLAGS.config).train
  optimizer, schedule = optimizer_lib.make_optimizer(train_cfg, total_steps=1000)
  keys = step_lib.LM_BATCH_KEYS if FLAGS.packed else ("inputs", "targets", "loss_mask")
  fns = step_lib.build_steps(
    lambda rngs: HybriDNA(cfg, rngs=rngs),
    step_lib.lm_loss,
    optimizer,
    schedule,
    mesh,
    batch_keys=keys,
  )
  return fns, [fns.init(jax.random.key(0))]


def measure(cfg: ModelConfig, built, seq_len: int, batch: int):
  fns, holder = built
  rng = np.random.default_rng(0)
  toks = rng.integers(5, 9, (batch, seq_len + 1)).astype(np.int32)
  arrays = {
    "inputs": toks[:, :-1],
    "targets": toks[:, 1:],
    "segment_ids": np.ones((batch, seq_len), np.int32),
    "loss_mask": np.ones((batch, seq_len), np.float32),
  }
  batch_arrays = step_lib.device_batch(arrays, fns.batch_sharding, fns.batch_keys)

  def step(b):
    holder[0], metrics = fns.train_step(holder[0], b)
    return metrics["loss"]

  timing = time_jitted(step, batch_arrays, iters=FLAGS.iters)
  tokens = batch * seq_len
  tok_s = tokens / timing["median_s"]
  achieved = tok_s * flops_lib.train_flops_per_token(cfg, seq_len)
  peak = flops_lib.peak_flops_per_device()
  return dict(
    compile_s=timing["compile_s"],
    step_s=timing["median_s"],
    tok_s=tok_s,
    tflops=achieved / 1e12,
    mfu=(achieved / peak) if peak else None,
    mem=peak_memory_gib(),
  )


def main(argv):
  del argv
  config_path = "configs/demo.py" if FLAGS.small else FLAGS.config
  seq_lens = [256, 512] if FLAGS.small else [int(x) for x in FLAGS.seq_lens]
  tokens_per_step = 1024 if FLAGS.small else FLAGS.tokens_per_step
  hybrid = ModelConfig.from_config(load_config(config_path).model)
  hybrid = dataclasses.replace(
    hybrid,
    dtype="float32" if FLAGS.small else FLAGS.dtype,
    remat=FLAGS.remat or hybrid.remat,
    scan_layers=hybrid.scan_layers if FLAGS.scan_layers is None else FLAGS.scan_layers,
  )
  models = {"hybrid": hybrid, "transformer": attention_only(hybrid)}
  unknown = set(FLAGS.models) - set(models)
  if unknown:
    raise app.UsageError(f"--models: unknown {sorted(unknown)}; use hybrid and/or transformer.")
  transformer = models["transformer"]
  print(environment())
  print(
    f"config {config_path}; hybrid {param_count(hybrid) / 1e6:.1f}M params "
    f"(layers {''.join('A' if t == 'attention' else 'M' for t in hybrid.layer_types)}), "
    f"transformer {param_count(transformer) / 1e6:.1f}M params (mlp_dim "
    f"{transformer.mlp_dim}); dtype {hybrid.dtype}, remat {hybrid.remat}, "
    f"ssd_impl {hybrid.ssd_impl}, attention_impl {hybrid.attention_impl}, "
    f"scan_layers {hybrid.scan_layers}; "
    f"{tokens_per_step} tokens/step; "
    + ("packed documents (segment ids)" if FLAGS.packed else "one document per row")
  )
  print(
    f"{'model':<12}{'seq_len':>8}{'batch':>6}{'compile s':>10}{'step s':>9}{'tok/s':>11}"
    f"{'TFLOP/s':>9}{'MFU':>7}{'peak GiB':>9}"
  )
  results = {}
  # Model by model (each built and initialised once), the lengths in turn.
  for name in FLAGS.models:
    cfg, built = models[name], None
    for seq_len in seq_lens:
      batch = max(1, tokens_per_step // seq_len)
      try:
        built = built or build(cfg)
        r = measure(cfg, built, seq_len, batch)
      except Exception as e:  # pylint: disable=broad-except
        # An OOM (or any other failure) of one point is a cell, not the end
        # of the run: the other lengths and the other model still run.
        print(f"{name:<12}{seq_len:>8}{batch:>6}  {failure(e)}", flush=True)
        gc.collect()
        continue
      results[(name, seq_len)] = r
      mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
      print(
        f"{name:<12}{seq_len:>8}{batch:>6}{r['compile_s']:>10.1f}{r['step_s']:>9.3f}"
        f"{r['tok_s']:>11,.0f}{r['tflops']:>9.2f}{mfu:>7}{r['mem']:>9}",
        flush=True,
      )
    del built
    gc.collect()
  for seq_len in seq_lens:
    if ("hybrid", seq_len) in results and ("transformer", seq_len) in results:
      ratio = results[("hybrid", seq_len)]["tok_s"] / results[("transformer", seq_len)]["tok_s"]
      print(f"{'':<12}{seq_len:>8}  hybrid / transformer throughput: {ratio:.2f}x", flush=True)


if __name__ == "__main__":
  app.run(main)
