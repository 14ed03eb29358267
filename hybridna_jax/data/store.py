"""Token store: tokenized genomes on disk, memory-mapped for random access.

Layout of a store directory (one set of files per split, e.g. train, val):

    manifest.json        completion marker, written last: format, vocabulary,
                         sources, per-split counts, preparation metadata
    <split>.tokens       uint8 token ids of all records, back to back
    <split>.index.npy    structured array, one row per record:
                         offset int64, length int64, source int32
    <split>.names.txt    record names, one per line, in index order

Token ids are those of `hybridna_jax.tokenizer`, stored as uint8. Records are
stored without separators; the index gives their boundaries. Sources (a
genome, strain or species) are named in the manifest and referred to by id.

The same store can live on any tensorstore kvstore as zarr v3 (`export_zarr`,
`launch/prepare_data.py --export_url`): a URL (file://, gs://, s3://, or
http(s):// for reading) holding manifest.json, <split>.index.npy and
<split>.names.txt as objects and <split>.tokens.zarr, a 1-d uint8 zarr v3
array (zstd chunks of `ZARR_CHUNK` tokens). `TokenStore.open(url)` reads it:
`split.tokens[a:b]` reads through tensorstore (a process-wide chunk cache),
so each host fetches only the chunks its windows touch. A local path stays
memory-mapped (the fast path).

Writes are atomic: `TokenStoreWriter` builds the store in a temporary
directory next to the target and renames it into place only after every file
is flushed and the manifest is written, so an interrupted preparation never
leaves a directory that `TokenStore.open` accepts.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from absl import logging

from hybridna_jax import tokenizer
from hybridna_jax.paths import file_url, is_url, local_file_path, scheme, write_json

FORMAT = "hybridna-token-store"
VERSION = 1
MANIFEST = "manifest.json"
INDEX_DTYPE = np.dtype([("offset", "<i8"), ("length", "<i8"), ("source", "<i4")])


ZARR_CHUNK = 1 << 20  # tokens per zarr chunk: 1 MiB before compression
ZARR_CACHE_BYTES = 256 << 20  # the process-wide tensorstore chunk cache
# How long a store's small objects (manifest, index) may take to read: an
# unreachable URL is retried by tensorstore for many minutes, silently.
CONTACT_TIMEOUT_S = 60.0


class StoreError(ValueError):
  """A missing, incomplete or inconsistent token store."""


def _load_index(source, where: str, fix: str, **kwargs) -> np.ndarray:
  """np.load of a record index (a path or a file object); a truncated or
  damaged one is a StoreError naming `where` and `fix`."""
  try:
    return np.load(source, allow_pickle=False, **kwargs)
  except (OSError, ValueError, EOFError) as e:
    raise StoreError(f"{where}: not a readable record index ({e}); {fix}") from None


def _parse_manifest(text: str | bytes, where: str) -> dict[str, Any]:
  try:
    manifest = json.loads(text)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise StoreError(f"{where}: not valid JSON ({e}); prepare the store again.") from None
  if not isinstance(manifest, dict):
    raise StoreError(f"{where}: not a store manifest (a JSON object); prepare the store again.")
  return manifest


_CONTEXT = None


def _ts():
  import tensorstore as ts  # pylint: disable=g-import-not-at-top

  return ts


# Retries of a failing object read (HTTP 5xx, a cut connection): tensorstore's
# default, 32 with backoff, stalls a reader silently for about 15 minutes.
REQUEST_RETRIES = {"max_retries": 8, "initial_delay": "1s", "max_delay": "8s"}


def _context():
  global _CONTEXT
  if _CONTEXT is None:
    _CONTEXT = _ts().Context(
      {
        "cache_pool": {"total_bytes_limit": ZARR_CACHE_BYTES},
        **{f"{kind}_request_retries": REQUEST_RETRIES for kind in ("http", "gcs", "s3")},
      }
    )
  return _CONTEXT


def _url_dir(url: str) -> str:
  return url if url.endswith("/") else url + "/"


def _kvstore(url: str):
  try:
    return _ts().KvStore.open(_url_dir(url), context=_context()).result()
  except ValueError as e:
    raise StoreError(f"{url}: not a kvstore URL tensorstore can open ({e}).") from None


def _contact(future, url: str):
  """The result of a small read at `url`, or a one-line StoreError after
  CONTACT_TIMEOUT_S."""
  try:
    return future.result(timeout=CONTACT_TIMEOUT_S)
  except TimeoutError:
    raise StoreError(
      f"{url}: no answer in {CONTACT_TIMEOUT_S:.0f} s; check the URL, that the server is up"
      f"{_CREDENTIALS_HINT.get(scheme(url), '')}."
    ) from None


_CREDENTIALS_HINT = {
  "gs": ", and the credentials (gcloud auth application-default login)",
  "s3": ", and the credentials and region (AWS_PROFILE or ~/.aws/credentials, AWS_REGION)",
}


def _read_object(kvstore, url: str, name: str) -> bytes:
  try:
    result = _contact(kvstore.read(name), f"{_url_dir(url)}{name}")
  except StoreError:
    raise
  except Exception as e:  # noqa: BLE001 (tensorstore raises many kinds)
    raise StoreError(f"{_url_dir(url)}{name}: cannot read ({e}).") from None
  if result.state != "value":
    if _contact(kvstore.read(WRITING_MARKER), url).state == "value":
      raise StoreError(
        f"{_url_dir(url)}{name}: missing; a preparation or export to this URL was "
        "interrupted (or is running): run launch/prepare_data.py (or its --export_url) again."
      )
    raise StoreError(
      f"{_url_dir(url)}{name}: missing; not a complete exported store "
      "(export it again with launch/prepare_data.py --export_url)."
    )
  return bytes(result.value)


class ZarrTokens:
  """uint8 (n,) tokens of a zarr v3 array; `tokens[a:b]` reads (b - a,)
  uint8 through tensorstore."""

  def __init__(self, array):
    self._array = array
    self.size = int(array.shape[0])
    self.shape = (self.size,)
    self.dtype = np.dtype(np.uint8)

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, key: slice) -> np.ndarray:
    if not isinstance(key, slice) or key.step not in (None, 1):
      raise TypeError("zarr token arrays take [start:stop] slices only")
    start, stop, _ = key.indices(self.size)
    if stop <= start:
      return np.zeros((0,), np.uint8)
    return self._array[start:stop].read().result()

  def read_many(self, ranges) -> list[np.ndarray]:
    """[self[lo:hi] for (lo, hi) in ranges], the reads issued together."""
    futures = [self._array[lo:hi].read() if hi > lo else None for lo, hi in ranges]
    return [np.zeros((0,), np.uint8) if f is None else f.result() for f in futures]


def read_ranges(tokens, ranges) -> list[np.ndarray]:
  """[tokens[lo:hi] for (lo, hi) in ranges], uint8 (hi - lo,) each. On a
  zarr store every read is issued before any is awaited, so tensorstore
  fetches their chunks concurrently (remote latency overlaps); a memory
  map is sliced."""
  if isinstance(tokens, ZarrTokens):
    return tokens.read_many(ranges)
  return [tokens[lo:hi] for lo, hi in ranges]


def vocabulary() -> dict[str, int]:
  """Token names -> ids, recorded in the manifest so stores stay readable."""
  return {tokenizer.token_name(i): i for i in range(tokenizer.FIRST_TASK_TOKEN)}


@dataclasses.dataclass(frozen=True)
class Record:
  """One stored record.

  Attributes:
    name: record name (the FASTA id).
    source: name of its source (genome / strain / species).
    split: the split it belongs to.
    index: its row in the split's index.
    offset: position of its first token in the split's token file.
    length: number of tokens.
    tokens: uint8 (length,) read-only memory-mapped view.
  """

  name: str
  source: str
  split: str
  index: int
  offset: int
  length: int
  tokens: np.ndarray


class StoreSplit:
  """Random access to the records of one split (memory-mapped, lazy)."""

  def __init__(self, root: str, name: str, info: dict[str, Any], sources: tuple[str, ...]):
    self.root = root
    self.name = name
    self.info = info
    self.sources = sources
    self.num_records = int(info["num_records"])
    self.num_tokens = int(info["num_tokens"])
    index_path = os.path.join(root, info["index_file"])
    index = (
      _load_index(index_path, index_path, "prepare the store again.", mmap_mode="r")
      if self.num_records
      else np.zeros((0,), INDEX_DTYPE)
    )
    if index.dtype != INDEX_DTYPE or index.shape != (self.num_records,):
      raise StoreError(
        f"{index_path}: index has dtype {index.dtype} and shape "
        f"{index.shape}, the manifest promises {self.num_records} records "
        f"of {INDEX_DTYPE}; the store is corrupt: prepare it again."
      )
    # Small (24 bytes a record): copy into memory for fast searchsorted.
    self.offsets = np.ascontiguousarray(index["offset"])
    self.lengths = np.ascontiguousarray(index["length"])
    self.source_ids = np.ascontiguousarray(index["source"])
    self._tokens_path = os.path.join(root, info["tokens_file"])
    size = os.path.getsize(self._tokens_path)
    if size != self.num_tokens:
      raise StoreError(
        f"{self._tokens_path}: {size} bytes, the manifest promises "
        f"{self.num_tokens} tokens; the store is corrupt: prepare it again."
      )
    self._tokens = None
    self._names = None

  @property
  def tokens(self) -> np.ndarray:
    """uint8 (num_tokens,) read-only memory map of the whole split."""
    if self._tokens is None:
      if self.num_tokens == 0:
        self._tokens = np.zeros((0,), np.uint8)
      else:
        self._tokens = np.memmap(self._tokens_path, dtype=np.uint8, mode="r")
    return self._tokens

  @property
  def names(self) -> list[str]:
    """Record names in index order (read on first use)."""
    if self._names is None:
      path = os.path.join(self.root, self.info["names_file"])
      with open(path, encoding="utf-8") as f:
        self._names = f.read().split("\n")[: self.num_records]
      if len(self._names) != self.num_records:
        raise StoreError(
          f"{path}: {len(self._names)} names for {self.num_records} records; prepare it again."
        )
    return self._names

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, i: int) -> Record:
    if not -self.num_records <= i < self.num_records:
      raise IndexError(
        f"record {i} out of range for split {self.name!r} with {self.num_records} records"
      )
    i %= self.num_records
    offset, length = int(self.offsets[i]), int(self.lengths[i])
    return Record(
      self.names[i],
      self.sources[self.source_ids[i]],
      self.name,
      i,
      offset,
      length,
      self.tokens[offset : offset + length],
    )

  def __iter__(self) -> Iterator[Record]:
    for i in range(self.num_records):
      yield self[i]

  def find(self, name: str, source: str | None = None) -> Record:
    """The record called `name` (in `source`, when names repeat)."""
    hits = [
      i
      for i, n in enumerate(self.names)
      if n == name and (source is None or self.sources[self.source_ids[i]] == source)
    ]
    if len(hits) != 1:
      where = f" in source {source!r}" if source else ""
      raise KeyError(
        f"{len(hits)} records named {name!r}{where} in split "
        f"{self.name!r}" + ("; pass source=" if hits else "")
      )
    return self[hits[0]]

  def source_token_counts(self) -> np.ndarray:
    """int64 (num_sources,): tokens of each source in this split."""
    return np.bincount(self.source_ids, weights=self.lengths, minlength=len(self.sources)).astype(
      np.int64
    )


class ZarrStoreSplit(StoreSplit):
  """A split of an exported store on a kvstore URL (zarr v3 tokens)."""

  def __init__(self, root: str, name: str, info: dict[str, Any], sources: tuple[str, ...]):
    self.root, self.name, self.info, self.sources = root, name, info, sources
    self.num_records = int(info["num_records"])
    self.num_tokens = int(info["num_tokens"])
    kvstore = _kvstore(root)
    where = f"{_url_dir(root)}{info['index_file']}"
    index = _load_index(
      io.BytesIO(_read_object(kvstore, root, info["index_file"])), where, "export it again."
    )
    if index.dtype != INDEX_DTYPE or index.shape != (self.num_records,):
      raise StoreError(
        f"{where}: index of dtype {index.dtype} and shape "
        f"{index.shape}, the manifest promises {self.num_records} records; export it again."
      )
    self.offsets = np.ascontiguousarray(index["offset"])
    self.lengths = np.ascontiguousarray(index["length"])
    self.source_ids = np.ascontiguousarray(index["source"])
    self._names_bytes = lambda: _read_object(kvstore, root, info["names_file"])
    url = _url_dir(root) + info["tokens_zarr"] + "/"
    try:
      array = (
        _ts()
        .open(
          {
            "driver": "zarr3",
            "kvstore": url,
            # A missing chunk object is an error, not tokens of 0 (<pad>).
            "fill_missing_data_reads": False,
            # Chunks cached before this open are read again: the URL may
            # hold a store prepared since (the cache is process-wide).
            "recheck_cached_data": "open",
          },
          context=_context(),
          open=True,
          read=True,
        )
        .result()
      )
    except Exception as e:  # noqa: BLE001
      raise StoreError(f"{url}: cannot open the zarr token array ({e}); export it again.") from None
    if array.shape != (self.num_tokens,):
      raise StoreError(
        f"{url}: shape {array.shape}, the manifest promises {self.num_tokens} tokens; "
        "export it again."
      )
    self._tokens = ZarrTokens(array)
    self._names = None

  @property
  def tokens(self) -> ZarrTokens:
    """The split's tokens; slices read through tensorstore."""
    return self._tokens

  @property
  def names(self) -> list[str]:
    if self._names is None:
      self._names = self._names_bytes().decode("utf-8").split("\n")[: self.num_records]
      if len(self._names) != self.num_records:
        raise StoreError(
          f"{self.root}: {len(self._names)} names for {self.num_records} records; export it again."
        )
    return self._names


