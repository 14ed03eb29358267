"""Token stores as zarr v3 through tensorstore: exported to a file:// URL,
served over HTTP on 127.0.0.1, read back equal to the local store, the same
training batches as the local memory map, and a few training steps."""

import copy
import functools
import http.server
import json
import os
import threading

import numpy as np
import pytest

from hybridna_jax.data import pipeline, store_writer
from hybridna_jax.data import store as store_lib


@pytest.fixture(scope="session")
def exported(lambda_store, tmp_path_factory):
  root = tmp_path_factory.mktemp("zarr") / "store"
  local = store_lib.TokenStore.open(lambda_store.store_dir)
  url = store_writer.export_zarr(local, str(root), chunk_tokens=4096)
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
  assert store_writer.export_zarr(local, url) == url  # the same store: kept as it is
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


def test_batched_reads_equal_the_memory_map(exported, http_url):
  local = exported[0]["train"]
  remote = store_lib.TokenStore.open(http_url)["train"]
  ranges = [(0, 10), (4000, 4200), (5, 5), (local.num_tokens - 9000, local.num_tokens), (7, 9000)]
  got = store_lib.read_ranges(remote.tokens, ranges)
  want = store_lib.read_ranges(local.tokens, ranges)
  assert [g.shape for g in got] == [(b - a,) for a, b in ranges]
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)


def _url_cfg(lambda_store, url):
  cfg = copy.deepcopy(lambda_store)
  cfg.store_dir = url
  return cfg


def test_prepare_writes_straight_to_a_url(lambda_store, tmp_path):
  from hybridna_jax.data import fasta, prepare

  url = "file://" + str(tmp_path / "direct")
  cfg = _url_cfg(lambda_store, url)
  logs = []
  store = prepare.prepare_store(cfg, log=lambda *a: logs.append(a[0] % a[1:]))
  local = store_lib.TokenStore.open(lambda_store.store_dir)
  assert store.path == url and store_lib.verify(url) is None
  for split in local.splits:
    a, b = local[split], store[split]
    assert b.names == a.names and b.info["per_source"] == a.info["per_source"]
    np.testing.assert_array_equal(b.tokens[0 : b.num_tokens], a.tokens[:])
  assert not (tmp_path / "direct" / store_lib.WRITING_MARKER).exists()
  prepare.prepare_store(cfg, log=lambda *a: logs.append(a[0] % a[1:]))
  assert "re-using it" in logs[-1]

  # Bad input: one error naming the file and line; the complete store stays.
  bad = tmp_path / "bad.fa"
  bad.write_text(">x\nACGT\n>y\nAC!GT\n")
  cfg.fasta_globs = (str(bad),)
  cfg.split.val_records = ()
  with pytest.raises(store_lib.StoreError, match="prepared from other inputs"):
    prepare.prepare_store(cfg)
  cfg.overwrite_store = True
  with pytest.raises(fasta.FastaFormatError, match=r"bad.fa.*line 4") as e:
    prepare.prepare_store(cfg)
  assert "\n" not in str(e.value)
  assert not store_lib.is_complete(url) and not list((tmp_path / "direct").rglob("*.json"))

  # A write killed half-way (no abort) never reads as complete; the next
  # writer clears it. Objects that are not ours are refused.
  writer = store_writer.open_writer(url)
  writer.begin_record("train", "r", "s")
  writer.append(np.full((5000,), 1, np.uint8))
  del writer
  with pytest.raises(store_lib.StoreError, match="missing; a preparation .* was interrupted"):
    store_lib.TokenStore.open(url)
  cfg.fasta_globs, cfg.overwrite_store = lambda_store.fasta_globs, False
  cfg.split.val_records = lambda_store.split.val_records
  assert prepare.prepare_store(cfg)["train"].num_tokens == local["train"].num_tokens
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "notes.txt").write_text("mine")
  with pytest.raises(store_lib.StoreError, match="not a token store; choose an empty URL"):
    store_writer.open_writer("file://" + str(tmp_path / "other"))
  with pytest.raises(store_lib.StoreError, match="http\\(s\\):// is read-only"):
    store_writer.open_writer("http://127.0.0.1:1/x")


def _hundred_token_store(path):
  """A store of one 100-token training record, to stand for another store."""
  with store_writer.TokenStoreWriter(path) as writer:
    writer.begin_record("train", "r", "s")
    writer.append(np.full((100,), 5, np.uint8))
    return writer.commit()


