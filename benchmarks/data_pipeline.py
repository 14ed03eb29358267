r"""Training-pipeline throughput: tokens/s per host, by window and workers.

    python benchmarks/data_pipeline.py                       # synthetic store
    python benchmarks/data_pipeline.py --store_dir=data_cache/example_store
    python benchmarks/data_pipeline.py --zarr      # memmap and zarr v3 (tensorstore)

Builds (or opens) a token store, then for each window length and worker
count times `pipeline.train_batches` in steady state: first batch (start-up,
worker spawn) excluded, then --seconds of batches. Batches hold
--batch_tokens tokens (batch_size = batch_tokens // seq_len), with the
default augmentation (reverse complement 0.5), N-filter and packing. Tokens/s
counts the B x L input positions delivered. Record results in
benchmarks/RESULTS.md.
"""

import os
import platform
import shutil
import tempfile
import time

import grain
import numpy as np
from absl import app, flags

from hybridna_jax import tokenizer
from hybridna_jax.data import config as config_lib
from hybridna_jax.data import pipeline
from hybridna_jax.data import store as store_lib

_STORE_DIR = flags.DEFINE_string(
  "store_dir", None, "Existing token store; default: a synthetic one."
)
_SYNTHETIC_MB = flags.DEFINE_integer(
  "synthetic_mb", 256, "Size of the synthetic store's train split (Mb)."
)
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["8192", "131072"], "Window lengths (tokens).")
_WORKERS = flags.DEFINE_list("workers", ["0", "2"], "Grain worker process counts.")
_BATCH_TOKENS = flags.DEFINE_integer("batch_tokens", 1 << 19, "Tokens per batch (per host).")
_SECONDS = flags.DEFINE_float("seconds", 8.0, "Timed seconds per setting.")
_THREADS = flags.DEFINE_integer("read_threads", 0, "data.read_threads.")
_ZARR = flags.DEFINE_bool(
  "zarr",
  False,
  "Also export the store as zarr v3 to a file:// URL (store.export_zarr) and measure "
  "reading it through tensorstore beside the memory map.",
)


def synthetic_store(path: str, megabases: int, seed: int = 0) -> str:
  """A multi-source store: 24 genomes of log-normal sizes, 1-10 records
  each, ~3% of tokens in N runs (assembly gaps), random A/C/G/T otherwise."""
  rng = np.random.default_rng(seed)
  sizes = rng.lognormal(0.0, 1.0, 24)
  sizes = (sizes / sizes.sum() * megabases * 1e6).astype(np.int64) + 1000
  with store_lib.TokenStoreWriter(path, overwrite=True) as w:
    for g, size in enumerate(sizes):
      cuts = np.sort(rng.integers(0, size, int(rng.integers(0, 10))))
      lengths = np.diff(np.concatenate([[0], cuts, [size]]))
      for r, length in enumerate(lengths[lengths > 0]):
        w.begin_record("train", f"chr{r}", f"genome{g}")
        for lo in range(0, int(length), 1 << 24):
          n = min(1 << 24, int(length) - lo)
          chunk = rng.integers(tokenizer.A, tokenizer.T + 1, n, dtype=np.uint8)
          for start in rng.integers(0, n, max(1, n // 200_000)):
            chunk[start : start + 6000] = tokenizer.N
          w.append(chunk)
    w.commit()
  return path


def measure(data_cfg, seq_len: int, workers: int) -> dict:
  data_cfg.num_workers = workers
  batch_size = max(1, _BATCH_TOKENS.value // seq_len)
  t0 = time.perf_counter()
  it = pipeline.train_batches(data_cfg, seq_len=seq_len, batch_size=batch_size, seed=0)
  try:
    next(it)
    startup = time.perf_counter() - t0
    count = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < _SECONDS.value:
      batch = next(it)
      count += 1
    elapsed = time.perf_counter() - t0
  finally:
    it.close()
  assert batch["inputs"].shape == (batch_size, seq_len)
  return {
    "seq_len": seq_len,
    "batch_size": batch_size,
    "workers": workers,
    "startup_s": startup,
    "batches": count,
    "batches_per_s": count / elapsed,
    "tokens_per_s": count * batch_size * seq_len / elapsed,
  }


def main(argv):
  del argv
  tmp = None
  store_dir = _STORE_DIR.value
  if store_dir is None:
    tmp = tempfile.mkdtemp(prefix="hybridna_bench_")
    t0 = time.perf_counter()
    store_dir = synthetic_store(os.path.join(tmp, "store"), _SYNTHETIC_MB.value)
    print(f"synthetic store: {_SYNTHETIC_MB.value} Mb in {time.perf_counter() - t0:.1f}s")
  try:
    store = store_lib.TokenStore.open(store_dir)
    train = store["train"]
    print(
      f"store: {store_dir}: {train.num_tokens / 1e6:.1f} Mb train, "
      f"{train.num_records} records, {len(store.sources)} sources"
    )
    print(
      f"host: {platform.platform()}, {os.cpu_count()} CPUs, Python "
      f"{platform.python_version()}, numpy {np.__version__}, grain "
      f"{grain.__version__}"
    )
    data_cfg = config_lib.default_data_config()
    data_cfg.store_dir = store_dir
    data_cfg.read_threads = _THREADS.value
    print(
      f"read_threads={data_cfg.read_threads}, packing="
      f"{data_cfg.packing}, reverse_complement_prob="
      f"{data_cfg.reverse_complement_prob}, max_n_fraction="
      f"{data_cfg.max_n_fraction}, batch_tokens={_BATCH_TOKENS.value}"
    )
    layouts = [("memmap", store_dir)]
    if _ZARR.value:
      zarr_dir = tempfile.mkdtemp(prefix="hybridna_zarr_")
      t0 = time.perf_counter()
      url = store_lib.export_zarr(store, os.path.join(zarr_dir, "store"))
      print(f"exported to {url} in {time.perf_counter() - t0:.1f}s")
      layouts.append(("zarr", url))
    print(
      f"{'store':>6} {'seq_len':>8} {'batch':>6} {'workers':>7} {'startup s':>9} "
      f"{'batches/s':>9} {'M tokens/s':>10}"
    )
    for label, path in layouts:
      data_cfg.store_dir = path
      for seq_len in map(int, _SEQ_LENS.value):
        for workers in map(int, _WORKERS.value):
          r = measure(data_cfg, seq_len, workers)
          print(
            f"{label:>6} {r['seq_len']:>8} {r['batch_size']:>6} {r['workers']:>7} "
            f"{r['startup_s']:>9.2f} {r['batches_per_s']:>9.1f} "
            f"{r['tokens_per_s'] / 1e6:>10.1f}",
            flush=True,
          )
    if _ZARR.value:
      shutil.rmtree(zarr_dir, ignore_errors=True)
  finally:
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
