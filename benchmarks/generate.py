"""Generation speed: cached sampling against a naive loop that reruns the
full forward for every new token.

  python benchmarks/generate.py                       # demo config, CPU-sized
  python benchmarks/generate.py --prompt_lengths=1024,8192,32768,131072 \\
      --batch_sizes=1,16,64,256 --new_tokens=512      # an accelerator

Three tables, in one run:
  1. batched sampling: tokens/s of the decode loop (one cached step per
     token for the whole batch) at several batch sizes, with the prefill
     time of the batch's prompts, and beam search at the same sizes;
  2. per-token latency at long prompts (batch 1): prefill once, then the
     decode loop's seconds per token -- it should stay nearly flat as the
     prompt grows, since only the attention layers' KV cache grows (Mamba2
     layers carry a fixed-size state);
  3. the naive loop at the same prompt lengths: a jitted loop whose every
     step runs the full forward over the (fixed-size) buffer and takes the
     argmax at the current position, i.e. cost ~ prompt length per token.
     Its greedy tokens are checked against cached greedy decoding.

Parameters are random (speed does not depend on them); sampling uses
temperature 1 with top-k 4 over A C G T.
"""

import dataclasses
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import environment, time_jitted  # noqa: E402

from hybridna_jax import generate as gen  # noqa: E402
from hybridna_jax import tokenizer as tok  # noqa: E402
from hybridna_jax.config import ModelConfig, load_config  # noqa: E402
from hybridna_jax.model import count_params, create_model  # noqa: E402

flags.DEFINE_string("config", "configs/demo.py", "Config file (its model is used).")
flags.DEFINE_list("batch_sizes", ["1", "8", "32", "128"], "Table 1 batch sizes.")
flags.DEFINE_integer("short_prompt", 16, "Table 1 prompt length.")
flags.DEFINE_integer("new_tokens", 256, "Tokens generated per row (tables 1 and 2).")
flags.DEFINE_integer("beam_width", 4, "Beam width of the beam rows of table 1 (0: none).")
flags.DEFINE_list("prompt_lengths", ["1024", "8192", "32768"], "Tables 2 and 3 prompt lengths.")
flags.DEFINE_integer("naive_tokens", 4, "Tokens the naive loop generates per prompt length.")
flags.DEFINE_string(
  "attention_impl",
  "xla_blockwise",
  "model.attention_impl for prefill and "
  "the naive forward (xla_blockwise keeps 32k+ prompts in memory on CPU).",
)
flags.DEFINE_string("ssd_impl", None, "Override model.ssd_impl.")
flags.DEFINE_integer("iters", 3, "Timed repetitions (the median is reported).")
FLAGS = flags.FLAGS


def _timed(fn, *args, iters):
  """(compile + first run s, median s) of a jitted call."""
  t = time_jitted(fn, *args, iters=iters)
  return t["compile_s"], t["median_s"]


def _prompts(b, length, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(tok.A, tok.T + 1, (b, length)).astype(np.int32)
  tokens[:, 0] = tok.BOS
  return jnp.asarray(tokens), jnp.ones((b, length), jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "steps"))
def _naive_greedy(graphdef, state, prompt, *, steps):
  """Greedy decoding without a cache: every step runs the full forward over
  a buffer of prompt + steps tokens (causal, so the unfilled tail does not
  matter) and writes the argmax at the next position."""
  model = nnx.merge(graphdef, state)
  b, l = prompt.shape
  allowed = jnp.asarray(gen.allowed_tokens())
  buffer = jnp.concatenate([prompt, jnp.full((b, steps), tok.PAD, jnp.int32)], axis=1)

  def body(i, buffer):
    logits = model(buffer).logits
    current = jax.lax.dynamic_index_in_dim(logits, l - 1 + i, axis=1, keepdims=False)
    token = jnp.argmax(jnp.where(allowed, current, -jnp.inf), axis=-1).astype(jnp.int32)
    return jax.lax.dynamic_update_slice_in_dim(buffer, token[:, None], l + i, axis=1)

  return jax.lax.fori_loop(0, steps, body, buffer)[:, l:]