class TokenStore:
  """A prepared token store; open with `TokenStore.open(path)`.

  `store["train"]` is a `StoreSplit`; `store.sources` names the sources.
  Pickles as its path (the memory maps reopen in the new process).
  """

  def __init__(self, path: str, manifest: dict[str, Any]):
    self.path = path
    self.manifest = manifest
    self.sources = tuple(manifest["sources"])
    split_type = ZarrStoreSplit if is_url(path) else StoreSplit
    self._splits = {
      name: split_type(path, name, info, self.sources) for name, info in manifest["splits"].items()
    }

  @classmethod
  def open(cls, path: str | os.PathLike) -> TokenStore:
    """Opens a local store directory or an exported store's URL."""
    path = os.fspath(path)
    if not path:
      raise StoreError(
        "data.store_dir is empty: set it to a prepared store, or prepare one with "
        "launch/prepare_data.py."
      )
    if is_url(path):
      manifest_path = _url_dir(path) + MANIFEST
      manifest = _parse_manifest(_read_object(_kvstore(path), path, MANIFEST), manifest_path)
      if any("tokens_zarr" not in info for info in manifest.get("splits", {}).values()):
        raise StoreError(
          f"{manifest_path}: a local store's manifest, not an exported one; "
          "write URLs with launch/prepare_data.py --export_url."
        )
      return cls._checked(path, manifest_path, manifest)
    if not os.path.isdir(path):
      raise StoreError(
        f"no token store at {path}; prepare one with "
        "launch/prepare_data.py (or check data.store_dir)."
      )
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.exists(manifest_path):
      raise StoreError(
        f"{path} is not a complete token store (no {MANIFEST}): a "
        "preparation was interrupted or this is another directory; delete "
        "it and run launch/prepare_data.py again."
      )
    with open(manifest_path, "rb") as f:
      manifest = _parse_manifest(f.read(), manifest_path)
    splits = manifest.get("splits", {}).values()
    if splits and all("tokens_zarr" in info for info in splits):
      # A local directory holding an export (prepare_data --export_url=<path>).
      return cls.open(file_url(path))
    return cls._checked(path, manifest_path, manifest)

  @classmethod
  def _checked(cls, path: str, manifest_path: str, manifest: dict[str, Any]) -> TokenStore:
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
      raise StoreError(
        f"{manifest_path}: format {manifest.get('format')!r} version "
        f"{manifest.get('version')!r}, expected {FORMAT!r} version "
        f"{VERSION}; prepare the store again with this version."
      )
    if manifest.get("vocabulary") != vocabulary():
      raise StoreError(
        f"{manifest_path}: the store was written with another token "
        "vocabulary; prepare it again with this version."
      )
    return cls(path, manifest)

  @property
  def splits(self) -> tuple[str, ...]:
    return tuple(self._splits)

  def __getitem__(self, split: str) -> StoreSplit:
    if split not in self._splits:
      raise KeyError(
        f"split {split!r} not in the store at {self.path} (it has {sorted(self._splits)})"
      )
    return self._splits[split]

  def __contains__(self, split: str) -> bool:
    return split in self._splits

  def __reduce__(self):
    return (TokenStore.open, (self.path,))

  def __repr__(self) -> str:
    parts = ", ".join(
      f"{s.name}: {s.num_records} records / {s.num_tokens} tokens" for s in self._splits.values()
    )
    return f"TokenStore({self.path!r}; {parts})"


