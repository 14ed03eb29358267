r"""Training-pipeline throughput: tokens/s per host, by window and workers.

    python benchmarks/data_pipeline.py                       # synthetic store
    python benchmarks/data_pipeline.py --store_dir=data_cache/example_store
    python benchmarks/data_pipeline.py --zarr      # memmap and zarr v3 (tensorstore)
    python benchmarks/data_pipeline.py --zarr --http --reads=per_window,batched \
        --http_latency_ms=0,20    # ... also over HTTP on 127.0.0.1, reads one by one vs per batch

Builds (or opens) a token store, then for each window length and worker
count times `pipeline.train_batches` in steady state: first batch (start-up,
worker spawn) excluded, then --seconds of batches. Batches hold
--batch_tokens tokens (batch_size = batch_tokens // seq_len), with the
default augmentation (reverse complement 0.5), N-filter and packing. Tokens/s
counts the B x L input positions delivered, windows/s the rows. --reads
compares reading a batch's windows one after another (per_window, as before
batched reads) with issuing them together (batched, `store.read_ranges`).
--http serves the zarr export with http.server on 127.0.0.1 (listen backlog
--http_backlog, not socketserver's 5), optionally delaying every response by
--http_latency_ms (a stand-in for object-storage latency), and reports the
GETs and MB it served per timed batch. Record results in benchmarks/RESULTS.md.
"""

import contextlib
import functools
import http.server
import os
import platform
import shutil
import tempfile
import threading
import time

import grain
import numpy as np
from absl import app, flags

from hybridna_jax import tokenizer
from hybridna_jax.data import config as config_lib
from hybridna_jax.data import pipeline, store_writer
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
  "Also export the store as zarr v3 to a file:// URL (store_writer.export_zarr) and measure "
  "reading it through tensorstore beside the memory map.",
)
_HTTP = flags.DEFINE_bool("http", False, "With --zarr: also read the export over HTTP (127.0.0.1).")
_LATENCY = flags.DEFINE_list("http_latency_ms", ["0"], "Delays of each HTTP response (ms).")
# Listen backlog of the stand-in server. socketserver's default is 5: a
# batch's reads open up to tensorstore's http_request_concurrency (32)
# connections at once (http.server answers HTTP/1.0, one request a
# connection), the kernel drops the SYNs past the backlog and the client
# resends them after its 1 s initial retransmission timeout, so batched
# reads measured ~1.5-2.3 s a batch whatever the latency (TcpExt
# ListenOverflows and TCPSynRetrans counted them). Object stores accept far
# more; so does this stand-in now.
_BACKLOG = flags.DEFINE_integer(
  "http_backlog", 256, "Listen backlog of the HTTP server (5 reproduces the old one)."
)
_READS = flags.DEFINE_list("reads", ["batched"], "per_window and/or batched (workers=0 only).")
_CACHE_MB = flags.DEFINE_integer(
  "zarr_cache_mb", store_lib.ZARR_CACHE_BYTES >> 20, "tensorstore chunk cache (MiB)."
)


def serve(directory: str, latency_ms: float, served: dict):
  """http.server over `directory` in a thread, each response delayed;
  counts the GETs and body bytes it serves in `served`."""
  lock = threading.Lock()

  class Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
      pass

    def send_head(self):
      time.sleep(latency_ms / 1000)
      f = super().send_head()
      if f is not None and self.command == "GET":
        with lock:
          served["requests"] = served.get("requests", 0) + 1
          served["bytes"] = served.get("bytes", 0) + os.fstat(f.fileno()).st_size
      return f

  class Server(http.server.ThreadingHTTPServer):
    request_queue_size = _BACKLOG.value

  server = Server(("127.0.0.1", 0), functools.partial(Handler, directory=directory))
  threading.Thread(target=server.serve_forever, daemon=True).start()
  return server, f"http://127.0.0.1:{server.server_address[1]}/"


