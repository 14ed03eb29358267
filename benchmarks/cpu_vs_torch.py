"""Our model beside transformers' BambaForCausalLM (pure-PyTorch path) on
the CPU, at the same size and with the same weights, in one run.

The Bamba model is our model exported (`hybridna_jax.hf.export`) and loaded
with `from_pretrained`, so both hold the same 1.6M (demo) parameters; the
logits of both are compared once before timing. Each shape times the
forward (no gradients) and forward+backward (cross-entropy loss, gradients
of every parameter) in --rounds rounds, each a block of a warm-up and
--iters timed calls of ours and one of torch (alternating which goes
first), and prints the median tokens/s of all timed calls and the ratio
ours / torch of the medians and of the best calls. Rounds matter on a
shared VM, whose slow spells otherwise fall on one side: one block each
moved the 16k training ratio between 1.24x and 1.44x from run to run.

  python benchmarks/cpu_vs_torch.py                       # demo and tiny, 1k..16k
  python benchmarks/cpu_vs_torch.py --configs=configs/demo.py --shapes=2x4096 \
      --attention_impls=xla,auto                          # before/after a kernel

torch and transformers are benchmark dependencies (requirements-test.txt).
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import environment, interleaved_seconds  # noqa: E402

from hybridna_jax import hf  # noqa: E402
from hybridna_jax.attention import KERNELS as ATTENTION_KERNELS  # noqa: E402
from hybridna_jax.config import ModelConfig, load_config  # noqa: E402
from hybridna_jax.model import count_params, create_model  # noqa: E402
from hybridna_jax.ssd import CORES as SSD_CORES  # noqa: E402
from hybridna_jax.train.step import masked_cross_entropy  # noqa: E402

flags.DEFINE_list("configs", ["configs/demo.py", "configs/tiny.py"], "Model configs.")
flags.DEFINE_list("shapes", ["8x1024", "2x4096", "1x16384"], "batch x length, each.")
flags.DEFINE_list("passes", ["forward", "forward+backward"], "Passes to time.")
flags.DEFINE_list("attention_impls", ["auto"], "Our attention_impl values to time, each.")
flags.DEFINE_integer("rounds", 2, "Rounds per measurement, each timing ours and torch.")
flags.DEFINE_integer("iters", 3, "Timed calls per side and round (after one warm-up).")
flags.DEFINE_integer("threads", 0, "torch threads (0: torch's default, one per core).")
FLAGS = flags.FLAGS


def _shape(text: str) -> tuple[int, int]:
  batch, _, length = text.partition("x")
  return int(batch), int(length)


def _bamba_from(model, out_dir: str):
  """transformers' BambaForCausalLM holding `model`'s weights (fp32, eval)."""
  import transformers  # pylint: disable=g-import-not-at-top

  hf.export(model, out_dir)
  return transformers.BambaForCausalLM.from_pretrained(out_dir, dtype="float32").eval()


def _mapping(cfg: ModelConfig, bamba) -> str:
  c = bamba.config
  layers = "".join("A" if t == "attention" else "M" for t in cfg.layer_types)
  return (
    f"  ours: d_model {cfg.d_model}, layers {layers}, heads {cfg.num_heads}/{cfg.num_kv_heads} "
    f"x {cfg.head_dim}, mlp {cfg.mlp_dim}, ssm heads {cfg.ssm_heads} x {cfg.ssm_head_dim}, "
    f"d_state {cfg.d_state}, chunk {cfg.chunk_size}\n"
    f"  Bamba: hidden_size {c.hidden_size}, attn_layer_indices {c.attn_layer_indices}, "
    f"heads {c.num_attention_heads}/{c.num_key_value_heads} x {c.head_dim}, intermediate "
    f"{c.intermediate_size}, mamba_n_heads {c.mamba_n_heads} x {c.mamba_d_head}, "
    f"mamba_d_state {c.mamba_d_state}, mamba_chunk_size {c.mamba_chunk_size}"
  )


def _ours_fns(model):
  graphdef, params = nnx.split(model, nnx.Param)

  def loss(params, inputs, targets):
    logits = nnx.merge(graphdef, params)(inputs).logits
    nll, count, _ = masked_cross_entropy(logits, targets, jnp.ones(inputs.shape, jnp.float32))
    return nll / count

  logits = jax.jit(lambda params, inputs: nnx.merge(graphdef, params)(inputs).logits)
  forward = jax.jit(loss)
  forward_backward = jax.jit(jax.value_and_grad(loss))
  return params, logits, {"forward": forward, "forward+backward": forward_backward}


def _torch_fns(bamba):
  import torch  # pylint: disable=g-import-not-at-top

  def loss(inputs, targets):
    logits = bamba(inputs, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())

  def forward(inputs, targets):
    with torch.no_grad():
      return loss(inputs, targets).item()

  def forward_backward(inputs, targets):
    bamba.zero_grad(set_to_none=True)
    value = loss(inputs, targets)
    value.backward()
    return value.item()

  return {"forward": forward, "forward+backward": forward_backward}


def _check_logits(logits_fn, params, bamba, vocab: int) -> float:
  """Max |ours - torch| / max |torch| of the logits of one short batch."""
  import torch  # pylint: disable=g-import-not-at-top

  ids = np.random.default_rng(1).integers(5, 9, (1, 256))
  ours = np.asarray(logits_fn(params, jnp.asarray(ids, jnp.int32)))[..., :vocab]
  with torch.no_grad():
    theirs = bamba(torch.tensor(ids), use_cache=False).logits.numpy()[..., :vocab]
  return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def main(argv):
  del argv
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  if FLAGS.threads:
    torch.set_num_threads(FLAGS.threads)
  print(environment())
  print(
    f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
    f"transformers {transformers.__version__}; fp32; "
    f"{FLAGS.rounds} rounds of 1 + {FLAGS.iters} calls a side"
  )
  rows = []
  for config_path in FLAGS.configs:
    base = ModelConfig.from_config(load_config(config_path).model)
    base = dataclasses.replace(base, dtype="float32")
    with tempfile.TemporaryDirectory() as tmp:
      bamba = _bamba_from(create_model(base, seed=0), tmp)
    n_torch = sum(p.numel() for p in bamba.parameters())
    torch_fns = _torch_fns(bamba)
    for impl in FLAGS.attention_impls:
      cfg = dataclasses.replace(base, attention_impl=impl)
      model = create_model(cfg, seed=0)
      params, logits_fn, ours_fns = _ours_fns(model)
      resolved = ATTENTION_KERNELS.resolve(impl).name
      ssd = SSD_CORES.resolve(cfg.ssd_impl).name
      print(
        f"\n{config_path}: ours {count_params(model):,} params, Bamba {n_torch:,}; "
        f"attention {resolved}, ssd {ssd}; logits rel. diff "
        f"{_check_logits(logits_fn, params, bamba, cfg.vocab_size):.1e}"
      )
      print(_mapping(cfg, bamba))
      for shape in FLAGS.shapes:
        batch, length = _shape(shape)
        ids = np.random.default_rng(0).integers(5, 9, (batch, length + 1))
        inputs, targets = jnp.asarray(ids[:, :-1], jnp.int32), jnp.asarray(ids[:, 1:], jnp.int32)
        t_in, t_tg = torch.tensor(ids[:, :-1]), torch.tensor(ids[:, 1:])
        for name in FLAGS.passes:
          ours_call = functools.partial(ours_fns[name], params, inputs, targets)
          theirs_call = functools.partial(torch_fns[name], t_in, t_tg)
          ours_t, theirs_t = interleaved_seconds(
            [lambda: jax.block_until_ready(ours_call()), theirs_call],  # noqa: B023
            FLAGS.rounds,
            FLAGS.iters,
            warmup=1,
          )
          ours_s, theirs_s = statistics.median(ours_t), statistics.median(theirs_t)
          best = min(theirs_t) / min(ours_t)
          tokens = batch * length
          row = (config_path, resolved, shape, name, tokens / ours_s, tokens / theirs_s, best)
          rows.append(row)
          print(
            f"  {shape:>8} {name:<17} ours {tokens / ours_s:>9,.0f} tok/s   "
            f"torch {tokens / theirs_s:>9,.0f} tok/s   ours/torch {theirs_s / ours_s:5.2f}x "
            f"(best calls {best:.2f}x)",
            flush=True,
          )
  print(
    "\n| config | attention | batch x length | pass | ours tok/s | torch tok/s | ours / torch "
    "| best calls |"
  )
  print("|---|---|---|---|---:|---:|---:|---:|")
  for config_path, impl, shape, name, ours, theirs, best in rows:
    print(
      f"| {Path(config_path).stem} | {impl} | {shape} | {name} | {ours:,.0f} | {theirs:,.0f} | "
      f"{ours / theirs:.2f}x | {best:.2f}x |"
    )


if __name__ == "__main__":
  app.run(main)
