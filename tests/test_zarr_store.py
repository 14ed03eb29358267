"""Token stores as zarr v3 through tensorstore: exported to a file:// URL,
served over HTTP on 127.0.0.1, read back equal to the local store, the same
training batches as the local memory map, and a few training steps."""

import copy
import functools
import http.server
import json
import threading

import numpy as np
import pytest

from hybridna_jax.data import pipeline
from hybridna_jax.data import store as store_lib


@pytest.fixture(scope="session")
def exported(lambda_store, tmp_path_factory):
  root = tmp_path_factory.mktemp("zarr") / "store"
  local = store_lib.TokenStore.open(lambda_store.store_dir)
  url = store_lib.export_zarr(local, str(root), chunk_tokens=4096)
  return local, url, root


@pytest.fixture(scope="session")
def http_url(exported):
  """The exported store served by http.server in a thread, for the whole
  session: stopping it earlier left tensorstore retrying reads of a training
  run's leftover prefetch, which stalled later Orbax (tensorstore) saves."""

  class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
      pass

  handler = functools.partial(Quiet, directory=str(exported[2]))
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{server.server_address[1]}/"
  server.shutdown()
  thread.join()


def test_export_and_read_back_over_http(exported, http_url):
  local, url, root = exported
  assert url.startswith("file://") and (root / "train.tokens.zarr" / "zarr.json").exists()
  manifest = json.loads((root / "manifest.json").read_text())
  assert manifest["splits"]["train"]["tokens_zarr"] == "train.tokens.zarr"
  with pytest.raises(store_lib.StoreError, match="already holds a token store"):
    store_lib.export_zarr(local, url)
  for path in (url, http_url):
    remote = store_lib.TokenStore.open(path)
    assert remote.splits == local.splits and store_lib.verify(path) is None
    assert store_lib.is_complete(path)
    for split in local.splits:
      a, b = local[split], remote[split]
      assert b.names == a.names and b.num_tokens == a.num_tokens
      np.testing.assert_array_equal(b.tokens[0 : b.num_tokens], a.tokens[:])
      np.testing.assert_array_equal(b[0].tokens, a[0].tokens)
      np.testing.assert_array_equal(b.tokens[4000:4200], a.tokens[4000:4200])  # across chunks
  with pytest.raises(store_lib.StoreError, match="missing; not a complete exported store"):
    store_lib.TokenStore.open(http_url + "nothing/")


def test_http_store_gives_the_local_batches_and_trains(
  lambda_store, http_url, tiny_config, tmp_path
):
  remote_cfg = copy.deepcopy(lambda_store)
  remote_cfg.store_dir = http_url
  kwargs = dict(seq_len=64, batch_size=4, seed=3)
  local_it = pipeline.train_batches(lambda_store, **kwargs)
  local = [next(local_it) for _ in range(3)]
  # In this process with reader threads, and in a Grain worker process
  # (the store pickles as its URL and reopens there).
  for workers, threads in ((0, 2), (1, 0)):
    remote_cfg.num_workers, remote_cfg.read_threads = workers, threads
    remote_it = pipeline.train_batches(remote_cfg, **kwargs)
    for a in local:
      b = next(remote_it)
      assert a.keys() == b.keys()
      for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=f"{key}, {workers} workers")
    remote_it.close()

  from hybridna_jax.train import loop

  tiny_config.data.store_dir = http_url
  tiny_config.train.stages = ((32, 2, 4),)  # (seq_len, steps, batch)
  assert loop.train(tiny_config, str(tmp_path / "run"))["steps"] == 2