def is_complete(path: str | os.PathLike) -> bool:
  """Whether `path` (a directory or URL) holds a store that finished writing."""
  if is_url(path):
    url = os.fspath(path)
    return _contact(_kvstore(url).read(MANIFEST), _url_dir(url) + MANIFEST).state == "value"
  return os.path.exists(os.path.join(os.fspath(path), MANIFEST))


def export_zarr(
  store: TokenStore, url: str, *, chunk_tokens: int = ZARR_CHUNK, overwrite: bool = False
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
    raise StoreError(
      f"--export_url={url} is the store's own location (or a folder holding it, "
      f"{store.path}); export to another URL."
    )
  if is_complete(url) and not overwrite:
    try:
      same = _without_zarr_names(read_manifest(url)) == _without_zarr_names(store.manifest)
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
    index = np.zeros((split.num_records,), INDEX_DTYPE)
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
    return _url_dir(path)
  local = local_file_path(path) if is_url(path) else path
  return _url_dir(file_url(os.path.realpath(local)))


def _without_zarr_names(manifest: dict[str, Any]) -> dict[str, Any]:
  """`manifest` without the per-split names of exported token arrays, which
  are all that an export changes."""
  out = dict(manifest)
  out["splits"] = {
    name: {k: v for k, v in info.items() if k != "tokens_zarr"}
    for name, info in manifest.get("splits", {}).items()
  }
  return out


def _create_zarr_tokens(url: str, name: str, size: int, chunk_tokens: int = ZARR_CHUNK):
  """A new (size,) uint8 zarr v3 array `name` under `url` (zstd chunks of
  `chunk_tokens`), replacing any there; the tensorstore handle."""
  spec = {
    "driver": "zarr3",
    "kvstore": _url_dir(url) + name + "/",
    "metadata": {
      "shape": [size],
      "data_type": "uint8",
      "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [chunk_tokens]}},
      "codecs": [{"name": "bytes"}, {"name": "zstd", "configuration": {"level": 3}}],
    },
  }
  return _ts().open(spec, create=True, delete_existing=True, context=_context()).result()


def _write_index_and_names(kvstore, info: dict[str, Any], index: np.ndarray, names) -> None:
  buf = io.BytesIO()
  np.save(buf, index)
  kvstore.write(info["index_file"], buf.getvalue()).result()
  kvstore.write(info["names_file"], "\n".join(names).encode("utf-8")).result()


def verify(path: str | os.PathLike) -> str | None:
  """Why the complete store at `path` cannot be used (a missing or
  truncated file, a bad manifest), or None when its files match its
  manifest. Reads the index and names, not the tokens."""
  try:
    store = TokenStore.open(path)
    for split in store.splits:
      part = store[split]
      _ = part.names
      if part.num_records and int(part.offsets[-1] + part.lengths[-1]) != part.num_tokens:
        raise StoreError(f"{part.root}: the index of split {split!r} does not fit its tokens")
  except (OSError, ValueError, KeyError, EOFError) as e:
    return str(e)
  return None


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
  """The manifest of the store at `path` (a directory or URL)."""
  path = os.fspath(path)
  if is_url(path):
    return _parse_manifest(_read_object(_kvstore(path), path, MANIFEST), _url_dir(path) + MANIFEST)
  with open(os.path.join(path, MANIFEST), "rb") as f:
    return _parse_manifest(f.read(), os.path.join(path, MANIFEST))


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
    self._rows = np.zeros((1024,), INDEX_DTYPE)
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
      if not os.path.isfile(os.path.join(self.path, MANIFEST)):
        raise StoreError(
          f"data.store_dir={self.path} exists and is not a token store; choose a new or "
          "empty directory."
        )
      if not overwrite:
        raise StoreError(
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
      "format": FORMAT,
      "version": VERSION,
      "vocabulary": vocabulary(),
      "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
      "sources": list(self._sources),
      "splits": splits,
      "metadata": metadata or {},
    }

  def commit(self, metadata: dict[str, Any] | None = None) -> TokenStore:
    """Finishes the files, writes the manifest and moves the store in place."""
    splits = {n: s.close(self.tmp) for n, s in self._splits.items()}
    manifest = self._manifest(splits, metadata)
    write_json(os.path.join(self.tmp, MANIFEST), manifest)
    _fsync_dir(self.tmp)
    replaced = os.path.exists(self.path)
    if replaced:
      os.rename(self.path, self._old)
    os.rename(self.tmp, self.path)
    _fsync_dir(os.path.dirname(self.path))
    if replaced:
      shutil.rmtree(self._old, ignore_errors=True)
    self._done = True
    return TokenStore.open(self.path)

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


WRITING_MARKER = ".hybridna-writing"  # under a URL while ZarrStoreWriter writes


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
    self._rows = np.zeros((1024,), INDEX_DTYPE)
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
      _kvstore(self._url), self._info(), self._rows[: self.num_records], self._name_list
    )
    return {**self._info(), "tokens_zarr": self.tokens_zarr}

  def discard(self):
    pass