def test_export_never_deletes_what_is_not_an_export(lambda_store, tmp_path):
  local = store_lib.TokenStore.open(lambda_store.store_dir)
  other = _hundred_token_store(tmp_path / "other_store")
  folder = tmp_path / "papers"
  folder.mkdir()
  (folder / "draft.txt").write_text("mine")
  for overwrite in (False, True):
    with pytest.raises(store_lib.StoreError, match="not a token store; choose an empty URL"):
      store_writer.export_zarr(local, str(folder), overwrite=overwrite)
  assert [p.name for p in folder.iterdir()] == ["draft.txt"]
  # Onto the store itself, or a folder holding it: refused before any change.
  for target in (lambda_store.store_dir, os.path.dirname(lambda_store.store_dir)):
    with pytest.raises(store_lib.StoreError, match="is the store's own location"):
      store_writer.export_zarr(local, target, overwrite=True)
  assert store_lib.verify(lambda_store.store_dir) is None
  # Another store's export is replaced only with overwrite.
  url = store_writer.export_zarr(local, str(tmp_path / "export"), chunk_tokens=4096)
  with pytest.raises(store_lib.StoreError, match="already holds a token store"):
    store_writer.export_zarr(other, url)
  assert store_lib.TokenStore.open(url)["train"].num_tokens == local["train"].num_tokens
  store_writer.export_zarr(other, url, chunk_tokens=4096, overwrite=True)
  assert store_lib.TokenStore.open(url)["train"].num_tokens == other["train"].num_tokens


def test_export_to_a_local_path_with_url_characters(tmp_path):
  # '#', '%' and spaces are path characters here, not URL syntax.
  other = _hundred_token_store(tmp_path / "other_store")
  for name in ("exp#1", "exp%3", "a b"):
    url = store_writer.export_zarr(other, str(tmp_path / name), chunk_tokens=4096)
    assert os.path.exists(tmp_path / name / store_lib.MANIFEST)
    assert store_lib.TokenStore.open(url)["train"].num_tokens == 100
    assert store_lib.TokenStore.open(tmp_path / name)["train"].num_tokens == 100


def test_a_write_killed_while_sealing_reads_complete_and_stays_ours(
  lambda_store, tmp_path, monkeypatch
):
  # The manifest goes in before the writing marker comes out: killed in
  # between, the store is complete (readable) and the next writer still
  # treats the location as a store, not as someone else's objects.
  class KilledAtMarker:
    def __init__(self, kv):
      self._kv = kv

    def __getattr__(self, name):
      return getattr(self._kv, name)

    def delete_range(self, key_range):
      if key_range.inclusive_min == store_lib.WRITING_MARKER.encode():
        raise KeyboardInterrupt("killed")
      return self._kv.delete_range(key_range)

  claim = store_writer._claim_url
  monkeypatch.setattr(store_writer, "_claim_url", lambda *a, **k: KilledAtMarker(claim(*a, **k)))
  local = store_lib.TokenStore.open(lambda_store.store_dir)
  url = "file://" + str(tmp_path / "export")
  with pytest.raises(KeyboardInterrupt):
    store_writer.export_zarr(local, url, chunk_tokens=4096)
  monkeypatch.undo()
  assert (tmp_path / "export" / store_lib.WRITING_MARKER).exists()
  assert store_lib.is_complete(url) and store_lib.verify(url) is None
  np.testing.assert_array_equal(
    store_lib.TokenStore.open(url)["val"].tokens[:], local["val"].tokens[:]
  )
  other = _hundred_token_store(tmp_path / "other_store")
  with pytest.raises(store_lib.StoreError, match="already holds a token store"):
    store_writer.export_zarr(other, url)
  store_writer.export_zarr(other, url, chunk_tokens=4096, overwrite=True)
  assert not (tmp_path / "export" / store_lib.WRITING_MARKER).exists()
  assert store_lib.TokenStore.open(url).splits == ("train",)


class _StoppedMidDelete:
  """A kvstore whose `delete_range` deletes the first object of a range of
  several, then is stopped (Ctrl-C twice): object stores delete a range one
  object at a time, in key order."""

  def __init__(self, kv):
    self._kv = kv

  def __getattr__(self, name):
    return getattr(self._kv, name)

  def delete_range(self, key_range):
    keys = sorted(self._kv.list(key_range).result())
    if len(keys) < 2:
      return self._kv.delete_range(key_range)
    ts = store_lib.tensorstore()
    self._kv.delete_range(ts.KvStore.KeyRange(keys[0], keys[0] + b"\0")).result()
    raise KeyboardInterrupt("stopped while deleting")