def main(argv):
  del argv
  cfg = ModelConfig.from_config(load_config(FLAGS.config).model)
  cfg = dataclasses.replace(
    cfg,
    attention_impl=FLAGS.attention_impl,
    **({"ssd_impl": FLAGS.ssd_impl} if FLAGS.ssd_impl else {}),
  )
  model = create_model(cfg)
  graphdef, state = nnx.split(model)
  n_new = FLAGS.new_tokens
  sampling = dict(temperature=jnp.float32(1.0), top_k=jnp.int32(4), top_p=jnp.float32(1.0))
  print(environment())
  print(
    f"config {FLAGS.config}: {count_params(model):,} params, layers "
    f"{''.join('A' if t == 'attention' else 'M' for t in cfg.layer_types)}, d_model "
    f"{cfg.d_model}, dtype {cfg.dtype}, attention_impl {cfg.attention_impl}, "
    f"ssd_impl {cfg.ssd_impl}"
  )

  def prefill(tokens, seg, max_length):
    return functools.partial(gen._prefill, graphdef, max_length=max_length)(state, tokens, seg)  # pylint: disable=protected-access

  def decode(logits, cache, b, *, greedy=False, steps=n_new):
    keys = gen.row_keys(0, np.arange(b))
    fn = functools.partial(
      gen._sample_loop,
      graphdef,
      max_new_tokens=steps,  # pylint: disable=protected-access
      stop_at_eos=False,
      min_new_tokens=0,
      allow_n=False,
      greedy=greedy,
    )
    return fn, (
      state,
      logits,
      cache,
      keys,
      sampling["temperature"],
      sampling["top_k"],
      sampling["top_p"],
    )

  # -- 1. batched sampling ------------------------------------------------------
  print(
    f"\n1. batched sampling: prompt {FLAGS.short_prompt} tokens, {n_new} new tokens per "
    "row, temperature 1, top-k 4"
  )
  print(
    f"{'mode':<10}{'batch':>7}{'prefill s':>11}{'decode s':>10}{'ms/step':>9}"
    f"{'tokens/s':>11}{'compile s':>11}"
  )
  for b in (int(x) for x in FLAGS.batch_sizes):
    tokens, seg = _prompts(b, FLAGS.short_prompt)
    max_length = FLAGS.short_prompt + n_new
    _, prefill_s = _timed(prefill, tokens, seg, max_length, iters=FLAGS.iters)
    logits, cache = prefill(tokens, seg, max_length)
    fn, args = decode(logits, cache, b)
    first, decode_s = _timed(fn, *args, iters=FLAGS.iters)
    print(
      f"{'sample':<10}{b:>7}{prefill_s:>11.3f}{decode_s:>10.3f}{1e3 * decode_s / n_new:>9.2f}"
      f"{b * n_new / decode_s:>11,.0f}{first - decode_s:>11.1f}"
    )
    if FLAGS.beam_width > 1:
      beam = functools.partial(
        gen._beam_loop,
        graphdef,
        beam_width=FLAGS.beam_width,  # pylint: disable=protected-access
        max_new_tokens=n_new,
        stop_at_eos=False,
        min_new_tokens=0,
        allow_n=False,
      )
      first, beam_s = _timed(beam, state, logits, cache, jnp.float32(1.0), iters=FLAGS.iters)
      print(
        f"{'beam ' + str(FLAGS.beam_width):<10}{b:>7}{prefill_s:>11.3f}{beam_s:>10.3f}"
        f"{1e3 * beam_s / n_new:>9.2f}{b * n_new / beam_s:>11,.0f}{first - beam_s:>11.1f}"
        f"  (hypotheses x steps / s: {b * FLAGS.beam_width * n_new / beam_s:,.0f})"
      )

  # -- 2 and 3. long prompts: cached vs naive ---------------------------------------------
  steps = FLAGS.naive_tokens
  print(
    f"\n2./3. batch 1, long prompts: cached decoding ({n_new} tokens) vs the naive "
    f"full-forward loop ({steps} tokens)"
  )
  print(
    f"{'prompt':>8}{'prefill s':>11}{'cached ms/token':>17}{'naive ms/token':>16}"
    f"{'naive / cached':>16}{'same tokens':>13}"
  )
  baseline = None
  for length in (int(x) for x in FLAGS.prompt_lengths):
    tokens, seg = _prompts(1, length, seed=length)
    _, prefill_s = _timed(prefill, tokens, seg, length + n_new, iters=1)
    logits, cache = prefill(tokens, seg, length + n_new)
    fn, args = decode(logits, cache, 1)
    _, decode_s = _timed(fn, *args, iters=FLAGS.iters)
    cached_ms = 1e3 * decode_s / n_new
    baseline = baseline or cached_ms
    naive = functools.partial(_naive_greedy, graphdef, steps=steps)
    _, naive_s = _timed(naive, state, tokens, iters=1)
    naive_ms = 1e3 * naive_s / steps
    # Same greedy tokens from the cache (a prefill with room for `steps`).
    logits_s, cache_s = prefill(tokens, seg, length + steps)
    fn_s, args_s = decode(logits_s, cache_s, 1, greedy=True, steps=steps)
    same = bool(np.array_equal(np.asarray(fn_s(*args_s).tokens), np.asarray(naive(state, tokens))))
    print(
      f"{length:>8,}{prefill_s:>11.2f}{cached_ms:>17.2f}{naive_ms:>16.1f}"
      f"{naive_ms / cached_ms:>15.0f}x{str(same):>13}   "
      f"(cached cost x{cached_ms / baseline:.2f} of the shortest prompt)"
    )


if __name__ == "__main__":
  app.run(main)
