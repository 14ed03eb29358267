"""Where a training step's time goes on the CPU, by source line.

Traces the jitted forward (+ backward) of a model config with the JAX
profiler, takes each XLA:CPU thunk's self time (its duration less the
thunks it contains, e.g. a while loop's body), and sums it by the operation
and the innermost hybridna_jax source lines that XLA's metadata names. The
main thread's waits for the worker threads are left out, so the shares add
up to the work done.

  python benchmarks/cpu_profile.py --config=configs/demo.py --shape=1x16384
  taskset -c 0 python benchmarks/cpu_profile.py --shape=2x4096 --top=60   # one core

This is how the (1, l, channels) weight-gradient reductions of the norms and
the conv, and the fused cumsum of the SSD decays, were found
(benchmarks/RESULTS.md, "Speed on CPU").
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import re
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import environment  # noqa: E402

from hybridna_jax.config import ModelConfig, load_config  # noqa: E402
from hybridna_jax.model import create_model  # noqa: E402
from hybridna_jax.train.step import masked_cross_entropy  # noqa: E402

flags.DEFINE_string("config", "configs/demo.py", "Model config.")
flags.DEFINE_string("shape", "2x4096", "batch x length.")
flags.DEFINE_enum("trace", "forward+backward", ["forward", "forward+backward"], "What to trace.")
flags.DEFINE_integer("calls", 2, "Traced calls (after one untraced).")
flags.DEFINE_integer("top", 40, "Rows to print.")
FLAGS = flags.FLAGS


def _source_lines(hlo_text: str) -> dict[str, str]:
  """Stack frame id -> 'file:line(function)' of its two innermost frames in
  hybridna_jax, from the FileNames / FunctionNames / FileLocations /
  StackFrames tables of the compiled HLO text."""
  tables: dict[str, dict[str, str]] = {}
  section = None
  for line in hlo_text.splitlines():
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      section = line
      tables[section] = {}
      continue
    match = re.match(r"(\d+) (.*)", line) if section else None
    if match is None:
      section = None
      continue
    tables[section][match.group(1)] = match.group(2)
  files, functions = tables.get("FileNames", {}), tables.get("FunctionNames", {})
  locations = {}
  for key, text in tables.get("FileLocations", {}).items():
    m = re.search(r"file_name_id=(\d+) function_name_id=(\d+) line=(\d+)", text)
    path = files.get(m.group(1), "").strip('"')
    locations[key] = (path, functions.get(m.group(2), "").strip('"'), m.group(3))
  parents = {}
  for key, text in tables.get("StackFrames", {}).items():
    m = re.search(r"file_location_id=(\d+) parent_frame_id=(\d+)", text)
    parents[key] = (m.group(1), m.group(2))
  frames = {}
  for key in parents:
    chain, cur, seen = [], key, set()
    while cur in parents and cur not in seen:
      seen.add(cur)
      location, cur = parents[cur]
      path, function, line = locations.get(location, ("", "", ""))
      if "hybridna_jax/" in path:
        chain.append(f"{path.split('hybridna_jax/')[-1]}:{line}({function})")
    frames[key] = " < ".join(chain[:2])
  return frames


def _instruction_sources(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> 'op_name @ source lines'. A fusion without
  metadata of its own (XLA:CPU's library-call fusions) takes that of the
  first instruction inside its fused computation that has some."""
  frames = _source_lines(hlo_text)
  described, calls, first_in = {}, {}, {}
  computation = None
  for line in hlo_text.splitlines():
    header = re.match(r"(?:ENTRY )?%(\S+) \(", line)
    if header:
      computation = header.group(1)
      continue
    m = re.match(r"\s+(?:ROOT )?%(\S+) = ", line)
    if not m:
      continue
    op = re.search(r'op_name="([^"]*)"', line)
    frame = re.search(r"stack_frame_id=(\d+)", line)
    if op:
      name = re.sub(r"jit\([^)]*\)/|closed_call/|while/body/", "", op.group(1))
      described[m.group(1)] = name + (f" @ {frames.get(frame.group(1), '')}" if frame else "")
      first_in.setdefault(computation, described[m.group(1)])
    called = re.search(r"calls=%([\w.-]+)", line)
    if called:
      calls[m.group(1)] = called.group(1)
    if not op:  # the result's shape, and where it runs (e.g. a loop body)
      shape = re.match(r"\s+(?:ROOT )?%\S+ = (\S+)", line).group(1)
      described[m.group(1)] = f"(no metadata) {shape} {m.group(1)} in %{computation}"
  for name, called in calls.items():
    if called in first_in and described[name].startswith("(no metadata)"):
      described[name] = first_in[called]
  return described


def _self_times(trace_events, calls: int) -> collections.Counter:
  """Thunk name -> milliseconds per call of its own work."""
  events = [
    e
    for e in trace_events
    if e.get("ph") == "X" and "dur" in e and not e["name"].startswith(("$", "ThunkExecutor"))
  ]
  by_thread = collections.defaultdict(list)
  for e in events:
    by_thread[(e.get("pid"), e.get("tid"))].append(e)
  own = collections.Counter()
  for thread in by_thread.values():
    thread.sort(key=lambda e: (e["ts"], -e["dur"]))
    stack, children = [], collections.Counter()
    for i, e in enumerate(thread):
      while stack and thread[stack[-1]]["ts"] + thread[stack[-1]]["dur"] <= e["ts"]:
        stack.pop()
      if stack:
        children[stack[-1]] += e["dur"]
      stack.append(i)
    for i, e in enumerate(thread):
      own[e["name"]] += (e["dur"] - children[i]) / 1e3 / calls
  return own


def main(argv):
  del argv
  batch, length = (int(x) for x in FLAGS.shape.split("x"))
  cfg = ModelConfig.from_config(load_config(FLAGS.config).model)
  model = create_model(dataclasses.replace(cfg, dtype="float32"), seed=0)
  graphdef, params = nnx.split(model, nnx.Param)

  def loss(params, inputs, targets):
    logits = nnx.merge(graphdef, params)(inputs).logits
    nll, count, _ = masked_cross_entropy(logits, targets, jnp.ones(inputs.shape, jnp.float32))
    return nll / count

  fn = jax.jit(jax.value_and_grad(loss) if FLAGS.trace == "forward+backward" else loss)
  ids = np.random.default_rng(0).integers(5, 9, (batch, length + 1))
  inputs, targets = jnp.asarray(ids[:, :-1], jnp.int32), jnp.asarray(ids[:, 1:], jnp.int32)
  sources = _instruction_sources(fn.lower(params, inputs, targets).compile().as_text())
  jax.block_until_ready(fn(params, inputs, targets))
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(FLAGS.calls):
        jax.block_until_ready(fn(params, inputs, targets))
    (trace_file,) = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
    with gzip.open(trace_file) as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  by_source = collections.Counter()
  for name, ms in _self_times(events, FLAGS.calls).items():
    by_source[sources.get(name, f"? {name}")] += ms
  total = sum(by_source.values())
  print(environment())
  print(f"{FLAGS.config} {FLAGS.shape} {FLAGS.trace}: {total:,.0f} ms of thunk work per call")
  for source, ms in by_source.most_common(FLAGS.top):
    print(f"{ms:9.1f} ms {100 * ms / total:5.1f}%  {source[:150]}")


if __name__ == "__main__":
  app.run(main)
