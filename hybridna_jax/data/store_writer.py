"""Writing token stores (their layout: the `store` module docstring).

Writes are atomic: `TokenStoreWriter` builds the store in a temporary
directory next to the target and renames it into place only after every file
is flushed and the manifest is written, so an interrupted preparation never
leaves a directory that `TokenStore.open` accepts. `ZarrStoreWriter` writes
straight to a kvstore URL as an exported store, `export_zarr` copies a
prepared store to one, and `open_writer` picks the writer for a path.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import time
from typing import Any

import numpy as np
from absl import logging

from hybridna_jax import tokenizer
from hybridna_jax.data import store as store_lib
from hybridna_jax.paths import file_url, is_url, local_file_path, scheme, write_json


class _SplitWriter:
  """Appends the records of one split to its files."""

  def __init__(self, root: str, name: str):
    self.name = name
    self.tokens_file = f"{name}.tokens"
    self.index_file = f"{name}.index.npy"
    self.names_file = f"{name}.names.txt"
    # Open for the writer's lifetime; closed in close() or discard().
    self._tokens = open(  # pylint: disable=consider-using-with
      os.path.join(root, self.tokens_file), "wb"
    )
    self._names = open(  # pylint: disable=consider-using-with
      os.path.join(root, self.names_file), "w", encoding="utf-8"
    )
    # Growable columns; a few bytes a record, however many records.
    self._rows = np.zeros((1024,), store_lib.INDEX_DTYPE)
    self.num_records = 0
    self.num_tokens = 0
    self.per_source: dict[str, dict[str, int]] = {}

  def begin(self, name: str, source_id: int, source: str):
    if self.num_records == self._rows.size:
      self._rows = np.resize(self._rows, 2 * self._rows.size)
    self._rows[self.num_records] = (self.num_tokens, 0, source_id)
    self.num_records += 1
    self._write_name(name)
    stats = self.per_source.setdefault(source, {"records": 0, "tokens": 0, "n_tokens": 0})
    stats["records"] += 1
    self._stats = stats

  def _write_name(self, name: str) -> None:
    self._names.write(name + "\n")

  def _write_tokens(self, tokens: np.ndarray) -> None:
    self._tokens.write(memoryview(tokens))

  def append(self, tokens: np.ndarray):
    self._write_tokens(np.ascontiguousarray(tokens, np.uint8))
    n = int(tokens.size)
    self._rows["length"][self.num_records - 1] += n
    self.num_tokens += n
    self._stats["tokens"] += n
    self._stats["n_tokens"] += int(np.count_nonzero(tokens == tokenizer.N))

  def close(self, root: str) -> dict[str, Any]:
    for f in (self._tokens, self._names):
      f.flush()
      os.fsync(f.fileno())
      f.close()
    with open(os.path.join(root, self.index_file), "wb") as f:
      np.save(f, self._rows[: self.num_records])
      f.flush()
      os.fsync(f.fileno())
    return self._info()

  def _info(self) -> dict[str, Any]:
    return {
      "num_records": self.num_records,
      "num_tokens": self.num_tokens,
      "tokens_file": self.tokens_file,
      "index_file": self.index_file,
      "names_file": self.names_file,
      "per_source": self.per_source,
    }

  def discard(self):
    for f in (self._tokens, self._names):
      if not f.closed:
        f.close()


class TokenStoreWriter:
  """Writes a token store atomically.

      with TokenStoreWriter(path) as w:
        w.begin_record("train", "chr1", source="human")
        w.append(tokens)            # uint8 chunks, as many as needed
        ...
        w.commit(metadata={...})    # without commit, nothing appears at path

  Leaving the `with` block without `commit` (or with an exception) deletes
  the temporary directory. Temporary directories left by killed processes
  (named `.<store>.tmp-<pid>-...`) are removed by the next writer.
  """

  def __init__(self, path: str | os.PathLike, *, overwrite: bool = False):
    self.path = os.path.abspath(os.fspath(path))
    parent, base = os.path.split(self.path)
    if os.path.exists(self.path) and not _is_empty_dir(self.path):
      # Only a store (a manifest, even a damaged one) is ever replaced:
      # data.store_dir pointed at a folder of genomes must not delete them.
      if not os.path.isfile(os.path.join(self.path, store_lib.MANIFEST)):
        raise store_lib.StoreError(
          f"data.store_dir={self.path} exists and is not a token store; choose a new or "
          "empty directory."
        )
      if not overwrite:
        raise store_lib.StoreError(
          f"data.store_dir={self.path} already holds a token store; delete it or allow "
          "overwriting (data.overwrite_store=True)."
        )
    os.makedirs(parent, exist_ok=True)
    _remove_stale_temporaries(parent, base)
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    self.tmp = os.path.join(parent, f".{base}.tmp-{tag}")
    self._old = os.path.join(parent, f".{base}.old-{tag}")
    os.makedirs(self.tmp)
    self._splits: dict[str, _SplitWriter] = {}
    self._sources: dict[str, int] = {}
    self._current: _SplitWriter | None = None
    self._done = False

  def __enter__(self) -> TokenStoreWriter:
    return self

  def __exit__(self, *exc) -> None:
    if not self._done:
      self.abort()

  @property
  def num_tokens(self) -> int:
    return sum(s.num_tokens for s in self._splits.values())

  @property
  def num_records(self) -> int:
    return sum(s.num_records for s in self._splits.values())

  def split_counts(self) -> dict[str, tuple[int, int]]:
    """{split: (records, tokens)} written so far."""
    return {n: (s.num_records, s.num_tokens) for n, s in self._splits.items()}

  def begin_record(self, split: str, name: str, source: str) -> None:
    """Starts a record; following `append` calls add its tokens."""
    if "\n" in name or not name:
      raise ValueError(f"invalid record name {name!r}")
    if split not in self._splits:
      if not split.isidentifier():
        raise ValueError(f"split names must be identifiers, got {split!r}")
      self._splits[split] = self._new_split(split)
    source_id = self._sources.setdefault(source, len(self._sources))
    self._current = self._splits[split]
    self._current.begin(name, source_id, source)

  def append(self, tokens: np.ndarray) -> None:
    """Appends uint8 token ids to the current record."""
    if self._current is None:
      raise ValueError("append() before begin_record()")
    self._current.append(tokens)

  def _new_split(self, split: str) -> _SplitWriter:
    return _SplitWriter(self.tmp, split)

  def _manifest(self, splits: dict[str, Any], metadata: dict[str, Any] | None) -> dict[str, Any]:
    return {
      "format": store_lib.FORMAT,
      "version": store_lib.VERSION,
      "vocabulary": store_lib.vocabulary(),
      "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
      "sources": list(self._sources),
      "splits": splits,
      "metadata": metadata or {},
    }

  def commit(self, metadata: dict[str, Any] | None = None) -> store_lib.TokenStore:
    """Finishes the files, writes the manifest and moves the store in place."""
    splits = {n: s.close(self.tmp) for n, s in self._splits.items()}
    manifest = self._manifest(splits, metadata)
    write_json(os.path.join(self.tmp, store_lib.MANIFEST), manifest)
    _fsync_dir(self.tmp)
    replaced = os.path.exists(self.path)
    if replaced:
      os.rename(self.path, self._old)
    os.rename(self.tmp, self.path)
    _fsync_dir(os.path.dirname(self.path))
    if replaced:
      shutil.rmtree(self._old, ignore_errors=True)
    self._done = True
    return store_lib.TokenStore.open(self.path)

  def abort(self) -> None:
    """Deletes everything written so far."""
    for s in self._splits.values():
      s.discard()
    shutil.rmtree(self.tmp, ignore_errors=True)
    self._done = True


def _is_empty_dir(path: str) -> bool:
  return os.path.isdir(path) and not os.listdir(path)


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _remove_stale_temporaries(parent: str, base: str) -> None:
  for kind in (".tmp-", ".old-"):
    prefix = f".{base}{kind}"
    for entry in os.listdir(parent):
      if not entry.startswith(prefix):
        continue
      pid = entry[len(prefix) :].split("-", 1)[0]
      if pid.isdigit() and not _pid_alive(int(pid)):
        logging.info("Removing %s left by an interrupted preparation.", os.path.join(parent, entry))
        shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _fsync_dir(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _create_zarr_tokens(url: str, name: str, size: int, chunk_tokens: int = store_lib.ZARR_CHUNK):
  """A new (size,) uint8 zarr v3 array `name` under `url` (zstd chunks of
  `chunk_tokens`), replacing any there; the tensorstore handle."""
  spec = {
    "driver": "zarr3",
    "kvstore": store_lib.url_dir(url) + name + "/",
    "metadata": {
      "shape": [size],
      "data_type": "uint8",
      "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [chunk_tokens]}},
      "codecs": [{"name": "bytes"}, {"name": "zstd", "configuration": {"level": 3}}],
    },
  }
  return (
    store_lib.tensorstore()
    .open(spec, create=True, delete_existing=True, context=store_lib.ts_context())
    .result()
  )


def _write_index_and_names(kvstore, info: dict[str, Any], index: np.ndarray, names) -> None:
  buf = io.BytesIO()
  np.save(buf, index)
  kvstore.write(info["index_file"], buf.getvalue()).result()
  kvstore.write(info["names_file"], "\n".join(names).encode("utf-8")).result()


class _ZarrSplitWriter(_SplitWriter):
  """One split written to a zarr v3 array: tokens buffered up to `buffer`
  whole chunks and written chunk-aligned (bounded memory); index rows and
  names kept in memory (a few bytes a record) and written at the end."""

  def __init__(self, url: str, name: str, chunk_tokens: int, buffer_chunks: int = 16):
    self.name = name
    self.tokens_file = f"{name}.tokens"
    self.index_file = f"{name}.index.npy"
    self.names_file = f"{name}.names.txt"
    self.tokens_zarr = f"{name}.tokens.zarr"
    self._url, self._chunk = url, chunk_tokens
    # Grown before each write (metadata only; writes are chunk-aligned).
    self._array = _create_zarr_tokens(url, self.tokens_zarr, 0, chunk_tokens)
    self._buffer = np.zeros((buffer_chunks * chunk_tokens,), np.uint8)
    self._filled = 0  # tokens in the buffer
    self._flushed = 0  # tokens written to the array
    self._name_list: list[str] = []
    self._rows = np.zeros((1024,), store_lib.INDEX_DTYPE)
    self.num_records = 0
    self.num_tokens = 0
    self.per_source = {}

  def _write_name(self, name: str) -> None:
    self._name_list.append(name)

  def _write_tokens(self, tokens: np.ndarray) -> None:
    while tokens.size:
      n = min(tokens.size, self._buffer.size - self._filled)
      self._buffer[self._filled : self._filled + n] = tokens[:n]
      self._filled, tokens = self._filled + n, tokens[n:]
      if self._filled == self._buffer.size:
        self._flush()

  def _flush(self) -> None:
    stop = self._flushed + self._filled
    self._array = self._array.resize(
      exclusive_max=[stop], expand_only=True, resize_metadata_only=True
    ).result()
    self._array[self._flushed : stop].write(self._buffer[: self._filled]).result()
    self._flushed, self._filled = stop, 0

  def close(self, root: str) -> dict[str, Any]:
    del root
    self._flush()
    _write_index_and_names(
      store_lib.open_kvstore(self._url),
      self._info(),
      self._rows[: self.num_records],
      self._name_list,
    )
    return {**self._info(), "tokens_zarr": self.tokens_zarr}

  def discard(self):
    pass


class ZarrStoreWriter(TokenStoreWriter):
  """`TokenStoreWriter` straight to a kvstore URL (file://, gs://, s3://)
  as an exported store (zarr v3 tokens, `store` module docstring), in bounded
  memory. The manifest, written last, marks it complete: an interrupted
  write never reads as a store, and its objects (marked by WRITING_MARKER)
  are deleted by `abort` or by the next writer to the same URL. What is
  already at the URL is handled by `_claim_url`.

  Raises:
    StoreError: a complete store is there and not `overwrite`, or the URL
      holds other objects.
  """

  def __init__(
    self, url: str, *, overwrite: bool = False, chunk_tokens: int = store_lib.ZARR_CHUNK
  ):
    self.path = url
    self._kv = _claim_url(url, overwrite=overwrite, field="data.store_dir")
    self._chunk = chunk_tokens
    self._splits: dict[str, _SplitWriter] = {}
    self._sources: dict[str, int] = {}
    self._current: _SplitWriter | None = None
    self._done = False

  def _new_split(self, split: str) -> _SplitWriter:
    return _ZarrSplitWriter(self.path, split, self._chunk)

  def commit(self, metadata: dict[str, Any] | None = None) -> store_lib.TokenStore:
    """Writes the remaining tokens, the indexes and names, then the manifest."""
    splits = {n: s.close(self.path) for n, s in self._splits.items()}
    _seal_url(self._kv, self._manifest(splits, metadata))
    self._done = True
    return store_lib.TokenStore.open(self.path)

  def abort(self) -> None:
    """Deletes every object written so far, the writing marker last (an
    object store deletes a range one object at a time: stopped part-way,
    the leftovers still read as ours)."""
    _clear_all_but_marker(self._kv)
    _delete_marker(self._kv)
    self._done = True


def _claim_url(url: str, *, overwrite: bool, field: str):
  """The kvstore at `url`, emptied for a new store and marked as being
  written (WRITING_MARKER; `_seal_url` finishes it).

  What is already there decides: nothing, or the leftovers of an
  interrupted write (the marker), are cleared; a complete store is kept
  unless `overwrite` (its manifest is deleted first, so it stops reading as
  complete before anything else changes); anything else is refused, so a
  mistyped URL never deletes someone's objects. `field` names the setting
  in the errors.
  """
  kv = store_lib.open_kvstore(url)
  complete = store_lib.is_complete(url)
  if complete and not overwrite:
    raise store_lib.StoreError(
      f"{field}={url} already holds a token store; delete it or allow overwriting "
      "(data.overwrite_store=True)."
    )
  if (
    not complete
    and kv.list().result()
    and kv.read(store_lib.WRITING_MARKER).result().state != "value"
  ):
    raise store_lib.StoreError(
      f"{field}={url} holds objects that are not a token store; choose an empty URL."
    )
  # The marker first, so that leftovers of a stop anywhere below read as ours.
  kv.write(store_lib.WRITING_MARKER, b"").result()
  _clear_all_but_marker(kv)
  return kv


def _clear_all_but_marker(kv) -> None:
  """Deletes every object but WRITING_MARKER, the manifest first (a store
  stops reading as complete before anything else goes)."""
  key_range = store_lib.tensorstore().KvStore.KeyRange
  kv.delete_range(key_range(store_lib.MANIFEST, store_lib.MANIFEST + "\0")).result()
  kv.delete_range(key_range("", store_lib.WRITING_MARKER)).result()
  kv.delete_range(key_range(store_lib.WRITING_MARKER + "\0")).result()


def _delete_marker(kv) -> None:
  kv.delete_range(
    store_lib.tensorstore().KvStore.KeyRange(
      store_lib.WRITING_MARKER, store_lib.WRITING_MARKER + "\0"
    )
  ).result()


def _seal_url(kv, manifest: dict[str, Any]) -> None:
  """Writes the manifest (the store now reads as complete), then drops the
  writing marker; killed in between, the store is complete and the next
  writer still recognises the location as ours."""
  kv.write(store_lib.MANIFEST, json.dumps(manifest, indent=1).encode("utf-8")).result()
  _delete_marker(kv)


def open_writer(path: str | os.PathLike, *, overwrite: bool = False) -> TokenStoreWriter:
  """The writer for `path`: a local directory (`TokenStoreWriter`) or a
  kvstore URL (`ZarrStoreWriter`; http(s):// is read-only)."""
  path = os.fspath(path)
  if not is_url(path):
    return TokenStoreWriter(path, overwrite=overwrite)
  if scheme(path) in ("http", "https"):
    raise store_lib.StoreError(
      f"data.store_dir={path}: http(s):// is read-only; prepare to a local path or a "
      "file://, gs:// or s3:// URL."
    )
  return ZarrStoreWriter(path, overwrite=overwrite)


def export_zarr(
  store: store_lib.TokenStore,
  url: str,
  *,
  chunk_tokens: int = store_lib.ZARR_CHUNK,
  overwrite: bool = False,
) -> str:
  """Writes `store` to the kvstore `url` as zarr v3 (module docstring): the
  tokens of each split as a (num_tokens,) uint8 array in zstd chunks of
  `chunk_tokens`, the index and names as objects, the manifest last (the
  completion marker). Returns the URL. An export of this same store
  already there is kept as it is.

  Raises:
    StoreError: `url` is or holds the store itself, holds objects that are
      not a token store, or holds another complete store and not
      `overwrite`.
  """
  if not is_url(url):
    url = file_url(url)
  source, target = _comparable_dir(store.path), _comparable_dir(url)
  if source.startswith(target):
    raise store_lib.StoreError(
      f"--export_url={url} is the store's own location (or a folder holding it, "
      f"{store.path}); export to another URL."
    )
  if store_lib.is_complete(url) and not overwrite:
    try:
      same = _without_zarr_names(store_lib.read_manifest(url)) == _without_zarr_names(
        store.manifest
      )
    except (OSError, ValueError):
      same = False
    if same:
      logging.info("%s already holds an export of %s; keeping it.", url, store.path)
      return url
  kvstore = _claim_url(url, overwrite=overwrite, field="--export_url")
  manifest = json.loads(json.dumps(store.manifest))
  for name in store.splits:
    split, info = store[name], manifest["splits"][name]
    info["tokens_zarr"] = f"{name}.tokens.zarr"
    array = _create_zarr_tokens(url, info["tokens_zarr"], split.num_tokens, chunk_tokens)
    step = 64 * chunk_tokens
    for start in range(0, split.num_tokens, step):
      stop = min(start + step, split.num_tokens)
      array[start:stop].write(np.asarray(split.tokens[start:stop])).result()
    index = np.zeros((split.num_records,), store_lib.INDEX_DTYPE)
    index["offset"], index["length"], index["source"] = (
      split.offsets,
      split.lengths,
      split.source_ids,
    )
    _write_index_and_names(kvstore, info, index, split.names)
  _seal_url(kvstore, manifest)
  return url


def _comparable_dir(path: str) -> str:
  """`path` (a directory or URL) as a URL ending in "/", local paths resolved,
  so that one store location is a prefix of the locations inside it."""
  if is_url(path) and scheme(path) != "file":
    return store_lib.url_dir(path)
  local = local_file_path(path) if is_url(path) else path
  return store_lib.url_dir(file_url(os.path.realpath(local)))


def _without_zarr_names(manifest: dict[str, Any]) -> dict[str, Any]:
  """`manifest` without the per-split names of exported token arrays, which
  are all that an export changes."""
  out = dict(manifest)
  out["splits"] = {
    name: {k: v for k, v in info.items() if k != "tokens_zarr"}
    for name, info in manifest.get("splits", {}).items()
  }
  return out
