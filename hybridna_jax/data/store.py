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

The same store can live on any tensorstore kvstore as zarr v3 (`store_writer.export_zarr`,
`launch/prepare_data.py --export_url`): a URL (file://, gs://, s3://, or
http(s):// for reading) holding manifest.json, <split>.index.npy and
<split>.names.txt as objects and <split>.tokens.zarr, a 1-d uint8 zarr v3
array (zstd chunks of `ZARR_CHUNK` tokens). `TokenStore.open(url)` reads it:
`split.tokens[a:b]` reads through tensorstore (a process-wide chunk cache),
so each host fetches only the chunks its windows touch. A local path stays
memory-mapped (the fast path).

This module reads stores, and holds the tensorstore plumbing (context,
kvstores, small-object reads) that `store_writer`, which writes them, shares.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from hybridna_jax import tokenizer
from hybridna_jax.paths import file_url, is_url, scheme

FORMAT = "hybridna-token-store"
VERSION = 1
MANIFEST = "manifest.json"
INDEX_DTYPE = np.dtype([("offset", "<i8"), ("length", "<i8"), ("source", "<i4")])


ZARR_CHUNK = 1 << 20  # tokens per zarr chunk: 1 MiB before compression
ZARR_CACHE_BYTES = 256 << 20  # the process-wide tensorstore chunk cache
# How long a store's small objects (manifest, index) may take to read: an
# unreachable URL is retried by tensorstore for many minutes, silently.
CONTACT_TIMEOUT_S = 60.0
WRITING_MARKER = ".hybridna-writing"  # under a URL while `store_writer` writes


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


def tensorstore():
  """The tensorstore module, imported on first use."""
  import tensorstore as ts  # pylint: disable=g-import-not-at-top

  return ts


# Retries of a failing object read (HTTP 5xx, a cut connection): tensorstore's
# default, 32 with backoff, stalls a reader silently for about 15 minutes.
REQUEST_RETRIES = {"max_retries": 8, "initial_delay": "1s", "max_delay": "8s"}


def ts_context():
  """The process-wide tensorstore context: the chunk cache, request retries."""
  global _CONTEXT
  if _CONTEXT is None:
    _CONTEXT = tensorstore().Context(
      {
        "cache_pool": {"total_bytes_limit": ZARR_CACHE_BYTES},
        **{f"{kind}_request_retries": REQUEST_RETRIES for kind in ("http", "gcs", "s3")},
      }
    )
  return _CONTEXT


def url_dir(url: str) -> str:
  """`url` ending in "/"."""
  return url if url.endswith("/") else url + "/"


def open_kvstore(url: str):
  """The kvstore at `url`; a StoreError when tensorstore cannot open it."""
  try:
    return tensorstore().KvStore.open(url_dir(url), context=ts_context()).result()
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
    result = _contact(kvstore.read(name), f"{url_dir(url)}{name}")
  except StoreError:
    raise
  except Exception as e:  # noqa: BLE001 (tensorstore raises many kinds)
    raise StoreError(f"{url_dir(url)}{name}: cannot read ({e}).") from None
  if result.state != "value":
    if _contact(kvstore.read(WRITING_MARKER), url).state == "value":
      raise StoreError(
        f"{url_dir(url)}{name}: missing; a preparation or export to this URL was "
        "interrupted (or is running): run launch/prepare_data.py (or its --export_url) again."
      )
    raise StoreError(
      f"{url_dir(url)}{name}: missing; not a complete exported store "
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
    kvstore = open_kvstore(root)
    where = f"{url_dir(root)}{info['index_file']}"
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
    url = url_dir(root) + info["tokens_zarr"] + "/"
    try:
      array = (
        tensorstore()
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
          context=ts_context(),
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
      manifest_path = url_dir(path) + MANIFEST
      manifest = _parse_manifest(_read_object(open_kvstore(path), path, MANIFEST), manifest_path)
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
    return _contact(open_kvstore(url).read(MANIFEST), url_dir(url) + MANIFEST).state == "value"
  return os.path.exists(os.path.join(os.fspath(path), MANIFEST))


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
    return _parse_manifest(
      _read_object(open_kvstore(path), path, MANIFEST), url_dir(path) + MANIFEST
    )
  with open(os.path.join(path, MANIFEST), "rb") as f:
    return _parse_manifest(f.read(), os.path.join(path, MANIFEST))