def test_a_stop_while_deleting_leaves_objects_the_next_writer_clears(tmp_path, monkeypatch):
  """Stopped part-way through deleting (an abort, or the overwrite of an old
  store): what is left is still marked as ours, so the next preparation
  clears it (review: the marker went first, and the URL was refused for
  good as "not a token store", overwrite or not)."""
  other = _hundred_token_store(tmp_path / "other_store")
  url = "file://" + str(tmp_path / "export")
  # An abort stopped part-way.
  writer = store_writer.open_writer(url, overwrite=True)
  writer.begin_record("train", "r", "s")
  writer.append(np.full((20000,), 1, np.uint8))
  writer._splits["train"].close(url)  # pylint: disable=protected-access
  writer._kv = _StoppedMidDelete(writer._kv)  # pylint: disable=protected-access
  with pytest.raises(KeyboardInterrupt):
    writer.abort()
  assert (tmp_path / "export" / store_lib.WRITING_MARKER).exists()
  with pytest.raises(store_lib.StoreError, match="was interrupted .* run launch/prepare_data"):
    store_lib.TokenStore.open(url)
  store_writer.export_zarr(other, url, chunk_tokens=16)
  # The overwrite of that complete store, stopped part-way.
  real = store_lib.open_kvstore
  monkeypatch.setattr(store_lib, "open_kvstore", lambda u: _StoppedMidDelete(real(u)))
  with pytest.raises(KeyboardInterrupt):
    store_writer.export_zarr(other, url, chunk_tokens=16, overwrite=True)
  monkeypatch.undo()
  assert not store_lib.is_complete(url)
  store_writer.export_zarr(other, url, chunk_tokens=16)  # cleared without overwrite: ours
  assert store_lib.TokenStore.open(url)["train"].num_tokens == 100


def test_an_unreachable_url_is_one_line_not_a_hang(monkeypatch):
  # tensorstore retries a refused connection for minutes, silently.
  monkeypatch.setattr(store_lib, "CONTACT_TIMEOUT_S", 1.0)
  for call in (store_lib.is_complete, store_lib.TokenStore.open):
    with pytest.raises(store_lib.StoreError, match=r"manifest.json: no answer in 1 s; check"):
      call("http://127.0.0.1:1/store")


def test_missing_or_replaced_chunks_are_never_read_as_padding(lambda_store, tmp_path):
  """A chunk object lost from an export (a cut copy, a lifecycle rule) is an
  error naming it, not tokens of 0 (<pad>); a store prepared again at the
  same URL is read anew by the same process, not from the chunk cache."""
  local = store_lib.TokenStore.open(lambda_store.store_dir)
  root = tmp_path / "export"
  url = store_writer.export_zarr(local, str(root), chunk_tokens=4096)
  expected = local["train"].tokens[8192:8200].copy()
  np.testing.assert_array_equal(store_lib.TokenStore.open(url)["train"].tokens[8192:8200], expected)
  # Prepared again (another store written over it): the same process reads the new tokens.
  with store_writer.TokenStoreWriter(str(tmp_path / "other")) as writer:
    writer.begin_record("train", "g", "g")
    writer.append(np.full(local["train"].num_tokens, 7, np.uint8))
    writer.commit()
  store_writer.export_zarr(
    store_lib.TokenStore.open(str(tmp_path / "other")),
    str(tmp_path / "other_export"),
    chunk_tokens=4096,
  )
  chunk = root / "train.tokens.zarr" / "c" / "2"
  chunk.write_bytes((tmp_path / "other_export" / "train.tokens.zarr" / "c" / "2").read_bytes())
  assert (store_lib.TokenStore.open(url)["train"].tokens[8192:8200] == 7).all()
  chunk.unlink()
  with pytest.raises(ValueError, match=r"NOT_FOUND: chunk \{2\} .*c/2.* is missing"):
    store_lib.TokenStore.open(url)["train"].tokens[8192:8200]


def test_an_export_named_by_its_local_path_is_read_and_kept(lambda_store, tmp_path):
  """--export_url takes a local path, which data.store_dir may then name: it
  is read as the export (it failed on a missing train.tokens), and
  preparing into it re-uses it (it was taken for damage and replaced)."""
  from hybridna_jax.data import prepare

  local = store_lib.TokenStore.open(lambda_store.store_dir)
  path = str(tmp_path / "export")
  store_writer.export_zarr(local, path)
  store = store_lib.TokenStore.open(path)
  assert store.path == "file://" + path and store_lib.verify(path) is None
  np.testing.assert_array_equal(store["val"].tokens[0:100], local["val"].tokens[0:100])
  cfg = _url_cfg(lambda_store, path)
  logs = []
  prepare.prepare_store(cfg, log=lambda *a: logs.append(a[0] % a[1:]))
  assert "re-using it" in logs[-1] and (tmp_path / "export" / "train.tokens.zarr").is_dir()