@contextlib.contextmanager
def reads(mode: str):
  """per_window: store.read_ranges reads one range after another."""
  real = store_lib.read_ranges
  if mode == "per_window":
    store_lib.read_ranges = lambda tokens, ranges: [tokens[lo:hi] for lo, hi in ranges]
  try:
    yield
  finally:
    store_lib.read_ranges = real


def synthetic_store(path: str, megabases: int, seed: int = 0) -> str:
  """A multi-source store: 24 genomes of log-normal sizes, 1-10 records
  each, ~3% of tokens in N runs (assembly gaps), random A/C/G/T otherwise."""
  rng = np.random.default_rng(seed)
  sizes = rng.lognormal(0.0, 1.0, 24)
  sizes = (sizes / sizes.sum() * megabases * 1e6).astype(np.int64) + 1000
  with store_writer.TokenStoreWriter(path, overwrite=True) as w:
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


def measure(data_cfg, seq_len: int, workers: int, served: dict | None = None) -> dict:
  """Throughput of `train_batches`; `served` (an HTTP server's counts) is
  cleared when the timed batches start and read per batch after."""
  served = {} if served is None else served
  data_cfg.num_workers = workers
  batch_size = max(1, _BATCH_TOKENS.value // seq_len)
  t0 = time.perf_counter()
  it = pipeline.train_batches(data_cfg, seq_len=seq_len, batch_size=batch_size, seed=0)
  try:
    next(it)
    startup = time.perf_counter() - t0
    count = 0
    served.clear()
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
    "windows_per_s": count * batch_size / elapsed,
    "requests_per_batch": served.get("requests", 0) / max(count, 1),
    "mb_per_batch": served.get("bytes", 0) / 1e6 / max(count, 1),
    "tokens_per_s": count * batch_size * seq_len / elapsed,
  }


def main(argv):
  del argv
  tmp = None
  store_lib.ZARR_CACHE_BYTES = _CACHE_MB.value << 20  # before the first zarr open
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
      f"{data_cfg.max_n_fraction}, batch_tokens={_BATCH_TOKENS.value}, "
      f"zarr cache {_CACHE_MB.value} MiB"
    )
    layouts = [("memmap", store_dir, None)]
    if _ZARR.value:
      zarr_dir = tempfile.mkdtemp(prefix="hybridna_zarr_")
      t0 = time.perf_counter()
      url = store_writer.export_zarr(store, os.path.join(zarr_dir, "store"))
      print(f"exported to {url} in {time.perf_counter() - t0:.1f}s")
      layouts.append(("zarr", url, None))
      servers = []
      if _HTTP.value:
        for ms in map(float, _LATENCY.value):
          served = {}
          server, http_url = serve(os.path.join(zarr_dir, "store"), ms, served)
          servers.append(server)
          layouts.append((f"http+{ms:g}ms", http_url, served))
    print(
      f"{'store':>10} {'reads':>10} {'seq_len':>8} {'batch':>6} {'workers':>7} "
      f"{'startup s':>9} {'windows/s':>9} {'M tokens/s':>10} {'GETs/batch':>10} "
      f"{'MB/batch':>8}"
    )
    for label, path, served in layouts:
      data_cfg.store_dir = path
      for seq_len in map(int, _SEQ_LENS.value):
        for workers in map(int, _WORKERS.value):
          for mode in _READS.value:
            with reads(mode):
              r = measure(data_cfg, seq_len, workers, served)
            print(
              f"{label:>10} {mode:>10} {r['seq_len']:>8} {r['batch_size']:>6} "
              f"{r['workers']:>7} {r['startup_s']:>9.2f} {r['windows_per_s']:>9.1f} "
              f"{r['tokens_per_s'] / 1e6:>10.1f}"
              + (
                f" {r['requests_per_batch']:>10.1f} {r['mb_per_batch']:>8.1f}"
                if served is not None
                else ""
              ),
              flush=True,
            )
    if _ZARR.value:
      for server in servers:
        server.shutdown()
      shutil.rmtree(zarr_dir, ignore_errors=True)
  finally:
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