class ZarrStoreWriter(TokenStoreWriter):
  """`TokenStoreWriter` straight to a kvstore URL (file://, gs://, s3://)
  as an exported store (zarr v3 tokens, module docstring), in bounded
  memory. The manifest, written last, marks it complete: an interrupted
  write never reads as a store, and its objects (marked by WRITING_MARKER)
  are deleted by `abort` or by the next writer to the same URL. What is
  already at the URL is handled by `_claim_url`.

  Raises:
    StoreError: a complete store is there and not `overwrite`, or the URL
      holds other objects.
  """

  def __init__(self, url: str, *, overwrite: bool = False, chunk_tokens: int = ZARR_CHUNK):
    self.path = url
    self._kv = _claim_url(url, overwrite=overwrite, field="data.store_dir")
    self._chunk = chunk_tokens
    self._splits: dict[str, _SplitWriter] = {}
    self._sources: dict[str, int] = {}
    self._current: _SplitWriter | None = None
    self._done = False

  def _new_split(self, split: str) -> _SplitWriter:
    return _ZarrSplitWriter(self.path, split, self._chunk)

  def commit(self, metadata: dict[str, Any] | None = None) -> TokenStore:
    """Writes the remaining tokens, the indexes and names, then the manifest."""
    splits = {n: s.close(self.path) for n, s in self._splits.items()}
    _seal_url(self._kv, self._manifest(splits, metadata))
    self._done = True
    return TokenStore.open(self.path)

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
  kv = _kvstore(url)
  complete = is_complete(url)
  if complete and not overwrite:
    raise StoreError(
      f"{field}={url} already holds a token store; delete it or allow overwriting "
      "(data.overwrite_store=True)."
    )
  if not complete and kv.list().result() and kv.read(WRITING_MARKER).result().state != "value":
    raise StoreError(
      f"{field}={url} holds objects that are not a token store; choose an empty URL."
    )
  # The marker first, so that leftovers of a stop anywhere below read as ours.
  kv.write(WRITING_MARKER, b"").result()
  _clear_all_but_marker(kv)
  return kv


def _clear_all_but_marker(kv) -> None:
  """Deletes every object but WRITING_MARKER, the manifest first (a store
  stops reading as complete before anything else goes)."""
  key_range = _ts().KvStore.KeyRange
  kv.delete_range(key_range(MANIFEST, MANIFEST + "\0")).result()
  kv.delete_range(key_range("", WRITING_MARKER)).result()
  kv.delete_range(key_range(WRITING_MARKER + "\0")).result()


def _delete_marker(kv) -> None:
  kv.delete_range(_ts().KvStore.KeyRange(WRITING_MARKER, WRITING_MARKER + "\0")).result()


def _seal_url(kv, manifest: dict[str, Any]) -> None:
  """Writes the manifest (the store now reads as complete), then drops the
  writing marker; killed in between, the store is complete and the next
  writer still recognises the location as ours."""
  kv.write(MANIFEST, json.dumps(manifest, indent=1).encode("utf-8")).result()
  _delete_marker(kv)


def open_writer(path: str | os.PathLike, *, overwrite: bool = False) -> TokenStoreWriter:
  """The writer for `path`: a local directory (`TokenStoreWriter`) or a
  kvstore URL (`ZarrStoreWriter`; http(s):// is read-only)."""
  path = os.fspath(path)
  if not is_url(path):
    return TokenStoreWriter(path, overwrite=overwrite)
  if scheme(path) in ("http", "https"):
    raise StoreError(
      f"data.store_dir={path}: http(s):// is read-only; prepare to a local path or a "
      "file://, gs:// or s3:// URL."
    )
  return ZarrStoreWriter(path, overwrite=overwrite)
